//! `semantic_dedup`: drops chunks whose embedding is within a cosine threshold of an
//! earlier kept chunk of the same category (see [`crate::embed::dedup`]), the semantic
//! complement of `clean`'s MinHash near-duplicates: it catches rephrasings that share
//! few words. Output: an `embeddings` artifact (the kept rows and their chunks) that
//! `vector_load` takes in place of `embed`'s, with the embedder's metadata carried over.

use std::collections::BTreeMap;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{InputDecl, Kind, ParamIssue, StepContext, StepError, StepOutputs};
use crate::documents;
use crate::embed::{self, dedup};

/// The `semantic_dedup` step kind.
pub struct SemanticDedupStep;

/// Parameters of `semantic_dedup`.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SemanticDedupParams {
    /// Cosine similarity at or above which a chunk duplicates an earlier kept chunk of
    /// its category (0 < threshold <= 1; 0.95 catches rephrasings of one passage).
    #[serde(default = "default_threshold")]
    pub threshold: f64,
}

fn default_threshold() -> f64 {
    0.95
}

/// Dropped chunks listed in the metadata.
const SAMPLES: usize = 20;

#[async_trait]
impl Kind for SemanticDedupStep {
    type Params = SemanticDedupParams;
    const OUTPUTS: &'static [(&'static str, &'static str)] = &[("embeddings", embed::KIND)];

    fn name(&self) -> &'static str {
        "semantic_dedup"
    }

    fn version(&self) -> String {
        "1".into()
    }

    fn summary(&self) -> &'static str {
        "Drop chunks whose embedding is within a cosine threshold of an earlier one of their category"
    }

    fn inputs(&self) -> Option<Vec<InputDecl>> {
        Some(vec![InputDecl {
            name: "embeddings".into(),
            kind: embed::KIND.into(),
            required: true,
        }])
    }

    fn validate(&self, p: &SemanticDedupParams) -> Vec<ParamIssue> {
        if p.threshold > 0.0 && p.threshold <= 1.0 {
            return Vec::new();
        }
        vec![ParamIssue::new(
            "with.threshold",
            format!("threshold {} is outside 0 (exclusive) .. 1", p.threshold),
        )]
    }

    async fn run(
        &self,
        p: &SemanticDedupParams,
        ctx: &StepContext,
    ) -> Result<StepOutputs, StepError> {
        let input_meta = ctx.input_metadata("embeddings")?;
        let dir = ctx.input_path("embeddings")?;
        let out = ctx.output_path("embeddings");
        let threshold = p.threshold as f32;
        let progress = ctx.progress.clone();
        let (kept, dropped, samples) = tokio::task::spawn_blocking(move || {
            let embedded = embed::Embedded::read(&dir)?;
            let (dim, chunks) = (embedded.dim, &embedded.chunks);
            let rows = chunks.len();
            let group: Vec<usize> = chunks.iter().map(|c| c.category as usize).collect();
            progress.set_length(rows as u64);
            progress.set_message(format!("comparing {rows} vectors"));
            let verdicts =
                dedup::near_duplicates(&embedded.vectors, dim, &group, threshold, &|n| {
                    progress.bar().set_position(n as u64)
                });
            let mut kept_vectors = Vec::with_capacity(embedded.vectors.len());
            let mut kept: BTreeMap<&'static str, usize> = BTreeMap::new();
            let mut dropped: BTreeMap<&'static str, usize> = BTreeMap::new();
            let mut samples = Vec::new();
            let mut kept_chunks = Vec::new();
            for (i, (chunk, verdict)) in chunks.iter().zip(&verdicts).enumerate() {
                let category = chunk.category.as_str();
                match verdict {
                    dedup::Verdict::Kept => {
                        *kept.entry(category).or_default() += 1;
                        kept_vectors.extend_from_slice(embedded.vector(i));
                        kept_chunks.push(chunk);
                    }
                    dedup::Verdict::Duplicate { of, cosine } => {
                        *dropped.entry(category).or_default() += 1;
                        if samples.len() < SAMPLES {
                            samples.push(json!({
                                "chunk": chunk.id, "of": chunks[*of].id,
                                "cosine": (f64::from(*cosine) * 1e4).round() / 1e4,
                                "text": crate::dataset::snippet(&chunk.text, 160),
                            }));
                        }
                    }
                }
            }
            std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
            embed::write_tensor(&out.join(embed::TENSOR_FILE), &kept_vectors, dim)?;
            documents::write_jsonl(&out.join(embed::CHUNKS_FILE), kept_chunks)
                .map_err(|e| format!("writing {}: {e}", embed::CHUNKS_FILE))?;
            Ok((kept, dropped, samples))
        })
        .await
        .map_err(|e| StepError::Failed(format!("semantic_dedup panicked: {e}")))?
        .map_err(StepError::Failed)?;
        let (n_kept, n_dropped) = (
            kept.values().sum::<usize>(),
            dropped.values().sum::<usize>(),
        );
        // The embedder's description travels with the vectors (vector_load and the RAG
        // server read the model from it).
        let mut meta = match input_meta {
            Value::Object(m) => Value::Object(m),
            _ => json!({}),
        };
        meta["count"] = json!(n_kept);
        meta["by_category"] = json!(kept);
        meta["semantic_dedup"] = json!({
            "threshold": p.threshold,
            "input": ctx.inputs["embeddings"].digest.to_string(),
            "kept": kept,
            "dropped": dropped,
            "samples": samples,
        });
        let note = format!(
            "{n_kept} of {} chunks kept, {n_dropped} within cosine {} of an earlier one",
            n_kept + n_dropped,
            p.threshold
        );
        ctx.single_output("embeddings", meta, note)
    }
}
