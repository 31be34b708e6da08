//! The raw stage: a pipeline file parsed into [`RawPipeline`], in one serde pass when it
//! is well formed, else carefully, with every shape problem located.

use indexmap::IndexMap;
use serde::Deserialize;
use serde_json::Value;

use super::location::NodeKind;
use super::raw::{unique_keys, RawDocstore, RawPipeline, RawStep, PIPELINE_KEYS, STEP_KEYS};
use super::source::SourceFile;
use super::{Diagnostic, Diagnostics, Location};

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

/// The common case, a well-formed file: one typed serde pass, no location index and no
/// intermediate YAML tree. Unknown keys and duplicate keys fail it (the careful path then
/// reports them with their locations), as does anything else unusual.
pub(super) fn quick_parse(src: &SourceFile) -> Option<RawPipeline> {
    /// `RawPipeline` refusing what the careful path reports softly.
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Strict {
        name: String,
        #[serde(default)]
        description: Option<String>,
        #[serde(default)]
        include: Option<serde_yaml::Value>,
        #[serde(default, deserialize_with = "unique_keys")]
        params: Option<IndexMap<String, serde_yaml::Value>>,
        #[serde(default)]
        docstore: Option<RawDocstore>,
        #[serde(default)]
        remote: Option<String>,
        #[serde(default)]
        remote_options: Option<std::collections::BTreeMap<String, String>>,
        #[serde(default)]
        executor: Option<super::raw::RawExecutor>,
        #[serde(deserialize_with = "unique_keys")]
        steps: Option<IndexMap<String, RawStep>>,
    }

    let strict: Strict = serde_yaml::from_str(&src.text).ok()?;
    let steps = strict.steps.filter(|s| !s.is_empty())?;
    // Includes are read by the careful path, which locates problems in them.
    if strict.include.is_some() {
        return None;
    }
    Some(RawPipeline {
        name: strict.name,
        description: strict.description,
        include: Vec::new(),
        params: strict.params,
        docstore: strict.docstore,
        remote: strict.remote,
        remote_options: strict.remote_options,
        executor: strict.executor,
        steps,
    })
}

/// The careful path: index the file and report every shape problem with its location.
/// Shape errors stop here (serde could not read the file); unknown keys are "soft" and
/// are reported together with the semantic errors found later.
pub(super) fn careful_parse(
    src: &SourceFile,
) -> Result<(RawPipeline, Vec<Diagnostic>), Diagnostics> {
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
    let mut raw = match src.deserialize::<RawPipeline<serde_yaml::Value>>() {
        Ok(raw) => raw,
        Err(d) => {
            // serde's unlocated "duplicate entry" repeats a duplicate located above.
            let repeats =
                d.message.contains("duplicate entry") && !src.index().duplicates.is_empty();
            if !repeats {
                soft.push(d);
            }
            return Err(Diagnostics(soft).normalized());
        }
    };
    if raw.steps.is_empty() {
        soft.push(src.diag("steps", "the pipeline has no steps"));
    }
    let steps = deserialize_steps(src, std::mem::take(&mut raw.steps), &mut soft);
    Ok((raw.with_steps(steps), soft))
}

/// Each step on its own, so a type error in one does not hide the others. Unknown keys
/// were reported from the index already; they are left out here.
fn deserialize_steps(
    src: &SourceFile,
    steps: IndexMap<String, serde_yaml::Value>,
    diags: &mut Vec<Diagnostic>,
) -> IndexMap<String, RawStep> {
    let mut out = IndexMap::new();
    for (name, mut value) in steps {
        if let Some(map) = value.as_mapping_mut() {
            map.retain(|k, _| k.as_str().is_some_and(|k| STEP_KEYS.contains(&k)));
        }
        match serde_path_to_error::deserialize::<_, RawStep>(value) {
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
                let message = crate::util::suggest::plain_type_names(&err.inner().to_string());
                let message = if sub == "." {
                    message
                } else {
                    format!("{sub}: {message}")
                };
                diags.push(src.diag(&path, format!("step `{name}`: {message}")));
            }
        }
    }
    out
}
