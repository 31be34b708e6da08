//! Resolved-pipeline snapshots: what loading a pipeline file produced, kept in the store
//! and keyed by everything loading reads, so an unchanged pipeline is not parsed and
//! resolved again on every `run` and `plan`.
//!
//! YAML parsing is the floor of a no-op rerun: libyaml needs ~5 ms for the 160 kB of a
//! 1000-step pipeline and substitution and linking ~3 ms more, while the rerun's own work
//! is a few ms (like Nix's evaluation cache, the answer is not to redo it). The key hashes
//! the cairn binary (size and mtime, so a rebuilt binary never reads an older build's
//! snapshot), the working directory, the path as given, the file's bytes and every
//! `--set`. A snapshot holds the parsed and substituted pipeline; step kinds bind its
//! parameters again when it is read (binding checks what may have changed on disk since,
//! and is cheap), and the graph is rebuilt, so a snapshot that no longer binds is just not used.
//!
//! Written only for what needs nothing else to load: no spec-file steps (they read other
//! files), no document store URI, and no value that redaction would mask (a password given
//! with `--set` never lands on disk). Anything unreadable or stale is ignored and the file
//! is loaded the slow way. Writes are atomic (temp file, rename); at most
//! [`MAX_SNAPSHOTS`] are kept, the oldest removed first.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::link::step_graph;
use super::{InputBinding, ResolvedPipeline, ResolvedStep, SourceFile, Variant};
use crate::steps;

/// Snapshots kept per store.
pub const MAX_SNAPSHOTS: usize = 32;

const DOMAIN: &[u8] = b"cairn-pipeline-snapshot-v3\0";

/// A snapshot's key, as the file name it is stored under.
pub(super) fn key(src: &SourceFile, sets: &[String]) -> Option<String> {
    fn field(hasher: &mut blake3::Hasher, bytes: &[u8]) {
        hasher.update(&(bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    }
    let exe = std::fs::metadata(std::env::current_exe().ok()?).ok()?;
    let built = exe
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    let cwd = std::env::current_dir().ok()?;
    let mut hasher = blake3::Hasher::new();
    hasher.update(DOMAIN);
    field(&mut hasher, env!("CARGO_PKG_VERSION").as_bytes());
    hasher.update(&exe.len().to_le_bytes());
    hasher.update(&built.as_nanos().to_le_bytes());
    field(&mut hasher, cwd.as_os_str().as_encoded_bytes());
    field(&mut hasher, src.path.as_os_str().as_encoded_bytes());
    field(&mut hasher, src.text.as_bytes());
    hasher.update(&(sets.len() as u64).to_le_bytes());
    for set in sets {
        field(&mut hasher, set.as_bytes());
    }
    Some(format!("{}.json", hasher.finalize().to_hex()))
}

/// What a snapshot holds: borrowed from the pipeline when written, owned when read.
#[derive(Serialize, Deserialize)]
struct Snapshot<'a> {
    name: Cow<'a, str>,
    description: Option<Cow<'a, str>>,
    params: Cow<'a, IndexMap<String, Value>>,
    steps: Vec<StepSnapshot<'a>>,
}

/// A step as loading left it. Lists rather than maps, and empty ones left out: reading a
/// snapshot is most of a no-op rerun's load time.
#[derive(Serialize, Deserialize)]
struct StepSnapshot<'a> {
    name: Cow<'a, str>,
    uses: Cow<'a, str>,
    params: Cow<'a, Value>,
    #[serde(default, skip_serializing_if = "is_empty")]
    param_refs: Cow<'a, BTreeMap<String, Value>>,
    #[serde(default, skip_serializing_if = "is_empty")]
    param_env: Cow<'a, BTreeMap<String, Value>>,
    /// (input, producing step, its output).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    inputs: Vec<(Cow<'a, str>, Cow<'a, str>, Cow<'a, str>)>,
    /// (output, kind) as the file declares them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    declared_outputs: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    variant: Option<Cow<'a, Variant>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    skip: Option<Cow<'a, str>>,
}

fn is_empty(map: &BTreeMap<String, Value>) -> bool {
    map.is_empty()
}

/// The pipeline stored under `key` in `dir`, bound again; `None` when there is none or it
/// no longer binds.
pub(super) fn read(dir: &Path, key: &str, src: &SourceFile) -> Option<ResolvedPipeline> {
    let bytes = std::fs::read(dir.join(key)).ok()?;
    let snapshot: Snapshot = serde_json::from_slice(&bytes).ok()?;
    let mut steps = Vec::with_capacity(snapshot.steps.len());
    for s in snapshot.steps {
        let implementation = steps::lookup(&s.uses)?;
        let declared_outputs: IndexMap<String, String> = s
            .declared_outputs
            .into_iter()
            .map(|(name, kind)| (name.into_owned(), kind.into_owned()))
            .collect();
        let params = s.params.into_owned();
        let (bound, io) = implementation.bind(&params, &declared_outputs).ok()?;
        steps.push(ResolvedStep {
            name: s.name.into_owned(),
            uses: s.uses.into_owned(),
            implementation,
            version: implementation.version(),
            params,
            bound,
            param_refs: s.param_refs.into_owned(),
            param_env: s.param_env.into_owned(),
            inputs: s
                .inputs
                .into_iter()
                .map(|(name, step, output)| {
                    let binding = InputBinding {
                        step: step.into_owned(),
                        output: output.into_owned(),
                    };
                    (name.into_owned(), binding)
                })
                .collect(),
            expects: io
                .inputs
                .iter()
                .flatten()
                .map(|d| (d.name.clone(), d.kind.clone()))
                .collect(),
            outputs: io.outputs,
            variant: s.variant.map(Cow::into_owned),
            skip: s.skip.map(Cow::into_owned),
            slurm: None,
        });
    }
    let dag = step_graph(&steps).ok()?;
    Some(ResolvedPipeline {
        name: snapshot.name.into_owned(),
        description: snapshot.description.map(Cow::into_owned),
        file: src.path.clone(),
        params: snapshot.params.into_owned(),
        docstore_uri: None,
        remote: None,
        steps,
        dag,
    })
}

/// Stores `pipeline` under `key` in `dir` when it may be (see the module doc); failures
/// only cost the next load its speed.
pub(super) fn write(
    dir: &Path,
    key: &str,
    pipeline: &ResolvedPipeline,
    declared_outputs: &BTreeMap<String, IndexMap<String, String>>,
) {
    // Slurm resources are not kept in snapshots: such pipelines load the slow way.
    if pipeline.docstore_uri.is_some()
        || pipeline.remote.is_some()
        || pipeline.steps.iter().any(|s| s.slurm.is_some())
    {
        return;
    }
    if secret(pipeline.params.iter()) {
        return;
    }
    let mut snapshot_steps = Vec::with_capacity(pipeline.steps.len());
    for step in &pipeline.steps {
        // A spec step's `uses` is a path, not a kind: it reads the spec file to load.
        if steps::lookup(&step.uses).is_none()
            || crate::redact::contains_secret(&step.params)
            || secret(step.param_refs.iter())
            || secret(step.param_env.iter())
        {
            return;
        }
        snapshot_steps.push(StepSnapshot {
            name: Cow::Borrowed(&step.name),
            uses: Cow::Borrowed(&step.uses),
            params: Cow::Borrowed(&step.params),
            param_refs: Cow::Borrowed(&step.param_refs),
            param_env: Cow::Borrowed(&step.param_env),
            inputs: step
                .inputs
                .iter()
                .map(|(name, b)| {
                    (
                        name.into(),
                        b.step.as_str().into(),
                        b.output.as_str().into(),
                    )
                })
                .collect(),
            declared_outputs: declared_outputs
                .get(step.variant.as_ref().map_or(&step.name, |v| &v.base))
                .map(|outputs| {
                    outputs
                        .iter()
                        .map(|(name, kind)| (name.into(), kind.into()))
                        .collect()
                })
                .unwrap_or_default(),
            variant: step.variant.as_ref().map(Cow::Borrowed),
            skip: step.skip.as_deref().map(Cow::Borrowed),
        });
    }
    let snapshot = Snapshot {
        name: Cow::Borrowed(&pipeline.name),
        description: pipeline.description.as_deref().map(Cow::Borrowed),
        params: Cow::Borrowed(&pipeline.params),
        steps: snapshot_steps,
    };
    let _ = store_atomically(dir, key, &snapshot);
}

/// Whether an entry of these would be masked in records.
fn secret<'v>(mut entries: impl Iterator<Item = (&'v String, &'v Value)>) -> bool {
    entries.any(|(k, v)| crate::redact::entry_is_secret(k, v))
}

fn store_atomically(dir: &Path, key: &str, value: &Snapshot<'_>) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    serde_json::to_writer(std::io::BufWriter::new(file.as_file_mut()), value)?;
    file.persist(dir.join(key)).map_err(|e| e.error)?;
    prune(dir);
    Ok(())
}

/// Keeps the newest [`MAX_SNAPSHOTS`] snapshots.
fn prune(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<_> = entries
        .filter_map(Result::ok)
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    if files.len() <= MAX_SNAPSHOTS {
        return;
    }
    files.sort();
    for (_, path) in &files[..files.len() - MAX_SNAPSHOTS] {
        let _ = std::fs::remove_file(path);
    }
}
