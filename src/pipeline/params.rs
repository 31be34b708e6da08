//! Pipeline params: file values with `--set` applied, and `${params.NAME}` substituted
//! in every string of a step's `with:` (a whole-string reference keeps its type).

use std::collections::BTreeMap;
use std::path::Path;

use indexmap::IndexMap;
use serde_json::Value;

use super::raw::RawPipeline;
use super::resolve::Resolver;
use super::{yaml_to_json, Diagnostic};
use crate::util::suggest::did_you_mean;
use crate::util::template::{self, value_text, Escapes, Reference, TemplateError};

impl Resolver<'_> {
    pub(super) fn pipeline_params(
        &mut self,
        raw: &RawPipeline,
        sets: &[String],
    ) -> IndexMap<String, Value> {
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
    pub(super) fn substitute_params(
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

    pub(super) fn undefined_param(
        &mut self,
        path: &str,
        name: &str,
        params: &IndexMap<String, Value>,
    ) {
        let help = did_you_mean(name, params.keys().map(|k| k.as_str()))
            .or_else(|| Some("declare it under `params:` at the top of the pipeline".to_string()));
        self.error(path, format!("undefined `${{params.{name}}}`"), help);
    }
}
