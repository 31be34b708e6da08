//! Parity of cairn's tch BERT encoder with sentence-transformers (the reference stack in
//! the project venv, installed by `scripts/setup --test`) on 239 real sentences from the
//! Python tutorial, including paragraphs past the 256-token limit: every vector must have
//! cosine >= 0.9999 with its reference.
#![cfg(feature = "torch")]

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn model_dir() -> PathBuf {
    let dir = root().join(".models/all-MiniLM-L6-v2");
    assert!(
        dir.join("model.safetensors").exists(),
        "{} is missing: run `scripts/setup --test` first",
        dir.display()
    );
    dir
}

fn reference(model: &Path, sentences: &Path, out: &Path) {
    let python = root().join(".venv/bin/python");
    let status = Command::new(&python)
        .arg(root().join("tests/parity/embed_reference.py"))
        .args([model, sentences, out])
        .arg("2")
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run `scripts/setup --test` first",
                python.display()
            )
        });
    assert!(
        status.success(),
        "the reference script failed ({status}); `scripts/setup --test` installs sentence-transformers into .venv"
    );
}

#[test]
fn embeddings_match_sentence_transformers() {
    let model = model_dir();
    let sentences_path = root().join("tests/fixtures/embed/sentences.txt");
    let text = std::fs::read_to_string(&sentences_path).unwrap();
    let sentences: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    assert!(sentences.len() >= 200);

    // cairn's side: the real helper binary, as the embed step runs it.
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("sentences.jsonl");
    let lines: Vec<String> = sentences
        .iter()
        .map(|s| serde_json::json!({"text": s}).to_string())
        .collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let ours_path = tmp.path().join("ours.safetensors");
    let out = Command::new(env!("CARGO_BIN_EXE_cairn-torch"))
        .args([
            "embed",
            "--device",
            "cpu",
            "--precision",
            "f32",
            "--threads",
            "2",
        ])
        // Batches of 7 mix lengths differently from the reference's 32, which must not matter.
        .args(["--batch-size", "7"])
        .arg("--model")
        .arg(&model)
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&ours_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events = String::from_utf8_lossy(&out.stdout);
    assert!(
        events
            .lines()
            .next()
            .unwrap()
            .contains("\"pooling\":\"mean\""),
        "{events}"
    );
    let (rows, dim, ours) = cairn::embed::read_tensor(&ours_path).unwrap();
    assert_eq!((rows, dim), (sentences.len(), 384));

    let reference_path = tmp.path().join("reference.f32");
    reference(&model, &sentences_path, &reference_path);
    let bytes = std::fs::read(&reference_path).unwrap();
    let theirs: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(theirs.len(), ours.len(), "row count or width differs");

    let mut worst = (f64::INFINITY, 0usize);
    let mut max_abs = 0f32;
    for i in 0..sentences.len() {
        let (a, b) = (
            &ours[i * dim..(i + 1) * dim],
            &theirs[i * dim..(i + 1) * dim],
        );
        let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
        let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let cos = dot / (na * nb);
        if cos < worst.0 {
            worst = (cos, i);
        }
        for (x, y) in a.iter().zip(b) {
            max_abs = max_abs.max((x - y).abs());
        }
    }
    println!(
        "{} sentences: min cosine {:.7} (line {}), max abs diff {max_abs:.2e}",
        sentences.len(),
        worst.0,
        worst.1 + 1
    );
    assert!(
        worst.0 >= 0.9999,
        "sentence {} ({:?}) has cosine {} with its reference",
        worst.1 + 1,
        sentences[worst.1],
        worst.0
    );
}
