//! The run's records in the store: the run itself, each step's execution, the artifacts
//! it produced and its cache entry.
//!
//! Records are queued and written in one transaction per flush (group commit): a no-op
//! rerun of a big pipeline costs a handful of transactions. An executed step's record and
//! cache entry (what makes a later run trust its outputs) wait until its outputs are
//! sealed (durable), flushed while the steps it unblocked already run; they are written
//! together, so a step recorded as `ran` is always reusable. Only its artifact records go
//! in at once: the steps it unblocks read their inputs' metadata from them. A kill in
//! between costs a rerun of that step, never a trusted partial artifact.
//!
//! A cache hit that repeats the step's last execution in the pipeline (same
//! [`StepRecord::tag`]) is written as a pointer to that execution's row (`same_as`): a
//! no-op rerun of a 1000-step pipeline writes ~100 kB instead of ~600 kB, and the walk
//! does not even build the record ([`Recorder::hit`] takes its tag).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde_json::Value;

use crate::pipeline::ResolvedPipeline;
use crate::store::{
    ArtifactRecord, CacheEntry, HitWrite, LatestExecution, ObjectDigest, RecordTag, RunRecord,
    RunStatus, StepRecord, StepStatus, StepWrite, Store, StoreError,
};
use crate::util::clock::{new_run_id, now_rfc3339};

/// Settled records written per transaction at most.
const SETTLED_BATCH: usize = 1024;

/// Where a step's last successful execution is recorded, and what it holds.
#[derive(Clone, Debug, PartialEq)]
struct Latest {
    run_id: Arc<str>,
    tag: Option<RecordTag>,
}

/// How one record is written.
#[derive(Debug, PartialEq)]
struct Placement {
    /// Written as a pointer to this run's row of the step.
    same_as: Option<Arc<str>>,
    /// Becomes the step's latest execution, with this tag.
    latest: Option<RecordTag>,
}

/// A cache hit queued as a pointer.
struct Hit {
    step: String,
    seq: usize,
    reason: String,
    /// Shared by the hits queued in one batch (decided within milliseconds): the store
    /// keeps what a batch's pointers share once.
    started_at: Arc<str>,
    same_as: Arc<str>,
}

/// Writes one run's records.
pub(super) struct Recorder {
    store: Arc<Store>,
    run_id: String,
    pipeline: String,
    /// Each step's last successful execution in this pipeline: a cache hit with its tag
    /// is recorded as a pointer to it.
    latest: HashMap<String, Latest>,
    settled: Vec<(StepRecord, usize, Placement)>,
    hits: Vec<Hit>,
    /// Executed steps waiting for their outputs to be sealed.
    executed: Vec<(StepRecord, usize, Option<CacheEntry>, Placement)>,
}

impl Recorder {
    /// Records a new run as `running`.
    pub fn start(
        store: Arc<Store>,
        pipeline: &ResolvedPipeline,
        args: &serde_json::Value,
        latest: &[LatestExecution],
    ) -> Result<Self, StoreError> {
        let run_id = new_run_id();
        store.db().insert_run(&RunRecord {
            id: run_id.clone(),
            pipeline: pipeline.name.clone(),
            pipeline_file: pipeline.file.display().to_string(),
            status: RunStatus::Running,
            started_at: now_rfc3339(),
            finished_at: None,
            pid: std::process::id() as i64,
            args: crate::redact::redact(args),
        })?;
        // Most steps' latest executions are in the same few runs.
        let mut runs: HashMap<&str, Arc<str>> = HashMap::new();
        let latest = latest
            .iter()
            .map(|l| {
                let run_id = runs
                    .entry(l.run_id.as_str())
                    .or_insert_with(|| Arc::from(l.run_id.as_str()))
                    .clone();
                (l.step.clone(), Latest { run_id, tag: l.tag })
            })
            .collect();
        Ok(Self {
            store,
            run_id,
            pipeline: pipeline.name.clone(),
            latest,
            settled: Vec::new(),
            hits: Vec::new(),
            executed: Vec::new(),
        })
    }

    /// The run's id.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Queues a cache hit of `step` whose record would have `tag` as a pointer, when that
    /// is the tag of the step's latest execution; `false` when it must be recorded whole
    /// ([`Recorder::settled`]).
    pub fn hit(&mut self, step: &str, seq: usize, tag: RecordTag, reason: &str) -> bool {
        match self.latest.get(step) {
            Some(l) if l.tag == Some(tag) => {
                let started_at = match self.hits.last() {
                    Some(hit) => hit.started_at.clone(),
                    None => Arc::from(now_rfc3339()),
                };
                self.hits.push(Hit {
                    step: step.to_string(),
                    seq,
                    reason: reason.to_string(),
                    started_at,
                    same_as: l.run_id.clone(),
                });
                true
            }
            _ => false,
        }
    }

    /// Queues the record of a step settled without executing; `params` gives its masked
    /// parameters, asked for only when the record is written whole (not as a pointer).
    pub fn settled(&mut self, mut record: StepRecord, seq: usize, params: impl FnOnce() -> Value) {
        let placement = place(&mut self.latest, &record);
        match placement.same_as {
            Some(same_as) => self.hits.push(Hit {
                step: record.step,
                seq,
                reason: record.reason,
                started_at: Arc::from(record.started_at),
                same_as,
            }),
            None => {
                record.params = params();
                self.settled.push((record, seq, placement));
            }
        }
    }

    /// Whether enough settled records wait that writing them now bounds memory (a no-op
    /// rerun of a huge pipeline settles every step in one pass).
    pub fn batch_full(&self) -> bool {
        self.settled.len() + self.hits.len() >= SETTLED_BATCH
    }

    /// Writes an executed step's artifact records now and queues its record and, when it
    /// succeeded, its cache entry until its outputs are sealed.
    pub fn executed(
        &mut self,
        record: StepRecord,
        seq: usize,
        artifacts: &[ArtifactRecord],
        cache: Option<CacheEntry>,
    ) -> Result<(), StoreError> {
        if !artifacts.is_empty() {
            self.store.db().put_artifacts(artifacts)?;
        }
        let placement = place(&mut self.latest, &record);
        self.executed.push((record, seq, cache, placement));
        Ok(())
    }

    /// Seals what executed steps committed, then writes every queued record and cache
    /// entry in one transaction.
    pub fn flush(&mut self) -> Result<(), StoreError> {
        if self.settled.is_empty() && self.hits.is_empty() && self.executed.is_empty() {
            return Ok(());
        }
        if !self.executed.is_empty() {
            self.store.seal_pending()?;
        }
        let settled = std::mem::take(&mut self.settled);
        let hits = std::mem::take(&mut self.hits);
        let executed = std::mem::take(&mut self.executed);
        let mut batch: Vec<StepWrite<'_>> = settled
            .iter()
            .map(|(record, seq, placement)| StepWrite {
                record,
                seq: *seq,
                artifacts: &[],
                cache: None,
                index_io: false,
                latest_in: placement.latest.map(|tag| (self.pipeline.as_str(), tag)),
            })
            .collect();
        let mut pointers: Vec<HitWrite<'_>> = hits
            .iter()
            .map(|hit| HitWrite {
                run_id: &self.run_id,
                step: &hit.step,
                seq: hit.seq,
                reason: &hit.reason,
                started_at: &hit.started_at,
                same_as: &hit.same_as,
                cache: None,
            })
            .collect();
        for (record, seq, cache, placement) in &executed {
            // A volatile step that ran and found what it found last time (`cached`).
            match placement.same_as.as_deref() {
                Some(same_as) if record.log.is_none() && record.error.is_none() => {
                    pointers.push(HitWrite {
                        run_id: &record.run_id,
                        step: &record.step,
                        seq: *seq,
                        reason: &record.reason,
                        started_at: &record.started_at,
                        same_as,
                        cache: cache.as_ref(),
                    })
                }
                _ => batch.push(StepWrite {
                    record,
                    seq: *seq,
                    artifacts: &[],
                    cache: cache.as_ref(),
                    index_io: true,
                    latest_in: placement.latest.map(|tag| (self.pipeline.as_str(), tag)),
                }),
            }
        }
        self.store.db().write_steps(&batch, &pointers)
    }

    /// Stores a step's log, if it wrote one; returns its digest.
    pub fn store_log(&self, log_path: &Path) -> Option<ObjectDigest> {
        let len = std::fs::metadata(log_path).map(|m| m.len()).unwrap_or(0);
        if len == 0 {
            return None;
        }
        self.store.commit(log_path).ok().map(|c| c.digest)
    }

    /// Writes what is queued and the run's final status.
    pub fn finish(&mut self, status: RunStatus) -> Result<(), StoreError> {
        self.flush()?;
        self.store
            .db()
            .finish_run(&self.run_id, status, &now_rfc3339())
    }
}

/// How `record` is written given each step's latest execution in `latest` (which it
/// updates): a cache hit with the latest's tag points to it; a successful execution with
/// another tag becomes the latest.
fn place(latest: &mut HashMap<String, Latest>, record: &StepRecord) -> Placement {
    let mut placement = Placement {
        same_as: None,
        latest: None,
    };
    if !matches!(record.status, StepStatus::Ran | StepStatus::Cached) {
        return placement;
    }
    let tag = record.tag();
    match latest.get(&record.step) {
        Some(l) if l.tag == Some(tag) => {
            placement.same_as = (record.status == StepStatus::Cached).then(|| l.run_id.clone());
        }
        _ => {
            let at = Latest {
                run_id: Arc::from(record.run_id.as_str()),
                tag: Some(tag),
            };
            latest.insert(record.step.clone(), at);
            placement.latest = Some(tag);
        }
    }
    placement
}
