//! Decoder-only language models in tch: GPT-2 (learned positions, LayerNorm, GELU MLP,
//! fused QKV "Conv1D" weights) and the Llama family (Llama, Qwen2/3, Mistral, SmolLM:
//! RMSNorm, rotary embeddings, grouped-query attention, SwiGLU; Gemma 1-3 as variations
//! of it: offset norms, scaled embeddings, GeGLU, sandwich norms, soft-capping, local and
//! global layers), with optional LoRA adapters on any linear module. Weights are plain tensors keyed by their Hugging Face
//! names, so loading and saving are name-for-name with `transformers`.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use cairn::ml::job::ScratchConfig;

use crate::nf4::Nf4Weight;

mod t5;
pub use t5::T5Layout;

/// Architecture family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// GPT-2 and its checkpoints (distilgpt2, gpt2-medium...).
    Gpt2,
    /// Llama, Qwen2/3, Mistral, SmolLM, Gemma 1-3.
    Llama,
    /// T5 and Flan-T5 (encoder-decoder, see [`t5`]).
    T5,
}

impl Arch {
    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Gpt2 => "gpt2",
            Arch::Llama => "llama",
            Arch::T5 => "t5",
        }
    }

    /// PEFT's default LoRA targets.
    pub fn default_lora_targets(self) -> Vec<String> {
        match self {
            Arch::Gpt2 => vec!["c_attn".into()],
            Arch::Llama => vec!["q_proj".into(), "v_proj".into()],
            Arch::T5 => vec!["q".into(), "v".into()],
        }
    }
}

/// What the forward pass needs from config.json.
#[derive(Clone, Debug)]
pub struct Config {
    pub arch: Arch,
    pub vocab: i64,
    pub hidden: i64,
    pub layers: i64,
    pub heads: i64,
    pub kv_heads: i64,
    pub head_dim: i64,
    pub intermediate: i64,
    pub max_positions: i64,
    pub eps: f64,
    pub rope_theta: f64,
    /// Llama 3.x's frequency-dependent rotary scaling (`rope_type: llama3`).
    pub rope_llama3: Option<Llama3Rope>,
    pub tie_embeddings: bool,
    /// Qwen2 has biases on q/k/v.
    pub qkv_bias: bool,
    /// Qwen3 RMS-normalises each head of q and k (`q_norm`, `k_norm`) before rotary.
    pub qk_norm: bool,
    /// Sliding-window attention: a query sees the last `w` keys (itself included), as
    /// transformers' `kv_idx > q_idx - sliding_window`, on the layers `sliding_layers`
    /// marks (every layer for Mistral; Gemma 2/3 alternate with global layers).
    pub sliding_window: Option<i64>,
    pub sliding_layers: Vec<bool>,
    /// Gemma 3's sliding layers rotate with their own base frequency.
    pub rope_theta_local: Option<f64>,
    /// `rope_type: linear`: positions divided by this factor (Gemma 3's global layers).
    pub rope_linear: Option<f64>,
    /// `rope_type: longrope` (Phi-3 128k, Phi-3.5, Phi-4-mini).
    pub rope_long: Option<LongRope>,
    /// How many leading dimensions of each head rotate (`partial_rotary_factor` x
    /// head_dim, Phi-3 family); the rest pass through unrotated.
    pub rotary_dim: i64,
    /// Gemma: RMSNorm scales by (1 + weight), in f32 before casting back.
    pub norm_offset: bool,
    /// Gemma: embeddings multiplied by sqrt(hidden) (in the weights' dtype).
    pub embed_scale: Option<f64>,
    /// The gated MLP's activation: SiLU (Llama) or tanh-approximated GELU (Gemma).
    pub gelu_mlp: bool,
    /// Gemma 2/3: norms after attention and around the MLP ("sandwich" norms).
    pub sandwich_norms: bool,
    /// Attention scale when not 1/sqrt(head_dim) (Gemma 2/3: query_pre_attn_scalar^-0.5).
    pub attn_scale: Option<f64>,
    /// Gemma 2: attention scores soft-capped as cap * tanh(scores / cap).
    pub attn_softcap: Option<f64>,
    /// Gemma 2: logits soft-capped likewise.
    pub final_softcap: Option<f64>,
    /// Phi-3: q, k and v in one `qkv_proj`, gate and up in one `gate_up_proj`.
    pub fused_projections: bool,
    pub embd_pdrop: f64,
    pub resid_pdrop: f64,
    pub attn_pdrop: f64,
    /// The config.json written with the model.
    pub raw: Value,
    /// The encoder-decoder layout (T5 only).
    pub t5: Option<T5Layout>,
}

/// The `llama3` rope parameters (transformers' `_compute_llama3_parameters`): long
/// wavelengths are divided by `factor`, short ones kept, the band between interpolated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3Rope {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_positions: f64,
}

impl Llama3Rope {
    fn from_hf(r: &Value) -> Result<Self, String> {
        let num = |k: &str| {
            r[k].as_f64()
                .ok_or_else(|| format!("config.json: rope parameters of type llama3 need `{k}`"))
        };
        let rope = Self {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_positions: num("original_max_position_embeddings")?,
        };
        if rope.high_freq_factor <= rope.low_freq_factor || rope.factor <= 0.0 {
            return Err(format!(
                "config.json: llama3 rope needs factor > 0 and high_freq_factor > low_freq_factor (got {rope:?})"
            ));
        }
        Ok(rope)
    }

    /// The per-frequency divisors llama.cpp reads as `rope_freqs.weight` (what
    /// `convert_hf_to_gguf.py` computes for `rope_type: llama3`).
    pub fn factors(&self, head_dim: i64, theta: f64) -> Tensor {
        let low_wavelen = self.original_max_positions / self.low_freq_factor;
        let high_wavelen = self.original_max_positions / self.high_freq_factor;
        let factors: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| {
                let freq = 1.0 / theta.powf(i as f64 / head_dim as f64);
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                (if wavelen < high_wavelen {
                    1.0
                } else if wavelen > low_wavelen {
                    self.factor
                } else {
                    let smooth = (self.original_max_positions / wavelen - self.low_freq_factor)
                        / (self.high_freq_factor - self.low_freq_factor);
                    1.0 / ((1.0 - smooth) / self.factor + smooth)
                }) as f32
            })
            .collect();
        Tensor::from_slice(&factors)
    }

    /// Rescales inverse frequencies (f32, on any device).
    fn apply(&self, inv: &Tensor) -> Tensor {
        let low_wavelen = self.original_max_positions / self.low_freq_factor;
        let high_wavelen = self.original_max_positions / self.high_freq_factor;
        let wavelen = inv.reciprocal() * (2.0 * std::f64::consts::PI);
        let long = wavelen.gt(low_wavelen);
        let scaled = inv.where_self(&long.logical_not(), &(inv / self.factor));
        let smooth = (wavelen.reciprocal() * self.original_max_positions - self.low_freq_factor)
            / (self.high_freq_factor - self.low_freq_factor);
        let smoothed = (smooth.ones_like() - &smooth) * &scaled / self.factor + &smooth * &scaled;
        let medium = wavelen.lt(high_wavelen).logical_not() * long.logical_not();
        smoothed.where_self(&medium, &scaled)
    }
}

/// The `longrope` parameters (transformers' `_compute_longrope_parameters`): each inverse
/// frequency divided by its own factor, the short set while the sequence fits the original
/// context and the long set beyond it (chosen per forward pass from its last position, as
/// transformers' `longrope_frequency_update`), and cos/sin scaled by `attention_factor`.
#[derive(Clone, Debug, PartialEq)]
pub struct LongRope {
    pub short_factor: Vec<f64>,
    pub long_factor: Vec<f64>,
    pub original_max_positions: i64,
    pub attention_factor: f64,
}

impl LongRope {
    fn from_hf(r: &Value, v: &Value, rotary_dim: i64) -> Result<Self, String> {
        let factors = |k: &str| -> Result<Vec<f64>, String> {
            let list = r[k].as_array().ok_or_else(|| {
                format!("config.json: rope parameters of type longrope need `{k}` (a list)")
            })?;
            let list: Option<Vec<f64>> = list.iter().map(Value::as_f64).collect();
            match list {
                Some(list) if list.len() as i64 == rotary_dim / 2 && list.iter().all(|f| *f > 0.0) => {
                    Ok(list)
                }
                _ => Err(format!(
                    "config.json: longrope `{k}` needs {} positive numbers (half the rotary dimensions)",
                    rotary_dim / 2
                )),
            }
        };
        let original_max_positions = r["original_max_position_embeddings"]
            .as_i64()
            .or_else(|| v["original_max_position_embeddings"].as_i64())
            .filter(|n| *n > 1)
            .ok_or("config.json: rope parameters of type longrope need `original_max_position_embeddings`")?;
        // As transformers: without `factor`, the context growth max/original sets it.
        let factor = r["factor"].as_f64().unwrap_or_else(|| {
            int(v, &["max_position_embeddings"]).unwrap_or(original_max_positions) as f64
                / original_max_positions as f64
        });
        let attention_factor = match r["attention_factor"].as_f64() {
            Some(a) => a,
            None if factor <= 1.0 => 1.0,
            None => (1.0 + factor.ln() / (original_max_positions as f64).ln()).sqrt(),
        };
        Ok(Self {
            short_factor: factors("short_factor")?,
            long_factor: factors("long_factor")?,
            original_max_positions,
            attention_factor,
        })
    }
}

fn int(v: &Value, keys: &[&str]) -> Option<i64> {
    keys.iter().find_map(|k| v.get(*k).and_then(Value::as_i64))
}

impl Config {
    /// Reads a Hugging Face config.json.
    pub fn from_hf(v: &Value) -> Result<Self, String> {
        let model_type = v["model_type"].as_str().unwrap_or("");
        let need = |keys: &[&str]| {
            int(v, keys).ok_or_else(|| format!("config.json: `{}` is missing", keys[0]))
        };
        match model_type {
            "gpt2" => {
                let hidden = need(&["n_embd", "hidden_size"])?;
                let heads = need(&["n_head", "num_attention_heads"])?;
                let act = v["activation_function"].as_str().unwrap_or("gelu_new");
                if !matches!(act, "gelu_new" | "gelu_pytorch_tanh") {
                    return Err(format!(
                        "config.json: activation_function {act:?} is not supported (gelu_new)"
                    ));
                }
                if v["scale_attn_by_inverse_layer_idx"].as_bool() == Some(true)
                    || v["reorder_and_upcast_attn"].as_bool() == Some(true)
                {
                    return Err("config.json: scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported".into());
                }
                Ok(Self {
                    arch: Arch::Gpt2,
                    vocab: need(&["vocab_size"])?,
                    hidden,
                    layers: need(&["n_layer", "num_hidden_layers"])?,
                    heads,
                    kv_heads: heads,
                    head_dim: hidden / heads,
                    intermediate: int(v, &["n_inner"]).unwrap_or(4 * hidden),
                    max_positions: need(&["n_positions", "max_position_embeddings"])?,
                    eps: v["layer_norm_epsilon"].as_f64().unwrap_or(1e-5),
                    rope_theta: 0.0,
                    rope_llama3: None,
                    tie_embeddings: v["tie_word_embeddings"].as_bool().unwrap_or(true),
                    qkv_bias: true,
                    qk_norm: false,
                    sliding_window: None,
                    sliding_layers: Vec::new(),
                    rope_theta_local: None,
                    rope_linear: None,
                    rope_long: None,
                    rotary_dim: hidden / heads,
                    norm_offset: false,
                    embed_scale: None,
                    gelu_mlp: false,
                    sandwich_norms: false,
                    attn_scale: None,
                    attn_softcap: None,
                    final_softcap: None,
                    fused_projections: false,
                    embd_pdrop: v["embd_pdrop"].as_f64().unwrap_or(0.1),
                    resid_pdrop: v["resid_pdrop"].as_f64().unwrap_or(0.1),
                    attn_pdrop: v["attn_pdrop"].as_f64().unwrap_or(0.1),
                    raw: v.clone(),
                    t5: None,
                })
            }
            "llama" | "qwen2" | "qwen3" | "mistral" | "phi3" | "gemma" | "gemma2"
            | "gemma3_text" => {
                let hidden = need(&["hidden_size"])?;
                let heads = need(&["num_attention_heads"])?;
                let layers = need(&["num_hidden_layers"])?;
                let gemma = model_type.starts_with("gemma");
                let act = if gemma {
                    v["hidden_activation"]
                        .as_str()
                        .or_else(|| v["hidden_act"].as_str())
                        .unwrap_or("gelu_pytorch_tanh")
                } else {
                    v["hidden_act"].as_str().unwrap_or("silu")
                };
                let gelu_mlp = match (act, gemma) {
                    ("silu", false) => false,
                    // transformers maps Gemma's legacy `gelu` to the tanh approximation.
                    ("gelu_pytorch_tanh" | "gelu", true) => true,
                    _ => {
                        return Err(format!(
                            "config.json: hidden activation {act:?} is not supported ({})",
                            if gemma { "gelu_pytorch_tanh" } else { "silu" }
                        ))
                    }
                };
                // Gemma 3 keeps one set of rope parameters per layer type.
                let rope_all = v.get("rope_parameters").filter(|r| r.is_object());
                let rope = rope_all.and_then(|r| r.get("full_attention")).or(rope_all);
                let rope_local = rope_all.and_then(|r| r.get("sliding_attention"));
                let rope_type = match rope {
                    Some(r)
                        if r.get("full_attention").is_none() && r.get("rope_type").is_some() =>
                    {
                        r["rope_type"].as_str().unwrap_or("default")
                    }
                    _ => cairn::ml::family::rope_type(v),
                };
                let scaling = rope
                    .or_else(|| v.get("rope_scaling"))
                    .unwrap_or(&Value::Null);
                let head_dim =
                    int(v, &["head_dim"]).unwrap_or(if gemma { 256 } else { hidden / heads });
                let partial = rope
                    .and_then(|r| r["partial_rotary_factor"].as_f64())
                    .or_else(|| v["partial_rotary_factor"].as_f64())
                    .unwrap_or(1.0);
                let rotary_dim = (head_dim as f64 * partial) as i64;
                // transformers rotates part of each head only in the Phi-3 family.
                if partial != 1.0
                    && (model_type != "phi3"
                        || !(partial > 0.0 && partial < 1.0)
                        || rotary_dim % 2 != 0)
                {
                    return Err(format!(
                        "config.json: partial_rotary_factor {partial} is not supported for {model_type} (phi3: a factor in (0, 1] giving an even number of dimensions; others: 1.0)"
                    ));
                }
                let (rope_llama3, rope_linear, rope_long) = match rope_type {
                    "default" => (None, None, None),
                    "llama3" => (Some(Llama3Rope::from_hf(scaling)?), None, None),
                    "linear" => (
                        None,
                        Some(scaling["factor"].as_f64().filter(|f| *f > 0.0).ok_or(
                            "config.json: rope parameters of type linear need a positive `factor`",
                        )?),
                        None,
                    ),
                    "longrope" => (None, None, Some(LongRope::from_hf(scaling, v, rotary_dim)?)),
                    other => {
                        return Err(format!(
                            "config.json: rope scaling {other:?} is not supported ({})",
                            cairn::ml::family::ROPE_TYPES.join(", ")
                        ))
                    }
                };
                if let Some(local) = rope_local {
                    let kind = local["rope_type"].as_str().unwrap_or("default");
                    if kind != "default" {
                        return Err(format!("config.json: rope scaling {kind:?} on sliding layers is not supported (default)"));
                    }
                }
                if matches!(model_type, "qwen2" | "qwen3")
                    && v["use_sliding_window"].as_bool() == Some(true)
                {
                    return Err(format!("config.json: use_sliding_window is not supported for {model_type} (set it to false)"));
                }
                let windowed = matches!(model_type, "mistral" | "phi3" | "gemma2" | "gemma3_text");
                let sliding_window = match v.get("sliding_window") {
                    Some(w) if windowed && !w.is_null() => {
                        Some(w.as_i64().filter(|w| *w > 0).ok_or_else(|| {
                            format!(
                                "config.json: sliding_window {w} is not a positive whole number"
                            )
                        })?)
                    }
                    _ => None,
                };
                // Which layers slide: `layer_types` when given, else the family's pattern
                // (transformers writes layer_types into every config it saves).
                let sliding_layers: Vec<bool> = match v["layer_types"].as_array() {
                    Some(types) if sliding_window.is_some() => {
                        if types.len() as i64 != layers {
                            return Err(format!("config.json: layer_types lists {} layers, num_hidden_layers is {layers}", types.len()));
                        }
                        types
                            .iter()
                            .map(|t| match t.as_str() {
                                Some("sliding_attention") => Ok(true),
                                Some("full_attention") => Ok(false),
                                _ => Err(format!("config.json: layer type {t} is not supported (sliding_attention, full_attention)")),
                            })
                            .collect::<Result<_, _>>()?
                    }
                    _ if sliding_window.is_none() => vec![false; layers as usize],
                    _ => (0..layers)
                        .map(|i| match model_type {
                            "gemma2" => (i + 1) % 2 != 0,
                            "gemma3_text" => (i + 1) % 6 != 0,
                            _ => true,
                        })
                        .collect(),
                };
                let rope_theta = rope
                    .and_then(|r| r["rope_theta"].as_f64())
                    .or_else(|| v["rope_theta"].as_f64())
                    .unwrap_or(if model_type == "gemma3_text" {
                        1_000_000.0
                    } else {
                        10000.0
                    });
                let rope_theta_local = (model_type == "gemma3_text").then(|| {
                    rope_local
                        .and_then(|r| r["rope_theta"].as_f64())
                        .or_else(|| v["rope_local_base_freq"].as_f64())
                        .unwrap_or(10000.0)
                });
                let softcap = |key: &str, default: Option<f64>| match v.get(key) {
                    Some(Value::Null) => None,
                    Some(x) => x.as_f64(),
                    None => default,
                };
                Ok(Self {
                    arch: Arch::Llama,
                    vocab: need(&["vocab_size"])?,
                    hidden,
                    layers,
                    heads,
                    kv_heads: int(v, &["num_key_value_heads"]).unwrap_or(heads),
                    head_dim,
                    intermediate: need(&["intermediate_size"])?,
                    max_positions: int(v, &["max_position_embeddings"]).unwrap_or(2048),
                    eps: v["rms_norm_eps"].as_f64().unwrap_or(1e-6),
                    rope_theta,
                    rope_llama3,
                    tie_embeddings: v["tie_word_embeddings"]
                        .as_bool()
                        .unwrap_or(model_type == "qwen2" || gemma),
                    qkv_bias: model_type == "qwen2" || v["attention_bias"].as_bool() == Some(true),
                    qk_norm: matches!(model_type, "qwen3" | "gemma3_text"),
                    sliding_window,
                    sliding_layers,
                    rope_theta_local,
                    rope_linear,
                    rope_long,
                    rotary_dim,
                    norm_offset: gemma,
                    embed_scale: gemma.then(|| (hidden as f64).sqrt()),
                    gelu_mlp,
                    sandwich_norms: matches!(model_type, "gemma2" | "gemma3_text"),
                    attn_scale: match model_type {
                        "gemma2" | "gemma3_text" => Some(
                            v["query_pre_attn_scalar"]
                                .as_f64()
                                .unwrap_or(head_dim as f64)
                                .powf(-0.5),
                        ),
                        _ => None,
                    },
                    attn_softcap: if model_type == "gemma2" {
                        softcap("attn_logit_softcapping", Some(50.0))
                    } else {
                        softcap("attn_logit_softcapping", None)
                    },
                    final_softcap: if model_type == "gemma2" {
                        softcap("final_logit_softcapping", Some(30.0))
                    } else {
                        softcap("final_logit_softcapping", None)
                    },
                    fused_projections: model_type == "phi3",
                    embd_pdrop: 0.0,
                    // Phi-3 drops out the attention and MLP outputs before each residual.
                    resid_pdrop: v["resid_pdrop"].as_f64().unwrap_or(0.0),
                    attn_pdrop: v["attention_dropout"].as_f64().unwrap_or(0.0),
                    raw: v.clone(),
                    t5: None,
                })
            }
            "t5" => t5::config(v),
            other => Err(format!(
                "config.json: model_type {other:?} is not supported; cairn trains {}",
                cairn::ml::family::MODEL_TYPES.join(", ")
            )),
        }
    }

    /// A config.json for a model built from `s` with `vocab` tokens.
    pub fn scratch(s: &ScratchConfig, vocab: i64, eos_id: i64) -> Result<Self, String> {
        if s.hidden % s.heads != 0 {
            return Err(format!(
                "scratch: hidden {} is not a multiple of heads {}",
                s.hidden, s.heads
            ));
        }
        let raw = match s.arch.as_str() {
            "gpt2" => json!({
                "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                "vocab_size": vocab, "n_embd": s.hidden, "n_layer": s.layers, "n_head": s.heads,
                "n_inner": s.intermediate, "n_positions": s.max_positions,
                "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
                "embd_pdrop": 0.0, "resid_pdrop": 0.0, "attn_pdrop": 0.0,
                "tie_word_embeddings": true, "bos_token_id": eos_id, "eos_token_id": eos_id,
                "torch_dtype": "float32",
            }),
            "llama" => {
                let kv = s.kv_heads.unwrap_or(s.heads);
                if s.heads % kv != 0 {
                    return Err(format!(
                        "scratch: heads {} is not a multiple of kv_heads {kv}",
                        s.heads
                    ));
                }
                let inter = s
                    .intermediate
                    .unwrap_or(((s.hidden * 8 / 3) + 63) / 64 * 64);
                json!({
                    "model_type": "llama", "architectures": ["LlamaForCausalLM"],
                    "vocab_size": vocab, "hidden_size": s.hidden, "num_hidden_layers": s.layers,
                    "num_attention_heads": s.heads, "num_key_value_heads": kv,
                    "intermediate_size": inter, "max_position_embeddings": s.max_positions,
                    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
                    "tie_word_embeddings": true, "attention_bias": false,
                    "bos_token_id": eos_id, "eos_token_id": eos_id, "torch_dtype": "float32",
                })
            }
            other => {
                return Err(format!(
                    "scratch: arch {other:?} is not supported (gpt2, llama)"
                ))
            }
        };
        Self::from_hf(&raw)
    }

    /// Parameters by name and shape, in a fixed order.
    pub fn expected(&self) -> Vec<(String, Vec<i64>)> {
        let (h, i, v) = (self.hidden, self.intermediate, self.vocab);
        let mut out: Vec<(String, Vec<i64>)> = Vec::new();
        let mut add = |n: String, s: Vec<i64>| out.push((n, s));
        match self.arch {
            Arch::Gpt2 => {
                add("transformer.wte.weight".into(), vec![v, h]);
                add("transformer.wpe.weight".into(), vec![self.max_positions, h]);
                for l in 0..self.layers {
                    let p = format!("transformer.h.{l}");
                    add(format!("{p}.ln_1.weight"), vec![h]);
                    add(format!("{p}.ln_1.bias"), vec![h]);
                    add(format!("{p}.attn.c_attn.weight"), vec![h, 3 * h]);
                    add(format!("{p}.attn.c_attn.bias"), vec![3 * h]);
                    add(format!("{p}.attn.c_proj.weight"), vec![h, h]);
                    add(format!("{p}.attn.c_proj.bias"), vec![h]);
                    add(format!("{p}.ln_2.weight"), vec![h]);
                    add(format!("{p}.ln_2.bias"), vec![h]);
                    add(format!("{p}.mlp.c_fc.weight"), vec![h, i]);
                    add(format!("{p}.mlp.c_fc.bias"), vec![i]);
                    add(format!("{p}.mlp.c_proj.weight"), vec![i, h]);
                    add(format!("{p}.mlp.c_proj.bias"), vec![h]);
                }
                add("transformer.ln_f.weight".into(), vec![h]);
                add("transformer.ln_f.bias".into(), vec![h]);
                if !self.tie_embeddings {
                    add("lm_head.weight".into(), vec![v, h]);
                }
            }
            Arch::Llama => {
                let (q, kv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
                add("model.embed_tokens.weight".into(), vec![v, h]);
                for l in 0..self.layers {
                    let p = format!("model.layers.{l}");
                    add(format!("{p}.input_layernorm.weight"), vec![h]);
                    if self.fused_projections {
                        add(
                            format!("{p}.self_attn.qkv_proj.weight"),
                            vec![q + 2 * kv, h],
                        );
                    } else {
                        add(format!("{p}.self_attn.q_proj.weight"), vec![q, h]);
                        add(format!("{p}.self_attn.k_proj.weight"), vec![kv, h]);
                        add(format!("{p}.self_attn.v_proj.weight"), vec![kv, h]);
                    }
                    if self.qkv_bias {
                        add(format!("{p}.self_attn.q_proj.bias"), vec![q]);
                        add(format!("{p}.self_attn.k_proj.bias"), vec![kv]);
                        add(format!("{p}.self_attn.v_proj.bias"), vec![kv]);
                    }
                    if self.qk_norm {
                        add(format!("{p}.self_attn.q_norm.weight"), vec![self.head_dim]);
                        add(format!("{p}.self_attn.k_norm.weight"), vec![self.head_dim]);
                    }
                    add(format!("{p}.self_attn.o_proj.weight"), vec![h, q]);
                    add(format!("{p}.post_attention_layernorm.weight"), vec![h]);
                    if self.sandwich_norms {
                        add(format!("{p}.pre_feedforward_layernorm.weight"), vec![h]);
                        add(format!("{p}.post_feedforward_layernorm.weight"), vec![h]);
                    }
                    if self.fused_projections {
                        add(format!("{p}.mlp.gate_up_proj.weight"), vec![2 * i, h]);
                    } else {
                        add(format!("{p}.mlp.gate_proj.weight"), vec![i, h]);
                        add(format!("{p}.mlp.up_proj.weight"), vec![i, h]);
                    }
                    add(format!("{p}.mlp.down_proj.weight"), vec![h, i]);
                }
                add("model.norm.weight".into(), vec![h]);
                if !self.tie_embeddings {
                    add("lm_head.weight".into(), vec![v, h]);
                }
            }
            Arch::T5 => t5::expected(self, self.t5.as_ref().expect("T5 layout"), &mut add),
        }
        out
    }

    /// The LoRA targets when none are given: PEFT's defaults (`c_attn` for GPT-2, q/v
    /// for the Llama family), Phi-3's fused `qkv_proj`.
    pub fn default_lora_targets(&self) -> Vec<String> {
        if self.fused_projections {
            vec!["qkv_proj".into()]
        } else {
            self.arch.default_lora_targets()
        }
    }

    /// Whether module `name` stores its weight as [in, out] (GPT-2's Conv1D).
    pub fn is_conv1d(&self) -> bool {
        self.arch == Arch::Gpt2
    }

    /// Input and output width of linear module `module` (for LoRA).
    pub fn linear_shape(&self, s: &[i64]) -> (i64, i64) {
        if self.is_conv1d() {
            (s[0], s[1])
        } else {
            (s[1], s[0])
        }
    }

    /// Model FLOPs per token for training (6 x parameters + attention), as in the MFU
    /// definition of the PaLM paper.
    pub fn train_flops_per_token(&self, params: i64, seq: i64) -> f64 {
        6.0 * params as f64 + 12.0 * (self.layers * self.hidden * seq) as f64
    }
}

/// A LoRA adapter on one linear module.
pub struct LoraPair {
    /// [r, in]
    pub a: Tensor,
    /// [out, r]
    pub b: Tensor,
}

/// What the blocks need to know about positions.
pub struct Positions {
    /// Llama: rotary tables [seq, head_dim] (or [batch, 1, seq, head_dim] when each row
    /// has its own positions); `None` for GPT-2, whose learned positions are already in
    /// the embeddings.
    rotary: Option<Rotary>,
    /// Batched decoding of rows of different lengths: [batch, 1, 1, keys], true where
    /// the row has a key (rows are left-padded in the cache).
    key_mask: Option<Tensor>,
}

/// Rotary tables; `local` for sliding layers that rotate with their own base frequency
/// (Gemma 3).
struct Rotary {
    cos: Tensor,
    sin: Tensor,
    local: Option<(Tensor, Tensor)>,
}

/// Per-layer key/value cache for generation.
pub type Cache = Vec<Option<(Tensor, Tensor)>>;

/// A decoder model on one device.
pub struct Model {
    pub cfg: Config,
    pub params: BTreeMap<String, Tensor>,
    /// Adapters by module path (e.g. `transformer.h.0.attn.c_attn`).
    pub lora: BTreeMap<String, LoraPair>,
    pub lora_scaling: f64,
    pub lora_dropout: f64,
    /// Dropout on (training) or off.
    pub train: bool,
    pub device: Device,
    /// Rows for tokens added to the vocabulary, trained on their own while the rest of
    /// the embeddings stays frozen (LoRA with `add_tokens`).
    pub new_rows: Option<NewRows>,
    /// Frozen block weights held in NF4 (QLoRA), dequantized when their layer runs.
    pub quantized: BTreeMap<String, Nf4Weight>,
    /// The dtype quantized weights are dequantized to.
    pub compute_kind: Kind,
    /// Adapters of the preference-tuning reference when they are not the trained ones
    /// (DPO continuing an input adapter: the reference is that adapter as it came in);
    /// `None`: the reference is the base without adapters.
    pub reference_lora: Option<BTreeMap<String, LoraPair>>,
    /// Set while [`Model::as_reference`] runs.
    reference_pass: std::cell::Cell<bool>,
}

/// A model as plain weights (see [`Model::folded`]).
pub enum Folded<'a> {
    /// The model itself, already plain.
    Same(&'a Model),
    /// A merged copy.
    Merged(Box<Model>),
}

impl std::ops::Deref for Folded<'_> {
    type Target = Model;

    fn deref(&self) -> &Model {
        match self {
            Folded::Same(m) => m,
            Folded::Merged(m) => m,
        }
    }
}

/// Embedding (and untied output head) rows of added tokens, after the model's own.
pub struct NewRows {
    /// [added, hidden]
    pub embed: Tensor,
    /// [added, hidden], when the head is not tied to the embeddings.
    pub head: Option<Tensor>,
}

/// Reads every tensor of a model directory (model.safetensors, or the shards named by
/// model.safetensors.index.json) that `wanted` accepts, floating-point tensors converted
/// to `kind` one at a time as they are read: a bf16 model stored in f32 never exists
/// whole in f32, and tensors the config does not use (a tied head) are never read.
/// `keep` sees each tensor as it is read and returns what to keep of it (`None`: it took
/// the tensor, e.g. to quantize it).
pub fn read_weights(
    dir: &Path,
    kind: Kind,
    wanted: &dyn Fn(&str) -> bool,
    keep: &mut dyn FnMut(String, Tensor) -> Option<(String, Tensor)>,
) -> Result<Vec<(String, Tensor)>, String> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<std::path::PathBuf> = if single.exists() {
        vec![single]
    } else if index.exists() {
        let text =
            std::fs::read_to_string(&index).map_err(|e| format!("{}: {e}", index.display()))?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", index.display()))?;
        let mut names: Vec<String> = v["weight_map"]
            .as_object()
            .ok_or_else(|| format!("{}: no weight_map", index.display()))?
            .values()
            .filter_map(|f| f.as_str().map(str::to_string))
            .collect();
        names.sort();
        names.dedup();
        names.into_iter().map(|n| dir.join(n)).collect()
    } else {
        let hint = if dir.join("pytorch_model.bin").exists() {
            " (only pytorch_model.bin: convert it once with `AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)`)"
        } else {
            ""
        };
        return Err(format!(
            "{}: no model.safetensors or model.safetensors.index.json{hint}",
            dir.display()
        ));
    };
    let mut out = Vec::new();
    for f in files {
        read_safetensors_as(&f, kind, wanted, keep, &mut out)
            .map_err(|e| format!("{}: {e}", f.display()))?;
    }
    Ok(out)
}

/// Appends the tensors of one safetensors file to `out`, each read on its own (positioned
/// reads, so only one tensor's bytes are ever held beyond the result) and converted to
/// `kind` when it is a floating-point tensor.
fn read_safetensors_as(
    path: &Path,
    kind: Kind,
    wanted: &dyn Fn(&str) -> bool,
    keep: &mut dyn FnMut(String, Tensor) -> Option<(String, Tensor)>,
    out: &mut Vec<(String, Tensor)>,
) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    const MAX_HEADER: usize = 100 << 20;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let file_len = file.metadata().map_err(|e| e.to_string())?.len() as usize;
    let mut n = [0u8; 8];
    file.read_exact_at(&mut n, 0)
        .map_err(|e| format!("not a safetensors file: {e}"))?;
    let n = u64::from_le_bytes(n) as usize;
    if n > MAX_HEADER || 8 + n > file_len {
        return Err(format!("not a safetensors file (header of {n} bytes)"));
    }
    let mut header = vec![0u8; n];
    file.read_exact_at(&mut header, 8)
        .map_err(|e| e.to_string())?;
    let meta: safetensors::tensor::Metadata =
        serde_json::from_slice(&header).map_err(|e| format!("bad safetensors header: {e}"))?;
    let data_start = 8 + n;
    let mut tensors: Vec<(String, &safetensors::tensor::TensorInfo)> = meta
        .tensors()
        .into_iter()
        .filter(|(name, _)| wanted(name))
        .collect();
    tensors.sort_by_key(|(_, info)| info.data_offsets.0);
    for (name, info) in tensors {
        let (start, end) = info.data_offsets;
        let numel: usize = info.shape.iter().product();
        let stored = stored_kind(info.dtype)
            .ok_or_else(|| format!("tensor {name}: dtype {:?} is not supported", info.dtype))?;
        if end < start
            || data_start + end > file_len
            || end - start != numel * info.dtype.bitsize() / 8
        {
            return Err(format!(
                "tensor {name}: data offsets {start}..{end} do not match its shape {:?} or the file size",
                info.shape
            ));
        }
        let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        let floating = matches!(
            stored,
            Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double
        );
        let target = if floating { kind } else { stored };
        let offset = (data_start + start) as u64;
        let t = read_converted(&file, offset, &shape, stored, target)
            .map_err(|e| format!("tensor {name}: {e}"))?;
        out.extend(keep(name, t));
    }
    Ok(())
}

/// A tensor of `shape` stored as `stored` at `offset`, read in slices of at most 64 MiB
/// that are converted into a tensor of `target` as they come: a 1 GB f32 embedding
/// becomes bf16 without ever being held whole in f32.
fn read_converted(
    file: &std::fs::File,
    offset: u64,
    shape: &[i64],
    stored: Kind,
    target: Kind,
) -> Result<Tensor, String> {
    use std::os::unix::fs::FileExt;
    const SLICE_BYTES: i64 = 64 << 20;
    let elt = stored.elt_size_in_bytes() as i64;
    let (rows, row_shape) = match shape.split_first() {
        Some((&rows, rest)) => (rows, rest.to_vec()),
        None => (1, Vec::new()),
    };
    let row_bytes = row_shape.iter().product::<i64>() * elt;
    let mut out = Tensor::f_empty(shape, (target, tch::Device::Cpu)).map_err(|e| e.to_string())?;
    let total = (rows * row_bytes) as usize;
    if total == 0 {
        return Ok(out);
    }
    if stored == target {
        // Same dtype: read straight into the tensor's memory.
        // SAFETY: `out` is a fresh contiguous CPU tensor of exactly `total` bytes, not
        // shared with anything else while this slice lives.
        let dst = unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut u8, total) };
        file.read_exact_at(dst, offset).map_err(|e| e.to_string())?;
        return Ok(out);
    }
    let per_slice = (SLICE_BYTES / row_bytes.max(1)).max(1);
    let mut buf = Vec::new();
    let mut row = 0;
    while row < rows {
        let n = per_slice.min(rows - row);
        buf.resize((n * row_bytes) as usize, 0);
        file.read_exact_at(&mut buf, offset + (row * row_bytes) as u64)
            .map_err(|e| e.to_string())?;
        let mut slice_shape = vec![n];
        slice_shape.extend(&row_shape);
        if shape.is_empty() {
            slice_shape.clear();
        }
        let part =
            Tensor::f_from_data_size(&buf, &slice_shape, stored).map_err(|e| e.to_string())?;
        let _guard = tch::no_grad_guard();
        if shape.is_empty() {
            out.f_copy_(&part).map_err(|e| e.to_string())?;
        } else {
            out.narrow(0, row, n)
                .f_copy_(&part)
                .map_err(|e| e.to_string())?;
        }
        row += n;
    }
    Ok(out)
}

fn stored_kind(dtype: safetensors::Dtype) -> Option<Kind> {
    use safetensors::Dtype as D;
    Some(match dtype {
        D::F32 => Kind::Float,
        D::F16 => Kind::Half,
        D::BF16 => Kind::BFloat16,
        D::F64 => Kind::Double,
        D::I64 => Kind::Int64,
        D::I32 => Kind::Int,
        D::I16 => Kind::Int16,
        D::I8 => Kind::Int8,
        D::U8 => Kind::Uint8,
        D::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// Whether `name` is the weight of a linear layer inside a block (what QLoRA quantizes;
/// embeddings, norms and the head stay in the compute dtype, as with bitsandbytes).
pub fn is_block_linear(name: &str, t: &Tensor) -> bool {
    t.dim() == 2
        && name.ends_with(".weight")
        && (name.starts_with("model.layers.")
            || name.starts_with("transformer.h.")
            || name.starts_with("encoder.block.")
            || name.starts_with("decoder.block."))
        && !name.ends_with("relative_attention_bias.weight")
}

impl Config {
    /// A checkpoint tensor's name as the model keys it (GPT-2 checkpoints may lack the
    /// `transformer.` prefix).
    pub fn hf_name(&self, name: String) -> String {
        if self.arch == Arch::Gpt2
            && !name.starts_with("transformer.")
            && !name.starts_with("lm_head")
        {
            format!("transformer.{name}")
        } else {
            name
        }
    }

    /// Whether a checkpoint tensor of this name is one the model uses (GPT-2 checkpoints
    /// name them with or without the `transformer.` prefix).
    pub fn uses_tensor(&self) -> impl Fn(&str) -> bool {
        let names: std::collections::HashSet<String> =
            self.expected().into_iter().map(|(n, _)| n).collect();
        let gpt2 = self.arch == Arch::Gpt2;
        move |name: &str| {
            names.contains(name) || (gpt2 && names.contains(&format!("transformer.{name}")))
        }
    }
}

impl Model {
    /// Builds a model from named tensors (HF names, with or without GPT-2's
    /// `transformer.` prefix) and already quantized block weights, checking that every
    /// weight is there with its shape. Weights are stored in `kind` (f32, or bf16/f16 to
    /// halve their memory), which is also what quantized weights compute in.
    pub fn from_tensors(
        cfg: Config,
        tensors: Vec<(String, Tensor)>,
        mut quantized: BTreeMap<String, Nf4Weight>,
        device: Device,
        kind: Kind,
    ) -> Result<Self, String> {
        let mut by_name: BTreeMap<String, Tensor> = BTreeMap::new();
        for (name, t) in tensors {
            by_name.insert(cfg.hf_name(name), t);
        }
        let mut params = BTreeMap::new();
        let mut kept = BTreeMap::new();
        for (name, shape) in cfg.expected() {
            if let Some(q) = quantized.remove(&name) {
                if q.shape != shape {
                    return Err(format!(
                        "tensor `{name}` has shape {:?}, the config implies {shape:?}",
                        q.shape
                    ));
                }
                kept.insert(name, q);
                continue;
            }
            let t = by_name.remove(&name).ok_or_else(|| {
                format!(
                    "the checkpoint has no tensor `{name}` (expected {shape:?} for this config)"
                )
            })?;
            if t.size() != shape {
                return Err(format!(
                    "tensor `{name}` has shape {:?}, the config implies {shape:?}",
                    t.size()
                ));
            }
            params.insert(name, t.to_kind(kind).to_device(device).detach());
        }
        let mut model = Self::new(cfg, params, device);
        model.quantized = kept;
        model.compute_kind = kind;
        Ok(model)
    }

    /// Initialises fresh weights the way `transformers` does (normal(0, 0.02), GPT-2's
    /// residual projections scaled by 1/sqrt(2 x layers), norms at 1, biases at 0).
    pub fn init(cfg: Config, device: Device, seed: u64) -> Self {
        tch::manual_seed(seed as i64);
        let mut params = BTreeMap::new();
        let proj_std = 0.02 / ((2 * cfg.layers) as f64).sqrt();
        for (name, shape) in cfg.expected() {
            let t = if name.ends_with(".bias") {
                Tensor::zeros(shape.as_slice(), (Kind::Float, device))
            } else if shape.len() == 1 {
                Tensor::ones(shape.as_slice(), (Kind::Float, device))
            } else {
                let std = if cfg.arch == Arch::Gpt2 && name.ends_with("c_proj.weight") {
                    proj_std
                } else {
                    0.02
                };
                Tensor::randn(shape.as_slice(), (Kind::Float, device)) * std
            };
            params.insert(name, t);
        }
        Self::new(cfg, params, device)
    }

    /// A model in inference mode with these weights and no adapters.
    fn new(cfg: Config, params: BTreeMap<String, Tensor>, device: Device) -> Self {
        Self {
            cfg,
            params,
            lora: BTreeMap::new(),
            lora_scaling: 1.0,
            lora_dropout: 0.0,
            train: false,
            device,
            new_rows: None,
            quantized: BTreeMap::new(),
            compute_kind: Kind::Float,
            reference_lora: None,
            reference_pass: std::cell::Cell::new(false),
        }
    }

    /// Runs `f` with this model as its own preference-tuning reference: the adapters
    /// swapped for [`Model::reference_lora`] (or left out) and dropout off, without a
    /// second copy of the base weights (PEFT's `disable_adapter`, as TRL uses it).
    pub fn as_reference<T>(&self, f: impl FnOnce() -> T) -> T {
        self.reference_pass.set(true);
        let out = f();
        self.reference_pass.set(false);
        out
    }

    /// Whether dropout applies now (training, and not a reference pass).
    fn training(&self) -> bool {
        self.train && !self.reference_pass.get()
    }

    /// A second model over the same weight storage (adapters attached to it stay its
    /// own): several adapters served over one base hold the base once.
    pub fn share(&self) -> Self {
        self.copy_with(Tensor::shallow_clone)
    }

    /// A copy whose weights do not move when this model's are trained (the reference of
    /// full-model preference tuning).
    pub fn frozen_copy(&self) -> Self {
        let _guard = tch::no_grad_guard();
        self.copy_with(|t| t.detach().copy())
    }

    /// This model with every plain tensor (weights, adapters, added rows) passed through
    /// `copy`; NF4 weights are never written, so they are shared.
    fn copy_with(&self, copy: impl Fn(&Tensor) -> Tensor) -> Self {
        let mut m = Self::new(
            self.cfg.clone(),
            self.params
                .iter()
                .map(|(k, v)| (k.clone(), copy(v)))
                .collect(),
            self.device,
        );
        m.quantized = self
            .quantized
            .iter()
            .map(|(k, q)| (k.clone(), q.share()))
            .collect();
        m.compute_kind = self.compute_kind;
        m.lora_scaling = self.lora_scaling;
        m.lora = self
            .lora
            .iter()
            .map(|(k, p)| {
                (
                    k.clone(),
                    LoraPair {
                        a: copy(&p.a),
                        b: copy(&p.b),
                    },
                )
            })
            .collect();
        m.new_rows = self.new_rows.as_ref().map(|r| NewRows {
            embed: copy(&r.embed),
            head: r.head.as_ref().map(&copy),
        });
        m
    }

    /// The weight `name`, dequantized when it is held in NF4.
    fn weight(&self, name: &str) -> Tensor {
        match self.params.get(name) {
            Some(t) => t.shallow_clone(),
            None => self
                .quantized
                .get(name)
                .unwrap_or_else(|| panic!("missing parameter {name}"))
                .dequantize(self.compute_kind),
        }
    }

    /// The shape of weight `name`, quantized or not.
    fn weight_shape(&self, name: &str) -> Vec<i64> {
        match self.params.get(name) {
            Some(t) => t.size(),
            None => self.quantized[name].shape.clone(),
        }
    }

    /// Dequantizes every NF4 weight back into `compute_kind` (for merging and export).
    pub fn dequantize_all(&mut self) {
        for (name, q) in std::mem::take(&mut self.quantized) {
            self.params.insert(name, q.dequantize(self.compute_kind));
        }
    }

    /// The name of the token embedding table.
    pub fn embed_name(&self) -> &'static str {
        match self.cfg.arch {
            Arch::Gpt2 => "transformer.wte.weight",
            Arch::Llama => "model.embed_tokens.weight",
            Arch::T5 => "shared.weight",
        }
    }

    /// The token embeddings, added rows included.
    pub fn embed_table(&self) -> Tensor {
        let base = self.p(self.embed_name());
        match &self.new_rows {
            Some(rows) => Tensor::cat(&[base, &rows.embed.to_kind(base.kind())], 0),
            None => base.shallow_clone(),
        }
    }

    /// The output head's weights, added rows included.
    pub fn head_table(&self) -> Tensor {
        if self.cfg.tie_embeddings {
            return self.embed_table();
        }
        let base = self.p("lm_head.weight");
        match self.new_rows.as_ref().and_then(|r| r.head.as_ref()) {
            Some(rows) => Tensor::cat(&[base, &rows.to_kind(base.kind())], 0),
            None => base.shallow_clone(),
        }
    }

    /// Grows the vocabulary to `vocab` rows, new rows initialised to the mean of the old
    /// ones (embeddings and an untied head). With `separate`, the new rows are kept apart
    /// in f32 so that they alone can be trained (LoRA); else the tables grow in place.
    pub fn grow_vocab(&mut self, vocab: i64, separate: bool) {
        let added = vocab - self.cfg.vocab;
        if added <= 0 {
            return;
        }
        let _guard = tch::no_grad_guard();
        let mean_rows = |t: &Tensor| {
            t.to_kind(Kind::Float)
                .mean_dim(&[0i64][..], true, None::<Kind>)
                .expand([added, t.size()[1]], false)
                .contiguous()
        };
        let embed_name = self.embed_name();
        let embed = mean_rows(self.p(embed_name));
        let head = (!self.cfg.tie_embeddings).then(|| mean_rows(self.p("lm_head.weight")));
        if separate {
            self.new_rows = Some(NewRows { embed, head });
        } else {
            let grow = |base: &Tensor, rows: &Tensor| {
                Tensor::cat(&[base, &rows.to_kind(base.kind())], 0).detach()
            };
            let grown = grow(self.p(embed_name), &embed);
            self.params.insert(embed_name.to_string(), grown);
            if let Some(head) = head {
                let grown = grow(self.p("lm_head.weight"), &head);
                self.params.insert("lm_head.weight".to_string(), grown);
            }
        }
        self.cfg.vocab = vocab;
        self.cfg.raw["vocab_size"] = json!(vocab);
    }

    /// Folds separately kept rows of added tokens into the tables.
    pub fn fold_new_rows(&mut self) {
        if self.new_rows.is_none() {
            return;
        }
        let embed = self.embed_table().detach();
        let head = (!self.cfg.tie_embeddings).then(|| self.head_table().detach());
        self.params.insert(self.embed_name().to_string(), embed);
        if let Some(head) = head {
            self.params.insert("lm_head.weight".to_string(), head);
        }
        self.new_rows = None;
    }

    /// This model as plain weights, for saving and export: itself when it holds no
    /// adapters, added-token rows or NF4 weights, else [`Model::merged`].
    pub fn folded(&self) -> Folded<'_> {
        if self.lora.is_empty() && self.quantized.is_empty() && self.new_rows.is_none() {
            Folded::Same(self)
        } else {
            Folded::Merged(Box::new(self.merged()))
        }
    }

    /// This model with its adapters folded into the weights; `self` is left as it was
    /// (merging replaces weight tensors, it never writes into them, so sharing is safe).
    pub fn merged(&self) -> Self {
        let mut m = self.copy_with(Tensor::shallow_clone);
        m.merge_lora();
        m.fold_new_rows();
        m.dequantize_all();
        m
    }

    /// The dtype the base weights are stored in, as transformers names it.
    pub fn dtype_name(&self) -> &'static str {
        match self.params.values().next().map(Tensor::kind) {
            Some(Kind::BFloat16) => "bfloat16",
            Some(Kind::Half) => "float16",
            _ => "float32",
        }
    }

    /// Total parameters (adapters included).
    pub fn num_params(&self) -> i64 {
        let plain: i64 = self
            .params
            .values()
            .chain(self.lora.values().flat_map(|p| [&p.a, &p.b]))
            .map(|t| t.numel() as i64)
            .sum();
        let quantized: i64 = self
            .quantized
            .values()
            .map(|q| q.shape.iter().product::<i64>())
            .sum();
        plain + quantized
    }

    /// The linear modules whose last name component is in `targets`.
    pub fn linear_modules(&self, targets: &[String]) -> Vec<String> {
        self.params
            .keys()
            .chain(self.quantized.keys())
            .filter(|n| n.ends_with(".weight"))
            .map(|n| n.trim_end_matches(".weight").to_string())
            .filter(|m| {
                let last = m.rsplit('.').next().unwrap_or("");
                targets
                    .iter()
                    .any(|t| t == last || m.ends_with(&format!(".{t}")))
                    && !m.contains("ln_")
                    && !m.contains("norm")
                    && !m.ends_with("wte")
                    && !m.ends_with("wpe")
                    && !m.ends_with("embed_tokens")
                    && !m.ends_with("relative_attention_bias")
                    && m != "shared"
            })
            .collect()
    }

    /// Adds fresh adapters (A Kaiming-uniform like PEFT, B zeros) on `modules`.
    pub fn add_lora(&mut self, modules: &[String], r: i64, alpha: f64, dropout: f64, seed: u64) {
        tch::manual_seed(seed as i64);
        self.lora_scaling = alpha / r as f64;
        self.lora_dropout = dropout;
        for m in modules {
            let (fan_in, fan_out) = self
                .cfg
                .linear_shape(&self.weight_shape(&format!("{m}.weight")));
            let bound = 1.0 / (fan_in as f64).sqrt();
            let a = Tensor::rand([r, fan_in], (Kind::Float, self.device)) * (2.0 * bound) - bound;
            let b = Tensor::zeros([fan_out, r], (Kind::Float, self.device));
            self.lora.insert(m.clone(), LoraPair { a, b });
        }
    }

    /// Folds every adapter into its base weight and drops the adapters.
    pub fn merge_lora(&mut self) {
        let _guard = tch::no_grad_guard();
        let scaling = self.lora_scaling;
        for (m, pair) in std::mem::take(&mut self.lora) {
            let name = format!("{m}.weight");
            if let Some(q) = self.quantized.remove(&name) {
                self.params
                    .insert(name.clone(), q.dequantize(self.compute_kind));
            }
            let w = self.params.get_mut(&name).expect("adapted weight");
            let delta = pair.b.matmul(&pair.a) * scaling; // [out, in]
            let delta = if self.cfg.is_conv1d() {
                delta.transpose(0, 1)
            } else {
                delta
            };
            // PEFT casts the update to the weight's dtype before adding it.
            *w = (&*w + delta.to_kind(w.kind())).detach();
        }
    }

    fn p(&self, name: &str) -> &Tensor {
        self.params
            .get(name)
            .unwrap_or_else(|| panic!("missing parameter {name}"))
    }

    // `y = y + ...`, not `y += ...`: tch's `+=` is in place, which autograd refuses on
    // activations saved for the backward pass.
    #[allow(clippy::assign_op_pattern)]
    fn linear(&self, module: &str, x: &Tensor) -> Tensor {
        let w = &self.weight(&format!("{module}.weight"));
        let b = self.params.get(&format!("{module}.bias"));
        let mut y = if self.cfg.is_conv1d() {
            let y = x.matmul(w);
            match b {
                Some(b) => y + b,
                None => y,
            }
        } else {
            x.linear(w, b)
        };
        let adapter = if self.reference_pass.get() {
            self.reference_lora.as_ref().and_then(|l| l.get(module))
        } else {
            self.lora.get(module)
        };
        if let Some(pair) = adapter {
            let input = if self.training() && self.lora_dropout > 0.0 {
                x.dropout(self.lora_dropout, true)
            } else {
                x.shallow_clone()
            };
            // As PEFT: the adapter computes in its own dtype (f32) and the sum is cast
            // back to the base layer's.
            let kind = y.kind();
            let input = if input.kind() == pair.a.kind() {
                input
            } else {
                input.to_kind(pair.a.kind())
            };
            y = y + input
                .linear::<Tensor>(&pair.a, None)
                .linear::<Tensor>(&pair.b, None)
                * self.lora_scaling;
            if y.kind() != kind {
                y = y.to_kind(kind);
            }
        }
        y
    }

    fn dropout(&self, x: Tensor, p: f64) -> Tensor {
        if self.training() && p > 0.0 {
            x.dropout(p, true)
        } else {
            x
        }
    }

    /// Logits [batch, seq, vocab] for `ids` [batch, seq]. With a cache, positions continue
    /// after the cached ones (and the cache grows); a multi-token call on a non-empty
    /// cache is not supported (generation feeds the prompt once, then one token at a time).
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut Cache>) -> Tensor {
        self.head(&self.hidden(ids, cache))
    }

    fn hidden(&self, ids: &Tensor, cache: Option<&mut Cache>) -> Tensor {
        let past = cache
            .as_ref()
            .and_then(|c| c.first().and_then(|l| l.as_ref().map(|(k, _)| k.size()[2])))
            .unwrap_or(0);
        assert!(
            past == 0 || ids.size()[1] == 1,
            "multi-token forward on a non-empty cache"
        );
        let (h, pos) = self.embed(ids, past);
        self.blocks(h, &pos, cache)
    }

    /// One decoding step for a batch of rows that each have their own length (continuous
    /// batching): `ids` [batch, 1] the rows' last tokens, `positions` [batch] where each
    /// sits, `key_mask` [batch, keys] (the cached columns and this one; true where the
    /// row has a token: shorter rows are left-padded). Returns logits [batch, vocab].
    /// Rotary and learned positions are per row, so a row decodes as it would alone.
    pub fn decode_rows(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        key_mask: &Tensor,
        cache: &mut Cache,
    ) -> Tensor {
        let rows = ids.size()[0];
        let keys = key_mask.size()[1];
        let span = i64::try_from(positions.max()).unwrap_or(0) + 1;
        let (h, mut pos) = self.embed_at(ids, &positions.view([rows, 1]), span);
        pos.key_mask = Some(key_mask.view([rows, 1, 1, keys]));
        self.head(&self.blocks(h, &pos, Some(cache))).select(1, -1)
    }

    fn blocks(&self, mut h: Tensor, pos: &Positions, mut cache: Option<&mut Cache>) -> Tensor {
        if let Some(c) = cache.as_deref_mut() {
            c.resize_with(self.cfg.layers as usize, || None);
        }
        for l in 0..self.cfg.layers {
            let slot = cache.as_deref_mut().map(|c| &mut c[l as usize]);
            h = self.block(l, &h, pos, slot);
        }
        self.final_norm(&h)
    }

    /// Token (and, for GPT-2, position) embeddings of `ids` placed after `past` cached
    /// positions, and the positional tables the blocks need (rotary cos/sin for Llama).
    pub fn embed(&self, ids: &Tensor, past: i64) -> (Tensor, Positions) {
        let t = ids.size()[1];
        let pos = Tensor::arange_start(past, past + t, (Kind::Int64, self.device));
        self.embed_at(ids, &pos, past + t)
    }

    /// As [`Model::embed`] with explicit positions: [seq] shared by all rows, or
    /// [batch, seq] per row; `span` is one past the largest (long-rope picks its factors
    /// by it).
    fn embed_at(&self, ids: &Tensor, pos: &Tensor, span: i64) -> (Tensor, Positions) {
        match self.cfg.arch {
            Arch::Gpt2 => {
                let h = Tensor::embedding(&self.embed_table(), ids, -1, false, false)
                    + Tensor::embedding(self.p("transformer.wpe.weight"), pos, -1, false, false);
                let pos = Positions {
                    rotary: None,
                    key_mask: None,
                };
                (self.dropout(h, self.cfg.embd_pdrop), pos)
            }
            Arch::Llama => {
                let h = Tensor::embedding(&self.embed_table(), ids, -1, false, false);
                let h = match self.cfg.embed_scale {
                    // As transformers: the scale is a tensor cast to the weights' dtype.
                    Some(scale) => {
                        let scale = Tensor::from(scale as f32)
                            .to_kind(h.kind())
                            .to_device(self.device);
                        h * scale
                    }
                    None => h,
                };
                let (cos, sin) = self.rope(pos, span, self.cfg.rope_theta, true);
                let local = self
                    .cfg
                    .rope_theta_local
                    .map(|theta| self.rope(pos, span, theta, false));
                let rotary = Some(Rotary { cos, sin, local });
                let pos = Positions {
                    rotary,
                    key_mask: None,
                };
                (h, pos)
            }
            Arch::T5 => unreachable!("T5 runs through encode/decode"),
        }
    }

    /// Transformer block `l` on hidden states `h` [batch, seq, hidden].
    #[allow(clippy::assign_op_pattern)] // see `linear`
    pub fn block(
        &self,
        l: i64,
        h: &Tensor,
        pos: &Positions,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Tensor {
        let (b, t) = {
            let s = h.size();
            (s[0], s[1])
        };
        let causal = t > 1;
        let (nh, nkv, hd) = (self.cfg.heads, self.cfg.kv_heads, self.cfg.head_dim);
        let attn_p = if self.training() {
            self.cfg.attn_pdrop
        } else {
            0.0
        };
        match (self.cfg.arch, pos) {
            (Arch::Gpt2, _) => {
                let hs = self.cfg.hidden;
                let p = format!("transformer.h.{l}");
                let a = h.layer_norm(
                    [hs],
                    Some(self.p(&format!("{p}.ln_1.weight"))),
                    Some(self.p(&format!("{p}.ln_1.bias"))),
                    self.cfg.eps,
                    true,
                );
                let qkv = self.linear(&format!("{p}.attn.c_attn"), &a);
                let parts = qkv.split(hs, -1);
                let heads = |x: &Tensor| x.view([b, t, nh, hd]).transpose(1, 2);
                let (q, mut k, mut v) = (heads(&parts[0]), heads(&parts[1]), heads(&parts[2]));
                if let Some(slot) = cache {
                    (k, v) = append_cache(slot, k, v);
                }
                let y = Tensor::scaled_dot_product_attention(
                    &q,
                    &k,
                    &v,
                    pos.key_mask.as_ref(),
                    attn_p,
                    causal,
                    None,
                    false,
                );
                let y = y.transpose(1, 2).reshape([b, t, hs]);
                let y = self.linear(&format!("{p}.attn.c_proj"), &y);
                let h = h + self.dropout(y, self.cfg.resid_pdrop);
                let m = h.layer_norm(
                    [hs],
                    Some(self.p(&format!("{p}.ln_2.weight"))),
                    Some(self.p(&format!("{p}.ln_2.bias"))),
                    self.cfg.eps,
                    true,
                );
                let m = self.linear(&format!("{p}.mlp.c_fc"), &m).gelu("tanh");
                let m = self.linear(&format!("{p}.mlp.c_proj"), &m);
                h + self.dropout(m, self.cfg.resid_pdrop)
            }
            (
                Arch::Llama,
                Positions {
                    rotary: Some(rotary),
                    key_mask,
                },
            ) => {
                let (cos, sin, local) = (&rotary.cos, &rotary.sin, &rotary.local);
                let p = format!("model.layers.{l}");
                let sliding = self.cfg.sliding_layers.get(l as usize) == Some(&true);
                let (cos, sin) = match local {
                    Some((lc, ls)) if sliding => (lc, ls),
                    _ => (cos, sin),
                };
                let a = self.rms(h, &format!("{p}.input_layernorm.weight"));
                let (q, k, v) = if self.cfg.fused_projections {
                    let qkv = self.linear(&format!("{p}.self_attn.qkv_proj"), &a);
                    let parts = qkv.split_with_sizes([nh * hd, nkv * hd, nkv * hd], -1);
                    (
                        parts[0].shallow_clone(),
                        parts[1].shallow_clone(),
                        parts[2].shallow_clone(),
                    )
                } else {
                    (
                        self.linear(&format!("{p}.self_attn.q_proj"), &a),
                        self.linear(&format!("{p}.self_attn.k_proj"), &a),
                        self.linear(&format!("{p}.self_attn.v_proj"), &a),
                    )
                };
                let mut q = q.view([b, t, nh, hd]);
                let mut k = k.view([b, t, nkv, hd]);
                if self.cfg.qk_norm {
                    q = self.rms(&q, &format!("{p}.self_attn.q_norm.weight"));
                    k = self.rms(&k, &format!("{p}.self_attn.k_norm.weight"));
                }
                let (q, k) = (q.transpose(1, 2), k.transpose(1, 2));
                let mut v = v.view([b, t, nkv, hd]).transpose(1, 2);
                let q = apply_rope(&q, cos, sin);
                let mut k = apply_rope(&k, cos, sin);
                if let Some(slot) = cache {
                    (k, v) = append_cache(slot, k, v);
                }
                let y = self.attend(&q, &k, &v, sliding, causal, attn_p, key_mask.as_ref());
                let y = y.transpose(1, 2).reshape([b, t, nh * hd]);
                let y = self.linear(&format!("{p}.self_attn.o_proj"), &y);
                if self.cfg.sandwich_norms {
                    let y = self.rms(&y, &format!("{p}.post_attention_layernorm.weight"));
                    let h = h + y;
                    let m = self.rms(&h, &format!("{p}.pre_feedforward_layernorm.weight"));
                    let m = self.mlp(&p, &m);
                    let m = self.rms(&m, &format!("{p}.post_feedforward_layernorm.weight"));
                    &h + m
                } else {
                    let h = h + self.dropout(y, self.cfg.resid_pdrop);
                    let m = self.rms(&h, &format!("{p}.post_attention_layernorm.weight"));
                    &h + self.dropout(self.mlp(&p, &m), self.cfg.resid_pdrop)
                }
            }
            (Arch::Llama, _) => unreachable!("llama blocks take rotary tables"),
            (Arch::T5, _) => unreachable!("T5 runs through encode/decode"),
        }
    }

    /// The final norm before the output head.
    pub fn final_norm(&self, h: &Tensor) -> Tensor {
        match self.cfg.arch {
            Arch::Gpt2 => h.layer_norm(
                [self.cfg.hidden],
                Some(self.p("transformer.ln_f.weight")),
                Some(self.p("transformer.ln_f.bias")),
                self.cfg.eps,
                true,
            ),
            Arch::Llama => self.rms(h, "model.norm.weight"),
            Arch::T5 => unreachable!("T5 runs through encode/decode"),
        }
    }

    /// Logits from final hidden states (tied to the embeddings when the config says so).
    pub fn head(&self, h: &Tensor) -> Tensor {
        let logits = h.linear::<Tensor>(&self.head_table(), None);
        match self.cfg.final_softcap {
            Some(cap) => (logits / cap).tanh() * cap,
            None => logits,
        }
    }

    /// The gated MLP of block `p`: down(act(gate(x)) * up(x)).
    fn mlp(&self, p: &str, x: &Tensor) -> Tensor {
        let (g, u) = if self.cfg.fused_projections {
            let gate_up = self.linear(&format!("{p}.mlp.gate_up_proj"), x);
            let halves = gate_up.chunk(2, -1);
            (halves[0].shallow_clone(), halves[1].shallow_clone())
        } else {
            (
                self.linear(&format!("{p}.mlp.gate_proj"), x),
                self.linear(&format!("{p}.mlp.up_proj"), x),
            )
        };
        let g = if self.cfg.gelu_mlp {
            g.gelu("tanh")
        } else {
            g.silu()
        };
        self.linear(&format!("{p}.mlp.down_proj"), &(g * u))
    }

    /// Attention of `q` [batch, heads, seq, head_dim] over `k`/`v` [batch, kv_heads, ...]:
    /// causal, limited to the sliding window on sliding layers, scaled and soft-capped as
    /// the config says. Grouped-query heads are shared inside the attention kernel
    /// (`enable_gqa`) rather than copied: generation would copy the whole cache per
    /// token. `key_mask` [batch, 1, 1, keys] leaves out the padding of batched rows.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        sliding: bool,
        causal: bool,
        attn_p: f64,
        key_mask: Option<&Tensor>,
    ) -> Tensor {
        let (t, keys) = (q.size()[2], k.size()[2]);
        let window = if sliding {
            self.sliding_window_mask(t, keys)
        } else {
            None
        };
        let window = match (window, key_mask) {
            (Some(w), Some(m)) => Some(m.logical_and(&w)),
            (None, Some(m)) => Some(m.shallow_clone()),
            (w, None) => w,
        };
        let gqa = q.size()[1] != k.size()[1];
        let Some(cap) = self.cfg.attn_softcap else {
            return match &window {
                Some(mask) => Tensor::scaled_dot_product_attention(
                    q,
                    k,
                    v,
                    Some(mask),
                    attn_p,
                    false,
                    self.cfg.attn_scale,
                    gqa,
                ),
                None => Tensor::scaled_dot_product_attention::<Tensor>(
                    q,
                    k,
                    v,
                    None,
                    attn_p,
                    causal,
                    self.cfg.attn_scale,
                    gqa,
                ),
            };
        };
        let (k, v) = if gqa {
            let rep = q.size()[1] / k.size()[1];
            (
                k.repeat_interleave_self_int(rep, 1, None),
                v.repeat_interleave_self_int(rep, 1, None),
            )
        } else {
            (k.shallow_clone(), v.shallow_clone())
        };
        // Soft-capping needs the scores themselves: transformers' eager attention.
        let scale = self
            .cfg
            .attn_scale
            .unwrap_or((self.cfg.head_dim as f64).powf(-0.5));
        let scores = q.matmul(&k.transpose(-2, -1)) * scale;
        let scores = (scores / cap).tanh() * cap;
        let allowed = window.or_else(|| causal.then(|| self.causal_mask(t, keys)));
        let scores = match allowed {
            Some(mask) => scores.masked_fill(&mask.logical_not(), f64::NEG_INFINITY),
            None => scores,
        };
        let probs = scores.softmax(-1, Kind::Float).to_kind(q.kind());
        let probs = if attn_p > 0.0 {
            probs.dropout(attn_p, true)
        } else {
            probs
        };
        probs.matmul(&v)
    }

    /// [t, keys] (true = attend): the `t` queries are the last `t` of `keys` positions.
    fn causal_mask(&self, t: i64, keys: i64) -> Tensor {
        let past = keys - t;
        let q = Tensor::arange_start(past, keys, (Kind::Int64, self.device)).unsqueeze(1);
        let k = Tensor::arange(keys, (Kind::Int64, self.device)).unsqueeze(0);
        k.le_tensor(&q)
    }

    fn rms(&self, x: &Tensor, weight: &str) -> Tensor {
        let kind = x.kind();
        let xf = x.to_kind(Kind::Float);
        let var = xf.square().mean_dim(&[-1i64][..], true, None::<Kind>);
        let normed = xf * (var + self.cfg.eps).rsqrt();
        if self.cfg.norm_offset {
            // Gemma: (x * (1 + w)) in f32, then cast (Llama casts before scaling).
            (normed * (self.p(weight).to_kind(Kind::Float) + 1.0)).to_kind(kind)
        } else {
            self.p(weight) * normed.to_kind(kind)
        }
    }

    /// For sliding-window models whose keys reach further back than the window: the
    /// boolean mask [t, keys] (true = attend) of causal attention limited to the last
    /// `window` keys; the `t` queries are the last `t` of the `keys` positions.
    fn sliding_window_mask(&self, t: i64, keys: i64) -> Option<Tensor> {
        let window = self.cfg.sliding_window.filter(|w| *w < keys)?;
        let past = keys - t;
        let q = Tensor::arange_start(past, keys, (Kind::Int64, self.device)).unsqueeze(1);
        let k = Tensor::arange(keys, (Kind::Int64, self.device)).unsqueeze(0);
        Some(k.le_tensor(&q).logical_and(&k.gt_tensor(&(&q - window))))
    }

    /// cos/sin tables [t, head_dim] for positions `pos` [t] ([batch, 1, t, head_dim] for
    /// per-row positions [batch, t]; HF's layout: the two halves of the head repeat the
    /// frequencies).
    /// With `scaled`, the config's rope scaling applies (Gemma 3's sliding layers use
    /// their own base frequency without it).
    fn rope(&self, pos: &Tensor, span: i64, theta: f64, scaled: bool) -> (Tensor, Tensor) {
        let hd = self.cfg.rotary_dim;
        let mut inv = (Tensor::arange_start_step(0i64, hd, 2, (Kind::Int64, self.device))
            .to_kind(Kind::Float)
            / hd as f64
            * -theta.ln())
        .exp();
        if scaled {
            if let Some(scaling) = &self.cfg.rope_llama3 {
                inv = scaling.apply(&inv);
            }
            if let Some(factor) = self.cfg.rope_linear {
                inv = &inv / factor;
            }
        }
        let long = self.cfg.rope_long.as_ref().filter(|_| scaled);
        if let Some(long) = long {
            let factors = if span > long.original_max_positions {
                &long.long_factor
            } else {
                &long.short_factor
            };
            let factors: Vec<f32> = factors.iter().map(|f| *f as f32).collect();
            inv = &inv / Tensor::from_slice(&factors).to_device(self.device);
        }
        let freqs = pos.to_kind(Kind::Float).unsqueeze(-1) * &inv;
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        // Per-row positions [batch, seq, dim] broadcast over the heads.
        let emb = if emb.dim() == 3 {
            emb.unsqueeze(1)
        } else {
            emb
        };
        match long {
            Some(long) => (
                emb.cos() * long.attention_factor,
                emb.sin() * long.attention_factor,
            ),
            None => (emb.cos(), emb.sin()),
        }
    }
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let x1 = x.narrow(3, 0, half);
    let x2 = x.narrow(3, half, half);
    Tensor::cat(&[&x2.neg(), &x1], -1)
}

/// Rotates the leading dimensions of each head that `cos`/`sin` cover (all of them
/// unless the rotary factor is partial); the rest pass through.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let kind = x.kind();
    let (dim, rotary) = (x.size()[3], cos.size()[cos.dim() - 1]);
    let rotate =
        |x: &Tensor| (x * cos.to_kind(kind) + rotate_half(x) * sin.to_kind(kind)).to_kind(kind);
    if rotary == dim {
        return rotate(x);
    }
    Tensor::cat(
        &[
            rotate(&x.narrow(3, 0, rotary)),
            x.narrow(3, rotary, dim - rotary),
        ],
        -1,
    )
}

fn append_cache(slot: &mut Option<(Tensor, Tensor)>, k: Tensor, v: Tensor) -> (Tensor, Tensor) {
    let (k, v) = match slot.take() {
        Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2), Tensor::cat(&[&pv, &v], 2)),
        None => (k, v),
    };
    *slot = Some((k.shallow_clone(), v.shallow_clone()));
    (k, v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama_like(extra: Value) -> Value {
        let mut v = json!({
            "model_type": "llama", "vocab_size": 32, "hidden_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
        });
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    }

    #[test]
    fn unsupported_configs_are_named_with_what_is_supported() {
        let falcon = Config::from_hf(&llama_like(json!({"model_type": "falcon"}))).unwrap_err();
        assert!(
            falcon.contains("\"falcon\"") && falcon.contains("gemma3_text"),
            "{falcon}"
        );
        let yarn = Config::from_hf(&llama_like(
            json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
        ))
        .unwrap_err();
        assert!(
            yarn.contains("\"yarn\"") && yarn.contains("llama3"),
            "{yarn}"
        );
        let partial = Config::from_hf(&llama_like(
            json!({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}),
        ))
        .unwrap_err();
        assert!(partial.contains("low_freq_factor"), "{partial}");
        let window = Config::from_hf(&llama_like(
            json!({"model_type": "qwen3", "use_sliding_window": true}),
        ))
        .unwrap_err();
        assert!(window.contains("use_sliding_window"), "{window}");
        let partial_llama =
            Config::from_hf(&llama_like(json!({"partial_rotary_factor": 0.5}))).unwrap_err();
        assert!(
            partial_llama.contains("partial_rotary_factor 0.5"),
            "{partial_llama}"
        );
        // Head dim 8: a longrope config needs 4 factors of each kind.
        let short_list = Config::from_hf(&llama_like(json!({
            "original_max_position_embeddings": 16,
            "rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.0], "long_factor": [1.0, 2.0, 3.0, 4.0]},
        })))
        .unwrap_err();
        assert!(
            short_list.contains("`short_factor` needs 4 positive numbers"),
            "{short_list}"
        );
    }

    #[test]
    fn longrope_reads_phi3_style_configs_with_transformers_defaults() {
        let cfg = Config::from_hf(&llama_like(json!({
            "model_type": "phi3", "max_position_embeddings": 131072,
            "original_max_position_embeddings": 4096, "partial_rotary_factor": 0.5,
            "rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.5], "long_factor": [2.0, 3.0]},
        })))
        .unwrap();
        assert_eq!(cfg.rotary_dim, 4);
        let rope = cfg.rope_long.unwrap();
        assert_eq!(rope.original_max_positions, 4096);
        // transformers: sqrt(1 + ln(131072 / 4096) / ln(4096)) without `attention_factor`.
        let expected = (1.0 + (32f64).ln() / (4096f64).ln()).sqrt();
        assert!((rope.attention_factor - expected).abs() < 1e-12);
    }

    #[test]
    fn llama3_rope_keeps_short_wavelengths_and_divides_long_ones() {
        let rope = Llama3Rope {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_positions: 32.0,
        };
        // Wavelengths 2*pi/inv: ~6 (short: kept), ~20 (medium: interpolated), ~628 (long: /8).
        let inv = Tensor::from_slice(&[1.0f32, 0.3, 0.01]);
        let out: Vec<f32> = Vec::try_from(rope.apply(&inv)).unwrap();
        assert!((out[0] - 1.0).abs() < 1e-6, "{out:?}");
        assert!(out[1] < 0.3 && out[1] > 0.3 / 8.0, "{out:?}");
        assert!((out[2] - 0.01 / 8.0).abs() < 1e-7, "{out:?}");
    }
}
