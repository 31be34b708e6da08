//! The call cache: every answered chat-completions request is kept in the store under the
//! digest of what determines its answer (model, messages, sampling parameters), so a
//! rerun never pays twice for the same request, whatever else changed in the pipeline.
//!
//! Entries live outside the content-addressed objects (`<store>/llm-cache/ab/<hex>.json`)
//! because they are not artifacts: `cairn gc` leaves them alone. Each is written to a
//! temporary file and renamed, so a killed run leaves either a whole entry or none.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{ChatMessage, Usage};

/// Folder of the cache below the store root.
pub const DIR: &str = "llm-cache";

/// One cached answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Entry {
    /// Model that answered (as the server named it).
    pub model: String,
    /// The request's messages, kept for inspection.
    pub messages: Vec<ChatMessage>,
    /// The assistant's reply text.
    pub content: String,
    /// Why generation stopped (`stop`, `length`, ...), when the server said.
    #[serde(default)]
    pub finish_reason: Option<String>,
    /// Tokens the call cost.
    pub usage: Usage,
}

/// The cache folder of one store.
#[derive(Clone, Debug)]
pub struct CallCache {
    dir: PathBuf,
}

impl CallCache {
    /// The cache of the store at `store_root`.
    pub fn new(store_root: &Path) -> Self {
        Self {
            dir: store_root.join(DIR),
        }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(&key[..2]).join(format!("{key}.json"))
    }

    /// Whether `key` has an answer.
    pub fn contains(&self, key: &str) -> bool {
        self.path(key).is_file()
    }

    /// The cached answer for `key`; an unreadable entry counts as missing (it is
    /// overwritten by the next answer).
    pub fn get(&self, key: &str) -> Option<Entry> {
        let bytes = std::fs::read(self.path(key)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Stores the answer for `key` atomically.
    pub fn put(&self, key: &str, entry: &Entry) -> std::io::Result<()> {
        let path = self.path(key);
        let dir = path.parent().unwrap_or(&self.dir);
        std::fs::create_dir_all(dir)?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        serde_json::to_writer(&mut tmp, entry)?;
        tmp.flush()?;
        tmp.as_file().sync_all()?;
        tmp.persist(&path).map_err(|e| e.error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_missing_or_corrupt_ones_read_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CallCache::new(dir.path());
        let key = "ab".repeat(32);
        assert!(cache.get(&key).is_none());
        let entry = Entry {
            model: "m".into(),
            messages: vec![ChatMessage::user("hi")],
            content: "hello".into(),
            finish_reason: Some("stop".into()),
            usage: Usage {
                prompt_tokens: 3,
                completion_tokens: 1,
            },
        };
        cache.put(&key, &entry).unwrap();
        assert!(cache.contains(&key));
        assert_eq!(cache.get(&key).unwrap().content, "hello");
        std::fs::write(cache.path(&key), b"{truncated").unwrap();
        assert!(cache.get(&key).is_none());
        // No temporary files are left next to entries.
        let names: Vec<_> = std::fs::read_dir(dir.path().join(DIR).join("ab"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }
}
