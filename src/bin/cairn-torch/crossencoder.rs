//! Cross-encoder reranking: a BERT-family `*ForSequenceClassification` model reads a
//! (query, document) pair as one input and scores how well the document answers the
//! query, as sentence-transformers' `CrossEncoder.predict` does: pairs tokenized with the
//! tokenizer's pair template (second text type 1, longest-first truncation to the model's
//! limit), the classification head on the first token (BERT: pooler + classifier;
//! RoBERTa: classifier.dense + out_proj), then the model's activation (sigmoid for one
//! label unless the config names another).

use std::collections::HashMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::bert::{Bert, BertConfig};

/// The classification head over the first token's hidden state.
enum Head {
    /// BERT: tanh(pooler) then classifier.
    Bert {
        pooler: (Tensor, Tensor),
        classifier: (Tensor, Tensor),
    },
    /// RoBERTa: tanh(classifier.dense) then classifier.out_proj.
    Roberta {
        dense: (Tensor, Tensor),
        out: (Tensor, Tensor),
    },
}

/// What is applied to the first logit.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Activation {
    Sigmoid,
    Identity,
}

/// A loaded cross-encoder.
pub struct CrossEncoder {
    model: Bert,
    head: Head,
    activation: Activation,
    tokenizer: tokenizers::Tokenizer,
    device: Device,
}

fn take(
    rest: &mut HashMap<String, Tensor>,
    dir: &Path,
    name: &str,
) -> Result<(Tensor, Tensor), String> {
    let mut one = |suffix: &str| {
        rest.remove(&format!("{name}.{suffix}")).ok_or_else(|| {
            format!(
                "{}: missing tensor {name}.{suffix}; a reranker is a BERT-family *ForSequenceClassification model",
                dir.display()
            )
        })
    };
    Ok((one("weight")?, one("bias")?))
}

/// The activation sentence-transformers applies: the config's `activation_fn` (new or
/// pre-v4 key), else sigmoid for one label and identity otherwise.
fn activation(config: &serde_json::Value) -> Activation {
    let named = config["sentence_transformers"]["activation_fn"]
        .as_str()
        .or_else(|| config["sbert_ce_default_activation_function"].as_str());
    match named {
        Some(path) if path.ends_with("Identity") => Activation::Identity,
        Some(path) if path.ends_with("Sigmoid") => Activation::Sigmoid,
        _ => {
            let labels = config["id2label"].as_object().map_or(1, |m| m.len().max(1));
            if labels == 1 {
                Activation::Sigmoid
            } else {
                Activation::Identity
            }
        }
    }
}

impl CrossEncoder {
    /// Loads the model in `dir` on `device` with weights in `kind` (f32 matches
    /// sentence-transformers to 1e-5; bf16 is ~2.5x faster on CPUs with AVX512-BF16;
    /// [`CrossEncoder::quantize_int8`] after an f32 load is ~2x faster still and closer to
    /// f32).
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self, String> {
        let config_path = dir.join("config.json");
        let config: serde_json::Value = std::fs::read(&config_path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            .map_err(|e| format!("{}: {e}", config_path.display()))?;
        let bert_config =
            BertConfig::from_json(&config_path, &config).map_err(|e| e.to_string())?;
        let roberta = config["model_type"]
            .as_str()
            .is_some_and(|t| t.contains("roberta"));
        let (model, mut rest) = Bert::load_with_heads(dir, bert_config, device, kind, roberta)
            .map_err(|e| e.to_string())?;
        let head = if rest.contains_key("classifier.out_proj.weight") {
            Head::Roberta {
                dense: take(&mut rest, dir, "classifier.dense")?,
                out: take(&mut rest, dir, "classifier.out_proj")?,
            }
        } else {
            Head::Bert {
                pooler: take(&mut rest, dir, "pooler.dense")?,
                classifier: take(&mut rest, dir, "classifier")?,
            }
        };
        let limit = config["max_position_embeddings"].as_u64().unwrap_or(512) as usize;
        // RoBERTa's positions start after the padding index.
        let limit = if roberta {
            limit.saturating_sub(2)
        } else {
            limit
        };
        let mut tokenizer = cairn::models::load_tokenizer(dir).map_err(|e| e.to_string())?;
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: limit.min(512),
                strategy: tokenizers::TruncationStrategy::LongestFirst,
                ..Default::default()
            }))
            .map_err(|e| format!("tokenizer: {e}"))?;
        Ok(Self {
            model,
            head,
            activation: activation(&config),
            tokenizer,
            device,
        })
    }

    /// Quantizes the encoder's linear layers to int8 (see [`Bert::quantize_int8`]); the
    /// small classification head stays in f32. Load in f32 on the CPU first.
    pub fn quantize_int8(&mut self) -> Result<(), String> {
        self.model.quantize_int8().map_err(|e| e.to_string())
    }

    /// Scores of each document against `query`, in order.
    pub fn score(&self, query: &str, documents: &[String]) -> Result<Vec<f32>, String> {
        let _guard = tch::no_grad_guard();
        let pairs: Vec<tokenizers::EncodeInput> = documents
            .iter()
            .map(|d| (query.to_string(), d.clone()).into())
            .collect();
        let all = self
            .tokenizer
            .encode_batch(pairs, true)
            .map_err(|e| format!("tokenizing: {e}"))?;
        // Batches of similar lengths (longest first) waste little on padding.
        let mut order: Vec<usize> = (0..all.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(all[i].len()));
        let mut scores = vec![0f32; documents.len()];
        for batch in order.chunks(32) {
            let encodings: Vec<&tokenizers::Encoding> = batch.iter().map(|&i| &all[i]).collect();
            let seq = encodings.iter().map(|e| e.len()).max().unwrap_or(1).max(1);
            let rows = encodings.len();
            let (mut ids, mut mask, mut types) = (
                vec![0i64; rows * seq],
                vec![0i64; rows * seq],
                vec![0i64; rows * seq],
            );
            for (r, e) in encodings.iter().enumerate() {
                for (c, ((&id, &m), &t)) in e
                    .get_ids()
                    .iter()
                    .zip(e.get_attention_mask())
                    .zip(e.get_type_ids())
                    .enumerate()
                {
                    ids[r * seq + c] = i64::from(id);
                    mask[r * seq + c] = i64::from(m);
                    types[r * seq + c] = i64::from(t);
                }
            }
            let tensor = |v: &[i64]| {
                Tensor::from_slice(v)
                    .view([rows as i64, seq as i64])
                    .to_device(self.device)
            };
            let hidden = self
                .model
                .forward_first(&tensor(&ids), &tensor(&mask), &tensor(&types))
                .map_err(|e| e.to_string())?;
            let first = hidden.select(1, 0);
            let linear = |x: &Tensor, (w, b): &(Tensor, Tensor)| x.linear(w, Some(b));
            let logits = match &self.head {
                Head::Bert { pooler, classifier } => {
                    linear(&linear(&first, pooler).tanh(), classifier)
                }
                Head::Roberta { dense, out } => linear(&linear(&first, dense).tanh(), out),
            };
            let first_logit = logits.select(1, 0);
            let out = match self.activation {
                Activation::Sigmoid => first_logit.sigmoid(),
                Activation::Identity => first_logit,
            };
            let out: Vec<f32> = Vec::try_from(out.to_kind(Kind::Float).to_device(Device::Cpu))
                .map_err(|e: tch::TchError| e.to_string())?;
            for (&i, score) in batch.iter().zip(out) {
                scores[i] = score;
            }
        }
        Ok(scores)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_activation_follows_sentence_transformers() {
        let one = serde_json::json!({"id2label": {"0": "LABEL_0"}});
        assert_eq!(activation(&one), Activation::Sigmoid);
        let named = serde_json::json!({"id2label": {"0": "LABEL_0"},
            "sbert_ce_default_activation_function": "torch.nn.modules.linear.Identity"});
        assert_eq!(activation(&named), Activation::Identity);
        let three = serde_json::json!({"id2label": {"0": "a", "1": "b", "2": "c"}});
        assert_eq!(activation(&three), Activation::Identity);
    }
}
