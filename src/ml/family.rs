//! Which model families the `cairn-torch` helper can load, checked from a model
//! folder's `config.json` when a pipeline loads, so an unsupported model is an input
//! error (exit 2) instead of a failure after the run started. The helper's own loader
//! (`Config::from_hf`) uses the same lists.

use std::path::Path;

use serde_json::Value;

/// `model_type` values the decoder implements.
pub const MODEL_TYPES: &[&str] = &[
    "gpt2",
    "llama",
    "qwen2",
    "qwen3",
    "mistral",
    "phi3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "t5",
];

/// Rotary scaling types the decoder implements (`rope_parameters.rope_type` or
/// `rope_scaling.rope_type`/`type`).
pub const ROPE_TYPES: &[&str] = &["default", "llama3", "linear", "longrope"];

/// The rope type a config.json asks for.
pub fn rope_type(config: &Value) -> &str {
    config
        .get("rope_parameters")
        .filter(|r| r.is_object())
        .and_then(|r| r["rope_type"].as_str())
        .or_else(|| {
            config["rope_scaling"]
                .get("rope_type")
                .and_then(Value::as_str)
        })
        .or_else(|| config["rope_scaling"].get("type").and_then(Value::as_str))
        .unwrap_or("default")
}

/// `model_type` values the GGUF export writes for llama.cpp (see `cairn-torch`'s
/// `gguf` module, which also refuses Phi-3's longrope and a Gemma 2/3
/// `query_pre_attn_scalar` llama.cpp does not assume).
pub const GGUF_MODEL_TYPES: &[&str] = &[
    "gpt2",
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
];

/// The model folder's config.json, when it has a readable one.
fn read_config(dir: &Path) -> Option<Value> {
    std::fs::read(dir.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// Checks, at load time, that a `gguf` export of the model in `dir` can be written:
/// a family and rotary scaling llama.cpp computes as transformers does. `Ok` when `dir`
/// has no readable config.json.
pub fn check_gguf_export(dir: &Path) -> Result<(), String> {
    let Some(config) = read_config(dir) else {
        return Ok(());
    };
    let model_type = config["model_type"].as_str().unwrap_or("");
    let file = dir.join("config.json");
    if !GGUF_MODEL_TYPES.contains(&model_type) {
        return Err(format!(
            "{}: GGUF export does not cover model_type {model_type:?} (it covers {}); drop `gguf` or export the merged model with another tool",
            file.display(),
            GGUF_MODEL_TYPES.join(", ")
        ));
    }
    if model_type == "phi3" && rope_type(&config) == "longrope" {
        return Err(format!(
            "{}: GGUF export does not cover Phi-3's longrope (128k) variants: llama.cpp switches their rotary factors by context size, transformers by sequence length",
            file.display()
        ));
    }
    Ok(())
}

/// Checks that the model in `dir` is one the decoder supports; `Ok` when `dir` has no
/// readable config.json (the helper reports that with the model's own error).
pub fn check_model_dir(dir: &Path) -> Result<(), String> {
    let Some(config) = read_config(dir) else {
        return Ok(());
    };
    let model_type = config["model_type"].as_str().unwrap_or("");
    if !MODEL_TYPES.contains(&model_type) {
        return Err(format!(
            "{}: model_type {model_type:?} is not supported; cairn trains {}",
            dir.join("config.json").display(),
            MODEL_TYPES.join(", ")
        ));
    }
    let rope = rope_type(&config);
    if model_type != "gpt2" && !ROPE_TYPES.contains(&rope) {
        return Err(format!(
            "{}: rope scaling {rope:?} is not supported ({})",
            dir.join("config.json").display(),
            ROPE_TYPES.join(", ")
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_unsupported_family_and_the_supported_ones() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            check_model_dir(dir.path()).is_ok(),
            "no config.json: left to the helper"
        );
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"model_type": "falcon"}"#,
        )
        .unwrap();
        let err = check_model_dir(dir.path()).unwrap_err();
        assert!(
            err.contains("\"falcon\"") && err.contains("gemma2"),
            "{err}"
        );
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"model_type": "llama", "rope_scaling": {"type": "yarn", "factor": 4}}"#,
        )
        .unwrap();
        let err = check_model_dir(dir.path()).unwrap_err();
        assert!(err.contains("\"yarn\"") && err.contains("llama3"), "{err}");
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"model_type": "llama", "rope_parameters": {"rope_type": "llama3"}}"#,
        )
        .unwrap();
        assert!(check_model_dir(dir.path()).is_ok());
    }

    #[test]
    fn gguf_export_is_refused_at_load_time_for_what_llama_cpp_computes_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let config = |json: &str| std::fs::write(dir.path().join("config.json"), json).unwrap();
        config(r#"{"model_type": "t5"}"#);
        let err = check_gguf_export(dir.path()).unwrap_err();
        assert!(
            err.contains("\"t5\"") && err.contains("gemma3_text"),
            "{err}"
        );
        config(r#"{"model_type": "phi3", "rope_scaling": {"type": "longrope"}}"#);
        let err = check_gguf_export(dir.path()).unwrap_err();
        assert!(err.contains("longrope"), "{err}");
        config(r#"{"model_type": "phi3"}"#);
        assert!(check_gguf_export(dir.path()).is_ok());
        config(r#"{"model_type": "gemma3_text"}"#);
        assert!(check_gguf_export(dir.path()).is_ok());
    }
}
