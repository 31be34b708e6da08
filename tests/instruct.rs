//! The `instruct` step through the real binary against a local OpenAI-compatible server
//! (tests/common/mock_llm.rs): parsing, retries on 429/500, concurrency limit, the call
//! cache (a rerun makes zero calls), cost accounting, dry runs, hard failures; the
//! non-LLM builders and the recipes; and every dataset loaded by Hugging Face `datasets`
//! from the project venv.

mod common;

use std::path::{Path, PathBuf};

use common::mock_llm::MockLlm;
use common::{load_with_hf_datasets, meta_of, repo, run_repo_pipeline, Outcome, Project};
use serde_json::Value;

fn artifact(p: &Project, digest: &str) -> Value {
    let (code, out, err) = p.exec(&["artifacts", "show", digest, "--json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

fn note(i: usize, marker: &str) -> String {
    format!(
        "# Workshop note {i}\n\nNote {i} is about keeping a workshop tidy. {marker} Every tool has a hook, \
         every hook has a label, and the bench is cleared before dinner. A tidy bench turns a weekend \
         project into an evening one, because nothing has to be searched for twice. Note {i} ends here.\n"
    )
}

fn llm_pipeline(base_url: &str, extra_llm: &str) -> String {
    format!(
        r#"name: gen
params: {{test_size: 0.25}}
steps:
  notes: {{uses: source, with: {{path: notes}}}}
  docs: {{uses: ingest, inputs: {{files: notes.data}}}}
  pairs:
    uses: instruct
    inputs: {{documents: docs.documents}}
    with:
      builder: generate
      pairs_per_extract: 2
      test_size: "${{params.test_size}}"
      # The mock's replies are templated (they share 13-grams across notes).
      decontaminate: {{ngram: 0}}
      llm: {{base_url: "{base_url}", model: mock-1, concurrency: 2, api_key_env: CAIRN_TEST_LLM_KEY,
             price_input_per_1m: 1.0, price_output_per_1m: 2.0{extra_llm}}}
"#
    )
}

/// The dataset directory of an artifact and its dataset_info.json.
fn dataset_dir(store: &Path, digest: &str) -> (PathBuf, Value) {
    let dir = store.join("objects").join(&digest[..2]).join(&digest[2..]);
    let info: Value =
        serde_json::from_slice(&std::fs::read(dir.join("dataset_info.json")).unwrap()).unwrap();
    (dir, info)
}

fn assert_loads(store: &Path, digest: &str) -> Value {
    let (dir, info) = dataset_dir(store, digest);
    let loaded = load_with_hf_datasets(&dir);
    let features: Vec<String> = info["features"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let mut features = features;
    features.sort();
    for split in ["train", "test"] {
        let n = info["splits"][split]["num_examples"].as_u64().unwrap();
        if n == 0 {
            continue;
        }
        assert_eq!(
            loaded[split][0].as_u64().unwrap(),
            n,
            "{split} rows of {}",
            dir.display()
        );
        let columns: Vec<String> = serde_json::from_value(loaded[split][1].clone()).unwrap();
        assert_eq!(columns, features, "{split} columns");
    }
    info
}

#[test]
fn generate_retries_limits_caches_and_counts_cost() {
    let server = MockLlm::start();
    let p = Project::new();
    p.write("notes/1.md", &note(1, ""));
    p.write("notes/2.md", &note(2, "MOCK_RATELIMIT"));
    p.write("notes/3.md", &note(3, "MOCK_FLAKY"));
    p.write("notes/4.md", &note(4, "MOCK_MALFORMED"));
    p.write("notes/5.md", &note(5, "MOCK_SLOW"));
    p.write("gen.yaml", &llm_pipeline(&server.base_url, ""));
    let run = |args: &[&str]| -> Outcome {
        let out = p
            .cmd()
            .env("CAIRN_TEST_LLM_KEY", "sk-test-secret")
            .args(["run", "gen.yaml", "--json"])
            .args(args)
            .output()
            .unwrap();
        Outcome::from_output(&out)
    };
    let first = run(&[]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    // 5 requests; one 429 and one 500 retried.
    assert_eq!(server.calls(), 7);
    assert!(
        server.max_in_flight() <= 2,
        "concurrency 2 exceeded: {}",
        server.max_in_flight()
    );
    assert!(server
        .state
        .auth
        .lock()
        .unwrap()
        .iter()
        .all(|a| a == "Bearer sk-test-secret"));
    let digest = first.output("pairs", "dataset");
    let meta = artifact(&p, &digest)["metadata"].clone();
    let llm = &meta["llm"];
    assert_eq!(llm["calls"], 5, "{meta:#}");
    assert_eq!(llm["retries"], 2);
    assert_eq!(llm["cached_calls"], 0);
    let prompt = llm["prompt_tokens"].as_f64().unwrap();
    let completion = llm["completion_tokens"].as_f64().unwrap();
    assert!(prompt > 0.0 && completion > 0.0);
    let cost = llm["cost_usd"].as_f64().unwrap();
    assert!(
        (cost - (prompt * 1.0 + completion * 2.0) / 1e6).abs() < 1e-12,
        "{cost}"
    );
    // 4 well-formed replies x 2 pairs; the malformed one is dropped with its reason.
    assert_eq!(meta["count"], 8, "{meta:#}");
    assert_eq!(
        meta["train"].as_u64().unwrap() + meta["test"].as_u64().unwrap(),
        8
    );
    let dropped = meta["dropped"].as_object().unwrap();
    assert_eq!(dropped.len(), 1, "{dropped:?}");
    assert!(dropped
        .keys()
        .next()
        .unwrap()
        .starts_with("malformed reply: reply is not JSON"));
    // The key never reaches the store.
    let (_, stdout, _) = p.exec(&["artifacts", "show", &digest, "--json"]);
    assert!(!stdout.contains("sk-test-secret"));
    let cache_files = walkdir::WalkDir::new(p.store().join("llm-cache"))
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .count();
    assert_eq!(cache_files, 5);

    // A parameter change reruns the step, but every request is answered from the cache.
    let second = run(&["--set", "test_size=0.5"]);
    assert_eq!(second.code, 0, "{}", second.stderr);
    assert_eq!(second.step("pairs")["status"], "ran");
    assert_eq!(server.calls(), 7, "the rerun called the server");
    let meta2 = artifact(&p, &second.output("pairs", "dataset"))["metadata"].clone();
    assert_eq!(meta2["llm"]["calls"], 0);
    assert_eq!(meta2["llm"]["cached_calls"], 5);
    assert_eq!(meta2["llm"]["cost_usd"], 0.0);
    assert!((meta2["llm"]["saved_usd"].as_f64().unwrap() - cost).abs() < 1e-12);
    assert_eq!(meta2["count"], 8);

    // `artifacts cat` prints the records; HF datasets loads the directory.
    let (code, records, err) = p.exec(&["artifacts", "cat", &digest]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(records.lines().count(), 8);
    let first_record: Value = serde_json::from_str(records.lines().next().unwrap()).unwrap();
    assert!(first_record["instruction"]
        .as_str()
        .unwrap()
        .starts_with("Write a paragraph"));
    let info = assert_loads(&p.store(), &digest);
    assert_eq!(info["format"], "alpaca");
    assert_eq!(info["builder"], "generate");
}

#[test]
fn dry_run_prints_prompts_and_projection_without_calling() {
    let server = MockLlm::start();
    let p = Project::new();
    p.write("notes/1.md", &note(1, ""));
    p.write("notes/2.md", &note(2, ""));
    p.write(
        "gen.yaml",
        &llm_pipeline(&server.base_url, ", max_tokens: 500"),
    );
    let out = p.run("gen.yaml", &["--set", "test_size=0.1"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(server.calls(), 2);
    p.write("notes/3.md", &note(3, ""));
    let yaml = llm_pipeline(&server.base_url, ", max_tokens: 500").replace(
        "pairs_per_extract: 2",
        "pairs_per_extract: 2\n      dry_run: true",
    );
    p.write("dry.yaml", &yaml);
    let dry = p.run("dry.yaml", &[]);
    assert_eq!(dry.code, 1, "a dry run stops the pipeline: {}", dry.stderr);
    assert_eq!(server.calls(), 2, "a dry run made calls");
    let reason = dry.step("pairs")["error"].as_str().unwrap().to_string();
    assert!(
        reason.contains("dry run: 3 requests to mock-1")
            && reason.contains("(2 already cached, 1 to pay)"),
        "{reason}"
    );
    assert!(reason.contains("up to 500 completion tokens"), "{reason}");
    assert!(
        reason.contains("--- prompt 1 of 3 ---") && reason.contains("Extract:\n# Workshop note"),
        "{reason}"
    );
    assert!(reason.contains("set dry_run: false"), "{reason}");
}

#[test]
fn rejected_requests_fail_at_once_with_a_hint() {
    let server = MockLlm::start();
    let p = Project::new();
    p.write("notes/1.md", &note(1, "MOCK_401"));
    p.write("gen.yaml", &llm_pipeline(&server.base_url, ""));
    let out = p.run("gen.yaml", &[]);
    assert_eq!(out.code, 1);
    assert_eq!(server.calls(), 1, "a 401 must not be retried");
    let reason = out.step("pairs")["error"].as_str().unwrap().to_string();
    assert!(
        reason.contains("answered 401") && reason.contains("$CAIRN_TEST_LLM_KEY"),
        "{reason}"
    );
    assert!(
        !p.store().join("llm-cache").exists()
            || walkdir::WalkDir::new(p.store().join("llm-cache"))
                .into_iter()
                .filter_map(Result::ok)
                .all(|e| !e.file_type().is_file())
    );
}

#[test]
fn unreachable_server_gives_up_after_retries() {
    // A port nobody listens on: connection refused, retried, then a clear failure.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let p = Project::new();
    p.write("notes/1.md", &note(1, ""));
    p.write(
        "gen.yaml",
        &llm_pipeline(&format!("http://127.0.0.1:{port}/v1"), ", max_retries: 1"),
    );
    let out = p.run("gen.yaml", &[]);
    assert_eq!(out.code, 1);
    let reason = out.step("pairs")["error"].as_str().unwrap().to_string();
    assert!(
        reason.contains("gave up after 2 attempts") && reason.contains("cannot connect"),
        "{reason}"
    );
}

#[test]
fn invalid_builder_settings_are_rejected_before_anything_runs() {
    let p = Project::new();
    p.write(
        "bad.yaml",
        "name: bad\nsteps:\n  files: {uses: source, with: {path: x}}\n  docs: {uses: ingest, inputs: {files: files.data}}\n  \
         a: {uses: instruct, inputs: {documents: docs.documents}, with: {builder: qa, format: preference}}\n  \
         b: {uses: instruct, inputs: {documents: docs.documents}, with: {builder: generate}}\n  \
         c: {uses: instruct, with: {builder: chat_replies}}\n  \
         d: {uses: instruct, inputs: {documents: docs.documents}, with: {builder: style_pairs, prompt: \"no placeholder\", llm: {base_url: \"localhost:1\"}}}\n",
    );
    let (code, _, err) = p.exec(&["validate", "bad.yaml"]);
    assert_eq!(code, 2, "{err}");
    for needle in [
        "format `preference` does not fit builder `qa`",
        "builder `generate` calls an LLM: add an `llm:` block",
        "missing required input `documents`",
        "the prompt template must contain `{extract}`",
        "`localhost:1` is not an http(s) URL",
    ] {
        assert!(err.contains(needle), "missing `{needle}` in:\n{err}");
    }
    assert!(!p.store().exists(), "validation wrote a store");
}

/// Runs a repository pipeline from the repository root with a temporary store.
#[test]
fn qa_recipe_builds_one_example_per_exchange() {
    let store = tempfile::tempdir().unwrap();
    let out = run_repo_pipeline(store.path(), "pipelines/recipes/qa_advice_column.yaml", &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let digest = out.output("dataset", "dataset");
    let meta = meta_of(store.path(), &digest);
    assert_eq!(meta["count"], 6, "{meta:#}");
    let (dir, info) = dataset_dir(store.path(), &digest);
    let text = std::fs::read_to_string(dir.join("train.jsonl")).unwrap()
        + &std::fs::read_to_string(dir.join("test.jsonl")).unwrap();
    let records: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let flat = records
        .iter()
        .find(|r| r["instruction"].as_str().unwrap().contains("come out flat"))
        .expect("the sourdough question");
    let answer = flat["output"].as_str().unwrap();
    assert!(
        answer.starts_with("Flat loaves usually mean") && !answer.contains("12 Likes"),
        "{answer}"
    );
    assert_eq!(info["test_size"], 0.2);
    assert_loads(store.path(), &digest);
    assert_trained(store.path(), &out, "twin", "evaluate");
}

/// The recipe's model trained for its 40 steps and its report scored the test split;
/// returns the report's metadata.
fn assert_trained(store: &Path, out: &Outcome, train: &str, evaluate: &str) -> Value {
    let model = meta_of(store, &out.output(train, "model"));
    assert_eq!(model["steps"], 40, "{model:#}");
    assert_eq!(model["curve"].as_array().unwrap().len(), 40);
    let report = meta_of(store, &out.output(evaluate, "report"));
    let m = &report["models"]["model"];
    assert!(
        m["perplexity"]
            .as_f64()
            .is_some_and(|p| p.is_finite() && p > 1.0),
        "{report:#}"
    );
    assert!(m["answers"].as_u64().unwrap() > 0, "{report:#}");
    report
}

#[test]
fn chat_twin_recipe_with_retrieval_and_window_context() {
    let store = tempfile::tempdir().unwrap();
    let out = run_repo_pipeline(store.path(), "pipelines/recipes/chat_twin.yaml", &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let retrieval = out.output("dataset", "dataset");
    let meta = meta_of(store.path(), &retrieval);
    // Maya writes 15 messages, all after someone else spoke.
    assert_eq!(meta["count"], 15, "{meta:#}");
    assert_eq!(meta["role_tokens"]["Maya"], "<TWIN>");
    assert_eq!(meta["role_tokens"]["Jonas"], "<USR_B>");
    assert!(
        meta["retrieval_model"]
            .as_str()
            .unwrap()
            .contains("all-MiniLM-L6-v2"),
        "{meta:#}"
    );
    let (dir, _) = dataset_dir(store.path(), &retrieval);
    let all: Vec<Value> = ["train.jsonl", "test.jsonl"]
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(dir.join(f))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect::<Vec<Value>>()
        })
        .collect();
    let reply = all
        .iter()
        .find(|r| {
            r["messages"][2]["content"]
                == "Then feed it the night before and try again. Flat starter, flat bread."
        })
        .expect("the flat-bread reply");
    let context = reply["messages"][1]["content"].as_str().unwrap();
    assert_eq!(reply["messages"][0]["role"], "system");
    assert_eq!(reply["messages"][2]["role"], "assistant");
    let lines: Vec<&str> = context.lines().collect();
    // <SYS> line, top_k = 3 retrieved messages, then the message being answered.
    assert_eq!(lines.len(), 5, "{context}");
    assert!(lines[0].starts_with("<SYS> Maya chats with friends"));
    assert_eq!(lines[4], "<USR_C> It was a bit flat too, honestly.");
    // Retrieval picks the earlier bread messages over the cycling talk.
    assert!(
        context.contains("<USR_C> My bread came out flat again."),
        "{context}"
    );
    assert_loads(store.path(), &retrieval);
    assert_trained(store.path(), &out, "twin", "evaluate");

    let window = run_repo_pipeline(
        store.path(),
        "pipelines/recipes/chat_twin.yaml",
        &["--set", "context=window"],
    );
    assert_eq!(window.code, 0, "{}", window.stderr);
    let wmeta = meta_of(store.path(), &window.output("dataset", "dataset"));
    assert_eq!(wmeta["count"], 15);
    assert!(wmeta.get("retrieval_model").is_none());
    let (wdir, _) = dataset_dir(store.path(), &window.output("dataset", "dataset"));
    let wtext = std::fs::read_to_string(wdir.join("train.jsonl")).unwrap()
        + &std::fs::read_to_string(wdir.join("test.jsonl")).unwrap();
    let wreply: Value = wtext
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|r| r["messages"][2]["content"] == reply["messages"][2]["content"])
        .unwrap();
    let wcontext = wreply["messages"][1]["content"].as_str().unwrap();
    // The window: the 6 messages right before the reply (the cycling talk is out of reach).
    assert_eq!(wcontext.lines().count(), 7, "{wcontext}");
    assert!(
        !wcontext.contains("tram") && wcontext.contains("No tags? No recommendations?"),
        "{wcontext}"
    );
    assert_ne!(wcontext, context);
}

#[test]
fn blog_style_transfer_recipe_crawls_and_calls_the_llm_once_per_variant() {
    let server = MockLlm::start_on(
        "127.0.0.1:0",
        Some(repo().join("pipelines/recipes/data/blog")),
    );
    let site = server.base_url.trim_end_matches("v1").to_string();
    let store = tempfile::tempdir().unwrap();
    let set_site = format!("site={site}");
    let set_llm = format!("llm_url={}", server.base_url);
    let out = run_repo_pipeline(
        store.path(),
        "pipelines/recipes/blog_style_transfer.yaml",
        &["--set", &set_site, "--set", &set_llm],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let meta = meta_of(store.path(), &out.output("style_pairs", "dataset"));
    let requests = meta["llm"]["requests"].as_u64().unwrap();
    let extracts = meta["llm"]["extracts"].as_u64().unwrap();
    assert!(extracts >= 3, "{meta:#}");
    assert_eq!(requests, extracts * 3);
    // Every variant of every extract is kept (the original recurs, the rewrites differ),
    // except train variants whose original is also a test target (decontamination).
    let left_out = meta["decontamination"]["with_test"].as_u64().unwrap();
    assert_eq!(
        meta["count"].as_u64().unwrap() + left_out,
        requests,
        "{meta:#}"
    );
    // Identical chunks (a page's text repeated on the index) are answered once.
    let calls = meta["llm"]["calls"].as_u64().unwrap();
    assert_eq!(
        calls + meta["llm"]["cached_calls"].as_u64().unwrap(),
        requests
    );
    let report = assert_trained(store.path(), &out, "rewriter", "evaluate");
    let judge = &report["judge"];
    assert_eq!(
        report["models"]["model"]["judged"],
        judge["calls"].as_u64().unwrap() + judge["cached_calls"].as_u64().unwrap()
    );
    assert_eq!(
        server.calls() as u64,
        calls + judge["calls"].as_u64().unwrap()
    );
    let (dir, info) = dataset_dir(store.path(), &out.output("style_pairs", "dataset"));
    assert_eq!(info["format"], "messages");
    let record: Value = serde_json::from_str(
        std::fs::read_to_string(dir.join("train.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        record["messages"][0]["content"],
        "Rewrite this in the author's style."
    );
    assert!(
        record["messages"][2]["content"].as_str().unwrap().len()
            > record["messages"][1]["content"].as_str().unwrap().len() / 2
    );
    assert_loads(store.path(), &out.output("style_pairs", "dataset"));
}

#[test]
fn generate_datasets_pipeline_merges_every_builder() {
    let server = MockLlm::start();
    let store = tempfile::tempdir().unwrap();
    let set_llm = format!("llm_url={}", server.base_url);
    let out = run_repo_pipeline(
        store.path(),
        "pipelines/generate_datasets.yaml",
        &["--set", &set_llm],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let merged = meta_of(store.path(), &out.output("dataset", "dataset"));
    let counts = merged["counts"].as_object().unwrap();
    for builder in ["qa/", "chat_replies/", "generate/"] {
        assert!(
            counts.keys().any(|k| k.starts_with(builder)),
            "no {builder} in {counts:?}"
        );
    }
    let parts: u64 = ["qa", "chat", "generated"]
        .iter()
        .map(|s| {
            meta_of(store.path(), &out.output(s, "dataset"))["count"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert_eq!(
        merged["count"].as_u64().unwrap() + merged["dropped"]["exact duplicate"].as_u64().unwrap(),
        parts
    );
    assert_loads(store.path(), &out.output("dataset", "dataset"));
    let preference = out.output("preference", "dataset");
    let pmeta = meta_of(store.path(), &preference);
    assert!(pmeta["count"].as_u64().unwrap() > 0, "{pmeta:#}");
    let info = assert_loads(store.path(), &preference);
    assert_eq!(info["format"], "preference");
    // Everything again: all cached, no calls.
    let calls = server.calls();
    let again = run_repo_pipeline(
        store.path(),
        "pipelines/generate_datasets.yaml",
        &["--set", &set_llm],
    );
    assert_eq!(again.code, 0);
    assert_eq!(server.calls(), calls);
}

/// A Q&A transcript with exchanges that repeat a benchmark's passage, pairs that share a
/// 13-gram, and plain ones; `evals/bench.jsonl` holds the benchmark. Returns the project,
/// the benchmark text and the number of exchanges.
fn contamination_project() -> (Project, &'static str, usize) {
    const WORDS: [&str; 24] = [
        "amber", "birch", "cedar", "delta", "ember", "fjord", "grove", "heron", "inlet", "juniper",
        "kelp", "larch", "maple", "nettle", "orchid", "pine", "quartz", "reed", "sorrel",
        "thistle", "umber", "violet", "willow", "yarrow",
    ];
    // Words no other exchange uses: exchange i, word j.
    let unique = |i: usize, n: usize| -> String {
        (0..n)
            .map(|j| format!("{}{}", WORDS[(i + j) % WORDS.len()], i * 100 + j))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let bench = "the quick benchmark passage asks which river carries the most sediment into the northern delta each spring";
    let mut transcript = String::new();
    let mut n = 0;
    let mut exchange = |q: String, a: String| {
        transcript.push_str(&format!("QUESTION: {q}\nANSWER: {a}\n\n"));
        n += 1;
    };
    for i in 0..10 {
        exchange(
            format!("Benchmark-like question {i}?"),
            format!("{} {bench}.", unique(i, 6)),
        );
    }
    for j in 0..10 {
        let shared = unique(500 + j, 15);
        exchange(
            format!("First of pair {j}?"),
            format!("{shared} {}.", unique(600 + j, 15)),
        );
        exchange(
            format!("Second of pair {j}?"),
            format!("{shared} {}.", unique(700 + j, 15)),
        );
    }
    for i in 0..20 {
        exchange(
            format!("Plain question {i}?"),
            format!("{}.", unique(800 + i, 20)),
        );
    }
    let p = Project::new();
    p.write("qa/session.txt", &transcript);
    p.write(
        "evals/bench.jsonl",
        &format!("{}\n", serde_json::json!({"question": bench, "id": 7})),
    );
    (p, bench, n)
}

/// Word 13-grams, as decontamination counts them.
fn grams13(text: &str) -> std::collections::HashSet<String> {
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    words.windows(13).map(|w| w.join(" ")).collect()
}

/// Runs `on.yaml` (decontamination against `evals/bench.jsonl`) and `off.yaml`
/// (`ngram: 0`) of a project from [`contamination_project`] and checks `step`'s dataset:
/// without decontamination it holds all `n` examples; with it, some are left out for the
/// test split and some for the benchmark, counted, the test split is the same, and nothing
/// left in train (read as text by `text_of`) shares a 13-gram with test or the benchmark.
fn assert_train_decontaminated(
    p: &Project,
    step: &str,
    bench: &str,
    n: usize,
    text_of: fn(&Value) -> String,
) {
    let off = p.run("off.yaml", &[]);
    assert_eq!(off.code, 0, "{}", off.stderr);
    let off_meta = artifact(p, &off.output(step, "dataset"))["metadata"].clone();
    assert_eq!(
        off_meta["count"].as_u64().unwrap(),
        n as u64,
        "{off_meta:#}"
    );

    let on = p.run("on.yaml", &[]);
    assert_eq!(on.code, 0, "{}", on.stderr);
    let digest = on.output(step, "dataset");
    let meta = artifact(p, &digest)["metadata"].clone();
    let d = &meta["decontamination"];
    let (with_test, with_bench) = (
        d["with_test"].as_u64().unwrap(),
        d["with_benchmarks"].as_u64().unwrap(),
    );
    assert!(with_test >= 1 && with_bench >= 1, "{meta:#}");
    assert_eq!(
        meta["train"].as_u64().unwrap() + meta["test"].as_u64().unwrap() + with_test + with_bench,
        n as u64
    );
    assert_eq!(
        meta["test"], off_meta["test"],
        "the test split is never touched"
    );

    let (dir, info) = dataset_dir(&p.store(), &digest);
    assert_eq!(info["decontamination"]["ngram"], 13);
    let read = |file: &str| -> Vec<String> {
        std::fs::read_to_string(dir.join(file))
            .unwrap()
            .lines()
            .map(|l| text_of(&serde_json::from_str(l).unwrap()))
            .collect()
    };
    let mut forbidden = grams13(bench);
    for t in read("test.jsonl") {
        forbidden.extend(grams13(&t));
    }
    for t in read("train.jsonl") {
        assert!(
            grams13(&t).is_disjoint(&forbidden),
            "contaminated train example: {t}"
        );
    }
}

/// Decontamination: training examples that share a 13-gram with the test split or with a
/// benchmark file are left out of train, counted; none of what remains in train overlaps;
/// `ngram: 0` keeps everything.
#[test]
fn decontamination_keeps_test_and_benchmark_text_out_of_train() {
    let (p, bench, n) = contamination_project();
    let pipeline = |decontaminate: &str| {
        format!(
            "name: decon\nsteps:\n  qa_files: {{uses: source, with: {{path: qa}}}}\n  \
             docs: {{uses: ingest, inputs: {{files: qa_files.data}}, with: {{format: qa}}}}\n  \
             data: {{uses: instruct, inputs: {{documents: docs.documents}}, with: {{builder: qa, test_size: 0.5, decontaminate: {decontaminate}}}}}\n"
        )
    };
    p.write("on.yaml", &pipeline("{benchmarks: [evals/bench.jsonl]}"));
    p.write("off.yaml", &pipeline("{ngram: 0}"));
    assert_train_decontaminated(&p, "data", bench, n, |v| {
        let field = |k: &str| v[k].as_str().unwrap_or("").to_string();
        format!("{}\n{}", field("instruction"), field("output"))
    });

    // A bad n-gram length is refused before anything runs.
    p.write("bad.yaml", &pipeline("{ngram: 2}"));
    let (code, _, err) = p.exec(&["validate", "bad.yaml"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("ngram 2 is outside 5..50"), "{err}");
}

/// `dataset_merge` re-splits, so it decontaminates the new train split against the new
/// test split and the benchmark (messages format: the records are read back into
/// examples); `ngram: 0` keeps everything.
#[test]
fn dataset_merge_decontaminates_its_own_split() {
    let (p, bench, n) = contamination_project();
    let pipeline = |decontaminate: &str| {
        format!(
            "name: merged\nsteps:\n  qa_files: {{uses: source, with: {{path: qa}}}}\n  \
             docs: {{uses: ingest, inputs: {{files: qa_files.data}}, with: {{format: qa}}}}\n  \
             data: {{uses: instruct, inputs: {{documents: docs.documents}}, with: {{builder: qa, format: messages, test_size: 0.2, decontaminate: {{ngram: 0}}}}}}\n  \
             all: {{uses: dataset_merge, inputs: {{qa: data.dataset}}, with: {{test_size: 0.5, decontaminate: {decontaminate}}}}}\n"
        )
    };
    p.write("on.yaml", &pipeline("{benchmarks: [evals/bench.jsonl]}"));
    p.write("off.yaml", &pipeline("{ngram: 0}"));
    assert_train_decontaminated(&p, "all", bench, n, |v| {
        let turns = v["messages"].as_array().unwrap();
        let content = |i: usize| turns[i]["content"].as_str().unwrap().to_string();
        format!("{}\n{}", content(0), content(turns.len() - 1))
    });
}
