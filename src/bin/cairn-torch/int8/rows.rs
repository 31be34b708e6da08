//! Row-wise kernels around the int8 product, each one pass over memory where libtorch
//! takes several: quantizing rows to int8 with one scale per row, and scaling the int32
//! product back to f32 fused with what follows it in a BERT layer (bias, GELU and the
//! next product's quantization; bias, residual and LayerNorm). Reranking 20 pairs spent
//! more time in these element-wise passes than in the products themselves.
//!
//! Rows are independent, so the kernels split them across libtorch's threads (see
//! `team`). [`Kernels::detect`] picks AVX-512 intrinsics where the CPU has them (the int8
//! path requires AVX512-VNNI anyway); the portable loops compute the same numbers.
//! Attention is here too: per sequence, over its real tokens only, straight from the
//! fused query/key/value product to the quantized context the next product reads.

/// The largest magnitude an int8 code takes (symmetric: -127..=127).
pub const LEVELS: f32 = 127.0;

/// Rows of at most this many elements are processed per task: enough work to
/// outweigh a task's overhead, small enough to balance two to sixteen threads.
const TASK_ELEMENTS: usize = 16 * 1024;

/// The scale back from one int32 product `acc` `[rows, out]`: `acc * row_scale[r] *
/// col_scale[c] + bias[c]`.
pub struct Product<'a> {
    /// The int32 product, row-major.
    pub acc: &'a [i32],
    /// One scale per row of the quantized input.
    pub row_scales: &'a [f32],
    /// One scale per output channel of the weights.
    pub col_scales: &'a [f32],
    /// One bias per output channel.
    pub bias: &'a [f32],
}

impl Product<'_> {
    fn cols(&self) -> usize {
        self.col_scales.len()
    }

    fn row(&self, r: usize) -> &[i32] {
        &self.acc[r * self.cols()..][..self.cols()]
    }
}

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

/// A mutable slice that the parts of a parallel loop write disjoint rows of.
struct Shared<'a, T> {
    ptr: *mut T,
    len: usize,
    _borrow: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: the parts only ever write disjoint rows (see `rows`).
unsafe impl<T: Send> Sync for Shared<'_, T> {}

impl<'a, T> Shared<'a, T> {
    fn new(slice: &'a mut [T]) -> Self {
        Self {
            ptr: slice.as_mut_ptr(),
            len: slice.len(),
            _borrow: std::marker::PhantomData,
        }
    }

    /// Rows `rows` of a `width`-wide row-major slice.
    ///
    /// # Safety
    /// No two live results may overlap.
    #[allow(clippy::mut_from_ref)]
    unsafe fn rows(&self, rows: &std::ops::Range<usize>, width: usize) -> &mut [T] {
        let (start, end) = (rows.start * width, rows.end * width);
        assert!(
            start <= end && end <= self.len,
            "rows {rows:?} out of bounds"
        );
        std::slice::from_raw_parts_mut(self.ptr.add(start), end - start)
    }
}

/// Splits `rows` rows of `cols` into blocks and runs `f` on each, on libtorch's threads.
fn blocks(rows: usize, cols: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
    let per = rows_per_task(cols);
    crate::int8::team::for_each_part(rows.div_ceil(per), &|part| {
        f(part * per..((part + 1) * per).min(rows))
    });
}

/// One sequence's working memory for [`attend`], kept per thread between calls (a fresh
/// allocation of this size is a fresh mapping, and its page faults cost more than the
/// attention).
#[derive(Default)]
struct AttentionScratch {
    /// Its query/key/value rows in f32, `[len, 3 * hidden]`.
    qkv: Vec<f32>,
    /// Keys transposed, `[hidden, stride]`, zero past `len`: a query's scores are then
    /// sums of scaled rows, which vectorize.
    keys_t: Vec<f32>,
    /// Scores of up to four queries over the keys, `[4, stride]`.
    scores: Vec<f32>,
    /// The context rows, `[queries, hidden]`.
    context: Vec<f32>,
    /// The keys' row length in `keys_t`: `len` rounded up to 16.
    stride: usize,
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

/// Quantized rows: int8 codes and one scale per row.
pub struct QuantizedOut<'a> {
    /// Codes `[rows, cols]`.
    pub codes: &'a mut [i8],
    /// Scales `[rows]`.
    pub scales: &'a mut [f32],
}

/// The kernels, compiled for the CPU they run on.
#[derive(Clone, Copy, Debug)]
pub struct Kernels {
    avx512: bool,
}

impl Kernels {
    /// Picks the AVX-512 build where the CPU has AVX512F/BW/VL and FMA.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let avx512 = std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("fma");
            Self { avx512 }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Self { avx512: false }
        }
    }

    /// The portable build (for tests that compare the two).
    #[cfg(test)]
    fn portable() -> Self {
        Self { avx512: false }
    }

    /// Quantizes each row of `x` (`cols` wide) to int8 codes with scale `absmax / 127`.
    pub fn quantize(&self, x: &[f32], cols: usize, out: QuantizedOut<'_>) {
        let (codes, scales) = (Shared::new(out.codes), Shared::new(out.scales));
        blocks(x.len() / cols.max(1), cols, &|rows| {
            // SAFETY: blocks hand out disjoint row ranges.
            let (codes, scales) = unsafe { (codes.rows(&rows, cols), scales.rows(&rows, 1)) };
            let x = &x[rows.start * cols..rows.end * cols];
            for ((x, codes), scale) in x
                .chunks_exact(cols)
                .zip(codes.chunks_exact_mut(cols))
                .zip(scales)
            {
                *scale = self.dispatch_quantize(x, codes);
            }
        });
    }

    /// `out = acc * row_scale * col_scale + bias`, f32 (the layers scale back inside the
    /// fused kernels; this plain form checks them).
    #[cfg(test)]
    pub fn dequantize(&self, p: &Product<'_>, out: &mut [f32]) {
        let cols = p.cols();
        let out = Shared::new(out);
        blocks(p.row_scales.len(), cols, &|rows| {
            // SAFETY: blocks hand out disjoint row ranges.
            let out = unsafe { out.rows(&rows, cols) };
            for (r, out) in rows.zip(out.chunks_exact_mut(cols)) {
                self.dispatch_dequantize(p.row(r), p.row_scales[r], p.col_scales, p.bias, out);
            }
        });
    }

    /// GELU (erf, or tanh when `tanh`) of the scaled product, quantized per row.
    pub fn dequantize_gelu_quantize(&self, p: &Product<'_>, tanh: bool, out: QuantizedOut<'_>) {
        let cols = p.cols();
        let (codes, scales) = (Shared::new(out.codes), Shared::new(out.scales));
        blocks(p.row_scales.len(), cols, &|rows| {
            // SAFETY: blocks hand out disjoint row ranges.
            let (codes, scales) = unsafe { (codes.rows(&rows, cols), scales.rows(&rows, 1)) };
            let mut row = vec![0f32; cols];
            for ((r, codes), scale) in rows.zip(codes.chunks_exact_mut(cols)).zip(scales) {
                self.dispatch_dequantize(p.row(r), p.row_scales[r], p.col_scales, p.bias, &mut row);
                self.dispatch_gelu(&mut row, tanh);
                *scale = self.dispatch_quantize(&row, codes);
            }
        });
    }

    /// `out = LayerNorm(acc * row_scale * col_scale + bias + residual)` with `gamma`,
    /// `beta` and `eps`, also quantized per row into `quantized` for the next product.
    #[allow(clippy::too_many_arguments)]
    pub fn dequantize_residual_norm(
        &self,
        p: &Product<'_>,
        residual: &[f32],
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
        out: &mut [f32],
        quantized: QuantizedOut<'_>,
    ) {
        let cols = p.cols();
        let out = Shared::new(out);
        let (codes, scales) = (Shared::new(quantized.codes), Shared::new(quantized.scales));
        blocks(p.row_scales.len(), cols, &|rows| {
            // SAFETY: blocks hand out disjoint row ranges.
            let (out, codes, scales) = unsafe {
                (
                    out.rows(&rows, cols),
                    codes.rows(&rows, cols),
                    scales.rows(&rows, 1),
                )
            };
            for (((r, out), codes), scale) in rows
                .zip(out.chunks_exact_mut(cols))
                .zip(codes.chunks_exact_mut(cols))
                .zip(scales)
            {
                self.dispatch_dequantize(p.row(r), p.row_scales[r], p.col_scales, p.bias, out);
                self.dispatch_add_norm(out, &residual[r * cols..][..cols], gamma, beta, eps);
                *scale = self.dispatch_quantize(out, codes);
            }
        });
    }

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
            return unsafe { avx512::attend(s, len, queries, hidden, heads) };
        }
        attend(s, len, queries, hidden, heads)
    }

    fn dispatch_quantize(&self, x: &[f32], codes: &mut [i8]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if self.avx512 {
            // SAFETY: `detect` found the features `avx512::quantize` is compiled for.
            return unsafe { avx512::quantize(x, codes) };
        }
        quantize_row(x, codes)
    }

    fn dispatch_dequantize(
        &self,
        acc: &[i32],
        row_scale: f32,
        col_scales: &[f32],
        bias: &[f32],
        out: &mut [f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        if self.avx512 {
            // SAFETY: as in `dispatch_quantize`.
            return unsafe { avx512::dequantize(acc, row_scale, col_scales, bias, out) };
        }
        dequantize_row(acc, row_scale, col_scales, bias, out)
    }

    fn dispatch_gelu(&self, x: &mut [f32], tanh: bool) {
        #[cfg(target_arch = "x86_64")]
        if self.avx512 {
            // SAFETY: as in `dispatch_quantize`.
            return unsafe { avx512::gelu(x, tanh) };
        }
        gelu_row(x, tanh)
    }

    fn dispatch_add_norm(
        &self,
        x: &mut [f32],
        residual: &[f32],
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
    ) {
        #[cfg(target_arch = "x86_64")]
        if self.avx512 {
            // SAFETY: as in `dispatch_quantize`.
            return unsafe { avx512::add_norm(x, residual, gamma, beta, eps) };
        }
        add_norm_row(x, residual, gamma, beta, eps)
    }
}

fn rows_per_task(cols: usize) -> usize {
    (TASK_ELEMENTS / cols.max(1)).max(1)
}

/// The rows' kernels in AVX-512 intrinsics, 16 lanes at a time, with masked loads and
/// stores for a row's tail. Each computes what its portable twin below does (the tests
/// compare them), rounding to nearest-even as both do.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    const LANES: usize = 16;

    /// The mask of the first `n` (< 16) lanes.
    #[inline(always)]
    fn tail_mask(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    unsafe fn load(p: &[f32], i: usize, n: usize) -> __m512 {
        if n == LANES {
            _mm512_loadu_ps(p.as_ptr().add(i))
        } else {
            _mm512_maskz_loadu_ps(tail_mask(n), p.as_ptr().add(i))
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    unsafe fn store(p: &mut [f32], i: usize, n: usize, v: __m512) {
        if n == LANES {
            _mm512_storeu_ps(p.as_mut_ptr().add(i), v)
        } else {
            _mm512_mask_storeu_ps(p.as_mut_ptr().add(i), tail_mask(n), v)
        }
    }

    /// Calls `f(offset, lanes)` over `len` in steps of 16 (the last step may be shorter).
    #[inline(always)]
    fn steps(len: usize, mut f: impl FnMut(usize, usize)) {
        let mut i = 0;
        while i < len {
            let n = LANES.min(len - i);
            f(i, n);
            i += n;
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    pub unsafe fn quantize(x: &[f32], codes: &mut [i8]) -> f32 {
        let len = x.len().min(codes.len());
        let mut max = _mm512_setzero_ps();
        steps(len, |i, n| {
            max = _mm512_max_ps(max, _mm512_abs_ps(load(x, i, n)))
        });
        let scale = _mm512_reduce_max_ps(max).max(1e-12) / super::LEVELS;
        let inverse = _mm512_set1_ps(1.0 / scale);
        steps(len, |i, n| {
            // The default rounding mode is to nearest-even; |codes| <= 127 by the scale.
            let codes32 = _mm512_cvtps_epi32(_mm512_mul_ps(load(x, i, n), inverse));
            _mm512_mask_cvtsepi32_storeu_epi8(
                codes.as_mut_ptr().add(i).cast(),
                tail_mask_or_all(n),
                codes32,
            );
        });
        scale
    }

    #[inline(always)]
    fn tail_mask_or_all(n: usize) -> __mmask16 {
        if n == LANES {
            0xffff
        } else {
            tail_mask(n)
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    pub unsafe fn dequantize(acc: &[i32], rs: f32, cs: &[f32], bias: &[f32], out: &mut [f32]) {
        let len = out.len().min(acc.len()).min(cs.len()).min(bias.len());
        let rs = _mm512_set1_ps(rs);
        steps(len, |i, n| {
            let a = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(
                tail_mask_or_all(n),
                acc.as_ptr().add(i).cast(),
            ));
            let v = _mm512_fmadd_ps(_mm512_mul_ps(a, rs), load(cs, i, n), load(bias, i, n));
            store(out, i, n, v);
        });
    }

    /// `e^x` as [`super::exp`] computes it, with `scalef` applying the power of two.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    unsafe fn exp(x: __m512) -> __m512 {
        let x = _mm512_min_ps(
            _mm512_max_ps(x, _mm512_set1_ps(-87.0)),
            _mm512_set1_ps(88.0),
        );
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(super::LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(super::LN2_LO), r);
        let mut p = _mm512_set1_ps(super::EXP_POLY[0]);
        for &c in &super::EXP_POLY[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let p = _mm512_add_ps(
            _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
            _mm512_set1_ps(1.0),
        );
        _mm512_scalef_ps(p, n)
    }

    /// As [`super::softmax_numerators`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    unsafe fn softmax_numerators(scores: &mut [f32], scale: f32) -> f32 {
        let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
        steps(scores.len(), |i, n| {
            max = _mm512_mask_max_ps(max, tail_mask_or_all(n), max, load(scores, i, n));
        });
        let max = _mm512_set1_ps(_mm512_reduce_max_ps(max));
        let scale = _mm512_set1_ps(scale);
        let mut sum = _mm512_setzero_ps();
        steps(scores.len(), |i, n| {
            let e = exp(_mm512_mul_ps(_mm512_sub_ps(load(scores, i, n), max), scale));
            let e = _mm512_maskz_mov_ps(tail_mask_or_all(n), e);
            sum = _mm512_add_ps(sum, e);
            store(scores, i, n, e);
        });
        _mm512_reduce_add_ps(sum)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    pub unsafe fn exp_slice(x: &mut [f32]) {
        steps(x.len(), |i, n| store(x, i, n, exp(load(x, i, n))));
    }

    /// Attention four queries at a time: their scores over 16 to 64 keys per step in
    /// 4 x `K` registers (each key vector loaded once for the four), then their context
    /// rows over all keys in 4 x `W` registers (`W` = head width / 16). Heads 16 to 64
    /// wide; others take the portable loops.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    pub(super) unsafe fn attend(
        s: &mut super::AttentionScratch,
        len: usize,
        queries: usize,
        hidden: usize,
        heads: usize,
    ) {
        let width = hidden / heads;
        match width {
            16 => attend_heads::<1>(s, len, queries, hidden, heads),
            32 => attend_heads::<2>(s, len, queries, hidden, heads),
            48 => attend_heads::<3>(s, len, queries, hidden, heads),
            64 => attend_heads::<4>(s, len, queries, hidden, heads),
            _ => super::attend(s, len, queries, hidden, heads),
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    unsafe fn attend_heads<const W: usize>(
        s: &mut super::AttentionScratch,
        len: usize,
        queries: usize,
        hidden: usize,
        heads: usize,
    ) {
        let width = W * LANES;
        let scale = 1.0 / (width as f32).sqrt();
        let stride = s.stride;
        let row = 3 * hidden;
        let qkv = s.qkv.as_ptr();
        for h in 0..heads {
            for q0 in (0..queries).step_by(4) {
                // Rows past the last query repeat it; their results are not stored.
                let rows: [usize; 4] = std::array::from_fn(|i| (q0 + i).min(queries - 1));
                let query: [*const f32; 4] = rows.map(|r| qkv.add(r * row + h * width));
                let mut k0 = 0;
                while k0 < stride {
                    match (stride - k0) / LANES {
                        1 => scores_block::<1>(s, query, h * width, width, k0),
                        2 => scores_block::<2>(s, query, h * width, width, k0),
                        3 => scores_block::<3>(s, query, h * width, width, k0),
                        _ => scores_block::<4>(s, query, h * width, width, k0),
                    }
                    k0 += 4 * LANES;
                }
                let mut inverse = [0f32; 4];
                for (i, inv) in inverse.iter_mut().enumerate() {
                    let scores = &mut s.scores[i * stride..][..len];
                    *inv = 1.0 / softmax_numerators(scores, scale);
                }
                let mut acc = [[_mm512_setzero_ps(); W]; 4];
                for j in 0..len {
                    let value = qkv.add(j * row + 2 * hidden + h * width);
                    let v: [__m512; W] =
                        std::array::from_fn(|c| _mm512_loadu_ps(value.add(c * LANES)));
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let p = _mm512_set1_ps(*s.scores.get_unchecked(i * stride + j));
                        for (a, v) in acc.iter_mut().zip(&v) {
                            *a = _mm512_fmadd_ps(p, *v, *a);
                        }
                    }
                }
                for (i, acc) in acc.iter().enumerate().take(queries - q0) {
                    let out = s.context.as_mut_ptr().add((q0 + i) * hidden + h * width);
                    let inv = _mm512_set1_ps(inverse[i]);
                    for (c, a) in acc.iter().enumerate() {
                        _mm512_storeu_ps(out.add(c * LANES), _mm512_mul_ps(*a, inv));
                    }
                }
            }
        }
    }

    /// Scores of four queries (pointers to their head's columns) over keys `k0..k0 + 16 K`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    unsafe fn scores_block<const K: usize>(
        s: &mut super::AttentionScratch,
        query: [*const f32; 4],
        first_col: usize,
        width: usize,
        k0: usize,
    ) {
        let stride = s.stride;
        let keys = s.keys_t.as_ptr().add(first_col * stride + k0);
        let mut acc = [[_mm512_setzero_ps(); K]; 4];
        for d in 0..width {
            let k: [__m512; K] =
                std::array::from_fn(|c| _mm512_loadu_ps(keys.add(d * stride + c * LANES)));
            for (i, acc) in acc.iter_mut().enumerate() {
                let q = _mm512_set1_ps(*query[i].add(d));
                for (a, k) in acc.iter_mut().zip(&k) {
                    *a = _mm512_fmadd_ps(q, *k, *a);
                }
            }
        }
        let scores = s.scores.as_mut_ptr();
        for (i, acc) in acc.iter().enumerate() {
            for (c, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(scores.add(i * stride + k0 + c * LANES), *a);
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    unsafe fn erf(x: __m512) -> __m512 {
        let a = _mm512_abs_ps(x);
        let one = _mm512_set1_ps(1.0);
        let t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(super::ERF_P), a, one));
        let mut r = _mm512_set1_ps(super::ERF_POLY[0]);
        for &c in &super::ERF_POLY[1..] {
            r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(c));
        }
        let e = exp(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(a, a)));
        let y = _mm512_fnmadd_ps(_mm512_mul_ps(r, t), e, one);
        // copysign(y, x): y >= 0.
        let sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(i32::MIN));
        _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(y), sign))
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    pub unsafe fn gelu(x: &mut [f32], tanh: bool) {
        let half = _mm512_set1_ps(0.5);
        let one = _mm512_set1_ps(1.0);
        steps(x.len(), |i, n| {
            let v = load(x, i, n);
            let g = if tanh {
                // x - x / (e^(2u) + 1), u = sqrt(2/pi) (x + 0.044715 x^3)
                let x2 = _mm512_mul_ps(v, v);
                let inner = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044_715), x2), v, v);
                let u2 = _mm512_mul_ps(inner, _mm512_set1_ps(2.0 * super::SQRT_2_OVER_PI));
                _mm512_sub_ps(v, _mm512_div_ps(v, _mm512_add_ps(exp(u2), one)))
            } else {
                let e = erf(_mm512_mul_ps(
                    v,
                    _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2),
                ));
                _mm512_mul_ps(_mm512_mul_ps(half, v), _mm512_add_ps(one, e))
            };
            store(x, i, n, g);
        });
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    pub unsafe fn add_norm(x: &mut [f32], residual: &[f32], gamma: &[f32], beta: &[f32], eps: f32) {
        let len = x.len().min(residual.len()).min(gamma.len()).min(beta.len());
        let mut sum = _mm512_setzero_ps();
        steps(len, |i, n| {
            let v = _mm512_add_ps(load(x, i, n), load(residual, i, n));
            store(x, i, n, v);
            sum = _mm512_add_ps(sum, v);
        });
        let mean = _mm512_reduce_add_ps(sum) / len as f32;
        let m = _mm512_set1_ps(mean);
        let mut squares = _mm512_setzero_ps();
        steps(len, |i, n| {
            // Masked-off lanes load 0 and would add mean^2: keep them at 0.
            let d = _mm512_maskz_sub_ps(tail_mask_or_all(n), load(x, i, n), m);
            squares = _mm512_fmadd_ps(d, d, squares);
        });
        let variance = _mm512_reduce_add_ps(squares) / len as f32;
        let inverse = _mm512_set1_ps(1.0 / (variance + eps).sqrt());
        steps(len, |i, n| {
            let d = _mm512_mul_ps(_mm512_sub_ps(load(x, i, n), m), inverse);
            store(
                x,
                i,
                n,
                _mm512_fmadd_ps(d, load(gamma, i, n), load(beta, i, n)),
            );
        });
    }
}

/// Lanes of the partial sums and maxima below: one AVX-512 register of f32.
const LANES: usize = 16;

#[inline(always)]
fn abs_max(x: &[f32]) -> f32 {
    // The bits of non-negative floats order as the floats do, and an integer maximum
    // vectorizes where a float one (NaN rules) does not.
    let mut lanes = [0u32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (m, v) in lanes.iter_mut().zip(chunk) {
            *m = (*m).max(v.to_bits() & 0x7fff_ffff);
        }
    }
    let mut m = lanes.into_iter().max().unwrap_or(0);
    for v in tail {
        m = m.max(v.to_bits() & 0x7fff_ffff);
    }
    f32::from_bits(m)
}

#[inline(always)]
fn quantize_row(x: &[f32], codes: &mut [i8]) -> f32 {
    let scale = abs_max(x).max(1e-12) / LEVELS;
    let inverse = 1.0 / scale;
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = (v * inverse).round_ties_even().clamp(-LEVELS, LEVELS) as i8;
    }
    scale
}

#[inline(always)]
fn dequantize_row(acc: &[i32], row_scale: f32, col_scales: &[f32], bias: &[f32], out: &mut [f32]) {
    for (((o, &a), &cs), &b) in out.iter_mut().zip(acc).zip(col_scales).zip(bias) {
        *o = (a as f32 * row_scale).mul_add(cs, b);
    }
}

#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (s, &v) in lanes.iter_mut().zip(chunk) {
            *s += f(v);
        }
    }
    lanes.iter().sum::<f32>() + tail.iter().map(|&v| f(v)).sum::<f32>()
}

#[inline(always)]
fn attend(s: &mut AttentionScratch, len: usize, queries: usize, hidden: usize, heads: usize) {
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
fn softmax_numerators(scores: &mut [f32], scale: f32) -> f32 {
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for score in scores.iter_mut() {
        *score = (*score - max) * scale;
    }
    exp_in_place(scores);
    lane_sum(scores, |v| v)
}

#[inline(always)]
fn exp_in_place(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked above; the check is a cached load).
        return unsafe { avx512::exp_slice(x) };
    }
    for v in x.iter_mut() {
        *v = exp(*v);
    }
}

#[inline(always)]
fn add_norm_row(x: &mut [f32], residual: &[f32], gamma: &[f32], beta: &[f32], eps: f32) {
    for (v, &r) in x.iter_mut().zip(residual) {
        *v += r;
    }
    let n = x.len() as f32;
    let mean = lane_sum(x, |v| v) / n;
    let variance = lane_sum(x, |v| (v - mean) * (v - mean)) / n;
    let inverse = 1.0 / (variance + eps).sqrt();
    for ((v, &g), &b) in x.iter_mut().zip(gamma).zip(beta) {
        *v = ((*v - mean) * inverse).mul_add(g, b);
    }
}

/// `e^x`, Cephes' single-precision polynomial after reducing by powers of two (relative
/// error ~1e-7 over the range GELU needs); branch-free so that it vectorizes.
#[inline(always)]
fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let p = EXP_POLY[1..]
        .iter()
        .fold(EXP_POLY[0], |p, &c| p.mul_add(r, c));
    let p = p.mul_add(r * r, r) + 1.0;
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// ln 2 split in two for an exact reduction `x - n ln 2`.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Cephes' `expf` polynomial, highest power first.
const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    5e-1,
];
/// Abramowitz and Stegun 7.1.26: `t = 1 / (1 + P |x|)` and its polynomial, highest first.
const ERF_P: f32 = 0.327_591_1;
const ERF_POLY: [f32; 5] = [
    1.061_405_4,
    -1.453_152,
    1.421_413_8,
    -0.284_496_74,
    0.254_829_6,
];
/// sqrt(2 / pi), the tanh approximation's factor.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// `erf(x)`: Abramowitz and Stegun 7.1.26 (absolute error < 1.5e-7), the formula
/// libtorch's vectorized CPU `erf` uses.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / ERF_P.mul_add(a, 1.0);
    let r = ERF_POLY[1..]
        .iter()
        .fold(ERF_POLY[0], |r, &c| r.mul_add(t, c));
    let y = (-(r * t)).mul_add(exp(-a * a), 1.0);
    y.copysign(x)
}

#[inline(always)]
fn gelu_row(x: &mut [f32], tanh: bool) {
    if tanh {
        // 0.5 x (1 + tanh(u)) = x - x / (e^(2u) + 1)
        for v in x.iter_mut() {
            let u = SQRT_2_OVER_PI * (0.044_715 * *v * *v).mul_add(*v, *v);
            *v -= *v / (exp(2.0 * u) + 1.0);
        }
    } else {
        for v in x.iter_mut() {
            *v = 0.5 * *v * (1.0 + erf(*v * std::f32::consts::FRAC_1_SQRT_2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn erf_f64(x: f64) -> f64 {
        // The Taylor series, good to 1e-10 for |x| < 4; beyond, erf is 1 within 2e-8.
        if x.abs() >= 4.0 {
            return x.signum();
        }
        let mut sum = x;
        let mut term = x;
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn exp_and_erf_are_close_to_double_precision() {
        for i in -4000..=4000 {
            let x = i as f32 / 400.0;
            let e = exp(x) as f64;
            let want = (x as f64).exp();
            assert!(
                (e - want).abs() <= 4e-7 * want,
                "exp({x}) = {e}, want {want}"
            );
            let got = erf(x) as f64;
            let want = erf_f64(x as f64);
            assert!((got - want).abs() < 5e-7, "erf({x}) = {got}, want {want}");
        }
        assert!(exp(-200.0) < 1e-37, "exp(-200) = {}", exp(-200.0));
    }

    fn sample(rows: usize, cols: usize, seed: u32) -> Vec<f32> {
        let mut state = seed;
        (0..rows * cols)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 8) as f32 / (1 << 24) as f32 * 8.0 - 4.0
            })
            .collect()
    }

    #[test]
    fn rows_quantize_to_their_own_scale() {
        let (rows, cols) = (37, 50);
        let x = sample(rows, cols, 1);
        for kernels in [Kernels::detect(), Kernels::portable()] {
            let (mut codes, mut scales) = (vec![0i8; rows * cols], vec![0f32; rows]);
            kernels.quantize(
                &x,
                cols,
                QuantizedOut {
                    codes: &mut codes,
                    scales: &mut scales,
                },
            );
            for r in 0..rows {
                let row = &x[r * cols..][..cols];
                let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert!((scales[r] - max / 127.0).abs() < 1e-7, "row {r}");
                for c in 0..cols {
                    let back = codes[r * cols + c] as f32 * scales[r];
                    assert!(
                        (back - row[c]).abs() <= scales[r] / 2.0 + 1e-6,
                        "row {r} col {c}"
                    );
                }
                assert!(codes[r * cols..][..cols].iter().any(|&c| c.abs() == 127));
            }
        }
    }

    #[test]
    fn the_fused_gelu_and_norm_match_their_plain_forms() {
        let (rows, cols) = (9, 40);
        let acc: Vec<i32> = sample(rows, cols, 2)
            .iter()
            .map(|v| (v * 300.0) as i32)
            .collect();
        let row_scales: Vec<f32> = (0..rows).map(|r| 1e-3 * (r + 1) as f32).collect();
        let col_scales: Vec<f32> = (0..cols).map(|c| 0.2 + 0.01 * c as f32).collect();
        let bias = sample(1, cols, 3);
        let p = Product {
            acc: &acc,
            row_scales: &row_scales,
            col_scales: &col_scales,
            bias: &bias,
        };
        let plain = |r: usize, c: usize| {
            acc[r * cols + c] as f64 * row_scales[r] as f64 * col_scales[c] as f64 + bias[c] as f64
        };
        for kernels in [Kernels::detect(), Kernels::portable()] {
            let mut out = vec![0f32; rows * cols];
            kernels.dequantize(&p, &mut out);
            for r in 0..rows {
                for c in 0..cols {
                    assert!((out[r * cols + c] as f64 - plain(r, c)).abs() < 1e-4);
                }
            }
            for tanh in [false, true] {
                let (mut codes, mut scales) = (vec![0i8; rows * cols], vec![0f32; rows]);
                kernels.dequantize_gelu_quantize(
                    &p,
                    tanh,
                    QuantizedOut {
                        codes: &mut codes,
                        scales: &mut scales,
                    },
                );
                for r in 0..rows {
                    for c in 0..cols {
                        let x = plain(r, c);
                        let want = if tanh {
                            0.5 * x
                                * (1.0
                                    + ((2.0 / std::f64::consts::PI).sqrt()
                                        * (x + 0.044715 * x * x * x))
                                        .tanh())
                        } else {
                            0.5 * x * (1.0 + erf_f64(x / 2f64.sqrt()))
                        };
                        let got = codes[r * cols + c] as f64 * scales[r] as f64;
                        assert!(
                            (got - want).abs() <= scales[r] as f64 / 2.0 + 1e-5,
                            "tanh {tanh} row {r} col {c}: {got} vs {want}"
                        );
                    }
                }
            }
            let residual = sample(rows, cols, 4);
            let gamma = sample(1, cols, 5);
            let beta = sample(1, cols, 6);
            let mut normed = vec![0f32; rows * cols];
            let (mut codes, mut scales) = (vec![0i8; rows * cols], vec![0f32; rows]);
            kernels.dequantize_residual_norm(
                &p,
                &residual,
                &gamma,
                &beta,
                1e-12,
                &mut normed,
                QuantizedOut {
                    codes: &mut codes,
                    scales: &mut scales,
                },
            );
            for r in 0..rows {
                let v: Vec<f64> = (0..cols)
                    .map(|c| plain(r, c) + residual[r * cols + c] as f64)
                    .collect();
                let mean = v.iter().sum::<f64>() / cols as f64;
                let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / cols as f64;
                for c in 0..cols {
                    let want =
                        (v[c] - mean) / (var + 1e-12).sqrt() * gamma[c] as f64 + beta[c] as f64;
                    assert!(
                        (normed[r * cols + c] as f64 - want).abs() < 1e-4,
                        "row {r} col {c}"
                    );
                    let back = codes[r * cols + c] as f64 * scales[r] as f64;
                    assert!(
                        (back - normed[r * cols + c] as f64).abs() <= scales[r] as f64 / 2.0 + 1e-6
                    );
                }
            }
        }
    }
}
