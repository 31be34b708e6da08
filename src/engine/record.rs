//! The run's records in the store: the run itself, each step's execution, the artifacts
//! it produced and its cache entry. Steps settled without executing (cached, skipped) are
//! queued and written in one transaction with the next write, so a no-op rerun of a big
//! pipeline costs a handful of transactions, not one per step.

use std::path::Path;
use std::sync::Arc;

use crate::pipeline::ResolvedPipeline;
use crate::store::{
    ArtifactRecord, CacheEntry, RunRecord, RunStatus, StepRecord, StepWrite, Store, StoreError,
};
use crate::util::clock::{new_run_id, now_rfc3339};

/// Writes one run's records.
pub(super) struct Recorder {
    store: Arc<Store>,
    run_id: String,
    pending: Vec<(StepRecord, usize)>,
}

impl Recorder {
    /// Records a new run as `running`.
    pub fn start(
        store: Arc<Store>,
        pipeline: &ResolvedPipeline,
        args: &serde_json::Value,
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
        Ok(Self {
            store,
            run_id,
            pending: Vec::new(),
        })
    }

    /// The run's id.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Queues the record of a step settled without executing.
    pub fn settled(&mut self, record: StepRecord, seq: usize) {
        self.pending.push((record, seq));
    }

    /// Writes the queued records.
    pub fn flush(&mut self) -> Result<(), StoreError> {
        self.write(None)
    }

    /// Writes an executed step's record (with its artifacts, and its cache entry when it
    /// succeeded) together with the queued ones, in one transaction. The cache entry is
    /// written only here, after the outputs were committed: a failure is never cached.
    pub fn executed(
        &mut self,
        record: &StepRecord,
        seq: usize,
        artifacts: &[ArtifactRecord],
        cache: Option<&CacheEntry>,
    ) -> Result<(), StoreError> {
        self.write(Some(StepWrite {
            record,
            seq,
            artifacts,
            cache,
            index_io: true,
        }))
    }

    fn write(&mut self, executed: Option<StepWrite<'_>>) -> Result<(), StoreError> {
        if self.pending.is_empty() && executed.is_none() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        let mut batch: Vec<StepWrite<'_>> = pending
            .iter()
            .map(|(record, seq)| StepWrite {
                record,
                seq: *seq,
                artifacts: &[],
                cache: None,
                index_io: false,
            })
            .collect();
        batch.extend(executed);
        self.store.db().write_steps(&batch)
    }

    /// Stores a step's log, if it wrote one; returns its digest (hex).
    pub fn store_log(&self, log_path: &Path) -> Option<String> {
        let len = std::fs::metadata(log_path).map(|m| m.len()).unwrap_or(0);
        if len == 0 {
            return None;
        }
        self.store.commit(log_path).ok().map(|c| c.digest.to_hex())
    }

    /// Writes what is queued and the run's final status.
    pub fn finish(&mut self, status: RunStatus) -> Result<(), StoreError> {
        self.flush()?;
        self.store
            .db()
            .finish_run(&self.run_id, status, &now_rfc3339())
    }
}
