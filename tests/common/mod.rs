//! Test helper: a temp project folder with its own store, and the real `cairn` binary.
#![allow(dead_code)]

pub mod mock_llm;
pub mod process;
pub mod server;
pub mod serving;
pub mod static_files;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use assert_cmd::Command;
use serde_json::Value;

pub struct Project {
    pub dir: tempfile::TempDir,
}

pub struct Outcome {
    pub code: i32,
    pub json: Value,
    pub stderr: String,
}

impl Outcome {
    /// The outcome of a finished `cairn ... --json` process.
    pub fn from_output(out: &std::process::Output) -> Self {
        Outcome {
            code: out.status.code().unwrap_or(-1),
            json: serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
            stderr: String::from_utf8_lossy(&out.stderr).to_string(),
        }
    }

    /// step name -> status
    pub fn statuses(&self) -> BTreeMap<String, String> {
        self.json["steps"]
            .as_array()
            .unwrap_or_else(|| panic!("no steps in {}\nstderr: {}", self.json, self.stderr))
            .iter()
            .map(|s| {
                (
                    s["name"].as_str().unwrap().to_string(),
                    s["status"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    pub fn step(&self, name: &str) -> &Value {
        self.json["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no step {name} in {}", self.json))
    }

    pub fn reason(&self, name: &str) -> String {
        self.step(name)["reason"].as_str().unwrap().to_string()
    }

    pub fn output(&self, step: &str, output: &str) -> String {
        self.step(step)["outputs"][output]
            .as_str()
            .unwrap_or_else(|| panic!("no output {step}.{output}"))
            .to_string()
    }

    /// Steps with the given status, sorted.
    pub fn with_status(&self, status: &str) -> Vec<String> {
        self.statuses()
            .into_iter()
            .filter(|(_, s)| s == status)
            .map(|(n, _)| n)
            .collect()
    }
}

impl Project {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn store(&self) -> PathBuf {
        self.path("store")
    }

    pub fn write(&self, rel: &str, content: &str) -> &Self {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
        self
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::cargo_bin("cairn").unwrap();
        c.current_dir(self.dir.path())
            .env("CAIRN_STORE", self.store())
            .env_remove("RUST_LOG");
        c
    }

    /// `cairn run FILE --json ARGS...`
    pub fn run(&self, file: &str, args: &[&str]) -> Outcome {
        self.json_cmd("run", file, args)
    }

    /// `cairn plan FILE --json ARGS...`
    pub fn plan(&self, file: &str, args: &[&str]) -> Outcome {
        self.json_cmd("plan", file, args)
    }

    fn json_cmd(&self, verb: &str, file: &str, args: &[&str]) -> Outcome {
        let out = self
            .cmd()
            .arg(verb)
            .arg(file)
            .arg("--json")
            .args(args)
            .output()
            .unwrap();
        Outcome::from_output(&out)
    }

    /// Runs any cairn command; returns (exit code, stdout, stderr).
    pub fn exec(&self, args: &[&str]) -> (i32, String, String) {
        let out = self.cmd().args(args).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    }
}

/// A port nothing listens on right now, on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

impl Project {
    /// Starts `cairn ui --port 0 EXTRA...` on this project's store; returns the server and
    /// the start-up lines it printed (up to its address).
    pub fn start_ui(&self, extra: &[&str]) -> (process::LoopbackServer, String) {
        let mut cmd = std::process::Command::new(assert_cmd::cargo::cargo_bin("cairn"));
        cmd.current_dir(self.dir.path())
            .env("CAIRN_STORE", self.store())
            .args(["ui", "--port", "0"])
            .args(extra);
        process::LoopbackServer::announced(cmd)
    }
}

/// The repository root (pipelines and fixtures that ship with it).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `cairn run FILE --json ARGS...` from the repository root with its own store, as a user
/// runs the shipped pipelines.
pub fn run_repo_pipeline(store: &Path, file: &str, args: &[&str]) -> Outcome {
    let out = std::process::Command::new(assert_cmd::cargo::cargo_bin("cairn"))
        .current_dir(repo())
        .env("CAIRN_STORE", store)
        .env_remove("RUST_LOG")
        .args(["run", file, "--json"])
        .args(args)
        .output()
        .unwrap();
    Outcome::from_output(&out)
}

/// The metadata of artifact `digest` in `store` (`cairn artifacts show --json`).
pub fn meta_of(store: &Path, digest: &str) -> Value {
    let out = std::process::Command::new(assert_cmd::cargo::cargo_bin("cairn"))
        .env("CAIRN_STORE", store)
        .args(["artifacts", "show", digest, "--json"])
        .output()
        .unwrap();
    serde_json::from_slice::<Value>(&out.stdout).unwrap()["metadata"].clone()
}

/// `datasets.load_dataset("json", ...)` on a dataset directory: {split: [rows, columns]}.
pub fn load_with_hf_datasets(dir: &Path) -> Value {
    let python = repo().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `scripts/setup --test`",
        python.display()
    );
    let script = r#"
import json, sys, datasets
datasets.disable_progress_bars()
d = sys.argv[1]
ds = datasets.load_dataset("json", data_files={"train": d + "/train.jsonl", "test": d + "/test.jsonl"}, cache_dir=sys.argv[2])
print(json.dumps({k: [v.num_rows, sorted(v.column_names)] for k, v in ds.items()}))
"#;
    let cache = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(python)
        .args(["-c", script])
        .arg(dir)
        .arg(cache.path())
        .env("HF_DATASETS_OFFLINE", "1")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "datasets failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap()
}

/// Runs a script of the repository (`tests/parity/...`) with the project venv's Python;
/// its last stdout line as JSON. Panics with its stderr when it fails.
pub fn venv_script(script: &str, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Value {
    let python = repo().join(".venv/bin/python");
    let out = std::process::Command::new(&python)
        .arg(repo().join(script))
        .args(args.iter().map(|a| a.as_ref()))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run `scripts/setup --test` first",
                python.display()
            )
        });
    assert!(
        out.status.success(),
        "{script} failed: {}\n(`scripts/setup --test` installs the reference stack into .venv)",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .last()
        .map(|l| serde_json::from_str(l).unwrap())
        .unwrap_or(Value::Null)
}
