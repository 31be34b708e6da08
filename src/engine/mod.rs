//! Planning and execution: decides per step whether to run (and why), schedules ready
//! steps on tokio with a `--jobs` limit, commits outputs and records, and stops the
//! rerun wave where a step reproduces byte-identical outputs (early cutoff).

pub mod explain;
pub mod key;
pub mod report;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};
use thiserror::Error;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::graph::Dag;
use crate::pipeline::{did_you_mean, ResolvedPipeline, ResolvedStep};
use crate::steps::{InputArtifact, Progress, StepContext, StepError, StepOutputs};
use crate::store::{
    ArtifactRecord, CacheEntry, CacheKey, InputRef, ObjectDigest, OutputRef, RunRecord, StepRecord,
    StepStatus, StepWrite, Store, StoreError,
};
pub use report::{Display, RunReport, StepReport};

/// Errors that stop a run before or outside any step.
#[derive(Debug, Error)]
pub enum EngineError {
    /// `--only`/`--from`/`--force` named something wrong (exit 2).
    #[error("{0}")]
    Selection(String),
    /// A partial run needs upstream outputs the cache does not have (exit 2).
    #[error("{0}")]
    MissingUpstream(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How to run.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Run only these steps (upstream outputs come from the cache).
    pub only: Vec<String>,
    /// Run this step and everything below it.
    pub from: Option<String>,
    /// Execute these steps even when cached.
    pub force: Vec<String>,
    /// Execute every selected step.
    pub force_all: bool,
    /// Most steps executing at once.
    pub jobs: usize,
    /// Decide only; execute nothing, write nothing.
    pub dry_run: bool,
    /// No terminal display.
    pub quiet: bool,
    /// What the user asked for, recorded on the run.
    pub args: Value,
    /// Directory relative paths resolve against.
    pub cwd: PathBuf,
}

/// The steps a run covers.
#[derive(Debug)]
pub struct Selection {
    dag: Dag,
    selected: BTreeSet<usize>,
    forced: BTreeSet<usize>,
}

fn step_index(pipeline: &ResolvedPipeline, name: &str, flag: &str) -> Result<usize, EngineError> {
    pipeline
        .steps
        .iter()
        .position(|s| s.name == name)
        .ok_or_else(|| {
            let hint = did_you_mean(name, pipeline.steps.iter().map(|s| s.name.as_str()))
                .map(|h| format!(" ({h})"))
                .unwrap_or_default();
            EngineError::Selection(format!(
                "{flag} {name}: pipeline `{}` has no step `{name}`{hint}",
                pipeline.name
            ))
        })
}

/// Resolves `--only`, `--from` and `--force` against the pipeline. Touches no store.
pub fn select(pipeline: &ResolvedPipeline, opts: &RunOptions) -> Result<Selection, EngineError> {
    let dag = Dag::build(&pipeline.steps).map_err(|cycle| {
        EngineError::Selection(format!("dependency cycle: {}", cycle.join(" -> ")))
    })?;
    if !opts.only.is_empty() && opts.from.is_some() {
        return Err(EngineError::Selection(
            "--only and --from cannot be combined".into(),
        ));
    }
    let mut selected = BTreeSet::new();
    if !opts.only.is_empty() {
        for name in &opts.only {
            selected.insert(step_index(pipeline, name, "--only")?);
        }
    } else if let Some(from) = &opts.from {
        selected = dag.descendants(step_index(pipeline, from, "--from")?);
    } else {
        selected.extend(0..pipeline.steps.len());
    }
    let mut forced = BTreeSet::new();
    for name in &opts.force {
        forced.insert(step_index(pipeline, name, "--force")?);
    }
    if opts.force_all {
        forced.extend(selected.iter().copied());
    }
    Ok(Selection {
        dag,
        selected,
        forced,
    })
}

/// A new time-sortable run id.
pub fn new_run_id() -> String {
    let now = time::OffsetDateTime::now_utc();
    let fmt = time::macros::format_description!("[year][month][day]-[hour][minute][second]");
    format!(
        "{}-{:06x}",
        now.format(&fmt).unwrap_or_default(),
        rand::random::<u32>() & 0xff_ffff
    )
}

/// Current time as RFC 3339.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[derive(Clone, Debug)]
enum State {
    Pending,
    Running,
    /// Finished (ran, cached, or taken from the cache for an unselected step).
    Done(BTreeMap<String, OutputRef>),
    /// Dry run: will execute; outputs unknown unless assumed (volatile with history).
    Planned(Option<BTreeMap<String, OutputRef>>),
    Failed,
    Skipped,
}

enum Decision {
    Cached {
        entry: CacheEntry,
    },
    Run {
        reason: String,
        previous: Option<BTreeMap<String, OutputRef>>,
    },
    WillRunUnknown {
        reason: String,
    },
    Blocked {
        reason: String,
    },
    /// The step cannot even be keyed (a model directory it names is missing).
    Invalid {
        reason: String,
    },
}

/// How one execution went, for its record.
struct Execution {
    duration_ms: u64,
    started_at: String,
    error: Option<String>,
    log: Option<String>,
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

struct Finished {
    index: usize,
    result: Result<StepOutputs, StepError>,
    duration_ms: u64,
    started_at: String,
    log_path: PathBuf,
    work_dir: PathBuf,
    progress: Progress,
}

struct RunState<'a> {
    pipeline: &'a ResolvedPipeline,
    sel: &'a Selection,
    store: Arc<Store>,
    opts: &'a RunOptions,
    run_id: String,
    states: Vec<State>,
    reports: Vec<Option<StepReport>>,
    inputs_of: Vec<BTreeMap<String, ObjectDigest>>,
    reasons: Vec<String>,
    keys: Vec<Option<CacheKey>>,
    ran: BTreeSet<usize>,
    pending_writes: Vec<(StepRecord, usize)>,
    seq: Vec<usize>,
    /// Step name -> index, for input bindings.
    index_of: HashMap<&'a str, usize>,
    display: Display,
}

/// Runs (or, with `dry_run`, plans) the selected steps of a pipeline.
pub async fn execute(
    pipeline: &ResolvedPipeline,
    sel: &Selection,
    store: Arc<Store>,
    opts: &RunOptions,
    cancel: CancellationToken,
) -> Result<RunReport, EngineError> {
    let n = pipeline.steps.len();
    let mut seq = vec![0; n];
    for (pos, &i) in sel.dag.order().iter().enumerate() {
        seq[i] = pos;
    }
    let mut st = RunState {
        pipeline,
        sel,
        store: store.clone(),
        opts,
        run_id: if opts.dry_run {
            String::new()
        } else {
            new_run_id()
        },
        states: vec![State::Pending; n],
        reports: vec![None; n],
        inputs_of: vec![BTreeMap::new(); n],
        reasons: vec![String::new(); n],
        keys: vec![None; n],
        ran: BTreeSet::new(),
        pending_writes: Vec::new(),
        seq,
        index_of: pipeline
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect(),
        display: Display::new(opts.quiet),
    };
    st.resolve_unselected()?;
    if !opts.dry_run {
        store.db().insert_run(&RunRecord {
            id: st.run_id.clone(),
            pipeline: pipeline.name.clone(),
            pipeline_file: pipeline.file.display().to_string(),
            status: "running".into(),
            started_at: now_rfc3339(),
            finished_at: None,
            pid: std::process::id() as i64,
            args: crate::redact::redact(&opts.args),
        })?;
        st.display
            .println(&format!("run {} of pipeline {}", st.run_id, pipeline.name));
    }
    let started = Instant::now();
    st.schedule(cancel.clone()).await?;
    let status = if opts.dry_run {
        "planned"
    } else if cancel.is_cancelled() {
        "cancelled"
    } else if st.states.iter().any(|s| matches!(s, State::Failed)) {
        "failed"
    } else {
        "succeeded"
    };
    if !opts.dry_run {
        store.db().finish_run(&st.run_id, status, &now_rfc3339())?;
    }
    let steps: Vec<StepReport> = sel
        .dag
        .order()
        .iter()
        .filter_map(|&i| st.reports[i].clone())
        .collect();
    let report = RunReport {
        run_id: (!opts.dry_run).then(|| st.run_id.clone()),
        pipeline: pipeline.name.clone(),
        status: status.to_string(),
        steps,
    };
    let summary = [
        StepStatus::Ran,
        StepStatus::Cached,
        StepStatus::WillRun,
        StepStatus::Failed,
        StepStatus::Skipped,
    ]
    .iter()
    .filter_map(|s| {
        let c = report.count(*s);
        (c > 0).then(|| format!("{c} {}", s.as_str()))
    })
    .collect::<Vec<_>>()
    .join(", ");
    st.display.println(&format!(
        "{} {status}: {summary} in {}",
        if opts.dry_run { "plan" } else { "run" },
        report::format_duration(started.elapsed().as_millis() as u64)
    ));
    Ok(report)
}

impl<'a> RunState<'a> {
    fn step(&self, i: usize) -> &'a ResolvedStep {
        &self.pipeline.steps[i]
    }

    /// Steps outside the selection: those feeding selected steps take their outputs from
    /// the cache (or the run stops, naming what is missing); the rest are just skipped.
    fn resolve_unselected(&mut self) -> Result<(), EngineError> {
        if self.sel.selected.len() == self.pipeline.steps.len() {
            return Ok(());
        }
        let needed = self.sel.dag.ancestors_of_all(&self.sel.selected);
        for &i in self.sel.dag.order() {
            if self.sel.selected.contains(&i) {
                continue;
            }
            let name = self.step(i).name.clone();
            if !needed.contains(&i) {
                self.states[i] = State::Skipped;
                self.reports[i] =
                    Some(self.report(i, StepStatus::Skipped, "not selected".into(), 0, None));
                continue;
            }
            let inputs = self.input_digests(i).map_err(|_| self.missing(&name))?;
            let key = key::cache_key(self.step(i), &inputs);
            let entry = self.store.db().cache_get(&key)?;
            let entry = entry
                .filter(|e| {
                    e.outputs
                        .values()
                        .all(|o| self.store.objects().contains(&o.digest))
                })
                .ok_or_else(|| self.missing(&name))?;
            self.keys[i] = Some(key);
            self.states[i] = State::Done(entry.outputs.clone());
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

    fn missing(&self, upstream: &str) -> EngineError {
        EngineError::MissingUpstream(format!(
            "the selected steps need the outputs of `{upstream}`, which are not in the cache for its current inputs and params; \
             run without --only/--from first, or add --only {upstream}"
        ))
    }

    /// Digests of a step's inputs from finished producers. Err(reason) when a producer
    /// has no usable outputs (failed, skipped, or planned with unknown outputs).
    fn input_digests(&self, i: usize) -> Result<BTreeMap<String, ObjectDigest>, Decision> {
        let step = self.step(i);
        let mut out = BTreeMap::new();
        for (name, binding) in &step.inputs {
            let producer = self.index_of[binding.step.as_str()];
            let outputs = match &self.states[producer] {
                State::Done(o) | State::Planned(Some(o)) => o,
                State::Planned(None) => {
                    return Err(Decision::WillRunUnknown {
                        reason: format!("input {name} will be recomputed by step {}", binding.step),
                    })
                }
                State::Failed => {
                    return Err(Decision::Blocked {
                        reason: format!("upstream step {} failed", binding.step),
                    })
                }
                _ => {
                    return Err(Decision::Blocked {
                        reason: format!("upstream step {} did not run", binding.step),
                    })
                }
            };
            let output = outputs
                .get(&binding.output)
                .ok_or_else(|| Decision::Blocked {
                    reason: format!(
                        "upstream step {} produced no output {}",
                        binding.step, binding.output
                    ),
                })?;
            out.insert(name.clone(), output.digest);
        }
        let extra = step
            .implementation
            .content_inputs(&step.params, &self.opts.cwd)
            .map_err(|reason| Decision::Invalid { reason })?;
        for (name, path) in extra {
            let hashed = crate::steps::source::hash_with_stat_cache(
                &self.store,
                &path,
                &crate::steps::Progress::hidden(),
            )
            .map_err(|e| Decision::Invalid {
                reason: format!("hashing {name} files at {}: {e}", path.display()),
            })?;
            out.insert(name, hashed.digest);
        }
        Ok(out)
    }

    /// Where a content input (not produced by a step) came from, for its record.
    fn content_origin(&self, i: usize, name: &str) -> String {
        let step = self.step(i);
        step.implementation
            .content_inputs(&step.params, &self.opts.cwd)
            .ok()
            .and_then(|extra| extra.into_iter().find(|(n, _)| n == name))
            .map(|(_, path)| format!("{}{}", explain::FILES_ORIGIN, path.display()))
            .unwrap_or_default()
    }

    fn decide(&mut self, i: usize) -> Result<Decision, EngineError> {
        let inputs = match self.input_digests(i) {
            Ok(inputs) => inputs,
            Err(decision) => return Ok(decision),
        };
        let step = self.step(i);
        let key = key::cache_key(step, &inputs);
        self.inputs_of[i] = inputs.clone();
        self.keys[i] = Some(key);
        let forced = self.sel.forced.contains(&i);
        let entry = self.store.db().cache_get(&key)?;
        let usable = entry.filter(|e| {
            e.outputs
                .values()
                .all(|o| self.store.objects().contains(&o.digest))
        });
        if step.implementation.volatile() {
            let reason = if forced {
                "forced".to_string()
            } else {
                "volatile: checks its source on every run".to_string()
            };
            return Ok(Decision::Run {
                reason,
                previous: usable.map(|e| e.outputs),
            });
        }
        if forced {
            return Ok(Decision::Run {
                reason: "forced".into(),
                previous: None,
            });
        }
        if let Some(entry) = usable {
            return Ok(Decision::Cached { entry });
        }
        let previous = self
            .store
            .db()
            .last_step_record(&self.pipeline.name, &step.name)?;
        let reason = match &previous {
            Some(prev) if prev.cache_key.as_deref() == Some(key.to_hex().as_str()) => {
                "cached outputs are no longer in the store (removed by gc?)".to_string()
            }
            _ => explain::why_rerun(step, &inputs, previous.as_ref()),
        };
        Ok(Decision::Run {
            reason,
            previous: None,
        })
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
            State::Done(o) | State::Planned(Some(o)) => o
                .iter()
                .map(|(k, v)| (k.clone(), v.digest.to_hex()))
                .collect(),
            _ => BTreeMap::new(),
        };
        StepReport {
            name: self.step(i).name.clone(),
            status,
            reason,
            cache_key: self.keys[i].map(|k| k.to_hex()),
            outputs,
            duration_ms,
            error,
        }
    }

    fn step_record(
        &self,
        i: usize,
        status: StepStatus,
        reason: &str,
        exec: Execution,
    ) -> StepRecord {
        let Execution {
            duration_ms,
            started_at,
            error,
            log,
        } = exec;
        let step = self.step(i);
        let outputs = match &self.states[i] {
            State::Done(o) => o.clone(),
            _ => BTreeMap::new(),
        };
        StepRecord {
            run_id: self.run_id.clone(),
            step: step.name.clone(),
            kind: step.uses.clone(),
            version: step.version.clone(),
            status,
            reason: reason.to_string(),
            cache_key: self.keys[i].map(|k| k.to_hex()),
            duration_ms,
            started_at,
            // Records are displayed and kept: secrets in parameters are masked (the cache
            // key was computed from the real values).
            params: crate::redact::redact(&step.params),
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
            error,
            log,
        }
    }

    /// Marks a step finished without executing it and queues its record.
    fn settle(&mut self, i: usize, state: State, status: StepStatus, reason: String) {
        self.states[i] = state;
        let report = self.report(i, status, reason.clone(), 0, None);
        self.display.finish(&report, None);
        self.reports[i] = Some(report);
        if !self.opts.dry_run && status != StepStatus::WillRun {
            let record = self.step_record(i, status, &reason, Execution::settled());
            self.pending_writes.push((record, self.seq[i]));
        }
    }

    /// A step that failed before it could run (its cache key could not be computed):
    /// the message is both its reason and its error.
    fn settle_invalid(&mut self, i: usize, message: String) {
        self.states[i] = State::Failed;
        let report = self.report(
            i,
            StepStatus::Failed,
            message.clone(),
            0,
            Some(message.clone()),
        );
        self.display.finish(&report, None);
        self.reports[i] = Some(report);
        if !self.opts.dry_run {
            let mut exec = Execution::settled();
            exec.error = Some(message.clone());
            let record = self.step_record(i, StepStatus::Failed, &message, exec);
            self.pending_writes.push((record, self.seq[i]));
        }
    }

    fn flush(&mut self) -> Result<(), EngineError> {
        if self.pending_writes.is_empty() {
            return Ok(());
        }
        let writes = std::mem::take(&mut self.pending_writes);
        let batch: Vec<StepWrite<'_>> = writes
            .iter()
            .map(|(record, seq)| StepWrite {
                record,
                seq: *seq,
                artifacts: &[],
                cache: None,
                index_io: false,
            })
            .collect();
        self.store.db().write_steps(&batch)?;
        Ok(())
    }

    async fn schedule(&mut self, cancel: CancellationToken) -> Result<(), EngineError> {
        let selected = &self.sel.selected;
        let mut waiting: HashMap<usize, usize> = HashMap::new();
        let mut ready = VecDeque::new();
        for &i in self.sel.dag.order() {
            if !selected.contains(&i) {
                continue;
            }
            let deps = self
                .sel
                .dag
                .upstream(i)
                .into_iter()
                .filter(|u| selected.contains(u))
                .count();
            if deps == 0 {
                ready.push_back(i);
            } else {
                waiting.insert(i, deps);
            }
        }
        let semaphore = Arc::new(Semaphore::new(self.opts.jobs.max(1)));
        let mut tasks: JoinSet<Finished> = JoinSet::new();
        let mut task_step: HashMap<tokio::task::Id, usize> = HashMap::new();
        loop {
            while let Some(i) = ready.pop_front() {
                if cancel.is_cancelled() {
                    self.settle(
                        i,
                        State::Skipped,
                        StepStatus::Skipped,
                        "run cancelled".into(),
                    );
                } else {
                    let mut decision = self.decide(i)?;
                    if let Decision::Cached { entry } = &decision {
                        if let Some(why) = self.verify_external(i, entry).await {
                            decision = Decision::Run {
                                reason: format!("external state changed: {why}"),
                                previous: None,
                            };
                        }
                    }
                    match decision {
                        Decision::Blocked { reason } => {
                            self.settle(i, State::Skipped, StepStatus::Skipped, reason)
                        }
                        Decision::Invalid { reason } => self.settle_invalid(i, reason),
                        Decision::WillRunUnknown { reason } => {
                            self.settle(i, State::Planned(None), StepStatus::WillRun, reason)
                        }
                        Decision::Cached { entry, .. } => {
                            let upstream_ran: Vec<String> = self
                                .sel
                                .dag
                                .upstream(i)
                                .into_iter()
                                .filter(|u| self.ran.contains(u))
                                .map(|u| self.step(u).name.clone())
                                .collect();
                            let reason = if upstream_ran.is_empty() {
                                format!("unchanged since run {}", entry.run_id)
                            } else {
                                format!(
                                    "early cutoff: {} reran with identical output",
                                    upstream_ran.join(", ")
                                )
                            };
                            self.settle(i, State::Done(entry.outputs), StepStatus::Cached, reason);
                        }
                        Decision::Run {
                            reason, previous, ..
                        } if self.opts.dry_run => {
                            let assumed =
                                previous.filter(|_| self.step(i).implementation.volatile());
                            self.settle(i, State::Planned(assumed), StepStatus::WillRun, reason);
                        }
                        Decision::Run {
                            reason, previous, ..
                        } => {
                            self.reasons[i] = reason;
                            self.states[i] = State::Running;
                            let ctx = self.context(i, previous, &cancel)?;
                            let permit_source = semaphore.clone();
                            let display = self.display.clone();
                            let implementation = self.step(i).implementation;
                            let handle = tasks.spawn(async move {
                                let _permit = permit_source.acquire_owned().await;
                                let mut ctx = ctx;
                                ctx.progress = display.start(&ctx.step);
                                let started_at = now_rfc3339();
                                let t0 = Instant::now();
                                let result = if ctx.cancel.is_cancelled() {
                                    Err(StepError::Cancelled)
                                } else {
                                    implementation.run(&ctx).await
                                };
                                Finished {
                                    index: i,
                                    result,
                                    duration_ms: t0.elapsed().as_millis() as u64,
                                    started_at,
                                    log_path: ctx.log_path.clone(),
                                    work_dir: ctx.work_dir.clone(),
                                    progress: ctx.progress.clone(),
                                }
                            });
                            task_step.insert(handle.id(), i);
                            continue;
                        }
                    }
                }
                self.release(i, &mut waiting, &mut ready);
            }
            self.flush()?;
            let Some(joined) = tasks.join_next_with_id().await else {
                break;
            };
            let i = match joined {
                Ok((_, finished)) => {
                    let i = finished.index;
                    self.finish(finished)?;
                    i
                }
                Err(join_error) => {
                    let i = task_step[&join_error.id()];
                    let what = if join_error.is_panic() {
                        "the step panicked (a bug in cairn; please report it)"
                    } else {
                        "the step task was aborted"
                    };
                    self.fail(i, what.to_string(), 0, now_rfc3339(), None)?;
                    i
                }
            };
            self.release(i, &mut waiting, &mut ready);
        }
        self.flush()
    }

    fn release(&self, i: usize, waiting: &mut HashMap<usize, usize>, ready: &mut VecDeque<usize>) {
        for d in self.sel.dag.downstream(i) {
            if let Some(n) = waiting.get_mut(&d) {
                *n -= 1;
                if *n == 0 {
                    waiting.remove(&d);
                    ready.push_back(d);
                }
            }
        }
    }

    fn context(
        &self,
        i: usize,
        previous: Option<BTreeMap<String, OutputRef>>,
        cancel: &CancellationToken,
    ) -> Result<StepContext, EngineError> {
        let step = self.step(i);
        let work_dir = self
            .store
            .objects()
            .temp_dir(&step.name)
            .map_err(|e| StoreError::io("creating a step work folder", e))?;
        std::fs::create_dir_all(work_dir.join("out"))
            .map_err(|e| StoreError::io("creating a step work folder", e))?;
        let mut inputs = BTreeMap::new();
        for (name, binding) in &step.inputs {
            let producer = self
                .pipeline
                .steps
                .iter()
                .position(|s| s.name == binding.step)
                .expect("linked");
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
        Ok(StepContext {
            step: step.name.clone(),
            cache_key: self.keys[i]
                .expect("a key is computed before running")
                .to_hex(),
            params: step.params.clone(),
            param_env: step.param_env.clone(),
            inputs,
            outputs: step.outputs.clone(),
            previous,
            log_path: work_dir.join("log.txt"),
            work_dir,
            cwd: self.opts.cwd.clone(),
            docstore_uri: self.docstore_uri(),
            store: self.store.clone(),
            progress: Progress::hidden(),
            cancel: cancel.child_token(),
        })
    }

    /// The pipeline's `docstore: {uri}`; the docstore module applies its own fallbacks.
    fn docstore_uri(&self) -> Option<String> {
        self.pipeline.docstore_uri.clone()
    }

    /// For steps that write outside the store: `Some(what differs)` when the outside no
    /// longer matches the cached receipt.
    async fn verify_external(&self, i: usize, entry: &CacheEntry) -> Option<String> {
        let step = self.step(i);
        if !step.implementation.external() {
            return None;
        }
        let uri = self.docstore_uri();
        let ctx = crate::steps::VerifyContext {
            params: &step.params,
            outputs: &entry.outputs,
            store: &self.store,
            docstore_uri: uri.as_deref(),
        };
        step.implementation.verify(&ctx).await.err()
    }

    fn store_log(&self, log_path: &std::path::Path) -> Option<String> {
        let len = std::fs::metadata(log_path).map(|m| m.len()).unwrap_or(0);
        if len == 0 {
            return None;
        }
        self.store.commit(log_path).ok().map(|c| c.digest.to_hex())
    }

    fn finish(&mut self, f: Finished) -> Result<(), EngineError> {
        let i = f.index;
        let log = self.store_log(&f.log_path);
        let _ = crate::store::objects::remove_any(&f.work_dir);
        match f.result {
            Ok(outputs) => {
                let refs: BTreeMap<String, OutputRef> = outputs
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
                let previous = if step.implementation.volatile() {
                    self.previous_outputs(i)?
                } else {
                    None
                };
                let note = outputs
                    .note
                    .as_deref()
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default();
                let (status, reason) = match (&previous, step.implementation.volatile()) {
                    (Some(prev), true) if *prev == refs && !self.sel.forced.contains(&i) => {
                        (StepStatus::Cached, format!("source unchanged{note}"))
                    }
                    (Some(_), true) if !self.sel.forced.contains(&i) => {
                        (StepStatus::Ran, format!("source changed{note}"))
                    }
                    (None, true) if !self.sel.forced.contains(&i) => {
                        (StepStatus::Ran, format!("no earlier result{note}"))
                    }
                    _ => (StepStatus::Ran, format!("{}{note}", self.reasons[i])),
                };
                if status == StepStatus::Ran {
                    self.ran.insert(i);
                }
                self.states[i] = State::Done(refs.clone());
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
                        producer_run: self.run_id.clone(),
                        producer_step: step.name.clone(),
                        output: name.clone(),
                        pipeline: self.pipeline.name.clone(),
                        metadata: p.metadata.clone(),
                    })
                    .collect();
                let key = self.keys[i].expect("a key is computed before running");
                let entry = CacheEntry {
                    key,
                    outputs: refs,
                    run_id: self.run_id.clone(),
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
                self.flush()?;
                self.store.db().write_steps(&[StepWrite {
                    record: &record,
                    seq: self.seq[i],
                    artifacts: &artifacts,
                    cache: Some(&entry),
                    index_io: true,
                }])?;
                let report = self.report(i, status, reason, f.duration_ms, None);
                self.display.finish(&report, Some(&f.progress));
                self.reports[i] = Some(report);
                Ok(())
            }
            Err(StepError::Cancelled) => {
                self.fail(i, "cancelled".into(), f.duration_ms, f.started_at, log)?;
                f.progress.bar().finish_and_clear();
                Ok(())
            }
            Err(e) => {
                f.progress.bar().finish_and_clear();
                self.fail(i, e.to_string(), f.duration_ms, f.started_at, log)
            }
        }
    }

    fn previous_outputs(
        &self,
        i: usize,
    ) -> Result<Option<BTreeMap<String, OutputRef>>, EngineError> {
        let Some(key) = self.keys[i] else {
            return Ok(None);
        };
        Ok(self.store.db().cache_get(&key)?.map(|e| e.outputs))
    }

    fn fail(
        &mut self,
        i: usize,
        error: String,
        duration_ms: u64,
        started_at: String,
        log: Option<String>,
    ) -> Result<(), EngineError> {
        self.states[i] = State::Failed;
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
        self.flush()?;
        self.store.db().write_steps(&[StepWrite {
            record: &record,
            seq: self.seq[i],
            artifacts: &[],
            cache: None,
            index_io: true,
        }])?;
        let report = self.report(i, StepStatus::Failed, reason, duration_ms, Some(error));
        self.display.finish(&report, None);
        self.reports[i] = Some(report);
        Ok(())
    }
}

/// Exposed for the CLI's `plan --json` and tests: the JSON form of a report.
pub fn report_json(report: &RunReport) -> Value {
    serde_json::to_value(report).unwrap_or_else(|_| json!({}))
}
