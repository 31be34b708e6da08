//! Main-content extraction from HTML: title, author, publication date, canonical URL and
//! the page's main text without navigation, headers, footers, sidebars, scripts, share
//! widgets or cookie banners.
//!
//! A readability-style scorer written here on top of `scraper`: the crates that port
//! Mozilla's Readability (`readability`, `readable-readability`) are unmaintained, pull
//! their own HTML stacks, and expose no hook for per-domain rules, which the crawl step
//! needs. The scorer: score block containers by the text of their paragraphs, penalise
//! link-heavy text and boilerplate class/id names, reward article-like names and
//! `<article>`/`<main>`/`role=main`, then render the best candidate's text.

use scraper::{ElementRef, Html, Node, Selector};
use serde::{Deserialize, Serialize};

/// CSS selectors for a site where the generic scorer is not enough.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rules {
    /// Selector of the main content (all matches are joined).
    #[serde(default)]
    pub content: Option<String>,
    /// Selector of the title.
    #[serde(default)]
    pub title: Option<String>,
    /// Selectors of parts to drop inside the content.
    #[serde(default)]
    pub exclude: Vec<String>,
}

impl Rules {
    /// Checks that every selector parses; the error names the bad one.
    pub fn validate(&self) -> Result<(), String> {
        for s in self
            .content
            .iter()
            .chain(self.title.iter())
            .chain(self.exclude.iter())
        {
            Selector::parse(s).map_err(|e| format!("invalid CSS selector `{s}`: {e}"))?;
        }
        Ok(())
    }
}

/// What was extracted from a page.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extracted {
    /// Page title.
    pub title: Option<String>,
    /// Author (or, failing that, the site name).
    pub author: Option<String>,
    /// Publication date as found.
    pub published: Option<String>,
    /// Canonical URL, absolute.
    pub canonical: Option<String>,
    /// Main text: blocks separated by blank lines; `<pre>` kept verbatim.
    pub text: String,
    /// Outgoing links, absolute, in page order.
    pub links: Vec<String>,
}

/// Tags never part of the main text.
const SKIP_TAGS: &[&str] = &[
    "script", "style", "noscript", "template", "svg", "canvas", "iframe", "form", "button",
    "input", "select", "textarea", "nav", "header", "footer", "aside", "head", "title", "meta",
    "link", "object", "embed", "dialog",
];

/// Block-level tags: each starts a new paragraph of text.
const BLOCK_TAGS: &[&str] = &[
    "p",
    "div",
    "section",
    "article",
    "main",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "li",
    "ul",
    "ol",
    "dl",
    "dt",
    "dd",
    "blockquote",
    "pre",
    "table",
    "tr",
    "td",
    "th",
    "figure",
    "figcaption",
    "br",
    "hr",
    "address",
    "details",
    "summary",
];

const NEGATIVE: &[&str] = &[
    "comment",
    "meta",
    "footer",
    "footnote",
    "nav",
    "navbar",
    "navigation",
    "sidebar",
    "sphinxsidebar",
    "related",
    "sponsor",
    "advert",
    "ad-",
    "ads",
    "share",
    "sharing",
    "social",
    "subscribe",
    "newsletter",
    "cookie",
    "consent",
    "banner",
    "menu",
    "breadcrumb",
    "widget",
    "popup",
    "modal",
    "promo",
    "header",
    "masthead",
    "toolbar",
    "pager",
    "pagination",
    "headerlink",
    "skip",
    "signup",
    "login",
    "disqus",
    "tags",
    "toc",
];

const POSITIVE: &[&str] = &[
    "article", "body", "content", "entry", "main", "page", "post", "text", "blog", "story",
    "document",
];

fn selector(s: &str) -> Selector {
    Selector::parse(s).expect("built-in selector")
}

fn class_id(el: &ElementRef<'_>) -> String {
    let v = el.value();
    let mut s = v.id().unwrap_or("").to_ascii_lowercase();
    for c in v.classes() {
        s.push(' ');
        s.push_str(&c.to_ascii_lowercase());
    }
    if let Some(role) = v.attr("role") {
        s.push(' ');
        s.push_str(&role.to_ascii_lowercase());
    }
    s
}

fn matches_any(text: &str, words: &[&str]) -> bool {
    text.split(|c: char| c.is_whitespace()).any(|token| {
        words.iter().any(|w| {
            token == *w
                || token.starts_with(&format!("{w}-"))
                || token.ends_with(&format!("-{w}"))
                || token.starts_with(&format!("{w}_"))
        })
    })
}

/// Boilerplate by name (navigation, share widgets, cookie banners, ...).
fn is_boilerplate(el: &ElementRef<'_>) -> bool {
    let name = el.value().name();
    if SKIP_TAGS.contains(&name) {
        return true;
    }
    let ci = class_id(el);
    if ci.is_empty() {
        return false;
    }
    let v = el.value();
    v.attr("aria-hidden") == Some("true")
        || v.attr("hidden").is_some()
        || matches!(
            v.attr("role"),
            Some("navigation" | "banner" | "contentinfo" | "complementary" | "search")
        )
        || (matches_any(&ci, NEGATIVE)
            && !matches_any(
                &ci,
                &["body", "article", "main", "content", "post", "entry"],
            ))
}

fn normalize_space(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Extracts from `html` served at `url`, with optional per-site rules.
pub fn extract(html: &str, url: &url::Url, rules: Option<&Rules>) -> Extracted {
    let doc = Html::parse_document(html);
    let meta = |sel: &str| -> Option<String> {
        doc.select(&selector(sel))
            .filter_map(|e| e.value().attr("content"))
            .map(normalize_space)
            .find(|s| !s.is_empty())
    };
    let first_text = |sel: &Selector| -> Option<String> {
        doc.select(sel)
            .map(|e| normalize_space(&e.text().collect::<String>()))
            .find(|s| !s.is_empty())
    };
    let title = rules
        .and_then(|r| r.title.as_deref())
        .and_then(|s| Selector::parse(s).ok())
        .and_then(|s| first_text(&s))
        .or_else(|| meta("meta[property='og:title']"))
        .or_else(|| first_text(&selector("title")))
        .or_else(|| first_text(&selector("h1")));
    let author = meta("meta[name='author']")
        .or_else(|| meta("meta[property='article:author']"))
        .or_else(|| first_text(&selector("[rel='author'], .author, .byline")))
        .or_else(|| meta("meta[property='og:site_name']"));
    let published = meta("meta[property='article:published_time']")
        .or_else(|| meta("meta[name='date']"))
        .or_else(|| meta("meta[name='dc.date']"))
        .or_else(|| {
            doc.select(&selector("time[datetime]"))
                .find_map(|t| t.value().attr("datetime").map(str::to_string))
        });
    let canonical = doc
        .select(&selector("link[rel='canonical']"))
        .find_map(|l| l.value().attr("href"))
        .and_then(|h| url.join(h).ok())
        .map(|u| u.to_string());
    let links = doc
        .select(&selector("a[href]"))
        .filter_map(|a| a.value().attr("href"))
        .filter_map(|h| url.join(h.trim()).ok())
        .filter(|u| matches!(u.scheme(), "http" | "https"))
        .map(|u| u.to_string())
        .collect();

    let excluded: Vec<Selector> = rules
        .map(|r| {
            r.exclude
                .iter()
                .filter_map(|s| Selector::parse(s).ok())
                .collect()
        })
        .unwrap_or_default();
    let excluded_ids: std::collections::HashSet<_> = excluded
        .iter()
        .flat_map(|s| doc.select(s).map(|e| e.id()))
        .collect();

    let roots: Vec<ElementRef<'_>> = match rules
        .and_then(|r| r.content.as_deref())
        .and_then(|s| Selector::parse(s).ok())
    {
        Some(sel) => doc.select(&sel).collect(),
        None => best_candidate(&doc).into_iter().collect(),
    };
    let mut text = String::new();
    for root in &roots {
        render(*root, &excluded_ids, true, &mut text);
        text.push_str("\n\n");
    }
    Extracted {
        title,
        author,
        published,
        canonical,
        text: tidy(&text),
        links,
    }
}

/// The container most likely to hold the main text.
fn best_candidate(doc: &Html) -> Option<ElementRef<'_>> {
    let body = doc.select(&selector("body")).next()?;
    let mut best: Option<(f64, ElementRef<'_>)> = None;
    for el in body.descendent_elements() {
        let name = el.value().name();
        if !matches!(name, "article" | "main" | "div" | "section" | "td" | "body") {
            continue;
        }
        if has_boilerplate_ancestor(el) || is_boilerplate(&el) {
            continue;
        }
        let (text_len, link_len, paragraphs) = measure(el);
        if text_len < 80 {
            continue;
        }
        let link_density = link_len as f64 / text_len.max(1) as f64;
        let mut score =
            (text_len as f64).sqrt() * (1.0 - link_density).powi(2) + paragraphs as f64 * 3.0;
        let ci = class_id(&el);
        if matches_any(&ci, POSITIVE) {
            score *= 1.25;
        }
        if name == "article" || name == "main" || el.value().attr("role") == Some("main") {
            score *= 1.5;
        }
        if best.as_ref().is_none_or(|(s, _)| score > *s) {
            best = Some((score, el));
        }
    }
    best.map(|(_, el)| el).or(Some(body))
}

fn has_boilerplate_ancestor(el: ElementRef<'_>) -> bool {
    el.ancestors()
        .filter_map(ElementRef::wrap)
        .any(|a| is_boilerplate(&a))
}

/// Text length, link text length and paragraph count of the readable parts under `el`.
fn measure(el: ElementRef<'_>) -> (usize, usize, usize) {
    let mut text = 0;
    let mut links = 0;
    let mut paragraphs = 0;
    let mut stack = vec![(el, false)];
    while let Some((e, in_link)) = stack.pop() {
        if e != el && is_boilerplate(&e) {
            continue;
        }
        let name = e.value().name();
        if matches!(name, "p" | "pre" | "li" | "blockquote") {
            paragraphs += 1;
        }
        let is_link = in_link || name == "a";
        for child in e.children() {
            match child.value() {
                Node::Text(t) => {
                    let n = t.trim().len();
                    text += n;
                    if is_link {
                        links += n;
                    }
                }
                Node::Element(_) => {
                    if let Some(c) = ElementRef::wrap(child) {
                        stack.push((c, is_link));
                    }
                }
                _ => {}
            }
        }
    }
    (text, links, paragraphs)
}

fn render(
    el: ElementRef<'_>,
    excluded: &std::collections::HashSet<ego_tree::NodeId>,
    root: bool,
    out: &mut String,
) {
    if excluded.contains(&el.id()) || (!root && is_boilerplate(&el)) {
        return;
    }
    let name = el.value().name();
    if name == "pre" {
        out.push_str("\n\n");
        out.push_str(&el.text().collect::<String>());
        out.push_str("\n\n");
        return;
    }
    let block = BLOCK_TAGS.contains(&name);
    if block {
        out.push_str("\n\n");
    }
    if name == "li" {
        out.push_str("- ");
    }
    for child in el.children() {
        match child.value() {
            Node::Text(t) => {
                let s: &str = t;
                if s.trim().is_empty() {
                    if !out.ends_with([' ', '\n']) {
                        out.push(' ');
                    }
                } else {
                    if s.starts_with(char::is_whitespace) && !out.ends_with([' ', '\n']) {
                        out.push(' ');
                    }
                    out.push_str(&normalize_space(s));
                    if s.ends_with(char::is_whitespace) {
                        out.push(' ');
                    }
                }
            }
            Node::Element(_) => {
                if let Some(c) = ElementRef::wrap(child) {
                    render(c, excluded, false, out);
                }
            }
            _ => {}
        }
    }
    if block {
        out.push_str("\n\n");
    }
}

/// Trims lines, keeps `<pre>` indentation, and collapses runs of blank lines.
fn tidy(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut blank = 0;
    for line in text.lines() {
        let l = line.trim_end();
        let l = if l.trim_start().is_empty() { "" } else { l };
        if l.is_empty() {
            blank += 1;
            continue;
        }
        if !out.is_empty() {
            out.push_str(if blank > 0 { "\n\n" } else { "\n" });
        }
        blank = 0;
        // Lines from inline rendering start with the space left by a tag boundary.
        out.push_str(if l.starts_with(' ') && !l.starts_with("    ") {
            l.trim_start()
        } else {
            l
        });
    }
    out.replace(" \u{b6}", "").replace('\u{b6}', "")
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"<html><head><title>My post | Blog</title>
      <meta name="author" content="Ada Writer"><meta property="article:published_time" content="2024-05-01">
      <link rel="canonical" href="/posts/my-post"></head>
      <body><header class="site-header"><a href="/">Home</a> <a href="/about">About</a></header>
      <nav class="menu"><ul><li><a href="/a">A</a></li><li><a href="/b">B</a></li></ul></nav>
      <div id="cookie-banner">We use cookies. <button>Accept</button></div>
      <article class="post"><h1>My post</h1>
        <p>The first paragraph has enough words to be the main text of this page, and more.</p>
        <p>A second paragraph, with <a href="/x">a link</a> inside it and some more text.</p>
        <pre>fn main() {
    println!("kept verbatim");
}</pre>
        <div class="share-buttons">Share on X  Share on Y</div>
      </article>
      <aside class="sidebar"><p>Related posts you might like and lots of sidebar text here.</p></aside>
      <footer>Copyright 2024. Subscribe to the newsletter.</footer>
      <script>var tracking = 1;</script></body></html>"#;

    #[test]
    fn extracts_main_text_and_metadata() {
        let url = url::Url::parse("https://blog.example.org/posts/my-post?ref=x").unwrap();
        let e = extract(PAGE, &url, None);
        assert_eq!(e.title.as_deref(), Some("My post | Blog"));
        assert_eq!(e.author.as_deref(), Some("Ada Writer"));
        assert_eq!(e.published.as_deref(), Some("2024-05-01"));
        assert_eq!(
            e.canonical.as_deref(),
            Some("https://blog.example.org/posts/my-post")
        );
        assert!(
            e.text.starts_with("My post\n\nThe first paragraph"),
            "{}",
            e.text
        );
        assert!(e.text.contains("with a link inside it"), "{}", e.text);
        assert!(
            e.text
                .contains("fn main() {\n    println!(\"kept verbatim\");\n}"),
            "{}",
            e.text
        );
        for junk in [
            "Home",
            "cookies",
            "Share on",
            "Related posts",
            "Copyright",
            "tracking",
        ] {
            assert!(!e.text.contains(junk), "`{junk}` leaked into: {}", e.text);
        }
        assert!(e.links.contains(&"https://blog.example.org/x".to_string()));
    }

    #[test]
    fn rules_pick_and_exclude() {
        let url = url::Url::parse("https://blog.example.org/").unwrap();
        let rules = Rules {
            content: Some("aside".into()),
            title: Some("h1".into()),
            exclude: vec![],
        };
        let e = extract(PAGE, &url, Some(&rules));
        assert_eq!(e.title.as_deref(), Some("My post"));
        assert_eq!(
            e.text,
            "Related posts you might like and lots of sidebar text here."
        );
        let rules = Rules {
            content: Some("article".into()),
            title: None,
            exclude: vec!["pre".into(), "h1".into()],
        };
        let e = extract(PAGE, &url, Some(&rules));
        assert!(
            !e.text.contains("kept verbatim") && !e.text.starts_with("My post"),
            "{}",
            e.text
        );
        assert!(Rules {
            content: Some("p[".into()),
            ..Rules::default()
        }
        .validate()
        .is_err());
    }
}
