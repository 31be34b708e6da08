//! `cairn serve` through the real binaries, talked to by the official `openai` Python
//! client (tests/parity/openai_client.py, in the project venv): chat and completions,
//! streamed and whole, equal to `cairn generate`; a LoRA adapter and its base served side
//! by side; embeddings equal to sentence-transformers'; 32 concurrent streams equal to
//! the same prompts answered alone; OpenAI-format errors; a full queue answering 429.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::mock_llm::MockLlm;
use common::serving::{
    client, models, notes_project, start, start_in, Server, BORROW, SOURDOUGH, TOMATO,
};
use common::{repo, Project};
use serde_json::Value;

/// `cairn generate` with the settings the client sends (greedy, 24 tokens).
fn generate(model: &Path, prompt: &str, raw: bool) -> String {
    let mut cmd = Command::new(assert_cmd::cargo::cargo_bin("cairn"));
    cmd.arg("generate").arg(model).arg(prompt).args([
        "--temperature",
        "0",
        "--max-new-tokens",
        "24",
        "--device",
        "cpu",
    ]);
    if raw {
        cmd.arg("--raw");
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    text.strip_suffix('\n').unwrap_or(&text).to_string()
}

#[test]
fn the_openai_client_talks_to_cairn_serve() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, twin) = models(tmp.path());
    let embedder = repo().join(".models/all-MiniLM-L6-v2");
    let server = start(&[
        &"--model",
        &format!("twin={}", twin.display()),
        &"--model",
        &format!("base={}", base.display()),
        &"--embedder",
        &embedder,
    ]);
    let out = client(&[
        &"check",
        &server.url,
        &"twin",
        &"base",
        &"all-MiniLM-L6-v2",
        &embedder,
    ]);
    let show = serde_json::to_string_pretty(&out).unwrap();
    assert_eq!(
        out["models"],
        serde_json::json!(["all-MiniLM-L6-v2", "base", "twin"]),
        "{show}"
    );

    // Greedy answers are `cairn generate`'s: the adapter through its chat template, the
    // base on a raw prompt; streamed or whole, the same text.
    let chat = generate(&twin, "Tell me about the twin.", false);
    assert!(!chat.is_empty(), "cairn generate produced nothing");
    assert_eq!(out["chat"]["text"], chat, "{show}");
    assert_eq!(out["chat_stream"]["text"], chat, "{show}");
    assert_eq!(out["chat"]["object"], "chat.completion");
    assert_eq!(out["chat"]["usage"][1], 24, "{show}");
    assert_eq!(out["chat"]["finish"], "length");
    assert_eq!(out["chat_stream"]["finish"], "length");
    assert_eq!(
        out["chat_stream"]["roles"],
        serde_json::json!(["assistant"])
    );
    assert_eq!(
        out["chat_stream"]["usage"],
        serde_json::json!([out["chat"]["usage"][0], 24])
    );
    assert!(out["chat_stream"]["chunks"].as_u64().unwrap() > 1, "{show}");
    assert!(
        out["chat"]["cairn"]["timings_ms"]["total"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    let raw = generate(&base, "Dear diary, today the twin wrote", true);
    assert_eq!(out["completion"]["text"], raw, "{show}");
    assert_eq!(out["completion_stream"], raw, "{show}");
    // The adapter changes the model: the base answers the same chat differently.
    assert_ne!(generate(&base, "Tell me about the twin.", false), chat);

    // Embeddings (base64 and float) equal sentence-transformers'.
    let e = &out["embeddings"];
    assert_eq!((e["n"].as_u64(), e["dim"].as_u64()), (Some(2), Some(384)));
    assert!(e["max_abs_diff"].as_f64().unwrap() < 1e-5, "{show}");

    // 32 concurrent streams: all complete, each as the same prompt answered alone.
    let c = &out["concurrent"];
    assert_eq!(c["completed"], 32, "{show}");
    assert_eq!(c["errors"], serde_json::json!([]), "{show}");
    assert_eq!(c["mismatches"], serde_json::json!([]), "{show}");

    // Errors in OpenAI's format; the server stayed up.
    assert_eq!(out["malformed"]["status"], 400);
    let malformed = out["malformed"]["body"]["error"]["message"]
        .as_str()
        .unwrap();
    assert!(malformed.contains("line 1 column"), "{malformed}");
    assert_eq!(
        out["malformed"]["body"]["error"]["type"],
        "invalid_request_error"
    );
    assert_eq!(
        (
            &out["unknown_model"]["status"],
            &out["unknown_model"]["code"]
        ),
        (&Value::from(404), &Value::from("model_not_found"))
    );
    assert_eq!(out["too_long"]["status"], 400);
    assert_eq!(out["too_long"]["code"], "context_length_exceeded");
    assert!(out["too_long"]["message"]
        .as_str()
        .unwrap()
        .contains("maximum context length is 2048 tokens"));
    for (case, param) in [
        ("n", "n"),
        ("logprobs", "logprobs"),
        ("bad_role", "messages"),
    ] {
        assert_eq!(out[case]["status"], 400, "{case}: {show}");
        assert_eq!(out[case]["param"], param, "{case}: {show}");
    }
    assert_eq!(out["unknown_embedder"]["status"], 404);
    // A client that hung up mid-stream no longer holds a place.
    assert_eq!(out["after_disconnect_in_flight"], 0, "{show}");
    assert_eq!(out["health"]["status"], "ok");
}

#[test]
fn a_full_queue_answers_429_and_the_server_carries_on() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, _) = models(tmp.path());
    let server = start(&[
        &"--model",
        &base,
        &"--max-batch",
        &"1",
        &"--max-queue",
        &"3",
    ]);
    let out = client(&[&"queue", &server.url, &"base"]);
    assert!(out["refused"].as_u64().unwrap() >= 1, "{out}");
    assert!(out["ok"].as_u64().unwrap() >= 3, "{out}");
    assert_eq!(out["refused_type"], "rate_limit_error", "{out}");
    assert_eq!(out["others"], serde_json::json!([]), "{out}");
    // And it still answers afterwards.
    assert!(
        ["stop", "length"].contains(&out["after"].as_str().unwrap_or("")),
        "{out}"
    );
}

#[test]
fn bad_serve_arguments_exit_2_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(assert_cmd::cargo::cargo_bin("cairn"))
            .current_dir(tmp.path())
            .arg("serve")
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    std::fs::create_dir(tmp.path().join("empty")).unwrap();
    let (code, err) = run(&["--model", "empty"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("not a model directory"), "{err}");
    let (code, err) = run(&["--model", "no/such/dir"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("neither a model directory nor an artifact id"),
        "{err}"
    );
    let (code, err) = run(&["--model", "a=empty", "--max-batch", "0"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--max-batch"), "{err}");
    let (code, err) = run(&["--model", "x", "--host", "localhost"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("not an IP address"), "{err}");
    // A RAG config's problems, each at its line and column.
    std::fs::write(
        tmp.path().join("rag.yaml"),
        "collections:\n  - {name: notes, k: 0}\nself_query:\n  rules:\n    - {field: author, pattern: 'by [A-Z]+'}\nprompt: 'no slots'\n",
    )
    .unwrap();
    let model = tmp.path().join("m");
    std::fs::create_dir(&model).unwrap();
    std::fs::write(model.join("config.json"), "{}").unwrap();
    let (code, err) = run(&["--model", "m", "--rag", "rag.yaml"]);
    assert_eq!(code, Some(2), "{err}");
    for expected in [
        "rag.yaml:2:22",
        "k must be 1..1000",
        "rag.yaml:5:32",
        "needs a capture group",
        "rag.yaml:6:9",
        "{context} and {question}",
    ] {
        assert!(err.contains(expected), "{expected}: {err}");
    }
    std::fs::write(tmp.path().join("typo.yaml"), "collections: []\ntopk: 3\n").unwrap();
    let (code, err) = run(&["--model", "m", "--rag", "typo.yaml"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("typo.yaml:2:1") && err.contains("topk"),
        "{err}"
    );
}

/// Continuous batching in the worker: prompts of different lengths and reply budgets, all
/// arriving at once and decoded as one left-padded batch per model, give exactly what each
/// gives alone (`cairn-torch generate`) for every attention variant (learned positions,
/// Llama 3 rope, sliding windows, long-rope switching factors mid-reply, soft-capping,
/// local/global layers) and for T5, which the worker generates one at a time.
#[test]
fn batched_decoding_equals_decoding_alone_for_every_family() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let archs = [
        "gpt2", "llama3", "mistral", "phi3long", "gemma2", "gemma3", "t5",
    ];
    let python = repo().join(".venv/bin/python");
    let made = Command::new(&python)
        .arg(repo().join("tests/parity/decoder.py"))
        .arg("make")
        .arg(root)
        .args(archs)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let prompts = [
        "Dear diary, today the twin wrote",
        "Hi",
        "A much longer prompt that goes on and on about many things",
        "x y z",
    ];
    let config = serde_json::json!({
        "models": archs.iter().map(|a| serde_json::json!({"name": a, "dir": root.join(a)})).collect::<Vec<_>>(),
        "max_batch": 8, "device": "cpu", "threads": 0,
    });
    let config_path = root.join("worker.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let mut requests = Vec::new();
    let mut input = String::new();
    for arch in archs {
        for (i, prompt) in prompts.iter().enumerate() {
            let id = requests.len() as u64 + 1;
            let settings = serde_json::json!({"max_new_tokens": 20 + 7 * i, "temperature": 0.0,
                "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0});
            input.push_str(
                &serde_json::json!({"generate": {"id": id, "model": arch,
                    "prompt": {"text": prompt}, "settings": settings}})
                .to_string(),
            );
            input.push('\n');
            requests.push((id, arch, *prompt, settings));
        }
    }
    let mut worker = Command::new(env!("CARGO_BIN_EXE_cairn-torch"))
        .args(["serve", "--config"])
        .arg(&config_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        // All at once, then EOF: the worker answers everything, then exits.
        worker
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    let out = worker.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut done = std::collections::HashMap::new();
    let mut streamed: std::collections::HashMap<u64, String> = Default::default();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        if let Some(d) = v.get("done") {
            done.insert(d["id"].as_u64().unwrap(), d.clone());
        }
        if let Some(d) = v.get("delta") {
            *streamed.entry(d["id"].as_u64().unwrap()).or_default() += d["text"].as_str().unwrap();
        }
    }
    for (id, arch, prompt, settings) in requests {
        let alone = Command::new(env!("CARGO_BIN_EXE_cairn-torch"))
            .args(["generate", "--raw", "--device", "cpu", "--prompt", prompt])
            .arg("--model")
            .arg(root.join(arch))
            .args(["--settings", &settings.to_string()])
            .output()
            .unwrap();
        assert!(
            alone.status.success(),
            "{arch}: {}",
            String::from_utf8_lossy(&alone.stderr)
        );
        let alone = String::from_utf8(alone.stdout).unwrap();
        let alone = alone.strip_suffix('\n').unwrap_or(&alone);
        let batched = &done
            .get(&id)
            .unwrap_or_else(|| panic!("{arch} {prompt:?}: no reply"))["text"];
        assert_eq!(batched, alone, "{arch} {prompt:?}");
        assert_eq!(
            streamed.get(&id).map(String::as_str).unwrap_or(""),
            alone,
            "{arch} {prompt:?}"
        );
    }
}

/// The scores `cairn-torch serve` gives for one rerank `request` with the cross-encoder
/// in `model` held in `precision`.
fn worker_scores(dir: &Path, model: &Path, precision: &str, request: &Value) -> Vec<f64> {
    let config = dir.join(format!("worker-{precision}.json"));
    let settings = serde_json::json!({"models": [], "reranker": model, "reranker_precision": precision,
                                      "max_batch": 1, "device": "cpu", "threads": 0});
    std::fs::write(&config, settings.to_string()).unwrap();
    let mut worker = Command::new(env!("CARGO_BIN_EXE_cairn-torch"))
        .args(["serve", "--config"])
        .arg(&config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        writeln!(worker.stdin.take().unwrap(), "{request}").unwrap();
    }
    let out = worker.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find_map(|v| v.get("scored").cloned())
        .expect("a scored event")["scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// The cross-encoder's scores equal sentence-transformers' `CrossEncoder.predict` on the
/// same pairs (pair template, type ids, longest-first truncation of a long document,
/// sigmoid for one label); bf16 and int8 stay close.
#[test]
fn cross_encoder_scores_match_sentence_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("reranker");
    client(&[
        &"make-reranker",
        &model,
        &repo().join(".models/all-MiniLM-L6-v2"),
    ]);
    let query = "how often should I feed a sourdough starter?";
    let long = "the starter and the bread and the oven ".repeat(120);
    let docs = vec![
        "Feed the starter twice a day with rye flour and water.".to_string(),
        "Tomatoes need six hours of sun.".to_string(),
        "x".to_string(),
        "Rust's borrow checker, ownership, and lifetimes: 3 rules.".to_string(),
        long,
    ];
    let docs_json = serde_json::to_string(&docs).unwrap();
    let theirs_all = client(&[&"rerank", &model, &query, &docs_json]);
    let request = serde_json::json!({"rerank": {"id": 1, "query": query, "documents": docs}});
    let ours = worker_scores(tmp.path(), &model, "f32", &request);
    let theirs: Vec<f64> = theirs_all["scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(ours.len(), docs.len());
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        assert!(
            (a - b).abs() < 1e-5,
            "pair {i}: cairn {a} vs sentence-transformers {b}"
        );
    }
    // The scores differ enough that ordering by them means something.
    let spread = theirs.iter().cloned().fold(f64::MIN, f64::max)
        - theirs.iter().cloned().fold(f64::MAX, f64::min);
    assert!(spread > 0.01, "{theirs:?}");
    // bf16 weights (the fast choice on CPUs with AVX512-BF16): close, not equal.
    let bf16 = worker_scores(tmp.path(), &model, "bf16", &request);
    assert_ne!(bf16, ours, "the bf16 run computed in f32");
    for (i, (a, b)) in bf16.iter().zip(&theirs).enumerate() {
        assert!(
            (a - b).abs() < 3e-2,
            "pair {i}: cairn bf16 {a} vs sentence-transformers {b}"
        );
    }
    // int8 (weights per channel, activations per token): close to f32, and at least as
    // close as PyTorch's own dynamic int8 (`quantize_dynamic`) on the same model.
    if !int8_is_fast_here() {
        eprintln!("skipping the int8 half: this CPU lacks AVX512-VNNI, so cairn refuses int8");
        return;
    }
    let int8 = worker_scores(tmp.path(), &model, "int8", &request);
    assert_ne!(int8, ours, "the int8 run computed in f32");
    let max_err = |scores: &[f64]| {
        scores
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max)
    };
    let pytorch_int8: Vec<f64> = serde_json::from_value(theirs_all["int8_scores"].clone()).unwrap();
    assert!(max_err(&int8) < 3e-2, "int8 {int8:?} vs f32 {theirs:?}");
    assert!(
        max_err(&int8) <= max_err(&pytorch_int8).max(2e-3),
        "cairn int8 error {} > PyTorch quantize_dynamic's {}",
        max_err(&int8),
        max_err(&pytorch_int8)
    );
}

fn int8_is_fast_here() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn rag_chat(server: &Server, question: &str, mode: &str) -> Value {
    client(&[&"chat", &server.url, &"twin", &question, &mode])
}

/// RAG end to end over a real collection: self-query by a rule, expansion by an LLM (the
/// local mock, answers cached), reciprocal rank fusion, a cross-encoder rerank; the
/// expected note is retrieved, the order is deterministic and follows the reranker's
/// scores, and the sources and stage times come back in the `cairn` field.
#[test]
fn rag_answers_over_the_collections_with_their_sources() {
    let p = notes_project();
    let tmp = tempfile::tempdir().unwrap();
    let (_, twin) = models(tmp.path());
    let reranker = tmp.path().join("reranker");
    client(&[
        &"make-reranker",
        &reranker,
        &repo().join(".models/all-MiniLM-L6-v2"),
    ]);
    let mock = MockLlm::start();
    let config = |rerank: bool| {
        let mut yaml = format!(
            "collections:\n  - {{name: embedded_notes, k: 3}}\ntop_k: 2\n\
             self_query:\n  rules:\n    - {{field: category, pattern: '(?i)in my (note|article)s'}}\n\
             expansion:\n  n: 2\n  llm: {{base_url: \"{}\", model: mock}}\n",
            mock.base_url
        );
        if rerank {
            yaml.push_str(&format!(
                "rerank: {{model: \"{}\", candidates: 5}}\n",
                reranker.display()
            ));
        }
        yaml
    };
    p.write("fused.yaml", &config(false))
        .write("reranked.yaml", &config(true));
    let question = "how often should I feed the starter for bread, in my notes?";

    let fused_server = start_in(
        Some(&p),
        &[
            &"--model",
            &format!("twin={}", twin.display()),
            &"--rag",
            &"fused.yaml",
        ],
    );
    let first = rag_chat(&fused_server, question, "");
    let show = serde_json::to_string_pretty(&first).unwrap();
    let cairn = &first["cairn"];
    assert_eq!(
        cairn["filters"],
        serde_json::json!([["category", "note"]]),
        "{show}"
    );
    assert_eq!(
        cairn["queries"].as_array().unwrap().len(),
        3,
        "the question and 2 rewrites: {show}"
    );
    let sources = cairn["sources"].as_array().unwrap();
    assert_eq!(sources.len(), 2, "{show}");
    assert_eq!(sources[0]["title"], "Feeding a sourdough starter", "{show}");
    assert!(
        sources[0]["url"]
            .as_str()
            .unwrap()
            .ends_with("sourdough.md"),
        "{show}"
    );
    assert!(sources[0]["fused"].as_f64() >= sources[1]["fused"].as_f64());
    for stage in [
        "self_query",
        "expansion",
        "embed",
        "search",
        "fusion",
        "total",
    ] {
        assert!(
            cairn["retrieval_ms"][stage].as_f64().is_some(),
            "{stage}: {show}"
        );
    }
    // The context went into the prompt.
    let plain = rag_chat(&fused_server, question, "no-rag");
    assert!(plain["cairn"]["sources"].is_null());
    assert!(
        first["usage"].as_u64().unwrap() > plain["usage"].as_u64().unwrap() + 50,
        "{show}"
    );
    // A reply budget that leaves no room for the context: the sources are left out of the
    // prompt, the lowest ranked first, down to the question alone, instead of failing.
    let long = rag_chat(&fused_server, question, "long");
    assert_eq!(long["cairn"]["sources_used"], 0, "{long}");
    assert_eq!(long["cairn"]["sources"], cairn["sources"], "{long}");
    assert!(long["usage"].as_u64().unwrap() < 120, "{long}");
    assert_eq!(first["cairn"]["sources_used"], 2, "{show}");
    // The same question again: the same sources, and the rewrites come from the cache.
    let calls = mock.calls();
    let again = rag_chat(&fused_server, question, "");
    assert_eq!(again["cairn"]["sources"], cairn["sources"]);
    assert_eq!(mock.calls(), calls, "expansion was answered from the cache");
    // A filter that matches nothing leaves no sources (and the model still answers).
    let articles = rag_chat(&fused_server, "what about bread in my articles?", "");
    assert_eq!(
        articles["cairn"]["filters"],
        serde_json::json!([["category", "article"]])
    );
    assert_eq!(articles["cairn"]["sources"], serde_json::json!([]));
    drop(fused_server);

    // Self-query by the LLM: it reads the category from the question.
    p.write(
        "llm_query.yaml",
        &format!(
            "collections: [{{name: embedded_notes, k: 3}}]\n\
             self_query: {{fields: [category], llm: {{base_url: \"{}\", model: mock}}}}\n",
            mock.base_url
        ),
    );
    let llm_server = start_in(
        Some(&p),
        &[
            &"--model",
            &format!("twin={}", twin.display()),
            &"--rag",
            &"llm_query.yaml",
        ],
    );
    let asked = rag_chat(
        &llm_server,
        "which notes mention tomatoes, in my notes?",
        "",
    );
    assert_eq!(
        asked["cairn"]["filters"],
        serde_json::json!([["category", "note"]]),
        "{asked}"
    );
    assert_eq!(
        asked["cairn"]["sources"][0]["title"], "Growing tomatoes on a balcony",
        "{asked}"
    );
    let none = rag_chat(&llm_server, "which ones mention tomatoes?", "");
    assert_eq!(none["cairn"]["filters"], serde_json::json!([]), "{none}");
    drop(llm_server);

    // With the reranker: the kept sources are the candidates ordered by its scores,
    // which are sentence-transformers' scores for those texts; streamed answers carry
    // them too.
    let server = start_in(
        Some(&p),
        &[
            &"--model",
            &format!("twin={}", twin.display()),
            &"--rag",
            &"reranked.yaml",
        ],
    );
    let ranked = rag_chat(&server, question, "stream");
    let show = serde_json::to_string_pretty(&ranked).unwrap();
    let sources = ranked["cairn"]["sources"].as_array().unwrap().clone();
    assert_eq!(sources.len(), 2, "{show}");
    let scores: Vec<f64> = sources
        .iter()
        .map(|s| s["rerank"].as_f64().unwrap())
        .collect();
    assert!(scores[0] >= scores[1], "{show}");
    let texts: Vec<String> = sources
        .iter()
        .map(|s| s["text"].as_str().unwrap().to_string())
        .collect();
    let reference = client(&[
        &"rerank",
        &reranker,
        &question,
        &serde_json::to_string(&texts).unwrap(),
    ]);
    for (ours, theirs) in scores.iter().zip(reference["scores"].as_array().unwrap()) {
        assert!((ours - theirs.as_f64().unwrap()).abs() < 1e-5, "{show}");
    }
    assert!(ranked["cairn"]["retrieval_ms"]["rerank"].as_f64().is_some());
    let again = rag_chat(&server, question, "stream");
    assert_eq!(
        again["cairn"]["sources"], ranked["cairn"]["sources"],
        "deterministic"
    );
}

/// `rag_eval` in a pipeline: questions an `instruct` step made from the notes (on the
/// mock LLM), asked of the collection under every configuration; the report's numbers
/// follow from its per-question ranks, and changing only the reranker's files reruns
/// only `rag_eval`.
#[test]
fn rag_eval_scores_each_configuration_and_reruns_only_for_a_new_reranker() {
    let p = Project::new();
    let tmp = tempfile::tempdir().unwrap();
    let reranker = tmp.path().join("reranker");
    let minilm = repo().join(".models/all-MiniLM-L6-v2");
    client(&[&"make-reranker", &reranker, &minilm]);
    let (_, twin) = models(tmp.path());
    let mock = MockLlm::start();
    p.write("mine/sourdough.md", SOURDOUGH)
        .write("mine/borrow.md", BORROW)
        .write("mine/tomato.md", TOMATO)
        .write(
            "eval.yaml",
            &format!(
                r#"name: rageval
steps:
  mine: {{uses: source, with: {{path: mine}}}}
  docs: {{uses: ingest, inputs: {{files: mine.data}}}}
  chunk: {{uses: chunk, inputs: {{documents: docs.documents}}, with: {{model: "{m}", size: 64}}}}
  embed: {{uses: embed, inputs: {{chunks: chunk.chunks}}, with: {{model: "{m}"}}}}
  vectors: {{uses: vector_load, inputs: {{embeddings: embed.embeddings}}}}
  questions:
    uses: instruct
    inputs: {{documents: docs.documents}}
    # The mock's replies are templated: no decontamination, or little train is left.
    with: {{builder: generate, pairs_per_extract: 2, test_size: 0.2, decontaminate: {{ngram: 0}}, llm: {{base_url: "{llm}", model: mock}}}}
  twin: {{uses: source, with: {{path: "{twin}"}}}}
  eval:
    uses: rag_eval
    inputs: {{questions: questions.dataset, vectors: vectors.receipt, model: twin.data}}
    with:
      split: train
      device: cpu
      answers: {{judge: {{base_url: "{llm}", model: mock}}, max_new_tokens: 8}}
      rag:
        collections: [{{name: embedded_notes, k: 5}}]
        expansion: {{n: 2, llm: {{base_url: "{llm}", model: mock}}}}
        rerank: {{model: "{rr}", candidates: 10}}
"#,
                m = minilm.display(),
                llm = mock.base_url,
                rr = reranker.display(),
                twin = twin.display()
            ),
        );
    let run = p.run("eval.yaml", &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let report = run.output("eval", "report");
    let (code, metrics, err) = p.exec(&["artifacts", "cat", &report, "metrics.json"]);
    assert_eq!(code, 0, "{err}");
    let metrics: Value = serde_json::from_str(&metrics).unwrap();
    let configs = metrics["configurations"].as_object().unwrap();
    assert_eq!(
        configs.keys().collect::<Vec<_>>(),
        ["search", "expansion", "rerank", "expansion+rerank"],
        "{metrics:#}"
    );
    let (_, per_question, _) = p.exec(&["artifacts", "cat", &report, "questions.jsonl"]);
    let rows: Vec<Value> = per_question
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let questions = metrics["questions"].as_u64().unwrap() as usize;
    assert!(questions >= 3, "{metrics:#}");
    assert_eq!(rows.len(), questions * 4);
    for (name, m) in configs {
        // The aggregates follow from the per-question ranks.
        let ranks: Vec<Option<u64>> = rows
            .iter()
            .filter(|r| r["configuration"] == name.as_str())
            .map(|r| r["rank"].as_u64())
            .collect();
        let n = ranks.len() as f64;
        for k in [1u64, 3, 5] {
            let hits = ranks.iter().filter(|r| r.is_some_and(|r| r <= k)).count() as f64;
            let got = m[format!("hit_rate@{k}")].as_f64().unwrap();
            assert!(
                (got - hits / n).abs() < 1e-9,
                "{name} hit_rate@{k}: {got} vs {}",
                hits / n
            );
        }
        let mrr: f64 = ranks
            .iter()
            .map(|r| r.map_or(0.0, |r| 1.0 / r as f64))
            .sum::<f64>()
            / n;
        assert!((m["mrr"].as_f64().unwrap() - mrr).abs() < 1e-9, "{name}");
        // Every answer was judged; the means follow from the per-question scores.
        assert_eq!(m["unjudged"], 0, "{name}: {metrics:#}");
        for key in ["faithfulness", "relevance"] {
            let scores: Vec<f64> = rows
                .iter()
                .filter(|r| r["configuration"] == name.as_str())
                .map(|r| r["judged"][key].as_f64().unwrap())
                .collect();
            assert!(scores.iter().all(|s| (1.0..=5.0).contains(s)), "{scores:?}");
            let mean = scores.iter().sum::<f64>() / scores.len() as f64;
            assert!(
                (m[key].as_f64().unwrap() - mean).abs() < 1e-9,
                "{name} {key}"
            );
        }
    }
    // Three notes on three topics: plain search finds each question's note.
    assert!(
        configs["search"]["hit_rate@5"].as_f64().unwrap() >= 0.99,
        "{metrics:#}"
    );
    assert!(
        configs["search"]["mrr"].as_f64().unwrap() > 0.5,
        "{metrics:#}"
    );
    let (_, html, _) = p.exec(&["artifacts", "cat", &report, "report.html"]);
    assert!(
        html.contains("<svg") && html.contains("expansion+rerank"),
        "{html}"
    );

    // A different reranker (new weights in the same folder): only rag_eval reruns.
    std::fs::remove_dir_all(&reranker).unwrap();
    client(&[&"make-reranker", &reranker, &minilm]);
    let weights = reranker.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let n = bytes.len();
    bytes[n - 8..].copy_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
    std::fs::write(&weights, bytes).unwrap();
    let again = p.run("eval.yaml", &[]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(again.with_status("ran"), ["eval"], "{}", again.stderr);
}

/// `--record`: the session is a run of the `serve` pipeline, every answered request one
/// of its steps with an `exchange` artifact; keys pasted into a prompt never reach the
/// store.
#[test]
fn recorded_traffic_is_a_run_of_the_serve_pipeline_with_secrets_masked() {
    let p = Project::new();
    let tmp = tempfile::tempdir().unwrap();
    let (base, _) = models(tmp.path());
    let server = start_in(
        Some(&p),
        &[&"--model", &format!("base={}", base.display()), &"--record"],
    );
    let secret = "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789";
    client(&[
        &"chat",
        &server.url,
        &"base",
        &format!("my key is {secret}, keep it safe"),
        &"no-rag",
    ]);
    client(&[
        &"chat",
        &server.url,
        &"base",
        &"and a second question",
        &"stream",
    ]);
    server.interrupt();

    let (code, out, err) = p.exec(&["runs", "ls", "--json"]);
    assert_eq!(code, 0, "{err}");
    let runs: Value = serde_json::from_str(&out).unwrap();
    let run = runs
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["run"]["pipeline"] == "serve")
        .unwrap_or_else(|| panic!("no serve run: {runs:#}"));
    assert_eq!(run["run"]["status"], "succeeded", "{run:#}");
    let id = run["run"]["id"].as_str().unwrap();
    let (code, out, err) = p.exec(&["runs", "show", id, "--json"]);
    assert_eq!(code, 0, "{err}");
    let shown: Value = serde_json::from_str(&out).unwrap();
    let steps: Vec<&str> = shown["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["chat-000001", "chat-000002"], "{shown:#}");
    let exchange = shown["steps"][0]["outputs"]["exchange"]["digest"]
        .as_str()
        .unwrap();
    let (code, text, err) = p.exec(&["artifacts", "cat", exchange]);
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("my key is ***, keep it safe"), "{text}");
    let streamed = shown["steps"][1]["outputs"]["exchange"]["digest"]
        .as_str()
        .unwrap();
    let (_, text2, _) = p.exec(&["artifacts", "cat", streamed]);
    assert!(
        text2.contains("and a second question") && text2.contains("finish_reason"),
        "{text2}"
    );
    // Nowhere in the store.
    let grep = Command::new("grep")
        .args(["-r", "-l", secret])
        .arg(p.store())
        .output()
        .unwrap();
    assert!(
        grep.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&grep.stdout)
    );
}
