//! `cairn steps ...`, `cairn gc`, `cairn fsck`, `cairn hash`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::Value;

use super::{human_bytes, Cli, Failed, UsageError};
use crate::steps;
use crate::store::{hash as content_hash, Access, Store};
use crate::util::suggest::did_you_mean;

/// `cairn steps`.
#[derive(Debug, Subcommand)]
pub enum StepsCommand {
    /// List the built-in step kinds.
    Ls,
    /// Show a step kind's parameters with types, defaults and docs.
    Show {
        /// Step kind (see `cairn steps ls`).
        kind: String,
    },
}

/// `cairn gc`.
#[derive(Debug, Args)]
pub struct GcArgs {
    /// List what would be removed; remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Also drop run records beyond the newest N runs of each pipeline (and what only they reference).
    #[arg(long, value_name = "N")]
    pub keep_runs: Option<usize>,
    /// Also delete the resumable checkpoints of unfinished `finetune` runs (a rerun with
    /// the same settings then starts from step 0).
    #[arg(long)]
    pub checkpoints: bool,
    /// Collect the remote instead (`--remote-url` or $CAIRN_REMOTE): delete objects no
    /// remote cache entry needs.
    #[arg(long)]
    pub remote: bool,
    /// The remote for `--remote`.
    #[arg(long, value_name = "URL", requires = "remote")]
    pub remote_url: Option<String>,
}

/// `cairn hash`.
#[derive(Debug, Args)]
pub struct HashArgs {
    /// Files or folders.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
}

/// `cairn steps ...`
pub fn steps(cmd: &StepsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        StepsCommand::Ls => {
            for s in steps::REGISTRY {
                println!("{:<12} v{:<3} {}", s.kind(), s.version(), s.summary());
            }
            println!("\nUser step specs: `uses: ./steps/NAME.yaml` (see README, \"Step specs\").");
        }
        StepsCommand::Show { kind } => {
            let step = steps::lookup(kind).ok_or_else(|| {
                let hint = did_you_mean(kind, steps::kinds())
                    .map(|h| format!(" ({h})"))
                    .unwrap_or_default();
                UsageError(format!(
                    "unknown step kind `{kind}`{hint}; see `cairn steps ls`"
                ))
            })?;
            println!(
                "{} (version {}){}",
                step.kind(),
                step.version(),
                if step.volatile() {
                    ", volatile: runs every time"
                } else {
                    ""
                }
            );
            println!("{}\n", step.summary());
            print_params(&step.params_schema());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn schema_type(schema: &Value) -> String {
    if let Some(t) = schema.get("type") {
        return match t {
            Value::Array(ts) => ts
                .iter()
                .filter_map(|t| t.as_str())
                .filter(|t| *t != "null")
                .collect::<Vec<_>>()
                .join("|"),
            Value::String(s) => s.clone(),
            _ => "any".into(),
        };
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(alts) = schema.get(key).and_then(|a| a.as_array()) {
            return alts
                .iter()
                .map(schema_type)
                .filter(|t| t != "null")
                .collect::<Vec<_>>()
                .join(" | ");
        }
    }
    if let Some(r) = schema.get("$ref").and_then(|r| r.as_str()) {
        return r.rsplit('/').next().unwrap_or("object").to_string();
    }
    "any".into()
}

fn print_properties(schema: &Value, indent: &str) {
    let required: Vec<&str> = schema["required"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str())
        .collect();
    for (name, p) in schema["properties"].as_object().into_iter().flatten() {
        let ty = schema_type(p);
        let default = match p.get("default") {
            Some(Value::Array(items)) if Value::Array(items.clone()).to_string().len() > 40 => {
                let shown: Vec<String> = items.iter().take(6).map(|v| v.to_string()).collect();
                format!("default {} values: {}, ...", items.len(), shown.join(", "))
            }
            Some(d) if d.to_string().len() > 40 => "default: the fields below".to_string(),
            // `Option` fields: unset unless given.
            Some(Value::Null) => "optional".into(),
            Some(d) => format!("default {d}"),
            None if required.contains(&name.as_str()) => "required".into(),
            None => "optional".into(),
        };
        println!("{indent}{name:<22} {ty:<16} {default}");
        if let Some(doc) = p.get("description").and_then(|d| d.as_str()) {
            for line in doc.lines() {
                println!("{indent}    {line}");
            }
        }
    }
}

fn print_params(schema: &Value) {
    if schema["properties"]
        .as_object()
        .is_none_or(|p| p.is_empty())
    {
        println!("(no parameters)");
        return;
    }
    println!("Parameters (under `with:`):");
    print_properties(schema, "  ");
    for (name, def) in schema
        .get("$defs")
        .and_then(|d| d.as_object())
        .into_iter()
        .flatten()
    {
        println!();
        let doc = def
            .get("description")
            .and_then(|d| d.as_str())
            .unwrap_or("");
        println!("  {name}: {}", doc.replace('\n', " "));
        if def.get("properties").is_some() {
            print_properties(def, "    ");
        }
        let alternatives = def
            .get("oneOf")
            .or_else(|| def.get("anyOf"))
            .and_then(|a| a.as_array());
        for alt in alternatives.into_iter().flatten() {
            let value = alt
                .get("const")
                .or_else(|| alt.get("enum").and_then(|e| e.get(0)));
            if let (Some(v), Some(d)) = (value, alt.get("description").and_then(|d| d.as_str())) {
                println!("    {:<24} {}", v.to_string(), d.replace('\n', " "));
            }
        }
        if let Some(values) = def.get("enum").and_then(|e| e.as_array()) {
            let list: Vec<String> = values.iter().map(|v| v.to_string()).collect();
            println!("    one of: {}", list.join(", "));
        }
    }
}

/// `cairn gc`.
pub fn gc(cli: &Cli, args: &GcArgs) -> anyhow::Result<ExitCode> {
    if args.remote {
        return super::remote::gc_remote(args.remote_url.as_deref(), args.dry_run);
    }
    let store = Store::open(&cli.store_dir(), Access::Exclusive)?;
    let report = store.gc(args.keep_runs, args.dry_run)?;
    let verb = if args.dry_run {
        "would remove"
    } else {
        "removed"
    };
    if !report.dropped_runs.is_empty() {
        println!(
            "{} {} run record(s): {}",
            if args.dry_run {
                "would drop"
            } else {
                "dropped"
            },
            report.dropped_runs.len(),
            report.dropped_runs.join(", ")
        );
    }
    if args.dry_run {
        for d in &report.removed {
            println!("{d}");
        }
    }
    let checkpoints = store.training_checkpoints();
    if !checkpoints.is_empty() {
        let bytes: u64 = checkpoints.iter().map(|(_, b)| b).sum();
        if args.checkpoints {
            if !args.dry_run {
                for (dir, _) in &checkpoints {
                    std::fs::remove_dir_all(dir)
                        .map_err(|e| anyhow::anyhow!("removing {}: {e}", dir.display()))?;
                }
            }
            println!(
                "{verb} {} unfinished training checkpoint folder(s), {}",
                checkpoints.len(),
                human_bytes(bytes)
            );
        } else {
            println!(
                "kept {} unfinished training checkpoint folder(s), {} (rerun the training to resume, or `cairn gc --checkpoints` to delete them)",
                checkpoints.len(),
                human_bytes(bytes)
            );
        }
    }
    println!(
        "{verb} {} object(s), {}; kept {}{}",
        report.removed.len(),
        human_bytes(report.freed_bytes),
        report.kept,
        if report.stale_temp > 0 {
            format!("; cleaned {} stale temp folder(s)", report.stale_temp)
        } else {
            String::new()
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// Options of `cairn fsck`.
#[derive(Debug, clap::Args)]
pub struct FsckArgs {
    /// Move corrupted objects to `<store>/quarantine/`: the steps that produced them make
    /// them again on the next run.
    #[arg(long)]
    pub repair: bool,
    /// Check the remote instead (`--remote-url` or $CAIRN_REMOTE): every cache entry's
    /// objects present and whole.
    #[arg(long, conflicts_with = "repair")]
    pub remote: bool,
    /// The remote for `--remote`.
    #[arg(long, value_name = "URL", requires = "remote")]
    pub remote_url: Option<String>,
}

/// `cairn fsck`.
pub fn fsck(cli: &Cli, args: &FsckArgs) -> anyhow::Result<ExitCode> {
    if args.remote {
        return super::remote::fsck_remote(args.remote_url.as_deref());
    }
    let store = Store::open_existing(&cli.store_dir())?;
    let report = store.fsck(args.repair)?;
    for p in &report.problems {
        println!("problem: {p}");
    }
    for moved in &report.repaired {
        println!(
            "repaired: moved to {} (the next run makes it again)",
            moved.display()
        );
    }
    println!(
        "checked {} object(s): {} problem(s), {} repaired, {} unreferenced (gc frees them)",
        report.checked,
        report.problems.len(),
        report.repaired.len(),
        report.unreferenced
    );
    let left = report.problems.len() - report.repaired.len();
    if left == 0 {
        return Ok(ExitCode::SUCCESS);
    }
    let hint = if args.repair {
        ""
    } else {
        " (`cairn fsck --repair` quarantines corrupted objects)"
    };
    Err(Failed(format!("{left} problem(s) found{hint}")).into())
}

/// `cairn hash`.
pub fn hash(args: &HashArgs) -> anyhow::Result<ExitCode> {
    for path in &args.paths {
        let digest = content_hash::hash_path(path)
            .map_err(|e| UsageError(format!("cannot hash {}: {e}", path.display())))?;
        println!("{digest}  {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
