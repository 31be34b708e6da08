//! Every class of malformed pipeline: exit code 2, every problem reported with its
//! location, nothing written to the store, never a panic. Messages are snapshotted.

mod common;

use std::path::Path;

use assert_cmd::Command;

fn fixtures() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/invalid");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    names.sort();
    names
}

fn cairn(store: &Path) -> Command {
    let mut c = Command::cargo_bin("cairn").unwrap();
    c.current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("CAIRN_STORE", store);
    c
}

#[test]
fn each_invalid_pipeline_is_reported_with_locations() {
    let names = fixtures();
    assert!(names.len() >= 25, "fixtures missing: {names:?}");
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    for name in names {
        let file = format!("tests/fixtures/invalid/{name}");
        let out = cairn(&store).args(["validate", &file]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
        assert!(stderr.contains(&file), "{name} names the file: {stderr}");
        insta::assert_snapshot!(name.trim_end_matches(".yaml"), stderr);

        let run = cairn(&store).args(["run", &file]).output().unwrap();
        assert_eq!(run.status.code(), Some(2), "{name}: run exits 2 too");
        assert!(
            !store.exists(),
            "{name}: an invalid pipeline must write nothing"
        );
    }
}

#[test]
fn bad_command_line_values() {
    let p = common::Project::new();
    p.write(
        "p.yaml",
        "name: ok\nparams: {chunk_size: 5}\nsteps:\n  a: {uses: command, with: {run: \"true\"}}\n",
    );
    let (code, _, err) = p.exec(&["run", "p.yaml", "--set", "chunk_sise=4"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("no param `chunk_sise`") && err.contains("did you mean `chunk_size`?"),
        "{err}"
    );
    let (code, _, err) = p.exec(&["run", "p.yaml", "--set", "novalue"]);
    assert_eq!(code, 2);
    assert!(err.contains("is not KEY=VALUE"), "{err}");
    let (code, _, err) = p.exec(&["run", "p.yaml", "--jobs", "0"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = p.exec(&["run", "missing.yaml"]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot read pipeline file"), "{err}");
    let (code, _, _) = p.exec(&["run"]);
    assert_eq!(code, 2, "usage errors exit 2");
    assert!(!p.store().exists());
}

#[test]
fn a_step_failure_exits_one() {
    let p = common::Project::new();
    p.write(
        "p.yaml",
        "name: ok\nsteps:\n  a: {uses: command, with: {run: \"exit 4\"}}\n",
    );
    let (code, _, err) = p.exec(&["run", "p.yaml"]);
    assert_eq!(code, 1, "{err}");
}

/// Failures say whose they are to fix: the step's own work, or what it was given.
#[test]
fn failed_steps_report_their_class() {
    let p = common::Project::new();
    p.write(
        "p.yaml",
        "name: classes
steps:
  gone: {uses: source, with: {path: no/such/folder}}
  broken: {uses: command, with: {run: \"exit 4\"}}
  model: {uses: chunk, inputs: {documents: docs.documents}, with: {model: no/such/model}}
  docs: {uses: ingest, inputs: {files: here.data}}
  here: {uses: source, with: {path: notes}}
",
    );
    p.write("notes/a.md", "# A\n\nwords\n");
    let run = p.run("p.yaml", &[]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let class = |name: &str| run.step(name)["error_class"].as_str().map(str::to_string);
    assert_eq!(class("gone").as_deref(), Some("input"), "{}", run.json);
    assert_eq!(class("broken").as_deref(), Some("step"), "{}", run.json);
    assert_eq!(class("model").as_deref(), Some("input"), "{}", run.json);
    assert_eq!(class("here"), None, "succeeded steps carry no class");
}
