//! The `dataset` artifact: instruction examples from the `instruct` builders, filtered,
//! de-duplicated, split into train/test by digest and written in a format Hugging Face
//! `datasets.load_dataset("json", ...)` reads as is.
//!
//! Layout: a directory with `train.jsonl`, `test.jsonl` and `dataset_info.json`. Every
//! record carries `id`, `builder`, `category` and `source` next to the format's fields.
//! The prompt/response boundary is structural: the response is `output` (alpaca), the
//! last `assistant` turn (messages/chatml), the last `gpt` turn (sharegpt) or
//! `chosen`/`rejected` (preference); everything before it is prompt, so training masks
//! the loss there.

pub mod chat;
pub mod extracts;
pub mod generated;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::clean::minhash::NearDuplicates;

/// Artifact kind of a dataset directory.
pub const KIND: &str = "dataset";
/// Training split file.
pub const TRAIN_FILE: &str = "train.jsonl";
/// Test split file.
pub const TEST_FILE: &str = "test.jsonl";
/// Description file.
pub const INFO_FILE: &str = "dataset_info.json";
/// Drop examples kept per reason in the metadata.
pub const SAMPLES_PER_REASON: usize = 10;

/// How records are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// `instruction`, `input`, `output`.
    Alpaca,
    /// `messages`: a list of `{role, content}` (system/user/assistant), as TRL and the
    /// ChatML templates take it.
    Chatml,
    /// Same records as `chatml`.
    Messages,
    /// `conversations`: a list of `{from, value}` (system/human/gpt).
    Sharegpt,
    /// `prompt`, `chosen`, `rejected` (DPO/ORPO).
    Preference,
}

impl Format {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Alpaca => "alpaca",
            Format::Chatml => "chatml",
            Format::Messages => "messages",
            Format::Sharegpt => "sharegpt",
            Format::Preference => "preference",
        }
    }

    /// Column names and types (HF `datasets` feature notation) of a record.
    pub fn features(self) -> Value {
        let mut f = json!({
            "id": "string", "builder": "string", "category": "string", "source": "string",
        });
        let turn = |a: &str, b: &str| json!([{ a: "string", b: "string" }]);
        let extra = match self {
            Format::Alpaca => {
                json!({"instruction": "string", "input": "string", "output": "string"})
            }
            Format::Chatml | Format::Messages => json!({"messages": turn("role", "content")}),
            Format::Sharegpt => json!({"conversations": turn("from", "value")}),
            Format::Preference => {
                json!({"prompt": "string", "chosen": "string", "rejected": "string"})
            }
        };
        if let (Some(f), Value::Object(extra)) = (f.as_object_mut(), extra) {
            f.extend(extra);
        }
        f
    }
}

/// One example before it is written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Example {
    /// The builder that made it.
    pub builder: String,
    /// Category of the source document.
    pub category: String,
    /// Id of the source document, chunk or extract.
    pub source: String,
    /// The task (a question, "Rewrite this in the author's style.", ...).
    pub instruction: String,
    /// Material the task refers to (a plain rewrite, a rendered chat context); may be empty.
    pub input: String,
    /// The response the model learns (for preference data: the chosen one).
    pub output: String,
    /// The rejected response (preference data only).
    pub rejected: Option<String>,
    /// Why a judge preferred `output` over `rejected` (the `rank` step), kept in the
    /// record as `judge`.
    pub judge: Option<String>,
}

impl Example {
    /// Content id: blake3 over the texts, 32 hex digits. Decides the split.
    pub fn id(&self) -> String {
        let mut h = blake3::Hasher::new();
        for part in [&self.instruction, &self.input, &self.output] {
            h.update(part.as_bytes());
            h.update(&[0]);
        }
        if let Some(r) = &self.rejected {
            h.update(r.as_bytes());
        }
        h.finalize().to_hex()[..32].to_string()
    }

    /// What decontamination compares: the task and the response. An example's `input`
    /// (a chat window, a text to rewrite) legitimately recurs across neighbouring
    /// examples.
    pub fn decontamination_text(&self) -> String {
        format!("{}\n{}", self.instruction, self.output)
    }

    /// The example a record of `format` was rendered from (see [`Example::render`]);
    /// a preference record's prompt comes back as the instruction.
    pub fn from_record(format: Format, record: &Value) -> Example {
        let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
        let mut ex = Example {
            builder: text(&record["builder"]),
            category: text(&record["category"]),
            source: text(&record["source"]),
            instruction: String::new(),
            input: String::new(),
            output: String::new(),
            rejected: None,
            judge: record.get("judge").map(text),
        };
        let turns = |key: &str, role: &str, content: &str| -> Vec<(String, String)> {
            record[key]
                .as_array()
                .map(|turns| {
                    turns
                        .iter()
                        .map(|t| (text(&t[role]), text(&t[content])))
                        .collect()
                })
                .unwrap_or_default()
        };
        let from_turns = |ex: &mut Example, turns: Vec<(String, String)>| {
            for (role, content) in turns {
                match role.as_str() {
                    "system" => ex.instruction = content,
                    "user" | "human" if ex.instruction.is_empty() => ex.instruction = content,
                    "user" | "human" => ex.input = content,
                    _ => ex.output = content,
                }
            }
        };
        match format {
            Format::Alpaca => {
                ex.instruction = text(&record["instruction"]);
                ex.input = text(&record["input"]);
                ex.output = text(&record["output"]);
            }
            Format::Chatml | Format::Messages => {
                from_turns(&mut ex, turns("messages", "role", "content"))
            }
            Format::Sharegpt => from_turns(&mut ex, turns("conversations", "from", "value")),
            Format::Preference => {
                let reply = |v: &Value| match v {
                    Value::Array(turns) => turns
                        .last()
                        .map(|t| text(&t["content"]))
                        .unwrap_or_default(),
                    v => text(v),
                };
                match &record["prompt"] {
                    Value::Array(_) => from_turns(&mut ex, turns("prompt", "role", "content")),
                    prompt => ex.instruction = text(prompt),
                }
                ex.output = reply(&record["chosen"]);
                ex.rejected = Some(reply(&record["rejected"]));
            }
        }
        ex
    }

    /// The prompt as one text (instruction, then input).
    pub fn prompt(&self) -> String {
        if self.input.is_empty() {
            self.instruction.clone()
        } else {
            format!("{}\n\n{}", self.instruction, self.input)
        }
    }

    /// A preference record in TRL's conversational form: the prompt as the messages the
    /// `messages` format would write before the reply (a system instruction over a user
    /// input, as `chat_replies` makes), the replies as one assistant message each. Used
    /// when a preference dataset has inputs, so that preference tuning renders prompts
    /// the way SFT on the same examples did.
    pub fn render_conversational_preference(&self) -> Value {
        let mut record = self.render(Format::Preference);
        let prompt = if self.input.is_empty() {
            json!([{"role": "user", "content": self.instruction}])
        } else {
            json!([{"role": "system", "content": self.instruction}, {"role": "user", "content": self.input}])
        };
        let reply = |text: &str| json!([{"role": "assistant", "content": text}]);
        record["prompt"] = prompt;
        record["chosen"] = reply(&self.output);
        record["rejected"] = reply(self.rejected.as_deref().unwrap_or_default());
        record
    }

    /// The record in `format`.
    pub fn render(&self, format: Format) -> Value {
        let mut record = json!({
            "id": self.id(),
            "builder": self.builder,
            "category": self.category,
            "source": self.source,
        });
        // With an input the instruction plays the system role, else it is the user turn.
        let turns: Vec<(&str, &str)> = if self.input.is_empty() {
            vec![("user", &self.instruction), ("assistant", &self.output)]
        } else {
            vec![
                ("system", &self.instruction),
                ("user", &self.input),
                ("assistant", &self.output),
            ]
        };
        let fields = match format {
            Format::Alpaca => json!({
                "instruction": self.instruction, "input": self.input, "output": self.output,
            }),
            Format::Chatml | Format::Messages => json!({
                "messages": turns.iter()
                    .map(|(r, c)| json!({"role": r, "content": c}))
                    .collect::<Vec<_>>(),
            }),
            Format::Sharegpt => json!({
                "conversations": turns.iter()
                    .map(|(r, c)| {
                        let from = match *r { "user" => "human", "assistant" => "gpt", o => o };
                        json!({"from": from, "value": c})
                    })
                    .collect::<Vec<_>>(),
            }),
            Format::Preference => json!({
                "prompt": self.prompt(),
                "chosen": self.output,
                "rejected": self.rejected.clone().unwrap_or_default(),
            }),
        };
        if let (Some(r), Value::Object(fields)) = (record.as_object_mut(), fields) {
            r.extend(fields);
        }
        if let Some(judge) = &self.judge {
            record["judge"] = json!(judge);
        }
        record
    }
}

/// Train or test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Training split.
    Train,
    /// Held-out split.
    Test,
}

/// The split of an example id: the first 8 bytes of blake3(id) as a fraction of 2^64,
/// below `test_size` -> test. Adding data never moves an existing example.
pub fn split_of(id: &str, test_size: f64) -> Split {
    let h = blake3::hash(id.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.as_bytes()[..8]);
    let fraction = u64::from_le_bytes(b) as f64 / 2f64.powi(64);
    if fraction < test_size {
        Split::Test
    } else {
        Split::Train
    }
}

/// Splits of a whole dataset: [`split_of`] for each id, except that when `test_size > 0`
/// leaves the test split empty (tiny datasets), the id closest to the threshold goes to
/// test, so both splits load (HF `datasets` rejects an empty split file).
pub fn assign_splits(ids: &[String], test_size: f64) -> Vec<Split> {
    let mut splits: Vec<Split> = ids.iter().map(|id| split_of(id, test_size)).collect();
    if test_size > 0.0 && ids.len() >= 2 && !splits.contains(&Split::Test) {
        let fraction = |id: &str| {
            let h = blake3::hash(id.as_bytes());
            let mut b = [0u8; 8];
            b.copy_from_slice(&h.as_bytes()[..8]);
            u64::from_le_bytes(b)
        };
        if let Some(i) = (0..ids.len()).min_by_key(|&i| fraction(&ids[i])) {
            splits[i] = Split::Test;
        }
    }
    splits
}

/// Default share of the test split.
pub fn default_test_size() -> f64 {
    0.1
}

/// Decontamination of the train split: training examples that share a long word n-gram
/// with the test split or with a benchmark are dropped (GPT-3 and the Llama papers use
/// 13-grams), so scores on held-out data mean what they say.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Decontamination {
    /// Words per n-gram; 0 turns decontamination off.
    #[serde(default = "default_ngram")]
    pub ngram: usize,
    /// Benchmark files train examples must not overlap: JSON Lines (every string value
    /// is read) or plain text.
    #[serde(default)]
    pub benchmarks: Vec<std::path::PathBuf>,
}

fn default_ngram() -> usize {
    13
}

impl Default for Decontamination {
    fn default() -> Self {
        Self {
            ngram: default_ngram(),
            benchmarks: Vec::new(),
        }
    }
}

impl Decontamination {
    /// No decontamination.
    pub fn off() -> Self {
        Self {
            ngram: 0,
            benchmarks: Vec::new(),
        }
    }

    /// Problems with the settings: (parameter, message).
    pub fn problems(&self) -> Vec<(String, String)> {
        if self.ngram != 0 && !(5..=50).contains(&self.ngram) {
            return vec![(
                "ngram".into(),
                format!(
                    "ngram {} is outside 5..50 (0 turns decontamination off)",
                    self.ngram
                ),
            )];
        }
        Vec::new()
    }

    /// The benchmark files as content inputs (`benchmark0`, ...), so that editing one
    /// reruns the step.
    pub fn benchmark_inputs(&self, cwd: &Path) -> Vec<(String, PathBuf)> {
        self.benchmarks
            .iter()
            .enumerate()
            .map(|(i, path)| (format!("benchmark{i}"), cwd.join(path)))
            .collect()
    }

    /// The benchmark texts: each file's string values (JSON Lines) or its whole text.
    pub fn read_benchmarks(
        &self,
        resolve: impl Fn(&Path) -> PathBuf,
    ) -> Result<Vec<String>, String> {
        let mut texts = Vec::new();
        for path in &self.benchmarks {
            let path = resolve(path);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("benchmark {}: {e}", path.display()))?;
            let records: Option<Vec<Value>> = text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| serde_json::from_str(l).ok())
                .collect();
            match records {
                Some(records) if !records.is_empty() => {
                    for r in &records {
                        collect_strings(r, &mut texts);
                    }
                }
                _ => texts.push(text),
            }
        }
        Ok(texts)
    }
}

fn collect_strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|i| collect_strings(i, out)),
        Value::Object(map) => map.values().for_each(|i| collect_strings(i, out)),
        _ => {}
    }
}

/// Hashes of the word n-grams of `text`: words are runs of letters and digits, lowercased.
pub fn ngram_hashes(text: &str, n: usize) -> Vec<u64> {
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    if n == 0 || words.len() < n {
        return Vec::new();
    }
    words
        .windows(n)
        .map(|gram| xxhash_rust::xxh3::xxh3_64(gram.join(" ").as_bytes()))
        .collect()
}

/// Finds train examples that share a word n-gram with the test split or a benchmark, and
/// counts them.
pub struct Decontaminator {
    ngram: usize,
    test: std::collections::HashSet<u64>,
    benchmarks: std::collections::HashSet<u64>,
    found: Contaminated,
}

impl Decontaminator {
    /// Over the n-grams of `benchmarks` and of the `examples` that `splits` puts in test
    /// (see [`Example::decontamination_text`]); `ngram` 0 finds nothing.
    pub fn new(
        ngram: usize,
        benchmarks: &[String],
        examples: &[Example],
        splits: &[Split],
    ) -> Self {
        let (test, benchmarks) = if ngram > 0 {
            (
                examples
                    .iter()
                    .zip(splits)
                    .filter(|(_, s)| **s == Split::Test)
                    .flat_map(|(e, _)| ngram_hashes(&e.decontamination_text(), ngram))
                    .collect(),
                benchmarks
                    .iter()
                    .flat_map(|t| ngram_hashes(t, ngram))
                    .collect(),
            )
        } else {
            Default::default()
        };
        Self {
            ngram,
            test,
            benchmarks,
            found: Contaminated {
                ngram,
                ..Contaminated::default()
            },
        }
    }

    /// Whether train example `ex` must be left out (benchmarks first); counted, with its
    /// instruction kept as one of the samples.
    pub fn contaminated(&mut self, ex: &Example) -> bool {
        if self.ngram == 0 {
            return false;
        }
        let grams = ngram_hashes(&ex.decontamination_text(), self.ngram);
        let c = &mut self.found;
        if grams.iter().any(|g| self.benchmarks.contains(g)) {
            c.with_benchmarks += 1;
        } else if grams.iter().any(|g| self.test.contains(g)) {
            c.with_test += 1;
        } else {
            return false;
        }
        if c.samples.len() < 10 {
            c.samples.push(snippet(&ex.instruction, 120));
        }
        true
    }

    /// What was found.
    pub fn into_found(self) -> Contaminated {
        self.found
    }
}

/// What decontamination dropped from the train split.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Contaminated {
    /// Words per n-gram (0: off).
    pub ngram: usize,
    /// Train examples sharing an n-gram with the test split.
    pub with_test: usize,
    /// Train examples sharing one with a benchmark.
    pub with_benchmarks: usize,
    /// A few of them (their instruction, cut).
    pub samples: Vec<String>,
}

/// Filters common to all builders.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Filters {
    /// Fewest characters of the response.
    #[serde(default = "default_min_chars")]
    pub min_chars: usize,
    /// Most characters of the response.
    #[serde(default = "default_max_chars")]
    pub max_chars: usize,
    /// Drop examples containing any of these (case-insensitive), anywhere.
    #[serde(default)]
    pub exclude_keywords: Vec<String>,
    /// Drop examples whose prompt + response is this similar (Jaccard of word 5-shingles)
    /// to an earlier one (style pairs: the prompt alone, since each original recurs once
    /// per rewrite variant); 1.0 keeps near duplicates (exact ones always go).
    #[serde(default = "default_near_dup")]
    pub near_dup_threshold: f64,
}

/// Default of the filter field of the same name.
pub fn default_min_chars() -> usize {
    1
}
/// Default of the filter field of the same name.
pub fn default_max_chars() -> usize {
    20_000
}
/// Default of the filter field of the same name.
pub fn default_near_dup() -> f64 {
    0.9
}

impl Default for Filters {
    fn default() -> Self {
        serde_json::from_value(json!({})).expect("every field has a default")
    }
}

/// Drop reasons with counts and a few samples.
#[derive(Clone, Debug, Default)]
pub struct Drops {
    counts: BTreeMap<String, usize>,
    samples: BTreeMap<String, Vec<String>>,
}

impl Drops {
    /// Records one dropped item: `reason` and a short description of it.
    pub fn drop(&mut self, reason: impl Into<String>, what: impl Into<String>) {
        let reason = reason.into();
        *self.counts.entry(reason.clone()).or_default() += 1;
        let samples = self.samples.entry(reason).or_default();
        if samples.len() < SAMPLES_PER_REASON {
            let what: String = what.into();
            samples.push(snippet(&what, 160));
        }
    }

    /// Adds another set of drops.
    pub fn extend(&mut self, other: Drops) {
        for (reason, n) in other.counts {
            *self.counts.entry(reason).or_default() += n;
        }
        for (reason, s) in other.samples {
            let mine = self.samples.entry(reason).or_default();
            let room = SAMPLES_PER_REASON.saturating_sub(mine.len());
            mine.extend(s.into_iter().take(room));
        }
    }

    /// Total dropped.
    pub fn total(&self) -> usize {
        self.counts.values().sum()
    }

    /// Count per reason.
    pub fn counts(&self) -> &BTreeMap<String, usize> {
        &self.counts
    }

    /// `{reason: count}` and `{reason: [samples]}` as JSON.
    pub fn to_json(&self) -> (Value, Value) {
        (json!(self.counts), json!(self.samples))
    }
}

/// The first `max` characters of `text` on one line.
pub fn snippet(text: &str, max: usize) -> String {
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= max {
        one_line
    } else {
        let cut: String = one_line.chars().take(max).collect();
        format!("{cut}…")
    }
}

/// Applies the filters and duplicate removal, in order; returns what is kept.
pub fn filter(examples: Vec<Example>, filters: &Filters, drops: &mut Drops) -> Vec<Example> {
    let keywords: Vec<String> = filters
        .exclude_keywords
        .iter()
        .map(|k| k.to_lowercase())
        .filter(|k| !k.is_empty())
        .collect();
    let mut seen = HashSet::new();
    let mut near =
        (filters.near_dup_threshold < 1.0).then(|| NearDuplicates::new(filters.near_dup_threshold));
    let mut kept_ids: Vec<String> = Vec::new();
    let mut kept = Vec::with_capacity(examples.len());
    for ex in examples {
        let what = || {
            format!(
                "{} -> {}",
                snippet(&ex.prompt(), 60),
                snippet(&ex.output, 60)
            )
        };
        let out_chars = ex.output.trim().chars().count();
        if ex.instruction.trim().is_empty() {
            drops.drop("empty instruction", what());
            continue;
        }
        if out_chars == 0 {
            drops.drop("empty response", what());
            continue;
        }
        if ex.rejected.as_deref().is_some_and(|r| r.trim().is_empty()) {
            drops.drop("empty rejected response", what());
            continue;
        }
        if ex.rejected.as_deref() == Some(ex.output.as_str()) {
            drops.drop("chosen equals rejected", what());
            continue;
        }
        if ex.input.trim() == ex.output.trim() && !ex.input.is_empty() {
            drops.drop("response repeats the input", what());
            continue;
        }
        if out_chars < filters.min_chars {
            drops.drop("response shorter than min_chars", what());
            continue;
        }
        if out_chars > filters.max_chars {
            drops.drop("response longer than max_chars", what());
            continue;
        }
        if !keywords.is_empty() {
            let all = format!(
                "{}\n{}\n{}\n{}",
                ex.instruction,
                ex.input,
                ex.output,
                ex.rejected.as_deref().unwrap_or("")
            )
            .to_lowercase();
            if let Some(k) = keywords.iter().find(|k| all.contains(k.as_str())) {
                drops.drop(format!("contains excluded keyword `{k}`"), what());
                continue;
            }
        }
        let id = ex.id();
        if !seen.insert(id.clone()) {
            drops.drop("exact duplicate", what());
            continue;
        }
        if let Some(near) = near.as_mut() {
            // Style pairs repeat the original on purpose (one per rewrite variant): compare
            // their prompts only.
            let text = if ex.builder == "style_pairs" {
                ex.prompt()
            } else {
                format!("{}\n{}", ex.prompt(), ex.output)
            };
            if let Some((j, sim)) = near.check_and_insert(&text) {
                drops.drop(
                    "near duplicate",
                    format!("{} (Jaccard {sim:.3} with {})", what(), kept_ids[j]),
                );
                continue;
            }
            kept_ids.push(id);
        }
        kept.push(ex);
    }
    kept
}

/// What was written.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Written {
    /// Train examples.
    pub train: usize,
    /// Test examples.
    pub test: usize,
    /// Examples per builder, category and split: `builder/category/split` -> n.
    pub counts: BTreeMap<String, usize>,
    /// Train examples left out by decontamination.
    pub contaminated: Contaminated,
}

/// Writes `examples` into `dir` (created) as train/test JSONL plus `dataset_info.json`,
/// which gets `info` merged into it. With `decontaminate.0 > 0`, train examples whose
/// instruction and response share a word n-gram of that length with one of the
/// benchmark texts (`decontaminate.1`) or with a test example's are left out and
/// counted (benchmarks first).
pub fn write(
    dir: &Path,
    examples: &[Example],
    format: Format,
    test_size: f64,
    info: Value,
    decontaminate: (usize, &[String]),
) -> Result<Written, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut train = Vec::new();
    let mut test = Vec::new();
    let mut written = Written::default();
    let ids: Vec<String> = examples.iter().map(Example::id).collect();
    let splits = assign_splits(&ids, test_size);
    let (ngram, benchmarks) = decontaminate;
    let mut decontaminator = Decontaminator::new(ngram, benchmarks, examples, &splits);
    // Preference examples with an input keep their prompt's turns (see
    // `render_conversational_preference`); one shape per dataset, as `datasets` needs.
    let conversational =
        format == Format::Preference && examples.iter().any(|e| !e.input.is_empty());
    let render = |ex: &Example| {
        if conversational {
            ex.render_conversational_preference()
        } else {
            ex.render(format)
        }
    };
    for (ex, split) in examples.iter().zip(splits) {
        if split == Split::Train && decontaminator.contaminated(ex) {
            continue;
        }
        let name = match split {
            Split::Train => "train",
            Split::Test => "test",
        };
        *written
            .counts
            .entry(format!("{}/{}/{name}", ex.builder, ex.category))
            .or_default() += 1;
        match split {
            Split::Train => train.push(render(ex)),
            Split::Test => test.push(render(ex)),
        }
    }
    written.train = train.len();
    written.test = test.len();
    written.contaminated = decontaminator.into_found();
    crate::documents::write_jsonl(&dir.join(TRAIN_FILE), &train)
        .map_err(|e| format!("writing {TRAIN_FILE}: {e}"))?;
    crate::documents::write_jsonl(&dir.join(TEST_FILE), &test)
        .map_err(|e| format!("writing {TEST_FILE}: {e}"))?;
    let mut features = format.features();
    if conversational {
        let messages = json!([{"role": "string", "content": "string"}]);
        for key in ["prompt", "chosen", "rejected"] {
            features[key] = messages.clone();
        }
    }
    if examples.iter().any(|e| e.judge.is_some()) {
        features["judge"] = json!("string");
    }
    let mut description = json!({
        "format": format.as_str(),
        "features": features,
        "splits": {
            "train": {"num_examples": written.train, "file": TRAIN_FILE},
            "test": {"num_examples": written.test, "file": TEST_FILE},
        },
        "test_size": test_size,
        "split_rule": "blake3(id)[0..8] as a fraction of 2^64 < test_size -> test (if that leaves test empty, the smallest fraction goes to test)",
        "response_field": match format {
            Format::Alpaca => "output",
            Format::Chatml | Format::Messages => "messages[-1] (assistant)",
            Format::Sharegpt => "conversations[-1] (gpt)",
            Format::Preference => "chosen / rejected",
        },
        "counts": written.counts,
        "decontamination": written.contaminated,
        "load_with": format!(
            "datasets.load_dataset(\"json\", data_files={{\"train\": \"{TRAIN_FILE}\", \"test\": \"{TEST_FILE}\"}})"
        ),
    });
    if let (Some(d), Value::Object(extra)) = (description.as_object_mut(), info) {
        d.extend(extra);
    }
    let text = serde_json::to_string_pretty(&description).map_err(|e| e.to_string())?;
    std::fs::write(dir.join(INFO_FILE), text + "\n")
        .map_err(|e| format!("writing {INFO_FILE}: {e}"))?;
    Ok(written)
}

/// Reads every example record of a dataset directory (train then test) with its format.
pub fn read_records(dir: &Path) -> Result<(Format, Vec<Value>, Vec<Value>), String> {
    let info: Value = std::fs::read(dir.join(INFO_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| format!("{} has no readable {INFO_FILE}", dir.display()))?;
    let format: Format = serde_json::from_value(info["format"].clone())
        .map_err(|e| format!("{INFO_FILE}: format: {e}"))?;
    let train = crate::documents::read_jsonl(&dir.join(TRAIN_FILE))?;
    let test = crate::documents::read_jsonl(&dir.join(TEST_FILE))?;
    Ok((format, train, test))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(instruction: &str, output: &str) -> Example {
        Example {
            builder: "qa".into(),
            category: "qa".into(),
            source: "doc".into(),
            instruction: instruction.into(),
            input: String::new(),
            output: output.into(),
            rejected: None,
            judge: None,
        }
    }

    #[test]
    fn split_is_stable_and_close_to_test_size() {
        let ids: Vec<String> = (0..10_000).map(|i| format!("example {i}")).collect();
        let test = ids
            .iter()
            .filter(|id| split_of(id, 0.1) == Split::Test)
            .count();
        assert!((900..1100).contains(&test), "{test} of 10000 in test");
        // Raising test_size only moves examples from train to test.
        for id in &ids {
            if split_of(id, 0.1) == Split::Test {
                assert_eq!(split_of(id, 0.2), Split::Test);
            }
        }
        assert!(ids.iter().all(|id| split_of(id, 0.0) == Split::Train));
        // A tiny dataset still gets one test example; test_size 0 gets none.
        let few: Vec<String> = ids[..3].to_vec();
        let splits = assign_splits(&few, 0.01);
        assert_eq!(splits.iter().filter(|s| **s == Split::Test).count(), 1);
        assert!(assign_splits(&few, 0.0).iter().all(|s| *s == Split::Train));
    }

    const LONG: &str = "Sourdough needs a lively starter, patience and a warm kitchen to rise well overnight. Feed the starter twice a day with rye flour and water until it doubles within six hours. Mix the dough in the evening, fold it every half hour for two hours, shape it before bed and let it proof in the fridge until morning. Bake it in a hot covered pot for forty minutes.";
    #[test]
    fn filters_drop_with_reasons_in_order() {
        let long_answer = LONG;
        let examples = vec![
            ex("How do I bake?", long_answer),
            ex("How do I bake?", long_answer),
            ex("How do I bake?", &format!("{long_answer} Enjoy!")),
            ex("", "orphan answer"),
            ex("Short?", "No."),
            ex("Secret?", "The password is hunter2, obviously."),
            ex("Question with nothing", "   "),
        ];
        let filters = Filters {
            min_chars: 5,
            exclude_keywords: vec!["PASSWORD".into()],
            ..Filters::default()
        };
        let mut drops = Drops::default();
        let kept = filter(examples, &filters, &mut drops);
        let counts = drops.counts();
        assert_eq!(kept.len(), 1, "{counts:?}");
        assert_eq!(counts["exact duplicate"], 1);
        assert_eq!(counts["near duplicate"], 1, "{counts:?}");
        assert_eq!(counts["empty instruction"], 1);
        assert_eq!(counts["response shorter than min_chars"], 1);
        assert_eq!(counts["contains excluded keyword `password`"], 1);
        assert_eq!(counts["empty response"], 1);
    }

    #[test]
    fn formats_put_the_response_last() {
        let mut e = ex("Rewrite this in the author's style.", "Original prose.");
        e.input = "plain notes".into();
        let m = e.render(Format::Messages);
        assert_eq!(m["messages"][0]["role"], "system");
        assert_eq!(
            m["messages"][2],
            json!({"role": "assistant", "content": "Original prose."})
        );
        let s = e.render(Format::Sharegpt);
        assert_eq!(s["conversations"][1]["from"], "human");
        assert_eq!(s["conversations"][2]["from"], "gpt");
        let a = e.render(Format::Alpaca);
        assert_eq!(a["input"], "plain notes");
        assert_eq!(a["id"], e.id());
        e.rejected = Some("Bland prose.".into());
        let p = e.render(Format::Preference);
        assert_eq!(
            p["prompt"],
            "Rewrite this in the author's style.\n\nplain notes"
        );
        assert_eq!(p["rejected"], "Bland prose.");
        // Conversational: the prompt's turns as the messages format writes them, and
        // Conversation (what training reads) sees the same system + user turns.
        let c = e.render_conversational_preference();
        assert_eq!(c["prompt"], json!(m["messages"].as_array().unwrap()[..2]));
        assert_eq!(
            c["rejected"],
            json!([{"role": "assistant", "content": "Bland prose."}])
        );
        for f in [
            Format::Alpaca,
            Format::Messages,
            Format::Sharegpt,
            Format::Preference,
        ] {
            let record = e.render(f);
            let keys: Vec<&String> = record.as_object().unwrap().keys().collect();
            let features = f.features();
            let features: Vec<&String> = features.as_object().unwrap().keys().collect();
            assert_eq!(keys, features, "{f:?}");
        }
    }
}
