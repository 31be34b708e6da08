//! Sweeps through the real binary: `foreach`/`matrix` expansion with shared upstream
//! steps, adding and removing items with `--set`, `STEP[*]` collections, `when:`
//! conditions, `include:` composition, `cairn runs compare` and the OpenLineage export
//! (validated with the `openlineage-python` client's generated spec classes, and POSTed to
//! a lineage endpoint on 127.0.0.1).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;

use common::Project;
use serde_json::Value;

const SWEEP: &str = r#"name: sweep
params:
  ranks: [8, 16, 32]
  use_dpo: false
steps:
  data:
    uses: command
    with: {run: "seq 1 5 > ${outputs.out}"}
    outputs: [out]
  train:
    uses: command
    matrix: {rank: "${params.ranks}", lr: [1e-4, 3e-4]}
    inputs: {data: data.out}
    with: {run: "echo rank=${item.rank} lr=${item.lr} > ${outputs.model}; cat ${inputs.data} >> ${outputs.model}"}
    outputs: [model]
  dpo:
    uses: command
    when: ${params.use_dpo}
    inputs: {model: "train[rank=8,lr=1e-4].model"}
    with: {run: "cp ${inputs.model} ${outputs.model}"}
    outputs: [model]
  gather:
    uses: command
    inputs: {models: "train[*].model"}
    with: {run: "cat ${inputs.models} > ${outputs.all}; printf '%s\n' \"$CAIRN_INPUT_MODELS\" | wc -l >> ${outputs.all}"}
    outputs: [all]
"#;

fn variants(out: &common::Outcome, status: &str) -> Vec<String> {
    out.with_status(status)
        .into_iter()
        .filter(|n| n.starts_with("train["))
        .collect()
}

fn artifact_text(p: &Project, digest: &str) -> String {
    let (code, out, err) = p.exec(&["artifacts", "cat", digest]);
    assert_eq!(code, 0, "{err}");
    out
}

#[test]
fn a_matrix_shares_upstream_steps_and_reruns_only_new_items() {
    let p = Project::new();
    p.write("sweep.yaml", SWEEP);
    let cold = p.run("sweep.yaml", &[]);
    assert_eq!(cold.code, 0, "{}", cold.stderr);
    assert_eq!(variants(&cold, "ran").len(), 6, "{}", cold.json);
    assert_eq!(cold.step("data")["status"], "ran");
    assert_eq!(
        cold.reason("train[rank=16,lr=3e-4]"),
        "matrix item rank=16,lr=3e-4 is new"
    );
    let model = artifact_text(&p, &cold.output("train[rank=32,lr=1e-4]", "model"));
    assert!(model.starts_with("rank=32 lr=1e-4\n1\n"), "{model}");
    let gathered = artifact_text(&p, &cold.output("gather", "all"));
    assert_eq!(gathered.matches("rank=").count(), 6, "{gathered}");
    assert!(
        gathered.trim_end().ends_with('6'),
        "six paths in the env var: {gathered}"
    );
    assert_eq!(cold.step("dpo")["status"], "skipped");
    assert_eq!(
        cold.reason("dpo"),
        "condition false: `${params.use_dpo}` with use_dpo=false"
    );

    // Adding a rank trains its two variants and nothing else upstream.
    let more = p.run("sweep.yaml", &["--set", "ranks=[8,16,32,64]"]);
    assert_eq!(more.code, 0, "{}", more.stderr);
    assert_eq!(
        variants(&more, "ran"),
        vec!["train[rank=64,lr=1e-4]", "train[rank=64,lr=3e-4]"]
    );
    assert_eq!(variants(&more, "cached").len(), 6);
    assert_eq!(more.step("data")["status"], "cached");
    assert_eq!(more.step("gather")["status"], "ran");
    let plan = p.plan("sweep.yaml", &["--set", "ranks=[8,16,32,64,128]"]);
    assert_eq!(
        plan.reason("train[rank=128,lr=3e-4]"),
        "matrix item rank=128,lr=3e-4 is new"
    );

    // Removing one reruns none of the others.
    let fewer = p.run("sweep.yaml", &["--set", "ranks=[8,32]"]);
    assert_eq!(fewer.code, 0, "{}", fewer.stderr);
    assert!(variants(&fewer, "ran").is_empty(), "{}", fewer.json);
    assert_eq!(variants(&fewer, "cached").len(), 4);
    assert!(fewer.json.to_string().contains("train[rank=8,lr=3e-4]"));
    assert!(!fewer.json.to_string().contains("train[rank=16"));

    // The same command again loads the pipeline from its snapshot: variants, items and
    // the skipped step's reason survive it.
    let again = p.run("sweep.yaml", &["--set", "ranks=[8,32]"]);
    assert_eq!(fewer.step("gather")["status"], "ran", "its inputs changed");
    let mut expected = fewer.statuses();
    expected.insert("gather".into(), "cached".into());
    assert_eq!(again.statuses(), expected, "{}", again.json);
    assert_eq!(again.reason("dpo"), fewer.reason("dpo"));
    assert_eq!(again.output("gather", "all"), fewer.output("gather", "all"));
    let snapshots = std::fs::read_dir(p.store().join("pipelines"))
        .unwrap()
        .count();
    assert!(snapshots > 0, "a snapshot was written");

    // A step name stands for all its variants in --only and --force.
    let forced = p.run("sweep.yaml", &["--only", "train", "--force", "train"]);
    assert_eq!(forced.code, 0, "{}", forced.stderr);
    assert_eq!(variants(&forced, "ran").len(), 6, "{}", forced.json);
    assert_eq!(forced.step("gather")["status"], "skipped");
}

#[test]
fn when_skips_a_step_and_a_flip_runs_it() {
    let p = Project::new();
    p.write("sweep.yaml", SWEEP);
    let plan = p.plan("sweep.yaml", &[]);
    assert_eq!(plan.step("dpo")["status"], "skipped", "{}", plan.json);
    let (code, text, err) = p.exec(&["plan", "sweep.yaml"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        format!("{text}{err}").contains("condition false: `${params.use_dpo}` with use_dpo=false"),
        "{text}{err}"
    );
    let on = p.run("sweep.yaml", &["--set", "use_dpo=true"]);
    assert_eq!(on.code, 0, "{}", on.stderr);
    assert_eq!(on.step("dpo")["status"], "ran");
    assert_eq!(
        on.output("dpo", "model"),
        on.output("train[rank=8,lr=1e-4]", "model"),
        "dpo copies the variant it reads"
    );

    // A conditional step may not run while the conditional step it reads is skipped.
    p.write(
        "cond.yaml",
        &SWEEP.replace(
            "  gather:",
            "  judge:\n    uses: command\n    when: \"${params.use_dpo} == false\"\n    inputs: {model: dpo.model}\n    with: {run: \"true\"}\n  gather:",
        ),
    );
    let (code, _, err) = p.exec(&["run", "cond.yaml"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("cond.yaml:")
            && err.contains("reads `dpo`, which is skipped (condition false"),
        "{err}"
    );
    let (code, _, err) = p.exec(&["run", "cond.yaml", "--set", "use_dpo=true"]);
    assert_eq!(code, 0, "judge is skipped now, dpo runs: {err}");
}

#[test]
fn foreach_takes_strings_and_maps() {
    let p = Project::new();
    p.write(
        "each.yaml",
        r#"name: each
params:
  sources: [blog, notes]
steps:
  crawl:
    uses: command
    foreach: "${params.sources}"
    with: {run: "echo ${item} > ${outputs.out}"}
    outputs: [out]
  chunk:
    uses: command
    foreach: [{size: 100, overlap: 10}, {size: 200, overlap: 0}]
    inputs: {docs: "crawl[blog].out"}
    with: {run: "echo ${item.size}/${item.overlap} > ${outputs.out}"}
    outputs: [out]
"#,
    );
    let out = p.run("each.yaml", &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        out.statuses().keys().cloned().collect::<Vec<_>>(),
        vec![
            "chunk[size=100,overlap=10]",
            "chunk[size=200,overlap=0]",
            "crawl[blog]",
            "crawl[notes]"
        ]
    );
    assert_eq!(
        artifact_text(&p, &out.output("crawl[notes]", "out")),
        "notes\n"
    );
    assert_eq!(
        artifact_text(&p, &out.output("chunk[size=200,overlap=0]", "out")),
        "200/0\n"
    );
    assert_eq!(out.reason("crawl[blog]"), "foreach item blog is new");
}

#[test]
fn include_composes_pipelines_with_overridable_params() {
    let p = Project::new();
    p.write(
        "parts/data.yaml",
        "name: data\nparams: {lines: 3, unit: row}\nsteps:\n  data:\n    uses: command\n    with: {run: \"seq 1 ${params.lines} | sed s/^/${params.unit}/ > ${outputs.out}\"}\n    outputs: [out]\n",
    );
    p.write(
        "parts/count.yaml",
        "name: count\ninclude: data.yaml\nsteps:\n  count:\n    uses: command\n    inputs: {rows: data.out}\n    with: {run: \"wc -l < ${inputs.rows} > ${outputs.out}\"}\n    outputs: [out]\n",
    );
    p.write(
        "main.yaml",
        "name: main\ninclude: [parts/count.yaml]\nparams: {lines: 4}\nsteps:\n  report:\n    uses: command\n    inputs: {n: count.out}\n    with: {run: \"cat ${inputs.n} > ${outputs.out}\"}\n    outputs: [out]\n",
    );
    let out = p.run("main.yaml", &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.statuses().len(), 3);
    assert_eq!(artifact_text(&p, &out.output("report", "out")).trim(), "4");
    let data = artifact_text(&p, &out.output("data", "out"));
    assert!(data.starts_with("row1\n"), "{data}");
    let set = p.run("main.yaml", &["--set", "lines=6"]);
    assert_eq!(artifact_text(&p, &set.output("report", "out")).trim(), "6");

    // Problems in an included file are located there.
    p.write(
        "parts/data.yaml",
        "name: data\nparams: {lines: 3}\nsteps:\n  data:\n    uses: command\n    with: {run: \"seq 1 ${params.line} > ${outputs.out}\"}\n    outputs: [out]\n",
    );
    let (code, _, err) = p.exec(&["validate", "main.yaml"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("parts/data.yaml:6:") && err.contains("undefined `${params.line}`"),
        "{err}"
    );
    p.write(
        "twice.yaml",
        "name: twice\ninclude: parts/count.yaml\nsteps:\n  count: {uses: command, with: {run: \"true\"}}\n",
    );
    let (code, _, err) = p.exec(&["validate", "twice.yaml"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("twice.yaml:4:") && err.contains("step `count` is also defined in included"),
        "{err}"
    );
    let (code, _, err) = p.exec(&["validate", "missing.yaml"]);
    assert_eq!(code, 2, "{err}");
    p.write(
        "gone.yaml",
        "name: gone\ninclude: nowhere.yaml\nsteps:\n  a: {uses: command, with: {run: \"true\"}}\n",
    );
    let (code, _, err) = p.exec(&["validate", "gone.yaml"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("gone.yaml:2:10") && err.contains("include `nowhere.yaml`"),
        "{err}"
    );
}

#[test]
fn runs_compare_lists_each_variant_with_the_params_that_differ() {
    let p = Project::new();
    p.write("sweep.yaml", SWEEP);
    assert_eq!(p.run("sweep.yaml", &[]).code, 0);
    assert_eq!(
        p.run("sweep.yaml", &["--set", "ranks=[8,16,32,64]"]).code,
        0
    );
    let (code, out, err) = p.exec(&["runs", "compare", "--pipeline", "sweep", "--json"]);
    assert_eq!(code, 0, "{err}");
    let table: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(table["params"], serde_json::json!(["lr", "rank"]));
    let rows = table["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 8, "{table}");
    let mut seen: Vec<(i64, f64)> = rows
        .iter()
        .map(|r| {
            (
                r["params"]["rank"].as_i64().unwrap(),
                r["params"]["lr"].as_f64().unwrap(),
            )
        })
        .collect();
    seen.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mut expected = Vec::new();
    for rank in [8, 16, 32, 64] {
        for lr in [1e-4, 3e-4] {
            expected.push((rank, lr));
        }
    }
    assert_eq!(seen, expected);
    let statuses: Vec<&str> = rows.iter().map(|r| r["status"].as_str().unwrap()).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == "cached").count(),
        6,
        "{statuses:?}"
    );

    // The two runs together: a variant reused unchanged is listed once.
    let (_, both, _) = p.exec(&[
        "runs",
        "compare",
        "--pipeline",
        "sweep",
        "--last",
        "2",
        "--json",
    ]);
    let both: Value = serde_json::from_str(&both).unwrap();
    assert_eq!(both["rows"].as_array().unwrap().len(), 8);

    let (code, csv, _) = p.exec(&[
        "runs",
        "compare",
        "--pipeline",
        "sweep",
        "--csv",
        "--sort",
        "rank",
        "--desc",
    ]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "run,variant,lr,rank,duration_ms,status");
    assert!(
        lines[1].contains(",64,") && lines[8].contains(",8,"),
        "{csv}"
    );
    let (_, md, _) = p.exec(&["runs", "compare", "--pipeline", "sweep", "--md"]);
    assert!(
        md.starts_with("| run | variant | lr | rank |")
            && md.lines().nth(1).unwrap().starts_with("|---|"),
        "{md}"
    );
    let (code, _, err) = p.exec(&["runs", "compare", "--pipeline", "nope"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("no runs of pipeline `nope`") && err.contains("sweep"),
        "{err}"
    );
}

fn latest_run(p: &Project) -> String {
    let (_, out, _) = p.exec(&["runs", "ls", "--json", "--limit", "1"]);
    let runs: Value = serde_json::from_str(&out).unwrap();
    runs[0]["run"]["id"].as_str().unwrap().to_string()
}

/// A one-shot HTTP endpoint on 127.0.0.1 that records the bodies POSTed to it.
fn lineage_endpoint(expected: usize) -> (String, std::thread::JoinHandle<Vec<Value>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/api/v1/lineage", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let mut bodies = Vec::new();
        while bodies.len() < expected {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut stream = stream;
            // Keep-alive: several requests per connection.
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                assert!(line.starts_with("POST /api/v1/lineage "), "{line}");
                let mut length = 0;
                loop {
                    let mut header = String::new();
                    reader.read_line(&mut header).unwrap();
                    if header.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = header.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                bodies.push(serde_json::from_slice(&body).unwrap());
                stream
                    .write_all(b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n")
                    .unwrap();
                if bodies.len() == expected {
                    break;
                }
            }
        }
        bodies
    });
    (url, handle)
}

#[test]
fn runs_export_as_openlineage_events_that_the_reference_client_accepts() {
    let p = Project::new();
    p.write(
        "lineage.yaml",
        r#"name: lineage
steps:
  data:
    uses: command
    with: {run: "seq 1 3 > ${outputs.out}"}
    outputs: [out]
  double:
    uses: command
    inputs: {rows: data.out}
    with: {run: "cat ${inputs.rows} ${inputs.rows} > ${outputs.out}"}
    outputs: [out]
  broken:
    uses: command
    inputs: {rows: double.out}
    with: {run: "echo token=sk-abcdefghijklmnopqrstuvwxyz123456 >&2; exit 3"}
    outputs: [out]
"#,
    );
    let run = p.run("lineage.yaml", &[]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let id = latest_run(&p);
    let (code, out, err) = p.exec(&["runs", "export", "--openlineage", &id]);
    assert_eq!(code, 0, "{err}");
    let events: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<String> = events
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["eventType"].as_str().unwrap(),
                e["job"]["name"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            "START lineage",
            "START lineage.data",
            "COMPLETE lineage.data",
            "START lineage.double",
            "COMPLETE lineage.double",
            "START lineage.broken",
            "FAIL lineage.broken",
            "FAIL lineage",
        ]
    );
    let data_out = format!("blake3:{}", run.output("data", "out"));
    assert_eq!(events[2]["outputs"][0]["name"], data_out);
    assert_eq!(
        events[4]["inputs"][0]["name"], data_out,
        "the same artifact is the same dataset"
    );
    let parent = &events[1]["run"]["facets"]["parent"]["run"]["runId"];
    assert_eq!(parent, &events[0]["run"]["runId"]);
    let failure = events[6]["run"]["facets"]["errorMessage"]["message"]
        .as_str()
        .unwrap();
    assert!(failure.contains("exit"), "{failure}");
    assert!(
        !out.contains("sk-abcdefghijklmnop"),
        "secrets are masked: {out}"
    );
    let (_, again, _) = p.exec(&["runs", "export", "--openlineage", &id]);
    assert_eq!(again, out, "exporting twice gives the same events");

    // The OpenLineage client's spec classes rebuild every event to the same JSON.
    let python = common::repo().join(".venv/bin/python");
    if python.exists() {
        let script = common::repo().join("tests/parity/openlineage_check.py");
        let checked = std::process::Command::new(&python)
            .arg(&script)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                child.stdin.take().unwrap().write_all(out.as_bytes())?;
                child.wait_with_output()
            })
            .unwrap();
        let report = String::from_utf8_lossy(&checked.stdout).to_string()
            + &String::from_utf8_lossy(&checked.stderr);
        assert!(checked.status.success(), "{report}");
        assert!(report.contains("8 events valid"), "{report}");
    } else {
        eprintln!("skipped the openlineage-python check: .venv missing (scripts/setup --test)");
    }

    // --emit POSTs the same events to a lineage server.
    let (url, server) = lineage_endpoint(events.len());
    let (code, emitted, err) = p.exec(&["runs", "export", "--openlineage", &id, "--emit", &url]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(emitted, out);
    assert!(err.contains("sent 8 events"), "{err}");
    assert_eq!(server.join().unwrap(), events);
}
