//! Command-line interface: clap definitions and dispatch. Thin: every command calls into
//! the library and only formats what it gets back.

mod browse;
mod display;
mod experiments;
mod generate;
mod maintenance;
mod query;
mod remote;
mod run;
mod serve;
mod ui;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::engine::EngineError;
use crate::pipeline::Diagnostics;

/// An error caused by what the user typed (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// A check that completed and found problems (exit code 1, message already printed).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Failed(pub String);

/// cairn: DAG pipelines with a content-addressed artifact store.
#[derive(Debug, Parser)]
#[command(
    name = "cairn",
    version,
    about,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    /// Artifact store folder [env: CAIRN_STORE] [default: ./artifacts]
    #[arg(long, global = true, value_name = "DIR")]
    pub store: Option<PathBuf>,

    /// More logging (-v info, -vv debug); RUST_LOG also works.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    command: Command,
}

/// `cairn internal ...`: the other side of executors.
#[derive(Debug, Subcommand)]
enum InternalCommand {
    /// Execute one step as a Slurm job described by the engine.
    RunStep {
        /// The job description the engine wrote.
        description: std::path::PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a pipeline: execute what changed, reuse everything else from the store.
    Run(run::RunArgs),
    /// Show what `run` would do for every step, and why, without executing anything.
    Plan(run::PlanArgs),
    /// Check a pipeline file and report every problem with its location.
    Validate(run::ValidateArgs),
    /// Fetch from the remote cache what a pipeline's current plan needs; executes nothing.
    Pull(run::PullArgs),
    /// What executors run on other machines (not for direct use).
    #[command(subcommand, hide = true)]
    Internal(InternalCommand),
    /// Upload runs' outputs and cache entries to the remote cache.
    Push(remote::PushArgs),
    /// The remote cache: what is only here, only there, on both.
    #[command(subcommand)]
    Remote(remote::RemoteCommand),
    /// List and inspect runs.
    #[command(subcommand)]
    Runs(browse::RunsCommand),
    /// List and inspect artifacts: records, lineage, contents, diffs.
    #[command(subcommand)]
    Artifacts(browse::ArtifactsCommand),
    /// List step kinds and show their parameters.
    #[command(subcommand)]
    Steps(maintenance::StepsCommand),
    /// Remove objects no kept run references.
    Gc(maintenance::GcArgs),
    /// Rehash every object and check that every record points at a present object.
    Fsck(maintenance::FsckArgs),
    /// Print the digest cairn gives a file or folder (files: the same as b3sum).
    Hash(maintenance::HashArgs),
    /// Search a vector collection: embed the text with the collection's model, print the
    /// nearest chunks with scores, titles and snippets.
    Query(query::QueryArgs),
    /// Generate text from a trained `model` artifact or a model directory, streaming it.
    Generate(generate::GenerateArgs),
    /// Serve models over an OpenAI-compatible HTTP API (chat, completions, embeddings).
    Serve(serve::ServeArgs),
    /// Serve runs, artifacts and lineage to a browser (read-only, 127.0.0.1 by default);
    /// the same data as JSON under /api.
    Ui(ui::UiArgs),
}

impl Cli {
    /// The store folder: --store, else $CAIRN_STORE, else ./artifacts.
    pub fn store_dir(&self) -> PathBuf {
        self.store
            .clone()
            .or_else(|| std::env::var_os("CAIRN_STORE").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("artifacts"))
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    init_tracing(cli.verbose);
    match dispatch(&cli) {
        Ok(code) => code,
        Err(err) => {
            let code = exit_code(&err);
            if err.downcast_ref::<Failed>().is_none() {
                if let Some(d) = err.downcast_ref::<Diagnostics>() {
                    eprintln!("{d}");
                } else {
                    eprintln!("error: {err:#}");
                }
            }
            ExitCode::from(code)
        }
    }
}

fn init_tracing(verbose: u8) {
    // Qdrant Edge logs internal start-up chatter at warn level; only its errors matter here.
    let default = match verbose {
        0 => "warn,qdrant_edge=error",
        1 => "info,qdrant_edge=warn",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .without_time()
        .try_init();
}

fn dispatch(cli: &Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Run(args) => run::run(cli, args),
        Command::Pull(args) => run::pull(cli, args),
        Command::Internal(InternalCommand::RunStep { description }) => {
            let rt = run::runtime()?;
            Ok(
                if rt.block_on(crate::engine::slurm::run_here(description))? {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                },
            )
        }
        Command::Push(args) => remote::push(cli, args),
        Command::Remote(cmd) => remote::remote(cli, cmd),
        Command::Plan(args) => run::plan(cli, args),
        Command::Validate(args) => run::validate(args),
        Command::Runs(cmd) => browse::runs(cli, cmd),
        Command::Artifacts(cmd) => browse::artifacts(cli, cmd),
        Command::Steps(cmd) => maintenance::steps(cmd),
        Command::Gc(args) => maintenance::gc(cli, args),
        Command::Fsck(args) => maintenance::fsck(cli, args),
        Command::Hash(args) => maintenance::hash(args),
        Command::Query(args) => query::query(cli, args),
        Command::Ui(args) => ui::ui(cli, args),
        Command::Serve(args) => serve::serve(cli, args),
        Command::Generate(args) => generate::generate(cli, args),
    }
}

/// 2 for input errors, 1 for everything else.
fn exit_code(err: &anyhow::Error) -> u8 {
    if err.downcast_ref::<Diagnostics>().is_some() || err.downcast_ref::<UsageError>().is_some() {
        return 2;
    }
    if let Some(e) = err.downcast_ref::<EngineError>() {
        return match e {
            EngineError::Selection(_) | EngineError::MissingUpstream(_) => 2,
            EngineError::Store(_) => 1,
        };
    }
    if let Some(crate::store::StoreError::Ambiguous(_)) =
        err.downcast_ref::<crate::store::StoreError>()
    {
        return 2;
    }
    1
}

/// Human-readable byte count.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Prints a value as pretty JSON on stdout.
pub fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
