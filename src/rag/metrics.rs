//! Retrieval metrics over ranked results with known relevant items (binary relevance):
//! hit rate@k, mean reciprocal rank and nDCG@k, as information-retrieval toolkits
//! (e.g. ranx, pytrec_eval) define them.

/// Whether any of the first `k` results is relevant.
pub fn hit_at(ranked: &[bool], k: usize) -> f64 {
    f64::from(u8::from(ranked.iter().take(k).any(|&r| r)))
}

/// 1 / rank of the first relevant result (0 when none is).
pub fn reciprocal_rank(ranked: &[bool]) -> f64 {
    ranked
        .iter()
        .position(|&r| r)
        .map_or(0.0, |i| 1.0 / (i as f64 + 1.0))
}

/// nDCG@k with binary gains: DCG = sum of 1 / log2(rank + 1) over relevant results in the
/// first k, divided by the DCG of `relevant` relevant results ranked first.
pub fn ndcg_at(ranked: &[bool], relevant: usize, k: usize) -> f64 {
    let dcg: f64 = ranked
        .iter()
        .take(k)
        .enumerate()
        .filter(|(_, &r)| r)
        .map(|(i, _)| 1.0 / (i as f64 + 2.0).log2())
        .sum();
    let ideal: f64 = (0..relevant.min(k))
        .map(|i| 1.0 / (i as f64 + 2.0).log2())
        .sum();
    if ideal == 0.0 {
        0.0
    } else {
        dcg / ideal
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_match_their_definitions() {
        let ranked = [false, true, false, true];
        assert_eq!(hit_at(&ranked, 1), 0.0);
        assert_eq!(hit_at(&ranked, 2), 1.0);
        assert_eq!(reciprocal_rank(&ranked), 0.5);
        assert_eq!(reciprocal_rank(&[false, false]), 0.0);
        // Relevant at ranks 2 and 4 of 2 relevant items:
        // (1/log2(3) + 1/log2(5)) / (1 + 1/log2(3)).
        let expected = (1.0 / 3f64.log2() + 1.0 / 5f64.log2()) / (1.0 + 1.0 / 3f64.log2());
        assert!((ndcg_at(&ranked, 2, 4) - expected).abs() < 1e-12);
        assert_eq!(ndcg_at(&[true], 1, 1), 1.0);
    }
}
