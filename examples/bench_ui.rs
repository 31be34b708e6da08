//! Web UI benchmark: generates a store of N runs x 10 steps (10 artifacts per run, so
//! 100,000 artifacts at the default 10,000 runs) through the store's own record API,
//! serves it with `cairn ui`'s router on 127.0.0.1, and times the requests behind the runs
//! list page and an artifact page (time to first byte and full response, p50/p95 of 30).
//!
//!   cargo run --release --example bench_ui -- [--runs 10000]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use cairn::store::{
    Access, ArtifactRecord, InputRef, ObjectDigest, OutputRef, RunRecord, StepRecord, StepStatus,
    StepWrite, Store,
};
use serde_json::json;

const STEPS: [&str; 10] = [
    "crawl", "ingest", "clean", "chunk", "embed", "load", "qa", "chat", "generate", "merge",
];

fn digest(run: usize, step: usize) -> ObjectDigest {
    ObjectDigest::from(blake3::hash(format!("{run}/{step}").as_bytes()))
}

fn main() -> anyhow::Result<()> {
    let mut runs = 10_000usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = args.next().and_then(|v| v.parse().ok()).expect("--runs N"),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path(), Access::Shared)?;
    // A real documents object for the artifact page's preview.
    let staged = store.root().join("tmp").join("bench-docs.jsonl");
    std::fs::create_dir_all(staged.parent().unwrap())?;
    let lines: Vec<String> = (0..1000)
        .map(|i| json!({"id": format!("d{i}"), "url": format!("https://blog.example/{i}"), "category": "article", "content": "Bread and bikes. ".repeat(40), "fetched_at": "2026-01-01T00:00:00Z"}).to_string())
        .collect();
    std::fs::write(&staged, lines.join("\n") + "\n")?;
    let docs = store.commit(&staged)?;
    let mid = runs / 2;

    let t0 = Instant::now();
    for r in 0..runs {
        let id = format!("2026{:06}-{:06}-{:06x}", r / 100_000, r % 100_000, r);
        let started = format!(
            "2026-01-{:02}T{:02}:{:02}:00Z",
            1 + r / 1440 % 28,
            r / 60 % 24,
            r % 60
        );
        store.db().insert_run(&RunRecord {
            id: id.clone(),
            pipeline: format!("pipeline_{}", r % 7),
            pipeline_file: "pipelines/x.yaml".into(),
            status: cairn::store::RunStatus::Running,
            started_at: started.clone(),
            finished_at: None,
            pid: 1,
            args: json!({}),
        })?;
        let mut records = Vec::new();
        let mut artifacts = Vec::new();
        for (s, name) in STEPS.iter().enumerate() {
            let out = if r == mid && s == 2 {
                docs.digest
            } else {
                digest(r, s)
            };
            let mut inputs = BTreeMap::new();
            if s > 0 {
                let prev = if r == mid && s == 3 {
                    docs.digest
                } else {
                    digest(r, s - 1)
                };
                inputs.insert(
                    "input".to_string(),
                    InputRef {
                        digest: prev,
                        from: format!("{}.out", STEPS[s - 1]),
                    },
                );
            }
            records.push(StepRecord {
                run_id: id.clone(),
                step: name.to_string(),
                kind: "command".into(),
                version: "1".into(),
                status: if s % 3 == 0 {
                    StepStatus::Cached
                } else {
                    StepStatus::Ran
                },
                reason: "param size changed 500 -> 400".into(),
                cache_key: Some(cairn::store::CacheKey::from(blake3::hash(
                    format!("key{r}{s}").as_bytes(),
                ))),
                duration_ms: 10 + s as u64,
                started_at: started.clone(),
                params: json!({"size": 400, "run": "python step.py"}),
                param_refs: BTreeMap::new(),
                inputs,
                outputs: BTreeMap::from([(
                    "out".to_string(),
                    OutputRef {
                        digest: out,
                        kind: "documents".into(),
                    },
                )]),
                error: None,
                log: None,
            });
            artifacts.push(ArtifactRecord {
                digest: out,
                kind: if r == mid && s == 2 {
                    "documents".into()
                } else {
                    ["documents", "chunks", "embeddings", "dataset", "file"][s % 5].into()
                },
                is_dir: false,
                size: if r == mid && s == 2 {
                    docs.size
                } else {
                    1000 + s as u64
                },
                created_at: started.clone(),
                producer_run: id.clone(),
                producer_step: name.to_string(),
                output: "out".into(),
                pipeline: format!("pipeline_{}", r % 7),
                metadata: json!({"count": 1000, "by_category": {"article": 600, "post": 400}}),
            });
        }
        let writes: Vec<StepWrite> = records
            .iter()
            .enumerate()
            .map(|(i, rec)| StepWrite {
                record: rec,
                seq: i,
                artifacts: std::slice::from_ref(&artifacts[i]),
                cache: None,
                index_io: true,
                latest_in: None,
            })
            .collect();
        store.db().write_steps(&writes, &[])?;
        store
            .db()
            .finish_run(&id, cairn::store::RunStatus::Succeeded, &started)?;
    }
    eprintln!(
        "generated {runs} runs / {} artifacts in {:.1} s",
        runs * STEPS.len(),
        t0.elapsed().as_secs_f64()
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = cairn::ui::router(Arc::new(cairn::ui::UiState {
            store: Arc::new(store),
            serve_url: "http://127.0.0.1:8000".into(),
        }));
        tokio::spawn(async move { axum::serve(listener, app).await });
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::new();
        let base = format!("http://{addr}");
        let art = docs.digest.to_hex();
        let pages: [(&str, Vec<String>); 4] = [
            (
                "runs list page",
                vec![
                    "/".into(),
                    "/assets/app.js".into(),
                    "/api/runs?limit=50".into(),
                ],
            ),
            (
                "runs list, page 100, filtered",
                vec!["/api/runs?limit=50&offset=5000&status=succeeded".into()],
            ),
            (
                "artifacts search",
                vec![
                    "/api/artifacts?limit=50".into(),
                    "/api/artifacts?kind=chunks&limit=50&offset=5000".into(),
                    "/api/artifacts?step=embed&pipeline=pipeline_3&limit=50".into(),
                    format!("/api/artifacts?digest={}", &art[..8]),
                ],
            ),
            (
                "artifact page",
                vec![
                    format!("/api/artifacts/{art}"),
                    format!("/api/artifacts/{art}/lineage"),
                    format!("/api/artifacts/{art}/files"),
                    format!("/api/artifacts/{art}/preview?limit=20"),
                ],
            ),
        ];
        println!(
            "\n{:<32} {:<44} {:>9} {:>9} {:>9} {:>9}",
            "page", "request", "ttfb p50", "ttfb p95", "full p50", "full p95"
        );
        for (page, urls) in pages.iter() {
            let mut page_total = Vec::new();
            for url in urls {
                let (mut ttfb, mut full) = (Vec::new(), Vec::new());
                for _ in 0..30 {
                    let t = Instant::now();
                    let resp = client.get(format!("{base}{url}")).send().await?;
                    assert!(resp.status().is_success(), "{url}: {}", resp.status());
                    ttfb.push(t.elapsed().as_secs_f64() * 1000.0);
                    let _ = resp.bytes().await?;
                    full.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                let pct = |v: &mut Vec<f64>, p: f64| {
                    v.sort_by(f64::total_cmp);
                    v[((v.len() - 1) as f64 * p) as usize]
                };
                let (t50, t95, f50, f95) = (
                    pct(&mut ttfb, 0.5),
                    pct(&mut ttfb, 0.95),
                    pct(&mut full, 0.5),
                    pct(&mut full, 0.95),
                );
                page_total.push(f50);
                let shown: String = url.replace(&art, "{id}").chars().take(44).collect();
                println!(
                    "{page:<32} {shown:<44} {t50:>7.2}ms {t95:>7.2}ms {f50:>7.2}ms {f95:>7.2}ms"
                );
            }
            println!(
                "{page:<32} {:<44} {:>39.2}ms",
                "(all requests, sequential, p50 sum)",
                page_total.iter().sum::<f64>()
            );
        }
        anyhow::Ok(())
    })?;
    Ok(())
}
