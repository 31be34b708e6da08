//! Stable pseudonyms for the people a twin talks to (`pseudonymize_speakers`): in chat
//! exports, every speaker but the twin (the document's `target_speaker`; without one,
//! every speaker) becomes `Contact-xxxx`, where `xxxx` comes from a digest of the
//! lowercased name, so one person gets the same pseudonym in every chat and every run.
//! The name is replaced wherever it stands as whole words: message headers, the text
//! (mentions), the title and the structured `messages`/`speakers` metadata that the
//! `chat_replies` builder reads. A multi-word name's first word (a first name used alone
//! in a mention) is replaced too.

use regex::Regex;
use serde_json::Value;

use crate::documents::Document;

/// The pseudonym of `name`.
pub fn pseudonym(name: &str) -> String {
    let digest = blake3::hash(name.trim().to_lowercase().as_bytes());
    format!("Contact-{}", &digest.to_hex()[..4])
}

/// Replaces the correspondents' names in `doc` (a chat with `speakers` metadata) and in
/// its cleaned `text`; returns how many speakers were renamed.
pub fn pseudonymize(doc: &mut Document, text: &mut String) -> usize {
    let Some(speakers) = doc.metadata.get("speakers").and_then(Value::as_array) else {
        return 0;
    };
    let target = doc
        .metadata
        .get("target_speaker")
        .and_then(Value::as_str)
        .map(str::to_string);
    let mut names: Vec<(String, String)> = speakers
        .iter()
        .filter_map(Value::as_str)
        .filter(|s| Some(*s) != target.as_deref())
        .map(|s| (s.to_string(), pseudonym(s)))
        .collect();
    if names.is_empty() {
        return 0;
    }
    let renamed = names.len();
    // First names alone, unless they are someone's whole name or the twin's.
    let firsts: Vec<(String, String)> = names
        .iter()
        .filter_map(|(full, p)| {
            let first = full.split_whitespace().next()?;
            (first != full && first.chars().count() >= 3).then(|| (first.to_string(), p.clone()))
        })
        .filter(|(first, _)| {
            target
                .as_deref()
                .is_none_or(|t| !t.split_whitespace().any(|w| w == first))
        })
        .collect();
    names.extend(firsts);
    // Longest first, so "Bob Smith" goes before "Bob".
    names.sort_by_key(|(n, _)| std::cmp::Reverse(n.chars().count()));
    let patterns: Vec<(Regex, String)> = names
        .iter()
        .filter_map(|(name, p)| {
            let re = Regex::new(&format!(r"\b{}\b", regex::escape(name))).ok()?;
            Some((re, p.clone()))
        })
        .collect();
    let replace = |s: &str| rename(s, &patterns);
    *text = rename(text, &patterns);
    doc.title = doc.title.as_deref().map(replace);
    for key in ["speakers", "messages"] {
        if let Some(v) = doc.metadata.get_mut(key) {
            *v = replace_strings(v, &replace);
        }
    }
    renamed
}

/// `s` with every pattern replaced by its pseudonym, in order.
fn rename(s: &str, patterns: &[(Regex, String)]) -> String {
    let mut out = s.to_string();
    for (re, p) in patterns {
        out = re.replace_all(&out, p.as_str()).into_owned();
    }
    out
}

fn replace_strings(v: &Value, replace: &dyn Fn(&str) -> String) -> Value {
    match v {
        Value::String(s) => Value::String(replace(s)),
        Value::Array(items) => {
            Value::Array(items.iter().map(|i| replace_strings(i, replace)).collect())
        }
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, x)| (k.clone(), replace_strings(x, replace)))
                .collect(),
        ),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudonyms_are_stable_and_ignore_case() {
        assert_eq!(pseudonym("Bob"), pseudonym(" bob "));
        assert_ne!(pseudonym("Bob"), pseudonym("Carol"));
        assert!(pseudonym("Bob").starts_with("Contact-"));
    }
}
