//! The `artifacts` table: what is known of each object (kind, size, producer, metadata).

use rusqlite::{params, Row};

use super::{column, from_json, insert_artifact, Database, ARTIFACT_INSERT};
use crate::store::{ArtifactRecord, ObjectDigest, StoreError};

const ARTIFACT_SELECT: &str =
    "SELECT digest, kind, is_dir, size, created_at, producer_run, producer_step,
    output, pipeline, metadata FROM artifacts";

impl TryFrom<&Row<'_>> for ArtifactRecord {
    type Error = rusqlite::Error;

    fn try_from(r: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(ArtifactRecord {
            digest: column(r, 0, str::parse)?,
            kind: r.get(1)?,
            is_dir: r.get(2)?,
            size: r.get::<_, i64>(3)?.max(0) as u64,
            created_at: r.get(4)?,
            producer_run: r.get(5)?,
            producer_step: r.get(6)?,
            output: r.get(7)?,
            pipeline: r.get(8)?,
            metadata: column(r, 9, from_json)?,
        })
    }
}

impl Database {
    /// Inserts artifact records (first production wins), ahead of the step record that
    /// produced them: consumers read their inputs' metadata from here.
    pub fn put_artifacts(&mut self, artifacts: &[ArtifactRecord]) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut stmt = tx.prepare_cached(ARTIFACT_INSERT)?;
            for a in artifacts {
                insert_artifact(&mut stmt, a)?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// A page of artifacts, newest first, filtered by producer step, kind, pipeline and
    /// digest prefix (`None`: any).
    pub fn list_artifacts_page(
        &self,
        step: Option<&str>,
        kind: Option<&str>,
        pipeline: Option<&str>,
        digest_prefix: Option<&str>,
        limit: usize,
        offset: usize,
    ) -> Result<Vec<ArtifactRecord>, StoreError> {
        let sql = format!(
            "{ARTIFACT_SELECT} WHERE (?1 IS NULL OR producer_step = ?1) AND (?2 IS NULL OR kind = ?2)
             AND (?3 IS NULL OR pipeline = ?3) AND (?4 IS NULL OR (digest >= ?4 AND digest < ?4 || 'g'))
             ORDER BY created_at DESC, digest LIMIT ?5 OFFSET ?6"
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let prefix = digest_prefix.map(str::to_ascii_lowercase);
        let rows = stmt
            .query_map(
                params![step, kind, pipeline, prefix, limit as i64, offset as i64],
                |r| ArtifactRecord::try_from(r),
            )?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Artifact records, newest first, optionally filtered.
    pub fn list_artifacts(
        &self,
        step: Option<&str>,
        kind: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ArtifactRecord>, StoreError> {
        let sql = format!(
            "{ARTIFACT_SELECT} WHERE (?1 IS NULL OR producer_step = ?1) AND (?2 IS NULL OR kind = ?2)
             ORDER BY created_at DESC, digest LIMIT ?3"
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt
            .query_map(params![step, kind, limit as i64], |r| {
                ArtifactRecord::try_from(r)
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Resolves a full digest or a unique hex prefix to an artifact record.
    pub fn find_artifact(&self, prefix: &str) -> Result<Option<ArtifactRecord>, StoreError> {
        let sql = format!(
            "{ARTIFACT_SELECT} WHERE digest >= ?1 AND digest < ?1 || 'g' ORDER BY digest LIMIT 2"
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt
            .query_map(params![prefix.to_ascii_lowercase()], |r| {
                ArtifactRecord::try_from(r)
            })?
            .collect::<Result<Vec<_>, _>>()?;
        if rows.len() > 1 {
            return Err(StoreError::Ambiguous(prefix.to_string()));
        }
        Ok(rows.into_iter().next())
    }

    /// Every (run, step, direction, name) that touched an artifact, oldest first.
    pub fn artifact_uses(
        &self,
        digest: &ObjectDigest,
    ) -> Result<Vec<(String, String, String, String)>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT run_id, step, direction, name FROM step_io WHERE digest = ?1 ORDER BY rowid",
        )?;
        let rows = stmt
            .query_map(params![digest.to_hex()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }
}
