"""The reference design's Python stack, for scripts/bench-features.

  reference.py chunk DOCS.jsonl MODEL_DIR        LangChain RecursiveCharacterTextSplitter
                                                 + SentenceTransformersTokenTextSplitter
  reference.py embed CHUNKS.jsonl MODEL_DIR N T  sentence-transformers, batch 32, T threads

Prints one JSON object.
"""
import json
import sys
import time


def load(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def chunk(docs_path, model_dir):
    from langchain_text_splitters import (
        RecursiveCharacterTextSplitter,
        SentenceTransformersTokenTextSplitter,
    )
    from transformers import AutoTokenizer

    docs = load(docs_path)
    texts = [d["content"] for d in docs]
    counter = AutoTokenizer.from_pretrained(model_dir)
    tokens = sum(len(counter(t, add_special_tokens=False)["input_ids"]) for t in texts)
    # As in the reference design: paragraphs up to 500 characters, then token windows of
    # the model's max input length with 25 tokens of overlap.
    chars = RecursiveCharacterTextSplitter(separators=["\n\n"], chunk_size=500, chunk_overlap=0)
    toks = SentenceTransformersTokenTextSplitter(
        chunk_overlap=25, tokens_per_chunk=250, model_name=model_dir
    )
    best = float("inf")
    n = 0
    for _ in range(2):
        t0 = time.perf_counter()
        out = []
        for t in texts:
            for section in chars.split_text(t):
                out.extend(toks.split_text(section))
        best = min(best, time.perf_counter() - t0)
        n = len(out)
    print(json.dumps({"documents": len(docs), "tokens": tokens, "chunks": n,
                      "seconds": best, "tokens_per_s": tokens / best}))


def embed(chunks_path, model_dir, n, threads):
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    texts = [c["text"] for c in load(chunks_path)][:n]
    model = SentenceTransformer(model_dir, device="cpu")
    model.encode(texts[:32], batch_size=32)
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        model.encode(texts, batch_size=32)
        best = min(best, time.perf_counter() - t0)
    print(json.dumps({"sentences": len(texts), "seconds": best,
                      "sentences_per_s": len(texts) / best, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    if sys.argv[1] == "chunk":
        chunk(sys.argv[2], sys.argv[3])
    else:
        embed(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
