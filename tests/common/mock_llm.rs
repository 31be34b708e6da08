//! A local OpenAI-compatible chat-completions server for tests, the benchmark and trying
//! the LLM recipes offline (`cargo run --example mock_llm`). It answers the built-in
//! `instruct` prompts with well-formed replies made from the extract, and misbehaves on
//! demand when the extract contains a marker:
//!
//! - `MOCK_MALFORMED`: a chatty non-JSON reply;
//! - `MOCK_RATELIMIT`: 429 with `Retry-After: 1` the first time, then a normal reply;
//! - `MOCK_FLAKY`: 500 the first time, then a normal reply;
//! - `MOCK_SLOW`: the reply comes after 500 ms;
//! - `MOCK_401`: 401 every time.
//!
//! Judge prompts ("You are an expert judge") get accuracy 1 + (answer length mod 3), style 2;
//! `rank`'s prompts ("You judge replies to the same prompt") score each reply
//! 1 + (its length + the rubric's length) mod 10, or 5 for all when one says MOCK_TIE.
//!
//! It counts calls, requests in flight (and the most at once) and when each arrived.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

/// What the server saw.
#[derive(Default)]
pub struct MockState {
    /// HTTP requests received (retries included).
    pub calls: AtomicUsize,
    in_flight: AtomicUsize,
    /// Most requests in flight at once.
    pub max_in_flight: AtomicUsize,
    /// When each request arrived.
    pub arrivals: Mutex<Vec<Instant>>,
    /// Authorization headers seen.
    pub auth: Mutex<Vec<String>>,
    failed_once: Mutex<HashSet<String>>,
    /// Added latency per reply.
    pub latency: Mutex<Duration>,
}

/// A running server.
pub struct MockLlm {
    /// Base URL to give `llm.base_url` (ends in /v1).
    pub base_url: String,
    /// Counters.
    pub state: Arc<MockState>,
}

impl MockLlm {
    /// Starts a server on 127.0.0.1 (a free port) on its own thread.
    pub fn start() -> Self {
        Self::start_on("127.0.0.1:0", None)
    }

    /// Starts a server on `addr`; with `site`, other paths serve the files under it (a
    /// fixture blog to crawl).
    pub fn start_on(addr: &str, site: Option<std::path::PathBuf>) -> Self {
        let state = Arc::new(MockState::default());
        let mut app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .with_state(state.clone());
        if let Some(site) = site {
            app = app.fallback_service(
                Router::new()
                    .fallback(super::static_files::static_files)
                    .with_state(Arc::new(site)),
            );
        }
        let port = super::server::serve(addr, app).port();
        Self {
            base_url: format!("http://127.0.0.1:{port}/v1"),
            state,
        }
    }

    /// HTTP requests so far.
    pub fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }

    /// Most requests in flight at once so far.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }
}

struct InFlight<'a>(&'a MockState);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn chat(
    State(state): State<Arc<MockState>>,
    headers: HeaderMap,
    Json(req): Json<Value>,
) -> Response {
    state.calls.fetch_add(1, Ordering::SeqCst);
    state.arrivals.lock().unwrap().push(Instant::now());
    if let Some(a) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        state.auth.lock().unwrap().push(a.to_string());
    }
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let _guard = InFlight(&state);
    let latency = *state.latency.lock().unwrap();
    let user = req["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_string();
    let first_time = |tag: &str| {
        state
            .failed_once
            .lock()
            .unwrap()
            .insert(format!("{tag}{user}"))
    };
    if user.contains("MOCK_401") {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": {"message": "Incorrect API key provided"}})),
        )
            .into_response();
    }
    if user.contains("MOCK_RATELIMIT") && first_time("429") {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "1")],
            Json(json!({"error": {"message": "Rate limit reached"}})),
        )
            .into_response();
    }
    if user.contains("MOCK_FLAKY") && first_time("500") {
        return (StatusCode::INTERNAL_SERVER_ERROR, "upstream exploded").into_response();
    }
    if user.contains("MOCK_SLOW") {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let content = if user.contains("MOCK_MALFORMED") {
        "Sure! Here are some great pairs for you: 1. ...".to_string()
    } else {
        answer(&user)
    };
    Json(json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "model": req["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": user.len() / 4, "completion_tokens": content.len() / 4, "total_tokens": (user.len() + content.len()) / 4},
    }))
    .into_response()
}

fn sentences(text: &str) -> Vec<&str> {
    text.split_inclusive(['.', '!', '?'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// A well-formed reply to one of the built-in prompts.
fn answer(user: &str) -> String {
    let extract = user
        .rsplit_once("Extract:\n")
        .or_else(|| user.rsplit_once("Text:\n"))
        .map(|(_, e)| e.trim())
        .unwrap_or(user);
    if let Some((_, question)) = user
        .split_once("different versions of the user question")
        .and_then(|(_, rest)| rest.rsplit_once("Question: "))
    {
        // RAG query expansion: rewrites that name the topic in other words.
        let q = question.trim();
        return format!(
            "{q} (explained for a beginner)#next-question#What do my notes say about: {q}#next-question#Tips on {q}"
        );
    }
    if user.starts_with("You judge an answer produced from retrieved context") {
        // RAG answers: scores from the lengths of the answer and the question.
        let answer = user.rsplit_once("\n\nAnswer: ").map_or("", |(_, a)| a);
        let question = user
            .rsplit_once("\n\nQuestion: ")
            .and_then(|(_, q)| q.split_once("\n\nAnswer: "))
            .map_or("", |(q, _)| q);
        return json!({"faithfulness": 1 + answer.chars().count() % 5,
                      "relevance": 1 + question.chars().count() % 5, "reason": "mock"})
        .to_string();
    }
    if let Some((_, question)) = user
        .split_once("Extract search filters")
        .and_then(|(_, rest)| rest.rsplit_once("Question: "))
    {
        // RAG self-query: a category when the question names one.
        let category = ["note", "article", "post"]
            .into_iter()
            .find(|c| question.contains(&format!("my {c}s")));
        return json!({"category": category}).to_string();
    }
    let words: Vec<&str> = extract.split_whitespace().collect();
    let topic = words.iter().take(6).copied().collect::<Vec<_>>().join(" ");
    let count: usize = user
        .split_whitespace()
        .skip_while(|w| *w != "generate")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    if user.contains("You judge replies to the same prompt") {
        // `rank`: a score per reply from its length and the rubric's, so a new rubric
        // reorders them; MOCK_TIE in a reply scores them all the same.
        let rubric = user
            .split_once("Rubric:\n")
            .and_then(|(_, r)| r.split_once("\n\nPrompt:"))
            .map_or("", |(r, _)| r);
        let section = user
            .split_once("Replies:\n")
            .and_then(|(_, r)| r.split_once("\n\nScore every reply"))
            .map_or("", |(r, _)| r);
        let replies: Vec<&str> = section
            .split("\n\n[")
            .map(|r| r.split_once("] ").map_or(r, |(_, t)| t))
            .collect();
        let tie = section.contains("MOCK_TIE");
        let scores: Vec<usize> = replies
            .iter()
            .map(|r| {
                if tie {
                    5
                } else {
                    1 + (r.len() + rubric.len()) % 10
                }
            })
            .collect();
        return json!({"scores": scores, "reason": format!("{} replies scored on length", replies.len())})
            .to_string();
    }
    if user.contains("You are an expert judge") {
        // A deterministic verdict that depends on the answer, so two models can differ.
        let answer = user.rsplit_once("Answer: ").map(|(_, a)| a).unwrap_or("");
        let answer = answer
            .split("\n\nProvide your evaluation")
            .next()
            .unwrap_or(answer);
        let accuracy = 1 + answer.trim().len() % 3;
        return json!({
            "accuracy": {"analysis": format!("{} characters of answer", answer.trim().len()), "score": accuracy},
            "style": {"analysis": "plain enough", "score": 2},
        })
        .to_string();
    }
    if user.contains("instruction-answer triples") {
        // Chosen: whole sentences copied from the extract, at least 100 characters.
        let mut chosen = String::new();
        for s in sentences(extract) {
            if !chosen.is_empty() {
                chosen.push(' ');
            }
            chosen.push_str(s);
            if chosen.len() >= 100 {
                break;
            }
        }
        let triples: Vec<Value> = (1..=count)
            .map(|i| json!({
                "instruction": format!("Question {i}: what does the author say about {topic}?"),
                "generated_answer": format!("The author writes briefly about {topic} (answer {i})."),
                "extracted_answer": chosen,
            }))
            .collect();
        json!({"preference_triples": triples}).to_string()
    } else if user.contains("instruction-answer pairs") {
        let pairs: Vec<Value> = (1..=count)
            .map(|i| json!({
                "instruction": format!("Write a paragraph (take {i}) about {topic}."),
                "answer": format!("{} (variation {i})", words.iter().take(40).copied().collect::<Vec<_>>().join(" ")),
            }))
            .collect();
        json!({"instruction_answer_pairs": pairs}).to_string()
    } else if let Some(rest) = user.strip_prefix("Rewrite the following text as ") {
        let variant = rest.split('.').next().unwrap_or("notes");
        let plain: Vec<String> = words.iter().take(30).map(|w| w.to_lowercase()).collect();
        format!("{variant}: {}", plain.join(" "))
    } else {
        "I can only answer cairn's built-in prompts.".to_string()
    }
}
