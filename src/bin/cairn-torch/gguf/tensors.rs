//! The model's tensors under llama.cpp's names and layouts, as `convert_hf_to_gguf.py`
//! writes them: q/k rows permuted for the `llama` architecture (it rotates adjacent
//! pairs), GPT-2's Conv1D weights transposed, Gemma's norms stored as 1 + weight (llama.cpp
//! multiplies by the stored value), Phi-3's fused qkv and gate_up kept fused, Llama 3's
//! rope factors as `rope_freqs.weight`.

use tch::Tensor;

use super::writer::{convert, Out};
use super::GgufType;
use crate::decoder::Model;

/// The model's tensors under llama.cpp's names, converted.
pub fn tensors(model: &Model, arch: &str, ty: GgufType) -> Result<Vec<Out>, String> {
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
    // Gemma's RMSNorm scales by (1 + weight); llama.cpp's by the stored weight.
    let norm_weight = |w: &Tensor| -> Tensor {
        if cfg.norm_offset {
            w + 1.0
        } else {
            w.shallow_clone()
        }
    };
    add("token_embd.weight".into(), p("model.embed_tokens.weight")?)?;
    for l in 0..cfg.layers {
        let h = format!("model.layers.{l}");
        let b = format!("blk.{l}");
        if cfg.fused_projections {
            add(
                format!("{b}.attn_qkv.weight"),
                p(&format!("{h}.self_attn.qkv_proj.weight"))?,
            )?;
        }
        let separate: &[(&str, &str, Option<i64>)] = if cfg.fused_projections {
            &[]
        } else {
            &[
                ("q_proj", "attn_q", Some(cfg.heads)),
                ("k_proj", "attn_k", Some(cfg.kv_heads)),
                ("v_proj", "attn_v", None),
            ]
        };
        for &(from, to, heads) in separate {
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
        let linears: &[(&str, &str)] = if cfg.fused_projections {
            &[
                ("self_attn.o_proj", "attn_output"),
                ("mlp.gate_up_proj", "ffn_up"),
                ("mlp.down_proj", "ffn_down"),
            ]
        } else {
            &[
                ("self_attn.o_proj", "attn_output"),
                ("mlp.gate_proj", "ffn_gate"),
                ("mlp.up_proj", "ffn_up"),
                ("mlp.down_proj", "ffn_down"),
            ]
        };
        for (from, to) in linears {
            add(
                format!("{b}.{to}.weight"),
                p(&format!("{h}.{from}.weight"))?,
            )?;
        }
        let norms: &[(&str, &str)] = if cfg.sandwich_norms {
            &[
                ("input_layernorm", "attn_norm"),
                ("post_attention_layernorm", "post_attention_norm"),
                ("pre_feedforward_layernorm", "ffn_norm"),
                ("post_feedforward_layernorm", "post_ffw_norm"),
                // Qwen3's and Gemma 3's per-head q/k norms.
                ("self_attn.q_norm", "attn_q_norm"),
                ("self_attn.k_norm", "attn_k_norm"),
            ]
        } else {
            &[
                ("input_layernorm", "attn_norm"),
                ("post_attention_layernorm", "ffn_norm"),
                ("self_attn.q_norm", "attn_q_norm"),
                ("self_attn.k_norm", "attn_k_norm"),
            ]
        };
        for (from, to) in norms {
            let name = format!("{h}.{from}.weight");
            match model.params.get(&name) {
                Some(norm) => add(format!("{b}.{to}.weight"), &norm_weight(norm))?,
                None if from.starts_with("self_attn.") => {}
                None => return Err(format!("GGUF export: no tensor {name}")),
            }
        }
    }
    add(
        "output_norm.weight".into(),
        &norm_weight(p("model.norm.weight")?),
    )?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_rows_are_interleaved_per_head() {
        // One head of dimension 4: rows 0,1 | 2,3 become 0,2,1,3.
        let w = Tensor::from_slice(&[0f32, 1., 2., 3.]).view([4, 1]);
        let p: Vec<f32> = Vec::try_from(permute_rows(&w, 1).flatten(0, -1)).unwrap();
        assert_eq!(p, [0., 2., 1., 3.]);
    }
}
