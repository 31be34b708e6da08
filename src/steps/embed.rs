//! `embed`: turns `chunks` into sentence vectors with a BERT-family model through libtorch,
//! run in the `cairn-torch` helper process (see [`crate::embed`]). Output: a directory with `embeddings.safetensors` (f32
//! `[n, dim]`, row i = line i of `chunks.jsonl`) and a copy of `chunks.jsonl`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;

use super::chunk::{model_content_input, DEFAULT_MODEL};
use super::{InputDecl, Kind, ParamIssue, StepContext, StepError, StepOutputs};
use crate::chunk::{self, Chunk};
use crate::embed::{self, DeviceChoice, EmbedError, EmbedJob, Precision};
use crate::{documents, models};

/// The `embed` step kind.
pub struct EmbedStep;

/// Parameters of `embed`.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EmbedParams {
    /// A Hugging Face model directory (config.json, tokenizer.json, model.safetensors,
    /// sentence-transformers pooling files) or a model id in the local HF cache. Its files
    /// are part of the cache key: swapping the model reruns embed and what follows.
    #[serde(default = "default_model")]
    pub model: String,
    /// `auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// `auto` (f16 on CUDA, f32 on CPU), `f32`, `f16` or `bf16`.
    #[serde(default = "default_precision")]
    pub precision: Precision,
    /// Sentences per forward pass (batches are sorted by length to minimise padding).
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// CPU threads for libtorch (0: libtorch's default, one per core).
    #[serde(default)]
    pub threads: usize,
}

pub(super) fn default_model() -> String {
    DEFAULT_MODEL.to_string()
}
pub(super) fn default_device() -> String {
    "auto".into()
}
fn default_precision() -> Precision {
    Precision::Auto
}
fn default_batch() -> usize {
    32
}

#[async_trait]
impl Kind for EmbedStep {
    type Params = EmbedParams;
    const OUTPUTS: &'static [(&'static str, &'static str)] = &[("embeddings", embed::KIND)];

    fn name(&self) -> &'static str {
        "embed"
    }

    fn version(&self) -> String {
        "1".into()
    }

    fn summary(&self) -> &'static str {
        "Embed `chunks` with a BERT-family sentence model through libtorch (CUDA when available)"
    }

    fn inputs(&self) -> Option<Vec<InputDecl>> {
        Some(vec![InputDecl {
            name: "chunks".into(),
            kind: chunk::KIND.into(),
            required: true,
        }])
    }

    fn content_inputs(
        &self,
        params: &Self::Params,
        cwd: &Path,
    ) -> Result<Vec<(String, PathBuf)>, String> {
        model_content_input(&params.model, cwd)
    }

    fn validate(&self, p: &EmbedParams) -> Vec<ParamIssue> {
        let mut issues = Vec::new();
        if let Err(e) = p.device.parse::<DeviceChoice>() {
            issues.push(ParamIssue::new("with.device", e));
        }
        if p.batch_size == 0 {
            issues.push(ParamIssue::new(
                "with.batch_size",
                "batch_size must be at least 1",
            ));
        }
        issues
    }

    async fn run(&self, p: &EmbedParams, ctx: &StepContext) -> Result<StepOutputs, StepError> {
        p.device
            .parse::<DeviceChoice>()
            .map_err(StepError::Failed)?;
        let model_dir =
            models::resolve(&p.model, &ctx.cwd).map_err(|e| StepError::Input(e.to_string()))?;
        let input = ctx.input_path("chunks")?;
        let out_dir = ctx.output_path("embeddings");
        std::fs::create_dir_all(&out_dir)
            .map_err(|e| StepError::Failed(format!("{}: {e}", out_dir.display())))?;
        let chunks: Vec<Chunk> = documents::read_jsonl(&input).map_err(StepError::Failed)?;
        let job = EmbedJob {
            model: model_dir,
            device: p.device.clone(),
            precision: p.precision,
            batch_size: p.batch_size,
            threads: p.threads,
            input: input.clone(),
            output: out_dir.join(embed::TENSOR_FILE),
        };
        let progress = ctx.progress.clone();
        progress.set_message("loading the model");
        progress.set_length(chunks.len() as u64);
        let t0 = Instant::now();
        let mut device = String::new();
        let mut last = 0u64;
        let outcome = embed::worker::run(
            &job,
            &mut |info| {
                device = info.device.clone();
                progress.set_message(format!("{} on {}", info.model, info.device));
            },
            &mut |done| {
                progress.inc(done.saturating_sub(last));
                last = done;
                let rate = done as f64 / t0.elapsed().as_secs_f64().max(1e-9);
                progress.set_message(format!("{rate:.0} sentences/s"));
            },
            &ctx.cancel,
        )
        .await
        .map_err(|e| match e {
            EmbedError::Cancelled => StepError::Cancelled,
            other => StepError::Failed(other.to_string()),
        })?;
        std::fs::copy(&input, out_dir.join(embed::CHUNKS_FILE))
            .map_err(|e| StepError::Failed(format!("copying chunks: {e}")))?;
        let info = &outcome.info;
        let seconds = outcome.seconds;
        let rate = chunks.len() as f64 / seconds.max(1e-9);
        let note = format!(
            "{} vectors of {} dims, {rate:.1} sentences/s on {} ({})",
            chunks.len(),
            info.dim,
            info.device,
            info.precision
        );
        let mut by_category: BTreeMap<&str, usize> = BTreeMap::new();
        for c in &chunks {
            *by_category.entry(c.category.as_str()).or_default() += 1;
        }
        let meta = json!({
            "count": chunks.len(),
            "dim": info.dim,
            "model": models::display_name_for(&p.model, &info.model_dir),
            "model_dir": info.model_dir,
            "pooling": info.pooling,
            "normalize": info.normalize,
            "max_seq_length": info.max_seq_length,
            "device": info.device,
            "device_reason": info.device_reason,
            "precision": info.precision,
            "threads": info.threads,
            "batch_size": p.batch_size,
            "seconds": (seconds * 1000.0).round() / 1000.0,
            "sentences_per_second": (rate * 10.0).round() / 10.0,
            "tokens_per_second": (outcome.tokens as f64 / seconds.max(1e-9)).round(),
            "by_category": by_category,
        });
        ctx.single_output("embeddings", meta, note)
    }
}
