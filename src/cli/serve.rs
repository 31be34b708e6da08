//! `cairn serve`: an OpenAI-compatible server over trained models (see `crate::serve`).
//! This module turns model references into directories and the flags into options.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

use super::{Cli, UsageError};
use crate::inference::protocol::{ModelSpec, WorkerConfig};
use crate::store::Store;

/// Arguments of `cairn serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A model to serve, as NAME=REF or REF (repeatable). REF is a model directory, a
    /// `model` artifact (digest or 8+ char prefix), or PIPELINE.STEP (that step's latest
    /// successful model). Requests pick one by NAME in their `model` field; NAME
    /// defaults to the step or folder name. Adapters over one base (and the base itself,
    /// served as e.g. base=DIR) share its weights.
    #[arg(long = "model", value_name = "[NAME=]REF", required = true)]
    pub models: Vec<String>,
    /// Sentence-embedding model directory for /v1/embeddings (its folder name is the
    /// model name requests use).
    #[arg(long, value_name = "DIR")]
    pub embedder: Option<PathBuf>,
    /// RAG configuration (YAML): chats are answered over the chunks it retrieves from
    /// the store's vector collections, and the sources come back in the `cairn` field.
    #[arg(long, value_name = "FILE")]
    pub rag: Option<PathBuf>,
    /// File every answered request (redacted) in the store as a step of a run of the
    /// pipeline `serve`, browsable with `cairn runs` and the UI.
    #[arg(long)]
    pub record: bool,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Address to bind; anything but a loopback address exposes the models to the network.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Requests decoded together at most (continuous batching); more wait in the queue.
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Requests queued or running at most; beyond it the server answers 429.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// auto, cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// CPU threads (0: libtorch's default).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// Runs the server until Ctrl-C.
pub fn serve(cli: &Cli, args: &ServeArgs) -> anyhow::Result<ExitCode> {
    let ip: IpAddr = args.host.parse().map_err(|_| {
        UsageError(format!(
            "--host `{}` is not an IP address (e.g. 127.0.0.1)",
            args.host
        ))
    })?;
    if args.max_batch == 0 || args.max_queue == 0 {
        return Err(UsageError("--max-batch and --max-queue must be at least 1".into()).into());
    }
    args.device
        .parse::<crate::embed::DeviceChoice>()
        .map_err(|e| UsageError(format!("--device: {e}")))?;
    let mut models: Vec<ModelSpec> = Vec::new();
    for spec in &args.models {
        let (name, reference) = match spec.split_once('=') {
            Some((n, r)) if !n.is_empty() && !n.contains('/') => (Some(n.to_string()), r),
            _ => (None, spec.as_str()),
        };
        let (dir, default_name) = model_reference(cli, reference)?;
        let name = name.unwrap_or(default_name);
        if models.iter().any(|m| m.name == name) {
            return Err(UsageError(format!(
                "--model: two models are named {name:?}; name them apart with NAME=REF"
            ))
            .into());
        }
        models.push(ModelSpec { name, dir });
    }
    let rag = match &args.rag {
        Some(path) => Some(load_rag(path)?),
        None => None,
    };
    let mut embedder = args.embedder.clone();
    let mut reranker = None;
    let mut reranker_precision = "auto".to_string();
    if let Some(rag) = &rag {
        reranker = rag.rerank.as_ref().map(|r| r.model.clone());
        if let Some(r) = &rag.rerank {
            reranker_precision = r.precision.clone();
        }
        if embedder.is_none() {
            embedder = Some(rag_embedder(cli, rag)?);
        }
    }
    if let Some(dir) = &embedder {
        if !dir.join("config.json").is_file() {
            return Err(UsageError(format!(
                "--embedder {}: not a model directory (no config.json)",
                dir.display()
            ))
            .into());
        }
    }
    if !ip.is_loopback() {
        eprintln!("warning: binding {ip}: anyone who can reach this machine can use the models");
    }
    let options = crate::serve::ServeOptions {
        worker: WorkerConfig {
            models,
            embedder,
            reranker,
            reranker_precision,
            max_batch: args.max_batch,
            device: args.device.clone(),
            threads: args.threads,
        },
        max_queue: args.max_queue,
        addr: SocketAddr::new(ip, args.port),
        rag,
        store_root: cli.store_dir(),
        record: args.record,
        rag_file: args.rag.clone(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(crate::serve::serve(options))?;
    Ok(ExitCode::SUCCESS)
}

/// A model reference's directory and default name.
fn model_reference(cli: &Cli, reference: &str) -> anyhow::Result<(PathBuf, String)> {
    let path = Path::new(reference);
    if path.is_dir() {
        if !path.join("config.json").is_file() && !path.join("adapter_config.json").is_file() {
            return Err(UsageError(format!(
                "--model {reference}: not a model directory (no config.json or adapter_config.json)"
            ))
            .into());
        }
        return Ok((
            path.to_path_buf(),
            crate::models::display_name_for(reference, path),
        ));
    }
    if let Some((pipeline, step)) = reference.split_once('.') {
        if !pipeline.is_empty() && !step.is_empty() && !reference.contains('/') {
            let store = Store::open_existing(&cli.store_dir())?;
            let record = store.db().last_step_record(pipeline, step)?;
            let Some(record) = record else {
                return Err(UsageError(format!(
                    "--model {reference}: step {step:?} of pipeline {pipeline:?} has no successful run in {} (`cairn runs ls` lists runs)",
                    cli.store_dir().display()
                ))
                .into());
            };
            let Some(output) = record
                .outputs
                .values()
                .find(|o| o.kind == crate::ml::MODEL_KIND)
            else {
                return Err(UsageError(format!(
                    "--model {reference}: step {step:?} (a `{}` step) produced no `model` artifact",
                    record.kind
                ))
                .into());
            };
            return Ok((store.object_path(&output.digest), step.to_string()));
        }
    }
    let dir = super::generate::model_dir(cli, reference)?;
    let store = Store::open_existing(&cli.store_dir())?;
    let record = store.resolve_artifact(reference)?;
    Ok((
        dir,
        crate::util::variant::base(&record.producer_step).to_string(),
    ))
}

/// Reads and checks a RAG configuration; problems come back located in the file.
fn load_rag(path: &Path) -> anyhow::Result<crate::rag::RagConfig> {
    use crate::pipeline::{Diagnostics, SourceFile};
    let source = SourceFile::read(path, "RAG config")?;
    source
        .check_syntax("RAG config")
        .map(|_| ())
        .map_err(Diagnostics::from)?;
    let config: crate::rag::RagConfig = source.deserialize().map_err(Diagnostics::from)?;
    let problems: Vec<_> = config
        .problems()
        .into_iter()
        .map(|(key, message)| source.diag(&key, message))
        .collect();
    if !problems.is_empty() {
        return Err(Diagnostics(problems).into());
    }
    Ok(config)
}

/// The embedding model of a RAG configuration: its own `embedder`, else the one the
/// collections were loaded with (the newest `vector_load` receipt naming them), else
/// cairn's default.
fn rag_embedder(cli: &Cli, rag: &crate::rag::RagConfig) -> anyhow::Result<PathBuf> {
    if let Some(dir) = &rag.embedder {
        return Ok(dir.clone());
    }
    let store = Store::open_existing(&cli.store_dir())?;
    let receipts = super::query::receipts(&store)?;
    let found = receipts.iter().find_map(|r| {
        let covers = rag
            .collections
            .iter()
            .any(|c| r.collections.contains_key(&c.name));
        covers.then(|| r.embedder()).flatten()
    });
    Ok(found.unwrap_or_else(|| PathBuf::from(crate::steps::chunk::DEFAULT_MODEL)))
}
