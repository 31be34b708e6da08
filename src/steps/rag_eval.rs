//! `rag_eval`: scores retrieval on questions whose source is known. The `questions`
//! dataset (e.g. an `instruct` step's: each record names the document or chunk it was
//! made from in `source`) is asked of the collections a `vector_load` filled, under each
//! configuration compared (plain search + fusion, with expansion, with rerank, both), and
//! the report gives hit rate@k, MRR and nDCG@k per configuration, with the curves and the
//! per-question ranks. With `answers`, a `model` also answers each question over the
//! retrieved context and an LLM judge rates faithfulness and relevance. The reranker's and embedder's files are content inputs, so
//! changing only the reranker reruns only this step.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{InputDecl, Kind, ParamIssue, StepContext, StepError, StepOutputs};
use crate::inference::protocol::WorkerConfig;
use crate::inference::worker::Worker;
use crate::ml::report::{esc, mean, svg_chart_over};
use crate::ml::template::Conversation;
use crate::rag::{metrics, RagConfig, Retriever, Stages};
use crate::vectorstore::Receipt;

/// The `rag_eval` step kind.
pub struct RagEvalStep;

/// Artifact kind of the report.
pub const REPORT_KIND: &str = "rag-report";

/// Parameters of `rag_eval`.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RagEvalParams {
    /// The retrieval scored: the keys of a `cairn serve --rag` file (collections, top_k,
    /// self_query, expansion, rrf_k, rerank, prompt).
    pub rag: RagConfig,
    /// Cutoffs of hit rate and nDCG (the largest is how many sources are ranked).
    #[serde(default = "default_ks")]
    pub k: Vec<usize>,
    /// Split of `questions` asked: test or train.
    #[serde(default = "default_split")]
    pub split: String,
    /// Questions asked at most (0: all), in file order.
    #[serde(default = "default_max_questions")]
    pub max_questions: usize,
    /// Configurations compared: `search` (search and fusion only), `expansion`,
    /// `rerank`, `expansion+rerank`. Default: every one the `rag` settings allow.
    #[serde(default)]
    pub configurations: Vec<String>,
    /// Device of the embedder and reranker: auto, cpu, cuda, cuda:N.
    #[serde(default = "default_device")]
    pub device: String,
    /// CPU threads (0: libtorch's default).
    #[serde(default)]
    pub threads: usize,
    /// Also answer each question with the `model` input over the retrieved context
    /// (greedy) and have an LLM judge rate each answer.
    #[serde(default)]
    pub answers: Option<AnswerSettings>,
}

/// Answer scoring.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AnswerSettings {
    /// The judge (OpenAI-compatible; its answers cached in the store).
    pub judge: crate::llm::LlmSettings,
    /// Tokens per answer at most.
    #[serde(default = "default_answer_tokens")]
    pub max_new_tokens: usize,
}

fn default_answer_tokens() -> usize {
    128
}

fn default_ks() -> Vec<usize> {
    vec![1, 3, 5]
}
fn default_split() -> String {
    "test".into()
}
fn default_max_questions() -> usize {
    200
}
fn default_device() -> String {
    "auto".into()
}

const CONFIGURATIONS: [&str; 4] = ["search", "expansion", "rerank", "expansion+rerank"];

impl RagEvalParams {
    /// The configurations to compare, with their stages.
    fn configurations(&self) -> Vec<(String, Stages)> {
        let names: Vec<&str> = if self.configurations.is_empty() {
            CONFIGURATIONS
                .into_iter()
                .filter(|c| {
                    (!c.contains("expansion") || self.rag.expansion.is_some())
                        && (!c.contains("rerank") || self.rag.rerank.is_some())
                })
                .collect()
        } else {
            self.configurations.iter().map(String::as_str).collect()
        };
        names
            .into_iter()
            .map(|n| {
                let stages = Stages {
                    expansion: n.contains("expansion"),
                    rerank: n.contains("rerank"),
                };
                (n.to_string(), stages)
            })
            .collect()
    }
}

/// One question and the source it was made from.
struct Question {
    text: String,
    source: String,
}

fn read_questions(dir: &Path, split: &str, max: usize) -> Result<Vec<Question>, String> {
    let file = dir.join(format!("{split}.jsonl"));
    let text = std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record: Value =
            serde_json::from_str(line).map_err(|e| format!("{}:{}: {e}", file.display(), i + 1))?;
        let source = record["source"].as_str().unwrap_or_default().to_string();
        let question = Conversation::from_record(&record)
            .map(|c| c.last_user())
            .unwrap_or_default();
        if source.is_empty() || question.trim().is_empty() {
            continue;
        }
        out.push(Question {
            text: question,
            source,
        });
        if max > 0 && out.len() >= max {
            break;
        }
    }
    if out.is_empty() {
        return Err(format!(
            "{}: no record with a question and a `source` (rag_eval asks the questions of a dataset made from the collections' documents, e.g. an `instruct` step's)",
            file.display()
        ));
    }
    Ok(out)
}

#[async_trait]
impl Kind for RagEvalStep {
    type Params = RagEvalParams;
    const OUTPUTS: &'static [(&'static str, &'static str)] = &[("report", REPORT_KIND)];

    fn name(&self) -> &'static str {
        "rag_eval"
    }

    fn version(&self) -> String {
        "1".into()
    }

    fn summary(&self) -> &'static str {
        "Score retrieval (hit rate@k, MRR, nDCG@k) on `questions` against the collections of `vectors`, per configuration"
    }

    fn inputs(&self) -> Option<Vec<InputDecl>> {
        Some(vec![
            InputDecl {
                name: "questions".into(),
                kind: crate::dataset::KIND.into(),
                required: true,
            },
            InputDecl {
                name: "vectors".into(),
                kind: super::vector_load::RECEIPT_KIND.into(),
                required: true,
            },
            InputDecl {
                name: "model".into(),
                kind: crate::ml::MODEL_KIND.into(),
                required: false,
            },
        ])
    }

    fn bound_inputs(&self, p: &RagEvalParams) -> Option<Vec<InputDecl>> {
        let mut inputs = self.inputs()?;
        // Answers need the model that gives them.
        for i in &mut inputs {
            if i.name == "model" {
                i.required = p.answers.is_some();
            }
        }
        Some(inputs)
    }

    fn content_inputs(
        &self,
        p: &RagEvalParams,
        cwd: &Path,
    ) -> Result<Vec<(String, PathBuf)>, String> {
        let mut out = Vec::new();
        if let Some(r) = &p.rag.rerank {
            out.push(("reranker".to_string(), cwd.join(&r.model)));
        }
        if let Some(e) = &p.rag.embedder {
            out.push(("embedder".to_string(), cwd.join(e)));
        }
        Ok(out)
    }

    fn validate(&self, p: &RagEvalParams) -> Vec<ParamIssue> {
        let mut problems = p.rag.problems();
        problems.retain(|(path, _)| path != "rerank.model");
        let mut issues = ParamIssue::under("with.rag", problems);
        if p.k.is_empty() || p.k.iter().any(|&k| k == 0 || k > 100) {
            issues.push(ParamIssue::new(
                "with.k",
                "k lists cutoffs in 1..100, e.g. [1, 3, 5]",
            ));
        }
        if !matches!(p.split.as_str(), "test" | "train") {
            issues.push(ParamIssue::new("with.split", "split is test or train"));
        }
        for (i, c) in p.configurations.iter().enumerate() {
            if !CONFIGURATIONS.contains(&c.as_str()) {
                issues.push(ParamIssue::new(
                    format!("with.configurations.{i}"),
                    format!(
                        "unknown configuration {c:?}; use {}",
                        CONFIGURATIONS.join(", ")
                    ),
                ));
            } else if c.contains("expansion") && p.rag.expansion.is_none() {
                issues.push(ParamIssue::new(
                    format!("with.configurations.{i}"),
                    format!("{c} needs `rag.expansion`"),
                ));
            } else if c.contains("rerank") && p.rag.rerank.is_none() {
                issues.push(ParamIssue::new(
                    format!("with.configurations.{i}"),
                    format!("{c} needs `rag.rerank`"),
                ));
            }
        }
        if let Err(e) = p.device.parse::<crate::embed::DeviceChoice>() {
            issues.push(ParamIssue::new("with.device", e));
        }
        if let Some(a) = &p.answers {
            for (key, message) in a.judge.issues() {
                issues.push(ParamIssue::new(
                    format!("with.answers.judge.{key}"),
                    message,
                ));
            }
            if a.max_new_tokens == 0 {
                issues.push(ParamIssue::new(
                    "with.answers.max_new_tokens",
                    "max_new_tokens must be at least 1",
                ));
            }
        }
        issues
    }

    async fn run(&self, p: &RagEvalParams, ctx: &StepContext) -> Result<StepOutputs, StepError> {
        let fail = StepError::Failed;
        let receipt_path = ctx.input_path("vectors")?;
        let receipt: Receipt =
            serde_json::from_slice(&std::fs::read(&receipt_path).map_err(|e| fail(e.to_string()))?)
                .map_err(|e| fail(format!("the vectors receipt: {e}")))?;
        let questions = read_questions(&ctx.input_path("questions")?, &p.split, p.max_questions)
            .map_err(fail)?;
        let top = p.k.iter().copied().max().unwrap_or(5);
        let mut rag = p.rag.clone();
        rag.top_k = top;
        if let Some(r) = rag.rerank.as_mut() {
            r.model = ctx.resolve_path(&r.model.to_string_lossy());
            r.candidates = r.candidates.max(top);
        }
        let embedder = rag
            .embedder
            .as_ref()
            .map(|dir| ctx.resolve_path(&dir.to_string_lossy()))
            .or_else(|| receipt.embedder())
            .unwrap_or_else(|| PathBuf::from(super::chunk::DEFAULT_MODEL));
        let configurations = p.configurations();
        let progress = ctx.progress.clone();
        progress.set_message("loading the embedder and reranker");
        let models = match (&p.answers, ctx.inputs.get("model")) {
            (Some(_), Some(m)) => vec![crate::inference::protocol::ModelSpec {
                name: "model".into(),
                dir: m.path.clone(),
            }],
            (Some(_), None) => {
                return Err(StepError::Input(
                    "`answers` needs the `model` input that answers".into(),
                ))
            }
            _ => Vec::new(),
        };
        let judge = match &p.answers {
            Some(a) => Some(
                crate::llm::Client::new(a.judge.clone(), Some(ctx.store.root()))
                    .map_err(|e| fail(e.to_string()))?,
            ),
            None => None,
        };
        let keep = p.rag.top_k;
        let worker = Worker::start(
            &WorkerConfig {
                models,
                embedder: Some(embedder),
                reranker: rag.rerank.as_ref().map(|r| r.model.clone()),
                reranker_precision: rag
                    .rerank
                    .as_ref()
                    .map_or("auto".to_string(), |r| r.precision.clone()),
                max_batch: 1,
                device: p.device.clone(),
                threads: p.threads,
            },
            &ctx.work_dir.join("worker.json"),
            4,
        )
        .await
        .map_err(|e| fail(e.to_string()))?;
        let retriever = Retriever::open(rag, ctx.store.root())
            .await
            .map_err(|e| fail(e.to_string()))?;
        progress.set_length((questions.len() * configurations.len()) as u64);
        progress.set_message("asking");
        let mut rows = Vec::new();
        let mut summary = serde_json::Map::new();
        for (name, stages) in &configurations {
            let (mut hits, mut rr, mut ndcg, mut ms) = (
                vec![Vec::new(); p.k.len()],
                Vec::new(),
                vec![Vec::new(); p.k.len()],
                Vec::new(),
            );
            let (mut faithful, mut relevant, mut unjudged) = (Vec::new(), Vec::new(), 0usize);
            for q in &questions {
                if ctx.cancel.is_cancelled() {
                    return Err(StepError::Cancelled);
                }
                let t0 = std::time::Instant::now();
                let found = retriever
                    .retrieve(&q.text, &worker, *stages)
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                ms.push(t0.elapsed().as_secs_f64() * 1e3);
                // Binary relevance: the first chunk of (or equal to) the source counts.
                let mut seen = false;
                let ranked: Vec<bool> = found
                    .sources
                    .iter()
                    .map(|s| {
                        let relevant = !seen && is_source(s, &q.source);
                        seen |= relevant;
                        relevant
                    })
                    .collect();
                for (i, &k) in p.k.iter().enumerate() {
                    hits[i].push(metrics::hit_at(&ranked, k));
                    ndcg[i].push(metrics::ndcg_at(&ranked, 1, k));
                }
                rr.push(metrics::reciprocal_rank(&ranked));
                let mut judged = json!(null);
                if let (Some(a), Some(client)) = (&p.answers, &judge) {
                    let mut kept = found.clone();
                    kept.sources.truncate(keep);
                    let settings = crate::ml::job::GenerationSettings {
                        max_new_tokens: a.max_new_tokens,
                        temperature: 0.0,
                        ..Default::default()
                    };
                    let prompt = crate::inference::protocol::Prompt::Messages(vec![(
                        crate::ml::template::Role::User,
                        retriever.prompt(&q.text, &kept),
                    )]);
                    let answer = worker
                        .generate("model", prompt, settings)
                        .await
                        .map_err(fail)?;
                    let asked =
                        crate::rag::judge::prompt(&q.text, &Retriever::context(&kept), &answer);
                    let reply = client
                        .chat(&[crate::llm::ChatMessage::user(asked)], true, &ctx.cancel)
                        .await
                        .map_err(|e| fail(format!("the judge: {e}")))?;
                    judged = match crate::rag::judge::parse(&reply.content) {
                        Ok(s) => {
                            faithful.push(f64::from(s.faithfulness));
                            relevant.push(f64::from(s.relevance));
                            json!({"answer": answer, "faithfulness": s.faithfulness, "relevance": s.relevance, "reason": s.reason})
                        }
                        Err(e) => {
                            unjudged += 1;
                            json!({"answer": answer, "judge_error": e})
                        }
                    };
                }
                rows.push(json!({
                    "judged": judged,
                    "configuration": name, "question": q.text, "source": q.source,
                    "rank": ranked.iter().position(|&r| r).map(|i| i + 1),
                    "retrieved": found.sources.iter().map(|s| json!({"chunk_id": s.chunk_id, "url": s.url, "fused": s.fused, "rerank": s.rerank})).collect::<Vec<_>>(),
                    "queries": found.queries, "filters": found.filters, "ms": ms.last(),
                }));
                progress.inc(1);
            }
            let mut m = serde_json::Map::new();
            for (i, &k) in p.k.iter().enumerate() {
                m.insert(
                    format!("hit_rate@{k}"),
                    json!(mean(hits[i].iter().copied())),
                );
                m.insert(format!("ndcg@{k}"), json!(mean(ndcg[i].iter().copied())));
            }
            m.insert("mrr".into(), json!(mean(rr.iter().copied())));
            if p.answers.is_some() {
                m.insert("faithfulness".into(), json!(mean(faithful.iter().copied())));
                m.insert("relevance".into(), json!(mean(relevant.iter().copied())));
                m.insert("unjudged".into(), json!(unjudged));
            }
            m.insert("mean_ms".into(), json!(mean(ms.iter().copied())));
            summary.insert(name.clone(), Value::Object(m));
        }
        let out = ctx.output_path("report");
        std::fs::create_dir_all(&out).map_err(|e| fail(e.to_string()))?;
        let metrics = json!({"questions": questions.len(), "k": p.k, "configurations": summary});
        let write = |name: &str, text: String| {
            std::fs::write(out.join(name), text).map_err(|e| fail(format!("{name}: {e}")))
        };
        write(
            "metrics.json",
            serde_json::to_string_pretty(&metrics).unwrap_or_default(),
        )?;
        write(
            "questions.jsonl",
            rows.iter().map(|r| format!("{r}\n")).collect(),
        )?;
        write("report.html", report_html(&metrics, &p.k))?;
        let best = summary
            .iter()
            .filter_map(|(n, m)| Some((n, m.get("mrr")?.as_f64()?)))
            .max_by(|a, b| a.1.partial_cmp(&b.1).unwrap_or(std::cmp::Ordering::Equal));
        let note = match best {
            Some((name, mrr)) => format!(
                "{} questions, {} configurations; best MRR {mrr:.3} ({name})",
                questions.len(),
                configurations.len()
            ),
            None => format!("{} questions", questions.len()),
        };
        ctx.single_output("report", metrics, note)
    }
}

/// Whether a retrieved chunk is the question's source: the chunk itself, its document,
/// or a document extract (`<document id>#n`) of it.
fn is_source(s: &crate::rag::Source, source: &str) -> bool {
    s.chunk_id == source
        || s.document_id == source
        || source
            .strip_prefix(s.document_id.as_str())
            .is_some_and(|rest| rest.starts_with('#') && !s.document_id.is_empty())
}

/// The report page: the metrics table and hit rate over k per configuration.
fn report_html(metrics: &Value, ks: &[usize]) -> String {
    let configs = metrics["configurations"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let mut head = String::from("<tr><th>configuration</th>");
    for k in ks {
        head.push_str(&format!("<th>hit rate@{k}</th><th>nDCG@{k}</th>"));
    }
    head.push_str("<th>MRR</th><th>mean ms</th>");
    let judged = configs.values().any(|m| m.get("faithfulness").is_some());
    if judged {
        head.push_str("<th>faithfulness</th><th>relevance</th>");
    }
    head.push_str("</tr>");
    let num = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.3}"));
    let mut body = String::new();
    let mut series = Vec::new();
    for (name, m) in &configs {
        body.push_str(&format!("<tr><td>{}</td>", esc(name)));
        for k in ks {
            body.push_str(&format!(
                "<td>{}</td><td>{}</td>",
                num(&m[format!("hit_rate@{k}")]),
                num(&m[format!("ndcg@{k}")])
            ));
        }
        body.push_str(&format!(
            "<td>{}</td><td>{}</td>",
            num(&m["mrr"]),
            num(&m["mean_ms"])
        ));
        if judged {
            body.push_str(&format!(
                "<td>{}</td><td>{}</td>",
                num(&m["faithfulness"]),
                num(&m["relevance"])
            ));
        }
        body.push_str("</tr>");
        let points: Vec<(f64, f64)> = ks
            .iter()
            .filter_map(|k| Some((*k as f64, m[format!("hit_rate@{k}")].as_f64()?)))
            .collect();
        series.push((name.as_str(), points));
    }
    format!(
        "<!doctype html><meta charset=\"utf-8\"><title>Retrieval evaluation</title>\
         <style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:4px 10px;text-align:right}}td:first-child{{text-align:left}}</style>\
         <h1>Retrieval evaluation</h1><p>{} questions</p><table>{head}{body}</table>{}",
        metrics["questions"],
        svg_chart_over("hit rate at k", "k", &series)
    )
}
