//! Row-wise kernels around the int8 product, each one pass over memory where libtorch
//! takes several: quantizing rows to int8 with one scale per row, and scaling the int32
//! product back to f32 fused with what follows it in a BERT layer (bias, GELU and the
//! next product's quantization; bias, residual and LayerNorm). Reranking 20 pairs spent
//! more time in these element-wise passes than in the products themselves.
//!
//! Rows are independent, so the kernels split them across libtorch's threads (see
//! `team`). [`Kernels::detect`] picks AVX-512 intrinsics where the CPU has them (the int8
//! path requires AVX512-VNNI anyway); the portable loops compute the same numbers.
//! Attention, the other pass between two products, is in `attention.rs`.

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
    pub(super) fn cols(&self) -> usize {
        self.col_scales.len()
    }

    pub(super) fn row(&self, r: usize) -> &[i32] {
        &self.acc[r * self.cols()..][..self.cols()]
    }
}

/// A mutable slice that the parts of a parallel loop write disjoint rows of.
pub(super) struct Shared<'a, T> {
    ptr: *mut T,
    len: usize,
    _borrow: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: the parts only ever write disjoint rows (see `rows`).
unsafe impl<T: Send> Sync for Shared<'_, T> {}

impl<'a, T> Shared<'a, T> {
    pub(super) fn new(slice: &'a mut [T]) -> Self {
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
    pub(super) unsafe fn rows(&self, rows: &std::ops::Range<usize>, width: usize) -> &mut [T] {
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
    pub(super) avx512: bool,
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
    pub(super) fn portable() -> Self {
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

    pub(super) fn dispatch_quantize(&self, x: &[f32], codes: &mut [i8]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if self.avx512 {
            // SAFETY: `detect` found the features `super::avx512::quantize` is compiled for.
            return unsafe { super::avx512::quantize(x, codes) };
        }
        quantize_row(x, codes)
    }

    pub(super) fn dispatch_dequantize(
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
            return unsafe { super::avx512::dequantize(acc, row_scale, col_scales, bias, out) };
        }
        dequantize_row(acc, row_scale, col_scales, bias, out)
    }

    fn dispatch_gelu(&self, x: &mut [f32], tanh: bool) {
        #[cfg(target_arch = "x86_64")]
        if self.avx512 {
            // SAFETY: as in `dispatch_quantize`.
            return unsafe { super::avx512::gelu(x, tanh) };
        }
        super::math::gelu_row(x, tanh)
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
            return unsafe { super::avx512::add_norm(x, residual, gamma, beta, eps) };
        }
        add_norm_row(x, residual, gamma, beta, eps)
    }
}

fn rows_per_task(cols: usize) -> usize {
    (TASK_ELEMENTS / cols.max(1)).max(1)
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
pub(super) fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::int8::math::erf_f64;

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
