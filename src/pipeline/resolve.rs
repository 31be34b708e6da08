//! The resolve stage: each step bound to its kind (parameters parsed once) or spec file,
//! with its inputs and references checked. Problems are collected, never thrown.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use indexmap::IndexMap;
use serde_json::Value;

use super::expand::Expanded;
use super::include::Origin;
use super::link::step_graph;
use super::raw::{self, RawPipeline};
use super::source::SourceFile;
use super::yaml_to_json;
use super::{spec, Diagnostic, Diagnostics, InputBinding, ResolvedPipeline, ResolvedStep};
use crate::steps::{self, StepIo};
use crate::util::suggest::did_you_mean;
use crate::util::template::{self, Reference};
use crate::util::variant;

pub(super) struct Resolver<'a> {
    pub(super) src: &'a SourceFile,
    pub(super) diags: Vec<Diagnostic>,
    pub(super) specs: HashMap<PathBuf, Option<std::sync::Arc<spec::Spec>>>,
    /// Files taken in by `include:`.
    pub(super) included: Vec<SourceFile>,
    /// Which file each step came from (absent: the root file).
    pub(super) step_origin: HashMap<String, Origin>,
    /// Which file each param came from (absent: the root file).
    pub(super) param_origin: HashMap<String, Origin>,
    /// Variant name (`train[rank=8]`) -> the step written in the file (`train`).
    pub(super) variant_base: HashMap<String, String>,
}

impl<'a> Resolver<'a> {
    pub(super) fn new(src: &'a SourceFile) -> Self {
        Self {
            src,
            diags: Vec::new(),
            specs: HashMap::new(),
            included: Vec::new(),
            step_origin: HashMap::new(),
            param_origin: HashMap::new(),
            variant_base: HashMap::new(),
        }
    }

    /// An error at a key path as the resolved pipeline names it (`steps.train[rank=8].with.x`),
    /// located in the file and at the key where it was written (`steps.train.with.x`).
    pub(super) fn error(&mut self, path: &str, message: impl Into<String>, help: Option<String>) {
        let (origin, path) = self.written_at(path);
        self.error_in(origin, &path, message, help);
    }

    /// An error at a key path of one file.
    pub(super) fn error_in(
        &mut self,
        origin: Origin,
        path: &str,
        message: impl Into<String>,
        help: Option<String>,
    ) {
        let d = self
            .source(origin)
            .diag(path, message)
            .with_optional_help(help);
        self.diags.push(d);
    }

    pub(super) fn source(&self, origin: Origin) -> &SourceFile {
        match origin {
            Origin::Root => self.src,
            Origin::Included(i) => &self.included[i],
        }
    }

    /// The file and key path where what `path` names was written.
    fn written_at(&self, path: &str) -> (Origin, String) {
        if let Some(rest) = path.strip_prefix("params.") {
            let name = rest.split('.').next().unwrap_or(rest);
            let origin = self.param_origin.get(name).copied().unwrap_or(Origin::Root);
            return (origin, path.to_string());
        }
        let Some(rest) = path.strip_prefix("steps.") else {
            return (Origin::Root, path.to_string());
        };
        let (name, tail) = rest.split_at(name_end(rest));
        let base = self.variant_base.get(name).map_or(name, String::as_str);
        let origin = self.step_origin.get(base).copied().unwrap_or(Origin::Root);
        (origin, format!("steps.{base}{}", without_brackets(tail)))
    }

    pub(super) fn resolve(
        mut self,
        mut raw: RawPipeline,
        sets: &[String],
    ) -> Result<ResolvedPipeline, Diagnostics> {
        if raw.name.trim().is_empty() {
            self.error("name", "pipeline `name` is empty", None);
        }
        self.include(&mut raw);
        let params = self.pipeline_params(&raw, sets);
        let raw_steps = std::mem::take(&mut raw.steps);
        for name in raw_steps.keys() {
            if !valid_step_name(name) {
                self.error(
                    &format!("steps.{name}"),
                    format!("invalid step name `{name}`"),
                    Some("step names start with a letter or `_` and use letters, digits, `_` and `-` (at most 64)".into()),
                );
            }
        }
        let executor = self.pipeline_executor(raw.executor.take());
        let expanded = self.expand(raw_steps, &params);
        self.check_input_targets(&expanded);
        let mut steps = Vec::with_capacity(expanded.len());
        for (name, expanded) in expanded {
            let slurm = self.step_executor(&name, &expanded.step, executor.as_ref());
            if let Some(mut resolved) = self.resolve_step(&name, &expanded.step, &params) {
                if slurm.is_some() {
                    let implementation = resolved.implementation;
                    let why = if implementation.volatile() {
                        Some("it reads this machine's files or network each run")
                    } else if implementation.external() {
                        Some("it loads a store that belongs to this machine")
                    } else {
                        None
                    };
                    if let Some(why) = why {
                        self.error(
                            &format!("steps.{name}"),
                            format!(
                                "step `{name}` ({}) cannot run on Slurm: {why}",
                                resolved.uses
                            ),
                            Some("give it `executor: local`".into()),
                        );
                    }
                }
                resolved.slurm = slurm;
                resolved.variant = expanded.variant;
                resolved.skip = expanded.skip;
                steps.push(resolved);
            }
        }
        self.link_inputs(&steps);
        let mut dag = None;
        if self.diags.is_empty() {
            match step_graph(&steps) {
                Ok(built) => dag = Some(built),
                Err(cycle) => self.cycle_error(&cycle),
            }
        }
        let Some(dag) = dag.filter(|_| self.diags.is_empty()) else {
            return Err(Diagnostics(self.diags).normalized());
        };
        Ok(ResolvedPipeline {
            name: raw.name,
            description: raw.description,
            file: self.src.path.clone(),
            params,
            docstore_uri: raw.docstore.and_then(|d| d.uri),
            remote: raw
                .remote
                .map(|url| (url, raw.remote_options.unwrap_or_default())),
            steps,
            dag,
        })
    }

    pub(super) fn resolve_step(
        &mut self,
        name: &str,
        raw: &raw::RawStep,
        params: &IndexMap<String, Value>,
    ) -> Option<ResolvedStep> {
        let base = format!("steps.{name}");
        let mut with = serde_json::Map::new();
        let mut unreadable = false;
        for (k, v) in raw.with.iter().flatten() {
            match yaml_to_json(v) {
                Ok(j) => {
                    with.insert(k.clone(), j);
                }
                Err(e) => {
                    unreadable = true;
                    self.error(&format!("{base}.with.{k}"), format!("`{k}`: {e}"), None);
                }
            }
        }
        if unreadable {
            return None;
        }
        let mut with = Value::Object(with);
        let mut param_refs = BTreeMap::new();
        self.substitute_params(&mut with, &format!("{base}.with"), params, &mut param_refs);
        let mut inputs = IndexMap::new();
        for (input, reference) in raw.inputs.iter().flatten() {
            match split_reference(reference) {
                Some((step, output)) => {
                    inputs.insert(
                        input.clone(),
                        InputBinding {
                            step: step.to_string(),
                            output: output.to_string(),
                        },
                    );
                }
                _ => self.error(
                    &format!("{base}.inputs.{input}"),
                    format!("input `{input}` = `{reference}` is not STEP.OUTPUT"),
                    Some("for example: `documents: clean.documents`".into()),
                ),
            }
        }
        let declared_outputs = raw.outputs.clone().unwrap_or_default();
        let uses = raw.uses.trim();
        let (implementation, version, step_params, bound_params, io, param_env) =
            if spec::is_spec_reference(uses) {
                let spec = self.load_spec(&base, uses)?;
                if !declared_outputs.is_empty() {
                    self.error(
                        &format!("{base}.outputs"),
                        format!(
                            "`{uses}` declares its outputs in the spec file; remove `outputs` here"
                        ),
                        None,
                    );
                }
                let bound = spec.bind(&with);
                let bound = match bound {
                    Ok(b) => b,
                    Err(issues) => {
                        for issue in issues {
                            self.error(
                                &format!("{base}.{}", issue.path),
                                issue.message,
                                issue.help,
                            );
                        }
                        return None;
                    }
                };
                let implementation = steps::command_kind();
                let params = match implementation.bind(&bound.params, &bound.io.outputs) {
                    Ok((params, _)) => params,
                    Err(issues) => {
                        for issue in issues {
                            self.error(
                                &format!("{base}.uses"),
                                format!("`{uses}`: {}", issue.message),
                                issue.help,
                            );
                        }
                        return None;
                    }
                };
                (
                    implementation,
                    spec.version(),
                    bound.params,
                    params,
                    bound.io,
                    bound.param_env,
                )
            } else {
                let Some(implementation) = steps::lookup(uses) else {
                    let help = did_you_mean(uses, steps::kinds()).or_else(|| {
                        Some(format!(
                            "built-in kinds: {}; or a spec file such as ./steps/x.yaml",
                            steps::kinds().collect::<Vec<_>>().join(", ")
                        ))
                    });
                    self.error(
                        &format!("{base}.uses"),
                        format!("unknown step kind `{uses}`"),
                        help,
                    );
                    return None;
                };
                match implementation.bind(&with, &declared_outputs) {
                    Ok((bound_params, io)) => {
                        self.check_io_references(&base, &with, &inputs, Some(&io));
                        let param_env = if implementation.exports_params() {
                            param_refs.clone()
                        } else {
                            BTreeMap::new()
                        };
                        (
                            implementation,
                            implementation.version(),
                            with,
                            bound_params,
                            io,
                            param_env,
                        )
                    }
                    Err(issues) => {
                        for issue in issues {
                            let help = issue.help.or_else(|| {
                                issue.message.contains("missing field").then(|| {
                                    format!("`cairn steps show {uses}` lists its parameters")
                                })
                            });
                            self.error(&format!("{base}.{}", issue.path), issue.message, help);
                        }
                        self.check_io_references(&base, &with, &inputs, None);
                        let io = StepIo {
                            inputs: implementation.inputs(),
                            outputs: IndexMap::new(),
                        };
                        self.check_input_names(&base, &inputs, &io);
                        return None;
                    }
                }
            };
        self.check_input_names(&base, &inputs, &io);
        let expects = io
            .inputs
            .iter()
            .flatten()
            .map(|d| (d.name.clone(), d.kind.clone()))
            .collect();
        Some(ResolvedStep {
            name: name.to_string(),
            uses: uses.to_string(),
            implementation,
            version,
            params: step_params,
            bound: bound_params,
            param_refs,
            param_env,
            inputs,
            expects,
            outputs: io.outputs,
            variant: None,
            skip: None,
            slurm: None,
        })
    }

    /// The pipeline's `executor:`: `None` for local, the Slurm defaults for slurm.
    fn pipeline_executor(
        &mut self,
        executor: Option<raw::RawExecutor>,
    ) -> Option<raw::RawResources> {
        let executor = executor?;
        match executor.kind.as_str() {
            "local" => None,
            "slurm" => Some(executor.defaults),
            other => {
                self.error(
                    "executor.kind",
                    format!("unknown executor `{other}`"),
                    did_you_mean(other, ["local", "slurm"])
                        .or_else(|| Some("executors: local, slurm".into())),
                );
                None
            }
        }
    }

    /// Where one step runs: its own `executor:` over the pipeline's; the Slurm resources
    /// are its `resources:` over the pipeline executor's defaults.
    fn step_executor(
        &mut self,
        name: &str,
        step: &raw::RawStep,
        pipeline: Option<&raw::RawResources>,
    ) -> Option<raw::RawResources> {
        let defaults = pipeline.cloned().unwrap_or_default();
        let slurm = match step.executor.as_deref() {
            None => pipeline.is_some(),
            Some("slurm") => true,
            Some("local") => false,
            Some(other) => {
                self.error(
                    &format!("steps.{name}.executor"),
                    format!("unknown executor `{other}`"),
                    did_you_mean(other, ["local", "slurm"])
                        .or_else(|| Some("executors: local, slurm".into())),
                );
                false
            }
        };
        slurm.then(|| {
            step.resources
                .as_ref()
                .map_or(defaults.clone(), |r| r.over(&defaults))
        })
    }

    pub(super) fn load_spec(
        &mut self,
        base: &str,
        uses: &str,
    ) -> Option<std::sync::Arc<spec::Spec>> {
        let (origin, _) = self.written_at(base);
        let Some(path) = spec::find(&self.source(origin).path, uses) else {
            self.error(
                &format!("{base}.uses"),
                format!("step spec `{uses}` not found"),
                Some("spec paths are looked up from the pipeline's folder upwards, then from the current directory".into()),
            );
            return None;
        };
        if let Some(cached) = self.specs.get(&path) {
            return cached.clone();
        }
        let loaded = match spec::Spec::load(&path) {
            Ok(s) => Some(std::sync::Arc::new(s)),
            Err(d) => {
                self.diags.extend(d.0);
                None
            }
        };
        self.specs.insert(path, loaded.clone());
        loaded
    }

    pub(super) fn check_input_names(
        &mut self,
        base: &str,
        inputs: &IndexMap<String, InputBinding>,
        io: &StepIo,
    ) {
        let Some(decls) = &io.inputs else { return };
        for name in inputs.keys() {
            let declared_as = variant::base(name);
            if !decls.iter().any(|d| d.name == declared_as) {
                let help =
                    did_you_mean(name, decls.iter().map(|d| d.name.as_str())).or_else(|| {
                        Some(if decls.is_empty() {
                            "this step takes no inputs".to_string()
                        } else {
                            format!(
                                "inputs: {}",
                                decls
                                    .iter()
                                    .map(|d| d.name.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )
                        })
                    });
                self.error(
                    &format!("{base}.inputs.{name}"),
                    format!("unknown input `{name}`"),
                    help,
                );
            }
        }
        for decl in decls.iter().filter(|d| d.required) {
            let bound = inputs.contains_key(&decl.name)
                || inputs
                    .keys()
                    .any(|k| variant::split(k).is_some_and(|(n, _)| n == decl.name));
            if !bound {
                self.error(
                    base,
                    format!("missing required input `{}` ({})", decl.name, decl.kind),
                    Some(format!(
                        "bind it under `inputs:`, e.g. `{}: STEP.OUTPUT`",
                        decl.name
                    )),
                );
            }
        }
    }

    /// `${inputs.X}` / `${outputs.X}` in parameters must name bound inputs and outputs.
    /// Outputs are checked only when the step's contract is known (`io`).
    pub(super) fn check_io_references(
        &mut self,
        base: &str,
        with: &Value,
        inputs: &IndexMap<String, InputBinding>,
        io: Option<&StepIo>,
    ) {
        let mut found = Vec::new();
        collect_refs(with, &format!("{base}.with"), &mut found);
        for (path, r) in found {
            let (known, what): (Vec<&str>, &str) = match r.namespace.as_str() {
                // A collection (`models: train[*].model`) is bound as `models[...]`.
                "inputs" => (inputs.keys().map(|s| variant::base(s)).collect(), "input"),
                "outputs" => match io {
                    Some(io) => (io.outputs.keys().map(|s| s.as_str()).collect(), "output"),
                    None => continue,
                },
                _ => continue,
            };
            if !known.contains(&r.name.as_str()) {
                let help = did_you_mean(&r.name, known.iter().copied())
                    .or_else(|| Some(format!("declare it under `{}:` of this step", r.namespace)));
                self.error(
                    &path,
                    format!(
                        "`${{{}.{}}}` names no {what} of this step",
                        r.namespace, r.name
                    ),
                    help,
                );
            }
        }
    }

    /// Every `inputs:` reference names a step of this pipeline.
    pub(super) fn check_input_targets(&mut self, steps: &IndexMap<String, Expanded>) {
        for (name, step) in steps {
            for (input, reference) in step.step.inputs.iter().flatten() {
                let Some((target, _)) = split_reference(reference) else {
                    continue;
                };
                if !steps.contains_key(target) {
                    let base = variant::base(target);
                    let variants: Vec<&str> = steps
                        .keys()
                        .filter(|k| k.starts_with(base) && k[base.len()..].starts_with('['))
                        .map(|k| k.as_str())
                        .collect();
                    let help = if variants.is_empty() {
                        did_you_mean(target, steps.keys().map(|k| k.as_str()))
                    } else {
                        let shown = variants.len().min(6);
                        Some(format!(
                            "`{base}` has {} variants: {}{}; `{base}[*].OUTPUT` reads all of them",
                            variants.len(),
                            variants[..shown].join(", "),
                            if variants.len() > shown { ", ..." } else { "" }
                        ))
                    };
                    self.error(
                        &format!("steps.{name}.inputs.{input}"),
                        format!("input `{input}` refers to unknown step `{target}`"),
                        help,
                    );
                }
            }
        }
    }
}

/// `STEP.OUTPUT` split at its last dot (a variant's name may hold dots: `train[lr=0.5]`).
pub(super) fn split_reference(reference: &str) -> Option<(&str, &str)> {
    reference
        .rsplit_once('.')
        .filter(|(step, output)| !step.is_empty() && !output.is_empty())
}

/// Where the step name at the start of `rest` ends: the first dot outside brackets.
fn name_end(rest: &str) -> usize {
    let mut depth = 0usize;
    for (i, c) in rest.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            '.' if depth == 0 => return i,
            _ => {}
        }
    }
    rest.len()
}

/// A key path with `[...]` variant labels removed (`inputs.models[rank=8]` -> `inputs.models`).
fn without_brackets(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut depth = 0usize;
    for c in path.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

pub(super) fn valid_step_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && name.len() <= 64
}

fn collect_refs(value: &Value, path: &str, out: &mut Vec<(String, Reference)>) {
    match value {
        Value::String(s) => {
            if let Ok(refs) = template::references(s) {
                out.extend(refs.into_iter().map(|r| (path.to_string(), r)));
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                collect_refs(item, &format!("{path}.{i}"), out);
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                collect_refs(v, &format!("{path}.{k}"), out);
            }
        }
        _ => {}
    }
}
