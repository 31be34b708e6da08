//! The `documents` artifact: one JSON object per line, the common currency of crawl,
//! ingest, clean and the document stores.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Artifact kind of a documents file.
pub const KIND: &str = "documents";

/// What sort of writing a document is; decides cleaning, chunking and the collection it
/// lands in.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Category {
    /// A blog post or article page.
    Article,
    /// A short post (social, forum).
    Post,
    /// A source file from a code repository.
    Repository,
    /// A chat message or conversation.
    Chat,
    /// A question and answer exchange.
    Qa,
    /// A personal note (markdown, text).
    Note,
}

impl Category {
    /// Every category, in a fixed order.
    pub const ALL: [Category; 6] = [
        Category::Article,
        Category::Post,
        Category::Repository,
        Category::Chat,
        Category::Qa,
        Category::Note,
    ];

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Article => "article",
            Category::Post => "post",
            Category::Repository => "repository",
            Category::Chat => "chat",
            Category::Qa => "qa",
            Category::Note => "note",
        }
    }

    /// The document-store collection for this category (plural, like the reference design).
    pub fn collection(self) -> &'static str {
        match self {
            Category::Article => "articles",
            Category::Post => "posts",
            Category::Repository => "repositories",
            Category::Chat => "chats",
            Category::Qa => "qa",
            Category::Note => "notes",
        }
    }
}

/// One document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Document {
    /// blake3 of (url, content): stable across runs for the same text at the same place.
    pub id: String,
    /// Where it came from (`https://...`, `file:///...`, `repo://...#path`).
    pub url: String,
    /// What sort of writing it is.
    pub category: Category,
    /// Title, if known.
    #[serde(default)]
    pub title: Option<String>,
    /// Author or site, if known.
    #[serde(default)]
    pub author: Option<String>,
    /// Publication date as found (ISO 8601 when recognisable).
    #[serde(default)]
    pub published: Option<String>,
    /// Plain text.
    pub content: String,
    /// When it was fetched or read (RFC 3339).
    pub fetched_at: String,
    /// Anything else (canonical URL, speaker, file path, ...).
    #[serde(default)]
    pub metadata: BTreeMap<String, Value>,
}

impl Document {
    /// The content-derived id of a document at `url` with `content`.
    pub fn make_id(url: &str, content: &str) -> String {
        let mut h = blake3::Hasher::new();
        h.update(url.as_bytes());
        h.update(&[0]);
        h.update(content.as_bytes());
        h.finalize().to_hex()[..32].to_string()
    }
}

/// Writes records as JSON Lines (one compact JSON object per line).
pub fn write_jsonl<'a, T: Serialize + 'a>(
    path: &Path,
    records: impl IntoIterator<Item = &'a T>,
) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for r in records {
        serde_json::to_writer(&mut out, r)?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// Reads records (documents, chunks) from JSON Lines; the error names the line.
pub fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut records = Vec::new();
    for (n, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        records.push(
            serde_json::from_str(&line)
                .map_err(|e| format!("{}:{}: {e}", path.display(), n + 1))?,
        );
    }
    Ok(records)
}

/// Counts per category and per domain, for artifact metadata.
pub fn summary(docs: &[Document]) -> Value {
    let mut by_category: BTreeMap<&str, u64> = BTreeMap::new();
    let mut by_domain: BTreeMap<String, u64> = BTreeMap::new();
    let mut chars = 0u64;
    for d in docs {
        *by_category.entry(d.category.as_str()).or_default() += 1;
        let domain = url::Url::parse(&d.url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_else(|| "local".to_string());
        *by_domain.entry(domain).or_default() += 1;
        chars += d.content.chars().count() as u64;
    }
    serde_json::json!({
        "documents": docs.len(),
        "by_category": by_category,
        "by_domain": by_domain,
        "characters": chars,
    })
}
