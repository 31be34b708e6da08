//! Parity of cairn's tch BERT encoder with sentence-transformers (the reference stack in
//! the project venv, installed by `scripts/setup --test`) on 239 real sentences from the
//! Python tutorial, including paragraphs past the 256-token limit: every vector must have
//! cosine >= 0.9999 with its reference.
#![cfg(feature = "torch")]

use std::path::{Path, PathBuf};
use std::process::Command;

use cairn::embed::{DeviceChoice, Embedder, Precision};

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

    let embedder = Embedder::load(&model, DeviceChoice::Cpu, Precision::F32, 2).unwrap();
    assert_eq!(embedder.info().dim, 384);
    assert!(embedder.info().normalize);
    // Batches of 7 mix lengths differently from the reference's 32, which must not matter.
    let ours = embedder.embed(&sentences, 7, &mut |_| true).unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("reference.f32");
    reference(&model, &sentences_path, &out);
    let bytes = std::fs::read(&out).unwrap();
    let theirs: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(theirs.len(), ours.len(), "row count or width differs");

    let dim = 384;
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
