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

/// Every variant of a foreach or matrix step written as `name` in the file.
fn variants_of(pipeline: &ResolvedPipeline, name: &str) -> Vec<usize> {
    pipeline
        .steps
        .iter()
        .enumerate()
        .filter(|(_, s)| s.variant.as_ref().is_some_and(|v| v.base == name))
        .map(|(i, _)| i)
        .collect()
}

/// Resolves `--only`, `--from` and `--force` against the pipeline (a foreach or matrix
/// step's name stands for all of its variants).
pub fn select(pipeline: &ResolvedPipeline, opts: &RunOptions) -> Result<Selection, EngineError> {
    if !opts.only.is_empty() && opts.from.is_some() {
        return Err(EngineError::Selection(
            "--only and --from cannot be combined".into(),
        ));
    }
    let mut selected = BTreeSet::new();
    if !opts.only.is_empty() {
        for name in &opts.only {
            let variants = variants_of(pipeline, name);
            if variants.is_empty() {
                selected.insert(step_index(pipeline, name, "--only")?);
            } else {
                selected.extend(variants);
            }
        }
    } else if let Some(from) = &opts.from {
        let mut starts = variants_of(pipeline, from);
        if starts.is_empty() {
            starts.push(step_index(pipeline, from, "--from")?);
        }
        for start in starts {
            selected.extend(pipeline.dag.descendants(start));
        }
    } else {
        selected.extend(0..pipeline.steps.len());
    }
    let mut forced = BTreeSet::new();
    for name in &opts.force {
        let variants = variants_of(pipeline, name);
        if variants.is_empty() {
            forced.insert(step_index(pipeline, name, "--force")?);
        } else {
            forced.extend(variants);
        }
    }
    if opts.force_all {
        forced.extend(selected.iter().copied());
    }
    Ok(Selection { selected, forced })
}
