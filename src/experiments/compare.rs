//! Runs and sweep variants side by side: one row per run, or per variant when a run has
//! foreach/matrix steps (`train[rank=8,lr=1e-4]` and every step with the same item), with
//! the params that differ between rows, final and best metrics read from the artifacts'
//! metadata, duration and status. `cairn runs compare`, `cairn artifacts compare` and the
//! web UI's compare view all build this [`Table`].

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;
use serde_json::Value;

use crate::store::{
    ArtifactRecord, ObjectDigest, RunRecord, StepRecord, StepStatus, Store, StoreError,
};

/// Columns shown when none are asked for, in this order, when some row has them.
pub const DEFAULT_METRICS: &[&str] = &[
    "train_loss",
    "eval_loss",
    "best_eval_loss",
    "perplexity",
    "rouge_l_f1",
    "judge_accuracy",
    "judge_style",
    "rewards/accuracies",
    "rewards/margins",
    "tokens_per_second",
];

/// Series of a training curve the UI overlays.
pub const CURVE_SERIES: &[&str] = &[
    "loss",
    "eval_loss",
    "lr",
    "rewards/margins",
    "rewards/accuracies",
];

/// Training curves by series: (step, value) points.
pub type Curves = BTreeMap<String, Vec<(f64, f64)>>;

/// One compared row.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Run id.
    pub run: String,
    /// The variant's item (`rank=8,lr=1e-4`), when the row is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// The steps the row covers (a variant's, or all of a run's).
    pub steps: Vec<String>,
    /// ran | cached | failed | skipped (a variant), or the run's status.
    pub status: String,
    /// Wall time: the run's, or the sum of the variant's steps.
    pub duration_ms: u64,
    /// Params and item values (all of them; [`Table::params`] names those that differ).
    pub params: BTreeMap<String, Value>,
    /// Metric name -> value.
    pub metrics: BTreeMap<String, f64>,
    /// Training curves by series: (step, value).
    #[serde(skip)]
    pub curves: Curves,
    /// The row's output digests (rows with the same outputs are the same result).
    #[serde(skip)]
    pub outputs: BTreeSet<ObjectDigest>,
}

/// Rows plus the columns worth showing.
#[derive(Clone, Debug, Serialize)]
pub struct Table {
    /// Params whose values differ between rows.
    pub params: Vec<String>,
    /// Metric columns.
    pub metrics: Vec<String>,
    /// The rows.
    pub rows: Vec<Row>,
}

/// Rows for `runs` (newest first is the usual order); a variant reused unchanged by a
/// later run appears once, under the newest run that has it.
pub fn runs(store: &Store, runs: &[RunRecord], wanted: &[String]) -> Result<Table, StoreError> {
    let mut metadata = MetadataCache::default();
    let mut rows = Vec::new();
    let mut seen = HashMap::new();
    for run in runs {
        let steps = store.db().run_steps(&run.id)?;
        let mut pipeline_params = BTreeMap::new();
        for step in &steps {
            pipeline_params.extend(step.param_refs.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        // In the run's step order: a sweep reads in the order it was written.
        let mut variants: Vec<(&str, Vec<&StepRecord>)> = Vec::new();
        for step in &steps {
            if let Some(label) = variant_label(&step.step) {
                match variants.iter_mut().find(|(l, _)| *l == label) {
                    Some((_, members)) => members.push(step),
                    None => variants.push((label, vec![step])),
                }
            }
        }
        if variants.is_empty() {
            let mut row = Row {
                run: run.id.clone(),
                variant: None,
                steps: steps.iter().map(|s| s.step.clone()).collect(),
                status: run.status.to_string(),
                duration_ms: run_duration_ms(run),
                params: pipeline_params,
                metrics: BTreeMap::new(),
                curves: BTreeMap::new(),
                outputs: BTreeSet::new(),
            };
            fill(
                &mut row,
                &steps.iter().collect::<Vec<_>>(),
                store,
                &mut metadata,
            )?;
            rows.push(row);
            continue;
        }
        // Variants in item order (numbers numerically), not in the order they finished.
        variants.sort_by(|(a, _), (b, _)| {
            let (a, b) = (item_params(a), item_params(b));
            a.keys()
                .map(|k| compare_values(&a[k], b.get(k).unwrap_or(&Value::Null)))
                .find(|o| o.is_ne())
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        for (label, members) in variants {
            let mut params = pipeline_params.clone();
            params.extend(item_params(label));
            let mut row = Row {
                run: run.id.clone(),
                variant: Some(label.to_string()),
                steps: members.iter().map(|s| s.step.clone()).collect(),
                status: variant_status(&members).to_string(),
                duration_ms: 0,
                params,
                metrics: BTreeMap::new(),
                curves: BTreeMap::new(),
                outputs: BTreeSet::new(),
            };
            fill(&mut row, &members, store, &mut metadata)?;
            let identity = (row.steps.clone(), row.outputs.clone());
            if row.outputs.is_empty() || seen.insert(identity, rows.len()).is_none() {
                rows.push(row);
            }
        }
    }
    Ok(table(rows, wanted))
}

/// Rows for artifacts (a model or report each).
pub fn artifacts(artifacts: &[ArtifactRecord], wanted: &[String]) -> Table {
    let rows = artifacts
        .iter()
        .map(|a| {
            let (metrics, curves) = metrics_of(&a.metadata);
            let mut params = BTreeMap::new();
            params.insert("step".to_string(), Value::String(a.producer_step.clone()));
            params.extend(
                variant_label(&a.producer_step)
                    .map(item_params)
                    .into_iter()
                    .flatten(),
            );
            Row {
                run: a.producer_run.clone(),
                variant: Some(a.digest.short()),
                steps: vec![a.producer_step.clone()],
                status: a.kind.clone(),
                duration_ms: 0,
                params,
                metrics,
                curves,
                outputs: BTreeSet::from([a.digest]),
            }
        })
        .collect();
    table(rows, wanted)
}

/// Sorts rows by a metric or param (missing values last).
pub fn sort(table: &mut Table, by: &str, descending: bool) {
    table.rows.sort_by(|a, b| {
        let key = |r: &Row| -> Option<Value> {
            r.metrics
                .get(by)
                .map(|v| Value::from(*v))
                .or_else(|| r.params.get(by).cloned())
        };
        let ordering = match (key(a), key(b)) {
            (Some(x), Some(y)) => compare_values(&x, &y),
            (Some(_), None) => return std::cmp::Ordering::Less,
            (None, Some(_)) => return std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        };
        if descending {
            ordering.reverse()
        } else {
            ordering
        }
    });
}

fn compare_values(a: &Value, b: &Value) -> std::cmp::Ordering {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x.partial_cmp(&y).unwrap_or(std::cmp::Ordering::Equal),
        _ => crate::util::template::value_text(a).cmp(&crate::util::template::value_text(b)),
    }
}

/// The item between the brackets of a variant's step name.
pub fn variant_label(step: &str) -> Option<&str> {
    crate::util::variant::split(step).map(|(_, label)| label)
}

/// `rank=8,lr=1e-4` -> {rank: 8, lr: 0.0001}; a foreach item `blog` -> {item: "blog"}.
fn item_params(label: &str) -> BTreeMap<String, Value> {
    let typed = |text: &str| -> Value {
        serde_json::from_str::<Value>(text)
            .ok()
            .filter(|v| v.is_number() || v.is_boolean())
            .unwrap_or_else(|| Value::String(text.to_string()))
    };
    if !label.contains('=') {
        return BTreeMap::from([("item".to_string(), typed(label))]);
    }
    label
        .split(',')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_string(), typed(v)))
        .collect()
}

fn variant_status(steps: &[&StepRecord]) -> &'static str {
    let any = |s: StepStatus| steps.iter().any(|r| r.status == s);
    if any(StepStatus::Failed) {
        "failed"
    } else if any(StepStatus::Ran) {
        "ran"
    } else if any(StepStatus::Cached) {
        "cached"
    } else {
        "skipped"
    }
}

fn run_duration_ms(run: &RunRecord) -> u64 {
    use time::format_description::well_known::Rfc3339;
    let parse = |t: &str| time::OffsetDateTime::parse(t, &Rfc3339).ok();
    match (
        parse(&run.started_at),
        run.finished_at.as_deref().and_then(parse),
    ) {
        (Some(start), Some(end)) => (end - start).whole_milliseconds().max(0) as u64,
        _ => 0,
    }
}

/// Artifact records by digest, read once per compare, and the durations of the
/// executions that produced them.
#[derive(Default)]
struct MetadataCache {
    artifacts: HashMap<ObjectDigest, Option<ArtifactRecord>>,
    durations: HashMap<(String, String), u64>,
}

/// Adds the metrics and curves of `steps`' outputs to `row`, and their durations: a
/// cached step counts the execution that produced its outputs, so a variant reused from
/// an earlier run still shows what it cost.
fn fill(
    row: &mut Row,
    steps: &[&StepRecord],
    store: &Store,
    cache: &mut MetadataCache,
) -> Result<(), StoreError> {
    for step in steps {
        let mut duration = step.duration_ms;
        for output in step.outputs.values() {
            row.outputs.insert(output.digest);
            if let std::collections::hash_map::Entry::Vacant(slot) =
                cache.artifacts.entry(output.digest)
            {
                slot.insert(store.db().find_artifact(&output.digest.to_hex())?);
            }
            let Some(artifact) = cache.artifacts.get(&output.digest).and_then(Option::as_ref)
            else {
                continue;
            };
            if step.status == StepStatus::Cached && artifact.producer_run != step.run_id {
                let key = (
                    artifact.producer_run.clone(),
                    artifact.producer_step.clone(),
                );
                if !cache.durations.contains_key(&key) {
                    let produced = store.db().step_record(&key.0, &key.1)?;
                    cache
                        .durations
                        .insert(key.clone(), produced.map_or(0, |r| r.duration_ms));
                }
                duration = duration.max(cache.durations[&key]);
            }
            // Steps come in run order, upstream first: a training step's `loss` or
            // `tokens_per_second` is not overwritten by an evaluation's.
            let (metrics, curves) = metrics_of(&artifact.metadata);
            for (name, value) in metrics {
                row.metrics.entry(name).or_insert(value);
            }
            for (series, points) in curves {
                row.curves.entry(series).or_insert(points);
            }
        }
        if row.variant.is_some() {
            row.duration_ms += duration;
        }
    }
    Ok(())
}

/// Numbers in an artifact's metadata, flattened with dots (an evaluation's
/// `models.model.perplexity` becomes `perplexity`, its baseline's `baseline.perplexity`;
/// its copy of the training summary is left to the model), plus, from a training
/// `curve`, each series' last value (when the metadata has no such number) and its best
/// (`best_X`: the lowest for losses and perplexity, else the highest).
pub fn metrics_of(metadata: &Value) -> (BTreeMap<String, f64>, Curves) {
    let mut metrics = BTreeMap::new();
    let mut curves = Curves::new();
    let Some(map) = metadata.as_object() else {
        return (metrics, curves);
    };
    for (key, value) in map {
        match key.as_str() {
            "curve" | "training" => {}
            "models" => {
                for (model, values) in value.as_object().into_iter().flatten() {
                    let prefix = if model == "model" { "" } else { model.as_str() };
                    flatten(values, prefix, &mut metrics);
                }
            }
            _ => flatten(value, key, &mut metrics),
        }
    }
    for point in map
        .get("curve")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(step) = point.get("step").and_then(Value::as_f64) else {
            continue;
        };
        let mut values = BTreeMap::new();
        for (key, value) in point.as_object().into_iter().flatten() {
            if key != "step" {
                // Nested series (`preference: {rewards/margins: ..}`) by their own names;
                // evaluation's are kept apart.
                match (key.as_str(), value) {
                    ("preference", Value::Object(inner)) => flatten_into(inner, "", &mut values),
                    ("eval_preference", Value::Object(inner)) => {
                        flatten_into(inner, "eval_", &mut values)
                    }
                    _ => flatten(value, key, &mut values),
                }
            }
        }
        for (series, v) in values {
            curves.entry(series).or_default().push((step, v));
        }
    }
    for (series, points) in &curves {
        let Some(&(_, last)) = points.last() else {
            continue;
        };
        metrics.entry(series.clone()).or_insert(last);
        let lower_is_better = series.contains("loss") || series.contains("perplexity");
        let best = points
            .iter()
            .map(|&(_, v)| v)
            .fold(None, |best: Option<f64>, v| {
                Some(match best {
                    None => v,
                    Some(b) if lower_is_better => b.min(v),
                    Some(b) => b.max(v),
                })
            });
        if let Some(best) = best {
            metrics.entry(format!("best_{series}")).or_insert(best);
        }
    }
    (metrics, curves)
}

fn flatten(value: &Value, key: &str, out: &mut BTreeMap<String, f64>) {
    match value {
        Value::Number(n) => {
            if let Some(f) = n.as_f64().filter(|f| f.is_finite()) {
                out.insert(key.to_string(), f);
            }
        }
        Value::Object(map) => {
            let prefix = if key.is_empty() {
                String::new()
            } else {
                format!("{key}.")
            };
            flatten_into(map, &prefix, out)
        }
        _ => {}
    }
}

fn flatten_into(
    map: &serde_json::Map<String, Value>,
    prefix: &str,
    out: &mut BTreeMap<String, f64>,
) {
    for (k, v) in map {
        flatten(v, &format!("{prefix}{k}"), out);
    }
}

/// Whether metric `name` is what the user asked for with `wanted` (exact, a dotted
/// suffix, or the start of its last part: `rouge_l` finds `rouge_l_f1`).
fn matches(name: &str, wanted: &str) -> bool {
    name == wanted
        || name.ends_with(&format!(".{wanted}"))
        || name
            .rsplit('.')
            .next()
            .is_some_and(|last| last.starts_with(wanted))
}

fn table(rows: Vec<Row>, wanted: &[String]) -> Table {
    let present: BTreeSet<&String> = rows.iter().flat_map(|r| r.metrics.keys()).collect();
    let metrics: Vec<String> = if wanted.is_empty() {
        DEFAULT_METRICS
            .iter()
            .filter(|m| present.contains(&m.to_string()))
            .map(|m| m.to_string())
            .collect()
    } else {
        let mut columns = Vec::new();
        for w in wanted {
            for name in present.iter().filter(|n| matches(n, w)) {
                if !columns.contains(*name) {
                    columns.push((*name).clone());
                }
            }
        }
        columns
    };
    let names: BTreeSet<&String> = rows.iter().flat_map(|r| r.params.keys()).collect();
    let params = names
        .into_iter()
        .filter(|name| {
            let mut values = rows.iter().map(|r| r.params.get(*name));
            let first = values.next().flatten();
            values.any(|v| v != first)
        })
        .cloned()
        .collect();
    Table {
        params,
        metrics,
        rows,
    }
}

impl Table {
    /// The cells of every row as text, headers first: run, variant, params, metrics,
    /// duration, status.
    pub fn cells(&self) -> Vec<Vec<String>> {
        let mut out = Vec::with_capacity(self.rows.len() + 1);
        let mut header = vec!["run".to_string(), "variant".to_string()];
        header.extend(self.params.iter().cloned());
        header.extend(self.metrics.iter().cloned());
        header.extend(["duration_ms".to_string(), "status".to_string()]);
        out.push(header);
        for row in &self.rows {
            let mut cells = vec![row.run.clone(), row.variant.clone().unwrap_or_default()];
            cells.extend(self.params.iter().map(|p| {
                row.params
                    .get(p)
                    .map(crate::util::template::value_text)
                    .unwrap_or_default()
            }));
            cells.extend(self.metrics.iter().map(|m| {
                row.metrics
                    .get(m)
                    .map(|v| format_metric(*v))
                    .unwrap_or_default()
            }));
            cells.push(row.duration_ms.to_string());
            cells.push(row.status.clone());
            out.push(cells);
        }
        out
    }
}

/// Four significant digits, as people read metrics.
pub fn format_metric(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return v.to_string();
    }
    let magnitude = v.abs().log10().floor() as i32;
    let decimals = (3 - magnitude).clamp(0, 8) as usize;
    format!("{v:.decimals$}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn metrics_come_from_metadata_and_curves() {
        let (m, curves) = metrics_of(&json!({
            "train_loss": 1.5, "eval_loss": 1.7, "steps": 4, "method": "lora",
            "lora": {"r": 8},
            "curve": [
                {"step": 1, "loss": 2.0, "eval_loss": 1.9, "preference": {"rewards/margins": 0.1}},
                {"step": 2, "loss": 1.5, "eval_loss": 1.7, "preference": {"rewards/margins": 0.3}},
            ],
        }));
        assert_eq!(m["train_loss"], 1.5);
        assert_eq!(m["lora.r"], 8.0);
        assert_eq!(m["best_eval_loss"], 1.7);
        assert_eq!(m["best_rewards/margins"], 0.3);
        assert_eq!(m["rewards/margins"], 0.3);
        assert_eq!(curves["loss"], vec![(1.0, 2.0), (2.0, 1.5)]);
        let (report, _) = metrics_of(&json!({
            "models": {"model": {"perplexity": 9.0, "rouge_l_f1": 0.25}, "baseline": {"perplexity": 20.0}},
            "training": {"train_loss": 1.0},
        }));
        assert_eq!(report["perplexity"], 9.0);
        assert_eq!(report["baseline.perplexity"], 20.0);
        assert!(
            !report.contains_key("train_loss"),
            "the report's copy is left to the model"
        );
    }

    #[test]
    fn items_become_typed_params() {
        let p = item_params("rank=8,lr=1e-4,name=a");
        assert_eq!(p["rank"], json!(8));
        assert_eq!(p["lr"], json!(0.0001));
        assert_eq!(p["name"], json!("a"));
        assert_eq!(item_params("blog")["item"], json!("blog"));
        assert_eq!(variant_label("train[rank=8]"), Some("rank=8"));
        assert_eq!(variant_label("train"), None);
        assert!(matches("rouge_l_f1", "rouge_l"));
        assert!(matches("baseline.perplexity", "perplexity"));
        assert!(!matches("eval_loss", "loss"));
        assert_eq!(format_metric(0.012345), "0.01235");
        assert_eq!(format_metric(1234.4), "1234");
    }
}
