//! Verify-on-read: a step is never handed an object whose bytes do not match its digest.
//!
//! Objects are sealed read-only, but a disk, a user or another program can still change
//! one. Before a step runs, each object it reads is checked: objects up to
//! [`FULL_VERIFY_BYTES`] are rehashed (a step reads them whole anyway, so the cost is of
//! the order of reading them: ~10 us for a small file); bigger ones go through the stat
//! cache, which rehashes only the files whose size, mtime or inode changed since they were
//! last verified (the first use verifies everything). An object that fails is moved to
//! `quarantine/` and the step fails naming it: the step that produced it sees its output
//! missing on the next run and makes it again (a self-healing cache), and `cairn fsck
//! --repair` does the same for every corrupted object at once.

use std::path::PathBuf;

use super::{hash, stat_cache, ObjectDigest, Store, StoreError};
use crate::util::progress::Progress;

/// Objects up to this many bytes are rehashed on every read.
pub const FULL_VERIFY_BYTES: u64 = 64 << 20;

impl Store {
    /// Checks that object `digest` holds the bytes it is named after (see the module
    /// doc); a mismatch quarantines it and is an error naming it.
    pub fn verify_object(&self, digest: &ObjectDigest) -> Result<(), StoreError> {
        self.verify_object_with(digest, FULL_VERIFY_BYTES)
    }

    pub(super) fn verify_object_with(
        &self,
        digest: &ObjectDigest,
        full_limit: u64,
    ) -> Result<(), StoreError> {
        let path = self.object_path(digest);
        let size = super::objects::tree_size(&path).map_err(|e| {
            StoreError::io(format!("reading object {digest} at {}", path.display()), e)
        })?;
        let actual = if size <= full_limit {
            hash::hash_path(&path)
        } else {
            stat_cache::hash_with_stat_cache(self, &path, &Progress::hidden())
                .map(|hashed| hashed.digest)
                .map_err(|e| std::io::Error::other(e.to_string()))
        };
        match actual {
            Ok(actual) if actual == *digest => Ok(()),
            actual => {
                let quarantined = self.quarantine(digest).ok();
                Err(StoreError::CorruptObject {
                    digest: *digest,
                    actual: actual.ok(),
                    quarantined,
                })
            }
        }
    }

    /// Moves object `digest` out of `objects/` into `quarantine/` (kept for inspection;
    /// `gc` does not touch it); returns where it went.
    pub fn quarantine(&self, digest: &ObjectDigest) -> Result<PathBuf, StoreError> {
        let dir = self.root().join("quarantine");
        std::fs::create_dir_all(&dir)
            .map_err(|e| StoreError::io(format!("creating {}", dir.display()), e))?;
        let target = dir.join(format!(
            "{}-{}",
            digest.to_hex(),
            crate::util::clock::new_run_id()
        ));
        let from = self.object_path(digest);
        std::fs::rename(&from, &target).map_err(|e| {
            StoreError::io(
                format!("moving {} to {}", from.display(), target.display()),
                e,
            )
        })?;
        Ok(target)
    }
}

/// The message of a corrupted object, for [`StoreError::CorruptObject`].
pub(super) fn describe(
    digest: &ObjectDigest,
    actual: &Option<ObjectDigest>,
    quarantined: &Option<PathBuf>,
) -> String {
    let found = match actual {
        Some(actual) => format!("its bytes hash to {actual}"),
        None => "it cannot be read whole".into(),
    };
    let moved = match quarantined {
        Some(path) => format!(
            "; moved to {}, so the next run makes it again from the step that produced it",
            path.display()
        ),
        None => "; run `cairn fsck --repair`, then run again".into(),
    };
    format!("object {digest} is corrupted ({found}){moved}")
}
