//! What a run or a plan reports: per-step outcomes (the `--json` contract).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::steps::FailureClass;
pub use crate::store::RunStatus;
use crate::store::{CacheKey, ObjectDigest, StepStatus};

/// One step's outcome, as printed by `--json`.
#[derive(Clone, Debug, Serialize)]
pub struct StepReport {
    /// Step name.
    pub name: String,
    /// ran | cached | failed | skipped | will_run
    pub status: StepStatus,
    /// Why, in words.
    pub reason: String,
    /// Cache key, when known.
    pub cache_key: Option<CacheKey>,
    /// Output name -> artifact digest.
    pub outputs: BTreeMap<String, ObjectDigest>,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
    /// Error message of a failed step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Whose a failure is to fix: step, input, environment, cancelled, internal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_class: Option<FailureClass>,
}

/// A whole run (or plan), as printed by `--json`.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    /// Run id (absent for plans).
    pub run_id: Option<String>,
    /// Pipeline name.
    pub pipeline: String,
    /// succeeded | failed | cancelled | planned
    pub status: RunStatus,
    /// Steps in execution order.
    pub steps: Vec<StepReport>,
    /// What the run did with its remote, when it had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote: Option<super::RemoteSummary>,
}

impl RunReport {
    /// Number of steps with a status.
    pub fn count(&self, status: StepStatus) -> usize {
        self.steps.iter().filter(|s| s.status == status).count()
    }
}

/// What a run would do: every covered step with its decision (`will_run`, `cached`,
/// `skipped`, or `failed` when it cannot even be keyed) and the reason. Shared by
/// `cairn plan`, `cairn run --dry-run` and the web UI.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Pipeline name.
    pub pipeline: String,
    /// Steps in execution order.
    pub steps: Vec<StepReport>,
}

impl Plan {
    /// The `--json` form: a report with status `planned` and no run id.
    pub fn report(&self) -> RunReport {
        RunReport {
            run_id: None,
            pipeline: self.pipeline.clone(),
            status: RunStatus::Planned,
            steps: self.steps.clone(),
            remote: None,
        }
    }
}
