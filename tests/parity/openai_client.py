"""Drives `cairn serve` with the official `openai` Python client (and raw HTTP where the
client would not send what is tested). Prints one JSON object of what it saw; the Rust
test asserts on it.

    openai_client.py make OUT       a tiny random Llama (2048 positions, byte tokenizer,
                                    ChatML card) in OUT/base and a PEFT LoRA adapter over
                                    it in OUT/twin
    openai_client.py make-reranker OUT TOKENIZER_DIR
                                    a tiny random BertForSequenceClassification (one label)
                                    with the WordPiece tokenizer of TOKENIZER_DIR
    openai_client.py rerank MODEL QUERY DOCS_JSON
                                    sentence-transformers' CrossEncoder.predict scores, in
                                    f32 and after PyTorch's quantize_dynamic (int8)
    openai_client.py chat URL MODEL QUESTION [no-rag|stream|long]
                                    one greedy chat; its text, usage and `cairn` field
    openai_client.py check URL CHAT_MODEL RAW_MODEL EMBEDDER_NAME EMBEDDER_DIR
    openai_client.py queue URL MODEL
"""
import json
import sys
import threading
import time

import httpx2 as httpx  # the HTTP client `openai` itself depends on
import openai


def make(out):
    import os

    import peft
    import torch
    import transformers as tf

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from decoder import byte_tokenizer

    torch.manual_seed(0)
    base, twin = os.path.abspath(f"{out}/base"), os.path.abspath(f"{out}/twin")
    cfg = tf.LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rms_norm_eps=1e-6, bos_token_id=256, eos_token_id=256)
    model = tf.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(base, safe_serialization=True)
    byte_tokenizer(f"{base}/tokenizer.json")
    card = {"arch": "llama", "method": "full", "template": "chatml", "eos_token": ""}
    json.dump(card, open(f"{base}/cairn_model.json", "w"))
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8,
                                                      target_modules=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    lora.peft_config["default"].base_model_name_or_path = base
    lora.save_pretrained(twin)
    byte_tokenizer(f"{twin}/tokenizer.json")
    json.dump({**card, "method": "lora", "base_model": base}, open(f"{twin}/cairn_model.json", "w"))


def make_reranker(out, tokenizer_dir):
    import shutil

    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=512, num_labels=1)
    model = tf.BertForSequenceClassification(cfg)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.mul_(4.0)
        # Logits spread wide enough that the sigmoid does not flatten differences.
        model.classifier.weight.mul_(8.0)
    model.save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(f"{tokenizer_dir}/{f}", f"{out}/{f}")


def rerank(model, query, docs):
    from sentence_transformers import CrossEncoder

    import torch

    pairs = [(query, d) for d in json.loads(docs)]
    ce = CrossEncoder(model, device="cpu")
    scores = ce.predict(pairs)
    # PyTorch's dynamic int8 (what a sentence-transformers user would quantize with).
    torch.ao.quantization.quantize_dynamic(ce.model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    int8 = ce.predict(pairs)
    print(json.dumps({"scores": [float(x) for x in scores], "int8_scores": [float(x) for x in int8]}))


def client(url, retries=0):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=retries, timeout=120)


def error_of(fn):
    try:
        fn()
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        body = body.get("error", body)
        return {"status": e.status_code, "param": body.get("param"), "code": body.get("code"),
                "type": body.get("type"), "message": body.get("message")}
    return None


def chat(url, model, question, mode=""):
    c = client(url)
    extra = {"rag": False} if mode == "no-rag" else {}
    msgs = [{"role": "user", "content": question}]
    if mode == "stream":
        text, cairn = [], None
        for chunk in c.chat.completions.create(model=model, messages=msgs, temperature=0, max_tokens=16,
                                               stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                text.append(chunk.choices[0].delta.content)
            cairn = (chunk.model_extra or {}).get("cairn") or cairn
        print(json.dumps({"text": "".join(text), "cairn": cairn}))
        return
    # `long`: a reply budget that leaves room for the question alone.
    max_tokens = 1950 if mode == "long" else 16
    r = c.chat.completions.create(model=model, messages=msgs, temperature=0, max_tokens=max_tokens,
                                  extra_body=extra)
    print(json.dumps({"text": r.choices[0].message.content, "usage": r.usage.prompt_tokens,
                      "cairn": (r.model_extra or {}).get("cairn")}))


def check(url, chat_model, raw_model, embedder_name, embedder_dir):
    c = client(url)
    out = {"models": sorted(m.id for m in c.models.list().data)}
    greedy = dict(temperature=0, max_tokens=24)
    msgs = [{"role": "user", "content": "Tell me about the twin."}]
    r = c.chat.completions.create(model=chat_model, messages=msgs, **greedy)
    out["chat"] = {"text": r.choices[0].message.content, "finish": r.choices[0].finish_reason,
                   "usage": [r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens],
                   "object": r.object, "cairn": (r.model_extra or {}).get("cairn")}
    pieces, finish, usage, roles = [], None, None, []
    for chunk in c.chat.completions.create(model=chat_model, messages=msgs, stream=True,
                                           stream_options={"include_usage": True}, **greedy):
        if chunk.usage:
            usage = [chunk.usage.prompt_tokens, chunk.usage.completion_tokens]
        for ch in chunk.choices:
            if ch.delta.role:
                roles.append(ch.delta.role)
            if ch.delta.content:
                pieces.append(ch.delta.content)
            if ch.finish_reason:
                finish = ch.finish_reason
    out["chat_stream"] = {"text": "".join(pieces), "chunks": len(pieces), "finish": finish,
                          "usage": usage, "roles": roles}
    r = c.completions.create(model=raw_model, prompt="Dear diary, today the twin wrote", **greedy)
    out["completion"] = {"text": r.choices[0].text, "finish": r.choices[0].finish_reason}
    pieces = [ch.choices[0].text for ch in c.completions.create(
        model=raw_model, prompt="Dear diary, today the twin wrote", stream=True, **greedy) if ch.choices]
    out["completion_stream"] = "".join(pieces)

    # Embeddings: the client asks for base64 by default; floats when told.
    texts = ["The twin writes about Rust.", "Fine-tuning on my own posts."]
    b64 = c.embeddings.create(model=embedder_name, input=texts)
    flt = c.embeddings.create(model=embedder_name, input=texts[0], encoding_format="float")
    from sentence_transformers import SentenceTransformer
    ref = SentenceTransformer(embedder_dir, device="cpu").encode(texts)
    diff = max(abs(a - b) for v, r_ in zip(b64.data, ref) for a, b in zip(v.embedding, r_))
    diff_float = max(abs(a - b) for a, b in zip(flt.data[0].embedding, ref[0]))
    out["embeddings"] = {"n": len(b64.data), "dim": len(b64.data[0].embedding),
                         "max_abs_diff": float(max(diff, diff_float)),
                         "prompt_tokens": b64.usage.prompt_tokens}

    # 32 concurrent streams, each checked against the same prompt answered alone.
    prompts = [f"Question {i}: what did the twin write on day {i * 7}?" for i in range(32)]
    alone = {}
    for p in prompts[:8]:
        r = c.chat.completions.create(model=chat_model, messages=[{"role": "user", "content": p}], **greedy)
        alone[p] = r.choices[0].message.content
    got, errors = {}, []

    def stream(p):
        try:
            cl = client(url)
            text = "".join(ch.choices[0].delta.content or "" for ch in cl.chat.completions.create(
                model=chat_model, messages=[{"role": "user", "content": p}], stream=True, **greedy)
                if ch.choices)
            got[p] = text
        except Exception as e:  # reported, not raised: the test names the failure
            errors.append(repr(e))

    t0 = time.time()
    threads = [threading.Thread(target=stream, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["concurrent"] = {"completed": len(got), "errors": errors, "seconds": time.time() - t0,
                         "mismatches": [p for p in alone if got.get(p) != alone[p]],
                         "empty": [p for p in got if not got[p]]}

    # Errors in OpenAI's format; the server stays up through all of them.
    raw = httpx.post(f"{url}/v1/chat/completions", content=b'{"model": "x", "messages": [',
                     headers={"content-type": "application/json"})
    out["malformed"] = {"status": raw.status_code, "body": raw.json()}
    out["unknown_model"] = error_of(lambda: c.chat.completions.create(model="nope", messages=msgs))
    out["too_long"] = error_of(lambda: c.chat.completions.create(
        model=chat_model, messages=[{"role": "user", "content": "word " * 1000}], max_tokens=8))
    out["n"] = error_of(lambda: c.chat.completions.create(model=chat_model, messages=msgs, n=2))
    out["logprobs"] = error_of(lambda: c.chat.completions.create(model=chat_model, messages=msgs,
                                                                 logprobs=True))
    out["bad_role"] = error_of(lambda: c.chat.completions.create(
        model=chat_model, messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]))
    out["unknown_embedder"] = error_of(lambda: c.embeddings.create(model="nope", input="x"))

    # A client that goes away mid-stream frees its place.
    with httpx.stream("POST", f"{url}/v1/chat/completions",
                      json={"model": chat_model, "messages": msgs, "stream": True,
                            "max_tokens": 80, "temperature": 0}) as s:
        for _line in s.iter_lines():
            break
    in_flight = None
    for _ in range(100):
        in_flight = httpx.get(f"{url}/health").json()["in_flight"]
        if in_flight == 0:
            break
        time.sleep(0.05)
    out["after_disconnect_in_flight"] = in_flight
    out["health"] = httpx.get(f"{url}/health").json()
    print(json.dumps(out))


def queue(url, model):
    """More simultaneous requests than the queue holds: some are refused with 429."""
    statuses, lock = [], threading.Lock()

    def one(i):
        try:
            client(url).chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"long answer {i}"}],
                temperature=0, max_tokens=64, extra_body={"repetition_penalty": 1.0})
            s = 200
        except openai.RateLimitError as e:
            s = (429, e.body.get("type") if isinstance(e.body, dict) else None)
        except openai.APIStatusError as e:
            s = e.status_code
        with lock:
            statuses.append(s)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = sum(1 for s in statuses if s == 200)
    refused = [s for s in statuses if isinstance(s, tuple)]
    others = [s for s in statuses if s != 200 and not isinstance(s, tuple)]
    after = client(url).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "still there?"}], max_tokens=4, temperature=0)
    print(json.dumps({"ok": ok, "refused": len(refused), "refused_type": refused[0][1] if refused else None,
                      "others": others, "after": after.choices[0].finish_reason}))


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"make": make, "make-reranker": make_reranker, "rerank": rerank, "chat": chat, "check": check,
     "queue": queue}[cmd](*args)
