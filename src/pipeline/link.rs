//! The link stage: inputs bound to outputs that exist and have the kind the consumer
//! expects, and the step graph built (once) with any cycle named.

use std::collections::HashMap;

use super::resolve::Resolver;
use super::{InputBinding, ResolvedStep};
use crate::graph::Dag;
use crate::util::suggest::did_you_mean;

impl Resolver<'_> {
    pub(super) fn cycle_error(&mut self, cycle: &[String]) {
        let path = format!("steps.{}", cycle[0]);
        let mut shown = if cycle.len() > 50 {
            let mut s = cycle[..25].to_vec();
            s.push(format!("... ({} more) ...", cycle.len() - 50));
            s.extend_from_slice(&cycle[cycle.len() - 25..]);
            s
        } else {
            cycle.to_vec()
        };
        shown.push(cycle[0].clone());
        self.error(
            &path,
            format!("dependency cycle: {}", shown.join(" -> ")),
            Some("a step cannot depend on its own outputs; break the cycle by removing one of these inputs".into()),
        );
    }

    pub(super) fn link_inputs(&mut self, steps: &[ResolvedStep]) {
        let by_name: HashMap<&str, &ResolvedStep> =
            steps.iter().map(|s| (s.name.as_str(), s)).collect();
        for step in steps {
            for (input, binding) in &step.inputs {
                let path = format!("steps.{}.inputs.{input}", step.name);
                // Unknown steps are reported by `check_input_targets`; steps that failed to
                // resolve have their own errors.
                let Some(target) = by_name.get(binding.step.as_str()) else {
                    continue;
                };
                match target.outputs.get(&binding.output) {
                    None => self.no_such_output(&path, binding, target),
                    Some(produced) => {
                        let Some(expected) = step.expects.get(input) else {
                            continue;
                        };
                        if !kinds_compatible(expected, produced) {
                            let help = outputs_of_kind(steps, expected);
                            self.error(
                                &path,
                                format!(
                                    "input `{input}` of step `{}` expects kind {expected}, but `{binding}` is {produced}",
                                    step.name
                                ),
                                Some(help),
                            );
                        }
                    }
                }
            }
        }
    }

    pub(super) fn no_such_output(
        &mut self,
        path: &str,
        binding: &InputBinding,
        target: &ResolvedStep,
    ) {
        let help = did_you_mean(&binding.output, target.outputs.keys().map(|k| k.as_str()))
            .unwrap_or_else(|| {
                format!(
                    "`{}` has outputs: {}",
                    target.name,
                    if target.outputs.is_empty() {
                        "none".to_string()
                    } else {
                        target
                            .outputs
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                )
            });
        self.error(
            path,
            format!("step `{}` has no output `{}`", binding.step, binding.output),
            Some(help),
        );
    }
}

/// Output kinds that say nothing about the content (a `command` step's `file`/`dir`, a
/// `source`'s `path`) may feed any input; two named kinds must be equal.
const UNTYPED_KINDS: &[&str] = &["any", "file", "dir", "path", "file or dir"];

fn kinds_compatible(expected: &str, produced: &str) -> bool {
    expected == produced || UNTYPED_KINDS.contains(&expected) || UNTYPED_KINDS.contains(&produced)
}

/// "outputs of kind documents: clean.documents, ingest.documents", or how to get one.
fn outputs_of_kind(steps: &[ResolvedStep], kind: &str) -> String {
    let matching: Vec<String> = steps
        .iter()
        .flat_map(|s| {
            s.outputs
                .iter()
                .filter(|(_, k)| k.as_str() == kind)
                .map(move |(name, _)| format!("{}.{name}", s.name))
        })
        .collect();
    if matching.is_empty() {
        format!("no step of this pipeline produces {kind}; `cairn steps ls` shows which kinds do")
    } else {
        format!("outputs of kind {kind}: {}", matching.join(", "))
    }
}

/// The DAG of linked steps; on a cycle, the step names along it.
pub(super) fn step_graph(steps: &[ResolvedStep]) -> Result<Dag, Vec<String>> {
    let by_name: HashMap<&str, usize> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_str(), i))
        .collect();
    let edges = steps.iter().enumerate().flat_map(|(i, step)| {
        step.inputs
            .values()
            .filter_map(|b| by_name.get(b.step.as_str()).map(|&p| (p, i)))
            .collect::<Vec<_>>()
    });
    Dag::build(steps.len(), edges).map_err(|cycle| {
        let mut names: Vec<String> = cycle.into_iter().map(|i| steps[i].name.clone()).collect();
        if names.is_empty() {
            names.push(steps[0].name.clone());
        }
        names
    })
}
