//! `cairn runs ...` and `cairn artifacts ...`: reading the store.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;
use serde_json::{json, Value};

use super::display::format_duration;
use super::{human_bytes, print_json, Cli, UsageError};
use crate::store::{ArtifactRecord, ObjectDigest, Store, StoreError};

/// `cairn runs`.
#[derive(Debug, Subcommand)]
pub enum RunsCommand {
    /// List runs, newest first.
    Ls {
        /// How many runs to show.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a run: every step's status, reason, duration and outputs.
    Show {
        /// Run id (or a unique prefix).
        run: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the captured log (stdout and stderr) of a step in a run.
    Log {
        /// Run id (or a unique prefix).
        run: String,
        /// Step name.
        step: String,
    },
    /// Compare runs, or the variants of a sweep, side by side: the params that differ,
    /// final and best metrics, duration and status.
    Compare(super::experiments::CompareRunsArgs),
    /// Export runs as OpenLineage events (JSON lines), optionally POSTed to a lineage
    /// server.
    Export(super::experiments::ExportArgs),
}

/// `cairn artifacts`.
#[derive(Debug, Subcommand)]
pub enum ArtifactsCommand {
    /// List artifacts, newest first.
    Ls {
        /// Only artifacts produced by this step.
        #[arg(long)]
        step: Option<String>,
        /// Only artifacts of this kind.
        #[arg(long)]
        kind: Option<String>,
        /// How many to show.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show an artifact's record and metadata.
    Show {
        /// Digest or unique prefix (8+ hex characters).
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show where an artifact came from (step, run, params, inputs, recursively) and what consumed it.
    Lineage {
        /// Digest or unique prefix (8+ hex characters).
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a file artifact's bytes, or a file inside a directory artifact.
    Cat {
        /// Digest or unique prefix (8+ hex characters).
        id: String,
        /// Path inside a directory artifact (omit to list its files).
        path: Option<String>,
    },
    /// Compare the metrics of several artifacts (models, evaluation reports) side by side.
    Compare(super::experiments::CompareArtifactsArgs),
    /// Compare two artifacts: record fields, metadata, and content.
    Diff {
        /// First artifact.
        a: String,
        /// Second artifact.
        b: String,
    },
}

fn open(cli: &Cli) -> anyhow::Result<Store> {
    Ok(Store::open_existing(&cli.store_dir())?)
}

/// Resolves a digest or prefix to an artifact record (a bad or unknown id is a usage
/// error, exit 2).
fn find(store: &Store, id: &str) -> anyhow::Result<ArtifactRecord> {
    store.resolve_artifact(id).map_err(|e| match e {
        e @ (StoreError::NotAnArtifactId(_) | StoreError::NoArtifact { .. }) => {
            UsageError(e.to_string()).into()
        }
        other => other.into(),
    })
}

/// `cairn runs ...`
pub fn runs(cli: &Cli, cmd: &RunsCommand) -> anyhow::Result<ExitCode> {
    let store = open(cli)?;
    match cmd {
        RunsCommand::Ls { limit, json } => {
            let runs = store.db().list_runs(*limit)?;
            let mut rows = Vec::new();
            for r in &runs {
                let counts = store.db().run_counts(&r.id)?;
                rows.push((r, counts));
            }
            if *json {
                let out: Vec<Value> = rows
                    .iter()
                    .map(|(r, c)| json!({"run": r, "counts": c}))
                    .collect();
                print_json(&out)?;
            } else {
                println!(
                    "{:<23} {:<20} {:<11} {:<25} steps",
                    "RUN", "PIPELINE", "STATUS", "STARTED"
                );
                for (r, c) in rows {
                    let counts = c
                        .iter()
                        .map(|(k, v)| format!("{v} {k}"))
                        .collect::<Vec<_>>()
                        .join(", ");
                    println!(
                        "{:<23} {:<20} {:<11} {:<25} {counts}",
                        r.id, r.pipeline, r.status, r.started_at
                    );
                }
            }
        }
        RunsCommand::Show { run, json } => {
            let record = store
                .db()
                .get_run(run)?
                .ok_or_else(|| UsageError(format!("no run `{run}` (see `cairn runs ls`)")))?;
            let steps = store.db().run_steps(&record.id)?;
            if *json {
                print_json(&crate::redact::redact(
                    &json!({"run": record, "steps": steps}),
                ))?;
            } else {
                println!(
                    "run {}  pipeline {}  {}",
                    record.id, record.pipeline, record.status
                );
                println!(
                    "file {}  started {}  finished {}",
                    record.pipeline_file,
                    record.started_at,
                    record.finished_at.as_deref().unwrap_or("-")
                );
                println!("args {}", crate::redact::redact(&record.args));
                println!();
                for s in steps {
                    let outputs = s
                        .outputs
                        .iter()
                        .map(|(k, o)| format!("{k}={}", o.digest.short()))
                        .collect::<Vec<_>>()
                        .join(" ");
                    println!(
                        "  {:<8} {:<20} {:>8}  {}",
                        s.status.as_str(),
                        s.step,
                        format_duration(s.duration_ms),
                        s.reason
                    );
                    if !outputs.is_empty() {
                        println!("           outputs: {outputs}");
                    }
                    if let Some(err) = &s.error {
                        for line in err.lines() {
                            println!("           | {line}");
                        }
                    }
                }
            }
        }
        RunsCommand::Compare(args) => return super::experiments::compare_runs(&store, args),
        RunsCommand::Export(args) => return super::experiments::export(&store, args),
        RunsCommand::Log { run, step } => {
            let record = store
                .db()
                .get_run(run)?
                .ok_or_else(|| UsageError(format!("no run `{run}` (see `cairn runs ls`)")))?;
            let s = store
                .db()
                .step_record(&record.id, step)?
                .ok_or_else(|| UsageError(format!("run {} has no step `{step}`", record.id)))?;
            match s.log {
                Some(d) => {
                    let bytes = std::fs::read(store.object_path(&d))?;
                    std::io::stdout().write_all(&bytes)?;
                }
                None => eprintln!("step `{step}` of run {} wrote no log", record.id),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `cairn artifacts ...`
pub fn artifacts(cli: &Cli, cmd: &ArtifactsCommand) -> anyhow::Result<ExitCode> {
    let store = open(cli)?;
    match cmd {
        ArtifactsCommand::Ls {
            step,
            kind,
            limit,
            json,
        } => {
            let list = store
                .db()
                .list_artifacts(step.as_deref(), kind.as_deref(), *limit)?;
            if *json {
                print_json(&list)?;
            } else {
                println!(
                    "{:<16} {:<10} {:>10} {:<20} {:<23} CREATED",
                    "ID", "KIND", "SIZE", "STEP", "RUN"
                );
                for a in list {
                    println!(
                        "{:<16} {:<10} {:>10} {:<20} {:<23} {}",
                        a.digest.short(),
                        a.kind,
                        human_bytes(a.size),
                        format!("{}.{}", a.producer_step, a.output),
                        a.producer_run,
                        a.created_at
                    );
                }
            }
        }
        ArtifactsCommand::Show { id, json } => {
            let a = find(&store, id)?;
            if *json {
                print_json(&a)?;
            } else {
                println!("artifact  {}", a.digest);
                println!(
                    "kind      {}{}",
                    a.kind,
                    if a.is_dir { " (directory)" } else { "" }
                );
                println!("size      {}", human_bytes(a.size));
                println!(
                    "producer  {}.{} in run {} (pipeline {})",
                    a.producer_step, a.output, a.producer_run, a.pipeline
                );
                println!("created   {}", a.created_at);
                println!("path      {}", store.object_path(&a.digest).display());
                if a.metadata.as_object().is_some_and(|m| !m.is_empty()) {
                    println!("metadata");
                    for (k, v) in a.metadata.as_object().into_iter().flatten() {
                        println!("  {k}: {v}");
                    }
                }
            }
        }
        ArtifactsCommand::Lineage { id, json } => {
            let a = find(&store, id)?;
            // Parameters are shown: secrets in them are masked.
            let tree = crate::redact::redact(&lineage(&store, &a.digest, 0)?);
            if *json {
                print_json(&tree)?;
            } else {
                print_lineage(&tree, 0);
            }
        }
        ArtifactsCommand::Cat { id, path } => {
            let a = find(&store, id)?;
            let root = store.object_path(&a.digest);
            match (a.is_dir, path) {
                (false, None) => copy_to_stdout(&root)?,
                (false, Some(_)) => {
                    return Err(UsageError(format!(
                        "artifact {} is a file; omit the path",
                        a.digest.short()
                    ))
                    .into())
                }
                // A dataset's records are its splits, train then test.
                (true, None) if a.kind == crate::dataset::KIND => {
                    for split in [crate::dataset::TRAIN_FILE, crate::dataset::TEST_FILE] {
                        copy_to_stdout(&root.join(split))?;
                    }
                }
                (true, None) => {
                    eprintln!(
                        "artifact {} is a directory; give a path. Files:",
                        a.digest.short()
                    );
                    for (f, _) in crate::store::object_files(&root) {
                        println!("{f}");
                    }
                }
                (true, Some(p)) => {
                    let target = crate::store::file_in_object(&root, p)
                        .map_err(|e| UsageError(e.to_string()))?;
                    copy_to_stdout(&target)?;
                }
            }
        }
        ArtifactsCommand::Compare(args) => {
            return super::experiments::compare_artifacts(args, |id| find(&store, id))
        }
        ArtifactsCommand::Diff { a, b } => {
            let a = find(&store, a)?;
            let b = find(&store, b)?;
            diff(&store, &a, &b)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn copy_to_stdout(path: &Path) -> anyhow::Result<()> {
    let mut f = std::fs::File::open(path)?;
    let mut out = std::io::stdout().lock();
    match std::io::copy(&mut f, &mut out) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(e.into()),
    }
}

const MAX_LINEAGE_DEPTH: usize = 32;

fn lineage(store: &Store, digest: &ObjectDigest, depth: usize) -> anyhow::Result<Value> {
    let record = store.db().find_artifact(&digest.to_hex())?;
    let uses = store.db().artifact_uses(digest)?;
    let mut produced_by = Vec::new();
    let mut consumed_by = Vec::new();
    for (run, step, direction, name) in uses {
        if direction == "in" {
            consumed_by.push(json!({"run": run, "step": step, "input": name}));
            continue;
        }
        let Some(s) = store.db().step_record(&run, &step)? else {
            continue;
        };
        // Show the first execution that produced it (later ones are cache hits).
        if !produced_by.is_empty()
            || s.status != crate::store::StepStatus::Ran
                && s.status != crate::store::StepStatus::Cached
        {
            continue;
        }
        let mut inputs = BTreeMap::new();
        for (input, r) in &s.inputs {
            let upstream = if depth < MAX_LINEAGE_DEPTH {
                lineage(store, &r.digest, depth + 1)?
            } else {
                json!("...")
            };
            inputs.insert(
                input.clone(),
                json!({"digest": r.digest.to_hex(), "from": r.from, "lineage": upstream}),
            );
        }
        produced_by.push(json!({
            "run": run, "step": step, "output": name, "kind": s.kind, "params": s.params, "inputs": inputs,
        }));
    }
    Ok(json!({
        "digest": digest.to_hex(),
        "kind": record.as_ref().map(|r| r.kind.clone()),
        "size": record.as_ref().map(|r| r.size),
        "produced_by": produced_by,
        "consumed_by": consumed_by,
    }))
}

fn print_lineage(node: &Value, indent: usize) {
    let pad = "  ".repeat(indent);
    let digest = node["digest"].as_str().unwrap_or("");
    println!(
        "{pad}{} ({})",
        &digest[..12.min(digest.len())],
        node["kind"].as_str().unwrap_or("?")
    );
    for p in node["produced_by"].as_array().into_iter().flatten() {
        println!(
            "{pad}  produced by {}.{} ({}) in run {}",
            p["step"].as_str().unwrap_or(""),
            p["output"].as_str().unwrap_or(""),
            p["kind"].as_str().unwrap_or(""),
            p["run"].as_str().unwrap_or("")
        );
        println!("{pad}  params {}", p["params"]);
        for (name, input) in p["inputs"].as_object().into_iter().flatten() {
            println!(
                "{pad}  input {name} <- {}",
                input["from"].as_str().unwrap_or("")
            );
            if input["lineage"].is_object() {
                print_lineage(&input["lineage"], indent + 2);
            }
        }
    }
    if indent == 0 {
        let consumers = node["consumed_by"].as_array().cloned().unwrap_or_default();
        if consumers.is_empty() {
            println!("  consumed by: nothing yet");
        } else {
            println!("  consumed by:");
            for c in consumers {
                println!(
                    "    {} (input {}) in run {}",
                    c["step"].as_str().unwrap_or(""),
                    c["input"].as_str().unwrap_or(""),
                    c["run"].as_str().unwrap_or("")
                );
            }
        }
    }
}

fn diff(store: &Store, a: &ArtifactRecord, b: &ArtifactRecord) -> anyhow::Result<()> {
    println!(
        "--- {} ({}.{}, run {})",
        a.digest.short(),
        a.producer_step,
        a.output,
        a.producer_run
    );
    println!(
        "+++ {} ({}.{}, run {})",
        b.digest.short(),
        b.producer_step,
        b.output,
        b.producer_run
    );
    let (pa, pb) = (store.object_path(&a.digest), store.object_path(&b.digest));
    let d = crate::store::diff::compare(a, &pa, b, &pb)?;
    if d.identical {
        println!("identical content");
        return Ok(());
    }
    if a.kind != b.kind {
        println!("kind: {} -> {}", a.kind, b.kind);
    }
    if a.size != b.size {
        println!("size: {} -> {}", human_bytes(a.size), human_bytes(b.size));
    }
    for m in &d.metadata {
        println!("metadata {}: {} -> {}", m.name, m.a, m.b);
    }
    if d.mixed {
        println!("one artifact is a directory and the other a file");
    } else if !a.is_dir {
        match d.content.first().and_then(|c| c.lines.as_ref()) {
            Some(l) => {
                println!("lines: +{} -{}", l.added, l.removed);
                print!("{}", l.unified);
            }
            None => println!("binary or large content differs"),
        }
    } else {
        let count = |kind: &str| d.content.iter().filter(|c| c.change == kind).count();
        for c in &d.content {
            println!("{:<8} {}", c.change, c.path);
        }
        println!(
            "files: {} added, {} removed, {} changed",
            count("added"),
            count("removed"),
            count("changed")
        );
    }
    Ok(())
}
