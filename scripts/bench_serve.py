"""Python side of scripts/bench-serve: starts `cairn serve` on random models and measures
it over HTTP next to transformers' `generate` (with its KV cache) on the same weights,
prompts, greedy settings and thread count. Prints a markdown table.

    bench_serve.py CAIRN WORKDIR --threads T --max-new N [--big]
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS = [f"Note {i}: what did the twin do on the lake?" for i in range(32)]


def make_models(work, big):
    py = sys.executable
    models = {}
    subprocess.run([py, f"{HERE}/../tests/parity/decoder.py", "make", work, "gpt2"], check=True,
                   capture_output=True)
    models["tiny GPT-2 (64 hidden, 2 layers)"] = f"{work}/gpt2"
    small = f"{work}/small"
    subprocess.run([py, f"{HERE}/bench_lora.py", "make", small, "--hidden", "512", "--layers", "8",
                    "--intermediate", "1536", "--heads", "8", "--kv", "4", "--vocab", "8000"],
                   check=True, capture_output=True)
    models["Llama-shaped 512 hidden, 8 layers (30M)"] = small
    if big:
        path = f"{work}/1b"
        subprocess.run([py, f"{HERE}/bench_lora.py", "make", path, "--hidden", "2048", "--layers", "22",
                        "--intermediate", "5632", "--heads", "32", "--kv", "4", "--vocab", "32000"],
                       check=True, capture_output=True)
        models["random Llama 1.1B (TinyLlama shape)"] = path
    return models


def transformers_tps(model_dir, threads, max_new, prompts):
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = model.config.eos_token_id
    tokens, seconds = 0, 0.0
    for p in prompts:
        ids = torch.tensor([tok.encode(p, add_special_tokens=False).ids])
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, do_sample=False, max_new_tokens=max_new, eos_token_id=eos,
                                 pad_token_id=eos, use_cache=True)
        seconds += time.perf_counter() - t0
        row = out[0, ids.shape[1]:].tolist()
        tokens += row.index(eos) if eos in row else len(row)
    del model
    return tokens / seconds


class Server:
    def __init__(self, cairn, model_dir, threads, max_batch=32):
        self.proc = subprocess.Popen(
            [cairn, "serve", "--model", f"m={model_dir}", "--port", "0", "--device", "cpu",
             "--threads", str(threads), "--max-batch", str(max_batch), "--max-queue", "256"],
            stderr=subprocess.PIPE, text=True)
        for line in self.proc.stderr:
            if "http://" in line:
                self.url = "http://" + line.split("http://")[1].split("/")[0]
                break
        else:
            raise SystemExit("cairn serve did not start")
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()

    def close(self):
        self.proc.terminate()
        self.proc.wait()


def complete(url, prompt, max_new):
    """One streamed completion: (completion tokens, seconds, time to first token)."""
    t0 = time.perf_counter()
    first, tokens = None, 0
    body = {"model": "m", "prompt": prompt, "max_tokens": max_new, "temperature": 0,
            "repetition_penalty": 1.0, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None:
                first = time.perf_counter() - t0
    return tokens, time.perf_counter() - t0, first


def cairn_batch1_tps(url, max_new, prompts):
    complete(url, prompts[0], 4)  # warm-up
    tokens = seconds = 0
    for p in prompts:
        n, s, _ = complete(url, p, max_new)
        tokens += n
        seconds += s
    return tokens / seconds


def concurrent(url, max_new, streams):
    results = []
    lock = threading.Lock()

    def one(p):
        r = complete(url, p, max_new)
        with lock:
            results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(PROMPTS[i % len(PROMPTS)],)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = sorted(r[2] or r[1] for r in results)
    p99 = ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))]
    return sum(r[0] for r in results) / wall, p99


def main():
    a = argparse.ArgumentParser()
    a.add_argument("cairn")
    a.add_argument("work")
    a.add_argument("--threads", type=int, default=2)
    a.add_argument("--max-new", type=int, default=64)
    a.add_argument("--big", action="store_true")
    a = a.parse_args()
    models = make_models(a.work, a.big)
    rows = []
    for name, path in models.items():
        prompts = PROMPTS[:3]
        hf = transformers_tps(path, a.threads, a.max_new, prompts)
        server = Server(a.cairn, path, a.threads)
        try:
            ours = cairn_batch1_tps(server.url, a.max_new, prompts)
            rows.append(f"| generation tokens/s, batch 1, {name} | {ours:.1f} | {hf:.1f} (transformers generate) "
                        f"| {ours / hf:.2f}x | >= 1.0x |")
            if "1.1B" in name or "30M" in name:
                seq_tps = cairn_batch1_tps(server.url, a.max_new, PROMPTS[:4])
                for streams in (8, 32):
                    tps, p99 = concurrent(server.url, a.max_new, streams)
                    target = ">= 3x at 8" if streams == 8 else "reported"
                    rows.append(f"| {streams} concurrent streams, {name}: tokens/s (p99 TTFT) | {tps:.1f} "
                                f"({p99 * 1000:.0f} ms) | {seq_tps:.1f} (cairn, one at a time) | "
                                f"{tps / seq_tps:.2f}x | {target} |")
        finally:
            server.close()
    print()
    print(f"cairn serve vs transformers, greedy, up to {a.max_new} new tokens, f32, CPU, {a.threads} threads")
    print()
    print("| measure | cairn serve | baseline | ratio | target |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
