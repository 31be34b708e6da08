//! Step kinds: one module per kind, each implementing the one [`Step`] trait, all listed in
//! one [`REGISTRY`] table that also drives `cairn steps ls` and `cairn steps show`.

pub mod chunk;
pub mod clean;
pub mod command;
pub mod context;
pub mod crawl;
pub mod dataset_merge;
pub mod docstore;
pub mod embed;
pub mod evaluate;
pub mod finetune;
pub mod ingest;
pub mod instruct;
pub mod source;
pub mod vector_load;

use async_trait::async_trait;
use indexmap::IndexMap;
use serde::de::DeserializeOwned;
use serde_json::Value;
use thiserror::Error;

pub use context::{InputArtifact, Produced, Progress, StepContext, StepOutputs};

/// The one interface every step kind implements.
#[async_trait]
pub trait Step: Send + Sync {
    /// Name used in `uses:`.
    fn kind(&self) -> &str;

    /// Implementation version; bump it when the same params and inputs would now give a
    /// different result, so caches of the old code are not reused.
    fn version(&self) -> String;

    /// One-line description for `cairn steps ls`.
    fn summary(&self) -> &str;

    /// JSON Schema of the parameters (`with:`), with defaults and doc strings.
    fn params_schema(&self) -> Value;

    /// The named inputs the kind takes; `None` means any names (as `command` does).
    fn inputs(&self) -> Option<Vec<InputDecl>> {
        None
    }

    /// Volatile steps (reading the outside world) always execute, cheaply, and report
    /// `cached` when what they produce equals the last result.
    fn volatile(&self) -> bool {
        false
    }

    /// Validates parameters and declared outputs at load time and returns the step's
    /// input/output contract. Nothing runs before every step of a pipeline passes this.
    fn check(
        &self,
        params: &Value,
        declared_outputs: &IndexMap<String, String>,
    ) -> Result<StepIo, Vec<ParamIssue>>;

    /// Steps that write to an external system (a document or vector store) record a
    /// receipt; on a cache hit the engine calls [`Step::verify`] and reruns the step when
    /// the external state no longer matches.
    fn external(&self) -> bool {
        false
    }

    /// Local files the result depends on beyond its inputs, such as a model directory
    /// named in the params: the engine hashes them (through the stat cache) into the cache
    /// key as extra inputs, so swapping a model reruns the step and everything after it.
    /// Returns `(name, resolved path)` pairs; `Err` says what is wrong (the step fails).
    fn content_inputs(
        &self,
        _params: &Value,
        _cwd: &std::path::Path,
    ) -> Result<Vec<(String, std::path::PathBuf)>, String> {
        Ok(Vec::new())
    }

    /// Checks a cached result against the outside world; `Err` says what differs.
    async fn verify(&self, _ctx: &VerifyContext<'_>) -> Result<(), String> {
        Ok(())
    }

    /// Executes the step. Outputs are written under `ctx.work_dir` and committed with
    /// [`StepContext::commit_output`].
    async fn run(&self, ctx: &StepContext) -> Result<StepOutputs, StepError>;
}

/// What `verify` gets: the cached outputs and where external systems are.
pub struct VerifyContext<'a> {
    /// Resolved parameters.
    pub params: &'a Value,
    /// The cached outputs.
    pub outputs: &'a std::collections::BTreeMap<String, crate::store::OutputRef>,
    /// The artifact store.
    pub store: &'a crate::store::Store,
    /// Document store URI from the pipeline (`None`: `docstore::open`'s fallbacks).
    pub docstore_uri: Option<&'a str>,
}

impl VerifyContext<'_> {
    /// Reads the cached output `name` (a receipt) as JSON.
    pub fn read_output<T: DeserializeOwned>(&self, name: &str) -> Result<T, String> {
        let output = self
            .outputs
            .get(name)
            .ok_or_else(|| format!("no {name} recorded"))?;
        std::fs::read(self.store.object_path(&output.digest))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| format!("the {name} cannot be read"))
    }
}

/// The `StepIo` of a kind whose outputs are fixed by the kind itself: a pipeline's own
/// `outputs:` for it is an error.
pub fn fixed_outputs(
    kind: &str,
    inputs: Option<Vec<InputDecl>>,
    declared_outputs: &IndexMap<String, String>,
    outputs: &[(&str, &str)],
) -> Result<StepIo, ParamIssue> {
    if !declared_outputs.is_empty() {
        let names: Vec<String> = outputs.iter().map(|(n, _)| format!("`{n}`")).collect();
        let noun = if outputs.len() == 1 {
            "output"
        } else {
            "outputs"
        };
        return Err(ParamIssue::new(
            "outputs",
            format!(
                "`{kind}` declares its own {noun} ({}); remove `outputs`",
                names.join(", ")
            ),
        ));
    }
    Ok(StepIo {
        inputs,
        outputs: outputs
            .iter()
            .map(|(n, k)| (n.to_string(), k.to_string()))
            .collect(),
    })
}

/// Joins a kind's own parameter issues with the outcome of [`fixed_outputs`]: the
/// contract when both are clean, else every issue.
pub fn with_issues(
    io: Result<StepIo, ParamIssue>,
    mut issues: Vec<ParamIssue>,
) -> Result<StepIo, Vec<ParamIssue>> {
    match io {
        Ok(io) if issues.is_empty() => Ok(io),
        Ok(_) => Err(issues),
        Err(issue) => {
            issues.push(issue);
            Err(issues)
        }
    }
}

/// What a step consumes and produces.
#[derive(Clone, Debug, Default)]
pub struct StepIo {
    /// Named inputs it accepts; `None` means any names (as `command` does).
    pub inputs: Option<Vec<InputDecl>>,
    /// Outputs by name, with their artifact kinds.
    pub outputs: IndexMap<String, String>,
}

/// One declared input.
#[derive(Clone, Debug)]
pub struct InputDecl {
    /// Name used in `inputs:`.
    pub name: String,
    /// Expected artifact kind (informational; `any` accepts all).
    pub kind: String,
    /// Whether the pipeline must bind it.
    pub required: bool,
}

/// A problem with a step's configuration, at a path relative to the step
/// (`with.size`, `outputs`, ...).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamIssue {
    /// Path below the step, dotted.
    pub path: String,
    /// What is wrong.
    pub message: String,
    /// A hint, if any.
    pub help: Option<String>,
}

impl ParamIssue {
    /// A problem at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
            help: None,
        }
    }
}

/// Why a step failed.
#[derive(Debug, Error)]
pub enum StepError {
    /// The step's own work failed; the message says why.
    #[error("{0}")]
    Failed(String),
    /// The run was cancelled (Ctrl-C) while the step ran.
    #[error("cancelled")]
    Cancelled,
    /// Storing outputs failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// Deserializes `with:` into a step's typed params, naming the offending key on error.
pub fn parse_params<P: DeserializeOwned>(params: &Value) -> Result<P, ParamIssue> {
    serde_path_to_error::deserialize::<_, P>(params.clone()).map_err(|err| {
        let mut path = String::from("with");
        for seg in err.path().iter() {
            use serde_path_to_error::Segment;
            match seg {
                Segment::Seq { index } => path.push_str(&format!(".{index}")),
                Segment::Map { key } => path.push_str(&format!(".{key}")),
                Segment::Enum { variant } => path.push_str(&format!(".{variant}")),
                Segment::Unknown => {}
            }
        }
        let message = plain_type_names(&err.inner().to_string());
        let help = unknown_field_help(&message);
        ParamIssue {
            path,
            message: format!("invalid parameter: {message}"),
            help,
        }
    })
}

/// serde speaks Rust ("expected u32"); users write YAML.
pub fn plain_type_names(message: &str) -> String {
    message
        .replace("expected u32", "expected a whole number >= 0")
        .replace("expected u64", "expected a whole number >= 0")
        .replace("expected i64", "expected a whole number")
        .replace("expected f64", "expected a number")
        .replace("expected usize", "expected a whole number >= 0")
}

fn unknown_field_help(message: &str) -> Option<String> {
    // serde's text: "unknown field `sise`, expected one of `a`, `b`"
    let rest = message.strip_prefix("unknown field `")?;
    let (wrong, rest) = rest.split_once('`')?;
    let candidates: Vec<&str> = rest.split('`').skip(1).step_by(2).collect();
    crate::pipeline::diagnostic::did_you_mean(wrong, candidates.iter().copied())
}

/// The JSON Schema of a params type, as plain JSON.
pub fn schema_of<P: schemars::JsonSchema>() -> Value {
    serde_json::to_value(schemars::schema_for!(P)).unwrap_or(Value::Null)
}

/// Every built-in step kind. Add new kinds here (one line each).
pub static REGISTRY: &[&dyn Step] = &[
    &source::SourceStep,
    &command::CommandStep,
    &crawl::CrawlStep,
    &ingest::IngestStep,
    &docstore::DocstoreStep,
    &clean::CleanStep,
    &chunk::ChunkStep,
    &embed::EmbedStep,
    &vector_load::VectorLoadStep,
    &instruct::InstructStep,
    &dataset_merge::DatasetMergeStep,
    &finetune::FinetuneStep,
    &evaluate::EvaluateStep,
];

/// Looks up a built-in step kind.
pub fn lookup(kind: &str) -> Option<&'static dyn Step> {
    REGISTRY.iter().copied().find(|s| s.kind() == kind)
}

/// Names of all built-in kinds, for "did you mean".
pub fn kinds() -> impl Iterator<Item = &'static str> {
    REGISTRY.iter().map(|s| s.kind())
}
