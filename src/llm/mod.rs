//! A client for OpenAI-compatible chat-completions servers (OpenAI, vLLM, Ollama,
//! llama.cpp's server, ...): concurrency and rate limits, retries with backoff on 429 and
//! 5xx (honouring `Retry-After`), a call cache in the store, and a running token and cost
//! count.

pub mod cache;
pub mod limiter;

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use thiserror::Error;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use cache::CallCache;
use limiter::Limiter;

/// Where and how to call the model. Only `model`, `temperature`, `max_tokens` and
/// `json_mode` decide an answer (and so the call-cache key); the rest is transport.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LlmSettings {
    /// Base URL of the API, up to `/v1` (`https://api.openai.com/v1`,
    /// `http://127.0.0.1:11434/v1` for Ollama, `http://127.0.0.1:8000/v1` for vLLM).
    #[serde(default = "default_base_url")]
    pub base_url: String,
    /// Model name as the server knows it.
    #[serde(default = "default_model")]
    pub model: String,
    /// Environment variable holding the API key (sent as a Bearer token). The key itself is
    /// never written to the pipeline, the store or logs. Unset variable: no key is sent
    /// (local servers need none).
    #[serde(default = "default_api_key_env")]
    pub api_key_env: String,
    /// Sampling temperature.
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Most tokens per reply.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
    /// Ask for a JSON object reply (`response_format: json_object`) where the builder
    /// expects JSON; every server above supports it.
    #[serde(default = "yes")]
    pub json_mode: bool,
    /// Requests in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Most requests per minute (0: unlimited).
    #[serde(default = "default_rpm")]
    pub requests_per_minute: u32,
    /// Most tokens per minute, counting prompt + `max_tokens` as providers do (0: unlimited).
    #[serde(default)]
    pub tokens_per_minute: u32,
    /// Retries of a request answered 429, 408, 5xx or lost in transit.
    #[serde(default = "default_retries")]
    pub max_retries: u32,
    /// Seconds to wait for one reply.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// USD per million prompt tokens, for the cost counter (0: not tracked).
    #[serde(default)]
    pub price_input_per_1m: f64,
    /// USD per million completion tokens.
    #[serde(default)]
    pub price_output_per_1m: f64,
}

fn default_base_url() -> String {
    "https://api.openai.com/v1".into()
}
fn default_model() -> String {
    "gpt-4o-mini".into()
}
fn default_api_key_env() -> String {
    "OPENAI_API_KEY".into()
}
fn default_temperature() -> f64 {
    0.7
}
fn default_max_tokens() -> u32 {
    1200
}
fn yes() -> bool {
    true
}
fn default_concurrency() -> usize {
    8
}
fn default_rpm() -> u32 {
    500
}
fn default_retries() -> u32 {
    6
}
fn default_timeout() -> u64 {
    120
}

impl Default for LlmSettings {
    fn default() -> Self {
        serde_json::from_value(json!({})).expect("every field has a default")
    }
}

impl LlmSettings {
    /// Problems a user must fix before anything runs: (field, message).
    pub fn issues(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        match url::Url::parse(&self.base_url) {
            Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
            _ => out.push((
                "base_url",
                format!(
                    "`{}` is not an http(s) URL (e.g. https://api.openai.com/v1)",
                    self.base_url
                ),
            )),
        }
        if self.model.trim().is_empty() {
            out.push(("model", "model must not be empty".into()));
        }
        if self.concurrency == 0 {
            out.push(("concurrency", "concurrency must be at least 1".into()));
        }
        if self.max_tokens == 0 {
            out.push(("max_tokens", "max_tokens must be at least 1".into()));
        }
        if !(0.0..=2.0).contains(&self.temperature) {
            out.push((
                "temperature",
                format!("temperature {} is outside 0..=2", self.temperature),
            ));
        }
        out
    }

    /// Cost in USD of `usage` at the configured prices.
    pub fn cost(&self, usage: &Usage) -> f64 {
        (usage.prompt_tokens as f64 * self.price_input_per_1m
            + usage.completion_tokens as f64 * self.price_output_per_1m)
            / 1e6
    }
}

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self {
            role: "system".into(),
            content: content.into(),
        }
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: "user".into(),
            content: content.into(),
        }
    }
}

/// Tokens of one call as the server reported them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
}

/// A reply.
#[derive(Clone, Debug)]
pub struct Completion {
    /// The assistant's text (empty when the server sent none).
    pub content: String,
    /// Why generation stopped, when said.
    pub finish_reason: Option<String>,
    /// Tokens of the call.
    pub usage: Usage,
    /// Answered from the call cache (nothing was paid).
    pub cached: bool,
}

/// Running totals of a client.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Totals {
    /// Requests sent and answered (paid).
    pub calls: u64,
    /// Requests answered from the call cache.
    pub cached_calls: u64,
    /// Retried attempts (429, 5xx, timeouts).
    pub retries: u64,
    /// Prompt tokens paid.
    pub prompt_tokens: u64,
    /// Completion tokens paid.
    pub completion_tokens: u64,
    /// USD paid at the configured prices.
    pub cost_usd: f64,
    /// USD the call cache saved.
    pub saved_usd: f64,
}

/// Why a call failed for good.
#[derive(Debug, Error)]
pub enum LlmError {
    /// The server refused the request in a way retrying cannot fix (401, 400, 404...).
    #[error("{url} answered {status}: {body}{hint}")]
    Rejected {
        /// Endpoint.
        url: String,
        /// HTTP status.
        status: u16,
        /// Start of the body.
        body: String,
        /// What to check.
        hint: String,
    },
    /// Retries ran out.
    #[error("{url}: gave up after {attempts} attempts, last: {last}")]
    GaveUp {
        /// Endpoint.
        url: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// The reply was not a chat-completions response.
    #[error("{url} sent a reply that is not a chat completion: {0}", url = .1)]
    BadResponse(String, String),
    /// The HTTP client could not be built.
    #[error("cannot set up the HTTP client: {0}")]
    Setup(String),
    /// Ctrl-C.
    #[error("cancelled")]
    Cancelled,
}

/// The client. Cheap to share behind an `Arc`; every method takes `&self`.
pub struct Client {
    settings: LlmSettings,
    http: reqwest::Client,
    endpoint: String,
    api_key: Option<String>,
    slots: Semaphore,
    limiter: Limiter,
    cache: Option<CallCache>,
    totals: Mutex<Totals>,
}

impl Client {
    /// A client for `settings`; `store_root` enables the call cache.
    pub fn new(settings: LlmSettings, store_root: Option<&Path>) -> Result<Self, LlmError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(settings.timeout_secs.max(1)))
            .user_agent(concat!("cairn/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| LlmError::Setup(e.to_string()))?;
        let endpoint = format!(
            "{}/chat/completions",
            settings.base_url.trim_end_matches('/')
        );
        let api_key = std::env::var(&settings.api_key_env)
            .ok()
            .filter(|k| !k.is_empty());
        Ok(Self {
            slots: Semaphore::new(settings.concurrency.max(1)),
            limiter: Limiter::new(settings.requests_per_minute, settings.tokens_per_minute),
            cache: store_root.map(CallCache::new),
            totals: Mutex::new(Totals::default()),
            http,
            endpoint,
            api_key,
            settings,
        })
    }

    /// The settings in use.
    pub fn settings(&self) -> &LlmSettings {
        &self.settings
    }

    /// The call-cache key of a request: blake3 over what decides the answer.
    pub fn request_key(&self, messages: &[ChatMessage], json: bool) -> String {
        let s = &self.settings;
        let canonical = json!({
            "model": s.model,
            "messages": messages,
            "temperature": s.temperature,
            "max_tokens": s.max_tokens,
            "json_mode": json && s.json_mode,
        });
        blake3::hash(canonical.to_string().as_bytes())
            .to_hex()
            .to_string()
    }

    /// Whether a request would be answered from the cache.
    pub fn is_cached(&self, messages: &[ChatMessage], json: bool) -> bool {
        self.cache
            .as_ref()
            .is_some_and(|c| c.contains(&self.request_key(messages, json)))
    }

    /// Totals so far.
    pub fn totals(&self) -> Totals {
        self.totals.lock().map(|t| t.clone()).unwrap_or_default()
    }

    fn add(&self, f: impl FnOnce(&mut Totals)) {
        if let Ok(mut t) = self.totals.lock() {
            f(&mut t);
        }
    }

    /// Sends one chat request (from the cache when it was answered before). `json` asks
    /// for a JSON object reply when `json_mode` is on.
    pub async fn chat(
        &self,
        messages: &[ChatMessage],
        json: bool,
        cancel: &CancellationToken,
    ) -> Result<Completion, LlmError> {
        let key = self.request_key(messages, json);
        if let Some(hit) = self.cache.as_ref().and_then(|c| c.get(&key)) {
            let saved = self.settings.cost(&hit.usage);
            self.add(|t| {
                t.cached_calls += 1;
                t.saved_usd += saved;
            });
            return Ok(Completion {
                content: hit.content,
                finish_reason: hit.finish_reason,
                usage: hit.usage,
                cached: true,
            });
        }
        let _slot = tokio::select! {
            permit = self.slots.acquire() => permit.map_err(|_| LlmError::Cancelled)?,
            _ = cancel.cancelled() => return Err(LlmError::Cancelled),
        };
        let mut body = json!({
            "model": self.settings.model,
            "messages": messages,
            "temperature": self.settings.temperature,
            "max_tokens": self.settings.max_tokens,
        });
        if json && self.settings.json_mode {
            body["response_format"] = json!({"type": "json_object"});
        }
        let prompt_chars: usize = messages.iter().map(|m| m.content.len()).sum();
        let estimate = (prompt_chars / 4) as u32 + self.settings.max_tokens;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            tokio::select! {
                _ = self.limiter.acquire(estimate) => {}
                _ = cancel.cancelled() => return Err(LlmError::Cancelled),
            }
            let mut request = self
                .http
                .post(&self.endpoint)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string());
            if let Some(key) = &self.api_key {
                request = request.bearer_auth(key);
            }
            let outcome = tokio::select! {
                r = request.send() => r,
                _ = cancel.cancelled() => return Err(LlmError::Cancelled),
            };
            let (failure, retry_after) = match outcome {
                Ok(response) if response.status().is_success() => {
                    let text = tokio::select! {
                        t = response.text() => t,
                        _ = cancel.cancelled() => return Err(LlmError::Cancelled),
                    };
                    match text {
                        Ok(text) => return self.answered(&key, messages, &text),
                        Err(e) => (format!("reading the reply: {e}"), None),
                    }
                }
                Ok(response) => {
                    let status = response.status().as_u16();
                    let retry_after = response
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(parse_retry_after);
                    let body = response.text().await.unwrap_or_default();
                    let body: String = body.chars().take(300).collect();
                    if !(status == 429 || status == 408 || status >= 500) {
                        return Err(LlmError::Rejected {
                            url: self.endpoint.clone(),
                            status,
                            body,
                            hint: rejection_hint(status, &self.settings),
                        });
                    }
                    (format!("{status} {body}"), retry_after)
                }
                Err(e) => (transport_error(&e), None),
            };
            if attempt > self.settings.max_retries {
                return Err(LlmError::GaveUp {
                    url: self.endpoint.clone(),
                    attempts: attempt,
                    last: failure,
                });
            }
            self.add(|t| t.retries += 1);
            let wait = retry_after.unwrap_or_else(|| backoff(attempt));
            tracing::debug!(attempt, ?wait, %failure, "retrying chat request");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = cancel.cancelled() => return Err(LlmError::Cancelled),
            }
        }
    }

    fn answered(
        &self,
        key: &str,
        messages: &[ChatMessage],
        text: &str,
    ) -> Result<Completion, LlmError> {
        let bad = |why: &str| LlmError::BadResponse(why.to_string(), self.endpoint.clone());
        let reply: Value = serde_json::from_str(text).map_err(|e| bad(&e.to_string()))?;
        let choice = reply["choices"]
            .get(0)
            .ok_or_else(|| bad("no `choices[0]`"))?;
        let content = choice["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let finish_reason = choice["finish_reason"].as_str().map(str::to_string);
        let usage = Usage {
            prompt_tokens: reply["usage"]["prompt_tokens"].as_u64().unwrap_or(0),
            completion_tokens: reply["usage"]["completion_tokens"].as_u64().unwrap_or(0),
        };
        let cost = self.settings.cost(&usage);
        self.add(|t| {
            t.calls += 1;
            t.prompt_tokens += usage.prompt_tokens;
            t.completion_tokens += usage.completion_tokens;
            t.cost_usd += cost;
        });
        if let Some(cache) = &self.cache {
            let entry = cache::Entry {
                model: reply["model"]
                    .as_str()
                    .unwrap_or(&self.settings.model)
                    .to_string(),
                messages: messages.to_vec(),
                content: content.clone(),
                finish_reason: finish_reason.clone(),
                usage,
            };
            if let Err(e) = cache.put(key, &entry) {
                tracing::warn!("cannot write the LLM call cache: {e}");
            }
        }
        Ok(Completion {
            content,
            finish_reason,
            usage,
            cached: false,
        })
    }
}

/// `Retry-After` in seconds (the HTTP-date form is rare for APIs and falls back to
/// backoff), capped at five minutes.
fn parse_retry_after(value: &str) -> Option<Duration> {
    let secs: f64 = value.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(300.0)))
}

/// Exponential backoff with jitter: ~0.5 s, 1 s, 2 s ... capped at 30 s.
fn backoff(attempt: u32) -> Duration {
    let base = 0.5 * 2f64.powi(attempt.saturating_sub(1).min(6) as i32);
    let jitter = rand::random::<f64>() * 0.25 * base;
    Duration::from_secs_f64((base + jitter).min(30.0))
}

fn transport_error(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        format!("cannot connect: {e}")
    } else {
        e.to_string()
    }
}

fn rejection_hint(status: u16, settings: &LlmSettings) -> String {
    match status {
        401 | 403 => format!(
            " (check the API key in ${}; it is {})",
            settings.api_key_env,
            if std::env::var_os(&settings.api_key_env).is_some() {
                "set"
            } else {
                "not set"
            }
        ),
        404 => format!(
            " (check base_url `{}` (it should end in /v1) and model `{}`)",
            settings.base_url, settings.model
        ),
        400 if settings.json_mode => {
            " (if the server does not support response_format, set json_mode: false)".into()
        }
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_and_backoff() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("9999"), Some(Duration::from_secs(300)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert!(backoff(1) >= Duration::from_millis(500) && backoff(1) < Duration::from_secs(1));
        assert!(backoff(20) <= Duration::from_secs(30));
    }

    #[test]
    fn cache_key_ignores_transport_but_not_sampling() {
        let a = Client::new(LlmSettings::default(), None).unwrap();
        let msgs = [ChatMessage::user("q")];
        let mut s = LlmSettings {
            base_url: "http://127.0.0.1:9/v1".into(),
            concurrency: 3,
            ..LlmSettings::default()
        };
        let b = Client::new(s.clone(), None).unwrap();
        assert_eq!(a.request_key(&msgs, true), b.request_key(&msgs, true));
        s.temperature = 0.1;
        let c = Client::new(s, None).unwrap();
        assert_ne!(a.request_key(&msgs, true), c.request_key(&msgs, true));
        assert_ne!(a.request_key(&msgs, true), a.request_key(&msgs, false));
    }

    #[test]
    fn settings_issues_name_the_field() {
        let s = LlmSettings {
            base_url: "localhost:8000".into(),
            concurrency: 0,
            ..LlmSettings::default()
        };
        let fields: Vec<&str> = s.issues().into_iter().map(|(f, _)| f).collect();
        assert_eq!(fields, ["base_url", "concurrency"]);
    }
}
