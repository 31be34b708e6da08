//! Runs jobs in the `cairn-torch` helper and relays its events.
//!
//! Protocol: the helper prints one JSON object per line on stdout, each with a single key
//! naming the event (`device`, `loaded`, `step`, `eval`, `checkpoint`, `done`,
//! `finished`, `error`). `finished` carries the result; `error` precedes a non-zero exit.
//! Training and evaluation jobs are JSON files passed as `--job PATH`.

use std::ffi::OsString;
use std::path::Path;

use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::helper::{run_events, HelperError};

/// Why a helper job failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Ctrl-C.
    #[error("cancelled")]
    Cancelled,
    /// The helper reported or died.
    #[error("{0}")]
    Failed(String),
}

/// Writes `job` to `job_path` and runs `cairn-torch SUBCOMMAND --job job_path`;
/// `on_event(name, payload)` for every event but `finished`, whose payload is returned.
pub async fn run<J: Serialize>(
    subcommand: &str,
    job: &J,
    job_path: &Path,
    on_event: &mut (dyn FnMut(&str, &Value) + Send),
    cancel: &CancellationToken,
) -> Result<Value, WorkerError> {
    let text = serde_json::to_vec_pretty(job).map_err(|e| WorkerError::Failed(e.to_string()))?;
    std::fs::write(job_path, text)
        .map_err(|e| WorkerError::Failed(format!("{}: {e}", job_path.display())))?;
    let args = [OsString::from(subcommand), "--job".into(), job_path.into()];
    match run_events(&args, on_event, cancel).await {
        Err(HelperError::Cancelled) => Err(WorkerError::Cancelled),
        Err(HelperError::Reported(e) | HelperError::Crashed(e) | HelperError::NotFound(e)) => {
            Err(WorkerError::Failed(e))
        }
        Ok(v) => Ok(v),
    }
}
