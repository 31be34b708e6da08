//! GGUF export (llama.cpp's model file, which Ollama and LM Studio run): the merged
//! weights in f16, bf16 or q8_0 with the tokenizer, chat template and EOS in the
//! metadata, named and laid out as llama.cpp's own `convert_hf_to_gguf.py` writes them.
//!
//! Covered: GPT-2, Llama 2 and 3.x (incl. Llama 3's rope scaling), Mistral without a
//! sliding window, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 (text), Phi-3 (4k context; the
//! 128k longrope variants are refused); byte-level BPE tokenizers (GPT-2, Llama 3,
//! Qwen2/3, SmolLM) and SentencePiece-style ones (Llama 2, Gemma, Phi-3). Anything else is
//! refused with a message before a byte is written.

mod tensors;
mod vocab;
mod writer;

use std::path::Path;

use tokenizers::Tokenizer;

use crate::decoder::{Arch, Config, Model};
use cairn::ml::chat_template::ChatTemplate;
use writer::Meta;

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

/// Writes `model` (adapters merged) with `tokenizer` as a GGUF file at `path`.
pub fn export(
    model: &Model,
    tokenizer: &Tokenizer,
    eos_token: &str,
    chat: Option<&ChatTemplate>,
    ty: GgufType,
    path: &Path,
) -> Result<(), String> {
    // Refused before any work: the family, then the tokenizer (checked as it is written).
    let arch = llama_cpp_arch(&model.cfg)?;
    let model = model.folded();
    let cfg = &model.cfg;
    let mut meta: Vec<(String, Meta)> = Vec::new();
    let mut kv = |k: &str, v: Meta| meta.push((k.to_string(), v));
    kv("general.architecture", Meta::Str(arch.into()));
    kv("general.name", Meta::Str("cairn twin".into()));
    kv("general.file_type", Meta::U32(ty.file_type()));
    kv("general.quantization_version", Meta::U32(2));
    hyperparameters(cfg, arch, &mut kv);
    vocab::tokenizer_meta(tokenizer, cfg.vocab, eos_token, chat, &mut kv)?;

    let tensors = tensors::tensors(&model, arch, ty)?;
    writer::write(path, &meta, &tensors)
}

/// llama.cpp's architecture for the model, or why it has none that computes the same.
fn llama_cpp_arch(cfg: &Config) -> Result<&'static str, String> {
    let model_type = cfg.raw["model_type"].as_str().unwrap_or("");
    let refuse = |why: String| {
        Err(format!(
            "GGUF export: {why} (it covers {})",
            cairn::ml::family::GGUF_MODEL_TYPES.join(", ")
        ))
    };
    let arch = match (cfg.arch, model_type) {
        (Arch::Gpt2, _) => "gpt2",
        (Arch::Llama, "llama") => "llama",
        (Arch::Llama, "mistral") => {
            if cfg.sliding_window.is_some_and(|w| w < cfg.max_positions) {
                return refuse(format!(
                    "this mistral model slides a {}-token window, which llama.cpp's llama architecture does not",
                    cfg.sliding_window.unwrap_or_default()
                ));
            }
            "llama"
        }
        (Arch::Llama, "qwen2") => "qwen2",
        (Arch::Llama, "qwen3") => "qwen3",
        (Arch::Llama, "gemma") => "gemma",
        (Arch::Llama, "gemma2") => "gemma2",
        (Arch::Llama, "gemma3_text") => "gemma3",
        (Arch::Llama, "phi3") => {
            if cfg.rope_long.is_some() {
                return refuse("this phi3 model uses longrope (the 128k-context variants), whose factor switch llama.cpp makes on the context size rather than the sequence length".into());
            }
            "phi3"
        }
        (_, other) => return refuse(format!("model_type {other:?} is not supported")),
    };
    // llama.cpp scales Gemma 2/3 attention by 1/sqrt(head_dim), or by
    // 1/sqrt(hidden / heads) for the 27B models, whatever query_pre_attn_scalar says.
    if let Some(scale) = cfg.attn_scale {
        let big = matches!((arch, cfg.layers), ("gemma2", 46) | ("gemma3", 62));
        let assumed = if big {
            cfg.hidden / cfg.heads
        } else {
            cfg.head_dim
        } as f64;
        if (scale - assumed.powf(-0.5)).abs() > 1e-9 * scale {
            return refuse(format!(
                "query_pre_attn_scalar {} differs from the {assumed} llama.cpp assumes for this {arch} model",
                scale.powi(-2).round()
            ));
        }
    }
    Ok(arch)
}

/// The `{arch}.*` keys llama.cpp reads for the model's shape, attention and rotary.
fn hyperparameters(cfg: &Config, arch: &str, kv: &mut dyn FnMut(&str, Meta)) {
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
        return;
    }
    kv(
        &a("attention.head_count_kv"),
        Meta::U32(cfg.kv_heads as u32),
    );
    kv(
        &a("attention.layer_norm_rms_epsilon"),
        Meta::F32(cfg.eps as f32),
    );
    kv(&a("rope.freq_base"), Meta::F32(cfg.rope_theta as f32));
    if cfg.head_dim * cfg.heads != cfg.hidden || arch.starts_with("gemma") {
        // The head size is its own (Qwen3, Gemma), not hidden / heads.
        kv(&a("attention.key_length"), Meta::U32(cfg.head_dim as u32));
        kv(&a("attention.value_length"), Meta::U32(cfg.head_dim as u32));
    }
    kv(&a("rope.dimension_count"), Meta::U32(cfg.rotary_dim as u32));
    kv(&a("vocab_size"), Meta::U32(cfg.vocab as u32));
    if let Some(factor) = cfg.rope_linear {
        // Gemma 3: its global layers only; llama.cpp leaves the sliding ones unscaled too.
        kv(&a("rope.scaling.type"), Meta::Str("linear".into()));
        kv(&a("rope.scaling.factor"), Meta::F32(factor as f32));
    }
    if let Some(theta) = cfg.rope_theta_local {
        kv(&a("rope.freq_base_swa"), Meta::F32(theta as f32));
    }
    if let Some(cap) = cfg.attn_softcap {
        kv(&a("attn_logit_softcapping"), Meta::F32(cap as f32));
    }
    if let Some(cap) = cfg.final_softcap {
        kv(&a("final_logit_softcapping"), Meta::F32(cap as f32));
    }
    if let Some(window) = cfg.sliding_window {
        // Phi-3 writes it as convert_hf_to_gguf.py does, though llama.cpp attends over the
        // whole context for phi3 (its SWA is disabled there).
        kv(&a("attention.sliding_window"), Meta::U32(window as u32));
        if arch.starts_with("gemma") {
            kv(
                &a("attention.sliding_window_pattern"),
                Meta::Bools(cfg.sliding_layers.clone()),
            );
        }
    }
}
