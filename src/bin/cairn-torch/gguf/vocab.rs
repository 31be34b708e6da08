//! The tokenizer in llama.cpp's terms, from the Hugging Face `tokenizer.json`:
//!
//! - byte-level BPE (GPT-2, Llama 3, Qwen2/3, SmolLM): `tokenizer.ggml.model = gpt2`,
//!   the merges, and the pre-tokenizer by the name llama.cpp knows it by;
//! - SentencePiece-style BPE with byte fallback (Llama 2, Mistral v0.1, Gemma, Phi-3):
//!   `tokenizer.ggml.model = llama`, a score per token and `<0xNN>` byte tokens. llama.cpp
//!   merges the adjacent pair whose joined text is the highest-scored token; giving each
//!   token minus the rank of the first merge that makes it reproduces the Hugging Face
//!   BPE's merge order (what `convert_hf_to_gguf.py` gets from the SentencePiece model's
//!   own scores, which the Hugging Face conversion orders the merges by).
//!
//! Then the special tokens (BOS, EOS, end of turn, unknown, padding) and the chat template.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;
use tokenizers::Tokenizer;

use super::writer::Meta;
use cairn::ml::chat_template::ChatTemplate;

/// llama.cpp's token types.
mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

/// Writes the tokenizer's metadata through `kv`.
pub fn tokenizer_meta(
    tokenizer: &Tokenizer,
    vocab: i64,
    eos_token: &str,
    chat: Option<&ChatTemplate>,
    kv: &mut dyn FnMut(&str, Meta),
) -> Result<(), String> {
    let json: Value = serde_json::from_str(&tokenizer.to_string(false).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    let model = &json["model"];
    if model["type"] != "BPE" {
        return Err(format!(
            "GGUF export: the tokenizer is a {} model; llama.cpp's formats are written for BPE tokenizers, byte-level (GPT-2, Llama 3, Qwen) or with byte fallback (Llama 2, Gemma, Phi-3)",
            model["type"]
        ));
    }
    let sentencepiece = model["byte_fallback"] == true;
    let added: BTreeMap<u32, bool> = json["added_tokens"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| {
            Some((
                t["id"].as_u64()? as u32,
                t["special"].as_bool().unwrap_or(false),
            ))
        })
        .collect();
    let unk = model["unk_token"].as_str();
    let mut tokens: Vec<String> = (0..vocab).map(|i| format!("[PAD{i}]")).collect();
    let mut types = vec![token_type::UNUSED; vocab as usize];
    for (token, id) in tokenizer.get_vocab(true) {
        if (id as i64) >= vocab {
            continue;
        }
        types[id as usize] = match added.get(&id) {
            Some(true) => token_type::CONTROL,
            Some(false) => token_type::USER_DEFINED,
            None if Some(token.as_str()) == unk => token_type::UNKNOWN,
            None if sentencepiece && is_byte_token(&token) => token_type::BYTE,
            None => token_type::NORMAL,
        };
        tokens[id as usize] = token;
    }
    let merges = merges(model);
    if sentencepiece {
        // The rank of the first merge making each token, as a score (higher merges first).
        let mut scores = vec![0f32; vocab as usize];
        let mut scored: HashMap<String, f32> = HashMap::new();
        for (rank, (a, b)) in merges.iter().enumerate() {
            scored.entry(format!("{a}{b}")).or_insert(-(rank as f32));
        }
        for (token, score) in tokens.iter().zip(scores.iter_mut()) {
            if let Some(s) = scored.get(token) {
                *score = *s;
            }
        }
        kv("tokenizer.ggml.model", Meta::Str("llama".into()));
        kv("tokenizer.ggml.tokens", Meta::Strs(tokens));
        kv("tokenizer.ggml.scores", Meta::F32s(scores));
        kv("tokenizer.ggml.token_type", Meta::I32s(types));
        kv(
            "tokenizer.ggml.add_space_prefix",
            Meta::Bool(adds_space_prefix(&json)),
        );
    } else {
        let pre = pre_tokenizer_name(&json["pre_tokenizer"]).ok_or(
            "GGUF export: this tokenizer's pre-tokenizer is not one llama.cpp knows by name (gpt-2, llama-bpe, qwen2, smollm)",
        )?;
        kv("tokenizer.ggml.model", Meta::Str("gpt2".into()));
        kv("tokenizer.ggml.pre", Meta::Str(pre.into()));
        kv("tokenizer.ggml.tokens", Meta::Strs(tokens));
        kv("tokenizer.ggml.token_type", Meta::I32s(types));
        kv(
            "tokenizer.ggml.merges",
            Meta::Strs(merges.iter().map(|(a, b)| format!("{a} {b}")).collect()),
        );
    }

    let id = |t: &str| tokenizer.token_to_id(t);
    let eos = chat
        .map(|c| c.eos_token())
        .filter(|e| !e.is_empty())
        .unwrap_or(eos_token);
    if let Some(eos) = id(eos) {
        kv("tokenizer.ggml.eos_token_id", Meta::U32(eos));
    }
    // llama.cpp also stops at an end-of-turn token (<|eot_id|>, <|im_end|>, <end_of_turn>...).
    let eot = chat.and_then(|c| {
        c.stops()
            .iter()
            .filter(|s| s.as_str() != eos)
            .find_map(|s| id(s))
    });
    if let Some(eot) = eot {
        kv("tokenizer.ggml.eot_token_id", Meta::U32(eot));
    }
    if sentencepiece {
        // As the tokenizer encodes: Llama 2 and Gemma put BOS first, Phi-3 does not.
        let bos = template_bos(&json);
        let bos_id = bos.or_else(|| chat.map(|c| c.bos_token())).and_then(id);
        if let Some(bos_id) = bos_id {
            kv("tokenizer.ggml.bos_token_id", Meta::U32(bos_id));
        }
        kv("tokenizer.ggml.add_bos_token", Meta::Bool(bos.is_some()));
        if let Some(unk) = unk.and_then(id) {
            kv("tokenizer.ggml.unknown_token_id", Meta::U32(unk));
        }
        if let Some(pad) = id("<pad>") {
            kv("tokenizer.ggml.padding_token_id", Meta::U32(pad));
        }
    } else if let Some(bos) = chat.and_then(|c| id(c.bos_token())) {
        // The chat template writes BOS itself.
        kv("tokenizer.ggml.bos_token_id", Meta::U32(bos));
        kv("tokenizer.ggml.add_bos_token", Meta::Bool(false));
    }
    if let Some(chat) = chat {
        kv(
            "tokenizer.chat_template",
            Meta::Str(chat.source().to_string()),
        );
    }
    Ok(())
}

/// SentencePiece's byte pieces, `<0x00>` to `<0xFF>`.
fn is_byte_token(token: &str) -> bool {
    token.len() == 6
        && token.starts_with("<0x")
        && token.ends_with('>')
        && token[3..5].chars().all(|c| c.is_ascii_hexdigit())
}

/// The merges as pairs, from either of the two layouts `tokenizer.json` uses
/// (`"a b"` strings, or `["a", "b"]` pairs since tokenizers 0.20).
fn merges(model: &Value) -> Vec<(String, String)> {
    model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Value::String(s) => {
                let (a, b) = s.split_once(' ')?;
                Some((a.to_string(), b.to_string()))
            }
            Value::Array(pair) => Some((
                pair.first()?.as_str()?.to_string(),
                pair.get(1)?.as_str()?.to_string(),
            )),
            _ => None,
        })
        .collect()
}

/// Whether the tokenizer puts a `▁` before the text (SentencePiece's dummy prefix):
/// a `Prepend("▁")` normalizer (older conversions) or a `Metaspace` pre-tokenizer that
/// prepends (newer ones). Gemma does neither.
fn adds_space_prefix(json: &Value) -> bool {
    let flat = |v: &Value, list: &str| -> Vec<Value> {
        match v["type"].as_str() {
            Some("Sequence") => v[list].as_array().cloned().unwrap_or_default(),
            Some(_) => vec![v.clone()],
            None => Vec::new(),
        }
    };
    let prepends = flat(&json["normalizer"], "normalizers")
        .iter()
        .any(|n| n["type"] == "Prepend" && n["prepend"] == "\u{2581}");
    let metaspace = flat(&json["pre_tokenizer"], "pretokenizers")
        .iter()
        .any(|p| {
            p["type"] == "Metaspace"
                && (p["add_prefix_space"] == true
                    || matches!(p["prepend_scheme"].as_str(), Some("always" | "first")))
        });
    prepends || metaspace
}

/// The special token the post-processor puts before a single sequence (BOS), if any.
fn template_bos(json: &Value) -> Option<&str> {
    let post = &json["post_processor"];
    let processors: Vec<&Value> = match post["type"].as_str() {
        Some("Sequence") => post["processors"].as_array()?.iter().collect(),
        _ => vec![post],
    };
    processors
        .into_iter()
        .find(|p| p["type"] == "TemplateProcessing")?["single"]
        .as_array()?
        .first()?["SpecialToken"]["id"]
        .as_str()
}

/// The name llama.cpp gives a byte-level pre-tokenizer (it recognises them by name).
fn pre_tokenizer_name(pre: &Value) -> Option<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let steps: Vec<&Value> = match pre["type"].as_str()? {
        "Sequence" => pre["pretokenizers"].as_array()?.iter().collect(),
        _ => vec![pre],
    };
    let kinds: Vec<&str> = steps.iter().filter_map(|s| s["type"].as_str()).collect();
    match kinds.as_slice() {
        ["ByteLevel"] if steps[0]["use_regex"] != false => Some("gpt-2"),
        ["Digits", "ByteLevel"] if steps[0]["individual_digits"] == true => Some("smollm"),
        ["Split", "ByteLevel"] => match steps[0]["pattern"]["Regex"].as_str()? {
            LLAMA3 => Some("llama-bpe"),
            QWEN2 => Some("qwen2"),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn byte_pieces_are_recognised() {
        assert!(is_byte_token("<0x0A>"));
        assert!(is_byte_token("<0xff>"));
        assert!(!is_byte_token("<0xZZ>"));
        assert!(!is_byte_token("<s>"));
    }

    #[test]
    fn space_prefix_comes_from_the_normalizer_or_the_metaspace() {
        let llama2 = json!({"normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u{2581}"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}]}});
        let metaspace = json!({"normalizer": null, "pre_tokenizer": {"type": "Metaspace",
            "replacement": "\u{2581}", "prepend_scheme": "first", "split": false}});
        let gemma = json!({"normalizer": {"type": "Replace", "pattern": {"String": " "},
            "content": "\u{2581}"}, "pre_tokenizer": null});
        assert!(adds_space_prefix(&llama2));
        assert!(adds_space_prefix(&metaspace));
        assert!(!adds_space_prefix(&gemma));
    }

    #[test]
    fn bos_is_what_the_template_puts_first() {
        let llama2 = json!({"post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}]}});
        let none = json!({"post_processor": {"type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}]}});
        assert_eq!(template_bos(&llama2), Some("<s>"));
        assert_eq!(template_bos(&none), None);
        assert_eq!(template_bos(&json!({"post_processor": null})), None);
    }

    #[test]
    fn merges_read_in_both_layouts() {
        let old = json!({"merges": ["\u{2581} t", "h e"]});
        let new = json!({"merges": [["\u{2581}", "t"], ["h", "e"]]});
        assert_eq!(merges(&old), merges(&new));
        assert_eq!(merges(&old)[1], ("h".to_string(), "e".to_string()));
    }
}
