#!/usr/bin/env python3
"""Baseline for the crawl benchmark: a requests + BeautifulSoup crawler doing the same
work as cairn's `crawl` step (same-prefix BFS, 16 concurrent requests, a generic
readability-style main-content pick with the same boilerplate names, JSON Lines out)."""
import argparse
import concurrent.futures
import json
import re
import threading
import time
import urllib.parse

import requests
from bs4 import BeautifulSoup

SKIP = ["script", "style", "noscript", "template", "svg", "iframe", "form", "button", "nav", "header", "footer", "aside", "head"]
NEGATIVE = re.compile(r"(^|[\s_-])(comment|meta|footer|footnote|nav|navbar|navigation|sidebar|sphinxsidebar|related|sponsor|advert|ads|share|sharing|social|subscribe|newsletter|cookie|consent|banner|menu|breadcrumb|widget|popup|modal|promo|header|masthead|toolbar|pager|pagination|headerlink|skip|signup|login|tags|toc)($|[\s_-])", re.I)
POSITIVE = re.compile(r"(article|body|content|entry|main|page|post|text|blog|story|document)", re.I)


def names(el):
    return " ".join([el.get("id") or ""] + list(el.get("class") or []) + [el.get("role") or ""])


def extract(html, url):
    soup = BeautifulSoup(html, "lxml")
    title = soup.title.get_text(strip=True) if soup.title else None
    links = [urllib.parse.urljoin(url, a["href"]) for a in soup.find_all("a", href=True)]
    for t in soup(SKIP):
        t.decompose()
    for el in soup.find_all(True):
        if el.parent is not None and NEGATIVE.search(names(el)) and not POSITIVE.search(names(el)):
            el.decompose()
    best, best_score = soup.body, -1.0
    for el in soup.find_all(["article", "main", "div", "section", "td"]):
        text = el.get_text(" ", strip=True)
        if len(text) < 80:
            continue
        link_text = sum(len(a.get_text(strip=True)) for a in el.find_all("a"))
        score = len(text) ** 0.5 * (1 - link_text / max(len(text), 1)) ** 2 + 3 * len(el.find_all(["p", "pre", "li", "blockquote"]))
        if POSITIVE.search(names(el)):
            score *= 1.25
        if el.name in ("article", "main") or el.get("role") == "main":
            score *= 1.5
        if score > best_score:
            best, best_score = el, score
    text = best.get_text("\n\n", strip=True) if best else ""
    return title, text, links


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("start")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-pages", type=int, default=1000)
    ap.add_argument("--out", default="baseline.jsonl")
    args = ap.parse_args()
    prefix = args.start.rsplit("/", 1)[0] + "/"
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=args.concurrency, pool_maxsize=args.concurrency)
    session.mount("http://", adapter)
    seen = {args.start}
    lock = threading.Lock()
    docs, total_bytes = [], 0

    def fetch(url):
        r = session.get(url, timeout=20)
        if r.status_code != 200 or "html" not in r.headers.get("content-type", ""):
            return url, None, len(r.content)
        title, text, links = extract(r.text, url)
        return url, (title, text, links), len(r.content)

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
        pending = {pool.submit(fetch, args.start)}
        started = 1
        while pending:
            done, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for f in done:
                url, result, size = f.result()
                total_bytes += size
                if not result:
                    continue
                title, text, links = result
                docs.append({"url": url, "title": title, "content": text})
                for link in links:
                    link = link.split("#")[0]
                    with lock:
                        if link.startswith(prefix) and link.endswith(".html") and link not in seen and started < args.max_pages:
                            seen.add(link)
                            started += 1
                            pending.add(pool.submit(fetch, link))
    wall = time.perf_counter() - t0
    with open(args.out, "w") as f:
        for d in sorted(docs, key=lambda d: d["url"]):
            f.write(json.dumps(d) + "\n")
    print(json.dumps({"pages": len(docs), "bytes": total_bytes, "seconds": wall}))


if __name__ == "__main__":
    main()
