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
pub type ShingleSet = PrehashedSet;

/// A set of values that are hashes already (see [`Prehashed`]).
pub type PrehashedSet = HashSet<u64, BuildHasherDefault<Prehashed>>;

/// A map keyed by values that are hashes already (see [`Prehashed`]).
pub type PrehashedMap<V> = HashMap<u64, V, BuildHasherDefault<Prehashed>>;

/// The identity hasher of [`PrehashedSet`] and [`PrehashedMap`].
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

/// Signature width (bins of the one-permutation signature).
pub const PERMUTATIONS: usize = 128;
/// Words per shingle.
pub const SHINGLE_WORDS: usize = 5;

/// The shingle set of a text: hashes of every run of [`SHINGLE_WORDS`] lowercase words
/// (the whole text as one shingle when it is shorter). Each word is hashed once (xxh3)
/// and a shingle's hash mixes its words' hashes in order, rather than hashing a string
/// built per window.
pub fn shingles(text: &str) -> ShingleSet {
    let lower = if text.is_ascii() {
        text.to_ascii_lowercase()
    } else {
        text.to_lowercase()
    };
    let words: Vec<u64> = lower
        .split_whitespace()
        .map(|w| xxhash_rust::xxh3::xxh3_64(w.as_bytes()))
        .collect();
    let width = SHINGLE_WORDS.min(words.len()).max(1);
    let mut out = ShingleSet::default();
    if words.is_empty() {
        return out;
    }
    out.reserve(words.len());
    out.extend(words.windows(width).map(window_hash));
    out
}

/// The hash of a run of word hashes, order-sensitive.
pub(crate) fn window_hash(words: &[u64]) -> u64 {
    splitmix(words.iter().fold(words.len() as u64, |h, w| {
        (h ^ w).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29)
    }))
}

/// SplitMix64's finalizer: spreads every input bit over the output.
fn splitmix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
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

/// MinHash signature of a shingle set by one-permutation hashing with optimal
/// densification (Li, Owen and Zhang 2012; Shrivastava 2017): each shingle hash falls in
/// one of [`PERMUTATIONS`] bins by its top bits and the bin keeps its smallest value; an
/// empty bin copies the bin a fixed probe sequence of its own index reaches first. Two
/// sets agree on a bin with probability equal to their Jaccard similarity, as with
/// [`PERMUTATIONS`] independent hash functions, for one pass over the shingles instead
/// of one per function (which was most of `clean`'s time).
pub fn signature(set: &ShingleSet) -> Vec<u64> {
    const BIN_BITS: u32 = PERMUTATIONS.trailing_zeros();
    const _: () = assert!(PERMUTATIONS.is_power_of_two());
    let mut sig = vec![u64::MAX; PERMUTATIONS];
    for &x in set {
        let h = splitmix(x);
        let bin = (h >> (64 - BIN_BITS)) as usize;
        let value = h & (u64::MAX >> BIN_BITS);
        sig[bin] = sig[bin].min(value);
    }
    if set.is_empty() {
        return sig;
    }
    let filled: Vec<bool> = sig.iter().map(|v| *v != u64::MAX).collect();
    for bin in 0..PERMUTATIONS {
        if filled[bin] {
            continue;
        }
        // The probe sequence depends on the bin and the attempt only, so every set
        // copies from the same bins when the same bins are empty.
        let mut attempt = 0u64;
        loop {
            let probe =
                splitmix(((bin as u64) << 32 | attempt).wrapping_add(0x632B_E59B_D9B4_E019));
            let from = (probe >> (64 - BIN_BITS)) as usize;
            if filled[from] {
                sig[bin] = sig[from];
                break;
            }
            attempt += 1;
        }
    }
    sig
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

/// What the index compares of a text: its shingle set and MinHash signature. Made apart
/// from the index, which must see texts in order, so that callers can make them in
/// parallel.
pub struct Sketch {
    set: ShingleSet,
    signature: Vec<u64>,
}

/// The sketch of `text`.
pub fn sketch(text: &str) -> Sketch {
    let set = shingles(text);
    let signature = signature(&set);
    Sketch { set, signature }
}

/// Finds near-duplicates in order: item i is reported as a duplicate of the earliest kept
/// item j < i whose Jaccard similarity is >= `threshold`.
pub struct NearDuplicates {
    threshold: f64,
    bands: usize,
    rows: usize,
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
            buckets: (0..bands).map(|_| HashMap::new()).collect(),
            kept: Vec::new(),
        }
    }

    /// Checks `text` against everything kept so far. Returns the index (in insertion order
    /// of kept items) and similarity of the duplicate it matches, or keeps it and returns
    /// `None`.
    pub fn check_and_insert(&mut self, text: &str) -> Option<(usize, f64)> {
        self.check_and_insert_sketch(sketch(text))
    }

    /// [`NearDuplicates::check_and_insert`] with the text's sketch made beforehand.
    pub fn check_and_insert_sketch(&mut self, sketch: Sketch) -> Option<(usize, f64)> {
        let Sketch {
            set,
            signature: sig,
        } = sketch;
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
        let a: ShingleSet = (0..1000).collect();
        let b: ShingleSet = (200..1200).collect();
        let (sa, sb) = (signature(&a), signature(&b));
        let est = sa.iter().zip(&sb).filter(|(x, y)| x == y).count() as f64 / PERMUTATIONS as f64;
        let exact = jaccard(&a, &b);
        assert!(
            (est - exact).abs() < 0.12,
            "estimate {est} vs exact {exact}"
        );
    }

    /// The one-permutation signature agrees on a share of bins that estimates Jaccard
    /// without bias, for sets smaller than the signature (most bins densified) as for
    /// large ones.
    #[test]
    fn signature_agreement_is_unbiased_for_small_and_large_sets() {
        for size in [12u64, 40, 200, 3000] {
            for keep in [0.5, 0.85, 0.95] {
                let (mut est, mut exact) = (0.0, 0.0);
                let trials = 200;
                for t in 0..trials {
                    let base = t * 1_000_000;
                    let shared = (size as f64 * keep) as u64;
                    let a: ShingleSet = (base..base + size).map(splitmix).collect();
                    let b: ShingleSet = (base..base + shared)
                        .chain(base + 500_000..base + 500_000 + size - shared)
                        .map(splitmix)
                        .collect();
                    let (sa, sb) = (signature(&a), signature(&b));
                    est += sa.iter().zip(&sb).filter(|(x, y)| x == y).count() as f64
                        / PERMUTATIONS as f64;
                    exact += jaccard(&a, &b);
                }
                let (est, exact) = (est / trials as f64, exact / trials as f64);
                assert!(
                    (est - exact).abs() < 0.03,
                    "size {size}: mean estimate {est:.3} vs Jaccard {exact:.3}"
                );
            }
        }
    }

    /// Short texts (fewer shingles than signature bins) are found as near-duplicates too.
    #[test]
    fn short_near_duplicates_are_found() {
        let mut index = NearDuplicates::new(0.8);
        let mut found = 0;
        for i in 0..50 {
            let words: Vec<String> = (0..40).map(|j| format!("s{i}w{j}")).collect();
            let mut edited = words.clone();
            edited[39] = "end".into();
            assert_eq!(index.check_and_insert(&words.join(" ")), None);
            found += usize::from(index.check_and_insert(&edited.join(" ")).is_some());
        }
        assert!(found >= 45, "found {found} of 50 pairs at Jaccard 0.9");
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
