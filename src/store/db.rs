//! The record database (SQLite, WAL): runs, step executions, the cache index, artifact
//! records and the stat cache of `source` steps. SQLite gives crash-safe transactions
//! and safe sharing between concurrent `cairn` processes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;

use super::digest::{CacheKey, ObjectDigest};
use super::records::*;
use super::StoreError;

const SCHEMA_VERSION: i64 = 1;

/// How long a writer waits for another process's transaction.
const BUSY_TIMEOUT: Duration = Duration::from_secs(60);

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// Runs a database's set-up (WAL switch, schema creation), retrying while another
/// process does the same: two processes opening a brand-new file race there, and SQLite
/// answers some of those steps with BUSY without consulting the busy handler.
pub fn init_retrying_busy<T>(
    conn: &Connection,
    mut init: impl FnMut(&Connection) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    let started = std::time::Instant::now();
    loop {
        match init(conn) {
            Err(e) if is_busy(&e) && started.elapsed() < BUSY_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(5 + rand::random::<u64>() % 20));
            }
            other => return other,
        }
    }
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    pipeline TEXT NOT NULL,
    pipeline_file TEXT NOT NULL,
    status TEXT NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    pid INTEGER NOT NULL,
    args TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_by_pipeline ON runs(pipeline, id);
CREATE TABLE IF NOT EXISTS run_steps (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    version TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT NOT NULL,
    cache_key TEXT,
    duration_ms INTEGER NOT NULL,
    started_at TEXT NOT NULL,
    params TEXT NOT NULL,
    param_refs TEXT NOT NULL,
    inputs TEXT NOT NULL,
    outputs TEXT NOT NULL,
    error TEXT,
    log TEXT,
    PRIMARY KEY (run_id, step)
);
CREATE INDEX IF NOT EXISTS run_steps_by_step ON run_steps(step, run_id);
CREATE TABLE IF NOT EXISTS step_io (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step TEXT NOT NULL,
    direction TEXT NOT NULL,
    name TEXT NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (run_id, step, direction, name)
);
CREATE INDEX IF NOT EXISTS step_io_by_digest ON step_io(digest);
CREATE TABLE IF NOT EXISTS cache (
    key TEXT PRIMARY KEY,
    outputs TEXT NOT NULL,
    run_id TEXT NOT NULL,
    step TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS artifacts (
    digest TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    is_dir INTEGER NOT NULL,
    size INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    producer_run TEXT NOT NULL,
    producer_step TEXT NOT NULL,
    output TEXT NOT NULL,
    pipeline TEXT NOT NULL,
    metadata TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS artifacts_by_step ON artifacts(producer_step);
CREATE INDEX IF NOT EXISTS artifacts_by_kind ON artifacts(kind);
CREATE INDEX IF NOT EXISTS artifacts_by_created ON artifacts(created_at);
CREATE TABLE IF NOT EXISTS stat_cache (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    digest TEXT NOT NULL
);
"#;

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

/// A step execution to record, with the artifacts it touched.
pub struct StepWrite<'a> {
    /// The step record.
    pub record: &'a StepRecord,
    /// Sequence number of the step within the run (topological order).
    pub seq: usize,
    /// New artifact records to insert (first production wins).
    pub artifacts: &'a [ArtifactRecord],
    /// Cache entry to insert when the step succeeded.
    pub cache: Option<&'a CacheEntry>,
    /// Index the inputs and outputs by digest (for lineage). Executed steps only: a
    /// cache hit consumed and produced nothing new, and a no-op run of a big pipeline
    /// should not write thousands of index rows.
    pub index_io: bool,
}

const ARTIFACT_INSERT: &str = "INSERT OR IGNORE INTO artifacts (digest, kind, is_dir, size,
    created_at, producer_run, producer_step, output, pipeline, metadata)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)";

fn insert_artifact(
    stmt: &mut rusqlite::CachedStatement<'_>,
    a: &ArtifactRecord,
) -> rusqlite::Result<usize> {
    stmt.execute(params![
        a.digest.to_hex(),
        a.kind,
        a.is_dir,
        a.size as i64,
        a.created_at,
        a.producer_run,
        a.producer_step,
        a.output,
        a.pipeline,
        json(&a.metadata)
    ])
}

/// Connection to the record database.
pub struct Database {
    conn: Connection,
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("records serialize")
}

fn parse_json<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("bad JSON in record: {e}")))
}

impl Database {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let version = init_retrying_busy(&conn, |conn| {
            conn.execute_batch(
                "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;",
            )?;
            let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
            if version < SCHEMA_VERSION {
                // IMMEDIATE takes the write lock first; re-check, since another process
                // may have created the schema meanwhile.
                let tx = rusqlite::Transaction::new_unchecked(
                    conn,
                    rusqlite::TransactionBehavior::Immediate,
                )?;
                let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
                if version < SCHEMA_VERSION {
                    tx.execute_batch(SCHEMA)?;
                    tx.execute_batch(&format!("PRAGMA user_version={SCHEMA_VERSION}"))?;
                }
                tx.commit()?;
                return Ok(SCHEMA_VERSION);
            }
            Ok(version)
        })?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Corrupt(format!(
                "store schema version {version} is newer than this cairn understands ({SCHEMA_VERSION}); upgrade cairn"
            )));
        }
        Ok(Self { conn })
    }

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

    /// Records step executions, their artifacts and cache entries in one transaction.
    pub fn write_steps(&mut self, writes: &[StepWrite<'_>]) -> Result<(), StoreError> {
        let empty_in = BTreeMap::new();
        let empty_out = BTreeMap::new();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut step_stmt = tx.prepare_cached(
                "INSERT OR REPLACE INTO run_steps (run_id, step, seq, kind, version, status, reason,
                 cache_key, duration_ms, started_at, params, param_refs, inputs, outputs, error, log)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
            )?;
            let mut io_stmt = tx.prepare_cached(
                "INSERT OR REPLACE INTO step_io (run_id, step, direction, name, digest) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            let mut art_stmt = tx.prepare_cached(ARTIFACT_INSERT)?;
            let mut cache_stmt = tx.prepare_cached(
                "INSERT OR REPLACE INTO cache (key, outputs, run_id, step, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for w in writes {
                let r = w.record;
                step_stmt.execute(params![
                    r.run_id,
                    r.step,
                    w.seq as i64,
                    r.kind,
                    r.version,
                    r.status.as_str(),
                    r.reason,
                    r.cache_key,
                    r.duration_ms as i64,
                    r.started_at,
                    json(&r.params),
                    json(&r.param_refs),
                    json(&r.inputs),
                    json(&r.outputs),
                    r.error,
                    r.log
                ])?;
                let io = if w.index_io {
                    (&r.inputs, &r.outputs)
                } else {
                    (&empty_in, &empty_out)
                };
                for (name, input) in io.0 {
                    io_stmt.execute(params![
                        r.run_id,
                        r.step,
                        "in",
                        name,
                        input.digest.to_hex()
                    ])?;
                }
                for (name, output) in io.1 {
                    io_stmt.execute(params![
                        r.run_id,
                        r.step,
                        "out",
                        name,
                        output.digest.to_hex()
                    ])?;
                }
                for a in w.artifacts {
                    insert_artifact(&mut art_stmt, a)?;
                }
                if let Some(c) = w.cache {
                    cache_stmt.execute(params![
                        c.key.to_hex(),
                        json(&c.outputs),
                        c.run_id,
                        c.step,
                        r.started_at
                    ])?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

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

    /// The most recent successful execution of `step` in `pipeline`, to explain reruns.
    pub fn last_step_record(
        &self,
        pipeline: &str,
        step: &str,
    ) -> Result<Option<StepRecord>, StoreError> {
        let sql = format!(
            "{STEP_SELECT} JOIN runs ON runs.id = s.run_id
             WHERE runs.pipeline = ?1 AND s.step = ?2 AND s.status IN ('ran', 'cached')
             ORDER BY runs.rowid DESC LIMIT 1"
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let row = stmt
            .query_row(params![pipeline, step], raw_step_row)
            .optional()?;
        row.map(step_from_raw).transpose()
    }

    /// Runs, newest first.
    pub fn list_runs(&self, limit: usize) -> Result<Vec<RunRecord>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, pipeline, pipeline_file, status, started_at, finished_at, pid, args
             FROM runs ORDER BY rowid DESC LIMIT ?1",
        )?;
        let rows = stmt
            .query_map(params![limit as i64], raw_run_row)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(run_from_raw).collect()
    }

    /// A page of runs, newest first, filtered by pipeline and status (`None`: any).
    pub fn list_runs_page(
        &self,
        pipeline: Option<&str>,
        status: Option<&str>,
        limit: usize,
        offset: usize,
    ) -> Result<Vec<RunRecord>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, pipeline, pipeline_file, status, started_at, finished_at, pid, args
             FROM runs WHERE (?1 IS NULL OR pipeline = ?1) AND (?2 IS NULL OR status = ?2)
             ORDER BY rowid DESC LIMIT ?3 OFFSET ?4",
        )?;
        let rows = stmt
            .query_map(
                params![pipeline, status, limit as i64, offset as i64],
                raw_run_row,
            )?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(run_from_raw).collect()
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
                raw_artifact_row,
            )?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(artifact_from_raw).collect()
    }

    /// One run by id or unique id prefix.
    pub fn get_run(&self, id_or_prefix: &str) -> Result<Option<RunRecord>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, pipeline, pipeline_file, status, started_at, finished_at, pid, args
             FROM runs WHERE id >= ?1 AND id < ?1 || '~' ORDER BY id LIMIT 2",
        )?;
        let rows = stmt
            .query_map(params![id_or_prefix], raw_run_row)?
            .collect::<Result<Vec<_>, _>>()?;
        match rows.len() {
            0 => Ok(None),
            1 => run_from_raw(rows.into_iter().next().unwrap()).map(Some),
            _ => {
                if let Some(exact) = rows.into_iter().find(|r| r.0 == id_or_prefix) {
                    return run_from_raw(exact).map(Some);
                }
                Err(StoreError::Ambiguous(id_or_prefix.to_string()))
            }
        }
    }

    /// The step records of a run, in execution order.
    pub fn run_steps(&self, run_id: &str) -> Result<Vec<StepRecord>, StoreError> {
        let sql = format!("{STEP_SELECT} WHERE s.run_id = ?1 ORDER BY s.seq");
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt
            .query_map(params![run_id], raw_step_row)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(step_from_raw).collect()
    }

    /// Step counts per status for a run.
    pub fn run_counts(&self, run_id: &str) -> Result<BTreeMap<String, u64>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT status, COUNT(*) FROM run_steps WHERE run_id = ?1 GROUP BY status",
        )?;
        let rows = stmt
            .query_map(params![run_id], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })?
            .collect::<Result<BTreeMap<_, _>, _>>()?;
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
            .query_map(params![step, kind, limit as i64], raw_artifact_row)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(artifact_from_raw).collect()
    }

    /// Resolves a full digest or a unique hex prefix to an artifact record.
    pub fn find_artifact(&self, prefix: &str) -> Result<Option<ArtifactRecord>, StoreError> {
        let sql = format!(
            "{ARTIFACT_SELECT} WHERE digest >= ?1 AND digest < ?1 || 'g' ORDER BY digest LIMIT 2"
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt
            .query_map(params![prefix.to_ascii_lowercase()], raw_artifact_row)?
            .collect::<Result<Vec<_>, _>>()?;
        if rows.len() > 1 {
            return Err(StoreError::Ambiguous(prefix.to_string()));
        }
        rows.into_iter().next().map(artifact_from_raw).transpose()
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

    /// One step record.
    pub fn step_record(&self, run_id: &str, step: &str) -> Result<Option<StepRecord>, StoreError> {
        let sql = format!("{STEP_SELECT} WHERE s.run_id = ?1 AND s.step = ?2");
        let mut stmt = self.conn.prepare(&sql)?;
        let row = stmt
            .query_row(params![run_id, step], raw_step_row)
            .optional()?;
        row.map(step_from_raw).transpose()
    }

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
            for id in &ids {
                tx.execute("DELETE FROM runs WHERE id = ?1", params![id])?;
            }
            tx.commit()?;
        }
        Ok(ids)
    }

    /// Cache entries that a remaining run step still refers to; the others are dropped
    /// unless `dry_run`. Returns every object digest that stays referenced.
    pub fn referenced_objects(
        &mut self,
        dropped_runs: &[String],
        dry_run: bool,
    ) -> Result<HashSet<ObjectDigest>, StoreError> {
        let dropped: HashSet<&str> = dropped_runs.iter().map(|s| s.as_str()).collect();
        let mut live_keys = HashSet::new();
        let mut referenced = HashSet::new();
        {
            let mut stmt = self
                .conn
                .prepare("SELECT run_id, cache_key, inputs, outputs, log FROM run_steps")?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<String>>(4)?,
                ))
            })?;
            for row in rows {
                let (run_id, key, inputs, outputs, log) = row?;
                if dropped.contains(run_id.as_str()) {
                    continue;
                }
                if let Some(key) = key {
                    live_keys.insert(key);
                }
                let inputs: BTreeMap<String, InputRef> = parse_json(&inputs)?;
                let outputs: BTreeMap<String, OutputRef> = parse_json(&outputs)?;
                referenced.extend(inputs.values().map(|i| i.digest));
                referenced.extend(outputs.values().map(|o| o.digest));
                if let Some(log) = log.and_then(|l| l.parse().ok()) {
                    referenced.insert(log);
                }
            }
        }
        let mut dead_keys = Vec::new();
        {
            let mut stmt = self.conn.prepare("SELECT key, outputs FROM cache")?;
            let rows =
                stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
            for row in rows {
                let (key, outputs) = row?;
                if live_keys.contains(&key) {
                    let outputs: BTreeMap<String, OutputRef> = parse_json(&outputs)?;
                    referenced.extend(outputs.values().map(|o| o.digest));
                } else {
                    dead_keys.push(key);
                }
            }
        }
        if !dry_run {
            let tx = self
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            for key in &dead_keys {
                tx.execute("DELETE FROM cache WHERE key = ?1", params![key])?;
            }
            let mut stmt = tx.prepare("SELECT digest FROM artifacts")?;
            let all: Vec<String> = stmt
                .query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            drop(stmt);
            for d in all {
                let keep = d
                    .parse::<ObjectDigest>()
                    .is_ok_and(|d| referenced.contains(&d));
                if !keep {
                    tx.execute("DELETE FROM artifacts WHERE digest = ?1", params![d])?;
                }
            }
            tx.commit()?;
        }
        Ok(referenced)
    }

    /// Every digest the database mentions as an artifact, cache output or log.
    pub fn all_recorded_objects(&self) -> Result<HashSet<ObjectDigest>, StoreError> {
        let mut out = HashSet::new();
        let mut stmt = self.conn.prepare("SELECT digest FROM artifacts")?;
        for d in stmt.query_map([], |r| r.get::<_, String>(0))? {
            if let Ok(d) = d?.parse() {
                out.insert(d);
            }
        }
        let mut stmt = self.conn.prepare("SELECT outputs FROM cache")?;
        for o in stmt.query_map([], |r| r.get::<_, String>(0))? {
            let outputs: BTreeMap<String, OutputRef> = parse_json(&o?)?;
            out.extend(outputs.values().map(|o| o.digest));
        }
        let mut stmt = self
            .conn
            .prepare("SELECT log FROM run_steps WHERE log IS NOT NULL")?;
        for l in stmt.query_map([], |r| r.get::<_, String>(0))? {
            if let Ok(d) = l?.parse() {
                out.insert(d);
            }
        }
        Ok(out)
    }
}

const STEP_SELECT: &str = "SELECT s.run_id, s.step, s.kind, s.version, s.status, s.reason, s.cache_key,
    s.duration_ms, s.started_at, s.params, s.param_refs, s.inputs, s.outputs, s.error, s.log FROM run_steps s";

type RawStep = (
    String,
    String,
    String,
    String,
    String,
    String,
    Option<String>,
    i64,
    String,
    String,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
);

fn raw_step_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawStep> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
        r.get(10)?,
        r.get(11)?,
        r.get(12)?,
        r.get(13)?,
        r.get(14)?,
    ))
}

fn step_from_raw(raw: RawStep) -> Result<StepRecord, StoreError> {
    let (
        run_id,
        step,
        kind,
        version,
        status,
        reason,
        cache_key,
        duration_ms,
        started_at,
        params,
        param_refs,
        inputs,
        outputs,
        error,
        log,
    ) = raw;
    Ok(StepRecord {
        status: StepStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown step status `{status}`")))?,
        run_id,
        step,
        kind,
        version,
        reason,
        cache_key,
        duration_ms: duration_ms.max(0) as u64,
        started_at,
        params: parse_json::<Value>(&params)?,
        param_refs: parse_json(&param_refs)?,
        inputs: parse_json(&inputs)?,
        outputs: parse_json(&outputs)?,
        error,
        log,
    })
}

type RawRun = (
    String,
    String,
    String,
    String,
    String,
    Option<String>,
    i64,
    String,
);

fn raw_run_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRun> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
    ))
}

fn run_from_raw(raw: RawRun) -> Result<RunRecord, StoreError> {
    let (id, pipeline, pipeline_file, status, started_at, finished_at, pid, args) = raw;
    let status = RunStatus::parse(&status)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown run status `{status}` in run {id}")))?;
    Ok(RunRecord {
        id,
        pipeline,
        pipeline_file,
        status,
        started_at,
        finished_at,
        pid,
        args: parse_json(&args)?,
    })
}

const ARTIFACT_SELECT: &str =
    "SELECT digest, kind, is_dir, size, created_at, producer_run, producer_step,
    output, pipeline, metadata FROM artifacts";

type RawArtifact = (
    String,
    String,
    bool,
    i64,
    String,
    String,
    String,
    String,
    String,
    String,
);

fn raw_artifact_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawArtifact> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
    ))
}

fn artifact_from_raw(raw: RawArtifact) -> Result<ArtifactRecord, StoreError> {
    let (
        digest,
        kind,
        is_dir,
        size,
        created_at,
        producer_run,
        producer_step,
        output,
        pipeline,
        metadata,
    ) = raw;
    Ok(ArtifactRecord {
        digest: digest.parse().map_err(StoreError::Corrupt)?,
        kind,
        is_dir,
        size: size.max(0) as u64,
        created_at,
        producer_run,
        producer_step,
        output,
        pipeline,
        metadata: parse_json(&metadata)?,
    })
}
