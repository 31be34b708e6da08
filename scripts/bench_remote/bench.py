"""cairn push vs boto3 against moto's S3 server on 127.0.0.1, and a remote-cache hit.

1. 10,000 files of 4 KB (one folder artifact: cairn pushes its files as objects and a
   manifest) against boto3's upload_file over the same files with its default transfer
   concurrency (10 threads, as `aws s3 sync`).
2. One large file (BIG_MB, default 2048 MB) against boto3's multipart upload_file.
3. The demo pipeline (pipelines/demo.yaml) run on store A with the remote, then on an
   empty store B: every step should be `cached (remote)`; wall times reported.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import boto3
from boto3.s3.transfer import TransferConfig

cairn = sys.argv[1]
small = int(os.environ.get("SMALL", "10000"))
big_mb = int(os.environ.get("BIG_MB", "2048"))
repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


port = free_port()
endpoint = f"http://127.0.0.1:{port}"
server = subprocess.Popen([os.path.join(repo, ".venv/bin/moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
for _ in range(100):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        break
    except OSError:
        time.sleep(0.1)
s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="x", aws_secret_access_key="y",
                  region_name="us-east-1")
s3.create_bucket(Bucket="bench")
env = dict(os.environ, AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y", AWS_REGION="us-east-1",
           AWS_ENDPOINT=endpoint, AWS_ALLOW_HTTP="true", CAIRN_NO_FSYNC="1")


def cairn_run(cwd, store, args):
    start = time.perf_counter()
    out = subprocess.run([cairn, *args], cwd=cwd, env=dict(env, CAIRN_STORE=store), capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"cairn {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - start, out.stdout


def boto3_upload(files, prefix, threads=10):
    config = TransferConfig(max_concurrency=threads, multipart_threshold=8 << 20, multipart_chunksize=8 << 20)
    start = time.perf_counter()
    if len(files) == 1:
        s3.upload_file(files[0][0], "bench", prefix + files[0][1], Config=config)
    else:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda f: s3.upload_file(f[0], "bench", prefix + f[1], Config=config), files))
    return time.perf_counter() - start


rows = []
try:
    with tempfile.TemporaryDirectory() as tmp:
        # 1. Many small objects.
        d = os.path.join(tmp, "small")
        os.makedirs(d)
        with open(os.path.join(d, "p.yaml"), "w") as f:
            f.write("name: small\nsteps:\n  files:\n    uses: command\n    outputs: {dir: dir}\n"
                    f"    with: {{run: \"mkdir -p ${{outputs.dir}} && cd ${{outputs.dir}} && python3 -c 'import os\\nfor i in range({small}): open(str(i), \\\"wb\\\").write(os.urandom(4096))'\"}}\n")
        store = os.path.join(d, "store")
        cairn_run(d, store, ["run", "p.yaml", "--quiet", "--no-push", "--remote", "s3://bench/cairn-small"])
        push_small, out = cairn_run(d, store, ["push", "--all", "--remote", "s3://bench/cairn-small", "--json"])
        pushed = json.loads(out)
        assert pushed["objects"] >= small, pushed
        objects_dir = [os.path.join(store, "objects")]
        tree = None
        for root, dirs, names in os.walk(objects_dir[0]):
            if len([n for n in names if n.isdigit()]) == small:
                tree = root
                break
        files = [(os.path.join(tree, n), n) for n in os.listdir(tree)]
        boto_small = boto3_upload(files, "boto-small/")
        rows.append((f"push {small} objects of 4 KB", push_small, boto_small, small * 4096))

        # 2. One large object.
        d = os.path.join(tmp, "big")
        os.makedirs(d)
        with open(os.path.join(d, "p.yaml"), "w") as f:
            f.write("name: big\nsteps:\n  blob:\n    uses: command\n    outputs: [out]\n"
                    f"    with: {{run: \"head -c {big_mb}M /dev/urandom > ${{outputs.out}}\"}}\n")
        store = os.path.join(d, "store")
        _, out = cairn_run(d, store, ["run", "p.yaml", "--quiet", "--no-push", "--json", "--remote", "s3://bench/cairn-big"])
        digest = json.loads(out)["steps"][0]["outputs"]["out"]
        push_big, _ = cairn_run(d, store, ["push", "--all", "--remote", "s3://bench/cairn-big", "--json"])
        path = None
        for root, dirs, names in os.walk(os.path.join(store, "objects")):
            for n in names:
                if digest.endswith(n) or n == digest[2:] or n == digest:
                    path = os.path.join(root, n)
        boto_big = boto3_upload([(path, "big")], "boto-big/")
        rows.append((f"push one {big_mb} MB object", push_big, boto_big, big_mb << 20))

        # 3. The demo pipeline: store A runs and pushes, empty store B hits the remote.
        a = os.path.join(tmp, "A")
        b = os.path.join(tmp, "B")
        cold, _ = cairn_run(repo, a, ["run", "pipelines/demo.yaml", "--quiet", "--remote", "s3://bench/demo"])
        hit, out = cairn_run(repo, b, ["run", "pipelines/demo.yaml", "--quiet", "--json", "--remote", "s3://bench/demo"])
        report = json.loads(out)
        statuses = [s["status"] for s in report["steps"]]
        remote_hits = sum(1 for s in report["steps"] if s["reason"].startswith("cached (remote)"))
        demo = (cold, hit, len(statuses), remote_hits, statuses.count("cached"), report["remote"])
finally:
    server.kill()

print("## Remote cache against moto's S3 server on 127.0.0.1\n")
print("| measure | cairn | boto3 | cairn throughput / boto3 | target |")
print("|---|---|---|---|---|")
for name, ours, theirs, nbytes in rows:
    print(f"| {name} | {ours:.2f} s ({nbytes / ours / 1e6:.1f} MB/s) | {theirs:.2f} s ({nbytes / theirs / 1e6:.1f} MB/s) | {theirs / ours:.2f}x | >= 0.8x |")
cold, hit, steps, remote_hits, cached, remote = demo
print(f"\n| demo pipeline | wall time |\n|---|---|")
print(f"| store A, cold, with push | {cold:.1f} s |")
print(f"| empty store B, remote hits | {hit:.1f} s ({remote_hits} of {steps} steps cached (remote), {cached} cached; fetched {remote['fetched']['objects']} objects, {remote['fetched']['bytes'] / 1e6:.1f} MB) |")
