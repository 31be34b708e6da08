"""Python side of scripts/bench-dpo (and of scripts/gpu-check): TRL's DPOTrainer with
PEFT LoRA (r16, alpha 32, dropout 0.05 on q_proj/v_proj; the reference is the base with
the adapter disabled) on the preference records of DATA, batch B, N timed steps after
W: f32 on the CPU, or bf16 base weights with bf16 autocast on CUDA (`--device cuda`).
Prints tokens/s (the unpadded chosen + rejected tokens of each step over its wall time)
as JSON.

    bench_dpo.py MODEL_DIR DATA --batch B --steps N --warmup W --threads T [--device cuda]
"""
import argparse
import json
import time

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("data")
    for k in ["batch", "steps", "warmup", "threads"]:
        p.add_argument(f"--{k}", type=int, default=0)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    records = [json.loads(line) for line in open(a.data) if line.strip()]
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in records])
    tok = PreTrainedTokenizerFast(tokenizer_file=f"{a.model}/tokenizer.json", eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    cuda = a.device.startswith("cuda")
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16 if cuda else torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                             target_modules=["q_proj", "v_proj"]))

    class Clock(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)

    clock = Clock()
    args = DPOConfig(output_dir="/tmp/bench-dpo-trl", per_device_train_batch_size=a.batch,
                     max_steps=a.steps + a.warmup, learning_rate=1e-5, lr_scheduler_type="constant", beta=0.1,
                     logging_steps=1, report_to=[], save_strategy="no", use_cpu=not cuda, bf16=cuda, max_length=None,
                     dataloader_drop_last=True, optim="adamw_torch", disable_dropout=False)
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok, callbacks=[clock])
    trainer.train()
    tokens = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h and "loss" in h]
    per_step = [b - a_ for a_, b in zip([0.0] + tokens[:-1], tokens)]
    timed = slice(a.warmup, a.warmup + a.steps)
    print(json.dumps({"tokens_per_second": sum(per_step[timed]) / sum(clock.times[timed]),
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
