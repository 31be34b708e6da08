//! Runs a job in the `cairn-torch` helper and relays its events.
//!
//! Protocol: the job is a JSON file passed as `--job PATH`; the helper prints one JSON
//! object per line on stdout, each with a single key naming the event (`device`, `loaded`,
//! `step`, `eval`, `checkpoint`, `finished`, `error`). `finished` carries the result;
//! `error` precedes a non-zero exit.

use std::path::Path;
use std::process::Stdio;

use serde::Serialize;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio_util::sync::CancellationToken;

use crate::embed::worker::helper_path;

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
    let helper = helper_path().map_err(|e| WorkerError::Failed(e.to_string()))?;
    let text = serde_json::to_vec_pretty(job).map_err(|e| WorkerError::Failed(e.to_string()))?;
    std::fs::write(job_path, text)
        .map_err(|e| WorkerError::Failed(format!("{}: {e}", job_path.display())))?;
    let mut child = tokio::process::Command::new(&helper)
        .arg(subcommand)
        .arg("--job")
        .arg(job_path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| WorkerError::Failed(format!("starting {}: {e}", helper.display())))?;
    let stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let stderr_task = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });
    let mut lines = BufReader::new(stdout).lines();
    let mut finished = None;
    let mut error = None;
    loop {
        let line = tokio::select! {
            _ = cancel.cancelled() => {
                let _ = child.kill().await;
                return Err(WorkerError::Cancelled);
            }
            line = lines.next_line() => line,
        };
        let Some(line) =
            line.map_err(|e| WorkerError::Failed(format!("reading the helper: {e}")))?
        else {
            break;
        };
        let Ok(Value::Object(map)) = serde_json::from_str::<Value>(&line) else {
            tracing::debug!("cairn-torch: {line}");
            continue;
        };
        for (name, payload) in map {
            match name.as_str() {
                "finished" => finished = Some(payload),
                "error" => error = Some(payload.as_str().unwrap_or_default().to_string()),
                _ => on_event(&name, &payload),
            }
        }
    }
    let status = child
        .wait()
        .await
        .map_err(|e| WorkerError::Failed(format!("waiting for the helper: {e}")))?;
    let stderr = stderr_task.await.unwrap_or_default();
    if let Some(e) = error {
        return Err(WorkerError::Failed(e));
    }
    match (status.success(), finished) {
        (true, Some(result)) => Ok(result),
        _ => {
            let tail: Vec<&str> = stderr.lines().rev().take(8).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            Err(WorkerError::Failed(format!(
                "cairn-torch {subcommand} failed ({status}): {}",
                tail.join("\n")
            )))
        }
    }
}
