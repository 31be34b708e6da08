//! What a run or plan reports: per-step outcome records (the `--json` contract) and the
//! live terminal display (indicatif bars on a terminal, plain lines otherwise).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::steps::Progress;
use crate::store::StepStatus;

/// One step's outcome, as printed by `--json`.
#[derive(Clone, Debug, Serialize)]
pub struct StepReport {
    /// Step name.
    pub name: String,
    /// ran | cached | failed | skipped | will_run
    pub status: StepStatus,
    /// Why, in words.
    pub reason: String,
    /// Cache key (hex), when known.
    pub cache_key: Option<String>,
    /// Output name -> artifact digest (hex).
    pub outputs: BTreeMap<String, String>,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
    /// Error message of a failed step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A whole run or plan, as printed by `--json`.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    /// Run id (absent for plans).
    pub run_id: Option<String>,
    /// Pipeline name.
    pub pipeline: String,
    /// succeeded | failed | cancelled | planned
    pub status: String,
    /// Steps in execution order.
    pub steps: Vec<StepReport>,
}

impl RunReport {
    /// Number of steps with a status.
    pub fn count(&self, status: StepStatus) -> usize {
        self.steps.iter().filter(|s| s.status == status).count()
    }
}

/// Terminal display of a run in progress.
#[derive(Clone)]
pub struct Display {
    multi: Option<MultiProgress>,
    quiet: bool,
}

impl Display {
    /// Draws bars when stderr is a terminal and `quiet` is off.
    pub fn new(quiet: bool) -> Self {
        let draw = !quiet && std::io::stderr().is_terminal();
        Self {
            multi: draw.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
            quiet,
        }
    }

    /// A bar for a step that starts running.
    pub fn start(&self, step: &str) -> Progress {
        match &self.multi {
            Some(multi) => {
                let bar = multi.add(ProgressBar::new_spinner());
                bar.set_style(
                    ProgressStyle::with_template("{spinner} {prefix:<20} {elapsed:>4} {wide_msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                bar.set_prefix(step.to_string());
                bar.enable_steady_tick(Duration::from_millis(120));
                Progress::new(bar)
            }
            None => Progress::hidden(),
        }
    }

    /// Prints one finished step.
    pub fn finish(&self, report: &StepReport, progress: Option<&Progress>) {
        if let Some(p) = progress {
            p.bar().finish_and_clear();
            if let Some(multi) = &self.multi {
                multi.remove(p.bar());
            }
        }
        if self.quiet {
            return;
        }
        let mut line = format!(
            "  {:<8} {:<20} {:>8}  {}",
            report.status.as_str(),
            report.name,
            format_duration(report.duration_ms),
            report.reason
        );
        if !report.outputs.is_empty() && report.status != StepStatus::Skipped {
            let outs: Vec<String> = report
                .outputs
                .iter()
                .map(|(name, digest)| format!("{name}={}", &digest[..12.min(digest.len())]))
                .collect();
            line.push_str(&format!("  [{}]", outs.join(" ")));
        }
        if let Some(err) = &report.error {
            for l in err.lines() {
                line.push_str(&format!("\n           | {l}"));
            }
        }
        self.println(&line);
    }

    /// Prints a line above the bars.
    pub fn println(&self, line: &str) {
        if self.quiet {
            return;
        }
        match &self.multi {
            Some(multi) => {
                let _ = multi.println(line);
            }
            None => eprintln!("{line}"),
        }
    }
}

/// `12ms`, `1.2s`, `3m04s`.
pub fn format_duration(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60)
    }
}
