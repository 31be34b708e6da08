//! `clean`: normalises, filters and deduplicates `documents` (see [`crate::clean`]); the
//! output's metadata counts every dropped document by reason and category.

use std::collections::BTreeMap;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;

use super::{InputDecl, Kind, ParamIssue, StepContext, StepError, StepOutputs};
use crate::clean::pii::{PiiAction, PiiKind, PiiRules};
use crate::clean::{self, CleanOptions, MaskMode};
use crate::documents;

/// The `clean` step kind.
pub struct CleanStep;

/// Parameters of `clean`.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CleanParams {
    /// URLs in text: `keep`, `mask` (`[URL]`) or `remove`.
    #[serde(default)]
    pub urls: MaskMode,
    /// E-mail addresses in text: `keep`, `mask` (`[EMAIL]`) or `remove`.
    #[serde(default)]
    pub emails: MaskMode,
    /// Extra boilerplate: lines matching any of these regular expressions are dropped.
    #[serde(default)]
    pub drop_patterns: Vec<String>,
    /// Drop documents shorter than this many characters after cleaning.
    #[serde(default = "default_min_chars")]
    pub min_chars: usize,
    /// Drop documents longer than this many characters (unset: no limit).
    #[serde(default)]
    pub max_chars: Option<usize>,
    /// Drop documents containing any of these words or phrases (case-insensitive).
    #[serde(default)]
    pub exclude_keywords: Vec<String>,
    /// Keep only documents in these languages (ISO 639-3 codes: `eng`, `deu`, `fra` ...);
    /// empty keeps all. Code repositories are never language-filtered.
    #[serde(default)]
    pub languages: Vec<String>,
    /// Jaccard similarity (word 5-shingles, MinHash + LSH) at or above which a document
    /// counts as a near duplicate of an earlier one and is dropped.
    #[serde(default = "default_threshold")]
    pub near_dup_threshold: f64,
    /// Turn near-duplicate removal off (exact duplicates are always removed).
    #[serde(default = "default_true")]
    pub near_dedup: bool,
    /// Personal data and secrets: one action for every kind (`keep`, `mask` or `drop`),
    /// or one per kind, e.g. `{email: mask, phone: mask, api_key: drop}` (kinds: email,
    /// phone, ip_address, credit_card, iban, api_key; unlisted ones are kept). `mask`
    /// writes `[EMAIL]`, `[PHONE]`, `[IP]`, `[CARD]`, `[IBAN]` or `[SECRET]`; `drop`
    /// drops the document (reason `pii`). Counts per kind go in the metadata
    /// (`clean.pii_found`). Repository files are left byte-exact.
    #[serde(default)]
    pub pii: PiiParam,
    /// Quality heuristics (Gopher, C4, FineWeb): `{preset: gopher}` for the published
    /// set, and/or single rules (`min_words`, `max_words`, `min_mean_word_length`,
    /// `max_mean_word_length`, `max_symbol_word_ratio`, `max_bullet_lines`,
    /// `max_ellipsis_lines`, `min_alpha_words`, `min_stop_words`, `min_punctuated_lines`,
    /// `max_short_lines`, `max_duplicate_lines`, `max_duplicate_line_chars`,
    /// `max_duplicate_paragraphs`, `max_duplicate_paragraph_chars`, `max_top_ngram_chars`,
    /// `max_duplicate_ngram_chars`). A document that breaks one is dropped with reason
    /// `quality.<rule>` and the measured value. Off unless given.
    #[serde(default)]
    pub quality: clean::quality::QualityRules,
    /// Categories the quality rules judge.
    #[serde(default = "default_quality_categories")]
    pub quality_categories: Vec<crate::documents::Category>,
    /// In chat exports, replace every speaker but the twin (`target_speaker` of the
    /// ingest) by a stable pseudonym (`Contact-xxxx`, the same for one name everywhere),
    /// in headers, mentions, titles and the structured messages.
    #[serde(default)]
    pub pseudonymize_speakers: bool,
}

fn default_quality_categories() -> Vec<crate::documents::Category> {
    CleanOptions::default().quality_categories
}

/// `pii`: one action, or one per kind.
#[derive(Clone, Debug, JsonSchema)]
#[serde(untagged)]
pub enum PiiParam {
    /// The same action for every kind.
    All(PiiAction),
    /// An action per kind.
    PerKind(BTreeMap<PiiKind, PiiAction>),
}

impl<'de> Deserialize<'de> for PiiParam {
    // By hand, for errors that say what is allowed (an untagged enum only says that
    // nothing matched).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        const ACTIONS: &str = "keep, mask or drop";
        const KINDS: &str = "email, phone, ip_address, credit_card, iban, api_key";
        let action = |v: &serde_json::Value| -> Result<PiiAction, D::Error> {
            serde_json::from_value(v.clone())
                .map_err(|_| D::Error::custom(format!("pii action {v} is not {ACTIONS}")))
        };
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::Object(map) => {
                let mut kinds = BTreeMap::new();
                for (name, value) in &map {
                    let kind: PiiKind = serde_json::from_value(json!(name)).map_err(|_| {
                        D::Error::custom(format!("unknown pii kind `{name}` (kinds: {KINDS})"))
                    })?;
                    kinds.insert(kind, action(value)?);
                }
                Ok(PiiParam::PerKind(kinds))
            }
            other => Ok(PiiParam::All(action(&other)?)),
        }
    }
}

impl Default for PiiParam {
    fn default() -> Self {
        PiiParam::All(PiiAction::Keep)
    }
}

fn default_min_chars() -> usize {
    CleanOptions::default().min_chars
}
fn default_threshold() -> f64 {
    0.85
}
fn default_true() -> bool {
    true
}

impl CleanParams {
    fn options(&self) -> Result<CleanOptions, ParamIssue> {
        let mut drop_patterns = Vec::new();
        for (i, p) in self.drop_patterns.iter().enumerate() {
            drop_patterns.push(regex::Regex::new(p).map_err(|e| {
                ParamIssue::new(
                    format!("with.drop_patterns.{i}"),
                    format!("invalid regular expression {p:?}: {e}"),
                )
            })?);
        }
        let mut languages = Vec::new();
        for (i, code) in self.languages.iter().enumerate() {
            let lang = whatlang::Lang::from_code(code.to_lowercase()).ok_or_else(|| {
                let mut issue = ParamIssue::new(
                    format!("with.languages.{i}"),
                    format!("unknown language code {code:?}"),
                );
                issue.help = Some("use ISO 639-3 codes, e.g. eng, deu, fra, spa, rus, cmn".into());
                issue
            })?;
            languages.push(lang);
        }
        if !(0.0..=1.0).contains(&self.near_dup_threshold) || self.near_dup_threshold == 0.0 {
            return Err(ParamIssue::new(
                "with.near_dup_threshold",
                format!(
                    "near_dup_threshold must be in (0, 1], got {}",
                    self.near_dup_threshold
                ),
            ));
        }
        if let Some(issue) = ParamIssue::under("with.quality", self.quality.problems())
            .into_iter()
            .next()
        {
            return Err(issue);
        }
        if let Some(max) = self.max_chars {
            if max < self.min_chars {
                return Err(ParamIssue::new(
                    "with.max_chars",
                    format!("max_chars {max} is below min_chars {}", self.min_chars),
                ));
            }
        }
        Ok(CleanOptions {
            urls: self.urls,
            emails: self.emails,
            drop_patterns,
            min_chars: self.min_chars,
            max_chars: self.max_chars,
            exclude_keywords: self.exclude_keywords.clone(),
            languages,
            near_dup_threshold: self.near_dedup.then_some(self.near_dup_threshold),
            pii: match &self.pii {
                PiiParam::All(action) => PiiRules::all(*action),
                PiiParam::PerKind(kinds) => PiiRules(kinds.clone()),
            },
            quality: self.quality.resolved(),
            quality_categories: self.quality_categories.clone(),
            pseudonymize_speakers: self.pseudonymize_speakers,
        })
    }
}

#[async_trait]
impl Kind for CleanStep {
    type Params = CleanParams;
    const OUTPUTS: &'static [(&'static str, &'static str)] = &[("documents", documents::KIND)];

    fn name(&self) -> &'static str {
        "clean"
    }

    fn version(&self) -> String {
        // 2: ASCII word boundaries in the URL, e-mail and boilerplate patterns.
        // 3: MinHash bands that find near-duplicates at the threshold (see band_layout).
        // 4: one-permutation MinHash signatures over word-hash shingles.
        "4".into()
    }

    fn summary(&self) -> &'static str {
        "Normalise, filter and deduplicate `documents` (NFKC, boilerplate, MinHash near-duplicates)"
    }

    fn inputs(&self) -> Option<Vec<InputDecl>> {
        Some(vec![InputDecl {
            name: "documents".into(),
            kind: documents::KIND.into(),
            required: true,
        }])
    }

    fn validate(&self, p: &CleanParams) -> Vec<ParamIssue> {
        p.options().err().into_iter().collect()
    }

    async fn run(&self, p: &CleanParams, ctx: &StepContext) -> Result<StepOutputs, StepError> {
        let opts = p.options().map_err(|i| StepError::Failed(i.message))?;
        let input = ctx.input_path("documents")?;
        let out = ctx.output_path("documents");
        ctx.progress.set_message("cleaning");
        let report = tokio::task::spawn_blocking(move || {
            let docs = documents::read_jsonl(&input)?;
            let (kept, report) = clean::clean_documents(docs, &opts);
            documents::write_jsonl(&out, &kept).map_err(|e| format!("writing documents: {e}"))?;
            Ok::<_, String>((report, documents::summary(&kept)))
        })
        .await
        .map_err(|e| StepError::Failed(format!("clean panicked: {e}")))?
        .map_err(StepError::Failed);
        let (report, summary) = report?;
        let dropped: BTreeMap<&str, usize> = report
            .dropped
            .iter()
            .map(|(reason, by_cat)| (reason.as_str(), by_cat.values().sum()))
            .collect();
        let note = format!(
            "kept {} of {} documents{}",
            report.kept,
            report.input,
            if dropped.is_empty() {
                String::new()
            } else {
                format!(
                    " (dropped: {})",
                    dropped
                        .iter()
                        .map(|(r, n)| format!("{n} {}", r.replace('_', " ")))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        );
        let meta = json!({
            "documents": summary["documents"],
            "by_category": summary["by_category"],
            "by_domain": summary["by_domain"],
            "characters": summary["characters"],
            "clean": report,
            "dropped_by_reason": dropped,
        });
        ctx.single_output("documents", meta, note)
    }
}
