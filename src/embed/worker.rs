//! The client side of the `cairn-torch` helper: spawns it for one embedding job, turns its
//! JSON-lines events into progress, and kills it on cancellation.
//!
//! Protocol (helper stdout, one JSON object per line): `{"loaded": EmbedderInfo}` once,
//! `{"done": N}` after each batch, `{"finished": {"tokens": T, "seconds": S}}` at the end,
//! or `{"error": "..."}` before a non-zero exit.

use std::ffi::OsString;
use std::path::PathBuf;

use tokio_util::sync::CancellationToken;

use crate::helper::{run_events, HelperError};

use super::{EmbedError, EmbedderInfo, Precision};

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

/// Runs `job` in the helper; `on_progress(done)` after each batch.
pub async fn run(
    job: &EmbedJob,
    on_loaded: &mut (dyn FnMut(&EmbedderInfo) + Send),
    on_progress: &mut (dyn FnMut(u64) + Send),
    cancel: &CancellationToken,
) -> Result<EmbedOutcome, EmbedError> {
    let precision = serde_json::to_value(job.precision)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "auto".into());
    let mut args: Vec<OsString> = vec!["embed".into(), "--model".into(), job.model.clone().into()];
    for (flag, value) in [
        ("--device", job.device.clone()),
        ("--precision", precision),
        ("--batch-size", job.batch_size.to_string()),
        ("--threads", job.threads.to_string()),
    ] {
        args.push(flag.into());
        args.push(value.into());
    }
    args.extend([
        "--input".into(),
        job.input.clone().into(),
        "--output".into(),
        job.output.clone().into(),
    ]);
    let mut info: Option<EmbedderInfo> = None;
    let finished = run_events(
        &args,
        &mut |name, payload| match name {
            "loaded" => {
                if let Ok(i) = serde_json::from_value::<EmbedderInfo>(payload.clone()) {
                    on_loaded(&i);
                    info = Some(i);
                }
            }
            "done" => on_progress(payload.as_u64().unwrap_or(0)),
            _ => {}
        },
        cancel,
    )
    .await
    .map_err(|e| match e {
        HelperError::Cancelled => EmbedError::Cancelled,
        HelperError::Reported(m) => EmbedError::Model(m),
        HelperError::Crashed(m) => EmbedError::Torch(m),
        HelperError::NotFound(m) => EmbedError::NoHelper(m),
    })?;
    let info = info
        .ok_or_else(|| EmbedError::Torch("the embedding helper never reported its model".into()))?;
    Ok(EmbedOutcome {
        info,
        tokens: finished["tokens"].as_u64().unwrap_or(0),
        seconds: finished["seconds"].as_f64().unwrap_or(0.0),
    })
}
