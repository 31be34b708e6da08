//! Crash safety: `kill -9` a run at random moments; the store must stay consistent
//! (fsck clean) and the next run must reuse every step that finished before the kill.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::Project;

const STEPS: usize = 24;

fn pipeline() -> String {
    let mut y = String::from("name: crash\nsteps:\n");
    for i in 0..STEPS {
        // A mix of file and directory outputs, each step a little slow; every third step
        // also consumes the previous one, so the graph has both chains and parallel work.
        let input = if i % 3 == 2 {
            format!("    inputs: {{prev: s{}.out}}\n", i - 1)
        } else {
            String::new()
        };
        let (kind, body) = if i % 2 == 0 {
            ("file", format!("seq 1 {} > ${{outputs.out}}", 1000 + i))
        } else {
            ("dir", format!("mkdir -p ${{outputs.out}}/a && seq 1 {} > ${{outputs.out}}/a/n && echo {i} > ${{outputs.out}}/id", 500 + i))
        };
        y.push_str(&format!(
            "  s{i}:\n    uses: command\n{input}    outputs: {{out: {kind}}}\n    with: {{run: \"sleep 0.05; {body}\"}}\n"
        ));
    }
    y
}

/// Tiny deterministic-per-seed generator (no extra dev-dependency needed).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, bound: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % bound
    }
}

fn ran_steps(p: &Project, run_id: &str) -> BTreeSet<String> {
    let (_, out, _) = p.exec(&["runs", "show", run_id, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] == "ran")
        .map(|s| s["step"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn kill_9_at_random_moments_then_resume() {
    let p = Project::new();
    p.write("c.yaml", &pipeline());
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("crash test seed {seed}");
    let mut rng = Lcg(seed);
    let bin = assert_cmd::cargo::cargo_bin("cairn");
    let mut finished_before = BTreeSet::new();
    let mut partial_kills = 0;
    for round in 0..6 {
        let mut child = std::process::Command::new(&bin)
            .current_dir(p.dir.path())
            .env("CAIRN_STORE", p.store())
            .args(["run", "c.yaml", "--quiet", "--jobs", "2"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(40 + rng.next(260)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        let (code, out, err) = p.exec(&["fsck"]);
        assert_eq!(
            code, 0,
            "round {round}: fsck after kill -9 (seed {seed}):\n{out}{err}"
        );
        let (_, runs, _) = p.exec(&["runs", "ls", "--json", "--limit", "1"]);
        let runs: serde_json::Value = serde_json::from_str(&runs).unwrap_or_default();
        if let Some(id) = runs[0]["run"]["id"].as_str() {
            let ran = ran_steps(&p, id);
            if !ran.is_empty() && ran.len() < STEPS {
                partial_kills += 1;
            }
            finished_before.extend(ran);
        }
    }
    eprintln!(
        "partial kills: {partial_kills}, steps finished before the last run: {}",
        finished_before.len()
    );
    let last = p.run("c.yaml", &["--jobs", "2"]);
    assert_eq!(
        last.code, 0,
        "resume after kills (seed {seed}): {}",
        last.stderr
    );
    let reran: BTreeSet<String> = last.with_status("ran").into_iter().collect();
    let wasted: Vec<_> = reran.intersection(&finished_before).collect();
    assert!(
        wasted.is_empty(),
        "steps that finished before a kill ran again: {wasted:?} (seed {seed})"
    );
    assert_eq!(reran.len() + last.with_status("cached").len(), STEPS);
    assert!(
        partial_kills > 0 || finished_before.is_empty() || finished_before.len() == STEPS,
        "no kill landed mid-run; the test did not exercise a crash (seed {seed})"
    );
    // Results are right, whatever the kills interrupted.
    let (_, n, _) = p.exec(&["artifacts", "cat", &last.output("s1", "out"), "a/n"]);
    assert_eq!(n.lines().count(), 501);
    let (code, out, _) = p.exec(&["fsck"]);
    assert_eq!(code, 0, "{out}");
    let (_, runs, _) = p.exec(&["runs", "ls", "--json"]);
    let runs: serde_json::Value = serde_json::from_str(&runs).unwrap();
    assert!(
        runs.as_array()
            .unwrap()
            .iter()
            .all(|r| r["run"]["status"] != "running"),
        "killed runs are marked interrupted"
    );
}
