//! Retrieval-augmented generation, the retrieval half: a question becomes payload filters
//! (self-query: rules, or an LLM call), several phrasings (query expansion by an LLM,
//! answers cached), a vector search per phrasing and collection, one fused list
//! (reciprocal rank fusion), a cross-encoder's reranking of the best candidates, and the
//! prompt that puts the kept chunks before the question. Embedding and reranking run in
//! the model worker, reached through [`Encoders`]; `cairn serve` answers chats with it and
//! `rag_eval` scores it.

pub mod config;
pub mod fusion;
pub mod judge;
pub mod metrics;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use async_trait::async_trait;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

pub use config::RagConfig;

use crate::llm::{ChatMessage, Client};
use crate::vectorstore::{self, VectorStore};

/// What retrieval needs from the model worker.
#[async_trait]
pub trait Encoders: Send + Sync {
    /// One vector per text, with the collections' embedding model.
    async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, String>;
    /// Cross-encoder scores of each document against `query`.
    async fn rerank(&self, query: String, documents: Vec<String>) -> Result<Vec<f32>, String>;
}

/// Why retrieval failed.
#[derive(Debug, thiserror::Error)]
pub enum RagError {
    /// The vector store could not be opened or searched.
    #[error("vector store: {0}")]
    Vectors(#[from] vectorstore::VectorError),
    /// A collection the configuration names is not there.
    #[error("collection `{0}` does not exist in {1}; `vector_load` creates collections (the RAG config names them under `collections:`)")]
    MissingCollection(String, String),
    /// The LLM of self-query or expansion failed.
    #[error("{stage}: {message}")]
    Llm {
        /// self_query or expansion.
        stage: &'static str,
        /// What went wrong.
        message: String,
    },
    /// Embedding or reranking in the worker failed.
    #[error("{0}")]
    Encoders(String),
}

/// Which optional stages run (a configuration's stages can be switched off per call, as
/// `rag_eval` does to compare them).
#[derive(Clone, Copy, Debug)]
pub struct Stages {
    /// Query expansion (when configured).
    pub expansion: bool,
    /// Reranking (when configured).
    pub rerank: bool,
}

impl Default for Stages {
    fn default() -> Self {
        Self {
            expansion: true,
            rerank: true,
        }
    }
}

/// One retrieved chunk.
#[derive(Clone, Debug, Serialize)]
pub struct Source {
    /// Point id in the vector store.
    pub id: String,
    /// Collection it came from.
    pub collection: String,
    /// The chunk's id (`chunk_id` in the payload).
    pub chunk_id: String,
    /// Its document's id.
    pub document_id: String,
    /// The chunk's document URL.
    pub url: String,
    /// Document title.
    pub title: String,
    /// Chunk text.
    pub text: String,
    /// The fused score (reciprocal rank fusion).
    pub fused: f64,
    /// The cross-encoder's score, when reranked.
    pub rerank: Option<f32>,
    /// Best cosine similarity among the searches that found it.
    pub similarity: f32,
}

/// What retrieval found for a question, and how long each stage took.
#[derive(Clone, Debug, Serialize)]
pub struct Retrieval {
    /// Payload filters self-query extracted.
    pub filters: Vec<(String, String)>,
    /// The question and its rewrites.
    pub queries: Vec<String>,
    /// The kept chunks, best first.
    pub sources: Vec<Source>,
    /// Milliseconds per stage (self_query, expansion, embed, search, fusion, rerank).
    pub timings_ms: BTreeMap<String, f64>,
}

/// A configured retriever over an open vector store.
pub struct Retriever {
    config: RagConfig,
    vectors: Box<dyn VectorStore>,
    self_query_llm: Option<Client>,
    expansion_llm: Option<Client>,
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

impl Retriever {
    /// Opens the vector store (`config.vector_url`, else `$CAIRN_QDRANT_URL`, else the
    /// embedded store under `store_root`) and checks that every collection exists. LLM
    /// answers are cached under `store_root`.
    pub async fn open(config: RagConfig, store_root: &Path) -> Result<Self, RagError> {
        let vectors = vectorstore::open(config.vector_url.as_deref(), store_root).await?;
        for c in &config.collections {
            if vectors.count(&c.name).await?.is_none() {
                return Err(RagError::MissingCollection(
                    c.name.clone(),
                    vectors.describe(),
                ));
            }
        }
        let client = |settings: &crate::llm::LlmSettings, stage: &'static str| {
            Client::new(settings.clone(), Some(store_root)).map_err(|e| RagError::Llm {
                stage,
                message: e.to_string(),
            })
        };
        let self_query_llm = match config.self_query.as_ref().and_then(|s| s.llm.as_ref()) {
            Some(s) => Some(client(s, "self_query")?),
            None => None,
        };
        let expansion_llm = match &config.expansion {
            Some(e) => Some(client(&e.llm, "expansion")?),
            None => None,
        };
        Ok(Self {
            config,
            vectors,
            self_query_llm,
            expansion_llm,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &RagConfig {
        &self.config
    }

    /// Retrieves context for `question`.
    pub async fn retrieve(
        &self,
        question: &str,
        encoders: &dyn Encoders,
        stages: Stages,
    ) -> Result<Retrieval, RagError> {
        let mut timings = BTreeMap::new();
        let t = Instant::now();
        let filters = self.self_query(question).await?;
        timings.insert("self_query".to_string(), ms(t));

        let t = Instant::now();
        let mut queries = vec![question.to_string()];
        if stages.expansion {
            queries.extend(self.expand(question).await?);
        }
        timings.insert("expansion".to_string(), ms(t));

        let t = Instant::now();
        let vectors = encoders
            .embed(queries.clone())
            .await
            .map_err(RagError::Encoders)?;
        timings.insert("embed".to_string(), ms(t));

        let t = Instant::now();
        let mut lists = Vec::new();
        for vector in &vectors {
            for c in &self.config.collections {
                let hits = self
                    .vectors
                    .search(&c.name, vector.clone(), c.k, &filters)
                    .await?;
                lists.push((c.name.clone(), hits));
            }
        }
        timings.insert("search".to_string(), ms(t));

        let t = Instant::now();
        let mut fused = fusion::reciprocal_rank(&lists, self.config.rrf_k);
        timings.insert("fusion".to_string(), ms(t));

        let t = Instant::now();
        let keep = self.config.top_k;
        let sources = match (&self.config.rerank, stages.rerank) {
            (Some(r), true) => {
                fused.truncate(r.candidates);
                let texts: Vec<String> = fused.iter().map(|s| s.text.clone()).collect();
                let scores = if texts.is_empty() {
                    Vec::new()
                } else {
                    encoders
                        .rerank(question.to_string(), texts)
                        .await
                        .map_err(RagError::Encoders)?
                };
                for (s, score) in fused.iter_mut().zip(scores) {
                    s.rerank = Some(score);
                }
                fused.sort_by(|a, b| {
                    b.rerank
                        .partial_cmp(&a.rerank)
                        .unwrap_or(std::cmp::Ordering::Equal)
                        .then_with(|| a.id.cmp(&b.id))
                });
                fused.truncate(keep);
                fused
            }
            _ => {
                fused.truncate(keep);
                fused
            }
        };
        timings.insert("rerank".to_string(), ms(t));
        Ok(Retrieval {
            filters,
            queries,
            sources,
            timings_ms: timings,
        })
    }

    /// Payload filters found in the question: every rule that matches gives its field
    /// the first capture group; the LLM (when configured) fills the rest.
    async fn self_query(&self, question: &str) -> Result<Vec<(String, String)>, RagError> {
        let Some(sq) = &self.config.self_query else {
            return Ok(Vec::new());
        };
        let mut filters: Vec<(String, String)> = Vec::new();
        for rule in sq.compiled() {
            if let Some(value) = rule.1.captures(question).and_then(|c| c.get(1)) {
                if !filters.iter().any(|f| f.0 == rule.0) {
                    filters.push((rule.0.clone(), value.as_str().trim().to_string()));
                }
            }
        }
        let Some(client) = &self.self_query_llm else {
            return Ok(filters);
        };
        let fields: Vec<&String> = sq
            .fields
            .iter()
            .filter(|f| !filters.iter().any(|x| &x.0 == *f))
            .collect();
        if fields.is_empty() {
            return Ok(filters);
        }
        let prompt = format!(
            "Extract search filters from the user's question. Reply with a JSON object with exactly the keys {}; each value is the exact text the question gives for it, or null when the question does not mention it.\n\nQuestion: {question}",
            fields
                .iter()
                .map(|f| format!("\"{f}\""))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let reply = client
            .chat(
                &[ChatMessage::user(prompt)],
                true,
                &CancellationToken::new(),
            )
            .await
            .map_err(|e| RagError::Llm {
                stage: "self_query",
                message: e.to_string(),
            })?;
        let parsed: serde_json::Value =
            serde_json::from_str(reply.content.trim()).map_err(|e| RagError::Llm {
                stage: "self_query",
                message: format!(
                    "the reply is not a JSON object ({e}): {:?}",
                    reply.content.chars().take(200).collect::<String>()
                ),
            })?;
        for f in fields {
            if let Some(v) = parsed.get(f).and_then(|v| v.as_str()) {
                if !v.trim().is_empty() {
                    filters.push((f.clone(), v.trim().to_string()));
                }
            }
        }
        Ok(filters)
    }

    /// Up to `n` rewrites of the question (cached answers of the LLM).
    async fn expand(&self, question: &str) -> Result<Vec<String>, RagError> {
        let (Some(client), Some(cfg)) = (&self.expansion_llm, &self.config.expansion) else {
            return Ok(Vec::new());
        };
        let prompt = format!(
            "You are an AI language model assistant. Write {n} different versions of the user question below, to retrieve relevant documents from a vector database. By seeing the question from several angles you help the user overcome the limits of distance-based similarity search. Give the alternative questions separated by `{SEPARATOR}`, and nothing else.\n\nQuestion: {question}",
            n = cfg.n
        );
        let reply = client
            .chat(
                &[ChatMessage::user(prompt)],
                false,
                &CancellationToken::new(),
            )
            .await
            .map_err(|e| RagError::Llm {
                stage: "expansion",
                message: e.to_string(),
            })?;
        Ok(reply
            .content
            .split(SEPARATOR)
            .map(str::trim)
            .filter(|q| !q.is_empty() && *q != question)
            .take(cfg.n)
            .map(str::to_string)
            .collect())
    }

    /// The user message that puts the sources before the question.
    pub fn prompt(&self, question: &str, retrieval: &Retrieval) -> String {
        self.config
            .prompt
            .replace("{context}", &Self::context(retrieval))
            .replace("{question}", question)
    }

    /// The sources as the prompt shows them: numbered, with titles and URLs.
    pub fn context(retrieval: &Retrieval) -> String {
        retrieval
            .sources
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let head = match (s.title.is_empty(), s.url.is_empty()) {
                    (false, false) => format!("[{}] {} ({})", i + 1, s.title, s.url),
                    (false, true) => format!("[{}] {}", i + 1, s.title),
                    (true, false) => format!("[{}] {}", i + 1, s.url),
                    (true, true) => format!("[{}]", i + 1),
                };
                format!("{head}\n{}", s.text.trim())
            })
            .collect::<Vec<_>>()
            .join("\n\n")
    }
}

/// What the expansion prompt asks the LLM to put between rewrites.
pub const SEPARATOR: &str = "#next-question#";
