#!/usr/bin/env python3
"""Crawl benchmark: cairn's `crawl` step vs the requests + BeautifulSoup baseline on the
python3.11-doc site served on 127.0.0.1 (concurrency 16, politeness off for loopback).
Prints a markdown table: pages, wall time, pages/s, MB/s and peak RSS."""
import json
import os
import resource
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def run(cmd, cwd, env=None):
    wrapper = (
        "import resource,subprocess,sys,time;t=time.perf_counter();"
        "r=subprocess.run(sys.argv[1:],capture_output=True,text=True);d=time.perf_counter()-t;"
        "sys.stderr.write(r.stderr[-3000:]);print(r.stdout.strip().splitlines()[-1] if r.stdout.strip() else '{}');"
        "print(d, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss);sys.exit(r.returncode)"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], cwd=cwd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stderr}")
    lines = out.stdout.strip().splitlines()
    secs, rss = lines[-1].split()
    return lines[-2], float(secs), int(rss) / 1024


def main():
    port, python = sys.argv[1], sys.argv[2]
    start = f"http://127.0.0.1:{port}/index.html"
    # The release binary (the script passes it: CARGO_TARGET_DIR may move it).
    cairn = sys.argv[3] if len(sys.argv) > 3 else os.path.join(ROOT, "target/release/cairn")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        with open(os.path.join(work, "c.yaml"), "w") as f:
            f.write(
                "name: bench\nsteps:\n  docs:\n    uses: crawl\n    with:\n"
                f"      links: [\"{start}\"]\n      follow: same-prefix\n      max_depth: 20\n      max_pages: 1000\n"
                "      concurrency: 16\n      per_host_concurrency: 16\n      delay_ms: 0\n      respect_robots: false\n"
            )
        env = dict(os.environ, CAIRN_STORE=os.path.join(work, "store"))
        _, secs, rss = run([cairn, "run", "c.yaml", "--quiet"], cwd=work, env=env)
        out = subprocess.run([cairn, "artifacts", "ls", "--step", "docs", "--kind", "documents", "--json"], cwd=work, env=env, capture_output=True, text=True)
        meta = json.loads(out.stdout)[0]["metadata"]
        pages, nbytes = meta["documents"], meta["stats"]["bytes"]
        rows.append(("cairn crawl (fetch + extract + store)", pages, secs, nbytes, rss))
        summary, secs, rss = run([python, os.path.join(HERE, "baseline.py"), start, "--concurrency", "16", "--out", os.path.join(work, "b.jsonl")], cwd=work)
        s = json.loads(summary)
        rows.append(("Python requests + BeautifulSoup (lxml)", s["pages"], secs, s["bytes"], rss))
    print("\n### Crawl: python3.11-doc on 127.0.0.1, concurrency 16\n")
    print("| crawler | pages | wall | pages/s | MB/s | peak RSS |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, pages, secs, nbytes, rss in rows:
        print(f"| {name} | {pages} | {secs:.2f} s | {pages/secs:.0f} | {nbytes/secs/1e6:.1f} | {rss:.0f} MiB |")
    print(f"\ncairn / baseline pages/s: {(rows[0][1]/rows[0][2]) / (rows[1][1]/rows[1][2]):.1f}x")


if __name__ == "__main__":
    main()
