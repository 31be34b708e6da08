//! `vector_load`: loads `embeddings` into the vector store (Qdrant Edge under the artifact
//! store by default, a Qdrant server with `url:` or `CAIRN_QDRANT_URL`), one collection per
//! category. Each collection ends up holding exactly this load's chunks: points of chunks
//! that no longer exist (after a re-chunk) are deleted. Its output is a receipt; on a cache hit the receipt is checked against the
//! store (point counts and a sample of ids), so a wiped collection is reloaded instead of
//! silently skipped.

use std::collections::BTreeMap;
use std::time::Instant;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Map};

use super::{InputDecl, Kind, ParamIssue, StepContext, StepError, StepOutputs, VerifyContext};
use crate::documents::Category;
use crate::embed;
use crate::vectorstore::{self, CollectionReceipt, Point, Receipt};

/// The `vector_load` step kind.
pub struct VectorLoadStep;

/// Artifact kind of the receipt.
pub const RECEIPT_KIND: &str = "vector-receipt";

/// Parameters of `vector_load`.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VectorLoadParams {
    /// Qdrant server URL (gRPC, e.g. http://127.0.0.1:6334). Unset: `CAIRN_QDRANT_URL`, else
    /// the embedded Qdrant Edge store under the artifact store. The API key, if any, comes
    /// from `CAIRN_QDRANT_API_KEY`.
    #[serde(default)]
    pub url: Option<String>,
    /// Collection name prefix; collections are `<prefix><category plural>`
    /// (`embedded_articles`, `embedded_posts`, ...).
    #[serde(default = "default_prefix")]
    pub collection_prefix: String,
}

fn default_prefix() -> String {
    "embedded_".into()
}

/// The collection a category loads into.
pub fn collection_name(prefix: &str, category: Category) -> String {
    format!("{prefix}{}", category.collection())
}

#[async_trait]
impl Kind for VectorLoadStep {
    type Params = VectorLoadParams;
    const OUTPUTS: &'static [(&'static str, &'static str)] = &[("receipt", RECEIPT_KIND)];

    fn name(&self) -> &'static str {
        "vector_load"
    }

    fn version(&self) -> String {
        "1".into()
    }

    fn summary(&self) -> &'static str {
        "Load `embeddings` into Qdrant (embedded Qdrant Edge, or a server), one collection per category"
    }

    fn inputs(&self) -> Option<Vec<InputDecl>> {
        Some(vec![InputDecl {
            name: "embeddings".into(),
            kind: embed::KIND.into(),
            required: true,
        }])
    }

    fn external(&self) -> bool {
        true
    }

    fn validate(&self, p: &VectorLoadParams) -> Vec<ParamIssue> {
        let valid = p
            .collection_prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if valid {
            return Vec::new();
        }
        vec![ParamIssue::new(
            "with.collection_prefix",
            format!(
                "collection_prefix {:?} may only hold letters, digits, `_` and `-`",
                p.collection_prefix
            ),
        )]
    }

    async fn verify(&self, p: &VectorLoadParams, ctx: &VerifyContext<'_>) -> Result<(), String> {
        let receipt: Receipt = ctx.read_output("receipt")?;
        let store = vectorstore::open(p.url.as_deref(), ctx.store.root())
            .await
            .map_err(|e| e.to_string())?;
        if store.describe() != receipt.store {
            return Err(format!(
                "the vector store is now {} (was {})",
                store.describe(),
                receipt.store
            ));
        }
        vectorstore::verify(store.as_ref(), &receipt).await
    }

    async fn run(&self, p: &VectorLoadParams, ctx: &StepContext) -> Result<StepOutputs, StepError> {
        let fail = |e: String| StepError::Failed(e);
        let embed_meta = ctx.input_metadata("embeddings")?;
        let dir = ctx.input_path("embeddings")?;
        let embed::Embedded {
            dim,
            vectors,
            chunks,
        } = tokio::task::spawn_blocking(move || embed::Embedded::read(&dir))
            .await
            .map_err(|e| fail(format!("reading embeddings panicked: {e}")))?
            .map_err(fail)?;
        let rows = chunks.len();
        let store = vectorstore::open(p.url.as_deref(), ctx.store.root())
            .await
            .map_err(|e| fail(e.to_string()))?;
        let mut by_collection: BTreeMap<String, Vec<Point>> = BTreeMap::new();
        for (i, c) in chunks.into_iter().enumerate() {
            let mut payload = Map::new();
            payload.insert("chunk_id".into(), json!(c.id));
            payload.insert("document_id".into(), json!(c.document_id));
            payload.insert("category".into(), json!(c.category.as_str()));
            payload.insert("url".into(), json!(c.url));
            payload.insert("title".into(), json!(c.title));
            payload.insert("author".into(), json!(c.author));
            payload.insert("position".into(), json!(c.position));
            payload.insert("token_count".into(), json!(c.token_count));
            payload.insert("text".into(), json!(c.text));
            by_collection
                .entry(collection_name(&p.collection_prefix, c.category))
                .or_default()
                .push(Point {
                    id: vectorstore::point_id(&c.id),
                    vector: vectors[i * dim..(i + 1) * dim].to_vec(),
                    payload,
                });
        }
        ctx.progress.set_length(rows as u64);
        let mut receipt = Receipt {
            store: store.describe(),
            model: embed_meta["model"].as_str().unwrap_or_default().to_string(),
            model_dir: embed_meta["model_dir"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            dim,
            collections: BTreeMap::new(),
        };
        let t0 = Instant::now();
        let mut index_seconds = 0.0;
        let mut stale_removed = 0u64;
        for (name, points) in by_collection {
            if ctx.cancel.is_cancelled() {
                return Err(StepError::Cancelled);
            }
            ctx.progress.set_message(format!("upserting into {name}"));
            store
                .ensure_collection(&name, dim)
                .await
                .map_err(|e| fail(e.to_string()))?;
            let mut ids: Vec<uuid::Uuid> = points.iter().map(|p| p.id).collect();
            ids.sort_unstable();
            ids.dedup();
            let step = (ids.len() / vectorstore::SAMPLE_IDS).max(1);
            let sample_ids: Vec<uuid::Uuid> = ids
                .iter()
                .step_by(step)
                .take(vectorstore::SAMPLE_IDS)
                .copied()
                .collect();
            let n = points.len();
            for batch in chunked(points, 4096) {
                let len = batch.len();
                store
                    .upsert(&name, batch)
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                ctx.progress.inc(len as u64);
            }
            let keep: std::collections::HashSet<uuid::Uuid> = ids.iter().copied().collect();
            let removed = store
                .retain(&name, &keep)
                .await
                .map_err(|e| fail(e.to_string()))?;
            stale_removed += removed;
            ctx.progress.set_message(format!("indexing {name}"));
            let ti = Instant::now();
            store.finish(&name).await.map_err(|e| fail(e.to_string()))?;
            index_seconds += ti.elapsed().as_secs_f64();
            debug_assert!(n >= ids.len());
            receipt.collections.insert(
                name,
                CollectionReceipt {
                    points: ids.len() as u64,
                    sample_ids,
                },
            );
        }
        let seconds = t0.elapsed().as_secs_f64();
        let bytes = serde_json::to_vec_pretty(&receipt).expect("receipt serializes");
        std::fs::write(ctx.output_path("receipt"), bytes)
            .map_err(|e| fail(format!("writing the receipt: {e}")))?;
        let upsert_seconds = (seconds - index_seconds).max(1e-9);
        let meta = json!({
            "store": receipt.store,
            "model": receipt.model,
            "dim": dim,
            "points": rows,
            "collections": receipt.collections.iter().map(|(k, v)| (k.clone(), v.points)).collect::<BTreeMap<_, _>>(),
            "seconds": (seconds * 1000.0).round() / 1000.0,
            "index_seconds": (index_seconds * 1000.0).round() / 1000.0,
            "stale_points_removed": stale_removed,
            "points_per_second": (rows as f64 / upsert_seconds).round(),
        });
        let note = format!(
            "{rows} points into {} collection(s) of {}, {:.0} points/s",
            receipt.collections.len(),
            receipt.store,
            rows as f64 / upsert_seconds
        );
        ctx.single_output("receipt", meta, note)
    }
}

fn chunked<T>(mut items: Vec<T>, size: usize) -> Vec<Vec<T>> {
    let mut out = Vec::new();
    while !items.is_empty() {
        let rest = items.split_off(items.len().min(size));
        out.push(items);
        items = rest;
    }
    out
}
