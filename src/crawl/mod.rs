//! The crawler behind the `crawl` step: a frontier of normalized URLs, global and
//! per-host concurrency limits with a politeness delay, robots.txt, retries with
//! exponential backoff and jitter that honour Retry-After, a byte limit on every
//! response (decompressed), and conditional requests from the previous crawl's state.

pub mod repository;
pub mod urls;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, OnceCell, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::documents::{Category, Document};
use crate::extract::{self, Rules};
pub use urls::Follow;

/// Everything a crawl needs to know.
#[derive(Clone, Debug)]
pub struct Config {
    /// Start links.
    pub links: Vec<Url>,
    /// How far to wander.
    pub follow: Follow,
    /// Link depth from a start link (0: start links only).
    pub max_depth: u32,
    /// Most pages fetched.
    pub max_pages: usize,
    /// Only URLs matching one of these (if any).
    pub include: Vec<regex::Regex>,
    /// Never URLs matching one of these.
    pub exclude: Vec<regex::Regex>,
    /// Requests in flight overall.
    pub concurrency: usize,
    /// Requests in flight per host.
    pub per_host_concurrency: usize,
    /// Pause between requests to one host.
    pub delay: Duration,
    /// Obey robots.txt.
    pub respect_robots: bool,
    /// User-Agent header and robots.txt agent.
    pub user_agent: String,
    /// Whole-request timeout.
    pub timeout: Duration,
    /// Largest response body accepted (after decompression).
    pub max_bytes: usize,
    /// Extra attempts on 429, 5xx, timeouts and connection errors.
    pub retries: u32,
    /// First retry delay; doubles each attempt.
    pub backoff: Duration,
    /// Most redirects followed per request.
    pub max_redirects: usize,
    /// Category of pages.
    pub category: Category,
    /// Per-domain extraction rules (host -> rules).
    pub rules: BTreeMap<String, Rules>,
    /// Repository handler settings.
    pub repository: repository::Settings,
}

/// Per-URL validators kept between crawls.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageState {
    /// ETag of the last 200 response.
    #[serde(default)]
    pub etag: Option<String>,
    /// Last-Modified of the last 200 response.
    #[serde(default)]
    pub last_modified: Option<String>,
    /// blake3 of the body.
    pub body_digest: String,
    /// Outgoing links (to keep following from an unchanged page).
    #[serde(default)]
    pub links: Vec<String>,
    /// URL of the document this request produced (differs after a redirect).
    #[serde(default)]
    pub document: String,
}

/// What one crawl remembers for the next (the `state` output).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Normalized URL -> validators.
    pub pages: BTreeMap<String, PageState>,
}

/// A URL given up on, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// The URL.
    pub url: String,
    /// Why (after all retries).
    pub reason: String,
}

/// The result of a crawl.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Documents, sorted by URL, one per URL and distinct content.
    pub documents: Vec<Document>,
    /// State for the next crawl.
    pub state: State,
    /// URLs that failed.
    pub failures: Vec<Failure>,
    /// URLs skipped on purpose (robots, content type, empty text), with reasons.
    pub skipped: Vec<Failure>,
    /// Counters.
    pub stats: Stats,
}

/// Counters for metadata and progress.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    /// HTTP requests sent (retries and robots.txt included).
    pub requests: u64,
    /// Pages answered 304 Not Modified.
    pub not_modified: u64,
    /// Pages whose body was unchanged (no validators, same digest).
    pub unchanged: u64,
    /// Body bytes received.
    pub bytes: u64,
}

/// Previous crawl: validators and the documents it produced, by normalized URL.
#[derive(Default)]
pub struct Previous {
    /// Validators.
    pub state: State,
    /// Documents by their URL.
    pub documents: HashMap<String, Document>,
}

struct Host {
    permits: Arc<Semaphore>,
    next_at: Mutex<tokio::time::Instant>,
    robots: OnceCell<Option<texting_robots::Robot>>,
}

enum PageResult {
    Document {
        doc: Box<Document>,
        page: PageState,
        links: Vec<String>,
        fresh: bool,
    },
    Repository(Vec<Document>),
    Skipped(String),
    Failed(String),
}

struct Shared {
    cfg: Config,
    client: reqwest::Client,
    hosts: Mutex<HashMap<String, Arc<Host>>>,
    previous: Previous,
    requests: std::sync::atomic::AtomicU64,
    bytes: std::sync::atomic::AtomicU64,
    cancel: CancellationToken,
}

/// Builds the HTTP client (rustls with the ring provider, gzip/brotli/deflate).
pub fn client(cfg: &Config) -> Result<reqwest::Client, String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .user_agent(cfg.user_agent.clone())
        .timeout(cfg.timeout)
        .connect_timeout(cfg.timeout.min(Duration::from_secs(10)))
        .redirect(reqwest::redirect::Policy::limited(cfg.max_redirects))
        .build()
        .map_err(|e| format!("building the HTTP client: {e}"))
}

/// Runs a crawl. `progress` is called with (fetched, queued, failed, bytes).
pub async fn crawl(
    cfg: Config,
    previous: Previous,
    cancel: CancellationToken,
    progress: &(dyn Fn(usize, usize, usize, u64) + Sync),
) -> Result<Outcome, String> {
    let client = client(&cfg)?;
    let shared = Arc::new(Shared {
        cfg,
        client,
        hosts: Mutex::new(HashMap::new()),
        previous,
        requests: Default::default(),
        bytes: Default::default(),
        cancel: cancel.clone(),
    });
    let cfg = &shared.cfg;
    let mut frontier: VecDeque<(Url, u32)> = VecDeque::new();
    let mut seen: HashSet<String> = HashSet::new();
    for link in &cfg.links {
        if seen.insert(urls::normalize(link)) {
            frontier.push_back((link.clone(), 0));
        }
    }
    let mut outcome = Outcome::default();
    let mut started = 0usize;
    let mut tasks: JoinSet<(Url, u32, PageResult)> = JoinSet::new();
    let mut docs: BTreeMap<String, Document> = BTreeMap::new();
    loop {
        while tasks.len() < cfg.concurrency && started < cfg.max_pages && !cancel.is_cancelled() {
            let Some((url, depth)) = frontier.pop_front() else {
                break;
            };
            started += 1;
            let shared = shared.clone();
            tasks.spawn(async move {
                let result = fetch_page(&shared, &url).await;
                (url, depth, result)
            });
        }
        let Some(joined) = tasks.join_next().await else {
            break;
        };
        let (url, depth, result) = joined.map_err(|e| format!("crawl task failed: {e}"))?;
        match result {
            PageResult::Document {
                doc,
                page,
                links,
                fresh,
            } => {
                if !fresh {
                    if page.etag.is_some() || page.last_modified.is_some() {
                        outcome.stats.not_modified += 1;
                    } else {
                        outcome.stats.unchanged += 1;
                    }
                }
                if depth < cfg.max_depth && cfg.follow != Follow::None {
                    for link in &links {
                        let Ok(next) = Url::parse(link) else { continue };
                        if !urls::in_scope(&next, &cfg.links, cfg.follow)
                            || !allowed_by_patterns(cfg, next.as_str())
                        {
                            continue;
                        }
                        if seen.insert(urls::normalize(&next)) {
                            frontier.push_back((next, depth + 1));
                        }
                    }
                }
                outcome.state.pages.insert(urls::normalize(&url), page);
                docs.insert(doc.url.clone(), *doc);
            }
            PageResult::Repository(files) => {
                for d in files {
                    docs.insert(d.url.clone(), d);
                }
            }
            PageResult::Skipped(reason) => outcome.skipped.push(Failure {
                url: url.to_string(),
                reason,
            }),
            PageResult::Failed(reason) => outcome.failures.push(Failure {
                url: url.to_string(),
                reason,
            }),
        }
        progress(
            docs.len(),
            frontier.len() + tasks.len(),
            outcome.failures.len(),
            shared.bytes.load(std::sync::atomic::Ordering::Relaxed),
        );
    }
    if cancel.is_cancelled() {
        return Err("cancelled".into());
    }
    // Same text at several URLs (mirrors, ?ref= variants): keep the first URL.
    let mut contents = HashSet::new();
    outcome.documents = docs
        .into_values()
        .filter(|d| {
            d.category == Category::Repository
                || contents.insert(blake3::hash(d.content.as_bytes()))
        })
        .collect();
    outcome.failures.sort_by(|a, b| a.url.cmp(&b.url));
    outcome.skipped.sort_by(|a, b| a.url.cmp(&b.url));
    outcome.stats.requests = shared.requests.load(std::sync::atomic::Ordering::Relaxed);
    outcome.stats.bytes = shared.bytes.load(std::sync::atomic::Ordering::Relaxed);
    Ok(outcome)
}

fn allowed_by_patterns(cfg: &Config, url: &str) -> bool {
    (cfg.include.is_empty() || cfg.include.iter().any(|r| r.is_match(url)))
        && !cfg.exclude.iter().any(|r| r.is_match(url))
}

async fn host_of(shared: &Shared, url: &Url) -> Arc<Host> {
    let key = format!("{}://{}", url.scheme(), url.host_str().unwrap_or(""));
    let key = match url.port() {
        Some(p) => format!("{key}:{p}"),
        None => key,
    };
    let mut hosts = shared.hosts.lock().await;
    hosts
        .entry(key)
        .or_insert_with(|| {
            Arc::new(Host {
                permits: Arc::new(Semaphore::new(shared.cfg.per_host_concurrency.max(1))),
                next_at: Mutex::new(tokio::time::Instant::now()),
                robots: OnceCell::new(),
            })
        })
        .clone()
}

/// Waits for this host's turn: holds a per-host permit and spaces requests by the delay.
async fn polite_turn(
    shared: &Shared,
    host: &Host,
    crawl_delay: Option<f32>,
) -> tokio::sync::OwnedSemaphorePermit {
    let permit = host
        .permits
        .clone()
        .acquire_owned()
        .await
        .expect("never closed");
    let delay = match crawl_delay {
        Some(d) if d > 0.0 => shared.cfg.delay.max(Duration::from_secs_f32(d.min(60.0))),
        _ => shared.cfg.delay,
    };
    let wait_until = {
        let mut next = host.next_at.lock().await;
        let now = tokio::time::Instant::now();
        let at = (*next).max(now);
        *next = at + delay;
        at
    };
    tokio::time::sleep_until(wait_until).await;
    permit
}

async fn robots_for<'h>(
    shared: &Shared,
    host: &'h Host,
    url: &Url,
) -> Option<&'h texting_robots::Robot> {
    if !shared.cfg.respect_robots {
        return None;
    }
    host.robots
        .get_or_init(|| async {
            let robots_url = url.join("/robots.txt").ok()?;
            shared
                .requests
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let resp = shared.client.get(robots_url).send().await.ok()?;
            if !resp.status().is_success() {
                return None;
            }
            let body = read_limited(resp, 512 * 1024).await.ok()?;
            texting_robots::Robot::new(&shared.cfg.user_agent, &body).ok()
        })
        .await
        .as_ref()
}

async fn read_limited(mut resp: reqwest::Response, max: usize) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(describe)? {
        if body.len() + chunk.len() > max {
            return Err(format!("response is larger than max_bytes ({max} bytes)"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn describe(e: reqwest::Error) -> String {
    use std::error::Error;
    if e.is_timeout() {
        return "timed out".into();
    }
    if e.is_redirect() {
        return "too many redirects (a redirect loop?)".into();
    }
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg = format!("{msg}: {s}");
        source = s.source();
    }
    msg
}

fn retry_after(resp: &reqwest::Response) -> Option<Duration> {
    let v = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?;
    v.trim()
        .parse::<u64>()
        .ok()
        .map(|s| Duration::from_secs(s.min(120)))
}

fn backoff(base: Duration, attempt: u32) -> Duration {
    let exp = base
        .saturating_mul(1 << attempt.min(10))
        .min(Duration::from_secs(60));
    let jitter = rand::random::<f64>() * exp.as_secs_f64() * 0.25;
    exp + Duration::from_secs_f64(jitter)
}

fn is_text(content_type: &str) -> bool {
    let ct = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    ct.is_empty()
        || ct == "text/html"
        || ct == "application/xhtml+xml"
        || ct == "text/plain"
        || ct == "text/markdown"
}

fn decode(body: &[u8], content_type: &str) -> String {
    let label = content_type
        .split(';')
        .filter_map(|p| p.trim().strip_prefix("charset="))
        .next()
        .map(|c| c.trim_matches('"').to_string());
    match label.and_then(|l| encoding_rs::Encoding::for_label(l.as_bytes())) {
        Some(enc) => enc.decode(body).0.into_owned(),
        None => String::from_utf8_lossy(body).into_owned(),
    }
}

async fn fetch_page(shared: &Shared, url: &Url) -> PageResult {
    let cfg = &shared.cfg;
    if urls::is_git_repository(url.as_str()) {
        let settings = cfg.repository.clone();
        let link = url.to_string();
        return match tokio::task::spawn_blocking(move || {
            repository::clone_and_read(&link, &settings)
        })
        .await
        {
            Ok(Ok(files)) => PageResult::Repository(files),
            Ok(Err(e)) => PageResult::Failed(e),
            Err(e) => PageResult::Failed(format!("repository task failed: {e}")),
        };
    }
    if !matches!(url.scheme(), "http" | "https") {
        return PageResult::Skipped(format!("unsupported scheme `{}`", url.scheme()));
    }
    let host = host_of(shared, url).await;
    let robots = robots_for(shared, &host, url).await;
    if let Some(robot) = robots {
        if !robot.allowed(url.as_str()) {
            return PageResult::Skipped("disallowed by robots.txt".into());
        }
    }
    let key = urls::normalize(url);
    let previous = shared.previous.state.pages.get(&key);
    let previous_doc = previous.and_then(|p| shared.previous.documents.get(&p.document));
    let mut last_error = String::new();
    for attempt in 0..=cfg.retries {
        if attempt > 0 {
            tokio::select! {
                _ = tokio::time::sleep(backoff(cfg.backoff, attempt - 1)) => {}
                _ = shared.cancel.cancelled() => return PageResult::Failed("cancelled".into()),
            }
        }
        let permit = polite_turn(shared, &host, robots.and_then(|r| r.delay)).await;
        let mut req = shared.client.get(url.clone());
        if let Some(p) = previous.filter(|_| previous_doc.is_some()) {
            if let Some(etag) = &p.etag {
                req = req.header(reqwest::header::IF_NONE_MATCH, etag);
            }
            if let Some(lm) = &p.last_modified {
                req = req.header(reqwest::header::IF_MODIFIED_SINCE, lm);
            }
        }
        shared
            .requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                let retryable = e.is_timeout() || e.is_connect() || e.is_request();
                last_error = describe(e);
                drop(permit);
                if retryable {
                    continue;
                }
                return PageResult::Failed(last_error);
            }
        };
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_MODIFIED {
            if let (Some(p), Some(doc)) = (previous, previous_doc) {
                return PageResult::Document {
                    doc: Box::new(doc.clone()),
                    page: p.clone(),
                    links: p.links.clone(),
                    fresh: false,
                };
            }
            return PageResult::Failed("304 Not Modified without an earlier copy".into());
        }
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            last_error = format!("HTTP {}", status.as_u16());
            let wait = retry_after(&resp);
            drop(resp);
            drop(permit);
            if let Some(wait) = wait.filter(|_| attempt < cfg.retries) {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shared.cancel.cancelled() => return PageResult::Failed("cancelled".into()),
                }
            }
            continue;
        }
        if !status.is_success() {
            return PageResult::Failed(format!("HTTP {}", status.as_u16()));
        }
        let final_url = resp.url().clone();
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        if !is_text(&content_type) {
            return PageResult::Skipped(format!(
                "content type `{content_type}` is not HTML or text"
            ));
        }
        let header = |name: reqwest::header::HeaderName| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let etag = header(reqwest::header::ETAG);
        let last_modified = header(reqwest::header::LAST_MODIFIED);
        let body = match read_limited(resp, cfg.max_bytes).await {
            Ok(b) => b,
            Err(e) if e.contains("max_bytes") => return PageResult::Failed(e),
            Err(e) => {
                last_error = e;
                continue;
            }
        };
        drop(permit);
        shared
            .bytes
            .fetch_add(body.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let body_digest = blake3::hash(&body).to_hex().to_string();
        // Same bytes as last time (a server without validators): keep the earlier record.
        if let (Some(p), Some(doc)) = (previous, previous_doc) {
            if p.body_digest == body_digest {
                let page = PageState {
                    etag,
                    last_modified,
                    body_digest,
                    links: p.links.clone(),
                    document: doc.url.clone(),
                };
                return PageResult::Document {
                    doc: Box::new(doc.clone()),
                    page,
                    links: p.links.clone(),
                    fresh: false,
                };
            }
        }
        let text = decode(&body, &content_type);
        let is_html = content_type.is_empty()
            || content_type.contains("html")
            || text.trim_start().starts_with('<');
        let (content, links, mut doc_meta, title, author, published) = if is_html {
            let rules = final_url.host_str().and_then(|h| {
                cfg.rules
                    .get(h.trim_start_matches("www."))
                    .or_else(|| cfg.rules.get(h))
            });
            if let Some(depth) = extract::too_deeply_nested(&text) {
                return PageResult::Failed(format!(
                    "HTML nested {depth} levels deep (limit {}): hostile or broken page, not parsed",
                    extract::MAX_NESTING
                ));
            }
            // Parsing and scoring are CPU work: keep them off the fetching threads.
            let (page_text, page_url, page_rules) =
                (text.clone(), final_url.clone(), rules.cloned());
            let e = match tokio::task::spawn_blocking(move || {
                extract::extract(&page_text, &page_url, page_rules.as_ref())
            })
            .await
            {
                Ok(e) => e,
                Err(err) => return PageResult::Failed(format!("extraction failed: {err}")),
            };
            let mut meta = BTreeMap::new();
            if let Some(c) = &e.canonical {
                meta.insert(
                    "canonical".to_string(),
                    serde_json::Value::String(c.clone()),
                );
            }
            (e.text, e.links, meta, e.title, e.author, e.published)
        } else {
            (
                text.trim().to_string(),
                Vec::new(),
                BTreeMap::new(),
                None,
                None,
                None,
            )
        };
        if content.trim().is_empty() {
            return PageResult::Skipped("no text found on the page".into());
        }
        doc_meta.insert("content_type".into(), content_type.clone().into());
        doc_meta.insert("bytes".into(), (body.len() as u64).into());
        if final_url != *url {
            doc_meta.insert("redirected_from".into(), url.to_string().into());
        }
        let doc_url = urls::normalize(&final_url);
        let doc = Document {
            id: Document::make_id(&doc_url, &content),
            url: doc_url,
            category: cfg.category,
            title,
            author: author.or_else(|| final_url.host_str().map(str::to_string)),
            published,
            content,
            fetched_at: crate::util::clock::now_rfc3339(),
            metadata: doc_meta,
        };
        let page = PageState {
            etag,
            last_modified,
            body_digest,
            links: links.clone(),
            document: doc.url.clone(),
        };
        return PageResult::Document {
            doc: Box::new(doc),
            page,
            links,
            fresh: true,
        };
    }
    PageResult::Failed(format!(
        "gave up after {} attempts: {last_error}",
        cfg.retries + 1
    ))
}
