//! The `runs` table: one row per `cairn run`.

use std::collections::BTreeMap;

use rusqlite::{params, Row};

use super::{column, from_json, json, Database};
use crate::store::{RunRecord, RunStatus, StoreError};

const RUN_SELECT: &str =
    "SELECT id, pipeline, pipeline_file, status, started_at, finished_at, pid, args FROM runs";

impl TryFrom<&Row<'_>> for RunRecord {
    type Error = rusqlite::Error;

    fn try_from(r: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(RunRecord {
            id: r.get(0)?,
            pipeline: r.get(1)?,
            pipeline_file: r.get(2)?,
            status: column(r, 3, |s| {
                RunStatus::parse(s).ok_or_else(|| format!("unknown run status `{s}`"))
            })?,
            started_at: r.get(4)?,
            finished_at: r.get(5)?,
            pid: r.get(6)?,
            args: column(r, 7, from_json)?,
        })
    }
}

impl Database {
    /// Inserts a new run record.
    pub fn insert_run(&self, run: &RunRecord) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO runs (id, pipeline, pipeline_file, status, started_at, finished_at, pid, args)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                run.id,
                run.pipeline,
                run.pipeline_file,
                run.status.as_str(),
                run.started_at,
                run.finished_at,
                run.pid,
                json(&run.args)
            ],
        )?;
        Ok(())
    }

    /// Sets a run's final status.
    pub fn finish_run(
        &self,
        id: &str,
        status: RunStatus,
        finished_at: &str,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE runs SET status = ?2, finished_at = ?3 WHERE id = ?1",
            params![id, status.as_str(), finished_at],
        )?;
        Ok(())
    }

    /// Marks runs still `running` whose process is gone as `interrupted`.
    pub fn mark_interrupted(&self, alive: impl Fn(i64) -> bool) -> Result<usize, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, pid FROM runs WHERE status = 'running'")?;
        let rows: Vec<(String, i64)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let mut n = 0;
        for (id, pid) in rows {
            if !alive(pid) {
                self.conn.execute(
                    "UPDATE runs SET status = 'interrupted' WHERE id = ?1",
                    params![id],
                )?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Runs, newest first.
    pub fn list_runs(&self, limit: usize) -> Result<Vec<RunRecord>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(&format!("{RUN_SELECT} ORDER BY rowid DESC LIMIT ?1"))?;
        let rows = stmt
            .query_map(params![limit as i64], |r| RunRecord::try_from(r))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// A page of runs, newest first, filtered by pipeline and status (`None`: any).
    pub fn list_runs_page(
        &self,
        pipeline: Option<&str>,
        status: Option<&str>,
        limit: usize,
        offset: usize,
    ) -> Result<Vec<RunRecord>, StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "{RUN_SELECT} WHERE (?1 IS NULL OR pipeline = ?1) AND (?2 IS NULL OR status = ?2)
             ORDER BY rowid DESC LIMIT ?3 OFFSET ?4"
        ))?;
        let rows = stmt
            .query_map(
                params![pipeline, status, limit as i64, offset as i64],
                |r| RunRecord::try_from(r),
            )?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Distinct pipeline names that have runs.
    pub fn pipelines(&self) -> Result<Vec<String>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT DISTINCT pipeline FROM runs ORDER BY pipeline")?;
        let rows = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        Ok(rows)
    }

    /// One run by id or unique id prefix.
    pub fn get_run(&self, id_or_prefix: &str) -> Result<Option<RunRecord>, StoreError> {
        let mut stmt = self.conn.prepare(&format!(
            "{RUN_SELECT} WHERE id >= ?1 AND id < ?1 || '~' ORDER BY id LIMIT 2"
        ))?;
        let mut rows = stmt
            .query_map(params![id_or_prefix], |r| RunRecord::try_from(r))?
            .collect::<Result<Vec<_>, _>>()?;
        if rows.len() < 2 {
            return Ok(rows.pop());
        }
        match rows.into_iter().find(|r| r.id == id_or_prefix) {
            Some(exact) => Ok(Some(exact)),
            None => Err(StoreError::Ambiguous(id_or_prefix.to_string())),
        }
    }

    /// Step counts per status for a run.
    pub fn run_counts(&self, run_id: &str) -> Result<BTreeMap<String, u64>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT status, COUNT(*) FROM step_rows WHERE run_id = ?1 GROUP BY status",
        )?;
        let rows = stmt
            .query_map(params![run_id], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })?
            .collect::<Result<BTreeMap<_, _>, _>>()?;
        Ok(rows)
    }

    /// Deletes all but the newest `keep` runs of every pipeline; returns the deleted ids.
    pub fn prune_runs(&mut self, keep: usize, dry_run: bool) -> Result<Vec<String>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id FROM (SELECT id, ROW_NUMBER() OVER (PARTITION BY pipeline ORDER BY rowid DESC) AS n FROM runs)
             WHERE n > ?1",
        )?;
        let ids: Vec<String> = stmt
            .query_map(params![keep as i64], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        drop(stmt);
        if !dry_run {
            let tx = self
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            tx.execute_batch("CREATE TEMP TABLE IF NOT EXISTS pruned (id TEXT PRIMARY KEY)")?;
            for id in &ids {
                tx.execute(
                    "INSERT OR IGNORE INTO temp.pruned (id) VALUES (?1)",
                    params![id],
                )?;
            }
            // Kept cache hits that point at a pruned run's row become whole rows first.
            tx.execute_batch(
                "INSERT INTO run_steps (run_id, step, seq, kind, version, status, reason,
                     cache_key, duration_ms, started_at, params, param_refs, inputs, outputs,
                     error, log)
                 SELECT s.run_id, s.step, s.seq, f.kind, f.version, s.status, s.reason,
                     f.cache_key, s.duration_ms, s.started_at, f.params, f.param_refs,
                     f.inputs, f.outputs, NULL, NULL
                 FROM step_rows s JOIN run_steps f ON f.run_id = s.same_as AND f.step = s.step
                 WHERE s.same_as IN (SELECT id FROM temp.pruned)
                     AND s.run_id NOT IN (SELECT id FROM temp.pruned);
                 UPDATE run_hits SET steps = (
                     SELECT json_group_array(json(j.value)) FROM json_each(run_hits.steps) j
                     WHERE COALESCE(j.value ->> 'same_as', run_hits.shared ->> 'same_as')
                         NOT IN (SELECT id FROM temp.pruned))
                 WHERE EXISTS (SELECT 1 FROM json_each(run_hits.steps) j
                     WHERE COALESCE(j.value ->> 'same_as', run_hits.shared ->> 'same_as')
                         IN (SELECT id FROM temp.pruned));
                 DELETE FROM runs WHERE id IN (SELECT id FROM temp.pruned);
                 DROP TABLE temp.pruned;",
            )?;
            tx.commit()?;
        }
        Ok(ids)
    }
}
