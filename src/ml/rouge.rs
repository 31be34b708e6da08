//! ROUGE-L (Lin, 2004): the longest common subsequence of tokens between a generation and
//! its reference, as precision, recall and F1. Tokenised like Google's `rouge_score`
//! (lowercase, runs of ASCII letters and digits, no stemming), so numbers compare with
//! what `evaluate`/`rouge_score` report for the same texts. Written here because it is a
//! 30-line dynamic program and the crates that offer it pull in whole NLP toolkits.

use serde::Serialize;

/// Precision, recall and F1 of one comparison.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct RougeL {
    /// LCS / candidate tokens.
    pub precision: f64,
    /// LCS / reference tokens.
    pub recall: f64,
    /// Harmonic mean of the two.
    pub f1: f64,
}

/// `rouge_score`'s default tokenisation.
pub fn tokens(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

/// Length of the longest common subsequence (two rows of the DP table).
pub fn lcs_len<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                cur[j].max(prev[j + 1])
            };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// ROUGE-L of `candidate` against `reference`.
pub fn rouge_l(candidate: &str, reference: &str) -> RougeL {
    let (c, r) = (tokens(candidate), tokens(reference));
    if c.is_empty() || r.is_empty() {
        return RougeL::default();
    }
    let lcs = lcs_len(&c, &r) as f64;
    let precision = lcs / c.len() as f64;
    let recall = lcs / r.len() as f64;
    let f1 = if lcs == 0.0 {
        0.0
    } else {
        2.0 * precision * recall / (precision + recall)
    };
    RougeL {
        precision,
        recall,
        f1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_rouge_score_readme_example() {
        // rouge_score's README: score(target, prediction) -> P 0.625, R 0.5556, F 0.5882.
        let s = rouge_l(
            "The quick brown dog jumps on the log.",
            "The quick brown fox jumps over the lazy dog",
        );
        assert!((s.precision - 0.625).abs() < 1e-12);
        assert!((s.recall - 5.0 / 9.0).abs() < 1e-12);
        assert!((s.f1 - 0.5882352941176471).abs() < 1e-12);
    }

    #[test]
    fn known_values() {
        assert_eq!(lcs_len(&tokens("a b c d e"), &tokens("a c e")), 3);
        assert_eq!(lcs_len(&tokens("ABCBDAB"), &tokens("BDCABA")), 0); // one different token each
        let chars = |s: &str| s.chars().collect::<Vec<_>>();
        assert_eq!(lcs_len(&chars("ABCBDAB"), &chars("BDCABA")), 4); // CLRS
        assert_eq!(rouge_l("same words here", "Same, words; here!").f1, 1.0);
        assert_eq!(rouge_l("", "x").f1, 0.0);
        assert_eq!(rouge_l("x y", "z w").f1, 0.0);
        let s = rouge_l("police killed the gunman", "police kill the gunman");
        assert!((s.f1 - 0.75).abs() < 1e-12); // Lin 2004's example: LCS 3 of 4
    }
}
