"""Python side of scripts/bench-lora.

    bench_lora.py make DIR --hidden H --layers L --intermediate I --heads N --kv K --vocab V
        a random Llama-shaped model saved by transformers (f32) with cairn's byte tokenizer
    bench_lora.py train DIR DTYPE --batch B --seq S --steps N --warmup W --threads T [--device cuda]
        transformers + PEFT: the model loaded with torch_dtype=DTYPE (f32, bf16, or nf4:
        bitsandbytes 4-bit with double quantization and bf16 compute), LoRA r16 / alpha 32 /
        dropout 0.05 on q_proj and v_proj, AdamW on the adapters, N timed steps after W;
        prints tokens/s as JSON
"""
import argparse
import json
import sys
import time

import torch


def make(a):
    import transformers as tf
    sys.path.insert(0, "tests/parity")
    from decoder import byte_tokenizer

    cfg = tf.LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                         num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv,
                         max_position_embeddings=2048, tie_word_embeddings=False,
                         bos_token_id=256, eos_token_id=256)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg)
    model.save_pretrained(a.dir, safe_serialization=True)
    byte_tokenizer(f"{a.dir}/tokenizer.json")
    print(json.dumps({"params": sum(p.numel() for p in model.parameters())}))


def train(a):
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.dtype == "nf4":
        # QLoRA as people run it: bitsandbytes NF4 with double quantization, bf16 compute.
        quant = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
        model = tf.AutoModelForCausalLM.from_pretrained(a.dir, dtype=torch.bfloat16,
                                                        quantization_config=quant, device_map=a.device)
    else:
        dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
        model = tf.AutoModelForCausalLM.from_pretrained(a.dir, dtype=dtype).to(a.device)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                             target_modules=["q_proj", "v_proj"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 256, (a.batch, a.seq), device=a.device)
    cuda = a.device.startswith("cuda")
    seconds = 0.0
    for step in range(a.steps + a.warmup):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= a.warmup:
            seconds += time.perf_counter() - t0
    print(json.dumps({"tokens_per_second": a.batch * a.seq * a.steps / seconds,
                      "threads": torch.get_num_threads(),
                      "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("cmd", choices=["make", "train"])
    p.add_argument("dir")
    p.add_argument("dtype", nargs="?", default="f32")
    p.add_argument("--device", default="cpu")
    for k in ["hidden", "layers", "intermediate", "heads", "kv", "vocab", "batch", "seq", "steps", "warmup", "threads"]:
        p.add_argument(f"--{k}", type=int, default=0)
    a = p.parse_args()
    make(a) if a.cmd == "make" else train(a)
