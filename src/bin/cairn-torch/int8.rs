//! Dynamically quantized int8 linear layers for CPU inference: weights quantized once to
//! int8 with one scale per output channel, activations quantized per row (token) at run
//! time, the product computed by libtorch's `_int_mm` (int8 x int8 -> int32, oneDNN's
//! VNNI kernels on x86) and scaled back to f32. Symmetric scales on both sides keep the
//! product free of zero-point corrections; per-row and per-channel scales are finer than
//! PyTorch's `quantize_dynamic` default (one scale per tensor), so the error is smaller.

use tch::{Kind, Tensor};

/// The largest magnitude an int8 code takes (symmetric: -127..=127).
const LEVELS: f64 = 127.0;

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

/// A linear layer `y = x W^T + b` with int8 weights.
pub struct Int8Linear {
    /// Quantized weights transposed to `[in, out]`, the layout `_int_mm` multiplies by.
    weight_t: Tensor,
    /// One f32 scale per output channel `[out]`.
    scale: Tensor,
    /// f32 bias `[out]`.
    bias: Tensor,
}

impl Int8Linear {
    /// Quantizes an f32 (or any float) `weight` `[out, in]` with its `bias` `[out]`.
    pub fn quantize(weight: &Tensor, bias: &Tensor) -> Result<Self, tch::TchError> {
        let weight = weight.f_to_kind(Kind::Float)?;
        let scale = weight
            .f_abs()?
            .f_amax([1].as_slice(), false)?
            .f_clamp_min(1e-12)?
            .f_div_scalar(LEVELS)?;
        let codes = weight
            .f_div(&scale.f_unsqueeze(1)?)?
            .f_round()?
            .f_clamp(-LEVELS, LEVELS)?
            .f_to_kind(Kind::Int8)?;
        Ok(Self {
            weight_t: codes.f_transpose(0, 1)?.f_contiguous()?,
            scale,
            bias: bias.f_to_kind(Kind::Float)?,
        })
    }

    /// `x W^T + b` for f32 `x` `[.., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        let mut shape = x.size();
        let features = *shape.last().unwrap_or(&1);
        let rows = x.f_reshape([-1, features])?;
        let row_scale = rows
            .f_abs()?
            .f_amax([1].as_slice(), true)?
            .f_clamp_min(1e-12)?
            .f_div_scalar(LEVELS)?;
        let mut scaled = rows.f_div(&row_scale)?;
        let _ = scaled.f_round_()?;
        let _ = scaled.f_clamp_(-LEVELS, LEVELS)?;
        let codes = scaled.f_to_kind(Kind::Int8)?;
        // In place: the [rows, out] product is the largest tensor here.
        let mut out = codes
            .f_internal_int_mm(&self.weight_t)?
            .f_to_kind(Kind::Float)?;
        let _ = out.f_mul_(&row_scale)?;
        let _ = out.f_mul_(&self.scale)?;
        let _ = out.f_add_(&self.bias)?;
        if let Some(last) = shape.last_mut() {
            *last = self.scale.size()[0];
        }
        out.f_reshape(shape)
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
            .forward(&x)
            .unwrap();
        assert_eq!(approx.size(), vec![3, 5, 48]);
        let err = (&approx - &exact).abs().max().double_value(&[]);
        let magnitude = exact.abs().max().double_value(&[]);
        // Two roundings of at most half a step each: well under 2% of the output range.
        assert!(err < 0.02 * magnitude, "max error {err} of {magnitude}");
        assert!(err > 0.0, "the product was not quantized");
    }
}
