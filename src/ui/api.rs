//! The JSON API. Every list is paginated (`limit`, default 50, at most 500; `offset`);
//! every id accepts a unique prefix of 8+ hex characters (artifacts) or of the run id.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::UiState;
use crate::redact::redact;
use crate::store::{ArtifactRecord, StepRecord, Store, StoreError};

type Shared = State<Arc<UiState>>;

/// An API error: status and message, sent as `{"error": "..."}`.
pub struct ApiError(StatusCode, String);

impl ApiError {
    fn not_found(what: impl Into<String>) -> Self {
        Self(StatusCode::NOT_FOUND, what.into())
    }
    fn bad_request(what: impl Into<String>) -> Self {
        Self(StatusCode::BAD_REQUEST, what.into())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            e @ (StoreError::Ambiguous(_)
            | StoreError::NotAnArtifactId(_)
            | StoreError::NotInArtifact(_)) => Self::bad_request(e.to_string()),
            e @ StoreError::NoArtifact { .. } => Self::not_found(e.to_string()),
            other => Self(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

type ApiResult = Result<Response, ApiError>;

pub(super) fn routes() -> Router<Arc<UiState>> {
    Router::new()
        .route("/api/runs", get(runs))
        .route("/api/runs/{id}", get(run))
        .route("/api/runs/{id}/steps/{step}/log", get(step_log))
        .route("/api/runs/{id}/plan", get(plan))
        .route("/api/artifacts", get(artifacts))
        .route("/api/artifacts/{id}", get(artifact))
        .route("/api/artifacts/{id}/lineage", get(lineage))
        .route("/api/artifacts/{id}/files", get(files))
        .route("/api/artifacts/{id}/files/{*path}", get(file))
        .route("/api/artifacts/{id}/preview", get(preview))
        .route("/api/diff/{a}/{b}", get(diff))
        .route("/api/compare", get(compare))
        .route("/api/config", get(config))
}

/// What the page needs to know of its surroundings: where `cairn serve` answers chats.
async fn config(State(state): Shared) -> Json<Value> {
    Json(json!({"serve_url": state.serve_url}))
}

#[derive(Deserialize)]
struct CompareQuery {
    /// Comma-separated run ids or prefixes.
    runs: Option<String>,
    pipeline: Option<String>,
    last: Option<usize>,
    /// Comma-separated metric names.
    metrics: Option<String>,
}

/// Runs or sweep variants side by side (see `experiments::compare`), with their curves.
async fn compare(State(ui): Shared, Query(q): Query<CompareQuery>) -> ApiResult {
    let db = ui.store.db();
    let split = |s: &Option<String>| -> Vec<String> {
        s.iter()
            .flat_map(|s| s.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    };
    let mut runs = Vec::new();
    for id in split(&q.runs) {
        runs.push(
            db.get_run(&id)?
                .ok_or_else(|| ApiError::not_found(format!("no run `{id}`")))?,
        );
    }
    if let Some(pipeline) = non_empty(&q.pipeline) {
        runs.extend(db.list_runs_page(
            Some(pipeline),
            None,
            q.last.unwrap_or(1).clamp(1, 1000),
            0,
        )?);
    }
    // `compare::runs` takes the database lock itself.
    drop(db);
    if runs.is_empty() {
        return Err(ApiError::bad_request(
            "name runs (`runs=a,b`) or a pipeline (`pipeline=NAME&last=N`)",
        ));
    }
    let table = crate::experiments::compare::runs(&ui.store, &runs, &split(&q.metrics))?;
    let rows: Vec<Value> = table
        .rows
        .iter()
        .map(|r| {
            let mut row = serde_json::to_value(r).unwrap_or_default();
            row["curves"] = json!(r
                .curves
                .iter()
                .filter(|(series, _)| crate::experiments::compare::CURVE_SERIES
                    .contains(&series.as_str()))
                .collect::<BTreeMap<_, _>>());
            row
        })
        .collect();
    Ok(Json(redact(&json!({
        "params": table.params, "metrics": table.metrics, "rows": rows,
        "series": crate::experiments::compare::CURVE_SERIES,
    })))
    .into_response())
}

#[derive(Deserialize)]
struct Page {
    limit: Option<usize>,
    offset: Option<usize>,
    pipeline: Option<String>,
    status: Option<String>,
    step: Option<String>,
    kind: Option<String>,
    digest: Option<String>,
}

impl Page {
    fn limit(&self) -> usize {
        self.limit.unwrap_or(50).clamp(1, 500)
    }
}

fn non_empty(s: &Option<String>) -> Option<&str> {
    s.as_deref().filter(|s| !s.is_empty())
}

async fn runs(State(ui): Shared, Query(page): Query<Page>) -> ApiResult {
    let db = ui.store.db();
    let runs = db.list_runs_page(
        non_empty(&page.pipeline),
        non_empty(&page.status),
        page.limit(),
        page.offset.unwrap_or(0),
    )?;
    let mut out = Vec::with_capacity(runs.len());
    for r in runs {
        let counts = db.run_counts(&r.id)?;
        out.push(json!({
            "id": r.id, "pipeline": r.pipeline, "status": r.status,
            "started_at": r.started_at, "finished_at": r.finished_at,
            "duration_ms": duration_ms(&r.started_at, r.finished_at.as_deref()),
            "counts": counts,
        }));
    }
    Ok(Json(json!({"runs": out, "limit": page.limit(), "offset": page.offset.unwrap_or(0), "pipelines": db.pipelines()?})).into_response())
}

fn duration_ms(start: &str, end: Option<&str>) -> Option<i64> {
    use time::format_description::well_known::Rfc3339;
    let a = time::OffsetDateTime::parse(start, &Rfc3339).ok()?;
    let b = time::OffsetDateTime::parse(end?, &Rfc3339).ok()?;
    Some((b - a).whole_milliseconds() as i64)
}

fn step_json(s: &StepRecord) -> Value {
    json!({
        "name": s.step, "kind": s.kind, "version": s.version, "status": s.status,
        "reason": s.reason, "cache_key": s.cache_key, "duration_ms": s.duration_ms,
        "started_at": s.started_at, "params": redact(&s.params),
        "param_refs": redact(&serde_json::to_value(&s.param_refs).unwrap_or_default()),
        "inputs": s.inputs, "outputs": s.outputs, "error": s.error.as_deref().map(crate::redact::redact_text),
        "has_log": s.log.is_some(),
    })
}

async fn run(State(ui): Shared, UrlPath(id): UrlPath<String>) -> ApiResult {
    let db = ui.store.db();
    let r = db
        .get_run(&id)?
        .ok_or_else(|| ApiError::not_found(format!("no run `{id}`")))?;
    let steps: Vec<Value> = db.run_steps(&r.id)?.iter().map(step_json).collect();
    Ok(Json(json!({
        "run": {
            "id": r.id, "pipeline": r.pipeline, "pipeline_file": r.pipeline_file, "status": r.status,
            "started_at": r.started_at, "finished_at": r.finished_at,
            "duration_ms": duration_ms(&r.started_at, r.finished_at.as_deref()),
            "args": redact(&r.args),
        },
        "counts": db.run_counts(&r.id)?,
        "steps": steps,
    }))
    .into_response())
}

/// What a run of the same pipeline file with the same `--set` values would do now: the
/// engine's `Plan`, as `cairn plan --json` prints it. The file is read from where `cairn ui`
/// was started, as the run recorded it.
async fn plan(State(ui): Shared, UrlPath(id): UrlPath<String>) -> ApiResult {
    let run = ui
        .store
        .db()
        .get_run(&id)?
        .ok_or_else(|| ApiError::not_found(format!("no run `{id}`")))?;
    let sets: Vec<String> = run.args["set"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    let file = std::path::PathBuf::from(&run.pipeline_file);
    let pipeline = crate::pipeline::load(&file, &sets).map_err(|d| {
        ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("pipeline {} cannot be planned now:\n{d}", file.display()),
        )
    })?;
    let opts = crate::engine::RunOptions {
        jobs: 1,
        cwd: std::env::current_dir()
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?,
        ..Default::default()
    };
    let selection = crate::engine::select(&pipeline, &opts)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let plan = crate::engine::plan(
        &pipeline,
        &selection,
        ui.store.clone(),
        &opts,
        Arc::new(crate::engine::Silent),
    )
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(plan.report()).into_response())
}

async fn step_log(State(ui): Shared, UrlPath((id, step)): UrlPath<(String, String)>) -> ApiResult {
    let db = ui.store.db();
    let r = db
        .get_run(&id)?
        .ok_or_else(|| ApiError::not_found(format!("no run `{id}`")))?;
    let s = db
        .step_record(&r.id, &step)?
        .ok_or_else(|| ApiError::not_found(format!("run {} has no step `{step}`", r.id)))?;
    let log = s
        .log
        .ok_or_else(|| ApiError::not_found(format!("step `{step}` wrote no log")))?;
    let path = ui.store.object_path(&log);
    let bytes =
        std::fs::read(&path).map_err(|e| ApiError::not_found(format!("log object: {e}")))?;
    // Commands echo connection strings; URL passwords are masked here too.
    let text = crate::redact::redact_text(&String::from_utf8_lossy(&bytes));
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

fn artifact_json(a: &ArtifactRecord) -> Value {
    json!({
        "digest": a.digest.to_hex(), "kind": a.kind, "is_dir": a.is_dir, "size": a.size,
        "created_at": a.created_at, "producer_run": a.producer_run, "producer_step": a.producer_step,
        "output": a.output, "pipeline": a.pipeline, "metadata": redact(&a.metadata),
    })
}

async fn artifacts(State(ui): Shared, Query(page): Query<Page>) -> ApiResult {
    if let Some(d) = non_empty(&page.digest) {
        if !d.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(ApiError::bad_request(format!(
                "digest prefix `{d}` is not hex"
            )));
        }
    }
    let db = ui.store.db();
    let list = db.list_artifacts_page(
        non_empty(&page.step),
        non_empty(&page.kind),
        non_empty(&page.pipeline),
        non_empty(&page.digest),
        page.limit(),
        page.offset.unwrap_or(0),
    )?;
    let out: Vec<Value> = list
        .iter()
        .map(|a| {
            let mut v = artifact_json(a);
            v.as_object_mut().map(|o| o.remove("metadata"));
            v
        })
        .collect();
    Ok(
        Json(json!({"artifacts": out, "limit": page.limit(), "offset": page.offset.unwrap_or(0)}))
            .into_response(),
    )
}

fn find(store: &Store, id: &str) -> Result<ArtifactRecord, ApiError> {
    Ok(store.resolve_artifact(id)?)
}

async fn artifact(State(ui): Shared, UrlPath(id): UrlPath<String>) -> ApiResult {
    let a = find(&ui.store, &id)?;
    let uses: Vec<Value> = ui
        .store
        .db()
        .artifact_uses(&a.digest)?
        .into_iter()
        .map(|(run, step, direction, name)| json!({"run": run, "step": step, "direction": direction, "name": name}))
        .collect();
    let mut v = artifact_json(&a);
    v["uses"] = json!(uses);
    Ok(Json(v).into_response())
}

/// Upstream: the producing step's inputs, recursively; downstream: the outputs of every
/// step that consumed it, recursively. Nodes are artifacts, edges name the step and the
/// input/output they pass through.
async fn lineage(State(ui): Shared, UrlPath(id): UrlPath<String>) -> ApiResult {
    const MAX_NODES: usize = 500;
    let a = find(&ui.store, &id)?;
    let db = ui.store.db();
    let mut nodes: BTreeMap<String, Value> = BTreeMap::new();
    let mut edges: Vec<Value> = Vec::new();
    let mut seen_edges = std::collections::HashSet::new();
    for direction in ["up", "down"] {
        let mut frontier = vec![a.digest];
        let mut visited = std::collections::HashSet::new();
        while let Some(d) = frontier.pop() {
            if !visited.insert(d) || nodes.len() >= MAX_NODES {
                continue;
            }
            if let Some(rec) = db.find_artifact(&d.to_hex())? {
                nodes.insert(d.to_hex(), json!({"digest": d.to_hex(), "kind": rec.kind, "step": rec.producer_step, "output": rec.output}));
            }
            for (run, step, dir, name) in db.artifact_uses(&d)? {
                let Some(s) = db.step_record(&run, &step)? else {
                    continue;
                };
                match (direction, dir.as_str()) {
                    ("up", "out") => {
                        for (input, r) in &s.inputs {
                            // A step may consume its own earlier output (crawl state).
                            if r.digest == d {
                                continue;
                            }
                            if seen_edges.insert((r.digest, d, step.clone())) {
                                edges.push(json!({"from": r.digest.to_hex(), "to": d.to_hex(), "step": step, "input": input, "output": name}));
                            }
                            frontier.push(r.digest);
                        }
                    }
                    ("down", "in") => {
                        for (output, r) in &s.outputs {
                            if r.digest == d {
                                continue;
                            }
                            if seen_edges.insert((d, r.digest, step.clone())) {
                                edges.push(json!({"from": d.to_hex(), "to": r.digest.to_hex(), "step": step, "input": name, "output": output}));
                            }
                            frontier.push(r.digest);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    let truncated = nodes.len() >= MAX_NODES;
    Ok(Json(json!({"root": a.digest.to_hex(), "nodes": nodes.into_values().collect::<Vec<_>>(), "edges": edges, "truncated": truncated})).into_response())
}

async fn files(State(ui): Shared, UrlPath(id): UrlPath<String>) -> ApiResult {
    let a = find(&ui.store, &id)?;
    let root = ui.store.object_path(&a.digest);
    let list: Vec<Value> = if a.is_dir {
        crate::store::object_files(&root)
            .into_iter()
            .map(|(path, size)| json!({"path": path, "size": size}))
            .collect()
    } else {
        vec![json!({"path": "", "size": a.size})]
    };
    Ok(
        Json(json!({"digest": a.digest.to_hex(), "is_dir": a.is_dir, "files": list}))
            .into_response(),
    )
}

async fn file(State(ui): Shared, UrlPath((id, rel)): UrlPath<(String, String)>) -> ApiResult {
    let a = find(&ui.store, &id)?;
    let object = ui.store.object_path(&a.digest);
    let path = if a.is_dir {
        crate::store::file_in_object(&object, &rel)?
    } else if rel == "content" {
        object
    } else {
        return Err(ApiError::bad_request(
            "a file artifact has one file: use `files/content`",
        ));
    };
    let bytes = tokio::fs::read(&path)
        .await
        .map_err(|e| ApiError::not_found(format!("{rel}: {e}")))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| a.digest.short());
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{}\"", name.replace('"', "")),
        )
        .body(Body::from(bytes))
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

#[derive(Deserialize)]
struct PreviewQuery {
    offset: Option<usize>,
    limit: Option<usize>,
}

/// Records (paged) for record-style kinds, shape + projection for embeddings.
async fn preview(
    State(ui): Shared,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<PreviewQuery>,
) -> ApiResult {
    let a = find(&ui.store, &id)?;
    let object = ui.store.object_path(&a.digest);
    let limit = q.limit.unwrap_or(20).clamp(1, 200);
    let offset = q.offset.unwrap_or(0);
    let mut out = json!({"digest": a.digest.to_hex(), "kind": a.kind});
    if a.kind == crate::embed::KIND {
        let a2 = a.clone();
        let o2 = object.clone();
        let e = tokio::task::spawn_blocking(move || super::preview::embeddings(&a2, &o2))
            .await
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?;
        out["embeddings"] = e;
    }
    if a.is_dir {
        for (key, name) in super::preview::SHOWN_JSON {
            let shown = std::fs::read(object.join(name))
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
            if let Some(v) = shown {
                out[key] = redact(&v);
            }
        }
    }
    let files = super::preview::record_files(&a, &object);
    if !files.is_empty() {
        let (records, more) = super::preview::records(&files, offset, limit, 400);
        out["records"] = json!({"offset": offset, "limit": limit, "items": records, "more": more});
    }
    Ok(Json(out).into_response())
}

async fn diff(State(ui): Shared, UrlPath((a, b)): UrlPath<(String, String)>) -> ApiResult {
    let a = find(&ui.store, &a)?;
    let b = find(&ui.store, &b)?;
    let (pa, pb) = (
        ui.store.object_path(&a.digest),
        ui.store.object_path(&b.digest),
    );
    let d = tokio::task::spawn_blocking(move || super::preview::diff(&a, &pa, &b, &pb))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    Ok(Json(d).into_response())
}
