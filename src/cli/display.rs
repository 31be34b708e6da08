//! The terminal display of a run or plan: indicatif bars for running steps on a
//! terminal, one line per settled step, and a summary. The engine's [`Observer`].

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::engine::{Observer, RunReport, RunStatus, StepReport};
use crate::steps::Progress;
use crate::store::StepStatus;

/// Draws a run on stderr.
#[derive(Clone)]
pub struct Terminal {
    multi: Option<MultiProgress>,
    quiet: bool,
    name_width: usize,
}

impl Terminal {
    /// Draws bars when stderr is a terminal and `quiet` is off; prints nothing when quiet.
    pub fn new(quiet: bool) -> Self {
        let draw = !quiet && std::io::stderr().is_terminal();
        Self {
            multi: draw.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
            quiet,
            name_width: 20,
        }
    }

    /// Aligns step names to the longest (matrix variants are long), capped at 60.
    pub fn with_name_width(mut self, longest: usize) -> Self {
        self.name_width = longest.clamp(20, 60);
        self
    }

    /// Prints a line above the bars.
    fn println(&self, line: &str) {
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

impl Observer for Terminal {
    fn run_started(&self, run_id: &str, pipeline: &str) {
        self.println(&format!("run {run_id} of pipeline {pipeline}"));
    }

    fn step_started(&self, step: &str) -> Progress {
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

    fn step_finished(&self, report: &StepReport, progress: Option<&Progress>) {
        if let Some(p) = progress {
            p.bar().finish_and_clear();
            if let Some(multi) = &self.multi {
                multi.remove(p.bar());
            }
        }
        if self.quiet {
            return;
        }
        self.println(&step_line(report, self.name_width));
    }

    fn finished(&self, report: &RunReport, elapsed: Duration) {
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
        let what = if report.status == RunStatus::Planned {
            "plan"
        } else {
            "run"
        };
        self.println(&format!(
            "{what} {}: {summary} in {}",
            report.status,
            format_duration(elapsed.as_millis() as u64)
        ));
        if let Some(remote) = &report.remote {
            let line = match &remote.skipped {
                Some(reason) => format!("remote {}: skipped ({reason})", remote.url),
                None => format!(
                    "remote {}: {} cached (remote), fetched {} objects ({}); pushed {} objects ({}), {} new cache entries",
                    remote.url,
                    remote.hits,
                    remote.fetched.objects,
                    super::human_bytes(remote.fetched.bytes),
                    remote.pushed.objects,
                    super::human_bytes(remote.pushed.bytes),
                    remote.entries_pushed
                ),
            };
            self.println(&line);
        }
    }
}

/// `  cached   chunk   12ms  unchanged since run ...  [chunks=abc123def456]`
fn step_line(report: &StepReport, name_width: usize) -> String {
    let mut line = format!(
        "  {:<8} {:<name_width$} {:>8}  {}",
        report.status.as_str(),
        report.name,
        format_duration(report.duration_ms),
        report.reason
    );
    if !report.outputs.is_empty() && report.status != StepStatus::Skipped {
        let outs: Vec<String> = report
            .outputs
            .iter()
            .map(|(name, digest)| format!("{name}={}", digest.short()))
            .collect();
        line.push_str(&format!("  [{}]", outs.join(" ")));
    }
    if let Some(err) = &report.error {
        for l in err.lines() {
            line.push_str(&format!("\n           | {l}"));
        }
    }
    line
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(format_duration(12), "12ms");
        assert_eq!(format_duration(1_234), "1.2s");
        assert_eq!(format_duration(184_000), "3m04s");
    }
}
