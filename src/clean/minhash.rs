//! Near-duplicate detection: MinHash signatures over word shingles, banded LSH to find
//! candidates, exact Jaccard over the shingle sets to confirm them.
//!
//! Written here rather than taken from a crate: the MinHash crates on crates.io are either
//! unmaintained (gaoya, last release 2023) or self-described partial ports
//! (datasketch-minhash-lsh 0.0.1), and the whole algorithm is ~100 lines.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// A set of shingle hashes. They are xxh3 values already, so the set uses them as they
/// are instead of hashing them again with SipHash.
pub type ShingleSet = HashSet<u64, BuildHasherDefault<Prehashed>>;

/// The identity hasher of [`ShingleSet`].
#[derive(Default)]
pub struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed here; fold anything else in for correctness.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// Signature width (number of hash permutations).
pub const PERMUTATIONS: usize = 128;
/// Words per shingle.
pub const SHINGLE_WORDS: usize = 5;

/// The shingle set of a text: hashes of every run of [`SHINGLE_WORDS`] lowercase words
/// (the whole text as one shingle when it is shorter).
pub fn shingles(text: &str) -> ShingleSet {
    // A fast non-cryptographic hash (xxh3): shingle hashes only need to be well spread,
    // and a keyed cryptographic one was a fifth of `clean`'s time.
    let lower = text.to_lowercase();
    let words: Vec<&str> = lower.split_whitespace().collect();
    let width = SHINGLE_WORDS.min(words.len()).max(1);
    let mut out = ShingleSet::default();
    if words.is_empty() {
        return out;
    }
    let mut shingle = String::new();
    for window in words.windows(width) {
        shingle.clear();
        for w in window {
            shingle.push_str(w);
            shingle.push(' ');
        }
        out.insert(xxhash_rust::xxh3::xxh3_64(shingle.as_bytes()));
    }
    out
}

/// Exact Jaccard similarity of two shingle sets.
pub fn jaccard(a: &ShingleSet, b: &ShingleSet) -> f64 {
    if a.is_empty() && b.is_empty() {
        return 1.0;
    }
    let (small, large) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    let inter = small.iter().filter(|x| large.contains(x)).count();
    inter as f64 / (a.len() + b.len() - inter) as f64
}

/// The hash functions of the signature, multiply-shift `(a*x + b) >> 32` with `a` odd
/// (Dietzfelbinger's universal family), from a fixed seed so signatures are
/// reproducible.
fn permutations() -> Vec<(u64, u64)> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    (0..PERMUTATIONS).map(|_| (next() | 1, next())).collect()
}

/// MinHash signature of a shingle set (32-bit values). The set is copied into a slice
/// first: each of the hash functions walks every shingle, and a slice walks several
/// times faster than a hash set's buckets. Multiply-shift needs one 64-bit multiply per
/// shingle and function, where `(a*x + b) mod (2^61 - 1)` needed a 128-bit one and a
/// reduction: this loop is most of `clean`'s time. (Walking the functions inside the
/// shingles instead, to let the compiler vectorize, measured 15% slower: without
/// AVX-512 a 64-bit vector multiply is emulated.)
pub fn signature(set: &ShingleSet, perms: &[(u64, u64)]) -> Vec<u64> {
    let shingles: Vec<u64> = set.iter().copied().collect();
    perms
        .iter()
        .map(|&(a, b)| {
            shingles
                .iter()
                .map(|&x| a.wrapping_mul(x).wrapping_add(b) >> 32)
                .min()
                .unwrap_or(u64::MAX)
        })
        .collect()
}

/// Probability that two items with Jaccard `s` share at least one band.
fn collision_probability(s: f64, bands: usize, rows: usize) -> f64 {
    1.0 - (1.0 - s.powi(rows as i32)).powi(bands as i32)
}

/// Bands x rows (product at most [`PERMUTATIONS`]) minimising 0.1 x the false-positive
/// area below `threshold` plus 0.9 x the false-negative area above it (datasketch's
/// integrals). The weights are not datasketch's even ones because the costs are not
/// even here: every candidate is confirmed with its exact Jaccard, so a false positive
/// costs one set comparison while a false negative is a duplicate kept. With even
/// weights a 0.9 threshold got 4 x 32 and found a pair at Jaccard 0.9 one time in eight;
/// now every threshold finds a pair at it with probability >= 0.77 and 0.05 above it
/// with >= 0.95 (tested).
pub fn band_layout(threshold: f64) -> (usize, usize) {
    const FALSE_POSITIVE_WEIGHT: f64 = 0.1;
    const FALSE_NEGATIVE_WEIGHT: f64 = 0.9;
    let integrate = |f: &dyn Fn(f64) -> f64, lo: f64, hi: f64| {
        let steps = 200;
        let h = (hi - lo) / steps as f64;
        (0..steps)
            .map(|i| f(lo + (i as f64 + 0.5) * h) * h)
            .sum::<f64>()
    };
    let mut best = (1, PERMUTATIONS, f64::INFINITY);
    for rows in 1..=PERMUTATIONS {
        for bands in 1..=PERMUTATIONS / rows {
            let fp = integrate(&|s| collision_probability(s, bands, rows), 0.0, threshold);
            let fn_ = integrate(
                &|s| 1.0 - collision_probability(s, bands, rows),
                threshold,
                1.0,
            );
            let cost = FALSE_POSITIVE_WEIGHT * fp + FALSE_NEGATIVE_WEIGHT * fn_;
            if cost < best.2 {
                best = (bands, rows, cost);
            }
        }
    }
    (best.0, best.1)
}

/// Finds near-duplicates in order: item i is reported as a duplicate of the earliest kept
/// item j < i whose Jaccard similarity is >= `threshold`.
pub struct NearDuplicates {
    threshold: f64,
    bands: usize,
    rows: usize,
    perms: Vec<(u64, u64)>,
    buckets: Vec<HashMap<Vec<u64>, Vec<usize>>>,
    kept: Vec<ShingleSet>,
}

impl NearDuplicates {
    /// An empty index for `threshold` (Jaccard, 0..=1).
    pub fn new(threshold: f64) -> Self {
        let (bands, rows) = band_layout(threshold);
        Self {
            threshold,
            bands,
            rows,
            perms: permutations(),
            buckets: (0..bands).map(|_| HashMap::new()).collect(),
            kept: Vec::new(),
        }
    }

    /// Checks `text` against everything kept so far. Returns the index (in insertion order
    /// of kept items) and similarity of the duplicate it matches, or keeps it and returns
    /// `None`.
    pub fn check_and_insert(&mut self, text: &str) -> Option<(usize, f64)> {
        let set = shingles(text);
        let sig = signature(&set, &self.perms);
        let mut seen = HashSet::new();
        let mut best: Option<(usize, f64)> = None;
        for (band, chunk) in sig.chunks(self.rows).enumerate().take(self.bands) {
            if let Some(ids) = self.buckets[band].get(chunk) {
                for &id in ids {
                    if seen.insert(id) {
                        let sim = jaccard(&set, &self.kept[id]);
                        if sim >= self.threshold && best.is_none_or(|(b, _)| id < b) {
                            best = Some((id, sim));
                        }
                    }
                }
            }
        }
        if best.is_some() {
            return best;
        }
        let id = self.kept.len();
        for (band, chunk) in sig.chunks(self.rows).enumerate().take(self.bands) {
            self.buckets[band]
                .entry(chunk.to_vec())
                .or_default()
                .push(id);
        }
        self.kept.push(set);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jaccard_of_known_sets() {
        let a: ShingleSet = [1, 2, 3, 4].into_iter().collect();
        let b: ShingleSet = [3, 4, 5, 6].into_iter().collect();
        assert!((jaccard(&a, &b) - 2.0 / 6.0).abs() < 1e-12);
        assert_eq!(jaccard(&a, &a), 1.0);
    }

    #[test]
    fn layouts_find_pairs_at_the_threshold_and_few_far_below_it() {
        for t in [0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95] {
            let (b, r) = band_layout(t);
            assert!(b * r <= PERMUTATIONS, "t={t}: {b} x {r}");
            let at = collision_probability(t, b, r);
            let above = collision_probability((t + 0.05_f64).min(1.0), b, r);
            let far_below = collision_probability(t - 0.3, b, r);
            assert!(
                at >= 0.77 && above >= 0.95,
                "t={t}: {b} x {r} finds a pair at the threshold with p={at:.3}, 0.05 above with p={above:.3}"
            );
            assert!(
                far_below < 0.1,
                "t={t}: {b} x {r} makes a pair 0.3 below the threshold a candidate with p={far_below:.3}"
            );
        }
    }

    /// Pairs just above a 0.9 threshold are found (the even-weighted layout, 4 x 32,
    /// found about one in seven of them).
    #[test]
    fn pairs_just_above_the_threshold_are_found() {
        let mut index = NearDuplicates::new(0.9);
        let (mut pairs, mut found) = (0, 0);
        for i in 0..60 {
            let base: Vec<String> = (0..400).map(|j| format!("w{i}x{j}")).collect();
            let mut edited = base.clone();
            for k in [50, 150, 250, 350] {
                edited[k] = format!("changed{k}");
            }
            let (base, edited) = (base.join(" "), edited.join(" "));
            let sim = jaccard(&shingles(&base), &shingles(&edited));
            assert!((0.9..0.91).contains(&sim), "{sim}");
            assert_eq!(index.check_and_insert(&base), None);
            pairs += 1;
            if let Some((_, s)) = index.check_and_insert(&edited) {
                assert_eq!(s, sim);
                found += 1;
            }
        }
        assert!(
            found * 10 >= pairs * 6,
            "found {found} of {pairs} pairs at Jaccard 0.904"
        );
    }

    #[test]
    fn signature_estimates_jaccard() {
        let perms = permutations();
        let a: ShingleSet = (0..1000).collect();
        let b: ShingleSet = (200..1200).collect();
        let (sa, sb) = (signature(&a, &perms), signature(&b, &perms));
        let est = sa.iter().zip(&sb).filter(|(x, y)| x == y).count() as f64 / PERMUTATIONS as f64;
        let exact = jaccard(&a, &b);
        assert!(
            (est - exact).abs() < 0.12,
            "estimate {est} vs exact {exact}"
        );
    }

    #[test]
    fn finds_near_duplicates_and_keeps_distinct_texts() {
        let base: Vec<String> = (0..300).map(|i| format!("word{i}")).collect();
        let original = base.join(" ");
        let mut edited = base.clone();
        edited[150] = "changed".into();
        let edited = edited.join(" ");
        let other: String = (0..300).map(|i| format!("other{i} ")).collect();
        let mut index = NearDuplicates::new(0.85);
        assert_eq!(index.check_and_insert(&original), None);
        let (id, sim) = index
            .check_and_insert(&edited)
            .expect("edited copy is a near duplicate");
        assert_eq!(id, 0);
        assert!(sim > 0.9 && sim < 1.0, "{sim}");
        assert_eq!(index.check_and_insert(&other), None);
    }
}
