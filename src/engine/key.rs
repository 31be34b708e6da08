//! Cache keys: blake3 over the canonical JSON of what determines a step's result.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::pipeline::ResolvedStep;
use crate::store::{CacheKey, ObjectDigest};

const DOMAIN: &[u8] = b"cairn-cache-v1\0";

/// JSON with object keys sorted at every level, so equal values hash equal.
pub fn canonical(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let sorted: BTreeMap<&String, Value> =
                map.iter().map(|(k, v)| (k, canonical(v))).collect();
            Value::Object(sorted.into_iter().map(|(k, v)| (k.clone(), v)).collect())
        }
        Value::Array(items) => Value::Array(items.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

/// The cache key of `step` given the digests of its inputs.
pub fn cache_key(step: &ResolvedStep, inputs: &BTreeMap<String, ObjectDigest>) -> CacheKey {
    let doc = json!({
        "kind": step.implementation.kind(),
        "version": step.version,
        "params": canonical(&step.params),
        "param_env": canonical(&serde_json::to_value(&step.param_env).unwrap_or(Value::Null)),
        "inputs": inputs.iter().map(|(k, d)| (k.clone(), Value::String(d.to_hex()))).collect::<serde_json::Map<_, _>>(),
        "outputs": step.outputs,
    });
    let mut hasher = blake3::Hasher::new();
    hasher.update(DOMAIN);
    hasher.update(canonical(&doc).to_string().as_bytes());
    hasher.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_sorts_keys_deeply() {
        let a = json!({"b": 1, "a": {"y": 2, "x": [ {"q": 1, "p": 2} ]}});
        assert_eq!(
            canonical(&a).to_string(),
            r#"{"a":{"x":[{"p":2,"q":1}],"y":2},"b":1}"#
        );
    }
}
