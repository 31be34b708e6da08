//! Which steps a run covers: `--only`, `--from` and `--force` resolved against the
//! pipeline. Pure: touches no store.

use std::collections::BTreeSet;

use super::{EngineError, RunOptions};
use crate::pipeline::ResolvedPipeline;
use crate::util::suggest::did_you_mean;

/// The steps a run covers, by position in the pipeline.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// Steps to decide (and execute when needed).
    pub selected: BTreeSet<usize>,
    /// Steps to execute even when cached.
    pub forced: BTreeSet<usize>,
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

/// Resolves `--only`, `--from` and `--force` against the pipeline.
pub fn select(pipeline: &ResolvedPipeline, opts: &RunOptions) -> Result<Selection, EngineError> {
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
        selected = pipeline
            .dag
            .descendants(step_index(pipeline, from, "--from")?);
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
    Ok(Selection { selected, forced })
}
