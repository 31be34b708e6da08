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
pub mod rag_eval;
pub mod rank;
pub mod sample;
pub mod semantic_dedup;
pub mod source;
pub mod vector_load;

use std::any::Any;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use indexmap::IndexMap;
use serde::de::DeserializeOwned;
use serde_json::Value;
use thiserror::Error;

pub use context::{InputArtifact, Produced, Progress, StepContext, StepOutputs};

/// What each step kind implements: typed parameters, parsed once when the pipeline is
/// loaded and handed to every hook. [`Typed`] adapts a kind to the registry's [`Step`].
#[async_trait]
pub trait Kind: Send + Sync + 'static {
    /// The kind's parameters (`with:`): a serde struct with `deny_unknown_fields`,
    /// defaults, and doc comments that become `cairn steps show` documentation.
    type Params: DeserializeOwned + schemars::JsonSchema + Send + Sync + 'static;

    /// The outputs the kind always produces, as (name, artifact kind). A pipeline's own
    /// `outputs:` for such a kind is an error. Kinds whose outputs the pipeline declares
    /// (`command`) override [`Kind::outputs`] instead.
    const OUTPUTS: &'static [(&'static str, &'static str)] = &[];

    /// Name used in `uses:`.
    fn name(&self) -> &'static str;

    /// Implementation version; bump it when the same params and inputs would now give a
    /// different result, so caches of the old code are not reused.
    fn version(&self) -> String;

    /// One-line description for `cairn steps ls`.
    fn summary(&self) -> &'static str;

    /// The named inputs the kind takes; `None` means any names (as `command` does).
    fn inputs(&self) -> Option<Vec<InputDecl>> {
        None
    }

    /// The inputs given the parsed parameters, when they depend on them; by default
    /// [`Kind::inputs`].
    fn bound_inputs(&self, _params: &Self::Params) -> Option<Vec<InputDecl>> {
        self.inputs()
    }

    /// Volatile kinds (reading the outside world) always execute, cheaply, and report
    /// `cached` when what they produce equals the last result.
    fn volatile(&self) -> bool {
        false
    }

    /// Kinds that write to an external system record a receipt; on a cache hit the engine
    /// calls [`Kind::verify`] and reruns the step when the outside no longer matches.
    fn external(&self) -> bool {
        false
    }

    /// Whether the kind reads the pipeline params it references as environment variables
    /// (`CAIRN_PARAM_<NAME>`, as `command` does). Only then do the params' names enter the
    /// cache key; for every other kind only the substituted values in `with:` count, so
    /// renaming a param reruns nothing.
    fn exports_params(&self) -> bool {
        false
    }

    /// Checks parsed parameters beyond their types (ranges, combinations); paths are
    /// relative to the step (`with.size`).
    fn validate(&self, _params: &Self::Params) -> Vec<ParamIssue> {
        Vec::new()
    }

    /// The outputs and their kinds given the pipeline's `outputs:`; by default
    /// [`Kind::OUTPUTS`], and `outputs:` must be absent.
    fn outputs(
        &self,
        declared: &IndexMap<String, String>,
    ) -> Result<IndexMap<String, String>, Vec<ParamIssue>> {
        fixed_outputs(self.name(), declared, Self::OUTPUTS).map_err(|issue| vec![issue])
    }

    /// Local files the result depends on beyond its inputs, such as a model directory
    /// named in the params: the engine hashes them (through the stat cache) into the cache
    /// key as extra inputs, so swapping a model reruns the step and everything after it.
    /// Returns `(name, resolved path)` pairs; `Err` says what is wrong (the step fails).
    fn content_inputs(
        &self,
        _params: &Self::Params,
        _cwd: &Path,
    ) -> Result<Vec<(String, PathBuf)>, String> {
        Ok(Vec::new())
    }

    /// Checks a cached result against the outside world; `Err` says what differs.
    async fn verify(&self, _params: &Self::Params, _ctx: &VerifyContext<'_>) -> Result<(), String> {
        Ok(())
    }

    /// Executes the step. Outputs are written under `ctx.work_dir` and committed with
    /// [`StepContext::commit_output`].
    async fn run(&self, params: &Self::Params, ctx: &StepContext)
        -> Result<StepOutputs, StepError>;
}

/// A step's parameters as its kind parsed them at load time, carried on the resolved step
/// and handed back to the same kind's hooks.
#[derive(Clone)]
pub struct BoundParams(Arc<dyn Any + Send + Sync>);

impl BoundParams {
    /// Wraps parsed parameters.
    pub fn new<P: Any + Send + Sync>(params: P) -> Self {
        Self(Arc::new(params))
    }

    fn get<P: Any>(&self, kind: &str) -> Result<&P, String> {
        self.0.downcast_ref::<P>().ok_or_else(|| {
            format!(
                "parameters bound for another step kind were handed to `{kind}` (a bug in cairn)"
            )
        })
    }
}

impl std::fmt::Debug for BoundParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BoundParams(..)")
    }
}

/// The registry's view of a step kind: object-safe, parameters type-erased. Implemented
/// for every [`Kind`] by [`Typed`]; nothing else implements it.
#[async_trait]
pub trait Step: Send + Sync {
    /// Name used in `uses:`.
    fn kind(&self) -> &str;
    /// See [`Kind::version`].
    fn version(&self) -> String;
    /// See [`Kind::summary`].
    fn summary(&self) -> &str;
    /// JSON Schema of the parameters (`with:`), with defaults and doc strings.
    fn params_schema(&self) -> Value;
    /// See [`Kind::inputs`].
    fn inputs(&self) -> Option<Vec<InputDecl>>;
    /// See [`Kind::volatile`].
    fn volatile(&self) -> bool;
    /// See [`Kind::external`].
    fn external(&self) -> bool;
    /// See [`Kind::exports_params`].
    fn exports_params(&self) -> bool;
    /// Parses and checks parameters and declared outputs at load time: the bound
    /// parameters and the step's input/output contract, or every problem found. Nothing
    /// runs before every step of a pipeline passes this.
    fn bind(
        &self,
        params: &Value,
        declared_outputs: &IndexMap<String, String>,
    ) -> Result<(BoundParams, StepIo), Vec<ParamIssue>>;
    /// See [`Kind::content_inputs`].
    fn content_inputs(
        &self,
        params: &BoundParams,
        cwd: &Path,
    ) -> Result<Vec<(String, PathBuf)>, String>;
    /// See [`Kind::verify`].
    async fn verify(&self, params: &BoundParams, ctx: &VerifyContext<'_>) -> Result<(), String>;
    /// See [`Kind::run`].
    async fn run(&self, params: &BoundParams, ctx: &StepContext) -> Result<StepOutputs, StepError>;
}

/// Adapts a typed [`Kind`] to the registry's [`Step`].
pub struct Typed<K>(pub K);

#[async_trait]
impl<K: Kind> Step for Typed<K> {
    fn kind(&self) -> &str {
        self.0.name()
    }

    fn version(&self) -> String {
        self.0.version()
    }

    fn summary(&self) -> &str {
        self.0.summary()
    }

    fn params_schema(&self) -> Value {
        schema_of::<K::Params>()
    }

    fn inputs(&self) -> Option<Vec<InputDecl>> {
        self.0.inputs()
    }

    fn volatile(&self) -> bool {
        self.0.volatile()
    }

    fn external(&self) -> bool {
        self.0.external()
    }

    fn exports_params(&self) -> bool {
        self.0.exports_params()
    }

    fn bind(
        &self,
        params: &Value,
        declared_outputs: &IndexMap<String, String>,
    ) -> Result<(BoundParams, StepIo), Vec<ParamIssue>> {
        let parsed = parse_params::<K::Params>(params);
        let (mut issues, inputs) = match &parsed {
            Ok(p) => (self.0.validate(p), self.0.bound_inputs(p)),
            Err(issue) => (vec![issue.clone()], self.0.inputs()),
        };
        let outputs = self.0.outputs(declared_outputs);
        if let Err(more) = &outputs {
            issues.extend(more.iter().cloned());
        }
        match (parsed, outputs) {
            (Ok(p), Ok(outputs)) if issues.is_empty() => {
                Ok((BoundParams::new(p), StepIo { inputs, outputs }))
            }
            _ => Err(issues),
        }
    }

    fn content_inputs(
        &self,
        params: &BoundParams,
        cwd: &Path,
    ) -> Result<Vec<(String, PathBuf)>, String> {
        self.0.content_inputs(params.get(self.0.name())?, cwd)
    }

    async fn verify(&self, params: &BoundParams, ctx: &VerifyContext<'_>) -> Result<(), String> {
        self.0.verify(params.get(self.0.name())?, ctx).await
    }

    async fn run(&self, params: &BoundParams, ctx: &StepContext) -> Result<StepOutputs, StepError> {
        let params = params.get(self.0.name()).map_err(StepError::Failed)?;
        self.0.run(params, ctx).await
    }
}

/// What `verify` gets: the cached outputs and where external systems are.
pub struct VerifyContext<'a> {
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

/// The outputs of a kind that fixes them itself: a pipeline's own `outputs:` for it is
/// an error.
pub fn fixed_outputs(
    kind: &str,
    declared_outputs: &IndexMap<String, String>,
    outputs: &[(&str, &str)],
) -> Result<IndexMap<String, String>, ParamIssue> {
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
    Ok(outputs
        .iter()
        .map(|(n, k)| (n.to_string(), k.to_string()))
        .collect())
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

    /// Problems a nested parameter reported as `(key path, message)`, under `prefix`
    /// (`with.decontaminate` + `ngram` -> `with.decontaminate.ngram`).
    pub fn under(prefix: &str, problems: Vec<(String, String)>) -> Vec<Self> {
        problems
            .into_iter()
            .map(|(key, message)| Self::new(format!("{prefix}.{key}"), message))
            .collect()
    }
}

/// Why a step failed. Its [`FailureClass`] says whose it is to fix, and is reported
/// with the message (`error_class` in `--json`).
#[derive(Debug, Error)]
pub enum StepError {
    /// The step's own work failed (a program exited non-zero, a server refused, the
    /// helper reported an error); the message says why.
    #[error("{0}")]
    Failed(String),
    /// What the step was given cannot work: a missing input, a path or model folder
    /// that does not exist or is not what the parameter says. Fix the pipeline or files.
    #[error("{0}")]
    Input(String),
    /// The run was cancelled (Ctrl-C) while the step ran.
    #[error("cancelled")]
    Cancelled,
    /// Storing outputs failed (disk full, permissions).
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

impl From<crate::ml::worker::WorkerError> for StepError {
    /// A `cairn-torch` job that failed is the step's own failure.
    fn from(e: crate::ml::worker::WorkerError) -> Self {
        match e {
            crate::ml::worker::WorkerError::Cancelled => StepError::Cancelled,
            crate::ml::worker::WorkerError::Failed(m) => StepError::Failed(m),
        }
    }
}

/// Whose a failure is to fix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    /// The step's work failed.
    Step,
    /// The pipeline or the files it names.
    Input,
    /// The machine: the store's disk, permissions.
    Environment,
    /// Ctrl-C.
    Cancelled,
    /// A bug in cairn (a step panicked).
    Internal,
}

impl StepError {
    /// Whose this failure is to fix.
    pub fn class(&self) -> FailureClass {
        match self {
            StepError::Failed(_) => FailureClass::Step,
            StepError::Input(_) => FailureClass::Input,
            StepError::Cancelled => FailureClass::Cancelled,
            StepError::Store(_) => FailureClass::Environment,
        }
    }
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
        let message = crate::util::suggest::plain_type_names(&err.inner().to_string());
        let help = unknown_field_help(&message);
        ParamIssue {
            path,
            message: format!("invalid parameter: {message}"),
            help,
        }
    })
}

fn unknown_field_help(message: &str) -> Option<String> {
    // serde's text: "unknown field `sise`, expected one of `a`, `b`"
    let rest = message.strip_prefix("unknown field `")?;
    let (wrong, rest) = rest.split_once('`')?;
    let candidates: Vec<&str> = rest.split('`').skip(1).step_by(2).collect();
    crate::util::suggest::did_you_mean(wrong, candidates.iter().copied())
}

/// The JSON Schema of a params type, as plain JSON.
pub fn schema_of<P: schemars::JsonSchema>() -> Value {
    serde_json::to_value(schemars::schema_for!(P)).unwrap_or(Value::Null)
}

/// Every built-in step kind. Add new kinds here (one line each).
pub static REGISTRY: &[&dyn Step] = &[
    &Typed(source::SourceStep),
    &Typed(command::CommandStep),
    &Typed(crawl::CrawlStep),
    &Typed(ingest::IngestStep),
    &Typed(docstore::DocstoreStep),
    &Typed(clean::CleanStep),
    &Typed(chunk::ChunkStep),
    &Typed(embed::EmbedStep),
    &Typed(semantic_dedup::SemanticDedupStep),
    &Typed(vector_load::VectorLoadStep),
    &Typed(instruct::InstructStep),
    &Typed(dataset_merge::DatasetMergeStep),
    &Typed(finetune::FinetuneStep),
    &Typed(evaluate::EvaluateStep),
    &Typed(sample::SampleStep),
    &Typed(rank::RankStep),
    &Typed(rag_eval::RagEvalStep),
];

/// Looks up a built-in step kind.
pub fn lookup(kind: &str) -> Option<&'static dyn Step> {
    REGISTRY.iter().copied().find(|s| s.kind() == kind)
}

/// The `command` kind, which step spec files compile down to.
pub fn command_kind() -> &'static dyn Step {
    &Typed(command::CommandStep)
}

/// Names of all built-in kinds, for "did you mean".
pub fn kinds() -> impl Iterator<Item = &'static str> {
    REGISTRY.iter().map(|s| s.kind())
}
