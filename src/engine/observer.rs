//! What the engine tells the outside while it works. The engine prints nothing itself:
//! the CLI supplies a terminal display, tests and the UI can supply their own.

use std::time::Duration;

use super::report::{RunReport, StepReport};
use crate::util::progress::Progress;

/// Receives the events of a run or plan. Every method has a do-nothing default.
pub trait Observer: Send + Sync {
    /// A run started and was recorded (not called for plans).
    fn run_started(&self, _run_id: &str, _pipeline: &str) {}

    /// A step starts executing; the returned handle receives its progress.
    fn step_started(&self, _step: &str) -> Progress {
        Progress::hidden()
    }

    /// A step settled: ran, cached, failed, skipped or (plans) will run. `progress` is the
    /// handle `step_started` gave it, for steps that executed.
    fn step_finished(&self, _report: &StepReport, _progress: Option<&Progress>) {}

    /// The run or plan ended.
    fn finished(&self, _report: &RunReport, _elapsed: Duration) {}
}

/// An observer that ignores everything.
pub struct Silent;

impl Observer for Silent {}
