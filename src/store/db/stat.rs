//! The `stat_cache` table: each file's identity (size, mtime, inode) when it was last
//! hashed, so an unchanged tree is walked, not reread.

use std::collections::HashMap;

use rusqlite::params;

use super::Database;
use crate::store::{ObjectDigest, StoreError};

/// One stat-cache row: a file's identity when it was last hashed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatEntry {
    /// File size in bytes.
    pub size: u64,
    /// Modification time in nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// Inode number.
    pub ino: u64,
    /// Content digest at that time.
    pub digest: ObjectDigest,
}

impl Database {
    /// Stat-cache rows for every path under `root` (inclusive).
    pub fn stat_entries_under(&self, root: &str) -> Result<HashMap<String, StatEntry>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT path, size, mtime_ns, ino, digest FROM stat_cache WHERE path = ?1 OR (path >= ?1 || '/' AND path < ?1 || '0')",
        )?;
        let rows = stmt.query_map(params![root], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, String>(4)?,
            ))
        })?;
        let mut out = HashMap::new();
        for row in rows {
            let (path, size, mtime_ns, ino, digest) = row?;
            if let Ok(digest) = digest.parse() {
                out.insert(
                    path,
                    StatEntry {
                        size: size as u64,
                        mtime_ns,
                        ino: ino as u64,
                        digest,
                    },
                );
            }
        }
        Ok(out)
    }

    /// Replaces the stat-cache rows under `root` with `entries`.
    pub fn replace_stat_entries(
        &mut self,
        root: &str,
        entries: &[(String, StatEntry)],
    ) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute(
            "DELETE FROM stat_cache WHERE path = ?1 OR (path >= ?1 || '/' AND path < ?1 || '0')",
            params![root],
        )?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT OR REPLACE INTO stat_cache (path, size, mtime_ns, ino, digest) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for (path, e) in entries {
                stmt.execute(params![
                    path,
                    e.size as i64,
                    e.mtime_ns,
                    e.ino as i64,
                    e.digest.to_hex()
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}
