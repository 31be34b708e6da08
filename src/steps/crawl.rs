//! `crawl`: fetches web pages (and git repositories) into a `documents` artifact.
//! Volatile: it runs on every pipeline run, but sends conditional requests using the
//! validators of its last crawl (the `state` output), reuses unchanged pages' records
//! verbatim and sorts by URL, so an unchanged site yields a byte-identical artifact and
//! everything downstream stays cached.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;

use super::{Kind, ParamIssue, StepContext, StepError, StepOutputs};
use crate::crawl::{self, repository, Follow};
use crate::documents::{self, Category};
use crate::extract::Rules;

/// The `crawl` step kind.
pub struct CrawlStep;

/// Extraction rules for one site.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DomainRule {
    /// Host the rule applies to (`blog.example.org`; a leading `www.` is ignored).
    pub domain: String,
    /// CSS selector of the main content.
    #[serde(default)]
    pub content: Option<String>,
    /// CSS selector of the title.
    #[serde(default)]
    pub title: Option<String>,
    /// CSS selectors of parts to drop.
    #[serde(default)]
    pub exclude: Vec<String>,
}

/// Parameters of `crawl`.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CrawlParams {
    /// Start URLs: web pages, or git repositories (an https:// or file:// URL ending in
    /// `.git`, or a github/gitlab/bitbucket/codeberg `owner/project` URL).
    pub links: Vec<String>,
    /// Which discovered links to follow: `none`, `same-domain` or `same-prefix`.
    #[serde(default = "default_follow")]
    pub follow: Follow,
    /// Link depth below the start links.
    #[serde(default = "default_depth")]
    pub max_depth: u32,
    /// Most pages fetched in one crawl.
    #[serde(default = "default_max_pages")]
    pub max_pages: usize,
    /// Regular expressions: only follow URLs matching one of them (empty: all).
    #[serde(default)]
    pub include: Vec<String>,
    /// Regular expressions: never follow URLs matching any of them.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Requests in flight overall.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Requests in flight per host.
    #[serde(default = "default_per_host")]
    pub per_host_concurrency: usize,
    /// Milliseconds between requests to one host (robots.txt Crawl-delay wins if larger).
    #[serde(default = "default_delay")]
    pub delay_ms: u64,
    /// Obey robots.txt.
    #[serde(default = "default_true")]
    pub respect_robots: bool,
    /// User-Agent header (also the robots.txt agent).
    #[serde(default = "default_agent")]
    pub user_agent: String,
    /// Seconds for a whole request, body included.
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    /// Largest response body accepted, after decompression.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
    /// Extra attempts after 429, 5xx, timeouts and connection errors.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Milliseconds before the first retry; doubles each time, with jitter.
    #[serde(default = "default_backoff")]
    pub retry_backoff_ms: u64,
    /// Most redirects followed per request.
    #[serde(default = "default_redirects")]
    pub max_redirects: usize,
    /// Category of crawled pages: article or post.
    #[serde(default = "default_category")]
    pub category: Category,
    /// Per-domain extraction rules for sites where the generic extractor is not enough.
    #[serde(default)]
    pub rules: Vec<DomainRule>,
    /// Which files of a repository become documents.
    #[serde(default)]
    pub repository: repository::Settings,
}

fn default_follow() -> Follow {
    Follow::None
}
fn default_depth() -> u32 {
    2
}
fn default_max_pages() -> usize {
    500
}
fn default_concurrency() -> usize {
    8
}
fn default_per_host() -> usize {
    2
}
fn default_delay() -> u64 {
    250
}
fn default_true() -> bool {
    true
}
fn default_agent() -> String {
    format!(
        "cairn/{} (personal archive crawler)",
        env!("CARGO_PKG_VERSION")
    )
}
fn default_timeout() -> f64 {
    20.0
}
fn default_max_bytes() -> usize {
    5 << 20
}
fn default_retries() -> u32 {
    3
}
fn default_backoff() -> u64 {
    500
}
fn default_redirects() -> usize {
    10
}
fn default_category() -> Category {
    Category::Article
}

/// Output names.
pub const DOCUMENTS: &str = "documents";
/// The validators output.
pub const STATE: &str = "state";

fn compile(params: &CrawlParams) -> Result<crawl::Config, Vec<ParamIssue>> {
    let mut issues = Vec::new();
    let mut links = Vec::new();
    if params.links.is_empty() {
        issues.push(ParamIssue::new(
            "with.links",
            "`links` is empty: give at least one start URL",
        ));
    }
    for (i, l) in params.links.iter().enumerate() {
        if l.starts_with("git@") {
            issues.push(ParamIssue::new(
                format!("with.links.{i}"),
                format!("`{l}`: give the repository as an https:// (or file://) URL"),
            ));
            continue;
        }
        match url::Url::parse(l) {
            Ok(u)
                if matches!(u.scheme(), "http" | "https") || crawl::urls::is_git_repository(l) =>
            {
                links.push(u)
            }
            Ok(u) => issues.push(ParamIssue::new(
                format!("with.links.{i}"),
                format!(
                    "`{l}`: scheme `{}` is not supported (http, https, or a git URL)",
                    u.scheme()
                ),
            )),
            Err(e) => issues.push(ParamIssue::new(
                format!("with.links.{i}"),
                format!("`{l}` is not a URL: {e}"),
            )),
        }
    }
    let mut regexes = |list: &[String], key: &str| -> Vec<regex::Regex> {
        list.iter()
            .enumerate()
            .filter_map(|(i, p)| match regex::Regex::new(p) {
                Ok(r) => Some(r),
                Err(e) => {
                    issues.push(ParamIssue::new(
                        format!("with.{key}.{i}"),
                        format!("invalid regular expression `{p}`: {e}"),
                    ));
                    None
                }
            })
            .collect()
    };
    let include = regexes(&params.include, "include");
    let exclude = regexes(&params.exclude, "exclude");
    let mut rules = BTreeMap::new();
    for (i, r) in params.rules.iter().enumerate() {
        let rule = Rules {
            content: r.content.clone(),
            title: r.title.clone(),
            exclude: r.exclude.clone(),
        };
        if let Err(e) = rule.validate() {
            issues.push(ParamIssue::new(format!("with.rules.{i}"), e));
        }
        rules.insert(
            r.domain.trim_start_matches("www.").to_ascii_lowercase(),
            rule,
        );
    }
    for (key, zero) in [
        ("concurrency", params.concurrency == 0),
        ("per_host_concurrency", params.per_host_concurrency == 0),
        ("max_pages", params.max_pages == 0),
    ] {
        if zero {
            issues.push(ParamIssue::new(
                format!("with.{key}"),
                format!("`{key}` must be at least 1"),
            ));
        }
    }
    if !(params.timeout_s > 0.0 && params.timeout_s.is_finite()) {
        issues.push(ParamIssue::new(
            "with.timeout_s",
            "`timeout_s` must be a positive number of seconds",
        ));
    }
    if !matches!(params.category, Category::Article | Category::Post) {
        issues.push(ParamIssue::new(
            "with.category",
            "crawled pages are `article` or `post` (repositories are detected from their URL)",
        ));
    }
    if !issues.is_empty() {
        return Err(issues);
    }
    Ok(crawl::Config {
        links,
        follow: params.follow,
        max_depth: params.max_depth,
        max_pages: params.max_pages,
        include,
        exclude,
        concurrency: params.concurrency,
        per_host_concurrency: params.per_host_concurrency,
        delay: Duration::from_millis(params.delay_ms),
        respect_robots: params.respect_robots,
        user_agent: params.user_agent.clone(),
        timeout: Duration::from_secs_f64(params.timeout_s),
        max_bytes: params.max_bytes,
        retries: params.retries,
        backoff: Duration::from_millis(params.retry_backoff_ms),
        max_redirects: params.max_redirects,
        category: params.category,
        rules,
        repository: params.repository.clone(),
    })
}

#[async_trait]
impl Kind for CrawlStep {
    type Params = CrawlParams;
    const OUTPUTS: &'static [(&'static str, &'static str)] =
        &[(DOCUMENTS, documents::KIND), (STATE, "crawl-state")];

    fn name(&self) -> &'static str {
        "crawl"
    }

    fn version(&self) -> String {
        // 2: DocBook navigation dropped, sidebar boxes inside the text kept (extract).
        "2".into()
    }

    fn summary(&self) -> &'static str {
        "Fetch web pages and git repositories into `documents` (incremental, polite, robots.txt-aware)"
    }

    fn volatile(&self) -> bool {
        true
    }

    fn inputs(&self) -> Option<Vec<super::InputDecl>> {
        Some(Vec::new())
    }

    fn validate(&self, p: &CrawlParams) -> Vec<ParamIssue> {
        compile(p).err().unwrap_or_default()
    }

    async fn run(&self, params: &CrawlParams, ctx: &StepContext) -> Result<StepOutputs, StepError> {
        let cfg = compile(params).map_err(|issues| StepError::Failed(issues[0].message.clone()))?;
        let previous = load_previous(ctx);
        ctx.progress.set_message("crawling");
        let progress = ctx.progress.clone();
        let report = move |fetched: usize, queued: usize, failed: usize, bytes: u64| {
            progress.set_length((fetched + queued + failed) as u64);
            progress.bar().set_position((fetched + failed) as u64);
            progress.set_message(format!(
                "{fetched} fetched, {queued} queued, {failed} failed, {:.1} MB",
                bytes as f64 / 1e6
            ));
        };
        let outcome = crawl::crawl(cfg, previous, ctx.cancel.clone(), &report)
            .await
            .map_err(|e| {
                if e == "cancelled" {
                    StepError::Cancelled
                } else {
                    StepError::Failed(e)
                }
            })?;
        if outcome.documents.is_empty() {
            let why = outcome
                .failures
                .iter()
                .chain(outcome.skipped.iter())
                .take(5)
                .map(|f| format!("{}: {}", f.url, f.reason))
                .collect::<Vec<_>>()
                .join("\n");
            return Err(StepError::Failed(format!(
                "the crawl produced no documents\n{why}"
            )));
        }
        documents::write_jsonl(&ctx.output_path(DOCUMENTS), &outcome.documents)
            .map_err(|e| StepError::Failed(format!("writing documents: {e}")))?;
        let state = serde_json::to_vec_pretty(&outcome.state).expect("state serializes");
        std::fs::write(ctx.output_path(STATE), state)
            .map_err(|e| StepError::Failed(format!("writing crawl state: {e}")))?;
        let mut meta = documents::summary(&outcome.documents);
        meta["failures"] = json!(outcome.failures);
        meta["skipped"] = json!(outcome.skipped);
        meta["stats"] = json!(outcome.stats);
        let note = format!(
            "{} documents, {} failed, {} unchanged",
            outcome.documents.len(),
            outcome.failures.len(),
            outcome.stats.not_modified + outcome.stats.unchanged
        );
        let mut outputs = BTreeMap::new();
        outputs.insert(DOCUMENTS.to_string(), ctx.commit_output(DOCUMENTS, meta)?);
        outputs.insert(
            STATE.to_string(),
            ctx.commit_output(STATE, json!({"pages": outcome.state.pages.len()}))?,
        );
        Ok(StepOutputs {
            outputs,
            note: Some(note),
        })
    }
}

/// The previous crawl under the same parameters (validators and documents), if any.
fn load_previous(ctx: &StepContext) -> crawl::Previous {
    let Some(prev) = &ctx.previous else {
        return crawl::Previous::default();
    };
    let (Some(docs), Some(state)) = (prev.get(DOCUMENTS), prev.get(STATE)) else {
        return crawl::Previous::default();
    };
    let state: crawl::State = std::fs::read(ctx.store.object_path(&state.digest))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let documents: HashMap<String, documents::Document> =
        documents::read_jsonl::<documents::Document>(&ctx.store.object_path(&docs.digest))
            .unwrap_or_default()
            .into_iter()
            .filter(|d| d.category != Category::Repository)
            .map(|d| (d.url.clone(), d))
            .collect();
    crawl::Previous { state, documents }
}
