//! Sentence embeddings: a BERT-family encoder through libtorch (tch), pooled and
//! normalised as the model's sentence-transformers files say, batched by length so little
//! compute goes to padding. Without the `torch` cargo feature, loading explains how to
//! get a build that has it.

#[cfg(feature = "torch")]
pub mod bert;

use std::path::{Path, PathBuf};

use serde::Serialize;
use thiserror::Error;

use crate::models::{self, Pooling};

/// Artifact kind of an embeddings directory.
pub const KIND: &str = "embeddings";
/// The tensor file inside an embeddings artifact.
pub const TENSOR_FILE: &str = "embeddings.safetensors";
/// The tensor's name inside [`TENSOR_FILE`].
pub const TENSOR_NAME: &str = "embeddings";
/// The chunks file inside an embeddings artifact (row i = line i).
pub const CHUNKS_FILE: &str = "chunks.jsonl";

/// Why embedding failed.
#[derive(Debug, Error)]
pub enum EmbedError {
    /// The model directory is unusable.
    #[error("{0}")]
    Model(String),
    /// libtorch reported an error.
    #[error("libtorch: {0}")]
    Torch(String),
    /// Bad settings.
    #[error("{0}")]
    Settings(String),
    /// This binary has no libtorch.
    #[error("this cairn was built without the `torch` feature, so it cannot run the embedding model; run `scripts/setup` and build with default features (`cargo build --release`)")]
    NotBuilt,
}

impl From<models::ModelError> for EmbedError {
    fn from(e: models::ModelError) -> Self {
        EmbedError::Model(e.to_string())
    }
}

/// Where to run: `auto` picks CUDA when present.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA device 0 when available, else CPU.
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA device N.
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| format!("unknown device {other:?}; use auto, cpu, cuda or cuda:N")),
        }
    }
}

/// Compute precision: `auto` is f16 on CUDA and f32 on CPU.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f16 on CUDA, f32 on CPU.
    Auto,
    /// 32-bit floats.
    F32,
    /// 16-bit floats (CUDA only).
    F16,
    /// bfloat16 (CUDA only).
    Bf16,
}

/// What an [`Embedder`] is and where it runs, for artifact metadata.
#[derive(Clone, Debug, Serialize)]
pub struct EmbedderInfo {
    /// Model name (HF id or folder name).
    pub model: String,
    /// Model directory.
    pub model_dir: PathBuf,
    /// Vector width.
    pub dim: usize,
    /// Pooling mode.
    pub pooling: Pooling,
    /// L2-normalised output.
    pub normalize: bool,
    /// Longest input in tokens (longer inputs are truncated).
    pub max_seq_length: usize,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Why that device.
    pub device_reason: String,
    /// `f32`, `f16` or `bf16`.
    pub precision: String,
    /// libtorch intra-op threads (CPU).
    pub threads: usize,
}

/// Makes CUDA visible to libtorch when the CUDA library is installed: rustc links with
/// --as-needed, which drops libtorch_cuda.so, so load it by hand (harmless on CPU-only
/// machines, where it is absent).
#[cfg(feature = "torch")]
pub fn load_cuda_library() {
    use std::sync::Once;
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let name = std::ffi::CString::new("libtorch_cuda.so").expect("no NUL");
        // SAFETY: dlopen with a valid C string; the handle is intentionally leaked so the
        // library stays loaded for the life of the process.
        unsafe {
            libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL);
        }
    });
}

/// A loaded sentence-embedding model.
pub struct Embedder {
    info: EmbedderInfo,
    tokenizer: tokenizers::Tokenizer,
    #[cfg(feature = "torch")]
    model: bert::Bert,
    #[cfg(feature = "torch")]
    device: tch::Device,
}

impl Embedder {
    /// Loads the model in `dir`.
    #[cfg(not(feature = "torch"))]
    pub fn load(
        _dir: &Path,
        _device: DeviceChoice,
        _precision: Precision,
        _threads: usize,
    ) -> Result<Self, EmbedError> {
        Err(EmbedError::NotBuilt)
    }

    /// Loads the model in `dir` onto `device` (`threads` = 0: libtorch's default).
    #[cfg(feature = "torch")]
    pub fn load(
        dir: &Path,
        device: DeviceChoice,
        precision: Precision,
        threads: usize,
    ) -> Result<Self, EmbedError> {
        load_cuda_library();
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
        let cuda = tch::Cuda::is_available();
        let (device, device_reason) = match device {
            DeviceChoice::Auto if cuda => (tch::Device::Cuda(0), "auto: CUDA is available".to_string()),
            DeviceChoice::Auto => (
                tch::Device::Cpu,
                "auto: no CUDA device visible to libtorch".to_string(),
            ),
            DeviceChoice::Cpu => (tch::Device::Cpu, "requested".to_string()),
            DeviceChoice::Cuda(n) if cuda && (n as i64) < tch::Cuda::device_count() => {
                (tch::Device::Cuda(n), "requested".to_string())
            }
            DeviceChoice::Cuda(n) => {
                return Err(EmbedError::Settings(format!(
                    "device cuda:{n} requested but libtorch sees {} CUDA device(s); use device: auto or cpu",
                    if cuda { tch::Cuda::device_count() } else { 0 }
                )))
            }
        };
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
    #[cfg(feature = "torch")]
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

    /// Embeds `texts` (unavailable: this build has no libtorch).
    #[cfg(not(feature = "torch"))]
    pub fn embed(
        &self,
        _texts: &[&str],
        _batch_size: usize,
        _on_batch: &mut dyn FnMut(usize) -> bool,
    ) -> Result<Vec<f32>, EmbedError> {
        Err(EmbedError::NotBuilt)
    }
}

/// Writes `[rows, dim]` f32 vectors as `embeddings.safetensors` (tensor `embeddings`).
pub fn write_tensor(path: &Path, vectors: &[f32], dim: usize) -> Result<(), String> {
    use safetensors::tensor::{Dtype, TensorView};
    let rows = vectors.len().checked_div(dim).unwrap_or(0);
    let bytes: Vec<u8> = vectors.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = TensorView::new(Dtype::F32, vec![rows, dim], &bytes).map_err(|e| e.to_string())?;
    safetensors::serialize_to_file([(TENSOR_NAME, view)], None, path)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Reads the `embeddings` tensor of an embeddings artifact: `(rows, dim, values)`.
pub fn read_tensor(path: &Path) -> Result<(usize, usize, Vec<f32>), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let view = st
        .tensor(TENSOR_NAME)
        .map_err(|e| format!("{}: no tensor `{TENSOR_NAME}`: {e}", path.display()))?;
    if view.dtype() != safetensors::Dtype::F32 || view.shape().len() != 2 {
        return Err(format!(
            "{}: `{TENSOR_NAME}` must be a 2-D f32 tensor (is {:?} {:?})",
            path.display(),
            view.dtype(),
            view.shape()
        ));
    }
    let (rows, dim) = (view.shape()[0], view.shape()[1]);
    let values = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok((rows, dim, values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_file_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(TENSOR_FILE);
        let values: Vec<f32> = (0..12).map(|i| i as f32 * 0.5).collect();
        write_tensor(&path, &values, 4).unwrap();
        let (rows, dim, back) = read_tensor(&path).unwrap();
        assert_eq!((rows, dim), (3, 4));
        assert_eq!(back, values);
    }

    #[test]
    fn device_choices_parse() {
        assert_eq!("auto".parse::<DeviceChoice>().unwrap(), DeviceChoice::Auto);
        assert_eq!(
            "cuda:1".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(1)
        );
        assert!("tpu"
            .parse::<DeviceChoice>()
            .unwrap_err()
            .contains("unknown device"));
    }
}
