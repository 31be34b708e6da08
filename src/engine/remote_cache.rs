//! The shared cache on a remote, as the walk uses it: on a local miss the step's cache
//! key is looked up on the remote; a hit downloads (and verifies) the outputs and settles
//! the step as `cached (remote)`; steps that executed are queued and pushed when the run
//! ends. The decision stays here, on the machine that runs the pipeline. A remote that
//! fails is switched off for the rest of the run, and the run says why.

use std::sync::Mutex;

use crate::remote::{Remote, RemoteEntry, RemoteError, Stats, TransferProgress};
use crate::store::{ArtifactRecord, CacheKey, ObjectDigest, Store};
use crate::util::progress::Progress;

/// How a run uses a remote.
#[derive(Clone, Debug)]
pub struct RemoteSettings {
    /// The remote.
    pub remote: Remote,
    /// Upload what executed when the run ends (`--no-push` turns it off).
    pub push: bool,
    /// `cairn pull`: fetch remote hits, execute nothing.
    pub pull_only: bool,
}

/// What a run did with its remote, for the report.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RemoteSummary {
    /// The remote (no credentials).
    pub url: String,
    /// Steps settled from the remote.
    pub hits: usize,
    /// What was downloaded.
    pub fetched: Stats,
    /// What was uploaded.
    pub pushed: Stats,
    /// Cache entries written to the remote (others were there already).
    pub entries_pushed: usize,
    /// Why the remote was not used (for the rest of the run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

/// The walk's view of the remote.
pub(super) struct RemoteCache {
    pub settings: RemoteSettings,
    state: Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    summary: RemoteSummary,
    to_push: Vec<RemoteEntry>,
}

/// A remote hit: the entry, and what fetching it moved.
pub(super) struct Hit {
    pub entry: RemoteEntry,
    pub stats: Stats,
}

impl RemoteCache {
    pub fn new(settings: RemoteSettings) -> Self {
        let summary = RemoteSummary {
            url: settings.remote.shown().to_string(),
            ..RemoteSummary::default()
        };
        Self {
            settings,
            state: Mutex::new(CacheState {
                summary,
                to_push: Vec::new(),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, CacheState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the remote is still in use this run.
    pub fn active(&self) -> bool {
        self.state().summary.skipped.is_none()
    }

    /// Switches the remote off for the rest of the run.
    pub fn disable(&self, error: &RemoteError) {
        let mut state = self.state();
        if state.summary.skipped.is_none() {
            state.summary.skipped = Some(error.to_string());
        }
    }

    /// Looks `key` up and, on a hit, downloads its outputs into `store`. Corrupt bytes
    /// are an error, never a hit.
    pub async fn fetch(
        &self,
        store: &Store,
        key: &CacheKey,
        progress: Progress,
    ) -> Result<Option<Hit>, RemoteError> {
        let remote = &self.settings.remote;
        let Some(entry) = remote.entry(key).await? else {
            return Ok(None);
        };
        let wanted: Vec<(ObjectDigest, bool)> = entry
            .outputs
            .values()
            .map(|o| {
                let is_dir = entry
                    .artifacts
                    .iter()
                    .find(|a| a.digest == o.digest)
                    .is_some_and(|a| a.is_dir);
                (o.digest, is_dir)
            })
            .collect();
        let total: u64 = entry.artifacts.iter().map(|a| a.size).sum();
        progress.set_length(total);
        progress.set_message("fetching from the remote cache");
        let counters = TransferProgress::with_progress(progress);
        remote.download(store, &wanted, &counters).await?;
        let stats = counters.stats();
        let mut state = self.state();
        state.summary.hits += 1;
        state.summary.fetched.objects += stats.objects;
        state.summary.fetched.bytes += stats.bytes;
        state.summary.fetched.skipped += stats.skipped;
        Ok(Some(Hit { entry, stats }))
    }

    /// Queues what a step produced for the push at the end of the run.
    pub fn queue(&self, entry: RemoteEntry) {
        if self.settings.push {
            self.state().to_push.push(entry);
        }
    }

    /// Pushes the queued entries: objects first, then the entries (so an entry never
    /// names objects the remote lacks).
    pub async fn push_queued(&self, store: &Store, progress: Progress) {
        let entries = std::mem::take(&mut self.state().to_push);
        if entries.is_empty() || !self.active() {
            return;
        }
        match push(&self.settings.remote, store, &entries, progress).await {
            Ok((stats, written)) => {
                let mut state = self.state();
                state.summary.pushed = stats;
                state.summary.entries_pushed = written;
            }
            Err(e) => self.disable(&e),
        }
    }

    /// The summary so far.
    pub fn summary(&self) -> RemoteSummary {
        self.state().summary.clone()
    }
}

/// Uploads `entries`' objects the remote lacks, then the entries; returns what moved and
/// how many entries were new.
pub async fn push(
    remote: &Remote,
    store: &Store,
    entries: &[RemoteEntry],
    progress: Progress,
) -> Result<(Stats, usize), RemoteError> {
    let digests: std::collections::BTreeSet<ObjectDigest> = entries
        .iter()
        .flat_map(|e| e.outputs.values().map(|o| o.digest))
        .filter(|d| store.objects().contains(d))
        .collect();
    let total: u64 = entries
        .iter()
        .flat_map(|e| e.artifacts.iter())
        .filter(|a| digests.contains(&a.digest))
        .map(|a| a.size)
        .sum();
    progress.set_length(total);
    progress.set_message("pushing to the remote cache");
    let counters = TransferProgress::with_progress(progress);
    remote.upload(store, &digests, &counters).await?;
    let mut written = 0;
    for entry in entries {
        if entry.outputs.values().all(|o| digests.contains(&o.digest))
            && remote.put_entry(entry).await?
        {
            written += 1;
        }
    }
    Ok((counters.stats(), written))
}

/// The remote entry of an execution: its outputs and their artifact records.
pub fn entry_of(
    key: CacheKey,
    outputs: &std::collections::BTreeMap<String, crate::store::OutputRef>,
    run_id: &str,
    step: &str,
    pipeline: &str,
    artifacts: Vec<ArtifactRecord>,
) -> RemoteEntry {
    RemoteEntry {
        key,
        outputs: outputs.clone(),
        run_id: run_id.to_string(),
        step: step.to_string(),
        pipeline: pipeline.to_string(),
        artifacts,
    }
}
