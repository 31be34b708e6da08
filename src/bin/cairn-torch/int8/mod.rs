//! Dynamically quantized int8 linear layers for CPU inference: weights quantized once to
//! int8 with one scale per output channel, activations quantized per row (token) at run
//! time, the product computed by libtorch's `_int_mm` (int8 x int8 -> int32, oneDNN's
//! VNNI kernels on x86) and scaled back to f32. Symmetric scales on both sides keep the
//! product free of zero-point corrections; per-row and per-channel scales are finer than
//! PyTorch's `quantize_dynamic` default (one scale per tensor), so the error is smaller.
//!
//! What lies between two products is fused into one pass each (`rows`, `attention`,
//! `math`, in AVX-512 intrinsics in `avx512`), run on libtorch's own threads (`team`).

mod attention;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod math;
mod rows;
mod team;

use tch::kind::Element;
use tch::{Device, Kind, Tensor};

pub use attention::Sequences;
use rows::{Kernels, Product, QuantizedOut, LEVELS};

/// Whether this CPU runs libtorch's int8 product fast: `_int_mm` uses oneDNN only where
/// AVX512-VNNI is present and falls back to a scalar loop (slower than f32) elsewhere.
pub fn fast_on_this_cpu() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The elements of a contiguous CPU tensor of kind `T`.
fn elements<T: Element>(t: &Tensor) -> Result<&[T], tch::TchError> {
    check::<T>(t)?;
    let n = t.numel();
    // SAFETY: `check` found a contiguous CPU tensor of `T`s holding `n` elements from
    // `data_ptr`, which lives as long as the borrow of `t`.
    Ok(unsafe { std::slice::from_raw_parts(t.data_ptr() as *const T, n) })
}

/// As [`elements`], writable: only for tensors this module just allocated, which share
/// their storage with no other tensor.
fn elements_mut<T: Element>(t: &mut Tensor) -> Result<&mut [T], tch::TchError> {
    check::<T>(t)?;
    let n = t.numel();
    // SAFETY: as in `elements`; the exclusive borrow of `t` and the fresh allocation
    // make this the only view of the storage.
    Ok(unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut T, n) })
}

fn check<T: Element>(t: &Tensor) -> Result<(), tch::TchError> {
    if t.kind() != T::KIND || t.device() != Device::Cpu || !t.is_contiguous() {
        return Err(tch::TchError::Kind(format!(
            "int8 kernels need a contiguous CPU tensor of {:?}, got {:?} on {:?}",
            T::KIND,
            t.kind(),
            t.device()
        )));
    }
    Ok(())
}

/// Activations `[rows, cols]` quantized to int8 with one scale per row.
pub struct QuantizedRows {
    codes: Tensor,
    scales: Tensor,
}

impl QuantizedRows {
    fn empty(rows: i64, cols: i64) -> Self {
        Self {
            codes: Tensor::empty([rows, cols], (Kind::Int8, Device::Cpu)),
            scales: Tensor::empty([rows], (Kind::Float, Device::Cpu)),
        }
    }

    fn out(&mut self) -> Result<QuantizedOut<'_>, tch::TchError> {
        Ok(QuantizedOut {
            codes: elements_mut(&mut self.codes)?,
            scales: elements_mut(&mut self.scales)?,
        })
    }

    /// Quantizes the rows of f32 `x` `[.., cols]` (leading dimensions flattened).
    pub fn quantize(x: &Tensor) -> Result<Self, tch::TchError> {
        let cols = *x.size().last().unwrap_or(&1);
        let x = x.f_reshape([-1, cols])?.f_contiguous()?;
        let mut q = Self::empty(x.size()[0], cols);
        Kernels::detect().quantize(elements(&x)?, cols as usize, q.out()?);
        Ok(q)
    }
}

/// A linear layer `y = x W^T + b` with int8 weights.
pub struct Int8Linear {
    /// Quantized weights transposed to `[in, out]`, the layout `_int_mm` multiplies by.
    weight_t: Tensor,
    /// One f32 scale per output channel `[out]`.
    scale: Tensor,
    /// f32 bias `[out]`.
    bias: Tensor,
    kernels: Kernels,
}

impl Int8Linear {
    /// Quantizes an f32 (or any float) `weight` `[out, in]` with its `bias` `[out]`.
    pub fn quantize(weight: &Tensor, bias: &Tensor) -> Result<Self, tch::TchError> {
        let weight = weight.f_to_kind(Kind::Float)?;
        let scale = weight
            .f_abs()?
            .f_amax([1].as_slice(), false)?
            .f_clamp_min(1e-12)?
            .f_div_scalar(f64::from(LEVELS))?;
        let codes = weight
            .f_div(&scale.f_unsqueeze(1)?)?
            .f_round()?
            .f_clamp(-f64::from(LEVELS), f64::from(LEVELS))?
            .f_to_kind(Kind::Int8)?;
        Ok(Self {
            weight_t: codes.f_transpose(0, 1)?.f_contiguous()?,
            scale: scale.f_contiguous()?,
            bias: bias.f_to_kind(Kind::Float)?.f_contiguous()?,
            kernels: Kernels::detect(),
        })
    }

    fn outputs(&self) -> i64 {
        self.scale.size()[0]
    }

    /// The int32 product of quantized rows and the weights, with what scales it back.
    fn product<'a>(
        &'a self,
        x: &'a QuantizedRows,
        acc: &'a Tensor,
    ) -> Result<Product<'a>, tch::TchError> {
        Ok(Product {
            acc: elements(acc)?,
            row_scales: elements(&x.scales)?,
            col_scales: elements(&self.scale)?,
            bias: elements(&self.bias)?,
        })
    }

    fn int_mm(&self, x: &QuantizedRows) -> Result<Tensor, tch::TchError> {
        x.codes.f_internal_int_mm(&self.weight_t)?.f_contiguous()
    }

    /// `x W^T + b` for rows already quantized, f32 `[rows, out]` (the layers use the
    /// fused forms below; this plain one checks the scheme).
    #[cfg(test)]
    pub fn forward_quantized(&self, x: &QuantizedRows) -> Result<Tensor, tch::TchError> {
        let acc = self.int_mm(x)?;
        let mut out = Tensor::empty(acc.size(), (Kind::Float, Device::Cpu));
        self.kernels
            .dequantize(&self.product(x, &acc)?, elements_mut(&mut out)?);
        Ok(out)
    }

    /// Multi-head attention (`heads` heads) from this layer's fused query/key/value
    /// product of `x` (`[rows, in]`): each of `sequences` attends over its own rows. The
    /// context comes out quantized for the next product, `[rows, hidden]` (rows no
    /// sequence covers are zero), or `[sequences, hidden]` with each one's first row
    /// when `first_only`.
    pub fn forward_attention(
        &self,
        x: &QuantizedRows,
        sequences: &Sequences,
        heads: usize,
        first_only: bool,
    ) -> Result<QuantizedRows, tch::TchError> {
        let acc = self.int_mm(x)?;
        let hidden = self.outputs() / 3;
        let rows = if first_only {
            sequences.len() as i64
        } else {
            acc.size()[0]
        };
        let mut out = QuantizedRows {
            codes: Tensor::zeros([rows, hidden], (Kind::Int8, Device::Cpu)),
            scales: Tensor::ones([rows], (Kind::Float, Device::Cpu)),
        };
        self.kernels.attention(
            &self.product(x, &acc)?,
            sequences,
            heads,
            first_only,
            out.out()?,
        );
        Ok(out)
    }

    /// `gelu(x W^T + b)` (erf, or its tanh approximation), quantized for the next product.
    pub fn forward_gelu(
        &self,
        x: &QuantizedRows,
        tanh: bool,
    ) -> Result<QuantizedRows, tch::TchError> {
        let acc = self.int_mm(x)?;
        let mut out = QuantizedRows::empty(acc.size()[0], self.outputs());
        self.kernels
            .dequantize_gelu_quantize(&self.product(x, &acc)?, tanh, out.out()?);
        Ok(out)
    }

    /// `LayerNorm(x W^T + b + residual)` with the norm's `weight` and `bias` (f32
    /// `[rows, out]`), and the same rows quantized for the next product.
    pub fn forward_residual_norm(
        &self,
        x: &QuantizedRows,
        residual: &Tensor,
        norm_weight: &Tensor,
        norm_bias: &Tensor,
        eps: f64,
    ) -> Result<(Tensor, QuantizedRows), tch::TchError> {
        let acc = self.int_mm(x)?;
        let residual = residual.f_reshape(acc.size())?.f_contiguous()?;
        let (gamma, beta) = (norm_weight.f_contiguous()?, norm_bias.f_contiguous()?);
        let mut out = Tensor::empty(acc.size(), (Kind::Float, Device::Cpu));
        let mut quantized = QuantizedRows::empty(acc.size()[0], self.outputs());
        self.kernels.dequantize_residual_norm(
            &self.product(x, &acc)?,
            elements(&residual)?,
            elements(&gamma)?,
            elements(&beta)?,
            eps as f32,
            elements_mut(&mut out)?,
            quantized.out()?,
        );
        Ok((out, quantized))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_int8_product_is_close_to_the_f32_one() {
        tch::manual_seed(7);
        let weight = Tensor::randn([48, 64], (Kind::Float, tch::Device::Cpu));
        let bias = Tensor::randn([48], (Kind::Float, tch::Device::Cpu));
        let x = Tensor::randn([3, 5, 64], (Kind::Float, tch::Device::Cpu));
        let exact = x.linear(&weight, Some(&bias));
        let approx = Int8Linear::quantize(&weight, &bias)
            .unwrap()
            .forward_quantized(&QuantizedRows::quantize(&x).unwrap())
            .unwrap()
            .view([3, 5, 48]);
        let err = (&approx - &exact).abs().max().double_value(&[]);
        let magnitude = exact.abs().max().double_value(&[]);
        // Two roundings of at most half a step each: well under 2% of the output range.
        assert!(err < 0.02 * magnitude, "max error {err} of {magnitude}");
        assert!(err > 0.0, "the product was not quantized");
    }

    #[test]
    fn the_fused_products_are_close_to_their_f32_forms() {
        tch::manual_seed(11);
        let cpu = (Kind::Float, tch::Device::Cpu);
        let up = (
            Tensor::randn([96, 32], cpu) * 0.2,
            Tensor::randn([96], cpu) * 0.1,
        );
        let down = (
            Tensor::randn([32, 96], cpu) * 0.2,
            Tensor::randn([32], cpu) * 0.1,
        );
        let (gamma, beta) = (Tensor::randn([32], cpu), Tensor::randn([32], cpu));
        let x = Tensor::randn([10, 32], cpu);
        let close = |approx: &Tensor, exact: &Tensor, what: &str| {
            let err = (approx - exact).abs().max().double_value(&[]);
            let magnitude = exact.abs().max().double_value(&[]);
            assert!(
                err < 0.03 * magnitude,
                "{what}: max error {err} of {magnitude}"
            );
        };
        let (up_q, down_q) = (
            Int8Linear::quantize(&up.0, &up.1).unwrap(),
            Int8Linear::quantize(&down.0, &down.1).unwrap(),
        );
        let xq = QuantizedRows::quantize(&x).unwrap();
        for tanh in [false, true] {
            let exact = x
                .linear(&up.0, Some(&up.1))
                .gelu(if tanh { "tanh" } else { "none" });
            let fused = up_q.forward_gelu(&xq, tanh).unwrap();
            let approx = fused.codes.to_kind(Kind::Float) * fused.scales.unsqueeze(1);
            close(&approx, &exact, "gelu");
        }
        let inner = x.linear(&up.0, Some(&up.1));
        let inner_q = QuantizedRows::quantize(&inner).unwrap();
        let exact = (inner.linear(&down.0, Some(&down.1)) + &x).layer_norm(
            [32],
            Some(&gamma),
            Some(&beta),
            1e-12,
            false,
        );
        let (normed, requantized) = down_q
            .forward_residual_norm(&inner_q, &x, &gamma, &beta, 1e-12)
            .unwrap();
        close(&normed, &exact, "residual + norm");
        let back = requantized.codes.to_kind(Kind::Float) * requantized.scales.unsqueeze(1);
        close(&back, &normed, "the norm's quantized rows");
    }

    #[test]
    fn attention_over_real_tokens_matches_libtorch() {
        tch::manual_seed(5);
        let cpu = (Kind::Float, tch::Device::Cpu);
        let (sequences, seq, hidden, heads) = (3i64, 8i64, 32i64, 4i64);
        let lengths = [5usize, 8, 3];
        let (w, b) = (
            Tensor::randn([3 * hidden, hidden], cpu) * 0.3,
            Tensor::randn([3 * hidden], cpu) * 0.1,
        );
        let x = Tensor::randn([sequences * seq, hidden], cpu);
        let fused = Int8Linear::quantize(&w, &b).unwrap();
        let xq = QuantizedRows::quantize(&x).unwrap();
        let mask = Tensor::from_slice(
            &lengths
                .iter()
                .flat_map(|&n| (0..seq as usize).map(move |i| i < n))
                .collect::<Vec<bool>>(),
        )
        .view([sequences, 1, 1, seq]);
        let split = |t: Tensor| {
            t.view([sequences, seq, heads, hidden / heads])
                .transpose(1, 2)
        };
        let parts = x.linear(&w, Some(&b)).split(hidden, -1);
        let exact = Tensor::scaled_dot_product_attention(
            &split(parts[0].shallow_clone()),
            &split(parts[1].shallow_clone()),
            &split(parts[2].shallow_clone()),
            Some(&mask),
            0.0,
            false,
            None,
            false,
        )
        .transpose(1, 2)
        .reshape([sequences, seq, hidden]);
        let magnitude = exact.abs().max().double_value(&[]);
        // The AVX-512 build (where the CPU has it) and the portable loops alike.
        let mut builds = vec![fused];
        let mut portable = Int8Linear::quantize(&w, &b).unwrap();
        portable.kernels = Kernels::portable();
        builds.push(portable);
        for (fused, first_only) in builds.iter().flat_map(|f| [(f, false), (f, true)]) {
            let context = fused
                .forward_attention(
                    &xq,
                    &Sequences::padded(lengths.to_vec(), seq as usize),
                    heads as usize,
                    first_only,
                )
                .unwrap();
            let got = context.codes.to_kind(Kind::Float) * context.scales.unsqueeze(1);
            for (s, &n) in lengths.iter().enumerate() {
                let rows = if first_only { 1 } else { n as i64 };
                let got = if first_only {
                    got.narrow(0, s as i64, 1)
                } else {
                    got.narrow(0, s as i64 * seq, rows)
                };
                let want = exact.get(s as i64).narrow(0, 0, rows);
                let err = (&got - &want).abs().max().double_value(&[]);
                assert!(
                    err < 0.03 * magnitude,
                    "sequence {s} (first only: {first_only}): error {err} of {magnitude}"
                );
                if !first_only && n < seq as usize {
                    let pad = context
                        .codes
                        .narrow(0, s as i64 * seq + n as i64, seq - n as i64);
                    assert_eq!(
                        pad.abs().sum(Kind::Int64).int64_value(&[]),
                        0,
                        "padding rows are zero"
                    );
                }
            }
        }
    }
}
