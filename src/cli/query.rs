//! `cairn query`: the retrieval half of RAG. Embeds the query with the model that filled
//! the collection and prints the nearest chunks.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use serde_json::json;

use super::{print_json, Cli, UsageError};
use crate::embed::{worker, DeviceChoice, EmbedJob, Precision};
use crate::store::Store;
use crate::vectorstore::{self, Receipt};
use tokio_util::sync::CancellationToken;

/// `cairn query`.
#[derive(Debug, Args)]
pub struct QueryArgs {
    /// Collection to search (e.g. embedded_articles; `vector_load` names them
    /// <prefix><category plural>).
    pub collection: String,
    /// The query text.
    pub text: String,
    /// How many hits.
    #[arg(short, default_value_t = 5)]
    pub k: usize,
    /// Only points whose payload field equals the value (repeatable): category=article,
    /// author=jane.
    #[arg(long, value_name = "FIELD=VALUE")]
    pub filter: Vec<String>,
    /// Embedding model directory (default: the one recorded when the collection was
    /// loaded).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Qdrant server URL (default: $CAIRN_QDRANT_URL, else the embedded store).
    #[arg(long)]
    pub url: Option<String>,
    /// Device for the query embedding: auto, cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `cairn query`.
pub fn query(cli: &Cli, args: &QueryArgs) -> anyhow::Result<ExitCode> {
    if args.k == 0 {
        return Err(UsageError("-k must be at least 1".into()).into());
    }
    let mut filter = Vec::new();
    for f in &args.filter {
        let (k, v) = f
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| {
                UsageError(format!(
                    "--filter {f:?}: expected FIELD=VALUE, e.g. category=article"
                ))
            })?;
        filter.push((k.to_string(), v.to_string()));
    }
    args.device.parse::<DeviceChoice>().map_err(UsageError)?;
    let store = Store::open_existing(&cli.store_dir())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let vectors = vectorstore::open(args.url.as_deref(), store.root()).await?;
        let receipts = receipts(&store)?;
        let receipt = receipts
            .iter()
            .find(|r| r.store == vectors.describe() && r.collections.contains_key(&args.collection));
        if vectors.count(&args.collection).await?.is_none() {
            let mut known: Vec<&String> = receipts
                .iter()
                .filter(|r| r.store == vectors.describe())
                .flat_map(|r| r.collections.keys())
                .collect();
            known.sort();
            known.dedup();
            let hint = if known.is_empty() {
                "no vector_load has written to this store yet; run a pipeline with a vector_load step first".to_string()
            } else {
                format!(
                    "collections loaded here: {}",
                    known.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                )
            };
            return Err(UsageError(format!(
                "collection `{}` does not exist in {} ({hint})",
                args.collection,
                vectors.describe()
            ))
            .into());
        }
        let model_dir = args
            .model
            .clone()
            .or_else(|| receipt.and_then(Receipt::embedder))
            .unwrap_or_else(|| PathBuf::from(crate::steps::chunk::DEFAULT_MODEL));
        let tmp = tempfile::tempdir()?;
        let input = tmp.path().join("query.jsonl");
        std::fs::write(&input, format!("{}\n", json!({"text": args.text})))?;
        let job = EmbedJob {
            model: model_dir,
            device: args.device.clone(),
            precision: Precision::Auto,
            batch_size: 1,
            threads: 0,
            input,
            output: tmp.path().join("query.safetensors"),
        };
        let outcome = worker::run(&job, &mut |_| {}, &mut |_| {}, &CancellationToken::new()).await?;
        let (_, _, vector) = crate::embed::read_tensor(&job.output).map_err(anyhow::Error::msg)?;
        let hits = vectors
            .search(&args.collection, vector, args.k, &filter)
            .await?;
        if args.json {
            print_json(&json!({
                "collection": args.collection,
                "query": args.text,
                "model": outcome.info.model,
                "store": vectors.describe(),
                "hits": hits,
            }))?;
            return Ok(ExitCode::SUCCESS);
        }
        if hits.is_empty() {
            println!("no hits in {}", args.collection);
        }
        for (i, hit) in hits.iter().enumerate() {
            let p = &hit.payload;
            let title = p["title"].as_str().filter(|t| !t.is_empty()).unwrap_or("(untitled)");
            println!(
                "{:>2}. {:.4}  {}  [{}]",
                i + 1,
                hit.score,
                title,
                p["category"].as_str().unwrap_or("?")
            );
            println!("    {}", p["url"].as_str().unwrap_or(""));
            println!("    {}", snippet(p["text"].as_str().unwrap_or(""), 200));
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// vector_load receipts, newest first.
pub(super) fn receipts(store: &Store) -> anyhow::Result<Vec<Receipt>> {
    let records =
        store
            .db()
            .list_artifacts(None, Some(crate::steps::vector_load::RECEIPT_KIND), 1000)?;
    Ok(records
        .iter()
        .filter_map(|a| std::fs::read(store.object_path(&a.digest)).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect())
}

/// The first `max` characters of `text` on one line.
fn snippet(text: &str, max: usize) -> String {
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max {
        flat
    } else {
        format!("{}...", flat.chars().take(max).collect::<String>())
    }
}
