//! GGUF export (llama.cpp's model file, which Ollama and LM Studio run): the merged
//! weights in f16, bf16 or q8_0 with the tokenizer, chat template and EOS in the
//! metadata, named and laid out as llama.cpp's own `convert_hf_to_gguf.py` writes them
//! (q/k rows permuted for the `llama` architecture, GPT-2's Conv1D weights transposed,
//! norms and biases in f32, Llama 3's rope factors as `rope_freqs.weight`, Qwen3's
//! per-head q/k norms as `attn_q_norm`/`attn_k_norm` with its own head size).
//!
//! Written here rather than through a crate: the writers on crates.io come with a whole
//! inference stack (candle) or cover reading only; the format is a header, key/values and
//! aligned tensor data.
//!
//! Covered: GPT-2, Llama (incl. Llama 3.x rope scaling), Mistral without a sliding
//! window, Qwen2, Qwen3; byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2/3, SmolLM).
//! Other families (Gemma and Phi-3 ship SentencePiece tokenizers) are refused with a
//! message.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde_json::Value;
use tch::{Kind, Tensor};
use tokenizers::Tokenizer;

use crate::decoder::{Arch, Model};
use cairn::ml::chat_template::ChatTemplate;

const ALIGNMENT: u64 = 32;
const Q8_BLOCK: usize = 32;

/// The tensor type of the exported weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufType {
    F16,
    Bf16,
    Q8_0,
}

impl GgufType {
    /// Parses `f16`, `bf16` or `q8_0`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "f16" => Ok(Self::F16),
            "bf16" => Ok(Self::Bf16),
            "q8_0" => Ok(Self::Q8_0),
            other => Err(format!("gguf type {other:?}: use f16, bf16 or q8_0")),
        }
    }

    /// The name used in file names.
    pub fn name(self) -> &'static str {
        match self {
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Q8_0 => "q8_0",
        }
    }

    /// llama.cpp's `general.file_type`.
    fn file_type(self) -> u32 {
        match self {
            Self::F16 => 1,
            Self::Q8_0 => 7,
            Self::Bf16 => 32,
        }
    }
}

/// ggml tensor types written.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ggml {
    F32 = 0,
    F16 = 1,
    Q8_0 = 8,
    Bf16 = 30,
}

enum Meta {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
}

struct Out {
    name: String,
    /// Torch shape (written reversed, as ggml counts dimensions).
    shape: Vec<i64>,
    ty: Ggml,
    data: Vec<u8>,
}

/// Writes `model` (adapters merged) with `tokenizer` as a GGUF file at `path`.
pub fn export(
    model: &Model,
    tokenizer: &Tokenizer,
    eos_token: &str,
    chat: Option<&ChatTemplate>,
    ty: GgufType,
    path: &Path,
) -> Result<(), String> {
    let model = model.folded();
    let cfg = &model.cfg;
    let model_type = cfg.raw["model_type"].as_str().unwrap_or("");
    let arch = match (cfg.arch, model_type) {
        (Arch::Gpt2, _) => "gpt2",
        (Arch::Llama, "llama") => "llama",
        (Arch::Llama, "mistral") if cfg.sliding_window.is_none_or(|w| w >= cfg.max_positions) => "llama",
        (Arch::Llama, "qwen2") => "qwen2",
        (Arch::Llama, "qwen3") => "qwen3",
        (_, other) => {
            return Err(format!(
                "GGUF export supports gpt2, llama, mistral (without a sliding window), qwen2 and qwen3 models; this one is {other:?}"
            ))
        }
    };
    let mut meta: Vec<(String, Meta)> = Vec::new();
    let mut kv = |k: &str, v: Meta| meta.push((k.to_string(), v));
    kv("general.architecture", Meta::Str(arch.into()));
    kv("general.name", Meta::Str("cairn twin".into()));
    kv("general.file_type", Meta::U32(ty.file_type()));
    kv("general.quantization_version", Meta::U32(2));
    let a = |k: &str| format!("{arch}.{k}");
    kv(&a("context_length"), Meta::U32(cfg.max_positions as u32));
    kv(&a("embedding_length"), Meta::U32(cfg.hidden as u32));
    kv(&a("block_count"), Meta::U32(cfg.layers as u32));
    kv(
        &a("feed_forward_length"),
        Meta::U32(cfg.intermediate as u32),
    );
    kv(&a("attention.head_count"), Meta::U32(cfg.heads as u32));
    if arch == "gpt2" {
        kv(
            &a("attention.layer_norm_epsilon"),
            Meta::F32(cfg.eps as f32),
        );
    } else {
        kv(
            &a("attention.head_count_kv"),
            Meta::U32(cfg.kv_heads as u32),
        );
        kv(
            &a("attention.layer_norm_rms_epsilon"),
            Meta::F32(cfg.eps as f32),
        );
        kv(&a("rope.freq_base"), Meta::F32(cfg.rope_theta as f32));
        if arch == "qwen3" {
            // Qwen3's head size is its own, not hidden / heads.
            kv(&a("attention.key_length"), Meta::U32(cfg.head_dim as u32));
            kv(&a("attention.value_length"), Meta::U32(cfg.head_dim as u32));
        }
        kv(&a("rope.dimension_count"), Meta::U32(cfg.head_dim as u32));
        kv(&a("vocab_size"), Meta::U32(cfg.vocab as u32));
    }
    tokenizer_meta(tokenizer, cfg.vocab, eos_token, chat, &mut kv)?;

    let tensors = tensors(&model, arch, ty)?;
    write(path, &meta, &tensors)
}

/// llama.cpp's tokenizer metadata for a byte-level BPE tokenizer.
fn tokenizer_meta(
    tokenizer: &Tokenizer,
    vocab: i64,
    eos_token: &str,
    chat: Option<&ChatTemplate>,
    kv: &mut dyn FnMut(&str, Meta),
) -> Result<(), String> {
    let json: Value = serde_json::from_str(&tokenizer.to_string(false).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    if json["model"]["type"] != "BPE" || json["model"]["byte_fallback"] == true {
        return Err("GGUF export supports byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, SmolLM); this one is SentencePiece-style or not BPE".into());
    }
    let pre = pre_tokenizer_name(&json["pre_tokenizer"]).ok_or(
        "GGUF export: this tokenizer's pre-tokenizer is not one llama.cpp knows by name (gpt-2, llama-bpe, qwen2, smollm)",
    )?;
    let mut tokens = vec![String::new(); vocab as usize];
    let mut types = vec![5i32; vocab as usize]; // unused
    for (i, t) in tokens.iter_mut().enumerate() {
        *t = format!("[PAD{i}]");
    }
    let added: BTreeMap<u32, bool> = json["added_tokens"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| {
            Some((
                t["id"].as_u64()? as u32,
                t["special"].as_bool().unwrap_or(false),
            ))
        })
        .collect();
    for (token, id) in tokenizer.get_vocab(true) {
        if (id as i64) < vocab {
            tokens[id as usize] = token;
            types[id as usize] = match added.get(&id) {
                Some(true) => 3,  // control
                Some(false) => 4, // user defined
                None => 1,        // normal
            };
        }
    }
    let merges: Vec<String> = json["model"]["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Value::String(s) => Some(s.clone()),
            Value::Array(pair) => Some(format!(
                "{} {}",
                pair.first()?.as_str()?,
                pair.get(1)?.as_str()?
            )),
            _ => None,
        })
        .collect();
    kv("tokenizer.ggml.model", Meta::Str("gpt2".into()));
    kv("tokenizer.ggml.pre", Meta::Str(pre.into()));
    kv("tokenizer.ggml.tokens", Meta::Strs(tokens));
    kv("tokenizer.ggml.token_type", Meta::I32s(types));
    kv("tokenizer.ggml.merges", Meta::Strs(merges));
    let eos = chat
        .map(|c| c.eos_token())
        .filter(|e| !e.is_empty())
        .unwrap_or(eos_token);
    if let Some(id) = tokenizer.token_to_id(eos) {
        kv("tokenizer.ggml.eos_token_id", Meta::U32(id));
    }
    // llama.cpp also stops at an end-of-turn token (<|eot_id|>, <|im_end|>, ...).
    let eot = chat.and_then(|c| {
        c.stops()
            .iter()
            .filter(|s| s.as_str() != eos)
            .find_map(|s| tokenizer.token_to_id(s))
    });
    if let Some(id) = eot {
        kv("tokenizer.ggml.eot_token_id", Meta::U32(id));
    }
    if let Some(id) = chat.and_then(|c| tokenizer.token_to_id(c.bos_token())) {
        kv("tokenizer.ggml.bos_token_id", Meta::U32(id));
        kv("tokenizer.ggml.add_bos_token", Meta::Bool(false));
    }
    if let Some(chat) = chat {
        kv(
            "tokenizer.chat_template",
            Meta::Str(chat.source().to_string()),
        );
    }
    Ok(())
}

/// The name llama.cpp gives a byte-level pre-tokenizer (it recognises them by name).
fn pre_tokenizer_name(pre: &Value) -> Option<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let steps: Vec<&Value> = match pre["type"].as_str()? {
        "Sequence" => pre["pretokenizers"].as_array()?.iter().collect(),
        _ => vec![pre],
    };
    let kinds: Vec<&str> = steps.iter().filter_map(|s| s["type"].as_str()).collect();
    match kinds.as_slice() {
        ["ByteLevel"] if steps[0]["use_regex"] != false => Some("gpt-2"),
        ["Digits", "ByteLevel"] if steps[0]["individual_digits"] == true => Some("smollm"),
        ["Split", "ByteLevel"] => match steps[0]["pattern"]["Regex"].as_str()? {
            LLAMA3 => Some("llama-bpe"),
            QWEN2 => Some("qwen2"),
            _ => None,
        },
        _ => None,
    }
}

/// The model's tensors under llama.cpp's names, converted.
fn tensors(model: &Model, arch: &str, ty: GgufType) -> Result<Vec<Out>, String> {
    let cfg = &model.cfg;
    let mut out = Vec::new();
    let mut add = |name: String, t: &Tensor| -> Result<(), String> {
        out.push(convert(name, t, ty)?);
        Ok(())
    };
    let p = |n: &str| -> Result<&Tensor, String> {
        model
            .params
            .get(n)
            .ok_or_else(|| format!("GGUF export: no tensor {n}"))
    };
    if arch == "gpt2" {
        add("token_embd.weight".into(), p("transformer.wte.weight")?)?;
        add("position_embd.weight".into(), p("transformer.wpe.weight")?)?;
        for l in 0..cfg.layers {
            let h = format!("transformer.h.{l}");
            let b = format!("blk.{l}");
            for (from, to) in [
                ("ln_1", "attn_norm"),
                ("attn.c_attn", "attn_qkv"),
                ("attn.c_proj", "attn_output"),
                ("ln_2", "ffn_norm"),
                ("mlp.c_fc", "ffn_up"),
                ("mlp.c_proj", "ffn_down"),
            ] {
                let w = p(&format!("{h}.{from}.weight"))?;
                // Conv1D stores [in, out]; ggml wants [out, in] rows like nn.Linear.
                let w = if w.dim() == 2 {
                    w.transpose(0, 1)
                } else {
                    w.shallow_clone()
                };
                add(format!("{b}.{to}.weight"), &w)?;
                add(format!("{b}.{to}.bias"), p(&format!("{h}.{from}.bias"))?)?;
            }
        }
        add("output_norm.weight".into(), p("transformer.ln_f.weight")?)?;
        add("output_norm.bias".into(), p("transformer.ln_f.bias")?)?;
        if !cfg.tie_embeddings {
            add("output.weight".into(), p("lm_head.weight")?)?;
        }
        return Ok(out);
    }
    add("token_embd.weight".into(), p("model.embed_tokens.weight")?)?;
    for l in 0..cfg.layers {
        let h = format!("model.layers.{l}");
        let b = format!("blk.{l}");
        for (from, to, heads) in [
            ("q_proj", "attn_q", Some(cfg.heads)),
            ("k_proj", "attn_k", Some(cfg.kv_heads)),
            ("v_proj", "attn_v", None),
        ] {
            let w = p(&format!("{h}.self_attn.{from}.weight"))?;
            // llama.cpp's `llama` rotates pairs of adjacent dimensions where
            // transformers rotates the two halves of each head: rows are regrouped.
            let w = match heads {
                Some(n) if arch == "llama" => permute_rows(w, n),
                _ => w.shallow_clone(),
            };
            add(format!("{b}.{to}.weight"), &w)?;
            if let Some(bias) = model.params.get(&format!("{h}.self_attn.{from}.bias")) {
                add(format!("{b}.{to}.bias"), bias)?;
            }
        }
        for (from, to) in [
            ("input_layernorm", "attn_norm"),
            ("self_attn.o_proj", "attn_output"),
            ("post_attention_layernorm", "ffn_norm"),
            ("mlp.gate_proj", "ffn_gate"),
            ("mlp.up_proj", "ffn_up"),
            ("mlp.down_proj", "ffn_down"),
        ] {
            add(
                format!("{b}.{to}.weight"),
                p(&format!("{h}.{from}.weight"))?,
            )?;
        }
        // Qwen3's per-head q/k norms.
        for (from, to) in [("q_norm", "attn_q_norm"), ("k_norm", "attn_k_norm")] {
            if let Some(norm) = model.params.get(&format!("{h}.self_attn.{from}.weight")) {
                add(format!("{b}.{to}.weight"), norm)?;
            }
        }
    }
    add("output_norm.weight".into(), p("model.norm.weight")?)?;
    if !cfg.tie_embeddings {
        add("output.weight".into(), p("lm_head.weight")?)?;
    }
    if let Some(rope) = &cfg.rope_llama3 {
        out.push(convert(
            "rope_freqs.weight".into(),
            &rope.factors(cfg.head_dim, cfg.rope_theta),
            GgufType::F16,
        )?);
    }
    Ok(out)
}

/// `convert_hf_to_gguf.py`'s `permute`: within each head, rows [0, d/2) and [d/2, d)
/// are interleaved.
fn permute_rows(w: &Tensor, heads: i64) -> Tensor {
    let s = w.size();
    w.reshape([heads, 2, s[0] / heads / 2, s[1]])
        .swapaxes(1, 2)
        .reshape([s[0], s[1]])
}

/// One tensor in its GGUF type: 1-D tensors (norms, biases) stay f32 as llama.cpp keeps
/// them; q8_0 needs rows that are a multiple of 32 long, else f16.
fn convert(name: String, t: &Tensor, ty: GgufType) -> Result<Out, String> {
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

fn write(path: &Path, meta: &[(String, Meta)], tensors: &[Out]) -> Result<(), String> {
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
    fn llama_rows_are_interleaved_per_head() {
        // One head of dimension 4: rows 0,1 | 2,3 become 0,2,1,3.
        let w = Tensor::from_slice(&[0f32, 1., 2., 3.]).view([4, 1]);
        let p: Vec<f32> = Vec::try_from(permute_rows(&w, 1).flatten(0, -1)).unwrap();
        assert_eq!(p, [0., 2., 1., 3.]);
    }
}
