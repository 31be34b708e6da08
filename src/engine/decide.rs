//! The cache decision for one step, as a pure function of what the engine looked up:
//! reuse the cached outputs, or execute, and why.

use std::collections::BTreeMap;

use crate::store::{CacheEntry, OutputRef};

/// What the engine knows about a step whose inputs are all available.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    /// The step reads the outside world (always executes, compares with `previous`).
    pub volatile: bool,
    /// `--force` / `--force-all` names it.
    pub forced: bool,
    /// The cache entry under the step's key, if any.
    pub entry: Option<CacheEntry>,
    /// Whether every object of that entry is still in the store (ignored without one).
    pub outputs_present: bool,
    /// Direct producers that executed in this run (their outputs were reproduced).
    pub upstream_ran: Vec<String>,
}

/// Why a step executes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunWhy {
    /// `--force`.
    Forced,
    /// A volatile step checks its source on every run.
    Volatile,
    /// The cache entry exists but its objects were removed (by `cairn gc`?).
    OutputsGone,
    /// No cache entry under the key: something it depends on changed. The engine asks
    /// [`super::explain`] what, against the step's last execution.
    Changed,
    /// A step that writes to an external system found it no longer matching its receipt.
    ExternalChanged(String),
}

impl RunWhy {
    /// The reason in words, except for [`RunWhy::Changed`], which needs the history.
    pub fn text(&self) -> Option<String> {
        Some(match self {
            RunWhy::Forced => "forced".into(),
            RunWhy::Volatile => "volatile: checks its source on every run".into(),
            RunWhy::OutputsGone => {
                "cached outputs are no longer in the store (removed by gc?)".into()
            }
            RunWhy::ExternalChanged(what) => format!("external state changed: {what}"),
            RunWhy::Changed => return None,
        })
    }
}

/// The decision for one step.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Reuse the cached outputs.
    Cached {
        /// The entry reused.
        entry: CacheEntry,
        /// Why, in words ("unchanged since run X", "early cutoff: ...").
        reason: String,
    },
    /// Execute the step.
    Run {
        /// Why.
        why: RunWhy,
        /// Outputs last recorded under this key (volatile steps compare against them).
        previous: Option<BTreeMap<String, OutputRef>>,
    },
}

/// Decides one step.
pub fn decide(facts: Facts) -> Decision {
    let (usable, gone) = match facts.entry {
        Some(entry) if facts.outputs_present => (Some(entry), false),
        Some(_) => (None, true),
        None => (None, false),
    };
    if facts.volatile {
        let why = if facts.forced {
            RunWhy::Forced
        } else {
            RunWhy::Volatile
        };
        return Decision::Run {
            why,
            previous: usable.map(|e| e.outputs),
        };
    }
    if facts.forced {
        return Decision::Run {
            why: RunWhy::Forced,
            previous: None,
        };
    }
    match usable {
        Some(entry) => {
            let reason = if facts.upstream_ran.is_empty() {
                format!("unchanged since run {}", entry.run_id)
            } else {
                format!(
                    "early cutoff: {} reran with identical output",
                    facts.upstream_ran.join(", ")
                )
            };
            Decision::Cached { entry, reason }
        }
        None => Decision::Run {
            why: if gone {
                RunWhy::OutputsGone
            } else {
                RunWhy::Changed
            },
            previous: None,
        },
    }
}

/// The decision for a cached external step once its system was checked: `mismatch` says
/// what differs from the receipt.
pub fn after_verify(cached: Decision, mismatch: Option<String>) -> Decision {
    match (cached, mismatch) {
        (Decision::Cached { .. }, Some(what)) => Decision::Run {
            why: RunWhy::ExternalChanged(what),
            previous: None,
        },
        (decision, _) => decision,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{CacheKey, ObjectDigest};

    fn entry() -> CacheEntry {
        CacheEntry {
            key: CacheKey::from(blake3::hash(b"key")),
            outputs: BTreeMap::from([(
                "out".to_string(),
                OutputRef {
                    digest: ObjectDigest::from(blake3::hash(b"out")),
                    kind: "file".into(),
                },
            )]),
            run_id: "20260101-000000-abcdef".into(),
            step: "s".into(),
        }
    }

    fn hit() -> Facts {
        Facts {
            entry: Some(entry()),
            outputs_present: true,
            ..Facts::default()
        }
    }

    #[test]
    fn cache_hit_reuses_the_entry() {
        assert_eq!(
            decide(hit()),
            Decision::Cached {
                entry: entry(),
                reason: "unchanged since run 20260101-000000-abcdef".into()
            }
        );
    }

    #[test]
    fn a_miss_runs_and_asks_for_an_explanation() {
        let d = decide(Facts::default());
        assert_eq!(
            d,
            Decision::Run {
                why: RunWhy::Changed,
                previous: None
            }
        );
        assert_eq!(RunWhy::Changed.text(), None);
    }

    #[test]
    fn outputs_removed_from_the_store_rerun() {
        let d = decide(Facts {
            outputs_present: false,
            ..hit()
        });
        assert!(matches!(
            d,
            Decision::Run {
                why: RunWhy::OutputsGone,
                ..
            }
        ));
    }

    #[test]
    fn early_cutoff_names_the_producers_that_reran() {
        let d = decide(Facts {
            upstream_ran: vec!["upper".into(), "lower".into()],
            ..hit()
        });
        let Decision::Cached { reason, .. } = d else {
            panic!("expected a hit, got {d:?}")
        };
        assert_eq!(
            reason,
            "early cutoff: upper, lower reran with identical output"
        );
    }

    #[test]
    fn forced_runs_even_when_cached() {
        let d = decide(Facts {
            forced: true,
            ..hit()
        });
        assert_eq!(
            d,
            Decision::Run {
                why: RunWhy::Forced,
                previous: None
            }
        );
    }

    #[test]
    fn volatile_steps_always_run_and_carry_what_they_produced_last() {
        let d = decide(Facts {
            volatile: true,
            ..hit()
        });
        assert_eq!(
            d,
            Decision::Run {
                why: RunWhy::Volatile,
                previous: Some(entry().outputs)
            }
        );
        let forced = decide(Facts {
            volatile: true,
            forced: true,
            ..hit()
        });
        assert!(matches!(
            forced,
            Decision::Run {
                why: RunWhy::Forced,
                previous: Some(_)
            }
        ));
    }

    #[test]
    fn external_verify_failure_turns_a_hit_into_a_run() {
        let d = after_verify(decide(hit()), Some("collection notes is gone".into()));
        assert_eq!(
            d,
            Decision::Run {
                why: RunWhy::ExternalChanged("collection notes is gone".into()),
                previous: None
            }
        );
        assert_eq!(
            RunWhy::ExternalChanged("x".into()).text().as_deref(),
            Some("external state changed: x")
        );
        assert_eq!(after_verify(decide(hit()), None), decide(hit()));
    }
}
