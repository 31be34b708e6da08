//! `dataset_merge`: several `instruct` steps (one per builder) feeding one dataset. Takes
//! any number of `dataset` inputs of one format, drops records whose id was already seen
//! (the same example from two builders), re-splits by digest with one `test_size`, and
//! decontaminates the new train split against the new test split and benchmark files.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;

use super::{Kind, ParamIssue, StepContext, StepError, StepOutputs};
use crate::dataset::{self, Decontaminator, Example, Format, Split};

/// The `dataset_merge` step kind.
pub struct DatasetMergeStep;

/// Parameters of `dataset_merge`.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MergeParams {
    /// Share of examples in the test split of the merged dataset.
    #[serde(default = "dataset::default_test_size")]
    pub test_size: f64,
    /// Train examples sharing a word n-gram with the merged test split or with a
    /// benchmark file are dropped, as in `instruct` (re-splitting moves examples between
    /// splits, so each input's own decontamination no longer holds): `{ngram: 13,
    /// benchmarks: [evals/questions.jsonl]}`; `ngram: 0` turns it off.
    #[serde(default)]
    pub decontaminate: dataset::Decontamination,
}

#[async_trait]
impl Kind for DatasetMergeStep {
    type Params = MergeParams;
    const OUTPUTS: &'static [(&'static str, &'static str)] = &[("dataset", dataset::KIND)];

    fn name(&self) -> &'static str {
        "dataset_merge"
    }

    fn version(&self) -> String {
        "2".into()
    }

    fn summary(&self) -> &'static str {
        "Merge `dataset` inputs of one format (any input names) into one dataset, re-split by digest"
    }

    fn validate(&self, p: &MergeParams) -> Vec<ParamIssue> {
        let mut issues = ParamIssue::under("with.decontaminate", p.decontaminate.problems());
        if !(0.0..1.0).contains(&p.test_size) {
            issues.push(ParamIssue::new(
                "with.test_size",
                format!("test_size {} is outside 0 (inclusive) .. 1", p.test_size),
            ));
        }
        issues
    }

    fn content_inputs(
        &self,
        p: &MergeParams,
        cwd: &Path,
    ) -> Result<Vec<(String, PathBuf)>, String> {
        Ok(p.decontaminate.benchmark_inputs(cwd))
    }

    async fn run(&self, p: &MergeParams, ctx: &StepContext) -> Result<StepOutputs, StepError> {
        if ctx.inputs.is_empty() {
            return Err(StepError::Failed(
                "dataset_merge needs at least one dataset input".into(),
            ));
        }
        let mut format: Option<(Format, &str)> = None;
        let mut seen = HashSet::new();
        let mut records = Vec::new();
        let mut per_input = BTreeMap::new();
        let mut duplicates = 0usize;
        for (name, input) in &ctx.inputs {
            if input.kind != dataset::KIND {
                return Err(StepError::Failed(format!(
                    "input `{name}` is a `{}` artifact, not a dataset",
                    input.kind
                )));
            }
            let (f, a, b) = dataset::read_records(&input.path).map_err(StepError::Failed)?;
            match format {
                Some((first, first_name)) if first != f => {
                    return Err(StepError::Failed(format!(
                        "input `{name}` is in format `{}` but `{first_name}` is `{}`: give every instruct step the same `format`",
                        f.as_str(),
                        first.as_str()
                    )))
                }
                None => format = Some((f, name)),
                _ => {}
            }
            let mut n = 0;
            for record in a.into_iter().chain(b) {
                let id = record["id"].as_str().unwrap_or_default().to_string();
                if !seen.insert(id.clone()) {
                    duplicates += 1;
                    continue;
                }
                n += 1;
                records.push((id, record));
            }
            per_input.insert(
                name.clone(),
                json!({"digest": input.digest.to_string(), "examples": n}),
            );
        }
        let (format, _) = format.expect("at least one input");
        let ids: Vec<String> = records.iter().map(|(id, _)| id.clone()).collect();
        let splits = dataset::assign_splits(&ids, p.test_size);
        let examples: Vec<Example> = records
            .iter()
            .map(|(_, r)| Example::from_record(format, r))
            .collect();
        let benchmarks = p
            .decontaminate
            .read_benchmarks(|path| ctx.resolve_path(&path.to_string_lossy()))
            .map_err(StepError::Input)?;
        let mut decontaminator =
            Decontaminator::new(p.decontaminate.ngram, &benchmarks, &examples, &splits);
        let (mut train, mut test) = (Vec::new(), Vec::new());
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for (((_, record), split), example) in records.into_iter().zip(splits).zip(&examples) {
            if split == Split::Train && decontaminator.contaminated(example) {
                continue;
            }
            let key = format!(
                "{}/{}/{}",
                record["builder"].as_str().unwrap_or("?"),
                record["category"].as_str().unwrap_or("?"),
                if split == Split::Test {
                    "test"
                } else {
                    "train"
                }
            );
            *counts.entry(key).or_default() += 1;
            match split {
                Split::Train => train.push(record),
                Split::Test => test.push(record),
            }
        }
        let contaminated = decontaminator.into_found();
        let left_out = contaminated.with_test + contaminated.with_benchmarks;
        let out = ctx.output_path("dataset");
        std::fs::create_dir_all(&out).map_err(|e| StepError::Failed(e.to_string()))?;
        crate::documents::write_jsonl(&out.join(dataset::TRAIN_FILE), &train)
            .map_err(|e| StepError::Failed(e.to_string()))?;
        crate::documents::write_jsonl(&out.join(dataset::TEST_FILE), &test)
            .map_err(|e| StepError::Failed(e.to_string()))?;
        let info = json!({
            "format": format.as_str(),
            "features": format.features(),
            "splits": {
                "train": {"num_examples": train.len(), "file": dataset::TRAIN_FILE},
                "test": {"num_examples": test.len(), "file": dataset::TEST_FILE},
            },
            "test_size": p.test_size,
            "builder": "merge",
            "sources": per_input,
            "counts": counts,
            "duplicates_dropped": duplicates,
            "decontamination": contaminated,
        });
        std::fs::write(
            out.join(dataset::INFO_FILE),
            serde_json::to_string_pretty(&info).unwrap_or_default() + "\n",
        )
        .map_err(|e| StepError::Failed(e.to_string()))?;
        let note = format!(
            "{} examples ({} train / {} test) from {} datasets, {duplicates} duplicates dropped{}",
            train.len() + test.len(),
            train.len(),
            test.len(),
            per_input.len(),
            match left_out {
                0 => String::new(),
                n => format!(", {n} left out of train by decontamination"),
            }
        );
        let meta = json!({
            "builder": "merge",
            "format": format.as_str(),
            "count": train.len() + test.len(),
            "train": train.len(),
            "test": test.len(),
            "counts": counts,
            "sources": per_input,
            "dropped": {"exact duplicate": duplicates},
            "decontamination": contaminated,
        });
        ctx.single_output("dataset", meta, note)
    }
}
