//! 4-bit NormalFloat weights (QLoRA), laid out as bitsandbytes lays them out: blocks of
//! 64 values scaled by their absolute maximum, each value the nearest of the 16 NF4
//! levels, two per byte (the first in the high nibble); the block maxima are themselves
//! quantized ("double quantization"): their mean is subtracted and the rest stored as
//! 8-bit codes of bitsandbytes' signed dynamic map in blocks of 256, with one f32
//! maximum per block.
//!
//! Weights are dequantized to the compute dtype when a layer runs; nothing else keeps
//! them in 16 or 32 bits.
//!
//! Against bitsandbytes' CPU backend (tested): the 4-bit codes, the maxima of the
//! double quantization and its offset are bit for bit the same (values times the block's
//! reciprocal maximum, nearest level by midpoints). The 8-bit codes of the block maxima
//! are the nearest entries of the dynamic map (values divided by the block maximum, ties
//! to the lower entry); bitsandbytes' C kernel finds them with an approximate search
//! that, for about one maximum in a few hundred, returns the second nearest.

use tch::{Device, Kind, Tensor};

/// Values per block of the 4-bit codes.
pub const BLOCK: i64 = 64;
/// Block maxima per block of the double quantization.
pub const BLOCK2: i64 = 256;

/// bitsandbytes' NF4 levels (quantiles of a standard normal, rescaled to [-1, 1]).
const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// A weight in NF4 with double-quantized block maxima.
pub struct Nf4Weight {
    /// [ceil(n / 2)] u8: two codes per byte.
    pub packed: Tensor,
    /// [blocks] u8: codes of (absmax - offset) in the dynamic map.
    pub qabsmax: Tensor,
    /// [ceil(blocks / 256)] f32: maxima of the double quantization.
    pub absmax2: Tensor,
    /// Mean of the block maxima.
    pub offset: f32,
    /// The weight's shape.
    pub shape: Vec<i64>,
}

impl Nf4Weight {
    /// Quantizes `w` (any float dtype) on its device.
    pub fn quantize(w: &Tensor) -> Self {
        // Slices of whole blocks keep the f32 temporaries small next to a big weight.
        const SLICE: i64 = BLOCK * 16384;
        let _guard = tch::no_grad_guard();
        let device = w.device();
        let flat = w.detach().flatten(0, -1);
        let n = flat.size()[0];
        let bounds = midpoints(&Tensor::from_slice(&NF4).to_device(device));
        let mut codes = Vec::new();
        let mut maxima = Vec::new();
        let mut start = 0;
        while start < n {
            let len = SLICE.min(n - start);
            let part = flat.narrow(0, start, len).to_kind(Kind::Float);
            let (absmax, scaled) = blockwise(&part, BLOCK, false);
            codes.push(scaled.bucketize(&bounds, true, false).to_kind(Kind::Uint8));
            maxima.push(absmax);
            start += len;
        }
        let mut q = Tensor::cat(&codes, 0);
        drop(codes);
        if q.numel() % 2 == 1 {
            q = Tensor::cat(&[&q, &q.zeros_like().narrow(0, 0, 1)], 0);
        }
        let pairs = q.view([-1, 2]);
        let packed = pairs
            .select(1, 0)
            .bitwise_left_shift_tensor_scalar(4)
            .bitwise_or_tensor(&pairs.select(1, 1));
        let absmax = Tensor::cat(&maxima, 0);
        let offset = absmax.mean(None::<Kind>);
        let centered = &absmax - &offset;
        let (absmax2, scaled2) = blockwise(&centered, BLOCK2, true);
        let qabsmax = nearest_code(&scaled2, &dynamic_map(device));
        Self {
            packed,
            qabsmax,
            absmax2,
            offset: offset.double_value(&[]) as f32,
            shape: w.size(),
        }
    }

    /// The weight in `kind`, computed in f32 as bitsandbytes does.
    pub fn dequantize(&self, kind: Kind) -> Tensor {
        let _guard = tch::no_grad_guard();
        let device = self.packed.device();
        let n: i64 = self.shape.iter().product();
        let code = dynamic_map(device);
        let blocks = self.qabsmax.size()[0];
        let absmax = code.index_select(0, &self.qabsmax.to_kind(Kind::Int))
            * self
                .absmax2
                .repeat_interleave_self_int(BLOCK2, 0, None)
                .narrow(0, 0, blocks)
            + f64::from(self.offset);
        // Each byte is looked up as its pair of levels (a 256-row table), slice by slice
        // of whole blocks, straight into the result: no per-value index or f32 copy of
        // the whole weight is ever built.
        const SLICE: i64 = BLOCK * 16384;
        let pairs: Vec<f32> = (0..256).flat_map(|b| [NF4[b >> 4], NF4[b & 15]]).collect();
        let table = Tensor::from_slice(&pairs).view([256, 2]).to_device(device);
        let mut out = Tensor::empty([n], (kind, device));
        let mut start = 0;
        while start < n {
            let len = SLICE.min(n - start);
            let bytes = self
                .packed
                .narrow(0, start / 2, (len + 1) / 2)
                .to_kind(Kind::Int);
            let values = table.index_select(0, &bytes).view([-1]).narrow(0, 0, len);
            let first = start / BLOCK;
            let whole = len / BLOCK;
            let scaled = if whole * BLOCK == len {
                values.view([whole, BLOCK]) * absmax.narrow(0, first, whole).unsqueeze(1)
            } else {
                // The weight's last, short block.
                let mut parts = Vec::new();
                if whole > 0 {
                    parts.push(
                        (values.narrow(0, 0, whole * BLOCK).view([whole, BLOCK])
                            * absmax.narrow(0, first, whole).unsqueeze(1))
                        .view([-1]),
                    );
                }
                parts.push(
                    values.narrow(0, whole * BLOCK, len - whole * BLOCK)
                        * absmax.narrow(0, blocks - 1, 1),
                );
                Tensor::cat(&parts, 0)
            };
            out.narrow(0, start, len).copy_(&scaled.view([-1]));
            start += len;
        }
        out = out.view(self.shape.as_slice());
        out
    }

    /// Bytes held (codes, block maxima).
    pub fn nbytes(&self) -> i64 {
        (self.packed.numel() + self.qabsmax.numel() + 4 * self.absmax2.numel()) as i64
    }

    /// A copy sharing the tensors.
    pub fn share(&self) -> Self {
        Self {
            packed: self.packed.shallow_clone(),
            qabsmax: self.qabsmax.shallow_clone(),
            absmax2: self.absmax2.shallow_clone(),
            offset: self.offset,
            shape: self.shape.clone(),
        }
    }
}

/// Block maxima and values scaled into [-1, 1] (the last block may be shorter): times the
/// reciprocal maximum and clamped (bitsandbytes' 4-bit quantizer), or divided by it
/// (`divide`: its 8-bit C kernel).
fn blockwise(flat: &Tensor, block: i64, divide: bool) -> (Tensor, Tensor) {
    let n = flat.size()[0];
    let full = n - n % block;
    let mut absmax = Vec::new();
    let mut scaled = Vec::new();
    if full > 0 {
        let blocks = flat.narrow(0, 0, full).view([-1, block]);
        let max = blocks.abs().amax(&[-1i64][..], false);
        let s = if divide {
            &blocks / max.unsqueeze(1)
        } else {
            (blocks * max.clamp_min(1e-38).reciprocal().unsqueeze(1)).clamp(-1.0, 1.0)
        };
        scaled.push(s.flatten(0, -1));
        absmax.push(max);
    }
    if n > full {
        let rest = flat.narrow(0, full, n - full);
        let max = rest.abs().max();
        let s = if divide {
            &rest / &max
        } else {
            (&rest / max.clamp_min(1e-38)).clamp(-1.0, 1.0)
        };
        scaled.push(s);
        absmax.push(max.unsqueeze(0));
    }
    (Tensor::cat(&absmax, 0), Tensor::cat(&scaled, 0))
}

/// Each value's code in sorted `code`: the left neighbour, or the right one when it is
/// strictly closer.
fn nearest_code(values: &Tensor, code: &Tensor) -> Tensor {
    let last = code.size()[0] - 1;
    let left = (values.searchsorted(code, false, true, "right", None::<Tensor>) - 1).clamp(0, last);
    let right = (&left + 1).clamp_max(last);
    let dist =
        |idx: &Tensor| (values - code.index_select(0, &idx.flatten(0, -1)).view_as(values)).abs();
    let closer = dist(&right).lt_tensor(&dist(&left));
    (left + closer.to_kind(Kind::Int64)).to_kind(Kind::Uint8)
}

/// Decision boundaries between consecutive levels of a sorted code.
fn midpoints(code: &Tensor) -> Tensor {
    let n = code.size()[0];
    (code.narrow(0, 0, n - 1) + code.narrow(0, 1, n - 1)) / 2.0
}

/// bitsandbytes' `create_dynamic_map(signed=True)`: 7 decades of linearly spaced
/// fractions, both signs, 0 and 1, sorted (computed with the same torch operations).
pub fn dynamic_map(device: Device) -> Tensor {
    let mut data: Vec<f64> = Vec::with_capacity(256);
    let (max_exponent_bits, non_sign_bits) = (7i32, 7i32);
    for i in 0..max_exponent_bits {
        let fraction_items = 2i64.pow((i + non_sign_bits - max_exponent_bits) as u32) + 1;
        let boundaries = Tensor::linspace(0.1, 1.0, fraction_items, (Kind::Float, Device::Cpu));
        let means = (boundaries.narrow(0, 0, fraction_items - 1)
            + boundaries.narrow(0, 1, fraction_items - 1))
            / 2.0;
        let scale = 10f64.powi(-(max_exponent_bits - 1) + i);
        let pos: Vec<f32> = Vec::try_from(&means * scale).unwrap_or_default();
        let neg: Vec<f32> = Vec::try_from(&means * -scale).unwrap_or_default();
        data.extend(pos.iter().map(|&v| f64::from(v)));
        data.extend(neg.iter().map(|&v| f64::from(v)));
    }
    data.push(0.0);
    data.push(1.0);
    data.resize(256, 0.0);
    data.sort_by(f64::total_cmp);
    let values: Vec<f32> = data.iter().map(|&v| v as f32).collect();
    Tensor::from_slice(&values).to_device(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_round_trip_within_half_a_step() {
        let w = Tensor::randn([3, 100], (Kind::Float, Device::Cpu));
        let q = Nf4Weight::quantize(&w);
        assert_eq!(q.packed.size(), [150]);
        assert_eq!(q.qabsmax.size(), [5]); // 4 blocks of 64 and one of 44
        let back = q.dequantize(Kind::Float);
        let err = (&back - &w).abs().max().double_value(&[]);
        let amax = w.abs().max().double_value(&[]);
        // The widest NF4 gap is 0.304 of a block's maximum, and the maxima are themselves
        // 8-bit codes.
        assert!(err < 0.17 * amax, "{err} vs {amax}");
        assert_eq!(back.size(), w.size());
    }

    #[test]
    fn the_dynamic_map_is_bitsandbytes_signed_map() {
        let map: Vec<f32> = Vec::try_from(dynamic_map(Device::Cpu)).unwrap();
        assert_eq!(map.len(), 256);
        assert!(map.windows(2).all(|w| w[0] <= w[1]));
        assert!((map[0] + 0.992_968_75).abs() < 1e-6, "{}", map[0]);
        assert_eq!(map[255], 1.0);
        assert_eq!(map.iter().filter(|v| **v == 0.0).count(), 1);
    }
}
