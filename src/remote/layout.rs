//! A folder object as the remote keeps it: a manifest of every entry, its files stored
//! as objects of their own (so two folders that share a file share its object, and a
//! folder of many small files moves in parallel).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::store::hash::{self, EntryKind};
use crate::store::ObjectDigest;

/// A folder's entries, parents before children.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Tree {
    /// Every file, folder and link under the root, by relative path.
    pub entries: Vec<TreeEntry>,
}

/// One entry of a [`Tree`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TreeEntry {
    /// Path relative to the folder, `/`-separated.
    pub path: String,
    /// What it is.
    #[serde(flatten)]
    pub kind: TreeKind,
}

/// The kind of a [`TreeEntry`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum TreeKind {
    /// A folder.
    Dir,
    /// A regular file, stored as object `digest`.
    File {
        /// blake3 of its bytes.
        digest: ObjectDigest,
        /// Its size.
        size: u64,
        /// The executable bit.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        executable: bool,
    },
    /// A symbolic link (never followed).
    Symlink {
        /// Its target, as written.
        target: String,
    },
}

impl Tree {
    /// Reads the folder at `root` (hashing every file).
    pub fn read(root: &Path) -> std::io::Result<Tree> {
        let mut entries = Vec::new();
        walk(root, "", &mut entries)?;
        Ok(Tree { entries })
    }

    /// The files, with their digests and sizes.
    pub fn files(&self) -> impl Iterator<Item = (&str, ObjectDigest, u64)> {
        self.entries.iter().filter_map(|e| match e.kind {
            TreeKind::File { digest, size, .. } => Some((e.path.as_str(), digest, size)),
            _ => None,
        })
    }

    /// Creates the folders, links and executable bits under `root`, whose files were
    /// already written; refuses paths that would leave `root`.
    pub fn finish(&self, root: &Path) -> std::io::Result<()> {
        for entry in &self.entries {
            let path = root.join(safe_relative(&entry.path)?);
            match &entry.kind {
                TreeKind::Dir => std::fs::create_dir_all(&path)?,
                TreeKind::Symlink { target } => {
                    if let Some(parent) = path.parent() {
                        std::fs::create_dir_all(parent)?;
                    }
                    std::os::unix::fs::symlink(target, &path)?;
                }
                TreeKind::File { executable, .. } => {
                    if *executable {
                        use std::os::unix::fs::PermissionsExt;
                        let mut perms = std::fs::metadata(&path)?.permissions();
                        perms.set_mode(perms.mode() | 0o111);
                        std::fs::set_permissions(&path, perms)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// `path` as a relative path with no `..`, root or empty parts.
pub fn safe_relative(path: &str) -> std::io::Result<&Path> {
    let p = Path::new(path);
    let ok = !path.is_empty()
        && p.components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    if ok {
        Ok(p)
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("tree entry `{path}` leaves its folder"),
        ))
    }
}

fn walk(dir: &Path, prefix: &str, out: &mut Vec<TreeEntry>) -> std::io::Result<()> {
    for (name, meta) in hash::read_sorted_dir(dir)? {
        let rel = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        let path = dir.join(&name);
        match hash::entry_kind(&meta) {
            EntryKind::Dir => {
                out.push(TreeEntry {
                    path: rel.clone(),
                    kind: TreeKind::Dir,
                });
                walk(&path, &rel, out)?;
            }
            EntryKind::File { executable } => out.push(TreeEntry {
                path: rel,
                kind: TreeKind::File {
                    digest: hash::hash_file(&path)?,
                    size: meta.len(),
                    executable,
                },
            }),
            EntryKind::Symlink => out.push(TreeEntry {
                path: rel,
                kind: TreeKind::Symlink {
                    target: std::fs::read_link(&path)?.to_string_lossy().into_owned(),
                },
            }),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_rebuilds_to_the_same_digest() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("sub/empty")).unwrap();
        std::fs::write(src.join("a.txt"), "alpha").unwrap();
        std::fs::write(src.join("sub/b.bin"), [0u8, 1, 2]).unwrap();
        std::os::unix::fs::symlink("a.txt", src.join("link")).unwrap();
        let tree = Tree::read(&src).unwrap();
        assert_eq!(tree.files().count(), 2);
        let json = serde_json::to_string(&tree).unwrap();
        let back: Tree = serde_json::from_str(&json).unwrap();
        let dst = tmp.path().join("dst");
        std::fs::create_dir_all(dst.join("sub")).unwrap();
        for (path, _, _) in back.files() {
            std::fs::copy(src.join(path), dst.join(path)).unwrap();
        }
        back.finish(&dst).unwrap();
        assert_eq!(
            hash::hash_path(&dst).unwrap(),
            hash::hash_path(&src).unwrap()
        );
        assert!(safe_relative("../x").is_err());
        assert!(safe_relative("/etc/passwd").is_err());
        assert!(safe_relative("a/./b").is_ok());
    }
}
