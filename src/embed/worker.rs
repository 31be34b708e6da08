//! The client side of the `cairn-torch` helper: spawns it for one embedding job, turns its
//! JSON-lines events into progress, and kills it on cancellation.
//!
//! Protocol (helper stdout, one JSON object per line): `{"loaded": EmbedderInfo}` once,
//! `{"done": N}` after each batch, `{"finished": {"tokens": T, "seconds": S}}` at the end,
//! or `{"error": "..."}` before a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio_util::sync::CancellationToken;

use super::{EmbedError, EmbedderInfo, Precision};

/// Environment variable naming the helper binary explicitly.
pub const HELPER_ENV: &str = "CAIRN_TORCH_BIN";
/// The helper's file name.
pub const HELPER_NAME: &str = "cairn-torch";

/// One embedding job.
#[derive(Clone, Debug)]
pub struct EmbedJob {
    /// Model directory (resolved).
    pub model: PathBuf,
    /// `auto`, `cpu`, `cuda`, `cuda:N`.
    pub device: String,
    /// Compute precision.
    pub precision: Precision,
    /// Sentences per forward pass.
    pub batch_size: usize,
    /// CPU threads (0: libtorch's default).
    pub threads: usize,
    /// JSON Lines with a `text` field per line (a chunks file works as is).
    pub input: PathBuf,
    /// Where to write `embeddings.safetensors`.
    pub output: PathBuf,
}

/// What a finished job reports.
#[derive(Clone, Debug)]
pub struct EmbedOutcome {
    /// The model as loaded.
    pub info: EmbedderInfo,
    /// Tokens embedded (after truncation, with special tokens).
    pub tokens: u64,
    /// Seconds spent embedding (model load excluded).
    pub seconds: f64,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum Event {
    Loaded(EmbedderInfo),
    Done(u64),
    Finished { tokens: u64, seconds: f64 },
    Error(String),
}

/// Finds the helper: `$CAIRN_TORCH_BIN`, else next to the running executable (also one
/// folder up, for test binaries under `target/*/deps`).
pub fn helper_path() -> Result<PathBuf, EmbedError> {
    if let Some(p) = std::env::var_os(HELPER_ENV) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| EmbedError::NoHelper(e.to_string()))?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    for candidate in [dir.join(HELPER_NAME), dir.join("..").join(HELPER_NAME)] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(EmbedError::NoHelper(exe.display().to_string()))
}

/// Runs `job` in the helper; `on_progress(done)` after each batch.
pub async fn run(
    job: &EmbedJob,
    on_loaded: &mut (dyn FnMut(&EmbedderInfo) + Send),
    on_progress: &mut (dyn FnMut(u64) + Send),
    cancel: &CancellationToken,
) -> Result<EmbedOutcome, EmbedError> {
    let helper = helper_path()?;
    let precision = serde_json::to_value(job.precision)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "auto".into());
    let mut child = tokio::process::Command::new(&helper)
        .arg("embed")
        .arg("--model")
        .arg(&job.model)
        .args(["--device", &job.device, "--precision", &precision])
        .args([
            "--batch-size",
            &job.batch_size.to_string(),
            "--threads",
            &job.threads.to_string(),
        ])
        .arg("--input")
        .arg(&job.input)
        .arg("--output")
        .arg(&job.output)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| EmbedError::Torch(format!("starting {}: {e}", helper.display())))?;
    let stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let stderr_task = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });
    let mut lines = BufReader::new(stdout).lines();
    let mut info = None;
    let mut finished = None;
    let mut error = None;
    loop {
        let line = tokio::select! {
            _ = cancel.cancelled() => {
                let _ = child.kill().await;
                return Err(EmbedError::Cancelled);
            }
            line = lines.next_line() => line,
        };
        let Some(line) = line.map_err(|e| EmbedError::Torch(format!("reading the helper: {e}")))?
        else {
            break;
        };
        match serde_json::from_str::<Event>(&line) {
            Ok(Event::Loaded(i)) => {
                on_loaded(&i);
                info = Some(i);
            }
            Ok(Event::Done(n)) => on_progress(n),
            Ok(Event::Finished { tokens, seconds }) => finished = Some((tokens, seconds)),
            Ok(Event::Error(e)) => error = Some(e),
            Err(_) => tracing::debug!("cairn-torch: {line}"),
        }
    }
    let status = child
        .wait()
        .await
        .map_err(|e| EmbedError::Torch(format!("waiting for the helper: {e}")))?;
    let stderr = stderr_task.await.unwrap_or_default();
    if let Some(e) = error {
        return Err(EmbedError::Model(e));
    }
    match (status.success(), info, finished) {
        (true, Some(info), Some((tokens, seconds))) => Ok(EmbedOutcome {
            info,
            tokens,
            seconds,
        }),
        _ => {
            let tail: String = stderr
                .lines()
                .rev()
                .take(8)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            Err(EmbedError::Torch(format!(
                "the embedding helper failed ({status}): {tail}"
            )))
        }
    }
}
