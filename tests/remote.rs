//! The shared cache on a real S3 API on 127.0.0.1 (moto's server, from PyPI, installed by
//! `scripts/setup --test`): machine A runs and pushes, machine B (an empty store) runs the
//! same pipeline and executes nothing, byte-identical; a corrupted remote object is
//! refused; concurrent pushes leave a consistent remote; an unreachable remote lets the
//! run go on locally and says why; `pull`, `push`, `remote status`, `gc --remote`.

mod common;

use std::process::{Child, Command};
use std::time::Duration;

use common::process::{installed_or_skip, LoopbackServer};
use common::{free_port, repo, Project};
use serde_json::Value;

/// Starts moto's S3 server and creates bucket `cairn`; `None` (with a note) when it is
/// not installed outside CI.
fn moto() -> Option<LoopbackServer> {
    let server = repo().join(".venv/bin/moto_server");
    if !installed_or_skip(server.exists(), "moto's S3 server", "scripts/setup --test") {
        return None;
    }
    let port = free_port();
    let mut cmd = Command::new(&server);
    cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
    let moto = LoopbackServer::on_port(cmd, port, Duration::from_secs(10));
    s3(&moto, "s3.create_bucket(Bucket='cairn')");
    Some(moto)
}

/// Runs boto3 code against the server (`s3` is the client).
fn s3(moto: &LoopbackServer, code: &str) -> String {
    let script = format!(
        "import boto3\ns3 = boto3.client('s3', endpoint_url='{}', aws_access_key_id='x', aws_secret_access_key='y', region_name='us-east-1')\n{code}\n",
        moto.url
    );
    let out = Command::new(repo().join(".venv/bin/python"))
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

const SECRET: &str = "s3cr3t-key-that-must-not-leak-123456";

/// A machine: a project folder with its own store.
fn machine() -> Project {
    let p = Project::new();
    p.write(
        "p.yaml",
        r#"name: shared
params: {lines: 200}
steps:
  data:
    uses: command
    with: {run: "seq 1 ${params.lines} > ${outputs.rows}"}
    outputs: [rows]
  tree:
    uses: command
    inputs: {rows: data.rows}
    outputs: {dir: dir}
    with: {run: "mkdir -p ${outputs.dir}/sub/empty && cp ${inputs.rows} ${outputs.dir}/rows.txt && printf '#!/bin/sh\necho hi\n' > ${outputs.dir}/sub/run.sh && chmod +x ${outputs.dir}/sub/run.sh && ln -s rows.txt ${outputs.dir}/link && head -c 17000000 /dev/zero | tr '\\0' 'z' > ${outputs.dir}/big.bin && mkdir ${outputs.dir}/many && for i in $(seq 300); do echo $i > ${outputs.dir}/many/$i; done"}
  count:
    uses: command
    inputs: {tree: tree.dir}
    with: {run: "wc -l < ${inputs.tree}/rows.txt > ${outputs.n}"}
    outputs: [n]
"#,
    );
    p
}

fn cairn(p: &Project, moto_endpoint: &str, args: &[&str]) -> (i32, String, String) {
    let out = p
        .cmd()
        .env("AWS_ACCESS_KEY_ID", "x")
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT", moto_endpoint)
        .env("AWS_ALLOW_HTTP", "true")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn run_json(p: &Project, endpoint: &str, args: &[&str]) -> (i32, Value, String) {
    let mut all = vec!["run", "p.yaml", "--json"];
    all.extend_from_slice(args);
    let (code, out, err) = cairn(p, endpoint, &all);
    (code, serde_json::from_str(&out).unwrap_or(Value::Null), err)
}

fn statuses(report: &Value) -> Vec<(String, String)> {
    report["steps"]
        .as_array()
        .unwrap_or_else(|| panic!("{report}"))
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn outputs(report: &Value) -> Vec<Value> {
    report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["outputs"].clone())
        .collect()
}

const REMOTE: &str = "s3://cairn/team";

#[test]
fn a_second_machine_reuses_everything_from_the_remote_and_bad_bytes_are_refused() {
    let Some(moto) = moto() else { return };
    let e = moto.url.clone();
    let a = machine();
    let (code, first, err) = run_json(&a, &e, &["--remote", REMOTE]);
    assert_eq!(code, 0, "{err}");
    assert!(statuses(&first).iter().all(|(_, s)| s == "ran"), "{first}");
    assert_eq!(first["remote"]["entries_pushed"], 3, "{first}");
    assert!(first["remote"]["pushed"]["bytes"].as_u64().unwrap() > 17_000_000);

    // Machine B: empty store, same remote: nothing executes, the bytes are identical.
    let b = machine();
    let (code, second, err) = run_json(&b, &e, &["--remote", REMOTE]);
    assert_eq!(code, 0, "{err}");
    assert!(
        statuses(&second).iter().all(|(_, s)| s == "cached"),
        "{second}"
    );
    for step in second["steps"].as_array().unwrap() {
        assert!(
            step["reason"]
                .as_str()
                .unwrap()
                .starts_with("cached (remote)"),
            "{step}"
        );
    }
    assert_eq!(outputs(&first), outputs(&second));
    assert_eq!(second["remote"]["hits"], 3);
    let tree = second["steps"][1]["outputs"]["dir"].as_str().unwrap();
    let (_, listing, _) = cairn(&b, &e, &["artifacts", "cat", tree]);
    assert!(
        listing.contains("sub/run.sh") && listing.contains("big.bin"),
        "{listing}"
    );
    let (code, fsck, _) = cairn(&b, &e, &["fsck"]);
    assert_eq!(code, 0, "the fetched objects hash to their digests: {fsck}");
    // The next run on B hits locally.
    let (_, third, _) = run_json(&b, &e, &["--remote", REMOTE]);
    assert!(third["steps"][0]["reason"]
        .as_str()
        .unwrap()
        .starts_with("unchanged since run"));

    // A corrupted remote object is refused: machine C runs the step itself.
    let rows = first["steps"][0]["outputs"]["rows"]
        .as_str()
        .unwrap()
        .to_string();
    s3(
        &moto,
        &format!("s3.put_object(Bucket='cairn', Key='team/objects/{rows}', Body=b'tampered\\n')"),
    );
    let c = machine();
    let (code, fourth, err) = run_json(&c, &e, &["--remote", REMOTE]);
    assert_eq!(code, 0, "{err}");
    let data = &fourth["steps"][0];
    assert_eq!(data["status"], "ran", "{fourth}");
    let reason = data["reason"].as_str().unwrap();
    assert!(
        reason.contains("does not match its digest")
            && reason.contains(&format!("team/objects/{rows}")),
        "{reason}"
    );
    assert_eq!(
        data["outputs"]["rows"],
        rows.as_str(),
        "the right bytes, made locally"
    );
    assert_eq!(fourth["steps"][2]["status"], "cached", "{fourth}");

    let all = format!("{first}{second}{fourth}{err}");
    assert!(!all.contains(SECRET), "credentials never appear");
    let (_, shown, _) = cairn(
        &b,
        &e,
        &["runs", "show", third["run_id"].as_str().unwrap(), "--json"],
    );
    assert!(!shown.contains(SECRET));
}

#[test]
fn concurrent_pushes_leave_a_consistent_remote_and_pull_push_status_gc_work() {
    let Some(moto) = moto() else { return };
    let e = moto.url.clone();
    let remote = "s3://cairn/race";
    let d = machine();
    let f = machine();
    let (mut x, mut y) = (spawn_child(&d, &e, remote), spawn_child(&f, &e, remote));
    assert!(x.wait().unwrap().success());
    assert!(y.wait().unwrap().success());
    let (code, out, err) = cairn(&d, &e, &["fsck", "--remote", "--remote-url", remote]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("checked 3 cache entries") && out.contains("0 problems"),
        "{out}"
    );

    // pull: an empty store fetches what the plan needs and executes nothing.
    let g = machine();
    let (code, out, err) = cairn(&g, &e, &["pull", "p.yaml", "--remote", remote, "--json"]);
    assert_eq!(code, 0, "{err}");
    let pulled: Value = serde_json::from_str(&out).unwrap();
    assert!(
        statuses(&pulled).iter().all(|(_, s)| s == "cached"),
        "{pulled}"
    );
    let (_, local, _) = run_json(&g, &e, &[]);
    assert!(
        statuses(&local).iter().all(|(_, s)| s == "cached"),
        "{local}"
    );
    // ... and skips what the remote lacks, with what depends on it.
    let (code, out, _) = cairn(
        &g,
        &e,
        &[
            "pull", "p.yaml", "--remote", remote, "--set", "lines=7", "--json",
        ],
    );
    assert_eq!(code, 0);
    let missing: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(missing["steps"][0]["status"], "skipped", "{missing}");
    assert_eq!(missing["steps"][0]["reason"], "not in the remote cache");

    // A run without pushing, then `cairn push`; `remote status` sees the difference.
    let (code, _, err) = run_json(
        &g,
        &e,
        &["--remote", remote, "--no-push", "--set", "lines=9"],
    );
    assert_eq!(code, 0, "{err}");
    let (_, status, _) = cairn(&g, &e, &["remote", "status", "--remote", remote, "--json"]);
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["cache_entries"]["local_only"], 3, "{status}");
    let (code, out, err) = cairn(&g, &e, &["push", "--all", "--remote", remote, "--json"]);
    assert_eq!(code, 0, "{err}");
    let pushed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(pushed["entries_written"], 3, "{pushed}");
    let (_, status, _) = cairn(&g, &e, &["remote", "status", "--remote", remote, "--json"]);
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["cache_entries"]["local_only"], 0, "{status}");

    // gc --remote removes only what no entry needs.
    s3(
        &moto,
        &format!(
            "s3.put_object(Bucket='cairn', Key='race/objects/{}', Body=b'orphan')",
            "ab".repeat(32)
        ),
    );
    let (code, out, err) = cairn(&g, &e, &["gc", "--remote", "--remote-url", remote]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("removed 1 objects"), "{out}");
    let (code, out, _) = cairn(&g, &e, &["fsck", "--remote", "--remote-url", remote]);
    assert_eq!(code, 0, "{out}");
}

fn spawn_child(p: &Project, endpoint: &str, remote: &str) -> Child {
    std::process::Command::new(assert_cmd::cargo::cargo_bin("cairn"))
        .current_dir(p.dir.path())
        .env("CAIRN_STORE", p.store())
        .env("AWS_ACCESS_KEY_ID", "x")
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT", endpoint)
        .env("AWS_ALLOW_HTTP", "true")
        .args(["run", "p.yaml", "--remote", remote, "--quiet"])
        .spawn()
        .unwrap()
}

#[test]
fn an_unreachable_remote_skips_with_the_reason_and_the_run_goes_on() {
    let p = Project::new();
    p.write(
        "p.yaml",
        "name: offline\nsteps:\n  a: {uses: command, with: {run: \"echo a > ${outputs.o}\"}, outputs: [o]}\n  b: {uses: command, inputs: {x: a.o}, with: {run: \"cat ${inputs.x} > ${outputs.o}\"}, outputs: [o]}\n",
    );
    let closed = format!("http://127.0.0.1:{}", free_port());
    let (code, report, err) = run_json(&p, &closed, &["--remote", "s3://cairn/x"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        statuses(&report).iter().all(|(_, s)| s == "ran"),
        "{report}"
    );
    let skipped = report["remote"]["skipped"].as_str().unwrap_or_default();
    assert!(skipped.contains("s3://cairn/x"), "{report}");
    assert!(
        report["steps"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("remote skipped"),
        "{report}"
    );
    let (code, _, err) = cairn(&p, &closed, &["run", "p.yaml", "--remote", "ftp://nowhere"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unsupported scheme `ftp:`"), "{err}");
}

/// Starts Azurite, Microsoft's Azure Storage emulator (npm, installed by
/// `scripts/setup --test`), serving blobs from memory on a free port, with container
/// `cairn`; `None` (with a note) when it is not installed outside CI.
fn azurite() -> Option<LoopbackServer> {
    let server = repo().join(".azurite/node_modules/.bin/azurite-blob");
    if !installed_or_skip(
        server.exists(),
        "Azurite",
        "scripts/setup --test, needs npm",
    ) {
        return None;
    }
    let port = free_port();
    let mut cmd = Command::new(&server);
    cmd.args(["--inMemoryPersistence", "--silent", "--skipApiVersionCheck"])
        .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()]);
    let azurite = LoopbackServer::on_port(cmd, port, Duration::from_secs(30));
    let made = Command::new("python3")
        .arg(repo().join("tests/parity/azurite.py"))
        .args([&azurite.url, "cairn"])
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    Some(azurite)
}

/// Azurite's published development account key: the emulator takes no other.
const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

fn cairn_on_azure(p: &Project, azurite: &LoopbackServer, args: &[&str]) -> (i32, String, String) {
    let out = p
        .cmd()
        .env("AZURE_STORAGE_USE_EMULATOR", "true")
        .env("AZURITE_BLOB_STORAGE_URL", &azurite.url)
        .env("AZURE_STORAGE_ACCOUNT_NAME", "devstoreaccount1")
        .env("AZURE_STORAGE_ACCOUNT_KEY", AZURITE_KEY)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn azure_blob_storage_shares_the_cache_between_machines() {
    let Some(azurite) = azurite() else { return };
    let remote = "az://cairn/team";
    let run = |p: &Project| {
        let (code, out, err) = cairn_on_azure(
            p,
            &azurite,
            &["run", "p.yaml", "--json", "--remote", remote],
        );
        assert_eq!(code, 0, "{err}");
        (serde_json::from_str::<Value>(&out).unwrap(), err)
    };
    let a = machine();
    let (first, err_a) = run(&a);
    assert!(statuses(&first).iter().all(|(_, s)| s == "ran"), "{first}");
    assert_eq!(first["remote"]["entries_pushed"], 3, "{first}");
    // The 17 MB file went up in blocks (multipart).
    assert!(first["remote"]["pushed"]["bytes"].as_u64().unwrap() > 17_000_000);

    let b = machine();
    let (second, err_b) = run(&b);
    for step in second["steps"].as_array().unwrap() {
        assert_eq!(step["status"], "cached", "{second}");
        assert!(
            step["reason"]
                .as_str()
                .unwrap()
                .starts_with("cached (remote)"),
            "{step}"
        );
    }
    assert_eq!(outputs(&first), outputs(&second));
    let (code, fsck, _) = cairn_on_azure(&b, &azurite, &["fsck"]);
    assert_eq!(code, 0, "the fetched objects hash to their digests: {fsck}");
    // Pushing again skips what the container has; the entries' conditional puts find
    // theirs there and leave them.
    let (code, pushed, err) = cairn_on_azure(&a, &azurite, &["push", "--all", "--remote", remote]);
    assert_eq!(code, 0, "{err}");
    let (code, fsck, err) =
        cairn_on_azure(&a, &azurite, &["fsck", "--remote", "--remote-url", remote]);
    assert_eq!(code, 0, "{fsck}{err}");

    let all = format!("{first}{second}{err_a}{err_b}{pushed}{fsck}{err}");
    assert!(!all.contains(AZURITE_KEY), "the account key never appears");
}
