//! A BERT-family encoder in tch: embeddings, post-norm encoder layers with fused scaled
//! dot-product attention, and the sentence-transformers pooling heads. Inference only:
//! weights are plain tensors read from `model.safetensors` by their Hugging Face names.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;
use tch::{Device, Kind, Tensor};

use cairn::embed::EmbedError;
use cairn::models::Pooling;

use crate::int8::{Int8Linear, QuantizedRows, Sequences};

fn mixed_layers() -> tch::TchError {
    tch::TchError::Kind("the encoder mixes int8 and float layers; quantize all of them".into())
}

/// The hyper-parameters of `config.json` the forward pass needs.
#[derive(Clone, Debug)]
pub struct BertConfig {
    /// Width of the hidden states.
    pub hidden_size: i64,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: i64,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// `gelu` (erf) or `gelu_new`/`gelu_pytorch_tanh` (tanh approximation).
    pub tanh_gelu: bool,
}

impl BertConfig {
    /// Reads and checks `config.json`.
    pub fn from_json(path: &Path, v: &Value) -> Result<Self, EmbedError> {
        let model_type = v["model_type"].as_str().unwrap_or("bert");
        if !matches!(model_type, "bert" | "roberta" | "xlm-roberta") {
            return Err(EmbedError::Model(format!(
                "{}: model_type {model_type:?} is not supported; cairn's encoder implements BERT-family models (model_type bert, roberta)",
                path.display()
            )));
        }
        let int = |key: &str| {
            v[key].as_i64().ok_or_else(|| {
                EmbedError::Model(format!(
                    "{}: `{key}` is missing or not a number",
                    path.display()
                ))
            })
        };
        let act = v["hidden_act"].as_str().unwrap_or("gelu");
        let tanh_gelu = match act {
            "gelu" => false,
            "gelu_new" | "gelu_pytorch_tanh" => true,
            other => {
                return Err(EmbedError::Model(format!(
                    "{}: hidden_act {other:?} is not supported (gelu, gelu_new)",
                    path.display()
                )))
            }
        };
        Ok(Self {
            hidden_size: int("hidden_size")?,
            num_hidden_layers: int("num_hidden_layers")? as usize,
            num_attention_heads: int("num_attention_heads")?,
            layer_norm_eps: v["layer_norm_eps"].as_f64().unwrap_or(1e-12),
            tanh_gelu,
        })
    }
}

/// A linear layer's weights and bias in the model's float kind.
struct Dense {
    weight: Tensor,
    bias: Tensor,
}

impl Dense {
    fn forward(&self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        x.f_linear(&self.weight, Some(&self.bias))
    }
}

struct Norm {
    weight: Tensor,
    bias: Tensor,
}

/// An encoder layer's linear weights as loaded, in the model's float kind.
struct FloatLinears {
    query: Dense,
    key: Dense,
    value: Dense,
    attention_out: Dense,
    intermediate: Dense,
    output: Dense,
}

/// An encoder layer's linear weights in int8 (see [`Bert::quantize_int8`]), with query,
/// key and value fused into one product so that its input is quantized once.
struct Int8Linears {
    qkv: Int8Linear,
    attention_out: Int8Linear,
    intermediate: Int8Linear,
    output: Int8Linear,
}

/// An encoder layer's linear weights.
enum Weights {
    Float(FloatLinears),
    Int8(Int8Linears),
}

struct Layer {
    weights: Weights,
    attention_norm: Norm,
    output_norm: Norm,
}

/// The encoder with its weights on one device, in one dtype.
pub struct Bert {
    config: BertConfig,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    embed_norm: Norm,
    layers: Vec<Layer>,
    /// RoBERTa offsets positions past the padding index.
    position_offset: i64,
}

impl Bert {
    /// Loads `model.safetensors` from `dir` onto `device` as `kind`.
    pub fn load(
        dir: &Path,
        config: BertConfig,
        device: Device,
        kind: Kind,
        roberta: bool,
    ) -> Result<Self, EmbedError> {
        Ok(Self::load_with_heads(dir, config, device, kind, roberta)?.0)
    }

    /// As [`Bert::load`], also returning the tensors the encoder does not use (a
    /// classifier's pooler and head), by their names without the model prefix, on
    /// `device` as `kind`.
    pub fn load_with_heads(
        dir: &Path,
        config: BertConfig,
        device: Device,
        kind: Kind,
        roberta: bool,
    ) -> Result<(Self, HashMap<String, Tensor>), EmbedError> {
        let path = dir.join("model.safetensors");
        if !path.exists() {
            let hint = if dir.join("pytorch_model.bin").exists() {
                " (this model only has pytorch_model.bin; convert it once with Python: \
                 `from transformers import AutoModel; AutoModel.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)`)"
            } else {
                ""
            };
            return Err(EmbedError::Model(format!(
                "{}: missing model.safetensors{hint}",
                dir.display()
            )));
        }
        let tensors = Tensor::read_safetensors(&path)
            .map_err(|e| EmbedError::Model(format!("{}: {e}", path.display())))?;
        let mut map: HashMap<String, Tensor> = tensors.into_iter().collect();
        // Checkpoints saved from BertForX carry a `bert.` (or `roberta.`) prefix.
        let prefix = ["", "bert.", "roberta.", "model."]
            .into_iter()
            .find(|p| map.contains_key(&format!("{p}embeddings.word_embeddings.weight")))
            .ok_or_else(|| {
                EmbedError::Model(format!(
                    "{}: no embeddings.word_embeddings.weight tensor; is this a BERT-family model?",
                    path.display()
                ))
            })?
            .to_string();
        let mut take = |name: &str| -> Result<Tensor, EmbedError> {
            let full = format!("{prefix}{name}");
            map.remove(&full)
                .ok_or_else(|| {
                    EmbedError::Model(format!("{}: missing tensor {full}", path.display()))
                })?
                .f_to_device(device)
                .and_then(|t| t.f_to_kind(kind))
                .map_err(|e| EmbedError::Torch(e.to_string()))
        };
        let linear = |take: &mut dyn FnMut(&str) -> Result<Tensor, EmbedError>,
                      name: &str|
         -> Result<Dense, EmbedError> {
            Ok(Dense {
                weight: take(&format!("{name}.weight"))?,
                bias: take(&format!("{name}.bias"))?,
            })
        };
        let norm = |take: &mut dyn FnMut(&str) -> Result<Tensor, EmbedError>,
                    name: &str|
         -> Result<Norm, EmbedError> {
            Ok(Norm {
                weight: take(&format!("{name}.weight"))?,
                bias: take(&format!("{name}.bias"))?,
            })
        };
        let word = take("embeddings.word_embeddings.weight")?;
        let position = take("embeddings.position_embeddings.weight")?;
        let token_type = take("embeddings.token_type_embeddings.weight")?;
        let embed_norm = norm(&mut take, "embeddings.LayerNorm")?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            layers.push(Layer {
                weights: Weights::Float(FloatLinears {
                    query: linear(&mut take, &format!("{p}.attention.self.query"))?,
                    key: linear(&mut take, &format!("{p}.attention.self.key"))?,
                    value: linear(&mut take, &format!("{p}.attention.self.value"))?,
                    attention_out: linear(&mut take, &format!("{p}.attention.output.dense"))?,
                    intermediate: linear(&mut take, &format!("{p}.intermediate.dense"))?,
                    output: linear(&mut take, &format!("{p}.output.dense"))?,
                }),
                attention_norm: norm(&mut take, &format!("{p}.attention.output.LayerNorm"))?,
                output_norm: norm(&mut take, &format!("{p}.output.LayerNorm"))?,
            });
        }
        let mut rest = HashMap::new();
        for (name, t) in map {
            let name = name.strip_prefix(&prefix).unwrap_or(&name).to_string();
            let t = t
                .f_to_device(device)
                .and_then(|t| t.f_to_kind(kind))
                .map_err(|e| EmbedError::Torch(e.to_string()))?;
            rest.insert(name, t);
        }
        let bert = Self {
            config,
            word,
            position,
            token_type,
            embed_norm,
            layers,
            position_offset: if roberta { 2 } else { 0 },
        };
        Ok((bert, rest))
    }

    /// Replaces the encoder layers' linear weights by int8 ones with per-channel scales;
    /// activations are then quantized per token on each call (see [`Int8Linear`]). The
    /// model must be in f32 on the CPU.
    pub fn quantize_int8(&mut self) -> Result<(), tch::TchError> {
        for layer in &mut self.layers {
            if let Weights::Float(float) = &layer.weights {
                let quantize = |d: &Dense| Int8Linear::quantize(&d.weight, &d.bias);
                let (q, k, v) = (&float.query, &float.key, &float.value);
                layer.weights = Weights::Int8(Int8Linears {
                    // Per-channel weight scales and per-row input scales make the fused
                    // product equal the three separate ones.
                    qkv: Int8Linear::quantize(
                        &Tensor::f_cat(&[&q.weight, &k.weight, &v.weight], 0)?,
                        &Tensor::f_cat(&[&q.bias, &k.bias, &v.bias], 0)?,
                    )?,
                    attention_out: quantize(&float.attention_out)?,
                    intermediate: quantize(&float.intermediate)?,
                    output: quantize(&float.output)?,
                });
            }
        }
        Ok(())
    }

    fn layer_norm(&self, x: &Tensor, n: &Norm) -> Result<Tensor, tch::TchError> {
        x.f_layer_norm(
            [self.config.hidden_size],
            Some(&n.weight),
            Some(&n.bias),
            self.config.layer_norm_eps,
            true,
        )
    }

    /// Hidden states `[batch, seq, hidden]` for token ids and attention mask `[batch, seq]`
    /// (int64, 1 = real token).
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor, tch::TchError> {
        self.encode(ids, mask, None, false)
    }

    /// The first token's hidden state `[batch, 1, hidden]` for token ids, attention mask
    /// and token type ids `[batch, seq]` (the second text of a pair is type 1), as
    /// classification heads read it. Past its attention, the last layer computes that one
    /// row instead of all of them: the same numbers for a sixth less work in six layers.
    pub fn forward_first(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        types: &Tensor,
    ) -> Result<Tensor, tch::TchError> {
        self.encode(ids, mask, Some(types), true)
    }

    fn encode(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        types: Option<&Tensor>,
        first_only: bool,
    ) -> Result<Tensor, tch::TchError> {
        let (batch, seq) = ids.size2()?;
        let positions = Tensor::f_arange_start(
            self.position_offset,
            seq + self.position_offset,
            (Kind::Int64, ids.device()),
        )?;
        let mut x = Tensor::f_embedding(&self.word, ids, -1, false, false)?
            .f_add(&Tensor::f_embedding(
                &self.position,
                &positions,
                -1,
                false,
                false,
            )?)?
            .f_add(&match types {
                Some(t) => Tensor::f_embedding(&self.token_type, t, -1, false, false)?,
                None => self.token_type.f_get(0)?,
            })?;
        x = self.layer_norm(&x, &self.embed_norm)?;
        if matches!(
            self.layers.first().map(|l| &l.weights),
            Some(Weights::Int8(_))
        ) {
            return self.encode_int8(x, mask, first_only);
        }
        // SDPA takes a boolean mask where true means "attend"; shape [b, 1, 1, s].
        let attend = mask.f_ne(0)?.f_view([batch, 1, 1, seq])?;
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            let Weights::Float(w) = &layer.weights else {
                return Err(mixed_layers());
            };
            let rows = if first_only && i == last {
                x.f_narrow(1, 0, 1)?
            } else {
                x.shallow_clone()
            };
            let context = self.attention(
                &w.query.forward(&rows)?,
                &w.key.forward(&x)?,
                &w.value.forward(&x)?,
                &attend,
            )?;
            let attn = w.attention_out.forward(&context)?;
            let x1 = self.layer_norm(&attn.f_add(&rows)?, &layer.attention_norm)?;
            let inter = w.intermediate.forward(&x1)?.f_gelu(self.gelu())?;
            let out = w.output.forward(&inter)?;
            x = self.layer_norm(&out.f_add(&x1)?, &layer.output_norm)?;
        }
        if first_only && self.layers.is_empty() {
            x = x.f_narrow(1, 0, 1)?;
        }
        Ok(x)
    }

    /// The int8 layers over the real tokens only: the embedded rows `x` `[b, s, hidden]`
    /// are packed, padding dropped and each sequence's real tokens kept in order, so that
    /// no product or element-wise pass spends time on padding; each sequence attends
    /// over its own rows. The result is scattered back to `[b, s, hidden]` with zero
    /// padding, or is each sequence's first row `[b, 1, hidden]` when `first_only`.
    fn encode_int8(
        &self,
        x: Tensor,
        mask: &Tensor,
        first_only: bool,
    ) -> Result<Tensor, tch::TchError> {
        let (batch, seq, hidden) = x.size3()?;
        let real = mask.f_ne(0)?;
        let lengths: Vec<usize> =
            Vec::<i64>::try_from(real.f_sum_dim_intlist(1, false, Kind::Int64)?)?
                .into_iter()
                .map(|n| n as usize)
                .collect();
        if lengths.contains(&0) {
            return Err(tch::TchError::Shape(
                "a sequence with no tokens: every input has at least its [CLS] token".into(),
            ));
        }
        let packed = real.f_reshape([-1])?.f_nonzero()?.f_reshape([-1])?;
        let sequences = Sequences::packed(lengths);
        let mut x = x.f_reshape([-1, hidden])?.f_index_select(0, &packed)?;
        let mut quantized = QuantizedRows::quantize(&x)?;
        let (eps, heads) = (
            self.config.layer_norm_eps,
            self.config.num_attention_heads as usize,
        );
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            let Weights::Int8(w) = &layer.weights else {
                return Err(mixed_layers());
            };
            let first = first_only && i == last;
            let context = w
                .qkv
                .forward_attention(&quantized, &sequences, heads, first)?;
            let rows = if first {
                let starts: Vec<i64> = sequences.starts().iter().map(|&r| r as i64).collect();
                x.f_index_select(0, &Tensor::from_slice(&starts))?
            } else {
                x
            };
            let norm = &layer.attention_norm;
            let (x1, x1q) = w.attention_out.forward_residual_norm(
                &context,
                &rows,
                &norm.weight,
                &norm.bias,
                eps,
            )?;
            let inter = w.intermediate.forward_gelu(&x1q, self.config.tanh_gelu)?;
            let norm = &layer.output_norm;
            (x, quantized) =
                w.output
                    .forward_residual_norm(&inter, &x1, &norm.weight, &norm.bias, eps)?;
        }
        if first_only {
            return x.f_view([batch, 1, hidden]);
        }
        Tensor::f_zeros([batch * seq, hidden], (Kind::Float, x.device()))?
            .f_index_copy(0, &packed, &x)?
            .f_view([batch, seq, hidden])
    }

    fn gelu(&self) -> &'static str {
        if self.config.tanh_gelu {
            "tanh"
        } else {
            "none"
        }
    }

    /// Multi-head attention of queries `[b, s_q, hidden]` over keys and values `[b, s,
    /// hidden]`, where `attend` `[b, 1, 1, s]` is true; the context is `[b, s_q, hidden]`.
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        attend: &Tensor,
    ) -> Result<Tensor, tch::TchError> {
        let heads = self.config.num_attention_heads;
        let head_dim = self.config.hidden_size / heads;
        let split = |t: &Tensor| {
            let (b, s, _) = t.size3()?;
            t.f_view([b, s, heads, head_dim])?.f_transpose(1, 2)
        };
        let (batch, queries, _) = q.size3()?;
        Tensor::f_scaled_dot_product_attention(
            &split(q)?,
            &split(k)?,
            &split(v)?,
            Some(attend),
            0.0,
            false,
            None,
            false,
        )?
        .f_transpose(1, 2)?
        .f_reshape([batch, queries, self.config.hidden_size])
    }
}

/// Pools hidden states `[b, s, h]` into sentence vectors `[b, h]` (f32), L2-normalised
/// when `normalize`.
pub fn pool(
    hidden: &Tensor,
    mask: &Tensor,
    pooling: Pooling,
    normalize: bool,
) -> Result<Tensor, tch::TchError> {
    let hidden = hidden.f_to_kind(Kind::Float)?;
    let m = mask.f_to_kind(Kind::Float)?.f_unsqueeze(-1)?;
    let pooled = match pooling {
        Pooling::Mean => {
            let summed = hidden.f_mul(&m)?.f_sum_dim_intlist(1, false, Kind::Float)?;
            let counts = m
                .f_sum_dim_intlist(1, false, Kind::Float)?
                .f_clamp_min(1e-9)?;
            summed.f_div(&counts)?
        }
        Pooling::Cls => hidden.f_select(1, 0)?,
        Pooling::Max => {
            let masked = hidden.f_masked_fill(&m.f_eq(0.0)?, -1e9)?;
            masked.f_amax([1].as_slice(), false)?
        }
    };
    if normalize {
        let norms = pooled
            .f_norm_scalaropt_dim(2.0, [1].as_slice(), true)?
            .f_clamp_min(1e-12)?;
        pooled.f_div(&norms)
    } else {
        Ok(pooled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A random two-layer BERT (hidden 32, 4 heads) written as `model.safetensors`.
    fn tiny_bert(dir: &Path) -> BertConfig {
        tch::manual_seed(3);
        let cpu = (Kind::Float, Device::Cpu);
        let (hidden, inner) = (32, 64);
        let mut tensors: Vec<(String, Tensor)> = vec![
            (
                "embeddings.word_embeddings.weight".into(),
                Tensor::randn([50, hidden], cpu),
            ),
            (
                "embeddings.position_embeddings.weight".into(),
                Tensor::randn([16, hidden], cpu),
            ),
            (
                "embeddings.token_type_embeddings.weight".into(),
                Tensor::randn([2, hidden], cpu),
            ),
        ];
        let mut norm = |name: &str| {
            tensors.push((format!("{name}.weight"), Tensor::rand([hidden], cpu) + 0.5));
            tensors.push((format!("{name}.bias"), Tensor::randn([hidden], cpu) * 0.1));
        };
        norm("embeddings.LayerNorm");
        for i in 0..2 {
            norm(&format!("encoder.layer.{i}.attention.output.LayerNorm"));
            norm(&format!("encoder.layer.{i}.output.LayerNorm"));
        }
        for i in 0..2 {
            let p = format!("encoder.layer.{i}");
            for (name, out, inp) in [
                ("attention.self.query", hidden, hidden),
                ("attention.self.key", hidden, hidden),
                ("attention.self.value", hidden, hidden),
                ("attention.output.dense", hidden, hidden),
                ("intermediate.dense", inner, hidden),
                ("output.dense", hidden, inner),
            ] {
                let w = Tensor::randn([out, inp], cpu) / (inp as f64).sqrt();
                tensors.push((format!("{p}.{name}.weight"), w));
                tensors.push((format!("{p}.{name}.bias"), Tensor::randn([out], cpu) * 0.1));
            }
        }
        Tensor::write_safetensors(&tensors, dir.join("model.safetensors")).unwrap();
        BertConfig {
            hidden_size: hidden,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            layer_norm_eps: 1e-12,
            tanh_gelu: false,
        }
    }

    #[test]
    fn the_first_token_alone_and_the_packed_int8_encoder_agree_with_the_full_pass() {
        let dir = tempfile::tempdir().unwrap();
        let config = tiny_bert(dir.path());
        let load = || Bert::load(dir.path(), config.clone(), Device::Cpu, Kind::Float, false);
        let model = load().unwrap();
        // Three right-padded sequences of 7, 3 and 5 tokens.
        let lengths = [7i64, 3, 5];
        let ids = Tensor::randint(50, [3, 7], (Kind::Int64, Device::Cpu));
        let mask = Tensor::from_slice(
            &lengths
                .iter()
                .flat_map(|&n| (0..7).map(move |i| i64::from(i < n)))
                .collect::<Vec<i64>>(),
        )
        .view([3, 7]);
        let types = (Tensor::arange(7, (Kind::Int64, Device::Cpu)).ge(4) * &mask).view([3, 7]);
        let full = model.encode(&ids, &mask, Some(&types), false).unwrap();
        let first = model.forward_first(&ids, &mask, &types).unwrap();
        assert_eq!(first.size(), vec![3, 1, 32]);
        let diff = (&first - full.narrow(1, 0, 1))
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < 1e-5, "first token alone differs by {diff}");

        let mut int8 = load().unwrap();
        int8.quantize_int8().unwrap();
        let packed = int8.encode(&ids, &mask, Some(&types), false).unwrap();
        assert_eq!(packed.size(), vec![3, 7, 32]);
        for (s, &n) in lengths.iter().enumerate() {
            let s = s as i64;
            let real = (packed.get(s).narrow(0, 0, n) - full.get(s).narrow(0, 0, n))
                .abs()
                .max()
                .double_value(&[]);
            // LayerNorm outputs are O(1); two int8 layers stay well within 0.1.
            assert!(real < 0.1, "sequence {s}: int8 differs from f32 by {real}");
            assert!(real > 0.0, "sequence {s} was not computed in int8");
            if n < 7 {
                let padding = packed
                    .get(s)
                    .narrow(0, n, 7 - n)
                    .abs()
                    .max()
                    .double_value(&[]);
                assert_eq!(padding, 0.0, "padding rows come back as zeros");
            }
        }
        let first8 = int8.forward_first(&ids, &mask, &types).unwrap();
        let diff = (&first8 - packed.narrow(1, 0, 1))
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < 1e-5, "int8 first token alone differs by {diff}");
    }
}
