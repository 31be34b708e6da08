//! Browsing and maintaining the store from the CLI: runs, artifacts (show, cat, lineage,
//! diff), steps, gc and fsck; and two runs sharing one store.

mod common;
use common::Project;

const PIPE: &str = r#"
name: browse
params: {word: alpha}
steps:
  src: {uses: source, with: {path: data}}
  pick:
    uses: command
    inputs: {data: src.data}
    outputs: {out: file}
    with: {run: "grep -h ${params.word} ${inputs.data}/*.txt > ${outputs.out} || true"}
  tree:
    uses: command
    inputs: {picked: pick.out}
    outputs: {dir: dir}
    with: {run: "mkdir -p ${outputs.dir}/sub && cp ${inputs.picked} ${outputs.dir}/sub/picked.txt && echo meta > ${outputs.dir}/meta.txt"}
"#;

fn project() -> Project {
    let p = Project::new();
    p.write("data/1.txt", "alpha one\nbeta two\n")
        .write("data/2.txt", "alpha three\n")
        .write("p.yaml", PIPE);
    p
}

#[test]
fn runs_and_artifacts() {
    let p = project();
    let first = p.run("p.yaml", &[]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    let second = p.run("p.yaml", &["--set", "word=beta"]);
    let run_id = second.json["run_id"].as_str().unwrap().to_string();

    let (code, ls, _) = p.exec(&["runs", "ls"]);
    assert_eq!(code, 0);
    assert!(
        ls.lines().nth(1).unwrap().starts_with(&run_id),
        "newest first:\n{ls}"
    );
    let (_, show, _) = p.exec(&["runs", "show", &run_id[..run_id.len() - 2]]);
    assert!(show.contains("param word changed alpha -> beta"), "{show}");
    let (code, _, err) = p.exec(&["runs", "show", "2"]);
    assert_eq!(code, 2, "a prefix matching two runs is ambiguous: {err}");
    assert!(err.contains("ambiguous"), "{err}");
    let (_, show_json, _) = p.exec(&["runs", "show", &run_id, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&show_json).unwrap();
    let run = v["steps"][1]["params"]["run"].as_str().unwrap();
    assert!(
        run.contains("grep -h beta"),
        "effective params are recorded: {run}"
    );

    let picked = second.output("pick", "out");
    let (_, cat, _) = p.exec(&["artifacts", "cat", &picked[..10]]);
    assert_eq!(cat, "beta two\n");
    let (_, art, _) = p.exec(&["artifacts", "ls", "--step", "pick"]);
    assert_eq!(art.lines().count(), 3, "header + two pick outputs:\n{art}");
    let (_, shown, _) = p.exec(&["artifacts", "show", &picked]);
    assert!(shown.contains("producer  pick.out in run"), "{shown}");

    // Directory artifacts: list, read a file, refuse to leave the tree.
    let tree = second.output("tree", "dir");
    let (_, files, _) = p.exec(&["artifacts", "cat", &tree]);
    assert_eq!(files, "meta.txt\nsub/picked.txt\n");
    let (_, inner, _) = p.exec(&["artifacts", "cat", &tree, "sub/picked.txt"]);
    assert_eq!(inner, "beta two\n");
    for evil in ["../../cairn.db", "/etc/passwd", "sub/../../x"] {
        let (code, _, err) = p.exec(&["artifacts", "cat", &tree, evil]);
        assert_eq!(code, 2, "{evil}: {err}");
    }

    // Lineage: tree <- pick <- src, and who consumed pick's output.
    let (_, lineage, _) = p.exec(&["artifacts", "lineage", &tree, "--json"]);
    let l: serde_json::Value = serde_json::from_str(&lineage).unwrap();
    let produced = &l["produced_by"][0];
    assert_eq!(produced["step"], "tree");
    assert_eq!(produced["inputs"]["picked"]["from"], "pick.out");
    let pick_node = &produced["inputs"]["picked"]["lineage"];
    assert_eq!(pick_node["produced_by"][0]["step"], "pick");
    assert_eq!(
        pick_node["produced_by"][0]["inputs"]["data"]["lineage"]["produced_by"][0]["step"],
        "src"
    );
    assert_eq!(pick_node["consumed_by"][0]["step"], "tree");

    let (_, diff, _) = p.exec(&["artifacts", "diff", &first.output("pick", "out"), &picked]);
    assert!(diff.contains("lines: +1 -2"), "{diff}");
    let (_, dir_diff, _) = p.exec(&["artifacts", "diff", &first.output("tree", "dir"), &tree]);
    assert!(
        dir_diff.contains("changed  sub/picked.txt") && dir_diff.contains("1 changed"),
        "{dir_diff}"
    );

    let (code, _, err) = p.exec(&["artifacts", "show", "zz"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = p.exec(&["artifacts", "show", "0000000000"]);
    assert_eq!(code, 2);
    assert!(err.contains("no artifact"), "{err}");
}

#[test]
fn steps_ls_and_show() {
    let p = Project::new();
    let (code, ls, _) = p.exec(&["steps", "ls"]);
    assert_eq!(code, 0);
    assert!(ls.contains("command") && ls.contains("source"));
    let (_, show, _) = p.exec(&["steps", "show", "command"]);
    assert!(
        show.contains("retry_backoff_ms") && show.contains("default 1000"),
        "{show}"
    );
    assert!(show.contains("run") && show.contains("required"), "{show}");
    let (code, _, err) = p.exec(&["steps", "show", "comand"]);
    assert_eq!(code, 2);
    assert!(err.contains("did you mean `command`?"), "{err}");
}

#[test]
fn gc_and_fsck() {
    let p = project();
    let first = p.run("p.yaml", &[]);
    let old_pick = first.output("pick", "out");
    let second = p.run("p.yaml", &["--set", "word=beta"]);
    assert_eq!(second.code, 0);
    let (code, out, _) = p.exec(&["fsck"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("0 problem(s)"), "{out}");

    // Keeping every run, nothing referenced goes.
    let (_, dry, _) = p.exec(&["gc", "--dry-run"]);
    assert!(dry.contains("would remove 0 object(s)"), "{dry}");
    // Keeping only the newest run drops what only the first run produced.
    let (_, dry, _) = p.exec(&["gc", "--dry-run", "--keep-runs", "1"]);
    assert!(dry.contains(&old_pick), "{dry}");
    let (code, _, _) = p.exec(&["gc", "--keep-runs", "1"]);
    assert_eq!(code, 0);
    let (code, _, _) = p.exec(&["artifacts", "cat", &old_pick]);
    assert_eq!(code, 2, "the old artifact's record and object are gone");
    let (_, cat, _) = p.exec(&["artifacts", "cat", &second.output("pick", "out")]);
    assert_eq!(cat, "beta two\n");
    let (code, out, _) = p.exec(&["fsck"]);
    assert_eq!(code, 0, "{out}");
    // The old param value now reruns (its cache entry went with the run).
    let back = p.run("p.yaml", &[]);
    assert_eq!(back.with_status("ran"), ["pick", "tree"]);

    // Corrupt an object: fsck reports it and exits 1.
    let obj = p
        .store()
        .join("objects")
        .join(&old_pick[..2])
        .join(&old_pick[2..]);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&obj, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&obj, "tampered").unwrap();
    let (code, out, _) = p.exec(&["fsck"]);
    assert_eq!(code, 1);
    assert!(out.contains("corrupted"), "{out}");
}

#[test]
fn two_runs_share_one_store() {
    let p = project();
    let bin = assert_cmd::cargo::cargo_bin("cairn");
    let children: Vec<_> = ["alpha", "beta", "one", "three"]
        .iter()
        .map(|word| {
            std::process::Command::new(&bin)
                .current_dir(p.dir.path())
                .env("CAIRN_STORE", p.store())
                .args(["run", "p.yaml", "--quiet", "--set", &format!("word={word}")])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (code, out, _) = p.exec(&["fsck"]);
    assert_eq!(code, 0, "{out}");
    let (_, runs, _) = p.exec(&["runs", "ls", "--json"]);
    let runs: serde_json::Value = serde_json::from_str(&runs).unwrap();
    assert_eq!(runs.as_array().unwrap().len(), 4);
    assert!(runs
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["run"]["status"] == "succeeded"));
    // Every combination is now cached.
    for word in ["alpha", "beta", "one", "three"] {
        let again = p.run("p.yaml", &["--set", &format!("word={word}")]);
        assert!(
            again.with_status("ran").is_empty(),
            "{word}: {:?}",
            again.statuses()
        );
    }
}

#[test]
fn regression_concurrent_runs_on_fresh_stores_are_never_locked_out() {
    // Two bugs, both "database is locked": processes opening a brand-new store raced on
    // the WAL switch and schema creation (about 1 run in 60), and concurrent `docstore`
    // upserts read before writing in a deferred transaction, which SQLite refuses to
    // upgrade once another writer got in (this test failed 5 times in 5).
    let p = project();
    p.write(
        "d.yaml",
        "name: d\nparams: {w: a}\nsteps:\n  src: {uses: source, with: {path: data}}\n  docs: {uses: ingest, inputs: {files: src.data}}\n  load: {uses: docstore, inputs: {documents: docs.documents}, with: {collection_prefix: \"${params.w}_\"}}\n",
    );
    let bin = assert_cmd::cargo::cargo_bin("cairn");
    for round in 0..12 {
        let store = p.path(&format!("fresh-{round}"));
        let children: Vec<_> = ["a", "b", "c", "d"]
            .iter()
            .map(|w| {
                std::process::Command::new(&bin)
                    .current_dir(p.dir.path())
                    .env("CAIRN_STORE", &store)
                    .args([
                        "run",
                        "d.yaml",
                        "--quiet",
                        "--json",
                        "--set",
                        &format!("w={w}"),
                    ])
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for child in children {
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "round {round}: {:?}\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
}
