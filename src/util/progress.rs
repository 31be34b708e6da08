//! Progress reporting for long work: an indicatif bar on a terminal, silent otherwise.

/// Progress reporting for long steps; drawn as a bar on a terminal, silent otherwise.
#[derive(Clone, Debug)]
pub struct Progress {
    bar: indicatif::ProgressBar,
}

impl Progress {
    /// Wraps a bar made by the engine.
    pub fn new(bar: indicatif::ProgressBar) -> Self {
        Self { bar }
    }

    /// A progress handle that draws nothing (tests, JSON mode).
    pub fn hidden() -> Self {
        Self {
            bar: indicatif::ProgressBar::hidden(),
        }
    }

    /// Sets the total amount of work (the spinner becomes a bar with a count and ETA).
    pub fn set_length(&self, len: u64) {
        if self.bar.length().is_none() && !self.bar.is_hidden() {
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{spinner} {prefix:<20} {elapsed:>4} [{bar:30}] {pos}/{len} {wide_msg} eta {eta}",
            ) {
                self.bar.set_style(style.progress_chars("=> "));
            }
        }
        self.bar.set_length(len);
    }

    /// Advances by `n` units.
    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
    }

    /// Sets the status text shown beside the bar.
    pub fn set_message(&self, msg: impl Into<String>) {
        self.bar.set_message(msg.into());
    }

    /// The underlying bar (the engine finishes it).
    pub fn bar(&self) -> &indicatif::ProgressBar {
        &self.bar
    }
}
