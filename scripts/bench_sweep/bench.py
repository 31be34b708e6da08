"""Per-step overhead of foreach/matrix expansion, and compare over many runs.

Three pipelines of N trivial command steps (each writes one small file):
  chain   step i reads step i-1's output (N written-out steps, sequential)
  flat    N independent steps written out one by one
  matrix  one step with `matrix: {i: [0..N)}` (N variants, independent)
For each: `cairn plan` (load, expand, resolve, decide), the cold run, and a no-op rerun
(everything cached), as wall time and per step. Then R runs of a small sweep pipeline
are recorded and `cairn runs compare --pipeline ... --last R` is timed.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

cairn = sys.argv[1]
n = int(os.environ.get("STEPS", "1000"))
runs = int(os.environ.get("RUNS", "1000"))
jobs = os.environ.get("JOBS", "2")


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def chain(n):
    lines = ["name: chain", "steps:", "  s0:", "    uses: command",
             '    with: {run: "echo 0 > ${outputs.o}"}', "    outputs: [o]"]
    for i in range(1, n):
        lines += [f"  s{i}:", "    uses: command", f"    inputs: {{prev: s{i-1}.o}}",
                  f'    with: {{run: "echo {i} > ${{outputs.o}}"}}', "    outputs: [o]"]
    return "\n".join(lines) + "\n"


def flat(n):
    lines = ["name: flat", "steps:"]
    for i in range(n):
        lines += [f"  s{i}:", "    uses: command", f'    with: {{run: "echo {i} > ${{outputs.o}}"}}',
                  "    outputs: [o]"]
    return "\n".join(lines) + "\n"


def matrix(n):
    items = ", ".join(str(i) for i in range(n))
    return ("name: matrix\nsteps:\n  s:\n    uses: command\n"
            f"    matrix: {{i: [{items}]}}\n"
            '    with: {run: "echo ${item.i} > ${outputs.o}"}\n    outputs: [o]\n')


def timed(args, cwd, env):
    start = time.perf_counter()
    out = subprocess.run([cairn, *args], cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if out.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return elapsed, out.stdout


rows = []
with tempfile.TemporaryDirectory() as tmp:
    for name, text in [("chain", chain(n)), ("flat", flat(n)), ("matrix", matrix(n))]:
        d = os.path.join(tmp, name)
        os.makedirs(d)
        write(os.path.join(d, "p.yaml"), text)
        env = dict(os.environ, CAIRN_STORE=os.path.join(d, "store"))
        # Plan against an empty store: load + expand + resolve + decide every step.
        plan, _ = timed(["plan", "p.yaml", "--json"], d, env)
        cold, out = timed(["run", "p.yaml", "--json", "--jobs", jobs], d, env)
        report = json.loads(out)
        ran = sum(1 for s in report["steps"] if s["status"] == "ran")
        assert ran == n, f"{name}: {ran} ran"
        noop, out = timed(["run", "p.yaml", "--json"], d, env)
        cached = sum(1 for s in json.loads(out)["steps"] if s["status"] == "cached")
        assert cached == n, f"{name}: {cached} cached"
        rows.append((name, plan, cold, noop))

    d = os.path.join(tmp, "compare")
    os.makedirs(d)
    write(os.path.join(d, "p.yaml"),
          "name: sweep\nparams: {seed: 0}\nsteps:\n  train:\n    uses: command\n"
          "    matrix: {rank: [4, 8]}\n"
          '    with: {run: "echo ${item.rank} ${params.seed} > ${outputs.model}"}\n'
          "    outputs: [model]\n")
    env = dict(os.environ, CAIRN_STORE=os.path.join(d, "store"))
    start = time.perf_counter()
    for seed in range(runs):
        timed(["run", "p.yaml", "--quiet", "--set", f"seed={seed}"], d, env)
    record = time.perf_counter() - start
    compare, out = timed(["runs", "compare", "--pipeline", "sweep", "--last", str(runs), "--json"], d, env)
    table = json.loads(out)
    compare_rows = len(table["rows"])

print(f"## foreach/matrix overhead: {n} trivial steps each, --jobs {jobs}\n")
print("| pipeline | plan (load+expand+decide) | per step | cold run | per step | no-op rerun | per step |")
print("|---|---|---|---|---|---|---|")
for name, plan, cold, noop in rows:
    print(f"| {name} | {plan*1e3:.0f} ms | {plan/n*1e6:.0f} µs | {cold:.2f} s | {cold/n*1e3:.2f} ms "
          f"| {noop*1e3:.0f} ms | {noop/n*1e6:.0f} µs |")
base = {r[0]: r for r in rows}
m, f, c = base["matrix"], base["flat"], base["chain"]
print(f"\nmatrix / flat: plan {m[1]/f[1]:.2f}x, cold {m[2]/f[2]:.2f}x, no-op {m[3]/f[3]:.2f}x; "
      f"matrix / chain: plan {m[1]/c[1]:.2f}x, cold {m[2]/c[2]:.2f}x, no-op {m[3]/c[3]:.2f}x")
print(f"\n## runs compare over {runs} runs ({compare_rows} rows, 2 variants each)\n")
print("| measure | value | target |")
print("|---|---|---|")
print(f"| `cairn runs compare --pipeline sweep --last {runs} --json` | {compare*1e3:.0f} ms | < 1 s |")
print(f"| recording the {runs} runs (for scale) | {record:.1f} s | |")
