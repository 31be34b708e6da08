"""Python side of scripts/bench-sample: transformers' `generate` with the same sampling
as cairn's `sample` step (N replies per prompt as one batch: num_return_sequences=N,
temperature, top-k, top-p, max_new_tokens), f32 on the CPU. Prints generated tokens/s
(tokens up to each reply's end over the wall time of the `generate` calls) as JSON.

    bench_sample.py MODEL_DIR PROMPTS_JSON --n N --max-new M --threads T
"""
import argparse
import json
import time

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("prompts")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-new", type=int, default=64)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    tok = Tokenizer.from_file(f"{a.model}/tokenizer.json")
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    eos = model.config.eos_token_id
    prompts = json.load(open(a.prompts))
    torch.manual_seed(0)
    tokens, seconds = 0, 0.0
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([tok.encode(prompt, add_special_tokens=False).ids])
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, do_sample=True, num_return_sequences=a.n, max_new_tokens=a.max_new,
                                 temperature=0.8, top_k=50, top_p=0.95, eos_token_id=eos, pad_token_id=eos)
        seconds += time.perf_counter() - t0
        for row in out[:, ids.shape[1]:].tolist():
            tokens += row.index(eos) if eos in row else len(row)
    print(json.dumps({"tokens_per_second": tokens / seconds, "tokens": tokens, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
