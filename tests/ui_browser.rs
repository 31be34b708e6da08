//! `cairn ui` in a real browser: Debian's headless Chromium driven over WebDriver
//! (chromedriver + fantoccini) on a store filled by real runs. Clicks from the runs list
//! to a run, to a step (its reason and effective parameters), to the step's output
//! artifact, to an upstream artifact in its lineage graph; saves a screenshot of each page
//! under target/ui-screenshots/. `.ci/run` installs `chromium` and `chromium-driver`.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::process::{installed_or_skip, LoopbackServer};
use common::{free_port, Project};
use fantoccini::{ClientBuilder, Locator};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

async fn wait_text(c: &fantoccini::Client, css: &str, needle: &str) -> String {
    for _ in 0..100 {
        if let Ok(e) = c.find(Locator::Css(css)).await {
            if let Ok(t) = e.text().await {
                if t.contains(needle) {
                    return t;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let body = c.source().await.unwrap_or_default();
    panic!(
        "`{css}` never showed `{needle}`; page:\n{}",
        &body[..body.len().min(3000)]
    );
}

async fn screenshot(c: &fantoccini::Client, name: &str) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("../ui-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    let png = c.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

/// Chromium under chromedriver: the driver process and a session.
async fn browser() -> (LoopbackServer, fantoccini::Client) {
    let port = free_port();
    let mut cmd = Command::new(CHROMEDRIVER);
    cmd.arg(format!("--port={port}"));
    let driver = LoopbackServer::on_port(cmd, port, Duration::from_secs(10));
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": CHROMIUM,
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--window-size=1400,1100"],
        }),
    );
    let mut client = None;
    for _ in 0..50 {
        match ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps.clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
        {
            Ok(c) => {
                client = Some(c);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let c = client.expect("chromedriver did not accept a session");
    (driver, c)
}

/// Whether the browser test can run here (CI must have Chromium).
fn have_chromium() -> bool {
    installed_or_skip(
        std::path::Path::new(CHROMEDRIVER).exists() && std::path::Path::new(CHROMIUM).exists(),
        &format!("{CHROMIUM} and {CHROMEDRIVER}"),
        "apt-get install chromium chromium-driver",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn click_from_a_run_to_a_step_to_its_artifact_to_the_lineage() {
    if !have_chromium() {
        return;
    }
    let p = Project::new();
    p.write("notes/a.md", "one two three four\n");
    p.write(
        "browse.yaml",
        "name: browse\nparams: {words: 3}\nsteps:\n  notes: {uses: source, with: {path: notes}}\n  \
         count:\n    uses: command\n    inputs: {notes: notes.data}\n    outputs: {counts: file}\n    \
         with: {run: \"wc -w ${inputs.notes}/a.md > ${outputs.counts}\"}\n  \
         tree:\n    uses: command\n    inputs: {counts: count.counts}\n    outputs: {dir: directory}\n    \
         with: {run: \"mkdir -p ${outputs.dir} && cp ${inputs.counts} ${outputs.dir}/counts.txt && echo ${params.words} > ${outputs.dir}/words.txt\"}\n",
    );
    assert_eq!(p.run("browse.yaml", &[]).code, 0);
    let second = p.run("browse.yaml", &["--set", "words=5"]);
    assert_eq!(second.code, 0);
    let run_id = second.json["run_id"].as_str().unwrap().to_string();
    let tree_out = second.output("tree", "dir");

    let (ui, _) = p.start_ui(&[]);
    let base = ui.url.clone();
    let (_driver, c) = browser().await;

    // Runs list -> the newest run.
    c.goto(&format!("{base}/#/runs")).await.unwrap();
    wait_text(&c, "main table", &run_id).await;
    screenshot(&c, "1-runs").await;
    c.find(Locator::LinkText(&run_id))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_text(&c, "main h1", &format!("Run {run_id}")).await;

    // The DAG: click the `tree` node; its reason and effective parameters appear.
    c.find(Locator::Css("svg .node[data-id='tree']"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let reason = wait_text(&c, "#step-reason", "param words changed 3 -> 5").await;
    assert_eq!(reason, "param words changed 3 -> 5");
    let params = wait_text(&c, "#step-params", "echo 5").await;
    assert!(params.contains("words.txt"), "{params}");
    // Nodes are coloured by status: `count` was cached, `tree` ran.
    let fill = |step: &'static str| {
        let c = c.clone();
        async move {
            c.find(Locator::Css(&format!("svg .node[data-id='{step}'] rect")))
                .await
                .unwrap()
                .attr("fill")
                .await
                .unwrap()
                .unwrap()
        }
    };
    assert_eq!(fill("count").await, "#3aa757", "cached colour");
    assert_eq!(fill("tree").await, "#2f7ed8", "ran colour");
    screenshot(&c, "2-run").await;

    // The step's output -> the artifact page.
    c.find(Locator::Css(&format!(
        "#step-detail a[href='#/artifacts/{tree_out}']"
    )))
    .await
    .unwrap()
    .click()
    .await
    .unwrap();
    wait_text(&c, "#record", &tree_out).await;
    let files = wait_text(&c, "main", "words.txt").await;
    assert!(files.contains("counts.txt"));
    screenshot(&c, "3-artifact").await;

    // Its lineage: the upstream `count.counts` node -> that artifact's page.
    let lineage = wait_text(&c, "#lineage", "count.counts").await;
    assert!(lineage.contains("notes.data"), "{lineage}");
    let count_out = second.output("count", "counts");
    c.find(Locator::Css(&format!(
        "#lineage .node[data-id='{count_out}']"
    )))
    .await
    .unwrap()
    .click()
    .await
    .unwrap();
    let record = wait_text(&c, "#record", &count_out).await;
    assert!(record.contains("count.counts"), "{record}");
    screenshot(&c, "4-lineage").await;

    // Training curves in metadata render as charts (a record written through the store
    // API in the shape finetune records its per-step curve).
    let model = add_model_record(&p);
    c.goto(&format!("{base}/#/artifacts/{model}"))
        .await
        .unwrap();
    wait_text(&c, "#curves", "curve: loss").await;
    let charts = c.find_all(Locator::Css("#curves svg.chart")).await.unwrap();
    assert_eq!(
        charts.len(),
        4,
        "loss, eval_loss, lr, DPO's preference.rewards/margins"
    );
    for series in ["curve.loss", "curve.preference.rewards/margins"] {
        let points = c
            .find(Locator::Css(&format!(
                "#curves svg[data-series='{series}'] polyline"
            )))
            .await
            .unwrap()
            .attr("points")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(points.split_whitespace().count(), 20, "{series}");
    }
    screenshot(&c, "5-curves").await;

    // A sweep's variants side by side: picked on the runs list, compared in a table with
    // their curves overlaid and a param plotted against a metric.
    let sweep_run = add_sweep_records(&p);
    c.goto(&format!("{base}/#/runs")).await.unwrap();
    wait_text(&c, "main table", &sweep_run).await;
    c.find(Locator::Css(&format!("input.pick[data-run='{sweep_run}']")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.find(Locator::Id("compare-selected"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let table = wait_text(&c, "#compare-table", "rank=8").await;
    assert!(
        table.contains("rank=4") && table.contains("train_loss"),
        "{table}"
    );
    let lines = c
        .find_all(Locator::Css("#overlays svg[data-series='loss'] polyline"))
        .await
        .unwrap();
    assert_eq!(lines.len(), 2, "one loss curve per variant");
    let dots = c
        .find_all(Locator::Css("#param-plot circle"))
        .await
        .unwrap();
    assert_eq!(dots.len(), 2, "rank against train_loss");
    screenshot(&c, "6-compare").await;

    c.close().await.unwrap();
}

/// A run with one `model` artifact whose metadata holds a 20-step training curve.
fn add_model_record(p: &Project) -> String {
    use serde_json::json;
    let curve: Vec<_> = (1..=20)
        .map(|s| {
            json!({"step": s, "loss": 3.0 / s as f64, "lr": 1e-4 * (s as f64 / 20.0),
            "preference": {"rewards/margins": 0.05 * s as f64}})
        })
        .chain((1..=4).map(|k| json!({"step": k * 5, "eval_loss": 3.2 / k as f64})))
        .collect();
    let run = record_run(p, "20261122-100000-c0ffee", "training");
    record_model_step(
        p,
        &run,
        "finetune",
        0,
        json!({"curve": curve, "method": "lora"}),
    )
}

/// A sweep run with two variants (`finetune[rank=4]`, `finetune[rank=8]`), each with a
/// model whose metadata holds a final loss and a 10-step curve.
fn add_sweep_records(p: &Project) -> String {
    use serde_json::json;
    let run = record_run(p, "20261122-110000-5eeeee", "sweep");
    for (seq, rank) in [4u32, 8].into_iter().enumerate() {
        let curve: Vec<_> = (1..=10)
            .map(|s| json!({"step": s, "loss": f64::from(rank) / s as f64}))
            .collect();
        record_model_step(
            p,
            &run,
            &format!("finetune[rank={rank}]"),
            seq,
            json!({"curve": curve, "train_loss": f64::from(rank) / 10.0, "lora": {"r": rank}}),
        );
    }
    run.id
}

/// A succeeded run record written through the store API.
fn record_run(p: &Project, id: &str, pipeline: &str) -> cairn::store::RunRecord {
    use cairn::store::{Access, RunRecord, Store};
    let store = Store::open(&p.store(), Access::Shared).unwrap();
    let run = RunRecord {
        id: id.into(),
        pipeline: pipeline.into(),
        pipeline_file: format!("{pipeline}.yaml"),
        status: cairn::store::RunStatus::Succeeded,
        started_at: "2026-11-22T10:00:00Z".into(),
        finished_at: Some("2026-11-22T10:00:09Z".into()),
        pid: 1,
        args: serde_json::json!({}),
    };
    store.db().insert_run(&run).unwrap();
    run
}

/// A `finetune` step of `run` that ran and produced a `model` artifact with `metadata`
/// (in the shape finetune records); returns the artifact's digest.
fn record_model_step(
    p: &Project,
    run: &cairn::store::RunRecord,
    step: &str,
    seq: usize,
    metadata: serde_json::Value,
) -> String {
    use cairn::store::{
        Access, ArtifactRecord, OutputRef, StepRecord, StepStatus, StepWrite, Store,
    };
    let store = Store::open(&p.store(), Access::Shared).unwrap();
    let digest =
        cairn::store::ObjectDigest::from(blake3::hash(format!("{} {step}", run.id).as_bytes()));
    let artifact = ArtifactRecord {
        digest,
        kind: "model".into(),
        is_dir: true,
        size: 0,
        created_at: run.started_at.clone(),
        producer_run: run.id.clone(),
        producer_step: step.into(),
        output: "model".into(),
        pipeline: run.pipeline.clone(),
        metadata,
    };
    let record = StepRecord {
        run_id: run.id.clone(),
        step: step.into(),
        kind: "finetune".into(),
        version: "1".into(),
        status: StepStatus::Ran,
        reason: "no earlier result".into(),
        cache_key: None,
        duration_ms: 1000 * (seq as u64 + 1),
        started_at: run.started_at.clone(),
        params: serde_json::json!({}),
        param_refs: Default::default(),
        inputs: Default::default(),
        outputs: [(
            "model".to_string(),
            OutputRef {
                digest,
                kind: "model".into(),
            },
        )]
        .into(),
        error: None,
        log: None,
    };
    let write = StepWrite {
        record: &record,
        seq,
        artifacts: std::slice::from_ref(&artifact),
        cache: None,
        index_io: true,
        latest_in: None,
    };
    store.db().write_steps(&[write], &[]).unwrap();
    digest.to_hex()
}

/// The chat page of `cairn ui` against `cairn serve --rag`: the tuned adapter and its
/// base side by side, each answer streamed in and equal to what the API answers for the
/// same request, the retrieved note listed under the tuned model's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chat_page_streams_two_models_side_by_side_with_their_sources() {
    use common::serving::{client, models, notes_project, start_in};
    if !have_chromium() {
        return;
    }
    let p = notes_project();
    let tmp = tempfile::tempdir().unwrap();
    let (base, twin) = models(tmp.path());
    p.write(
        "rag.yaml",
        "collections: [{name: embedded_notes, k: 3}]\ntop_k: 2\n",
    );
    let server = start_in(
        Some(&p),
        &[
            &"--model",
            &format!("twin={}", twin.display()),
            &"--model",
            &format!("base={}", base.display()),
            &"--rag",
            &"rag.yaml",
        ],
    );
    let question = "how often should I feed the starter for bread?";
    let expected_twin = client(&[&"chat", &server.url, &"twin", &question]);
    let expected_base = client(&[&"chat", &server.url, &"base", &question]);
    let (ui, _) = p.start_ui(&["--serve-url", &server.url]);
    let (_driver, c) = browser().await;
    c.goto(&format!("{}/#/chat", ui.url)).await.unwrap();
    wait_text(&c, "#chat-model-a", "twin").await;
    c.execute(
        "document.getElementById('chat-model-a').value = 'twin';\
         document.getElementById('chat-model-b').value = 'base';\
         document.getElementById('chat-temperature').value = '0';\
         document.getElementById('chat-max-tokens').value = '16';\
         document.getElementById('chat-question').value = arguments[0];",
        vec![serde_json::json!(question)],
    )
    .await
    .unwrap();
    c.find(Locator::Id("chat-send"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    for i in 0..2 {
        let mut done = String::new();
        for _ in 0..200 {
            let e = c
                .find(Locator::Id(&format!("chat-answer-{i}")))
                .await
                .unwrap();
            done = e.attr("data-done").await.unwrap().unwrap_or_default();
            if !done.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(done, "true", "answer {i} never finished");
    }
    let text = |i: usize| {
        let c = c.clone();
        async move {
            c.execute(
                "return document.getElementById(arguments[0]).textContent;",
                vec![serde_json::json!(format!("chat-answer-{i}"))],
            )
            .await
            .unwrap()
        }
    };
    assert_eq!(text(0).await, expected_twin["text"]);
    assert_eq!(text(1).await, expected_base["text"]);
    assert_ne!(expected_twin["text"], expected_base["text"]);
    let sources = wait_text(&c, "#chat-sources-0", "Feeding a sourdough starter").await;
    assert!(sources.contains("embedded_notes"), "{sources}");
    screenshot(&c, "6-chat").await;
    c.close().await.unwrap();
}
