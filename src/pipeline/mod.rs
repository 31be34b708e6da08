//! Pipelines: YAML files -> a checked, resolved model ready to plan.
//!
//! Raw (serde types, with a location index) -> Resolved (`${params.*}` substituted, step
//! kinds and spec files bound, inputs linked to outputs, graph acyclic). Every problem
//! found along the way is collected with its file:line:column and reported at once.

mod condition;
pub mod diagnostic;
mod expand;
mod include;
mod link;
pub mod location;
mod params;
mod parse;
pub mod raw;
mod resolve;
mod snapshot;
mod source;
mod spec;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use serde_json::Value;

use crate::graph::Dag;

use crate::steps::{BoundParams, Step};
pub use diagnostic::{Diagnostic, Diagnostics, Location};
pub use parse::yaml_to_json;
use resolve::Resolver;
pub(crate) use source::SourceFile;

/// A pipeline ready to plan.
#[derive(Debug)]
pub struct ResolvedPipeline {
    /// Pipeline name.
    pub name: String,
    /// Free text.
    pub description: Option<String>,
    /// The file it came from.
    pub file: PathBuf,
    /// Effective pipeline parameters (file values with `--set` applied).
    pub params: IndexMap<String, Value>,
    /// Document store URI from `docstore: {uri}` (may hold a password: never recorded).
    pub docstore_uri: Option<String>,
    /// The shared cache on object storage (`remote:`), and its options (may hold keys:
    /// never recorded).
    pub remote: Option<(String, BTreeMap<String, String>)>,
    /// Steps in file order.
    pub steps: Vec<ResolvedStep>,
    /// The step graph over positions in `steps`, built once at load time.
    pub dag: Dag,
}

/// A step with everything bound.
#[derive(Clone)]
pub struct ResolvedStep {
    /// Step name.
    pub name: String,
    /// `uses:` as written (a kind or a spec path).
    pub uses: String,
    /// The implementation that runs it.
    pub implementation: &'static dyn Step,
    /// Version that enters the cache key (kind version, or spec digest).
    pub version: String,
    /// Resolved parameters of the implementation, as JSON (hashed into the cache key and
    /// recorded).
    pub params: Value,
    /// The same parameters as the kind parsed them, handed to its hooks.
    pub bound: BoundParams,
    /// Pipeline parameters the step references, with their values.
    pub param_refs: BTreeMap<String, Value>,
    /// Values exported to commands as `CAIRN_PARAM_*`.
    pub param_env: BTreeMap<String, Value>,
    /// Inputs by name.
    pub inputs: IndexMap<String, InputBinding>,
    /// The artifact kind each declared input expects (`any` accepts every kind).
    pub expects: BTreeMap<String, String>,
    /// Outputs by name, with kinds.
    pub outputs: IndexMap<String, String>,
    /// The foreach or matrix item this step is one variant of.
    pub variant: Option<Variant>,
    /// Why the step does not run: its `when:` condition is false.
    pub skip: Option<String>,
    /// Run as a Slurm job with these resources (`None`: on this machine).
    pub slurm: Option<raw::RawResources>,
}

/// One variant of a `foreach` or `matrix` step.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Variant {
    /// The step as written in the file (`train`).
    pub base: String,
    /// The item, as it appears between the brackets (`rank=8,lr=1e-4`).
    pub label: String,
    /// A matrix combination (else a foreach item).
    pub matrix: bool,
}

impl std::fmt::Debug for ResolvedStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResolvedStep")
            .field("name", &self.name)
            .field("uses", &self.uses)
            .field("params", &self.params)
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .finish()
    }
}

/// An input bound to another step's output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputBinding {
    /// Producing step.
    pub step: String,
    /// Output name on it.
    pub output: String,
}

impl std::fmt::Display for InputBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.step, self.output)
    }
}

/// Loads, checks and resolves a pipeline file with `--set KEY=VALUE` overrides.
pub fn load(file: &Path, sets: &[String]) -> Result<ResolvedPipeline, Diagnostics> {
    load_with_snapshots(file, sets, None)
}

/// [`load`], reusing (and keeping) a snapshot of the resolved pipeline in `snapshots`
/// when given: an unchanged file with the same `--set` is not parsed again (see
/// `snapshot.rs`).
pub fn load_with_snapshots(
    file: &Path,
    sets: &[String],
    snapshots: Option<&Path>,
) -> Result<ResolvedPipeline, Diagnostics> {
    let src = SourceFile::read(file, "pipeline")?;
    let snapshot = snapshots.and_then(|dir| Some((dir, snapshot::key(&src, sets)?)));
    if let Some((dir, key)) = &snapshot {
        if let Some(pipeline) = snapshot::read(dir, key, &src) {
            return Ok(pipeline);
        }
    }
    let Some(raw) = parse::quick_parse(&src) else {
        // Not written to a snapshot: the careful parse found something to say.
        let (raw, soft) = parse::careful_parse(&src)?;
        let mut resolver = Resolver::new(&src);
        resolver.diags = soft;
        return resolver.resolve(raw, sets);
    };
    let declared_outputs: BTreeMap<String, IndexMap<String, String>> = match &snapshot {
        Some(_) => raw
            .steps
            .iter()
            .map(|(name, step)| (name.clone(), step.outputs.clone().unwrap_or_default()))
            .collect(),
        None => BTreeMap::new(),
    };
    let pipeline = Resolver::new(&src).resolve(raw, sets)?;
    if let Some((dir, key)) = &snapshot {
        snapshot::write(dir, key, &pipeline, &declared_outputs);
    }
    Ok(pipeline)
}
