//! `ingest`: turns local files (a `source` artifact) into `documents`: markdown, text and
//! HTML folders, JSON Lines, WhatsApp-style chat exports and Q&A transcripts.
//! A pure function of its input, so it is cached like any other step.

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;

use super::{InputDecl, Kind, StepContext, StepError, StepOutputs};
use crate::documents::{self, Category};
use crate::ingest::{self, Format};

/// The `ingest` step kind.
pub struct IngestStep;

/// Parameters of `ingest`.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IngestParams {
    /// auto, markdown, text, html, jsonl, whatsapp or qa.
    #[serde(default = "default_format")]
    pub format: Format,
    /// Category for every document (default: note for markdown/text, article for html,
    /// post for jsonl, chat for chat exports, qa for transcripts).
    #[serde(default)]
    pub category: Option<Category>,
    /// JSONL: field with the text.
    #[serde(default = "text_field")]
    pub text_field: String,
    /// JSONL: field with the title.
    #[serde(default = "title_field")]
    pub title_field: String,
    /// JSONL: field with the URL.
    #[serde(default = "url_field")]
    pub url_field: String,
    /// JSONL: field with the author.
    #[serde(default = "author_field")]
    pub author_field: String,
    /// Chat exports: the speaker whose replies are the twin's (recorded on each chat).
    #[serde(default)]
    pub target_speaker: Option<String>,
}

fn default_format() -> Format {
    Format::Auto
}
fn text_field() -> String {
    "text".into()
}
fn title_field() -> String {
    "title".into()
}
fn url_field() -> String {
    "url".into()
}
fn author_field() -> String {
    "author".into()
}

/// The input name.
pub const FILES: &str = "files";

#[async_trait]
impl Kind for IngestStep {
    type Params = IngestParams;
    const OUTPUTS: &'static [(&'static str, &'static str)] = &[("documents", documents::KIND)];

    fn name(&self) -> &'static str {
        "ingest"
    }

    fn version(&self) -> String {
        // 2: DocBook navigation dropped, sidebar boxes inside the text kept (extract).
        "2".into()
    }

    fn summary(&self) -> &'static str {
        "Turn local files (input `files`, from a source step) into `documents`: notes, HTML, JSONL, chat exports, Q&A"
    }

    fn inputs(&self) -> Option<Vec<InputDecl>> {
        Some(vec![InputDecl {
            name: FILES.into(),
            kind: "file or dir".into(),
            required: true,
        }])
    }

    async fn run(&self, p: &IngestParams, ctx: &StepContext) -> Result<StepOutputs, StepError> {
        let input = ctx
            .inputs
            .get(FILES)
            .ok_or_else(|| StepError::Failed("input `files` is missing".into()))?;
        // The input's record knows its original name and when it was read.
        let record = ctx
            .store
            .db()
            .find_artifact(&input.digest.to_hex())
            .ok()
            .flatten();
        let name = record
            .as_ref()
            .and_then(|r| r.metadata.get("path").and_then(|v| v.as_str()))
            .and_then(|p| {
                std::path::Path::new(p)
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string())
            })
            .unwrap_or_else(|| "input".into());
        let read_at = record
            .map(|r| r.created_at)
            .unwrap_or_else(crate::util::clock::now_rfc3339);
        let settings = ingest::Settings {
            format: p.format,
            category: p.category,
            text_field: p.text_field.clone(),
            title_field: p.title_field.clone(),
            url_field: p.url_field.clone(),
            author_field: p.author_field.clone(),
            target_speaker: p.target_speaker.clone(),
            read_at,
        };
        let root = input.path.clone();
        let outcome = tokio::task::spawn_blocking(move || ingest::ingest(&root, &name, &settings))
            .await
            .map_err(|e| StepError::Failed(format!("ingest task failed: {e}")))?
            .map_err(StepError::Failed)?;
        if outcome.documents.is_empty() {
            return Err(StepError::Failed(format!(
                "no documents found; dropped: {}",
                serde_json::to_string(&outcome.dropped).unwrap_or_default()
            )));
        }
        documents::write_jsonl(&ctx.output_path("documents"), &outcome.documents)
            .map_err(|e| StepError::Failed(format!("writing documents: {e}")))?;
        let mut meta = documents::summary(&outcome.documents);
        meta["dropped"] = json!(outcome.dropped);
        meta["dropped_examples"] = json!(outcome.examples);
        let note = format!(
            "{} documents, {} dropped",
            outcome.documents.len(),
            outcome.dropped.values().sum::<u64>()
        );
        ctx.single_output("documents", meta, note)
    }
}
