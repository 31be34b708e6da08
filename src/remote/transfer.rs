//! Moving objects and cache entries between the local store and a remote: uploads skip
//! what the remote has, downloads skip what the local store has, every byte fetched is
//! hashed before it is committed, and many transfers run at once.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};

use super::layout::{safe_relative, Tree};
use super::{Remote, RemoteEntry, RemoteError, MULTIPART_THRESHOLD};
use crate::store::{hash, CacheKey, ObjectDigest, Store};
use crate::util::progress::Progress;

/// From this many files on, an upload lists the remote once instead of asking per file.
const LIST_INSTEAD_OF_HEAD: usize = 256;

/// Counters of one transfer, shown on a progress bar.
#[derive(Default, Debug)]
pub struct TransferProgress {
    objects: AtomicU64,
    bytes: AtomicU64,
    skipped: AtomicU64,
    progress: Option<Progress>,
}

/// What a transfer moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    /// Objects (files) moved.
    pub objects: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Objects already on the other side.
    pub skipped: u64,
}

impl TransferProgress {
    /// Counts onto `progress` (a bar in bytes, a message with object counts).
    pub fn with_progress(progress: Progress) -> Self {
        Self {
            progress: Some(progress),
            ..Self::default()
        }
    }

    fn moved(&self, bytes: u64) {
        let n = self.objects.fetch_add(1, Ordering::Relaxed) + 1;
        let total = self.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if let Some(p) = &self.progress {
            p.bar().set_position(total);
            p.set_message(format!(
                "{n} objects, {} skipped",
                self.skipped.load(Ordering::Relaxed)
            ));
        }
    }

    fn skipped(&self) {
        self.skipped.fetch_add(1, Ordering::Relaxed);
    }

    /// The counts so far.
    pub fn stats(&self) -> Stats {
        Stats {
            objects: self.objects.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
        }
    }
}

impl Remote {
    /// The cache entry of `key`, if the remote has one.
    pub async fn entry(&self, key: &CacheKey) -> Result<Option<RemoteEntry>, RemoteError> {
        let location = self.entry_key(key);
        let Some(entry) = self.get_json::<RemoteEntry>(&location).await? else {
            return Ok(None);
        };
        if entry.key != *key {
            return Err(RemoteError::BadEntry {
                object: location.to_string(),
                message: format!("it holds key {} instead", entry.key),
            });
        }
        Ok(Some(entry))
    }

    /// Writes `entry` unless the remote has one for its key (first writer wins; both
    /// describe the same outputs). `true` when this call wrote it.
    pub async fn put_entry(&self, entry: &RemoteEntry) -> Result<bool, RemoteError> {
        let body = serde_json::to_vec(entry).map_err(|e| self.unavailable(e))?;
        let options = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&self.entry_key(&entry.key), PutPayload::from(body), options)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(self.unavailable(e)),
        }
    }

    /// Uploads the objects `digests` (files or folders in `local`) that the remote lacks.
    pub async fn upload(
        &self,
        local: &Store,
        digests: &BTreeSet<ObjectDigest>,
        progress: &TransferProgress,
    ) -> Result<(), RemoteError> {
        // Folders become manifests plus their files; all files then go up in parallel.
        let mut files: Vec<(ObjectDigest, std::path::PathBuf, u64)> = Vec::new();
        let mut trees = Vec::new();
        for digest in digests {
            let path = local.object_path(digest);
            let meta = std::fs::symlink_metadata(&path)
                .map_err(|e| RemoteError::io(format!("reading object {digest}"), e))?;
            if meta.is_dir() {
                let tree = Tree::read(&path)
                    .map_err(|e| RemoteError::io(format!("reading folder object {digest}"), e))?;
                for (rel, file_digest, size) in tree.files() {
                    files.push((file_digest, path.join(rel), size));
                }
                trees.push((*digest, tree));
            } else {
                files.push((*digest, path, meta.len()));
            }
        }
        let mut seen = HashSet::new();
        files.retain(|(d, _, _)| seen.insert(*d));
        // Many files: one listing (1000 keys per request) says what is there, instead of
        // a HEAD request per file, which would double the requests of a fresh push.
        let listed = if files.len() >= LIST_INSTEAD_OF_HEAD {
            Some(self.list_area(Area::Files).await?)
        } else {
            None
        };
        if let Some(present) = &listed {
            files.retain(|(digest, _, size)| {
                let there = present.get(digest) == Some(size);
                if there {
                    progress.skipped();
                }
                !there
            });
        }
        let check = listed.is_none();
        stream::iter(files.into_iter().map(|(digest, path, size)| async move {
            self.upload_file(&digest, &path, size, check, progress)
                .await
        }))
        .buffer_unordered(self.concurrency)
        .try_collect::<Vec<()>>()
        .await?;
        // Manifests last: a folder is listed only once all its files are there.
        stream::iter(trees.into_iter().map(|(digest, tree)| async move {
            let body = serde_json::to_vec(&tree).map_err(|e| self.unavailable(e))?;
            self.store
                .put(&self.tree_key(&digest), PutPayload::from(body))
                .await
                .map_err(|e| self.unavailable(e))?;
            Ok::<_, RemoteError>(())
        }))
        .buffer_unordered(self.concurrency)
        .try_collect::<Vec<()>>()
        .await?;
        Ok(())
    }

    async fn upload_file(
        &self,
        digest: &ObjectDigest,
        path: &Path,
        size: u64,
        check: bool,
        progress: &TransferProgress,
    ) -> Result<(), RemoteError> {
        let location = self.object_key(digest);
        if check {
            match self.store.head(&location).await {
                Ok(meta) if meta.size == size => {
                    progress.skipped();
                    return Ok(());
                }
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.unavailable(e)),
            }
        }
        if size >= MULTIPART_THRESHOLD {
            let upload = self
                .store
                .put_multipart(&location)
                .await
                .map_err(|e| self.unavailable(e))?;
            let mut writer = WriteMultipart::new_with_chunk_size(upload, 8 << 20);
            let mut file = tokio::fs::File::open(path)
                .await
                .map_err(|e| RemoteError::io(format!("reading {}", path.display()), e))?;
            let mut buf = vec![0u8; 8 << 20];
            loop {
                use tokio::io::AsyncReadExt;
                let n = file
                    .read(&mut buf)
                    .await
                    .map_err(|e| RemoteError::io(format!("reading {}", path.display()), e))?;
                if n == 0 {
                    break;
                }
                writer
                    .wait_for_capacity(4)
                    .await
                    .map_err(|e| self.unavailable(e))?;
                writer.write(&buf[..n]);
            }
            writer.finish().await.map_err(|e| self.unavailable(e))?;
        } else {
            let bytes = tokio::fs::read(path)
                .await
                .map_err(|e| RemoteError::io(format!("reading {}", path.display()), e))?;
            self.store
                .put(&location, PutPayload::from(Bytes::from(bytes)))
                .await
                .map_err(|e| self.unavailable(e))?;
        }
        progress.moved(size);
        Ok(())
    }

    /// Downloads the objects `wanted` (digest, is_dir) that `local` lacks, verifying each
    /// against its digest before committing it.
    pub async fn download(
        &self,
        local: &Store,
        wanted: &[(ObjectDigest, bool)],
        progress: &TransferProgress,
    ) -> Result<(), RemoteError> {
        let missing: Vec<_> = wanted
            .iter()
            .filter(|(d, _)| {
                let present = local.objects().contains(d);
                if present {
                    progress.skipped();
                }
                !present
            })
            .copied()
            .collect();
        stream::iter(missing.into_iter().map(|(digest, is_dir)| async move {
            let staging = local
                .objects()
                .temp_dir("fetch")
                .map_err(|e| RemoteError::io("creating a download folder", e))?;
            let target = staging.join("object");
            let fetched = if is_dir {
                self.fetch_tree(&digest, &target, progress).await
            } else {
                self.fetch_file(&digest, &target, progress).await
            };
            let committed = fetched.and_then(|()| {
                local
                    .objects()
                    .commit(&target)
                    .map_err(|e| RemoteError::io(format!("storing object {digest}"), e))
            });
            let _ = std::fs::remove_dir_all(&staging);
            let committed = committed?;
            if committed.digest != digest {
                // Checked above already; a second look costs nothing here.
                return Err(RemoteError::Corrupt {
                    object: self.object_key(&digest).to_string(),
                    expected: digest.to_hex(),
                    actual: committed.digest.to_hex(),
                });
            }
            Ok::<_, RemoteError>(())
        }))
        .buffer_unordered(self.concurrency.min(8))
        .try_collect::<Vec<()>>()
        .await?;
        local
            .objects()
            .seal_pending()
            .map_err(|e| RemoteError::io("making downloaded objects durable", e))?;
        Ok(())
    }

    /// Streams object `digest` into `dest`, hashing as it goes.
    async fn fetch_file(
        &self,
        digest: &ObjectDigest,
        dest: &Path,
        progress: &TransferProgress,
    ) -> Result<(), RemoteError> {
        use tokio::io::AsyncWriteExt;
        let location = self.object_key(digest);
        let got = self
            .store
            .get(&location)
            .await
            .map_err(|e| self.unavailable(e))?;
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| RemoteError::io("creating a download folder", e))?;
        }
        let mut file = tokio::fs::File::create(dest)
            .await
            .map_err(|e| RemoteError::io(format!("writing {}", dest.display()), e))?;
        let mut hasher = blake3::Hasher::new();
        let mut size = 0u64;
        let mut chunks = got.into_stream();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|e| self.unavailable(e))?;
            hasher.update(&chunk);
            size += chunk.len() as u64;
            file.write_all(&chunk)
                .await
                .map_err(|e| RemoteError::io(format!("writing {}", dest.display()), e))?;
        }
        file.flush()
            .await
            .map_err(|e| RemoteError::io(format!("writing {}", dest.display()), e))?;
        let actual = ObjectDigest::from(hasher.finalize());
        if actual != *digest {
            return Err(RemoteError::Corrupt {
                object: location.to_string(),
                expected: digest.to_hex(),
                actual: actual.to_hex(),
            });
        }
        progress.moved(size);
        Ok(())
    }

    /// Rebuilds folder object `digest` at `dest` from its manifest and file objects, and
    /// checks the folder's digest.
    async fn fetch_tree(
        &self,
        digest: &ObjectDigest,
        dest: &Path,
        progress: &TransferProgress,
    ) -> Result<(), RemoteError> {
        let location = self.tree_key(digest);
        let tree: Tree = self
            .get_json(&location)
            .await?
            .ok_or_else(|| RemoteError::BadEntry {
                object: location.to_string(),
                message: "the folder's manifest is missing".into(),
            })?;
        std::fs::create_dir_all(dest)
            .map_err(|e| RemoteError::io("creating a download folder", e))?;
        let files: Vec<(std::path::PathBuf, ObjectDigest)> = tree
            .files()
            .map(|(path, d, _)| {
                safe_relative(path)
                    .map(|rel| (dest.join(rel), d))
                    .map_err(|e| RemoteError::BadEntry {
                        object: location.to_string(),
                        message: e.to_string(),
                    })
            })
            .collect::<Result<_, _>>()?;
        stream::iter(
            files
                .into_iter()
                .map(|(path, d)| async move { self.fetch_file(&d, &path, progress).await }),
        )
        .buffer_unordered(self.concurrency)
        .try_collect::<Vec<()>>()
        .await?;
        tree.finish(dest)
            .map_err(|e| RemoteError::io(format!("rebuilding folder object {digest}"), e))?;
        let actual = hash::hash_path(dest)
            .map_err(|e| RemoteError::io(format!("hashing folder object {digest}"), e))?;
        if actual != *digest {
            return Err(RemoteError::Corrupt {
                object: location.to_string(),
                expected: digest.to_hex(),
                actual: actual.to_hex(),
            });
        }
        Ok(())
    }

    /// Every object digest the remote holds (files and folders).
    pub async fn list_objects(&self) -> Result<HashSet<ObjectDigest>, RemoteError> {
        let mut out: HashSet<ObjectDigest> =
            self.list_area(Area::Files).await?.into_keys().collect();
        out.extend(self.list_area(Area::Trees).await?.into_keys());
        Ok(out)
    }

    /// The file objects or folder manifests the remote holds, with their sizes.
    pub async fn list_area(
        &self,
        area: Area,
    ) -> Result<std::collections::HashMap<ObjectDigest, u64>, RemoteError> {
        let prefix = self.key(&[area.folder()]);
        let mut out = std::collections::HashMap::new();
        let mut listing = self.store.list(Some(&prefix));
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(|e| self.unavailable(e))?;
            let name = meta.location.filename().unwrap_or_default();
            let hex = name.strip_suffix(".json").unwrap_or(name);
            if let Ok(digest) = hex.parse::<ObjectDigest>() {
                out.insert(digest, meta.size);
            }
        }
        Ok(out)
    }

    /// The manifest of folder object `digest`, if the remote has it.
    pub async fn tree(&self, digest: &ObjectDigest) -> Result<Option<Tree>, RemoteError> {
        self.get_json(&self.tree_key(digest)).await
    }

    /// A JSON document of the remote (`None` when it is not there).
    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        location: &object_store::path::Path,
    ) -> Result<Option<T>, RemoteError> {
        let bytes = match self.store.get(location).await {
            Ok(got) => got.bytes().await.map_err(|e| self.unavailable(e))?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.unavailable(e)),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| RemoteError::BadEntry {
                object: location.to_string(),
                message: e.to_string(),
            })
    }

    /// Deletes a file object (`Area::Files`) or a folder manifest (`Area::Trees`).
    pub async fn delete(&self, area: Area, digest: &ObjectDigest) -> Result<(), RemoteError> {
        let location = match area {
            Area::Files => self.object_key(digest),
            Area::Trees => self.tree_key(digest),
        };
        match self.store.delete(&location).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.unavailable(e)),
        }
    }

    /// Every cache entry the remote holds.
    pub async fn list_entries(&self) -> Result<Vec<RemoteEntry>, RemoteError> {
        let prefix = self.key(&["cache"]);
        let locations: Vec<_> = self
            .store
            .list(Some(&prefix))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(|e| self.unavailable(e))?;
        let mut entries = Vec::with_capacity(locations.len());
        for location in locations {
            // Deleted since the listing: nothing to report.
            if let Some(entry) = self.get_json(&location).await? {
                entries.push(entry);
            }
        }
        Ok(entries)
    }
}

/// The two kinds of objects a remote keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Area {
    /// `objects/`: file objects and the files of folders.
    Files,
    /// `trees/`: folder manifests.
    Trees,
}

impl Area {
    fn folder(self) -> &'static str {
        match self {
            Area::Files => "objects",
            Area::Trees => "trees",
        }
    }
}
