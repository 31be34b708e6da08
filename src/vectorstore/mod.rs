//! Vector stores: one collection per category, cosine distance, point ids derived from
//! chunk ids (reloads are idempotent). Qdrant Edge in-process under the artifact store by
//! default; a Qdrant server through qdrant-client when a URL is given.

#[cfg(feature = "qdrant-edge")]
pub mod edge;
#[cfg(feature = "qdrant")]
pub mod server;

use std::path::Path;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use thiserror::Error;

/// Environment variable naming a Qdrant server when the pipeline gives none.
pub const URL_ENV: &str = "CAIRN_QDRANT_URL";
/// Environment variable with the server's API key.
pub const API_KEY_ENV: &str = "CAIRN_QDRANT_API_KEY";

/// Payload fields with a keyword index.
pub const INDEXED_FIELDS: [&str; 2] = ["category", "author"];

/// Why a vector-store operation failed.
#[derive(Debug, Error)]
pub enum VectorError {
    /// The collection does not exist.
    #[error("collection `{0}` does not exist")]
    NoCollection(String),
    /// The collection holds vectors of another width.
    #[error("collection `{name}` holds {existing}-dimensional vectors, not {wanted}; load into another collection (`collection_prefix`) or delete it")]
    DimensionMismatch {
        /// Collection.
        name: String,
        /// Its width.
        existing: usize,
        /// The width offered.
        wanted: usize,
    },
    /// The backend failed.
    #[error("{0}")]
    Backend(String),
    /// The backend is not in this build.
    #[error("{0}")]
    NotBuilt(String),
}

/// One point to store.
#[derive(Clone, Debug)]
pub struct Point {
    /// UUID derived from the chunk id.
    pub id: uuid::Uuid,
    /// The vector.
    pub vector: Vec<f32>,
    /// Text and metadata.
    pub payload: Map<String, Value>,
}

/// One search result.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Hit {
    /// Point id.
    pub id: String,
    /// Cosine similarity.
    pub score: f32,
    /// Stored payload.
    pub payload: Value,
}

/// The point id of a chunk: a UUID v5 of the chunk id, so the same chunk always lands on
/// the same point.
pub fn point_id(chunk_id: &str) -> uuid::Uuid {
    const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6361_6972_6e2d_4000_8000_6368_756e_6b73);
    uuid::Uuid::new_v5(&NAMESPACE, chunk_id.as_bytes())
}

/// A vector database.
#[async_trait]
pub trait VectorStore: Send + Sync {
    /// Where it is, for receipts and messages (`qdrant-edge:/path`, `qdrant:http://...`).
    fn describe(&self) -> String;
    /// Creates the collection for `dim`-wide cosine vectors with payload indexes, or
    /// checks that the existing one has that width.
    async fn ensure_collection(&self, name: &str, dim: usize) -> Result<(), VectorError>;
    /// Inserts or replaces points.
    async fn upsert(&self, name: &str, points: Vec<Point>) -> Result<(), VectorError>;
    /// Deletes every point whose id is not in `keep` (chunks that no longer exist after
    /// a re-chunk); returns how many went.
    async fn retain(
        &self,
        name: &str,
        keep: &std::collections::HashSet<uuid::Uuid>,
    ) -> Result<u64, VectorError>;
    /// Makes the writes durable and searchable (flush, build indexes).
    async fn finish(&self, name: &str) -> Result<(), VectorError>;
    /// Exact point count; `None` when the collection does not exist.
    async fn count(&self, name: &str) -> Result<Option<u64>, VectorError>;
    /// How many of `ids` exist.
    async fn count_existing(&self, name: &str, ids: &[uuid::Uuid]) -> Result<usize, VectorError>;
    /// The `k` nearest points, optionally filtered by exact payload matches.
    async fn search(
        &self,
        name: &str,
        vector: Vec<f32>,
        k: usize,
        filter: &[(String, String)],
    ) -> Result<Vec<Hit>, VectorError>;
}

/// Opens the store: a Qdrant server when `url` (or [`URL_ENV`]) is set, else Qdrant Edge
/// under `<store_root>/vectors`.
pub async fn open(
    url: Option<&str>,
    store_root: &Path,
) -> Result<Box<dyn VectorStore>, VectorError> {
    let env_url = std::env::var(URL_ENV).ok().filter(|u| !u.is_empty());
    match url.map(str::to_string).or(env_url) {
        Some(url) => open_server(&url).await,
        // Absolute, so the receipt names the same store whatever directory cairn ran in.
        None => open_edge(
            &store_root
                .canonicalize()
                .unwrap_or_else(|_| store_root.to_path_buf())
                .join("vectors"),
        ),
    }
}

#[cfg(feature = "qdrant")]
async fn open_server(url: &str) -> Result<Box<dyn VectorStore>, VectorError> {
    let key = std::env::var(API_KEY_ENV).ok().filter(|k| !k.is_empty());
    Ok(Box::new(server::ServerStore::connect(url, key)?))
}

#[cfg(not(feature = "qdrant"))]
async fn open_server(url: &str) -> Result<Box<dyn VectorStore>, VectorError> {
    Err(VectorError::NotBuilt(format!(
        "a Qdrant server ({}) was requested but this cairn was built without the `qdrant` feature; rebuild with `cargo build --release --features qdrant`, or unset the URL to use the embedded Qdrant Edge store",
        crate::docstore::redact(url)
    )))
}

#[cfg(feature = "qdrant-edge")]
fn open_edge(dir: &Path) -> Result<Box<dyn VectorStore>, VectorError> {
    Ok(Box::new(edge::EdgeStore::new(dir)))
}

#[cfg(not(feature = "qdrant-edge"))]
fn open_edge(_dir: &Path) -> Result<Box<dyn VectorStore>, VectorError> {
    Err(VectorError::NotBuilt(
        "this cairn was built without the `qdrant-edge` feature (the embedded vector store); rebuild with default features, or set CAIRN_QDRANT_URL and build with `--features qdrant`".into(),
    ))
}

/// What `vector_load` wrote, kept as its receipt artifact and checked on cache hits.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Receipt {
    /// [`VectorStore::describe`] of the store written.
    pub store: String,
    /// The embedding model (for `cairn query`).
    pub model: String,
    /// Its directory when loaded.
    pub model_dir: String,
    /// Vector width.
    pub dim: usize,
    /// Per collection: points written and a sample of their ids.
    pub collections: std::collections::BTreeMap<String, CollectionReceipt>,
}

impl Receipt {
    /// The embedding model folder the collections were loaded with, when recorded.
    pub fn embedder(&self) -> Option<std::path::PathBuf> {
        (!self.model_dir.is_empty()).then(|| std::path::PathBuf::from(&self.model_dir))
    }
}

/// One collection in a [`Receipt`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CollectionReceipt {
    /// Distinct points written.
    pub points: u64,
    /// Up to [`SAMPLE_IDS`] ids, spread over the collection.
    pub sample_ids: Vec<uuid::Uuid>,
}

/// Ids checked per collection on a cache hit.
pub const SAMPLE_IDS: usize = 32;

/// Checks that the store still holds what the receipt says; `Err` says what differs.
pub async fn verify(store: &dyn VectorStore, receipt: &Receipt) -> Result<(), String> {
    for (name, c) in &receipt.collections {
        match store.count(name).await.map_err(|e| e.to_string())? {
            None => {
                return Err(format!(
                    "collection {name} is gone from {}",
                    store.describe()
                ))
            }
            Some(n) if n < c.points => {
                return Err(format!(
                    "collection {name} holds {n} points, expected {}",
                    c.points
                ))
            }
            Some(_) => {}
        }
        let present = store
            .count_existing(name, &c.sample_ids)
            .await
            .map_err(|e| e.to_string())?;
        if present < c.sample_ids.len() {
            return Err(format!(
                "collection {name} lacks {} of {} sampled points",
                c.sample_ids.len() - present,
                c.sample_ids.len()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn point_ids_are_stable_and_distinct() {
        assert_eq!(point_id("abc"), point_id("abc"));
        assert_ne!(point_id("abc"), point_id("abd"));
        assert_eq!(point_id("abc").get_version_num(), 5);
    }
}
