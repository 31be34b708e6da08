//! Planning and execution, in stages that each do one thing:
//!
//! - [`select`]: `--only`, `--from` and `--force` against the pipeline (pure);
//! - [`decide`]: one step's cache decision from what was looked up (pure);
//! - `schedule`: walks the graph on tokio, `--jobs` at a time, verifies external steps
//!   concurrently, honours cancellation;
//! - `record`: run and step records, artifacts and cache entries in the store;
//! - `presence`: whether the prefetched cache entries' outputs exist, checked on a
//!   thread of its own ahead of the walk;
//! - [`observer`]: what the walk tells the outside (the CLI draws it; the engine prints
//!   nothing).
//!
//! [`run`] executes; [`plan`] decides without executing or writing and returns a [`Plan`].
//! Early cutoff needs no special code: a downstream key is computed from the digests its
//! producers actually produced, so identical outputs give an identical key and a hit.

pub mod decide;
pub mod explain;
pub mod key;
pub mod observer;
mod presence;
mod record;
mod remote_cache;
pub mod report;
mod schedule;
pub mod select;
pub mod slurm;

pub use remote_cache::{
    entry_of as remote_entry, push as push_to_remote, RemoteSettings, RemoteSummary,
};

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Value;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::pipeline::ResolvedPipeline;
use crate::store::{Store, StoreError};
pub use observer::{Observer, Silent};
pub use report::{Plan, RunReport, RunStatus, StepReport};
pub use select::{select, Selection};

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
    /// What the user asked for, recorded on the run.
    pub args: Value,
    /// Directory relative paths resolve against.
    pub cwd: PathBuf,
    /// A shared cache on a remote: looked up on local misses, pushed to after the run.
    pub remote: Option<RemoteSettings>,
}

/// Runs the selected steps of a pipeline, recording everything in the store.
pub async fn run(
    pipeline: &ResolvedPipeline,
    sel: &Selection,
    store: Arc<Store>,
    opts: &RunOptions,
    observer: Arc<dyn Observer>,
    cancel: CancellationToken,
) -> Result<RunReport, EngineError> {
    schedule::walk(pipeline, sel, store, opts, observer, Some(cancel)).await
}

/// Decides what a run would do, step by step and why; executes nothing and writes nothing.
/// External steps are verified against their systems, as a run would.
pub async fn plan(
    pipeline: &ResolvedPipeline,
    sel: &Selection,
    store: Arc<Store>,
    opts: &RunOptions,
    observer: Arc<dyn Observer>,
) -> Result<Plan, EngineError> {
    let report = schedule::walk(pipeline, sel, store, opts, observer, None).await?;
    Ok(Plan {
        pipeline: report.pipeline,
        steps: report.steps,
    })
}
