//! User step specs (`steps/NAME.yaml`): a reusable `command` with declared inputs,
//! outputs and typed parameters with defaults, used from pipelines as
//! `uses: ./steps/NAME.yaml`. A spec compiles down to `command` parameters.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use serde_json::{json, Value};

use super::raw::{ParamType, RawSpec, SPEC_KEYS};
use super::{yaml_to_json, Diagnostic, Diagnostics, SourceFile};
use crate::steps::{InputDecl, ParamIssue, StepIo};
use crate::util::suggest::did_you_mean;
use crate::util::template::value_text;
use crate::util::template::{self, Escapes};

/// Whether `uses:` names a spec file rather than a built-in kind.
pub fn is_spec_reference(uses: &str) -> bool {
    uses.starts_with("./")
        || uses.starts_with("../")
        || uses.starts_with('/')
        || uses.ends_with(".yaml")
        || uses.ends_with(".yml")
}

/// Finds a spec file: relative to the pipeline's folder, then each parent, then the cwd.
pub fn find(pipeline_file: &Path, uses: &str) -> Option<PathBuf> {
    let rel = Path::new(uses);
    if rel.is_absolute() {
        return rel.is_file().then(|| rel.to_path_buf());
    }
    let start = pipeline_file.parent().unwrap_or(Path::new("."));
    let start = if start.as_os_str().is_empty() {
        Path::new(".")
    } else {
        start
    };
    start
        .ancestors()
        .map(|dir| dir.join(rel))
        .chain(std::iter::once(rel.to_path_buf()))
        .find(|p| p.is_file())
}

/// A typed spec parameter.
#[derive(Debug, Clone)]
pub struct SpecParam {
    ty: ParamType,
    default: Option<Value>,
}

/// A checked spec.
#[derive(Debug)]
pub struct Spec {
    digest: String,
    inputs: IndexMap<String, (String, bool)>,
    outputs: IndexMap<String, String>,
    params: IndexMap<String, SpecParam>,
    run: Value,
    env: IndexMap<String, String>,
    timeout: Option<f64>,
    retries: Option<u32>,
    retry_backoff_ms: Option<u64>,
}

/// A spec bound to one step's `with:`.
pub struct Bound {
    /// `command` parameters.
    pub params: Value,
    /// The step's I/O contract.
    pub io: StepIo,
    /// Parameter values exported as `CAIRN_PARAM_*`.
    pub param_env: BTreeMap<String, Value>,
}

fn type_name(t: ParamType) -> &'static str {
    match t {
        ParamType::String => "string",
        ParamType::Integer => "integer",
        ParamType::Number => "number",
        ParamType::Boolean => "boolean",
        ParamType::List => "list",
        ParamType::Map => "map",
        ParamType::Any => "any",
    }
}

fn with_article(t: ParamType) -> String {
    let name = type_name(t);
    let article = if matches!(t, ParamType::Integer | ParamType::Any) {
        "an"
    } else {
        "a"
    };
    format!("{article} {name}")
}

fn type_matches(t: ParamType, v: &Value) -> bool {
    match t {
        ParamType::String => v.is_string(),
        ParamType::Integer => v.is_i64() || v.is_u64(),
        ParamType::Number => v.is_number(),
        ParamType::Boolean => v.is_boolean(),
        ParamType::List => v.is_array(),
        ParamType::Map => v.is_object(),
        ParamType::Any => true,
    }
}

impl Spec {
    /// Reads and checks a spec file; problems are located in the spec file.
    pub fn load(path: &Path) -> Result<Self, Diagnostics> {
        let src = SourceFile::read(path, "step spec")?;
        src.check_syntax("step spec").map_err(Diagnostics::from)?;
        if src.index().kind("") != Some(super::location::NodeKind::Mapping) {
            return Err(src
                .diag("", "the top level of a step spec must be a mapping")
                .into());
        }
        let mut diags = src.duplicate_diags();
        diags.extend(src.unknown_keys("", SPEC_KEYS, "the step spec"));
        let raw: RawSpec = src.deserialize().map_err(|d| {
            diags.push(d);
            Diagnostics(diags.clone()).normalized()
        })?;
        let digest = blake3::hash(src.text.as_bytes()).to_hex()[..16].to_string();
        let inputs: IndexMap<String, (String, bool)> = raw
            .inputs
            .iter()
            .flatten()
            .map(|(k, io)| {
                let required = match io {
                    super::raw::RawSpecIo::Full { required, .. } => required.unwrap_or(true),
                    _ => true,
                };
                (k.clone(), (io.kind().to_string(), required))
            })
            .collect();
        let outputs: IndexMap<String, String> = raw
            .outputs
            .iter()
            .flatten()
            .map(|(k, io)| (k.clone(), io.kind().to_string()))
            .collect();
        let mut params = IndexMap::new();
        for (name, p) in raw.params.iter().flatten() {
            let ty = p.ty.unwrap_or(ParamType::Any);
            let default = match p.default.as_ref().map(yaml_to_json).transpose() {
                Ok(d) => d,
                Err(e) => {
                    diags.push(src.diag(&format!("params.{name}.default"), e));
                    None
                }
            };
            if let Some(d) = &default {
                if !type_matches(ty, d) {
                    diags.push(src.diag(
                        &format!("params.{name}.default"),
                        format!("default of `{name}` is {d}, not {}", with_article(ty)),
                    ));
                }
            }
            params.insert(name.clone(), SpecParam { ty, default });
        }
        let run = match yaml_to_json(&raw.run) {
            Ok(Value::String(s)) if !s.trim().is_empty() => Value::String(s),
            Ok(Value::Array(items)) if !items.is_empty() && items.iter().all(|i| i.is_string()) => {
                Value::Array(items)
            }
            _ => {
                diags.push(src.diag(
                    "run",
                    "`run` must be a shell script string or a non-empty list of strings",
                ));
                Value::Null
            }
        };
        let env = raw.env.clone().unwrap_or_default();
        let spec = Spec {
            digest,
            inputs,
            outputs,
            params,
            run,
            env,
            timeout: raw.timeout,
            retries: raw.retries,
            retry_backoff_ms: raw.retry_backoff_ms,
        };
        spec.check_references(&src, &mut diags);
        if diags.is_empty() {
            Ok(spec)
        } else {
            Err(Diagnostics(diags).normalized())
        }
    }

    fn check_references(&self, src: &SourceFile, diags: &mut Vec<Diagnostic>) {
        let mut texts: Vec<(String, &str)> = Vec::new();
        match &self.run {
            Value::String(s) => texts.push(("run".into(), s)),
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    if let Value::String(s) = item {
                        texts.push((format!("run.{i}"), s));
                    }
                }
            }
            _ => {}
        }
        for (k, v) in &self.env {
            texts.push((format!("env.{k}"), v));
        }
        for (path, text) in texts {
            let refs = match template::references(text) {
                Ok(r) => r,
                Err(e) => {
                    diags.push(src.diag(&path, e.0));
                    continue;
                }
            };
            for r in refs {
                let known: Vec<&str> = match r.namespace.as_str() {
                    "params" => self.params.keys().map(|s| s.as_str()).collect(),
                    "inputs" => self.inputs.keys().map(|s| s.as_str()).collect(),
                    _ => self.outputs.keys().map(|s| s.as_str()).collect(),
                };
                if !known.contains(&r.name.as_str()) {
                    diags.push(
                        src.diag(
                            &path,
                            format!(
                                "`${{{}.{}}}` is not declared in this spec",
                                r.namespace, r.name
                            ),
                        )
                        .with_optional_help(
                            did_you_mean(&r.name, known.iter().copied())
                                .or_else(|| Some(format!("declare it under `{}:`", r.namespace))),
                        ),
                    );
                }
            }
        }
    }

    /// Version entering the cache key: editing the spec invalidates its results.
    pub fn version(&self) -> String {
        format!("spec-{}", self.digest)
    }

    /// Binds a step's `with:` (already `${params.*}`-substituted) to this spec.
    pub fn bind(&self, with: &Value) -> Result<Bound, Vec<ParamIssue>> {
        let mut issues = Vec::new();
        let given = with.as_object().cloned().unwrap_or_default();
        let mut values = BTreeMap::new();
        for (k, v) in &given {
            match self.params.get(k) {
                None => issues.push(ParamIssue {
                    path: format!("with.{k}"),
                    message: format!("unknown parameter `{k}`"),
                    help: did_you_mean(k, self.params.keys().map(|s| s.as_str())).or_else(|| {
                        Some(format!(
                            "this spec's params: {}",
                            self.params.keys().cloned().collect::<Vec<_>>().join(", ")
                        ))
                    }),
                }),
                Some(p) if !type_matches(p.ty, v) => issues.push(ParamIssue::new(
                    format!("with.{k}"),
                    format!("parameter `{k}` must be {}, got {v}", with_article(p.ty)),
                )),
                Some(_) => {
                    values.insert(k.clone(), v.clone());
                }
            }
        }
        for (name, p) in &self.params {
            if given.contains_key(name) {
                continue;
            }
            match &p.default {
                Some(d) => {
                    values.insert(name.clone(), d.clone());
                }
                None => issues.push(ParamIssue::new(
                    "with",
                    format!("missing required parameter `{name}` ({})", type_name(p.ty)),
                )),
            }
        }
        if !issues.is_empty() {
            return Err(issues);
        }
        let subst = |text: &str| -> String {
            template::substitute(text, Escapes::Keep, &mut |r| {
                Ok((r.namespace == "params")
                    .then(|| values.get(&r.name).map(value_text))
                    .flatten())
            })
            .unwrap_or_else(|_| text.to_string())
        };
        let run = match &self.run {
            Value::String(s) => Value::String(subst(s)),
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|i| Value::String(subst(i.as_str().unwrap_or(""))))
                    .collect(),
            ),
            other => other.clone(),
        };
        let env: serde_json::Map<String, Value> = self
            .env
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(subst(v))))
            .collect();
        let mut params = json!({"run": run, "env": env});
        if let Some(t) = self.timeout {
            params["timeout"] = json!(t);
        }
        if let Some(r) = self.retries {
            params["retries"] = json!(r);
        }
        if let Some(b) = self.retry_backoff_ms {
            params["retry_backoff_ms"] = json!(b);
        }
        let io = StepIo {
            inputs: Some(
                self.inputs
                    .iter()
                    .map(|(name, (kind, required))| InputDecl {
                        name: name.clone(),
                        kind: kind.clone(),
                        required: *required,
                    })
                    .collect(),
            ),
            outputs: self.outputs.clone(),
        };
        Ok(Bound {
            params,
            io,
            param_env: values,
        })
    }
}
