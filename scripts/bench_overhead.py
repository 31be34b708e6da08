#!/usr/bin/env python3
"""Orchestration overhead of cairn: linear chains and fan-out/fan-in DAGs of N trivial
`command` steps, against the no-orchestrator floor (one `bash -c` per stage), plus
`source` hashing of a large tree against b3sum and the stat-cache second pass.

Prints markdown tables. Usage: scripts/bench-overhead [--sizes 100,1000,10000] [--source-gb 1]
    [--snakemake [PATH]]   side by side with Snakemake (without PATH: the pinned version that
                           scripts/bench-overhead installs into scripts/.bench-venv from PyPI)
"""
import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNAKE_CAIRN = None
# Work folders are removed only when the whole benchmark is done: on ext4 without a
# journal (this project's machines), allocating inodes right after deleting thousands
# of files is several times slower, which would skew whichever measurement came next.
LEFTOVERS = []


def later_remove(path):
    LEFTOVERS.append(path)


def measure(cmd, cwd, env=None):
    """Wall seconds and peak RSS (MiB) of one command, RSS isolated in a wrapper process."""
    wrapper = (
        "import resource,subprocess,sys,time;"
        "t=time.perf_counter();r=subprocess.run(sys.argv[1:],stdout=subprocess.DEVNULL,stderr=subprocess.PIPE);"
        "d=time.perf_counter()-t;"
        "sys.stderr.write(r.stderr.decode()[-2000:]) if r.returncode else None;"
        "print(d, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss);sys.exit(r.returncode)"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], cwd=cwd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{out.stderr}")
    secs, rss_kb = out.stdout.split()
    return float(secs), int(rss_kb) / 1024.0


def chain_yaml(n):
    lines = ["name: chain", "params: {mid: 1}", "steps:"]
    for i in range(n):
        value = "${params.mid}" if i == n // 2 else str(i)
        lines.append(f"  s{i}:")
        lines.append("    uses: command")
        if i > 0:
            lines.append(f"    inputs: {{prev: s{i-1}.out}}")
            run = f"cat ${{inputs.prev}} > ${{outputs.out}}; echo {value} >> ${{outputs.out}}"
        else:
            run = f"echo {value} > ${{outputs.out}}"
        lines.append("    outputs: {out: file}")
        lines.append(f'    with: {{run: "{run}"}}')
    return "\n".join(lines) + "\n"


def fan_yaml(n):
    lines = ["name: fan", "params: {mid: 1}", "steps:",
             "  root:", "    uses: command", "    outputs: {out: file}", '    with: {run: "echo root > ${outputs.out}"}']
    for i in range(n):
        value = "${params.mid}" if i == n // 2 else str(i)
        lines += [f"  f{i}:", "    uses: command", "    inputs: {r: root.out}", "    outputs: {out: file}",
                  f'    with: {{run: "cat ${{inputs.r}} > ${{outputs.out}}; echo {value} >> ${{outputs.out}}"}}']
    lines += ["  join:", "    uses: command", "    inputs:"]
    lines += [f"      i{i}: f{i}.out" for i in range(n)]
    # xargs: 10,000 input paths exceed one command line.
    lines += ["    outputs: {out: file}", '    with: {run: "env | grep ^CAIRN_INPUT_ | cut -d= -f2 | sort | xargs cat > ${outputs.out}"}']
    return "\n".join(lines) + "\n"


def floor_script(n, shape, shell="bash"):
    """The same work with no orchestrator: one `bash -c` (or `sh -c`) per stage."""
    if shape == "chain":
        body = [f'{shell} -c "echo 0 > o0"']
        body += [f'{shell} -c "cat o{i-1} > o{i}; echo {i} >> o{i}"' for i in range(1, n)]
    else:
        body = [f'{shell} -c "echo root > r"']
        body += [f'{shell} -c "cat r > o{i}; echo {i} >> o{i}"' for i in range(n)]
        body += [f'{shell} -c "ls | grep ^o | xargs cat > joined"']
    return "set -e\n" + "\n".join(body) + "\n"


def snakefile(n):
    rules = ["rule all:", f'    input: "o{n-1}"', ""]
    rules += ["rule s0:", '    output: "o0"', '    shell: "echo 0 > {output}"', ""]
    for i in range(1, n):
        rules += [f"rule s{i}:", f'    input: "o{i-1}"', f'    output: "o{i}"',
                  f'    shell: "cat {{input}} > {{output}}; echo {i} >> {{output}}"', ""]
    return "\n".join(rules)


def bench_snakemake(snakemake, sizes, jobs):
    print(f"\n### Side by side: Snakemake {subprocess.run([snakemake, '--version'], capture_output=True, text=True).stdout.strip()} on the same chains (-c {jobs})\n")
    print("| N | Snakemake cold | Snakemake no-op | cairn no-op | no-op speed-up |")
    print("|---:|---:|---:|---:|---:|")
    cairn = SNAKE_CAIRN
    for n in sizes:
        work = tempfile.mkdtemp(prefix=f"snake-bench-{n}-")
        try:
            with open(os.path.join(work, "Snakefile"), "w") as f:
                f.write(snakefile(n))
            cmd = [snakemake, "-c", str(jobs), "--quiet", "all"]
            cold, _ = measure(cmd, cwd=work)
            noop, _ = median_of(3, lambda: measure(cmd, cwd=work))
            with open(os.path.join(work, "p.yaml"), "w") as f:
                f.write(chain_yaml(n))
            env = dict(os.environ, CAIRN_STORE=os.path.join(work, "store"))
            base = [cairn, "run", "p.yaml", "--quiet", "--jobs", str(jobs)]
            measure(base, cwd=work, env=env)
            cnoop, _ = median_of(3, lambda: measure(base, cwd=work, env=env))
            print(f"| {n} | {cold*1000:.0f} ms | {noop*1000:.0f} ms | {cnoop*1000:.1f} ms | {noop/cnoop:.0f}x |")
            sys.stdout.flush()
        finally:
            later_remove(work)


def median_of(k, fn):
    runs = [fn() for _ in range(k)]
    return statistics.median(r[0] for r in runs), max(r[1] for r in runs)


def bench_dags(cairn, sizes, jobs):
    print(f"\n### Orchestration overhead (trivial `command` steps, --jobs {jobs}, medians of 3 for reruns)\n")
    print("| DAG | N | floor: bash -c per stage | floor: sh -c per stage | cairn cold run | cold / bash floor | cold / sh floor | overhead per step vs sh floor | no-op rerun | no-op per step | plan | rerun after mid param change | no-op peak RSS | peak RSS (any run) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for shape in ("chain", "fan"):
        for n in sizes:
            work = tempfile.mkdtemp(prefix=f"cairn-bench-{shape}{n}-")
            try:
                with open(os.path.join(work, "p.yaml"), "w") as f:
                    f.write(chain_yaml(n) if shape == "chain" else fan_yaml(n))
                floors = {}
                for shell in ("bash", "sh"):
                    with open(os.path.join(work, f"floor-{shell}.sh"), "w") as f:
                        f.write(floor_script(n, shape, shell))
                    os.makedirs(os.path.join(work, f"floor-{shell}"))
                    floors[shell], _ = measure(["bash", f"../floor-{shell}.sh"], cwd=os.path.join(work, f"floor-{shell}"))
                env = dict(os.environ, CAIRN_STORE=os.path.join(work, "store"))
                base = [cairn, "run", "p.yaml", "--quiet", "--jobs", str(jobs)]
                cold, rss1 = measure(base, cwd=work, env=env)
                noop, rss2 = median_of(3, lambda: measure(base, cwd=work, env=env))
                plan, rss4 = median_of(3, lambda: measure([cairn, "plan", "p.yaml"], cwd=work, env=env))
                toggle = iter(range(2, 100))
                change, rss3 = median_of(3, lambda: measure(base + ["--set", f"mid={next(toggle)}"], cwd=work, env=env))
                steps = n + (2 if shape == "fan" else 0)
                per_step_ms = (cold - floors["sh"]) / steps * 1000
                print(f"| {shape} | {n} | {floors['bash']*1000:.0f} ms | {floors['sh']*1000:.0f} ms | {cold*1000:.0f} ms "
                      f"| {cold/floors['bash']:.2f}x | {cold/floors['sh']:.2f}x | {per_step_ms:.2f} ms "
                      f"| {noop*1000:.1f} ms | {noop/steps*1e6:.0f} us | {plan*1000:.1f} ms | {change*1000:.0f} ms "
                      f"| {rss2:.0f} MiB | {max(rss1, rss2, rss3, rss4):.0f} MiB |")
                sys.stdout.flush()
            finally:
                later_remove(work)


def bench_source(cairn, gib):
    print(f"\n### `source` hashing of a {gib:g} GiB tree (64 MiB files)\n")
    work = tempfile.mkdtemp(prefix="cairn-bench-source-")
    try:
        tree = os.path.join(work, "tree")
        os.makedirs(tree)
        n_files = max(1, int(gib * 16))
        chunk = os.urandom(1 << 20)
        for i in range(n_files):
            sub = os.path.join(tree, f"d{i % 4}")
            os.makedirs(sub, exist_ok=True)
            with open(os.path.join(sub, f"f{i}.bin"), "wb") as f:
                for j in range(64):
                    f.write(chunk[j:] + chunk[:j])
        total_mb = n_files * 64 * 1.048576
        rows = []
        files = sorted(os.path.join(dp, fn) for dp, _, fns in os.walk(tree) for fn in fns)
        if shutil.which("b3sum"):
            t, _ = measure(["b3sum", *files], cwd=work)
            rows.append(("b3sum (all cores, mmap)", t, total_mb / t))
        t, _ = measure([cairn, "hash", tree], cwd=work)
        rows.append(("cairn hash (tree digest)", t, total_mb / t))
        with open(os.path.join(work, "s.yaml"), "w") as f:
            f.write("name: src\nsteps:\n  s: {uses: source, with: {path: tree}}\n")
        env = dict(os.environ, CAIRN_STORE=os.path.join(work, "store"))
        t, rss = measure([cairn, "run", "s.yaml", "--quiet"], cwd=work, env=env)
        rows.append(("cairn run: first pass (hash + copy into store)", t, total_mb / t))
        second, rss2 = median_of(3, lambda: measure([cairn, "run", "s.yaml", "--quiet"], cwd=work, env=env))
        print("| what | time | throughput |")
        print("|---|---:|---:|")
        for name, t, mbs in rows:
            print(f"| {name} | {t*1000:.0f} ms | {mbs:.0f} MB/s |")
        print(f"| cairn run: second pass, tree unchanged (stat cache) | {second*1000:.1f} ms | - |")
        print(f"\npeak RSS: first pass {rss:.0f} MiB, second pass {rss2:.0f} MiB")
    finally:
        later_remove(work)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    ap.add_argument("--cairn", default=os.path.join(target, "release/cairn"))
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--source-gb", type=float, default=1.0, help="size of the source tree (0 skips)")
    ap.add_argument("--snakemake", metavar="PATH", nargs="?", const=os.path.join(ROOT, "scripts/snakemake-deep"),
                    help="also run the chains with Snakemake, side by side (default: the pinned one in scripts/.bench-venv)")
    ap.add_argument("--snakemake-sizes", default="100,1000")
    args = ap.parse_args()
    if not os.path.exists(args.cairn):
        sys.exit(f"{args.cairn} not found: run `cargo build --release` first")
    print(f"cairn: {args.cairn}; cores: {os.cpu_count()}")
    try:
        bench_dags(os.path.abspath(args.cairn), [int(s) for s in args.sizes.split(",")], args.jobs)
        if args.snakemake:
            global SNAKE_CAIRN
            SNAKE_CAIRN = os.path.abspath(args.cairn)
            bench_snakemake(os.path.abspath(args.snakemake), [int(s) for s in args.snakemake_sizes.split(",")], args.jobs)
        if args.source_gb > 0:
            bench_source(os.path.abspath(args.cairn), args.source_gb)
    finally:
        for path in LEFTOVERS:
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
