"""Reference side of cairn's model parity tests (transformers + PEFT on CPU, fp32).

    decoder.py make ROOT ARCH...                 random tiny models (gpt2, llama, llama3, qwen2, qwen3, mistral,
                                                 phi3, phi3long, gemma, gemma2, gemma3, and the
                                                 encoder-decoders t5, flan_t5) +
                                                 a byte-level tokenizer, in ROOT/ARCH; llama2,
                                                 phi3_spm, gemma_spm, gemma2_spm, gemma3_spm: with a
                                                 SentencePiece-style tokenizer (byte fallback) as
                                                 those families ship, and what llama.cpp computes
                                                 alike (Gemma 2/3 scale by head_dim; no Phi-3
                                                 window within the tested length)
    decoder.py check-logits MODEL IDS OURS [peft] [bf16]
                                                 transformers' (or PEFT's) logits for the
                                                 `input_ids` in IDS (with `attention_mask` and
                                                 `decoder_input_ids` for T5) vs `logits` in OURS; with
                                                 bf16, also transformers' own bf16 run (the
                                                 model loaded with torch_dtype=bfloat16)
    decoder.py check-step MODEL BATCH OURS JSON  one torch AdamW step on cairn's dumped
                                                 batch vs cairn's updated weights in OURS
    decoder.py greedy MODEL PROMPT N             transformers' greedy continuation (N new tokens,
                                                 stopping at EOS) of PROMPT, decoded
    decoder.py dpo|orpo MODEL DATA SETTINGS OUT  TRL's DPOTrainer (ORPOTrainer) on DATA (one batch),
                                                 metrics per step; the trained weights (or adapter) to OUT
    decoder.py check-gguf MODEL GGUF...          read each GGUF with the `gguf` package (llama.cpp's
                                                 reader) and compare every tensor with MODEL's
    decoder.py llama-cpp MODEL GGUF...           llama.cpp itself (llama-cpp-python) runs each GGUF
                                                 on a fixed token sequence, its logits against
                                                 transformers' on MODEL; and tokenizes texts with
                                                 the first one's vocabulary, against the Hugging
                                                 Face tokenizer
    decoder.py render-chat MODEL CONVERSATIONS   transformers' apply_chat_template of each
                                                 conversation (a JSON list of message lists),
                                                 with and without the generation prompt
"""
import json
import sys

import torch
from safetensors.torch import load_file, save_file

torch.manual_seed(0)


def byte_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.save(path)


# What the SentencePiece-style test tokenizers learn their pieces from.
SPM_TEXT = ("the twin writes the way its author writes: short notes on the things that "
            "matter, then the long posts that explain them to others who want to learn "
            "the same things at their own pace, with the notes in the margin")


def spm_tokenizer(path, vocab_size, style):
    """A SentencePiece-style BPE tokenizer with byte fallback, laid out and converted the
    way transformers converts Llama 2 (`llama2`: Prepend normalizer, BOS added), Phi-3
    (`metaspace`: Metaspace pre-tokenizer, no BOS) and Gemma (`gemma`: no dummy prefix,
    BOS added) models: special tokens, the 256 byte pieces, the characters of SPM_TEXT,
    then pieces learned by merging the most frequent adjacent pair (never across a word
    start), the merges ordered as transformers' SentencePieceExtractor orders them."""
    from collections import Counter
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"] if style == "gemma" else ["<unk>", "<s>", "</s>"]
    bos, unk = ("<bos>", "<unk>") if style == "gemma" else ("<s>", "<unk>")
    space = "\u2581"
    seq = list(("" if style == "gemma" else space) + SPM_TEXT.replace(" ", space))
    pieces = sorted(set(seq))
    size = len(specials) + 256
    while size + len(pieces) < vocab_size:
        pairs = Counter((a, b) for a, b in zip(seq, seq[1:]) if space not in b)
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        pieces.append(a + b)
        merged, i = [], 0
        while i < len(seq):
            if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                merged.append(a + b)
                i += 2
            else:
                merged.append(seq[i])
                i += 1
        seq = merged
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + pieces
    tokens += [f"<unused{i}>" for i in range(vocab_size - len(tokens))]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece in pieces:
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece))
                  if piece[:i] in vocab and piece[i:] in vocab]
        merges += sorted(splits, key=lambda s: (vocab[s[0]], vocab[s[1]]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True,
                               fuse_unk=True))
    to_space = decoders.Replace(space, " ")
    if style == "llama2":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(space), normalizers.Replace(" ", space)])
        tok.decoder = decoders.Sequence([to_space, decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    elif style == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=space, prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([to_space, decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    else:
        tok.normalizer = normalizers.Replace(" ", space)
        tok.decoder = decoders.Sequence([to_space, decoders.ByteFallback(), decoders.Fuse()])
    if style != "metaspace":
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    tok.add_special_tokens(specials + [t for t in tokens if t.startswith("<unused")])
    tok.save(path)


def t5_tokenizer(path):
    """T5's special tokens first (pad 0, EOS 1, unk 2), then the 256 bytes."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel

    specials = ["<pad>", "</s>", "<unk>"]
    alphabet = sorted(ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tok.save(path)


def make_t5(out, arch):
    """T5 v1.0 (ReLU, tied head, outputs scaled) or Flan-T5 (gated GELU, its own head
    as in the released checkpoints, a deeper decoder). 8 buckets up to distance 20, so
    40 positions reach the logarithmic and the clamped buckets."""
    import os
    import transformers as tf

    flan = arch == "flan_t5"
    cfg = tf.T5Config(vocab_size=259, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                      num_decoder_layers=3 if flan else 2, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=20,
                      dropout_rate=0.0, feed_forward_proj="gated-gelu" if flan else "relu",
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    model = tf.T5ForConditionalGeneration(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
        # Left as drawn, the pad row wins every greedy step of the tied model (a
        # generation test would then compare 32 pads).
        model.shared.weight[0].mul_(0.1)
    model.save_pretrained(out, safe_serialization=True)
    if flan:
        # What google/flan-t5-* ship: tie_word_embeddings false and an lm_head of its own.
        weights = load_file(f"{out}/model.safetensors")
        weights["lm_head.weight"] = torch.randn(259, 64) * 0.05
        save_file(weights, f"{out}/model.safetensors", metadata={"format": "pt"})
        config = json.load(open(f"{out}/config.json"))
        config["tie_word_embeddings"] = False
        config.pop("scale_decoder_outputs", None)
        json.dump(config, open(f"{out}/config.json", "w"), indent=2)
    t5_tokenizer(os.path.join(out, "tokenizer.json"))


def make(out, arch):
    import transformers as tf

    if arch in ("t5", "flan_t5"):
        return make_t5(out, arch)
    spm = {"llama2": "llama2", "phi3_spm": "metaspace", "gemma_spm": "gemma", "gemma2_spm": "gemma",
           "gemma3_spm": "gemma"}.get(arch)
    if spm:
        arch = {"llama2": "llama"}.get(arch, arch.removesuffix("_spm"))
    if arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=259, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=256, eos_token_id=256)
        model = tf.GPT2LMHeadModel(cfg)
    else:
        cls_cfg, cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                        "llama3": (tf.LlamaConfig, tf.LlamaForCausalLM),
                        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
                        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
                        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
                        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM),
                        "phi3long": (tf.Phi3Config, tf.Phi3ForCausalLM),
                        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM),
                        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM),
                        "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM)}[arch]
        extra = {}
        if arch == "llama3":
            # Llama 3.x's scaled rotary embeddings; a short original context so that 100
            # positions cross all three frequency bands (kept, interpolated, divided).
            extra = dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 32},
                         tie_word_embeddings=True)
        if arch == "mistral":
            # Sliding-window attention: 100 positions against a 16-token window.
            extra = dict(sliding_window=16)
        if arch == "qwen3":
            # Qwen3: per-head q/k RMSNorm, head_dim independent of hidden/heads.
            extra = dict(head_dim=24, tie_word_embeddings=False)
        if arch == "phi3":
            # Phi-3: fused qkv and gate_up projections, a sliding window on every layer.
            extra = dict(sliding_window=16, pad_token_id=0, tie_word_embeddings=False)
        if arch == "phi3long":
            # Phi-3 128k / Phi-3.5 / Phi-4-mini: longrope (short factors up to a 32-position
            # original context, long ones past it, cos/sin scaled) and half of each head
            # rotating (partial_rotary_factor).
            extra = dict(pad_token_id=0, tie_word_embeddings=False, original_max_position_embeddings=32,
                         rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                          "partial_rotary_factor": 0.5,
                                          "short_factor": [1.0, 1.3, 1.9, 2.6],
                                          "long_factor": [1.2, 2.5, 4.0, 7.5],
                                          "original_max_position_embeddings": 32})
        if arch == "gemma":
            # Gemma: (1 + w) RMSNorm, sqrt(hidden) embedding scale, GeGLU, tied head.
            extra = dict(head_dim=16, tie_word_embeddings=True)
        if arch == "gemma2":
            # Gemma 2: sandwich norms, query_pre_attn_scalar, attention and final logit
            # soft-capping (small caps so they bite), a 16-token window on layer 0 only.
            extra = dict(head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                         final_logit_softcapping=3.0, sliding_window=16, tie_word_embeddings=True)
        if arch == "gemma3":
            # Gemma 3: q/k norms, a local rope base on the sliding layer, linear rope
            # scaling on the global one.
            extra = dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=16,
                         layer_types=["sliding_attention", "full_attention"],
                         rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                                          "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                         tie_word_embeddings=True)
        if spm:
            # The families' own layouts: Gemma <pad> <eos> <bos> <unk>, else <unk> <s> </s>.
            ids = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2) if spm == "gemma" else \
                dict(eos_token_id=2, bos_token_id=1)
            extra = {**extra, **ids, "vocab_size": 320}
            if arch in ("gemma2", "gemma3"):
                # llama.cpp scales attention by 1/sqrt(head_dim) (as the real 2B-12B models do).
                extra["query_pre_attn_scalar"] = 16
            if arch == "phi3":
                # llama.cpp runs phi3 without its window: keep the window past the tested length.
                extra["sliding_window"] = 64
        cfg = cls_cfg(**{**dict(vocab_size=259, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                rms_norm_eps=1e-6, tie_word_embeddings=(arch == "qwen2"),
                                bos_token_id=256, eos_token_id=256), **extra})
        model = cls(cfg)
    # Non-trivial norms and biases, so the test sees them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            # Scores and logits large enough for Gemma 2's soft-capping to change them.
            # (Not for the GGUF test model: 20x weights turn q8_0's rounding into logit noise.)
            if arch == "gemma2" and not spm and any(k in name for k in ("q_proj", "k_proj", "embed_tokens")):
                p.mul_(20.0)
    model.save_pretrained(out, safe_serialization=True)
    if spm:
        spm_tokenizer(f"{out}/tokenizer.json", cfg.vocab_size, spm)
    else:
        byte_tokenizer(f"{out}/tokenizer.json")


def seq2seq(path):
    return json.load(open(f"{path}/config.json")).get("is_encoder_decoder", False)


def load(path, dtype=torch.float32):
    import transformers as tf
    cls = tf.AutoModelForSeq2SeqLM if seq2seq(path) else tf.AutoModelForCausalLM
    return cls.from_pretrained(path, torch_dtype=dtype).eval()


def hf_logits(model_dir, inputs, peft, dtype=torch.float32):
    if peft:
        from peft import PeftModel
        cfg = json.load(open(f"{model_dir}/adapter_config.json"))
        # PEFT keeps adapters in f32 over a 16-bit base (autocast_adapter_dtype), as cairn.
        base = load(cfg["base_model_name_or_path"], dtype)
        if cfg.get("modules_to_save"):
            # Added tokens: the base grows to the adapter's tokenizer first, as PEFT's
            # documentation has users do.
            from tokenizers import Tokenizer
            vocab = Tokenizer.from_file(f"{model_dir}/tokenizer.json").get_vocab_size(with_added_tokens=True)
            if vocab > base.get_input_embeddings().weight.shape[0]:
                base.resize_token_embeddings(vocab, mean_resizing=False)
        model = PeftModel.from_pretrained(base, model_dir).eval()
    else:
        model = load(model_dir, dtype)
    with torch.no_grad():
        return model(**inputs).logits.float()


def check_gguf(path, model_dir):
    """What llama.cpp would read: metadata and every tensor dequantized, against the
    Hugging Face weights under llama.cpp's names (convert_hf_to_gguf.py's mapping: Gemma's
    norms as 1 + weight, Phi-3's fused projections kept)."""
    import glob
    from gguf import GGUFReader
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    reader = GGUFReader(path)
    meta = {}
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            value = field.contents()
            meta[key] = len(value) if isinstance(value, list) and len(value) > 8 else value
    hf = {}
    for f in glob.glob(f"{model_dir}/*.safetensors"):
        hf.update({k: v.float() for k, v in load_file(f).items()})
    cfg = json.load(open(f"{model_dir}/config.json"))
    arch = meta["general.architecture"]

    def permute(w, n):
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    expected = {}
    if arch == "gpt2":
        expected["token_embd.weight"] = hf["transformer.wte.weight"]
        expected["position_embd.weight"] = hf["transformer.wpe.weight"]
        for l in range(cfg["n_layer"]):
            for src, dst in [("ln_1", "attn_norm"), ("attn.c_attn", "attn_qkv"), ("attn.c_proj", "attn_output"),
                             ("ln_2", "ffn_norm"), ("mlp.c_fc", "ffn_up"), ("mlp.c_proj", "ffn_down")]:
                w = hf[f"transformer.h.{l}.{src}.weight"]
                expected[f"blk.{l}.{dst}.weight"] = w.T if w.dim() == 2 else w
                expected[f"blk.{l}.{dst}.bias"] = hf[f"transformer.h.{l}.{src}.bias"]
        expected["output_norm.weight"] = hf["transformer.ln_f.weight"]
        expected["output_norm.bias"] = hf["transformer.ln_f.bias"]
    else:
        heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
        shift = 1.0 if arch.startswith("gemma") else 0.0
        expected["token_embd.weight"] = hf["model.embed_tokens.weight"]
        for l in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{l}"
            if arch == "phi3":
                expected[f"blk.{l}.attn_qkv.weight"] = hf[f"{p}.self_attn.qkv_proj.weight"]
                expected[f"blk.{l}.ffn_up.weight"] = hf[f"{p}.mlp.gate_up_proj.weight"]
            else:
                q, k = hf[f"{p}.self_attn.q_proj.weight"], hf[f"{p}.self_attn.k_proj.weight"]
                if arch == "llama":
                    q, k = permute(q, heads), permute(k, kv)
                expected.update({
                    f"blk.{l}.attn_q.weight": q, f"blk.{l}.attn_k.weight": k,
                    f"blk.{l}.attn_v.weight": hf[f"{p}.self_attn.v_proj.weight"],
                    f"blk.{l}.ffn_gate.weight": hf[f"{p}.mlp.gate_proj.weight"],
                    f"blk.{l}.ffn_up.weight": hf[f"{p}.mlp.up_proj.weight"],
                })
            expected.update({
                f"blk.{l}.attn_norm.weight": hf[f"{p}.input_layernorm.weight"] + shift,
                f"blk.{l}.attn_output.weight": hf[f"{p}.self_attn.o_proj.weight"],
                f"blk.{l}.ffn_down.weight": hf[f"{p}.mlp.down_proj.weight"],
            })
            if arch in ("gemma2", "gemma3"):
                expected.update({
                    f"blk.{l}.post_attention_norm.weight": hf[f"{p}.post_attention_layernorm.weight"] + shift,
                    f"blk.{l}.ffn_norm.weight": hf[f"{p}.pre_feedforward_layernorm.weight"] + shift,
                    f"blk.{l}.post_ffw_norm.weight": hf[f"{p}.post_feedforward_layernorm.weight"] + shift,
                })
            else:
                expected[f"blk.{l}.ffn_norm.weight"] = hf[f"{p}.post_attention_layernorm.weight"] + shift
            for proj in ("q", "k"):
                if f"{p}.self_attn.{proj}_norm.weight" in hf:
                    expected[f"blk.{l}.attn_{proj}_norm.weight"] = hf[f"{p}.self_attn.{proj}_norm.weight"] + shift
            for proj in ("q", "k", "v"):
                if f"{p}.self_attn.{proj}_proj.bias" in hf:
                    expected[f"blk.{l}.attn_{proj}.bias"] = hf[f"{p}.self_attn.{proj}_proj.bias"]
        expected["output_norm.weight"] = hf["model.norm.weight"] + shift
    if "lm_head.weight" in hf and not cfg.get("tie_word_embeddings", False):
        expected["output.weight"] = hf["lm_head.weight"]
    worst, types, shapes_ok, q8_exact = 0.0, {}, True, True
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        if t.name not in expected:
            continue
        want = expected.pop(t.name)
        got = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()
        shapes_ok &= list(reversed(t.shape.tolist())) == list(want.shape)
        got = got.reshape(want.shape)
        worst = max(worst, ((got - want).abs().max() / want.abs().max().clamp(min=1e-12)).item())
        if t.tensor_type == GGMLQuantizationType.Q8_0:
            # The gguf package's quantizer is bit-exact with ggml's reference one.
            theirs = quantize(want.contiguous().numpy(), GGMLQuantizationType.Q8_0)
            q8_exact &= bytes(t.data.tobytes()) == bytes(theirs.tobytes())
    # Names llama.cpp's table lists for this architecture (gguf-py's MODEL_TENSORS).
    from gguf.constants import MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES
    arch_id = {name: a for a, name in MODEL_ARCH_NAMES.items()}[arch]
    known = set()
    for t in MODEL_TENSORS[arch_id]:
        known |= {TENSOR_NAMES[t].format(bid=b) + s for b in range(64) for s in (".weight", ".bias")}
    unknown = sorted(t.name for t in reader.tensors if t.name not in known)
    return {"meta": meta, "types": types, "missing": sorted(expected), "unknown": unknown,
            "shapes_ok": shapes_ok,
            "max_rel_err": worst, "q8_0_bit_exact": q8_exact,
            "tensors": [t.name for t in reader.tensors]}


def preference(objective, model_dir, data, settings, out):
    """TRL's DPOTrainer (or ORPOTrainer) on the preference records in DATA, all in one
    batch (so the order TRL shuffles them in does not matter), for `steps` steps; prints
    the logged metrics per step and writes the trained weights (the adapter's with
    `adapter`) to OUT. With `adapter`, training continues that PEFT adapter and the DPO
    reference is the adapter as loaded (TRL's `ref` adapter), as cairn does."""
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    s = json.loads(settings)
    records = [json.loads(line) for line in open(data) if line.strip()]
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in records])
    tok = PreTrainedTokenizerFast(tokenizer_file=f"{model_dir}/tokenizer.json", eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    model = load(model_dir)
    if s.get("adapter"):
        from peft import PeftModel
        # DPOTrainer loads the adapter's starting weights as its `ref` adapter itself.
        model = PeftModel.from_pretrained(model, s["adapter"], is_trainable=True)
    common = dict(output_dir=f"{out}.trl", per_device_train_batch_size=len(records), max_steps=s["steps"],
                  learning_rate=s["learning_rate"], lr_scheduler_type="constant", warmup_steps=0,
                  weight_decay=0.0, max_grad_norm=s["max_grad_norm"], beta=s["beta"], logging_steps=1,
                  report_to=[], save_strategy="no", use_cpu=True, bf16=False, seed=0, dataloader_drop_last=False,
                  disable_dropout=True, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch")
    if objective == "orpo":
        args = ORPOConfig(**common, max_length=4096)
        trainer = ORPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)
    else:
        args = DPOConfig(**common, loss_type=[s.get("loss_type", "sigmoid")], max_length=None,
                         precompute_ref_log_probs=s.get("precompute", False))
        trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    if s.get("adapter"):
        from peft import get_peft_model_state_dict
        weights = {k: v.contiguous() for k, v in get_peft_model_state_dict(model, adapter_name="default").items()}
    else:
        weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(weights, out)
    print(json.dumps({"steps": logged}))


def llama_cpp_logits(path, ref):
    """llama.cpp's forward pass over the GGUF (CPU, every position's logits) against
    transformers' f32 forward over the Hugging Face weights (`ref`), on the same ids."""
    import numpy as np
    from llama_cpp import Llama

    ids = LLAMA_CPP_IDS
    llm = Llama(model_path=path, logits_all=True, n_ctx=64, n_threads=2, n_batch=64,
                verbose=False)
    llm.eval(ids)
    ours = np.array(llm.scores[: len(ids)], dtype=np.float64)
    ours = ours[:, : ref.shape[1]]
    diff = np.abs(ours - ref)
    flipped = ours.argmax(1) != ref.argmax(1)
    top2 = np.sort(ref, axis=1)[:, -2:]
    # Where llama.cpp's argmax differs, how close transformers' top two were there.
    flip_margin = float((top2[:, 1] - top2[:, 0])[flipped].max()) if flipped.any() else 0.0
    return {"positions": len(ids), "vocab": int(ref.shape[1]),
            "max_abs_err": float(diff.max()), "scale": float(np.abs(ref).max()),
            "argmax_agree": float(1.0 - flipped.mean()), "flip_margin": flip_margin}


LLAMA_CPP_IDS = [(7 * i + 3) % 256 for i in range(24)]

# Texts llama.cpp must tokenize as the Hugging Face tokenizer does: known words, unknown
# characters (byte fallback), leading, repeated and trailing spaces, newlines, digits.
TOKENIZE_TEXTS = [
    "the twin writes the way its author writes",
    "the notes in the margin, then the long posts",
    " the leading space",
    "two  spaces and   three",
    "line one\nline two\n\nafter a blank line",
    "caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001F600 emoji",
    "numbers 12345 and 3.14159",
    "trailing space ",
    "Uppercase Words Are Unknown Pieces",
    # Overlapping pieces ("at"/"te", "th"/"he", "in"/"ng"), where only the merge order
    # (llama.cpp: the scores) decides the split.
    "water gates, late notes: the ratio of tests to thoughts within things",
    "a",
]


def llama_cpp_tokenize(path, model_dir):
    """llama.cpp's tokenizer (from the GGUF's vocabulary) on TOKENIZE_TEXTS against the
    Hugging Face tokenizer.json, with and without the special tokens it adds, and back."""
    from llama_cpp import Llama
    from tokenizers import Tokenizer

    llm = Llama(model_path=path, vocab_only=True, verbose=False)
    tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
    spec = json.load(open(f"{model_dir}/tokenizer.json"))
    metaspace = (spec.get("pre_tokenizer") or {}).get("type") == "Metaspace"
    prefix = llm.metadata.get("tokenizer.ggml.add_space_prefix") == "true"
    mismatches, leading_space = [], []
    for text in TOKENIZE_TEXTS:
        for special in (False, True):
            theirs = tok.encode(text, add_special_tokens=special).ids
            ours = llm.tokenize(text.encode(), add_bos=special, special=False)
            if ours != theirs:
                bad = {"text": text, "special": special, "llama_cpp": ours, "hf": theirs}
                # A Metaspace pre-tokenizer adds no dummy prefix to a text that starts
                # with a space; llama.cpp (like SentencePiece itself) always does.
                (leading_space if metaspace and text.startswith(" ") else mismatches).append(bad)
        plain = tok.encode(text, add_special_tokens=False).ids
        back = llm.detokenize(plain).decode("utf-8", errors="replace")
        # llama-cpp-python's detokenize keeps the dummy prefix's space that the Hugging
        # Face decoder strips (generated text never starts a sequence, so only here).
        if prefix and back.startswith(" "):
            back = back[1:]
        if back != tok.decode(plain) and not (metaspace and text.startswith(" ")):
            mismatches.append({"text": text, "detokenized": back, "hf": tok.decode(plain)})
    return {"texts": len(TOKENIZE_TEXTS), "mismatches": mismatches, "leading_space": leading_space,
            "tokens": sum(len(tok.encode(t, add_special_tokens=False).ids) for t in TOKENIZE_TEXTS)}


def main():
    cmd, *args = sys.argv[1:]
    if cmd == "make":
        root, *archs = args
        for arch in archs:
            make(f"{root}/{arch}", arch)
    elif cmd == "check-logits":
        model_dir, ids, ours, *flags = args
        ids = load_file(ids)
        theirs = hf_logits(model_dir, ids, "peft" in flags)
        ours = load_file(ours)["logits"]
        out = {"max_abs_diff": (ours - theirs).abs().max().item(), "shape": list(theirs.shape)}
        if "bf16" in flags:
            # How far transformers' own bf16 run is from its f32 one: the yardstick for
            # cairn's bf16 run (max_abs_diff above is then cairn bf16 vs transformers f32).
            hf16 = hf_logits(model_dir, ids, "peft" in flags, torch.bfloat16)
            out["hf_bf16_vs_f32"] = (hf16 - theirs).abs().max().item()
            out["vs_hf_bf16"] = (ours - hf16).abs().max().item()
        print(json.dumps(out))
    elif cmd == "check-step":
        model_dir, batch, ours, settings = args
        s = json.loads(settings)
        model = load(model_dir).train()
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        b = load_file(batch)
        n = len([k for k in b if k.startswith("input_ids.")])
        targets = sum(int((b[f"labels.{k}"][:, 1:] != -100).sum()) for k in range(n))
        for k in range(n):
            if f"source_ids.{k}" in b:
                # Encoder-decoder: cairn's decoder rows start with the start token, so
                # its labels shift like a decoder's.
                logits = model(input_ids=b[f"source_ids.{k}"], attention_mask=b[f"source_mask.{k}"],
                               decoder_input_ids=b[f"input_ids.{k}"]).logits
            else:
                logits = model(input_ids=b[f"input_ids.{k}"]).logits
            v = logits.shape[-1]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, v), b[f"labels.{k}"][:, 1:].reshape(-1),
                ignore_index=-100, reduction="sum") / targets
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s["max_grad_norm"])
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": s["weight_decay"]},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=s["learning_rate"], betas=(s["adam_beta1"], s["adam_beta2"]), eps=s["adam_epsilon"])
        opt.step()
        after = model.state_dict()
        ours = load_file(ours)
        shared = sorted(set(ours) & set(after))
        print(json.dumps({
            "max_abs_diff": max((ours[k] - after[k]).abs().max().item() for k in shared),
            "max_update": max((after[k] - before[k]).abs().max().item() for k in shared),
            "tensors": len(shared), "only_cairn": sorted(set(ours) - set(after)),
        }))
    elif cmd == "greedy":
        from tokenizers import Tokenizer
        model_dir, prompt, n = args
        tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
        eos = json.load(open(f"{model_dir}/config.json"))["eos_token_id"]
        ids = tok.encode(prompt, add_special_tokens=False).ids
        if seq2seq(model_dir):
            # The prompt is the source, closed by EOS; the output starts with the
            # decoder's start token.
            # No cache: transformers 5.23 sizes T5's decoder cache by the encoder's depth
            # (an IndexError when the decoder is deeper, as in the flan_t5 test model).
            out = load(model_dir).generate(torch.tensor([ids + [eos]]), do_sample=False,
                                           max_new_tokens=int(n), eos_token_id=eos,
                                           use_cache=False)
            new = out[0, 1:].tolist()
        else:
            ids = torch.tensor([ids])
            out = load(model_dir).generate(ids, do_sample=False, max_new_tokens=int(n),
                                           eos_token_id=eos, pad_token_id=eos)
            new = out[0, ids.shape[1]:].tolist()
        if eos in new:
            new = new[:new.index(eos)]
        print(json.dumps({"text": tok.decode(new, skip_special_tokens=False).rstrip("\ufffd"),
                          "tokens": len(new)}))
    elif cmd in ("dpo", "orpo"):
        preference(cmd, *args)
    elif cmd == "check-gguf":
        model_dir, *files = args
        print(json.dumps([check_gguf(f, model_dir) for f in files]))
    elif cmd == "llama-cpp":
        import transformers as tf
        model_dir, *files = args
        refs = {}
        for name, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16), ("f16", torch.float16)):
            model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
            with torch.no_grad():
                refs[name] = model(torch.tensor([LLAMA_CPP_IDS])).logits[0].double().numpy()
        ref = refs["f32"]
        # The yardstick for llama.cpp's 16-bit files: transformers' own 16-bit runs.
        own = {name: float(abs(refs[name] - ref).max()) for name in ("bf16", "f16")}
        print(json.dumps({"logits": [llama_cpp_logits(f, ref) for f in files],
                          "transformers_16bit_err": own,
                          "tokenize": llama_cpp_tokenize(files[0], model_dir)}))
    elif cmd == "check-nf4":
        # bitsandbytes' own quantize_4bit (NF4, blocks of 64, double quantization).
        import bitsandbytes.functional as F
        src, ours = args
        w = load_file(src)["weight"]
        q, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        o = load_file(ours)
        back = F.dequantize_4bit(q, state)
        # The 8-bit codes of the block maxima: where they differ, cairn's must be the
        # nearest entry of the map (bitsandbytes' C search is approximate).
        code = state.state2.code.float()
        theirs, mine = state.absmax.flatten().long(), o["qabsmax"].flatten().long()
        maxima = w.float().reshape(-1)[: (w.numel() // 64) * 64].reshape(-1, 64).abs().amax(1)
        if w.numel() % 64:
            maxima = torch.cat([maxima, w.float().reshape(-1)[(w.numel() // 64) * 64:].abs().amax().reshape(1)])
        centered = maxima - state.offset
        blocks2 = torch.cat([c.abs().amax().expand(len(c)) for c in centered.split(256)])
        x = centered / blocks2
        differ = theirs != mine
        mine_not_farther = bool(((x - code[mine]).abs() <= (x - code[theirs]).abs())[differ].all())
        print(json.dumps({
            "packed_equal": bool(torch.equal(q.flatten(), o["packed"].flatten())),
            "qabsmax_differ": int(differ.sum()), "qabsmax_count": int(differ.numel()),
            "qabsmax_differ_only_where_ours_is_nearer": mine_not_farther,
            "absmax2_equal": bool(torch.equal(state.state2.absmax.flatten(), o["absmax2"].flatten())),
            "offset_equal": bool(float(state.offset) == float(o["offset"][0])),
            "dequantized_max_diff": (back.float() - o["dequantized"]).abs().max().item(),
            "quantization_error": (back.float() - w).abs().max().item(),
        }))
    elif cmd == "render-chat":
        from transformers import PreTrainedTokenizerFast
        model_dir, conversations = args
        tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
        out = []
        for messages in json.load(open(conversations)):
            row = {}
            try:
                row["text"] = tok.apply_chat_template(messages, tokenize=False)
                row["prompt"] = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as e:  # the template's raise_exception
                row["error"] = str(e)
            out.append(row)
        print(json.dumps(out))
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
