//! The Slurm executor on a real single-node cluster (Debian's slurm-wlm and munge, started
//! by `scripts/slurm-local start`, which `.ci/run` does): steps submitted as jobs give the
//! same artifacts as local ones, failures carry the job's exit and log, a job past its
//! time limit fails with TIMEOUT, Ctrl-C cancels the job, a killed run loses nothing,
//! cached steps submit nothing, and steps that cannot run on a node are refused at load
//! time.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Project;

/// The cluster's slurm.conf, when one is running; else `None` with a note.
fn cluster() -> Option<PathBuf> {
    let conf = std::env::var_os("SLURM_CONF")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/cairn-slurm/slurm.conf"));
    let up = conf.exists()
        && Command::new("sinfo")
            .env("SLURM_CONF", &conf)
            .args(["-h", "-o", "%T"])
            .output()
            .is_ok_and(|o| {
                // Busy with another test's job is up too.
                let states = String::from_utf8_lossy(&o.stdout);
                o.status.success()
                    && ["idle", "mix", "alloc", "completing"]
                        .iter()
                        .any(|s| states.contains(s))
            });
    if !common::process::installed_or_skip(
        up,
        "a Slurm cluster",
        "scripts/slurm-local start, as root",
    ) {
        return None;
    }
    Some(conf)
}

const PIPELINE: &str = r#"name: slurmy
executor: {kind: EXECUTOR}
steps:
  data:
    uses: command
    executor: local
    with: {run: "seq 1 50 > ${outputs.rows}"}
    outputs: [rows]
  heavy:
    uses: command
    inputs: {rows: data.rows}
    resources: {cpus: 1, mem: 100M, time: "00:05:00"}
    outputs: {dir: dir}
    with: {run: "mkdir -p ${outputs.dir}/sub && sort -rn ${inputs.rows} > ${outputs.dir}/sub/sorted && echo ran on the node >&2"}
  count:
    uses: command
    inputs: {d: heavy.dir}
    with: {run: "wc -l < ${inputs.d}/sub/sorted > ${outputs.n}"}
    outputs: [n]
"#;

fn run(p: &Project, conf: &PathBuf, args: &[&str]) -> (i32, serde_json::Value, String) {
    let out = p
        .cmd()
        .env("SLURM_CONF", conf)
        .args(["run", "p.yaml", "--json"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        serde_json::from_slice(&out.stdout).unwrap_or_default(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn slurm_jobs_give_the_same_artifacts_as_local_steps() {
    let Some(conf) = cluster() else { return };
    let on_slurm = Project::new();
    on_slurm.write("p.yaml", &PIPELINE.replace("EXECUTOR", "slurm"));
    let local = Project::new();
    local.write("p.yaml", &PIPELINE.replace("EXECUTOR", "local"));
    let (code, a, err) = run(&on_slurm, &conf, &[]);
    assert_eq!(code, 0, "{err}");
    let (code, b, err) = run(&local, &conf, &[]);
    assert_eq!(code, 0, "{err}");
    for i in 0..3 {
        assert_eq!(
            a["steps"][i]["outputs"], b["steps"][i]["outputs"],
            "{a}\n{b}"
        );
    }
    let heavy = a["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "heavy")
        .unwrap();
    assert!(
        heavy["reason"].as_str().unwrap().contains("slurm job "),
        "{heavy}"
    );
    let data = &a["steps"][0];
    assert!(
        !data["reason"].as_str().unwrap().contains("slurm"),
        "data runs locally"
    );
    let (code, log, _) = on_slurm.exec(&["runs", "log", a["run_id"].as_str().unwrap(), "heavy"]);
    assert_eq!(code, 0);
    assert!(
        log.contains("ran on the node"),
        "the job's output is the step's log: {log}"
    );

    // A cached step never submits a job.
    let (code, again, err) = run(&on_slurm, &conf, &[]);
    assert_eq!(code, 0, "{err}");
    for step in again["steps"].as_array().unwrap() {
        assert_eq!(step["status"], "cached", "{again}");
        assert!(
            !step["reason"].as_str().unwrap().contains("slurm"),
            "{step}"
        );
    }
}

#[test]
fn a_failing_job_reports_its_error_and_ctrl_c_cancels_the_job() {
    let Some(conf) = cluster() else { return };
    let p = Project::new();
    p.write(
        "p.yaml",
        "name: failing\nexecutor: {kind: slurm}\nsteps:\n  boom:\n    uses: command\n    with: {run: \"echo going down >&2; exit 3\"}\n",
    );
    let (code, report, err) = run(&p, &conf, &[]);
    assert_eq!(code, 1, "{err}");
    let error = report["steps"][0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("exit") && error.contains("3") && error.contains("slurm job"),
        "{report}"
    );

    p.write(
        "sleep.yaml",
        "name: sleeper\nexecutor: {kind: slurm}\nsteps:\n  nap:\n    uses: command\n    with: {run: \"sleep 120\"}\n",
    );
    let mut child = Command::new(assert_cmd::cargo::cargo_bin("cairn"))
        .current_dir(p.dir.path())
        .env("CAIRN_STORE", p.store())
        .env("SLURM_CONF", &conf)
        .args(["run", "sleep.yaml", "--quiet"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let squeue = || {
        let out = Command::new("squeue")
            .env("SLURM_CONF", &conf)
            .args(["-h", "-n", "cairn-nap", "-o", "%i %T"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let started = Instant::now();
    while !squeue().contains("RUNNING") {
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "the job never ran"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    unsafe { libc_kill(child.id() as i32, 2) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1));
    assert_eq!(squeue(), "", "Ctrl-C leaves no job in the queue");
    let (_, runs, _) = p.exec(&["runs", "ls", "--json", "--limit", "1"]);
    assert!(runs.contains("\"cancelled\""), "{runs}");
}

/// Slurm's time limits are whole minutes: this job is killed after one, and the step
/// fails with TIMEOUT and the limit it asked for (a test of about a minute and a half).
#[test]
fn a_job_past_its_time_limit_fails_with_timeout() {
    let Some(conf) = cluster() else { return };
    let p = Project::new();
    p.write(
        "p.yaml",
        "name: slow\nexecutor: {kind: slurm}\nsteps:\n  crawl_forever:\n    uses: command\n    resources: {time: \"00:01:00\"}\n    with: {run: \"echo started >&2; sleep 600\"}\n",
    );
    let started = Instant::now();
    let (code, report, err) = run(&p, &conf, &[]);
    assert_eq!(code, 1, "{err}");
    let error = report["steps"][0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("TIMEOUT") && error.contains("00:01:00") && error.contains("slurm job"),
        "{report}"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(55) && waited < Duration::from_secs(300),
        "{waited:?}"
    );
}

/// A job over its `mem` is killed by Slurm (the local cluster enforces limits the way
/// clusters without cgroups do, `JobAcctGatherParams=OverMemoryKill`), and the step says it
/// ran out of memory and how much it asked for.
#[test]
fn a_job_over_its_memory_fails_as_out_of_memory() {
    let Some(conf) = cluster() else { return };
    let p = Project::new();
    p.write(
        "p.yaml",
        "name: hungry\nexecutor: {kind: slurm}\nsteps:\n  embed_everything:\n    uses: command\n    resources: {mem: 64M}\n    with: {run: \"python3 -c 'import time; x = b\\\"1\\\" * (400 << 20); time.sleep(20)'\"}\n",
    );
    let (code, report, err) = run(&p, &conf, &[]);
    assert_eq!(code, 1, "{err}");
    let error = report["steps"][0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("out of memory") && error.contains("64M") && error.contains("slurm job"),
        "{report}"
    );
}

/// `cairn run` killed (SIGKILL) while a job runs: the steps that finished before stay
/// recorded, nothing half-made is trusted, and the next run reuses them and runs the rest.
#[test]
fn a_killed_run_loses_nothing_and_the_next_run_reuses_finished_steps() {
    let Some(conf) = cluster() else { return };
    let p = Project::new();
    p.write(
        "p.yaml",
        r#"name: interrupted
executor: {kind: slurm}
steps:
  first:
    uses: command
    with: {run: "seq 1 20 > ${outputs.rows}"}
    outputs: [rows]
  second:
    uses: command
    inputs: {rows: first.rows}
    with: {run: "sleep 6; sort -rn ${inputs.rows} > ${outputs.sorted}"}
    outputs: [sorted]
"#,
    );
    let mut child = Command::new(assert_cmd::cargo::cargo_bin("cairn"))
        .current_dir(p.dir.path())
        .env("CAIRN_STORE", p.store())
        .env("SLURM_CONF", &conf)
        .args(["run", "p.yaml", "--quiet"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let running = |name: &str| {
        let out = Command::new("squeue")
            .env("SLURM_CONF", &conf)
            .args(["-h", "-n", name, "-o", "%T"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("RUNNING")
    };
    let started = Instant::now();
    while !running("cairn-second") {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the second job never ran"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let (code, report, err) = run(&p, &conf, &[]);
    assert_eq!(code, 0, "{err}");
    let status = |name: &str| {
        report["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(status("first")["status"], "cached", "{report}");
    assert_eq!(status("second")["status"], "ran", "{report}");
    assert!(
        status("second")["reason"]
            .as_str()
            .unwrap()
            .contains("slurm job"),
        "{report}"
    );
    let sorted = status("second")["outputs"]["sorted"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, sorted, _) = p.exec(&["artifacts", "cat", &sorted]);
    assert_eq!(code, 0);
    assert!(sorted.starts_with("20\n19\n"), "{sorted}");
    let (code, fsck, err) = p.exec(&["fsck"]);
    assert_eq!(code, 0, "{fsck}{err}");
    // The orphaned job of the killed run ends on its own; nothing it left is trusted.
    let started = Instant::now();
    while running("cairn-second") && started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, again, err) = run(&p, &conf, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        again["steps"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["status"] == "cached"),
        "{again}"
    );
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

#[test]
fn steps_that_belong_to_this_machine_are_refused_for_slurm_at_load_time() {
    let p = Project::new();
    p.write(
        "p.yaml",
        "name: bad\nexecutor: {kind: slurm, partition: gpu}\nsteps:\n  notes: {uses: source, with: {path: .}}\n  odd: {uses: command, executor: slurmm, with: {run: \"true\"}}\n",
    );
    let (code, _, err) = p.exec(&["validate", "p.yaml"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("p.yaml:4:")
            && err.contains("cannot run on Slurm")
            && err.contains("executor: local"),
        "{err}"
    );
    assert!(
        err.contains("unknown executor `slurmm`") && err.contains("did you mean `slurm`"),
        "{err}"
    );
}
