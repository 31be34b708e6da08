//! Multi-head attention for the int8 encoder, per sequence over its own rows only (the
//! batch is packed: no padding), straight from the fused query/key/value product's int32
//! rows to the quantized context the next product reads.

use super::math::exp_in_place;
use super::rows::{lane_sum, Kernels, Product, QuantizedOut, Shared};

/// Where each sequence's rows lie among the rows of a batch: packed one after another
/// (only real tokens) or at a fixed stride (padded).
pub struct Sequences {
    starts: Vec<usize>,
    lengths: Vec<usize>,
}

impl Sequences {
    /// Sequences of `lengths` (each at least 1) packed one after another.
    pub fn packed(lengths: Vec<usize>) -> Self {
        let starts = lengths
            .iter()
            .scan(0, |next, &n| {
                let start = *next;
                *next += n;
                Some(start)
            })
            .collect();
        Self { starts, lengths }
    }

    /// Sequences of `lengths` each starting a multiple of `stride` rows in.
    #[cfg(test)]
    pub fn padded(lengths: Vec<usize>, stride: usize) -> Self {
        let starts = (0..lengths.len()).map(|s| s * stride).collect();
        Self { starts, lengths }
    }

    /// How many sequences.
    pub fn len(&self) -> usize {
        self.lengths.len()
    }

    /// The rows of sequence `s`.
    pub fn rows(&self, s: usize) -> std::ops::Range<usize> {
        self.starts[s]..self.starts[s] + self.lengths[s]
    }

    /// Each sequence's first row.
    pub fn starts(&self) -> &[usize] {
        &self.starts
    }
}

/// One sequence's working memory for [`attend`], kept per thread between calls (a fresh
/// allocation of this size is a fresh mapping, and its page faults cost more than the
/// attention).
#[derive(Default)]
pub(super) struct AttentionScratch {
    /// Its query/key/value rows in f32, `[len, 3 * hidden]`.
    pub(super) qkv: Vec<f32>,
    /// Keys transposed, `[hidden, stride]`, zero past `len`: a query's scores are then
    /// sums of scaled rows, which vectorize.
    pub(super) keys_t: Vec<f32>,
    /// Scores of up to four queries over the keys, `[4, stride]`.
    pub(super) scores: Vec<f32>,
    /// The context rows, `[queries, hidden]`.
    pub(super) context: Vec<f32>,
    /// The keys' row length in `keys_t`: `len` rounded up to 16.
    pub(super) stride: usize,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<AttentionScratch> = std::cell::RefCell::default();
}

impl AttentionScratch {
    /// Sizes the buffers for a sequence of `len` tokens and `queries` queries, and fills
    /// `keys_t` from `qkv` once that holds the sequence.
    fn prepare(&mut self, len: usize, queries: usize, hidden: usize) {
        self.stride = len.next_multiple_of(16);
        self.qkv.resize(len * 3 * hidden, 0.0);
        self.scores.resize(4 * self.stride, 0.0);
        self.context.clear();
        self.context.resize(queries * hidden, 0.0);
    }

    fn transpose_keys(&mut self, len: usize, hidden: usize) {
        self.keys_t.clear();
        self.keys_t.resize(hidden * self.stride, 0.0);
        for (j, row) in self.qkv.chunks_exact(3 * hidden).take(len).enumerate() {
            for (d, &k) in row[hidden..2 * hidden].iter().enumerate() {
                self.keys_t[d * self.stride + j] = k;
            }
        }
    }
}

impl Kernels {
    /// Multi-head attention from the fused query/key/value product `qkv` (`[rows, 3 *
    /// hidden]`, queries then keys then values): the queries of each sequence in
    /// `sequences` attend over its own rows, scaled by `1/sqrt(head width)`. The context
    /// rows come out quantized in the rows the sequences occupy (other rows are left as
    /// they are), or, when `first_only`, only each sequence's first query into row `s`.
    pub fn attention(
        &self,
        qkv: &Product<'_>,
        sequences: &Sequences,
        heads: usize,
        first_only: bool,
        out: QuantizedOut<'_>,
    ) {
        let hidden = qkv.cols() / 3;
        let (codes, scales) = (Shared::new(out.codes), Shared::new(out.scales));
        crate::int8::team::for_each_part(sequences.len(), &|s| {
            let rows = sequences.rows(s);
            let len = rows.len();
            let queries = if first_only { 1 } else { len };
            let out_rows = if first_only { s..s + 1 } else { rows.clone() };
            // SAFETY: each sequence writes its own rows.
            let (codes, scales) =
                unsafe { (codes.rows(&out_rows, hidden), scales.rows(&out_rows, 1)) };
            SCRATCH.with_borrow_mut(|scratch| {
                scratch.prepare(len, queries, hidden);
                for (i, r) in rows.clone().enumerate() {
                    let row = &mut scratch.qkv[i * 3 * hidden..][..3 * hidden];
                    self.dispatch_dequantize(
                        qkv.row(r),
                        qkv.row_scales[r],
                        qkv.col_scales,
                        qkv.bias,
                        row,
                    );
                }
                scratch.transpose_keys(len, hidden);
                self.dispatch_attend(scratch, len, queries, hidden, heads);
                for ((context, codes), scale) in scratch
                    .context
                    .chunks_exact(hidden)
                    .zip(codes.chunks_exact_mut(hidden))
                    .zip(scales.iter_mut())
                {
                    *scale = self.dispatch_quantize(context, codes);
                }
            });
        });
    }

    fn dispatch_attend(
        &self,
        s: &mut AttentionScratch,
        len: usize,
        queries: usize,
        hidden: usize,
        heads: usize,
    ) {
        #[cfg(target_arch = "x86_64")]
        if self.avx512 {
            // SAFETY: as in `dispatch_quantize`.
            return unsafe { super::avx512::attend(s, len, queries, hidden, heads) };
        }
        attend(s, len, queries, hidden, heads)
    }
}

#[inline(always)]
pub(super) fn attend(
    s: &mut AttentionScratch,
    len: usize,
    queries: usize,
    hidden: usize,
    heads: usize,
) {
    let width = hidden / heads;
    let scale = 1.0 / (width as f32).sqrt();
    let stride = s.stride;
    for i in 0..queries {
        let query = &s.qkv[i * 3 * hidden..][..hidden];
        let context = &mut s.context[i * hidden..][..hidden];
        for h in 0..heads {
            let cols = h * width..(h + 1) * width;
            let scores = &mut s.scores[..len];
            scores.fill(0.0);
            for (d, &q) in query[cols.clone()].iter().enumerate() {
                let keys = &s.keys_t[(h * width + d) * stride..][..len];
                for (score, &k) in scores.iter_mut().zip(keys) {
                    *score = q.mul_add(k, *score);
                }
            }
            let total = softmax_numerators(scores, scale);
            let context = &mut context[cols.clone()];
            for (j, &p) in scores.iter().enumerate() {
                let value = &s.qkv[j * 3 * hidden + 2 * hidden..][cols.clone()];
                for (c, &v) in context.iter_mut().zip(value) {
                    *c = p.mul_add(v, *c);
                }
            }
            for c in context.iter_mut() {
                *c /= total;
            }
        }
    }
}

/// Replaces raw scores by `exp((score - max) * scale)` and returns their sum.
#[inline(always)]
pub(super) fn softmax_numerators(scores: &mut [f32], scale: f32) -> f32 {
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for score in scores.iter_mut() {
        *score = (*score - max) * scale;
    }
    exp_in_place(scores);
    lane_sum(scores, |v| v)
}
