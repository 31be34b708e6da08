//! `evaluate`: scores a `model` artifact (and optionally a baseline) on a `dataset`'s test
//! split: perplexity over response tokens, ROUGE-L of greedy answers against the
//! references, sampled answers to fixed prompts, and optionally an LLM judge (accuracy
//! and style, 1-3) through the OpenAI-compatible client. Output: a `report` directory
//! with `metrics.json`, `samples.jsonl` and a self-contained `report.html`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{InputDecl, Kind, ParamIssue, StepContext, StepError, StepOutputs};
use crate::llm::{self, ChatMessage, LlmError, LlmSettings};
use crate::ml::job::{EvalJob, EvalResults, GenerationSettings};
use crate::ml::report::{self, mean, round4};
use crate::ml::rouge::rouge_l;
use crate::ml::worker;
use crate::{dataset, ml, models};

/// The `evaluate` step kind.
pub struct EvaluateStep;

/// The LLM judge.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JudgeSettings {
    /// The OpenAI-compatible server and model (the same block as `instruct`'s `llm`).
    pub llm: LlmSettings,
    /// Answers judged per model (the first N greedy answers to test prompts).
    #[serde(default = "default_judged")]
    pub max_answers: usize,
    /// The judge prompt with `{instruction}` and `{answer}` (default: accuracy and style
    /// on 1-3, as JSON).
    #[serde(default)]
    pub prompt: Option<String>,
}

fn default_judged() -> usize {
    20
}

/// Parameters of `evaluate`.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvaluateParams {
    /// A baseline model to compare against (a Hugging Face directory or cached id), e.g.
    /// the base model; or bind an input `baseline` artifact.
    #[serde(default)]
    pub baseline_model: Option<String>,
    /// Prompts for sample generations (wrapped in the model's template).
    #[serde(default = "default_prompts")]
    pub prompts: Vec<String>,
    /// Sampling for the prompts.
    #[serde(default)]
    pub generation: GenerationSettings,
    /// Test examples answered greedily and scored with ROUGE-L (0: none).
    #[serde(default = "default_rouge_examples")]
    pub rouge_examples: usize,
    /// Tokens per greedy answer.
    #[serde(default = "default_rouge_tokens")]
    pub rouge_max_new_tokens: usize,
    /// Rows longer than this lose the start of their prompt for perplexity.
    #[serde(default = "default_seq")]
    pub max_seq_len: usize,
    /// An LLM judge for the greedy answers.
    #[serde(default)]
    pub judge: Option<JudgeSettings>,
    /// `auto`, `cpu`, `cuda`, `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// CPU threads (0: libtorch's default).
    #[serde(default)]
    pub threads: usize,
}

fn default_prompts() -> Vec<String> {
    vec![
        "Write a few sentences about why you write.".into(),
        "What is one thing you learned this year?".into(),
    ]
}
fn default_rouge_examples() -> usize {
    20
}
fn default_rouge_tokens() -> usize {
    64
}
fn default_seq() -> usize {
    512
}
fn default_device() -> String {
    "auto".into()
}

#[async_trait]
impl Kind for EvaluateStep {
    type Params = EvaluateParams;
    const OUTPUTS: &'static [(&'static str, &'static str)] = &[("report", ml::REPORT_KIND)];

    fn name(&self) -> &'static str {
        "evaluate"
    }

    fn version(&self) -> String {
        "1".into()
    }

    fn summary(&self) -> &'static str {
        "Evaluate a `model` (and a baseline) on a `dataset`: perplexity, ROUGE-L, samples, optional LLM judge; output a `report`"
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
                required: false,
            },
            InputDecl {
                name: "baseline".into(),
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
        super::finetune::named_model(params.baseline_model.as_deref(), cwd, "baseline_model")
    }

    fn validate(&self, p: &EvaluateParams) -> Vec<ParamIssue> {
        let mut issues: Vec<ParamIssue> =
            super::finetune::unsupported_model(p.baseline_model.as_deref(), "with.baseline_model")
                .into_iter()
                .collect();
        if let Err(e) = p.device.parse::<crate::embed::DeviceChoice>() {
            issues.push(ParamIssue::new("with.device", e));
        }
        if p.generation.temperature < 0.0
            || !(0.0..=1.0).contains(&p.generation.top_p)
            || p.generation.repetition_penalty <= 0.0
        {
            issues.push(ParamIssue::new(
                "with.generation",
                "temperature must be >= 0, top_p in 0..1, repetition_penalty > 0",
            ));
        }
        if let Some(j) = &p.judge {
            issues.extend(
                j.llm
                    .issues()
                    .into_iter()
                    .map(|(field, msg)| ParamIssue::new(format!("with.judge.llm.{field}"), msg)),
            );
            if let Some(t) = &j.prompt {
                if !t.contains("{answer}") {
                    issues.push(ParamIssue::new(
                        "with.judge.prompt",
                        "the judge prompt must contain {answer} (and usually {instruction})",
                    ));
                }
            }
        }
        issues
    }

    async fn run(&self, p: &EvaluateParams, ctx: &StepContext) -> Result<StepOutputs, StepError> {
        let mut targets: Vec<(String, PathBuf)> = vec![("model".into(), ctx.input_path("model")?)];
        if let Some(b) = ctx.inputs.get("baseline") {
            targets.push(("baseline".into(), b.path.clone()));
        } else if let Some(b) = &p.baseline_model {
            targets.push((
                "baseline".into(),
                models::resolve(b, &ctx.cwd).map_err(|e| StepError::Input(e.to_string()))?,
            ));
        }
        let dataset = ctx.inputs.get("dataset").map(|d| d.path.clone());
        let progress = ctx.progress.clone();
        let mut results: Vec<(String, EvalResults)> = Vec::new();
        for (name, dir) in &targets {
            progress.set_message(format!("{name}: loading"));
            let out = ctx.work_dir.join(format!("eval-{name}.json"));
            let job = EvalJob {
                model: dir.clone(),
                dataset: dataset.clone(),
                max_seq_len: p.max_seq_len,
                rouge_examples: if dataset.is_some() {
                    p.rouge_examples
                } else {
                    0
                },
                rouge_max_new_tokens: p.rouge_max_new_tokens,
                prompts: p.prompts.clone(),
                generation: p.generation.clone(),
                device: p.device.clone(),
                threads: p.threads,
                output: out.clone(),
            };
            let label = name.clone();
            worker::run(
                "evaluate",
                &job,
                &ctx.work_dir.join(format!("eval-{name}-job.json")),
                &mut |event, payload| {
                    if event == "progress" {
                        progress.set_length(payload["total"].as_u64().unwrap_or(0));
                        progress
                            .bar()
                            .set_position(payload["done"].as_u64().unwrap_or(0));
                        progress.set_message(format!(
                            "{label}: {}",
                            payload["phase"].as_str().unwrap_or("")
                        ));
                    }
                },
                &ctx.cancel,
            )
            .await?;
            let text = std::fs::read_to_string(&out)
                .map_err(|e| StepError::Failed(format!("{}: {e}", out.display())))?;
            let r: EvalResults = serde_json::from_str(&text)
                .map_err(|e| StepError::Failed(format!("{}: {e}", out.display())))?;
            results.push((name.clone(), r));
        }

        // The judge, over every model's greedy answers.
        let mut verdicts: Vec<Vec<Option<report::Verdict>>> = results
            .iter()
            .map(|(_, r)| vec![None; r.answers.len()])
            .collect();
        let mut judge_meta = Value::Null;
        if let Some(j) = &p.judge {
            let client = Arc::new(
                llm::Client::new(j.llm.clone(), Some(ctx.store.root()))
                    .map_err(|e| StepError::Failed(e.to_string()))?,
            );
            let template = j
                .prompt
                .clone()
                .unwrap_or_else(|| report::JUDGE_PROMPT.to_string());
            let mut tasks = tokio::task::JoinSet::new();
            for (mi, (_, r)) in results.iter().enumerate() {
                for (ai, a) in r.answers.iter().enumerate().take(j.max_answers) {
                    let client = client.clone();
                    let cancel = ctx.cancel.clone();
                    let messages = vec![ChatMessage::user(report::judge_prompt(
                        &template, &a.prompt, &a.output,
                    ))];
                    tasks.spawn(
                        async move { (mi, ai, client.chat(&messages, true, &cancel).await) },
                    );
                }
            }
            progress.set_length(tasks.len() as u64);
            progress.bar().set_position(0);
            progress.set_message("judging");
            let mut unusable = 0usize;
            while let Some(joined) = tasks.join_next().await {
                let (mi, ai, reply) =
                    joined.map_err(|e| StepError::Failed(format!("judge task panicked: {e}")))?;
                match reply {
                    Ok(c) => match report::parse_verdict(&c.content) {
                        Ok(v) => verdicts[mi][ai] = Some(v),
                        Err(e) => {
                            unusable += 1;
                            tracing::warn!("judge reply unusable: {e}");
                        }
                    },
                    Err(LlmError::Cancelled) => return Err(StepError::Cancelled),
                    Err(e) => {
                        tasks.abort_all();
                        return Err(StepError::Failed(format!("judge: {e}")));
                    }
                }
                progress.inc(1);
            }
            let mut m = serde_json::to_value(client.totals()).unwrap_or_default();
            m["model"] = json!(j.llm.model);
            m["unusable_replies"] = json!(unusable);
            judge_meta = m;
        }

        let model_meta = ctx.input_metadata("model").unwrap_or(Value::Null);
        let curve = model_meta.get("curve").cloned().unwrap_or(Value::Null);

        let mut metrics = serde_json::Map::new();
        let mut samples: Vec<Value> = Vec::new();
        for ((name, r), verdicts) in results.iter().zip(&verdicts) {
            let scores: Vec<f64> = r
                .answers
                .iter()
                .map(|a| rouge_l(&a.output, a.reference.as_deref().unwrap_or("")).f1)
                .collect();
            let judged: Vec<&report::Verdict> = verdicts.iter().flatten().collect();
            metrics.insert(
                name.clone(),
                json!({
                    "perplexity": round4(r.perplexity),
                    "loss": round4(r.loss),
                    "response_tokens": r.target_tokens,
                    "rouge_l_f1": round4(mean(scores.iter().copied())),
                    "answers": r.answers.len(),
                    "judge_accuracy": round4(mean(judged.iter().map(|v| f64::from(v.accuracy)))),
                    "judge_style": round4(mean(judged.iter().map(|v| f64::from(v.style)))),
                    "judged": judged.len(),
                    "device": r.device,
                }),
            );
            for ((a, score), v) in r.answers.iter().zip(&scores).zip(verdicts) {
                samples.push(json!({
                    "model": name, "kind": "answer", "prompt": a.prompt, "reference": a.reference,
                    "output": a.output, "rouge_l": round4(Some(*score)),
                    "judge": v.as_ref().map(|v| json!({"accuracy": v.accuracy, "style": v.style, "accuracy_reason": v.accuracy_reason, "style_reason": v.style_reason})),
                }));
            }
            for s in &r.samples {
                samples.push(json!({"model": name, "kind": "sample", "prompt": s.prompt, "output": s.output}));
            }
        }
        let metrics = json!({
            "models": metrics,
            "training": {
                "steps": model_meta.get("steps"), "train_loss": model_meta.get("train_loss"),
                "eval_loss": model_meta.get("eval_loss"), "method": model_meta.get("method"),
            },
            "judge": judge_meta,
        });
        let dir = ctx.output_path("report");
        std::fs::create_dir_all(&dir)
            .map_err(|e| StepError::Failed(format!("{}: {e}", dir.display())))?;
        let write = |name: &str, text: String| {
            std::fs::write(dir.join(name), text)
                .map_err(|e| StepError::Failed(format!("{name}: {e}")))
        };
        write(
            "metrics.json",
            serde_json::to_string_pretty(&metrics).unwrap_or_default() + "\n",
        )?;
        write(
            "samples.jsonl",
            samples.iter().map(|s| s.to_string() + "\n").collect(),
        )?;
        write(
            "report.html",
            report::html(
                &format!("cairn evaluation: {}", ctx.step),
                &metrics,
                &curve,
                &samples,
            ),
        )?;

        let m = &metrics["models"]["model"];
        let mut note = format!(
            "perplexity {}, ROUGE-L {}",
            report_num(&m["perplexity"]),
            report_num(&m["rouge_l_f1"])
        );
        if let Some(b) = metrics["models"].get("baseline") {
            note.push_str(&format!(
                " (baseline: perplexity {}, ROUGE-L {})",
                report_num(&b["perplexity"]),
                report_num(&b["rouge_l_f1"])
            ));
        }
        if p.judge.is_some() {
            note.push_str(&format!(
                ", judge accuracy {} style {}",
                report_num(&m["judge_accuracy"]),
                report_num(&m["judge_style"])
            ));
        }
        let mut meta = metrics.clone();
        meta["samples"] = json!(samples.len());
        if !curve.is_null() {
            meta["curve"] = curve;
        }
        ctx.single_output("report", meta, note)
    }
}

fn report_num(v: &Value) -> String {
    v.as_f64()
        .map(|x| format!("{x:.3}"))
        .unwrap_or_else(|| "-".into())
}
