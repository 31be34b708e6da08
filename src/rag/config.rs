//! The RAG configuration (`cairn serve --rag FILE`, and the `rag` of a `rag_eval` step):
//! typed with serde, then checked as a whole; problems come back with the key path they
//! belong to, so the caller can point at the file's line and column.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::llm::LlmSettings;

/// A RAG configuration.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RagConfig {
    /// Collections to search.
    pub collections: Vec<CollectionConfig>,
    /// Chunks put in the prompt.
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    /// Qdrant server URL (default: $CAIRN_QDRANT_URL, else the store's embedded one).
    #[serde(default)]
    pub vector_url: Option<String>,
    /// Embedding model directory (default: the one the collections were loaded with).
    #[serde(default)]
    pub embedder: Option<PathBuf>,
    /// Payload filters taken from the question.
    #[serde(default)]
    pub self_query: Option<SelfQueryConfig>,
    /// Rewrites of the question searched as well.
    #[serde(default)]
    pub expansion: Option<ExpansionConfig>,
    /// The constant k of reciprocal rank fusion: score = sum of 1 / (k + rank).
    #[serde(default = "default_rrf_k")]
    pub rrf_k: f64,
    /// Cross-encoder reranking of the fused candidates.
    #[serde(default)]
    pub rerank: Option<RerankConfig>,
    /// The user message sent to the model: `{context}` (the numbered chunks with titles
    /// and URLs) and `{question}`.
    #[serde(default = "default_prompt")]
    pub prompt: String,
}

/// One collection to search.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CollectionConfig {
    /// Collection name (`vector_load` names them <prefix><category plural>).
    pub name: String,
    /// Hits per query.
    #[serde(default = "default_k")]
    pub k: usize,
}

/// Self-query: payload filters (e.g. author, category) found in the question.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SelfQueryConfig {
    /// Regex rules; the first capture group is the value.
    #[serde(default)]
    pub rules: Vec<SelfQueryRule>,
    /// Fields an LLM extracts (those no rule matched), when `llm` is set.
    #[serde(default)]
    pub fields: Vec<String>,
    /// The LLM that extracts `fields` (OpenAI-compatible; answers cached in the store).
    #[serde(default)]
    pub llm: Option<LlmSettings>,
}

/// One self-query rule.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SelfQueryRule {
    /// Payload field the value filters on.
    pub field: String,
    /// Regex with one capture group (the value), e.g. `(?i)\bby ([A-Z][a-z]+)`.
    pub pattern: String,
}

/// Query expansion.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExpansionConfig {
    /// Rewrites asked for.
    #[serde(default = "default_rewrites")]
    pub n: usize,
    /// The LLM that writes them (answers cached in the store).
    pub llm: LlmSettings,
}

/// Reranking.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RerankConfig {
    /// Cross-encoder directory (a BERT-family `*ForSequenceClassification` model, e.g.
    /// cross-encoder/ms-marco-MiniLM-L6-v2).
    pub model: PathBuf,
    /// Fused candidates scored.
    #[serde(default = "default_candidates")]
    pub candidates: usize,
    /// Weights' precision: auto (bf16 on CUDA, else f32), f32 (scores equal
    /// sentence-transformers' to 1e-5), bf16 (~2.5x faster on CPUs with AVX512-BF16 or
    /// AMX; scores within ~1e-2), or int8 (CPUs with AVX512-VNNI: int8 weights and
    /// per-token int8 activations through oneDNN's VNNI kernels; about bf16's speed where
    /// both are fast, closer to f32).
    #[serde(default = "default_precision")]
    pub precision: String,
}

fn default_top_k() -> usize {
    3
}
fn default_k() -> usize {
    5
}
fn default_rrf_k() -> f64 {
    60.0
}
fn default_rewrites() -> usize {
    3
}
fn default_candidates() -> usize {
    20
}
fn default_precision() -> String {
    "auto".into()
}
fn default_prompt() -> String {
    "Answer the question using the context below; if it does not help, say so.\n\nContext:\n{context}\n\nQuestion: {question}".into()
}

impl SelfQueryConfig {
    /// The rules with their regexes (checked by [`RagConfig::problems`]; one that does
    /// not compile is skipped).
    pub fn compiled(&self) -> Vec<(String, regex::Regex)> {
        self.rules
            .iter()
            .filter_map(|r| Some((r.field.clone(), regex::Regex::new(&r.pattern).ok()?)))
            .collect()
    }
}

impl RagConfig {
    /// What is wrong beyond the types: (key path, message) pairs, e.g.
    /// (`collections.0.k`, "k must be at least 1").
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if self.collections.is_empty() {
            out.push((
                "collections".into(),
                "name at least one collection to search".into(),
            ));
        }
        for (i, c) in self.collections.iter().enumerate() {
            if c.k == 0 || c.k > 1000 {
                out.push((format!("collections.{i}.k"), "k must be 1..1000".into()));
            }
            if self.collections[..i].iter().any(|d| d.name == c.name) {
                out.push((
                    format!("collections.{i}.name"),
                    format!("collection `{}` is listed twice", c.name),
                ));
            }
        }
        if self.top_k == 0 {
            out.push(("top_k".into(), "top_k must be at least 1".into()));
        }
        if !(self.rrf_k >= 0.0 && self.rrf_k.is_finite()) {
            out.push(("rrf_k".into(), "rrf_k must be a number >= 0".into()));
        }
        if let Some(sq) = &self.self_query {
            for (i, r) in sq.rules.iter().enumerate() {
                match regex::Regex::new(&r.pattern) {
                    Err(e) => out.push((
                        format!("self_query.rules.{i}.pattern"),
                        format!("invalid regex: {e}"),
                    )),
                    Ok(re) if re.captures_len() < 2 => out.push((
                        format!("self_query.rules.{i}.pattern"),
                        "the pattern needs a capture group for the value, e.g. `by ([A-Z][a-z]+)`"
                            .into(),
                    )),
                    Ok(_) => {}
                }
            }
            if !sq.fields.is_empty() && sq.llm.is_none() {
                out.push((
                    "self_query.fields".into(),
                    "fields are extracted by an LLM: add `llm:` (base_url, model) to self_query"
                        .into(),
                ));
            }
            if sq.rules.is_empty() && sq.fields.is_empty() {
                out.push((
                    "self_query".into(),
                    "self_query needs `rules:` or `fields:` with an `llm:`".into(),
                ));
            }
        }
        if let Some(e) = &self.expansion {
            if e.n == 0 || e.n > 20 {
                out.push(("expansion.n".into(), "n must be 1..20".into()));
            }
        }
        if let Some(r) = &self.rerank {
            if r.candidates == 0 {
                out.push((
                    "rerank.candidates".into(),
                    "candidates must be at least 1".into(),
                ));
            }
            if !matches!(r.precision.as_str(), "auto" | "f32" | "bf16" | "int8") {
                out.push((
                    "rerank.precision".into(),
                    format!("precision {:?}: use auto, f32, bf16 or int8", r.precision),
                ));
            }
            if !r.model.join("config.json").is_file() {
                out.push((
                    "rerank.model".into(),
                    format!(
                        "{} is not a model directory (no config.json)",
                        r.model.display()
                    ),
                ));
            }
        }
        if !self.prompt.contains("{context}") || !self.prompt.contains("{question}") {
            out.push((
                "prompt".into(),
                "the prompt needs both {context} and {question}".into(),
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_name_their_key_paths() {
        let config: RagConfig = serde_yaml::from_str(
            "collections: [{name: a, k: 0}, {name: a}]\nself_query: {rules: [{field: author, pattern: 'by [A-Z]+'}]}\nprompt: 'no slots'\n",
        )
        .unwrap();
        let problems: Vec<String> = config.problems().into_iter().map(|p| p.0).collect();
        assert_eq!(
            problems,
            [
                "collections.0.k",
                "collections.1.name",
                "self_query.rules.0.pattern",
                "prompt"
            ]
        );
    }

    #[test]
    fn rerank_precision_is_one_of_the_four() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        let problems = |precision: &str| {
            let yaml = format!(
                "collections: [{{name: a}}]\nrerank: {{model: {:?}, precision: {precision}}}\n",
                dir.path().display()
            );
            let config: RagConfig = serde_yaml::from_str(&yaml).unwrap();
            config.problems()
        };
        for fine in ["auto", "f32", "bf16", "int8"] {
            assert_eq!(problems(fine), [], "{fine}");
        }
        assert_eq!(
            problems("fp8"),
            [(
                "rerank.precision".to_string(),
                "precision \"fp8\": use auto, f32, bf16 or int8".to_string()
            )]
        );
    }
}
