//! `sample`: N sampled replies per prompt of a `dataset` split from a `model` artifact,
//! in the `cairn-torch` helper (the first stage of RLAIF: sample, judge, rank, train).
//! The replies of prompt i are drawn as one batch with seed `seed + i`, so a rerun draws
//! the same replies, and the output is cached like any artifact: changing a judge
//! downstream never samples again. Output: a `samples` JSON Lines file, one line per prompt with its
//! conversation, the dataset's reference reply and the samples.

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;

use super::{InputDecl, Kind, ParamIssue, StepContext, StepError, StepOutputs};
use crate::ml::job::{GenerationSettings, SampleJob};
use crate::ml::worker;
use crate::{dataset, ml};

/// The `sample` step kind.
pub struct SampleStep;

/// Which split's prompts are sampled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// The held-out prompts (default: the model never trained on them).
    Test,
    /// The training prompts.
    Train,
}

/// Parameters of `sample`.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SampleParams {
    /// Replies per prompt.
    #[serde(default = "default_n")]
    pub n: usize,
    /// `test` (default) or `train`.
    #[serde(default = "default_split")]
    pub split: Split,
    /// Prompts sampled at most, in the split's order (0: all).
    #[serde(default)]
    pub max_prompts: usize,
    /// Sampling (temperature 0.7, top-p 0.95, top-k 50 by default); prompt i's replies
    /// are drawn with seed `seed + i`.
    #[serde(default)]
    pub generation: GenerationSettings,
    /// `auto`, `cpu`, `cuda`, `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// CPU threads (0: libtorch's default).
    #[serde(default)]
    pub threads: usize,
}

fn default_n() -> usize {
    4
}
fn default_split() -> Split {
    Split::Test
}
fn default_device() -> String {
    "auto".into()
}

#[async_trait]
impl Kind for SampleStep {
    type Params = SampleParams;
    const OUTPUTS: &'static [(&'static str, &'static str)] = &[("samples", ml::SAMPLES_KIND)];

    fn name(&self) -> &'static str {
        "sample"
    }

    fn version(&self) -> String {
        "1".into()
    }

    fn summary(&self) -> &'static str {
        "Sample N replies per prompt of a `dataset` split from a `model`; output `samples` (RLAIF's first stage)"
    }

    fn inputs(&self) -> Option<Vec<InputDecl>> {
        Some(vec![
            InputDecl {
                name: "model".into(),
                kind: ml::MODEL_KIND.into(),
                required: true,
            },
            InputDecl {
                name: "dataset".into(),
                kind: dataset::KIND.into(),
                required: true,
            },
        ])
    }

    fn validate(&self, p: &SampleParams) -> Vec<ParamIssue> {
        let mut issues = Vec::new();
        if p.n == 0 {
            issues.push(ParamIssue::new("with.n", "n must be at least 1"));
        }
        if let Err(e) = p.device.parse::<crate::embed::DeviceChoice>() {
            issues.push(ParamIssue::new("with.device", e));
        }
        let g = &p.generation;
        if g.temperature < 0.0 || !(0.0..=1.0).contains(&g.top_p) || g.repetition_penalty <= 0.0 {
            issues.push(ParamIssue::new(
                "with.generation",
                "temperature must be >= 0, top_p in 0..1, repetition_penalty > 0",
            ));
        }
        if p.n > 1 && g.temperature == 0.0 {
            issues.push(ParamIssue::new(
                "with.generation.temperature",
                "temperature 0 is greedy: every reply to a prompt would be the same (use e.g. 0.8)",
            ));
        }
        issues
    }

    async fn run(&self, p: &SampleParams, ctx: &StepContext) -> Result<StepOutputs, StepError> {
        let out = ctx.output_path("samples");
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| StepError::Failed(format!("{}: {e}", parent.display())))?;
        }
        let job = SampleJob {
            model: ctx.input_path("model")?,
            dataset: ctx.input_path("dataset")?,
            split_file: match p.split {
                Split::Test => dataset::TEST_FILE,
                Split::Train => dataset::TRAIN_FILE,
            }
            .into(),
            max_prompts: p.max_prompts,
            n: p.n,
            generation: p.generation.clone(),
            device: p.device.clone(),
            threads: p.threads,
            output: out,
        };
        let progress = ctx.progress.clone();
        progress.set_message("loading");
        let done = worker::run(
            "sample",
            &job,
            &ctx.work_dir.join("sample-job.json"),
            &mut |event, payload| {
                if event == "progress" {
                    progress.set_length(payload["total"].as_u64().unwrap_or(0));
                    progress
                        .bar()
                        .set_position(payload["done"].as_u64().unwrap_or(0));
                    progress.set_message("sampling");
                }
            },
            &ctx.cancel,
        )
        .await?;
        let note = format!(
            "{} replies to {} prompts, {:.0} tokens/s ({})",
            done["samples"],
            done["prompts"],
            done["tokens_per_second"].as_f64().unwrap_or(0.0),
            done["device"].as_str().unwrap_or("?")
        );
        let meta = json!({
            "prompts": done["prompts"], "samples": done["samples"], "n": p.n,
            "split": match p.split { Split::Test => "test", Split::Train => "train" },
            "unreadable": done["unreadable"], "tokens": done["tokens"],
            "tokens_per_second": done["tokens_per_second"], "device": done["device"],
            "generation": p.generation,
        });
        ctx.single_output("samples", meta, note)
    }
}
