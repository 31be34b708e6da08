//! The `run_steps` table (one row per step of a run) and `step_io` (which digests each
//! executed step consumed and produced, for lineage).

use std::collections::{BTreeMap, HashSet};

use rusqlite::{params, OptionalExtension, Row};

use super::{column, from_json, insert_artifact, json, optional_column, Database, ARTIFACT_INSERT};
use crate::store::{
    ArtifactRecord, CacheEntry, CacheKey, RecordTag, StepRecord, StepStatus, StoreError,
};

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
    /// Make this record the step's last successful execution in `pipeline` (what a
    /// rerun is explained against, and what later cache hits point to with `same_as`),
    /// with its [`StepRecord::tag`]. Not needed when the one recorded has the same tag.
    pub latest_in: Option<(&'a str, RecordTag)>,
}

/// A cache hit whose parameters, inputs and outputs are those of the step's row in run
/// `same_as` (the step's latest execution in the pipeline, with the same
/// [`StepRecord::tag`]): written as a pointer, one element of the run's `run_hits` row,
/// and read back as a whole record.
pub struct HitWrite<'a> {
    /// The run it belongs to.
    pub run_id: &'a str,
    /// Step name.
    pub step: &'a str,
    /// Sequence number of the step within the run.
    pub seq: usize,
    /// Why it was cached, in words.
    pub reason: &'a str,
    /// RFC 3339 time it was decided.
    pub started_at: &'a str,
    /// The run whose row of the step it repeats.
    pub same_as: &'a str,
    /// Cache entry to insert (a volatile step that ran again and found the same).
    pub cache: Option<&'a CacheEntry>,
}

fn insert_cache(
    stmt: &mut rusqlite::CachedStatement<'_>,
    entry: &CacheEntry,
    created_at: &str,
) -> rusqlite::Result<usize> {
    stmt.execute(params![
        entry.key.to_hex(),
        json(&entry.outputs),
        entry.run_id,
        entry.step,
        created_at
    ])
}

/// What the pointers of one `run_hits` row share (all its fields, taken from the first).
#[derive(serde::Serialize)]
struct SharedHit<'a> {
    reason: &'a str,
    started_at: &'a str,
    same_as: &'a str,
}

/// One pointer of a `run_hits` row: what it does not share with the row.
#[derive(serde::Serialize)]
struct PointerElement<'a> {
    step: &'a str,
    seq: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    started_at: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    same_as: Option<&'a str>,
}

/// The `steps` and `shared` columns of a `run_hits` row holding `hits` (at least one).
fn hits_row(hits: &[&HitWrite<'_>]) -> (String, String) {
    let first = hits[0];
    let shared = SharedHit {
        reason: first.reason,
        started_at: first.started_at,
        same_as: first.same_as,
    };
    let elements: Vec<PointerElement<'_>> = hits
        .iter()
        .map(|h| PointerElement {
            step: h.step,
            seq: h.seq,
            reason: (h.reason != shared.reason).then_some(h.reason),
            started_at: (h.started_at != shared.started_at).then_some(h.started_at),
            same_as: (h.same_as != shared.same_as).then_some(h.same_as),
        })
        .collect();
    (json(&elements), json(&shared))
}

/// A step's last successful execution in a pipeline (`step_latest`).
pub struct LatestExecution {
    /// Step name.
    pub step: String,
    /// The run whose row holds it.
    pub run_id: String,
    /// Its cache key.
    pub cache_key: Option<CacheKey>,
    /// Its [`StepRecord::tag`] (absent in rows from before schema version 3).
    pub tag: Option<RecordTag>,
    /// The cache entry of its key, if still there.
    pub entry: Option<CacheEntry>,
}

/// Columns of a whole step row, `s`.
const STEP_FIELDS: &str = "s.run_id, s.step, s.kind, s.version, s.status, s.reason, s.cache_key,
    s.duration_ms, s.started_at, s.params, s.param_refs, s.inputs, s.outputs, s.error, s.log";

/// Every step row, pointers included, with what a pointer shares taken from the row it
/// points to (kind, version, cache key, parameters, inputs, outputs).
const STEP_SELECT: &str = "SELECT s.run_id, s.step, COALESCE(s.kind, f.kind),
    COALESCE(s.version, f.version), s.status, s.reason, COALESCE(s.cache_key, f.cache_key),
    s.duration_ms, s.started_at, COALESCE(s.params, f.params),
    COALESCE(s.param_refs, f.param_refs), COALESCE(s.inputs, f.inputs),
    COALESCE(s.outputs, f.outputs), s.error, s.log FROM step_rows s
    LEFT JOIN run_steps f ON s.same_as IS NOT NULL AND f.run_id = s.same_as AND f.step = s.step";

impl TryFrom<&Row<'_>> for StepRecord {
    type Error = rusqlite::Error;

    fn try_from(r: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(StepRecord {
            run_id: r.get(0)?,
            step: r.get(1)?,
            kind: r.get(2)?,
            version: r.get(3)?,
            status: column(r, 4, |s| {
                StepStatus::parse(s).ok_or_else(|| format!("unknown step status `{s}`"))
            })?,
            reason: r.get(5)?,
            cache_key: optional_column(r, 6, str::parse)?,
            duration_ms: r.get::<_, i64>(7)?.max(0) as u64,
            started_at: r.get(8)?,
            params: column(r, 9, from_json)?,
            param_refs: column(r, 10, from_json)?,
            inputs: column(r, 11, from_json)?,
            outputs: column(r, 12, from_json)?,
            error: r.get(13)?,
            log: optional_column(r, 14, str::parse)?,
        })
    }
}

impl Database {
    /// Records step executions, their artifacts and cache entries in one transaction.
    pub fn write_steps(
        &mut self,
        writes: &[StepWrite<'_>],
        hits: &[HitWrite<'_>],
    ) -> Result<(), StoreError> {
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
            let mut cache_stmt = tx.prepare_cached(
                "INSERT OR REPLACE INTO cache (key, outputs, run_id, step, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            // Pointers only to runs still there: a pointer to a missing row would leave
            // the record unreadable. Callers point to a step's latest execution, whose run
            // cannot be pruned while theirs holds the store's shared lock (`gc` takes the
            // exclusive one); checked anyway, once per run named.
            let mut checked: HashSet<&str> = HashSet::new();
            let mut run_stmt = tx.prepare_cached("SELECT 1 FROM runs WHERE id = ?1")?;
            let mut by_run: BTreeMap<&str, Vec<&HitWrite<'_>>> = BTreeMap::new();
            for hit in hits {
                if checked.insert(hit.same_as) && !run_stmt.exists(params![hit.same_as])? {
                    return Err(StoreError::Corrupt(format!(
                        "the cache hit of step {} points to run {}, which is not in the store",
                        hit.step, hit.same_as
                    )));
                }
                by_run.entry(hit.run_id).or_default().push(hit);
                if let Some(c) = hit.cache {
                    insert_cache(&mut cache_stmt, c, hit.started_at)?;
                }
            }
            let mut io_stmt = tx.prepare_cached(
                "INSERT OR REPLACE INTO step_io (run_id, step, direction, name, digest) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            let mut art_stmt = tx.prepare_cached(ARTIFACT_INSERT)?;
            let mut latest_stmt = tx.prepare_cached(
                "INSERT OR REPLACE INTO step_latest (pipeline, step, run_id, cache_key, tag) VALUES (?1, ?2, ?3, ?4, ?5)",
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
                    r.cache_key.map(|k| k.to_hex()),
                    r.duration_ms as i64,
                    r.started_at,
                    json(&r.params),
                    json(&r.param_refs),
                    json(&r.inputs),
                    json(&r.outputs),
                    r.error,
                    r.log.map(|d| d.to_hex())
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
                if let Some((pipeline, tag)) = w.latest_in {
                    latest_stmt.execute(params![
                        pipeline,
                        r.step,
                        r.run_id,
                        r.cache_key.map(|k| k.to_hex()),
                        &tag[..]
                    ])?;
                }
                if let Some(c) = w.cache {
                    insert_cache(&mut cache_stmt, c, &r.started_at)?;
                }
            }
            let mut hits_stmt = tx.prepare_cached(
                "INSERT INTO run_hits (run_id, steps, shared) VALUES (?1, ?2, ?3)",
            )?;
            for (run_id, hits) in &by_run {
                let (steps, shared) = hits_row(hits);
                hits_stmt.execute(params![run_id, steps, shared])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The most recent successful execution of `step` in `pipeline`, to explain reruns.
    pub fn last_step_record(
        &self,
        pipeline: &str,
        step: &str,
    ) -> Result<Option<StepRecord>, StoreError> {
        // A latest execution is always a whole row.
        let sql = format!(
            "SELECT {STEP_FIELDS} FROM run_steps s
             JOIN step_latest l ON l.run_id = s.run_id AND l.step = s.step
             WHERE l.pipeline = ?1 AND l.step = ?2"
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let row = stmt
            .query_row(params![pipeline, step], |r| StepRecord::try_from(r))
            .optional()?;
        Ok(row)
    }

    /// Each step's last successful execution in `pipeline`, with the cache entry of its
    /// key when there is one (what a rerun most likely reuses): one query for a plan.
    pub fn latest_executions(&self, pipeline: &str) -> Result<Vec<LatestExecution>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT l.step, l.run_id, l.cache_key, l.tag, c.outputs, c.run_id, c.step
             FROM step_latest l LEFT JOIN cache c ON c.key = l.cache_key WHERE l.pipeline = ?1",
        )?;
        // Borrowed text, parsed in place: this reads a row per step of the pipeline.
        fn text<'r>(r: &'r Row<'_>, i: usize) -> rusqlite::Result<Option<&'r str>> {
            r.get_ref(i)?.as_str_or_null().map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, e.into())
            })
        }
        fn parsed<T>(
            i: usize,
            text: Option<&str>,
            parse: impl FnOnce(&str) -> Result<T, String>,
        ) -> rusqlite::Result<Option<T>> {
            text.map(parse).transpose().map_err(|message| {
                rusqlite::Error::FromSqlConversionFailure(
                    i,
                    rusqlite::types::Type::Text,
                    format!("store is inconsistent: {message}").into(),
                )
            })
        }
        let rows = stmt.query_map(params![pipeline], |r| {
            let cache_key: Option<CacheKey> = parsed(2, text(r, 2)?, str::parse)?;
            let tag = match r.get_ref(3)? {
                rusqlite::types::ValueRef::Blob(b) => RecordTag::try_from(b).ok(),
                _ => None,
            };
            let entry = match (cache_key, text(r, 5)?) {
                (Some(key), Some(run_id)) => Some(CacheEntry {
                    key,
                    outputs: parsed(4, text(r, 4)?, from_json)?.unwrap_or_default(),
                    run_id: run_id.to_string(),
                    step: r.get(6)?,
                }),
                _ => None,
            };
            Ok(LatestExecution {
                step: r.get(0)?,
                run_id: r.get(1)?,
                cache_key,
                tag,
                entry,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The step records of a run, in execution order.
    pub fn run_steps(&self, run_id: &str) -> Result<Vec<StepRecord>, StoreError> {
        let sql = format!("{STEP_SELECT} WHERE s.run_id = ?1 ORDER BY s.seq");
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt
            .query_map(params![run_id], |r| StepRecord::try_from(r))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// One step record.
    pub fn step_record(&self, run_id: &str, step: &str) -> Result<Option<StepRecord>, StoreError> {
        let sql = format!("{STEP_SELECT} WHERE s.run_id = ?1 AND s.step = ?2");
        let mut stmt = self.conn.prepare(&sql)?;
        let row = stmt
            .query_row(params![run_id, step], |r| StepRecord::try_from(r))
            .optional()?;
        Ok(row)
    }
}
