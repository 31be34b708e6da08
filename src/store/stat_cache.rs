//! The stat cache: hashing a local file or tree while reading only the files whose size,
//! mtime or inode changed since the store last saw them. `source` steps and the named
//! model folders of `chunk`/`embed` (content inputs) go through it.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use super::{hash, ObjectDigest, StatEntry, Store, StoreError};
use crate::util::progress::Progress;

/// Files modified this recently are hashed but not stat-cached: a write within the same
/// mtime tick after we look would otherwise go unnoticed (git calls this "racy").
const RACY_WINDOW_NS: i64 = 2_000_000_000;

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
    store: &Store,
    root: &Path,
    progress: &Progress,
) -> Result<Hashed, StoreError> {
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
        .map_err(|e| StoreError::io(format!("reading {}", root.display()), e))?;
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
