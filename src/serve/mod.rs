//! `cairn serve`: an OpenAI-compatible HTTP server over trained models. The models run
//! in the `cairn-torch serve` worker process (`crate::inference`); `openai` is the HTTP
//! API.

mod openai;
pub mod record;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::inference::protocol::WorkerConfig;
use crate::inference::worker::Worker;

/// Shared by every request.
pub struct ServeState {
    /// The model worker.
    pub worker: Worker,
    /// When the server started (the `created` of `/v1/models`).
    pub created: u64,
    /// The name `/v1/embeddings` answers to, when an embedder is loaded.
    pub embedder_name: Option<String>,
    /// Retrieval for chats, with `--rag`.
    pub rag: Option<crate::rag::Retriever>,
    /// Where answered requests are filed, with `--record`.
    pub recorder: Option<Arc<record::Recorder>>,
    responses: AtomicU64,
}

impl ServeState {
    fn next_response_id(&self) -> u64 {
        self.responses.fetch_add(1, Ordering::SeqCst) + 1
    }
}

/// How to serve.
pub struct ServeOptions {
    /// What the worker loads.
    pub worker: WorkerConfig,
    /// Requests queued or running at most; more are answered 429.
    pub max_queue: usize,
    /// Where to listen.
    pub addr: SocketAddr,
    /// Retrieval for chats (the worker must load its embedder and reranker).
    pub rag: Option<crate::rag::RagConfig>,
    /// The store (LLM answers of self-query and expansion are cached there; the
    /// embedded vector store lives there).
    pub store_root: std::path::PathBuf,
    /// File answered requests in the store as runs of the `serve` pipeline.
    pub record: bool,
    /// The RAG configuration file, for the record.
    pub rag_file: Option<std::path::PathBuf>,
}

/// Starts the worker and serves until Ctrl-C.
pub async fn serve(options: ServeOptions) -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let config_path = scratch.path().join("worker.json");
    eprintln!(
        "cairn serve: loading {} ...",
        options
            .worker
            .models
            .iter()
            .map(|m| format!("{} ({})", m.name, m.dir.display()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let embedder_name = options
        .worker
        .embedder
        .as_ref()
        .map(|d| crate::models::display_name(d));
    let rag = match options.rag {
        Some(config) => Some(crate::rag::Retriever::open(config, &options.store_root).await?),
        None => None,
    };
    let worker = Worker::start(&options.worker, &config_path, options.max_queue).await?;
    let recorder = if options.record {
        let args = serde_json::json!({"models": options.worker.models, "rag": options.rag_file});
        let r = record::Recorder::start(&options.store_root, args)?;
        eprintln!(
            "cairn serve: recording requests as run {} of pipeline `serve` in {}",
            r.run_id(),
            options.store_root.display()
        );
        Some(Arc::new(r))
    } else {
        None
    };
    let state = Arc::new(ServeState {
        created: openai::now(),
        embedder_name,
        rag,
        recorder: recorder.clone(),
        responses: AtomicU64::new(0),
        worker,
    });
    let listener = tokio::net::TcpListener::bind(options.addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", options.addr))?;
    let local = listener.local_addr()?;
    eprintln!(
        "cairn serve: http://{local}/v1 on {} (models: {}; Ctrl-C stops)",
        state.worker.device,
        state.worker.model_names().join(", ")
    );
    axum::serve(listener, openai::routes(state))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    if let Some(r) = recorder {
        r.finish()?;
    }
    Ok(())
}
