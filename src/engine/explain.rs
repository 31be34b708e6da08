//! Why a step runs, in words a person understands: compares the step as it is now with
//! its last successful execution in the same pipeline.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::pipeline::ResolvedStep;
use crate::store::{ObjectDigest, StepRecord};

const MAX_REASONS: usize = 3;

/// How a content input (files named in params, see `Step::content_inputs`) records where
/// it came from in `InputRef::from`, in place of a producing `STEP.OUTPUT`.
pub const FILES_ORIGIN: &str = "files:";

/// Short display of a value inside a reason.
pub fn show(v: Option<&Value>) -> String {
    let text = match v {
        None => "(unset)".to_string(),
        Some(Value::String(s)) if !s.is_empty() && !s.contains(char::is_whitespace) => s.clone(),
        Some(other) => other.to_string(),
    };
    if text.chars().count() > 40 {
        format!("{}...", text.chars().take(37).collect::<String>())
    } else {
        text
    }
}

/// The reasons a step whose key is not in the cache must run.
pub fn why_rerun(
    step: &ResolvedStep,
    inputs: &BTreeMap<String, ObjectDigest>,
    previous: Option<&StepRecord>,
) -> String {
    let Some(prev) = previous else {
        return match &step.variant {
            Some(v) if v.matrix => format!("matrix item {} is new", v.label),
            Some(v) => format!("foreach item {} is new", v.label),
            None => "no earlier result".to_string(),
        };
    };
    let mut reasons = Vec::new();
    if prev.kind != step.uses {
        reasons.push(format!("step kind changed {} -> {}", prev.kind, step.uses));
    } else if prev.version != step.version {
        if step.version.starts_with("spec-") {
            reasons.push(format!("step spec {} changed", step.uses));
        } else {
            reasons.push(format!(
                "step code version changed {} -> {}",
                prev.version, step.version
            ));
        }
    }
    let mut explained_by_pipeline_param = false;
    let names: BTreeSet<&String> = prev
        .param_refs
        .keys()
        .chain(step.param_refs.keys())
        .collect();
    for name in names {
        // Stored records hold masked secrets; compare like with like.
        let (old, new) = (
            prev.param_refs.get(name).map(crate::redact::redact),
            step.param_refs.get(name).map(crate::redact::redact),
        );
        if old != new && old.is_some() && new.is_some() {
            reasons.push(format!(
                "param {name} changed {} -> {}",
                show(old.as_ref()),
                show(new.as_ref())
            ));
            explained_by_pipeline_param = true;
        }
    }
    if !explained_by_pipeline_param {
        let empty = serde_json::Map::new();
        let (old_masked, new_masked) = (
            crate::redact::redact(&prev.params),
            crate::redact::redact(&step.params),
        );
        let old_params = old_masked.as_object().unwrap_or(&empty);
        let new_params = new_masked.as_object().unwrap_or(&empty);
        let keys: BTreeSet<&String> = old_params.keys().chain(new_params.keys()).collect();
        for k in keys {
            let (old, new) = (old_params.get(k), new_params.get(k));
            if old != new {
                reasons.push(format!("param {k} changed {} -> {}", show(old), show(new)));
            }
        }
    }
    let input_names: BTreeSet<&String> = prev.inputs.keys().chain(inputs.keys()).collect();
    for name in input_names {
        match (prev.inputs.get(name), inputs.get(name)) {
            (Some(old), Some(new)) if old.digest != *new && old.from.starts_with(FILES_ORIGIN) => {
                reasons.push(format!(
                    "{name} files changed ({})",
                    old.from.trim_start_matches(FILES_ORIGIN)
                ));
            }
            (Some(old), Some(new)) if old.digest != *new => {
                let from = step
                    .inputs
                    .get(name)
                    .map(|b| b.step.clone())
                    .unwrap_or_else(|| old.from.clone());
                reasons.push(format!("input {name} changed (from step {from})"));
            }
            (None, Some(_)) => reasons.push(format!("input {name} added")),
            (Some(_), None) => reasons.push(format!("input {name} removed")),
            _ => {}
        }
    }
    if reasons.is_empty() {
        return "configuration changed".to_string();
    }
    let extra = reasons.len().saturating_sub(MAX_REASONS);
    reasons.truncate(MAX_REASONS);
    let mut text = reasons.join("; ");
    if extra > 0 {
        text.push_str(&format!("; +{extra} more"));
    }
    text
}
