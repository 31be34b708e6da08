//! `cairn runs compare`, `cairn artifacts compare` and `cairn runs export --openlineage`:
//! argument parsing and formatting around `crate::experiments`.

use std::io::Write;
use std::process::ExitCode;

use clap::Args;
use serde_json::Value;

use super::{print_json, UsageError};
use crate::experiments::compare::{self, Table};
use crate::experiments::openlineage;
use crate::store::{RunRecord, Store};

/// How a comparison is printed.
#[derive(Args, Debug)]
pub struct Format {
    /// Only these metrics (comma-separated; `rouge_l` finds `rouge_l_f1`, `perplexity`
    /// finds `baseline.perplexity` too). Default: the usual training and evaluation ones
    /// that any row has.
    #[arg(long, value_delimiter = ',')]
    metrics: Vec<String>,
    /// Sort rows by this metric or param (ascending; missing values last).
    #[arg(long)]
    sort: Option<String>,
    /// Sort descending.
    #[arg(long, requires = "sort")]
    desc: bool,
    /// Print JSON (every param and metric of every row).
    #[arg(long, conflicts_with_all = ["csv", "md"])]
    json: bool,
    /// Print CSV.
    #[arg(long, conflicts_with = "md")]
    csv: bool,
    /// Print a Markdown table (for a report).
    #[arg(long)]
    md: bool,
}

/// `cairn runs compare`.
#[derive(Args, Debug)]
pub struct CompareRunsArgs {
    /// Run ids (or unique prefixes). Without any, `--pipeline` picks the runs.
    runs: Vec<String>,
    /// Compare the latest runs of this pipeline.
    #[arg(long, conflicts_with = "runs")]
    pipeline: Option<String>,
    /// How many of the pipeline's latest runs.
    #[arg(long, default_value_t = 1, requires = "pipeline")]
    last: usize,
    #[command(flatten)]
    format: Format,
}

/// `cairn artifacts compare`.
#[derive(Args, Debug)]
pub struct CompareArtifactsArgs {
    /// Artifact digests or unique prefixes (models, evaluation reports).
    #[arg(required = true)]
    ids: Vec<String>,
    #[command(flatten)]
    format: Format,
}

/// `cairn runs export`.
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Run ids (or unique prefixes).
    #[arg(required = true)]
    runs: Vec<String>,
    /// Write OpenLineage run events (the only format so far), one JSON object per line.
    #[arg(long, required = true)]
    openlineage: bool,
    /// The OpenLineage namespace of the jobs.
    #[arg(long, default_value = "cairn")]
    namespace: String,
    /// Also POST each event to this lineage endpoint (e.g. Marquez's
    /// http://localhost:5000/api/v1/lineage).
    #[arg(long)]
    emit: Option<String>,
}

fn find_run(store: &Store, id: &str) -> anyhow::Result<RunRecord> {
    Ok(store
        .db()
        .get_run(id)?
        .ok_or_else(|| UsageError(format!("no run `{id}` (see `cairn runs ls`)")))?)
}

/// `cairn runs compare ...`
pub fn compare_runs(store: &Store, args: &CompareRunsArgs) -> anyhow::Result<ExitCode> {
    let runs = match &args.pipeline {
        Some(pipeline) => {
            let runs = store
                .db()
                .list_runs_page(Some(pipeline), None, args.last.max(1), 0)?;
            if runs.is_empty() {
                let known = store.db().pipelines()?;
                return Err(UsageError(format!(
                    "no runs of pipeline `{pipeline}` (pipelines with runs: {})",
                    if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    }
                ))
                .into());
            }
            runs
        }
        None if args.runs.is_empty() => {
            return Err(
                UsageError("name runs to compare, or `--pipeline NAME [--last N]`".into()).into(),
            )
        }
        None => args
            .runs
            .iter()
            .map(|id| find_run(store, id))
            .collect::<anyhow::Result<_>>()?,
    };
    let mut table = compare::runs(store, &runs, &args.format.metrics)?;
    print(&mut table, &args.format)
}

/// `cairn artifacts compare ...`
pub fn compare_artifacts(
    args: &CompareArtifactsArgs,
    find: impl Fn(&str) -> anyhow::Result<crate::store::ArtifactRecord>,
) -> anyhow::Result<ExitCode> {
    let artifacts = args
        .ids
        .iter()
        .map(|id| find(id))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut table = compare::artifacts(&artifacts, &args.format.metrics);
    print(&mut table, &args.format)
}

fn print(table: &mut Table, format: &Format) -> anyhow::Result<ExitCode> {
    if let Some(by) = &format.sort {
        compare::sort(table, by, format.desc);
    }
    if !format.metrics.is_empty() && table.metrics.is_empty() {
        eprintln!("no row has a metric matching {}", format.metrics.join(", "));
    }
    if format.json {
        print_json(&crate::redact::redact(&serde_json::to_value(&*table)?))?;
        return Ok(ExitCode::SUCCESS);
    }
    let cells = table.cells();
    let mut out = std::io::stdout().lock();
    if format.csv {
        for row in &cells {
            let line: Vec<String> = row.iter().map(|c| csv_field(c)).collect();
            writeln!(out, "{}", line.join(","))?;
        }
    } else if format.md {
        for (i, row) in cells.iter().enumerate() {
            let escaped: Vec<String> = row.iter().map(|c| c.replace('|', "\\|")).collect();
            writeln!(out, "| {} |", escaped.join(" | "))?;
            if i == 0 {
                writeln!(out, "|{}", "---|".repeat(row.len()))?;
            }
        }
    } else {
        let widths: Vec<usize> = (0..cells[0].len())
            .map(|c| {
                cells
                    .iter()
                    .map(|r| r[c].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for row in &cells {
            let line: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            writeln!(out, "{}", line.join("  ").trim_end())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn csv_field(cell: &str) -> String {
    if cell.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", cell.replace('"', "\"\""))
    } else {
        cell.to_string()
    }
}

/// `cairn runs export --openlineage ...`
pub fn export(store: &Store, args: &ExportArgs) -> anyhow::Result<ExitCode> {
    let mut events: Vec<Value> = Vec::new();
    for id in &args.runs {
        let run = find_run(store, id)?;
        let steps = store.db().run_steps(&run.id)?;
        events.extend(openlineage::run_events(&args.namespace, &run, &steps));
    }
    let mut out = std::io::stdout().lock();
    for event in &events {
        writeln!(out, "{}", serde_json::to_string(event)?)?;
    }
    drop(out);
    if let Some(url) = &args.emit {
        emit(url, &events)?;
        eprintln!("sent {} events to {url}", events.len());
    }
    Ok(ExitCode::SUCCESS)
}

fn emit(url: &str, events: &[Value]) -> anyhow::Result<()> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| UsageError(format!("--emit {url}: not a URL ({e})")))?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        for (i, event) in events.iter().enumerate() {
            let response = client
                .post(parsed.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(serde_json::to_vec(event)?)
                .send()
                .await
                .map_err(|e| anyhow::anyhow!("sending event {} to {url}: {e}", i + 1))?;
            let status = response.status();
            if !status.is_success() {
                let body = response.text().await.unwrap_or_default();
                anyhow::bail!(
                    "{url} refused event {} ({status}): {}",
                    i + 1,
                    body.chars().take(300).collect::<String>()
                );
            }
        }
        Ok(())
    })
}
