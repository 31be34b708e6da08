//! Runs jobs in the `cairn-torch` helper and relays its events.
//!
//! Protocol: the helper prints one JSON object per line on stdout, each with a single key
//! naming the event (`device`, `loaded`, `step`, `eval`, `checkpoint`, `done`,
//! `finished`, `error`). `finished` carries the result; `error` precedes a non-zero exit.
//! Training and evaluation jobs are JSON files passed as `--job PATH`.

use std::ffi::OsString;
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
    let text = serde_json::to_vec_pretty(job).map_err(|e| WorkerError::Failed(e.to_string()))?;
    std::fs::write(job_path, text)
        .map_err(|e| WorkerError::Failed(format!("{}: {e}", job_path.display())))?;
    let args = [OsString::from(subcommand), "--job".into(), job_path.into()];
    match run_events(&args, on_event, cancel).await {
        Err(HelperError::Cancelled) => Err(WorkerError::Cancelled),
        Err(HelperError::Reported(e) | HelperError::Crashed(e)) => Err(WorkerError::Failed(e)),
        Ok(v) => Ok(v),
    }
}

/// How a helper process ended badly.
#[derive(Debug)]
pub enum HelperError {
    /// Ctrl-C: the helper was killed.
    Cancelled,
    /// The helper sent an `error` event (a problem with the model or the data).
    Reported(String),
    /// It could not start or died without saying why (the tail of its stderr).
    Crashed(String),
}

/// Runs `cairn-torch ARGS...`, relays its events, returns the `finished` payload. The
/// protocol shared by every helper subcommand (embedding included).
pub async fn run_events(
    args: &[OsString],
    on_event: &mut (dyn FnMut(&str, &Value) + Send),
    cancel: &CancellationToken,
) -> Result<Value, HelperError> {
    let helper = helper_path().map_err(|e| HelperError::Crashed(e.to_string()))?;
    let subcommand = args
        .first()
        .map(|a| a.to_string_lossy().to_string())
        .unwrap_or_default();
    let mut child = tokio::process::Command::new(&helper)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| HelperError::Crashed(format!("starting {}: {e}", helper.display())))?;
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
                return Err(HelperError::Cancelled);
            }
            line = lines.next_line() => line,
        };
        let Some(line) =
            line.map_err(|e| HelperError::Crashed(format!("reading the helper: {e}")))?
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
        .map_err(|e| HelperError::Crashed(format!("waiting for the helper: {e}")))?;
    let stderr = stderr_task.await.unwrap_or_default();
    if let Some(e) = error {
        return Err(HelperError::Reported(e));
    }
    match (status.success(), finished) {
        (true, Some(result)) => Ok(result),
        _ => {
            let tail: Vec<&str> = stderr.lines().rev().take(8).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            Err(HelperError::Crashed(format!(
                "cairn-torch {subcommand} failed ({status}): {}",
                tail.join("\n")
            )))
        }
    }
}
