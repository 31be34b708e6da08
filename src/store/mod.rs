//! The artifact store: content-addressed objects on disk plus a record database.
//!
//! Layout under the store root:
//!   objects/ab/cdef...   immutable files and trees, named by blake3 digest
//!   tmp/                 per-process staging; anything here is untrusted
//!   cairn.db             SQLite (WAL): runs, step records, cache index, artifacts
//!   lock                 flock: runs hold it shared, `gc` exclusive
//!   llm-cache/ab/<hex>.json  answered LLM requests (`crate::llm::cache`); not artifacts,
//!                        so `gc` leaves them
//!
//! An object becomes visible by rename once whole, durable once sealed (fsynced in batches,
//! see `objects`), and only a database record written after sealing makes a later run
//! trust it: a kill at any moment leaves at worst an unreferenced (possibly unsealed)
//! object or temp folder, which the next commit of those bytes verifies and `gc` removes.

pub mod db;
pub mod diff;
pub mod digest;
pub mod hash;
pub mod objects;
pub mod records;
pub mod stat_cache;
mod verify;

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use thiserror::Error;

pub use db::{Database, HitWrite, LatestExecution, StatEntry, StepWrite};
pub use digest::{CacheKey, ObjectDigest};
pub use objects::{Committed, ObjectArea};
pub use records::*;

/// Errors of the store layer.
#[derive(Debug, Error)]
pub enum StoreError {
    /// A filesystem operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The record database failed.
    #[error("store database: {0}")]
    Db(#[from] rusqlite::Error),
    /// The store holds something this version cannot read.
    #[error("store is inconsistent: {0}")]
    Corrupt(String),
    /// A digest or id prefix matched more than one entry.
    #[error("`{0}` is ambiguous: give more characters")]
    Ambiguous(String),
    /// What was given as an artifact id is not one.
    #[error("`{0}` is not an artifact id: give a digest or a prefix of 8+ hex characters")]
    NotAnArtifactId(String),
    /// No artifact has this id.
    #[error("no artifact with id `{id}` in {root}")]
    NoArtifact {
        /// The id or prefix given.
        id: String,
        /// The store searched.
        root: String,
    },
    /// A path given inside an artifact is not a regular file there.
    #[error("{0}")]
    NotInArtifact(String),
    /// An object's bytes do not match its digest (see `verify.rs`).
    #[error("{}", verify::describe(.digest, .actual, .quarantined))]
    CorruptObject {
        /// The digest it is stored under.
        digest: ObjectDigest,
        /// What its bytes hash to (`None`: unreadable).
        actual: Option<ObjectDigest>,
        /// Where it was moved (`None`: it could not be).
        quarantined: Option<PathBuf>,
    },
    /// Another process holds the store lock.
    #[error("the store at {0} is in use by another cairn process (gc needs it alone); try again when it finishes")]
    Busy(PathBuf),
}

impl StoreError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StoreError::Io {
            context: context.into(),
            source,
        }
    }
}

/// How a process holds the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Runs and readers: many at once.
    Shared,
    /// gc: alone, fails fast if others are inside.
    Exclusive,
}

/// An open store.
pub struct Store {
    root: PathBuf,
    objects: ObjectArea,
    db: Mutex<Database>,
    _lock: fs::File,
}

impl Drop for Store {
    fn drop(&mut self) {
        // Whatever was committed but not yet sealed (an error path left before its
        // records) still becomes durable; unsealed leftovers would be verified anyway.
        let _ = self.objects.seal_pending();
    }
}

impl Store {
    /// Opens or creates the store at `root`.
    pub fn open(root: &Path, access: Access) -> Result<Self, StoreError> {
        fs::create_dir_all(root)
            .map_err(|e| StoreError::io(format!("creating store {}", root.display()), e))?;
        let fsync = std::env::var_os("CAIRN_NO_FSYNC").is_none();
        let objects = ObjectArea::new(root, fsync);
        objects
            .create_dirs()
            .map_err(|e| StoreError::io("creating store folders", e))?;
        let lock_path = root.join("lock");
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| StoreError::io(format!("opening {}", lock_path.display()), e))?;
        match access {
            Access::Shared => lock
                .lock_shared()
                .map_err(|e| StoreError::io("locking the store", e))?,
            Access::Exclusive => lock.try_lock().map_err(|e| match e {
                fs::TryLockError::WouldBlock => StoreError::Busy(root.to_path_buf()),
                fs::TryLockError::Error(e) => StoreError::io("locking the store", e),
            })?,
        }
        let db = Database::open(&root.join("cairn.db"))?;
        Ok(Self {
            root: root.to_path_buf(),
            objects,
            db: Mutex::new(db),
            _lock: lock,
        })
    }

    /// Opens an existing store for reading; errors if there is none.
    pub fn open_existing(root: &Path) -> Result<Self, StoreError> {
        if !root.join("cairn.db").exists() {
            return Err(StoreError::io(
                format!(
                    "no cairn store at {} (run a pipeline first, or pass --store DIR)",
                    root.display()
                ),
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ));
        }
        Self::open(root, Access::Shared)
    }

    /// The artifact with digest or unique prefix (8+ hex characters) `id`.
    pub fn resolve_artifact(&self, id: &str) -> Result<ArtifactRecord, StoreError> {
        if id.len() < 8 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(StoreError::NotAnArtifactId(id.to_string()));
        }
        self.db()
            .find_artifact(id)?
            .ok_or_else(|| StoreError::NoArtifact {
                id: id.to_string(),
                root: self.root.display().to_string(),
            })
    }

    /// The store root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The object area.
    pub fn objects(&self) -> &ObjectArea {
        &self.objects
    }

    /// The record database (short critical sections only).
    pub fn db(&self) -> MutexGuard<'_, Database> {
        self.db
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Path of an object.
    pub fn object_path(&self, digest: &ObjectDigest) -> PathBuf {
        self.objects.path(digest)
    }

    /// Commits a staged path (under `tmp/`) as an object.
    pub fn commit(&self, staged: &Path) -> Result<Committed, StoreError> {
        self.objects
            .commit(staged)
            .map_err(|e| StoreError::io(format!("storing {}", staged.display()), e))
    }

    /// Makes every object committed so far durable and sealed; call before writing any
    /// record that references them.
    pub fn seal_pending(&self) -> Result<(), StoreError> {
        self.objects
            .seal_pending()
            .map_err(|e| StoreError::io("making stored objects durable", e))
    }

    /// Where `run` and `plan` keep snapshots of resolved pipelines (a cache `gc` empties).
    pub fn pipeline_snapshots_dir(root: &Path) -> PathBuf {
        root.join("pipelines")
    }

    /// Removes unreferenced objects (and, with `keep_runs`, run records beyond the newest
    /// `keep_runs` per pipeline first). Returns what was (or would be) freed.
    pub fn gc(&self, keep_runs: Option<usize>, dry_run: bool) -> Result<GcReport, StoreError> {
        let mut db = self.db();
        let dropped_runs = match keep_runs {
            Some(keep) => db.prune_runs(keep, dry_run)?,
            None => Vec::new(),
        };
        let referenced = db.referenced_objects(&dropped_runs, dry_run)?;
        drop(db);
        let mut report = GcReport {
            dropped_runs,
            ..GcReport::default()
        };
        for (digest, path) in self
            .objects
            .list()
            .map_err(|e| StoreError::io("listing objects", e))?
        {
            if referenced.contains(&digest) {
                report.kept += 1;
                continue;
            }
            let size = objects::tree_size(&path).unwrap_or(0);
            report.freed_bytes += size;
            report.removed.push(digest);
            if !dry_run {
                self.objects
                    .remove(&digest)
                    .map_err(|e| StoreError::io(format!("removing {}", path.display()), e))?;
            }
        }
        if !dry_run {
            let _ = std::fs::remove_dir_all(Self::pipeline_snapshots_dir(&self.root));
            report.stale_temp = self
                .objects
                .clean_stale_temp()
                .map_err(|e| StoreError::io("cleaning tmp/", e))?;
        }
        Ok(report)
    }

    /// The checkpoint folders of unfinished training jobs (`checkpoints/<cache key>/`, which
    /// `finetune` removes once its model is stored) with their sizes.
    pub fn training_checkpoints(&self) -> Vec<(PathBuf, u64)> {
        let Ok(entries) = std::fs::read_dir(self.root.join("checkpoints")) else {
            return Vec::new();
        };
        let mut out: Vec<(PathBuf, u64)> = entries
            .filter_map(Result::ok)
            .filter(|e| e.path().is_dir())
            .map(|e| {
                let size = objects::tree_size(&e.path()).unwrap_or(0);
                (e.path(), size)
            })
            .collect();
        out.sort();
        out
    }

    /// Rehashes every object and checks that every record points at a present object;
    /// with `repair`, corrupted objects are quarantined (the steps that made them make
    /// them again on the next run).
    pub fn fsck(&self, repair: bool) -> Result<FsckReport, StoreError> {
        let mut report = FsckReport::default();
        let present: Vec<(ObjectDigest, PathBuf)> = self
            .objects
            .list()
            .map_err(|e| StoreError::io("listing objects", e))?;
        let present_set: HashSet<ObjectDigest> = present.iter().map(|(d, _)| *d).collect();
        for (digest, path) in &present {
            report.checked += 1;
            let problem = match hash::hash_path(path) {
                Ok(actual) if actual == *digest => continue,
                Ok(actual) => {
                    format!("object {digest} has content hashing to {actual} (corrupted)")
                }
                Err(e) => format!("object {digest} cannot be read: {e}"),
            };
            if repair {
                let moved = self.quarantine(digest)?;
                report.repaired.push(moved);
            }
            report.problems.push(problem);
        }
        let recorded = self.db().all_recorded_objects()?;
        let mut missing: Vec<_> = recorded.difference(&present_set).collect();
        missing.sort();
        for digest in missing {
            report.problems.push(format!(
                "object {digest} is recorded but missing from objects/"
            ));
        }
        report.unreferenced = present_set.difference(&recorded).count();
        Ok(report)
    }
}

/// What `gc` did or would do.
#[derive(Debug, Default)]
pub struct GcReport {
    /// Runs whose records were dropped by `--keep-runs`.
    pub dropped_runs: Vec<String>,
    /// Objects removed (or to remove, on a dry run).
    pub removed: Vec<ObjectDigest>,
    /// Bytes freed.
    pub freed_bytes: u64,
    /// Objects kept because a record references them.
    pub kept: usize,
    /// Stale temp folders of dead processes removed.
    pub stale_temp: usize,
}

/// What `fsck` found.
#[derive(Debug, Default)]
pub struct FsckReport {
    /// Objects rehashed.
    pub checked: usize,
    /// Objects no record references (harmless; `gc` frees them).
    pub unreferenced: usize,
    /// Mismatches and missing objects.
    pub problems: Vec<String>,
    /// Where `--repair` moved corrupted objects.
    pub repaired: Vec<PathBuf>,
}

#[cfg(test)]
mod tests;

/// The regular file at `rel` inside the object folder `object`: relative, no `..`, and
/// (symlinks followed) still inside the object. Shown and served files go through here.
pub fn file_in_object(object: &Path, rel: &str) -> Result<PathBuf, StoreError> {
    use std::path::Component;
    let p = Path::new(rel);
    if rel.is_empty()
        || p.is_absolute()
        || p.components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(StoreError::NotInArtifact(format!(
            "path `{rel}` must be relative and stay inside the artifact"
        )));
    }
    let missing = || StoreError::NotInArtifact(format!("no file `{rel}` in this artifact"));
    let target = object.join(p);
    let meta = fs::symlink_metadata(&target).map_err(|_| missing())?;
    let real = target.canonicalize().map_err(|_| missing())?;
    let base = object.canonicalize().map_err(|_| missing())?;
    if meta.file_type().is_symlink() || !real.starts_with(&base) || !real.is_file() {
        return Err(StoreError::NotInArtifact(format!(
            "`{rel}` is not a regular file in this artifact"
        )));
    }
    Ok(target)
}

/// Every non-folder entry under an object folder, sorted: (relative path, bytes).
pub fn object_files(object: &Path) -> Vec<(String, u64)> {
    walkdir::WalkDir::new(object)
        .sort_by_file_name()
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| !e.file_type().is_dir())
        .filter_map(|e| {
            let rel = e
                .path()
                .strip_prefix(object)
                .ok()?
                .to_string_lossy()
                .to_string();
            Some((rel, e.metadata().map(|m| m.len()).unwrap_or(0)))
        })
        .collect()
}
