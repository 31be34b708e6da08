//! `source`: turns a local file or folder into an artifact. It runs on every pipeline run
//! (the outside world may have changed), but a stat cache (size, mtime, inode) means an
//! unchanged tree is walked, not rehashed, and an unchanged digest is not copied again.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};

use super::Produced;
use super::{parse_params, ParamIssue, Step, StepContext, StepError, StepIo, StepOutputs};
use crate::store::{hash, ObjectDigest, StatEntry};

/// The `source` step kind.
pub struct SourceStep;

/// Parameters of `source`.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SourceParams {
    /// File or folder to read, relative to the directory cairn runs in.
    pub path: String,
}

/// Name of the one output.
pub const OUTPUT: &str = "data";

/// Files modified this recently are hashed but not stat-cached: a write within the same
/// mtime tick after we look would otherwise go unnoticed (git calls this "racy").
const RACY_WINDOW_NS: i64 = 2_000_000_000;

#[async_trait]
impl Step for SourceStep {
    fn kind(&self) -> &str {
        "source"
    }

    fn version(&self) -> String {
        "1".into()
    }

    fn summary(&self) -> &str {
        "Hash a local file or folder into an artifact (output `data`); always checks, rarely rehashes"
    }

    fn params_schema(&self) -> Value {
        super::schema_of::<SourceParams>()
    }

    fn volatile(&self) -> bool {
        true
    }

    fn inputs(&self) -> Option<Vec<super::InputDecl>> {
        Some(Vec::new())
    }

    fn check(
        &self,
        params: &Value,
        declared_outputs: &IndexMap<String, String>,
    ) -> Result<StepIo, Vec<ParamIssue>> {
        let mut issues = Vec::new();
        if let Err(issue) = parse_params::<SourceParams>(params) {
            issues.push(issue);
        }
        super::with_issues(
            super::fixed_outputs(
                self.kind(),
                self.inputs(),
                declared_outputs,
                &[(OUTPUT, "path")],
            ),
            issues,
        )
    }

    async fn run(&self, ctx: &StepContext) -> Result<StepOutputs, StepError> {
        let params: SourceParams =
            parse_params(&ctx.params).map_err(|i| StepError::Failed(i.message))?;
        let root = ctx.resolve_path(&params.path);
        let root = root.canonicalize().map_err(|e| {
            StepError::Failed(format!(
                "source path `{}` cannot be read: {e}",
                root.display()
            ))
        })?;
        let store = ctx.store.clone();
        let progress = ctx.progress.clone();
        tokio::task::spawn_blocking(move || snapshot(&store, &root, &progress))
            .await
            .map_err(|e| StepError::Failed(format!("source hashing panicked: {e}")))?
    }
}

fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    meta.mtime().saturating_mul(1_000_000_000) + meta.mtime_nsec()
}

/// What hashing a tree through the stat cache found.
pub struct Hashed {
    /// Content digest (plain blake3 for a file, Merkle for a directory).
    pub digest: ObjectDigest,
    /// Files seen.
    pub files: u64,
    /// Bytes seen.
    pub bytes: u64,
    /// Files whose content had to be read (stat changed or unknown).
    pub rehashed: u64,
}

/// Hashes `root` (file or directory), reading only files whose size, mtime or inode
/// changed since the store last saw them; remembers what it read.
pub fn hash_with_stat_cache(
    store: &crate::store::Store,
    root: &Path,
    progress: &super::Progress,
) -> Result<Hashed, StepError> {
    let root_key = root.to_string_lossy().to_string();
    let known: HashMap<String, StatEntry> = store.db().stat_entries_under(&root_key)?;
    let now_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    let files = AtomicU64::new(0);
    let bytes = AtomicU64::new(0);
    let rehashed = AtomicU64::new(0);
    let seen: Mutex<Vec<(String, StatEntry)>> = Mutex::new(Vec::new());
    progress.set_message("checking files");
    let hash_with_cache =
        |path: &Path, meta: &std::fs::Metadata| -> std::io::Result<ObjectDigest> {
            let key = path.to_string_lossy().to_string();
            let (size, mtime, ino) = (meta.len(), mtime_ns(meta), meta.ino());
            files.fetch_add(1, Ordering::Relaxed);
            bytes.fetch_add(size, Ordering::Relaxed);
            let digest = match known.get(&key) {
                Some(e) if e.size == size && e.mtime_ns == mtime && e.ino == ino => e.digest,
                _ => {
                    rehashed.fetch_add(1, Ordering::Relaxed);
                    hash::hash_file(path)?
                }
            };
            if now_ns - mtime > RACY_WINDOW_NS {
                let entry = StatEntry {
                    size,
                    mtime_ns: mtime,
                    ino,
                    digest,
                };
                seen.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((key, entry));
            }
            progress.inc(1);
            Ok(digest)
        };
    let digest = hash::hash_path_with(root, &hash_with_cache)
        .map_err(|e| StepError::Failed(format!("reading {}: {e}", root.display())))?;
    let seen = seen.into_inner().unwrap_or_else(|p| p.into_inner());
    let rehashed = rehashed.into_inner();
    let unchanged_rows = rehashed == 0
        && seen.len() == known.len()
        && seen.iter().all(|(k, e)| known.get(k) == Some(e));
    if !unchanged_rows {
        store.db().replace_stat_entries(&root_key, &seen)?;
    }
    Ok(Hashed {
        digest,
        files: files.into_inner(),
        bytes: bytes.into_inner(),
        rehashed,
    })
}

fn snapshot(
    store: &crate::store::Store,
    root: &Path,
    progress: &super::Progress,
) -> Result<StepOutputs, StepError> {
    let root_key = root.to_string_lossy().to_string();
    let Hashed {
        digest,
        files,
        bytes: size,
        rehashed,
    } = hash_with_stat_cache(store, root, progress)?;
    let is_dir = root.is_dir();
    if !store.objects().contains(&digest) {
        progress.set_message("copying into the store");
        let committed = store.objects().import_copy(root).map_err(|e| {
            StepError::Failed(format!("copying {} into the store: {e}", root.display()))
        })?;
        if committed.digest != digest {
            return Err(StepError::Failed(format!(
                "{} changed while it was being read; run again",
                root.display()
            )));
        }
    }
    let mut outputs = BTreeMap::new();
    outputs.insert(
        OUTPUT.to_string(),
        Produced {
            digest,
            kind: if is_dir { "dir" } else { "file" }.to_string(),
            size,
            is_dir,
            metadata: json!({"path": root_key, "files": files, "bytes": size}),
        },
    );
    Ok(StepOutputs {
        outputs,
        note: Some(format!("{files} files, {rehashed} rehashed")),
    })
}
