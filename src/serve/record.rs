//! Served traffic in the store (`cairn serve --record`): the server session is one run of
//! the pipeline `serve`; every answered request is a step of it (`chat-000001`,
//! `completion-000002`, ...) whose parameters are the request and whose output is an
//! `exchange` artifact (request, answer, sources, timings). Everything passes through
//! [`crate::redact`] first, as parameters and logs do everywhere else, so keys and tokens
//! pasted into a prompt never reach the store. `cairn runs show`, the UI and `gc` see
//! these runs like any other.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};

use crate::store::{
    Access, ArtifactRecord, OutputRef, RunRecord, RunStatus, StepRecord, StepStatus, StepWrite,
    Store, StoreError,
};
use crate::util::clock::{new_run_id, now_rfc3339};

/// Artifact kind of a recorded request and its answer.
pub const EXCHANGE_KIND: &str = "exchange";
/// The pipeline name served runs are filed under.
pub const SERVE_PIPELINE: &str = "serve";

/// Records requests as steps of one run.
pub struct Recorder {
    store: Arc<Store>,
    run_id: String,
    seq: AtomicUsize,
}

impl Recorder {
    /// Opens the store and starts the session's run; `args` are the server's options.
    pub fn start(store_root: &std::path::Path, args: Value) -> Result<Self, StoreError> {
        let store = Store::open(store_root, Access::Shared)?;
        let run_id = new_run_id();
        store.db().insert_run(&RunRecord {
            id: run_id.clone(),
            pipeline: SERVE_PIPELINE.into(),
            pipeline_file: "(cairn serve)".into(),
            status: RunStatus::Running,
            started_at: now_rfc3339(),
            finished_at: None,
            pid: i64::from(std::process::id()),
            args: crate::redact::redact(&args),
        })?;
        Ok(Self {
            store: Arc::new(store),
            run_id,
            seq: AtomicUsize::new(0),
        })
    }

    /// The session's run id.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Records one answered (or failed) request of `kind` (chat, completion,
    /// embedding): its parameters (`request`, redacted) and an exchange artifact.
    pub fn record(
        &self,
        kind: &str,
        request: &Value,
        answer: &Value,
        duration_ms: u64,
        error: Option<String>,
    ) -> Result<(), StoreError> {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let step = format!("{kind}-{seq:06}");
        let request = crate::redact::redact_free_text(request);
        let answer = crate::redact::redact_free_text(answer);
        let started_at = now_rfc3339();
        let error = error.map(|e| crate::redact::redact_text(&e));
        let exchange = json!({"request": request, "answer": answer, "error": error});
        let dir = self
            .store
            .objects()
            .temp_dir("serve")
            .map_err(|e| StoreError::io("a temporary folder for a served request", e))?;
        let file = dir.join("exchange.json");
        std::fs::write(
            &file,
            serde_json::to_vec_pretty(&exchange).unwrap_or_default(),
        )
        .map_err(|e| StoreError::io(file.display().to_string(), e))?;
        let committed = self.store.commit(&file);
        let _ = std::fs::remove_dir_all(&dir);
        let committed = committed?;
        let artifact = ArtifactRecord {
            digest: committed.digest,
            kind: EXCHANGE_KIND.into(),
            is_dir: committed.is_dir,
            size: committed.size,
            created_at: started_at.clone(),
            producer_run: self.run_id.clone(),
            producer_step: step.clone(),
            output: "exchange".into(),
            pipeline: SERVE_PIPELINE.into(),
            metadata: json!({"model": request["model"], "duration_ms": duration_ms}),
        };
        let record = StepRecord {
            run_id: self.run_id.clone(),
            step: step.clone(),
            kind: format!("serve.{kind}"),
            version: "1".into(),
            status: if error.is_some() {
                StepStatus::Failed
            } else {
                StepStatus::Ran
            },
            reason: "served request".into(),
            cache_key: None,
            duration_ms,
            started_at,
            params: request,
            param_refs: BTreeMap::new(),
            inputs: BTreeMap::new(),
            outputs: BTreeMap::from([(
                "exchange".to_string(),
                OutputRef {
                    digest: committed.digest,
                    kind: EXCHANGE_KIND.into(),
                },
            )]),
            error,
            log: None,
        };
        self.store.db().write_steps(
            &[StepWrite {
                record: &record,
                seq,
                artifacts: std::slice::from_ref(&artifact),
                cache: None,
                index_io: true,
                latest_in: None,
            }],
            &[],
        )
    }

    /// Ends the session's run.
    pub fn finish(&self) -> Result<(), StoreError> {
        self.store
            .db()
            .finish_run(&self.run_id, RunStatus::Succeeded, &now_rfc3339())
    }
}
