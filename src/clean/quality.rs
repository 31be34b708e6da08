//! Document quality heuristics, the ones LLM-data toolkits treat as standard: Gopher's
//! quality filter and repetition removal (Rae et al. 2021, "Scaling Language Models",
//! appendix A), C4's line rules (Raffel et al. 2020) and FineWeb's additions (Penedo et al.
//! 2024), as datatrove implements them. Each rule is a named parameter; a document that
//! breaks one is dropped with the rule, its value and the bound as the reason.
//!
//! Words are whitespace-separated tokens with surrounding punctuation stripped; lines are
//! the text's non-empty lines; paragraphs are separated by blank lines.

use super::minhash::{PrehashedMap, PrehashedSet};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The quality rules; a rule left unset (or null) is off.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QualityRules {
    /// Start from a published set (`gopher`: Gopher's quality and repetition rules with
    /// C4's and FineWeb's line rules at their papers' thresholds); rules given here
    /// override it.
    #[serde(default)]
    pub preset: Option<Preset>,
    /// Fewer words than this (Gopher: 50).
    #[serde(default)]
    pub min_words: Option<usize>,
    /// More words than this (Gopher: 100,000).
    #[serde(default)]
    pub max_words: Option<usize>,
    /// Mean word length below this, in characters (Gopher: 3).
    #[serde(default)]
    pub min_mean_word_length: Option<f64>,
    /// Mean word length above this (Gopher: 10).
    #[serde(default)]
    pub max_mean_word_length: Option<f64>,
    /// Hash signs and ellipses per word above this (Gopher: 0.1).
    #[serde(default)]
    pub max_symbol_word_ratio: Option<f64>,
    /// Share of lines starting with a bullet above this (Gopher: 0.9).
    #[serde(default)]
    pub max_bullet_lines: Option<f64>,
    /// Share of lines ending with an ellipsis above this (Gopher: 0.3).
    #[serde(default)]
    pub max_ellipsis_lines: Option<f64>,
    /// Share of words holding a letter below this (Gopher: 0.8).
    #[serde(default)]
    pub min_alpha_words: Option<f64>,
    /// Fewer distinct English stop words (the, be, to, of, and, that, have, with) than
    /// this (Gopher: 2).
    #[serde(default)]
    pub min_stop_words: Option<usize>,
    /// Share of lines ending in terminal punctuation below this (FineWeb: 0.12).
    #[serde(default)]
    pub min_punctuated_lines: Option<f64>,
    /// Share of lines shorter than 30 characters above this (FineWeb: 0.67).
    #[serde(default)]
    pub max_short_lines: Option<f64>,
    /// Share of lines that repeat an earlier line above this (Gopher: 0.3).
    #[serde(default)]
    pub max_duplicate_lines: Option<f64>,
    /// Share of characters in repeated lines above this (Gopher: 0.2).
    #[serde(default)]
    pub max_duplicate_line_chars: Option<f64>,
    /// Share of paragraphs that repeat an earlier one above this (Gopher: 0.3).
    #[serde(default)]
    pub max_duplicate_paragraphs: Option<f64>,
    /// Share of characters in repeated paragraphs above this (Gopher: 0.2).
    #[serde(default)]
    pub max_duplicate_paragraph_chars: Option<f64>,
    /// Share of characters covered by the most frequent word 2-, 3- and 4-gram above
    /// these (Gopher: 0.20, 0.18, 0.16).
    #[serde(default)]
    pub max_top_ngram_chars: Option<[f64; 3]>,
    /// Share of characters in word 5- to 10-grams that occur more than once above these
    /// (Gopher: 0.15, 0.14, 0.13, 0.12, 0.11, 0.10).
    #[serde(default)]
    pub max_duplicate_ngram_chars: Option<[f64; 6]>,
}

/// Published rule sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// Gopher's quality and repetition rules plus C4's and FineWeb's line rules.
    Gopher,
}

const STOP_WORDS: [&str; 8] = ["the", "be", "to", "of", "and", "that", "have", "with"];
const BULLETS: [char; 5] = ['•', '●', '○', '▪', '-'];

impl QualityRules {
    /// The rules with the preset's values filled in where none is given.
    pub fn resolved(&self) -> QualityRules {
        let Some(Preset::Gopher) = self.preset else {
            return self.clone();
        };
        QualityRules {
            preset: None,
            min_words: self.min_words.or(Some(50)),
            max_words: self.max_words.or(Some(100_000)),
            min_mean_word_length: self.min_mean_word_length.or(Some(3.0)),
            max_mean_word_length: self.max_mean_word_length.or(Some(10.0)),
            max_symbol_word_ratio: self.max_symbol_word_ratio.or(Some(0.1)),
            max_bullet_lines: self.max_bullet_lines.or(Some(0.9)),
            max_ellipsis_lines: self.max_ellipsis_lines.or(Some(0.3)),
            min_alpha_words: self.min_alpha_words.or(Some(0.8)),
            min_stop_words: self.min_stop_words.or(Some(2)),
            min_punctuated_lines: self.min_punctuated_lines.or(Some(0.12)),
            max_short_lines: self.max_short_lines.or(Some(0.67)),
            max_duplicate_lines: self.max_duplicate_lines.or(Some(0.3)),
            max_duplicate_line_chars: self.max_duplicate_line_chars.or(Some(0.2)),
            max_duplicate_paragraphs: self.max_duplicate_paragraphs.or(Some(0.3)),
            max_duplicate_paragraph_chars: self.max_duplicate_paragraph_chars.or(Some(0.2)),
            max_top_ngram_chars: self.max_top_ngram_chars.or(Some([0.20, 0.18, 0.16])),
            max_duplicate_ngram_chars: self
                .max_duplicate_ngram_chars
                .or(Some([0.15, 0.14, 0.13, 0.12, 0.11, 0.10])),
        }
    }

    /// Whether any rule is on.
    pub fn active(&self) -> bool {
        self.preset.is_some() || *self != QualityRules::default()
    }

    /// Problems with the values: (parameter, message).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let shares = [
            ("max_symbol_word_ratio", self.max_symbol_word_ratio),
            ("max_bullet_lines", self.max_bullet_lines),
            ("max_ellipsis_lines", self.max_ellipsis_lines),
            ("min_alpha_words", self.min_alpha_words),
            ("min_punctuated_lines", self.min_punctuated_lines),
            ("max_short_lines", self.max_short_lines),
            ("max_duplicate_lines", self.max_duplicate_lines),
            ("max_duplicate_line_chars", self.max_duplicate_line_chars),
            ("max_duplicate_paragraphs", self.max_duplicate_paragraphs),
            (
                "max_duplicate_paragraph_chars",
                self.max_duplicate_paragraph_chars,
            ),
        ];
        for (name, v) in shares {
            if let Some(v) = v {
                if !(0.0..=1.0).contains(&v) {
                    out.push((
                        name.to_string(),
                        format!("{name} is a share: 0..1, not {v}"),
                    ));
                }
            }
        }
        let lists: [(&str, &[f64]); 2] = [
            (
                "max_top_ngram_chars",
                self.max_top_ngram_chars
                    .as_ref()
                    .map_or(&[][..], |a| &a[..]),
            ),
            (
                "max_duplicate_ngram_chars",
                self.max_duplicate_ngram_chars
                    .as_ref()
                    .map_or(&[][..], |a| &a[..]),
            ),
        ];
        for (name, values) in lists {
            if values.iter().any(|v| !(0.0..=1.0).contains(v)) {
                out.push((name.to_string(), format!("{name} holds shares: 0..1")));
            }
        }
        if let (Some(a), Some(b)) = (self.min_words, self.max_words) {
            if a > b {
                out.push(("min_words".into(), format!("min_words {a} > max_words {b}")));
            }
        }
        if let (Some(a), Some(b)) = (self.min_mean_word_length, self.max_mean_word_length) {
            if a > b {
                out.push((
                    "min_mean_word_length".into(),
                    format!("min_mean_word_length {a} > max_mean_word_length {b}"),
                ));
            }
        }
        out
    }

    /// The first rule `text` breaks: (rule name, what was measured against the bound).
    /// `self` should be [`QualityRules::resolved`].
    pub fn check(&self, text: &str) -> Option<(&'static str, String)> {
        let words: Vec<&str> = text
            .split_whitespace()
            .map(trim_ascii_punctuation)
            .filter(|w| !w.is_empty())
            .collect();
        let n = words.len();
        if let Some(min) = self.min_words {
            if n < min {
                return Some(("min_words", format!("{n} words < {min}")));
            }
        }
        if let Some(max) = self.max_words {
            if n > max {
                return Some(("max_words", format!("{n} words > {max}")));
            }
        }
        let share = |count: usize, of: usize| count as f64 / of.max(1) as f64;
        let chars: Vec<usize> = words.iter().map(|w| char_count(w)).collect();
        let word_chars: usize = chars.iter().sum();
        if n > 0 {
            let mean = word_chars as f64 / n as f64;
            if let Some(min) = self.min_mean_word_length {
                if mean < min {
                    return Some((
                        "min_mean_word_length",
                        format!("mean word length {mean:.2} < {min}"),
                    ));
                }
            }
            if let Some(max) = self.max_mean_word_length {
                if mean > max {
                    return Some((
                        "max_mean_word_length",
                        format!("mean word length {mean:.2} > {max}"),
                    ));
                }
            }
        }
        if let Some(max) = self.max_symbol_word_ratio {
            let symbols = symbol_count(text);
            let ratio = share(symbols, n);
            if ratio > max {
                return Some((
                    "max_symbol_word_ratio",
                    format!("{ratio:.3} symbols per word > {max}"),
                ));
            }
        }
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let ratio_of = |pred: &dyn Fn(&str) -> bool| {
            share(lines.iter().filter(|l| pred(l)).count(), lines.len())
        };
        if let Some(max) = self.max_bullet_lines {
            let r = ratio_of(&|l| l.starts_with(BULLETS) || l.starts_with("* "));
            if r > max {
                return Some((
                    "max_bullet_lines",
                    format!("{r:.3} of lines are bullets > {max}"),
                ));
            }
        }
        if let Some(max) = self.max_ellipsis_lines {
            let r = ratio_of(&|l| l.ends_with("...") || l.ends_with('…'));
            if r > max {
                return Some((
                    "max_ellipsis_lines",
                    format!("{r:.3} of lines end with an ellipsis > {max}"),
                ));
            }
        }
        if let Some(min) = self.min_alpha_words {
            let r = share(
                words
                    .iter()
                    .filter(|w| {
                        w.bytes().any(|b| b.is_ascii_alphabetic())
                            || (!w.is_ascii() && w.chars().any(char::is_alphabetic))
                    })
                    .count(),
                n,
            );
            if r < min {
                return Some((
                    "min_alpha_words",
                    format!("{r:.3} of words have a letter < {min}"),
                ));
            }
        }
        if let Some(min) = self.min_stop_words {
            // Distinct stop words as bits (they are ASCII: no lowercase copy needed).
            let mut found = 0u32;
            for w in &words {
                if let Some(i) = STOP_WORDS.iter().position(|s| w.eq_ignore_ascii_case(s)) {
                    found |= 1 << i;
                }
            }
            let found = found.count_ones() as usize;
            if found < min {
                return Some((
                    "min_stop_words",
                    format!("{found} distinct stop words < {min}"),
                ));
            }
        }
        if let Some(min) = self.min_punctuated_lines {
            let r = ratio_of(&|l| l.ends_with(['.', '!', '?', '"', '\'', '”', '’']));
            if r < min {
                return Some((
                    "min_punctuated_lines",
                    format!("{r:.3} of lines end in punctuation < {min}"),
                ));
            }
        }
        if let Some(max) = self.max_short_lines {
            let r = ratio_of(&|l| l.len() < 30 || (l.len() < 120 && char_count(l) < 30));
            if r > max {
                return Some((
                    "max_short_lines",
                    format!("{r:.3} of lines are under 30 characters > {max}"),
                ));
            }
        }
        let paragraphs: Vec<&str> = text
            .split("\n\n")
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .collect();
        for (units, count_rule, chars_rule, what) in [
            (
                &lines,
                ("max_duplicate_lines", self.max_duplicate_lines),
                ("max_duplicate_line_chars", self.max_duplicate_line_chars),
                "lines",
            ),
            (
                &paragraphs,
                ("max_duplicate_paragraphs", self.max_duplicate_paragraphs),
                (
                    "max_duplicate_paragraph_chars",
                    self.max_duplicate_paragraph_chars,
                ),
                "paragraphs",
            ),
        ] {
            if count_rule.1.is_none() && chars_rule.1.is_none() {
                continue;
            }
            let (dups, dup_chars) = duplicates(units);
            let total_chars: usize = units.iter().map(|u| char_count(u)).sum();
            if let Some(max) = count_rule.1 {
                let r = share(dups, units.len());
                if r > max {
                    return Some((count_rule.0, format!("{r:.3} of {what} repeat > {max}")));
                }
            }
            if let Some(max) = chars_rule.1 {
                let r = share(dup_chars, total_chars);
                if r > max {
                    return Some((
                        chars_rule.0,
                        format!("{r:.3} of characters are in repeated {what} > {max}"),
                    ));
                }
            }
        }
        let hashed = Words::new(&words, &chars);
        if let Some(bounds) = self.max_top_ngram_chars {
            for (i, max) in bounds.iter().enumerate() {
                let r = share(top_ngram_chars(&hashed, i + 2), word_chars);
                if r > *max {
                    return Some((
                        "max_top_ngram_chars",
                        format!("the top {}-gram covers {r:.3} of characters > {max}", i + 2),
                    ));
                }
            }
        }
        if let Some(bounds) = self.max_duplicate_ngram_chars {
            let mut previous_share = f64::INFINITY;
            for (i, max) in bounds.iter().enumerate() {
                // The words repeated (n+1)-grams cover are covered by repeated n-grams
                // too, so once the share is under every bound left, the larger n pass.
                if bounds[i..].iter().all(|b| previous_share <= *b) {
                    break;
                }
                let r = share(duplicate_ngram_chars(&hashed, i + 5), word_chars);
                previous_share = r;
                if r > *max {
                    return Some((
                        "max_duplicate_ngram_chars",
                        format!(
                            "repeated {}-grams cover {r:.3} of characters > {max}",
                            i + 5
                        ),
                    ));
                }
            }
        }
        None
    }
}

/// Characters of `s`: its bytes that do not continue a UTF-8 sequence (a loop the
/// compiler vectorizes; `chars().count()` is a call per word).
fn char_count(s: &str) -> usize {
    s.bytes().filter(|b| (*b as i8) >= -0x40).count()
}

/// `w` without ASCII punctuation at its ends (bytes: no UTF-8 sequence starts with one).
fn trim_ascii_punctuation(w: &str) -> &str {
    let bytes = w.as_bytes();
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_punctuation())
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_punctuation())
        .map_or(start, |e| e + 1);
    &w[start..end.max(start)]
}

/// Gopher's symbols: `#`, `...` (non-overlapping) and `…`, in one pass.
fn symbol_count(text: &str) -> usize {
    let bytes = text.as_bytes();
    let (mut count, mut i) = (0, 0);
    while i < bytes.len() {
        match bytes[i] {
            b'#' => count += 1,
            b'.' if bytes.get(i + 1) == Some(&b'.') && bytes.get(i + 2) == Some(&b'.') => {
                count += 1;
                i += 2;
            }
            // U+2026 HORIZONTAL ELLIPSIS
            0xE2 if bytes.get(i + 1) == Some(&0x80) && bytes.get(i + 2) == Some(&0xA6) => {
                count += 1;
                i += 2;
            }
            _ => {}
        }
        i += 1;
    }
    count
}

/// How many units repeat an earlier one, and their characters.
fn duplicates(units: &[&str]) -> (usize, usize) {
    let mut seen = PrehashedSet::default();
    let (mut count, mut chars) = (0, 0);
    for u in units {
        if !seen.insert(xxhash_rust::xxh3::xxh3_64(u.as_bytes())) {
            count += 1;
            chars += char_count(u);
        }
    }
    (count, chars)
}

/// A document's words as hashes and character counts, computed once for every n-gram
/// rule. N-grams are compared by a 64-bit hash of their words' hashes (a collision among
/// a document's n-grams has a chance below 1e-9).
struct Words {
    hashes: Vec<u64>,
    /// Characters of the words before each position (`chars_before[i + n] -
    /// chars_before[i]` are the characters of the n words from `i`).
    chars_before: Vec<usize>,
}

impl Words {
    /// `chars`: each word's characters.
    fn new(words: &[&str], chars: &[usize]) -> Words {
        let mut chars_before = Vec::with_capacity(chars.len() + 1);
        chars_before.push(0);
        for c in chars {
            chars_before.push(chars_before.last().copied().unwrap_or(0) + c);
        }
        Words {
            hashes: words
                .iter()
                .map(|w| xxhash_rust::xxh3::xxh3_64(w.as_bytes()))
                .collect(),
            chars_before,
        }
    }

    /// The hash of each n-gram, in order.
    fn ngrams(&self, n: usize) -> impl Iterator<Item = u64> + '_ {
        self.hashes.windows(n).map(super::minhash::window_hash)
    }

    /// Characters of the `n` words from `i`.
    fn chars(&self, i: usize, n: usize) -> usize {
        self.chars_before[i + n] - self.chars_before[i]
    }
}

/// Characters of the most frequent word n-gram times its count (Gopher counts the
/// characters of the n-gram's words). One pass: each repeat updates the best.
fn top_ngram_chars(words: &Words, n: usize) -> usize {
    if words.hashes.len() < n {
        return 0;
    }
    let mut counts: PrehashedMap<u32> = PrehashedMap::default();
    counts.reserve(words.hashes.len());
    let mut best = 0;
    for (i, gram) in words.ngrams(n).enumerate() {
        let count = counts.entry(gram).or_default();
        *count += 1;
        if *count > 1 {
            best = best.max(words.chars(i, n) * *count as usize);
        }
    }
    best
}

/// Characters of the words covered by n-grams that occur more than once (each word
/// counted once, as datatrove does). One pass: an n-gram seen before covers its words
/// and, the first time it repeats, those of its first occurrence.
fn duplicate_ngram_chars(words: &Words, n: usize) -> usize {
    if words.hashes.len() < n {
        return 0;
    }
    // n-gram -> (its first position, whether that occurrence is marked yet)
    let mut first: PrehashedMap<(usize, bool)> = PrehashedMap::default();
    first.reserve(words.hashes.len());
    let mut covered = vec![false; words.hashes.len()];
    for (i, gram) in words.ngrams(n).enumerate() {
        let (at, marked) = first.entry(gram).or_insert((i, false));
        if *at != i {
            if !*marked {
                covered[*at..*at + n].iter_mut().for_each(|c| *c = true);
                *marked = true;
            }
            covered[i..i + n].iter_mut().for_each(|c| *c = true);
        }
    }
    covered
        .iter()
        .enumerate()
        .filter(|(_, c)| **c)
        .map(|(i, _)| words.chars(i, 1))
        .sum()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn gopher() -> QualityRules {
        QualityRules {
            preset: Some(Preset::Gopher),
            ..Default::default()
        }
        .resolved()
    }

    const PROSE: &str = "The starter needs feeding twice a day with equal weights of rye flour and water. \
        A starter that doubles within six hours is ready to leaven the bread dough for the morning bake. \
        Keep it warm, discard half of it before each feeding, and watch for bubbles on the surface of the jar. \
        When the kitchen is cold the yeast slows down, so give it a little more time and a warmer spot to rise. \
        Bakers who have kept a starter for years say that the smell tells them more than any clock does.";

    #[test]
    fn prose_passes_the_gopher_rules() {
        assert_eq!(gopher().check(PROSE), None);
    }

    #[test]
    fn each_rule_names_itself_with_the_measured_value() {
        let rules = gopher();
        let cases = [
            ("Too short to say much.", "min_words"),
            (&"x ".repeat(60)[..], "min_mean_word_length"),
            (
                &format!("{PROSE} {}", "# ".repeat(40))[..],
                "max_symbol_word_ratio",
            ),
            (
                &"Menu Home About Contact Shop Login Cart Search Help Blog News Jobs\n".repeat(6)[..],
                "min_stop_words",
            ),
        ];
        for (text, rule) in cases {
            let (got, detail) = rules
                .check(text)
                .unwrap_or_else(|| panic!("{rule}: passed"));
            assert_eq!(got, rule, "{detail}");
        }
        // Repetition: one paragraph written three times.
        let repeated = format!("{PROSE}\n\n{PROSE}\n\n{PROSE}");
        let (rule, detail) = rules.check(&repeated).unwrap();
        assert!(rule.starts_with("max_duplicate"), "{rule}: {detail}");
        assert!(
            detail.contains("> 0.3") || detail.contains("> 0.2"),
            "{detail}"
        );
        // Rules left unset are off.
        assert_eq!(QualityRules::default().check("x"), None);
    }

    /// Repeated 5-grams under their own bound do not end the duplicate n-gram rule while a
    /// larger n has a tighter bound: the repetition is found at that n.
    #[test]
    fn duplicate_ngram_sizes_stop_only_under_every_bound_left() {
        let rules = QualityRules {
            max_duplicate_ngram_chars: Some([1.0, 1.0, 1.0, 0.01, 1.0, 1.0]),
            ..Default::default()
        };
        let repeated = format!("{PROSE}\n\n{PROSE}");
        let (rule, detail) = rules.check(&repeated).expect("dropped");
        assert_eq!(rule, "max_duplicate_ngram_chars");
        assert!(detail.starts_with("repeated 8-grams"), "{detail}");
        // Under every bound: kept.
        let loose = QualityRules {
            max_duplicate_ngram_chars: Some([1.0; 6]),
            ..Default::default()
        };
        assert_eq!(loose.check(&repeated), None);
    }

    fn words_of(words: &[&str]) -> Words {
        let chars: Vec<usize> = words.iter().map(|w| w.chars().count()).collect();
        Words::new(words, &chars)
    }

    /// The one-pass counts equal the definitions computed the plain way, on word
    /// sequences from a small vocabulary (many repeats of every length).
    #[test]
    fn one_pass_ngram_counts_equal_the_definitions() {
        let vocab = ["a", "bb", "ccc", "dd", "e", "ffff"];
        let mut state = 7u64;
        for len in [0, 3, 10, 40, 200] {
            let words: Vec<&str> = (0..len)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    vocab[(state >> 33) as usize % vocab.len()]
                })
                .collect();
            let hashed = words_of(&words);
            for n in 2..=10 {
                let mut counts: HashMap<&[&str], usize> = HashMap::new();
                for g in words.windows(n) {
                    *counts.entry(g).or_default() += 1;
                }
                let chars = |g: &[&str]| g.iter().map(|w| w.len()).sum::<usize>();
                let top = counts
                    .iter()
                    .filter(|(_, c)| **c > 1)
                    .map(|(g, c)| chars(g) * c)
                    .max()
                    .unwrap_or(0);
                assert_eq!(top_ngram_chars(&hashed, n), top, "top, len {len}, n {n}");
                let mut covered = vec![false; words.len()];
                for (i, g) in words.windows(n).enumerate() {
                    if counts[g] > 1 {
                        covered[i..i + n].iter_mut().for_each(|c| *c = true);
                    }
                }
                let dup: usize = words
                    .iter()
                    .zip(&covered)
                    .filter(|(_, c)| **c)
                    .map(|(w, _)| w.len())
                    .sum();
                assert_eq!(
                    duplicate_ngram_chars(&hashed, n),
                    dup,
                    "dup, len {len}, n {n}"
                );
            }
        }
    }

    #[test]
    fn byte_helpers_equal_their_char_definitions() {
        for s in [
            "",
            "plain",
            "«Grüße»",
            "...x...",
            "a……b",
            "##.. ...",
            "—¿qué?—",
            "\"quoted,\"",
            "…",
            ".",
            "🎉!",
        ] {
            assert_eq!(char_count(s), s.chars().count(), "{s}");
            assert_eq!(
                trim_ascii_punctuation(s),
                s.trim_matches(|c: char| c.is_ascii_punctuation()),
                "{s}"
            );
            assert_eq!(
                symbol_count(s),
                s.matches('#').count() + s.matches("...").count() + s.matches('…').count(),
                "{s}"
            );
        }
    }

    #[test]
    fn ngram_shares_follow_their_definitions() {
        let words = words_of(&["a", "b", "a", "b", "c"]);
        // "a b" twice: 2 chars x 2.
        assert_eq!(top_ngram_chars(&words, 2), 4);
        assert_eq!(top_ngram_chars(&words, 3), 0);
        let words = words_of(&["a", "b", "c", "d", "e", "a", "b", "c", "d", "e", "x"]);
        // The 5-gram "a b c d e" occurs twice: words 0-9 covered.
        assert_eq!(duplicate_ngram_chars(&words, 5), 10);
        // The same words in another order are another n-gram.
        let words = words_of(&["ab", "c", "a", "bc", "ab", "c"]);
        assert_eq!(top_ngram_chars(&words, 2), 6);
        let words = words_of(&["a", "b", "b", "a"]);
        assert_eq!(top_ngram_chars(&words, 2), 0);
    }
}
