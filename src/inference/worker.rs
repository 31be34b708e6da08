//! The server's side of the model worker: spawns `cairn-torch serve`, writes requests to
//! its stdin and routes its events to the request that is waiting for them. A bounded
//! count of requests in flight is the server's queue: past it, new requests are refused
//! (HTTP 429) instead of piling up in memory.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

use super::protocol::{FailureKind, LoadedModel, WorkerConfig, WorkerEvent, WorkerRequest};
use crate::helper::{helper_path, HelperError};

type Routes = Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<WorkerEvent>>>>;

/// A running worker.
pub struct Worker {
    requests: mpsc::UnboundedSender<WorkerRequest>,
    routes: Routes,
    next_id: AtomicU64,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: usize,
    alive: Arc<AtomicBool>,
    /// What the worker loaded.
    pub models: Vec<LoadedModel>,
    /// Where it runs (cpu, cuda:0).
    pub device: String,
    /// Embedding dimension when an embedder is loaded.
    pub embedding_dim: Option<usize>,
    _child: tokio::process::Child,
}

/// A request's place in the queue; dropping it frees the place and, when the request
/// has not finished (the client went away), tells the worker to stop it.
pub struct Ticket {
    id: u64,
    events: mpsc::UnboundedReceiver<WorkerEvent>,
    finished: bool,
    worker: Arc<WorkerLink>,
}

/// What a ticket needs of the worker after the request handler let go of it.
struct WorkerLink {
    requests: mpsc::UnboundedSender<WorkerRequest>,
    routes: Routes,
    in_flight: Arc<AtomicUsize>,
}

/// Why a request could not be queued.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The queue is full.
    #[error("the server is busy: {0} requests are already queued or running; retry shortly")]
    Full(usize),
    /// The worker process is gone.
    #[error("the model worker stopped; restart `cairn serve` (its log is above)")]
    WorkerGone,
}

impl Worker {
    /// Starts the worker with `config` (written to `config_path`) and waits until it has
    /// loaded everything. `max_in_flight` bounds queued + running requests.
    pub async fn start(
        config: &WorkerConfig,
        config_path: &Path,
        max_in_flight: usize,
    ) -> Result<Worker, HelperError> {
        let text = serde_json::to_string(config).expect("config serializes");
        std::fs::write(config_path, text)
            .map_err(|e| HelperError::Crashed(format!("{}: {e}", config_path.display())))?;
        let helper = helper_path()?;
        let mut child = tokio::process::Command::new(&helper)
            .arg("serve")
            .arg("--config")
            .arg(config_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| HelperError::Crashed(format!("starting {}: {e}", helper.display())))?;
        let mut stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let mut lines = BufReader::new(stdout).lines();
        // Loading: the first event is `ready`, or an `error` (then the process ends).
        let ready = loop {
            let line = lines
                .next_line()
                .await
                .map_err(|e| HelperError::Crashed(format!("reading the model worker: {e}")))?;
            let Some(line) = line else {
                let mut text = String::new();
                let _ = stderr.read_to_string(&mut text).await;
                let tail: Vec<&str> = text.lines().rev().take(8).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                return Err(HelperError::Crashed(format!(
                    "the model worker ended while loading: {}",
                    tail.join("\n")
                )));
            };
            if let Ok(serde_json::Value::Object(map)) = serde_json::from_str(&line) {
                if let Some(e) = map.get("error") {
                    return Err(HelperError::Reported(
                        e.as_str().unwrap_or_default().to_string(),
                    ));
                }
            }
            match serde_json::from_str::<WorkerEvent>(&line) {
                Ok(event @ WorkerEvent::Ready { .. }) => break event,
                _ => tracing::debug!("cairn-torch serve: {line}"),
            }
        };
        let WorkerEvent::Ready {
            models,
            device,
            embedding_dim,
        } = ready
        else {
            unreachable!("matched above")
        };
        // The worker's own log goes to ours.
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("{line}");
            }
        });
        let routes: Routes = Arc::default();
        let alive = Arc::new(AtomicBool::new(true));
        {
            let routes = routes.clone();
            let alive = alive.clone();
            tokio::spawn(async move {
                while let Ok(Some(line)) = lines.next_line().await {
                    let event = match serde_json::from_str::<WorkerEvent>(&line) {
                        Ok(e) => e,
                        Err(_) => {
                            tracing::debug!("cairn-torch serve: {line}");
                            continue;
                        }
                    };
                    let Some(id) = event_id(&event) else { continue };
                    let route = routes.lock().expect("routes").get(&id).cloned();
                    if let Some(tx) = route {
                        let _ = tx.send(event);
                    }
                }
                // The worker is gone: every waiting request fails.
                alive.store(false, Ordering::SeqCst);
                for (id, tx) in routes.lock().expect("routes").drain() {
                    let _ = tx.send(WorkerEvent::Failed {
                        id,
                        kind: FailureKind::Internal,
                        message: QueueError::WorkerGone.to_string(),
                    });
                }
            });
        }
        let (tx, mut rx) = mpsc::unbounded_channel::<WorkerRequest>();
        tokio::spawn(async move {
            while let Some(request) = rx.recv().await {
                let mut line = serde_json::to_string(&request).expect("request serializes");
                line.push('\n');
                if stdin.write_all(line.as_bytes()).await.is_err() || stdin.flush().await.is_err() {
                    break;
                }
            }
        });
        Ok(Worker {
            requests: tx,
            routes,
            next_id: AtomicU64::new(1),
            in_flight: Arc::new(AtomicUsize::new(0)),
            max_in_flight,
            alive,
            models,
            device,
            embedding_dim,
            _child: child,
        })
    }

    /// The names requests select the loaded models by.
    pub fn model_names(&self) -> Vec<&str> {
        self.models.iter().map(|m| m.name.as_str()).collect()
    }

    /// Whether the worker process is still running.
    pub fn alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// Requests queued or running.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Queues a request built around a fresh id; its events arrive on the ticket.
    pub fn submit(&self, build: impl FnOnce(u64) -> WorkerRequest) -> Result<Ticket, QueueError> {
        if !self.alive() {
            return Err(QueueError::WorkerGone);
        }
        let taken = self
            .in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.max_in_flight).then_some(n + 1)
            });
        if taken.is_err() {
            return Err(QueueError::Full(self.max_in_flight));
        }
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = mpsc::unbounded_channel();
        self.routes.lock().expect("routes").insert(id, tx);
        let link = Arc::new(WorkerLink {
            requests: self.requests.clone(),
            routes: self.routes.clone(),
            in_flight: self.in_flight.clone(),
        });
        let ticket = Ticket {
            id,
            events: rx,
            finished: false,
            worker: link,
        };
        if self.requests.send(build(id)).is_err() {
            return Err(QueueError::WorkerGone);
        }
        Ok(ticket)
    }
}

impl Worker {
    /// Generates a whole reply from `model` (waiting in the queue if it is full, rather
    /// than refusing: for batch jobs, not for the HTTP server).
    pub async fn generate(
        &self,
        model: &str,
        prompt: super::protocol::Prompt,
        settings: crate::ml::job::GenerationSettings,
    ) -> Result<String, String> {
        let mut ticket = loop {
            match self.submit(|id| WorkerRequest::Generate {
                id,
                model: model.to_string(),
                prompt: prompt.clone(),
                settings: settings.clone(),
            }) {
                Ok(t) => break t,
                Err(QueueError::Full(_)) => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await
                }
                Err(e) => return Err(e.to_string()),
            }
        };
        loop {
            match ticket.next().await {
                Some(WorkerEvent::Done { text, .. }) => return Ok(text),
                Some(WorkerEvent::Failed { message, .. }) => return Err(message),
                Some(_) => {}
                None => return Err(QueueError::WorkerGone.to_string()),
            }
        }
    }
}

impl Ticket {
    /// The next event of this request; `None` once it has finished.
    pub async fn next(&mut self) -> Option<WorkerEvent> {
        if self.finished {
            return None;
        }
        let event = self.events.recv().await;
        match &event {
            Some(
                WorkerEvent::Done { .. }
                | WorkerEvent::Failed { .. }
                | WorkerEvent::Embedded { .. }
                | WorkerEvent::Scored { .. },
            )
            | None => self.finished = true,
            _ => {}
        }
        event
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.worker.routes.lock().expect("routes").remove(&self.id);
        self.worker.in_flight.fetch_sub(1, Ordering::SeqCst);
        if !self.finished {
            let _ = self
                .worker
                .requests
                .send(WorkerRequest::Cancel { id: self.id });
        }
    }
}

fn event_id(event: &WorkerEvent) -> Option<u64> {
    Some(match event {
        WorkerEvent::Ready { .. } => return None,
        WorkerEvent::Started { id, .. }
        | WorkerEvent::Delta { id, .. }
        | WorkerEvent::Done { id, .. }
        | WorkerEvent::Failed { id, .. }
        | WorkerEvent::Embedded { id, .. }
        | WorkerEvent::Scored { id, .. } => *id,
    })
}

/// The worker as retrieval's encoders: its embedder and cross-encoder.
#[async_trait::async_trait]
impl crate::rag::Encoders for Worker {
    async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, String> {
        let mut ticket = self
            .submit(|id| WorkerRequest::Embed { id, texts })
            .map_err(|e| e.to_string())?;
        match ticket.next().await {
            Some(WorkerEvent::Embedded { vectors, .. }) => Ok(vectors),
            Some(WorkerEvent::Failed { message, .. }) => Err(message),
            _ => Err(QueueError::WorkerGone.to_string()),
        }
    }

    async fn rerank(&self, query: String, documents: Vec<String>) -> Result<Vec<f32>, String> {
        let mut ticket = self
            .submit(|id| WorkerRequest::Rerank {
                id,
                query,
                documents,
            })
            .map_err(|e| e.to_string())?;
        match ticket.next().await {
            Some(WorkerEvent::Scored { scores, .. }) => Ok(scores),
            Some(WorkerEvent::Failed { message, .. }) => Err(message),
            _ => Err(QueueError::WorkerGone.to_string()),
        }
    }
}
