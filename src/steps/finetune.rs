//! `finetune`: trains a GPT-2 or Llama-family model on a `dataset` artifact through
//! libtorch (in the `cairn-torch` helper; see [`crate::ml`]), full or LoRA, and stores the
//! result as a `model` artifact in the Hugging Face / PEFT layout. Checkpoints live in the
//! store under `checkpoints/<cache key>/` until the model is committed, so a killed run
//! resumes where it stopped, and a run with other settings, data or base-model files
//! starts afresh.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use serde_json::{json, Value};

use super::{InputDecl, Kind, ParamIssue, StepContext, StepError, StepOutputs};
use crate::ml::job::{Method, Objective, TrainJob, TrainSettings};
use crate::ml::template::Template;
use crate::ml::worker;
use crate::{dataset, ml, models};

/// The `finetune` step kind.
pub struct FinetuneStep;

/// Checks the settings that do not need the model; every problem at once.
pub fn settings_issues(p: &TrainSettings) -> Vec<ParamIssue> {
    let mut issues = Vec::new();
    let mut bad =
        |path: &str, msg: String| issues.push(ParamIssue::new(format!("with.{path}"), msg));
    if p.model.is_some() && p.scratch.is_some() {
        bad(
            "scratch",
            "give either `model` (a checkpoint) or `scratch` (a fresh config), not both".into(),
        );
    }
    if let Some(s) = &p.scratch {
        if !matches!(s.arch.as_str(), "gpt2" | "llama") {
            bad(
                "scratch.arch",
                format!("arch {:?} is not supported: use gpt2 or llama", s.arch),
            );
        }
        if s.layers < 1 || s.hidden < 1 || s.heads < 1 || s.hidden % s.heads != 0 {
            bad("scratch", format!("need layers, hidden, heads >= 1 with hidden a multiple of heads (got {} layers, hidden {}, {} heads)", s.layers, s.hidden, s.heads));
        }
        if p.method == Method::Lora {
            bad(
                "method",
                "LoRA adapts a trained model; a scratch model is trained with method: full".into(),
            );
        }
    }
    if let Err(e) = Template::check(&p.template) {
        bad("template", e);
    }
    if let Err(e) = p.device.parse::<crate::embed::DeviceChoice>() {
        bad("device", e);
    }
    if !matches!(p.precision.as_str(), "auto" | "f32" | "bf16") {
        bad(
            "precision",
            format!("precision {:?}: use auto, f32 or bf16", p.precision),
        );
    }
    match (p.dtype.as_str(), p.method) {
        ("auto" | "f32", _) | ("bf16" | "f16", Method::Lora) => {}
        ("bf16" | "f16", _) => bad(
            "dtype",
            format!(
                "dtype {} stores the frozen base weights of LoRA in 16 bits; full fine-tuning trains every weight in f32 (use method: lora, or dtype: auto)",
                p.dtype
            ),
        ),
        (other, _) => bad(
            "dtype",
            format!("dtype {other:?}: use auto, f32, bf16 or f16"),
        ),
    }
    match (p.quantize.as_deref(), p.method) {
        (None, _) | (Some("nf4"), Method::Lora) => {}
        (Some("nf4"), _) => bad(
            "quantize",
            "quantize: nf4 freezes the base weights in 4 bits (QLoRA); it needs method: lora"
                .into(),
        ),
        (Some(other), _) => bad("quantize", format!("quantize {other:?}: use nf4")),
    }
    let mut seen = std::collections::HashSet::new();
    for (i, token) in p.add_tokens.iter().enumerate() {
        if token.trim().is_empty() || !seen.insert(token) {
            bad(
                &format!("add_tokens.{i}"),
                format!("add_tokens: {token:?} is empty or listed twice"),
            );
        }
    }
    if let Some(t) = &p.gguf {
        if !matches!(t.as_str(), "f16" | "bf16" | "q8_0") {
            bad("gguf", format!("gguf {t:?}: use f16, bf16 or q8_0"));
        }
    }
    if !(p.max_shard_mb > 0.0 && p.max_shard_mb.is_finite()) {
        bad(
            "max_shard_mb",
            format!("max_shard_mb must be positive, got {}", p.max_shard_mb),
        );
    }
    if p.batch_size == 0 || p.grad_accum == 0 {
        bad(
            "batch_size",
            "batch_size and grad_accum must be at least 1".into(),
        );
    }
    if p.max_seq_len < 8 {
        bad(
            "max_seq_len",
            format!("max_seq_len {} is too short (at least 8)", p.max_seq_len),
        );
    }
    if p.learning_rate <= 0.0 || !p.learning_rate.is_finite() {
        bad(
            "learning_rate",
            format!("learning_rate must be positive, got {}", p.learning_rate),
        );
    }
    if p.epochs <= 0.0 && p.max_steps.is_none() {
        bad(
            "epochs",
            format!("epochs must be positive, got {}", p.epochs),
        );
    }
    if p.max_steps == Some(0) {
        bad("max_steps", "max_steps must be at least 1".into());
    }
    if !(0.0..1.0).contains(&p.warmup_ratio) {
        bad(
            "warmup_ratio",
            format!("warmup_ratio {} is outside 0..1", p.warmup_ratio),
        );
    }
    if !(0.0..1.0).contains(&p.adam_beta1) || !(0.0..1.0).contains(&p.adam_beta2) {
        bad("adam_beta1", "adam betas must be in 0..1".into());
    }
    if p.lora.r < 1 {
        bad(
            "lora.r",
            format!("lora.r must be at least 1, got {}", p.lora.r),
        );
    }
    if !(0.0..1.0).contains(&p.lora.dropout) {
        bad(
            "lora.dropout",
            format!("lora.dropout {} is outside 0..1", p.lora.dropout),
        );
    }
    if p.objective != Objective::Sft {
        if !(p.beta > 0.0 && p.beta.is_finite()) {
            bad("beta", format!("beta must be positive, got {}", p.beta));
        }
        if !(0.0..0.5).contains(&p.label_smoothing) {
            bad(
                "label_smoothing",
                format!("label_smoothing {} is outside 0..0.5", p.label_smoothing),
            );
        }
        if p.packing {
            bad(
                "packing",
                "preference objectives compare each chosen reply with its rejected one; packing joins examples (set packing: false)".into(),
            );
        }
    }
    if p.objective != Objective::Dpo && p.precompute_ref {
        bad(
            "precompute_ref",
            "precompute_ref applies to objective: dpo (ORPO has no reference)".into(),
        );
    }
    if p.objective != Objective::Dpo && p.label_smoothing != 0.0 {
        bad(
            "label_smoothing",
            "label_smoothing applies to objective: dpo".into(),
        );
    }
    if p.early_stopping_patience == Some(0) {
        bad(
            "early_stopping_patience",
            "patience must be at least 1 evaluation".into(),
        );
    }
    issues
}

/// A model folder that resolves now (relative to where cairn runs) and whose config.json
/// names a family the decoder lacks: an input error at load time, not mid-run.
pub fn unsupported_model(model: Option<&str>, path: &str) -> Option<ParamIssue> {
    let cwd = std::env::current_dir().ok()?;
    let dir = models::resolve(model?, &cwd).ok()?;
    crate::ml::family::check_model_dir(&dir)
        .err()
        .map(|message| ParamIssue::new(path, message))
}

/// A model folder that resolves now and that the `gguf` export cannot write for
/// llama.cpp: an input error at load time rather than after training.
fn unexportable_model(model: Option<&str>, path: &str) -> Option<ParamIssue> {
    let cwd = std::env::current_dir().ok()?;
    let dir = models::resolve(model?, &cwd).ok()?;
    crate::ml::family::check_gguf_export(&dir)
        .err()
        .map(|message| ParamIssue::new(path, message))
}

/// The model directory a param (`key`) names, resolved (for the cache key: swapping the
/// model's files reruns the step); none when the param is absent.
pub fn named_model(
    model: Option<&str>,
    cwd: &Path,
    key: &str,
) -> Result<Vec<(String, PathBuf)>, String> {
    let Some(m) = model else {
        return Ok(Vec::new());
    };
    let dir = models::resolve(m, cwd).map_err(|e| e.to_string())?;
    Ok(vec![(key.to_string(), dir)])
}

#[async_trait]
impl Kind for FinetuneStep {
    type Params = TrainSettings;
    const OUTPUTS: &'static [(&'static str, &'static str)] = &[("model", ml::MODEL_KIND)];

    fn name(&self) -> &'static str {
        "finetune"
    }

    fn version(&self) -> String {
        "1".into()
    }

    fn summary(&self) -> &'static str {
        "Fine-tune a GPT-2 or Llama-family model on a `dataset` (full or LoRA) through libtorch; output a Hugging Face `model`"
    }

    fn inputs(&self) -> Option<Vec<InputDecl>> {
        Some(vec![
            InputDecl {
                name: "dataset".into(),
                kind: dataset::KIND.into(),
                required: true,
            },
            InputDecl {
                name: "model".into(),
                kind: ml::MODEL_KIND.into(),
                required: false,
            },
        ])
    }

    fn content_inputs(
        &self,
        params: &Self::Params,
        cwd: &Path,
    ) -> Result<Vec<(String, PathBuf)>, String> {
        let mut files = named_model(params.model.as_deref(), cwd, "model")?;
        if let Some(t) = params.tokenizer.as_deref() {
            let p = if Path::new(t).is_absolute() {
                PathBuf::from(t)
            } else {
                cwd.join(t)
            };
            if !p.exists() {
                return Err(format!("tokenizer {t:?} does not exist"));
            }
            files.push(("tokenizer".into(), p));
        }
        Ok(files)
    }

    fn validate(&self, p: &TrainSettings) -> Vec<ParamIssue> {
        let mut issues = settings_issues(p);
        issues.extend(unsupported_model(p.model.as_deref(), "with.model"));
        if p.gguf.is_some() {
            issues.extend(unexportable_model(p.model.as_deref(), "with.gguf"));
        }
        issues
    }

    async fn run(
        &self,
        params: &TrainSettings,
        ctx: &StepContext,
    ) -> Result<StepOutputs, StepError> {
        let mut p = params.clone();
        let base_dir = match (&p.model, ctx.inputs.get("model"), &p.scratch) {
            (Some(m), _, _) => Some(models::resolve(m, &ctx.cwd).map_err(|e| StepError::Input(e.to_string()))?),
            (None, Some(input), _) => Some(input.path.clone()),
            (None, None, Some(_)) => None,
            (None, None, None) => {
                return Err(StepError::Failed(
                    "no base model: set `model` (a Hugging Face directory or cached id), bind an input `model` artifact, or give a `scratch` config".into(),
                ))
            }
        };
        if let Some(t) = &p.tokenizer {
            p.tokenizer = Some(ctx.resolve_path(t).display().to_string());
        }
        let dataset_input = ctx
            .inputs
            .get("dataset")
            .ok_or_else(|| StepError::Failed("input `dataset` is missing".into()))?;
        let checkpoints = ctx
            .store
            .root()
            .join("checkpoints")
            .join(ctx.cache_key.to_hex());
        let output = ctx.output_path("model");
        let base_name = match (&p.model, ctx.inputs.get("model")) {
            (Some(m), _) => json!(m),
            (None, Some(input)) => json!(format!("artifact {}", input.digest.to_hex())),
            _ => json!("scratch"),
        };
        let job = TrainJob {
            settings: p.clone(),
            base_dir,
            dataset: dataset_input.path.clone(),
            output: output.clone(),
            checkpoints: checkpoints.clone(),
            dump_first_batch: None,
            provenance: json!({"base": base_name, "dataset": dataset_input.digest.to_hex(), "step": ctx.step}),
        };
        let progress = ctx.progress.clone();
        progress.set_message("loading the model");
        let mut device_line = String::new();
        let mut resumed = None;
        let step_name = ctx.step.clone();
        let finished = worker::run(
            "train",
            &job,
            &ctx.work_dir.join("train-job.json"),
            &mut |event, payload| match event {
                "device" => {
                    device_line = format!(
                        "{} ({}{})",
                        payload["device"].as_str().unwrap_or("?"),
                        payload["reason"].as_str().unwrap_or(""),
                        if payload["bf16"].as_bool() == Some(true) {
                            ", bf16 autocast"
                        } else {
                            ", f32"
                        }
                    );
                    tracing::info!("{step_name}: training on {device_line}");
                    progress
                        .bar()
                        .println(format!("{step_name}: training on {device_line}"));
                }
                "loaded" => {
                    progress.set_length(payload["total_steps"].as_u64().unwrap_or(0));
                    if let Some(step) = payload["resumed_from"].as_u64() {
                        resumed = Some(step);
                        progress.inc(step);
                        progress.bar().println(format!(
                            "{step_name}: resuming from the checkpoint at step {step}"
                        ));
                    }
                }
                "step" => {
                    progress.inc(1);
                    progress.set_message(format!(
                        "loss {:.4} lr {:.2e} {:.0} tok/s",
                        payload["loss"].as_f64().unwrap_or(f64::NAN),
                        payload["lr"].as_f64().unwrap_or(0.0),
                        payload["tokens_per_second"].as_f64().unwrap_or(0.0)
                    ));
                }
                _ => {}
            },
            &ctx.cancel,
        )
        .await?;
        let mut meta = finished;
        if let Some(m) = meta.as_object_mut() {
            let settings = serde_json::to_value(&p).unwrap_or_default();
            m.insert("method".into(), json!(p.method));
            m.insert("base".into(), base_name);
            m.insert("dataset".into(), json!(dataset_input.digest.to_hex()));
            for key in [
                "learning_rate",
                "batch_size",
                "grad_accum",
                "max_seq_len",
                "packing",
                "seed",
                "scheduler",
            ] {
                // The effective value (defaults included), not only what the YAML said.
                m.insert(
                    key.into(),
                    settings.get(key).cloned().unwrap_or(Value::Null),
                );
            }
            if p.method == Method::Lora {
                m.insert("lora".into(), json!({"r": p.lora.r, "alpha": p.lora.alpha, "dropout": p.lora.dropout, "merged": p.lora.merge}));
            }
        }
        let note = format!(
            "{} steps{}, loss {:.4}, eval loss {}, {:.0} tokens/s on {}{}",
            meta["steps"],
            if meta["stopped_early"].as_bool() == Some(true) {
                " (stopped early)"
            } else {
                ""
            },
            meta["train_loss"].as_f64().unwrap_or(f64::NAN),
            meta["eval_loss"]
                .as_f64()
                .map(|e| format!("{e:.4}"))
                .unwrap_or_else(|| "-".into()),
            meta["tokens_per_second"].as_f64().unwrap_or(0.0),
            device_line,
            resumed
                .map(|s| format!(", resumed from step {s}"))
                .unwrap_or_default()
        );
        let out = ctx.single_output("model", meta, note)?;
        // The model is committed: its checkpoints are no longer needed.
        let _ = std::fs::remove_dir_all(&checkpoints);
        Ok(out)
    }
}
