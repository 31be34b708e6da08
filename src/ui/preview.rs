//! Previews by artifact kind and the two-artifact diff, for the API and the pages.
//!
//! Record-style kinds (documents, chunks, datasets, any `.jsonl` file) are paged without
//! reading the whole file; embeddings get count/dim/model and a 2-D PCA projection of a
//! sample (power iteration on the covariance: two components are all a scatter needs).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::store::ArtifactRecord;

/// JSON files of a folder artifact shown whole on its page (a model's `config.json`, a
/// report's `metrics.json`), by preview key.
pub const SHOWN_JSON: [(&str, &str); 2] = [("config", "config.json"), ("metrics", "metrics.json")];

/// Points projected for the embeddings scatter.
pub const PCA_SAMPLE: usize = 2000;

/// The JSONL files that hold an artifact's records, in order, or none.
pub fn record_files(a: &ArtifactRecord, object: &Path) -> Vec<(String, PathBuf)> {
    if a.kind == crate::dataset::KIND {
        return [crate::dataset::TRAIN_FILE, crate::dataset::TEST_FILE]
            .iter()
            .map(|f| (f.trim_end_matches(".jsonl").to_string(), object.join(f)))
            .collect();
    }
    if a.kind == crate::embed::KIND {
        return vec![("chunks".into(), object.join(crate::embed::CHUNKS_FILE))];
    }
    // Evaluation reports and other folders keep their records in samples.jsonl.
    if a.is_dir && object.join("samples.jsonl").is_file() {
        return vec![("samples".into(), object.join("samples.jsonl"))];
    }
    if !a.is_dir && looks_like_jsonl(object) {
        return vec![(a.kind.clone(), object.to_path_buf())];
    }
    Vec::new()
}

fn looks_like_jsonl(path: &Path) -> bool {
    let Ok(f) = std::fs::File::open(path) else {
        return false;
    };
    let mut first = String::new();
    if BufReader::new(f).read_line(&mut first).is_err() {
        return false;
    }
    serde_json::from_str::<Value>(first.trim()).is_ok_and(|v| v.is_object())
}

/// Long text fields cut to a snippet so pages stay light.
fn trim_record(mut v: Value, max_chars: usize) -> Value {
    if let Some(o) = v.as_object_mut() {
        for (_, field) in o.iter_mut() {
            if let Value::String(s) = field {
                if s.chars().count() > max_chars {
                    *s = format!("{}…", s.chars().take(max_chars).collect::<String>());
                }
            }
        }
    }
    v
}

/// Records `offset..offset+limit` across `files` (each record tagged with its part).
pub fn records(
    files: &[(String, PathBuf)],
    offset: usize,
    limit: usize,
    max_chars: usize,
) -> (Vec<Value>, bool) {
    let mut out = Vec::new();
    let mut index = 0usize;
    for (part, path) in files {
        let Ok(f) = std::fs::File::open(path) else {
            continue;
        };
        for line in BufReader::new(f).lines() {
            let Ok(line) = line else { break };
            if line.trim().is_empty() {
                continue;
            }
            if index >= offset {
                if out.len() == limit {
                    return (out, true);
                }
                let record = serde_json::from_str::<Value>(&line).unwrap_or(Value::String(line));
                out.push(json!({"part": part, "index": index, "record": crate::redact::redact(&trim_record(record, max_chars))}));
            }
            index += 1;
        }
    }
    (out, false)
}

/// A 2-D PCA projection of up to [`PCA_SAMPLE`] evenly spaced rows.
pub fn pca_2d(rows: usize, dim: usize, data: &[f32]) -> Vec<[f32; 2]> {
    if rows == 0 || dim == 0 {
        return Vec::new();
    }
    let step = rows.div_ceil(PCA_SAMPLE).max(1);
    let picked: Vec<&[f32]> = (0..rows)
        .step_by(step)
        .map(|i| &data[i * dim..(i + 1) * dim])
        .collect();
    let n = picked.len() as f32;
    let mut mean = vec![0f32; dim];
    for r in &picked {
        for (m, x) in mean.iter_mut().zip(*r) {
            *m += x / n;
        }
    }
    let centered: Vec<Vec<f32>> = picked
        .iter()
        .map(|r| r.iter().zip(&mean).map(|(x, m)| x - m).collect())
        .collect();
    // Covariance-vector product without forming the dim x dim matrix: C v = X^T (X v) / n.
    let cov_mul = |v: &[f32]| -> Vec<f32> {
        let xv: Vec<f32> = centered
            .iter()
            .map(|r| r.iter().zip(v).map(|(a, b)| a * b).sum())
            .collect();
        let mut out = vec![0f32; dim];
        for (r, s) in centered.iter().zip(&xv) {
            for (o, x) in out.iter_mut().zip(r) {
                *o += x * s / n;
            }
        }
        out
    };
    let normalize = |v: &mut Vec<f32>| {
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        v.iter_mut().for_each(|x| *x /= norm);
    };
    let mut components: Vec<Vec<f32>> = Vec::new();
    for c in 0..2 {
        let mut v: Vec<f32> = (0..dim)
            .map(|i| (((i * 7 + c * 13) % 11) as f32) - 5.0)
            .collect();
        normalize(&mut v);
        for _ in 0..60 {
            let mut next = cov_mul(&v);
            for prev in &components {
                let d: f32 = next.iter().zip(prev).map(|(a, b)| a * b).sum();
                next.iter_mut().zip(prev).for_each(|(x, p)| *x -= d * p);
            }
            normalize(&mut next);
            v = next;
        }
        components.push(v);
    }
    centered
        .iter()
        .map(|r| {
            let p = |c: &Vec<f32>| r.iter().zip(c).map(|(a, b)| a * b).sum::<f32>();
            [p(&components[0]), p(&components[1])]
        })
        .collect()
}

/// Preview of an embeddings artifact: shape, model, and the projection.
pub fn embeddings(a: &ArtifactRecord, object: &Path) -> Result<Value, String> {
    let (rows, dim, data) = crate::embed::read_tensor(&object.join(crate::embed::TENSOR_FILE))?;
    let points = pca_2d(rows, dim, &data);
    Ok(json!({
        "count": rows, "dim": dim,
        "model": a.metadata.get("model"),
        "projection": {"method": "PCA (2 components)", "sampled": points.len(), "points": points},
    }))
}

/// [`crate::store::diff::compare`] as the API serves it: secrets masked, changed lines
/// sampled.
pub fn diff(a: &ArtifactRecord, pa: &Path, b: &ArtifactRecord, pb: &Path) -> Result<Value, String> {
    use crate::redact::{redact, redact_str};
    let d = crate::store::diff::compare(a, pa, b, pb).map_err(|e| e.to_string())?;
    let pairs = |changes: &[crate::store::diff::Change]| -> BTreeMap<String, Value> {
        changes
            .iter()
            .map(|c| {
                (
                    c.name.clone(),
                    json!({"a": redact(&c.a), "b": redact(&c.b)}),
                )
            })
            .collect()
    };
    let content: Vec<Value> = d
        .content
        .iter()
        .map(|c| {
            let mut e = json!({"path": c.path, "change": c.change});
            if let Some(l) = &c.lines {
                e["lines_added"] = json!(l.added);
                e["lines_removed"] = json!(l.removed);
                let sample: Vec<String> = l
                    .changed
                    .iter()
                    .take(20)
                    .map(|line| redact_str(&line.chars().take(200).collect::<String>()))
                    .collect();
                e["sample"] = json!(sample);
            }
            e
        })
        .collect();
    Ok(json!({
        "a": a.digest.to_hex(), "b": b.digest.to_hex(),
        "identical": d.identical,
        "same_kind": a.kind == b.kind,
        "fields": pairs(&d.fields), "metadata": pairs(&d.metadata), "content": content,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pca_finds_the_dominant_directions() {
        // Points along (1, 1, 0) with a little spread along (0, 0, 1).
        let mut data = Vec::new();
        for i in 0..200 {
            let t = i as f32 / 10.0 - 10.0;
            let s = if i % 2 == 0 { 0.1 } else { -0.1 };
            data.extend([t, t, s]);
        }
        let pts = pca_2d(200, 3, &data);
        assert_eq!(pts.len(), 200);
        let spread = |k: usize| pts.iter().map(|p| p[k] * p[k]).sum::<f32>() / 200.0;
        assert!(
            spread(0) > 60.0,
            "first component carries the line: {}",
            spread(0)
        );
        assert!(
            spread(1) < 0.02 && spread(1) > 0.005,
            "second is the small spread: {}",
            spread(1)
        );
    }
}
