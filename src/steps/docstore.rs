//! `docstore`: loads a `documents` artifact into the document store (embedded SQLite by
//! default, MongoDB with `docstore: {uri: mongodb://...}` in the pipeline or
//! `CAIRN_MONGODB_URI`), one collection per category, upserted by URL. Its output is a
//! receipt; on a cache hit the receipt is checked against the store, so a wiped or
//! switched store is reloaded instead of silently skipped.

use std::collections::BTreeMap;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;

use super::{InputDecl, Kind, StepContext, StepError, StepOutputs, VerifyContext};
use crate::docstore::{self, CollectionReceipt, Receipt};
use crate::documents::{self, Category};

/// The `docstore` step kind.
pub struct DocstoreStep;

/// Parameters of `docstore`.
#[derive(Clone, Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DocstoreParams {
    /// Collection name prefix (`blog_` gives `blog_articles`, `blog_posts`, ...).
    #[serde(default)]
    pub collection_prefix: String,
}

const RECEIPT: &str = "receipt";

#[async_trait]
impl Kind for DocstoreStep {
    type Params = DocstoreParams;
    const OUTPUTS: &'static [(&'static str, &'static str)] = &[(RECEIPT, "docstore-receipt")];

    fn name(&self) -> &'static str {
        "docstore"
    }

    fn version(&self) -> String {
        "1".into()
    }

    fn summary(&self) -> &'static str {
        "Load `documents` into the document store (embedded SQLite or MongoDB), one collection per category"
    }

    fn inputs(&self) -> Option<Vec<InputDecl>> {
        Some(vec![InputDecl {
            name: "documents".into(),
            kind: documents::KIND.into(),
            required: true,
        }])
    }

    fn external(&self) -> bool {
        true
    }

    async fn verify(
        &self,
        _params: &DocstoreParams,
        ctx: &VerifyContext<'_>,
    ) -> Result<(), String> {
        let receipt: Receipt = ctx.read_output(RECEIPT)?;
        let store = docstore::open(ctx.docstore_uri, ctx.store.root())
            .await
            .map_err(|e| e.to_string())?;
        if store.describe() != receipt.store {
            return Err(format!(
                "the document store is now {} (was {})",
                store.describe(),
                receipt.store
            ));
        }
        docstore::verify(store.as_ref(), &receipt).await
    }

    async fn run(&self, p: &DocstoreParams, ctx: &StepContext) -> Result<StepOutputs, StepError> {
        let input = ctx.input_path("documents")?;
        let docs: Vec<documents::Document> =
            documents::read_jsonl(&input).map_err(StepError::Failed)?;
        let store = docstore::open(ctx.docstore_uri.as_deref(), ctx.store.root())
            .await
            .map_err(|e| StepError::Failed(e.to_string()))?;
        let mut by_collection: BTreeMap<String, Vec<documents::Document>> = BTreeMap::new();
        for d in docs {
            by_collection
                .entry(format!(
                    "{}{}",
                    p.collection_prefix,
                    d.category.collection()
                ))
                .or_default()
                .push(d);
        }
        let mut receipt = Receipt {
            store: store.describe(),
            collections: BTreeMap::new(),
        };
        let mut totals = json!({});
        ctx.progress
            .set_length(by_collection.values().map(|v| v.len() as u64).sum());
        for (collection, docs) in &by_collection {
            if ctx.cancel.is_cancelled() {
                return Err(StepError::Cancelled);
            }
            ctx.progress
                .set_message(format!("upserting into {collection}"));
            let stats = store
                .upsert(collection, docs)
                .await
                .map_err(|e| StepError::Failed(e.to_string()))?;
            ctx.progress.inc(docs.len() as u64);
            let ids: BTreeMap<String, String> =
                docs.iter().map(|d| (d.url.clone(), d.id.clone())).collect();
            totals[collection] = json!(stats);
            receipt.collections.insert(
                collection.clone(),
                CollectionReceipt {
                    documents: ids.len() as u64,
                    digest: docstore::digest_ids(&ids),
                    ids,
                },
            );
        }
        let bytes = serde_json::to_vec_pretty(&receipt).expect("receipt serializes");
        std::fs::write(ctx.output_path(RECEIPT), bytes)
            .map_err(|e| StepError::Failed(format!("writing the receipt: {e}")))?;
        let meta = json!({
            "store": receipt.store,
            "collections": receipt.collections.iter().map(|(k, v)| (k.clone(), v.documents)).collect::<BTreeMap<_, _>>(),
            "upserts": totals,
            "categories": Category::ALL.iter().map(|c| c.collection()).collect::<Vec<_>>(),
        });
        let note = format!(
            "{} documents into {}",
            receipt
                .collections
                .values()
                .map(|c| c.documents)
                .sum::<u64>(),
            receipt.store
        );
        ctx.single_output(RECEIPT, meta, note)
    }
}
