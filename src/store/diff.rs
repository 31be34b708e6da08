//! What differs between two artifacts: record fields, metadata keys, and content (a line
//! diff for text files, added/removed/changed files for folders). `cairn artifacts diff`
//! prints it; the web UI serves it as JSON.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use super::{hash, ArtifactRecord, ObjectDigest, StoreError};

/// Files above this size are compared by digest only.
pub const MAX_TEXT_BYTES: u64 = 8 << 20;
/// Changed lines kept per file for display.
pub const MAX_CHANGED_LINES: usize = 200;

/// One field or metadata key that differs.
#[derive(Clone, Debug, Serialize)]
pub struct Change {
    /// Field or key name.
    pub name: String,
    /// Value in the first artifact (null: absent).
    pub a: Value,
    /// Value in the second.
    pub b: Value,
}

/// Line-level difference of two text files.
#[derive(Clone, Debug, Serialize)]
pub struct Lines {
    /// Lines only in the second.
    pub added: usize,
    /// Lines only in the first.
    pub removed: usize,
    /// The changed lines, `+`/`-` prefixed, at most [`MAX_CHANGED_LINES`].
    pub changed: Vec<String>,
    /// A unified diff with two lines of context.
    #[serde(skip)]
    pub unified: String,
}

/// How one file differs.
#[derive(Clone, Debug, Serialize)]
pub struct FileChange {
    /// Path inside the artifact (empty for a file artifact).
    pub path: String,
    /// `added`, `removed` or `changed`.
    pub change: &'static str,
    /// The line diff when both sides are text under [`MAX_TEXT_BYTES`].
    pub lines: Option<Lines>,
}

/// The whole comparison.
#[derive(Clone, Debug, Serialize)]
pub struct ArtifactDiff {
    /// Same digest.
    pub identical: bool,
    /// One is a folder, the other a file.
    pub mixed: bool,
    /// Record fields that differ.
    pub fields: Vec<Change>,
    /// Metadata keys that differ.
    pub metadata: Vec<Change>,
    /// Files that differ.
    pub content: Vec<FileChange>,
}

fn file_digests(root: &Path, is_dir: bool) -> Result<BTreeMap<String, ObjectDigest>, StoreError> {
    let io = |e: std::io::Error| StoreError::io(format!("reading {}", root.display()), e);
    if !is_dir {
        return Ok(BTreeMap::from([(
            String::new(),
            hash::hash_file(root).map_err(io)?,
        )]));
    }
    let mut out = BTreeMap::new();
    for entry in walkdir::WalkDir::new(root) {
        let entry = entry.map_err(|e| io(e.into()))?;
        if entry.file_type().is_file() {
            let rel = entry.path().strip_prefix(root).unwrap_or(entry.path());
            out.insert(
                rel.to_string_lossy().to_string(),
                hash::hash_file(entry.path()).map_err(io)?,
            );
        }
    }
    Ok(out)
}

/// The line diff of two files, if both are UTF-8 text under the size limit.
pub fn lines(a: &Path, b: &Path) -> Option<Lines> {
    let small = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.len() <= MAX_TEXT_BYTES);
    if !small(a) || !small(b) {
        return None;
    }
    let ta = String::from_utf8(std::fs::read(a).ok()?).ok()?;
    let tb = String::from_utf8(std::fs::read(b).ok()?).ok()?;
    let d = similar::TextDiff::from_lines(&ta, &tb);
    let (mut added, mut removed, mut changed) = (0, 0, Vec::new());
    for c in d.iter_all_changes() {
        let sign = match c.tag() {
            similar::ChangeTag::Insert => {
                added += 1;
                '+'
            }
            similar::ChangeTag::Delete => {
                removed += 1;
                '-'
            }
            similar::ChangeTag::Equal => continue,
        };
        if changed.len() < MAX_CHANGED_LINES {
            changed.push(format!("{sign}{}", c.value().trim_end()));
        }
    }
    let unified = d
        .unified_diff()
        .context_radius(2)
        .header("a", "b")
        .to_string();
    Some(Lines {
        added,
        removed,
        changed,
        unified,
    })
}

/// Compares artifact `a` (object at `pa`) with `b` (at `pb`).
pub fn compare(
    a: &ArtifactRecord,
    pa: &Path,
    b: &ArtifactRecord,
    pb: &Path,
) -> Result<ArtifactDiff, StoreError> {
    let mut fields = Vec::new();
    for (name, x, y) in [
        (
            "kind",
            Value::from(a.kind.clone()),
            Value::from(b.kind.clone()),
        ),
        ("size", Value::from(a.size), Value::from(b.size)),
        (
            "producer_step",
            Value::from(a.producer_step.clone()),
            Value::from(b.producer_step.clone()),
        ),
        (
            "producer_run",
            Value::from(a.producer_run.clone()),
            Value::from(b.producer_run.clone()),
        ),
        (
            "pipeline",
            Value::from(a.pipeline.clone()),
            Value::from(b.pipeline.clone()),
        ),
        (
            "created_at",
            Value::from(a.created_at.clone()),
            Value::from(b.created_at.clone()),
        ),
    ] {
        if x != y {
            fields.push(Change {
                name: name.into(),
                a: x,
                b: y,
            });
        }
    }
    let empty = serde_json::Map::new();
    let (ma, mb) = (
        a.metadata.as_object().unwrap_or(&empty),
        b.metadata.as_object().unwrap_or(&empty),
    );
    let metadata = ma
        .keys()
        .chain(mb.keys().filter(|k| !ma.contains_key(*k)))
        .filter(|k| ma.get(*k) != mb.get(*k))
        .map(|k| Change {
            name: k.clone(),
            a: ma.get(k).cloned().unwrap_or(Value::Null),
            b: mb.get(k).cloned().unwrap_or(Value::Null),
        })
        .collect();
    let identical = a.digest == b.digest;
    let mixed = a.is_dir != b.is_dir;
    let mut content = Vec::new();
    if !identical && !mixed {
        let (fa, fb) = (file_digests(pa, a.is_dir)?, file_digests(pb, b.is_dir)?);
        let at = |root: &Path, rel: &str| {
            if rel.is_empty() {
                root.to_path_buf()
            } else {
                root.join(rel)
            }
        };
        for (path, d) in &fa {
            match fb.get(path) {
                None => content.push(FileChange {
                    path: path.clone(),
                    change: "removed",
                    lines: None,
                }),
                Some(e) if e != d => content.push(FileChange {
                    path: path.clone(),
                    change: "changed",
                    lines: lines(&at(pa, path), &at(pb, path)),
                }),
                _ => {}
            }
        }
        for path in fb.keys().filter(|p| !fa.contains_key(*p)) {
            content.push(FileChange {
                path: path.clone(),
                change: "added",
                lines: None,
            });
        }
    }
    Ok(ArtifactDiff {
        identical,
        mixed,
        fields,
        metadata,
        content,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(digest: u8, meta: Value) -> ArtifactRecord {
        ArtifactRecord {
            digest: ObjectDigest::from_bytes([digest; 32]),
            kind: "directory".into(),
            is_dir: true,
            size: 1,
            created_at: "t".into(),
            producer_run: "r".into(),
            producer_step: "s".into(),
            output: "o".into(),
            pipeline: "p".into(),
            metadata: meta,
        }
    }

    #[test]
    fn folders_report_added_removed_and_changed_files_with_line_counts() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        std::fs::write(a.path().join("same.txt"), "x\n").unwrap();
        std::fs::write(b.path().join("same.txt"), "x\n").unwrap();
        std::fs::write(a.path().join("gone.txt"), "old\n").unwrap();
        std::fs::write(b.path().join("new.txt"), "new\n").unwrap();
        std::fs::write(a.path().join("edit.txt"), "one\ntwo\nthree\n").unwrap();
        std::fs::write(b.path().join("edit.txt"), "one\n2\nthree\nfour\n").unwrap();
        let d = compare(
            &record(1, serde_json::json!({"count": 3, "model": "m"})),
            a.path(),
            &record(2, serde_json::json!({"count": 4, "model": "m"})),
            b.path(),
        )
        .unwrap();
        let changes: Vec<(&str, &str)> = d
            .content
            .iter()
            .map(|c| (c.path.as_str(), c.change))
            .collect();
        assert_eq!(
            changes,
            [
                ("edit.txt", "changed"),
                ("gone.txt", "removed"),
                ("new.txt", "added")
            ]
        );
        let lines = d.content[0].lines.as_ref().unwrap();
        assert_eq!((lines.added, lines.removed), (2, 1));
        assert_eq!(lines.changed, ["-two", "+2", "+four"]);
        assert_eq!(d.metadata.len(), 1);
        assert_eq!(d.metadata[0].name, "count");
        assert!(!d.identical && !d.mixed);
    }
}
