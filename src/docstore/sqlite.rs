//! The embedded document store: SQLite (WAL), one table, keyed by (collection, url),
//! with the whole document as JSON and an index on its id.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};

use super::{DocStore, DocStoreError, UpsertStats};
use crate::documents::Document;
use crate::util::blocking::blocking;

const SCHEMA: &str = "
    PRAGMA journal_mode=WAL;
    PRAGMA synchronous=NORMAL;
    CREATE TABLE IF NOT EXISTS documents (
        collection TEXT NOT NULL,
        url TEXT NOT NULL,
        id TEXT NOT NULL,
        category TEXT NOT NULL,
        title TEXT,
        doc TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (collection, url)
    );
    CREATE INDEX IF NOT EXISTS documents_by_id ON documents(collection, id);
";

/// A document store in one SQLite file.
pub struct SqliteStore {
    path: String,
    conn: Mutex<Connection>,
}

impl SqliteStore {
    /// Opens (creating) the store file.
    pub fn open(path: &Path) -> Result<Self, DocStoreError> {
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(60))?;
        crate::store::db::init_retrying_busy(&conn, |conn| conn.execute_batch(SCHEMA))?;
        Ok(Self {
            path: path.display().to_string(),
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One stored document by URL.
    pub fn get(&self, collection: &str, url: &str) -> Result<Option<Document>, DocStoreError> {
        let json: Option<String> = self
            .conn()
            .query_row(
                "SELECT doc FROM documents WHERE collection = ?1 AND url = ?2",
                params![collection, url],
                |r| r.get(0),
            )
            .optional()?;
        Ok(json.and_then(|j| serde_json::from_str(&j).ok()))
    }
}

#[async_trait]
impl DocStore for SqliteStore {
    fn describe(&self) -> String {
        format!("sqlite:{}", self.path)
    }

    async fn upsert(
        &self,
        collection: &str,
        docs: &[Document],
    ) -> Result<UpsertStats, DocStoreError> {
        // SQLite is synchronous: keep the runtime's other tasks moving meanwhile.
        blocking(|| self.upsert_blocking(collection, docs))
    }

    async fn ids_for(
        &self,
        collection: &str,
        urls: &[String],
    ) -> Result<BTreeMap<String, String>, DocStoreError> {
        blocking(|| {
            let conn = self.conn();
            let mut stmt =
                conn.prepare_cached("SELECT id FROM documents WHERE collection = ?1 AND url = ?2")?;
            let mut out = BTreeMap::new();
            for url in urls {
                if let Some(id) = stmt
                    .query_row(params![collection, url], |r| r.get::<_, String>(0))
                    .optional()?
                {
                    out.insert(url.clone(), id);
                }
            }
            Ok(out)
        })
    }

    async fn count(&self, collection: &str) -> Result<u64, DocStoreError> {
        blocking(|| {
            let n: i64 = self.conn().query_row(
                "SELECT COUNT(*) FROM documents WHERE collection = ?1",
                params![collection],
                |r| r.get(0),
            )?;
            Ok(n as u64)
        })
    }
}

impl SqliteStore {
    fn upsert_blocking(
        &self,
        collection: &str,
        docs: &[Document],
    ) -> Result<UpsertStats, DocStoreError> {
        let mut stats = UpsertStats::default();
        let now = crate::util::clock::now_rfc3339();
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut existing =
                tx.prepare_cached("SELECT id FROM documents WHERE collection = ?1 AND url = ?2")?;
            let mut write = tx.prepare_cached(
                "INSERT INTO documents (collection, url, id, category, title, doc, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT(collection, url) DO UPDATE SET id = excluded.id, category = excluded.category,
                 title = excluded.title, doc = excluded.doc, updated_at = excluded.updated_at",
            )?;
            for d in docs {
                let old: Option<String> = existing
                    .query_row(params![collection, d.url], |r| r.get(0))
                    .optional()?;
                match old {
                    Some(id) if id == d.id => {
                        stats.unchanged += 1;
                        continue;
                    }
                    Some(_) => stats.updated += 1,
                    None => stats.inserted += 1,
                }
                // Strings and maps only: serializing cannot fail.
                let json = serde_json::to_string(d).expect("documents serialize");
                write.execute(params![
                    collection,
                    d.url,
                    d.id,
                    d.category.as_str(),
                    d.title,
                    json,
                    now
                ])?;
            }
        }
        tx.commit()?;
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::documents::Category;

    fn doc(url: &str, content: &str) -> Document {
        Document {
            id: Document::make_id(url, content),
            url: url.into(),
            category: Category::Article,
            title: Some("t".into()),
            author: None,
            published: None,
            content: content.into(),
            fetched_at: "2026-01-01T00:00:00Z".into(),
            metadata: Default::default(),
        }
    }

    #[tokio::test]
    async fn upsert_by_url_never_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("d.sqlite")).unwrap();
        let a = doc("https://x.org/a", "one");
        let b = doc("https://x.org/b", "two");
        let s = store
            .upsert("articles", &[a.clone(), b.clone()])
            .await
            .unwrap();
        assert_eq!((s.inserted, s.updated, s.unchanged), (2, 0, 0));
        let s = store
            .upsert(
                "articles",
                &[a.clone(), doc("https://x.org/b", "two, edited")],
            )
            .await
            .unwrap();
        assert_eq!((s.inserted, s.updated, s.unchanged), (0, 1, 1));
        assert_eq!(store.count("articles").await.unwrap(), 2);
        assert_eq!(
            store
                .get("articles", "https://x.org/b")
                .unwrap()
                .unwrap()
                .content,
            "two, edited"
        );
        let ids = store
            .ids_for(
                "articles",
                &["https://x.org/a".into(), "https://x.org/zz".into()],
            )
            .await
            .unwrap();
        assert_eq!(ids.len(), 1);
        assert_eq!(ids["https://x.org/a"], a.id);
    }
}
