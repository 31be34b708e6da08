//! What a running step gets from the engine: its resolved parameters, input artifacts,
//! a private staging folder for outputs, progress reporting, and cancellation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use indexmap::IndexMap;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::StepError;
use crate::store::{CacheKey, ObjectDigest, OutputRef, Store};
pub use crate::util::progress::Progress;

/// An input artifact as the step sees it.
#[derive(Clone, Debug)]
pub struct InputArtifact {
    /// Content digest.
    pub digest: ObjectDigest,
    /// Artifact kind.
    pub kind: String,
    /// Read-only path of the object in the store.
    pub path: PathBuf,
}

/// An output the step produced and committed.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Produced {
    /// Content digest.
    pub digest: ObjectDigest,
    /// Artifact kind.
    pub kind: String,
    /// Bytes of content.
    pub size: u64,
    /// Directory tree or file.
    pub is_dir: bool,
    /// Step-provided metadata (counts, metrics).
    pub metadata: Value,
}

/// Everything a step returns.
#[derive(Clone, Debug, Default)]
pub struct StepOutputs {
    /// Outputs by name.
    pub outputs: BTreeMap<String, Produced>,
    /// A short note for the run summary (e.g. "12 files, 0 rehashed").
    pub note: Option<String>,
}

/// The context of one step execution.
pub struct StepContext {
    /// Step name in the pipeline.
    pub step: String,
    /// The step's cache key (hex): kind, version, parameters, input and named-file
    /// digests. Work that must survive a failed attempt (training checkpoints) is filed
    /// under it, so only an identical rerun picks it up.
    pub cache_key: CacheKey,
    /// Parameters exported to commands as `CAIRN_PARAM_<NAME>`.
    pub param_env: BTreeMap<String, Value>,
    /// Input artifacts by name.
    pub inputs: BTreeMap<String, InputArtifact>,
    /// Declared outputs and their kinds.
    pub outputs: IndexMap<String, String>,
    /// Outputs recorded under this cache key before (volatile steps compare against it).
    pub previous: Option<BTreeMap<String, OutputRef>>,
    /// Empty private folder in the store's tmp/ for outputs and scratch files.
    pub work_dir: PathBuf,
    /// File that collects the step's log (stdout/stderr of commands).
    pub log_path: PathBuf,
    /// Directory relative paths in params resolve against (where `cairn` was started).
    pub cwd: PathBuf,
    /// Document store URI from the pipeline (`docstore: {uri}`); `None` lets
    /// `docstore::open` fall back to `CAIRN_MONGODB_URI`, then the embedded store. Kept
    /// out of params so secrets are never recorded.
    pub docstore_uri: Option<String>,
    /// The store.
    pub store: Arc<Store>,
    /// Progress reporting.
    pub progress: Progress,
    /// Fires on Ctrl-C; long loops check it.
    pub cancel: CancellationToken,
}

impl StepContext {
    /// Where the step should write output `name` (a file or a directory it creates).
    pub fn output_path(&self, name: &str) -> PathBuf {
        self.work_dir.join("out").join(name)
    }

    /// The store path of input `name` (the pipeline loader guarantees required inputs
    /// are bound; the error covers optional ones).
    pub fn input_path(&self, name: &str) -> Result<PathBuf, StepError> {
        self.inputs
            .get(name)
            .map(|i| i.path.clone())
            .ok_or_else(|| StepError::Input(format!("input `{name}` is missing")))
    }

    /// The metadata of input `name`'s artifact record (`Null` when the input is unbound or
    /// has no record).
    pub fn input_metadata(&self, name: &str) -> Result<Value, StepError> {
        let Some(input) = self.inputs.get(name) else {
            return Ok(Value::Null);
        };
        Ok(self
            .store
            .db()
            .find_artifact(&input.digest.to_hex())?
            .map(|a| a.metadata)
            .unwrap_or(Value::Null))
    }

    /// Resolves a user-given path against the working directory.
    pub fn resolve_path(&self, p: &str) -> PathBuf {
        let path = Path::new(p);
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.cwd.join(path)
        }
    }

    /// The outputs of a step with one output: commits `name` with `metadata`.
    pub fn single_output(
        &self,
        name: &str,
        metadata: Value,
        note: String,
    ) -> Result<StepOutputs, StepError> {
        let produced = self.commit_output(name, metadata)?;
        Ok(StepOutputs {
            outputs: BTreeMap::from([(name.to_string(), produced)]),
            note: Some(note),
        })
    }

    /// Hashes and stores what the step wrote at `output_path(name)`.
    pub fn commit_output(&self, name: &str, metadata: Value) -> Result<Produced, StepError> {
        let kind =
            self.outputs.get(name).cloned().ok_or_else(|| {
                StepError::Failed(format!("step has no declared output `{name}`"))
            })?;
        let path = self.output_path(name);
        if std::fs::symlink_metadata(&path).is_err() {
            return Err(StepError::Failed(format!(
                "declared output `{name}` was not created (expected at {})",
                path.display()
            )));
        }
        // Hashing and copying a big output must not stall the runtime's other tasks.
        let committed = crate::util::blocking::blocking(|| self.store.commit(&path))?;
        Ok(Produced {
            digest: committed.digest,
            kind,
            size: committed.size,
            is_dir: committed.is_dir,
            metadata,
        })
    }
}
