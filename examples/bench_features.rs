//! Measurements for the feature-pipeline benchmark (`scripts/bench-features` drives it and
//! prints the table). Each subcommand prints one JSON object.
//!
//!   bench_features chunk DOCS.jsonl MODEL_DIR        cairn chunking vs raw encode_batch
//!   bench_features flops TEXTS.jsonl MODEL_DIR       tokens and BERT FLOPs of the texts
//!   bench_features vectors N                         Qdrant Edge upsert + query latency
//!   bench_features clean DOCS.jsonl                  `clean` throughput, without and with PII rules
//!   bench_features dedup N DIM                       `semantic_dedup` time for N random vectors

use std::path::Path;
use std::time::Instant;

use cairn::documents::{read_jsonl, Document};
use serde_json::json;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("chunk") => chunk(Path::new(&args[2]), Path::new(&args[3])),
        Some("flops") => flops(Path::new(&args[2]), Path::new(&args[3])),
        Some("vectors") => vectors(args[2].parse().unwrap()),
        Some("clean") => clean(Path::new(&args[2])),
        Some("dedup") => dedup(args[2].parse().unwrap(), args[3].parse().unwrap()),
        _ => {
            eprintln!("usage: see the header of examples/bench_features.rs");
            std::process::exit(2);
        }
    }
}

/// Seconds `semantic_dedup` takes over `n` random `dim`-wide vectors in one category,
/// every tenth a perturbed copy of an earlier one.
fn dedup(n: usize, dim: usize) {
    let mut state = 1u64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let mut vectors: Vec<f32> = Vec::with_capacity(n * dim);
    for i in 0..n {
        if i % 10 == 9 {
            let from = (i / 2) * dim;
            let copy: Vec<f32> = vectors[from..from + dim]
                .iter()
                .map(|x| x + 0.01 * next())
                .collect();
            vectors.extend(copy);
        } else {
            vectors.extend((0..dim).map(|_| next()));
        }
    }
    let group = vec![0usize; n];
    let (seconds, verdicts) = best_of(1, || {
        cairn::embed::dedup::near_duplicates(&vectors, dim, &group, 0.95, &|_| {})
    });
    let dropped = verdicts
        .iter()
        .filter(|v| !matches!(v, cairn::embed::dedup::Verdict::Kept))
        .count();
    println!(
        "{}",
        json!({"vectors": n, "dim": dim, "seconds": seconds, "dropped": dropped,
               "threads": rayon::current_num_threads()})
    );
}

fn best_of<T>(runs: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut best = f64::INFINITY;
    let mut last = None;
    for _ in 0..runs {
        let t0 = Instant::now();
        let out = f();
        best = best.min(t0.elapsed().as_secs_f64());
        last = Some(out);
    }
    (best, last.unwrap())
}

fn chunk(docs: &Path, model: &Path) {
    let docs: Vec<Document> = read_jsonl(docs).unwrap();
    let tokenizer = cairn::models::load_tokenizer(model).unwrap();
    let texts: Vec<&str> = docs.iter().map(|d| d.content.as_str()).collect();
    let (raw_s, tokens) = best_of(3, || {
        tokenizer
            .encode_batch(texts.clone(), false)
            .unwrap()
            .iter()
            .map(|e| e.get_ids().len())
            .sum::<usize>()
    });
    let params: cairn::steps::chunk::ChunkParams =
        serde_json::from_value(json!({"model": model, "size": 250, "overlap": 25})).unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let progress = cairn::steps::Progress::hidden();
    let (cairn_s, chunks) = best_of(3, || {
        cairn::steps::chunk::chunk_all(&tokenizer, &docs, &params, 254, &progress, &cancel).unwrap()
    });
    println!(
        "{}",
        json!({
            "documents": docs.len(),
            "tokens": tokens,
            "chunks": chunks.len(),
            "raw_encode_batch_s": raw_s,
            "cairn_chunk_s": cairn_s,
            "raw_tokens_per_s": tokens as f64 / raw_s,
            "cairn_tokens_per_s": tokens as f64 / cairn_s,
        })
    );
}

/// FLOPs of one MiniLM-L6 forward for a sequence of `s` tokens (linear layers +
/// attention; hidden 384, intermediate 1536, 6 layers).
fn bert_flops(s: f64) -> f64 {
    let (h, inter, layers) = (384.0, 1536.0, 6.0);
    layers * s * (8.0 * h * h + 4.0 * h * inter + 4.0 * s * h)
}

/// Tokens (with special tokens, truncated at 256) and forward FLOPs of a texts file, for
/// turning the helper's embedding time into GFLOP/s.
fn flops(texts: &Path, model: &Path) {
    #[derive(serde::Deserialize)]
    struct Line {
        text: String,
    }
    let lines: Vec<Line> = read_jsonl(texts).unwrap();
    let mut tokenizer = cairn::models::load_tokenizer(model).unwrap();
    let max = cairn::models::sentence_config(model)
        .unwrap()
        .max_seq_length;
    tokenizer
        .with_truncation(Some(tokenizers::TruncationParams {
            max_length: max,
            ..Default::default()
        }))
        .unwrap();
    let lens: Vec<usize> = lines
        .iter()
        .map(|l| {
            tokenizer
                .encode(l.text.as_str(), true)
                .unwrap()
                .get_ids()
                .len()
        })
        .collect();
    println!(
        "{}",
        json!({
            "sentences": lens.len(),
            "tokens": lens.iter().sum::<usize>(),
            "flops": lens.iter().map(|&s| bert_flops(s as f64)).sum::<f64>(),
        })
    );
}

fn vectors(n: usize) {
    use cairn::vectorstore::{self, Point};
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let tmp = tempfile::tempdir().unwrap();
        let store = vectorstore::open(None, tmp.path()).await.unwrap();
        let dim = 384;
        let make = |i: usize| {
            let seed = blake3::hash(&(i as u64).to_le_bytes());
            let mut xof = blake3::Hasher::new().update(seed.as_bytes()).finalize_xof();
            let mut bytes = vec![0u8; dim * 2];
            xof.fill(&mut bytes);
            bytes
                .chunks(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]) as f32 / 32768.0 - 1.0)
                .collect::<Vec<f32>>()
        };
        let points: Vec<Point> = (0..n)
            .map(|i| {
                let mut payload = serde_json::Map::new();
                payload.insert("text".into(), json!(format!("chunk {i} ").repeat(40)));
                payload.insert(
                    "category".into(),
                    json!(["article", "post", "repository"][i % 3]),
                );
                payload.insert("author".into(), json!("me"));
                payload.insert("url".into(), json!(format!("https://example.org/{i}")));
                Point {
                    id: vectorstore::point_id(&i.to_string()),
                    vector: make(i),
                    payload,
                }
            })
            .collect();
        store.ensure_collection("bench", dim).await.unwrap();
        let t0 = Instant::now();
        store.upsert("bench", points).await.unwrap();
        let upsert_s = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        store.finish("bench").await.unwrap();
        let index_s = t1.elapsed().as_secs_f64();
        let mut latencies = Vec::new();
        for q in 0..500 {
            let v = make(1_000_000 + q);
            let filter = if q % 2 == 0 {
                vec![]
            } else {
                vec![("category".to_string(), "post".to_string())]
            };
            let t = Instant::now();
            let hits = store.search("bench", v, 10, &filter).await.unwrap();
            latencies.push(t.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(hits.len(), 10);
        }
        latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
        println!(
            "{}",
            json!({
                "points": n,
                "upsert_s": upsert_s,
                "points_per_s": n as f64 / upsert_s,
                "optimize_s": index_s,
                "query_p50_ms": pct(0.5),
                "query_p99_ms": pct(0.99),
            })
        );
    });
}

/// MB/s of document text through `clean_documents` (all cores), with the default rules,
/// with every PII kind masked, and with that and Gopher's quality rules.
fn clean(docs: &Path) {
    use cairn::clean::pii::{PiiAction, PiiRules};
    use cairn::clean::{clean_documents, CleanOptions};
    let docs: Vec<Document> = read_jsonl(docs).unwrap();
    let bytes: usize = docs.iter().map(|d| d.content.len()).sum();
    let plain = CleanOptions::default();
    let pii = CleanOptions {
        pii: PiiRules::all(PiiAction::Mask),
        ..CleanOptions::default()
    };
    let pii_quality = CleanOptions {
        quality: cairn::clean::quality::QualityRules {
            preset: Some(cairn::clean::quality::Preset::Gopher),
            ..Default::default()
        }
        .resolved(),
        ..pii.clone()
    };
    let (t_plain, _) = best_of(3, || clean_documents(docs.clone(), &plain));
    let (t_pii, (_, report)) = best_of(3, || clean_documents(docs.clone(), &pii));
    let (t_quality, (quality_kept, _)) = best_of(3, || clean_documents(docs.clone(), &pii_quality));
    // What was found, to judge false positives by eye.
    let mut samples: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
    for kind in cairn::clean::pii::PiiKind::ALL {
        let list = samples.entry(kind.as_str()).or_default();
        for d in &docs {
            for (s, e) in cairn::clean::pii::find(kind, &d.content) {
                if list.len() < 6 {
                    list.push(d.content[s..e].to_string());
                }
            }
        }
    }
    println!(
        "{}",
        json!({"documents": docs.len(), "mb": bytes as f64 / 1e6,
               "mb_per_s": bytes as f64 / 1e6 / t_plain,
               "mb_per_s_pii": bytes as f64 / 1e6 / t_pii,
               "mb_per_s_pii_quality": bytes as f64 / 1e6 / t_quality,
               "kept_pii_quality": quality_kept.len(),
               "pii_found": report.pii_found, "samples": samples,
               "threads": rayon::current_num_threads()})
    );
}
