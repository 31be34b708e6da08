//! What `cairn serve` and its model worker (`cairn-torch serve`) say to each other: one
//! JSON object per line, requests on the worker's stdin, events on its stdout. Requests
//! carry an id the server chose; every event about a request names it.

use serde::{Deserialize, Serialize};

use crate::ml::job::GenerationSettings;
use crate::ml::template::Role;

/// A model the worker loads, under the name requests select it by.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// The name in the request's `model` field.
    pub name: String,
    /// Model directory (full model or PEFT adapter). Adapters over one base, and the base
    /// itself when it is served too, share its weights.
    pub dir: std::path::PathBuf,
}

/// What the worker is started with (a JSON file named on its command line).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerConfig {
    /// Generation models.
    pub models: Vec<ModelSpec>,
    /// Sentence-embedding model directory for `/v1/embeddings` and retrieval.
    #[serde(default)]
    pub embedder: Option<std::path::PathBuf>,
    /// Cross-encoder (`*ForSequenceClassification`) directory for reranking.
    #[serde(default)]
    pub reranker: Option<std::path::PathBuf>,
    /// The cross-encoder's precision: auto (bf16 on CUDA, else f32), f32, bf16 or int8 (CPU).
    #[serde(default = "auto")]
    pub reranker_precision: String,
    /// Rows decoded together at most (continuous batching); later requests wait.
    pub max_batch: usize,
    /// auto, cpu, cuda, cuda:N.
    pub device: String,
    /// CPU threads (0: libtorch's default).
    pub threads: usize,
}

fn auto() -> String {
    "auto".into()
}

/// The text to continue: chat messages rendered with the model's template, or a raw
/// prompt (`/v1/completions`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prompt {
    /// Turns, rendered with the template the model was trained with.
    Messages(Vec<(Role, String)>),
    /// Fed as is.
    Text(String),
}

/// A request to the worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerRequest {
    /// Generate a reply; answered by `started`, `delta`s and `done` (or `failed`).
    Generate {
        id: u64,
        model: String,
        prompt: Prompt,
        settings: GenerationSettings,
    },
    /// The client went away: stop generating for `id` (no further events).
    Cancel { id: u64 },
    /// Embed texts with the embedder; answered by `embedded` (or `failed`).
    Embed { id: u64, texts: Vec<String> },
    /// Score (query, document) pairs with the cross-encoder; answered by `scored`.
    Rerank {
        id: u64,
        query: String,
        documents: Vec<String>,
    },
}

/// Why generation ended (OpenAI's `finish_reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// EOS or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

/// What kind of failure a `failed` event reports (the server's HTTP status follows it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The request cannot be served as asked (400): no embedder loaded, a template
    /// that cannot render the turns...
    Invalid,
    /// The prompt and `max_tokens` do not fit the model's context (400
    /// `context_length_exceeded`; a shorter prompt may).
    ContextLength,
    /// Something broke in the worker (500).
    Internal,
}

/// A loaded model, as the worker reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoadedModel {
    /// Request name.
    pub name: String,
    /// gpt2, llama, t5.
    pub arch: String,
    /// Context window in tokens.
    pub context: i64,
    /// Template name.
    pub template: String,
}

/// An event from the worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerEvent {
    /// Everything is loaded.
    Ready {
        models: Vec<LoadedModel>,
        device: String,
        /// Embedding dimension when an embedder is loaded.
        embedding_dim: Option<usize>,
    },
    /// The prompt was read and the first token chosen (for T5: the source was read).
    Started { id: u64, prompt_tokens: usize },
    /// New text of request `id`.
    Delta { id: u64, text: String },
    /// Request `id` is complete; `text` is the whole reply.
    Done {
        id: u64,
        text: String,
        prompt_tokens: usize,
        completion_tokens: usize,
        finish_reason: FinishReason,
    },
    /// Request `id` failed.
    Failed {
        id: u64,
        kind: FailureKind,
        message: String,
    },
    /// Embeddings of an `embed` request, one vector per text; `tokens` read in all.
    Embedded {
        id: u64,
        vectors: Vec<Vec<f32>>,
        tokens: usize,
    },
    /// Cross-encoder scores of a `rerank` request, one per document, in order (after
    /// the model's activation, as sentence-transformers' `CrossEncoder.predict`).
    Scored { id: u64, scores: Vec<f32> },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_events_round_trip_as_single_key_objects() {
        let req = WorkerRequest::Generate {
            id: 7,
            model: "twin".into(),
            prompt: Prompt::Messages(vec![(Role::User, "hi".into())]),
            settings: GenerationSettings::default(),
        };
        let line = serde_json::to_string(&req).unwrap();
        assert!(line.starts_with(r#"{"generate":{"id":7"#), "{line}");
        assert_eq!(serde_json::from_str::<WorkerRequest>(&line).unwrap(), req);
        let ev: WorkerEvent = serde_json::from_str(r#"{"delta":{"id":3,"text":"a"}}"#).unwrap();
        assert_eq!(
            ev,
            WorkerEvent::Delta {
                id: 3,
                text: "a".into()
            }
        );
    }
}
