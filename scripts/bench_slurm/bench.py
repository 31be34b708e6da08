"""cairn's Slurm executor against sbatch by hand, on the same cluster, in one run."""

import os
import statistics
import subprocess
import sys
import tempfile
import time

cairn = sys.argv[1]
n = int(os.environ.get("JOBS", "100"))
repeats = int(os.environ.get("REPEATS", "3"))


def settle():
    # A job submitted while the node still cleans up after the previous one waits for the
    # next scheduling pass (~2-3 s here); every single-job trial starts on an idle node.
    time.sleep(3)


def timed(cmd, **kw):
    settle()
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    return time.perf_counter() - start


def wait_all(ids):
    while True:
        out = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i"], capture_output=True, text=True).stdout
        if not out.strip():
            return
        time.sleep(0.1)


with tempfile.TemporaryDirectory() as tmp:
    script = os.path.join(tmp, "job.sh")
    with open(script, "w") as f:
        f.write("#!/bin/sh\necho 1 > \"$1\"\n")
    os.chmod(script, 0o755)
    by_hand = [timed(["sbatch", "--wait", "-o", os.path.join(tmp, "hand-%j.log"), script, os.path.join(tmp, f"out{i}")])
               for i in range(repeats)]

    # `sbatch --wait` checks every 2 s; a script polling squeue every 0.1 s is the
    # quickest a by-hand submission notices the end, so it is shown too.
    def submit_and_poll(i):
        out = subprocess.run(["sbatch", "--parsable", "-o", os.path.join(tmp, "poll-%j.log"), script,
                              os.path.join(tmp, f"poll{i}")], check=True, capture_output=True, text=True).stdout
        wait_all([out.strip().split(";")[0]])

    by_poll = []
    for i in range(repeats):
        settle()
        start = time.perf_counter()
        submit_and_poll(i)
        by_poll.append(time.perf_counter() - start)
    one = os.path.join(tmp, "one")
    os.makedirs(one)
    with open(os.path.join(one, "p.yaml"), "w") as f:
        f.write("name: one\nexecutor: {kind: slurm}\nparams: {i: 0}\nsteps:\n  s:\n    uses: command\n"
                "    with: {run: \"echo ${params.i} > ${outputs.o}\"}\n    outputs: [o]\n")
    env = dict(os.environ, CAIRN_STORE=os.path.join(one, "store"))
    ours = [timed([cairn, "run", "p.yaml", "--quiet", "--set", f"i={i}"], cwd=one, env=env) for i in range(repeats)]

    many = os.path.join(tmp, "many")
    os.makedirs(many)
    items = ", ".join(str(i) for i in range(n))
    with open(os.path.join(many, "p.yaml"), "w") as f:
        f.write(f"name: many\nexecutor: {{kind: slurm}}\nsteps:\n  s:\n    uses: command\n    foreach: [{items}]\n"
                "    with: {run: \"echo ${item} > ${outputs.o}\"}\n    outputs: [o]\n")
    env = dict(os.environ, CAIRN_STORE=os.path.join(many, "store"))
    ours_many = timed([cairn, "run", "p.yaml", "--quiet", "--jobs", str(n)], cwd=many, env=env)
    settle()
    start = time.perf_counter()
    ids = []
    for i in range(n):
        out = subprocess.run(["sbatch", "--parsable", "-o", os.path.join(tmp, "m-%j.log"), script, os.path.join(tmp, f"m{i}")],
                             check=True, capture_output=True, text=True).stdout
        ids.append(out.strip().split(";")[0])
    wait_all(ids)
    hand_many = time.perf_counter() - start

cpus = os.cpu_count()
print(f"## Slurm executor (single-node cluster, {cpus} CPUs; medians of {repeats})\n")
print("| measure | cairn | by hand | ratio | target |")
print("|---|---|---|---|---|")
a, b = statistics.median(ours), statistics.median(by_hand)
print(f"| a trivial step: `cairn run` (plan, submit, poll, record) vs `sbatch --wait` | {a:.2f} s | {b:.2f} s | {a / b:.2f}x | <= 1.2x |")
c = statistics.median(by_poll)
print(f"| the same trivial step vs `sbatch --parsable` + `squeue` every 0.1 s | {a:.2f} s | {c:.2f} s | {a / c:.2f}x | (reported) |")
print(f"| {n} independent trivial steps (`--jobs {n}`) vs {n} `sbatch --parsable` + squeue until done | {ours_many:.1f} s | {hand_many:.1f} s | {ours_many / hand_many:.2f}x | <= 1.5x |")
