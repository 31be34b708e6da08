//! Cache keys: blake3 over the canonical JSON of what determines a step's result.

use std::collections::BTreeMap;

use serde_json::Value;

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

/// The cache key of `step` given the digests of its inputs: kind, version, canonical
/// params, exported params, input digests and declared outputs, each length-prefixed so
/// no two different combinations can produce the same byte stream.
pub fn cache_key(step: &ResolvedStep, inputs: &BTreeMap<String, ObjectDigest>) -> CacheKey {
    fn field(hasher: &mut blake3::Hasher, bytes: &[u8]) {
        hasher.update(&(bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    }
    let mut hasher = blake3::Hasher::new();
    hasher.update(DOMAIN);
    field(&mut hasher, step.implementation.kind().as_bytes());
    field(&mut hasher, step.version.as_bytes());
    field(&mut hasher, canonical(&step.params).to_string().as_bytes());
    hasher.update(&(step.param_env.len() as u64).to_le_bytes());
    for (name, value) in &step.param_env {
        field(&mut hasher, name.as_bytes());
        field(&mut hasher, canonical(value).to_string().as_bytes());
    }
    hasher.update(&(inputs.len() as u64).to_le_bytes());
    for (name, digest) in inputs {
        field(&mut hasher, name.as_bytes());
        hasher.update(digest.as_bytes());
    }
    let outputs: BTreeMap<&String, &String> = step.outputs.iter().collect();
    hasher.update(&(outputs.len() as u64).to_le_bytes());
    for (name, kind) in outputs {
        field(&mut hasher, name.as_bytes());
        field(&mut hasher, kind.as_bytes());
    }
    hasher.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    use serde_json::json;

    #[test]
    fn canonical_sorts_keys_deeply() {
        let a = json!({"b": 1, "a": {"y": 2, "x": [ {"q": 1, "p": 2} ]}});
        assert_eq!(
            canonical(&a).to_string(),
            r#"{"a":{"x":[{"p":2,"q":1}],"y":2},"b":1}"#
        );
    }
}
