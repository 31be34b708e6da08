//! The libtorch side of `embed`: loads a BERT-family model and embeds texts, batched by
//! length so little compute goes to padding.

use std::path::Path;

use cairn::embed::{DeviceChoice, EmbedError, EmbedderInfo, Precision};
use cairn::models;

use crate::bert;

/// A loaded sentence-embedding model.
pub struct Embedder {
    info: EmbedderInfo,
    tokenizer: tokenizers::Tokenizer,
    model: bert::Bert,
    device: tch::Device,
}

impl Embedder {
    /// Loads the model in `dir` onto `device` (`threads` = 0: libtorch's default).
    pub fn load(
        dir: &Path,
        device: DeviceChoice,
        precision: Precision,
        threads: usize,
    ) -> Result<Self, EmbedError> {
        let sentence = models::sentence_config(dir)?;
        let config_path = dir.join("config.json");
        let config_json: serde_json::Value = serde_json::from_slice(
            &std::fs::read(&config_path)
                .map_err(|e| EmbedError::Model(format!("{}: {e}", config_path.display())))?,
        )
        .map_err(|e| EmbedError::Model(format!("{}: {e}", config_path.display())))?;
        let config = bert::BertConfig::from_json(&config_path, &config_json)?;
        let roberta = config_json["model_type"]
            .as_str()
            .is_some_and(|t| t.contains("roberta"));
        let (device, device_reason) = crate::device::pick(device).map_err(EmbedError::Settings)?;
        let kind = match (precision, device.is_cuda()) {
            (Precision::Auto, true) | (Precision::F16, true) => tch::Kind::Half,
            (Precision::Bf16, true) => tch::Kind::BFloat16,
            (Precision::Auto | Precision::F32, _) => tch::Kind::Float,
            (p, false) => {
                return Err(EmbedError::Settings(format!(
                    "precision {p:?} needs CUDA; on CPU use f32 (or auto)"
                )))
            }
        };
        if threads > 0 && !device.is_cuda() {
            tch::set_num_threads(threads as i32);
        }
        let mut tokenizer = models::load_tokenizer(dir)?;
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: sentence.max_seq_length,
                ..Default::default()
            }))
            .map_err(|e| EmbedError::Model(format!("tokenizer: {e}")))?;
        let model = bert::Bert::load(dir, config.clone(), device, kind, roberta)?;
        let info = EmbedderInfo {
            model: models::display_name(dir),
            model_dir: dir.to_path_buf(),
            dim: config.hidden_size as usize,
            pooling: sentence.pooling,
            normalize: sentence.normalize,
            max_seq_length: sentence.max_seq_length,
            device: match device {
                tch::Device::Cuda(n) => format!("cuda:{n}"),
                _ => "cpu".to_string(),
            },
            device_reason,
            precision: match kind {
                tch::Kind::Half => "f16",
                tch::Kind::BFloat16 => "bf16",
                _ => "f32",
            }
            .to_string(),
            threads: tch::get_num_threads().max(0) as usize,
        };
        Ok(Self {
            info,
            tokenizer,
            model,
            device,
        })
    }

    /// What was loaded and where.
    pub fn info(&self) -> &EmbedderInfo {
        &self.info
    }

    /// Token ids of each text (with special tokens, truncated to the model's limit).
    pub fn tokenize(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>, EmbedError> {
        use rayon::prelude::*;
        // Only the tokenizer crosses threads (the model holds raw libtorch pointers).
        let tokenizer = &self.tokenizer;
        texts
            .par_iter()
            .map(|t| {
                tokenizer
                    .encode(*t, true)
                    .map(|e| e.get_ids().to_vec())
                    .map_err(|e| EmbedError::Model(format!("tokenizing: {e}")))
            })
            .collect()
    }

    /// Embeds `texts`; returns `texts.len() * dim` floats, row-major, in input order.
    /// Batches hold texts of similar length (longest first) to minimise padding;
    /// `on_batch(done)` reports progress.
    pub fn embed(
        &self,
        texts: &[&str],
        batch_size: usize,
        on_batch: &mut dyn FnMut(usize) -> bool,
    ) -> Result<Vec<f32>, EmbedError> {
        let ids = self.tokenize(texts)?;
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(ids[i].len()));
        let dim = self.info.dim;
        let mut out = vec![0f32; texts.len() * dim];
        let _guard = tch::no_grad_guard();
        let mut done = 0;
        for batch in order.chunks(batch_size.max(1)) {
            let seq = batch
                .iter()
                .map(|&i| ids[i].len())
                .max()
                .unwrap_or(0)
                .max(1);
            let mut flat = vec![0i64; batch.len() * seq];
            let mut mask = vec![0i64; batch.len() * seq];
            for (row, &i) in batch.iter().enumerate() {
                for (col, &id) in ids[i].iter().enumerate() {
                    flat[row * seq + col] = id as i64;
                    mask[row * seq + col] = 1;
                }
            }
            let torch = |e: tch::TchError| EmbedError::Torch(e.to_string());
            let shape = [batch.len() as i64, seq as i64];
            let ids_t = tch::Tensor::f_from_slice(&flat)
                .and_then(|t| t.f_view(shape))
                .and_then(|t| t.f_to_device(self.device))
                .map_err(torch)?;
            let mask_t = tch::Tensor::f_from_slice(&mask)
                .and_then(|t| t.f_view(shape))
                .and_then(|t| t.f_to_device(self.device))
                .map_err(torch)?;
            let hidden = self.model.forward(&ids_t, &mask_t).map_err(torch)?;
            let pooled = bert::pool(&hidden, &mask_t, self.info.pooling, self.info.normalize)
                .and_then(|t| t.f_to_device(tch::Device::Cpu))
                .and_then(|t| t.f_contiguous())
                .map_err(torch)?;
            let mut values = vec![0f32; batch.len() * dim];
            pooled
                .f_copy_data(&mut values, batch.len() * dim)
                .map_err(torch)?;
            for (row, &i) in batch.iter().enumerate() {
                out[i * dim..(i + 1) * dim].copy_from_slice(&values[row * dim..(row + 1) * dim]);
            }
            done += batch.len();
            if !on_batch(done) {
                return Err(EmbedError::Settings("cancelled".into()));
            }
        }
        Ok(out)
    }
}
