//! Cache keys: blake3 over the canonical JSON of what determines a step's result.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::pipeline::ResolvedStep;
use crate::store::{CacheKey, ObjectDigest};

const DOMAIN: &[u8] = b"cairn-cache-v1\0";

/// Appends `value` as canonical JSON text to `out`: compact, object keys sorted at every
/// level, so equal values hash equal. Written straight out (no sorted copy of the value):
/// cache keys hash every step's parameters on every run.
pub fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, k).expect("JSON text writes to memory");
                out.push(b':');
                write_canonical(v, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        other => serde_json::to_writer(&mut *out, other).expect("JSON text writes to memory"),
    }
}

/// The cache key of `step` given the digests of its inputs: kind, version, canonical
/// params, exported params, input digests and declared outputs, each length-prefixed so
/// no two different combinations can produce the same byte stream.
pub fn cache_key(step: &ResolvedStep, inputs: &BTreeMap<String, ObjectDigest>) -> CacheKey {
    // One buffer hashed once: blake3 costs more per `update` call than per byte here.
    fn field(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        out.extend_from_slice(bytes);
    }
    fn json_field(out: &mut Vec<u8>, value: &Value) {
        let at = out.len();
        out.extend_from_slice(&[0; 8]);
        write_canonical(value, out);
        let len = (out.len() - at - 8) as u64;
        out[at..at + 8].copy_from_slice(&len.to_le_bytes());
    }
    let mut bytes = Vec::with_capacity(512);
    bytes.extend_from_slice(DOMAIN);
    field(&mut bytes, step.implementation.kind().as_bytes());
    field(&mut bytes, step.version.as_bytes());
    json_field(&mut bytes, &step.params);
    bytes.extend_from_slice(&(step.param_env.len() as u64).to_le_bytes());
    for (name, value) in &step.param_env {
        field(&mut bytes, name.as_bytes());
        json_field(&mut bytes, value);
    }
    bytes.extend_from_slice(&(inputs.len() as u64).to_le_bytes());
    for (name, digest) in inputs {
        field(&mut bytes, name.as_bytes());
        bytes.extend_from_slice(digest.as_bytes());
    }
    let outputs: BTreeMap<&String, &String> = step.outputs.iter().collect();
    bytes.extend_from_slice(&(outputs.len() as u64).to_le_bytes());
    for (name, kind) in outputs {
        field(&mut bytes, name.as_bytes());
        field(&mut bytes, kind.as_bytes());
    }
    blake3::hash(&bytes).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    use serde_json::json;

    /// The reference the writer must agree with: a copy with keys sorted at every level.
    fn canonical(value: &Value) -> Value {
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

    #[test]
    fn canonical_sorts_keys_deeply() {
        let a = json!({"b": 1, "a": {"y": 2, "x": [ {"q": 1, "p": 2} ]}});
        let mut written = Vec::new();
        write_canonical(&a, &mut written);
        assert_eq!(
            String::from_utf8(written).unwrap(),
            r#"{"a":{"x":[{"p":2,"q":1}],"y":2},"b":1}"#
        );
    }

    /// A changed key silently turns every user's cache into misses: this pins the bytes a
    /// key hashes (change it only with a reason to invalidate caches).
    #[test]
    fn cache_keys_stay_the_same_across_releases() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.yaml");
        std::fs::write(
            &file,
            r#"
name: pin
params: {greeting: hello}
steps:
  t:
    uses: command
    outputs: {out: file}
    with: {run: "echo t > ${outputs.out}"}
  s:
    uses: command
    inputs: {x: t.out}
    outputs: {out: file, log: dir}
    with: {run: "cat ${inputs.x} > ${outputs.out}; echo ${params.greeting}", env: {B: "2", A: "1"}}
"#,
        )
        .unwrap();
        let pipeline = crate::pipeline::load(&file, &[]).unwrap();
        let step = pipeline.steps.iter().find(|s| s.name == "s").unwrap();
        let inputs = [("x".to_string(), ObjectDigest::from(blake3::hash(b"input")))].into();
        assert_eq!(
            cache_key(step, &inputs).to_hex(),
            "81bb90df5656acad05d8d222eb19e548bde208a57518c1a557e6caf062853feb"
        );
    }

    #[test]
    fn written_canonical_json_is_the_canonical_values_text() {
        let values = [
            json!({"run": "echo \"hi\" > $out", "b": [3, 1.5, null, true], "a": {"z": "\u{e9}\n\u{1}", "y": {}}}),
            json!([{"b": 1, "a": 2}, [], "x", -7, 1e300]),
            json!("plain"),
            json!({}),
        ];
        for value in values {
            let mut written = Vec::new();
            write_canonical(&value, &mut written);
            assert_eq!(
                String::from_utf8(written).unwrap(),
                canonical(&value).to_string()
            );
        }
    }
}
