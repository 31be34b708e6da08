"""Python side of scripts/bench-model-memory.

    bench_model_memory.py make DIR --hidden H --layers L --intermediate I --heads N --kv K --vocab V
        a random Llama-3-shaped model (llama3 rope scaling, tied embeddings) saved in f32
    bench_model_memory.py forward DIR IDS DTYPE
        transformers: load DIR with torch_dtype=DTYPE, one forward pass on IDS; prints JSON
"""
import json
import resource
import sys
import time

import torch


def make(out, a):
    import transformers as tf
    sys.path.insert(0, "tests/parity")
    from decoder import byte_tokenizer

    cfg = tf.LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                         num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv,
                         max_position_embeddings=131072, tie_word_embeddings=True, bos_token_id=256, eos_token_id=256,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192})
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.tie_weights()  # to_empty untied the head from the embeddings
    model.save_pretrained(out, safe_serialization=True)
    byte_tokenizer(f"{out}/tokenizer.json")
    print(json.dumps({"params": sum(p.numel() for p in model.parameters())}))


def forward(model_dir, ids, dtype):
    import transformers as tf
    from safetensors.torch import load_file

    ids = load_file(ids)["input_ids"]
    start = time.perf_counter()
    if dtype == "nf4":
        # bitsandbytes' QLoRA setting: NF4, double quantization, bf16 compute.
        q = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
        model = tf.AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q, dtype=torch.bfloat16,
                                                        device_map="cpu").eval()
    else:
        model = tf.AutoModelForCausalLM.from_pretrained(
            model_dir, torch_dtype={"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[dtype]).eval()
    with torch.no_grad():
        model(input_ids=ids)
    print(json.dumps({"seconds": time.perf_counter() - start,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "make":
        import argparse
        p = argparse.ArgumentParser()
        p.add_argument("out")
        for k in ["hidden", "layers", "intermediate", "heads", "kv", "vocab"]:
            p.add_argument(f"--{k}", type=int, required=True)
        a = p.parse_args(sys.argv[2:])
        make(a.out, a)
    elif cmd == "forward":
        forward(*sys.argv[2:5])
    else:
        sys.exit(f"unknown command {cmd}")
