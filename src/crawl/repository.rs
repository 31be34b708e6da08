//! Code repositories: a shallow `git clone`, then one `repository` document per text file
//! on an extension allow-list. Binaries, lock files and vendored folders are skipped, and
//! code keeps its whitespace exactly.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::documents::{Category, Document};

/// Which files of a repository become documents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// File extensions kept (without the dot).
    pub extensions: Vec<String>,
    /// Folders never entered.
    pub skip_dirs: Vec<String>,
    /// File names never kept (lock files).
    pub skip_files: Vec<String>,
    /// Larger files are skipped.
    pub max_file_bytes: u64,
}

impl Default for Settings {
    fn default() -> Self {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect();
        Self {
            extensions: s(&[
                "md", "markdown", "rst", "txt", "py", "rs", "go", "js", "ts", "tsx", "jsx", "java",
                "kt", "c", "h", "cc", "cpp", "hpp", "cs", "rb", "php", "swift", "scala", "sh",
                "bash", "sql", "toml", "yaml", "yml", "json", "html", "css", "scss", "ipynb", "r",
                "jl", "lua", "hs", "ex", "exs", "clj", "dart", "vue", "svelte",
            ]),
            skip_dirs: s(&[
                ".git",
                "node_modules",
                "vendor",
                "target",
                "dist",
                "build",
                "__pycache__",
                ".venv",
                "venv",
                "third_party",
                ".idea",
                ".vscode",
            ]),
            skip_files: s(&[
                "Cargo.lock",
                "package-lock.json",
                "yarn.lock",
                "pnpm-lock.yaml",
                "poetry.lock",
                "Pipfile.lock",
                "Gemfile.lock",
                "go.sum",
                "composer.lock",
                "uv.lock",
            ]),
            max_file_bytes: 1 << 20,
        }
    }
}

/// Clones `url` shallowly into a temp folder and reads its text files.
pub fn clone_and_read(url: &str, settings: &Settings) -> Result<Vec<Document>, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("temp folder: {e}"))?;
    let target = dir.path().join("repo");
    let out = Command::new("git")
        .args(["clone", "--depth", "1", "--quiet", "--no-tags", url])
        .arg(&target)
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .map_err(|e| format!("running git (is it installed?): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "git clone failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    read_tree(url, &target, settings)
}

fn read_tree(url: &str, root: &Path, settings: &Settings) -> Result<Vec<Document>, String> {
    let name = url
        .trim_end_matches('/')
        .trim_end_matches(".git")
        .rsplit(['/', ':'])
        .next()
        .unwrap_or(url)
        .to_string();
    let fetched_at = crate::util::clock::now_rfc3339();
    let mut docs = Vec::new();
    let walker = walkdir::WalkDir::new(root)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| {
            !(e.file_type().is_dir()
                && settings
                    .skip_dirs
                    .iter()
                    .any(|d| e.file_name() == d.as_str()))
        });
    for entry in walker {
        let entry = entry.map_err(|e| format!("reading the clone: {e}"))?;
        if !entry.file_type().is_file() {
            continue;
        }
        let file_name = entry.file_name().to_string_lossy();
        if settings.skip_files.iter().any(|f| f == file_name.as_ref()) {
            continue;
        }
        let ext = entry
            .path()
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        let readme = file_name.to_ascii_lowercase().starts_with("readme");
        if !readme && !settings.extensions.iter().any(|e| e == &ext) {
            continue;
        }
        let meta = entry.metadata().map_err(|e| e.to_string())?;
        if meta.len() > settings.max_file_bytes {
            continue;
        }
        let bytes = std::fs::read(entry.path()).map_err(|e| e.to_string())?;
        if bytes[..bytes.len().min(8192)].contains(&0) {
            continue;
        }
        let Ok(content) = String::from_utf8(bytes) else {
            continue;
        };
        if content.trim().is_empty() {
            continue;
        }
        let rel = entry
            .path()
            .strip_prefix(root)
            .map_err(|e| e.to_string())?
            .to_string_lossy()
            .to_string();
        let doc_url = format!("{url}#{rel}");
        let mut metadata = BTreeMap::new();
        metadata.insert(
            "repository".to_string(),
            serde_json::Value::String(url.to_string()),
        );
        metadata.insert("path".to_string(), serde_json::Value::String(rel.clone()));
        metadata.insert("language".to_string(), serde_json::Value::String(ext));
        docs.push(Document {
            id: Document::make_id(&doc_url, &content),
            url: doc_url,
            category: Category::Repository,
            title: Some(format!("{name}/{rel}")),
            author: None,
            published: None,
            content,
            fetched_at: fetched_at.clone(),
            metadata,
        });
    }
    Ok(docs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_text_files_and_skips_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("src")).unwrap();
        std::fs::create_dir_all(root.join("node_modules/x")).unwrap();
        std::fs::write(
            root.join("src/main.rs"),
            "fn main() {\n    println!(\"hi\");\n}\n",
        )
        .unwrap();
        std::fs::write(root.join("README.md"), "# Project\n").unwrap();
        std::fs::write(root.join("Cargo.lock"), "lock").unwrap();
        std::fs::write(root.join("logo.png"), [0x89, b'P', b'N', b'G', 0, 1]).unwrap();
        std::fs::write(root.join("data.json"), [b'{', 0, b'}']).unwrap();
        std::fs::write(root.join("node_modules/x/index.js"), "x").unwrap();
        let docs = read_tree("https://github.com/me/proj", root, &Settings::default()).unwrap();
        let paths: Vec<_> = docs
            .iter()
            .map(|d| d.metadata["path"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(paths, ["README.md", "src/main.rs"]);
        assert_eq!(
            docs[1].content, "fn main() {\n    println!(\"hi\");\n}\n",
            "whitespace kept"
        );
        assert_eq!(docs[1].title.as_deref(), Some("proj/src/main.rs"));
    }
}
