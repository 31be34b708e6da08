//! Qdrant Edge: Qdrant's engine in-process, one shard directory per collection. The API is
//! blocking, so every call goes through `spawn_blocking`. Shards stay open for the life
//! of the store value; a file lock per collection keeps two processes from writing one
//! shard at once.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use qdrant_edge::{
    Condition, CountRequest, Distance, EdgeConfigBuilder, EdgeShard, EdgeVectorParamsBuilder,
    FieldCondition, Filter, Match, NamedQuery, PayloadFieldSchema, PayloadSchemaType, PointId,
    PointInsertOperations, PointOperations, PointStruct, QueryEnum, ScrollRequest, SearchRequest,
    UpdateOperation, WithPayloadInterface, WithVector,
};

use super::{Hit, Point, VectorError, VectorStore, INDEXED_FIELDS};

/// Points per update operation.
const BATCH: usize = 1024;

/// Collections under one directory.
pub struct EdgeStore {
    dir: PathBuf,
    open: Mutex<HashMap<String, Arc<OpenShard>>>,
}

struct OpenShard {
    shard: EdgeShard,
    _lock: std::fs::File,
}

fn backend(e: impl std::fmt::Display) -> VectorError {
    VectorError::Backend(format!("qdrant-edge: {e}"))
}

fn valid_name(name: &str) -> Result<(), VectorError> {
    if name.is_empty()
        || name.len() > 128
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(VectorError::Backend(format!(
            "invalid collection name {name:?}: use letters, digits, `_` and `-`"
        )));
    }
    Ok(())
}

fn edge_id(id: uuid::Uuid) -> PointId {
    PointId::Uuid(qdrant_edge::external::uuid::Uuid::from_bytes(
        id.into_bytes(),
    ))
}

impl EdgeStore {
    /// A store rooted at `dir` (created on first write).
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            open: Mutex::new(HashMap::new()),
        }
    }

    fn shard_dir(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Opens (or with `create_dim`, creates) a collection's shard.
    fn shard(
        &self,
        name: &str,
        create_dim: Option<usize>,
    ) -> Result<Option<Arc<OpenShard>>, VectorError> {
        valid_name(name)?;
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = open.get(name) {
            return Ok(Some(s.clone()));
        }
        let dir = self.shard_dir(name);
        let exists = dir.join("edge_config.json").exists();
        if !exists && create_dim.is_none() {
            return Ok(None);
        }
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| backend(format!("{}: {e}", self.dir.display())))?;
        let lock_path = self.dir.join(format!("{name}.lock"));
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| backend(format!("{}: {e}", lock_path.display())))?;
        fs4::fs_std::FileExt::lock_exclusive(&lock)
            .map_err(|e| backend(format!("locking {}: {e}", lock_path.display())))?;
        let shard = if exists {
            EdgeShard::load(&dir, None).map_err(backend)?
        } else {
            let dim = create_dim.unwrap_or_default();
            let staging = self.dir.join(format!(".{name}.creating"));
            let _ = std::fs::remove_dir_all(&staging);
            std::fs::create_dir_all(&staging)
                .map_err(|e| backend(format!("{}: {e}", staging.display())))?;
            let config = EdgeConfigBuilder::new()
                .vector(
                    "",
                    EdgeVectorParamsBuilder::new(dim, Distance::Cosine).build(),
                )
                .build();
            let shard = EdgeShard::new(&staging, config).map_err(backend)?;
            for field in INDEXED_FIELDS {
                shard
                    .update(UpdateOperation::FieldIndexOperation(
                        qdrant_edge::FieldIndexOperations::CreateIndex(qdrant_edge::CreateIndex {
                            field_name: field
                                .try_into()
                                .map_err(|_| backend(format!("bad field {field}")))?,
                            field_schema: Some(PayloadFieldSchema::FieldType(
                                PayloadSchemaType::Keyword,
                            )),
                        }),
                    ))
                    .map_err(backend)?;
            }
            shard.flush();
            drop(shard);
            // A half-created shard never appears under the collection's name.
            std::fs::rename(&staging, &dir)
                .map_err(|e| backend(format!("{}: {e}", dir.display())))?;
            EdgeShard::load(&dir, None).map_err(backend)?
        };
        let opened = Arc::new(OpenShard { shard, _lock: lock });
        open.insert(name.to_string(), opened.clone());
        Ok(Some(opened))
    }

    fn dim_of(shard: &EdgeShard) -> Option<usize> {
        shard.config().vectors.get("").map(|v| v.size)
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, VectorError> + Send + 'static,
) -> Result<T, VectorError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| backend(format!("worker panicked: {e}")))?
}

#[async_trait]
impl VectorStore for EdgeStore {
    fn describe(&self) -> String {
        format!("qdrant-edge:{}", self.dir.display())
    }

    async fn ensure_collection(&self, name: &str, dim: usize) -> Result<(), VectorError> {
        let shard = self.shard(name, Some(dim))?.expect("created");
        match Self::dim_of(&shard.shard) {
            Some(existing) if existing != dim => Err(VectorError::DimensionMismatch {
                name: name.to_string(),
                existing,
                wanted: dim,
            }),
            _ => Ok(()),
        }
    }

    async fn upsert(&self, name: &str, points: Vec<Point>) -> Result<(), VectorError> {
        let shard = self
            .shard(name, None)?
            .ok_or_else(|| VectorError::NoCollection(name.to_string()))?;
        blocking(move || {
            let mut points = points;
            while !points.is_empty() {
                let rest = points.split_off(points.len().min(BATCH));
                let batch: Vec<_> = points
                    .into_iter()
                    .map(|p| {
                        PointStruct::new(
                            edge_id(p.id),
                            p.vector,
                            serde_json::Value::Object(p.payload),
                        )
                        .into()
                    })
                    .collect();
                shard
                    .shard
                    .update(UpdateOperation::PointOperation(
                        PointOperations::UpsertPoints(PointInsertOperations::PointsList(batch)),
                    ))
                    .map_err(backend)?;
                points = rest;
            }
            Ok(())
        })
        .await
    }

    async fn retain(&self, name: &str, keep: &HashSet<uuid::Uuid>) -> Result<u64, VectorError> {
        let shard = self
            .shard(name, None)?
            .ok_or_else(|| VectorError::NoCollection(name.to_string()))?;
        let keep: HashSet<PointId> = keep.iter().map(|&id| edge_id(id)).collect();
        blocking(move || {
            let mut stale = Vec::new();
            let mut offset = None;
            loop {
                let (page, next) = shard
                    .shard
                    .scroll(ScrollRequest {
                        offset,
                        limit: Some(4096),
                        filter: None,
                        with_payload: Some(WithPayloadInterface::Bool(false)),
                        with_vector: WithVector::Bool(false),
                        order_by: None,
                    })
                    .map_err(backend)?;
                stale.extend(
                    page.into_iter()
                        .map(|r| r.id)
                        .filter(|id| !keep.contains(id)),
                );
                match next {
                    Some(n) => offset = Some(n),
                    None => break,
                }
            }
            let removed = stale.len() as u64;
            for ids in stale.chunks(BATCH) {
                shard
                    .shard
                    .update(UpdateOperation::PointOperation(
                        PointOperations::DeletePoints { ids: ids.to_vec() },
                    ))
                    .map_err(backend)?;
            }
            Ok(removed)
        })
        .await
    }

    async fn finish(&self, name: &str) -> Result<(), VectorError> {
        let shard = self
            .shard(name, None)?
            .ok_or_else(|| VectorError::NoCollection(name.to_string()))?;
        blocking(move || {
            shard.shard.optimize().map_err(backend)?;
            shard.shard.flush();
            Ok(())
        })
        .await
    }

    async fn count(&self, name: &str) -> Result<Option<u64>, VectorError> {
        let Some(shard) = self.shard(name, None)? else {
            return Ok(None);
        };
        blocking(move || {
            let n = shard
                .shard
                .count(CountRequest {
                    filter: None,
                    exact: true,
                })
                .map_err(backend)?;
            Ok(Some(n as u64))
        })
        .await
    }

    async fn count_existing(&self, name: &str, ids: &[uuid::Uuid]) -> Result<usize, VectorError> {
        let Some(shard) = self.shard(name, None)? else {
            return Ok(0);
        };
        let ids: Vec<PointId> = ids.iter().map(|&id| edge_id(id)).collect();
        blocking(move || {
            let found = shard
                .shard
                .retrieve(
                    &ids,
                    Some(WithPayloadInterface::Bool(false)),
                    Some(WithVector::Bool(false)),
                )
                .map_err(backend)?;
            Ok(found.len())
        })
        .await
    }

    async fn search(
        &self,
        name: &str,
        vector: Vec<f32>,
        k: usize,
        filter: &[(String, String)],
    ) -> Result<Vec<Hit>, VectorError> {
        let shard = self
            .shard(name, None)?
            .ok_or_else(|| VectorError::NoCollection(name.to_string()))?;
        let mut must = Vec::new();
        for (key, value) in filter {
            must.push(Condition::Field(FieldCondition::new_match(
                key.as_str()
                    .try_into()
                    .map_err(|_| backend(format!("bad filter key {key:?}")))?,
                Match::Value(qdrant_edge::MatchValue {
                    value: qdrant_edge::ValueVariants::String(value.clone()),
                }),
            )));
        }
        let filter = (!must.is_empty()).then(|| Filter {
            should: None,
            min_should: None,
            must: Some(must),
            must_not: None,
        });
        blocking(move || {
            let points = shard
                .shard
                .search(SearchRequest {
                    query: QueryEnum::Nearest(NamedQuery {
                        query: vector.into(),
                        using: None,
                    }),
                    filter,
                    params: None,
                    limit: k,
                    offset: 0,
                    with_payload: Some(WithPayloadInterface::Bool(true)),
                    with_vector: Some(WithVector::Bool(false)),
                    score_threshold: None,
                })
                .map_err(backend)?;
            Ok(points
                .into_iter()
                .map(|p| Hit {
                    id: p.id.to_string(),
                    score: p.score,
                    payload: p
                        .payload
                        .map(|pl| serde_json::to_value(pl).unwrap_or_default())
                        .unwrap_or_default(),
                })
                .collect())
        })
        .await
    }
}
