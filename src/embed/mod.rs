//! Sentence embeddings. The model runs in the `cairn-torch` helper binary (a BERT-family
//! encoder through libtorch, see `src/bin/cairn-torch/`), so the orchestrator itself never
//! loads libtorch: `cairn` starts in milliseconds and stays small, and a crash or
//! out-of-memory in the model cannot take the scheduler down. This module holds what
//! both sides share: settings, the description of a loaded model, the safetensors output
//! format, and [`worker`], the client that drives the helper.

pub mod dedup;
pub mod worker;

use std::path::{Path, PathBuf};

use serde::Serialize;
use thiserror::Error;

use crate::models::{self, Pooling};

pub use worker::{EmbedJob, EmbedOutcome};

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
    /// The helper binary is missing (a build without the `torch` feature).
    #[error("the embedding helper `cairn-torch` was not found next to {0}; it is built with the default `torch` feature: run `scripts/setup` and `cargo build --release` (or set CAIRN_TORCH_BIN)")]
    NoHelper(String),
    /// Ctrl-C.
    #[error("cancelled")]
    Cancelled,
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
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
#[value(rename_all = "lower")]
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
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
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

/// Writes `[rows, dim]` f32 vectors as `embeddings.safetensors` (tensor `embeddings`).
pub fn write_tensor(path: &Path, vectors: &[f32], dim: usize) -> Result<(), String> {
    use safetensors::tensor::{Dtype, TensorView};
    let rows = vectors.len().checked_div(dim).unwrap_or(0);
    let bytes: Vec<u8> = vectors.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = TensorView::new(Dtype::F32, vec![rows, dim], &bytes).map_err(|e| e.to_string())?;
    safetensors::serialize_to_file([(TENSOR_NAME, view)], None, path)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// An embeddings artifact's vectors (row-major, `dim` wide) and the chunk of each row.
pub struct Embedded {
    /// Vector width.
    pub dim: usize,
    /// `chunks.len() * dim` values.
    pub vectors: Vec<f32>,
    /// Row i's chunk.
    pub chunks: Vec<crate::chunk::Chunk>,
}

impl Embedded {
    /// Reads the artifact folder `dir`; an error says what is missing or inconsistent.
    pub fn read(dir: &Path) -> Result<Embedded, String> {
        let (rows, dim, vectors) = read_tensor(&dir.join(TENSOR_FILE))?;
        let chunks: Vec<crate::chunk::Chunk> =
            crate::documents::read_jsonl(&dir.join(CHUNKS_FILE))?;
        if rows != chunks.len() {
            return Err(format!(
                "the embeddings artifact is inconsistent: {rows} vectors for {} chunks",
                chunks.len()
            ));
        }
        Ok(Embedded {
            dim,
            vectors,
            chunks,
        })
    }

    /// Row i's vector.
    pub fn vector(&self, i: usize) -> &[f32] {
        &self.vectors[i * self.dim..(i + 1) * self.dim]
    }
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
