//! `cairn ui`'s JSON API through the real binary on 127.0.0.1, over a store filled by real
//! pipeline runs: runs and steps (with reasons and redacted parameters), logs, artifact
//! search, lineage, file listing and download, and the path-traversal and secret cases.

mod common;

use common::process::LoopbackServer;
use common::Project;
use serde_json::Value;

/// GET over a raw TCP connection (HTTP/1.0): the path goes out exactly as written, so the
/// traversal cases test the server, not a client's URL normalisation.
fn get(ui: &LoopbackServer, path: &str) -> (u16, String, Vec<u8>) {
    use std::io::{Read, Write};
    let addr = ui.url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head, raw[split + 4..].to_vec())
}

fn get_json(ui: &LoopbackServer, path: &str) -> Value {
    let (status, _, body) = get(ui, path);
    assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

const PIPELINE: &str = r#"name: browse
params: {words: 3}
steps:
  notes: {uses: source, with: {path: notes}}
  count:
    uses: command
    inputs: {notes: notes.data}
    outputs: {counts: file}
    with:
      run: "echo fetching mongodb://admin:s3cret-pw@127.0.0.1:27017/db >&2; wc -w ${inputs.notes}/a.md > ${outputs.counts}"
  tree:
    uses: command
    inputs: {counts: count.counts}
    outputs: {dir: directory}
    with:
      run: "mkdir -p ${outputs.dir}/sub && cp ${inputs.counts} ${outputs.dir}/sub/counts.txt && echo ${params.words} > ${outputs.dir}/words.txt && ln -s /etc/passwd ${outputs.dir}/escape && echo '{\"hidden_size\": 64, \"api_key\": \"sk-x\"}' > ${outputs.dir}/config.json && echo '{\"rouge_l\": 0.41}' > ${outputs.dir}/metrics.json && printf '{\"prompt\": \"p1\"}\\n{\"prompt\": \"p2\"}\\n' > ${outputs.dir}/samples.jsonl"
"#;

fn filled_store() -> (Project, Value, Value) {
    let p = Project::new();
    p.write("notes/a.md", "one two three four\n");
    p.write("browse.yaml", PIPELINE);
    let first = p.run("browse.yaml", &[]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    let second = p.run("browse.yaml", &["--set", "words=5"]);
    assert_eq!(second.code, 0, "{}", second.stderr);
    (p, first.json, second.json)
}

#[test]
fn api_serves_runs_steps_logs_and_redacts_secrets() {
    let (p, first, second) = filled_store();
    let (ui, banner) = p.start_ui(&[]);
    assert!(banner.contains("at http://127.0.0.1:"), "{banner}");

    let runs = get_json(&ui, "/api/runs");
    let list = runs["runs"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["id"], second["run_id"], "newest first");
    assert_eq!(list[0]["counts"]["cached"], 2);
    assert_eq!(list[0]["counts"]["ran"], 1);
    assert_eq!(runs["pipelines"], serde_json::json!(["browse"]));
    let page = get_json(&ui, "/api/runs?limit=1&offset=1");
    assert_eq!(page["runs"][0]["id"], first["run_id"]);
    assert_eq!(
        get_json(&ui, "/api/runs?pipeline=nope")["runs"]
            .as_array()
            .unwrap()
            .len(),
        0
    );

    let run_id = second["run_id"].as_str().unwrap();
    let (status, _, body) = get(&ui, &format!("/api/runs/{run_id}"));
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&body);
    assert!(!text.contains("s3cret-pw"), "a password leaked: {text}");
    let run: Value = serde_json::from_slice(&body).unwrap();
    let steps = run["steps"].as_array().unwrap();
    let tree = steps.iter().find(|s| s["name"] == "tree").unwrap();
    assert_eq!(tree["status"], "ran");
    assert_eq!(tree["reason"], "param words changed 3 -> 5");
    assert!(tree["cache_key"].as_str().unwrap().len() == 64);
    let count = steps.iter().find(|s| s["name"] == "count").unwrap();
    assert_eq!(count["status"], "cached");
    assert!(count["params"]["run"]
        .as_str()
        .unwrap()
        .contains("mongodb://admin:***@127.0.0.1"));

    // The step echoed the connection string into its log: served with the password masked.
    let first_id = first["run_id"].as_str().unwrap();
    let (status, head, log) = get(&ui, &format!("/api/runs/{first_id}/steps/count/log"));
    assert_eq!(status, 200, "{head}");
    let log = String::from_utf8_lossy(&log);
    assert!(
        log.contains("fetching mongodb://admin:***@127.0.0.1:27017/db"),
        "{log}"
    );
    assert!(!log.contains("s3cret-pw"));
    assert_eq!(get(&ui, "/api/runs/nope").0, 404);
    assert_eq!(
        get(&ui, &format!("/api/runs/{first_id}/steps/nope/log")).0,
        404
    );
}

#[test]
fn api_searches_artifacts_draws_lineage_and_serves_files_safely() {
    let (p, _first, second) = filled_store();
    let (ui, _) = p.start_ui(&[]);
    let tree_digest = second["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "tree")
        .unwrap()["outputs"]["dir"]
        .as_str()
        .unwrap()
        .to_string();
    let all = get_json(&ui, "/api/artifacts?limit=500");
    assert!(all["artifacts"].as_array().unwrap().len() >= 4);
    let by_step = get_json(&ui, "/api/artifacts?step=tree");
    assert_eq!(
        by_step["artifacts"].as_array().unwrap().len(),
        2,
        "one per words value"
    );
    let by_prefix = get_json(
        &ui,
        &format!("/api/artifacts?digest={}", &tree_digest[..10]),
    );
    assert_eq!(by_prefix["artifacts"][0]["digest"], tree_digest.as_str());
    assert_eq!(get(&ui, "/api/artifacts?digest=zz").0, 400);
    let kinds = get_json(&ui, "/api/artifacts?kind=directory");
    assert!(kinds["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .all(|a| a["kind"] == "directory"));

    let record = get_json(&ui, &format!("/api/artifacts/{}", &tree_digest[..12]));
    assert_eq!(record["producer_step"], "tree");
    assert_eq!(record["is_dir"], true);

    let lineage = get_json(&ui, &format!("/api/artifacts/{tree_digest}/lineage"));
    let edges = lineage["edges"].as_array().unwrap();
    let steps: Vec<&str> = edges.iter().map(|e| e["step"].as_str().unwrap()).collect();
    assert!(
        steps.contains(&"tree") && steps.contains(&"count"),
        "{lineage:#}"
    );
    // Downstream of the notes source: count, then tree.
    let notes = edges.iter().find(|e| e["step"] == "count").unwrap()["from"]
        .as_str()
        .unwrap()
        .to_string();
    let down = get_json(&ui, &format!("/api/artifacts/{notes}/lineage"));
    assert!(
        down["edges"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["to"] == tree_digest.as_str()),
        "{down:#}"
    );

    let files = get_json(&ui, &format!("/api/artifacts/{tree_digest}/files"));
    let paths: Vec<&str> = files["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert!(
        paths.contains(&"sub/counts.txt") && paths.contains(&"words.txt"),
        "{paths:?}"
    );
    let (status, head, body) = get(
        &ui,
        &format!("/api/artifacts/{tree_digest}/files/words.txt"),
    );
    assert_eq!(status, 200);
    assert_eq!(body, b"5\n");
    assert!(
        head.to_lowercase()
            .contains("content-disposition: attachment"),
        "{head}"
    );
    assert_eq!(
        get(
            &ui,
            &format!("/api/artifacts/{tree_digest}/files/sub/counts.txt")
        )
        .0,
        200
    );

    // Nothing outside the object: encoded, double-encoded and plain `..`, absolute paths,
    // a symlink pointing out of the store.
    for evil in [
        "../../cairn.db",
        "..%2F..%2Fcairn.db",
        "%2e%2e/%2e%2e/cairn.db",
        "%252e%252e%252f%252e%252e%252fcairn.db",
        "sub/../../../cairn.db",
        "/etc/passwd",
        "%2Fetc%2Fpasswd",
        "escape",
    ] {
        let (status, _, body) = get(&ui, &format!("/api/artifacts/{tree_digest}/files/{evil}"));
        assert!(status == 400 || status == 404, "{evil}: {status}");
        let text = String::from_utf8_lossy(&body);
        assert!(
            !text.contains("root:") && !text.contains("SQLite"),
            "{evil} served: {text}"
        );
    }
    assert_eq!(get(&ui, "/api/artifacts/abc").0, 400);

    // A folder with a model config, report metrics and samples previews all three.
    let preview = get_json(&ui, &format!("/api/artifacts/{tree_digest}/preview"));
    assert_eq!(preview["config"]["hidden_size"], 64);
    assert_eq!(preview["config"]["api_key"], "***");
    assert_eq!(preview["metrics"]["rouge_l"], 0.41);
    let samples = preview["records"]["items"].as_array().unwrap();
    assert_eq!(samples.len(), 2);
    assert_eq!(samples[1]["record"]["prompt"], "p2");
    // The symlink really is in the object (so the refusal above is the server's doing).
    let object = p
        .store()
        .join("objects")
        .join(&tree_digest[..2])
        .join(&tree_digest[2..]);
    assert!(std::fs::symlink_metadata(object.join("escape"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(get(&ui, "/api/artifacts/0000000000").0, 404);
}

#[test]
fn non_loopback_host_warns_and_bad_host_is_a_usage_error() {
    let (p, _, _) = filled_store();
    let (_ui, banner) = p.start_ui(&["--host", "0.0.0.0"]);
    assert!(banner.contains("warning: binding 0.0.0.0"), "{banner}");
    let (code, _, err) = p.exec(&["ui", "--host", "localhost:80"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is not an IP address"), "{err}");
}

#[test]
fn pages_and_assets_are_served_from_the_binary() {
    let (p, _, _) = filled_store();
    let (ui, _) = p.start_ui(&[]);
    let (status, head, body) = get(&ui, "/");
    assert_eq!(status, 200);
    assert!(
        head.to_lowercase().contains("content-type: text/html"),
        "{head}"
    );
    let html = String::from_utf8_lossy(&body);
    assert!(
        html.contains("/assets/app.js") && !html.contains("http://") && !html.contains("https://"),
        "no CDN links: {html}"
    );
    let (status, _, js) = get(&ui, "/assets/app.js");
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&js).contains("/api/runs"));
    assert_eq!(get(&ui, "/assets/style.css").0, 200);
    assert_eq!(get(&ui, "/assets/../cairn.db").0, 404);
}

#[test]
fn previews_page_records_project_embeddings_and_diff_artifacts() {
    let model =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".models/all-MiniLM-L6-v2");
    assert!(
        model.join("tokenizer.json").exists(),
        "run scripts/setup first"
    );
    let p = Project::new();
    for i in 0..6 {
        p.write(
            &format!("notes/{i}.md"),
            &format!("# Note {i}\n\nBread number {i} needs a starter, flour and patience. Bikes need chains and oil in winter.\n"),
        );
    }
    p.write(
        "feat.yaml",
        &format!(
            "name: feat\nparams: {{size: 64}}\nsteps:\n  notes: {{uses: source, with: {{path: notes}}}}\n  docs: {{uses: ingest, inputs: {{files: notes.data}}}}\n  \
             chunk: {{uses: chunk, inputs: {{documents: docs.documents}}, with: {{model: \"{m}\", size: \"${{params.size}}\", overlap: 0}}}}\n  \
             embed: {{uses: embed, inputs: {{chunks: chunk.chunks}}, with: {{model: \"{m}\", device: cpu}}}}\n",
            m = model.display()
        ),
    );
    let first = p.run("feat.yaml", &[]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    let second = p.run("feat.yaml", &["--set", "size=8"]);
    assert_eq!(second.code, 0, "{}", second.stderr);
    let (ui, _) = p.start_ui(&[]);

    let docs = first.output("docs", "documents");
    let page = get_json(
        &ui,
        &format!("/api/artifacts/{docs}/preview?limit=4&offset=2"),
    );
    let items = page["records"]["items"].as_array().unwrap();
    assert_eq!(items.len(), 4);
    assert_eq!(items[0]["index"], 2);
    assert_eq!(
        page["records"]["more"], false,
        "6 documents: 2..6 is the last page"
    );
    let first_page = get_json(&ui, &format!("/api/artifacts/{docs}/preview?limit=2"));
    assert_eq!(first_page["records"]["more"], true);
    assert!(items[0]["record"]["content"]
        .as_str()
        .unwrap()
        .contains("Bread number"));

    let emb = first.output("embed", "embeddings");
    let e = get_json(&ui, &format!("/api/artifacts/{emb}/preview"));
    assert_eq!(e["embeddings"]["dim"], 384);
    let count = e["embeddings"]["count"].as_u64().unwrap();
    assert!(count >= 6);
    assert_eq!(
        e["embeddings"]["projection"]["points"]
            .as_array()
            .unwrap()
            .len() as u64,
        count
    );
    assert!(e["embeddings"]["model"]
        .as_str()
        .unwrap()
        .contains("all-MiniLM-L6-v2"));
    assert_eq!(e["records"]["items"][0]["part"], "chunks");

    let (a, b) = (
        first.output("chunk", "chunks"),
        second.output("chunk", "chunks"),
    );
    let d = get_json(&ui, &format!("/api/diff/{}/{}", &a[..10], &b[..10]));
    assert_eq!(d["identical"], false);
    assert_eq!(d["same_kind"], true);
    assert_eq!(
        d["metadata"]["chunks"]["a"].as_u64().unwrap() * 3,
        d["metadata"]["chunks"]["b"].as_u64().unwrap(),
        "{d:#}"
    );
    let change = &d["content"][0];
    assert_eq!(change["change"], "changed");
    assert!(
        change["lines_added"].as_u64().unwrap() > change["lines_removed"].as_u64().unwrap(),
        "{change}"
    );
    let same = get_json(&ui, &format!("/api/diff/{a}/{a}"));
    assert_eq!(same["identical"], true);
    assert_eq!(same["content"].as_array().unwrap().len(), 0);
}

#[test]
fn secrets_in_parameters_are_masked_in_stored_records_and_reasons() {
    let p = Project::new();
    p.write(
        "secret.yaml",
        "name: secret\nparams: {db: \"mongodb://app:pw-one@127.0.0.1:27017/twin\", n: 1}\nsteps:\n  \
         dump:\n    uses: command\n    outputs: {out: file}\n    \
         with: {run: \"test -n '${params.db}' && echo ${params.n} > ${outputs.out}\"}\n",
    );
    let first = p.run("secret.yaml", &[]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    let second = p.run(
        "secret.yaml",
        &[
            "--set",
            "db=mongodb://app:pw-two@127.0.0.1:27017/twin",
            "--set",
            "n=2",
        ],
    );
    assert_eq!(second.code, 0, "{}", second.stderr);
    let reason = second.reason("dump");
    assert!(reason.contains("param n changed 1 -> 2"), "{reason}");
    assert!(!reason.contains("pw-"), "{reason}");
    // Neither password is anywhere in the record database (nor its WAL).
    for f in ["cairn.db", "cairn.db-wal"] {
        if let Ok(bytes) = std::fs::read(p.store().join(f)) {
            let text = String::from_utf8_lossy(&bytes);
            assert!(
                !text.contains("pw-one") && !text.contains("pw-two"),
                "a password is stored in {f}"
            );
        }
    }
    let (code, out, _) = p.exec(&[
        "runs",
        "show",
        second.json["run_id"].as_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0);
    assert!(
        out.contains("mongodb://app:***@127.0.0.1:27017/twin"),
        "{out}"
    );
    // The masked record still lets an unchanged rerun hit the cache.
    let third = p.run(
        "secret.yaml",
        &[
            "--set",
            "db=mongodb://app:pw-two@127.0.0.1:27017/twin",
            "--set",
            "n=2",
        ],
    );
    assert_eq!(third.step("dump")["status"], "cached");
}

#[test]
fn plan_of_a_run_says_what_would_rerun_now_and_writes_nothing() {
    let (p, first, second) = filled_store();
    let (ui, _) = p.start_ui(&[]);
    let first_id = first["run_id"].as_str().unwrap();
    let second_id = second["run_id"].as_str().unwrap();

    // Each run's own `--set` values are replanned: both are fully cached.
    for id in [first_id, second_id] {
        let plan = get_json(&ui, &format!("/api/runs/{id}/plan"));
        assert_eq!(plan["status"], "planned");
        assert_eq!(plan["run_id"], Value::Null);
        let statuses: Vec<(&str, &str)> = plan["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["name"].as_str().unwrap(), s["status"].as_str().unwrap()))
            .collect();
        // `notes` is a source: always checked, so always "will run" in a plan.
        assert_eq!(
            statuses,
            [
                ("notes", "will_run"),
                ("count", "cached"),
                ("tree", "cached")
            ],
            "{plan}"
        );
    }

    // Edit the file: only `tree` would rerun, and the reason says why.
    p.write(
        "browse.yaml",
        &PIPELINE.replace(
            "mkdir -p ${outputs.dir}/sub",
            "mkdir -p ${outputs.dir}/sub/x",
        ),
    );
    let plan = get_json(&ui, &format!("/api/runs/{second_id}/plan"));
    let tree = plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "tree")
        .unwrap();
    assert_eq!(tree["status"], "will_run", "{plan}");
    assert!(
        tree["reason"]
            .as_str()
            .unwrap()
            .starts_with("param run changed"),
        "{tree}"
    );
    assert_eq!(
        get_json(&ui, "/api/runs")["runs"].as_array().unwrap().len(),
        2,
        "planning records no run"
    );

    p.write("browse.yaml", "name: broken\nsteps: {}\n");
    let (status, _, body) = get(&ui, &format!("/api/runs/{second_id}/plan"));
    assert_eq!(status, 422, "{}", String::from_utf8_lossy(&body));
    assert_eq!(get(&ui, "/api/runs/nope/plan").0, 404);
}
