//! A BERT-family encoder in tch: embeddings, post-norm encoder layers with fused scaled
//! dot-product attention, and the sentence-transformers pooling heads. Inference only:
//! weights are plain tensors read from `model.safetensors` by their Hugging Face names.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;
use tch::{Device, Kind, Tensor};

use cairn::embed::EmbedError;
use cairn::models::Pooling;

use crate::int8::Int8Linear;

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

enum Linear {
    /// Weights and bias in the model's float kind.
    Dense { weight: Tensor, bias: Tensor },
    /// Dynamically quantized int8 (CPU).
    Int8(Int8Linear),
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        match self {
            Linear::Dense { weight, bias } => x.f_linear(weight, Some(bias)),
            Linear::Int8(q) => q.forward(x),
        }
    }

    fn quantize_int8(&mut self) -> Result<(), tch::TchError> {
        if let Linear::Dense { weight, bias } = self {
            *self = Linear::Int8(Int8Linear::quantize(weight, bias)?);
        }
        Ok(())
    }
}

struct Norm {
    weight: Tensor,
    bias: Tensor,
}

/// The attention's query, key and value projections.
enum Projections {
    /// Three products in the model's float kind, as loaded.
    Separate {
        query: Linear,
        key: Linear,
        value: Linear,
    },
    /// One int8 product over the concatenated weights (see [`Bert::quantize_int8`]): the
    /// input is quantized once instead of three times.
    Fused(Int8Linear),
}

struct Layer {
    projections: Projections,
    attention_out: Linear,
    attention_norm: Norm,
    intermediate: Linear,
    output: Linear,
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
         -> Result<Linear, EmbedError> {
            Ok(Linear::Dense {
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
                projections: Projections::Separate {
                    query: linear(&mut take, &format!("{p}.attention.self.query"))?,
                    key: linear(&mut take, &format!("{p}.attention.self.key"))?,
                    value: linear(&mut take, &format!("{p}.attention.self.value"))?,
                },
                attention_out: linear(&mut take, &format!("{p}.attention.output.dense"))?,
                attention_norm: norm(&mut take, &format!("{p}.attention.output.LayerNorm"))?,
                intermediate: linear(&mut take, &format!("{p}.intermediate.dense"))?,
                output: linear(&mut take, &format!("{p}.output.dense"))?,
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
            if let Projections::Separate {
                query:
                    Linear::Dense {
                        weight: wq,
                        bias: bq,
                    },
                key:
                    Linear::Dense {
                        weight: wk,
                        bias: bk,
                    },
                value:
                    Linear::Dense {
                        weight: wv,
                        bias: bv,
                    },
            } = &layer.projections
            {
                // Per-channel weight scales and per-row input scales make the fused
                // product equal the three separate ones.
                layer.projections = Projections::Fused(Int8Linear::quantize(
                    &Tensor::f_cat(&[wq, wk, wv], 0)?,
                    &Tensor::f_cat(&[bq, bk, bv], 0)?,
                )?);
            }
            for linear in [
                &mut layer.attention_out,
                &mut layer.intermediate,
                &mut layer.output,
            ] {
                linear.quantize_int8()?;
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
        self.forward_typed(ids, mask, None)
    }

    /// As [`Bert::forward`] with token type ids [batch, seq] (the second text of a pair
    /// is type 1); `None` is type 0 throughout.
    pub fn forward_typed(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        types: Option<&Tensor>,
    ) -> Result<Tensor, tch::TchError> {
        let (batch, seq) = ids.size2()?;
        let heads = self.config.num_attention_heads;
        let head_dim = self.config.hidden_size / heads;
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
        // SDPA takes a boolean mask where true means "attend"; shape [b, 1, 1, s].
        let attend = mask.f_ne(0)?.f_view([batch, 1, 1, seq])?;
        let split = |t: Tensor| t.f_view([batch, seq, heads, head_dim])?.f_transpose(1, 2);
        for layer in &self.layers {
            let (q, k, v) = match &layer.projections {
                Projections::Separate { query, key, value } => {
                    (query.forward(&x)?, key.forward(&x)?, value.forward(&x)?)
                }
                Projections::Fused(qkv) => {
                    let parts = qkv.forward(&x)?.f_split(self.config.hidden_size, -1)?;
                    let [q, k, v]: [Tensor; 3] = parts.try_into().map_err(|_| {
                        tch::TchError::Shape("fused query/key/value: expected 3 parts".into())
                    })?;
                    (q, k, v)
                }
            };
            let (q, k, v) = (split(q)?, split(k)?, split(v)?);
            let context = Tensor::f_scaled_dot_product_attention(
                &q,
                &k,
                &v,
                Some(&attend),
                0.0,
                false,
                None,
                false,
            )?
            .f_transpose(1, 2)?
            .f_reshape([batch, seq, self.config.hidden_size])?;
            let attn = layer.attention_out.forward(&context)?;
            x = self.layer_norm(&attn.f_add(&x)?, &layer.attention_norm)?;
            let inter = layer
                .intermediate
                .forward(&x)?
                .f_gelu(if self.config.tanh_gelu {
                    "tanh"
                } else {
                    "none"
                })?;
            let out = layer.output.forward(&inter)?;
            x = self.layer_norm(&out.f_add(&x)?, &layer.output_norm)?;
        }
        Ok(x)
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
