//! Hugging Face model directories: resolving `model:` (a local directory or a model id in
//! the local HF cache; never a download) and reading what the sentence-transformers and
//! tokenizer files say about it.

use std::path::{Path, PathBuf};

use serde_json::Value;
use thiserror::Error;

/// Why a model cannot be used.
#[derive(Debug, Error)]
pub enum ModelError {
    /// Neither a directory nor a cached model id.
    #[error("model `{reference}` not found: it is not a directory{cache_note}; run `scripts/setup` for the bundled all-MiniLM-L6-v2 (.models/all-MiniLM-L6-v2) or point `model:` at a Hugging Face model directory")]
    NotFound {
        /// As written.
        reference: String,
        /// What the HF cache lookup found.
        cache_note: String,
    },
    /// A file the model needs is missing.
    #[error("{dir}: missing {file}{hint}")]
    MissingFile {
        /// Model directory.
        dir: PathBuf,
        /// File name.
        file: String,
        /// How to fix it.
        hint: String,
    },
    /// A file is unreadable or malformed.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Where Hugging Face keeps downloaded models: `$HF_HUB_CACHE`, `$HF_HOME/hub`, or
/// `~/.cache/huggingface/hub`.
pub fn hf_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE") {
        return Some(PathBuf::from(dir));
    }
    if let Some(home) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(home).join("hub"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
}

/// Resolves `reference` (relative to `cwd`) to a model directory: an existing directory
/// as is, else `org/name` looked up in the HF cache (`refs/main`, else the only snapshot).
pub fn resolve(reference: &str, cwd: &Path) -> Result<PathBuf, ModelError> {
    let direct = if Path::new(reference).is_absolute() {
        PathBuf::from(reference)
    } else {
        cwd.join(reference)
    };
    if direct.is_dir() {
        return direct.canonicalize().map_err(|e| ModelError::Invalid {
            path: direct.clone(),
            message: e.to_string(),
        });
    }
    let mut cache_note = String::new();
    let looks_like_id = reference.split('/').count() == 2
        && !reference.starts_with('.')
        && !reference.starts_with('/');
    if looks_like_id {
        match hf_cache_dir() {
            Some(cache) => {
                let repo = cache.join(format!("models--{}", reference.replace('/', "--")));
                if let Some(snapshot) = cached_snapshot(&repo) {
                    return Ok(snapshot);
                }
                cache_note = format!(" and not in the Hugging Face cache ({})", cache.display());
            }
            None => cache_note = " and no Hugging Face cache directory is known".into(),
        }
    }
    Err(ModelError::NotFound {
        reference: reference.to_string(),
        cache_note,
    })
}

fn cached_snapshot(repo: &Path) -> Option<PathBuf> {
    let snapshots = repo.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs/main")) {
        let dir = snapshots.join(rev.trim());
        if dir.is_dir() {
            return Some(dir);
        }
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    (dirs.len() == 1).then(|| dirs.remove(0))
}

fn read_json(path: &Path) -> Result<Option<Value>, ModelError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ModelError::Invalid {
                path: path.to_path_buf(),
                message: format!("not valid JSON: {e}"),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ModelError::Invalid {
            path: path.to_path_buf(),
            message: e.to_string(),
        }),
    }
}

/// How token embeddings become one sentence vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// Average over non-padding tokens.
    Mean,
    /// The first ([CLS]) token.
    Cls,
    /// Element-wise maximum over non-padding tokens.
    Max,
}

/// What a sentence-transformers model directory says about its use.
#[derive(Clone, Debug)]
pub struct SentenceConfig {
    /// Pooling mode (`1_Pooling/config.json`; mean when absent).
    pub pooling: Pooling,
    /// Whether a Normalize module follows pooling (`modules.json`).
    pub normalize: bool,
    /// Longest input in tokens, including special tokens.
    pub max_seq_length: usize,
}

/// Reads pooling, normalisation and max length from a model directory.
pub fn sentence_config(dir: &Path) -> Result<SentenceConfig, ModelError> {
    let pooling_cfg = read_json(&dir.join("1_Pooling/config.json"))?;
    let pooling = match &pooling_cfg {
        Some(cfg) if cfg["pooling_mode_cls_token"] == Value::Bool(true) => Pooling::Cls,
        Some(cfg) if cfg["pooling_mode_max_tokens"] == Value::Bool(true) => Pooling::Max,
        _ => Pooling::Mean,
    };
    let normalize = read_json(&dir.join("modules.json"))?
        .and_then(|m| {
            m.as_array().map(|mods| {
                mods.iter()
                    .any(|m| m["type"].as_str().is_some_and(|t| t.ends_with("Normalize")))
            })
        })
        .unwrap_or(false);
    let config = read_json(&dir.join("config.json"))?.ok_or_else(|| ModelError::MissingFile {
        dir: dir.to_path_buf(),
        file: "config.json".into(),
        hint: " (a Hugging Face model directory has config.json, tokenizer.json and model.safetensors)".into(),
    })?;
    let positions = config["max_position_embeddings"].as_u64().unwrap_or(512) as usize;
    let max_seq_length = read_json(&dir.join("sentence_bert_config.json"))?
        .and_then(|c| c["max_seq_length"].as_u64())
        .map(|m| (m as usize).min(positions))
        .unwrap_or(positions);
    Ok(SentenceConfig {
        pooling,
        normalize,
        max_seq_length,
    })
}

/// Loads `tokenizer.json` with padding and truncation turned off (the model's file may
/// carry its own; callers decide).
pub fn load_tokenizer(dir: &Path) -> Result<tokenizers::Tokenizer, ModelError> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        return Err(ModelError::MissingFile {
            dir: dir.to_path_buf(),
            file: "tokenizer.json".into(),
            hint: " (save one with `AutoTokenizer.from_pretrained(...).save_pretrained(dir)` in Python)".into(),
        });
    }
    let mut tokenizer =
        tokenizers::Tokenizer::from_file(&path).map_err(|e| ModelError::Invalid {
            path: path.clone(),
            message: e.to_string(),
        })?;
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(None)
        .map_err(|e| ModelError::Invalid {
            path,
            message: e.to_string(),
        })?;
    Ok(tokenizer)
}

/// A short name for `model:` as the user wrote it: the HF id for cache snapshots, else the
/// last component of the path they gave (not of where a symlink leads).
pub fn display_name_for(reference: &str, dir: &Path) -> String {
    let from_dir = display_name(dir);
    if from_dir.contains('/') {
        return from_dir;
    }
    Path::new(reference.trim_end_matches('/'))
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or(from_dir)
}

/// A short name for a model directory: the HF id for cache snapshots, else the folder name.
pub fn display_name(dir: &Path) -> String {
    let parts: Vec<String> = dir
        .components()
        .map(|c| c.as_os_str().to_string_lossy().to_string())
        .collect();
    if let Some(i) = parts.iter().position(|p| p == "snapshots") {
        if i > 0 {
            if let Some(id) = parts[i - 1].strip_prefix("models--") {
                return id.replacen("--", "/", 1);
            }
        }
    }
    dir.file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| dir.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_directories_and_cache_ids() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        std::fs::create_dir(&dir).unwrap();
        assert_eq!(
            resolve("m", tmp.path()).unwrap(),
            dir.canonicalize().unwrap()
        );

        let cache = tmp.path().join("hub");
        let snap = cache.join("models--org--name/snapshots/abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(cache.join("models--org--name/refs")).unwrap();
        std::fs::write(cache.join("models--org--name/refs/main"), "abc123\n").unwrap();
        // SAFETY-free: tests in this module are the only readers of HF_HUB_CACHE.
        unsafe { std::env::set_var("HF_HUB_CACHE", &cache) };
        assert_eq!(resolve("org/name", tmp.path()).unwrap(), snap);
        assert_eq!(display_name(&snap), "org/name");
        let err = resolve("org/missing", tmp.path()).unwrap_err().to_string();
        assert!(err.contains("not in the Hugging Face cache"), "{err}");
        unsafe { std::env::remove_var("HF_HUB_CACHE") };
    }
}
