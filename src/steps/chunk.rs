//! `chunk`: splits `documents` into token-bounded `chunks` with the embedding model's own
//! tokenizer (see [`crate::chunk`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{InputDecl, Kind, ParamIssue, StepContext, StepError, StepOutputs};
use crate::chunk::{self, Chunk, Settings};
use crate::documents::{self, Category, Document};
use crate::models;

/// The model `chunk`, `embed` and `cairn query` use when `model:` is not given: the one
/// `scripts/setup` installs.
pub const DEFAULT_MODEL: &str = ".models/all-MiniLM-L6-v2";

/// The `chunk` step kind.
pub struct ChunkStep;

/// Parameters of `chunk`.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChunkParams {
    /// The embedding model whose tokenizer counts tokens and whose max sequence length caps
    /// chunk size: a Hugging Face model directory, or a model id in the local HF cache.
    #[serde(default = "default_model")]
    pub model: String,
    /// Tokens per chunk for every category (overrides the built-in per-category defaults:
    /// posts 250, repositories 1500, articles by sentence packing). Always capped at the
    /// model's max sequence length minus its special tokens.
    #[serde(default)]
    pub size: Option<usize>,
    /// Tokens shared by consecutive chunks, for every category.
    #[serde(default)]
    pub overlap: Option<usize>,
    /// Per-category overrides, e.g. `{article: {min_chars: 800, max_chars: 1600}, post: {size: 200}}`.
    #[serde(default)]
    pub categories: BTreeMap<Category, CategoryParams>,
}

/// How one category is chunked.
#[derive(Clone, Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CategoryParams {
    /// Tokens per chunk.
    #[serde(default)]
    pub size: Option<usize>,
    /// Tokens shared by consecutive chunks.
    #[serde(default)]
    pub overlap: Option<usize>,
    /// Pack whole sentences into extracts of at least this many characters (turns
    /// sentence packing on; articles have it by default with 1000).
    #[serde(default)]
    pub min_chars: Option<usize>,
    /// ... and at most this many (default 2000).
    #[serde(default)]
    pub max_chars: Option<usize>,
    /// `false` turns sentence packing off (plain token windows).
    #[serde(default)]
    pub sentences: Option<bool>,
}

fn default_model() -> String {
    DEFAULT_MODEL.to_string()
}

impl ChunkParams {
    fn settings(&self, category: Category, max_tokens: usize) -> Settings {
        let mut s = Settings::default_for(category);
        if let Some(size) = self.size {
            s.size = size;
        }
        if let Some(overlap) = self.overlap {
            s.overlap = overlap;
        }
        if let Some(c) = self.categories.get(&category) {
            if let Some(size) = c.size {
                s.size = size;
            }
            if let Some(overlap) = c.overlap {
                s.overlap = overlap;
            }
            if c.min_chars.is_some() || c.max_chars.is_some() {
                let (min, max) = s.sentence_pack.unwrap_or((1000, 2000));
                s.sentence_pack = Some((c.min_chars.unwrap_or(min), c.max_chars.unwrap_or(max)));
            }
            if c.sentences == Some(false) {
                s.sentence_pack = None;
            } else if c.sentences == Some(true) && s.sentence_pack.is_none() {
                s.sentence_pack = Some((1000, 2000));
            }
        }
        s.capped(max_tokens)
    }

    fn validate(&self) -> Result<(), ParamIssue> {
        let check = |path: String, size: Option<usize>, overlap: Option<usize>| {
            if size == Some(0) {
                return Err(ParamIssue::new(path, "size must be at least 1 token"));
            }
            if let (Some(size), Some(overlap)) = (size, overlap) {
                if overlap >= size {
                    return Err(ParamIssue::new(
                        path,
                        format!("overlap {overlap} must be smaller than size {size}"),
                    ));
                }
            }
            Ok(())
        };
        check("with.size".into(), self.size, self.overlap)?;
        for (cat, c) in &self.categories {
            check(
                format!("with.categories.{}", cat.as_str()),
                c.size.or(self.size),
                c.overlap.or(self.overlap),
            )?;
            if let (Some(min), Some(max)) = (c.min_chars, c.max_chars) {
                if min > max {
                    return Err(ParamIssue::new(
                        format!("with.categories.{}.min_chars", cat.as_str()),
                        format!("min_chars {min} is above max_chars {max}"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Resolves `model:` for the content-input hook shared by `chunk` and `embed`.
pub fn model_content_input(model: &str, cwd: &Path) -> Result<Vec<(String, PathBuf)>, String> {
    let dir = models::resolve(model, cwd).map_err(|e| e.to_string())?;
    Ok(vec![("model".to_string(), dir)])
}

#[async_trait]
impl Kind for ChunkStep {
    type Params = ChunkParams;
    const OUTPUTS: &'static [(&'static str, &'static str)] = &[("chunks", chunk::KIND)];

    fn name(&self) -> &'static str {
        "chunk"
    }

    fn version(&self) -> String {
        "1".into()
    }

    fn summary(&self) -> &'static str {
        "Split `documents` into token-bounded `chunks` with the embedding model's tokenizer"
    }

    fn inputs(&self) -> Option<Vec<InputDecl>> {
        Some(vec![InputDecl {
            name: "documents".into(),
            kind: documents::KIND.into(),
            required: true,
        }])
    }

    fn content_inputs(
        &self,
        params: &Self::Params,
        cwd: &Path,
    ) -> Result<Vec<(String, PathBuf)>, String> {
        model_content_input(&params.model, cwd)
    }

    fn validate(&self, p: &ChunkParams) -> Vec<ParamIssue> {
        p.validate().err().into_iter().collect()
    }

    async fn run(&self, p: &ChunkParams, ctx: &StepContext) -> Result<StepOutputs, StepError> {
        // Moved into the tokenizing thread.
        let p = p.clone();
        let model_dir =
            models::resolve(&p.model, &ctx.cwd).map_err(|e| StepError::Input(e.to_string()))?;
        let input = ctx.input_path("documents")?;
        let out = ctx.output_path("chunks");
        let progress = ctx.progress.clone();
        let cancel = ctx.cancel.clone();
        let (meta, note) =
            tokio::task::spawn_blocking(move || -> Result<(Value, String), StepError> {
                let fail = |e: String| StepError::Failed(e);
                let tokenizer =
                    models::load_tokenizer(&model_dir).map_err(|e| fail(e.to_string()))?;
                let config =
                    models::sentence_config(&model_dir).map_err(|e| fail(e.to_string()))?;
                let special = tokenizer
                    .get_post_processor()
                    .map(|pp| tokenizers::PostProcessor::added_tokens(pp, false))
                    .unwrap_or(0);
                let max_tokens = config.max_seq_length.saturating_sub(special).max(1);
                let docs: Vec<Document> = documents::read_jsonl(&input).map_err(fail)?;
                progress.set_length(docs.len() as u64);
                progress.set_message("tokenizing");
                let t0 = Instant::now();
                let results = chunk_all(&tokenizer, &docs, &p, max_tokens, &progress, &cancel)?;
                let seconds = t0.elapsed().as_secs_f64();
                let tokens: usize = results.iter().map(|c| c.token_count).sum();
                documents::write_jsonl(&out, &results)
                    .map_err(|e| fail(format!("writing chunks: {e}")))?;
                let settings: BTreeMap<&str, Settings> = Category::ALL
                    .iter()
                    .map(|&c| (c.as_str(), p.settings(c, max_tokens)))
                    .collect();
                let note = format!(
                    "{} chunks from {} documents, {:.0}k tokens/s",
                    results.len(),
                    docs.len(),
                    tokens as f64 / seconds.max(1e-9) / 1000.0
                );
                Ok((
                    json!({
                        "chunks": results.len(),
                        "documents": docs.len(),
                        "tokens": tokens,
                        "model": models::display_name_for(&p.model, &model_dir),
                        "max_tokens": max_tokens,
                        "settings": settings,
                        "token_counts": chunk::token_stats(&results),
                        "tokens_per_second": (tokens as f64 / seconds.max(1e-9)).round(),
                    }),
                    note,
                ))
            })
            .await
            .map_err(|e| StepError::Failed(format!("chunk panicked: {e}")))??;
        ctx.single_output("chunks", meta, note)
    }
}

/// Chunks every document in parallel, keeping document order.
pub fn chunk_all(
    tokenizer: &tokenizers::Tokenizer,
    docs: &[Document],
    params: &ChunkParams,
    max_tokens: usize,
    progress: &super::Progress,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<Vec<Chunk>, StepError> {
    use rayon::prelude::*;
    let per_doc: Vec<Result<Vec<Chunk>, StepError>> = docs
        .par_iter()
        .map(|d| {
            if cancel.is_cancelled() {
                return Err(StepError::Cancelled);
            }
            let chunks =
                chunk::chunk_document(tokenizer, d, params.settings(d.category, max_tokens))
                    .map_err(StepError::Failed);
            progress.inc(1);
            chunks
        })
        .collect();
    let mut all = Vec::new();
    for r in per_doc {
        all.extend(r?);
    }
    Ok(all)
}
