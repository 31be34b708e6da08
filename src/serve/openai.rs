//! The OpenAI-compatible HTTP API: `/v1/chat/completions` (streamed as server-sent
//! events or whole), `/v1/completions`, `/v1/embeddings`, `/v1/models` and `/health`.
//! Requests are read as OpenAI's clients send them; what cairn does not support (`n` >
//! 1, log-probabilities, tools, penalties other than `repetition_penalty`) is refused
//! with a 400 in OpenAI's error format naming the parameter, never silently ignored.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::ServeState;
use crate::inference::protocol::{FailureKind, FinishReason, Prompt, WorkerEvent, WorkerRequest};
use crate::inference::worker::{QueueError, Ticket};
use crate::ml::job::GenerationSettings;
use crate::ml::template::Role;

/// An error as OpenAI's API sends it: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn invalid(param: Option<&'static str>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param,
            code: None,
        }
    }

    fn unsupported(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            code: Some("unsupported_parameter"),
            ..Self::invalid(Some(param), message)
        }
    }

    fn json(&self) -> Value {
        let kind = match self.status {
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::NOT_FOUND => "invalid_request_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        };
        json!({"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.json())).into_response()
    }
}

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> Self {
        let status = match e {
            QueueError::Full(_) => StatusCode::TOO_MANY_REQUESTS,
            QueueError::WorkerGone => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self {
            status,
            message: e.to_string(),
            param: None,
            code: None,
        }
    }
}

fn failed(kind: FailureKind, message: String) -> ApiError {
    let context = kind == FailureKind::ContextLength;
    ApiError {
        status: match kind {
            FailureKind::Invalid | FailureKind::ContextLength => StatusCode::BAD_REQUEST,
            FailureKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        },
        message,
        param: context.then_some("messages"),
        code: context.then_some("context_length_exceeded"),
    }
}

/// The routes, over `state`.
pub fn routes(state: Arc<ServeState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                message: "no such endpoint; cairn serve has /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models and /health".into(),
                param: None,
                code: Some("unknown_url"),
            }
        })
        .layer(
            // Browser pages on other origins (the chat page of `cairn ui`) call the API,
            // as they may call vLLM's or llama.cpp's.
            tower_http::cors::CorsLayer::new()
                .allow_origin(tower_http::cors::Any)
                .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
                .allow_headers([
                    axum::http::header::CONTENT_TYPE,
                    axum::http::header::AUTHORIZATION,
                ]),
        )
        .with_state(state)
}

async fn health(State(state): State<Arc<ServeState>>) -> Response {
    let w = &state.worker;
    let body = json!({
        "status": if w.alive() { "ok" } else { "worker stopped" },
        "device": w.device,
        "models": w.model_names(),
        "in_flight": w.in_flight(),
    });
    let status = if w.alive() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn models(State(state): State<Arc<ServeState>>) -> Json<Value> {
    let mut data: Vec<Value> = state
        .worker
        .models
        .iter()
        .map(|m| {
            json!({"id": m.name, "object": "model", "created": state.created, "owned_by": "cairn",
                   "cairn": {"arch": m.arch, "context": m.context, "template": m.template}})
        })
        .collect();
    if let (Some(name), Some(dim)) = (&state.embedder_name, state.worker.embedding_dim) {
        data.push(
            json!({"id": name, "object": "model", "created": state.created, "owned_by": "cairn",
                         "cairn": {"embedding_dim": dim}}),
        );
    }
    Json(json!({"object": "list", "data": data}))
}

/// A JSON body, parse errors answered in OpenAI's format (with line and column).
fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(
            None,
            format!("We could not parse the JSON body of your request: {e}"),
        )
    })
}

/// `stop`: one string or a list.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// Message content: a string or a list of parts (only text parts).
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Value>),
}

#[derive(Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Sampling parameters shared by chat and completions (plus cairn's `top_k` and
/// `repetition_penalty`), and what is refused.
#[derive(Deserialize)]
struct Sampling {
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    repetition_penalty: Option<f64>,
    stop: Option<Stop>,
    seed: Option<u64>,
    n: Option<u64>,
    logprobs: Option<Value>,
    top_logprobs: Option<u64>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    tools: Option<Value>,
    response_format: Option<Value>,
    best_of: Option<u64>,
    echo: Option<bool>,
    suffix: Option<String>,
}

impl Sampling {
    /// The worker's settings (defaults as `cairn generate`'s), or the parameter refused.
    fn settings(&self) -> Result<GenerationSettings, ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::unsupported(
                "n",
                "cairn serve returns one choice per request: send n=1 (or leave it out) and repeat the request for more",
            ));
        }
        if self
            .logprobs
            .as_ref()
            .is_some_and(|v| !matches!(v, Value::Null | Value::Bool(false)))
            || self.top_logprobs.is_some_and(|n| n > 0)
        {
            return Err(ApiError::unsupported(
                "logprobs",
                "cairn serve does not return log-probabilities",
            ));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if v.is_some_and(|v| v != 0.0) {
                return Err(ApiError::unsupported(
                    if name == "presence_penalty" {
                        "presence_penalty"
                    } else {
                        "frequency_penalty"
                    },
                    format!("{name} is not supported; use repetition_penalty (> 1 discourages repeats, as in transformers)"),
                ));
            }
        }
        if self.tools.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(ApiError::unsupported(
                "tools",
                "cairn serve does not call tools",
            ));
        }
        if self
            .response_format
            .as_ref()
            .is_some_and(|v| !v.is_null() && v.get("type").and_then(Value::as_str) != Some("text"))
        {
            return Err(ApiError::unsupported(
                "response_format",
                "cairn serve only returns text (response_format {\"type\": \"text\"})",
            ));
        }
        if self.best_of.is_some_and(|n| n != 1) {
            return Err(ApiError::unsupported("best_of", "best_of must be 1"));
        }
        if self.echo == Some(true) {
            return Err(ApiError::unsupported("echo", "echo is not supported"));
        }
        if self.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::unsupported("suffix", "suffix is not supported"));
        }
        let mut g = GenerationSettings::default();
        if let Some(n) = self.max_completion_tokens.or(self.max_tokens) {
            if n == 0 {
                return Err(ApiError::invalid(
                    Some("max_tokens"),
                    "max_tokens must be at least 1",
                ));
            }
            g.max_new_tokens = n as usize;
        }
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(ApiError::invalid(
                    Some("temperature"),
                    format!("temperature {t} is outside 0..2"),
                ));
            }
            g.temperature = t;
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(ApiError::invalid(
                    Some("top_p"),
                    format!("top_p {p} is outside (0, 1]"),
                ));
            }
            g.top_p = p;
        }
        if let Some(k) = self.top_k {
            if k < 0 {
                return Err(ApiError::invalid(
                    Some("top_k"),
                    "top_k must be >= 0 (0: all tokens)",
                ));
            }
            g.top_k = k;
        }
        if let Some(r) = self.repetition_penalty {
            if r <= 0.0 {
                return Err(ApiError::invalid(
                    Some("repetition_penalty"),
                    "repetition_penalty must be > 0 (1: off)",
                ));
            }
            g.repetition_penalty = r;
        }
        g.stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        g.stop.retain(|s| !s.is_empty());
        if let Some(seed) = self.seed {
            g.seed = seed;
        }
        Ok(g)
    }
}

#[derive(Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<Message>,
    /// cairn's extension: `false` answers without retrieval on a server started with
    /// `--rag`.
    #[serde(default)]
    rag: Option<bool>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PromptInput {
    One(String),
    Many(Vec<Value>),
}

#[derive(Deserialize)]
struct CompletionRequest {
    model: String,
    prompt: PromptInput,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(flatten)]
    sampling: Sampling,
}

fn turns(messages: &[Message]) -> Result<Vec<(Role, String)>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            Some("messages"),
            "messages is empty: send at least one user message",
        ));
    }
    let mut out = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => {
                return Err(ApiError::invalid(
                    Some("messages"),
                    format!("messages[{i}].role {other:?} is not supported (system, developer, user, assistant)"),
                ))
            }
        };
        let text = match &m.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (
                        p.get("type").and_then(Value::as_str),
                        p.get("text").and_then(Value::as_str),
                    ) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        (kind, _) => {
                            return Err(ApiError::invalid(
                                Some("messages"),
                                format!(
                                    "messages[{i}]: content part of type {} is not supported (text only)",
                                    kind.unwrap_or("?")
                                ),
                            ))
                        }
                    }
                }
                text
            }
        };
        out.push((role, text));
    }
    Ok(out)
}

fn known_model(state: &ServeState, model: &str) -> Result<(), ApiError> {
    if state.worker.models.iter().any(|m| m.name == model) {
        return Ok(());
    }
    Err(ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!(
            "The model `{model}` does not exist; this server has {}",
            state.worker.model_names().join(", ")
        ),
        param: Some("model"),
        code: Some("model_not_found"),
    })
}

/// Which API shape a generation answers in.
#[derive(Clone, Copy)]
enum Shape {
    Chat,
    Completion,
}

impl Shape {
    fn object(self, chunk: bool) -> &'static str {
        match (self, chunk) {
            (Shape::Chat, false) => "chat.completion",
            (Shape::Chat, true) => "chat.completion.chunk",
            (Shape::Completion, _) => "text_completion",
        }
    }

    fn id_prefix(self) -> &'static str {
        match self {
            Shape::Chat => "chatcmpl",
            Shape::Completion => "cmpl",
        }
    }

    /// One choice carrying `text`: a message or delta for chat, `text` for completions.
    fn choice(
        self,
        text: Option<&str>,
        first: bool,
        finish: Option<FinishReason>,
        chunk: bool,
    ) -> Value {
        let reason = finish.map(|f| match f {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        });
        match self {
            Shape::Chat if chunk => {
                let mut delta = json!({});
                if first {
                    delta["role"] = json!("assistant");
                }
                if let Some(t) = text {
                    delta["content"] = json!(t);
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": reason})
            }
            Shape::Chat => {
                json!({"index": 0, "message": {"role": "assistant", "content": text.unwrap_or_default()},
                                 "logprobs": null, "finish_reason": reason})
            }
            Shape::Completion => {
                json!({"index": 0, "text": text.unwrap_or_default(), "logprobs": null,
                                       "finish_reason": reason})
            }
        }
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

async fn chat(State(state): State<Arc<ServeState>>, body: Bytes) -> Result<Response, ApiError> {
    let req: ChatRequest = parse(&body)?;
    let settings = req.sampling.settings()?;
    let turns = turns(&req.messages)?;
    known_model(&state, &req.model)?;
    let include_usage = req.stream_options.unwrap_or_default().include_usage;
    let mut alternatives = Vec::new();
    if let (Some(retriever), true) = (&state.rag, req.rag.unwrap_or(true)) {
        let Some(last) = turns.iter().rposition(|t| t.0 == Role::User) else {
            return Err(ApiError::invalid(
                Some("messages"),
                "retrieval answers the last user message; the messages have none",
            ));
        };
        let question = turns[last].1.clone();
        let t0 = Instant::now();
        let retrieval = retriever
            .retrieve(&question, &state.worker, crate::rag::Stages::default())
            .await
            .map_err(|e| ApiError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                message: format!("retrieval failed: {e}"),
                param: None,
                code: Some("retrieval_failed"),
            })?;
        let mut timings = json!(retrieval.timings_ms);
        timings["total"] = json!(t0.elapsed().as_secs_f64() * 1e3);
        // All the sources in the prompt, then fewer (the lowest ranked left out first)
        // when it does not fit the model's context, down to the question alone; the
        // answer lists every source retrieved and says how many it used.
        let sources: Vec<Value> = retrieval
            .sources
            .iter()
            .map(|s| {
                json!({"id": s.id, "collection": s.collection, "url": s.url, "title": s.title,
                       "score": s.rerank.map_or(s.fused, f64::from), "fused": s.fused,
                       "rerank": s.rerank, "similarity": s.similarity,
                       "text": s.text.chars().take(500).collect::<String>()})
            })
            .collect();
        let found = sources.len();
        for keep in (0..=found).rev() {
            let mut kept = retrieval.clone();
            kept.sources.truncate(keep);
            let mut variant = turns.clone();
            if keep > 0 {
                variant[last].1 = retriever.prompt(&question, &kept);
            }
            let extra = json!({"sources": sources, "sources_used": keep,
                               "queries": retrieval.queries, "filters": retrieval.filters,
                               "retrieval_ms": timings});
            alternatives.push((Prompt::Messages(variant), Some(extra)));
        }
    } else {
        alternatives.push((Prompt::Messages(turns), None));
    }
    let recording = Recording::of(&state, "chat", &body);
    generate(
        state,
        Shape::Chat,
        req.model,
        alternatives,
        settings,
        req.stream,
        include_usage,
        recording,
    )
    .await
}

async fn completions(
    State(state): State<Arc<ServeState>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse(&body)?;
    let settings = req.sampling.settings()?;
    let prompt = match req.prompt {
        PromptInput::One(s) => s,
        PromptInput::Many(list) => match list.as_slice() {
            [Value::String(s)] => s.clone(),
            _ => {
                return Err(ApiError::unsupported(
                    "prompt",
                    "prompt must be one string (token-id prompts and batches of prompts are not supported)",
                ))
            }
        },
    };
    known_model(&state, &req.model)?;
    let include_usage = req.stream_options.unwrap_or_default().include_usage;
    let recording = Recording::of(&state, "completion", &body);
    generate(
        state,
        Shape::Completion,
        req.model,
        vec![(Prompt::Text(prompt), None)],
        settings,
        req.stream,
        include_usage,
        recording,
    )
    .await
}

/// Queues a generation and answers whole or as a stream. The first event is awaited
/// before answering, so a prompt the model cannot take is a 400, not a broken stream.
/// `extra` (retrieval's sources and timings) joins the `cairn` field of the answer (of
/// the last chunk when streaming).
#[allow(clippy::too_many_arguments)]
async fn generate(
    state: Arc<ServeState>,
    shape: Shape,
    model: String,
    alternatives: Vec<(Prompt, Option<Value>)>,
    settings: GenerationSettings,
    stream: bool,
    include_usage: bool,
    recording: Option<Recording>,
) -> Result<Response, ApiError> {
    let t0 = Instant::now();
    let mut alternatives = alternatives.into_iter().peekable();
    // The first prompt that fits the model's context (retrieval offers shorter ones).
    let (mut ticket, extra) = loop {
        let Some((prompt, extra)) = alternatives.next() else {
            return Err(QueueError::WorkerGone.into());
        };
        let mut ticket = state.worker.submit(|id| WorkerRequest::Generate {
            id,
            model: model.clone(),
            prompt,
            settings: settings.clone(),
        })?;
        match ticket.next().await {
            Some(WorkerEvent::Started { .. }) => break (ticket, extra),
            Some(WorkerEvent::Failed { kind, message, .. }) => {
                if kind == FailureKind::ContextLength && alternatives.peek().is_some() {
                    continue;
                }
                Recording::failure(recording, t0, &message);
                return Err(failed(kind, message));
            }
            _ => return Err(QueueError::WorkerGone.into()),
        }
    };
    let id = format!("{}-{}", shape.id_prefix(), state.next_response_id());
    let created = now();
    // The worker says `started` once the first token is chosen.
    let first_token_ms = t0.elapsed().as_secs_f64() * 1e3;
    if stream {
        return Ok(stream_response(
            ticket,
            shape,
            StreamInfo {
                id,
                model,
                created,
                include_usage,
                t0,
                extra,
                recording,
            },
        ));
    }
    loop {
        match ticket.next().await {
            Some(WorkerEvent::Done {
                text,
                prompt_tokens,
                completion_tokens,
                finish_reason,
                ..
            }) => {
                let total_ms = t0.elapsed().as_secs_f64() * 1e3;
                let mut cairn =
                    json!({"timings_ms": {"first_token": first_token_ms, "total": total_ms}});
                merge(&mut cairn, extra);
                let body = json!({
                    "id": id, "object": shape.object(false), "created": created, "model": model,
                    "choices": [shape.choice(Some(&text), true, Some(finish_reason), false)],
                    "usage": usage(prompt_tokens, completion_tokens),
                    "cairn": cairn,
                });
                if let Some(r) = recording {
                    r.save(body.clone(), t0, None);
                }
                return Ok(Json(body).into_response());
            }
            Some(WorkerEvent::Failed { kind, message, .. }) => {
                Recording::failure(recording, t0, &message);
                return Err(failed(kind, message));
            }
            Some(_) => {}
            None => return Err(QueueError::WorkerGone.into()),
        }
    }
}

/// A request to file in the store once answered (`--record`).
struct Recording {
    recorder: Arc<super::record::Recorder>,
    kind: &'static str,
    request: Value,
}

impl Recording {
    /// The request's record, when the server records: `body` parsed again as plain JSON.
    fn of(state: &ServeState, kind: &'static str, body: &Bytes) -> Option<Self> {
        let recorder = state.recorder.clone()?;
        Some(Self {
            recorder,
            kind,
            request: serde_json::from_slice(body).unwrap_or(Value::Null),
        })
    }

    /// Files a request the worker refused or failed, when recording.
    fn failure(recording: Option<Self>, t0: Instant, message: &str) {
        if let Some(r) = recording {
            r.save(Value::Null, t0, Some(message.to_string()));
        }
    }

    /// Files the request with its answer (or error) off the async threads.
    fn save(self, answer: Value, t0: Instant, error: Option<String>) {
        let ms = t0.elapsed().as_millis() as u64;
        tokio::task::spawn_blocking(move || {
            if let Err(e) = self
                .recorder
                .record(self.kind, &self.request, &answer, ms, error)
            {
                tracing::warn!("recording a served request: {e}");
            }
        });
    }
}

/// The keys of `extra` (an object) added to `into`.
fn merge(into: &mut Value, extra: Option<Value>) {
    if let (Some(Value::Object(extra)), Value::Object(into)) = (extra, into) {
        into.extend(extra);
    }
}

/// What every chunk of a stream repeats, and what its last one adds.
struct StreamInfo {
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    t0: Instant,
    extra: Option<Value>,
    recording: Option<Recording>,
}

fn stream_response(ticket: Ticket, shape: Shape, info: StreamInfo) -> Response {
    let StreamInfo {
        id,
        model,
        created,
        include_usage,
        t0,
        extra,
        recording,
    } = info;
    struct Stream {
        ticket: Ticket,
        first: bool,
        ended: bool,
        recording: Option<Recording>,
    }
    let chunk = move |choices: Value, usage_value: Option<Value>| {
        let mut v = json!({"id": id, "object": shape.object(true), "created": created, "model": model,
                           "choices": choices});
        if let Some(u) = usage_value {
            v["usage"] = u;
        }
        v
    };
    // The first token is chosen (`started`): say so at once, as OpenAI's API does with
    // a first chunk carrying the role and empty content.
    let opening = data(&chunk(
        json!([shape.choice(Some(""), true, None, true)]),
        None,
    ));
    let events = futures_util::stream::unfold(
        Stream {
            ticket,
            first: false,
            ended: false,
            recording,
        },
        move |mut s| {
            let chunk = chunk.clone();
            let extra = extra.clone();
            async move {
                if s.ended {
                    return None;
                }
                let mut out: Vec<Event> = Vec::new();
                match s.ticket.next().await {
                    Some(WorkerEvent::Delta { text, .. }) => {
                        out.push(data(&chunk(
                            json!([shape.choice(Some(&text), s.first, None, true)]),
                            None,
                        )));
                        s.first = false;
                    }
                    Some(WorkerEvent::Done {
                        text: whole,
                        prompt_tokens,
                        completion_tokens,
                        finish_reason,
                        ..
                    }) => {
                        let text = matches!(shape, Shape::Completion).then_some("");
                        let mut last = chunk(
                            json!([shape.choice(text, s.first, Some(finish_reason), true)]),
                            None,
                        );
                        let mut cairn =
                            json!({"timings_ms": {"total": t0.elapsed().as_secs_f64() * 1e3}});
                        merge(&mut cairn, extra.clone());
                        if let Some(r) = s.recording.take() {
                            r.save(
                                json!({"text": whole, "finish_reason": finish_reason,
                                       "usage": usage(prompt_tokens, completion_tokens), "cairn": cairn}),
                                t0,
                                None,
                            );
                        }
                        last["cairn"] = cairn;
                        out.push(data(&last));
                        if include_usage {
                            out.push(data(&chunk(
                                json!([]),
                                Some(usage(prompt_tokens, completion_tokens)),
                            )));
                        }
                        out.push(Event::default().data("[DONE]"));
                        s.ended = true;
                    }
                    Some(WorkerEvent::Failed { kind, message, .. }) => {
                        Recording::failure(s.recording.take(), t0, &message);
                        out.push(data(&failed(kind, message).json()));
                        s.ended = true;
                    }
                    Some(_) => {}
                    None => {
                        out.push(data(&ApiError::from(QueueError::WorkerGone).json()));
                        s.ended = true;
                    }
                }
                Some((
                    futures_util::stream::iter(out.into_iter().map(Ok::<_, Infallible>)),
                    s,
                ))
            }
        },
    );
    use futures_util::StreamExt;
    let opening = futures_util::stream::once(async move { Ok::<_, Infallible>(opening) });
    Sse::new(opening.chain(events.flatten()))
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn data(v: &Value) -> Event {
    Event::default().data(v.to_string())
}

/// Seconds since the Unix epoch (OpenAI's `created`).
pub(super) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

#[derive(Deserialize)]
struct EmbeddingRequest {
    model: String,
    input: PromptInput,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<u64>,
}

async fn embeddings(
    State(state): State<Arc<ServeState>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: EmbeddingRequest = parse(&body)?;
    let Some(name) = &state.embedder_name else {
        return Err(ApiError::invalid(
            Some("model"),
            "this server has no embedding model: start `cairn serve` with --embedder DIR (or a --rag config)",
        ));
    };
    if &req.model != name {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "The model `{}` does not exist; embeddings come from `{name}`",
                req.model
            ),
            param: Some("model"),
            code: Some("model_not_found"),
        });
    }
    let texts: Vec<String> = match req.input {
        PromptInput::One(s) => vec![s],
        PromptInput::Many(list) => list
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                _ => Err(ApiError::unsupported(
                    "input",
                    "input must be a string or a list of strings (token ids are not supported)",
                )),
            })
            .collect::<Result<_, _>>()?,
    };
    if texts.is_empty() {
        return Err(ApiError::invalid(Some("input"), "input is empty"));
    }
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                Some("encoding_format"),
                format!("encoding_format {other:?}: use float or base64"),
            ))
        }
    };
    if let (Some(d), Some(dim)) = (req.dimensions, state.worker.embedding_dim) {
        if d as usize != dim {
            return Err(ApiError::unsupported(
                "dimensions",
                format!("this embedding model has {dim} dimensions and cannot shorten them"),
            ));
        }
    }
    let recording = Recording::of(&state, "embedding", &body);
    let t0 = Instant::now();
    let mut ticket = state
        .worker
        .submit(|id| WorkerRequest::Embed { id, texts })?;
    match ticket.next().await {
        Some(WorkerEvent::Embedded {
            vectors, tokens, ..
        }) => {
            let data: Vec<Value> = vectors
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let embedding = if base64 {
                        use base64::Engine;
                        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                        json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                    } else {
                        json!(v)
                    };
                    json!({"object": "embedding", "index": i, "embedding": embedding})
                })
                .collect();
            if let Some(r) = recording {
                r.save(json!({"vectors": data.len(), "tokens": tokens}), t0, None);
            }
            Ok(Json(json!({"object": "list", "data": data, "model": name,
                           "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}))
            .into_response())
        }
        Some(WorkerEvent::Failed { kind, message, .. }) => Err(failed(kind, message)),
        _ => Err(QueueError::WorkerGone.into()),
    }
}
