//! The int8 kernels in AVX-512 intrinsics, 16 lanes at a time, with masked loads and
//! stores for a row's tail. Each computes what its portable twin in `rows.rs`, `math.rs`
//! or `attention.rs` does (the tests compare them), rounding to nearest-even as both do.

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
    let scale = _mm512_reduce_max_ps(max).max(1e-12) / super::rows::LEVELS;
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

/// `e^x` as [`super::math::exp`] computes it, with `scalef` applying the power of two.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
unsafe fn exp(x: __m512) -> __m512 {
    let x = _mm512_min_ps(
        _mm512_max_ps(x, _mm512_set1_ps(-87.0)),
        _mm512_set1_ps(88.0),
    );
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(super::math::LN2_HI), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(super::math::LN2_LO), r);
    let mut p = _mm512_set1_ps(super::math::EXP_POLY[0]);
    for &c in &super::math::EXP_POLY[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let p = _mm512_add_ps(
        _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
        _mm512_set1_ps(1.0),
    );
    _mm512_scalef_ps(p, n)
}

/// As [`super::attention::softmax_numerators`].
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
    s: &mut super::attention::AttentionScratch,
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
        _ => super::attention::attend(s, len, queries, hidden, heads),
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
unsafe fn attend_heads<const W: usize>(
    s: &mut super::attention::AttentionScratch,
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
                let v: [__m512; W] = std::array::from_fn(|c| _mm512_loadu_ps(value.add(c * LANES)));
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
    s: &mut super::attention::AttentionScratch,
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
    let t = _mm512_div_ps(
        one,
        _mm512_fmadd_ps(_mm512_set1_ps(super::math::ERF_P), a, one),
    );
    let mut r = _mm512_set1_ps(super::math::ERF_POLY[0]);
    for &c in &super::math::ERF_POLY[1..] {
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
            let u2 = _mm512_mul_ps(inner, _mm512_set1_ps(2.0 * super::math::SQRT_2_OVER_PI));
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
