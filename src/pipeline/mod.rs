//! Pipelines: YAML files -> a checked, resolved model ready to plan.
//!
//! Raw (serde types, with a location index) -> Resolved (`${params.*}` substituted, step
//! kinds and spec files bound, inputs linked to outputs, graph acyclic). Every problem
//! found along the way is collected with its file:line:column and reported at once.

pub mod diagnostic;
pub mod location;
pub mod raw;
mod spec;
pub mod template;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use serde_json::Value;

use crate::steps::{self, Step, StepIo};
pub use diagnostic::{did_you_mean, Diagnostic, Diagnostics, Location};
use location::{LocationIndex, NodeKind};
use raw::{RawPipeline, PIPELINE_KEYS, STEP_KEYS};
use template::{Escapes, Reference, TemplateError};

/// Largest pipeline or spec file accepted.
const MAX_FILE_BYTES: usize = 16 << 20;

/// A pipeline ready to plan.
#[derive(Debug)]
pub struct ResolvedPipeline {
    /// Pipeline name.
    pub name: String,
    /// Free text.
    pub description: Option<String>,
    /// The file it came from.
    pub file: PathBuf,
    /// Effective pipeline parameters (file values with `--set` applied).
    pub params: IndexMap<String, Value>,
    /// Document store URI from `docstore: {uri}` (may hold a password: never recorded).
    pub docstore_uri: Option<String>,
    /// Steps in file order.
    pub steps: Vec<ResolvedStep>,
}

/// A step with everything bound.
#[derive(Clone)]
pub struct ResolvedStep {
    /// Step name.
    pub name: String,
    /// `uses:` as written (a kind or a spec path).
    pub uses: String,
    /// The implementation that runs it.
    pub implementation: &'static dyn Step,
    /// Version that enters the cache key (kind version, or spec digest).
    pub version: String,
    /// Resolved parameters of the implementation.
    pub params: Value,
    /// Pipeline parameters the step references, with their values.
    pub param_refs: BTreeMap<String, Value>,
    /// Values exported to commands as `CAIRN_PARAM_*`.
    pub param_env: BTreeMap<String, Value>,
    /// Inputs by name.
    pub inputs: IndexMap<String, InputBinding>,
    /// Outputs by name, with kinds.
    pub outputs: IndexMap<String, String>,
}

impl std::fmt::Debug for ResolvedStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResolvedStep")
            .field("name", &self.name)
            .field("uses", &self.uses)
            .field("params", &self.params)
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .finish()
    }
}

/// An input bound to another step's output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputBinding {
    /// Producing step.
    pub step: String,
    /// Output name on it.
    pub output: String,
}

impl std::fmt::Display for InputBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.step, self.output)
    }
}

/// A YAML file read and decoded. Its location index is built only when a diagnostic needs
/// a location (or the file needs a careful look), so a valid file is parsed once.
pub(crate) struct SourceFile {
    pub path: PathBuf,
    pub text: String,
    index: std::cell::OnceCell<LocationIndex>,
}

impl SourceFile {
    /// Reads a YAML file; `what` names it in messages ("pipeline", "step spec").
    pub fn read(path: &Path, what: &str) -> Result<Self, Diagnostics> {
        let bytes = std::fs::read(path)
            .map_err(|e| Diagnostic::at(path, None, format!("cannot read {what} file: {e}")))?;
        if bytes.len() > MAX_FILE_BYTES {
            return Err(Diagnostic::at(
                path,
                None,
                format!(
                    "{what} file is {} bytes; the limit is {MAX_FILE_BYTES}",
                    bytes.len()
                ),
            )
            .into());
        }
        let text = String::from_utf8(bytes).map_err(|e| {
            let good = e.utf8_error().valid_up_to();
            let raw = e.as_bytes();
            let location = offset_location(&String::from_utf8_lossy(&raw[..good]), good);
            Diagnostic::at(
                path,
                Some(location),
                format!("{what} file is not valid UTF-8 (byte 0x{:02x})", raw[good]),
            )
            .with_help("save the file as UTF-8")
        })?;
        if text.trim().is_empty() {
            return Err(empty_file(path, what).into());
        }
        Ok(Self {
            path: path
                .components()
                .filter(|c| !matches!(c, std::path::Component::CurDir))
                .collect(),
            text,
            index: std::cell::OnceCell::new(),
        })
    }

    /// The location index (built on first use; empty if the YAML cannot be indexed).
    pub fn index(&self) -> &LocationIndex {
        self.index
            .get_or_init(|| LocationIndex::build(&self.text).unwrap_or_default())
    }

    /// Builds the index now, turning YAML syntax problems and empty documents into
    /// diagnostics.
    pub fn check_syntax(&self, what: &str) -> Result<(), Diagnostic> {
        let text = &self.text;
        let index = LocationIndex::build(text).map_err(|e| {
            let line_text = text
                .lines()
                .nth(e.location.line.saturating_sub(1))
                .unwrap_or("");
            let tab_help = (line_text.starts_with('\t')
                || text.lines().any(|l| l.starts_with('\t')) && e.message.contains("tab"))
            .then(|| "YAML does not allow tabs for indentation; indent with spaces".to_string());
            let flow_help = e
                .message
                .contains("flow")
                .then(|| "check for an unclosed `{`, `[` or quote before this point".to_string());
            Diagnostic::at(
                &self.path,
                Some(e.location),
                format!("invalid YAML: {}", e.message),
            )
            .with_optional_help(tab_help.or(flow_help))
        })?;
        let empty = index.empty;
        let _ = self.index.set(index);
        if empty {
            return Err(empty_file(&self.path, what));
        }
        Ok(())
    }

    /// A diagnostic at `path`: a scalar's value, a mapping's or sequence's key, or the
    /// nearest indexed ancestor.
    pub fn diag(&self, path: &str, message: impl Into<String>) -> Diagnostic {
        let index = self.index();
        let location = match index.kind(path) {
            Some(NodeKind::Scalar) => index.value(path),
            Some(_) => index.key(path),
            None => None,
        }
        .or_else(|| index.nearest(path));
        Diagnostic::at(&self.path, location, message)
    }

    /// Duplicate keys as diagnostics.
    pub fn duplicate_diags(&self) -> Vec<Diagnostic> {
        self.index()
            .duplicates
            .iter()
            .map(|(key_path, first, _second)| {
                let key = key_path.rsplit('.').next().unwrap_or(key_path);
                let what = if key_path.starts_with("steps.") && key_path.matches('.').count() == 1 {
                    format!("duplicate step name `{key}`")
                } else {
                    format!("duplicate key `{key}`")
                };
                Diagnostic::at(&self.path, Some(*_second), what).with_help(format!(
                    "first defined at line {}, column {}",
                    first.line, first.col
                ))
            })
            .collect()
    }

    /// Unknown keys of the mapping at `path`.
    pub fn unknown_keys(&self, path: &str, allowed: &[&str], what: &str) -> Vec<Diagnostic> {
        self.index()
            .keys_of(path)
            .iter()
            .filter(|k| !allowed.contains(&k.as_str()))
            .map(|k| {
                let help = did_you_mean(k, allowed.iter().copied())
                    .unwrap_or_else(|| format!("expected one of: {}", allowed.join(", ")));
                Diagnostic::at(
                    &self.path,
                    self.index().key(&location::join(path, k)),
                    format!("unknown key `{k}` in {what}"),
                )
                .with_help(help)
            })
            .collect()
    }

    /// Deserializes the whole file into `T`, mapping serde's error to a diagnostic.
    pub fn deserialize<T: serde::de::DeserializeOwned>(&self) -> Result<T, Diagnostic> {
        serde_yaml::from_str(&self.text).map_err(|e| {
            let location = e.location().map(|l| Location {
                line: l.line(),
                col: l.column(),
            });
            let mut message = e.to_string();
            if let Some(i) = message.rfind(" at line ") {
                message.truncate(i);
            }
            let help = if message.contains("repetition limit") {
                Some("anchors and aliases (`&a`, `*a`) expand to too much data; write the values out".to_string())
            } else {
                None
            };
            Diagnostic::at(&self.path, location, crate::steps::plain_type_names(&message)).with_optional_help(help)
        })
    }
}

fn empty_file(path: &Path, what: &str) -> Diagnostic {
    let help = if what == "pipeline" {
        "a pipeline needs at least `name:` and `steps:`"
    } else {
        "a step spec needs at least `run:`"
    };
    Diagnostic::at(path, None, format!("{what} file is empty")).with_help(help)
}

fn offset_location(prefix: &str, _offset: usize) -> Location {
    let line = prefix.matches('\n').count() + 1;
    let col = prefix
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0)
        + 1;
    Location { line, col }
}

/// Converts a YAML value to JSON (the canonical form parameters are hashed in).
pub fn yaml_to_json(v: &serde_yaml::Value) -> Result<Value, String> {
    use serde_yaml::Value as Y;
    Ok(match v {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(*b),
        Y::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                serde_json::Number::from_f64(f)
                    .map(Value::Number)
                    .ok_or_else(|| format!("{f} is not a finite number"))?
            }
        }
        Y::String(s) => Value::String(s.clone()),
        Y::Sequence(items) => {
            Value::Array(items.iter().map(yaml_to_json).collect::<Result<_, _>>()?)
        }
        Y::Mapping(map) => {
            let mut out = serde_json::Map::new();
            for (k, v) in map {
                let key = match k {
                    Y::String(s) => s.clone(),
                    Y::Number(n) => n.to_string(),
                    Y::Bool(b) => b.to_string(),
                    _ => return Err("mapping keys must be plain strings".into()),
                };
                out.insert(key, yaml_to_json(v)?);
            }
            Value::Object(out)
        }
        Y::Tagged(t) => return Err(format!("YAML tags such as `{}` are not supported", t.tag)),
    })
}

/// Text of a value when interpolated into a string.
pub fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn valid_step_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && name.len() <= 64
}

/// Loads, checks and resolves a pipeline file with `--set KEY=VALUE` overrides.
pub fn load(file: &Path, sets: &[String]) -> Result<ResolvedPipeline, Diagnostics> {
    let src = SourceFile::read(file, "pipeline")?;
    let (raw, soft) = match quick_parse(&src) {
        Some(raw) => (raw, Vec::new()),
        None => careful_parse(&src)?,
    };
    let mut resolver = Resolver::new(&src);
    resolver.diags = soft;
    resolver.resolve(raw, sets)
}

/// The common case, a well-formed file: one serde parse, no location index. serde_yaml's
/// `Mapping` rejects duplicate keys, and the shape check below covers unknown and missing
/// keys; anything unusual returns `None` and takes the careful path.
fn quick_parse(src: &SourceFile) -> Option<RawPipeline> {
    let value: serde_yaml::Value = serde_yaml::from_str(&src.text).ok()?;
    let only_keys = |m: &serde_yaml::Mapping, allowed: &[&str]| {
        m.keys()
            .all(|k| k.as_str().is_some_and(|k| allowed.contains(&k)))
    };
    let root = value.as_mapping()?;
    let steps = root.get("steps")?.as_mapping()?;
    let well_formed = only_keys(root, PIPELINE_KEYS)
        && root.contains_key("name")
        && steps.iter().all(|(name, step)| {
            name.is_string()
                && step
                    .as_mapping()
                    .is_some_and(|m| m.contains_key("uses") && only_keys(m, STEP_KEYS))
        });
    if !well_formed {
        return None;
    }
    serde_yaml::from_value(value).ok()
}

/// The careful path: index the file and report every shape problem with its location.
/// Shape errors stop here (serde could not read the file); unknown keys are "soft" and
/// are reported together with the semantic errors found later.
fn careful_parse(src: &SourceFile) -> Result<(RawPipeline, Vec<Diagnostic>), Diagnostics> {
    let file = src.path.as_path();
    src.check_syntax("pipeline")?;
    let index = src.index();
    if index.kind("") != Some(NodeKind::Mapping) {
        return Err(src
            .diag("", "the top level of a pipeline must be a mapping")
            .with_help("a pipeline needs at least `name:` and `steps:`")
            .into());
    }
    let mut soft = src.duplicate_diags();
    soft.extend(src.unknown_keys("", PIPELINE_KEYS, "the pipeline"));
    let mut diags = Vec::new();
    for required in ["name", "steps"] {
        if !index.keys_of("").iter().any(|k| k == required) {
            diags.push(
                Diagnostic::at(
                    file,
                    Some(Location { line: 1, col: 1 }),
                    format!("missing required key `{required}`"),
                )
                .with_help("a pipeline needs at least `name:` and `steps:`"),
            );
        }
    }
    match index.kind("steps") {
        Some(NodeKind::Mapping) => {
            for step in index.keys_of("steps") {
                let path = format!("steps.{step}");
                match index.kind(&path) {
                    Some(NodeKind::Mapping) => {
                        soft.extend(src.unknown_keys(&path, STEP_KEYS, &format!("step `{step}`")));
                        if !index.keys_of(&path).iter().any(|k| k == "uses") {
                            diags.push(src.diag(&path, format!("step `{step}` has no `uses`")).with_help(
                                "name a step kind (see `cairn steps ls`) or a spec file such as ./steps/x.yaml",
                            ));
                        }
                    }
                    _ => diags.push(src.diag(
                        &path,
                        format!("step `{step}` must be a mapping with at least `uses:`"),
                    )),
                }
            }
        }
        Some(_) => diags.push(src.diag("steps", "`steps` must be a mapping of step name to step")),
        None => {}
    }
    if !diags.is_empty() {
        diags.extend(soft);
        return Err(Diagnostics(diags).normalized());
    }
    match src.deserialize::<RawPipeline>() {
        Ok(raw) => Ok((raw, soft)),
        Err(d) => {
            soft.push(d);
            Err(Diagnostics(soft).normalized())
        }
    }
}

struct Resolver<'a> {
    src: &'a SourceFile,
    diags: Vec<Diagnostic>,
    specs: HashMap<PathBuf, Option<std::sync::Arc<spec::Spec>>>,
}

impl<'a> Resolver<'a> {
    fn new(src: &'a SourceFile) -> Self {
        Self {
            src,
            diags: Vec::new(),
            specs: HashMap::new(),
        }
    }

    fn error(&mut self, path: &str, message: impl Into<String>, help: Option<String>) {
        let d = self.src.diag(path, message).with_optional_help(help);
        self.diags.push(d);
    }

    fn resolve(
        mut self,
        mut raw: RawPipeline,
        sets: &[String],
    ) -> Result<ResolvedPipeline, Diagnostics> {
        if raw.name.trim().is_empty() {
            self.error("name", "pipeline `name` is empty", None);
        }
        let params = self.pipeline_params(&raw, sets);
        if raw.steps.is_empty() {
            self.error("steps", "the pipeline has no steps", None);
        }
        let raw_steps = self.deserialize_steps(std::mem::take(&mut raw.steps));
        self.check_input_targets(&raw_steps);
        let mut steps = Vec::new();
        for (name, step) in &raw_steps {
            if !valid_step_name(name) {
                self.error(
                    &format!("steps.{name}"),
                    format!("invalid step name `{name}`"),
                    Some("step names start with a letter or `_` and use letters, digits, `_` and `-` (at most 64)".into()),
                );
            }
            if let Some(resolved) = self.resolve_step(name, step, &params) {
                steps.push(resolved);
            }
        }
        self.link_inputs(&steps);
        if self.diags.is_empty() {
            if let Err(cycle) = crate::graph::Dag::build(&steps).map_err(|mut c| {
                if c.is_empty() {
                    c.push(steps[0].name.clone());
                }
                c
            }) {
                let path = format!("steps.{}", cycle[0]);
                let mut shown = if cycle.len() > 50 {
                    let mut s = cycle[..25].to_vec();
                    s.push(format!("... ({} more) ...", cycle.len() - 50));
                    s.extend_from_slice(&cycle[cycle.len() - 25..]);
                    s
                } else {
                    cycle.clone()
                };
                shown.push(cycle[0].clone());
                self.error(
                    &path,
                    format!("dependency cycle: {}", shown.join(" -> ")),
                    Some("a step cannot depend on its own outputs; break the cycle by removing one of these inputs".into()),
                );
            }
        }
        if !self.diags.is_empty() {
            return Err(Diagnostics(self.diags).normalized());
        }
        Ok(ResolvedPipeline {
            name: raw.name,
            description: raw.description,
            file: self.src.path.clone(),
            params,
            docstore_uri: raw.docstore.and_then(|d| d.uri),
            steps,
        })
    }

    /// Each step on its own, so a type error in one does not hide the others.
    fn deserialize_steps(
        &mut self,
        steps: IndexMap<String, serde_yaml::Value>,
    ) -> IndexMap<String, raw::RawStep> {
        let mut out = IndexMap::new();
        for (name, value) in steps {
            match serde_path_to_error::deserialize::<_, raw::RawStep>(value) {
                Ok(step) => {
                    out.insert(name, step);
                }
                Err(err) => {
                    let sub = err.path().to_string();
                    let path = if sub == "." {
                        format!("steps.{name}")
                    } else {
                        format!("steps.{name}.{sub}")
                    };
                    let message = crate::steps::plain_type_names(&err.inner().to_string());
                    let message = if sub == "." {
                        message
                    } else {
                        format!("{sub}: {message}")
                    };
                    self.error(&path, format!("step `{name}`: {message}"), None);
                }
            }
        }
        out
    }

    fn pipeline_params(&mut self, raw: &RawPipeline, sets: &[String]) -> IndexMap<String, Value> {
        let mut params = IndexMap::new();
        for (name, value) in raw.params.iter().flatten() {
            match yaml_to_json(value) {
                Ok(v) => {
                    params.insert(name.clone(), v);
                }
                Err(e) => self.error(
                    &format!("params.{name}"),
                    format!("param `{name}`: {e}"),
                    None,
                ),
            }
        }
        for set in sets {
            let cli = Path::new("<command line>");
            let Some((key, text)) = set.split_once('=') else {
                self.diags.push(
                    Diagnostic::at(cli, None, format!("--set `{set}` is not KEY=VALUE"))
                        .with_help("for example: --set chunk_size=400"),
                );
                continue;
            };
            if !params.contains_key(key) {
                let help = did_you_mean(key, params.keys().map(|k| k.as_str())).or_else(|| {
                    Some(if params.is_empty() {
                        "the pipeline declares no params".to_string()
                    } else {
                        format!(
                            "declared params: {}",
                            params.keys().cloned().collect::<Vec<_>>().join(", ")
                        )
                    })
                });
                self.diags.push(
                    Diagnostic::at(
                        cli,
                        None,
                        format!("--set {set}: the pipeline has no param `{key}`"),
                    )
                    .with_optional_help(help),
                );
                continue;
            }
            let value = if text.is_empty() {
                Value::String(String::new())
            } else {
                serde_yaml::from_str::<serde_yaml::Value>(text)
                    .ok()
                    .and_then(|y| yaml_to_json(&y).ok())
                    .unwrap_or_else(|| Value::String(text.to_string()))
            };
            params.insert(key.to_string(), value);
        }
        params
    }

    /// Replaces `${params.NAME}` in every string of `value`.
    fn substitute_params(
        &mut self,
        value: &mut Value,
        path: &str,
        params: &IndexMap<String, Value>,
        refs: &mut BTreeMap<String, Value>,
    ) {
        match value {
            Value::String(s) => {
                if let Some(r) = template::sole_reference(s).filter(|r| r.namespace == "params") {
                    match params.get(&r.name) {
                        Some(v) => {
                            refs.insert(r.name.clone(), v.clone());
                            *value = v.clone();
                        }
                        None => self.undefined_param(path, &r.name, params),
                    }
                    return;
                }
                let mut missing = Vec::new();
                let result = template::substitute(s, Escapes::Keep, &mut |r: &Reference| {
                    if r.namespace != "params" {
                        return Ok(None);
                    }
                    match params.get(&r.name) {
                        Some(v) => {
                            refs.insert(r.name.clone(), v.clone());
                            Ok(Some(value_text(v)))
                        }
                        None => {
                            missing.push(r.name.clone());
                            Ok(None)
                        }
                    }
                });
                for name in missing {
                    self.undefined_param(path, &name, params);
                }
                match result {
                    Ok(text) => *s = text,
                    Err(TemplateError(msg)) => self.error(path, msg, None),
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter_mut().enumerate() {
                    self.substitute_params(item, &format!("{path}.{i}"), params, refs);
                }
            }
            Value::Object(map) => {
                for (k, v) in map.iter_mut() {
                    self.substitute_params(v, &format!("{path}.{k}"), params, refs);
                }
            }
            _ => {}
        }
    }

    fn undefined_param(&mut self, path: &str, name: &str, params: &IndexMap<String, Value>) {
        let help = did_you_mean(name, params.keys().map(|k| k.as_str()))
            .or_else(|| Some("declare it under `params:` at the top of the pipeline".to_string()));
        self.error(path, format!("undefined `${{params.{name}}}`"), help);
    }

    fn resolve_step(
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
            match reference.split_once('.') {
                Some((step, output)) if !step.is_empty() && !output.is_empty() => {
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
        let (implementation, version, step_params, io, param_env) = if spec::is_spec_reference(uses)
        {
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
                        self.error(&format!("{base}.{}", issue.path), issue.message, issue.help);
                    }
                    return None;
                }
            };
            (
                steps::lookup("command").expect("command is built in"),
                spec.version(),
                bound.params,
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
            match implementation.check(&with, &declared_outputs) {
                Ok(io) => {
                    self.check_io_references(&base, &with, &inputs, Some(&io));
                    (
                        implementation,
                        implementation.version(),
                        with,
                        io,
                        param_refs.clone(),
                    )
                }
                Err(issues) => {
                    for issue in issues {
                        let help = issue.help.or_else(|| {
                            issue
                                .message
                                .contains("missing field")
                                .then(|| format!("`cairn steps show {uses}` lists its parameters"))
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
        Some(ResolvedStep {
            name: name.to_string(),
            uses: uses.to_string(),
            implementation,
            version,
            params: step_params,
            param_refs,
            param_env,
            inputs,
            outputs: io.outputs,
        })
    }

    fn load_spec(&mut self, base: &str, uses: &str) -> Option<std::sync::Arc<spec::Spec>> {
        let Some(path) = spec::find(&self.src.path, uses) else {
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

    fn check_input_names(
        &mut self,
        base: &str,
        inputs: &IndexMap<String, InputBinding>,
        io: &StepIo,
    ) {
        let Some(decls) = &io.inputs else { return };
        for name in inputs.keys() {
            if !decls.iter().any(|d| &d.name == name) {
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
            if !inputs.contains_key(&decl.name) {
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
    fn check_io_references(
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
                "inputs" => (inputs.keys().map(|s| s.as_str()).collect(), "input"),
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
    fn check_input_targets(&mut self, raw_steps: &IndexMap<String, raw::RawStep>) {
        for (name, step) in raw_steps {
            for (input, reference) in step.inputs.iter().flatten() {
                let Some((target, _)) = reference.split_once('.') else {
                    continue;
                };
                if !target.is_empty() && !raw_steps.contains_key(target) {
                    let help = did_you_mean(target, raw_steps.keys().map(|k| k.as_str()));
                    self.error(
                        &format!("steps.{name}.inputs.{input}"),
                        format!("input `{input}` refers to unknown step `{target}`"),
                        help,
                    );
                }
            }
        }
    }

    fn link_inputs(&mut self, steps: &[ResolvedStep]) {
        let by_name: HashMap<&str, &ResolvedStep> =
            steps.iter().map(|s| (s.name.as_str(), s)).collect();
        for step in steps {
            for (input, binding) in &step.inputs {
                let path = format!("steps.{}.inputs.{input}", step.name);
                // Unknown steps are reported by `check_input_targets`; steps that failed to
                // resolve have their own errors.
                let target = by_name
                    .get(binding.step.as_str())
                    .filter(|t| !t.outputs.contains_key(&binding.output));
                {
                    if let Some(target) = target {
                        let help = did_you_mean(
                            &binding.output,
                            target.outputs.keys().map(|k| k.as_str()),
                        )
                        .or_else(|| {
                            Some(format!(
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
                            ))
                        });
                        self.error(
                            &path,
                            format!("step `{}` has no output `{}`", binding.step, binding.output),
                            help,
                        );
                    }
                }
            }
        }
    }
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
