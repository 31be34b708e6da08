//! Secret redaction for anything cairn displays or serves: values under secret-looking
//! keys (`api_key`, `token`, `password`, `secret`, ...) and passwords inside URLs
//! (`mongodb://user:pass@host`) become `***`. Names of environment variables that hold a
//! key (`api_key_env: OPENAI_API_KEY`) are not secrets and stay.

use serde_json::Value;

/// The replacement text.
pub const MASK: &str = "***";

fn secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    if k.ends_with("_env") {
        return false;
    }
    // `token` alone or as a suffix (`access_token`), not counts like `prompt_tokens`.
    k == "token"
        || k.ends_with("_token")
        // An Azure SAS token's signature (`...&sig=...`).
        || k == "sig"
        || [
            "api_key",
            "apikey",
            "access_key",
            "account_key",
            "sas_key",
            "private_key",
            "service_account_key",
            "password",
            "passwd",
            "secret",
            "authorization",
            "credential",
        ]
        .iter()
        .any(|s| k.contains(s))
}

static USERINFO: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
    regex::Regex::new(r"([A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]+:)[^@\s/]+@").expect("valid regex")
});

/// `text` with URL passwords masked wherever they appear (`mongodb://u:PASS@h` inside a
/// command line too); a whole-string URL also gets `key`/`token`-like query values masked.
pub fn redact_str(text: &str) -> String {
    let text = USERINFO.replace_all(text, format!("${{1}}{MASK}@").as_str());
    let Ok(mut url) = url::Url::parse(&text) else {
        return text.into_owned();
    };
    if url.cannot_be_a_base() {
        return text.into_owned();
    }
    let mut changed = false;
    if url.query().is_some() {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| {
                if secret_key(&k) || k.eq_ignore_ascii_case("key") {
                    changed = true;
                    (k.into_owned(), MASK.to_string())
                } else {
                    (k.into_owned(), v.into_owned())
                }
            })
            .collect();
        if changed {
            url.query_pairs_mut().clear().extend_pairs(pairs);
        }
    }
    if changed {
        url.to_string()
    } else {
        text.into_owned()
    }
}

/// API keys and tokens in their vendors' formats (AWS, GitHub, Slack, OpenAI, Anthropic,
/// Stripe, Google, Hugging Face, JWTs, PEM private keys). `clean`'s PII scrubbing uses the
/// same list; ASCII word boundaries as in its other patterns (the Unicode ones cost
/// throughput).
pub static KEY_FORMATS: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
    regex::Regex::new(concat!(
        r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----",
        r"|(?-u:\b)(?:AKIA|ASIA)[0-9A-Z]{16}(?-u:\b)", // AWS access key id
        r"|(?-u:\b)gh[pousr]_[A-Za-z0-9]{36,}(?-u:\b)", // GitHub
        r"|(?-u:\b)github_pat_[A-Za-z0-9_]{40,}(?-u:\b)",
        r"|(?-u:\b)xox[abposr]-[A-Za-z0-9-]{10,}(?-u:\b)", // Slack
        r"|(?-u:\b)sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}(?-u:\b)", // OpenAI, Anthropic
        r"|(?-u:\b)(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}(?-u:\b)", // Stripe
        r"|(?-u:\b)AIza[0-9A-Za-z_-]{35}(?-u:\b)",         // Google
        r"|(?-u:\b)hf_[A-Za-z0-9]{30,}(?-u:\b)",           // Hugging Face
        r"|(?-u:\b)eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}", // JWT
    ))
    .expect("valid regex")
});

static ASSIGNMENT: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
    regex::Regex::new(r#"(?-u:\b)([A-Za-z_][A-Za-z0-9_-]*)\s*[=:]\s*"?"#).expect("valid regex")
});

/// Free text (an error message, a log line) with secrets masked: URL passwords,
/// `NAME=value` / `NAME: value` where NAME looks secret (`token`, `api_key`, ...), and keys
/// in known vendor formats wherever they appear.
pub fn redact_text(text: &str) -> String {
    let text = redact_str(text);
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    for c in ASSIGNMENT.captures_iter(&text) {
        let (Some(all), Some(name)) = (c.get(0), c.get(1)) else {
            continue;
        };
        if all.start() < copied || !secret_key(name.as_str()) {
            continue;
        }
        let value_end = text[all.end()..]
            .find(|ch: char| ch.is_whitespace() || "\"',;&".contains(ch))
            .map_or(text.len(), |i| all.end() + i);
        if value_end == all.end() {
            continue;
        }
        out.push_str(&text[copied..all.end()]);
        out.push_str(MASK);
        copied = value_end;
    }
    out.push_str(&text[copied..]);
    KEY_FORMATS.replace_all(&out, MASK).into_owned()
}

/// As [`redact`], also masking secrets inside free text (`api_key=...`, keys in vendor
/// formats): for prompts and answers, where people paste anything.
pub fn redact_free_text(value: &Value) -> Value {
    match redact(value) {
        Value::String(s) => Value::String(redact_text(&s)),
        Value::Array(items) => Value::Array(items.iter().map(redact_free_text).collect()),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (k, redact_free_text(&v)))
                .collect(),
        ),
        other => other,
    }
}

/// `value` with every secret masked, recursively.
pub fn redact(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let v = if secret_key(k) && !v.is_null() {
                        Value::String(MASK.into())
                    } else {
                        redact(v)
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(redact).collect()),
        Value::String(s) => Value::String(redact_str(s)),
        other => other.clone(),
    }
}

/// Whether [`redact`] would mask anything in `value`, without building the masked copy.
pub fn contains_secret(value: &Value) -> bool {
    match value {
        Value::Object(map) => map.iter().any(|(k, v)| entry_is_secret(k, v)),
        Value::Array(items) => items.iter().any(contains_secret),
        Value::String(s) => redact_str(s) != *s,
        _ => false,
    }
}

/// Whether [`redact`] would mask something in the entry `key: value` of an object.
pub fn entry_is_secret(key: &str, value: &Value) -> bool {
    (secret_key(key) && !value.is_null()) || contains_secret(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn free_text_loses_keys_and_secret_assignments() {
        let text = "exit 3; stderr: token=abc123 max_tokens=100 OPENAI_API_KEY: \"sk-abcdefghijklmnopqrstuvwxyz\" used ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789 at mongodb://u:pw@h/db";
        assert_eq!(
            redact_text(text),
            "exit 3; stderr: token=*** max_tokens=100 OPENAI_API_KEY: \"***\" used *** at mongodb://u:***@h/db"
        );
    }

    #[test]
    fn contains_secret_agrees_with_redact() {
        for value in [
            json!({"api_key": "sk-1"}),
            json!({"api_key": null, "n": 1}),
            json!({"nested": [{"uri": "mongodb://u:pw@h/db"}]}),
            json!({"run": "echo hello", "tokens": 3, "api_key_env": "OPENAI_API_KEY"}),
            json!(["https://example.org/feed?key=abc"]),
            json!("plain"),
        ] {
            assert_eq!(contains_secret(&value), redact(&value) != value, "{value}");
        }
    }

    #[test]
    fn masks_secret_keys_and_url_passwords_but_not_env_names() {
        let params = json!({
            "uri": "mongodb://admin:hunter2@db.example:27017/cairn?authSource=admin",
            "llm": {"api_key": "sk-live-123", "api_key_env": "OPENAI_API_KEY", "base_url": "https://api.openai.com/v1"},
            "links": ["https://user:pw@example.org/feed?key=abc&page=2", "plain text"],
            "run": "mysqldump --uri mysql://root:toor@127.0.0.1/db > out.sql",
            "password": null,
            "size": 250,
            "usage": {"prompt_tokens": 12, "max_tokens": 100, "access_token": "at-1"},
        });
        let r = redact(&params);
        let text = r.to_string();
        assert_eq!(
            r["run"],
            "mysqldump --uri mysql://root:***@127.0.0.1/db > out.sql"
        );
        for secret in ["hunter2", "sk-live-123", ":pw@", "key=abc", "toor"] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
        assert_eq!(
            r["uri"],
            "mongodb://admin:***@db.example:27017/cairn?authSource=admin"
        );
        assert_eq!(r["llm"]["api_key_env"], "OPENAI_API_KEY");
        assert_eq!(r["llm"]["base_url"], "https://api.openai.com/v1");
        assert_eq!(r["links"][1], "plain text");
        assert!(r["links"][0].as_str().unwrap().contains("page=2"));
        assert_eq!(r["password"], Value::Null);
        assert_eq!(r["size"], 250);
        assert_eq!(r["usage"]["prompt_tokens"], 12);
        assert_eq!(r["usage"]["max_tokens"], 100);
        assert_eq!(r["usage"]["access_token"], MASK);
    }

    #[test]
    fn masks_cloud_storage_keys_but_not_cache_keys() {
        let options = json!({
            "azure_storage_account_key": "Eby8vdM02xNOcq==",
            "azure_storage_sas_key": "sv=2024&sig=abc%2Fdef",
            "google_service_account_key": "{\"private_key\": \"k\"}",
            "aws_secret_access_key": "s3cr3t",
            "azure_storage_account_name": "devstoreaccount1",
            "cache_key": "ab12",
        });
        let r = redact(&options);
        for key in [
            "azure_storage_account_key",
            "azure_storage_sas_key",
            "google_service_account_key",
            "aws_secret_access_key",
        ] {
            assert_eq!(r[key], MASK, "{key}");
        }
        assert_eq!(r["azure_storage_account_name"], "devstoreaccount1");
        assert_eq!(r["cache_key"], "ab12");
        // A SAS signature inside an error message's URL.
        let text =
            redact_text("GET https://a.blob.core.windows.net/c/o?sv=2024&sig=abc%2Fdef failed");
        assert!(!text.contains("abc%2Fdef"), "{text}");
        assert!(text.contains("sv=2024"), "{text}");
    }
}
