"""Python side of scripts/bench-serve: starts `cairn serve` on random models and measures
it over HTTP next to transformers' `generate` (with its KV cache) on the same weights,
prompts, greedy settings and thread count. Prints a markdown table.

    bench_serve.py CAIRN WORKDIR --threads T --max-new N [--big] [--rag --mock-llm BIN]

--rag measures retrieval's overhead instead of generation: three collections built from
the Python docs (tutorial, howto, faq) with all-MiniLM-L6-v2, self-query rules, query
expansion answered from the cache, search of the three collections, reciprocal rank
fusion and a MiniLM-sized cross-encoder reranking 20 candidates to 3; the time of each
stage as the server reports it (generation excluded).
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time

import httpx2 as httpx  # the HTTP client `openai` itself depends on

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
    """`cairn serve ARGS` on a free port (CPU, `threads` threads), until `close`."""

    def __init__(self, cairn, args, threads, cwd=None, env=None):
        self.proc = subprocess.Popen(
            [cairn, "serve", *args, "--port", "0", "--device", "cpu", "--threads", str(threads)],
            stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)
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


DOCS = "/usr/share/doc/python3.11/html"
MINILM = os.path.abspath(f"{HERE}/../.models/all-MiniLM-L6-v2")


def mock_llm(binary):
    """The tests' OpenAI-compatible mock (`cargo run --example mock_llm`), which answers
    expansion prompts with rewrites; returns its base URL."""
    proc = subprocess.Popen([binary, "--port", "0"], stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "base_url" in line:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, line.split("base_url", 1)[1].strip()
    raise SystemExit("the mock LLM did not start")


def rag_bench(cairn, work, threads, mock_binary):
    py = sys.executable
    proj = f"{work}/rag"
    os.makedirs(proj, exist_ok=True)
    parts = [("a", "tutorial", "article"), ("b", "howto", "post"), ("c", "faq", "note")]
    steps = []
    for key, folder, category in parts:
        steps.append(f"""  {key}_src: {{uses: source, with: {{path: {DOCS}/{folder}}}}}
  {key}_docs: {{uses: ingest, inputs: {{files: {key}_src.data}}, with: {{category: {category}}}}}
  {key}_chunk: {{uses: chunk, inputs: {{documents: {key}_docs.documents}}, with: {{model: "{MINILM}", size: 64}}}}
  {key}_embed: {{uses: embed, inputs: {{chunks: {key}_chunk.chunks}}, with: {{model: "{MINILM}"}}}}
  {key}_vec: {{uses: vector_load, inputs: {{embeddings: {key}_embed.embeddings}}}}""")
    open(f"{proj}/docs.yaml", "w").write("name: ragbench\nsteps:\n" + "\n".join(steps) + "\n")
    env = dict(os.environ, CAIRN_STORE=f"{proj}/artifacts")
    subprocess.run([cairn, "run", "docs.yaml", "--quiet"], cwd=proj, env=env, check=True)
    subprocess.run([py, f"{HERE}/../tests/parity/openai_client.py", "make", f"{work}/twin"], check=True,
                   capture_output=True)
    # A random cross-encoder of MiniLM-L6's shape (cross-encoder/ms-marco-MiniLM-L6-v2).
    import shutil

    import torch
    import transformers as tf

    torch.manual_seed(0)
    ce = tf.BertForSequenceClassification(tf.BertConfig(
        vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
        intermediate_size=1536, max_position_embeddings=512, num_labels=1))
    ce.save_pretrained(f"{work}/reranker", safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(f"{MINILM}/{f}", f"{work}/reranker/{f}")
    mock, llm = mock_llm(mock_binary)
    questions = ["How do I define a function with default arguments?", "What is a list comprehension?",
                 "How do I read a file line by line?", "Why are floating point results inexact?",
                 "How do I sort a list of dictionaries by a key?", "What does the with statement do?",
                 "How do I handle exceptions?", "What are generators?", "How do I use logging?",
                 "How do I parse command line arguments?", "What is a virtual environment?",
                 "How do I write a class with properties?", "How do regular expressions work?",
                 "What is the difference between a tuple and a list?", "How do I format strings?",
                 "How do decorators work?", "How do I make an HTTP request?", "What are descriptors?",
                 "How do I sort in place?", "How do I unpack argument lists?"]
    results = {}
    try:
        run_rag(results, questions, cairn, work, proj, env, llm, threads)
    finally:
        mock.terminate()
    rag_table(results, questions, work, threads)


def _has_vnni():
    try:
        return "avx512_vnni" in open("/proc/cpuinfo").read()
    except OSError:
        return False


# cairn refuses int8 on CPUs without AVX512-VNNI (libtorch's int8 product is a scalar loop there).
PRECISIONS = ("f32", "bf16", "int8") if _has_vnni() else ("f32", "bf16")


def run_rag(results, questions, cairn, work, proj, env, llm, threads):
    for precision in PRECISIONS:
        open(f"{proj}/rag_{precision}.yaml", "w").write(f"""collections:
  - {{name: embedded_articles, k: 10}}
  - {{name: embedded_posts, k: 10}}
  - {{name: embedded_notes, k: 10}}
top_k: 3
self_query:
  rules: [{{field: category, pattern: '(?i)in the (article|post|note)s'}}]
expansion: {{n: 2, llm: {{base_url: "{llm}", model: stub}}}}
rerank: {{model: "{work}/reranker", candidates: 20, precision: {precision}}}
""")
        server = Server(cairn, ["--model", f"twin={work}/twin/base", "--rag", f"rag_{precision}.yaml"],
                        threads, cwd=proj, env=env)
        url = server.url
        stages = {}
        try:
            for q in questions:
                body = {"model": "twin", "messages": [{"role": "user", "content": q}], "max_tokens": 1,
                        "temperature": 0}
                httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).raise_for_status()  # fills the cache
                r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
                for k, v in r["cairn"]["retrieval_ms"].items():
                    stages.setdefault(k, []).append(v)
                if precision == "bf16":
                    results.setdefault("texts", []).append(r["cairn"]["sources"][0]["text"])
                results.setdefault(f"kept_{precision}", []).append([s["id"] for s in r["cairn"]["sources"]])
        finally:
            server.close()
        results[precision] = stages


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(p * len(v)))]


def rag_table(results, questions, work, threads):
    import torch

    # The tool a user would otherwise pick for the rerank stage: sentence-transformers'
    # CrossEncoder on 20 pairs of the same chunks (f32, bf16, int8), same thread count.
    torch.set_num_threads(threads)
    from sentence_transformers import CrossEncoder

    pairs = [(questions[0], t) for t in (results["texts"] * 2)[:20]]
    st_ms = {}
    for precision in PRECISIONS:
        st = CrossEncoder(f"{work}/reranker", device="cpu")
        if precision == "bf16":
            st.model.to(torch.bfloat16)
        elif precision == "int8":
            # PyTorch's own dynamic int8 (fbgemm): what a user of sentence-transformers
            # would reach for on a CPU.
            torch.ao.quantization.quantize_dynamic(st.model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
        st.predict(pairs)
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            st.predict(pairs, batch_size=32)
            times.append((time.perf_counter() - t0) * 1e3)
        st_ms[precision] = pct(times, 0.5)
    print()
    print(f"RAG overhead per chat, {len(questions)} questions asked twice (the second measured: expansion cached); "
          f"3 collections of Python docs (all-MiniLM-L6-v2, embedded Qdrant Edge), k 10 each, 3 phrasings, "
          f"RRF, rerank 20 -> 3 by a MiniLM-L6-sized cross-encoder (f32, bf16 or int8); CPU, {threads} threads")
    print()
    print("| stage | " + " | ".join(f"p50 ms (rerank {p}) | p90 ms" for p in PRECISIONS) + " |")
    print("|---|" + "---:|---:|" * len(PRECISIONS))
    for k in ["self_query", "expansion", "embed", "search", "fusion", "rerank", "total"]:
        cells = " | ".join(f"{pct(results[p][k], 0.5):.1f} | {pct(results[p][k], 0.9):.1f}" for p in PRECISIONS)
        print(f"| {k} | {cells} |")
    cells = " | ".join(f"{st_ms[p]:.1f} | " for p in PRECISIONS)
    print(f"| sentence-transformers CrossEncoder.predict, 20 pairs (int8: quantize_dynamic) | {cells}|")
    same = {p: sum(a == b for a, b in zip(results[f"kept_{p}"], results["kept_f32"])) for p in PRECISIONS}
    alike = {p: sum(set(a) == set(b) for a, b in zip(results[f"kept_{p}"], results["kept_f32"])) for p in PRECISIONS}
    print("| questions whose kept top 3 equal f32's: in order / as a set | " + " | ".join(f"{same[p]}/{len(questions)} / {alike[p]}/{len(questions)} | " for p in PRECISIONS) + "|")
    print("\ntarget: total p50 < 50 ms")


def main():
    a = argparse.ArgumentParser()
    a.add_argument("cairn")
    a.add_argument("work")
    a.add_argument("--threads", type=int, default=2)
    a.add_argument("--max-new", type=int, default=64)
    a.add_argument("--big", action="store_true")
    a.add_argument("--rag", action="store_true")
    a.add_argument("--mock-llm", help="the mock_llm example binary (for --rag)")
    a = a.parse_args()
    if a.rag:
        return rag_bench(a.cairn, a.work, a.threads, a.mock_llm)
    models = make_models(a.work, a.big)
    rows = []
    for name, path in models.items():
        prompts = PROMPTS[:3]
        hf = transformers_tps(path, a.threads, a.max_new, prompts)
        server = Server(a.cairn, ["--model", f"m={path}", "--max-batch", "32", "--max-queue", "256"],
                        a.threads)
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
