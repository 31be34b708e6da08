//! The `cairn-torch` helper process: where to find it and the JSON-lines event protocol
//! every subcommand speaks (embedding, training, evaluation). A leaf module: the embedding
//! and training clients both build on it.
//!
//! Protocol: the helper prints one JSON object per line on stdout, each with a single key
//! naming the event; `finished` carries the result; `error` precedes a non-zero exit.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio_util::sync::CancellationToken;

/// Environment variable naming the helper binary explicitly.
pub const HELPER_ENV: &str = "CAIRN_TORCH_BIN";
/// The helper's file name.
pub const HELPER_NAME: &str = "cairn-torch";

/// Finds the helper: `$CAIRN_TORCH_BIN`, else next to the running executable (also one
/// folder up, for test binaries under `target/*/deps`).
pub fn helper_path() -> Result<PathBuf, HelperError> {
    if let Some(p) = std::env::var_os(HELPER_ENV) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| HelperError::NotFound(e.to_string()))?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    for candidate in [dir.join(HELPER_NAME), dir.join("..").join(HELPER_NAME)] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(HelperError::NotFound(exe.display().to_string()))
}

/// How a helper process ended badly.
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    /// The helper binary is not where cairn looks for it.
    #[error("the embedding helper `cairn-torch` was not found next to {0}; it is built with the default `torch` feature: run `scripts/setup` and `cargo build --release` (or set CAIRN_TORCH_BIN)")]
    NotFound(String),
    /// Ctrl-C: the helper was killed.
    #[error("cancelled")]
    Cancelled,
    /// The helper sent an `error` event (a problem with the model or the data).
    #[error("{0}")]
    Reported(String),
    /// It could not start or died without saying why (the tail of its stderr).
    #[error("{0}")]
    Crashed(String),
}

/// Runs `cairn-torch ARGS...`, relays its events, returns the `finished` payload. The
/// protocol shared by every helper subcommand (embedding included).
pub async fn run_events(
    args: &[OsString],
    on_event: &mut (dyn FnMut(&str, &Value) + Send),
    cancel: &CancellationToken,
) -> Result<Value, HelperError> {
    let helper = helper_path()?;
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
