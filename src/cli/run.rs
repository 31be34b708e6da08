//! `cairn run`, `cairn plan`, `cairn validate`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::display::Terminal;
use super::{print_json, Cli};
use crate::engine::{self, RunOptions, RunStatus};
use crate::pipeline;
use crate::store::{Access, Store};

/// Options shared by `run` and `plan`.
#[derive(Debug, Args)]
pub struct Selection {
    /// Pipeline file (YAML).
    pub pipeline: PathBuf,
    /// Override a pipeline param: KEY=VALUE (VALUE is read as YAML: 400, true, "text").
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Run only this step (repeatable); upstream outputs come from the cache.
    #[arg(long, value_name = "STEP")]
    pub only: Vec<String>,
    /// Run this step and everything downstream of it.
    #[arg(long, value_name = "STEP", conflicts_with = "only")]
    pub from: Option<String>,
    /// Execute this step even if cached (repeatable).
    #[arg(long, value_name = "STEP")]
    pub force: Vec<String>,
    /// Execute every selected step even if cached.
    #[arg(long)]
    pub force_all: bool,
    /// Print one JSON object on stdout (the run report).
    #[arg(long)]
    pub json: bool,
}

/// `cairn run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub selection: Selection,
    /// Most steps executing at once [default: number of cores].
    #[arg(long, short = 'j', value_name = "N")]
    pub jobs: Option<usize>,
    /// Decide and report like `plan`; execute and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// No live progress display on stderr.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// The shared cache on object storage.
#[derive(Debug, Args, Clone, Default)]
pub struct RemoteArgs {
    /// Share the cache through this remote (s3://BUCKET/PREFIX, file:///PATH); else
    /// $CAIRN_REMOTE, else the pipeline's `remote:`. S3 credentials, region and endpoint
    /// come from the usual AWS_* variables or the pipeline's `remote_options`.
    #[arg(long, value_name = "URL")]
    pub remote: Option<String>,
    /// Do not upload what this run executes to the remote.
    #[arg(long)]
    pub no_push: bool,
}

/// `cairn pull`.
#[derive(Debug, Args)]
pub struct PullArgs {
    #[command(flatten)]
    pub selection: Selection,
    /// The remote (else $CAIRN_REMOTE, else the pipeline's `remote:`).
    #[arg(long, value_name = "URL")]
    pub remote: Option<String>,
    /// No live progress display on stderr.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// How `execute` uses a remote.
#[derive(Clone, Debug)]
struct RemoteRequest {
    url: Option<String>,
    push: bool,
    pull_only: bool,
}

/// The remote a run uses: `--remote`, else $CAIRN_REMOTE, else the pipeline's; opened
/// here so a bad URL is a usage error (exit 2) before anything runs.
fn remote_settings(
    request: &RemoteRequest,
    pipeline: &crate::pipeline::ResolvedPipeline,
) -> anyhow::Result<Option<engine::RemoteSettings>> {
    let from_env = std::env::var("CAIRN_REMOTE").ok().filter(|u| !u.is_empty());
    let url = request
        .url
        .clone()
        .or(from_env)
        .or_else(|| pipeline.remote.as_ref().map(|(url, _)| url.clone()));
    let Some(url) = url else {
        if request.pull_only {
            return Err(super::UsageError(
                "pull needs a remote: --remote URL, $CAIRN_REMOTE, or `remote:` in the pipeline"
                    .into(),
            )
            .into());
        }
        return Ok(None);
    };
    let options = pipeline
        .remote
        .as_ref()
        .map(|(_, options)| options.clone())
        .unwrap_or_default();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let remote = crate::remote::Remote::open(&url, &options)
        .map_err(|e| super::UsageError(e.to_string()))?;
    Ok(Some(engine::RemoteSettings {
        remote,
        push: request.push,
        pull_only: request.pull_only,
    }))
}

/// `cairn plan`.
#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub selection: Selection,
}

/// `cairn validate`.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Pipeline file (YAML).
    pub pipeline: PathBuf,
    /// Override a pipeline param while checking: KEY=VALUE.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}

fn options(sel: &Selection, jobs: Option<usize>) -> anyhow::Result<RunOptions> {
    let jobs = jobs.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    if jobs == 0 {
        return Err(super::UsageError("--jobs must be at least 1".into()).into());
    }
    Ok(RunOptions {
        only: sel.only.clone(),
        from: sel.from.clone(),
        force: sel.force.clone(),
        force_all: sel.force_all,
        jobs,
        args: json!({
            "set": sel.sets, "only": sel.only, "from": sel.from,
            "force": sel.force, "force_all": sel.force_all, "jobs": jobs,
        }),
        cwd: std::env::current_dir()?,
        remote: None,
    })
}

/// The multi-threaded runtime commands run async work on.
pub(super) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// What `execute` does: run, or only plan.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Run,
    Plan,
}

fn execute(
    cli: &Cli,
    sel: &Selection,
    mut opts: RunOptions,
    mode: Mode,
    quiet: bool,
    remote: Option<RemoteRequest>,
) -> anyhow::Result<ExitCode> {
    let started = std::time::Instant::now();
    let store_dir = cli.store_dir();
    let store_exists = store_dir.join("cairn.db").exists();
    let store_dir_existed = store_exists || store_dir.exists();
    // Snapshots of resolved pipelines live in the store: one that exists, or the one a run
    // creates once its pipeline loaded (so the first rerun does not parse it again); a
    // plan never creates a store.
    let snapshots =
        (store_exists || mode == Mode::Run).then(|| Store::pipeline_snapshots_dir(&store_dir));
    // An existing store opens on another thread while the pipeline loads (a new one is
    // created only once the pipeline is known to be valid).
    let (pipeline, opened) = std::thread::scope(|scope| {
        let opening = store_exists.then(|| scope.spawn(|| Store::open(&store_dir, Access::Shared)));
        let pipeline =
            pipeline::load_with_snapshots(&sel.pipeline, &sel.sets, snapshots.as_deref());
        let opened = opening.map(|thread| {
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        });
        (pipeline, opened)
    });
    let pipeline = pipeline?;
    if let Some(request) = remote.as_ref().filter(|_| mode == Mode::Run) {
        opts.remote = remote_settings(request, &pipeline)?;
    }
    let selection = match engine::select(&pipeline, &opts) {
        Ok(selection) => selection,
        Err(e) => {
            // Bad input writes nothing: not even the snapshot a new store would keep.
            if !store_dir_existed {
                let _ = std::fs::remove_dir_all(&store_dir);
            }
            return Err(e.into());
        }
    };
    tracing::debug!(
        steps = pipeline.steps.len(),
        ms = started.elapsed().as_secs_f64() * 1e3,
        "pipeline loaded and selected"
    );
    // Planning against no store: nothing is cached; do not create one.
    let scratch = if mode == Mode::Plan && !store_exists {
        Some(tempfile::tempdir()?)
    } else {
        None
    };
    let store_dir = scratch
        .as_ref()
        .map(|t| t.path().to_path_buf())
        .unwrap_or(store_dir);
    let store = Arc::new(match opened {
        Some(opened) => opened?,
        None => Store::open(&store_dir, Access::Shared)?,
    });
    tracing::debug!(ms = started.elapsed().as_secs_f64() * 1e3, "store open");
    let name_width = pipeline.steps.iter().map(|s| s.name.len()).max();
    let observer: Arc<dyn engine::Observer> =
        Arc::new(Terminal::new(quiet).with_name_width(name_width.unwrap_or(0)));
    let rt = runtime()?;
    let report = match mode {
        Mode::Plan => rt
            .block_on(engine::plan(&pipeline, &selection, store, &opts, observer))?
            .report(),
        Mode::Run => {
            let _ = store.objects().clean_stale_temp();
            let _ = store
                .db()
                .mark_interrupted(|pid| crate::store::objects::process_alive(pid as i32));
            let cancel = CancellationToken::new();
            // Registered before any step starts, so an early Ctrl-C is never lost to the
            // default handler (which would kill cairn without recording the run).
            let mut interrupts = {
                let _runtime = rt.enter();
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?
            };
            rt.block_on(async {
                let signal_cancel = cancel.clone();
                tokio::spawn(async move {
                    if interrupts.recv().await.is_some() {
                        eprintln!("interrupted: stopping running steps (Ctrl-C again to force)");
                        signal_cancel.cancel();
                        if interrupts.recv().await.is_some() {
                            std::process::exit(130);
                        }
                    }
                });
                engine::run(
                    &pipeline,
                    &selection,
                    store.clone(),
                    &opts,
                    observer,
                    cancel,
                )
                .await
            })?
        }
    };
    tracing::debug!(
        ms = started.elapsed().as_secs_f64() * 1e3,
        "pipeline walked"
    );
    if sel.json {
        print_json(&report)?;
    }
    let code = match report.status {
        RunStatus::Failed | RunStatus::Cancelled => ExitCode::from(1),
        _ => ExitCode::SUCCESS,
    };
    // The process exits next: freeing a big pipeline and its report piece by piece would
    // only add milliseconds to every no-op rerun.
    std::mem::forget(pipeline);
    std::mem::forget(report);
    Ok(code)
}

/// `cairn run`.
pub fn run(cli: &Cli, args: &RunArgs) -> anyhow::Result<ExitCode> {
    let opts = options(&args.selection, args.jobs)?;
    let mode = if args.dry_run { Mode::Plan } else { Mode::Run };
    let remote = RemoteRequest {
        url: args.remote.remote.clone(),
        push: !args.remote.no_push,
        pull_only: false,
    };
    execute(cli, &args.selection, opts, mode, args.quiet, Some(remote))
}

/// `cairn pull`: what the pipeline's current plan needs, from the remote; executes
/// nothing (steps the remote lacks are skipped, with what depends on them).
pub fn pull(cli: &Cli, args: &PullArgs) -> anyhow::Result<ExitCode> {
    let opts = options(&args.selection, None)?;
    let remote = RemoteRequest {
        url: args.remote.clone(),
        push: false,
        pull_only: true,
    };
    execute(
        cli,
        &args.selection,
        opts,
        Mode::Run,
        args.quiet,
        Some(remote),
    )
}

/// `cairn plan`.
pub fn plan(cli: &Cli, args: &PlanArgs) -> anyhow::Result<ExitCode> {
    let opts = options(&args.selection, None)?;
    execute(cli, &args.selection, opts, Mode::Plan, false, None)
}

/// `cairn validate`.
pub fn validate(args: &ValidateArgs) -> anyhow::Result<ExitCode> {
    let pipeline = pipeline::load(&args.pipeline, &args.sets)?;
    println!(
        "{}: pipeline `{}` is valid ({} steps)",
        args.pipeline.display(),
        pipeline.name,
        pipeline.steps.len()
    );
    Ok(ExitCode::SUCCESS)
}
