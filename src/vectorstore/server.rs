//! A Qdrant server through qdrant-client (gRPC, usually port 6334).

use async_trait::async_trait;
use qdrant_client::qdrant::{
    vectors_config, Condition, CountPointsBuilder, CreateCollectionBuilder,
    CreateFieldIndexCollectionBuilder, DeletePointsBuilder, Distance, FieldType, Filter,
    GetPointsBuilder, PointId, PointStruct, QueryPointsBuilder, ScrollPointsBuilder,
    UpsertPointsBuilder, VectorParamsBuilder,
};
use qdrant_client::{Payload, Qdrant};

use super::{Hit, Point, VectorError, VectorStore, INDEXED_FIELDS};

/// Points per upsert request.
const BATCH: usize = 512;

/// A connection to one server.
pub struct ServerStore {
    client: Qdrant,
    url: String,
}

fn backend(e: impl std::fmt::Display) -> VectorError {
    VectorError::Backend(format!("qdrant server: {e}"))
}

impl ServerStore {
    /// Connects lazily (the first request opens the channel).
    pub fn connect(url: &str, api_key: Option<String>) -> Result<Self, VectorError> {
        let client = Qdrant::from_url(url)
            .api_key(api_key)
            .skip_compatibility_check()
            .build()
            .map_err(backend)?;
        Ok(Self {
            client,
            url: crate::docstore::redact(url),
        })
    }
}

#[async_trait]
impl VectorStore for ServerStore {
    fn describe(&self) -> String {
        format!("qdrant:{}", self.url)
    }

    async fn ensure_collection(&self, name: &str, dim: usize) -> Result<(), VectorError> {
        if self.client.collection_exists(name).await.map_err(backend)? {
            let info = self.client.collection_info(name).await.map_err(backend)?;
            let existing = info
                .result
                .and_then(|r| r.config)
                .and_then(|c| c.params)
                .and_then(|p| p.vectors_config)
                .and_then(|v| v.config)
                .and_then(|c| match c {
                    vectors_config::Config::Params(p) => Some(p.size as usize),
                    _ => None,
                });
            return match existing {
                Some(existing) if existing != dim => Err(VectorError::DimensionMismatch {
                    name: name.to_string(),
                    existing,
                    wanted: dim,
                }),
                _ => Ok(()),
            };
        }
        self.client
            .create_collection(
                CreateCollectionBuilder::new(name)
                    .vectors_config(VectorParamsBuilder::new(dim as u64, Distance::Cosine)),
            )
            .await
            .map_err(backend)?;
        for field in INDEXED_FIELDS {
            self.client
                .create_field_index(
                    CreateFieldIndexCollectionBuilder::new(name, field, FieldType::Keyword)
                        .wait(true),
                )
                .await
                .map_err(backend)?;
        }
        Ok(())
    }

    async fn upsert(&self, name: &str, points: Vec<Point>) -> Result<(), VectorError> {
        let mut points = points;
        while !points.is_empty() {
            let rest = points.split_off(points.len().min(BATCH));
            let batch: Vec<PointStruct> = points
                .into_iter()
                .map(|p| PointStruct::new(p.id.to_string(), p.vector, Payload::from(p.payload)))
                .collect();
            self.client
                .upsert_points(UpsertPointsBuilder::new(name, batch).wait(true))
                .await
                .map_err(backend)?;
            points = rest;
        }
        Ok(())
    }

    async fn retain(
        &self,
        name: &str,
        keep: &std::collections::HashSet<uuid::Uuid>,
    ) -> Result<u64, VectorError> {
        let mut stale: Vec<PointId> = Vec::new();
        let mut offset: Option<PointId> = None;
        loop {
            let mut req = ScrollPointsBuilder::new(name)
                .limit(4096)
                .with_payload(false)
                .with_vectors(false);
            if let Some(o) = offset.take() {
                req = req.offset(o);
            }
            let page = self.client.scroll(req).await.map_err(backend)?;
            for p in page.result {
                if let Some(id) = p.id {
                    let known = match &id.point_id_options {
                        Some(qdrant_client::qdrant::point_id::PointIdOptions::Uuid(u)) => {
                            u.parse::<uuid::Uuid>().is_ok_and(|u| keep.contains(&u))
                        }
                        _ => false,
                    };
                    if !known {
                        stale.push(id);
                    }
                }
            }
            match page.next_page_offset {
                Some(next) => offset = Some(next),
                None => break,
            }
        }
        let removed = stale.len() as u64;
        for ids in stale.chunks(BATCH) {
            self.client
                .delete_points(
                    DeletePointsBuilder::new(name)
                        .points(ids.to_vec())
                        .wait(true),
                )
                .await
                .map_err(backend)?;
        }
        Ok(removed)
    }

    async fn finish(&self, _name: &str) -> Result<(), VectorError> {
        // Upserts were sent with wait=true; the server indexes in the background.
        Ok(())
    }

    async fn count(&self, name: &str) -> Result<Option<u64>, VectorError> {
        if !self.client.collection_exists(name).await.map_err(backend)? {
            return Ok(None);
        }
        let res = self
            .client
            .count(CountPointsBuilder::new(name).exact(true))
            .await
            .map_err(backend)?;
        Ok(Some(res.result.map(|r| r.count).unwrap_or(0)))
    }

    async fn count_existing(&self, name: &str, ids: &[uuid::Uuid]) -> Result<usize, VectorError> {
        let ids: Vec<PointId> = ids.iter().map(|id| PointId::from(id.to_string())).collect();
        let res = self
            .client
            .get_points(
                GetPointsBuilder::new(name, ids)
                    .with_payload(false)
                    .with_vectors(false),
            )
            .await
            .map_err(backend)?;
        Ok(res.result.len())
    }

    async fn search(
        &self,
        name: &str,
        vector: Vec<f32>,
        k: usize,
        filter: &[(String, String)],
    ) -> Result<Vec<Hit>, VectorError> {
        let mut query = QueryPointsBuilder::new(name)
            .query(vector)
            .limit(k as u64)
            .with_payload(true);
        if !filter.is_empty() {
            query = query.filter(Filter::must(
                filter
                    .iter()
                    .map(|(k, v)| Condition::matches(k.clone(), v.clone()))
                    .collect::<Vec<_>>(),
            ));
        }
        let res = self.client.query(query).await.map_err(backend)?;
        Ok(res
            .result
            .into_iter()
            .map(|p| {
                let id = p
                    .id
                    .and_then(|id| id.point_id_options)
                    .map(|o| match o {
                        qdrant_client::qdrant::point_id::PointIdOptions::Num(n) => n.to_string(),
                        qdrant_client::qdrant::point_id::PointIdOptions::Uuid(u) => u,
                    })
                    .unwrap_or_default();
                let payload: serde_json::Map<String, serde_json::Value> = p
                    .payload
                    .into_iter()
                    .map(|(k, v)| (k, v.into_json()))
                    .collect();
                Hit {
                    id,
                    score: p.score,
                    payload: serde_json::Value::Object(payload),
                }
            })
            .collect())
    }
}
