//! Typed records kept in the store's database: runs, step executions, cache entries and
//! artifacts. These are what the CLI and the UI read; they serialize to the JSON contract.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::digest::{CacheKey, ObjectDigest};

/// How a step fared in a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Executed and succeeded.
    Ran,
    /// Outputs reused from the cache (or a volatile step found nothing changed).
    Cached,
    /// Executed and failed.
    Failed,
    /// Not executed: an upstream failed, the run was cancelled, or it was not selected.
    Skipped,
    /// Planned to execute (plan and dry runs only).
    WillRun,
}

impl StepStatus {
    /// The status word used in text and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Ran => "ran",
            StepStatus::Cached => "cached",
            StepStatus::Failed => "failed",
            StepStatus::Skipped => "skipped",
            StepStatus::WillRun => "will_run",
        }
    }

    /// Parses a status word from the database.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ran" => StepStatus::Ran,
            "cached" => StepStatus::Cached,
            "failed" => StepStatus::Failed,
            "skipped" => StepStatus::Skipped,
            "will_run" => StepStatus::WillRun,
            _ => return None,
        })
    }
}

/// How a run fared (or, for a plan, that nothing ran).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Still executing (or killed without a chance to say so; see `Interrupted`).
    Running,
    /// Every selected step ran or was cached.
    Succeeded,
    /// At least one step failed.
    Failed,
    /// Ctrl-C stopped it.
    Cancelled,
    /// Its process died while it was `running` (found by the next `cairn` run).
    Interrupted,
    /// A plan or dry run: decided, nothing executed (never stored).
    Planned,
}

impl RunStatus {
    /// The status word used in text, JSON and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
            RunStatus::Interrupted => "interrupted",
            RunStatus::Planned => "planned",
        }
    }

    /// Parses a status word from the database.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "running" => RunStatus::Running,
            "succeeded" => RunStatus::Succeeded,
            "failed" => RunStatus::Failed,
            "cancelled" => RunStatus::Cancelled,
            "interrupted" => RunStatus::Interrupted,
            "planned" => RunStatus::Planned,
            _ => return None,
        })
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One output of a step: the artifact it produced and its kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputRef {
    /// Content digest of the artifact.
    pub digest: ObjectDigest,
    /// Artifact kind (file, dir, documents, ...).
    pub kind: String,
}

/// One input of a step: the artifact it consumed and the step that produced it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputRef {
    /// Content digest of the artifact.
    pub digest: ObjectDigest,
    /// Producing step and output, as written in the pipeline (`clean.documents`).
    pub from: String,
}

/// A cache entry: a cache key and the outputs that execution produced.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CacheEntry {
    /// The key.
    pub key: CacheKey,
    /// Outputs by name.
    pub outputs: BTreeMap<String, OutputRef>,
    /// Run that first produced the entry.
    pub run_id: String,
    /// Step name in that run.
    pub step: String,
}

/// A run of a pipeline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Time-sortable id, e.g. `20261122-041502-3fa2c1`.
    pub id: String,
    /// Pipeline name.
    pub pipeline: String,
    /// Pipeline file as given on the command line.
    pub pipeline_file: String,
    /// How it fared.
    pub status: RunStatus,
    /// RFC 3339 start time.
    pub started_at: String,
    /// RFC 3339 end time.
    pub finished_at: Option<String>,
    /// Process that ran it (to detect runs killed mid-way).
    pub pid: i64,
    /// Command-line selection and overrides (`--set`, `--only`, ...).
    pub args: Value,
}

/// A step's execution record within one run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Run id.
    pub run_id: String,
    /// Step name.
    pub step: String,
    /// Step kind (`command`, `source`, `./steps/x.yaml`).
    pub kind: String,
    /// Step implementation version.
    pub version: String,
    /// Outcome.
    pub status: StepStatus,
    /// Why it ran or was cached, in words.
    pub reason: String,
    /// Cache key, when one could be computed.
    pub cache_key: Option<CacheKey>,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
    /// RFC 3339 start time.
    pub started_at: String,
    /// Resolved parameters (the effective configuration).
    pub params: Value,
    /// Pipeline parameters the step references, with their values.
    pub param_refs: BTreeMap<String, Value>,
    /// Inputs consumed.
    pub inputs: BTreeMap<String, InputRef>,
    /// Outputs produced or reused.
    pub outputs: BTreeMap<String, OutputRef>,
    /// Error message when failed.
    pub error: Option<String>,
    /// The captured log object, if any.
    pub log: Option<ObjectDigest>,
}

/// A digest of what a cache hit's record shares with the execution it reuses: two
/// records with equal tags hold the same parameters, inputs and outputs.
pub type RecordTag = [u8; 32];

impl StepRecord {
    /// The cache key, kind and version as written, the referenced pipeline params, the
    /// inputs (with where they came from) and the outputs, hashed. The cache key stands
    /// for the parameters (it hashes them); the rest can differ between runs with the same
    /// key (a renamed upstream step, an output re-made by a forced run).
    pub fn tag(&self) -> RecordTag {
        let mut tag = TagWriter::new(self.cache_key.as_ref(), &self.kind, &self.version);
        tag.count(self.param_refs.len());
        for (name, value) in &self.param_refs {
            tag.param_ref(name, value);
        }
        tag.count(self.inputs.len());
        for (name, input) in &self.inputs {
            tag.input(name, &input.from, &input.digest);
        }
        tag.count(self.outputs.len());
        for (name, output) in &self.outputs {
            tag.output(name, &output.kind, &output.digest);
        }
        tag.finish()
    }
}

/// Computes a [`StepRecord::tag`] from borrowed parts, so a cache hit can be matched to
/// its step's last execution without building the record. Parts go in the record's
/// order: each group's [`TagWriter::count`], then its entries sorted by name.
pub struct TagWriter {
    // One buffer hashed once: blake3 costs more per `update` call than per byte here.
    bytes: Vec<u8>,
}

impl TagWriter {
    /// Starts a tag with the record's cache key, kind and version.
    pub fn new(cache_key: Option<&CacheKey>, kind: &str, version: &str) -> Self {
        let mut tag = Self {
            bytes: Vec::with_capacity(256),
        };
        tag.bytes.extend_from_slice(b"cairn-record-tag-v1\0");
        tag.field(cache_key.map_or(&[][..], |key| key.as_bytes()));
        tag.field(kind.as_bytes());
        tag.field(version.as_bytes());
        tag
    }

    fn field(&mut self, bytes: &[u8]) {
        self.bytes
            .extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        self.bytes.extend_from_slice(bytes);
    }

    /// How many entries the next group (param refs, inputs, outputs) has.
    pub fn count(&mut self, n: usize) {
        self.bytes.extend_from_slice(&(n as u64).to_le_bytes());
    }

    /// A referenced pipeline param, with its value as recorded (masked).
    pub fn param_ref(&mut self, name: &str, value: &Value) {
        self.field(name.as_bytes());
        self.field(value.to_string().as_bytes());
    }

    /// An input, with where it came from (`step.output`, or files) as recorded.
    pub fn input(&mut self, name: &str, from: impl std::fmt::Display, digest: &ObjectDigest) {
        use std::io::Write;
        self.field(name.as_bytes());
        // The length goes first: written after `from` is, where it belongs.
        let at = self.bytes.len();
        self.bytes.extend_from_slice(&0u64.to_le_bytes());
        write!(self.bytes, "{from}").expect("writing to a Vec cannot fail");
        let len = (self.bytes.len() - at - 8) as u64;
        self.bytes[at..at + 8].copy_from_slice(&len.to_le_bytes());
        self.bytes.extend_from_slice(digest.as_bytes());
    }

    /// An output, with its kind.
    pub fn output(&mut self, name: &str, kind: &str, digest: &ObjectDigest) {
        self.field(name.as_bytes());
        self.field(kind.as_bytes());
        self.bytes.extend_from_slice(digest.as_bytes());
    }

    /// The tag.
    pub fn finish(self) -> RecordTag {
        blake3::hash(&self.bytes).into()
    }
}

/// An artifact: an object plus what is known of how it came to be.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArtifactRecord {
    /// Content digest.
    pub digest: ObjectDigest,
    /// Artifact kind.
    pub kind: String,
    /// Directory tree (true) or single file.
    pub is_dir: bool,
    /// Bytes of content.
    pub size: u64,
    /// RFC 3339 time of first production.
    pub created_at: String,
    /// Run that first produced it.
    pub producer_run: String,
    /// Step that first produced it.
    pub producer_step: String,
    /// Output name on that step.
    pub output: String,
    /// Pipeline of that run.
    pub pipeline: String,
    /// Step-provided metadata (counts, metrics, ...).
    pub metadata: Value,
}
