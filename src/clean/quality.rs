//! Document quality heuristics, the ones LLM-data toolkits treat as standard: Gopher's
//! quality filter and repetition removal (Rae et al. 2021, "Scaling Language Models",
//! appendix A), C4's line rules (Raffel et al. 2020) and FineWeb's additions (Penedo et al.
//! 2024), as datatrove implements them. Each rule is a named parameter; a document that
//! breaks one is dropped with the rule, its value and the bound as the reason.
//!
//! Words are whitespace-separated tokens with surrounding punctuation stripped; lines are
//! the text's non-empty lines; paragraphs are separated by blank lines.

use std::collections::{HashMap, HashSet};

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
            .map(|w| w.trim_matches(|c: char| c.is_ascii_punctuation()))
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
        if n > 0 {
            let mean = words.iter().map(|w| w.chars().count()).sum::<usize>() as f64 / n as f64;
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
            let symbols =
                text.matches('#').count() + text.matches("...").count() + text.matches('…').count();
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
                    .filter(|w| w.chars().any(char::is_alphabetic))
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
            let found: HashSet<String> = words
                .iter()
                .map(|w| w.to_lowercase())
                .filter(|w| STOP_WORDS.contains(&w.as_str()))
                .collect();
            if found.len() < min {
                return Some((
                    "min_stop_words",
                    format!("{} distinct stop words < {min}", found.len()),
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
            let r = ratio_of(&|l| l.chars().count() < 30);
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
            let total_chars: usize = units.iter().map(|u| u.chars().count()).sum();
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
        let word_chars: usize = words.iter().map(|w| w.chars().count()).sum();
        if let Some(bounds) = self.max_top_ngram_chars {
            for (i, max) in bounds.iter().enumerate() {
                let r = share(top_ngram_chars(&words, i + 2), word_chars);
                if r > *max {
                    return Some((
                        "max_top_ngram_chars",
                        format!("the top {}-gram covers {r:.3} of characters > {max}", i + 2),
                    ));
                }
            }
        }
        if let Some(bounds) = self.max_duplicate_ngram_chars {
            for (i, max) in bounds.iter().enumerate() {
                let r = share(duplicate_ngram_chars(&words, i + 5), word_chars);
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

/// How many units repeat an earlier one, and their characters.
fn duplicates(units: &[&str]) -> (usize, usize) {
    let mut seen = HashSet::new();
    let (mut count, mut chars) = (0, 0);
    for u in units {
        if !seen.insert(*u) {
            count += 1;
            chars += u.chars().count();
        }
    }
    (count, chars)
}

/// Characters of the most frequent word n-gram times its count (Gopher counts the
/// characters of the n-gram's words).
fn top_ngram_chars(words: &[&str], n: usize) -> usize {
    if words.len() < n {
        return 0;
    }
    let mut counts: HashMap<&[&str], usize> = HashMap::new();
    for gram in words.windows(n) {
        *counts.entry(gram).or_default() += 1;
    }
    counts
        .into_iter()
        .filter(|(_, c)| *c > 1)
        .map(|(g, c)| g.iter().map(|w| w.chars().count()).sum::<usize>() * c)
        .max()
        .unwrap_or(0)
}

/// Characters of the words covered by n-grams that occur more than once (each word
/// counted once, as datatrove does).
fn duplicate_ngram_chars(words: &[&str], n: usize) -> usize {
    if words.len() < n {
        return 0;
    }
    let mut counts: HashMap<&[&str], usize> = HashMap::new();
    for gram in words.windows(n) {
        *counts.entry(gram).or_default() += 1;
    }
    let mut covered = vec![false; words.len()];
    for (i, gram) in words.windows(n).enumerate() {
        if counts[gram] > 1 {
            for c in covered.iter_mut().skip(i).take(n) {
                *c = true;
            }
        }
    }
    words
        .iter()
        .zip(&covered)
        .filter(|(_, c)| **c)
        .map(|(w, _)| w.chars().count())
        .sum()
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn ngram_shares_follow_their_definitions() {
        let words = ["a", "b", "a", "b", "c"];
        // "a b" twice: 2 chars x 2.
        assert_eq!(top_ngram_chars(&words, 2), 4);
        assert_eq!(top_ngram_chars(&words, 3), 0);
        let words = ["a", "b", "c", "d", "e", "a", "b", "c", "d", "e", "x"];
        // The 5-gram "a b c d e" occurs twice: words 0-9 covered.
        assert_eq!(duplicate_ngram_chars(&words, 5), 10);
    }
}
