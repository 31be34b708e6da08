//! `instruct`: builds an instruction `dataset` with one of five builders (`qa`,
//! `chat_replies`, `generate`, `style_pairs`, `preference`), then applies the common
//! filters, duplicate removal and the digest split (see [`crate::dataset`]).
//!
//! The LLM builders call an OpenAI-compatible server through [`crate::llm`]; every
//! answered request is kept in the store's call cache, so rerunning after any change pays
//! only for requests never made before.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};

use super::chunk::model_content_input;
use super::{InputDecl, Kind, ParamIssue, StepContext, StepError, StepOutputs};
use crate::chunk::Chunk;
use crate::dataset::chat::{self, ChatSettings, ContextMode};
use crate::dataset::extracts::{self, Extract};
use crate::dataset::generated::{self, LlmBuilder, PromptSettings};
use crate::dataset::{self, Drops, Example, Filters, Format};
use crate::documents::{self, Document};
use crate::embed::{self, EmbedError, EmbedJob, Precision};
use crate::llm::{self, LlmError, LlmSettings};
use crate::models;

/// The `instruct` step kind.
pub struct InstructStep;

/// Which builder makes the examples.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Builder {
    /// Q&A documents -> (question, answer), one per exchange.
    Qa,
    /// Chat documents -> one example per message of the target speaker, with context.
    ChatReplies,
    /// Extracts -> LLM-generated instruction/answer pairs in the author's style.
    Generate,
    /// Extracts -> (plain LLM rewrite -> original) style-transfer pairs.
    StylePairs,
    /// Extracts -> (prompt, verbatim chosen, generated rejected) triples.
    Preference,
}

impl Builder {
    /// The name used in `builder:`.
    fn name(self) -> &'static str {
        match self {
            Builder::Qa => "qa",
            Builder::ChatReplies => "chat_replies",
            Builder::Generate => "generate",
            Builder::StylePairs => "style_pairs",
            Builder::Preference => "preference",
        }
    }

    fn llm(self) -> Option<LlmBuilder> {
        match self {
            Builder::Generate => Some(LlmBuilder::Generate),
            Builder::StylePairs => Some(LlmBuilder::StylePairs),
            Builder::Preference => Some(LlmBuilder::Preference),
            Builder::Qa | Builder::ChatReplies => None,
        }
    }
}

/// Parameters of `instruct`.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InstructParams {
    /// `qa`, `chat_replies`, `generate`, `style_pairs` or `preference`.
    pub builder: Builder,
    /// `alpaca`, `chatml`, `messages`, `sharegpt` or `preference`; default: `preference`
    /// for the preference builder, else `alpaca`.
    #[serde(default)]
    pub format: Option<Format>,
    /// Share of examples in the test split (by digest: stable when data is added).
    #[serde(default = "dataset::default_test_size")]
    pub test_size: f64,
    /// Training examples sharing a word n-gram with the test split or with a benchmark
    /// file are dropped: `{ngram: 13, benchmarks: [evals/questions.jsonl]}` (`ngram: 0`
    /// turns it off). Counted in the metadata and `dataset_info.json`.
    #[serde(default)]
    pub decontaminate: dataset::Decontamination,
    /// Fewest characters of a response.
    #[serde(default = "dataset::default_min_chars")]
    pub min_chars: usize,
    /// Most characters of a response.
    #[serde(default = "dataset::default_max_chars")]
    pub max_chars: usize,
    /// Drop examples containing any of these words (case-insensitive).
    #[serde(default)]
    pub exclude_keywords: Vec<String>,
    /// Near-duplicate threshold (Jaccard of word 5-shingles of prompt + response); 1.0
    /// keeps near duplicates.
    #[serde(default = "dataset::default_near_dup")]
    pub near_dup_threshold: f64,
    /// Instruction text: for `chat_replies` (`{speaker}` = the target; default "Reply as
    /// {speaker}.") and `style_pairs` (default "Rewrite this in the author's style.").
    #[serde(default)]
    pub instruction: Option<String>,

    /// chat_replies: whose messages become responses (default: each chat's own
    /// `target_speaker`, set at ingest).
    #[serde(default)]
    pub target_speaker: Option<String>,
    /// chat_replies: `window` or `retrieval`.
    #[serde(default = "default_context")]
    pub context: ContextMode,
    /// chat_replies: messages in the sliding window.
    #[serde(default = "default_window")]
    pub window: usize,
    /// chat_replies (retrieval): similar earlier messages kept.
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    /// chat_replies (retrieval): how many earlier messages are searched.
    #[serde(default = "default_lookback")]
    pub lookback: usize,
    /// chat_replies: speaker -> role token (others get `<USR_A>` for the target,
    /// `<USR_B>`, ... in order of appearance).
    #[serde(default)]
    pub role_tokens: BTreeMap<String, String>,
    /// chat_replies: a `<SYS>` line opening every prompt.
    #[serde(default)]
    pub system_prompt: Option<String>,
    /// chat_replies (retrieval): the embedding model (directory or HF cache id); its
    /// files are part of the cache key.
    #[serde(default = "super::embed::default_model")]
    pub model: String,
    /// chat_replies (retrieval): `auto`, `cpu`, `cuda`, `cuda:N`.
    #[serde(default = "super::embed::default_device")]
    pub device: String,

    /// LLM builders: the OpenAI-compatible server and model.
    #[serde(default)]
    pub llm: Option<LlmSettings>,
    /// generate/preference: pairs asked per extract.
    #[serde(default = "default_pairs")]
    pub pairs_per_extract: usize,
    /// LLM builders: the user-message template; must contain `{extract}` (and may use
    /// `{pairs}`, `{variant}`). Default: the builder's built-in prompt.
    #[serde(default)]
    pub prompt: Option<String>,
    /// LLM builders: the system message (default: a JSON-only instruction for
    /// generate/preference, none for style_pairs).
    #[serde(default)]
    pub system: Option<String>,
    /// style_pairs: how the LLM rewrites each extract plainly; one request per variant.
    #[serde(default = "generated::default_variants")]
    pub variants: Vec<String>,
    /// LLM builders fed `documents`: extracts of at least this many characters...
    #[serde(default = "default_extract_min")]
    pub extract_min_chars: usize,
    /// ...and at most this many (sentence-packed).
    #[serde(default = "default_extract_max")]
    pub extract_max_chars: usize,
    /// LLM builders: use only the first N extracts (a cheap first try).
    #[serde(default)]
    pub limit: Option<usize>,
    /// LLM builders: print the first prompts and the projected calls, tokens and cost,
    /// and stop without calling.
    #[serde(default)]
    pub dry_run: bool,
}

fn default_context() -> ContextMode {
    ContextMode::Window
}
fn default_window() -> usize {
    6
}
fn default_top_k() -> usize {
    4
}
fn default_lookback() -> usize {
    50
}
fn default_pairs() -> usize {
    3
}
fn default_extract_min() -> usize {
    1000
}
fn default_extract_max() -> usize {
    2000
}

impl InstructParams {
    fn format(&self) -> Format {
        self.format
            .unwrap_or(if self.builder == Builder::Preference {
                Format::Preference
            } else {
                Format::Alpaca
            })
    }

    fn filters(&self) -> Filters {
        Filters {
            min_chars: self.min_chars,
            max_chars: self.max_chars,
            exclude_keywords: self.exclude_keywords.clone(),
            near_dup_threshold: self.near_dup_threshold,
        }
    }

    fn issues(&self) -> Vec<ParamIssue> {
        let mut out = ParamIssue::under("with.decontaminate", self.decontaminate.problems());
        let format = self.format();
        if (format == Format::Preference) != (self.builder == Builder::Preference) {
            out.push(ParamIssue::new(
                "with.format",
                format!(
                    "format `{}` does not fit builder `{}`: preference data (prompt/chosen/rejected) comes only from the `preference` builder, which writes only the `preference` format",
                    format.as_str(),
                    self.builder.name()
                ),
            ));
        }
        if !(0.0..1.0).contains(&self.test_size) {
            out.push(ParamIssue::new(
                "with.test_size",
                format!("test_size {} is outside 0 (inclusive) .. 1", self.test_size),
            ));
        }
        if !(0.0..=1.0).contains(&self.near_dup_threshold) {
            out.push(ParamIssue::new(
                "with.near_dup_threshold",
                format!(
                    "near_dup_threshold {} is outside 0..=1",
                    self.near_dup_threshold
                ),
            ));
        }
        if self.min_chars > self.max_chars {
            out.push(ParamIssue::new(
                "with.min_chars",
                format!(
                    "min_chars {} exceeds max_chars {}",
                    self.min_chars, self.max_chars
                ),
            ));
        }
        if self.builder == Builder::ChatReplies {
            if self.window == 0 {
                out.push(ParamIssue::new("with.window", "window must be at least 1"));
            }
            if self.context == ContextMode::Retrieval && (self.top_k == 0 || self.lookback == 0) {
                out.push(ParamIssue::new(
                    "with.top_k",
                    "retrieval context needs top_k and lookback of at least 1",
                ));
            }
            if let Err(e) = self.device.parse::<embed::DeviceChoice>() {
                out.push(ParamIssue::new("with.device", e));
            }
        }
        if let Some(kind) = self.builder.llm() {
            match &self.llm {
                None => out.push(ParamIssue {
                    path: "with.llm".into(),
                    message: format!("builder `{}` calls an LLM: add an `llm:` block", kind.name()),
                    help: Some("e.g. llm: {base_url: \"http://127.0.0.1:11434/v1\", model: llama3.1} (Ollama); see README \"LLM servers\"".into()),
                }),
                Some(s) => out.extend(
                    s.issues()
                        .into_iter()
                        .map(|(field, msg)| ParamIssue::new(format!("with.llm.{field}"), msg)),
                ),
            }
            if let Some(t) = &self.prompt {
                if !t.contains("{extract}") {
                    out.push(ParamIssue::new(
                        "with.prompt",
                        "the prompt template must contain `{extract}`",
                    ));
                }
            }
            if self.pairs_per_extract == 0 {
                out.push(ParamIssue::new(
                    "with.pairs_per_extract",
                    "pairs_per_extract must be at least 1",
                ));
            }
            if kind == LlmBuilder::StylePairs && self.variants.is_empty() {
                out.push(ParamIssue::new(
                    "with.variants",
                    "style_pairs needs at least one variant",
                ));
            }
            if self.extract_min_chars > self.extract_max_chars {
                out.push(ParamIssue::new(
                    "with.extract_min_chars",
                    "extract_min_chars exceeds extract_max_chars",
                ));
            }
        } else if self.llm.is_some() {
            out.push(ParamIssue::new(
                "with.llm",
                format!(
                    "builder `{}` makes no LLM calls; remove `llm`",
                    self.builder.name()
                ),
            ));
        }
        out
    }
}

#[async_trait]
impl Kind for InstructStep {
    type Params = InstructParams;
    const OUTPUTS: &'static [(&'static str, &'static str)] = &[("dataset", dataset::KIND)];

    fn name(&self) -> &'static str {
        "instruct"
    }

    fn version(&self) -> String {
        // 2: MinHash bands that find near-duplicates at the threshold (see band_layout).
        // 3: one-permutation MinHash signatures over word-hash shingles.
        "3".into()
    }

    fn summary(&self) -> &'static str {
        "Build an instruction `dataset` (qa, chat_replies, or LLM-made generate/style_pairs/preference) with train/test splits"
    }

    fn inputs(&self) -> Option<Vec<InputDecl>> {
        Some(vec![
            InputDecl {
                name: "documents".into(),
                kind: documents::KIND.into(),
                required: false,
            },
            InputDecl {
                name: "chunks".into(),
                kind: crate::chunk::KIND.into(),
                required: false,
            },
        ])
    }

    fn content_inputs(
        &self,
        params: &Self::Params,
        cwd: &Path,
    ) -> Result<Vec<(String, PathBuf)>, String> {
        let retrieval =
            params.builder == Builder::ChatReplies && params.context == ContextMode::Retrieval;
        let mut inputs = if retrieval {
            model_content_input(&params.model, cwd)?
        } else {
            Vec::new()
        };
        inputs.extend(params.decontaminate.benchmark_inputs(cwd));
        Ok(inputs)
    }

    fn validate(&self, p: &InstructParams) -> Vec<ParamIssue> {
        p.issues()
    }

    /// Q&A and chat builders read documents; the LLM builders read chunks or documents.
    fn bound_inputs(&self, p: &InstructParams) -> Option<Vec<InputDecl>> {
        let mut inputs = self.inputs().unwrap_or_default();
        if p.builder.llm().is_none() {
            inputs.retain(|i| i.name == "documents");
            inputs[0].required = true;
        }
        Some(inputs)
    }

    async fn run(&self, p: &InstructParams, ctx: &StepContext) -> Result<StepOutputs, StepError> {
        let mut drops = Drops::default();
        let mut extra = json!({});
        let examples = match p.builder {
            Builder::Qa => {
                let docs: Vec<Document> = documents::read_jsonl(&ctx.input_path("documents")?)
                    .map_err(StepError::Failed)?;
                qa_examples(&docs, &mut drops)
            }
            Builder::ChatReplies => chat_examples(ctx, p, &mut drops, &mut extra).await?,
            Builder::Generate | Builder::StylePairs | Builder::Preference => {
                llm_examples(ctx, p, &mut drops, &mut extra).await?
            }
        };
        let produced = examples.len();
        let filters = p.filters();
        let format = p.format();
        let kept = dataset::filter(examples, &filters, &mut drops);
        let (dropped, samples) = drops.to_json();
        let sources: BTreeMap<&String, String> = ctx
            .inputs
            .iter()
            .map(|(n, a)| (n, a.digest.to_string()))
            .collect();
        let mut info = json!({
            "builder": p.builder.name(),
            "sources": sources,
            "produced": produced,
            "dropped": dropped,
        });
        if let (Some(i), Value::Object(e)) = (info.as_object_mut(), extra.clone()) {
            i.extend(e);
        }
        let out = ctx.output_path("dataset");
        let test_size = p.test_size;
        let ngram = p.decontaminate.ngram;
        let benchmarks = p
            .decontaminate
            .read_benchmarks(|path| ctx.resolve_path(&path.to_string_lossy()))
            .map_err(StepError::Input)?;
        let written = {
            let kept = kept.clone();
            let info = info.clone();
            tokio::task::spawn_blocking(move || {
                dataset::write(&out, &kept, format, test_size, info, (ngram, &benchmarks))
            })
            .await
            .map_err(|e| StepError::Failed(format!("writing the dataset panicked: {e}")))?
            .map_err(StepError::Failed)?
        };
        let note = format!(
            "{} examples ({} train / {} test) from {produced} built, {} dropped{}{}",
            written.train + written.test,
            written.train,
            written.test,
            drops.total(),
            match written.contaminated.with_test + written.contaminated.with_benchmarks {
                0 => String::new(),
                n => format!(", {n} left out of train by decontamination"),
            },
            extra
                .get("llm")
                .map(|l| format!(
                    "; LLM: {} calls, {} cached, ${:.4}",
                    l["calls"],
                    l["cached_calls"],
                    l["cost_usd"].as_f64().unwrap_or(0.0)
                ))
                .unwrap_or_default()
        );
        let mut meta = json!({
            "builder": p.builder.name(),
            "format": format.as_str(),
            "decontamination": written.contaminated,
            "count": written.train + written.test,
            "train": written.train,
            "test": written.test,
            "counts": written.counts,
            "produced": produced,
            "dropped": dropped,
            "drop_samples": samples,
        });
        if let (Some(m), Value::Object(e)) = (meta.as_object_mut(), extra) {
            m.extend(e);
        }
        ctx.single_output("dataset", meta, note)
    }
}

/// `qa`: one example per exchange. The (cleaned) content is parsed again so cleaning
/// applies; the exchange ingest stored in the metadata is the fallback.
fn qa_examples(docs: &[Document], drops: &mut Drops) -> Vec<Example> {
    let mut out = Vec::new();
    for doc in docs {
        let mut exchanges = crate::ingest::qa::parse(&doc.content).exchanges;
        if exchanges.is_empty() {
            let q = doc.metadata.get("question").and_then(Value::as_str);
            let a = doc.metadata.get("answer").and_then(Value::as_str);
            if let (Some(q), Some(a)) = (q, a) {
                exchanges.push(crate::ingest::qa::Exchange {
                    question: q.into(),
                    answer: a.into(),
                });
            }
        }
        if exchanges.is_empty() {
            drops.drop(
                "document has no QUESTION:/ANSWER: exchange",
                doc.url.clone(),
            );
            continue;
        }
        for (i, x) in exchanges.into_iter().enumerate() {
            out.push(Example {
                builder: "qa".into(),
                category: doc.category.as_str().into(),
                source: if i == 0 {
                    doc.id.clone()
                } else {
                    format!("{}#{}", doc.id, i + 1)
                },
                instruction: x.question,
                input: String::new(),
                output: x.answer,
                rejected: None,
                judge: None,
            });
        }
    }
    out
}

async fn chat_examples(
    ctx: &StepContext,
    p: &InstructParams,
    drops: &mut Drops,
    extra: &mut Value,
) -> Result<Vec<Example>, StepError> {
    let docs: Vec<Document> =
        documents::read_jsonl(&ctx.input_path("documents")?).map_err(StepError::Failed)?;
    let convs = chat::conversations(&docs, p.target_speaker.as_deref(), drops);
    let settings = ChatSettings {
        target_speaker: p.target_speaker.clone(),
        window: p.window,
        context: p.context,
        top_k: p.top_k,
        lookback: p.lookback,
        role_tokens: p.role_tokens.clone(),
        system_prompt: p.system_prompt.clone(),
        instruction: p
            .instruction
            .clone()
            .unwrap_or_else(|| "Reply as {speaker}.".into()),
    };
    let mut vectors: Option<(usize, Vec<f32>)> = None;
    if p.context == ContextMode::Retrieval {
        vectors = Some(embed_messages(ctx, p, &convs, extra).await?);
    }
    let mut out = Vec::new();
    let mut offset = 0;
    let mut tokens = BTreeMap::new();
    for conv in &convs {
        let n = conv.messages.len();
        let refs: Option<Vec<&[f32]>> = vectors.as_ref().map(|(dim, v)| {
            (offset..offset + n)
                .map(|i| &v[i * dim..(i + 1) * dim])
                .collect()
        });
        offset += n;
        out.extend(chat::build(conv, &settings, refs.as_deref(), drops));
        tokens.extend(chat::role_tokens(conv, &settings.role_tokens));
    }
    extra["role_tokens"] = json!(tokens);
    extra["context"] = json!(p.context);
    Ok(out)
}

/// Embeds every message of every conversation (in order) with the `cairn-torch` helper.
async fn embed_messages(
    ctx: &StepContext,
    p: &InstructParams,
    convs: &[chat::Conversation],
    extra: &mut Value,
) -> Result<(usize, Vec<f32>), StepError> {
    let model = models::resolve(&p.model, &ctx.cwd).map_err(|e| StepError::Input(e.to_string()))?;
    let input = ctx.work_dir.join("messages.jsonl");
    let lines: Vec<Value> = convs
        .iter()
        .flat_map(|c| c.messages.iter().map(|m| json!({"text": m.text})))
        .collect();
    documents::write_jsonl(&input, &lines).map_err(|e| StepError::Failed(e.to_string()))?;
    let job = EmbedJob {
        model: model.clone(),
        device: p.device.clone(),
        precision: Precision::Auto,
        batch_size: 64,
        threads: 0,
        input,
        output: ctx.work_dir.join("messages.safetensors"),
    };
    let progress = ctx.progress.clone();
    progress.set_message("embedding messages for retrieval context");
    progress.set_length(lines.len() as u64);
    let mut last = 0;
    let outcome = embed::worker::run(
        &job,
        &mut |_| {},
        &mut |done| {
            progress.inc(done.saturating_sub(last));
            last = done;
        },
        &ctx.cancel,
    )
    .await
    .map_err(|e| match e {
        EmbedError::Cancelled => StepError::Cancelled,
        other => StepError::Failed(format!("embedding chat messages: {other}")),
    })?;
    let (rows, dim, data) = embed::read_tensor(&job.output).map_err(StepError::Failed)?;
    if rows != lines.len() {
        return Err(StepError::Failed(format!(
            "expected {} message vectors, got {rows}",
            lines.len()
        )));
    }
    extra["retrieval_model"] = json!(models::display_name_for(&p.model, &model));
    extra["retrieval_device"] = json!(outcome.info.device);
    Ok((dim, data))
}

async fn llm_examples(
    ctx: &StepContext,
    p: &InstructParams,
    drops: &mut Drops,
    extra: &mut Value,
) -> Result<Vec<Example>, StepError> {
    let kind = p.builder.llm().expect("an LLM builder");
    let mut extracts: Vec<Extract> = if let Some(input) = ctx.inputs.get("chunks") {
        let chunks: Vec<Chunk> = documents::read_jsonl(&input.path).map_err(StepError::Failed)?;
        extracts::from_chunks(&chunks)
    } else if let Some(input) = ctx.inputs.get("documents") {
        let docs: Vec<Document> = documents::read_jsonl(&input.path).map_err(StepError::Failed)?;
        extracts::from_documents(&docs, p.extract_min_chars, p.extract_max_chars)
    } else {
        return Err(StepError::Failed(format!(
            "builder `{}` needs a `chunks` or `documents` input",
            kind.name()
        )));
    };
    if let Some(limit) = p.limit {
        extracts.truncate(limit);
    }
    let settings = p.llm.clone().unwrap_or_default();
    let prompts = PromptSettings {
        builder: kind,
        template: p
            .prompt
            .clone()
            .unwrap_or_else(|| kind.default_prompt().into()),
        system: p
            .system
            .clone()
            .or_else(|| kind.json().then(|| generated::SYSTEM_JSON.to_string())),
        pairs_per_extract: p.pairs_per_extract,
        variants: p.variants.clone(),
        style_instruction: p
            .instruction
            .clone()
            .unwrap_or_else(|| "Rewrite this in the author's style.".into()),
    };
    let requests = generated::requests(&extracts, &prompts);
    let client = Arc::new(
        llm::Client::new(settings.clone(), Some(ctx.store.root()))
            .map_err(|e| StepError::Failed(e.to_string()))?,
    );
    let json_reply = kind.json();
    if p.dry_run {
        return Err(StepError::Failed(dry_run_report(
            &client, &requests, json_reply,
        )));
    }
    let progress = ctx.progress.clone();
    progress.set_length(requests.len() as u64);
    progress.set_message(format!("{} via {}", settings.model, settings.base_url));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, r) in requests.iter().enumerate() {
        let client = client.clone();
        let messages = r.messages.clone();
        let cancel = ctx.cancel.clone();
        tasks.spawn(async move { (i, client.chat(&messages, json_reply, &cancel).await) });
    }
    let mut replies = vec![None; requests.len()];
    while let Some(joined) = tasks.join_next().await {
        let (i, reply) =
            joined.map_err(|e| StepError::Failed(format!("LLM task panicked: {e}")))?;
        match reply {
            Ok(r) => replies[i] = Some(r),
            Err(LlmError::Cancelled) => return Err(StepError::Cancelled),
            Err(e) => {
                tasks.abort_all();
                let t = client.totals();
                return Err(StepError::Failed(format!(
                    "{e}\n{} calls answered before this one are cached: a rerun pays only for the rest",
                    t.calls
                )));
            }
        }
        progress.inc(1);
        let t = client.totals();
        progress.set_message(format!(
            "{} calls, {} cached, {} tokens, ${:.4}",
            t.calls,
            t.cached_calls,
            t.prompt_tokens + t.completion_tokens,
            t.cost_usd
        ));
    }
    let mut out = Vec::new();
    for (r, reply) in requests.iter().zip(replies) {
        if let Some(reply) = reply {
            out.extend(generated::parse(
                &prompts,
                &extracts[r.extract],
                &reply,
                drops,
            ));
        }
    }
    let totals = client.totals();
    let mut llm_meta = serde_json::to_value(&totals).unwrap_or_default();
    llm_meta["model"] = json!(settings.model);
    llm_meta["base_url"] = json!(settings.base_url);
    llm_meta["requests"] = json!(requests.len());
    llm_meta["extracts"] = json!(extracts.len());
    extra["llm"] = llm_meta;
    Ok(out)
}

fn dry_run_report(
    client: &llm::Client,
    requests: &[generated::Request],
    json_reply: bool,
) -> String {
    let s = client.settings();
    let new: Vec<&generated::Request> = requests
        .iter()
        .filter(|r| !client.is_cached(&r.messages, json_reply))
        .collect();
    let cached = requests.len() - new.len();
    let prompt_tokens: u64 = new
        .iter()
        .map(|r| {
            r.messages
                .iter()
                .map(|m| m.content.len() as u64 / 4)
                .sum::<u64>()
        })
        .sum();
    let completion_tokens = new.len() as u64 * s.max_tokens as u64;
    let cost = s.cost(&llm::Usage {
        prompt_tokens,
        completion_tokens,
    });
    let mut text = format!(
        "dry run: {} requests to {} at {} ({cached} already cached, {} to pay): about {prompt_tokens} prompt tokens + up to {completion_tokens} completion tokens, at most ${cost:.4} at the configured prices. Nothing was sent; set dry_run: false to make the calls.",
        requests.len(),
        s.model,
        s.base_url,
        new.len()
    );
    for (i, r) in requests.iter().take(2).enumerate() {
        text.push_str(&format!("\n--- prompt {} of {} ---", i + 1, requests.len()));
        for m in &r.messages {
            let body: String = m.content.chars().take(1200).collect();
            let more = if m.content.chars().count() > 1200 {
                " [...]"
            } else {
                ""
            };
            text.push_str(&format!("\n[{}] {body}{more}", m.role));
        }
    }
    text
}
