"""PyTorch side of scripts/bench-finetune: the same GPT-2 config, batch shape, optimizer
and loss as cairn's training loop, in eager PyTorch (and, with --trainer, through Hugging
Face Trainer), timed over the same number of steps. Prints one JSON line."""
import argparse
import json
import time

import torch
import transformers as tf

p = argparse.ArgumentParser()
p.add_argument("--layers", type=int, default=6)
p.add_argument("--hidden", type=int, default=384)
p.add_argument("--heads", type=int, default=6)
p.add_argument("--vocab", type=int, default=259)
p.add_argument("--seq", type=int, default=256)
p.add_argument("--batch", type=int, default=8)
p.add_argument("--steps", type=int, default=30)
p.add_argument("--warmup", type=int, default=5)
p.add_argument("--threads", type=int, default=0)
p.add_argument("--device", default="cpu")
p.add_argument("--bf16", action="store_true")
p.add_argument("--lora", action="store_true")
p.add_argument("--trainer", action="store_true")
a = p.parse_args()
if a.threads:
    torch.set_num_threads(a.threads)
torch.manual_seed(0)
cfg = tf.GPT2Config(vocab_size=a.vocab, n_positions=max(1024, a.seq), n_embd=a.hidden,
                    n_layer=a.layers, n_head=a.heads, resid_pdrop=0.0, embd_pdrop=0.0,
                    attn_pdrop=0.0, bos_token_id=a.vocab - 3, eos_token_id=a.vocab - 3)
model = tf.GPT2LMHeadModel(cfg).to(a.device)
if a.lora:
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                             target_modules=["c_attn"], fan_in_fan_out=True))
ids = torch.randint(0, a.vocab, (a.batch, a.seq), device=a.device)
tokens = a.batch * a.seq

if a.trainer:
    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return a.batch * (a.steps + a.warmup)

        def __getitem__(self, i):
            x = ids[i % a.batch].cpu()
            return {"input_ids": x, "labels": x}

    times = []

    class Timer(tf.TrainerCallback):
        def on_step_begin(self, *args, **kw):
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *args, **kw):
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    args = tf.TrainingArguments(output_dir="/tmp/bench-trainer", per_device_train_batch_size=a.batch,
                                max_steps=a.steps + a.warmup, learning_rate=1e-4, bf16=a.bf16,
                                logging_steps=10**9, save_strategy="no", report_to=[],
                                dataloader_num_workers=0, use_cpu=a.device == "cpu")
    tf.Trainer(model=model, args=args, train_dataset=Data(), callbacks=[Timer()]).train()
    seconds = sum(times[a.warmup:])
else:
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    seconds = 0.0
    for step in range(a.steps + a.warmup):
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device_type=a.device.split(":")[0], dtype=torch.bfloat16, enabled=a.bf16):
            logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1), reduction="sum") / (tokens - a.batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        if step >= a.warmup:
            seconds += time.perf_counter() - t0
print(json.dumps({"tokens_per_second": tokens * a.steps / seconds, "threads": torch.get_num_threads(),
                  "params": sum(q.numel() for q in model.parameters())}))
