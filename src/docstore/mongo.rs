//! MongoDB document store (cargo feature `mongodb`): one collection per category in the
//! URI's database (default `cairn`), documents upserted by URL.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::TryStreamExt;
use mongodb::bson::{doc, Document as BsonDocument};
use mongodb::options::{ClientOptions, ReplaceOptions};

use super::{redact, DocStore, DocStoreError, UpsertStats};
use crate::documents::Document;

/// A MongoDB database.
pub struct MongoStore {
    uri: String,
    db: mongodb::Database,
}

impl MongoStore {
    /// Connects (and checks the server answers within a few seconds).
    pub async fn connect(uri: &str) -> Result<Self, DocStoreError> {
        let err = |e: mongodb::error::Error| DocStoreError::Server {
            store: redact(uri),
            message: e.to_string(),
        };
        let mut options = ClientOptions::parse(uri).await.map_err(err)?;
        if options.server_selection_timeout.is_none() {
            options.server_selection_timeout = Some(Duration::from_secs(5));
        }
        let db_name = options
            .default_database
            .clone()
            .unwrap_or_else(|| "cairn".to_string());
        let client = mongodb::Client::with_options(options).map_err(err)?;
        let db = client.database(&db_name);
        db.run_command(doc! {"ping": 1}).await.map_err(err)?;
        Ok(Self {
            uri: redact(uri),
            db,
        })
    }

    fn err(&self, e: mongodb::error::Error) -> DocStoreError {
        DocStoreError::Server {
            store: self.uri.clone(),
            message: e.to_string(),
        }
    }
}

#[async_trait]
impl DocStore for MongoStore {
    fn describe(&self) -> String {
        self.uri.clone()
    }

    async fn upsert(
        &self,
        collection: &str,
        docs: &[Document],
    ) -> Result<UpsertStats, DocStoreError> {
        let coll = self.db.collection::<BsonDocument>(collection);
        let mut stats = UpsertStats::default();
        let urls: Vec<String> = docs.iter().map(|d| d.url.clone()).collect();
        let existing = self.ids_for(collection, &urls).await?;
        for d in docs {
            match existing.get(&d.url) {
                Some(id) if *id == d.id => {
                    stats.unchanged += 1;
                    continue;
                }
                Some(_) => stats.updated += 1,
                None => stats.inserted += 1,
            }
            let bson = mongodb::bson::to_document(d).map_err(|e| DocStoreError::Server {
                store: self.uri.clone(),
                message: e.to_string(),
            })?;
            coll.replace_one(doc! {"url": &d.url}, bson)
                .with_options(ReplaceOptions::builder().upsert(true).build())
                .await
                .map_err(|e| self.err(e))?;
        }
        Ok(stats)
    }

    async fn ids_for(
        &self,
        collection: &str,
        urls: &[String],
    ) -> Result<BTreeMap<String, String>, DocStoreError> {
        let coll = self.db.collection::<BsonDocument>(collection);
        let mut out = BTreeMap::new();
        for chunk in urls.chunks(1000) {
            let mut cursor = coll
                .find(doc! {"url": {"$in": chunk.to_vec()}})
                .projection(doc! {"url": 1, "id": 1, "_id": 0})
                .await
                .map_err(|e| self.err(e))?;
            while let Some(d) = cursor.try_next().await.map_err(|e| self.err(e))? {
                if let (Ok(url), Ok(id)) = (d.get_str("url"), d.get_str("id")) {
                    out.insert(url.to_string(), id.to_string());
                }
            }
        }
        Ok(out)
    }

    async fn count(&self, collection: &str) -> Result<u64, DocStoreError> {
        self.db
            .collection::<BsonDocument>(collection)
            .count_documents(doc! {})
            .await
            .map_err(|e| self.err(e))
    }
}
