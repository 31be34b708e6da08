//! The record database (SQLite, WAL): runs, step executions, the cache index, artifact
//! records and the stat cache of `source` steps. SQLite gives crash-safe transactions
//! and safe sharing between concurrent `cairn` processes.
//!
//! One file per table: `runs`, `steps` (run_steps and step_io), `cache`, `artifacts`,
//! `stat`, and `gc` (what is still referenced). Rows become records through
//! `TryFrom<&Row>`; this file holds the schema, opening, and the JSON helpers.

mod artifacts;
mod cache;
mod gc;
mod runs;
mod stat;
mod steps;

pub use stat::StatEntry;
pub use steps::{HitWrite, LatestExecution, StepWrite};

use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection};

use super::records::ArtifactRecord;

use super::StoreError;

const SCHEMA_VERSION: i64 = 4;

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
CREATE TABLE IF NOT EXISTS run_hits (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    steps TEXT NOT NULL,
    shared TEXT
);
CREATE INDEX IF NOT EXISTS run_hits_by_run ON run_hits(run_id);
CREATE VIEW IF NOT EXISTS step_rows AS
    SELECT run_id, step, seq, kind, version, status, reason, cache_key, duration_ms,
        started_at, params, param_refs, inputs, outputs, error, log, NULL AS same_as
    FROM run_steps
    UNION ALL
    SELECT h.run_id, j.value ->> 'step', j.value ->> 'seq', NULL, NULL, 'cached',
        COALESCE(j.value ->> 'reason', h.shared ->> 'reason'), NULL, 0,
        COALESCE(j.value ->> 'started_at', h.shared ->> 'started_at'), NULL, NULL, NULL,
        NULL, NULL, NULL, COALESCE(j.value ->> 'same_as', h.shared ->> 'same_as')
    FROM run_hits h, json_each(h.steps) j;
CREATE TABLE IF NOT EXISTS step_latest (
    pipeline TEXT NOT NULL,
    step TEXT NOT NULL,
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    cache_key TEXT,
    tag BLOB,
    PRIMARY KEY (pipeline, step)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS step_latest_by_run ON step_latest(run_id);
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

/// Version 1 found a step's last execution through an index on `run_steps(step, run_id)`;
/// every run touched one page of it per step (a no-op rerun of a 1000-step pipeline
/// rewrote ~4 MB and slowed down as runs accumulated). `step_latest` replaces it.
const MIGRATE_1_TO_2: &str = r#"
INSERT OR REPLACE INTO step_latest (pipeline, step, run_id, cache_key)
    SELECT runs.pipeline, s.step, s.run_id, s.cache_key FROM run_steps s
    JOIN runs ON runs.id = s.run_id
    WHERE s.status IN ('ran', 'cached') ORDER BY runs.rowid;
DROP INDEX IF EXISTS run_steps_by_step;
"#;

/// Version 3 records the cache hits of a run that repeat their step's last execution as
/// one `run_hits` row per flush (a JSON array of pointers: `same_as` names the run whose
/// `run_steps` row holds the kind, version, cache key, parameters, inputs and outputs);
/// `step_rows` shows them as rows, and `step_latest.tag` says what each latest row holds
/// (`StepRecord::tag`).
const MIGRATE_STEP_LATEST_TO_3: &str = "ALTER TABLE step_latest ADD COLUMN tag BLOB;";

/// Version 4 keeps what a `run_hits` row's pointers share (the reason, the run pointed
/// to, the time) once, in `shared`, and each pointer only what differs: a no-op rerun of
/// a 1000-step pipeline writes ~25 kB instead of ~150 kB (checkpoints, which sync, come
/// six times less often). Run before `SCHEMA`, which recreates the view.
const MIGRATE_3_TO_4: &str = "ALTER TABLE run_hits ADD COLUMN shared TEXT; DROP VIEW step_rows;";

pub(crate) const ARTIFACT_INSERT: &str =
    "INSERT OR IGNORE INTO artifacts (digest, kind, is_dir, size,
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
    from_json(s).map_err(StoreError::Corrupt)
}

/// A text column parsed into `T` (JSON, a digest, a status word) inside a row conversion;
/// failures become rusqlite's conversion error, naming the column.
fn column<T>(
    row: &rusqlite::Row<'_>,
    index: usize,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> rusqlite::Result<T> {
    let text: String = row.get(index)?;
    parse(&text).map_err(|message| {
        rusqlite::Error::FromSqlConversionFailure(
            index,
            rusqlite::types::Type::Text,
            format!("store is inconsistent: {message}").into(),
        )
    })
}

/// Like [`column`] for a nullable column.
fn optional_column<T>(
    row: &rusqlite::Row<'_>,
    index: usize,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> rusqlite::Result<Option<T>> {
    match row.get::<_, Option<String>>(index)? {
        None => Ok(None),
        Some(_) => column(row, index, parse).map(Some),
    }
}

fn from_json<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    serde_json::from_str(text).map_err(|e| format!("bad JSON in record: {e}"))
}

impl Database {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // Closing the last connection would checkpoint the WAL and fsync twice: ~2 ms at
        // the end of every command, most of a no-op rerun's I/O. SQLite checkpoints by
        // itself once the WAL passes `wal_autocheckpoint` pages, so the syncs are paid
        // once per several commands; durability is unchanged (WAL, synchronous=NORMAL).
        // The next command's first connection rereads what the WAL holds, so it is kept
        // to 1 MiB rather than SQLite's 4 MiB.
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
            true,
        )?;
        let version = init_retrying_busy(&conn, |conn| {
            conn.execute_batch(
                "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;
                 PRAGMA wal_autocheckpoint=256;",
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
                    if version == 3 {
                        tx.execute_batch(MIGRATE_3_TO_4)?;
                    }
                    tx.execute_batch(SCHEMA)?;
                    if version == 1 {
                        tx.execute_batch(MIGRATE_1_TO_2)?;
                    }
                    if version == 2 {
                        tx.execute_batch(MIGRATE_STEP_LATEST_TO_3)?;
                    }
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
}
