//! Content hashing: files are plain blake3 (the same digest `b3sum` prints); a directory
//! is a Merkle hash over its sorted entries, so equal trees hash equal wherever they live.

use std::fs;
use std::io;
use std::path::Path;

use rayon::prelude::*;

use super::digest::ObjectDigest;

/// Files at least this large are hashed with memory mapping and all cores.
const MMAP_RAYON_THRESHOLD: u64 = 1 << 20;

const DIR_DOMAIN: &[u8] = b"cairn-dir-v1\0";

/// The kind of a directory entry as it enters the Merkle hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file (the executable bit is part of the identity).
    File { executable: bool },
    /// A sub-directory.
    Dir,
    /// A symbolic link; its target string is hashed, never followed.
    Symlink,
}

impl EntryKind {
    fn tag(self) -> u8 {
        match self {
            EntryKind::File { executable: false } => b'f',
            EntryKind::File { executable: true } => b'x',
            EntryKind::Dir => b'd',
            EntryKind::Symlink => b'l',
        }
    }
}

/// Hashes one regular file.
pub fn hash_file(path: &Path) -> io::Result<ObjectDigest> {
    let len = fs::metadata(path)?.len();
    let mut hasher = blake3::Hasher::new();
    if len >= MMAP_RAYON_THRESHOLD {
        hasher.update_mmap_rayon(path)?;
    } else {
        hasher.update_reader(fs::File::open(path)?)?;
    }
    Ok(hasher.finalize().into())
}

/// Combines already-hashed children (name, kind, digest) into a directory digest.
/// Children must be sorted by name; callers get that from `read_sorted_dir`.
pub fn merkle_dir(children: &[(String, EntryKind, ObjectDigest)]) -> ObjectDigest {
    let mut hasher = blake3::Hasher::new();
    hasher.update(DIR_DOMAIN);
    for (name, kind, digest) in children {
        hasher.update(&[kind.tag()]);
        hasher.update(&(name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        hasher.update(digest.as_bytes());
    }
    hasher.finalize().into()
}

/// Digest of a symlink: the hash of its target path text.
pub fn hash_symlink(path: &Path) -> io::Result<ObjectDigest> {
    let target = fs::read_link(path)?;
    Ok(blake3::hash(target.to_string_lossy().as_bytes()).into())
}

/// Entry kind of a path without following symlinks.
pub fn entry_kind(meta: &fs::Metadata) -> EntryKind {
    use std::os::unix::fs::PermissionsExt;
    let ft = meta.file_type();
    if ft.is_symlink() {
        EntryKind::Symlink
    } else if ft.is_dir() {
        EntryKind::Dir
    } else {
        EntryKind::File {
            executable: meta.permissions().mode() & 0o111 != 0,
        }
    }
}

/// Directory entries sorted by name (byte order), as UTF-8 names.
pub fn read_sorted_dir(dir: &Path) -> io::Result<Vec<(String, fs::Metadata)>> {
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().into_string().map_err(|raw| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("file name {raw:?} in {} is not UTF-8", dir.display()),
            )
        })?;
        let meta = fs::symlink_metadata(entry.path())?;
        if !(meta.is_file() || meta.is_dir() || meta.file_type().is_symlink()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} is not a regular file, directory or symlink",
                    entry.path().display()
                ),
            ));
        }
        entries.push((name, meta));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(entries)
}

/// Hashes a file, directory tree or symlink. Files in a tree are hashed in parallel.
pub fn hash_path(path: &Path) -> io::Result<ObjectDigest> {
    hash_path_with(path, &|file, _meta| hash_file(file))
}

/// Like `hash_path`, with a caller-supplied file hasher (the stat cache plugs in here).
pub fn hash_path_with(
    path: &Path,
    hash_file_fn: &(dyn Fn(&Path, &fs::Metadata) -> io::Result<ObjectDigest> + Sync),
) -> io::Result<ObjectDigest> {
    let meta = fs::symlink_metadata(path)?;
    match entry_kind(&meta) {
        EntryKind::File { .. } => hash_file_fn(path, &meta),
        EntryKind::Symlink => hash_symlink(path),
        EntryKind::Dir => hash_dir(path, hash_file_fn),
    }
}

fn hash_dir(
    dir: &Path,
    hash_file_fn: &(dyn Fn(&Path, &fs::Metadata) -> io::Result<ObjectDigest> + Sync),
) -> io::Result<ObjectDigest> {
    let entries = read_sorted_dir(dir)?;
    let children = entries
        .into_par_iter()
        .map(|(name, meta)| {
            let child = dir.join(&name);
            let kind = entry_kind(&meta);
            let digest = match kind {
                EntryKind::File { .. } => hash_file_fn(&child, &meta)?,
                EntryKind::Symlink => hash_symlink(&child)?,
                EntryKind::Dir => hash_dir(&child, hash_file_fn)?,
            };
            Ok((name, kind, digest))
        })
        .collect::<io::Result<Vec<_>>>()?;
    Ok(merkle_dir(&children))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_digest_is_plain_blake3() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a");
        fs::write(&f, b"hello").unwrap();
        assert_eq!(
            hash_file(&f).unwrap(),
            ObjectDigest::from(blake3::hash(b"hello"))
        );
    }

    #[test]
    fn equal_trees_hash_equal_and_names_matter() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for root in [a.path(), b.path()] {
            fs::create_dir(root.join("sub")).unwrap();
            fs::write(root.join("sub/x.txt"), b"x").unwrap();
            fs::write(root.join("y.txt"), b"y").unwrap();
        }
        assert_eq!(hash_path(a.path()).unwrap(), hash_path(b.path()).unwrap());
        fs::rename(b.path().join("y.txt"), b.path().join("z.txt")).unwrap();
        assert_ne!(hash_path(a.path()).unwrap(), hash_path(b.path()).unwrap());
    }

    #[test]
    fn empty_file_and_empty_dir_differ() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("e")).unwrap();
        fs::write(d.path().join("f"), b"").unwrap();
        assert_ne!(
            hash_path(&d.path().join("e")).unwrap(),
            hash_path(&d.path().join("f")).unwrap()
        );
    }
}
