//! The generic step kinds: `command` (shell and argv forms, env export, logs, failures,
//! timeout, retries) and user step specs from `steps/*.yaml`.

mod common;
use common::Project;

#[test]
fn command_exports_env_and_captures_logs() {
    let p = Project::new();
    p.write("in.txt", "abc\n").write(
        "p.yaml",
        r#"
name: env
params: {greeting: hi}
steps:
  src: {uses: source, with: {path: in.txt}}
  show:
    uses: command
    inputs: {raw-text: src.data}
    outputs: {out: file}
    with:
      env: {EXTRA: "x${params.greeting}"}
      run: |
        echo "stdout line"
        echo "stderr line" >&2
        printf '%s|%s|%s|%s\n' "$(cat $CAIRN_INPUT_RAW_TEXT)" "$CAIRN_PARAM_GREETING" "$EXTRA" "$CAIRN_STEP" > "$CAIRN_OUTPUT_OUT"
  argv:
    uses: command
    inputs: {text: src.data}
    outputs: {copy: file}
    with:
      run: [cp, "${inputs.text}", "${outputs.copy}"]
"#,
    );
    let out = p.run("p.yaml", &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let (_, cat, _) = p.exec(&["artifacts", "cat", &out.output("show", "out")]);
    assert_eq!(cat, "abc|hi|xhi|show\n");
    let (_, copy, _) = p.exec(&["artifacts", "cat", &out.output("argv", "copy")]);
    assert_eq!(copy, "abc\n");
    let run_id = out.json["run_id"].as_str().unwrap();
    let (code, log, _) = p.exec(&["runs", "log", run_id, "show"]);
    assert_eq!(code, 0);
    assert!(
        log.contains("stdout line") && log.contains("stderr line"),
        "{log}"
    );
}

#[test]
fn failure_skips_downstream_is_never_cached_and_shows_stderr() {
    let p = Project::new();
    let flag = p.path("fixed");
    p.write(
        "p.yaml",
        &format!(
            r#"
name: fail
steps:
  bad:
    uses: command
    outputs: {{out: file}}
    with:
      run: "if [ -e {flag} ]; then echo ok > ${{outputs.out}}; else echo 'model file is corrupt' >&2; exit 3; fi"
  after:
    uses: command
    inputs: {{x: bad.out}}
    outputs: {{out: file}}
    with: {{run: "cp ${{inputs.x}} ${{outputs.out}}"}}
  independent:
    uses: command
    outputs: {{out: file}}
    with: {{run: "echo fine > ${{outputs.out}}"}}
"#,
            flag = flag.display()
        ),
    );
    let out = p.run("p.yaml", &[]);
    assert_eq!(out.code, 1);
    assert_eq!(out.json["status"], "failed");
    assert_eq!(out.step("bad")["status"], "failed");
    let err = out.step("bad")["error"].as_str().unwrap();
    assert!(
        err.contains("exit status 3") && err.contains("model file is corrupt"),
        "{err}"
    );
    assert_eq!(out.step("after")["status"], "skipped");
    assert_eq!(out.reason("after"), "upstream step bad failed");
    assert_eq!(
        out.step("independent")["status"],
        "ran",
        "independent branches still run"
    );
    // The failure was not cached: fixing the cause makes it run and succeed.
    std::fs::write(&flag, "").unwrap();
    let again = p.run("p.yaml", &[]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(again.with_status("ran"), ["after", "bad"]);
}

#[test]
fn missing_output_timeout_and_retries() {
    let p = Project::new();
    let counter = p.path("attempts");
    p.write(
        "p.yaml",
        &format!(
            r#"
name: edge
steps:
  lazy:
    uses: command
    outputs: {{out: file}}
    with: {{run: "true"}}
  slow:
    uses: command
    outputs: {{out: file}}
    with: {{run: "sleep 5; echo > ${{outputs.out}}", timeout: 0.3}}
  flaky:
    uses: command
    outputs: {{out: file}}
    with:
      retries: 3
      retry_backoff_ms: 10
      run: "echo x >> {c}; [ $(wc -l < {c}) -ge 3 ] && echo done > ${{outputs.out}}"
"#,
            c = counter.display()
        ),
    );
    let out = p.run("p.yaml", &[]);
    assert_eq!(out.code, 1);
    let lazy = out.step("lazy")["error"].as_str().unwrap().to_string();
    assert!(
        lazy.contains("did not create declared output `out`"),
        "{lazy}"
    );
    let slow = out.step("slow")["error"].as_str().unwrap().to_string();
    assert!(slow.contains("timed out after 0.3s"), "{slow}");
    assert!(
        out.step("slow")["duration_ms"].as_u64().unwrap() < 4000,
        "the timeout killed the process"
    );
    assert_eq!(out.step("flaky")["status"], "ran", "{}", out.stderr);
    assert_eq!(
        common::read(&counter).lines().count(),
        3,
        "two failures, then success"
    );
}

#[test]
fn user_step_spec_with_typed_params() {
    let p = Project::new();
    p.write(
        "steps/repeat.yaml",
        r#"
description: Repeat each line N times
inputs: {text: file}
outputs: {out: file}
params:
  times: {type: integer, default: 2, doc: how often}
  sep: {type: string, default: "-"}
run: "awk -v n=${params.times} -v s=$CAIRN_PARAM_SEP '{for (i = 0; i < n; i++) printf \"%s%s\", $0, s; print \"\"}' ${inputs.text} > ${outputs.out}"
"#,
    )
    .write("in.txt", "ab\n")
    .write(
        "pipelines/p.yaml",
        r#"
name: spec
params: {n: 3}
steps:
  src: {uses: source, with: {path: in.txt}}
  rep:
    uses: ./steps/repeat.yaml
    inputs: {text: src.data}
    with: {times: "${params.n}"}
"#,
    );
    let out = p.run("pipelines/p.yaml", &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let (_, cat, _) = p.exec(&["artifacts", "cat", &out.output("rep", "out")]);
    assert_eq!(cat, "ab-ab-ab-\n");
    assert_eq!(
        p.run("pipelines/p.yaml", &[]).with_status("ran"),
        Vec::<String>::new()
    );
    // Editing the spec invalidates its results, and says so.
    let spec =
        common::read(&p.path("steps/repeat.yaml")).replace("default: \"-\"", "default: \"+\"");
    p.write("steps/repeat.yaml", &spec);
    let edited = p.run("pipelines/p.yaml", &[]);
    assert_eq!(edited.with_status("ran"), ["rep"]);
    assert_eq!(
        edited.reason("rep"),
        "step spec ./steps/repeat.yaml changed"
    );
    // A wrong type for a spec param is an input error.
    let bad = p.run("pipelines/p.yaml", &["--set", "n=lots"]);
    assert_eq!(bad.code, 2);
    assert!(
        bad.stderr
            .contains("parameter `times` must be an integer, got \"lots\""),
        "{}",
        bad.stderr
    );
}

#[test]
fn ctrl_c_cancels_running_steps_and_kills_their_processes() {
    let p = Project::new();
    let marker = p.path("still-running");
    let started = p.path("started");
    p.write(
        "p.yaml",
        &format!(
            "name: cancel\nsteps:\n  long:\n    uses: command\n    outputs: {{o: file}}\n    with: {{run: \"touch {s}; sleep 20; touch {m}; echo > ${{outputs.o}}\"}}\n  after:\n    uses: command\n    inputs: {{x: long.o}}\n    outputs: {{o: file}}\n    with: {{run: \"cp ${{inputs.x}} ${{outputs.o}}\"}}\n",
            m = marker.display(),
            s = started.display()
        ),
    );
    let child = std::process::Command::new(assert_cmd::cargo::cargo_bin("cairn"))
        .current_dir(p.dir.path())
        .env("CAIRN_STORE", p.store())
        .args(["run", "p.yaml", "--json", "--quiet"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Interrupt only once the step's program is really running.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !started.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the step never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let sent = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let t0 = std::time::Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(10),
        "Ctrl-C must not wait for the step to finish"
    );
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["status"], "cancelled");
    let steps = report["steps"].as_array().unwrap();
    assert_eq!(steps[0]["status"], "failed");
    assert_eq!(steps[0]["error"], "cancelled");
    assert_eq!(steps[1]["status"], "skipped");
    // The program's whole process group was killed: no process still runs its command line.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let needle = marker.display().to_string();
    let survivors: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&needle))
        .collect();
    assert!(
        survivors.is_empty(),
        "still running after Ctrl-C: {survivors:?}"
    );
    assert!(!marker.exists());
    let (_, runs, _) = p.exec(&["runs", "ls", "--json"]);
    assert!(runs.contains("\"cancelled\""), "{runs}");
}
