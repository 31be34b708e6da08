//! The walk over the step graph: decides ready steps, settles cached ones inline, executes
//! the rest on tokio (`--jobs` at a time), verifies external steps concurrently with
//! everything else, and records as it goes. A plan is the same walk with nothing executed
//! and nothing recorded.
//!
//! The walk runs on a thread of its own (one `block_in_place` for the whole run, waiting
//! for tasks with `Handle::block_on`), so its blocking work (hashing named files, SQLite,
//! sealing outputs) never stalls the workers that drive running steps, and a finished
//! step costs no thread hand-off.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;
use tokio::runtime::RuntimeFlavor;
use tokio::sync::Semaphore;
use tokio::task::{JoinError, JoinSet};
use tokio_util::sync::CancellationToken;

use super::decide::{self, Decision, Facts};
use super::observer::Observer;
use super::presence::Presence;
use super::record::Recorder;
use super::remote_cache::{self, Hit, RemoteCache};
use super::report::{RunReport, RunStatus, StepReport};
use super::{explain, key, EngineError, RunOptions, Selection};
use crate::pipeline::{ResolvedPipeline, ResolvedStep};
use crate::remote::RemoteError;
use crate::steps::{
    FailureClass, InputArtifact, Progress, StepContext, StepError, StepOutputs, VerifyContext,
};
use crate::store::{
    ArtifactRecord, CacheEntry, CacheKey, InputRef, ObjectDigest, OutputRef, RecordTag, StepRecord,
    StepStatus, Store, StoreError, TagWriter,
};
use crate::util::blocking::blocking;
use crate::util::clock::now_rfc3339;

type Outputs = BTreeMap<String, OutputRef>;

#[derive(Clone, Debug)]
enum State {
    Pending,
    Running,
    /// Finished (ran, cached, or taken from the cache for an unselected step).
    Done(Outputs),
    /// Plan: will execute; outputs unknown unless assumed (volatile with history).
    Planned(Option<Outputs>),
    Failed,
    Skipped,
}

/// Why a step cannot be decided from its inputs.
enum Gate {
    /// Plan: an input will be recomputed, so the step will run too.
    WillRunUnknown(String),
    /// An input is missing (its producer failed or did not run).
    Blocked(String),
    /// The step cannot even be keyed (a model directory it names is missing).
    Invalid(String),
}

/// What a spawned task hands back.
enum TaskDone {
    /// An external step's cached result was checked against its system.
    Verified {
        index: usize,
        cached: Decision,
        mismatch: Option<String>,
    },
    /// A step executed.
    Executed(Finished),
    /// A step's cache key was looked up on the remote (and its outputs fetched on a hit).
    Fetched {
        index: usize,
        previous: Option<Outputs>,
        result: Result<Option<Hit>, RemoteError>,
        started_at: String,
        duration_ms: u64,
        progress: Progress,
    },
}

struct Finished {
    index: usize,
    result: Result<StepOutputs, StepError>,
    duration_ms: u64,
    started_at: String,
    log_path: PathBuf,
    work_dir: PathBuf,
    progress: Progress,
}

/// A step's failure: the message and whose it is to fix.
struct Failure {
    message: String,
    class: FailureClass,
}

/// How one execution went, for its record.
struct Execution {
    duration_ms: u64,
    started_at: String,
    error: Option<String>,
    log: Option<ObjectDigest>,
}

impl Execution {
    /// A step decided without executing (cached, skipped).
    fn settled() -> Self {
        Self {
            duration_ms: 0,
            started_at: now_rfc3339(),
            error: None,
            log: None,
        }
    }
}

struct Walk<'a> {
    pipeline: &'a ResolvedPipeline,
    sel: &'a Selection,
    store: Arc<Store>,
    opts: &'a RunOptions,
    observer: Arc<dyn Observer>,
    /// `None` for a plan: nothing is recorded or executed.
    recorder: Option<Recorder>,
    cancel: CancellationToken,
    states: Vec<State>,
    reports: Vec<Option<StepReport>>,
    inputs_of: Vec<BTreeMap<String, ObjectDigest>>,
    reasons: Vec<String>,
    keys: Vec<Option<CacheKey>>,
    ran: Vec<bool>,
    /// Position of each step in the topological order (its `seq` in records).
    seq: Vec<usize>,
    index_of: HashMap<&'a str, usize>,
    /// Selected steps still waiting for this many selected producers.
    waiting: HashMap<usize, usize>,
    ready: VecDeque<usize>,
    tasks: JoinSet<TaskDone>,
    task_step: HashMap<tokio::task::Id, usize>,
    permits: Arc<Semaphore>,
    /// Emptied work folders of finished steps, for the next ones.
    free_work_dirs: Vec<PathBuf>,
    /// Cache entries of the steps' last executions, read in one query: the entries a
    /// no-op rerun looks up.
    prefetched: HashMap<CacheKey, CacheEntry>,
    /// Whether their outputs exist, checked ahead on another thread.
    presence: Presence,
    /// The shared cache on a remote, when the run has one.
    remote: Option<Arc<RemoteCache>>,
}

/// Runs (`cancel` given) or plans (`None`) the selected steps.
pub(super) async fn walk(
    pipeline: &ResolvedPipeline,
    sel: &Selection,
    store: Arc<Store>,
    opts: &RunOptions,
    observer: Arc<dyn Observer>,
    cancel: Option<CancellationToken>,
) -> Result<RunReport, EngineError> {
    let planning = cancel.is_none();
    let n = pipeline.steps.len();
    let mut seq = vec![0; n];
    for (pos, &i) in pipeline.dag.order().iter().enumerate() {
        seq[i] = pos;
    }
    let mut walk = Walk {
        pipeline,
        sel,
        store: store.clone(),
        opts,
        observer: observer.clone(),
        recorder: None,
        cancel: cancel.unwrap_or_default(),
        states: vec![State::Pending; n],
        reports: vec![None; n],
        inputs_of: vec![BTreeMap::new(); n],
        reasons: vec![String::new(); n],
        keys: vec![None; n],
        ran: vec![false; n],
        seq,
        index_of: pipeline
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect(),
        waiting: HashMap::new(),
        ready: VecDeque::new(),
        tasks: JoinSet::new(),
        task_step: HashMap::new(),
        permits: Arc::new(Semaphore::new(opts.jobs.max(1))),
        free_work_dirs: Vec::new(),
        prefetched: HashMap::new(),
        presence: Presence::none(),
        remote: opts
            .remote
            .clone()
            .filter(|_| !planning)
            .map(|settings| Arc::new(RemoteCache::new(settings))),
    };
    let mut latest = blocking(|| store.db().latest_executions(&pipeline.name))?;
    walk.prefetched = latest
        .iter_mut()
        .filter_map(|l| l.entry.take())
        .map(|e| (e.key, e))
        .collect();
    let entry_of: HashMap<&str, &CacheEntry> = latest
        .iter()
        .filter_map(|l| Some((l.step.as_str(), walk.prefetched.get(&l.cache_key?)?)))
        .collect();
    let in_walk_order = pipeline
        .dag
        .order()
        .iter()
        .filter_map(|&i| entry_of.get(pipeline.steps[i].name.as_str()))
        .flat_map(|e| e.outputs.values().map(|o| o.digest))
        .collect();
    walk.presence = Presence::check_ahead(store.objects(), in_walk_order);
    blocking(|| walk.resolve_unselected())?;
    if !planning {
        let recorder = blocking(|| Recorder::start(store, pipeline, &opts.args, &latest))?;
        observer.run_started(recorder.run_id(), &pipeline.name);
        walk.recorder = Some(recorder);
    }
    let started = Instant::now();
    let walked = walk.schedule().await;
    for dir in walk.free_work_dirs.drain(..) {
        let _ = crate::store::objects::remove_any(&dir);
    }
    walked?;
    if let Some(remote) = walk.remote.clone() {
        let progress = observer.step_started("remote push");
        remote.push_queued(&walk.store, progress.clone()).await;
        progress.bar().finish_and_clear();
    }
    let status = if planning {
        RunStatus::Planned
    } else if walk.cancel.is_cancelled() {
        RunStatus::Cancelled
    } else if walk.states.iter().any(|s| matches!(s, State::Failed)) {
        RunStatus::Failed
    } else {
        RunStatus::Succeeded
    };
    if let Some(recorder) = walk.recorder.as_mut() {
        blocking(|| recorder.finish(status))?;
    }
    let report = RunReport {
        run_id: walk.recorder.as_ref().map(|r| r.run_id().to_string()),
        pipeline: pipeline.name.clone(),
        status,
        remote: walk.remote.as_ref().map(|r| r.summary()),
        steps: pipeline
            .dag
            .order()
            .iter()
            .filter_map(|&i| walk.reports[i].take())
            .collect(),
    };
    observer.finished(&report, started.elapsed());
    Ok(report)
}

impl<'a> Walk<'a> {
    fn step(&self, i: usize) -> &'a ResolvedStep {
        &self.pipeline.steps[i]
    }

    fn planning(&self) -> bool {
        self.recorder.is_none()
    }

    /// Steps outside the selection: those feeding selected steps take their outputs from
    /// the cache (or the run stops, naming what is missing); the rest are just skipped.
    fn resolve_unselected(&mut self) -> Result<(), EngineError> {
        if self.sel.selected.len() == self.pipeline.steps.len() {
            return Ok(());
        }
        let dag = &self.pipeline.dag;
        let needed = dag.ancestors_of_all(&self.sel.selected);
        for &i in dag.order() {
            if self.sel.selected.contains(&i) {
                continue;
            }
            let name = &self.step(i).name;
            if !needed.contains(&i) {
                self.states[i] = State::Skipped;
                self.reports[i] =
                    Some(self.report(i, StepStatus::Skipped, "not selected".into(), 0, None));
                continue;
            }
            let inputs = self.input_digests(i).map_err(|_| missing(name))?;
            let key = key::cache_key(self.step(i), &inputs);
            let entry = self
                .cache_entry(&key)?
                .filter(|e| self.objects_present(e))
                .ok_or_else(|| missing(name))?;
            self.keys[i] = Some(key);
            self.states[i] = State::Done(entry.outputs);
            self.reports[i] = Some(self.report(
                i,
                StepStatus::Skipped,
                format!(
                    "not selected; outputs from the cache (run {})",
                    entry.run_id
                ),
                0,
                None,
            ));
        }
        Ok(())
    }

    /// The cache entry of `key`: prefetched, or looked up.
    fn cache_entry(&mut self, key: &CacheKey) -> Result<Option<CacheEntry>, StoreError> {
        match self.prefetched.remove(key) {
            Some(entry) => Ok(Some(entry)),
            None => self.store.db().cache_get(key),
        }
    }

    fn objects_present(&self, entry: &CacheEntry) -> bool {
        entry
            .outputs
            .values()
            .all(|o| self.presence.contains(self.store.objects(), &o.digest))
    }

    /// Digests of a step's inputs from finished producers, plus the files it names.
    fn input_digests(&self, i: usize) -> Result<BTreeMap<String, ObjectDigest>, Gate> {
        let step = self.step(i);
        let mut out = BTreeMap::new();
        for (name, binding) in &step.inputs {
            let producer = self.index_of[binding.step.as_str()];
            let outputs = match &self.states[producer] {
                State::Done(o) | State::Planned(Some(o)) => o,
                State::Planned(None) => {
                    return Err(Gate::WillRunUnknown(format!(
                        "input {name} will be recomputed by step {}",
                        binding.step
                    )))
                }
                State::Failed => {
                    return Err(Gate::Blocked(format!(
                        "upstream step {} failed",
                        binding.step
                    )))
                }
                _ => {
                    return Err(Gate::Blocked(format!(
                        "upstream step {} did not run",
                        binding.step
                    )))
                }
            };
            let output = outputs.get(&binding.output).ok_or_else(|| {
                Gate::Blocked(format!(
                    "upstream step {} produced no output {}",
                    binding.step, binding.output
                ))
            })?;
            out.insert(name.clone(), output.digest);
        }
        let extra = step
            .implementation
            .content_inputs(&step.bound, &self.opts.cwd)
            .map_err(Gate::Invalid)?;
        for (name, path) in extra {
            let hashed = crate::store::stat_cache::hash_with_stat_cache(
                &self.store,
                &path,
                &Progress::hidden(),
            )
            .map_err(|e| {
                Gate::Invalid(format!("hashing {name} files at {}: {e}", path.display()))
            })?;
            out.insert(name, hashed.digest);
        }
        Ok(out)
    }

    /// Where a content input (not produced by a step) came from, for its record.
    fn content_origin(&self, i: usize, name: &str) -> String {
        let step = self.step(i);
        step.implementation
            .content_inputs(&step.bound, &self.opts.cwd)
            .ok()
            .and_then(|extra| extra.into_iter().find(|(n, _)| n == name))
            .map(|(_, path)| format!("{}{}", explain::FILES_ORIGIN, path.display()))
            .unwrap_or_default()
    }

    async fn schedule(&mut self) -> Result<(), EngineError> {
        let dag = &self.pipeline.dag;
        for &i in dag.order() {
            if !self.sel.selected.contains(&i) {
                continue;
            }
            let producers = dag
                .upstream(i)
                .iter()
                .filter(|u| self.sel.selected.contains(u))
                .count();
            if producers == 0 {
                self.ready.push_back(i);
            } else {
                self.waiting.insert(i, producers);
            }
        }
        match tokio::runtime::Handle::try_current() {
            // The walk gets a thread of its own for the whole run: its blocking work
            // (hashing named files, SQLite, sealing outputs) never holds up a worker, and
            // there is one hand-off per run instead of one per finished step.
            Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| {
                    self.drain_ready()?;
                    while let Some(joined) = handle.block_on(self.tasks.join_next_with_id()) {
                        self.finished_task(joined)?;
                    }
                    self.flush()
                })
            }
            // A current-thread runtime (embedders, tests): the same loop, awaiting.
            _ => {
                self.drain_ready()?;
                while let Some(joined) = self.tasks.join_next_with_id().await {
                    self.finished_task(joined)?;
                }
                self.flush()
            }
        }
    }

    /// What a finished task unblocks is spawned before its records are flushed (which
    /// waits for its outputs to be durable): that wait is off the critical path.
    fn finished_task(
        &mut self,
        joined: Result<(tokio::task::Id, TaskDone), JoinError>,
    ) -> Result<(), EngineError> {
        self.task_done(joined)?;
        self.drain_ready()
    }

    /// Decides every ready step: settles what needs no execution (and releases what
    /// waits on it, which may become ready in turn), spawns the rest.
    fn drain_ready(&mut self) -> Result<(), EngineError> {
        while let Some(i) = self.ready.pop_front() {
            let settled = if self.cancel.is_cancelled() {
                self.settle(
                    i,
                    State::Skipped,
                    StepStatus::Skipped,
                    "run cancelled".into(),
                );
                true
            } else {
                self.decide(i)?
            };
            if settled {
                self.release(i);
            }
            if self.recorder.as_ref().is_some_and(Recorder::batch_full) {
                self.flush()?;
            }
        }
        self.flush()
    }

    /// Decides one step; `true` when it settled, `false` when a task now works on it.
    fn decide(&mut self, i: usize) -> Result<bool, EngineError> {
        if let Some(reason) = &self.step(i).skip {
            self.settle(i, State::Skipped, StepStatus::Skipped, reason.clone());
            return Ok(true);
        }
        let inputs = match self.input_digests(i) {
            Ok(inputs) => inputs,
            Err(Gate::Blocked(reason)) => {
                self.settle(i, State::Skipped, StepStatus::Skipped, reason);
                return Ok(true);
            }
            Err(Gate::WillRunUnknown(reason)) => {
                self.settle(i, State::Planned(None), StepStatus::WillRun, reason);
                return Ok(true);
            }
            Err(Gate::Invalid(reason)) => {
                self.settle_invalid(i, reason);
                return Ok(true);
            }
        };
        let step = self.step(i);
        let key = key::cache_key(step, &inputs);
        self.inputs_of[i] = inputs;
        self.keys[i] = Some(key);
        let entry = self.cache_entry(&key)?;
        let outputs_present = entry.as_ref().is_some_and(|e| self.objects_present(e));
        let decision = decide::decide(Facts {
            volatile: step.implementation.volatile(),
            forced: self.sel.forced.contains(&i),
            entry,
            outputs_present,
            upstream_ran: self
                .pipeline
                .dag
                .upstream(i)
                .iter()
                .filter(|&&u| self.ran[u])
                .map(|&u| self.step(u).name.clone())
                .collect(),
        });
        if matches!(decision, Decision::Cached { .. }) && step.implementation.external() {
            self.spawn_verify(i, decision);
            return Ok(false);
        }
        self.act(i, decision)
    }

    /// Carries out a decision; `true` when the step settled.
    fn act(&mut self, i: usize, decision: Decision) -> Result<bool, EngineError> {
        match decision {
            Decision::Cached { entry, reason } => {
                self.settle(i, State::Done(entry.outputs), StepStatus::Cached, reason);
                Ok(true)
            }
            Decision::Run { why, previous } => {
                let reason = match why.text() {
                    Some(text) => text,
                    None => self.explain(i)?,
                };
                if self.planning() {
                    let assumed = previous.filter(|_| self.step(i).implementation.volatile());
                    self.settle(i, State::Planned(assumed), StepStatus::WillRun, reason);
                    return Ok(true);
                }
                self.reasons[i] = reason;
                self.states[i] = State::Running;
                if self.remote_applies(i) {
                    self.spawn_fetch(i, previous);
                } else {
                    self.spawn_run(i, previous)?;
                }
                Ok(false)
            }
        }
    }

    /// What changed since the step's last execution in this pipeline.
    fn explain(&self, i: usize) -> Result<String, EngineError> {
        let step = self.step(i);
        let previous = self
            .store
            .db()
            .last_step_record(&self.pipeline.name, &step.name)?;
        if previous
            .as_ref()
            .is_some_and(|p| p.cache_key == self.keys[i])
        {
            return Ok(
                "no cached result for these inputs (the last run with them was \
                       interrupted, or `cairn gc` dropped it)"
                    .into(),
            );
        }
        Ok(explain::why_rerun(
            step,
            &self.inputs_of[i],
            previous.as_ref(),
        ))
    }

    fn spawn_verify(&mut self, i: usize, cached: Decision) {
        let Decision::Cached { entry, .. } = &cached else {
            return;
        };
        let step = self.step(i);
        let implementation = step.implementation;
        let params = step.bound.clone();
        let outputs = entry.outputs.clone();
        let store = self.store.clone();
        let docstore_uri = self.pipeline.docstore_uri.clone();
        let handle = self.tasks.spawn(async move {
            let ctx = VerifyContext {
                outputs: &outputs,
                store: &store,
                docstore_uri: docstore_uri.as_deref(),
            };
            let mismatch = implementation.verify(&params, &ctx).await.err();
            TaskDone::Verified {
                index: i,
                cached,
                mismatch,
            }
        });
        self.task_step.insert(handle.id(), i);
    }

    /// Whether a step that must run asks the remote first: not when forced (the user
    /// wants it executed), not for volatile steps (they look at the world each time), not
    /// for external ones (they load a document or vector store that belongs to this
    /// machine: another machine's receipt says nothing about it).
    fn remote_applies(&self, i: usize) -> bool {
        let step = self.step(i);
        self.remote.as_ref().is_some_and(|r| r.active())
            && !self.sel.forced.contains(&i)
            && !step.implementation.volatile()
            && !step.implementation.external()
            && self.keys[i].is_some()
    }

    fn spawn_fetch(&mut self, i: usize, previous: Option<Outputs>) {
        let Some((remote, key)) = self.remote.clone().zip(self.keys[i]) else {
            return;
        };
        let store = self.store.clone();
        let observer = self.observer.clone();
        let name = self.step(i).name.clone();
        let handle = self.tasks.spawn(async move {
            let progress = observer.step_started(&name);
            let started_at = now_rfc3339();
            let t0 = Instant::now();
            let result = remote.fetch(&store, &key, progress.clone()).await;
            TaskDone::Fetched {
                index: i,
                previous,
                result,
                started_at,
                duration_ms: t0.elapsed().as_millis() as u64,
                progress,
            }
        });
        self.task_step.insert(handle.id(), i);
    }

    /// A remote lookup came back: a hit settles the step, a miss (or a remote that
    /// failed, which is then off for the run) executes it, or skips it under `pull`.
    /// `true` when the step settled.
    fn fetched(
        &mut self,
        i: usize,
        previous: Option<Outputs>,
        result: Result<Option<Hit>, RemoteError>,
        started_at: String,
        duration_ms: u64,
        progress: Progress,
    ) -> Result<bool, EngineError> {
        let Some(remote) = self.remote.clone() else {
            return Ok(false);
        };
        let miss = match result {
            Ok(Some(hit)) => {
                self.settle_remote_hit(i, hit, started_at, duration_ms, &progress)?;
                return Ok(true);
            }
            Ok(None) => "not in the remote cache".to_string(),
            Err(e) => {
                if e.remote_failed() {
                    remote.disable(&e);
                    self.reasons[i] = format!("{} (remote skipped: {e})", self.reasons[i]);
                } else {
                    self.reasons[i] = format!("{} (remote hit refused: {e})", self.reasons[i]);
                }
                format!("the remote failed: {e}")
            }
        };
        progress.bar().finish_and_clear();
        if remote.settings.pull_only {
            self.settle(i, State::Skipped, StepStatus::Skipped, miss);
            return Ok(true);
        }
        self.spawn_run(i, previous)?;
        Ok(false)
    }

    /// Records a step whose outputs came from the remote: its artifacts and a local cache
    /// entry, so the next run hits locally.
    fn settle_remote_hit(
        &mut self,
        i: usize,
        hit: Hit,
        started_at: String,
        duration_ms: u64,
        progress: &Progress,
    ) -> Result<(), EngineError> {
        let step = self.step(i);
        let key = self.keys[i]
            .ok_or_else(|| StoreError::Corrupt(format!("step {} has no cache key", step.name)))?;
        let run_id = self.run_id();
        let created_at = now_rfc3339();
        let outputs = hit.entry.outputs.clone();
        let artifacts: Vec<ArtifactRecord> = hit
            .entry
            .artifacts
            .iter()
            .filter(|a| outputs.values().any(|o| o.digest == a.digest))
            .map(|a| ArtifactRecord {
                created_at: created_at.clone(),
                producer_run: run_id.clone(),
                producer_step: step.name.clone(),
                pipeline: self.pipeline.name.clone(),
                ..a.clone()
            })
            .collect();
        let reason = format!(
            "cached (remote): made by run {} of {}; fetched {} objects ({} bytes), {} already here",
            hit.entry.run_id,
            hit.entry.pipeline,
            hit.stats.objects,
            hit.stats.bytes,
            hit.stats.skipped
        );
        self.states[i] = State::Done(outputs.clone());
        let entry = CacheEntry {
            key,
            outputs,
            run_id,
            step: step.name.clone(),
        };
        let record = self.step_record(
            i,
            StepStatus::Cached,
            &reason,
            Execution {
                duration_ms,
                started_at,
                error: None,
                log: None,
            },
        );
        if let Some(recorder) = self.recorder.as_mut() {
            recorder.executed(record, self.seq[i], &artifacts, Some(entry))?;
        }
        let report = self.report(i, StepStatus::Cached, reason, duration_ms, None);
        self.observer.step_finished(&report, Some(progress));
        self.reports[i] = Some(report);
        Ok(())
    }

    fn spawn_run(&mut self, i: usize, previous: Option<Outputs>) -> Result<(), EngineError> {
        let ctx = self.context(i, previous)?;
        let permits = self.permits.clone();
        let observer = self.observer.clone();
        let implementation = self.step(i).implementation;
        let params = self.step(i).bound.clone();
        // A Slurm step needs what the node loads the pipeline with.
        let slurm = self.step(i).slurm.clone().map(|resources| {
            let sets: Vec<String> = self.opts.args["set"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            (self.pipeline.file.clone(), sets, resources)
        });
        let handle = self.tasks.spawn(async move {
            let _permit = permits.acquire_owned().await;
            let mut ctx = ctx;
            ctx.progress = observer.step_started(&ctx.step);
            let started_at = now_rfc3339();
            let t0 = Instant::now();
            let result = if ctx.cancel.is_cancelled() {
                Err(StepError::Cancelled)
            } else {
                match (verify_inputs(&ctx).await, &slurm) {
                    (Err(e), _) => Err(e),
                    (Ok(()), None) => implementation.run(&params, &ctx).await,
                    (Ok(()), Some((file, sets, resources))) => {
                        super::slurm::run(&ctx, file, sets, resources).await
                    }
                }
            };
            TaskDone::Executed(Finished {
                index: i,
                result,
                duration_ms: t0.elapsed().as_millis() as u64,
                started_at,
                log_path: ctx.log_path.clone(),
                work_dir: ctx.work_dir.clone(),
                progress: ctx.progress.clone(),
            })
        });
        self.task_step.insert(handle.id(), i);
        Ok(())
    }

    fn task_done(
        &mut self,
        joined: Result<(tokio::task::Id, TaskDone), JoinError>,
    ) -> Result<(), EngineError> {
        let i = match joined {
            Ok((
                id,
                TaskDone::Verified {
                    index,
                    cached,
                    mismatch,
                },
            )) => {
                self.task_step.remove(&id);
                if !self.act(index, decide::after_verify(cached, mismatch))? {
                    return Ok(());
                }
                index
            }
            Ok((id, TaskDone::Executed(finished))) => {
                self.task_step.remove(&id);
                let i = finished.index;
                self.finish(finished)?;
                i
            }
            Ok((
                id,
                TaskDone::Fetched {
                    index,
                    previous,
                    result,
                    started_at,
                    duration_ms,
                    progress,
                },
            )) => {
                self.task_step.remove(&id);
                if !self.fetched(index, previous, result, started_at, duration_ms, progress)? {
                    return Ok(());
                }
                index
            }
            Err(join_error) => {
                let Some(i) = self.task_step.remove(&join_error.id()) else {
                    return Ok(());
                };
                let what = if join_error.is_panic() {
                    "the step panicked (a bug in cairn; please report it)"
                } else {
                    "the step task was aborted"
                };
                let failure = Failure {
                    message: what.to_string(),
                    class: FailureClass::Internal,
                };
                self.fail(i, failure, 0, now_rfc3339(), None, None)?;
                i
            }
        };
        self.release(i);
        Ok(())
    }

    /// A settled step no longer holds back what consumes it.
    fn release(&mut self, i: usize) {
        for &d in self.pipeline.dag.downstream(i) {
            if let Some(n) = self.waiting.get_mut(&d) {
                *n -= 1;
                if *n == 0 {
                    self.waiting.remove(&d);
                    self.ready.push_back(d);
                }
            }
        }
    }

    fn context(&mut self, i: usize, previous: Option<Outputs>) -> Result<StepContext, EngineError> {
        let step = self.step(i);
        let work_dir = match self.free_work_dirs.pop() {
            Some(dir) => dir,
            None => {
                let dir = self
                    .store
                    .objects()
                    .temp_dir("work")
                    .map_err(|e| StoreError::io("creating a step work folder", e))?;
                std::fs::create_dir_all(dir.join("out"))
                    .map_err(|e| StoreError::io("creating a step work folder", e))?;
                dir
            }
        };
        let mut inputs = BTreeMap::new();
        for (name, binding) in &step.inputs {
            let producer = self.index_of[binding.step.as_str()];
            if let State::Done(outputs) = &self.states[producer] {
                if let Some(o) = outputs.get(&binding.output) {
                    inputs.insert(
                        name.clone(),
                        InputArtifact {
                            digest: o.digest,
                            kind: o.kind.clone(),
                            path: self.store.object_path(&o.digest),
                        },
                    );
                }
            }
        }
        let key = self.keys[i]
            .ok_or_else(|| StoreError::Corrupt(format!("step {} has no cache key", step.name)))?;
        Ok(StepContext {
            step: step.name.clone(),
            cache_key: key,
            param_env: step.param_env.clone(),
            inputs,
            outputs: step.outputs.clone(),
            previous,
            log_path: work_dir.join("log.txt"),
            work_dir,
            cwd: self.opts.cwd.clone(),
            docstore_uri: self.pipeline.docstore_uri.clone(),
            store: self.store.clone(),
            progress: Progress::hidden(),
            cancel: self.cancel.child_token(),
        })
    }

    fn finish(&mut self, f: Finished) -> Result<(), EngineError> {
        let i = f.index;
        let log = self
            .recorder
            .as_ref()
            .and_then(|r| r.store_log(&f.log_path));
        self.recycle(f.work_dir.clone());
        let outputs = match f.result {
            Ok(outputs) => outputs,
            Err(e) => {
                let failure = Failure {
                    message: e.to_string(),
                    class: e.class(),
                };
                return self.fail(
                    i,
                    failure,
                    f.duration_ms,
                    f.started_at,
                    log,
                    Some(&f.progress),
                );
            }
        };
        let refs: Outputs = outputs
            .outputs
            .iter()
            .map(|(k, p)| {
                (
                    k.clone(),
                    OutputRef {
                        digest: p.digest,
                        kind: p.kind.clone(),
                    },
                )
            })
            .collect();
        let step = self.step(i);
        let key = self.keys[i].ok_or_else(|| {
            StoreError::Corrupt(format!("step {} ran without a cache key", step.name))
        })?;
        let volatile = step.implementation.volatile();
        let forced = self.sel.forced.contains(&i);
        // A volatile step compares with what it produced last under the same key.
        let previous = if volatile {
            self.store.db().cache_get(&key)?.map(|e| e.outputs)
        } else {
            None
        };
        let note = outputs
            .note
            .as_deref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default();
        let (status, reason) = match (&previous, volatile && !forced) {
            (Some(prev), true) if *prev == refs => {
                (StepStatus::Cached, format!("source unchanged{note}"))
            }
            (Some(_), true) => (StepStatus::Ran, format!("source changed{note}")),
            (None, true) => (StepStatus::Ran, format!("no earlier result{note}")),
            _ => (StepStatus::Ran, format!("{}{note}", self.reasons[i])),
        };
        self.ran[i] = status == StepStatus::Ran;
        self.states[i] = State::Done(refs.clone());
        let run_id = self.run_id();
        let created_at = now_rfc3339();
        let artifacts: Vec<ArtifactRecord> = outputs
            .outputs
            .iter()
            .map(|(name, p)| ArtifactRecord {
                digest: p.digest,
                kind: p.kind.clone(),
                is_dir: p.is_dir,
                size: p.size,
                created_at: created_at.clone(),
                producer_run: run_id.clone(),
                producer_step: step.name.clone(),
                output: name.clone(),
                pipeline: self.pipeline.name.clone(),
                metadata: p.metadata.clone(),
            })
            .collect();
        if let Some(remote) = &self.remote {
            if status == StepStatus::Ran {
                remote.queue(remote_cache::entry_of(
                    key,
                    &refs,
                    &run_id,
                    &step.name,
                    &self.pipeline.name,
                    artifacts.clone(),
                ));
            }
        }
        let entry = CacheEntry {
            key,
            outputs: refs,
            run_id,
            step: step.name.clone(),
        };
        let record = self.step_record(
            i,
            status,
            &reason,
            Execution {
                duration_ms: f.duration_ms,
                started_at: f.started_at,
                error: None,
                log,
            },
        );
        if let Some(recorder) = self.recorder.as_mut() {
            recorder.executed(record, self.seq[i], &artifacts, Some(entry))?;
        }
        let report = self.report(i, status, reason, f.duration_ms, None);
        self.observer.step_finished(&report, Some(&f.progress));
        self.reports[i] = Some(report);
        Ok(())
    }

    /// Empties a finished step's work folder and keeps it for the next step: removing a
    /// folder can cost a synchronous discard on the device (ext4 mounted with `discard`),
    /// emptying it does not. A folder that cannot be emptied is removed instead.
    fn recycle(&mut self, work_dir: PathBuf) {
        use crate::store::objects::remove_any;
        let empty = || -> std::io::Result<()> {
            for entry in std::fs::read_dir(&work_dir)? {
                let entry = entry?;
                let name = entry.file_name();
                // An empty log is as good as a new one; every file created and deleted
                // makes the next inode allocation slower on some filesystems.
                let empty_log = name == "log.txt"
                    && entry.metadata().is_ok_and(|m| m.is_file() && m.len() == 0);
                if name != "out" && !empty_log {
                    remove_any(&entry.path())?;
                }
            }
            for entry in std::fs::read_dir(work_dir.join("out"))? {
                remove_any(&entry?.path())?;
            }
            Ok(())
        };
        if empty().is_ok() {
            self.free_work_dirs.push(work_dir);
        } else {
            let _ = remove_any(&work_dir);
        }
    }

    fn run_id(&self) -> String {
        self.recorder
            .as_ref()
            .map(|r| r.run_id().to_string())
            .unwrap_or_default()
    }

    fn fail(
        &mut self,
        i: usize,
        failure: Failure,
        duration_ms: u64,
        started_at: String,
        log: Option<ObjectDigest>,
        progress: Option<&Progress>,
    ) -> Result<(), EngineError> {
        self.states[i] = State::Failed;
        let error = failure.message;
        let reason = self.reasons[i].clone();
        let record = self.step_record(
            i,
            StepStatus::Failed,
            &reason,
            Execution {
                duration_ms,
                started_at,
                error: Some(error.clone()),
                log,
            },
        );
        if let Some(recorder) = self.recorder.as_mut() {
            recorder.executed(record, self.seq[i], &[], None)?;
        }
        let mut report = self.report(i, StepStatus::Failed, reason, duration_ms, Some(error));
        report.error_class = Some(failure.class);
        self.observer.step_finished(&report, progress);
        self.reports[i] = Some(report);
        Ok(())
    }

    fn report(
        &self,
        i: usize,
        status: StepStatus,
        reason: String,
        duration_ms: u64,
        error: Option<String>,
    ) -> StepReport {
        let outputs = match &self.states[i] {
            State::Done(o) | State::Planned(Some(o)) => {
                o.iter().map(|(k, v)| (k.clone(), v.digest)).collect()
            }
            _ => BTreeMap::new(),
        };
        StepReport {
            name: self.step(i).name.clone(),
            status,
            reason,
            cache_key: self.keys[i],
            outputs,
            duration_ms,
            error,
            error_class: None,
        }
    }

    fn step_record(
        &self,
        i: usize,
        status: StepStatus,
        reason: &str,
        exec: Execution,
    ) -> StepRecord {
        let mut record = self.record_without_params(i, status, reason, exec);
        record.params = crate::redact::redact(&self.step(i).params);
        record
    }

    /// [`Self::step_record`] with `params` left null.
    fn record_without_params(
        &self,
        i: usize,
        status: StepStatus,
        reason: &str,
        exec: Execution,
    ) -> StepRecord {
        let step = self.step(i);
        let outputs = match &self.states[i] {
            State::Done(o) => o.clone(),
            _ => BTreeMap::new(),
        };
        StepRecord {
            run_id: self.run_id(),
            step: step.name.clone(),
            kind: step.uses.clone(),
            version: step.version.clone(),
            status,
            reason: reason.to_string(),
            cache_key: self.keys[i],
            duration_ms: exec.duration_ms,
            started_at: exec.started_at,
            // Records are displayed and kept: secrets in parameters are masked (the cache
            // key was computed from the real values).
            params: Value::Null,
            param_refs: step
                .param_refs
                .iter()
                .map(|(k, v)| (k.clone(), crate::redact::redact(v)))
                .collect(),
            inputs: self.inputs_of[i]
                .iter()
                .map(|(name, digest)| {
                    let from = step
                        .inputs
                        .get(name)
                        .map(|b| b.to_string())
                        .unwrap_or_else(|| self.content_origin(i, name));
                    (
                        name.clone(),
                        InputRef {
                            digest: *digest,
                            from,
                        },
                    )
                })
                .collect(),
            outputs,
            error: exec.error,
            log: exec.log,
        }
    }

    /// Marks a step finished without executing it and queues its record.
    fn settle(&mut self, i: usize, state: State, status: StepStatus, reason: String) {
        self.states[i] = state;
        let report = self.report(i, status, reason, 0, None);
        self.observer.step_finished(&report, None);
        if status != StepStatus::WillRun && !self.planning() {
            // A cache hit that repeats the last execution is stored as a pointer: its
            // record is built (and its parameters masked) only when it is written whole.
            let tag = (status == StepStatus::Cached).then(|| self.record_tag(i));
            let step = self.step(i);
            let seq = self.seq[i];
            let pointed = match (self.recorder.as_mut(), tag) {
                (Some(recorder), Some(tag)) => recorder.hit(&step.name, seq, tag, &report.reason),
                _ => false,
            };
            if !pointed {
                let record =
                    self.record_without_params(i, status, &report.reason, Execution::settled());
                if let Some(recorder) = self.recorder.as_mut() {
                    recorder.settled(record, seq, || crate::redact::redact(&step.params));
                }
            }
        }
        self.reports[i] = Some(report);
    }

    /// The [`StepRecord::tag`] of the record [`Self::record_without_params`] would build,
    /// without building it.
    fn record_tag(&self, i: usize) -> RecordTag {
        let step = self.step(i);
        let mut tag = TagWriter::new(self.keys[i].as_ref(), &step.uses, &step.version);
        tag.count(step.param_refs.len());
        for (name, value) in &step.param_refs {
            tag.param_ref(name, &crate::redact::redact(value));
        }
        let inputs = &self.inputs_of[i];
        tag.count(inputs.len());
        for (name, digest) in inputs {
            match step.inputs.get(name) {
                Some(binding) => tag.input(name, binding, digest),
                None => tag.input(name, self.content_origin(i, name), digest),
            }
        }
        match &self.states[i] {
            State::Done(outputs) => {
                tag.count(outputs.len());
                for (name, output) in outputs {
                    tag.output(name, &output.kind, &output.digest);
                }
            }
            _ => tag.count(0),
        }
        tag.finish()
    }

    /// A step that failed before it could run (its cache key could not be computed):
    /// the message is both its reason and its error.
    fn settle_invalid(&mut self, i: usize, message: String) {
        self.states[i] = State::Failed;
        let mut report = self.report(
            i,
            StepStatus::Failed,
            message.clone(),
            0,
            Some(message.clone()),
        );
        // It names files that are missing or wrong (a model folder, a tokenizer).
        report.error_class = Some(FailureClass::Input);
        self.observer.step_finished(&report, None);
        self.reports[i] = Some(report);
        if !self.planning() {
            let mut exec = Execution::settled();
            exec.error = Some(message.clone());
            let record = self.record_without_params(i, StepStatus::Failed, &message, exec);
            let step = self.step(i);
            if let Some(recorder) = self.recorder.as_mut() {
                recorder.settled(record, self.seq[i], || crate::redact::redact(&step.params));
            }
        }
    }

    fn flush(&mut self) -> Result<(), EngineError> {
        if let Some(recorder) = self.recorder.as_mut() {
            recorder.flush()?;
        }
        Ok(())
    }
}

/// Checks that every object a step is about to read holds the bytes it is named after
/// (`store/verify.rs`); a corrupted one fails the step with what to do. Small files are
/// checked right here (tens of microseconds); anything bigger on the blocking pool. Not
/// `block_in_place`: the task would go on, and spawn the step's processes, from a thread
/// that tokio retires when idle, and a helper that dies with its parent thread
/// (PR_SET_PDEATHSIG) would die with it.
/// [`verify_inputs`] for a step executing elsewhere (a Slurm node).
pub(super) async fn verify_inputs_of(ctx: &StepContext) -> Result<(), StepError> {
    verify_inputs(ctx).await
}

async fn verify_inputs(ctx: &StepContext) -> Result<(), StepError> {
    let t0 = Instant::now();
    let result = verify_inputs_now(ctx).await;
    tracing::debug!(
        step = %ctx.step,
        ms = t0.elapsed().as_secs_f64() * 1e3,
        inputs = ctx.inputs.len(),
        "inputs verified"
    );
    result
}

async fn verify_inputs_now(ctx: &StepContext) -> Result<(), StepError> {
    const INLINE_BYTES: u64 = 256 << 10;
    let mut deferred = Vec::new();
    for (name, input) in &ctx.inputs {
        let small = std::fs::symlink_metadata(&input.path)
            .is_ok_and(|m| m.is_file() && m.len() <= INLINE_BYTES);
        if small {
            ctx.store
                .verify_object(&input.digest)
                .map_err(|e| corrupt_input(name, e))?;
        } else {
            deferred.push((name.clone(), input.digest));
        }
    }
    if deferred.is_empty() {
        return Ok(());
    }
    let store = ctx.store.clone();
    tokio::task::spawn_blocking(move || {
        for (name, digest) in &deferred {
            store
                .verify_object(digest)
                .map_err(|e| corrupt_input(name, e))?;
        }
        Ok(())
    })
    .await
    .map_err(|e| StepError::Failed(format!("verifying inputs panicked: {e}")))?
}

fn corrupt_input(name: &str, e: StoreError) -> StepError {
    match e {
        StoreError::CorruptObject { .. } => StepError::Input(format!("input `{name}`: {e}")),
        other => StepError::Store(other),
    }
}

fn missing(upstream: &str) -> EngineError {
    EngineError::MissingUpstream(format!(
        "the selected steps need the outputs of `{upstream}`, which are not in the cache for its current inputs and params; \
         run without --only/--from first, or add --only {upstream}"
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use async_trait::async_trait;
    use indexmap::IndexMap;
    use schemars::JsonSchema;
    use serde::Deserialize;

    use super::*;
    use crate::engine::Silent;
    use crate::graph::Dag;
    use crate::steps::{BoundParams, Kind, Step, Typed};
    use crate::store::Access;

    #[derive(Deserialize, JsonSchema)]
    struct NoParams {}

    /// An external kind whose check only succeeds while another check is in flight.
    struct NeedsCompany;

    static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
    static NEEDS_COMPANY: Typed<NeedsCompany> = Typed(NeedsCompany);

    #[async_trait]
    impl Kind for NeedsCompany {
        type Params = NoParams;
        const OUTPUTS: &'static [(&'static str, &'static str)] = &[("out", "file")];

        fn name(&self) -> &'static str {
            "needs_company"
        }
        fn version(&self) -> String {
            "1".into()
        }
        fn summary(&self) -> &'static str {
            "test kind"
        }
        fn external(&self) -> bool {
            true
        }

        async fn verify(&self, _: &NoParams, _: &VerifyContext<'_>) -> Result<(), String> {
            IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
            for _ in 0..1000 {
                if IN_FLIGHT.load(Ordering::SeqCst) >= 2 {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err("checked alone: external checks ran one at a time".into())
        }

        async fn run(&self, _: &NoParams, ctx: &StepContext) -> Result<StepOutputs, StepError> {
            std::fs::write(ctx.output_path("out"), &ctx.step)
                .map_err(|e| StepError::Failed(e.to_string()))?;
            ctx.single_output("out", serde_json::json!({}), String::new())
        }
    }

    fn pipeline() -> ResolvedPipeline {
        let step = |name: &str| ResolvedStep {
            name: name.into(),
            uses: "needs_company".into(),
            implementation: &NEEDS_COMPANY as &'static dyn Step,
            version: "1".into(),
            params: serde_json::json!({}),
            bound: BoundParams::new(NoParams {}),
            param_refs: Default::default(),
            param_env: Default::default(),
            inputs: IndexMap::new(),
            expects: Default::default(),
            outputs: IndexMap::from([("out".to_string(), "file".to_string())]),
            variant: None,
            skip: None,
            slurm: None,
        };
        ResolvedPipeline {
            name: "verify".into(),
            description: None,
            file: "verify.yaml".into(),
            params: IndexMap::new(),
            docstore_uri: None,
            remote: None,
            steps: vec![step("a"), step("b")],
            dag: Dag::build(2, []).unwrap(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn external_checks_run_concurrently_with_other_ready_steps() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&tmp.path().join("store"), Access::Shared).unwrap());
        let pipeline = pipeline();
        let opts = RunOptions {
            jobs: 2,
            cwd: tmp.path().to_path_buf(),
            ..RunOptions::default()
        };
        let sel = crate::engine::select(&pipeline, &opts).unwrap();
        let cold = crate::engine::run(
            &pipeline,
            &sel,
            store.clone(),
            &opts,
            Arc::new(Silent),
            CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(cold.count(StepStatus::Ran), 2, "{cold:?}");
        assert_eq!(IN_FLIGHT.load(Ordering::SeqCst), 0, "nothing cached yet");

        let warm = crate::engine::run(
            &pipeline,
            &sel,
            store,
            &opts,
            Arc::new(Silent),
            CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(IN_FLIGHT.load(Ordering::SeqCst), 2, "both were checked");
        for step in &warm.steps {
            assert_eq!(step.status, StepStatus::Cached, "{step:?}");
        }
    }
}
