//! Branch-free single-precision `exp`, `erf` and GELU for the int8 kernels, written so
//! that they vectorize; `avx512.rs` computes the same formulas in intrinsics.

/// `e^x`, Cephes' single-precision polynomial after reducing by powers of two (relative
/// error ~1e-7 over the range GELU needs); branch-free so that it vectorizes.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
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
pub(super) const LN2_HI: f32 = 0.693_359_4;
pub(super) const LN2_LO: f32 = -2.121_944_4e-4;
/// Cephes' `expf` polynomial, highest power first.
pub(super) const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    5e-1,
];
/// Abramowitz and Stegun 7.1.26: `t = 1 / (1 + P |x|)` and its polynomial, highest first.
pub(super) const ERF_P: f32 = 0.327_591_1;
pub(super) const ERF_POLY: [f32; 5] = [
    1.061_405_4,
    -1.453_152,
    1.421_413_8,
    -0.284_496_74,
    0.254_829_6,
];
/// sqrt(2 / pi), the tanh approximation's factor.
pub(super) const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// `erf(x)`: Abramowitz and Stegun 7.1.26 (absolute error < 1.5e-7), the formula
/// libtorch's vectorized CPU `erf` uses.
#[inline(always)]
pub(super) fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / ERF_P.mul_add(a, 1.0);
    let r = ERF_POLY[1..]
        .iter()
        .fold(ERF_POLY[0], |r, &c| r.mul_add(t, c));
    let y = (-(r * t)).mul_add(exp(-a * a), 1.0);
    y.copysign(x)
}

#[inline(always)]
pub(super) fn gelu_row(x: &mut [f32], tanh: bool) {
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

#[inline(always)]
pub(super) fn exp_in_place(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked above; the check is a cached load).
        return unsafe { super::avx512::exp_slice(x) };
    }
    for v in x.iter_mut() {
        *v = exp(*v);
    }
}

#[cfg(test)]
pub(super) fn erf_f64(x: f64) -> f64 {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
