//! Document stores: the embedded SQLite store always; MongoDB when
//! `CAIRN_TEST_MONGODB_URI` is set (and cairn is built with `--features mongodb`).

mod common;

use common::Project;

fn pipeline(p: &Project, docstore: &str) {
    let notes = "name: load\n".to_string()
        + docstore
        + "steps:\n  mine: {uses: source, with: {path: mine}}\n  docs:\n    uses: ingest\n    inputs: {files: mine.data}\n  store:\n    uses: docstore\n    inputs: {documents: docs.documents}\n";
    p.write("mine/a.md", "# A note\n\nFirst note.\n")
        .write("mine/b.txt", "Second note.\n")
        .write(
            "mine/qa.txt",
            "QUESTION: Why?\nANSWER: Because.\nQUESTION: How?\nANSWER: Slowly.\n",
        )
        .write("d.yaml", &notes);
}

fn receipt(p: &Project, out: &common::Outcome) -> serde_json::Value {
    let (_, body, _) = p.exec(&["artifacts", "cat", &out.output("store", "receipt")]);
    serde_json::from_str(&body).unwrap()
}

#[test]
fn embedded_store_upserts_verifies_and_reloads() {
    let p = Project::new();
    pipeline(&p, "");
    let first = p.run("d.yaml", &[]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    let r = receipt(&p, &first);
    assert_eq!(r["collections"]["notes"]["documents"], 2);
    assert_eq!(r["collections"]["qa"]["documents"], 2);
    let db = p.store().join("docstore.sqlite");
    assert!(db.exists());

    // Cache hit, verified against the store.
    let again = p.run("d.yaml", &[]);
    assert_eq!(
        again.step("store")["status"],
        "cached",
        "{}",
        again.reason("store")
    );

    // The store was wiped: the step reruns and says why, instead of silently skipping.
    std::fs::remove_file(&db).unwrap();
    let _ = std::fs::remove_file(p.store().join("docstore.sqlite-wal"));
    let _ = std::fs::remove_file(p.store().join("docstore.sqlite-shm"));
    let reload = p.run("d.yaml", &[]);
    assert_eq!(reload.step("store")["status"], "ran");
    assert!(
        reload
            .reason("store")
            .starts_with("external state changed: collection notes"),
        "{}",
        reload.reason("store")
    );
    assert_eq!(
        reload.output("store", "receipt"),
        first.output("store", "receipt"),
        "same documents, same receipt"
    );

    // Editing one note upserts by URL: still two notes, one updated.
    std::fs::write(p.path("mine/b.txt"), "Second note, edited.\n").unwrap();
    let edited = p.run("d.yaml", &[]);
    let (_, show, _) = p.exec(&[
        "artifacts",
        "show",
        &edited.output("store", "receipt"),
        "--json",
    ]);
    let meta = serde_json::from_str::<serde_json::Value>(&show).unwrap()["metadata"].clone();
    assert_eq!(
        meta["upserts"]["notes"],
        serde_json::json!({"inserted": 0, "updated": 1, "unchanged": 1}),
        "{meta}"
    );
    assert_eq!(meta["collections"]["notes"], 2);
}

#[test]
fn unsupported_store_uri_is_a_clear_error() {
    let p = Project::new();
    pipeline(&p, "docstore: {uri: \"redis://user:hunter2@localhost\"}\n");
    let out = p.run("d.yaml", &[]);
    assert_eq!(out.code, 1);
    let err = out.step("store")["error"].as_str().unwrap().to_string();
    assert!(
        err.contains("is not supported") && !err.contains("hunter2"),
        "{err}"
    );
}

#[test]
fn mongodb_store_when_available() {
    let Ok(uri) = std::env::var("CAIRN_TEST_MONGODB_URI") else {
        eprintln!("skipped: set CAIRN_TEST_MONGODB_URI (e.g. mongodb://127.0.0.1:27017/cairn_test; `docker compose up mongodb`) to test MongoDB");
        return;
    };
    if !cfg!(feature = "mongodb") {
        eprintln!("skipped: this build has no MongoDB support (cargo test --features mongodb)");
        return;
    }
    let p = Project::new();
    pipeline(&p, &format!("docstore: {{uri: \"{uri}\"}}\n"));
    let first = p.run("d.yaml", &[]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    let r = receipt(&p, &first);
    assert!(r["store"].as_str().unwrap().starts_with("mongodb"));
    let again = p.run("d.yaml", &[]);
    assert_eq!(
        again.step("store")["status"],
        "cached",
        "{}",
        again.reason("store")
    );
}
