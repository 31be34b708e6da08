//! T5 and Flan-T5: the encoder-decoder family, on the same [`Model`] as the decoders so
//! that LoRA, NF4, 16-bit weights, added tokens and saving work unchanged. Follows
//! transformers' `modeling_t5`: RMS norms without mean or bias, unscaled dot-product
//! attention with a learned relative-position bias (computed by the first block of each
//! stack and shared by the others; bidirectional buckets in the encoder, causal ones in
//! the decoder, none in cross-attention), ReLU or gated feed-forward (`gated-gelu` is
//! v1.1/Flan's tanh GELU), and decoder outputs scaled by d_model^-0.5 only when the head
//! is tied to the embeddings (`scale_decoder_outputs`).
//!
//! A decoder cache holds two slots per decoder block: the self-attention keys/values,
//! growing by one position per step, and the cross-attention ones, computed from the
//! encoder output once.

use serde_json::Value;
use tch::{Kind, Tensor};

use super::{int, Arch, Cache, Config, Model};

/// The feed-forward activation (`feed_forward_proj`, after an optional `gated-`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Relu,
    /// tanh-approximated GELU (`gelu_new`, what `gated-gelu` means).
    GeluTanh,
    Gelu,
    Silu,
}

/// What T5 adds to [`Config`] (whose `layers` count the encoder's blocks).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct T5Layout {
    pub decoder_layers: i64,
    pub buckets: i64,
    pub max_distance: i64,
    pub activation: Activation,
    /// `wi_0`/`wi_1` (v1.1, Flan) instead of one `wi` (the original T5).
    pub gated: bool,
    /// Decoder outputs times d_model^-0.5 before the head.
    pub scale_output: bool,
    /// The first decoder input (the pad token in every released checkpoint).
    pub decoder_start: i64,
}

/// Reads a T5 config.json (model_type `t5`).
pub fn config(v: &Value) -> Result<Config, String> {
    let need = |key: &str| int(v, &[key]).ok_or_else(|| format!("config.json: `{key}` is missing"));
    let proj = v["feed_forward_proj"].as_str().unwrap_or("relu");
    let (gated, act) = match proj.split_once('-') {
        Some(("gated", act)) => (true, act),
        None => (false, proj),
        Some(_) => {
            return Err(format!(
                "config.json: feed_forward_proj {proj:?} is not `ACT` or `gated-ACT`"
            ))
        }
    };
    let activation = match act {
        "relu" => Activation::Relu,
        // transformers maps `gated-gelu` to gelu_new for backward compatibility.
        "gelu" if gated => Activation::GeluTanh,
        "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
        "gelu" => Activation::Gelu,
        "silu" | "swish" => Activation::Silu,
        other => {
            return Err(format!(
                "config.json: feed_forward_proj activation {other:?} is not supported (relu, gelu, gelu_new, silu)"
            ))
        }
    };
    let hidden = need("d_model")?;
    let heads = need("num_heads")?;
    let layers = need("num_layers")?;
    // transformers writes tie_word_embeddings: true and scale_decoder_outputs: false for
    // a v1.1 model it saved itself; older checkpoints say tie_word_embeddings: false and
    // carry their own lm_head.
    let tied = v["tie_word_embeddings"].as_bool() != Some(false);
    let dropout = v["dropout_rate"].as_f64().unwrap_or(0.1);
    Ok(Config {
        arch: Arch::T5,
        vocab: need("vocab_size")?,
        hidden,
        layers,
        heads,
        kv_heads: heads,
        head_dim: need("d_kv")?,
        intermediate: need("d_ff")?,
        // Relative positions have no hard limit; n_positions is what the model was
        // trained at (512 for every released T5).
        max_positions: int(v, &["n_positions"]).unwrap_or(512),
        eps: v["layer_norm_epsilon"].as_f64().unwrap_or(1e-6),
        rope_theta: 0.0,
        rope_llama3: None,
        tie_embeddings: tied,
        qkv_bias: false,
        qk_norm: false,
        sliding_window: None,
        sliding_layers: Vec::new(),
        rope_theta_local: None,
        rope_linear: None,
        rope_long: None,
        rotary_dim: 0,
        norm_offset: false,
        embed_scale: None,
        gelu_mlp: false,
        sandwich_norms: false,
        attn_scale: Some(1.0),
        attn_softcap: None,
        final_softcap: None,
        fused_projections: false,
        embd_pdrop: dropout,
        resid_pdrop: dropout,
        attn_pdrop: dropout,
        raw: v.clone(),
        t5: Some(T5Layout {
            decoder_layers: int(v, &["num_decoder_layers"]).unwrap_or(layers),
            buckets: int(v, &["relative_attention_num_buckets"]).unwrap_or(32),
            max_distance: int(v, &["relative_attention_max_distance"]).unwrap_or(128),
            activation,
            gated,
            scale_output: v["scale_decoder_outputs"].as_bool().unwrap_or(tied),
            decoder_start: int(v, &["decoder_start_token_id", "pad_token_id"]).unwrap_or(0),
        }),
    })
}

/// T5's parameters by name and shape (transformers' names).
pub fn expected(cfg: &Config, t5: &T5Layout, add: &mut dyn FnMut(String, Vec<i64>)) {
    let (d, ff, inner) = (cfg.hidden, cfg.intermediate, cfg.heads * cfg.head_dim);
    add("shared.weight".into(), vec![cfg.vocab, d]);
    let attention = |add: &mut dyn FnMut(String, Vec<i64>), p: String, bias: bool| {
        for m in ["q", "k", "v"] {
            add(format!("{p}.{m}.weight"), vec![inner, d]);
        }
        add(format!("{p}.o.weight"), vec![d, inner]);
        if bias {
            add(
                format!("{p}.relative_attention_bias.weight"),
                vec![t5.buckets, cfg.heads],
            );
        }
    };
    let feed_forward = |add: &mut dyn FnMut(String, Vec<i64>), p: String| {
        if t5.gated {
            add(format!("{p}.DenseReluDense.wi_0.weight"), vec![ff, d]);
            add(format!("{p}.DenseReluDense.wi_1.weight"), vec![ff, d]);
        } else {
            add(format!("{p}.DenseReluDense.wi.weight"), vec![ff, d]);
        }
        add(format!("{p}.DenseReluDense.wo.weight"), vec![d, ff]);
        add(format!("{p}.layer_norm.weight"), vec![d]);
    };
    for l in 0..cfg.layers {
        let p = format!("encoder.block.{l}.layer");
        attention(add, format!("{p}.0.SelfAttention"), l == 0);
        add(format!("{p}.0.layer_norm.weight"), vec![d]);
        feed_forward(add, format!("{p}.1"));
    }
    add("encoder.final_layer_norm.weight".into(), vec![d]);
    for l in 0..t5.decoder_layers {
        let p = format!("decoder.block.{l}.layer");
        attention(add, format!("{p}.0.SelfAttention"), l == 0);
        add(format!("{p}.0.layer_norm.weight"), vec![d]);
        attention(add, format!("{p}.1.EncDecAttention"), false);
        add(format!("{p}.1.layer_norm.weight"), vec![d]);
        feed_forward(add, format!("{p}.2"));
    }
    add("decoder.final_layer_norm.weight".into(), vec![d]);
    if !cfg.tie_embeddings {
        add("lm_head.weight".into(), vec![cfg.vocab, d]);
    }
}

/// transformers' `_relative_position_bucket`, on int64 tensors (the log in f32, as there).
fn relative_bucket(
    relative: &Tensor,
    bidirectional: bool,
    buckets: i64,
    max_distance: i64,
) -> Tensor {
    let (buckets, out, relative) = if bidirectional {
        let half = buckets / 2;
        (
            half,
            relative.gt(0).to_kind(Kind::Int64) * half,
            relative.abs(),
        )
    } else {
        (buckets, relative.zeros_like(), -relative.clamp_max(0))
    };
    let max_exact = buckets / 2;
    let is_small = relative.lt(max_exact);
    let large = (relative.to_kind(Kind::Float) / max_exact as f64).log()
        / (max_distance as f64 / max_exact as f64).ln()
        * (buckets - max_exact) as f64;
    let large = (large.to_kind(Kind::Int64) + max_exact).clamp_max(buckets - 1);
    out + relative.where_self(&is_small, &large)
}

impl Model {
    fn layout(&self) -> &T5Layout {
        self.cfg.t5.as_ref().expect("a T5 model")
    }

    /// Whether this is an encoder-decoder model (T5): it reads a source and writes a
    /// target instead of continuing one sequence.
    pub fn is_seq2seq(&self) -> bool {
        self.cfg.t5.is_some()
    }

    /// The first decoder input of every target.
    pub fn decoder_start(&self) -> i64 {
        self.layout().decoder_start
    }

    /// The relative-position bias [1, heads, t, keys] of `stack`'s self-attention, for
    /// queries at positions past..past+t over keys 0..keys.
    fn position_bias(&self, stack: &str, t: i64, keys: i64, past: i64) -> Tensor {
        let layout = *self.layout();
        let q = Tensor::arange_start(past, past + t, (Kind::Int64, self.device)).unsqueeze(1);
        let k = Tensor::arange(keys, (Kind::Int64, self.device)).unsqueeze(0);
        let buckets = relative_bucket(
            &(k - q),
            stack == "encoder",
            layout.buckets,
            layout.max_distance,
        );
        let table = self.p(&format!(
            "{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        ));
        Tensor::embedding(table, &buckets, -1, false, false)
            .permute([2, 0, 1])
            .unsqueeze(0)
    }

    /// An additive mask [batch, 1, 1, keys] (0 = attend, -inf = padding) from a 0/1
    /// mask [batch, keys].
    fn padding_bias(mask: &Tensor, kind: Kind) -> Tensor {
        Tensor::zeros(mask.size().as_slice(), (kind, mask.device()))
            .masked_fill(&mask.eq(0), f64::NEG_INFINITY)
            .unsqueeze(1)
            .unsqueeze(1)
    }

    /// Attention module `p` of queries from `x` over `source` (itself for
    /// self-attention), with an additive `bias` [1 or batch, heads, t, keys]. A cache
    /// slot grows (self-attention) or, once filled, replaces `source` (cross-attention).
    fn t5_attention(
        &self,
        p: &str,
        x: &Tensor,
        source: &Tensor,
        bias: Option<&Tensor>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        cross: bool,
    ) -> Tensor {
        let (b, t) = (x.size()[0], x.size()[1]);
        let (nh, hd) = (self.cfg.heads, self.cfg.head_dim);
        let heads = |y: Tensor| y.view([b, -1, nh, hd]).transpose(1, 2);
        let q = heads(self.linear(&format!("{p}.q"), x));
        let (k, v) = match cache {
            Some(Some((k, v))) if cross => (k.shallow_clone(), v.shallow_clone()),
            slot => {
                let k = heads(self.linear(&format!("{p}.k"), source));
                let v = heads(self.linear(&format!("{p}.v"), source));
                match slot {
                    Some(slot) if cross => {
                        *slot = Some((k.shallow_clone(), v.shallow_clone()));
                        (k, v)
                    }
                    Some(slot) => super::append_cache(slot, k, v),
                    None => (k, v),
                }
            }
        };
        let attn_p = if self.training() {
            self.cfg.attn_pdrop
        } else {
            0.0
        };
        let bias = bias.map(|m| m.to_kind(q.kind()));
        let y = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            bias.as_ref(),
            attn_p,
            false,
            Some(1.0),
            false,
        );
        let y = y.transpose(1, 2).reshape([b, t, nh * hd]);
        self.linear(&format!("{p}.o"), &y)
    }

    /// The feed-forward sublayer `p` (`...layer.N`): its norm, MLP and residual.
    fn t5_feed_forward(&self, p: &str, h: &Tensor) -> Tensor {
        let layout = *self.layout();
        let x = self.rms(h, &format!("{p}.layer_norm.weight"));
        let act = |y: Tensor| match layout.activation {
            Activation::Relu => y.relu(),
            Activation::GeluTanh => y.gelu("tanh"),
            Activation::Gelu => y.gelu("none"),
            Activation::Silu => y.silu(),
        };
        let m = format!("{p}.DenseReluDense");
        let inner = if layout.gated {
            act(self.linear(&format!("{m}.wi_0"), &x)) * self.linear(&format!("{m}.wi_1"), &x)
        } else {
            act(self.linear(&format!("{m}.wi"), &x))
        };
        let inner = self.dropout(inner, self.cfg.resid_pdrop);
        h + self.dropout(
            self.linear(&format!("{m}.wo"), &inner),
            self.cfg.resid_pdrop,
        )
    }

    /// Encoder output [batch, src, hidden] for `ids` [batch, src] with a 0/1 padding
    /// `mask` [batch, src] (`None`: no padding).
    pub fn encode(&self, ids: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let s = ids.size()[1];
        let h = Tensor::embedding(&self.embed_table(), ids, -1, false, false);
        let mut h = self.dropout(h, self.cfg.embd_pdrop);
        let bias = self.position_bias("encoder", s, s, 0);
        let bias = match mask {
            Some(mask) => Self::padding_bias(mask, bias.kind()) + bias,
            None => bias,
        };
        for l in 0..self.cfg.layers {
            let p = format!("encoder.block.{l}.layer");
            let a = self.rms(&h, &format!("{p}.0.layer_norm.weight"));
            let y = self.t5_attention(
                &format!("{p}.0.SelfAttention"),
                &a,
                &a,
                Some(&bias),
                None,
                false,
            );
            h = &h + self.dropout(y, self.cfg.resid_pdrop);
            h = self.t5_feed_forward(&format!("{p}.1"), &h);
        }
        let h = self.rms(&h, "encoder.final_layer_norm.weight");
        self.dropout(h, self.cfg.resid_pdrop)
    }

    /// Logits [batch, t, vocab] of decoder inputs `ids` [batch, t] over the encoder
    /// output `encoded` (with its padding `mask`). With a cache, positions continue
    /// after the cached ones, one token per call after the first.
    pub fn decode(
        &self,
        ids: &Tensor,
        encoded: &Tensor,
        mask: Option<&Tensor>,
        mut cache: Option<&mut Cache>,
    ) -> Tensor {
        let layout = *self.layout();
        let t = ids.size()[1];
        let past = cache
            .as_ref()
            .and_then(|c| c.first().and_then(|l| l.as_ref().map(|(k, _)| k.size()[2])))
            .unwrap_or(0);
        if let Some(c) = cache.as_deref_mut() {
            c.resize_with(2 * layout.decoder_layers as usize, || None);
        }
        let keys = past + t;
        let h = Tensor::embedding(&self.embed_table(), ids, -1, false, false);
        let mut h = self.dropout(h, self.cfg.embd_pdrop);
        let causal = {
            let q = Tensor::arange_start(past, keys, (Kind::Int64, self.device)).unsqueeze(1);
            let k = Tensor::arange(keys, (Kind::Int64, self.device)).unsqueeze(0);
            Tensor::zeros([t, keys], (Kind::Float, self.device))
                .masked_fill(&k.gt_tensor(&q), f64::NEG_INFINITY)
        };
        let self_bias = self.position_bias("decoder", t, keys, past) + causal;
        let cross_bias = mask.map(|m| Self::padding_bias(m, Kind::Float));
        for l in 0..layout.decoder_layers {
            let p = format!("decoder.block.{l}.layer");
            let (self_slot, cross_slot) = match cache.as_deref_mut() {
                Some(c) => {
                    let (a, b) = c.split_at_mut(2 * l as usize + 1);
                    (Some(&mut a[2 * l as usize]), Some(&mut b[0]))
                }
                None => (None, None),
            };
            let a = self.rms(&h, &format!("{p}.0.layer_norm.weight"));
            let y = self.t5_attention(
                &format!("{p}.0.SelfAttention"),
                &a,
                &a,
                Some(&self_bias),
                self_slot,
                false,
            );
            h = &h + self.dropout(y, self.cfg.resid_pdrop);
            let c = self.rms(&h, &format!("{p}.1.layer_norm.weight"));
            let y = self.t5_attention(
                &format!("{p}.1.EncDecAttention"),
                &c,
                encoded,
                cross_bias.as_ref(),
                cross_slot,
                true,
            );
            h = &h + self.dropout(y, self.cfg.resid_pdrop);
            h = self.t5_feed_forward(&format!("{p}.2"), &h);
        }
        let h = self.rms(&h, "decoder.final_layer_norm.weight");
        let h = self.dropout(h, self.cfg.resid_pdrop);
        let h = if layout.scale_output {
            h * (self.cfg.hidden as f64).powf(-0.5)
        } else {
            h
        };
        self.head(&h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_match_transformers_values() {
        // From transformers' _relative_position_bucket (32 buckets, max distance 128).
        let rel = Tensor::from_slice(&[-200i64, -128, -20, -8, -1, 0, 1, 7, 8, 20, 127, 500]);
        let bi: Vec<i64> = Vec::try_from(relative_bucket(&rel, true, 32, 128)).unwrap();
        assert_eq!(bi, vec![15, 15, 10, 8, 1, 0, 17, 23, 24, 26, 31, 31]);
        let uni: Vec<i64> = Vec::try_from(relative_bucket(&rel, false, 32, 128)).unwrap();
        assert_eq!(uni, vec![31, 31, 17, 8, 1, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn feed_forward_kinds_are_read_and_bad_ones_named() {
        let base = serde_json::json!({"model_type": "t5", "vocab_size": 10, "d_model": 8,
            "d_kv": 2, "d_ff": 16, "num_layers": 2, "num_heads": 4});
        let cfg = config(&base).unwrap();
        let t5 = cfg.t5.unwrap();
        assert_eq!((t5.gated, t5.activation), (false, Activation::Relu));
        assert!(cfg.tie_embeddings && t5.scale_output);
        assert_eq!(t5.decoder_layers, 2);
        let mut flan = base.clone();
        flan["feed_forward_proj"] = "gated-gelu".into();
        flan["tie_word_embeddings"] = false.into();
        flan["num_decoder_layers"] = 3.into();
        let cfg = config(&flan).unwrap();
        let t5 = cfg.t5.unwrap();
        assert_eq!((t5.gated, t5.activation), (true, Activation::GeluTanh));
        assert!(!cfg.tie_embeddings && !t5.scale_output);
        assert_eq!(t5.decoder_layers, 3);
        let mut bad = base;
        bad["feed_forward_proj"] = "gated-tanh".into();
        let err = config(&bad).unwrap_err();
        assert!(err.contains("\"tanh\""), "{err}");
    }
}
