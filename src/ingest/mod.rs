//! Local files -> documents: markdown, text and HTML folders (HTML through the same
//! extractor as the crawler), JSON Lines, chat exports and Q&A transcripts.

pub mod chat;
pub mod qa;

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::documents::{Category, Document};

/// How to read the files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// By extension and content: .md -> markdown, .html -> html, .jsonl -> jsonl,
    /// .txt -> whatsapp, qa or text by what it looks like.
    Auto,
    /// Markdown notes.
    Markdown,
    /// Plain text.
    Text,
    /// Saved web pages.
    Html,
    /// One JSON object per line.
    Jsonl,
    /// WhatsApp-style chat export.
    Whatsapp,
    /// QUESTION:/ANSWER: transcripts.
    Qa,
}

/// Settings for one ingest.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Format (or auto).
    pub format: Format,
    /// Category override.
    pub category: Option<Category>,
    /// JSONL: the field holding the text.
    pub text_field: String,
    /// JSONL: the field holding the title.
    pub title_field: String,
    /// JSONL: the field holding the URL.
    pub url_field: String,
    /// JSONL: the field holding the author.
    pub author_field: String,
    /// Chat: whose messages are the twin's.
    pub target_speaker: Option<String>,
    /// Timestamp recorded as `fetched_at` (the snapshot time of the input, so output is
    /// a pure function of the input).
    pub read_at: String,
}

/// What an ingest produced.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Documents in file order.
    pub documents: Vec<Document>,
    /// Things left out, with reasons (`file: reason`), counted by reason.
    pub dropped: BTreeMap<String, u64>,
    /// Examples of what was dropped (first few).
    pub examples: Vec<String>,
}

impl Outcome {
    fn drop(&mut self, reason: &str, example: String) {
        *self.dropped.entry(reason.to_string()).or_default() += 1;
        if self.examples.len() < 20 {
            self.examples.push(example);
        }
    }
}

fn detect(rel: &str, text: &str) -> Option<Format> {
    let ext = Path::new(rel)
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    Some(match ext.as_str() {
        "md" | "markdown" | "mdown" => Format::Markdown,
        "html" | "htm" | "xhtml" => Format::Html,
        "jsonl" | "ndjson" => Format::Jsonl,
        "txt" | "text" | "" => {
            if chat::looks_like_chat(text) {
                Format::Whatsapp
            } else if qa::looks_like_qa(text) {
                Format::Qa
            } else {
                Format::Text
            }
        }
        _ => return None,
    })
}

fn stem(rel: &str) -> String {
    Path::new(rel)
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| rel.to_string())
}

fn doc(
    url: String,
    category: Category,
    title: Option<String>,
    content: String,
    read_at: &str,
    metadata: BTreeMap<String, Value>,
) -> Document {
    Document {
        id: Document::make_id(&url, &content),
        url,
        category,
        title,
        author: None,
        published: None,
        content,
        fetched_at: read_at.to_string(),
        metadata,
    }
}

/// Ingests a file or a folder (`name` is the file name to use for a single file).
pub fn ingest(root: &Path, name: &str, settings: &Settings) -> Result<Outcome, String> {
    let mut out = Outcome::default();
    let mut files: Vec<(String, std::path::PathBuf)> = Vec::new();
    if root.is_dir() {
        for entry in walkdir::WalkDir::new(root).sort_by_file_name() {
            let entry = entry.map_err(|e| e.to_string())?;
            if entry.file_type().is_file() {
                let rel = entry
                    .path()
                    .strip_prefix(root)
                    .map_err(|e| e.to_string())?
                    .to_string_lossy()
                    .to_string();
                files.push((rel, entry.path().to_path_buf()));
            }
        }
    } else {
        files.push((name.to_string(), root.to_path_buf()));
    }
    for (rel, path) in files {
        let bytes = std::fs::read(&path).map_err(|e| format!("{rel}: {e}"))?;
        let Ok(text) = String::from_utf8(bytes) else {
            out.drop("not UTF-8 text", rel);
            continue;
        };
        let format = match settings.format {
            Format::Auto => match detect(&rel, &text) {
                Some(f) => f,
                None => {
                    out.drop("unsupported file type", rel);
                    continue;
                }
            },
            f => f,
        };
        ingest_file(&rel, &text, format, settings, &mut out);
    }
    Ok(out)
}

fn ingest_file(rel: &str, text: &str, format: Format, s: &Settings, out: &mut Outcome) {
    let url = format!("file:{rel}");
    let mut meta = BTreeMap::new();
    meta.insert("path".to_string(), Value::String(rel.to_string()));
    meta.insert(
        "format".to_string(),
        serde_json::to_value(format).unwrap_or(Value::Null),
    );
    match format {
        Format::Markdown | Format::Text | Format::Auto => {
            if text.trim().is_empty() {
                out.drop("empty file", rel.to_string());
                return;
            }
            let title = text
                .lines()
                .find_map(|l| l.strip_prefix("# ").map(|t| t.trim().to_string()))
                .or_else(|| Some(stem(rel)));
            out.documents.push(doc(
                url,
                s.category.unwrap_or(Category::Note),
                title,
                text.trim_end().to_string() + "\n",
                &s.read_at,
                meta,
            ));
        }
        Format::Html => {
            if crate::extract::too_deeply_nested(text).is_some() {
                out.drop("HTML nested too deeply to parse", rel.to_string());
                return;
            }
            let base = url::Url::parse(&format!("file:///{rel}"))
                .unwrap_or_else(|_| url::Url::parse("file:///").expect("valid"));
            let e = crate::extract::extract(text, &base, None);
            if e.text.trim().is_empty() {
                out.drop("no text found in HTML", rel.to_string());
                return;
            }
            let mut d = doc(
                url,
                s.category.unwrap_or(Category::Article),
                e.title.or_else(|| Some(stem(rel))),
                e.text,
                &s.read_at,
                meta,
            );
            d.author = e.author;
            d.published = e.published;
            out.documents.push(d);
        }
        Format::Jsonl => {
            for (n, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let at = format!("{rel}:{}", n + 1);
                let Ok(Value::Object(mut obj)) = serde_json::from_str::<Value>(line) else {
                    out.drop("JSONL line is not a JSON object", at);
                    continue;
                };
                let Some(Value::String(content)) = obj.remove(&s.text_field) else {
                    out.drop(&format!("no string field `{}`", s.text_field), at);
                    continue;
                };
                if content.trim().is_empty() {
                    out.drop("empty text", at);
                    continue;
                }
                let take = |obj: &mut serde_json::Map<String, Value>, f: &str| match obj.remove(f) {
                    Some(Value::String(v)) => Some(v),
                    _ => None,
                };
                let title = take(&mut obj, &s.title_field);
                let author = take(&mut obj, &s.author_field);
                let doc_url =
                    take(&mut obj, &s.url_field).unwrap_or_else(|| format!("{url}#{}", n + 1));
                let mut m = meta.clone();
                m.insert("line".into(), Value::from(n + 1));
                m.extend(obj);
                let mut d = doc(
                    doc_url,
                    s.category.unwrap_or(Category::Post),
                    title,
                    content,
                    &s.read_at,
                    m,
                );
                d.author = author;
                out.documents.push(d);
            }
        }
        Format::Whatsapp => {
            let chat = chat::parse(text);
            for _ in 0..chat.dropped {
                out.drop("chat system line or media placeholder", rel.to_string());
            }
            if chat.messages.is_empty() {
                out.drop("no chat messages found", rel.to_string());
                return;
            }
            let mut speakers: Vec<String> = Vec::new();
            for m in &chat.messages {
                if !speakers.contains(&m.speaker) {
                    speakers.push(m.speaker.clone());
                }
            }
            let content = chat
                .messages
                .iter()
                .map(|m| format!("{}: {}", m.speaker, m.text))
                .collect::<Vec<_>>()
                .join("\n");
            meta.insert("speakers".into(), serde_json::json!(speakers));
            meta.insert("messages".into(), serde_json::json!(chat.messages));
            if let Some(t) = &s.target_speaker {
                meta.insert("target_speaker".into(), Value::String(t.clone()));
                let own = chat.messages.iter().filter(|m| &m.speaker == t).count();
                meta.insert("target_messages".into(), Value::from(own));
            }
            let title = format!("Chat with {}", speakers.join(", "));
            out.documents.push(doc(
                url,
                s.category.unwrap_or(Category::Chat),
                Some(title),
                content,
                &s.read_at,
                meta,
            ));
        }
        Format::Qa => {
            let t = qa::parse(text);
            for _ in 0..t.unanswered {
                out.drop("question without an answer", rel.to_string());
            }
            for (i, x) in t.exchanges.into_iter().enumerate() {
                let mut m = meta.clone();
                m.insert("question".into(), Value::String(x.question.clone()));
                m.insert("answer".into(), Value::String(x.answer.clone()));
                m.insert("exchange".into(), Value::from(i + 1));
                let title: String = x.question.chars().take(80).collect();
                let content = format!("QUESTION: {}\nANSWER: {}", x.question, x.answer);
                out.documents.push(doc(
                    format!("{url}#{}", i + 1),
                    s.category.unwrap_or(Category::Qa),
                    Some(title),
                    content,
                    &s.read_at,
                    m,
                ));
            }
        }
    }
}
