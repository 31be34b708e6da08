//! Scores main-text extractors on the corpus `corpus.py` builds: per page, bag-of-words
//! precision, recall and F1 against the page's known main text (the measure of the
//! published extraction benchmarks), averaged per site generator and over all pages,
//! with pages/s. Usage: bench-extract CORPUS_DIR [--dump EXTRACTOR | --text EXTRACTOR PAGE]

#[allow(dead_code)]
#[path = "../../../src/extract.rs"]
mod extract;

use std::collections::HashMap;
use std::time::Instant;

type Extractor = fn(&str, &url::Url) -> Option<String>;

fn cairn(html: &str, url: &url::Url) -> Option<String> {
    Some(extract::extract(html, url, None).text)
}

fn rs_trafilatura(html: &str, url: &url::Url) -> Option<String> {
    let options = rs_trafilatura::Options {
        url: Some(url.to_string()),
        ..rs_trafilatura::Options::default()
    };
    rs_trafilatura::extract_with_options(html, &options)
        .ok()
        .map(|r| r.content_text)
}

fn trafilatura(html: &str, _url: &url::Url) -> Option<String> {
    trafilatura::extract(html, &trafilatura::Options::default())
        .ok()
        .map(|r| r.content_text)
}

fn dom_smoothie(html: &str, url: &url::Url) -> Option<String> {
    let config = dom_smoothie::Config {
        text_mode: dom_smoothie::TextMode::Formatted,
        ..Default::default()
    };
    let mut readability =
        dom_smoothie::Readability::new(html, Some(url.as_str()), Some(config)).ok()?;
    readability.parse().ok().map(|a| a.text_content.to_string())
}

fn readability(html: &str, url: &url::Url) -> Option<String> {
    readability::extractor::extract(&mut html.as_bytes(), url)
        .ok()
        .map(|p| p.text)
}

const EXTRACTORS: &[(&str, Extractor)] = &[
    ("cairn", cairn),
    ("rs-trafilatura 0.2", rs_trafilatura),
    ("trafilatura (rs) 0.6", trafilatura),
    ("dom_smoothie 0.19", dom_smoothie),
    ("readability 0.3", readability),
];

/// Lowercased words (letters and digits), the unit the scores count.
fn words(text: &str) -> HashMap<String, usize> {
    let mut bag = HashMap::new();
    for w in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        *bag.entry(w.to_lowercase()).or_insert(0) += 1;
    }
    bag
}

/// (precision, recall, F1) of `got` against `truth`, as bags of words.
fn score(got: &str, truth: &HashMap<String, usize>) -> (f64, f64, f64) {
    let got = words(got);
    let common: usize = got
        .iter()
        .map(|(w, n)| (*n).min(truth.get(w).copied().unwrap_or(0)))
        .sum();
    let (got_n, truth_n) = (got.values().sum::<usize>(), truth.values().sum::<usize>());
    let p = if got_n == 0 {
        0.0
    } else {
        common as f64 / got_n as f64
    };
    let r = if truth_n == 0 {
        0.0
    } else {
        common as f64 / truth_n as f64
    };
    let f = if p + r == 0.0 {
        0.0
    } else {
        2.0 * p * r / (p + r)
    };
    (p, r, f)
}

struct Page {
    generator: String,
    name: String,
    html: String,
    url: url::Url,
    truth: HashMap<String, usize>,
    held_out: bool,
}

#[derive(Default, Clone, Copy)]
struct Sum {
    p: f64,
    r: f64,
    f: f64,
    pages: usize,
    empty: usize,
}

impl Sum {
    fn add(&mut self, (p, r, f): (f64, f64, f64), empty: bool) {
        self.p += p;
        self.r += r;
        self.f += f;
        self.pages += 1;
        self.empty += usize::from(empty);
    }
    fn mean(&self) -> (f64, f64, f64) {
        let n = self.pages.max(1) as f64;
        (self.p / n, self.r / n, self.f / n)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(args.get(1).expect("usage: bench-extract CORPUS_DIR"));
    let dump = args
        .iter()
        .position(|a| a == "--dump")
        .and_then(|i| args.get(i + 1));
    let manifest = std::fs::read_to_string(dir.join("manifest.jsonl")).expect("manifest.jsonl");
    let pages: Vec<Page> = manifest
        .lines()
        .map(|line| {
            let row: serde_json::Value = serde_json::from_str(line).expect("manifest row");
            let field = |k: &str| row[k].as_str().expect("manifest field").to_string();
            let bytes = std::fs::read(dir.join(field("html"))).expect("page");
            Page {
                generator: field("generator"),
                name: field("html"),
                html: String::from_utf8_lossy(&bytes).into_owned(),
                url: url::Url::parse(&field("url")).expect("page url"),
                truth: words(&field("truth")),
                held_out: row["held_out"].as_bool().unwrap_or(false),
            }
        })
        .collect();
    // --text EXTRACTOR PAGE: what one extractor makes of one page, to read its mistakes.
    if let Some(i) = args.iter().position(|a| a == "--text") {
        let (who, which) = (&args[i + 1], &args[i + 2]);
        let (_, extractor) = EXTRACTORS
            .iter()
            .find(|(n, _)| n.starts_with(who.as_str()))
            .expect("extractor");
        let page = pages
            .iter()
            .find(|p| p.name.ends_with(which.as_str()))
            .expect("page");
        println!("{}", extractor(&page.html, &page.url).unwrap_or_default());
        return;
    }
    let mut generators: Vec<&str> = pages.iter().map(|p| p.generator.as_str()).collect();
    generators.dedup();

    let mut rows = Vec::new();
    for (name, extractor) in EXTRACTORS {
        let mut by_generator: HashMap<&str, Sum> = HashMap::new();
        let mut all = Sum::default();
        let mut split = [Sum::default(); 2];
        let start = Instant::now();
        let mut outputs = Vec::with_capacity(pages.len());
        for page in &pages {
            outputs.push(extractor(&page.html, &page.url).unwrap_or_default());
        }
        let seconds = start.elapsed().as_secs_f64();
        for (page, text) in pages.iter().zip(&outputs) {
            let s = score(text, &page.truth);
            let empty = text.trim().is_empty();
            by_generator
                .entry(&page.generator)
                .or_default()
                .add(s, empty);
            all.add(s, empty);
            split[usize::from(page.held_out)].add(s, empty);
            if dump.is_some_and(|d| name.starts_with(d.as_str())) {
                eprintln!("{:.3} {:.3} {:.3} {}", s.0, s.1, s.2, page.name);
            }
        }
        rows.push((name, by_generator, all, split, pages.len() as f64 / seconds));
    }

    println!(
        "## Main-text extraction: {} pages, {} site generators\n",
        pages.len(),
        generators.len()
    );
    let held = pages.iter().filter(|p| p.held_out).count();
    println!(
        "Held out: {held} pages of generators added after cairn's extractor was tuned on the others ({} pages).\n",
        pages.len() - held
    );
    println!("| extractor | precision | recall | F1 | F1 tuned-on | F1 held out | pages with no text | pages/s |");
    println!("|---|---|---|---|---|---|---|---|");
    for (name, _, all, split, rate) in &rows {
        let (p, r, f) = all.mean();
        println!(
            "| {name} | {p:.3} | {r:.3} | {f:.3} | {:.3} | {:.3} | {} | {rate:.0} |",
            split[0].mean().2,
            split[1].mean().2,
            all.empty
        );
    }
    println!("\nF1 per site generator:\n");
    print!("| generator |");
    for (name, ..) in &rows {
        print!(" {name} |");
    }
    println!();
    print!("|---|");
    for _ in &rows {
        print!("---|");
    }
    println!();
    for g in &generators {
        print!("| {g} |");
        for (_, by, ..) in &rows {
            print!(" {:.3} |", by[g].mean().2);
        }
        println!();
    }
}
