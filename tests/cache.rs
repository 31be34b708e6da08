//! Cache semantics on diamond and wide DAGs: cold run, no-op rerun, a param change in the
//! middle, revert, early cutoff, partial runs and real parallelism.

mod common;
use common::Project;

/// src -> (upper, words) -> report; `upper` uses params `case` and `noise`.
const DIAMOND: &str = r#"
name: diamond
params: {case: upper, noise: 1, lines: 2}
steps:
  src:
    uses: source
    with: {path: data}
  upper:
    uses: command
    inputs: {text: src.data}
    outputs: {out: file}
    with:
      # `noise` changes the command but not its output: exercises early cutoff.
      run: "cat ${inputs.text}/*.txt | tr '[:lower:]' '[:${params.case}:]' > ${outputs.out} # ${params.noise}"
  words:
    uses: command
    inputs: {text: src.data}
    outputs: {out: file}
    with:
      run: "cat ${inputs.text}/*.txt | wc -w | tr -d ' ' > ${outputs.out}"
  report:
    uses: command
    inputs: {upper: upper.out, words: words.out}
    outputs: {out: file}
    with:
      run: "head -n ${params.lines} ${inputs.upper} > ${outputs.out}; cat ${inputs.words} >> ${outputs.out}"
"#;

fn diamond() -> Project {
    let p = Project::new();
    p.write("data/a.txt", "hello world\nfrom my blog\n")
        .write("data/b.txt", "second post\n")
        .write("p.yaml", DIAMOND);
    p
}

#[test]
fn cold_noop_change_revert() {
    let p = diamond();
    let cold = p.run("p.yaml", &[]);
    assert_eq!(cold.code, 0, "{}", cold.stderr);
    assert_eq!(cold.with_status("ran"), ["report", "src", "upper", "words"]);
    assert_eq!(cold.reason("upper"), "no earlier result");
    let report = cold.output("report", "out");
    let (_, cat, _) = p.exec(&["artifacts", "cat", &report]);
    assert_eq!(cat, "HELLO WORLD\nFROM MY BLOG\n7\n");

    let noop = p.run("p.yaml", &[]);
    assert_eq!(
        noop.with_status("cached"),
        ["report", "src", "upper", "words"],
        "{}",
        noop.stderr
    );
    assert!(
        noop.reason("src").starts_with("source unchanged"),
        "{}",
        noop.reason("src")
    );

    // A param only `report` uses: only report reruns.
    let changed = p.run("p.yaml", &["--set", "lines=1"]);
    assert_eq!(changed.with_status("ran"), ["report"]);
    assert_eq!(changed.reason("report"), "param lines changed 2 -> 1");

    // A param in the middle: upper and report rerun, words stays cached.
    let mid = p.run("p.yaml", &["--set", "case=lower"]);
    assert_eq!(mid.with_status("ran"), ["report", "upper"]);
    assert_eq!(mid.with_status("cached"), ["src", "words"]);
    assert_eq!(mid.reason("upper"), "param case changed upper -> lower");
    // Compared with the last run (lines=1), two things changed for report.
    assert_eq!(
        mid.reason("report"),
        "param lines changed 1 -> 2; input upper changed (from step upper)"
    );

    // Back to the file's values: everything comes from the cache, nothing executes.
    let revert = p.run("p.yaml", &[]);
    assert_eq!(
        revert.with_status("cached"),
        ["report", "src", "upper", "words"]
    );
    assert_eq!(revert.output("report", "out"), report);

    // Explained against the step's last execution, cache hits included (the revert), not
    // against the last one that ran (case=lower, lines=1).
    let again = p.run("p.yaml", &["--set", "lines=3"]);
    assert_eq!(again.with_status("ran"), ["report"]);
    assert_eq!(again.reason("report"), "param lines changed 2 -> 3");
}

#[test]
fn early_cutoff_stops_the_wave() {
    let p = diamond();
    assert_eq!(p.run("p.yaml", &[]).code, 0);
    let out = p.run("p.yaml", &["--set", "noise=2"]);
    assert_eq!(out.with_status("ran"), ["upper"], "{}", out.stderr);
    assert_eq!(out.step("report")["status"], "cached");
    assert!(
        out.reason("report")
            .starts_with("early cutoff: upper reran"),
        "{}",
        out.reason("report")
    );
}

#[test]
fn source_edits_rerun_and_touch_does_not() {
    let p = diamond();
    assert_eq!(p.run("p.yaml", &[]).code, 0);
    // Same bytes, new mtime: rehashed, identical digest, nothing below reruns.
    let a = p.path("data/a.txt");
    let content = std::fs::read(&a).unwrap();
    std::fs::write(&a, &content).unwrap();
    let touched = p.run("p.yaml", &[]);
    assert_eq!(
        touched.with_status("ran"),
        Vec::<String>::new(),
        "{}",
        touched.stderr
    );
    std::fs::write(&a, "new words here\n").unwrap();
    let edited = p.run("p.yaml", &[]);
    assert_eq!(
        edited.with_status("ran"),
        ["report", "src", "upper", "words"]
    );
    assert!(edited.reason("src").starts_with("source changed"));
}

#[test]
fn partial_runs_only_from_force() {
    let p = diamond();
    // A selection naming no step, before any run: exit 2, and no store is left behind.
    let typo = p.run("p.yaml", &["--only", "reprot"]);
    assert_eq!(typo.code, 2, "{}", typo.stderr);
    assert!(!p.store().exists());
    // --only on an empty store: upstream outputs are missing -> clear error, exit 2.
    let missing = p.run("p.yaml", &["--only", "report"]);
    assert_eq!(missing.code, 2);
    assert!(
        missing.stderr.contains("need the outputs of `src`"),
        "{}",
        missing.stderr
    );

    assert_eq!(p.run("p.yaml", &[]).code, 0);
    let only = p.run("p.yaml", &["--only", "report", "--force", "report"]);
    assert_eq!(only.with_status("ran"), ["report"]);
    assert_eq!(only.reason("report"), "forced");
    assert!(only
        .reason("upper")
        .starts_with("not selected; outputs from the cache"));

    let from = p.run("p.yaml", &["--from", "upper", "--set", "case=lower"]);
    assert_eq!(from.with_status("ran"), ["report", "upper"]);
    assert_eq!(from.with_status("skipped"), ["src", "words"]);

    // Forcing a step that reproduces its output: downstream stays cached.
    let forced = p.run("p.yaml", &["--force", "words"]);
    assert_eq!(forced.with_status("ran"), ["words"]);
    assert!(forced.reason("report").starts_with("early cutoff"));

    let all = p.run("p.yaml", &["--force-all"]);
    assert_eq!(all.with_status("ran").len(), 4);

    let typo = p.run("p.yaml", &["--only", "reprot"]);
    assert_eq!(typo.code, 2);
    assert!(
        typo.stderr.contains("did you mean `report`?"),
        "{}",
        typo.stderr
    );
}

#[test]
fn plan_explains_without_executing() {
    let p = diamond();
    let fresh = p.plan("p.yaml", &[]);
    assert_eq!(fresh.code, 0, "{}", fresh.stderr);
    assert_eq!(fresh.json["status"], "planned");
    assert!(fresh.statuses().values().all(|s| s == "will_run"));
    assert!(!p.store().exists(), "plan must not create a store");

    assert_eq!(p.run("p.yaml", &[]).code, 0);
    let plan = p.plan("p.yaml", &["--set", "case=lower"]);
    assert_eq!(plan.step("upper")["status"], "will_run");
    assert_eq!(plan.reason("upper"), "param case changed upper -> lower");
    assert_eq!(plan.step("words")["status"], "cached");
    assert_eq!(
        plan.reason("report"),
        "input upper will be recomputed by step upper"
    );
    // The plan executed nothing: a real run still has to do the work.
    let run = p.run("p.yaml", &["--set", "case=lower"]);
    assert_eq!(run.with_status("ran"), ["report", "upper"]);
    let dry = p.run("p.yaml", &["--dry-run", "--set", "case=upper"]);
    assert_eq!(dry.json["status"], "planned");
    assert_eq!(dry.json["run_id"], serde_json::Value::Null);
}

#[test]
fn wide_dag_change_one_branch() {
    let p = Project::new();
    let mut yaml = String::from("name: wide\nparams: {k3: 3}\nsteps:\n");
    let n = 24;
    for i in 0..n {
        let value = if i == 3 {
            "${params.k3}".to_string()
        } else {
            i.to_string()
        };
        yaml.push_str(&format!(
            "  b{i}:\n    uses: command\n    outputs: {{out: file}}\n    with: {{run: \"echo {value} > ${{outputs.out}}\"}}\n"
        ));
    }
    yaml.push_str("  sum:\n    uses: command\n    inputs:\n");
    for i in 0..n {
        yaml.push_str(&format!("      i{i}: b{i}.out\n"));
    }
    yaml.push_str("    outputs: {total: file}\n    with: {run: \"cat ");
    for i in 0..n {
        yaml.push_str(&format!("${{inputs.i{i}}} "));
    }
    yaml.push_str("| awk '{s += $1} END {print s}' > ${outputs.total}\"}\n");
    p.write("w.yaml", &yaml);
    let cold = p.run("w.yaml", &["--jobs", "4"]);
    assert_eq!(cold.code, 0, "{}", cold.stderr);
    assert_eq!(cold.with_status("ran").len(), n + 1);
    let total: i64 = (0..n as i64).sum();
    let (_, cat, _) = p.exec(&["artifacts", "cat", &cold.output("sum", "total")]);
    assert_eq!(cat.trim(), total.to_string());
    let change = p.run("w.yaml", &["--set", "k3=100"]);
    assert_eq!(change.with_status("ran"), ["b3", "sum"]);
    assert_eq!(change.with_status("cached").len(), n - 1);
}

#[test]
fn independent_steps_really_overlap() {
    // Each step waits until the other has started: this only finishes when they run at
    // the same time; with one job at a time both time out.
    let p = Project::new();
    let flags = p.path("flags");
    std::fs::create_dir_all(&flags).unwrap();
    let step = |me: &str, other: &str| {
        format!(
            "  {me}:\n    uses: command\n    outputs: {{out: file}}\n    with:\n      timeout: 4\n      run: \"touch {f}/{me}; while [ ! -e {f}/{other} ]; do sleep 0.02; done; echo ok > ${{outputs.out}}\"\n",
            f = flags.display()
        )
    };
    p.write(
        "par.yaml",
        &format!(
            "name: par\nsteps:\n{}{}",
            step("left", "right"),
            step("right", "left")
        ),
    );
    let out = p.run("par.yaml", &["--jobs", "2"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.with_status("ran"), ["left", "right"]);

    std::fs::remove_dir_all(&flags).unwrap();
    std::fs::create_dir_all(&flags).unwrap();
    let serial = p.run("par.yaml", &["--jobs", "1", "--force-all"]);
    assert_eq!(serial.code, 1, "with one job the rendezvous cannot happen");
    assert!(
        serial.step("left")["error"]
            .as_str()
            .unwrap_or("")
            .contains("timed out")
            || serial.step("right")["error"]
                .as_str()
                .unwrap_or("")
                .contains("timed out")
    );
}

/// Regression (core issue): pipeline params used to enter the cache key of every step
/// by name, so renaming one (same value) reran built-in steps too ("configuration
/// changed"). Only `command` steps read them by name (CAIRN_PARAM_*), so only they rerun.
#[test]
fn renaming_a_param_reruns_only_the_commands_that_export_it() {
    let pipeline = |category: &str, label: &str| {
        format!(
            r#"
name: rename
params: {{{category}: note, {label}: hello}}
steps:
  notes: {{uses: source, with: {{path: notes}}}}
  docs:
    uses: ingest
    inputs: {{files: notes.data}}
    with: {{category: "${{params.{category}}}"}}
  greet:
    uses: command
    outputs: {{out: file}}
    with: {{run: "echo ${{params.{label}}} > ${{outputs.out}}"}}
  count:
    uses: command
    inputs: {{docs: docs.documents}}
    outputs: [out]
    with: {{run: "wc -l < ${{inputs.docs}} > ${{outputs.out}}"}}
"#
        )
    };
    let p = Project::new();
    p.write("notes/a.md", "# A note\n\nSome words worth keeping.\n")
        .write("p.yaml", &pipeline("category", "label"));
    let cold = p.run("p.yaml", &[]);
    assert_eq!(cold.code, 0, "{}", cold.stderr);
    assert_eq!(cold.with_status("ran"), ["count", "docs", "greet", "notes"]);

    p.write("p.yaml", &pipeline("kind", "greeting"));
    let renamed = p.run("p.yaml", &[]);
    assert_eq!(renamed.code, 0, "{}", renamed.stderr);
    assert_eq!(renamed.with_status("ran"), ["greet"], "{}", renamed.stderr);
    assert_eq!(renamed.with_status("cached"), ["count", "docs", "notes"]);
    // The value is unchanged, so the output is too.
    assert_eq!(renamed.output("greet", "out"), cold.output("greet", "out"));
}

/// `outputs: [out]`, the list form DVC users write, declares files.
#[test]
fn outputs_may_be_a_list_of_file_names() {
    let p = Project::new();
    p.write(
        "p.yaml",
        "name: list\nsteps:\n  a:\n    uses: command\n    outputs: [one, two]\n    with: {run: \"echo 1 > ${outputs.one}; echo 2 > ${outputs.two}\"}\n",
    );
    let run = p.run("p.yaml", &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let (_, two, _) = p.exec(&["artifacts", "cat", &run.output("a", "two")]);
    assert_eq!(two, "2\n");
    let (_, listing, _) = p.exec(&["artifacts", "ls", "--step", "a"]);
    assert_eq!(listing.matches(" file ").count(), 2, "{listing}");

    p.write(
        "q.yaml",
        "name: twice\nsteps:\n  a:\n    uses: command\n    outputs: [one, one]\n    with: {run: \"true\"}\n",
    );
    let (code, _, err) = p.exec(&["validate", "q.yaml"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("output `one` is listed twice"), "{err}");
}

/// A no-op rerun records each cache hit as a pointer to the execution it repeats, and
/// reads back the same records; a hit whose record would differ (an upstream step renamed
/// without changing what it computes) is recorded whole and becomes what later hits
/// point to.
#[test]
fn cache_hits_are_stored_as_pointers_and_read_back_whole() {
    let p = diamond();
    let show = |run: &common::Outcome| -> Vec<serde_json::Value> {
        let id = run.json["run_id"].as_str().unwrap();
        let (code, out, err) = p.exec(&["runs", "show", id, "--json"]);
        assert_eq!(code, 0, "{err}");
        let mut steps = serde_json::from_str::<serde_json::Value>(&out).unwrap()["steps"]
            .as_array()
            .unwrap()
            .clone();
        steps.sort_by_key(|s| s["step"].as_str().unwrap().to_string());
        steps
    };
    let shared = |step: &serde_json::Value| {
        let fields = [
            "step",
            "kind",
            "cache_key",
            "params",
            "param_refs",
            "inputs",
            "outputs",
        ];
        fields.map(|f| step[f].clone())
    };
    let pointer_rows = |run: &common::Outcome| -> i64 {
        let conn = rusqlite::Connection::open(p.store().join("cairn.db")).unwrap();
        conn.query_row(
            "SELECT COUNT(*) FROM step_rows WHERE run_id = ?1 AND same_as IS NOT NULL AND params IS NULL",
            [run.json["run_id"].as_str().unwrap()],
            |r| r.get(0),
        )
        .unwrap()
    };
    let cold = p.run("p.yaml", &[]);
    assert_eq!(cold.code, 0, "{}", cold.stderr);
    let noop = p.run("p.yaml", &[]);
    assert_eq!(noop.with_status("cached").len(), 4, "{}", noop.stderr);
    assert_eq!(pointer_rows(&noop), 4);
    let (cold_steps, noop_steps) = (show(&cold), show(&noop));
    for (c, n) in cold_steps.iter().zip(&noop_steps) {
        assert_eq!(shared(c), shared(n));
        assert_eq!(n["status"], "cached");
        assert_eq!(n["run_id"], noop.json["run_id"]);
    }

    // `words` renamed `counts`: every key stays, so everything is cached, but `report`'s
    // input now comes from `counts.out` and `counts` has no history under its name.
    p.write(
        "p.yaml",
        &DIAMOND
            .replace("  words:", "  counts:")
            .replace("words.out", "counts.out"),
    );
    let renamed = p.run("p.yaml", &[]);
    assert_eq!(renamed.with_status("cached").len(), 4, "{}", renamed.stderr);
    assert_eq!(pointer_rows(&renamed), 2, "src and upper are unchanged");
    let report = |steps: &[serde_json::Value]| {
        steps.iter().find(|s| s["step"] == "report").unwrap()["inputs"]["words"]["from"].clone()
    };
    assert_eq!(report(&show(&renamed)), "counts.out");
    let again = p.run("p.yaml", &[]);
    assert_eq!(pointer_rows(&again), 4);
    assert_eq!(report(&show(&again)), "counts.out");
}

fn snapshot_files(p: &Project) -> Vec<std::path::PathBuf> {
    match std::fs::read_dir(p.store().join("pipelines")) {
        Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

/// `run` keeps a snapshot of the resolved pipeline in the store and loads it instead of
/// parsing the file again, keyed by the file's bytes and the `--set` values: tampering
/// with the snapshot shows it is what the next run used; editing the file or changing a
/// `--set` is never served a stale one; a damaged snapshot is ignored; `gc` drops them.
#[test]
fn resolved_pipeline_snapshots_are_reused_only_for_the_same_file_and_sets() {
    let p = diamond();
    let cold = p.run("p.yaml", &[]);
    assert_eq!(cold.code, 0, "{}", cold.stderr);
    // The run that creates the store keeps one already: the first rerun reads it.
    assert_eq!(snapshot_files(&p).len(), 1);
    let noop = p.run("p.yaml", &[]);
    assert_eq!(noop.with_status("cached").len(), 4, "{}", noop.stderr);
    let snapshots = snapshot_files(&p);
    assert_eq!(snapshots.len(), 1, "{snapshots:?}");
    let report = p
        .exec(&["artifacts", "cat", &noop.output("report", "out")])
        .1;
    assert_eq!(report, "HELLO WORLD\nFROM MY BLOG\n7\n");

    let text = std::fs::read_to_string(&snapshots[0]).unwrap();
    assert!(text.contains("head -n 2"), "{text}");
    std::fs::write(&snapshots[0], text.replace("head -n 2", "head -n 1")).unwrap();
    let tampered = p.run("p.yaml", &[]);
    assert_eq!(
        tampered.with_status("ran"),
        ["report"],
        "{}",
        tampered.stderr
    );
    let report = p
        .exec(&["artifacts", "cat", &tampered.output("report", "out")])
        .1;
    assert_eq!(report, "HELLO WORLD\n7\n");

    // Another `--set`, then an edit of the file: each loads what it says.
    let set = p.run("p.yaml", &["--set", "lines=2"]);
    assert_eq!(set.output("report", "out"), noop.output("report", "out"));
    p.write("p.yaml", &DIAMOND.replace("lines: 2", "lines: 3"));
    let edited = p.run("p.yaml", &[]);
    assert_eq!(edited.with_status("ran"), ["report"], "{}", edited.stderr);
    let report = p
        .exec(&["artifacts", "cat", &edited.output("report", "out")])
        .1;
    assert_eq!(report, "HELLO WORLD\nFROM MY BLOG\nSECOND POST\n7\n");
    assert_eq!(snapshot_files(&p).len(), 3);

    for snapshot in snapshot_files(&p) {
        std::fs::write(snapshot, "{ not json").unwrap();
    }
    let damaged = p.run("p.yaml", &[]);
    assert_eq!(damaged.code, 0, "{}", damaged.stderr);
    assert_eq!(damaged.with_status("cached").len(), 4, "{}", damaged.stderr);
    assert_eq!(
        damaged.output("report", "out"),
        edited.output("report", "out")
    );

    let (code, _, err) = p.exec(&["gc"]);
    assert_eq!(code, 0, "{err}");
    assert!(snapshot_files(&p).is_empty());
}

/// A pipeline holding a value that records mask (a password given with `--set`) is never
/// written to a snapshot.
#[test]
fn pipelines_with_secrets_are_not_snapshotted() {
    let p = Project::new();
    p.write(
        "p.yaml",
        r#"
name: secret
params: {api_key: none}
steps:
  greet:
    uses: command
    outputs: {out: file}
    with: {run: "echo ${params.api_key} | wc -c > ${outputs.out}"}
"#,
    );
    for _ in 0..2 {
        let run = p.run("p.yaml", &["--set", "api_key=sk-live-123"]);
        assert_eq!(run.code, 0, "{}", run.stderr);
    }
    assert!(snapshot_files(&p).is_empty());
    let plain = Project::new();
    plain.write("p.yaml", DIAMOND).write("data/a.txt", "x\n");
    for _ in 0..2 {
        assert_eq!(plain.run("p.yaml", &[]).code, 0);
    }
    assert_eq!(
        snapshot_files(&plain).len(),
        1,
        "the same pipeline without a secret is"
    );
}

/// On a pipeline big enough that outputs are checked ahead on another thread, a cached
/// output that disappeared from the store is noticed: only its step runs again (and what
/// reads it is cut off early, its input being made again the same).
#[test]
fn missing_outputs_are_noticed_when_checked_ahead() {
    let mut yaml = String::from("name: wide\nsteps:\n");
    for i in 0..80 {
        yaml.push_str(&format!(
            "  s{i}:\n    uses: command\n    outputs: {{out: file}}\n    with: {{run: \"echo {i} > ${{outputs.out}}\"}}\n"
        ));
    }
    yaml.push_str("  last:\n    uses: command\n    inputs: {x: s79.out}\n    outputs: {out: file}\n    with: {run: \"cat ${inputs.x} > ${outputs.out}; echo last >> ${outputs.out}\"}\n");
    let p = Project::new();
    p.write("p.yaml", &yaml);
    let cold = p.run("p.yaml", &[]);
    assert_eq!(cold.code, 0, "{}", cold.stderr);
    assert_eq!(p.run("p.yaml", &[]).with_status("cached").len(), 81);
    for step in ["s3", "s40", "s79"] {
        let digest = cold.output(step, "out");
        let path = p
            .store()
            .join("objects")
            .join(&digest[..2])
            .join(&digest[2..]);
        std::fs::remove_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    let rerun = p.run("p.yaml", &[]);
    assert_eq!(rerun.code, 0, "{}", rerun.stderr);
    assert_eq!(
        rerun.with_status("ran"),
        ["s3", "s40", "s79"],
        "{}",
        rerun.stderr
    );
    assert_eq!(rerun.with_status("cached").len(), 78);
}

/// The path of object `digest` in the project's store, made writable (as a disk error, a
/// stray editor or another program could change it).
fn writable_object(p: &Project, digest: &str, inner: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = p
        .store()
        .join("objects")
        .join(&digest[..2])
        .join(&digest[2..]);
    let path = if inner.is_empty() {
        path
    } else {
        path.join(inner)
    };
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    path
}

/// A step never reads an object whose bytes do not match its digest: the step fails
/// naming it, the object goes to quarantine, and the next run makes it again from the
/// step that produced it. Covers a changed file inside a folder object, a changed file
/// object and a truncated one.
#[test]
fn corrupted_objects_are_never_fed_to_a_step_and_the_next_run_heals_them() {
    let p = diamond();
    let cold = p.run("p.yaml", &[]);
    assert_eq!(cold.code, 0, "{}", cold.stderr);
    let good_report = cold.output("report", "out");

    // A file inside `src`'s folder object: `upper` reruns (new case) and would read it.
    let src = cold.output("src", "data");
    std::fs::write(writable_object(&p, &src, "b.txt"), "sekond post\n").unwrap();
    let caught = p.run("p.yaml", &["--set", "case=lower"]);
    assert_eq!(caught.code, 1, "{}", caught.stderr);
    assert_eq!(caught.step("upper")["status"], "failed");
    let error = caught.step("upper")["error"].as_str().unwrap().to_string();
    assert!(
        error.contains(&format!("input `text`: object {src} is corrupted"))
            && error.contains("quarantine"),
        "{error}"
    );
    assert_eq!(caught.step("report")["status"], "skipped");
    assert!(p.store().join("quarantine").read_dir().unwrap().count() == 1);
    // The source step makes its output again; `upper` then reads the right bytes.
    let healed = p.run("p.yaml", &["--set", "case=lower"]);
    assert_eq!(healed.code, 0, "{}", healed.stderr);
    let (_, lower, _) = p.exec(&["artifacts", "cat", &healed.output("upper", "out")]);
    assert_eq!(lower, "hello world\nfrom my blog\nsecond post\n");

    // A file object changed, then one cut short: `report` reruns (new line count) and
    // would read `upper.out`; the next run remakes it with `upper`.
    let upper = cold.output("upper", "out");
    for (damage, round) in [
        ("HELLO WORLD\nFROM MY BLoG\nSECOND POST\n", 3),
        ("HELLO", 4),
    ] {
        std::fs::write(writable_object(&p, &upper, ""), damage).unwrap();
        let lines = round.to_string();
        let set = format!("lines={lines}");
        let caught = p.run("p.yaml", &["--set", &set]);
        assert_eq!(caught.code, 1, "{}", caught.stderr);
        let error = caught.step("report")["error"].as_str().unwrap().to_string();
        assert!(
            error.contains(&format!("input `upper`: object {upper} is corrupted")),
            "{error}"
        );
        let healed = p.run("p.yaml", &["--set", &set]);
        assert_eq!(healed.code, 0, "{}", healed.stderr);
        assert_eq!(
            healed.with_status("ran"),
            ["report", "upper"],
            "{}",
            healed.stderr
        );
        assert_eq!(healed.output("upper", "out"), upper);
    }
    let back = p.run("p.yaml", &[]);
    assert_eq!(back.output("report", "out"), good_report);
}
