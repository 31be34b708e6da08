//! The expand stage, between params and resolve: `foreach` and `matrix` steps become one
//! step per item, named `step[item]` or `step[rank=8,lr=1e-4]` (stable: a name depends on
//! its item alone, so adding an item renames nothing and reruns nothing else), with
//! `${item}` / `${item.KEY}` substituted in `with:`, `inputs:` and `when:`;
//! `STEP[*].OUTPUT` inputs become one input per variant (`NAME[item]`); `when:`
//! conditions are evaluated, and reading a step that may be skipped is checked.

use std::collections::{HashMap, HashSet};

use indexmap::IndexMap;
use serde_json::Value;

use super::condition;
use super::raw::RawStep;
use super::resolve::{split_reference, Resolver};
use super::yaml_to_json;
use super::Variant;
use crate::util::suggest::did_you_mean;
use crate::util::template::{self, Escapes, Reference, ITEM};
use crate::util::variant;

/// Variants one step may expand to: a typo in a matrix should fail fast, not plan a
/// million steps.
pub const MAX_VARIANTS: usize = 10_000;

/// Longest item text that names a variant.
const MAX_LABEL: usize = 64;

/// A step after expansion.
pub(super) struct Expanded {
    /// The step with items substituted and collections spelled out.
    pub step: RawStep,
    /// The foreach/matrix item it stands for.
    pub variant: Option<Variant>,
    /// Why it does not run (its `when:` is false).
    pub skip: Option<String>,
}

/// One item of a foreach or matrix step.
struct Item {
    label: String,
    value: Value,
}

impl Resolver<'_> {
    /// Expands every step (see the module doc); problems are collected.
    pub(super) fn expand(
        &mut self,
        raw_steps: IndexMap<String, RawStep>,
        params: &IndexMap<String, Value>,
    ) -> IndexMap<String, Expanded> {
        let mut items_of: HashMap<String, (Vec<Item>, bool)> = HashMap::new();
        for (name, step) in &raw_steps {
            let base = format!("steps.{name}");
            let items = match (&step.foreach, &step.matrix) {
                (None, None) => continue,
                (Some(_), Some(_)) => {
                    self.error(
                        &format!("{base}.matrix"),
                        format!("step `{name}` has both `foreach` and `matrix`"),
                        Some("use `matrix` for combinations of several lists, `foreach` for one list".into()),
                    );
                    continue;
                }
                (Some(list), None) => self.foreach_items(&format!("{base}.foreach"), list, params),
                (None, Some(axes)) => self.matrix_items(&format!("{base}.matrix"), axes, params),
            };
            if let Some(items) = items {
                items_of.insert(name.clone(), (items, step.matrix.is_some()));
            }
        }
        let conditional: HashSet<String> = raw_steps
            .iter()
            .filter(|(_, s)| s.when.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        let mut out = IndexMap::new();
        for (name, step) in raw_steps {
            let base = format!("steps.{name}");
            match items_of.get(&name) {
                Some((items, matrix)) => {
                    for item in items {
                        let variant_name = variant::join(&name, &item.label);
                        self.variant_base.insert(variant_name.clone(), name.clone());
                        let mut variant = step.clone();
                        variant.foreach = None;
                        variant.matrix = None;
                        self.substitute_item(&base, &mut variant, Some(&item.value));
                        let skip = self.condition(&base, &variant, params, Some(&item.value));
                        self.expand_collections(&base, &mut variant, &items_of);
                        out.insert(
                            variant_name,
                            Expanded {
                                step: variant,
                                variant: Some(Variant {
                                    base: name.clone(),
                                    label: item.label.clone(),
                                    matrix: *matrix,
                                }),
                                skip,
                            },
                        );
                    }
                }
                None if step.foreach.is_some() || step.matrix.is_some() => {} // reported above
                None => {
                    let mut step = step;
                    self.substitute_item(&base, &mut step, None);
                    let skip = self.condition(&base, &step, params, None);
                    self.expand_collections(&base, &mut step, &items_of);
                    out.insert(
                        name,
                        Expanded {
                            step,
                            variant: None,
                            skip,
                        },
                    );
                }
            }
        }
        self.check_skipped_reads(&out, &conditional);
        out
    }

    /// A list written in place or held by a param.
    fn item_list(
        &mut self,
        path: &str,
        what: &str,
        value: &serde_yaml::Value,
        params: &IndexMap<String, Value>,
    ) -> Option<Vec<Value>> {
        let list = match value {
            serde_yaml::Value::String(s) => match template::sole_reference(s) {
                Some(r) if r.namespace == "params" => match params.get(&r.name) {
                    Some(Value::Array(items)) => items.clone(),
                    Some(other) => {
                        self.error(
                            path,
                            format!(
                                "{what} needs a list, but `${{params.{}}}` is {other}",
                                r.name
                            ),
                            Some(format!("for example: --set {}=[8,16]", r.name)),
                        );
                        return None;
                    }
                    None => {
                        self.undefined_param(path, &r.name, params);
                        return None;
                    }
                },
                _ => {
                    self.error(
                        path,
                        format!("{what} needs a list or `${{params.NAME}}` holding one, not `{s}`"),
                        None,
                    );
                    return None;
                }
            },
            serde_yaml::Value::Sequence(items) => {
                match items
                    .iter()
                    .map(yaml_to_json)
                    .collect::<Result<Vec<_>, _>>()
                {
                    Ok(items) => items,
                    Err(e) => {
                        self.error(path, format!("{what}: {e}"), None);
                        return None;
                    }
                }
            }
            _ => {
                self.error(
                    path,
                    format!("{what} needs a list or `${{params.NAME}}` holding one"),
                    Some("for example: `foreach: [a, b]` or `matrix: {rank: [8, 16]}`".into()),
                );
                return None;
            }
        };
        if list.is_empty() {
            self.error(
                path,
                format!("{what} is empty: the step would never run"),
                Some("give it at least one item, or remove the step".into()),
            );
            return None;
        }
        Some(list)
    }

    fn foreach_items(
        &mut self,
        path: &str,
        list: &serde_yaml::Value,
        params: &IndexMap<String, Value>,
    ) -> Option<Vec<Item>> {
        let values = self.item_list(path, "`foreach`", list, params)?;
        let mut items = Vec::with_capacity(values.len());
        for value in values {
            let label = match &value {
                Value::Object(map) => map
                    .iter()
                    .map(|(k, v)| scalar_label(v).map(|v| format!("{k}={v}")))
                    .collect::<Result<Vec<_>, _>>()
                    .map(|parts| parts.join(",")),
                other => scalar_label(other),
            };
            match label {
                Ok(label) => items.push(Item { label, value }),
                Err(e) => {
                    self.error(path, format!("foreach item {value}: {e}"), None);
                    return None;
                }
            }
        }
        self.unique(path, items)
    }

    fn matrix_items(
        &mut self,
        path: &str,
        axes: &IndexMap<String, serde_yaml::Value>,
        params: &IndexMap<String, Value>,
    ) -> Option<Vec<Item>> {
        if axes.is_empty() {
            self.error(
                path,
                "`matrix` is empty: the step would never run",
                Some("for example: `matrix: {rank: [8, 16], lr: [1e-4, 3e-4]}`".into()),
            );
            return None;
        }
        let mut combinations: Vec<Vec<(String, Value, String)>> = vec![Vec::new()];
        for (axis, list) in axes {
            let axis_path = format!("{path}.{axis}");
            if !super::resolve::valid_step_name(axis) {
                self.error(
                    &axis_path,
                    format!("matrix key `{axis}` must be letters, digits, `_` or `-`"),
                    None,
                );
                return None;
            }
            let values = self.item_list(&axis_path, &format!("matrix `{axis}`"), list, params)?;
            let mut labelled = Vec::with_capacity(values.len());
            let mut seen = HashSet::new();
            for value in values {
                match scalar_label(&value) {
                    Ok(label) if seen.insert(label.clone()) => labelled.push((value, label)),
                    Ok(label) => {
                        self.error(
                            &axis_path,
                            format!("matrix `{axis}` lists {label} twice"),
                            Some("each value gives one variant; remove the repeat".into()),
                        );
                        return None;
                    }
                    Err(e) => {
                        self.error(
                            &axis_path,
                            format!("matrix `{axis}` item {value}: {e}"),
                            None,
                        );
                        return None;
                    }
                }
            }
            if combinations.len().saturating_mul(labelled.len()) > MAX_VARIANTS {
                self.error(
                    path,
                    format!("the matrix has more than {MAX_VARIANTS} combinations"),
                    Some("split the sweep into several pipelines or runs".into()),
                );
                return None;
            }
            combinations = combinations
                .into_iter()
                .flat_map(|prefix| {
                    labelled.iter().map(move |(value, label)| {
                        let mut next = prefix.clone();
                        next.push((axis.clone(), value.clone(), label.clone()));
                        next
                    })
                })
                .collect();
        }
        let items = combinations
            .into_iter()
            .map(|combination| Item {
                label: combination
                    .iter()
                    .map(|(axis, _, label)| format!("{axis}={label}"))
                    .collect::<Vec<_>>()
                    .join(","),
                value: Value::Object(
                    combination
                        .into_iter()
                        .map(|(axis, value, _)| (axis, value))
                        .collect(),
                ),
            })
            .collect();
        self.unique(path, items)
    }

    fn unique(&mut self, path: &str, items: Vec<Item>) -> Option<Vec<Item>> {
        if items.len() > MAX_VARIANTS {
            self.error(
                path,
                format!("{} items are more than {MAX_VARIANTS}", items.len()),
                Some("split the sweep into several pipelines or runs".into()),
            );
            return None;
        }
        let mut seen = HashSet::new();
        for item in &items {
            if !seen.insert(item.label.as_str()) {
                self.error(
                    path,
                    format!("item `{}` is listed twice", item.label),
                    Some("each item gives one step; remove the repeat".into()),
                );
                return None;
            }
        }
        Some(items)
    }

    /// `${item}` and `${item.KEY}` in `with:`, `inputs:` and `when:`; an error outside
    /// a foreach or matrix step.
    fn substitute_item(&mut self, base: &str, step: &mut RawStep, item: Option<&Value>) {
        let mut problems = Vec::new();
        for (key, value) in step.with.iter_mut().flatten() {
            substitute_yaml(value, &format!("{base}.with.{key}"), item, &mut problems);
        }
        for (key, reference) in step.inputs.iter_mut().flatten() {
            let mut value = serde_yaml::Value::String(std::mem::take(reference));
            substitute_yaml(
                &mut value,
                &format!("{base}.inputs.{key}"),
                item,
                &mut problems,
            );
            *reference = match value {
                serde_yaml::Value::String(s) => s,
                other => template::value_text(&yaml_to_json(&other).unwrap_or_default()),
            };
        }
        if let Some(when) = step.when.as_mut() {
            substitute_yaml(when, &format!("{base}.when"), item, &mut problems);
        }
        for (path, message, help) in problems {
            self.error(&path, message, help);
        }
    }

    /// Evaluates `when:`; `Some(reason)` when the step is skipped.
    fn condition(
        &mut self,
        base: &str,
        step: &RawStep,
        params: &IndexMap<String, Value>,
        item: Option<&Value>,
    ) -> Option<String> {
        let when = step.when.as_ref()?;
        let path = format!("{base}.when");
        let (holds, text) = match when {
            serde_yaml::Value::Bool(b) => (Ok(*b), b.to_string()),
            serde_yaml::Value::String(text) => {
                let mut used = Vec::new();
                let holds = condition::evaluate(text, &mut |r: &Reference| {
                    let value = match r.namespace.as_str() {
                        "params" => params.get(&r.name).cloned().ok_or_else(|| {
                            let help = did_you_mean(&r.name, params.keys().map(|k| k.as_str()))
                                .map(|h| format!(" ({h})"))
                                .unwrap_or_default();
                            format!("undefined `${{params.{}}}`{help}", r.name)
                        })?,
                        ITEM => item_value(item, &r.name)?,
                        other => {
                            return Err(format!(
                                "`when:` can read params and items, not `${{{other}.{}}}`",
                                r.name
                            ))
                        }
                    };
                    used.push(format!("{}={}", r.name, template::value_text(&value)));
                    Ok(value)
                });
                let mut text = format!("`{text}`");
                if !used.is_empty() && item.is_none() {
                    text.push_str(&format!(" with {}", used.join(", ")));
                }
                (holds, text)
            }
            _ => (
                Err("`when:` takes true, false or a condition such as `${params.use_dpo}`".into()),
                String::new(),
            ),
        };
        match holds {
            Ok(true) => None,
            Ok(false) => Some(format!("condition false: {text}")),
            Err(message) => {
                self.error(&path, message, None);
                None
            }
        }
    }

    /// `NAME: STEP[*].OUTPUT` -> one input `NAME[item]` per variant of STEP.
    fn expand_collections(
        &mut self,
        base: &str,
        step: &mut RawStep,
        items_of: &HashMap<String, (Vec<Item>, bool)>,
    ) {
        let Some(inputs) = step.inputs.as_mut() else {
            return;
        };
        if !inputs.values().any(|r| r.contains("[*]")) {
            return;
        }
        let mut expanded = IndexMap::with_capacity(inputs.len());
        for (input, reference) in std::mem::take(inputs) {
            let Some(target) = split_reference(&reference)
                .and_then(|(step, output)| Some((step.strip_suffix("[*]")?, output)))
            else {
                expanded.insert(input, reference);
                continue;
            };
            let (producer, output) = target;
            match items_of.get(producer) {
                Some((items, _)) => {
                    for item in items {
                        expanded.insert(
                            variant::join(&input, &item.label),
                            format!("{}.{output}", variant::join(producer, &item.label)),
                        );
                    }
                }
                None => self.error(
                    &format!("{base}.inputs.{input}"),
                    format!("`{reference}` reads every variant of `{producer}`, which is not a foreach or matrix step"),
                    Some(format!("write `{producer}.{output}`")),
                ),
            }
        }
        *inputs = expanded;
    }

    /// A step whose producer has a `when:` must have one too (the file is wrong whatever
    /// the params), and one that runs cannot read a producer that is skipped.
    fn check_skipped_reads(
        &mut self,
        steps: &IndexMap<String, Expanded>,
        conditional: &HashSet<String>,
    ) {
        let mut problems = Vec::new();
        for (name, step) in steps {
            let own_base = step.variant.as_ref().map_or(name.as_str(), |v| &v.base);
            for (input, reference) in step.step.inputs.iter().flatten() {
                let Some((producer, _)) = split_reference(reference) else {
                    continue;
                };
                let Some(target) = steps.get(producer) else {
                    continue;
                };
                let producer_base = target.variant.as_ref().map_or(producer, |v| &v.base);
                let path = format!("steps.{name}.inputs.{input}");
                if conditional.contains(producer_base) && !conditional.contains(own_base) {
                    problems.push((
                        path,
                        format!("input `{input}` reads `{producer}`, which has a `when:` condition, but step `{own_base}` has none"),
                        Some(format!("give `{own_base}` the same `when:` as `{producer_base}`, so it is skipped with it")),
                    ));
                } else if let (Some(reason), None) = (&target.skip, &step.skip) {
                    problems.push((
                        path,
                        format!("input `{input}` reads `{producer}`, which is skipped ({reason}), but step `{name}` runs"),
                        Some(format!("make `{own_base}`'s `when:` false whenever `{producer_base}`'s is")),
                    ));
                }
            }
        }
        for (path, message, help) in problems {
            self.error(&path, message, help);
        }
    }
}

/// The value of `${item}` (`key` empty) or `${item.KEY}`.
fn item_value(item: Option<&Value>, key: &str) -> Result<Value, String> {
    let Some(item) = item else {
        return Err(format!(
            "`${{item{}}}` is only defined in a foreach or matrix step",
            if key.is_empty() {
                String::new()
            } else {
                format!(".{key}")
            }
        ));
    };
    if key.is_empty() {
        return Ok(item.clone());
    }
    match item {
        Value::Object(map) => map.get(key).cloned().ok_or_else(|| {
            let help = did_you_mean(key, map.keys().map(|k| k.as_str()))
                .map(|h| format!(" ({h})"))
                .unwrap_or_else(|| {
                    format!(
                        " (the item has {})",
                        map.keys().cloned().collect::<Vec<_>>().join(", ")
                    )
                });
            format!("`${{item.{key}}}`: the item has no `{key}`{help}")
        }),
        other => Err(format!(
            "`${{item.{key}}}`: the item {other} is not a map; write `${{item}}`"
        )),
    }
}

type Problem = (String, String, Option<String>);

/// Substitutes item references in every string of a YAML value (a whole-string
/// reference keeps the item's type).
fn substitute_yaml(
    value: &mut serde_yaml::Value,
    path: &str,
    item: Option<&Value>,
    problems: &mut Vec<Problem>,
) {
    match value {
        serde_yaml::Value::String(s) => {
            if !s.contains("${") {
                return;
            }
            if let Some(r) = template::sole_reference(s).filter(|r| r.namespace == ITEM) {
                match item_value(item, &r.name) {
                    Ok(v) => *value = serde_yaml::to_value(v).unwrap_or_default(),
                    Err(e) => problems.push((path.to_string(), e, None)),
                }
                return;
            }
            let result = template::substitute(s, Escapes::Keep, &mut |r: &Reference| {
                if r.namespace != ITEM {
                    return Ok(None);
                }
                // Numbers as variant names write them, so `train[lr=${item.lr}]`
                // names the variant `train[lr=1e-4]`.
                item_value(item, &r.name)
                    .map(|v| Some(shortest_number(&v).unwrap_or_else(|| template::value_text(&v))))
                    .map_err(template::TemplateError)
            });
            match result {
                Ok(text) => *s = text,
                // Malformed references are reported where params are substituted.
                Err(e) if e.0.contains("item") => problems.push((path.to_string(), e.0, None)),
                Err(_) => {}
            }
        }
        serde_yaml::Value::Sequence(items) => {
            for (i, v) in items.iter_mut().enumerate() {
                substitute_yaml(v, &format!("{path}.{i}"), item, problems);
            }
        }
        serde_yaml::Value::Mapping(map) => {
            for (k, v) in map.iter_mut() {
                let key = k.as_str().map(str::to_string).unwrap_or_default();
                substitute_yaml(v, &format!("{path}.{key}"), item, problems);
            }
        }
        _ => {}
    }
}

/// A number in its shortest form (`1e-4`, `0.5`, `16`); `None` for other values.
fn shortest_number(value: &Value) -> Option<String> {
    let Value::Number(n) = value else {
        return None;
    };
    Some(match n.as_f64() {
        Some(f) if !(n.is_i64() || n.is_u64()) => {
            let plain = format!("{f}");
            let scientific = format!("{f:e}");
            if scientific.len() < plain.len() {
                scientific
            } else {
                plain
            }
        }
        _ => n.to_string(),
    })
}

/// The text a scalar item contributes to a step name: numbers in their shortest form.
fn scalar_label(value: &Value) -> Result<String, String> {
    let text = match value {
        Value::Bool(b) => b.to_string(),
        Value::Number(_) => shortest_number(value).unwrap_or_default(),
        Value::String(s) => s.clone(),
        Value::Null => return Err("null cannot name a variant".into()),
        Value::Array(_) | Value::Object(_) => {
            return Err("lists and maps cannot name a variant; use scalar values".into())
        }
    };
    if text.is_empty()
        || text.len() > MAX_LABEL
        || text
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "[],=*${}".contains(c))
    {
        return Err(format!(
            "`{text}` cannot name a variant: item values are at most {MAX_LABEL} characters without spaces or any of [ ] , = * $ {{ }}"
        ));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn labels_are_short_and_stable() {
        assert_eq!(scalar_label(&json!(0.0001)).unwrap(), "1e-4");
        assert_eq!(scalar_label(&json!(0.0003)).unwrap(), "3e-4");
        assert_eq!(scalar_label(&json!(0.5)).unwrap(), "0.5");
        assert_eq!(scalar_label(&json!(16)).unwrap(), "16");
        assert_eq!(scalar_label(&json!("blog")).unwrap(), "blog");
        assert!(scalar_label(&json!("a b")).is_err());
        assert!(scalar_label(&json!([1])).is_err());
    }

    #[test]
    fn items_substitute_with_their_type() {
        let mut value: serde_yaml::Value =
            serde_yaml::from_str("{r: '${item.rank}', s: 'r${item.rank}', p: '${params.x}'}")
                .unwrap();
        let mut problems = Vec::new();
        substitute_yaml(&mut value, "with", Some(&json!({"rank": 8})), &mut problems);
        assert!(problems.is_empty());
        assert_eq!(value["r"], serde_yaml::Value::from(8));
        assert_eq!(value["s"], serde_yaml::Value::from("r8"));
        assert_eq!(value["p"], serde_yaml::Value::from("${params.x}"));
        substitute_yaml(&mut value, "with", None, &mut problems);
        assert!(problems.is_empty(), "nothing left to substitute");
        let mut stray: serde_yaml::Value = serde_yaml::from_str("'${item.rank}'").unwrap();
        substitute_yaml(&mut stray, "with.x", None, &mut problems);
        assert!(problems[0]
            .1
            .contains("only defined in a foreach or matrix step"));
    }
}
