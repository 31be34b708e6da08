//! The object area: content-addressed files and directory trees under `objects/`, written
//! through a private temp folder and renamed into place whole, so a reader (or a run after
//! a kill -9) never sees half an object.
//!
//! Durability is a separate, later step (group commit): an object is renamed into place
//! read-only but *unsealed* (its top entry lacks the others-read bit, [`SEALED_BIT`]); its
//! data is fsynced in batches off the critical path ([`ObjectArea::seal_pending`], called
//! before any record that references it is written), and only then does it get the bit,
//! through the same file descriptor that was fsynced. So "sealed" implies "durable", and an
//! unsealed object left by a kill or a power loss is never trusted by its name: committing
//! the same digest again rehashes it first and replaces it when the bytes are wrong.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use super::digest::ObjectDigest;
use super::hash;

/// The mode bit an object's top entry gets once its data is durable.
pub const SEALED_BIT: u32 = 0o004;

/// Where objects and temp work live inside a store root.
#[derive(Clone, Debug)]
pub struct ObjectArea {
    objects: PathBuf,
    tmp: PathBuf,
    fsync: bool,
    /// Objects renamed into place whose data is not yet known durable.
    unsealed: Arc<Mutex<Vec<PathBuf>>>,
    /// `objects/` opened once: presence checks look names up relative to it.
    objects_dir: Arc<OnceLock<fs::File>>,
}

/// What committing a path into the store produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Committed {
    /// Content digest of the object.
    pub digest: ObjectDigest,
    /// Total bytes of file content.
    pub size: u64,
    /// Whether the object is a directory tree.
    pub is_dir: bool,
}

impl ObjectArea {
    /// An object area rooted at `root` (folders are created on demand).
    pub fn new(root: &Path, fsync: bool) -> Self {
        Self {
            objects: root.join("objects"),
            tmp: root.join("tmp"),
            fsync,
            unsealed: Arc::new(Mutex::new(Vec::new())),
            objects_dir: Arc::new(OnceLock::new()),
        }
    }

    /// Creates the folders of the object area.
    pub fn create_dirs(&self) -> io::Result<()> {
        fs::create_dir_all(&self.objects)?;
        fs::create_dir_all(&self.tmp)
    }

    /// The path an object with this digest has (whether or not it exists).
    pub fn path(&self, digest: &ObjectDigest) -> PathBuf {
        let hex = digest.to_hex();
        self.objects.join(&hex[..2]).join(&hex[2..])
    }

    /// Whether an object with this digest is present (sealed or not).
    pub fn contains(&self, digest: &ObjectDigest) -> bool {
        let hex = digest.to_hex();
        let relative = format!("{}/{}", &hex[..2], &hex[2..]);
        match self.opened_objects_dir() {
            // Half the path walk of the full path: a no-op rerun asks this of every output.
            Some(dir) => rustix::fs::statat(
                dir,
                relative.as_str(),
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )
            .is_ok(),
            None => fs::symlink_metadata(self.objects.join(relative)).is_ok(),
        }
    }

    /// `objects/`, opened on first use (it may not exist yet).
    fn opened_objects_dir(&self) -> Option<&fs::File> {
        if let Some(dir) = self.objects_dir.get() {
            return Some(dir);
        }
        let dir = fs::File::open(&self.objects).ok()?;
        Some(self.objects_dir.get_or_init(|| dir))
    }

    /// Whether an object with this digest is present and known durable: what code that
    /// trusts an object by its name alone (without a record referencing it) must ask.
    pub fn is_sealed(&self, digest: &ObjectDigest) -> bool {
        fs::symlink_metadata(self.path(digest)).is_ok_and(|m| is_sealed(&m))
    }

    /// Makes every object committed so far durable (fsync, in one batch) and marks it
    /// sealed. Records that reference objects are written only after this returns.
    pub fn seal_pending(&self) -> io::Result<()> {
        let pending = std::mem::take(&mut *self.unsealed.lock().unwrap_or_else(|p| p.into_inner()));
        let mut pending = pending.into_iter();
        while let Some(path) = pending.next() {
            if let Err(e) = seal(&path, self.fsync) {
                // Keep what is left for the next attempt; this one failed.
                let mut queue = self.unsealed.lock().unwrap_or_else(|p| p.into_inner());
                queue.push(path);
                queue.extend(pending);
                return Err(e);
            }
        }
        Ok(())
    }

    fn queue_seal(&self, path: PathBuf) {
        self.unsealed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(path);
    }

    /// A fresh, empty folder under `tmp/` owned by this process; its name carries our pid
    /// so that a later process can clean it up when we are gone.
    pub fn temp_dir(&self, label: &str) -> io::Result<PathBuf> {
        let label: String = label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .take(40)
            .collect();
        let dir = self.tmp.join(format!(
            "p{}-{}-{:016x}",
            std::process::id(),
            label,
            rand::random::<u64>()
        ));
        fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// Removes temp folders left by processes that no longer exist (a killed run).
    pub fn clean_stale_temp(&self) -> io::Result<usize> {
        let mut removed = 0;
        let entries = match fs::read_dir(&self.tmp) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().to_string();
            let pid = name
                .strip_prefix('p')
                .and_then(|rest| rest.split('-').next())
                .and_then(|p| p.parse::<i32>().ok());
            let alive = pid.is_some_and(process_alive);
            if !alive {
                remove_any(&entry.path())?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Moves a file or directory (which must live under this area's `tmp/`) into the
    /// object area under its content digest, read-only and unsealed; the source is
    /// consumed either way. Durability follows in [`ObjectArea::seal_pending`].
    pub fn commit(&self, src: &Path) -> io::Result<Committed> {
        let digest = hash::hash_path(src)?;
        let meta = fs::symlink_metadata(src)?;
        let is_dir = meta.is_dir();
        let size = tree_size(src)?;
        let committed = Committed {
            digest,
            size,
            is_dir,
        };
        let dest = self.path(&digest);
        match fs::symlink_metadata(&dest) {
            Ok(existing) if is_sealed(&existing) => {
                remove_any(src)?;
                return Ok(committed);
            }
            Ok(_) => {
                // Unsealed: another commit of the same bytes is in flight, or a killed run
                // left it. Its name proves nothing; its bytes must.
                if hash::hash_path(&dest).ok() == Some(digest) {
                    remove_any(src)?;
                    self.queue_seal(dest);
                    return Ok(committed);
                }
                remove_any(&dest)?;
            }
            Err(_) => {}
        }
        protect(src)?;
        let parent = dest.parent().expect("object path has a parent");
        fs::create_dir_all(parent)?;
        match fs::rename(src, &dest) {
            Ok(()) => {}
            // Another process committed the same content meanwhile: its copy gets sealed
            // (or rehashed) like ours would.
            Err(_) if fs::symlink_metadata(&dest).is_ok() => remove_any(src)?,
            Err(e) => return Err(e),
        }
        self.queue_seal(dest);
        Ok(committed)
    }

    /// Copies an outside path into a temp folder and commits it.
    pub fn import_copy(&self, src: &Path) -> io::Result<Committed> {
        let staging = self.temp_dir("import")?;
        let target = staging.join("object");
        copy_tree(src, &target)?;
        let committed = self.commit(&target);
        let _ = fs::remove_dir_all(&staging);
        committed
    }

    /// Every object digest present on disk, with its path.
    pub fn list(&self) -> io::Result<Vec<(ObjectDigest, PathBuf)>> {
        let mut out = Vec::new();
        let shards = match fs::read_dir(&self.objects) {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for shard in shards {
            let shard = shard?;
            let prefix = shard.file_name().to_string_lossy().to_string();
            if !shard.file_type()?.is_dir() {
                continue;
            }
            for obj in fs::read_dir(shard.path())? {
                let obj = obj?;
                let name = format!("{prefix}{}", obj.file_name().to_string_lossy());
                if let Ok(digest) = name.parse::<ObjectDigest>() {
                    out.push((digest, obj.path()));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Deletes one object (files inside a tree are read-only, their folders are not).
    pub fn remove(&self, digest: &ObjectDigest) -> io::Result<()> {
        remove_any(&self.path(digest))
    }
}

/// Total size in bytes of the files under a path.
pub fn tree_size(path: &Path) -> io::Result<u64> {
    let meta = fs::symlink_metadata(path)?;
    if !meta.is_dir() {
        return Ok(if meta.is_file() { meta.len() } else { 0 });
    }
    let mut total = 0;
    for entry in walkdir::WalkDir::new(path) {
        let entry = entry.map_err(io::Error::other)?;
        if entry.file_type().is_file() {
            total += entry.metadata().map_err(io::Error::other)?.len();
        }
    }
    Ok(total)
}

fn is_sealed(meta: &fs::Metadata) -> bool {
    // A symlink object has no bytes to flush and no mode of its own.
    meta.file_type().is_symlink() || meta.permissions().mode() & SEALED_BIT != 0
}

/// Makes files read-only (an object must never change in place) and clears the sealed
/// bit of the top entry. Cheap: no data is flushed here.
fn protect(path: &Path) -> io::Result<()> {
    for entry in walkdir::WalkDir::new(path) {
        let entry = entry.map_err(io::Error::other)?;
        let ft = entry.file_type();
        let top = entry.depth() == 0;
        if ft.is_file() || (top && ft.is_dir()) {
            let mut mode = entry
                .metadata()
                .map_err(io::Error::other)?
                .permissions()
                .mode();
            if ft.is_file() {
                mode &= !0o222;
            }
            if top {
                mode &= !SEALED_BIT;
            }
            fs::set_permissions(entry.path(), fs::Permissions::from_mode(mode))?;
        }
    }
    Ok(())
}

/// Flushes an object's file data, then sets the sealed bit through a descriptor opened
/// before the flush, so the bit lands on exactly the bytes that were made durable.
fn seal(path: &Path, fsync: bool) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    let top = fs::File::open(path)?;
    if fsync {
        if meta.is_dir() {
            for entry in walkdir::WalkDir::new(path) {
                let entry = entry.map_err(io::Error::other)?;
                if entry.file_type().is_file() {
                    fs::File::open(entry.path())?.sync_data()?;
                }
            }
        } else {
            top.sync_data()?;
        }
    }
    let mode = top.metadata()?.permissions().mode();
    top.set_permissions(fs::Permissions::from_mode(mode | SEALED_BIT))
}

/// Copies a file, symlink or directory tree, keeping the executable bit.
pub fn copy_tree(src: &Path, dest: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(src)?;
    if meta.file_type().is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(src)?, dest)
    } else if meta.is_dir() {
        fs::create_dir_all(dest)?;
        for (name, _) in hash::read_sorted_dir(src)? {
            copy_tree(&src.join(&name), &dest.join(&name))?;
        }
        Ok(())
    } else {
        fs::copy(src, dest)?;
        let mode = meta.permissions().mode() | 0o200;
        fs::set_permissions(dest, fs::Permissions::from_mode(mode))
    }
}

/// Removes a file, symlink or tree; a missing path is not an error.
pub fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether a process with this pid exists (signal 0 probes without sending).
pub fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 performs only the permission and existence check.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn commit_is_idempotent_and_read_only() {
        let root = tempfile::tempdir().unwrap();
        let area = ObjectArea::new(root.path(), false);
        area.create_dirs().unwrap();
        let mut digests = Vec::new();
        for _ in 0..2 {
            let t = area.temp_dir("t").unwrap();
            fs::write(t.join("f"), b"same").unwrap();
            digests.push(area.commit(&t.join("f")).unwrap().digest);
        }
        assert_eq!(digests[0], digests[1]);
        assert_eq!(area.list().unwrap().len(), 1);
        let mode = fs::metadata(area.path(&digests[0]))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o222, 0, "objects are read-only");
    }

    fn commit_bytes(area: &ObjectArea, bytes: &[u8]) -> ObjectDigest {
        let t = area.temp_dir("t").unwrap();
        fs::write(t.join("f"), bytes).unwrap();
        area.commit(&t.join("f")).unwrap().digest
    }

    #[test]
    fn objects_are_sealed_only_by_seal_pending() {
        let root = tempfile::tempdir().unwrap();
        let area = ObjectArea::new(root.path(), true);
        area.create_dirs().unwrap();
        let digest = commit_bytes(&area, b"bytes");
        assert!(area.contains(&digest));
        assert!(!area.is_sealed(&digest), "renamed, not yet durable");
        area.seal_pending().unwrap();
        assert!(area.is_sealed(&digest));
        let mode = fs::metadata(area.path(&digest))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o222, 0, "still read-only");
    }

    #[test]
    fn regression_an_unsealed_object_with_wrong_bytes_is_replaced_not_trusted() {
        let root = tempfile::tempdir().unwrap();
        let area = ObjectArea::new(root.path(), false);
        area.create_dirs().unwrap();
        // What a power loss can leave: the name in place, the bytes not (never sealed).
        let digest = commit_bytes(&area, b"the real content");
        let path = area.path(&digest);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&path, b"\0\0\0\0").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        area.unsealed.lock().unwrap().clear();

        assert_eq!(commit_bytes(&area, b"the real content"), digest);
        assert_eq!(fs::read(&path).unwrap(), b"the real content");
        area.seal_pending().unwrap();
        assert!(area.is_sealed(&digest));

        // A sealed object is trusted as it is: committing the same bytes keeps it.
        let inode = fs::metadata(&path).unwrap().ino();
        assert_eq!(commit_bytes(&area, b"the real content"), digest);
        assert_eq!(fs::metadata(&path).unwrap().ino(), inode);
    }

    #[test]
    fn an_unsealed_object_with_the_right_bytes_is_kept_and_sealed() {
        let root = tempfile::tempdir().unwrap();
        let area = ObjectArea::new(root.path(), false);
        area.create_dirs().unwrap();
        let digest = commit_bytes(&area, b"left by a killed run");
        area.unsealed.lock().unwrap().clear();
        let inode = fs::metadata(area.path(&digest)).unwrap().ino();
        assert_eq!(commit_bytes(&area, b"left by a killed run"), digest);
        assert_eq!(fs::metadata(area.path(&digest)).unwrap().ino(), inode);
        area.seal_pending().unwrap();
        assert!(area.is_sealed(&digest));
    }

    #[test]
    fn stale_temp_of_dead_process_is_removed() {
        let root = tempfile::tempdir().unwrap();
        let area = ObjectArea::new(root.path(), false);
        area.create_dirs().unwrap();
        let live = area.temp_dir("live").unwrap();
        let dead = root.path().join("tmp/p999999999-x-1");
        fs::create_dir_all(&dead).unwrap();
        assert_eq!(area.clean_stale_temp().unwrap(), 1);
        assert!(live.exists());
        assert!(!dead.exists());
    }
}
