//! Cleaning of `documents`: per-category text normalisation, boilerplate removal, quality
//! filters and exact + near-duplicate removal, with a count of every drop and its reason.

pub mod minhash;
pub mod pii;
pub mod pseudonym;
pub mod quality;

use std::collections::{BTreeMap, HashMap};
use std::sync::LazyLock;

use regex::{Regex, RegexSet};
use serde::{Deserialize, Serialize};
use unicode_normalization::UnicodeNormalization;

use crate::documents::{Category, Document};

/// What to do with URLs or e-mail addresses in text.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum MaskMode {
    /// Leave them as they are.
    #[default]
    Keep,
    /// Replace them with a placeholder (`[URL]`, `[EMAIL]`).
    Mask,
    /// Delete them.
    Remove,
}

/// Everything `clean` can be told.
#[derive(Clone, Debug)]
pub struct CleanOptions {
    /// URLs in text.
    pub urls: MaskMode,
    /// E-mail addresses in text.
    pub emails: MaskMode,
    /// Extra line patterns (regular expressions); a matching line is dropped.
    pub drop_patterns: Vec<Regex>,
    /// Documents shorter than this (characters, after cleaning) are dropped.
    pub min_chars: usize,
    /// Documents longer than this are dropped (`None`: no limit).
    pub max_chars: Option<usize>,
    /// Documents containing any of these (case-insensitive) are dropped.
    pub exclude_keywords: Vec<String>,
    /// Keep only these languages (ISO 639-3 codes such as `eng`); empty keeps all.
    pub languages: Vec<whatlang::Lang>,
    /// Jaccard similarity at or above which a document is a near duplicate of an earlier
    /// one; `None` turns near-duplicate detection off.
    pub near_dup_threshold: Option<f64>,
    /// Personal data and secrets: kept, masked or a reason to drop, per kind.
    pub pii: pii::PiiRules,
    /// Quality heuristics (resolved), applied to documents of `quality_categories`.
    pub quality: quality::QualityRules,
    /// Categories the quality rules judge (prose meant to be read whole: articles by
    /// default; chats and short posts would fail Gopher's word counts by nature).
    pub quality_categories: Vec<Category>,
    /// Replace the twin's correspondents' names in chats by stable pseudonyms.
    pub pseudonymize_speakers: bool,
}

impl Default for CleanOptions {
    fn default() -> Self {
        Self {
            urls: MaskMode::Keep,
            emails: MaskMode::Keep,
            drop_patterns: Vec::new(),
            min_chars: 20,
            max_chars: None,
            exclude_keywords: Vec::new(),
            languages: Vec::new(),
            near_dup_threshold: Some(0.85),
            pii: pii::PiiRules::default(),
            quality: quality::QualityRules::default(),
            quality_categories: vec![Category::Article],
            pseudonymize_speakers: false,
        }
    }
}

/// Why a document was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// Nothing left after cleaning.
    Empty,
    /// Shorter than `min_chars`.
    TooShort,
    /// Longer than `max_chars`.
    TooLong,
    /// Contains an excluded keyword.
    ExcludedKeyword,
    /// Not in one of the wanted languages.
    Language,
    /// Same cleaned text as an earlier document.
    ExactDuplicate,
    /// Near-duplicate of an earlier document.
    NearDuplicate,
    /// Holds personal data or a secret whose rule is `drop`.
    Pii,
    /// Breaks a quality rule (named: `quality.min_words`, ...).
    Quality(&'static str),
}

impl DropReason {
    /// The snake_case name used in metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Empty => "empty",
            DropReason::TooShort => "too_short",
            DropReason::TooLong => "too_long",
            DropReason::ExcludedKeyword => "excluded_keyword",
            DropReason::Language => "language",
            DropReason::ExactDuplicate => "exact_duplicate",
            DropReason::NearDuplicate => "near_duplicate",
            DropReason::Pii => "pii",
            DropReason::Quality(_) => "quality",
        }
    }

    /// The key dropped documents are counted under: the name, or `quality.<rule>`.
    pub fn key(self) -> String {
        match self {
            DropReason::Quality(rule) => format!("quality.{rule}"),
            other => other.as_str().to_string(),
        }
    }
}

/// One dropped document, for the artifact's metadata (a sample per reason).
#[derive(Clone, Debug, Serialize)]
pub struct Dropped {
    /// Its id.
    pub id: String,
    /// Its URL.
    pub url: String,
    /// Details (the keyword, the detected language, the id it duplicates ...).
    pub detail: String,
}

/// What cleaning did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CleanReport {
    /// Documents read.
    pub input: usize,
    /// Documents kept.
    pub kept: usize,
    /// Kept per category.
    pub kept_by_category: BTreeMap<String, usize>,
    /// Dropped per reason, then per category.
    pub dropped: BTreeMap<String, BTreeMap<String, usize>>,
    /// Up to [`SAMPLES_PER_REASON`] examples per reason.
    pub dropped_examples: BTreeMap<String, Vec<Dropped>>,
    /// Characters before and after cleaning (kept documents).
    pub chars_before: usize,
    /// See `chars_before`.
    pub chars_after: usize,
    /// Personal data and secrets found per kind (in every document read), when looked for.
    pub pii_found: BTreeMap<String, usize>,
    /// Chat speakers given a pseudonym (counted per chat), with `pseudonymize_speakers`.
    pub pseudonymized_speakers: usize,
}

/// Examples kept per drop reason.
pub const SAMPLES_PER_REASON: usize = 20;

impl CleanReport {
    fn drop(&mut self, doc: &Document, reason: DropReason, detail: String) {
        *self
            .dropped
            .entry(reason.key())
            .or_default()
            .entry(doc.category.as_str().to_string())
            .or_default() += 1;
        let samples = self.dropped_examples.entry(reason.key()).or_default();
        if samples.len() < SAMPLES_PER_REASON {
            samples.push(Dropped {
                id: doc.id.clone(),
                url: doc.url.clone(),
                detail,
            });
        }
    }

    /// Total dropped.
    pub fn dropped_total(&self) -> usize {
        self.dropped.values().flat_map(|m| m.values()).sum()
    }
}

/// `pattern` with ASCII word boundaries. A Unicode `\b` keeps the regex engine off its
/// lazy DFA as soon as a text holds a non-ASCII character (42% of `clean`'s time on the
/// python docs), and what these patterns bound (URLs, e-mail addresses, numbers, keys,
/// English boilerplate words) is ASCII.
fn ascii_words(pattern: &str) -> String {
    pattern.replace(r"\b", r"(?-u:\b)")
}

/// A regex over [`ascii_words`].
fn word_regex(pattern: &str) -> Regex {
    Regex::new(&ascii_words(pattern)).expect("valid regex")
}

static URL: LazyLock<Regex> =
    LazyLock::new(|| word_regex(r#"(?i)\b(?:https?://|www\.)[^\s<>"'\)\]]+"#));
static EMAIL: LazyLock<Regex> =
    LazyLock::new(|| word_regex(r"(?i)\b[a-z0-9._%+-]+@[a-z0-9.-]+\.[a-z]{2,}\b"));
static HTML_TAG: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?s)<!--.*?-->|</?[a-zA-Z][a-zA-Z0-9-]*(?:\s[^<>]*)?/?>").expect("valid regex")
});
static MD_IMAGE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"!\[([^\]]*)\]\([^)]*\)").expect("valid regex"));
static MD_LINK: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\[([^\]]+)\]\((?:[^)]*)\)").expect("valid regex"));
static MD_EMPHASIS: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(\*\*|__)(\S(?:.*?\S)?)(\*\*|__)").expect("valid regex"));
static ENTITY: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"&(?:#(\d{1,7})|#x([0-9a-fA-F]{1,6})|([a-zA-Z]{2,8}));").expect("valid regex")
});
static MD_HEADING: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?m)^[ \t]{0,3}#{1,6}[ \t]+").expect("valid regex"));
static SPACES: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"[ \t\u{a0}]{2,}").expect("valid regex"));

/// Lines that are page furniture, not writing (whole line, case-insensitive).
static BOILERPLATE: LazyLock<RegexSet> = LazyLock::new(|| {
    RegexSet::new([
        r"(?i)^(subscribe|sign up|sign in|log in|share|share this( post| article)?|follow( me| us)?|like|reply|comments?|read more|continue reading|back to top|skip to (main )?content|menu|print|tweet)[\s.!:]*$",
        r"(?i)^(subscribe|sign up) (to|for) (our|my|the) (newsletter|blog|updates)\b.*$",
        r"(?i)^.*\b(accept|allow|reject) (all )?cookies\b.*$",
        r"(?i)^(this|our) (web)?site uses cookies\b.*$",
        r"(?i)^press enter\b.*$",
        r"(?i)^\d[\d,.]*[km]? (likes?|claps?|comments?|shares?|views?|reactions?|retweets?)[\s.]*$",
        r"(?i)^(likes?|claps?|views?|shares?)[:\s]*\d[\d,.]*[km]?$",
        r"(?i)^\d+ min(ute)?s? read$",
        r"(?i)^(posted|published|updated) (on|at|by)\b.{0,60}$",
        r"^\[?\d{1,2}:\d{2}(:\d{2})?( ?[AaPp][Mm])?\]?$",
        r"^\d{4}-\d{2}-\d{2}([ T]\d{2}:\d{2}(:\d{2})?)?$",
        r"(?i)^(copyright|©|\(c\)) .{0,80}$",
        r"(?i)^all rights reserved\.?$",
    ]
    .map(ascii_words))
    .expect("valid regex set")
});

/// Cleans one document's text for its category. Repository files come back unchanged
/// apart from URL/e-mail handling being skipped too: code must stay byte-exact.
pub fn clean_text(category: Category, text: &str, opts: &CleanOptions) -> String {
    if category == Category::Repository {
        return text.strip_prefix('\u{feff}').unwrap_or(text).to_string();
    }
    // Most text is already NFKC (all of ASCII is): the quick check spares the
    // decompose-and-recompose pass, a seventh of `clean`'s time.
    let text: std::borrow::Cow<'_, str> = if unicode_normalization::is_nfkc_quick(text.chars())
        == unicode_normalization::IsNormalized::Yes
    {
        std::borrow::Cow::Borrowed(text)
    } else {
        std::borrow::Cow::Owned(text.nfkc().collect())
    };
    let text = text.replace("\r\n", "\n").replace('\r', "\n");
    let text: String = text
        .chars()
        .filter(|c| {
            !matches!(
                c,
                '\u{200b}' | '\u{200c}' | '\u{200d}' | '\u{2060}' | '\u{feff}' | '\u{ad}'
            )
        })
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                ' '
            } else {
                c
            }
        })
        .collect();
    let text = strip_markup(&text);
    let text = apply_mask(&text, &EMAIL, opts.emails, "[EMAIL]");
    let text = apply_mask(&text, &URL, opts.urls, "[URL]");
    let mut lines: Vec<String> = Vec::new();
    let mut blank_run = 0;
    for line in text.lines() {
        let line = SPACES.replace_all(line.trim(), " ").replace('\t', " ");
        if line.is_empty() {
            blank_run += 1;
            if blank_run == 1 && !lines.is_empty() {
                lines.push(String::new());
            }
            continue;
        }
        if BOILERPLATE.is_match(&line) || opts.drop_patterns.iter().any(|p| p.is_match(&line)) {
            continue;
        }
        blank_run = 0;
        lines.push(line);
    }
    while lines.last().is_some_and(String::is_empty) {
        lines.pop();
    }
    let joined = lines.join("\n");
    if matches!(category, Category::Chat | Category::Post) {
        // Short-form writing: line breaks are formatting, not structure.
        return joined
            .split("\n\n")
            .map(|p| p.split('\n').collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>()
            .join("\n\n");
    }
    joined
}

fn strip_markup(text: &str) -> String {
    let text = HTML_TAG.replace_all(text, " ");
    let text = MD_HEADING.replace_all(&text, "");
    let text = MD_IMAGE.replace_all(&text, "$1");
    let text = MD_LINK.replace_all(&text, "$1");
    let text = MD_EMPHASIS.replace_all(&text, "$2");
    ENTITY
        .replace_all(&text, |c: &regex::Captures| {
            let decoded = if let Some(d) = c.get(1) {
                d.as_str().parse::<u32>().ok().and_then(char::from_u32)
            } else if let Some(h) = c.get(2) {
                u32::from_str_radix(h.as_str(), 16)
                    .ok()
                    .and_then(char::from_u32)
            } else {
                match &c[3] {
                    "amp" => Some('&'),
                    "lt" => Some('<'),
                    "gt" => Some('>'),
                    "quot" => Some('"'),
                    "apos" => Some('\''),
                    "nbsp" => Some(' '),
                    "mdash" => Some('—'),
                    "ndash" => Some('–'),
                    "hellip" => Some('…'),
                    _ => None,
                }
            };
            decoded
                .map(String::from)
                .unwrap_or_else(|| c[0].to_string())
        })
        .into_owned()
}

fn apply_mask(text: &str, pattern: &Regex, mode: MaskMode, placeholder: &str) -> String {
    match mode {
        MaskMode::Keep => text.to_string(),
        MaskMode::Mask => pattern.replace_all(text, placeholder).into_owned(),
        MaskMode::Remove => pattern.replace_all(text, "").into_owned(),
    }
}

/// Cleans, filters and deduplicates documents (input order decides which copy of a
/// duplicate survives: the first).
pub fn clean_documents(docs: Vec<Document>, opts: &CleanOptions) -> (Vec<Document>, CleanReport) {
    use rayon::prelude::*;
    let mut report = CleanReport {
        input: docs.len(),
        ..CleanReport::default()
    };
    // Code stays byte-exact: repository files are not scrubbed (as URLs and e-mails).
    let quality_on = opts.quality.active();
    // The per-document work (cleaning, scrubbing, the quality rules) in parallel; the
    // order-dependent decisions (duplicates) after.
    type Verdict = Option<(&'static str, String)>;
    /// A document after the per-document work: its final text, what was found in it, and
    /// what the ordered phase compares (character count, digest, near-duplicate sketch).
    struct Cleaned {
        doc: Document,
        text: String,
        pii_found: BTreeMap<pii::PiiKind, usize>,
        pii_drop: Vec<pii::PiiKind>,
        verdict: Verdict,
        renamed: usize,
        chars: usize,
        original_chars: usize,
        digest: blake3::Hash,
        sketch: Option<minhash::Sketch>,
    }
    // Largest documents first, so that no thread is left with a big one at the end
    // while the other idles; the original order is restored after.
    let mut by_size: Vec<(usize, Document)> = docs.into_iter().enumerate().collect();
    by_size.sort_by_key(|(_, d)| std::cmp::Reverse(d.content.len()));
    let mut cleaned: Vec<(usize, Cleaned)> = by_size
        .into_par_iter()
        .map(|(at, mut d)| {
            let mut text = clean_text(d.category, &d.content, opts);
            let renamed = if opts.pseudonymize_speakers && d.category == Category::Chat {
                pseudonym::pseudonymize(&mut d, &mut text)
            } else {
                0
            };
            let scrubbed = if d.category == Category::Repository {
                pii::Scrubbed::default()
            } else {
                pii::scrub(&text, &opts.pii)
            };
            let verdict = if quality_on && opts.quality_categories.contains(&d.category) {
                opts.quality.check(&text)
            } else {
                None
            };
            let text = if opts.pii.active() && d.category != Category::Repository {
                scrubbed.text
            } else {
                text
            };
            // Documents dropped for PII or quality never reach the near-duplicate index.
            let sketch = opts
                .near_dup_threshold
                .filter(|_| scrubbed.drop.is_empty() && verdict.is_none())
                .map(|_| minhash::sketch(&text));
            let cleaned = Cleaned {
                chars: text.chars().count(),
                original_chars: d.content.chars().count(),
                digest: blake3::hash(text.as_bytes()),
                doc: d,
                text,
                pii_found: scrubbed.found,
                pii_drop: scrubbed.drop,
                verdict,
                renamed,
                sketch,
            };
            (at, cleaned)
        })
        .collect();
    cleaned.sort_unstable_by_key(|(at, _)| *at);
    let keywords: Vec<String> = opts
        .exclude_keywords
        .iter()
        .map(|k| k.to_lowercase())
        .collect();
    let mut exact: HashMap<blake3::Hash, String> = HashMap::new();
    let mut near = opts.near_dup_threshold.map(minhash::NearDuplicates::new);
    let mut near_ids: Vec<String> = Vec::new();
    let mut kept = Vec::new();
    for (_, c) in cleaned {
        let Cleaned {
            doc,
            text,
            pii_found,
            pii_drop,
            verdict,
            renamed,
            chars,
            original_chars,
            digest,
            sketch,
        } = c;
        report.pseudonymized_speakers += renamed;
        for (kind, n) in &pii_found {
            *report
                .pii_found
                .entry(kind.as_str().to_string())
                .or_default() += n;
        }
        if !pii_drop.is_empty() {
            let kinds: Vec<&str> = pii_drop.iter().map(|k| k.as_str()).collect();
            report.drop(&doc, DropReason::Pii, kinds.join(", "));
            continue;
        }
        if text.trim().is_empty() {
            report.drop(&doc, DropReason::Empty, String::new());
            continue;
        }
        if chars < opts.min_chars {
            report.drop(&doc, DropReason::TooShort, format!("{chars} characters"));
            continue;
        }
        if let Some(max) = opts.max_chars {
            if chars > max {
                report.drop(&doc, DropReason::TooLong, format!("{chars} characters"));
                continue;
            }
        }
        if let Some((rule, detail)) = verdict {
            report.drop(&doc, DropReason::Quality(rule), detail);
            continue;
        }
        if !keywords.is_empty() {
            let lower = text.to_lowercase();
            if let Some(k) = keywords.iter().find(|k| lower.contains(k.as_str())) {
                report.drop(&doc, DropReason::ExcludedKeyword, k.clone());
                continue;
            }
        }
        if !opts.languages.is_empty() && doc.category != Category::Repository {
            if let Some(info) = whatlang::detect(&text) {
                if info.is_reliable() && !opts.languages.contains(&info.lang()) {
                    report.drop(&doc, DropReason::Language, info.lang().code().to_string());
                    continue;
                }
            }
        }
        if let Some(first) = exact.get(&digest) {
            report.drop(
                &doc,
                DropReason::ExactDuplicate,
                format!("same text as {first}"),
            );
            continue;
        }
        if let (Some(index), Some(sketch)) = (near.as_mut(), sketch) {
            if let Some((of, sim)) = index.check_and_insert_sketch(sketch) {
                report.drop(
                    &doc,
                    DropReason::NearDuplicate,
                    format!("Jaccard {sim:.3} with {}", near_ids[of]),
                );
                continue;
            }
            near_ids.push(doc.id.clone());
        }
        exact.insert(digest, doc.id.clone());
        report.chars_before += original_chars;
        report.chars_after += chars;
        *report
            .kept_by_category
            .entry(doc.category.as_str().to_string())
            .or_default() += 1;
        let mut doc = doc;
        doc.content = text;
        kept.push(doc);
    }
    report.kept = kept.len();
    (kept, report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(id: &str, category: Category, content: &str) -> Document {
        Document {
            id: id.into(),
            url: format!("https://example.org/{id}"),
            category,
            title: None,
            author: None,
            published: None,
            content: content.into(),
            fetched_at: "2026-01-01T00:00:00Z".into(),
            metadata: Default::default(),
        }
    }

    #[test]
    fn normalises_unicode_whitespace_and_markup() {
        let raw = "## ﬁne\u{a0}\u{a0}words  here\r\n\r\n\r\n\r\n<b>Bold</b> and [a link](https://x.org) &amp; **strong**\u{200b}";
        let out = clean_text(Category::Article, raw, &CleanOptions::default());
        assert_eq!(out, "fine words here\n\nBold and a link & strong");
    }

    #[test]
    fn drops_boilerplate_lines_and_user_patterns() {
        let raw = "Real text here.\nSubscribe\n12 likes\nPress Enter to search\nWe use cookies. Accept all cookies\n10:42 PM\nMore real text.\nAd: buy now";
        let opts = CleanOptions {
            drop_patterns: vec![Regex::new("^Ad:").unwrap()],
            ..CleanOptions::default()
        };
        assert_eq!(
            clean_text(Category::Article, raw, &opts),
            "Real text here.\nMore real text."
        );
    }

    #[test]
    fn masks_or_removes_urls_and_emails() {
        let raw = "Mail me@example.org or see https://example.org/a?b=1 now";
        let masked = CleanOptions {
            urls: MaskMode::Mask,
            emails: MaskMode::Mask,
            ..CleanOptions::default()
        };
        assert_eq!(
            clean_text(Category::Note, raw, &masked),
            "Mail [EMAIL] or see [URL] now"
        );
        let removed = CleanOptions {
            urls: MaskMode::Remove,
            ..CleanOptions::default()
        };
        assert_eq!(
            clean_text(Category::Note, raw, &removed),
            "Mail me@example.org or see now"
        );
    }

    #[test]
    fn repositories_keep_code_byte_exact() {
        let code = "fn main() {\n    let  x = 1;\t// https://x.org\n\n\n\n}\n";
        let opts = CleanOptions {
            urls: MaskMode::Mask,
            ..CleanOptions::default()
        };
        assert_eq!(clean_text(Category::Repository, code, &opts), code);
    }

    #[test]
    fn filters_and_deduplicates_with_counted_reasons() {
        let long: String = (0..200).map(|i| format!("token{i} ")).collect();
        let mut near = long.clone();
        near.push_str("extra");
        let docs = vec![
            doc("a", Category::Article, &long),
            doc("b", Category::Article, &long),
            doc("c", Category::Post, &near),
            doc("d", Category::Post, "tiny"),
            doc(
                "e",
                Category::Note,
                "This note mentions the SECRET project in detail.",
            ),
            doc(
                "f",
                Category::Note,
                "A perfectly fine note that stays in the output.",
            ),
        ];
        let opts = CleanOptions {
            exclude_keywords: vec!["secret".into()],
            ..CleanOptions::default()
        };
        let (kept, report) = clean_documents(docs, &opts);
        let ids: Vec<&str> = kept.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["a", "f"]);
        assert_eq!(report.dropped["exact_duplicate"]["article"], 1);
        assert_eq!(report.dropped["near_duplicate"]["post"], 1);
        assert_eq!(report.dropped["too_short"]["post"], 1);
        assert_eq!(report.dropped["excluded_keyword"]["note"], 1);
        assert_eq!(report.dropped_total(), 4);
        assert_eq!(report.kept_by_category["article"], 1);
        assert!(report.dropped_examples["near_duplicate"][0]
            .detail
            .contains("with a"));
    }

    #[test]
    fn language_filter_drops_other_languages() {
        let docs = vec![
            doc("en", Category::Article, "The quick brown fox jumps over the lazy dog and keeps running through the forest all day long."),
            doc("de", Category::Article, "Der schnelle braune Fuchs springt über den faulen Hund und läuft den ganzen Tag durch den Wald."),
        ];
        let opts = CleanOptions {
            languages: vec![whatlang::Lang::Eng],
            ..CleanOptions::default()
        };
        let (kept, report) = clean_documents(docs, &opts);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].id, "en");
        assert_eq!(report.dropped["language"]["article"], 1);
    }
}
