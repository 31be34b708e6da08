"""Reference embeddings for cairn's parity test: sentence-transformers on CPU.

usage: embed_reference.py MODEL_DIR SENTENCES_TXT OUT_F32 [THREADS]
Writes len(sentences) x dim little-endian float32 values, row-major.
"""
import sys

import torch
from sentence_transformers import SentenceTransformer


def main() -> None:
    model_dir, sentences_path, out_path = sys.argv[1:4]
    if len(sys.argv) > 4:
        torch.set_num_threads(int(sys.argv[4]))
    with open(sentences_path, encoding="utf-8") as f:
        sentences = [line.rstrip("\n") for line in f if line.rstrip("\n")]
    model = SentenceTransformer(model_dir, device="cpu")
    vectors = model.encode(sentences, batch_size=32, convert_to_numpy=True)
    vectors.astype("<f4").tofile(out_path)
    print(f"{len(sentences)} x {vectors.shape[1]}", file=sys.stderr)


if __name__ == "__main__":
    main()
