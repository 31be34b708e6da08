//! The GGUF file itself: typed metadata values, tensors converted to ggml's types
//! (f32, f16, bf16, q8_0) and the header + aligned data layout.
//!
//! Written here rather than through a crate: the writers on crates.io come with a whole
//! inference stack (candle) or cover reading only; the format is a header, key/values and
//! aligned tensor data.

use std::io::Write;
use std::path::Path;

use tch::{Kind, Tensor};

use super::GgufType;

const ALIGNMENT: u64 = 32;
const Q8_BLOCK: usize = 32;

/// ggml tensor types written.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Ggml {
    F32 = 0,
    F16 = 1,
    Q8_0 = 8,
    Bf16 = 30,
}

/// A metadata value.
pub enum Meta {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
    F32s(Vec<f32>),
    Bools(Vec<bool>),
}

/// One tensor, converted.
pub struct Out {
    pub name: String,
    /// Torch shape (written reversed, as ggml counts dimensions).
    pub shape: Vec<i64>,
    pub ty: Ggml,
    pub data: Vec<u8>,
}

/// One tensor in its GGUF type: 1-D tensors (norms, biases) stay f32 as llama.cpp keeps
/// them; q8_0 needs rows that are a multiple of 32 long, else f16.
pub fn convert(name: String, t: &Tensor, ty: GgufType) -> Result<Out, String> {
    let t = t.detach().to_device(tch::Device::Cpu).contiguous();
    let shape = t.size();
    let ggml = match ty {
        _ if t.dim() < 2 => Ggml::F32,
        GgufType::Q8_0 if (shape[shape.len() - 1] as usize).is_multiple_of(Q8_BLOCK) => Ggml::Q8_0,
        GgufType::Q8_0 | GgufType::F16 => Ggml::F16,
        GgufType::Bf16 => Ggml::Bf16,
    };
    let data = match ggml {
        Ggml::F32 => bytes(&t.to_kind(Kind::Float))?,
        Ggml::F16 => bytes(&t.to_kind(Kind::Half))?,
        Ggml::Bf16 => bytes(&t.to_kind(Kind::BFloat16))?,
        Ggml::Q8_0 => {
            let values: Vec<f32> = Vec::try_from(t.to_kind(Kind::Float).flatten(0, -1))
                .map_err(|e: tch::TchError| e.to_string())?;
            quantize_q8_0(&values)
        }
    };
    Ok(Out {
        name,
        shape,
        ty: ggml,
        data,
    })
}

fn bytes(t: &Tensor) -> Result<Vec<u8>, String> {
    let n = t.numel();
    let mut out = vec![0u8; n * t.kind().elt_size_in_bytes()];
    t.f_copy_data_u8(&mut out, n).map_err(|e| e.to_string())?;
    Ok(out)
}

/// ggml's `quantize_row_q8_0_ref`: blocks of 32 values as an f16 scale (absmax / 127)
/// and 32 rounded int8s.
pub fn quantize_q8_0(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / Q8_BLOCK * (2 + Q8_BLOCK));
    for block in values.chunks(Q8_BLOCK) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f32_to_f16_bits(d).to_le_bytes());
        out.extend(block.iter().map(|v| (v * id).round() as i8 as u8));
    }
    out
}

/// IEEE half precision, round to nearest even (what ggml's `GGML_FP32_TO_FP16` does).
fn f32_to_f16_bits(x: f32) -> u16 {
    let t = Tensor::from_slice(&[x]).to_kind(Kind::Half);
    let mut b = [0u8; 2];
    t.copy_data_u8(&mut b, 1);
    u16::from_le_bytes(b)
}

pub fn write(path: &Path, meta: &[(String, Meta)], tensors: &[Out]) -> Result<(), String> {
    let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut w = std::io::BufWriter::new(file);
    let io = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut header: Vec<u8> = Vec::new();
    header.extend_from_slice(b"GGUF");
    header.extend_from_slice(&3u32.to_le_bytes());
    header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    header.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (key, value) in meta {
        put_str(&mut header, key);
        put_meta(&mut header, value);
    }
    let mut offset = 0u64;
    for t in tensors {
        put_str(&mut header, &t.name);
        header.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            header.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        header.extend_from_slice(&(t.ty as u32).to_le_bytes());
        header.extend_from_slice(&offset.to_le_bytes());
        offset += padded(t.data.len() as u64);
    }
    let pad = padded(header.len() as u64) - header.len() as u64;
    header.extend(std::iter::repeat_n(0u8, pad as usize));
    w.write_all(&header).map_err(io)?;
    for t in tensors {
        w.write_all(&t.data).map_err(io)?;
        let pad = padded(t.data.len() as u64) - t.data.len() as u64;
        w.write_all(&vec![0u8; pad as usize]).map_err(io)?;
    }
    w.flush().map_err(io)
}

fn padded(n: u64) -> u64 {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_meta(out: &mut Vec<u8>, value: &Meta) {
    const U32: u32 = 4;
    const I32: u32 = 5;
    const F32: u32 = 6;
    const BOOL: u32 = 7;
    const STRING: u32 = 8;
    const ARRAY: u32 = 9;
    match value {
        Meta::U32(v) => {
            out.extend_from_slice(&U32.to_le_bytes());
            out.extend_from_slice(&v.to_le_bytes());
        }
        Meta::F32(v) => {
            out.extend_from_slice(&F32.to_le_bytes());
            out.extend_from_slice(&v.to_le_bytes());
        }
        Meta::Bool(v) => {
            out.extend_from_slice(&BOOL.to_le_bytes());
            out.push(u8::from(*v));
        }
        Meta::Str(s) => {
            out.extend_from_slice(&STRING.to_le_bytes());
            put_str(out, s);
        }
        Meta::Strs(items) => {
            out.extend_from_slice(&ARRAY.to_le_bytes());
            out.extend_from_slice(&STRING.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for s in items {
                put_str(out, s);
            }
        }
        Meta::I32s(items) => {
            out.extend_from_slice(&ARRAY.to_le_bytes());
            out.extend_from_slice(&I32.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for v in items {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        Meta::F32s(items) => {
            out.extend_from_slice(&ARRAY.to_le_bytes());
            out.extend_from_slice(&F32.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for v in items {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        Meta::Bools(items) => {
            out.extend_from_slice(&ARRAY.to_le_bytes());
            out.extend_from_slice(&BOOL.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            out.extend(items.iter().map(|b| u8::from(*b)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_blocks_hold_a_half_scale_and_rounded_bytes() {
        let mut values = vec![0f32; 32];
        values[0] = 1.27;
        values[1] = -0.5;
        values[2] = 0.004;
        let q = quantize_q8_0(&values);
        assert_eq!(q.len(), 34);
        // d = 0.01 in f16, then 127, -50, 0.
        assert_eq!(u16::from_le_bytes([q[0], q[1]]), f32_to_f16_bits(0.01));
        assert_eq!(q[2] as i8, 127);
        assert_eq!(q[3] as i8, -50);
        assert_eq!(q[4] as i8, 0);
        assert_eq!(quantize_q8_0(&[0.0; 32])[2..], [0u8; 32]);
    }

    #[test]
    fn arrays_carry_their_element_type_and_length() {
        let mut out = Vec::new();
        put_meta(&mut out, &Meta::F32s(vec![-1.5, 0.0]));
        assert_eq!(out[..4], 9u32.to_le_bytes()); // array
        assert_eq!(out[4..8], 6u32.to_le_bytes()); // of f32
        assert_eq!(out[8..16], 2u64.to_le_bytes());
        assert_eq!(out[16..20], (-1.5f32).to_le_bytes());
        let mut out = Vec::new();
        put_meta(&mut out, &Meta::Bools(vec![true, false, true]));
        assert_eq!(out[4..8], 7u32.to_le_bytes()); // of bool
        assert_eq!(out[16..], [1, 0, 1]);
    }
}
