//! The `crawl` step against real HTTP servers on 127.0.0.1: a hostile little site (robots,
//! redirects and a loop, an oversized page, a trickling endpoint, 429 + Retry-After, 500s,
//! invalid UTF-8, a gzip bomb, non-HTML content, duplicate URLs) and, when Debian's
//! python3.11-doc is installed, a real Sphinx site.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::Router;
use common::Project;

#[derive(Default)]
struct Counters {
    hits: Mutex<HashMap<String, usize>>,
    conditional: AtomicUsize,
    not_modified: AtomicUsize,
}

fn page(title: &str, body: &str) -> String {
    format!(
        r#"<html><head><title>{title}</title></head><body>
        <nav class="menu"><a href="/">Home</a> <a href="/blog/a">A</a></nav>
        <article><h1>{title}</h1>{body}</article>
        <footer>Copyright the author. Subscribe!</footer></body></html>"#
    )
}

fn gzip_bomb() -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![b' '; 1 << 20];
    for _ in 0..64 {
        enc.write_all(&zeros).unwrap();
    }
    enc.finish().unwrap()
}

/// Counts a conditional request answered 304 Not Modified.
fn not_modified(counters: &Counters) -> Response {
    counters.conditional.fetch_add(1, Ordering::SeqCst);
    counters.not_modified.fetch_add(1, Ordering::SeqCst);
    Response::builder()
        .status(StatusCode::NOT_MODIFIED)
        .body(Body::empty())
        .unwrap()
}

async fn site(
    State((counters, bomb)): State<(Arc<Counters>, Arc<Vec<u8>>)>,
    req: Request,
) -> Response {
    let path = req.uri().path().to_string();
    let full = req.uri().to_string();
    *counters
        .hits
        .lock()
        .unwrap()
        .entry(full.clone())
        .or_default() += 1;
    let hits = counters.hits.lock().unwrap()[&full];
    let headers: HeaderMap = req.headers().clone();
    let html = |s: String| {
        Response::builder()
            .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
            .body(Body::from(s))
            .unwrap()
    };
    match path.as_str() {
        "/robots.txt" => Response::new(Body::from("User-agent: *\nDisallow: /private\n")),
        "/" => html(page(
            "Index",
            r#"<p>Welcome to a small site that tests every way a crawl can go wrong, and right.</p>
            <a href="/blog/a">a</a> <a href="/blog/b">b</a> <a href="/blog/b#comments">b again</a>
            <a href="/blog/b?y=2&x=1">b q1</a> <a href="/blog/b?x=1&y=2">b q2</a> <a href="/blog/c/">c</a>
            <a href="/private/secret">secret</a> <a href="/redirect">moved</a> <a href="/loop1">loop</a>
            <a href="/big">big</a> <a href="/slow">slow</a> <a href="/flaky">flaky</a> <a href="/error">error</a>
            <a href="/bad-utf8">bad</a> <a href="/bomb">bomb</a> <a href="/image.png">image</a> <a href="/deep">deep</a>
            <a href="http://other.invalid/">elsewhere</a>"#,
        )),
        "/blog/a" => {
            if headers
                .get(header::IF_NONE_MATCH)
                .is_some_and(|v| v == "\"a-v1\"")
            {
                return not_modified(&counters);
            }
            let mut r = html(page(
                "Post A",
                "<p>The first post has a paragraph that is long enough to be the main text.</p>",
            ));
            r.headers_mut()
                .insert(header::ETAG, HeaderValue::from_static("\"a-v1\""));
            r
        }
        "/blog/b" => {
            if headers.get(header::IF_MODIFIED_SINCE).is_some() {
                return not_modified(&counters);
            }
            let mut r = html(page(
                "Post B",
                "<p>The second post, reachable under several equivalent URLs, appears once.</p>",
            ));
            r.headers_mut().insert(
                header::LAST_MODIFIED,
                HeaderValue::from_static("Wed, 01 May 2024 10:00:00 GMT"),
            );
            r
        }
        "/blog/c" | "/blog/c/" => html(page(
            "Post C",
            "<p>The third post lives at a URL with a trailing slash, nothing more.</p>",
        )),
        "/blog/moved" => html(page(
            "Moved post",
            "<p>This post was reached through a permanent redirect from its old address.</p>",
        )),
        "/redirect" => Response::builder()
            .status(StatusCode::MOVED_PERMANENTLY)
            .header(header::LOCATION, "/blog/moved")
            .body(Body::empty())
            .unwrap(),
        "/loop1" => Response::builder()
            .status(StatusCode::FOUND)
            .header(header::LOCATION, "/loop2")
            .body(Body::empty())
            .unwrap(),
        "/loop2" => Response::builder()
            .status(StatusCode::FOUND)
            .header(header::LOCATION, "/loop1")
            .body(Body::empty())
            .unwrap(),
        "/big" => html(page("Big", &"<p>word </p>".repeat(400_000))),
        "/slow" => {
            let stream = trickle();
            Response::builder()
                .header(header::CONTENT_TYPE, "text/html")
                .body(Body::from_stream(stream))
                .unwrap()
        }
        "/flaky" => {
            if hits == 1 {
                Response::builder()
                    .status(StatusCode::TOO_MANY_REQUESTS)
                    .header(header::RETRY_AFTER, "1")
                    .body(Body::empty())
                    .unwrap()
            } else {
                html(page("Flaky", "<p>This page answered 429 with Retry-After first, then succeeded on the retry.</p>"))
            }
        }
        "/error" => Response::builder()
            .status(StatusCode::INTERNAL_SERVER_ERROR)
            .body(Body::from("boom"))
            .unwrap(),
        "/bad-utf8" => {
            let mut body = page(
                "Bad bytes",
                "<p>Some text with broken bytes: XX and then more readable words after them.</p>",
            )
            .into_bytes();
            let at = body.windows(2).position(|w| w == b"XX").unwrap();
            body[at] = 0xff;
            body[at + 1] = 0xfe;
            Response::builder()
                .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
                .body(Body::from(body))
                .unwrap()
        }
        "/bomb" => Response::builder()
            .header(header::CONTENT_TYPE, "text/html")
            .header(header::CONTENT_ENCODING, "gzip")
            .body(Body::from(bomb.as_ref().clone()))
            .unwrap(),
        "/deep" => html(page(
            "Deep",
            &format!(
                "{}too deep{}",
                "<div>".repeat(50_000),
                "</div>".repeat(50_000)
            ),
        )),
        "/image.png" => Response::builder()
            .header(header::CONTENT_TYPE, "image/png")
            .body(Body::from(vec![0x89, b'P', b'N', b'G']))
            .unwrap(),
        p if p.starts_with("/private") => html(page("Secret", "<p>Robots said no.</p>")),
        _ => Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Body::from("not found"))
            .unwrap(),
    }
}

/// A byte every 200 ms, for much longer than any sane timeout.
fn trickle(
) -> impl futures_util::Stream<Item = Result<axum::body::Bytes, std::io::Error>> + Send + 'static {
    futures_util::stream::unfold(0u32, |n| async move {
        if n >= 100 {
            return None;
        }
        if n > 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let chunk = if n == 0 {
            &b"<html><body><p>"[..]
        } else {
            &b"x"[..]
        };
        Some((Ok(axum::body::Bytes::from_static(chunk)), n + 1))
    })
}

fn serve(app: Router) -> SocketAddr {
    common::server::serve("127.0.0.1:0", app)
}

fn read_jsonl(p: &Project, id: &str) -> Vec<serde_json::Value> {
    let (code, out, err) = p.exec(&["artifacts", "cat", id]);
    assert_eq!(code, 0, "{err}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn crawl_a_hostile_site_then_recrawl_incrementally() {
    let counters = Arc::new(Counters::default());
    let app = Router::new()
        .fallback(site)
        .with_state((counters.clone(), Arc::new(gzip_bomb())));
    let addr = serve(app);
    let p = Project::new();
    p.write(
        "c.yaml",
        &format!(
            r#"
name: crawl
steps:
  docs:
    uses: crawl
    with:
      links: ["http://{addr}/"]
      follow: same-domain
      max_depth: 2
      delay_ms: 0
      concurrency: 8
      per_host_concurrency: 4
      timeout_s: 1.5
      max_bytes: 1000000
      retries: 2
      retry_backoff_ms: 50
  count:
    uses: command
    inputs: {{docs: docs.documents}}
    outputs: {{n: file}}
    with: {{run: "wc -l < ${{inputs.docs}} > ${{outputs.n}}"}}
"#
        ),
    );
    let t0 = Instant::now();
    let first = p.run("c.yaml", &[]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    assert!(
        t0.elapsed() < Duration::from_secs(40),
        "the crawl is bounded in time: {:?}",
        t0.elapsed()
    );
    let docs = read_jsonl(&p, &first.output("docs", "documents"));
    let urls: Vec<String> = docs
        .iter()
        .map(|d| {
            d["url"]
                .as_str()
                .unwrap()
                .replace(&format!("http://{addr}"), "")
        })
        .collect();
    assert_eq!(
        urls,
        [
            "/",
            "/bad-utf8",
            "/blog/a",
            "/blog/b",
            "/blog/c",
            "/blog/moved",
            "/flaky"
        ],
        "{urls:?}"
    );
    let by_url: BTreeMap<String, &serde_json::Value> =
        urls.iter().cloned().zip(docs.iter()).collect();
    let a = by_url["/blog/a"];
    assert_eq!(a["title"], "Post A");
    assert_eq!(a["category"], "article");
    assert_eq!(
        a["content"],
        "Post A\n\nThe first post has a paragraph that is long enough to be the main text."
    );
    assert!(
        by_url["/bad-utf8"]["content"]
            .as_str()
            .unwrap()
            .contains("broken bytes: \u{fffd}"),
        "invalid UTF-8 is replaced, not fatal"
    );
    assert_eq!(
        by_url["/blog/moved"]["metadata"]["redirected_from"]
            .as_str()
            .unwrap(),
        format!("http://{addr}/redirect")
    );
    for d in &docs {
        let c = d["content"].as_str().unwrap();
        assert!(
            !c.contains("Copyright") && !c.contains("Home"),
            "boilerplate kept in {}: {c}",
            d["url"]
        );
    }

    // Failures and skips are recorded with reasons in the artifact's metadata.
    let (_, show, _) = p.exec(&[
        "artifacts",
        "show",
        &first.output("docs", "documents"),
        "--json",
    ]);
    let meta: serde_json::Value =
        serde_json::from_str::<serde_json::Value>(&show).unwrap()["metadata"].clone();
    let reasons: BTreeMap<String, String> = meta["failures"]
        .as_array()
        .unwrap()
        .iter()
        .chain(meta["skipped"].as_array().unwrap())
        .map(|f| {
            (
                f["url"]
                    .as_str()
                    .unwrap()
                    .replace(&format!("http://{addr}"), ""),
                f["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(reasons["/loop1"].contains("redirect"), "{reasons:?}");
    assert!(reasons["/big"].contains("max_bytes"), "{reasons:?}");
    assert!(reasons["/bomb"].contains("max_bytes"), "{reasons:?}");
    assert!(reasons["/slow"].contains("timed out"), "{reasons:?}");
    assert!(
        reasons["/error"].contains("HTTP 500") && reasons["/error"].contains("3 attempts"),
        "{reasons:?}"
    );
    assert!(
        reasons["/private/secret"].contains("robots.txt"),
        "{reasons:?}"
    );
    assert!(reasons["/image.png"].contains("image/png"), "{reasons:?}");
    assert!(
        reasons["/deep"].contains("nested 50001 levels deep"),
        "{reasons:?}"
    );
    assert_eq!(meta["by_category"]["article"], 7);

    let hits = counters.hits.lock().unwrap().clone();
    assert!(
        !hits.keys().any(|k| k.starts_with("/private")),
        "robots.txt was ignored: {hits:?}"
    );
    assert!(
        !hits.contains_key("/blog/b?y=2&x=1") || !hits.contains_key("/blog/b?x=1&y=2"),
        "equivalent query orders fetched twice: {hits:?}"
    );
    assert_eq!(hits["/flaky"], 2, "429 then success");
    assert_eq!(hits["/error"], 3, "retries: 2");

    // Second crawl: conditional requests, identical artifact, nothing downstream reruns.
    let second = p.run("c.yaml", &[]);
    assert_eq!(second.code, 0, "{}", second.stderr);
    assert!(
        counters.conditional.load(Ordering::SeqCst) >= 2,
        "no conditional requests were sent"
    );
    assert!(counters.not_modified.load(Ordering::SeqCst) >= 2);
    assert_eq!(
        second.output("docs", "documents"),
        first.output("docs", "documents"),
        "unchanged site, identical artifact"
    );
    assert_eq!(
        second.step("docs")["status"],
        "cached",
        "{}",
        second.reason("docs")
    );
    assert_eq!(second.step("count")["status"], "cached");
}

#[test]
fn crawl_a_git_repository() {
    let p = Project::new();
    let repo = p.path("proj.git");
    std::fs::create_dir_all(repo.join("src")).unwrap();
    std::fs::write(
        repo.join("src/lib.rs"),
        "pub fn add(a: i32, b: i32) -> i32 {\n    a + b\n}\n",
    )
    .unwrap();
    std::fs::write(repo.join("README.md"), "# proj\n\nAdds numbers.\n").unwrap();
    std::fs::write(repo.join("Cargo.lock"), "# lock\n").unwrap();
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .current_dir(&repo)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    git(&["init", "-q"]);
    git(&["add", "."]);
    git(&[
        "-c",
        "user.email=t@example.org",
        "-c",
        "user.name=t",
        "commit",
        "-q",
        "-m",
        "init",
    ]);
    let url = format!("file://{}", repo.display());
    p.write(
        "g.yaml",
        &format!("name: git\nsteps:\n  code:\n    uses: crawl\n    with: {{links: [\"{url}\"]}}\n"),
    );
    let out = p.run("g.yaml", &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let docs = read_jsonl(&p, &out.output("code", "documents"));
    let paths: Vec<&str> = docs
        .iter()
        .map(|d| d["metadata"]["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["README.md", "src/lib.rs"]);
    assert_eq!(docs[1]["category"], "repository");
    assert_eq!(
        docs[1]["content"],
        "pub fn add(a: i32, b: i32) -> i32 {\n    a + b\n}\n"
    );
}

#[test]
fn crawl_the_python_docs_sphinx_site() {
    let root = std::path::PathBuf::from("/usr/share/doc/python3.11/html");
    if !common::process::installed_or_skip(
        root.join("tutorial/classes.html").exists(),
        "Debian's python3.11-doc",
        "apt-get install python3.11-doc; .ci/run does",
    ) {
        return;
    }
    let addr = serve(
        Router::new()
            .fallback(common::static_files::static_files)
            .with_state(Arc::new(root)),
    );
    let p = Project::new();
    p.write(
        "py.yaml",
        &format!(
            "name: pydocs\nsteps:\n  docs:\n    uses: crawl\n    with: {{links: [\"http://{addr}/tutorial/index.html\"], follow: same-prefix, max_depth: 1, max_pages: 40, delay_ms: 0, concurrency: 8, per_host_concurrency: 8}}\n"
        ),
    );
    let out = p.run("py.yaml", &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let docs = read_jsonl(&p, &out.output("docs", "documents"));
    assert!(docs.len() >= 15, "{} pages", docs.len());
    let classes = docs
        .iter()
        .find(|d| {
            d["url"]
                .as_str()
                .unwrap()
                .ends_with("/tutorial/classes.html")
        })
        .expect("classes page");
    let text = classes["content"].as_str().unwrap();
    assert!(
        text.starts_with(
            "9. Classes\n\nClasses provide a means of bundling data and functionality together."
        ),
        "{}",
        &text[..200]
    );
    assert!(
        text.contains(">>> class Complex:"),
        "code examples are kept"
    );
    for d in &docs {
        let c = d["content"].as_str().unwrap();
        for nav in [
            "Previous topic",
            "Next topic",
            "This Page",
            "Quick search",
            "Theme",
            "Navigation",
        ] {
            assert!(
                !c.contains(nav),
                "Sphinx navigation `{nav}` kept in {}",
                d["url"]
            );
        }
    }
}

#[test]
fn the_shipped_ingestion_pipeline_runs() {
    let counters = Arc::new(Counters::default());
    let addr = serve(
        Router::new()
            .fallback(site)
            .with_state((counters, Arc::new(gzip_bomb()))),
    );
    let work = Project::new();
    let repo = work.path("proj.git");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(repo.join("main.py"), "print('hello')\n").unwrap();
    for args in [
        &["init", "-q"][..],
        &["add", "."],
        &[
            "-c",
            "user.email=t@e.org",
            "-c",
            "user.name=t",
            "commit",
            "-q",
            "-m",
            "x",
        ],
    ] {
        assert!(std::process::Command::new("git")
            .current_dir(&repo)
            .args(args)
            .status()
            .unwrap()
            .success());
    }
    let out = std::process::Command::new(assert_cmd::cargo::cargo_bin("cairn"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("CAIRN_STORE", work.store())
        .args(["run", "pipelines/ingestion.yaml", "--json", "--quiet"])
        .args([
            "--set",
            &format!("blog=http://{addr}/blog/a"),
            "--set",
            &format!("repository=file://{}", repo.display()),
        ])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(
        out.status.success(),
        "{}\n{report}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs_id = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "documents")
        .unwrap()["outputs"]["documents"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, jsonl, _) = work.exec(&["artifacts", "cat", &docs_id]);
    let categories: std::collections::BTreeSet<String> = jsonl
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["category"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let expected: std::collections::BTreeSet<String> = ["article", "chat", "qa", "repository"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(categories, expected);
}
