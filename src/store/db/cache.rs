//! The `cache` table: cache key -> the outputs that execution produced.

use rusqlite::{params, OptionalExtension};

use super::{parse_json, Database};
use crate::store::{CacheEntry, CacheKey, StoreError};

impl Database {
    /// Looks up a cache entry.
    pub fn cache_get(&self, key: &CacheKey) -> Result<Option<CacheEntry>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT outputs, run_id, step FROM cache WHERE key = ?1")?;
        let row: Option<(String, String, String)> = stmt
            .query_row(params![key.to_hex()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        row.map(|(outputs, run_id, step)| {
            Ok(CacheEntry {
                key: *key,
                outputs: parse_json(&outputs)?,
                run_id,
                step,
            })
        })
        .transpose()
    }

    /// Every cache key in the index.
    pub fn cache_keys(&self) -> Result<std::collections::HashSet<CacheKey>, StoreError> {
        let mut stmt = self.conn.prepare_cached("SELECT key FROM cache")?;
        let keys = stmt
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(keys.iter().filter_map(|k| k.parse().ok()).collect())
    }
}
