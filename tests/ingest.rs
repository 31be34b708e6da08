//! The `ingest` step end to end: a folder of mixed files -> documents, with format
//! detection, chat and Q&A parsing, JSONL fields, and dropped items counted by reason.

mod common;

use common::Project;

fn copy_fixtures(p: &Project) {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ingest");
    for entry in walkdir::WalkDir::new(&src) {
        let entry = entry.unwrap();
        let rel = entry.path().strip_prefix(&src).unwrap();
        let dest = p.path("mine").join(rel);
        if entry.file_type().is_dir() {
            std::fs::create_dir_all(&dest).unwrap();
        } else {
            std::fs::copy(entry.path(), &dest).unwrap();
        }
    }
}

#[test]
fn ingest_a_folder_of_mixed_files() {
    let p = Project::new();
    copy_fixtures(&p);
    p.write(
        "i.yaml",
        "name: ingest\nsteps:\n  mine: {uses: source, with: {path: mine}}\n  docs:\n    uses: ingest\n    inputs: {files: mine.data}\n    with: {target_speaker: Bob}\n",
    );
    let out = p.run("i.yaml", &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let (_, jsonl, _) = p.exec(&["artifacts", "cat", &out.output("docs", "documents")]);
    let docs: Vec<serde_json::Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let summary: Vec<(String, String)> = docs
        .iter()
        .map(|d| {
            (
                d["url"].as_str().unwrap().to_string(),
                d["category"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected = [
        ("file:notes/ideas.txt", "note"),
        ("file:notes/morning.md", "note"),
        ("file:notes/saved.html", "article"),
        ("https://social.example/p/1", "post"),
        ("https://social.example/p/2", "post"),
        ("file:qa_transcript.txt#1", "qa"),
        ("file:qa_transcript.txt#2", "qa"),
        ("file:whatsapp_android.txt", "chat"),
        ("file:whatsapp_ios.txt", "chat"),
    ];
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(summary, expected);
    let by_url = |u: &str| docs.iter().find(|d| d["url"] == u).unwrap();
    assert_eq!(by_url("file:notes/morning.md")["title"], "Morning pages");
    assert_eq!(
        by_url("file:notes/saved.html")["content"],
        "Saved article\n\nAn article I saved as HTML, with a paragraph long enough to keep."
    );
    assert_eq!(by_url("https://social.example/p/1")["metadata"]["likes"], 4);
    assert_eq!(by_url("file:qa_transcript.txt#2")["content"], "QUESTION: Should I publish drafts?\nANSWER: Publish notes, not drafts. A note is finished at its own small size.");
    let ios = by_url("file:whatsapp_ios.txt");
    assert_eq!(ios["metadata"]["target_speaker"], "Bob");
    assert_eq!(ios["metadata"]["target_messages"], 3);
    assert_eq!(ios["metadata"]["messages"].as_array().unwrap().len(), 5);
    assert!(ios["content"]
        .as_str()
        .unwrap()
        .starts_with("Alice: Did you finish the draft?\nBob: Almost."));

    let (_, show, _) = p.exec(&[
        "artifacts",
        "show",
        &out.output("docs", "documents"),
        "--json",
    ]);
    let meta = serde_json::from_str::<serde_json::Value>(&show).unwrap()["metadata"].clone();
    assert_eq!(meta["by_category"]["chat"], 2);
    assert_eq!(
        meta["dropped"]["unsupported file type"], 1,
        "photo.jpg: {meta}"
    );
    assert_eq!(meta["dropped"]["no string field `text`"], 1);
    assert_eq!(meta["dropped"]["JSONL line is not a JSON object"], 1);
    assert_eq!(meta["dropped"]["question without an answer"], 1);
    assert_eq!(meta["dropped"]["chat system line or media placeholder"], 5);

    // A pure function of its input: rerunning changes nothing; editing one file reruns it.
    assert!(p.run("i.yaml", &[]).with_status("ran").is_empty());
    std::fs::write(p.path("mine/notes/ideas.txt"), "Ideas, revised.\n").unwrap();
    let again = p.run("i.yaml", &[]);
    assert_eq!(again.with_status("ran"), ["docs", "mine"]);
}

#[test]
fn ingest_rejects_bad_params() {
    let p = Project::new();
    p.write("i.yaml", "name: bad\nsteps:\n  mine: {uses: source, with: {path: x}}\n  docs:\n    uses: ingest\n    inputs: {file: mine.data}\n    with: {format: pdf}\n");
    let (code, _, err) = p.exec(&["validate", "i.yaml"]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown variant `pdf`"), "{err}");
    assert!(
        err.contains("unknown input `file`") && err.contains("did you mean `files`?"),
        "{err}"
    );
    assert!(err.contains("missing required input `files`"), "{err}");
}
