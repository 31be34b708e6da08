//! Fine-tuning, evaluation and generation through the real binaries: cairn's tch decoders
//! against transformers/PEFT from the project venv (forward logits, one AdamW step, LoRA
//! adapters and merged weights), the `finetune` -> `evaluate` pipeline with a judge on the
//! local mock LLM, resuming a killed training run, early stopping, `cairn generate`, and
//! parameter errors.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::mock_llm::MockLlm;
use common::{load_with_hf_datasets, meta_of, repo, run_repo_pipeline, Project};
use serde_json::{json, Value};

/// Runs tests/parity/decoder.py in the project venv; returns its last stdout line as JSON.
fn reference(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Value {
    common::venv_script("tests/parity/decoder.py", args)
}

fn torch_helper(args: &[&dyn AsRef<std::ffi::OsStr>]) -> (bool, Vec<Value>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cairn-torch"))
        .args(args.iter().map(|a| a.as_ref()))
        .output()
        .unwrap();
    let events = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    (
        out.status.success(),
        events,
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn finished(events: &[Value]) -> Value {
    events
        .iter()
        .find_map(|e| e.get("finished").cloned())
        .unwrap_or_else(|| panic!("no finished event in {events:?}"))
}

/// Deterministic token ids [2, seq] < 256, as safetensors `input_ids`.
fn write_ids(path: &Path, seq: usize) {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let ids: Vec<i64> = (0..2 * seq)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 256) as i64
        })
        .collect();
    let bytes: Vec<u8> = ids.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![2, seq], &bytes)
        .unwrap();
    safetensors::tensor::serialize_to_file([("input_ids", view)], None, path).unwrap();
}

/// A small preference dataset (prompt, chosen, rejected): four training pairs, two test
/// pairs.
fn write_preferences(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let recs: Vec<String> = (0..6)
        .map(|i| {
            json!({"prompt": format!("Q{i}: how do I fix a flat tyre? "),
            "chosen": format!("Patch the tube, then pump it to {} psi.", 30 + i),
            "rejected": format!("Buy a new bike {i}.")})
            .to_string()
        })
        .collect();
    std::fs::write(dir.join("train.jsonl"), recs[..4].join("\n") + "\n").unwrap();
    std::fs::write(dir.join("test.jsonl"), recs[4..].join("\n") + "\n").unwrap();
}

/// A small alpaca dataset artifact layout (train/test JSONL).
fn write_dataset(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let recs: Vec<String> = (0..12)
        .map(|i| json!({"instruction": format!("What is {i} plus {i}?"), "input": "", "output": format!("It is {}. Check sums twice.", 2 * i)}).to_string())
        .collect();
    std::fs::write(dir.join("train.jsonl"), recs[..9].join("\n") + "\n").unwrap();
    std::fs::write(dir.join("test.jsonl"), recs[9..].join("\n") + "\n").unwrap();
}

fn cairn_logits(model: &Path, ids: &Path, out: &Path) {
    cairn_logits_in(model, ids, out, "f32");
}

fn cairn_logits_in(model: &Path, ids: &Path, out: &Path, dtype: &str) {
    let (ok, events, stderr) = torch_helper(&[
        &"logits",
        &"--model",
        &model,
        &"--input",
        &ids,
        &"--output",
        &out,
        &"--dtype",
        &dtype,
    ]);
    assert!(ok, "cairn-torch logits failed: {events:?} {stderr}");
}

/// cairn's bf16 logits are as close to transformers' f32 ones as transformers' own bf16
/// run is (the issue's yardstick), with a little slack for a different order of
/// rounding, and at least half as far (so the run really computed in bf16); the report
/// is printed for the record.
fn assert_bf16_parity(what: &str, r: &Value) {
    let ours = r["max_abs_diff"].as_f64().unwrap();
    let theirs = r["hf_bf16_vs_f32"].as_f64().unwrap();
    eprintln!("{what}: bf16 vs f32 logits: cairn {ours:.5}, transformers {theirs:.5}; cairn vs transformers bf16 {:.5}", r["vs_hf_bf16"]);
    assert!(
        theirs > 0.0,
        "{what}: transformers' bf16 run equals its f32 run: {r}"
    );
    assert!(
        ours <= 1.5 * theirs,
        "{what}: cairn's bf16 logits are {ours} from transformers' f32 ones, transformers' own bf16 run {theirs}"
    );
    assert!(
        ours >= 0.5 * theirs,
        "{what}: cairn's bf16 logits are only {ours} from the f32 ones (transformers' bf16 run: {theirs}): not computed in bf16?"
    );
}

/// Random tiny models of `archs` under `root/<arch>` (tests/parity/decoder.py make).
fn make_models(root: &Path, archs: &[&str]) {
    let mut make: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"make", &root];
    make.extend(archs.iter().map(|a| a as &dyn AsRef<std::ffi::OsStr>));
    reference(&make);
}

/// The per-step training losses of a finished event.
fn losses(finished: &Value) -> Vec<f64> {
    finished["curve"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["loss"].as_f64().unwrap())
        .collect()
}

/// A tiny random Llama in `root/llama`, the small alpaca dataset in `root/ds`, and token
/// ids [2, 40] to compare logits on (returned).
fn tiny_llama_with_data(root: &Path) -> PathBuf {
    reference(&[&"make", &root, &"llama"]);
    write_dataset(&root.join("ds"));
    let ids = root.join("ids.safetensors");
    write_ids(&ids, 40);
    ids
}

#[test]
fn decoder_logits_match_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let archs = [
        "gpt2", "llama", "llama3", "qwen2", "qwen3", "mistral", "phi3", "phi3long", "gemma",
        "gemma2", "gemma3",
    ];
    make_models(root, &archs);
    // 100 positions: rotary angles and learned positions well past the first few (and,
    // for llama3's and longrope's scaling, past their original 32-position context).
    let ids = root.join("ids.safetensors");
    write_ids(&ids, 100);
    for arch in archs {
        let ours = root.join(format!("{arch}.logits.safetensors"));
        cairn_logits(&root.join(arch), &ids, &ours);
        let r = reference(&[&"check-logits", &root.join(arch), &ids, &ours]);
        assert_eq!(r["shape"], json!([2, 100, 259]), "{arch}");
        let diff = r["max_abs_diff"].as_f64().unwrap();
        assert!(
            diff < 1e-4,
            "{arch}: cairn's logits differ from transformers' by {diff}"
        );
    }
}

/// Greedy decoding with the KV cache (past the 16-token sliding windows) gives the tokens
/// transformers' `generate` gives, for every family.
#[test]
fn greedy_generation_matches_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // phi3long: the prompt fits its 32-position original context, the reply crosses it
    // (the rotary factors switch from short to long mid-generation, as in transformers).
    // t5/flan_t5: the prompt is the source, the reply decoded with self- and
    // cross-attention caches.
    let archs = [
        "gpt2", "llama3", "qwen2", "qwen3", "mistral", "phi3", "phi3long", "gemma", "gemma2",
        "gemma3", "t5", "flan_t5",
    ];
    make_models(root, &archs);
    let prompt = "Dear diary, today the twin wrote";
    let settings = json!({"max_new_tokens": 32, "temperature": 0.0, "top_k": 0, "top_p": 1.0,
        "repetition_penalty": 1.0})
    .to_string();
    for arch in archs {
        let out = Command::new(env!("CARGO_BIN_EXE_cairn-torch"))
            .args(["generate", "--raw", "--device", "cpu", "--prompt", prompt])
            .arg("--model")
            .arg(root.join(arch))
            .args(["--settings", &settings])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{arch}: {stderr}");
        let ours = String::from_utf8_lossy(&out.stdout);
        let theirs = reference(&[&"greedy", &root.join(arch), &prompt, &"32"]);
        assert!(
            stderr.contains(&format!("[{} tokens", theirs["tokens"])),
            "{arch}: transformers generated {} tokens; cairn: {stderr}",
            theirs["tokens"]
        );
        assert_eq!(
            ours.strip_suffix('\n').unwrap_or(&ours),
            theirs["text"].as_str().unwrap(),
            "{arch}"
        );
    }
}

#[test]
fn bf16_weights_match_transformers_bf16_run() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let archs = ["gpt2", "llama3", "qwen3", "mistral", "gemma2", "gemma3"];
    make_models(root, &archs);
    let ids = root.join("ids.safetensors");
    write_ids(&ids, 100);
    for arch in archs {
        let ours = root.join(format!("{arch}.bf16.safetensors"));
        cairn_logits_in(&root.join(arch), &ids, &ours, "bf16");
        let r = reference(&[&"check-logits", &root.join(arch), &ids, &ours, &"bf16"]);
        assert_bf16_parity(arch, &r);
    }
}

/// Encoder-decoder inputs as safetensors: `input_ids` [2, 40] whose second row is
/// padding after 30 tokens (`attention_mask`), and `decoder_input_ids` [2, 24] starting
/// with T5's start token.
fn write_seq2seq_ids(path: &Path) {
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        3 + (x % 256) as i64
    };
    let source: Vec<i64> = (0..80).map(|_| next()).collect();
    let mask: Vec<i64> = (0..80).map(|i| i64::from(i < 70)).collect();
    let decoder: Vec<i64> = (0..48)
        .map(|i| if i % 24 == 0 { 0 } else { next() })
        .collect();
    let bytes = |v: &[i64]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let (s, m, d) = (bytes(&source), bytes(&mask), bytes(&decoder));
    fn view(b: &[u8], shape: Vec<usize>) -> safetensors::tensor::TensorView<'_> {
        safetensors::tensor::TensorView::new(safetensors::Dtype::I64, shape, b).unwrap()
    }
    safetensors::tensor::serialize_to_file(
        [
            ("input_ids", view(&s, vec![2, 40])),
            ("attention_mask", view(&m, vec![2, 40])),
            ("decoder_input_ids", view(&d, vec![2, 24])),
        ],
        None,
        path,
    )
    .unwrap();
}

/// T5 v1.0 (ReLU, tied and scaled head) and Flan-T5 (gated GELU, its own head, a deeper
/// decoder) against transformers: padded sources, relative-position buckets past the
/// exact range, f32 and bf16 weights.
#[test]
fn t5_logits_match_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    make_models(root, &["t5", "flan_t5"]);
    let ids = root.join("ids.safetensors");
    write_seq2seq_ids(&ids);
    for arch in ["t5", "flan_t5"] {
        let ours = root.join(format!("{arch}.logits.safetensors"));
        cairn_logits(&root.join(arch), &ids, &ours);
        let r = reference(&[&"check-logits", &root.join(arch), &ids, &ours]);
        assert_eq!(r["shape"], json!([2, 24, 259]), "{arch}");
        let diff = r["max_abs_diff"].as_f64().unwrap();
        assert!(
            diff < 1e-4,
            "{arch}: cairn's logits differ from transformers' by {diff}"
        );
        let bf16 = root.join(format!("{arch}.bf16.safetensors"));
        cairn_logits_in(&root.join(arch), &ids, &bf16, "bf16");
        let r = reference(&[&"check-logits", &root.join(arch), &ids, &bf16, &"bf16"]);
        assert_bf16_parity(arch, &r);
    }
}

/// Seq2seq training: one full AdamW step equals torch's on the same batch (source =
/// prompt, target = response); LoRA on attention and feed-forward trains, and its adapter
/// loads in PEFT (task SEQ_2_SEQ_LM) with cairn's logits; QLoRA over NF4 trains too.
#[test]
fn t5_seq2seq_training_matches_torch_and_loads_in_peft() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    make_models(root, &["t5", "flan_t5"]);
    write_dataset(&root.join("ds"));
    let ids = root.join("ids.safetensors");
    write_seq2seq_ids(&ids);
    let settings = json!({"learning_rate": 1e-3, "weight_decay": 0.1, "scheduler": "constant",
        "batch_size": 2, "grad_accum": 2, "max_steps": 1, "max_grad_norm": 0.5, "device": "cpu",
        "max_seq_len": 200, "eval_every": 0, "checkpoint_every": 0});
    for arch in ["t5", "flan_t5"] {
        let batch = root.join(format!("{arch}.batch.safetensors"));
        let out = format!("step-{arch}");
        let job = train_job(root, &root.join(arch), &out, settings.clone(), Some(&batch));
        let (ok, events, stderr) = torch_helper(&[&"train", &"--job", &job]);
        assert!(ok, "{events:?} {stderr}");
        let (diff, update) = step_vs_torch(
            &root.join(arch),
            &batch,
            &root.join(&out).join("model.safetensors"),
        );
        assert!(
            update > 5e-4,
            "{arch}: the step barely moved the weights ({update})"
        );
        assert!(
            diff < 1e-5,
            "{arch}: cairn's seq2seq AdamW step differs from torch's by {diff} (step size {update})"
        );
    }

    let targets = json!(["q", "k", "v", "o", "wi_0", "wi_1", "wo"]);
    for (out, extra) in [
        ("lora", json!({})),
        ("qlora", json!({"quantize": "nf4", "dtype": "bf16"})),
    ] {
        let mut settings = json!({"method": "lora",
            "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "merge": true, "target_modules": targets},
            "learning_rate": 1e-2, "max_steps": 6, "batch_size": 4, "device": "cpu", "max_seq_len": 200,
            "eval_every": 0, "checkpoint_every": 0});
        for (k, v) in extra.as_object().unwrap() {
            settings[k] = v.clone();
        }
        let job = train_job(root, &root.join("flan_t5"), out, settings, None);
        let (ok, events, stderr) = torch_helper(&[&"train", &"--job", &job]);
        assert!(ok, "{out}: {events:?} {stderr}");
        let f = finished(&events);
        let losses = losses(&f);
        assert!(
            losses.last().unwrap() < &(losses[0] - 0.5),
            "{out}: the loss did not go down: {losses:?}"
        );
        if out == "qlora" {
            assert!(f["quantized_bytes"].as_i64().unwrap() > 0, "{f}");
            continue;
        }
        let dir = root.join(out);
        let config: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(config["task_type"], "SEQ_2_SEQ_LM");
        let ours = root.join("lora.logits.safetensors");
        cairn_logits(&dir, &ids, &ours);
        let peft = reference(&[&"check-logits", &dir, &ids, &ours, &"peft"]);
        assert!(
            peft["max_abs_diff"].as_f64().unwrap() < 1e-4,
            "PEFT vs cairn: {peft}"
        );
        let merged = reference(&[&"check-logits", &dir.join("merged"), &ids, &ours]);
        assert!(
            merged["max_abs_diff"].as_f64().unwrap() < 1e-4,
            "merged vs cairn: {merged}"
        );
        let base = reference(&[&"check-logits", &root.join("flan_t5"), &ids, &ours]);
        assert!(
            base["max_abs_diff"].as_f64().unwrap() > 1e-3,
            "LoRA left the model unchanged: {base}"
        );
    }
}

/// cairn's weights after one AdamW step (`weights`) against torch's step from `model` on
/// the dumped `batch` (learning rate 1e-3, weight decay 0.1, clipping at 0.5, the step
/// tests' settings): (largest difference, largest update).
fn step_vs_torch(model: &Path, batch: &Path, weights: &Path) -> (f64, f64) {
    let r = reference(&[
        &"check-step",
        &model,
        &batch,
        &weights,
        &json!({"learning_rate": 1e-3, "weight_decay": 0.1, "adam_beta1": 0.9, "adam_beta2": 0.999,
                "adam_epsilon": 1e-8, "max_grad_norm": 0.5})
        .to_string(),
    ]);
    assert_eq!(r["only_cairn"], json!([]), "{}: {r}", model.display());
    (
        r["max_abs_diff"].as_f64().unwrap(),
        r["max_update"].as_f64().unwrap(),
    )
}

/// Runs `cairn-torch train` on `job` and returns its finished event.
fn train(job: &Path) -> Value {
    let (ok, events, stderr) = torch_helper(&[&"train", &"--job", &job]);
    assert!(ok, "{events:?} {stderr}");
    finished(&events)
}

/// cairn's DPO/ORPO step metrics against TRL's logged ones, step by step, within 1e-5
/// (relative for the summed log-probabilities, which are in the hundreds).
fn assert_preference_metrics_match(what: &str, ours: &Value, trl: &Value) {
    let trl = trl["steps"].as_array().unwrap();
    let ours = ours["curve"].as_array().unwrap();
    assert_eq!(ours.len(), trl.len(), "{what}");
    for (o, t) in ours.iter().zip(trl) {
        for key in [
            "loss",
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
            "rewards/accuracies",
            "logps/chosen",
            "logps/rejected",
            "nll_loss",
            "log_odds_ratio",
            "log_odds_chosen",
        ] {
            if t.get(key).is_none() {
                // ORPO's own terms: absent from DPO's logs (and cairn's DPO metrics).
                assert!(o["preference"].get(key).is_none(), "{what}: {key}");
                continue;
            }
            let (a, b) = (
                o["preference"][key].as_f64().unwrap(),
                t[key].as_f64().unwrap(),
            );
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "{what}, step {}: {key} is {a} in cairn, {b} in TRL",
                t["step"]
            );
        }
        assert_eq!(o["loss"], o["preference"]["loss"], "{what}");
    }
    let last = &trl[trl.len() - 1];
    assert!(
        last["rewards/margins"].as_f64().unwrap() > 0.01,
        "{what}: the last step compares trained weights: {last}"
    );
}

/// The largest difference between the tensors of two safetensors files (every tensor of
/// `ours` must be in `theirs`).
fn max_tensor_diff(ours: &Path, theirs: &Path) -> f64 {
    let r = Command::new(repo().join(".venv/bin/python"))
        .args(["-c", "import sys, json\nfrom safetensors.torch import load_file\na, b = load_file(sys.argv[1]), load_file(sys.argv[2])\nmissing = sorted(set(a) - set(b))\nassert not missing, missing\nprint(max((a[k].float() - b[k].float()).abs().max().item() for k in a))"])
        .arg(ours)
        .arg(theirs)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    String::from_utf8_lossy(&r.stdout).trim().parse().unwrap()
}

/// DPO and ORPO against TRL's DPOTrainer and ORPOTrainer on the same pairs (one batch
/// of four, two steps): the loss, rewards and log-probabilities of each step within 1e-5
/// and the weights after them within 1e-5, for full fine-tuning (DPO's sigmoid and IPO
/// losses, the reference a frozen copy; ORPO) and for LoRA continuing an SFT adapter (the
/// reference: that adapter as it came in, TRL's `ref` adapter).
#[test]
fn preference_objectives_match_trl() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    make_models(root, &["llama"]);
    write_preferences(&root.join("ds"));
    let base = root.join("llama");
    let settings = |extra: Value| {
        let mut s = json!({"objective": "dpo", "beta": 0.1, "learning_rate": 1e-3, "weight_decay": 0.0,
            "scheduler": "constant", "batch_size": 4, "max_steps": 2, "max_grad_norm": 1.0, "device": "cpu",
            "template": "{instruction}{output}", "max_seq_len": 512, "eval_every": 0, "checkpoint_every": 0});
        for (k, v) in extra.as_object().unwrap() {
            s[k] = v.clone();
        }
        s
    };
    let trl = |objective: &str, model: &Path, extra: Value, out: &Path| {
        let mut s = json!({"steps": 2, "learning_rate": 1e-3, "max_grad_norm": 1.0, "beta": 0.1});
        for (k, v) in extra.as_object().unwrap() {
            s[k] = v.clone();
        }
        reference(&[
            &objective,
            &model,
            &root.join("ds/train.jsonl"),
            &s.to_string(),
            &out,
        ])
    };
    // (objective, loss, reference log-probabilities computed before training)
    for (objective, loss, precompute) in [
        ("dpo", "sigmoid", false),
        ("dpo", "ipo", false),
        ("dpo", "sigmoid", true),
        ("orpo", "sigmoid", false),
    ] {
        let out = format!("{objective}-{loss}-{precompute}");
        let f = train(&train_job(
            root,
            &base,
            &out,
            settings(
                json!({"objective": objective, "dpo_loss": loss, "precompute_ref": precompute}),
            ),
            None,
        ));
        assert_eq!(f["objective"], objective);
        let theirs = root.join(format!("{out}.trl.safetensors"));
        let logged = trl(
            objective,
            &base,
            json!({"loss_type": loss, "precompute": precompute}),
            &theirs,
        );
        let loss = out.as_str();
        assert_preference_metrics_match(loss, &f, &logged);
        let diff = max_tensor_diff(&root.join(&out).join("model.safetensors"), &theirs);
        assert!(diff < 1e-5, "{loss}: weights differ from TRL's by {diff}");
        // The test pairs were evaluated at the end.
        let eval = &f["curve"][1]["eval_preference"];
        assert!(eval["rewards/margins"].as_f64().is_some(), "{f}");
    }

    // LoRA: an SFT adapter first, then DPO continuing it.
    let sft = train(&train_job(
        root,
        &base,
        "sft",
        json!({"method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "learning_rate": 1e-2,
            "max_steps": 3, "batch_size": 4, "device": "cpu", "template": "{instruction}{output}",
            "eval_every": 0, "checkpoint_every": 0}),
        None,
    ));
    assert_eq!(sft["objective"], "sft");
    let adapter = root.join("sft");
    let f = train(&train_job(
        root,
        &adapter,
        "dpo-lora",
        settings(json!({"method": "lora", "lora": {"dropout": 0.0}})),
        None,
    ));
    // The encoder-decoder path: DPO and ORPO with LoRA on Flan-T5 widen the margin.
    make_models(root, &["flan_t5"]);
    for objective in ["dpo", "orpo"] {
        let f = train(&train_job(
            root,
            &root.join("flan_t5"),
            &format!("t5-{objective}"),
            settings(
                json!({"objective": objective, "method": "lora", "max_steps": 6,
                "learning_rate": 5e-3, "lora": {"target_modules": ["q", "v", "wi_0", "wi_1", "wo"]}}),
            ),
            None,
        ));
        let margins: Vec<f64> = f["curve"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["preference"]["rewards/margins"].as_f64().unwrap())
            .collect();
        assert!(
            margins.last() > margins.first(),
            "t5 {objective}: the margin did not grow: {margins:?}"
        );
    }

    let theirs = root.join("dpo-lora.trl.safetensors");
    let logged = trl("dpo", &base, json!({"adapter": adapter}), &theirs);
    assert_preference_metrics_match("lora", &f, &logged);
    let diff = max_tensor_diff(&root.join("dpo-lora/adapter_model.safetensors"), &theirs);
    assert!(diff < 1e-5, "lora: adapters differ from TRL's by {diff}");
}

fn train_job(root: &Path, base: &Path, out: &str, settings: Value, dump: Option<&Path>) -> PathBuf {
    let job = json!({
        "settings": settings, "base_dir": base, "dataset": root.join("ds"),
        "output": root.join(out), "checkpoints": root.join(format!("ck-{out}")),
        "dump_first_batch": dump,
    });
    let path = root.join(format!("{out}.job.json"));
    std::fs::write(&path, job.to_string()).unwrap();
    path
}

#[test]
fn one_optimizer_step_matches_torch_adamw() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    reference(&[&"make", &root, &"gpt2", &"llama", &"qwen3"]);
    write_dataset(&root.join("ds"));
    // Gradient accumulation over two micro-batches, clipping that engages, weight decay.
    let settings = json!({"learning_rate": 1e-3, "weight_decay": 0.1, "scheduler": "constant",
        "batch_size": 2, "grad_accum": 2, "max_steps": 1, "max_grad_norm": 0.5, "device": "cpu",
        "max_seq_len": 200, "eval_every": 0, "checkpoint_every": 0});
    for arch in ["gpt2", "llama", "qwen3"] {
        let batch = root.join(format!("{arch}.batch.safetensors"));
        let job = train_job(
            root,
            &root.join(arch),
            &format!("out-{arch}"),
            settings.clone(),
            Some(&batch),
        );
        let (ok, events, stderr) = torch_helper(&[&"train", &"--job", &job]);
        assert!(ok, "{events:?} {stderr}");
        let f = finished(&events);
        assert_eq!(f["recomputed_blocks"], 0);
        assert!(
            f["curve"][0]["grad_norm"].as_f64().unwrap() > 0.5,
            "clipping must engage: {f}"
        );
        let (diff, update) = step_vs_torch(
            &root.join(arch),
            &batch,
            &root.join(format!("out-{arch}/model.safetensors")),
        );
        assert!(
            update > 5e-4,
            "{arch}: the step barely moved the weights ({update})"
        );
        assert!(
            diff < 1e-5,
            "{arch}: cairn's AdamW step differs from torch's by {diff} (step size {update})"
        );

        // Gradient checkpointing recomputes blocks in the backward pass: same step.
        let mut checkpointed = settings.clone();
        checkpointed["gradient_checkpointing"] = json!(true);
        let job = train_job(
            root,
            &root.join(arch),
            &format!("ckpt-{arch}"),
            checkpointed,
            None,
        );
        let (ok, events, stderr) = torch_helper(&[&"train", &"--job", &job]);
        assert!(ok, "{events:?} {stderr}");
        // 2 blocks x 2 micro-batches were recomputed: the checkpointed path really ran.
        assert_eq!(finished(&events)["recomputed_blocks"], 4);
        let (diff, _) = step_vs_torch(
            &root.join(arch),
            &batch,
            &root.join(format!("ckpt-{arch}/model.safetensors")),
        );
        assert!(
            diff < 1e-5,
            "{arch}: with gradient checkpointing the step differs by {diff}"
        );
    }
}

#[test]
fn lora_adapters_load_in_peft_with_cairns_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    reference(&[&"make", &root, &"gpt2", &"llama", &"phi3"]);
    write_dataset(&root.join("ds"));
    let ids = root.join("ids.safetensors");
    write_ids(&ids, 40);
    for arch in ["gpt2", "llama", "phi3"] {
        let settings = json!({"method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "merge": true},
            "learning_rate": 1e-2, "max_steps": 3, "batch_size": 4, "device": "cpu", "max_seq_len": 200,
            "eval_every": 0, "checkpoint_every": 0});
        let out = format!("lora-{arch}");
        let job = train_job(root, &root.join(arch), &out, settings, None);
        let (ok, events, stderr) = torch_helper(&[&"train", &"--job", &job]);
        assert!(ok, "{events:?} {stderr}");
        let f = finished(&events);
        assert!(
            f["trainable_params"].as_i64().unwrap() < f["params"].as_i64().unwrap() / 10,
            "{f}"
        );
        let dir = root.join(&out);
        let config: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(config["peft_type"], "LORA");
        assert_eq!(
            config["target_modules"],
            match arch {
                "gpt2" => json!(["c_attn"]),
                "phi3" => json!(["qkv_proj"]),
                _ => json!(["q_proj", "v_proj"]),
            }
        );

        let ours = root.join(format!("{out}.logits.safetensors"));
        cairn_logits(&dir, &ids, &ours);
        let peft = reference(&[&"check-logits", &dir, &ids, &ours, &"peft"]);
        assert!(
            peft["max_abs_diff"].as_f64().unwrap() < 1e-4,
            "{arch}: PEFT vs cairn: {peft}"
        );
        let merged = reference(&[&"check-logits", &dir.join("merged"), &ids, &ours]);
        assert!(
            merged["max_abs_diff"].as_f64().unwrap() < 1e-4,
            "{arch}: merged vs cairn: {merged}"
        );
        // The adapters changed the model: the base model's logits are elsewhere.
        let base = reference(&[&"check-logits", &root.join(arch), &ids, &ours]);
        assert!(
            base["max_abs_diff"].as_f64().unwrap() > 1e-3,
            "{arch}: LoRA left the model unchanged: {base}"
        );
    }
}

#[test]
fn lora_over_bf16_base_weights_trains_and_loads_in_peft() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let ids = tiny_llama_with_data(root);
    // Shards of at most 60 kB: the tiny model's merged weights (~270 kB in bf16) split.
    let settings = json!({"method": "lora", "dtype": "bf16", "max_shard_mb": 0.06,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "merge": true},
        "learning_rate": 1e-2, "max_steps": 4, "batch_size": 4, "device": "cpu", "max_seq_len": 200,
        "eval_every": 0, "checkpoint_every": 0});
    let job = train_job(root, &root.join("llama"), "bf16", settings, None);
    let (ok, events, stderr) = torch_helper(&[&"train", &"--job", &job]);
    assert!(ok, "{events:?} {stderr}");
    let f = finished(&events);
    assert_eq!(f["dtype"], "bfloat16", "{f}");
    let losses = losses(&f);
    assert!(
        losses.last() < losses.first(),
        "the loss did not go down: {losses:?}"
    );

    // Adapters stay f32; the merged model is written in the base dtype.
    let dir = root.join("bf16");
    let dtypes = |file: &Path| -> Vec<safetensors::Dtype> {
        let bytes = std::fs::read(file).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensors().into_iter().map(|(_, v)| v.dtype()).collect()
    };
    assert!(dtypes(&dir.join("adapter_model.safetensors"))
        .iter()
        .all(|d| *d == safetensors::Dtype::F32));
    let index: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("merged/model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let mut shards: Vec<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    shards.sort();
    shards.dedup();
    assert!(shards.len() > 2, "{index}");
    let mut total = 0;
    for shard in &shards {
        let file = dir.join("merged").join(shard);
        assert!(std::fs::metadata(&file).unwrap().len() < 61_000, "{shard}");
        assert!(dtypes(&file).iter().all(|d| *d == safetensors::Dtype::BF16));
        let bytes = std::fs::read(&file).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        total += st
            .tensors()
            .iter()
            .map(|(_, v)| v.data().len())
            .sum::<usize>();
    }
    assert_eq!(index["metadata"]["total_size"], json!(total));
    assert!(!dir.join("merged/model.safetensors").exists());
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("merged/config.json")).unwrap())
            .unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");

    let ours = root.join("bf16.logits.safetensors");
    cairn_logits_in(&dir, &ids, &ours, "bf16");
    let peft = reference(&[&"check-logits", &dir, &ids, &ours, &"peft", &"bf16"]);
    assert_bf16_parity("PEFT over a bf16 base", &peft);
    let merged = root.join("bf16.merged.safetensors");
    cairn_logits_in(&dir.join("merged"), &ids, &merged, "bf16");
    let r = reference(&[&"check-logits", &dir.join("merged"), &ids, &merged, &"bf16"]);
    assert_bf16_parity("merged bf16 model", &r);
}

/// A project with the chat and advice fixtures turned into one `messages` dataset.
fn dataset_project() -> Project {
    let p = Project::new();
    for (from, to) in [
        ("pipelines/recipes/data/chat", "data/chat"),
        ("pipelines/recipes/data/advice", "data/advice"),
    ] {
        let src = repo().join(from);
        for entry in std::fs::read_dir(&src).unwrap() {
            let entry = entry.unwrap();
            p.write(
                &format!("{to}/{}", entry.file_name().to_string_lossy()),
                &std::fs::read_to_string(entry.path()).unwrap(),
            );
        }
    }
    p
}

const DATASET_STEPS: &str = r#"
  chat_export: {uses: source, with: {path: data/chat}}
  chat_docs: {uses: ingest, inputs: {files: chat_export.data}, with: {target_speaker: Maya}}
  chat: {uses: instruct, inputs: {documents: chat_docs.documents}, with: {builder: chat_replies, window: 4, format: messages, test_size: 0.25}}
  advice_export: {uses: source, with: {path: data/advice}}
  advice_docs: {uses: ingest, inputs: {files: advice_export.data}}
  qa: {uses: instruct, inputs: {documents: advice_docs.documents}, with: {builder: qa, format: messages, test_size: 0.25}}
  dataset: {uses: dataset_merge, inputs: {chat: chat.dataset, qa: qa.dataset}, with: {test_size: 0.25}}
"#;

fn artifact(p: &Project, digest: &str) -> Value {
    let (code, out, err) = p.exec(&["artifacts", "show", digest, "--json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

fn object_dir(p: &Project, digest: &str) -> PathBuf {
    object_dir_in(&p.store(), digest)
}

/// The object folder of artifact `digest` in the store at `store`.
fn object_dir_in(store: &Path, digest: &str) -> PathBuf {
    let dirs: Vec<PathBuf> = walk(&store.join("objects"))
        .into_iter()
        .filter(|d| {
            d.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&digest[2..]))
        })
        .collect();
    assert_eq!(dirs.len(), 1, "object {digest} in {dirs:?}");
    dirs[0].clone()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        out.push(e.path());
        if e.path().is_dir() {
            out.extend(walk(&e.path()));
        }
    }
    out
}

#[test]
fn pipeline_trains_evaluates_judges_and_generates() {
    let llm = MockLlm::start();
    let p = dataset_project();
    p.write(
        "twin.yaml",
        &format!(
            r#"name: twin
params: {{lr: 0.003}}
steps:{DATASET_STEPS}
  train:
    uses: finetune
    inputs: {{dataset: dataset.dataset}}
    with:
      scratch: {{arch: gpt2, layers: 2, hidden: 64, heads: 4, max_positions: 512}}
      template: chatml
      max_seq_len: 320
      batch_size: 4
      max_steps: 12
      learning_rate: "${{params.lr}}"
      warmup_steps: 2
      eval_every: 4
      checkpoint_every: 5
  base:
    uses: finetune
    inputs: {{dataset: dataset.dataset}}
    with:
      scratch: {{arch: gpt2, layers: 2, hidden: 64, heads: 4, max_positions: 512}}
      template: chatml
      max_seq_len: 320
      max_steps: 1
  eval:
    uses: evaluate
    inputs: {{model: train.model, dataset: dataset.dataset, baseline: base.model}}
    with:
      rouge_examples: 3
      rouge_max_new_tokens: 24
      prompts: ["Are you free on Saturday?", "What should I plant first?"]
      generation: {{max_new_tokens: 24, temperature: 0.8}}
      judge: {{llm: {{base_url: "{}", model: judge-model}}, max_answers: 3}}
"#,
            llm.base_url
        ),
    );
    let first = p.run("twin.yaml", &[]);
    assert_eq!(first.code, 0, "{}\n{}", first.json, first.stderr);
    let model_id = first.output("train", "model");
    let record = artifact(&p, &model_id);
    let meta = &record["metadata"];
    assert_eq!(meta["steps"], 12);
    let curve = meta["curve"].as_array().unwrap();
    assert_eq!(curve.len(), 12);
    for point in curve {
        for key in ["loss", "lr", "grad_norm", "tokens_per_second"] {
            assert!(
                point[key].as_f64().is_some_and(f64::is_finite),
                "{key} in {point}"
            );
        }
    }
    let evals: Vec<u64> = curve
        .iter()
        .filter(|p| p.get("eval_loss").is_some())
        .map(|p| p["step"].as_u64().unwrap())
        .collect();
    assert_eq!(evals, [4, 8, 12]);
    assert_eq!(
        curve[0]["lr"], 0.0,
        "warm-up starts at 0 as in transformers"
    );
    assert!(
        curve[11]["loss"].as_f64().unwrap() < curve[0]["loss"].as_f64().unwrap(),
        "the loss must fall: {curve:?}"
    );
    assert_eq!(meta["device"], "cpu");
    assert!(
        !p.store()
            .join("checkpoints")
            .read_dir()
            .map(|mut d| d.next().is_some())
            .unwrap_or(false),
        "checkpoints are removed once the model is stored"
    );

    // The model directory is a Hugging Face model: transformers gives cairn's logits.
    let dir = object_dir(&p, &model_id);
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "cairn_model.json",
    ] {
        assert!(dir.join(f).exists(), "{f} missing in {}", dir.display());
    }
    let tmp = tempfile::tempdir().unwrap();
    let ids = tmp.path().join("ids.safetensors");
    write_ids(&ids, 30);
    let ours = tmp.path().join("logits.safetensors");
    cairn_logits(&dir, &ids, &ours);
    let r = reference(&[&"check-logits", &dir, &ids, &ours]);
    assert!(r["max_abs_diff"].as_f64().unwrap() < 1e-4, "{r}");

    // The report.
    let report_id = first.output("eval", "report");
    let report = object_dir(&p, &report_id);
    let metrics: Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("metrics.json")).unwrap())
            .unwrap();
    let m = &metrics["models"]["model"];
    assert!(m["perplexity"].as_f64().unwrap() > 1.0, "{metrics}");
    assert!((0.0..=1.0).contains(&m["rouge_l_f1"].as_f64().unwrap()));
    assert_eq!(m["answers"], 3);
    assert_eq!(m["judged"], 3);
    assert!((1.0..=3.0).contains(&m["judge_accuracy"].as_f64().unwrap()));
    assert_eq!(m["judge_style"], 2.0);
    let b = &metrics["models"]["baseline"];
    assert!(
        b["perplexity"].as_f64().unwrap() > m["perplexity"].as_f64().unwrap(),
        "12 steps beat 1: {metrics}"
    );
    // 3 answers x 2 models judged; identical (prompt, answer) pairs are asked once.
    let judge = &metrics["judge"];
    assert_eq!(
        judge["calls"].as_u64().unwrap() + judge["cached_calls"].as_u64().unwrap(),
        6,
        "{judge}"
    );
    assert_eq!(llm.calls() as u64, judge["calls"].as_u64().unwrap());
    let paid = llm.calls();
    let samples = std::fs::read_to_string(report.join("samples.jsonl")).unwrap();
    let samples: Vec<Value> = samples
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(samples.len(), 2 * (3 + 2));
    assert!(samples
        .iter()
        .filter(|s| s["kind"] == "answer")
        .all(|s| s["judge"]["accuracy"].is_u64() && s["reference"].is_string()));
    let html = std::fs::read_to_string(report.join("report.html")).unwrap();
    assert!(
        html.contains("<polyline")
            && html.contains("Are you free on Saturday?")
            && html.contains("baseline")
    );
    assert!(
        artifact(&p, &report_id)["metadata"]["curve"]
            .as_array()
            .unwrap()
            .len()
            == 12
    );

    // Rerun: all cached, no judge call. A learning-rate change retrains and re-evaluates
    // only; the judge is asked again only about answers it has not seen.
    let again = p.run("twin.yaml", &[]);
    assert_eq!(again.with_status("ran"), Vec::<String>::new());
    assert_eq!(llm.calls(), paid);
    let changed = p.run("twin.yaml", &["--set", "lr=0.002"]);
    assert_eq!(changed.code, 0, "{}", changed.stderr);
    assert_eq!(changed.with_status("ran"), ["eval", "train"]);
    assert!(
        changed.reason("train").contains("lr"),
        "{}",
        changed.reason("train")
    );

    // cairn generate: from the artifact id, streaming, greedy is deterministic.
    let (code, out1, err) = p.exec(&[
        "generate",
        &model_id[..12],
        "Are you free on Saturday?",
        "--temperature",
        "0",
        "--max-new-tokens",
        "20",
    ]);
    assert_eq!(code, 0, "{err}");
    // A 12-step model may well answer in whitespace; what matters is that tokens came out.
    let tokens: usize = err
        .trim_start_matches('[')
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        tokens > 0 && out1.len() > 1,
        "no text generated: {out1:?}; stderr: {err}"
    );
    assert!(err.contains("tokens/s") && err.contains("cpu"), "{err}");
    let (_, out2, _) = p.exec(&[
        "generate",
        &model_id,
        "Are you free on Saturday?",
        "--temperature",
        "0",
        "--max-new-tokens",
        "20",
    ]);
    assert_eq!(out1, out2);
    let (code, _, _) = p.exec(&[
        "generate",
        dir.to_str().unwrap(),
        "hello",
        "--raw",
        "--max-new-tokens",
        "5",
        "--seed",
        "7",
    ]);
    assert_eq!(code, 0);
    let (code, _, err) = p.exec(&["generate", &report_id[..12], "hi"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is a `report`, not a `model`"), "{err}");
    let (code, _, err) = p.exec(&["generate", "no/such/dir", "hi"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("neither a model directory nor an artifact id"),
        "{err}"
    );
}

fn single_train_pipeline(extra: &str) -> String {
    format!(
        r#"name: resume
steps:{DATASET_STEPS}
  train:
    uses: finetune
    inputs: {{dataset: dataset.dataset}}
    with:
      scratch: {{arch: llama, layers: 2, hidden: 64, heads: 4, kv_heads: 2, max_positions: 512}}
      template: alpaca
      max_seq_len: 400
      batch_size: 2
{extra}"#
    )
}

#[test]
fn a_killed_training_run_resumes_from_its_last_checkpoint() {
    let pipeline = single_train_pipeline("      learning_rate: 0.002\n      max_steps: 10\n      checkpoint_every: 4\n      eval_every: 5\n");
    // Uninterrupted, in one store.
    let whole = dataset_project();
    whole.write("p.yaml", &pipeline);
    let full = whole.run("p.yaml", &[]);
    assert_eq!(full.code, 0, "{}", full.stderr);

    // Killed after step 6 (the helper aborts like a SIGKILL: no clean-up), in another.
    let p = dataset_project();
    p.write("p.yaml", &pipeline);
    let out = p
        .cmd()
        .args(["run", "p.yaml", "--json"])
        .env("CAIRN_TORCH_ABORT_AFTER_STEP", "6")
        .output()
        .unwrap();
    let killed = common::Outcome::from_output(&out);
    assert_eq!(killed.code, 1, "{}", killed.stderr);
    assert_eq!(killed.step("train")["status"], "failed");
    let checkpoints: Vec<String> = walk(&p.store().join("checkpoints"))
        .iter()
        .filter_map(|d| d.file_name().map(|n| n.to_string_lossy().to_string()))
        .filter(|n| n.starts_with("step-"))
        .collect();
    assert_eq!(
        checkpoints,
        ["step-4"],
        "the checkpoint at step 4 survives, nothing later"
    );
    let (_, listing, _) = p.exec(&["artifacts", "ls", "--kind", "model"]);
    assert!(
        !listing.contains("train.model"),
        "no model artifact from the killed run: {listing}"
    );

    // gc keeps the checkpoint (and says how to drop it); an abandoned copy is removed
    // only with --checkpoints.
    let (code, gc_out, _) = p.exec(&["gc"]);
    assert_eq!(code, 0);
    assert!(
        gc_out.contains("kept 1 unfinished training checkpoint folder(s)"),
        "{gc_out}"
    );
    let key_dir = p
        .store()
        .join("checkpoints")
        .join(killed.step("train")["cache_key"].as_str().unwrap());
    assert!(
        key_dir.join("step-4").exists(),
        "checkpoints are filed under the step's cache key"
    );
    let abandoned = p.store().join("checkpoints/abandoned/step-4");
    std::fs::create_dir_all(&abandoned).unwrap();
    for f in ["state.json", "tensors.safetensors"] {
        std::fs::copy(key_dir.join("step-4").join(f), abandoned.join(f)).unwrap();
    }

    let resumed = p.run("p.yaml", &[]);
    assert_eq!(resumed.code, 0, "{}", resumed.stderr);
    let model = resumed.output("train", "model");
    let meta = artifact(&p, &model)["metadata"].clone();
    assert_eq!(meta["resumed_from"], 4);
    // Same data order, same optimizer state, same dropout seeds: the same weights, bit for
    // bit. (The artifact digests differ: each store's dataset records its own file paths.)
    let weights =
        |p: &Project, id: &str| std::fs::read(object_dir(p, id).join("model.safetensors")).unwrap();
    assert!(
        weights(&p, &model) == weights(&whole, &full.output("train", "model")),
        "resumed weights differ from the uninterrupted run's"
    );
    let full_meta = artifact(&whole, &full.output("train", "model"))["metadata"].clone();
    let losses = |m: &Value| {
        m["curve"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["loss"].as_f64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(losses(&meta), losses(&full_meta));
    assert!(
        !key_dir.exists(),
        "the finished job's checkpoints are removed"
    );
    let (code, gc_out, _) = p.exec(&["gc", "--checkpoints"]);
    assert_eq!(code, 0);
    assert!(
        gc_out.contains("removed 1 unfinished training checkpoint folder(s)"),
        "{gc_out}"
    );
    assert!(!abandoned.exists());
}

#[test]
fn early_stopping_ends_training_when_eval_loss_stops_improving() {
    let p = dataset_project();
    // A large learning rate on a tiny dataset overfits fast: the eval loss turns up.
    p.write("p.yaml", &single_train_pipeline("      max_steps: 300\n      learning_rate: 0.01\n      eval_every: 3\n      early_stopping_patience: 2\n      checkpoint_every: 0\n"));
    let out = p.run("p.yaml", &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let meta = artifact(&p, &out.output("train", "model"))["metadata"].clone();
    assert_eq!(meta["stopped_early"], true, "{meta}");
    let steps = meta["steps"].as_u64().unwrap();
    assert!(steps < 300 && steps.is_multiple_of(3), "{steps}");
    let evals: Vec<f64> = meta["curve"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["eval_loss"].as_f64())
        .collect();
    let best = evals.iter().cloned().fold(f64::INFINITY, f64::min);
    assert_eq!(meta["best_eval_loss"].as_f64().unwrap(), best);
    assert!(
        evals[evals.len() - 2..].iter().all(|&e| e >= best),
        "the last two evaluations did not improve: {evals:?}"
    );
    assert!(out.step("train")["reason"].is_string());
}

#[test]
fn lora_on_a_hugging_face_model_continues_from_its_artifact() {
    let p = dataset_project();
    reference(&[&"make", &p.path("models"), &"llama"]);
    p.write(
        "p.yaml",
        &format!(
            r#"name: lora
steps:{DATASET_STEPS}
  adapt:
    uses: finetune
    inputs: {{dataset: dataset.dataset}}
    with: {{model: models/llama, method: lora, lora: {{r: 4, alpha: 8}}, template: chatml, max_seq_len: 128, max_steps: 3, learning_rate: 0.01}}
  more:
    uses: finetune
    inputs: {{dataset: dataset.dataset, model: adapt.model}}
    with: {{method: lora, template: chatml, max_seq_len: 128, max_steps: 2, learning_rate: 0.01}}
  eval:
    uses: evaluate
    inputs: {{model: more.model, dataset: dataset.dataset}}
    with: {{baseline_model: models/llama, rouge_examples: 2, rouge_max_new_tokens: 8, prompts: ["hi"], generation: {{max_new_tokens: 8}}}}
"#
        ),
    );
    let out = p.run("p.yaml", &[]);
    assert_eq!(out.code, 0, "{}\n{}", out.json, out.stderr);
    let more = object_dir(&p, &out.output("more", "model"));
    assert!(
        more.join("adapter_model.safetensors").exists() && !more.join("model.safetensors").exists()
    );
    let card: Value =
        serde_json::from_str(&std::fs::read_to_string(more.join("cairn_model.json")).unwrap())
            .unwrap();
    assert_eq!(card["method"], "lora");
    assert!(
        card["base_model"]
            .as_str()
            .unwrap()
            .ends_with("models/llama"),
        "{card}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let ids = tmp.path().join("ids.safetensors");
    write_ids(&ids, 20);
    let ours = tmp.path().join("logits.safetensors");
    cairn_logits(&more, &ids, &ours);
    let r = reference(&[&"check-logits", &more, &ids, &ours, &"peft"]);
    assert!(r["max_abs_diff"].as_f64().unwrap() < 1e-4, "{r}");
    let meta = artifact(&p, &out.output("more", "model"))["metadata"].clone();
    // The step sets no rank (default 8): rank 4 and alpha 8 come from `adapt`'s adapters.
    let adapter: Value =
        serde_json::from_str(&std::fs::read_to_string(more.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        (adapter["r"].clone(), adapter["lora_alpha"].clone()),
        (json!(4), json!(8.0))
    );
    assert_eq!(
        meta["lora_targets"],
        json!(["q_proj", "v_proj"]),
        "continued the input's adapters"
    );
    assert!(meta["trainable_params"].as_i64().unwrap() < meta["params"].as_i64().unwrap() / 10);
    let metrics = artifact(&p, &out.output("eval", "report"))["metadata"]["models"].clone();
    assert!(
        metrics["baseline"]["perplexity"].as_f64().is_some(),
        "{metrics}"
    );
    // Swapping the base model's weights reruns the adapter (its files are in the key).
    let w = p.path("models/llama/model.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    std::fs::write(&w, bytes).unwrap();
    let again = p.plan("p.yaml", &[]);
    assert_eq!(again.step("adapt")["status"], "will_run", "{}", again.json);
}

/// Flan-T5 as a user runs it: `finetune` with LoRA over a model folder (the prompt is the
/// source, the reply the target), `evaluate` against the base, `cairn generate` on the
/// artifact; options that only make sense for decoders are refused before training.
#[test]
fn flan_t5_trains_evaluates_and_generates_in_a_pipeline() {
    let p = dataset_project();
    reference(&[&"make", &p.path("models"), &"flan_t5"]);
    p.write(
        "p.yaml",
        &format!(
            r#"name: seq2seq
steps:{DATASET_STEPS}
  rewrite:
    uses: finetune
    inputs: {{dataset: dataset.dataset}}
    with: {{model: models/flan_t5, method: lora, lora: {{r: 4, alpha: 8, target_modules: [q, v, wi_0, wi_1, wo]}}, template: "{{instruction}}\n\n{{input}}{{output}}", max_seq_len: 256, max_steps: 4, learning_rate: 0.01}}
  eval:
    uses: evaluate
    inputs: {{model: rewrite.model, dataset: dataset.dataset}}
    with: {{baseline_model: models/flan_t5, rouge_examples: 2, rouge_max_new_tokens: 8, prompts: ["hi"], generation: {{max_new_tokens: 8}}}}
"#
        ),
    );
    let out = p.run("p.yaml", &[]);
    assert_eq!(out.code, 0, "{}\n{}", out.json, out.stderr);
    let meta = artifact(&p, &out.output("rewrite", "model"))["metadata"].clone();
    assert_eq!(meta["arch"], "t5", "{meta}");
    assert_eq!(
        meta["lora_targets"],
        json!(["q", "v", "wi_0", "wi_1", "wo"])
    );
    let report = artifact(&p, &out.output("eval", "report"))["metadata"]["models"].clone();
    for model in ["model", "baseline"] {
        assert!(
            report[model]["perplexity"]
                .as_f64()
                .is_some_and(f64::is_finite),
            "{model}: {report}"
        );
    }
    let model = out.output("rewrite", "model");
    let (code, stdout, stderr) = p.exec(&[
        "generate",
        &model[..12],
        "What is 2 plus 2?",
        "--max-new-tokens",
        "6",
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stderr.contains(" tokens in "), "{stderr}");

    // GGUF (llama.cpp) and packing are decoder-only: GGUF is refused when the pipeline
    // loads (exit 2), before any step trains.
    let gguf = p.path("p.yaml");
    let text = std::fs::read_to_string(&gguf)
        .unwrap()
        .replace("learning_rate: 0.01}", "learning_rate: 0.02, gguf: q8_0}");
    std::fs::write(&gguf, text).unwrap();
    let out = p.run("p.yaml", &[]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("GGUF export does not cover model_type \"t5\""),
        "{}",
        out.stderr
    );
}

/// DPO as a user runs it: SFT with LoRA, then DPO continuing that adapter on a
/// preference dataset; the curves carry rewards and the test split's, a rerun executes
/// nothing and a new beta reruns DPO alone; DPO on a dataset without rejected replies,
/// and DPO settings out of range, are clear errors.
#[test]
fn dpo_continues_an_sft_adapter_in_a_pipeline() {
    let p = Project::new();
    write_preferences(&p.path("pref"));
    reference(&[&"make", &p.path("models"), &"llama"]);
    let pipeline = |beta: f64, extra: &str| {
        format!(
            r#"name: prefs
steps:
  prefs: {{uses: source, with: {{path: pref}}}}
  sft:
    uses: finetune
    inputs: {{dataset: prefs.data}}
    with: {{model: models/llama, method: lora, lora: {{r: 4, alpha: 8}}, template: "{{instruction}}{{output}}", max_steps: 3, learning_rate: 0.01}}
  dpo:
    uses: finetune
    inputs: {{dataset: prefs.data, model: sft.model}}
    with: {{objective: dpo, beta: {beta}, method: lora, template: "{{instruction}}{{output}}", max_steps: 4, learning_rate: 0.01, eval_every: 2{extra}}}
"#
        )
    };
    p.write("p.yaml", &pipeline(0.5, ""));
    let out = p.run("p.yaml", &[]);
    assert_eq!(out.code, 0, "{}\n{}", out.json, out.stderr);
    let meta = artifact(&p, &out.output("dpo", "model"))["metadata"].clone();
    assert_eq!(meta["objective"], "dpo", "{meta}");
    let curve = meta["curve"].as_array().unwrap();
    assert_eq!(curve.len(), 4);
    for point in curve {
        assert!(
            point["preference"]["rewards/accuracies"].as_f64().is_some(),
            "{point}"
        );
    }
    let evaluated: Vec<u64> = curve
        .iter()
        .filter(|p| p["eval_preference"].is_object())
        .map(|p| p["step"].as_u64().unwrap())
        .collect();
    assert_eq!(evaluated, vec![2, 4]);
    let margin = |p: &Value| p["preference"]["rewards/margins"].as_f64().unwrap();
    assert!(
        margin(&curve[3]) > margin(&curve[0]),
        "DPO did not widen the margin: {curve:?}"
    );

    let again = p.run("p.yaml", &[]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(again.step("dpo")["status"], "cached", "{}", again.json);
    p.write("p.yaml", &pipeline(0.25, ""));
    let plan = p.plan("p.yaml", &[]);
    assert_eq!(plan.step("sft")["status"], "cached", "{}", plan.json);
    assert_eq!(plan.step("dpo")["status"], "will_run", "{}", plan.json);

    // An alpaca dataset has no rejected replies.
    write_dataset(&p.path("pref"));
    let out = p.run("p.yaml", &[]);
    assert_ne!(out.code, 0);
    assert!(
        out.stderr
            .contains("objectives dpo and orpo need a preference dataset"),
        "{}",
        out.stderr
    );
    p.write("p.yaml", &pipeline(0.5, ", label_smoothing: 0.7"));
    let (code, _, err) = p.exec(&["run", "p.yaml"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("p.yaml:11:") && err.contains("label_smoothing 0.7 is outside 0..0.5"),
        "{err}"
    );
}

#[test]
fn finetune_parameter_errors_are_reported_with_locations() {
    let p = Project::new();
    p.write(
        "bad.yaml",
        r#"name: bad
steps:
  ds: {uses: source, with: {path: .}}
  train:
    uses: finetune
    inputs: {dataset: ds.data}
    with:
      scratch: {arch: gpt3, hidden: 100, heads: 3}
      method: lora
      template: vicuna
      batch_size: 0
      learning_rate: -1
  full16:
    uses: finetune
    inputs: {dataset: ds.data}
    with: {model: base, dtype: bf16}
  eval:
    uses: evaluate
    inputs: {model: train.model}
    with: {generation: {top_p: 2}, device: tpu}
"#,
    );
    let (code, out, err) = p.exec(&["validate", "bad.yaml"]);
    assert_eq!(code, 2, "{out}{err}");
    insta::assert_snapshot!(
        "finetune_param_errors",
        err.replace(p.dir.path().to_str().unwrap(), "<project>")
    );
    assert!(!p.store().join("objects").exists(), "nothing written");
}

/// An unsupported model family is an input error when the pipeline loads (exit 2, the
/// value's location), not a failure after the run started.
#[test]
fn unsupported_model_families_are_refused_at_load_time() {
    let p = Project::new();
    p.write(
        "falcon/config.json",
        r#"{"model_type": "falcon", "hidden_size": 8}"#,
    )
    .write(
        "yarn/config.json",
        r#"{"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}"#,
    )
    .write("t5/config.json", r#"{"model_type": "t5"}"#)
    .write("data.jsonl", "{}\n")
    .write(
        "p.yaml",
        r#"name: families
steps:
  ds: {uses: source, with: {path: data.jsonl}}
  train:
    uses: finetune
    inputs: {dataset: ds.data}
    with: {model: falcon, max_steps: 1}
  eval:
    uses: evaluate
    inputs: {model: train.model, dataset: ds.data}
    with: {baseline_model: yarn}
  rewrite:
    uses: finetune
    inputs: {dataset: ds.data}
    with: {model: t5, max_steps: 1, gguf: q8_0}
"#,
    );
    let (code, out, err) = p.exec(&["run", "p.yaml"]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("p.yaml:7:")
            && err.contains("model_type \"falcon\" is not supported")
            && err.contains("qwen3"),
        "{err}"
    );
    assert!(
        err.contains("p.yaml:11:") && err.contains("rope scaling \"yarn\""),
        "{err}"
    );
    // T5 trains, but llama.cpp's GGUF does not cover it: refused before training.
    assert!(
        err.contains("p.yaml:15:") && err.contains("GGUF export does not cover model_type \"t5\""),
        "{err}"
    );
    assert!(!p.store().join("objects").exists(), "nothing ran");
}

#[test]
fn the_demo_trains_and_evaluates_its_twin() {
    let store = tempfile::tempdir().unwrap();
    // Fewer steps than the README's run; the same steps otherwise.
    let out = run_repo_pipeline(
        store.path(),
        "pipelines/demo.yaml",
        &["--set", "train_steps=12"],
    );
    assert_eq!(out.code, 0, "{}\n{}", out.json, out.stderr);
    assert!(out.with_status("failed").is_empty());
    let model = meta_of(store.path(), &out.output("twin", "model"));
    assert_eq!(model["steps"], 12);
    assert!(model["train_rows"].as_u64().unwrap() >= 20, "{model:#}");
    let report = meta_of(store.path(), &out.output("evaluate", "report"));
    assert_eq!(report["models"]["model"]["answers"], 8, "{report:#}");
    let again = run_repo_pipeline(
        store.path(),
        "pipelines/demo.yaml",
        &["--set", "train_steps=12"],
    );
    assert_eq!(
        again.with_status("ran"),
        Vec::<String>::new(),
        "{}",
        again.json
    );
}

#[test]
fn training_pipeline_adapts_a_pretrained_model_and_compares_it_with_the_base() {
    let models = tempfile::tempdir().unwrap();
    reference(&[&"make", &models.path(), &"llama"]);
    let base = models.path().join("llama");
    let store = tempfile::tempdir().unwrap();
    let set_base = format!("base_model={}", base.display());
    let out = run_repo_pipeline(
        store.path(),
        "pipelines/training.yaml",
        &[
            "--set",
            &set_base,
            "--set",
            "epochs=1",
            "--set",
            "device=cpu",
        ],
    );
    assert_eq!(out.code, 0, "{}\n{}", out.json, out.stderr);
    let model = meta_of(store.path(), &out.output("twin", "model"));
    assert_eq!(model["method"], "lora");
    assert_eq!(model["lora"]["r"], 16);
    let report = meta_of(store.path(), &out.output("evaluate", "report"));
    for who in ["model", "baseline"] {
        assert!(
            report["models"][who]["perplexity"].as_f64().is_some(),
            "{who}: {report:#}"
        );
    }
}

#[test]
fn llm_twin_pipeline_runs_end_to_end_with_a_judge() {
    let server = MockLlm::start_on(
        "127.0.0.1:0",
        Some(repo().join("pipelines/recipes/data/blog")),
    );
    let site = format!("site={}", server.base_url.trim_end_matches("v1"));
    let llm = format!("llm_url={}", server.base_url);
    let store = tempfile::tempdir().unwrap();
    let out = run_repo_pipeline(
        store.path(),
        "pipelines/llm_twin.yaml",
        &["--set", &site, "--set", &llm, "--set", "train_steps=10"],
    );
    assert_eq!(out.code, 0, "{}\n{}", out.json, out.stderr);
    let dataset = meta_of(store.path(), &out.output("dataset", "dataset"));
    let counts = dataset["counts"].as_object().unwrap();
    for builder in ["qa/", "chat_replies/", "generate/"] {
        assert!(
            counts.keys().any(|k| k.starts_with(builder)),
            "no {builder} in {counts:?}"
        );
    }
    let report = meta_of(store.path(), &out.output("evaluate", "report"));
    let m = &report["models"]["model"];
    assert!(m["judged"].as_u64().unwrap() > 0, "{report:#}");
    assert!((1.0..=3.0).contains(&m["judge_accuracy"].as_f64().unwrap()));
}

/// `cairn-torch sample`: a prompt's replies come from one batch over a copied KV cache,
/// differ from each other, and come out the same on a rerun; the T5 path too.
#[test]
fn sampling_is_batched_per_prompt_and_reproducible() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    make_models(root, &["llama", "flan_t5"]);
    write_dataset(&root.join("ds"));
    for arch in ["llama", "flan_t5"] {
        let job = |out: &str| {
            let path = root.join(format!("{arch}-{out}.json"));
            let job = json!({"model": root.join(arch), "dataset": root.join("ds"),
                "split_file": "test.jsonl", "max_prompts": 2, "n": 4,
                "generation": {"max_new_tokens": 12, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                    "repetition_penalty": 1.0, "seed": 7},
                "device": "cpu", "threads": 0, "output": root.join(format!("{arch}-{out}.jsonl"))});
            std::fs::write(&path, job.to_string()).unwrap();
            let (ok, events, stderr) = torch_helper(&[&"sample", &"--job", &path]);
            assert!(ok, "{arch}: {events:?} {stderr}");
            std::fs::read_to_string(root.join(format!("{arch}-{out}.jsonl"))).unwrap()
        };
        let first = job("a");
        assert_eq!(first, job("b"), "{arch}: a rerun drew other replies");
        let lines: Vec<Value> = first
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{arch}");
        for line in &lines {
            let texts: std::collections::HashSet<&str> = line["samples"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["text"].as_str().unwrap())
                .collect();
            assert!(
                texts.len() > 1,
                "{arch}: the batch's rows are all the same: {line}"
            );
            assert!(line["reference"].is_string(), "{line}");
        }
    }
}

/// The RLAIF recipe end to end on the mock judge: SFT, 4 samples per held-out prompt,
/// the judge's best-vs-worst pairs (reasons kept), DPO over the SFT model, evaluation
/// beside it; a rerun executes nothing, a new rubric reruns exactly rank, dpo and
/// evaluate (the samples come from the cache), and judge replies that are not scores are
/// counted and dropped.
#[test]
fn rlaif_recipe_samples_judges_and_tunes() {
    let server = MockLlm::start();
    let llm = format!("llm_url={}", server.base_url);
    let store = tempfile::tempdir().unwrap();
    let run = |rubric: &str| {
        let rubric = format!("rubric={rubric}");
        run_repo_pipeline(
            store.path(),
            "pipelines/recipes/chat_twin_rlaif.yaml",
            &[
                "--set",
                &llm,
                "--set",
                "train_steps=10",
                "--set",
                "dpo_steps=4",
                "--set",
                &rubric,
            ],
        )
    };
    let out = run("Warm and short.");
    assert_eq!(out.code, 0, "{}\n{}", out.json, out.stderr);
    let samples = meta_of(store.path(), &out.output("samples", "samples"));
    let prompts = samples["prompts"].as_u64().unwrap();
    assert!(prompts >= 2, "{samples}");
    assert_eq!(samples["samples"].as_u64().unwrap(), 4 * prompts);
    let ranked = meta_of(store.path(), &out.output("rank", "dataset"));
    assert_eq!(ranked["judged"].as_u64().unwrap(), prompts, "{ranked}");
    assert!(ranked["count"].as_u64().unwrap() > 0, "{ranked}");
    assert_eq!(
        ranked["llm"]["calls"].as_u64().unwrap(),
        prompts,
        "{ranked}"
    );
    let dir = object_dir_in(store.path(), &out.output("rank", "dataset"));
    let record: Value = serde_json::from_str(
        std::fs::read_to_string(dir.join("train.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert!(
        record["judge"].as_str().unwrap().starts_with("scores "),
        "{record}"
    );
    assert_ne!(record["chosen"], record["rejected"]);
    let loaded = load_with_hf_datasets(&dir);
    assert!(
        loaded["train"][1]
            .as_array()
            .unwrap()
            .contains(&json!("judge")),
        "{loaded}"
    );
    // The chat replies' prompts keep their system and user turns (as SFT saw them).
    assert_eq!(record["prompt"][0]["role"], "system", "{record}");
    assert_eq!(record["chosen"][0]["role"], "assistant", "{record}");
    let dpo = meta_of(store.path(), &out.output("dpo", "model"));
    assert_eq!(dpo["objective"], "dpo");
    assert!(
        dpo["curve"][0]["preference"]["rewards/margins"].is_number(),
        "{dpo}"
    );
    let report = meta_of(store.path(), &out.output("evaluate", "report"));
    for model in ["model", "baseline"] {
        assert!(
            report["models"][model]["perplexity"].is_number(),
            "{report}"
        );
    }

    let again = run("Warm and short.");
    assert_eq!(again.code, 0, "{}", again.stderr);
    for step in ["sft", "samples", "rank", "dpo", "evaluate"] {
        assert_eq!(
            again.step(step)["status"],
            "cached",
            "{step}: {}",
            again.json
        );
    }
    let calls = server.calls();
    let changed = run("Practical first, then warm.");
    assert_eq!(changed.code, 0, "{}", changed.stderr);
    for step in ["sft", "samples"] {
        assert_eq!(
            changed.step(step)["status"],
            "cached",
            "{step}: {}",
            changed.json
        );
    }
    for step in ["rank", "dpo", "evaluate"] {
        assert_eq!(
            changed.step(step)["status"],
            "ran",
            "{step}: {}",
            changed.json
        );
    }
    assert_eq!(
        server.calls(),
        calls + prompts as usize,
        "one judge call per prompt"
    );

    // Replies that are not scores: counted, dropped, and DPO has nothing to train on.
    let bad = run("MOCK_MALFORMED");
    assert_ne!(bad.code, 0);
    let ranked = meta_of(store.path(), &bad.output("rank", "dataset"));
    assert_eq!(ranked["count"], 0, "{ranked}");
    assert_eq!(
        ranked["dropped"]["judge reply unparseable"].as_u64(),
        Some(prompts),
        "{ranked}"
    );
    assert!(
        bad.stderr
            .contains("objectives dpo and orpo need a preference dataset")
            || bad.stderr.contains("no usable example"),
        "{}",
        bad.stderr
    );
}

/// Chat templates written for these tests in the styles of the families people twin
/// (not copies): Llama 3 headers, Gemma turns with a folded system prompt and role
/// checks, ChatML with a namespace and Python string methods, Mistral [INST] with
/// `raise_exception`, and Phi-3 closing with EOS only without a generation prompt.
const CHAT_TEMPLATES: &[(&str, &str)] = &[
    (
        "llama3",
        r#"{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "You are the twin." %}
{%- endif %}
{{- "<|im_start|>system<|im_end|>\n\n" + system_message + "<|endoftext|>" }}
{%- for message in messages %}
    {{- '<|im_start|>' + message['role'] + '<|im_end|>\n\n' + message['content'] | trim + '<|endoftext|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant<|im_end|>\n\n' }}
{%- endif %}
"#,
    ),
    (
        "gemma",
        r#"{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{ '<|im_start|>' + role + '\n' + (first_user_prefix if loop.first else "") + message['content'] | trim + '<|im_end|>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<|im_start|>model\n' }}
{%- endif -%}
"#,
    ),
    (
        "chatml",
        r#"{%- set ns = namespace(system=false) %}
{%- for message in messages %}
    {%- if message.role == 'system' %}{% set ns.system = true %}{% endif %}
{%- endfor %}
{%- if not ns.system %}
    {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- set content = message.content.strip() %}
    {%- if message.role == 'assistant' and '</think>' in content %}
        {%- set content = content.split('</think>')[-1].lstrip('\n') %}
    {%- endif %}
    {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"#,
    ),
    (
        "mistral",
        r#"{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] == 'user' %}
        {{- '[INST] ' + message['content'] + ' [/INST]' }}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}
"#,
    ),
    (
        "phi3",
        "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|im_end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|im_end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|im_end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}",
    ),
];

/// A copy of the tiny model in `base` whose tokenizer_config.json carries `template`.
fn with_chat_template(base: &Path, dir: &Path, template: &str) {
    std::fs::create_dir_all(dir).unwrap();
    for entry in std::fs::read_dir(base).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    let config = json!({"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template,
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"});
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    // The end-of-turn token of these templates ends generation too.
    std::fs::write(
        dir.join("generation_config.json"),
        json!({"eos_token_id": [256, 258]}).to_string(),
    )
    .unwrap();
}

#[test]
fn model_chat_templates_render_as_transformers_renders_them() {
    use cairn::ml::chat_template::ChatTemplate;
    use cairn::ml::template::Role;

    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    reference(&[&"make", &root, &"llama"]);
    let msg = |role: &str, content: &str| json!({"role": role, "content": content});
    let conversations = json!([
        [
            msg("system", "  Answer as Maya.  "),
            msg("user", "Hi there"),
            msg("assistant", " Hello! "),
            msg("user", "Plans for today?"),
            msg("assistant", "<think>hm</think>\nWriting, then a walk.")
        ],
        [msg("user", "One question")],
        [msg("user", "Q"), msg("assistant", "A: naïve café — ✓")],
        [msg("user", "Q"), msg("user", "again")],
    ]);
    let conv_file = root.join("conversations.json");
    std::fs::write(&conv_file, conversations.to_string()).unwrap();
    for (name, template) in CHAT_TEMPLATES {
        let dir = root.join(name);
        with_chat_template(&root.join("llama"), &dir, template);
        let theirs = reference(&[&"render-chat", &dir, &conv_file]);
        let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        let ours = ChatTemplate::from_model_dir(&dir, &tokenizer).unwrap();
        assert_eq!(ours.stops(), ["<|endoftext|>", "<|im_end|>"], "{name}");
        for (i, messages) in conversations.as_array().unwrap().iter().enumerate() {
            let turns: Vec<(Role, String)> = messages
                .as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    let role = match m["role"].as_str().unwrap() {
                        "system" => Role::System,
                        "user" => Role::User,
                        _ => Role::Assistant,
                    };
                    (role, m["content"].as_str().unwrap().to_string())
                })
                .collect();
            let expected = &theirs[i];
            match expected.get("error") {
                Some(error) => {
                    let err = ours.render(&turns, false).unwrap_err();
                    assert!(
                        err.contains(error.as_str().unwrap()),
                        "{name} #{i}: transformers raised {error}, cairn said {err}"
                    );
                }
                None => {
                    assert_eq!(
                        ours.render(&turns, false).unwrap(),
                        expected["text"].as_str().unwrap(),
                        "{name} #{i}"
                    );
                    assert_eq!(
                        ours.render(&turns, true).unwrap(),
                        expected["prompt"].as_str().unwrap(),
                        "{name} #{i} with the generation prompt"
                    );
                    let pieces = ours.pieces(&turns).unwrap();
                    let whole: String = pieces.iter().map(|p| p.0.as_str()).collect();
                    assert_eq!(whole, expected["text"].as_str().unwrap(), "{name} #{i}");
                }
            }
        }
    }
}

#[test]
fn training_with_the_models_chat_template_learns_its_replies_and_keeps_the_template() {
    use cairn::ml::chat_template::ChatTemplate;

    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    reference(&[&"make", &root, &"llama"]);
    let chatml = CHAT_TEMPLATES.iter().find(|t| t.0 == "chatml").unwrap().1;
    let base = root.join("chat-llama");
    with_chat_template(&root.join("llama"), &base, chatml);
    std::fs::create_dir_all(root.join("ds")).unwrap();
    let rec = |q: &str, a: &str| {
        json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
            .to_string()
    };
    let lines: Vec<String> = (0..8)
        .map(|i| rec(&format!("q{i}"), &format!("a{i}")))
        .collect();
    std::fs::write(root.join("ds/train.jsonl"), lines[..6].join("\n") + "\n").unwrap();
    std::fs::write(root.join("ds/test.jsonl"), lines[6..].join("\n") + "\n").unwrap();
    let settings = json!({"method": "lora", "template": "model", "lora": {"r": 4, "alpha": 8, "merge": true},
        "gguf": "q8_0",
        "learning_rate": 1e-2, "max_steps": 2, "batch_size": 2, "device": "cpu", "max_seq_len": 200,
        "eval_every": 0, "checkpoint_every": 0});
    let batch = root.join("batch.safetensors");
    let job = train_job(root, &base, "out", settings, Some(&batch));
    let (ok, events, stderr) = torch_helper(&[&"train", &"--job", &job]);
    assert!(ok, "{events:?} {stderr}");
    assert_eq!(finished(&events)["template"], "model");

    // The trained tokens are the replies with their end-of-turn token, nothing else.
    let tokenizer = tokenizers::Tokenizer::from_file(base.join("tokenizer.json")).unwrap();
    let bytes = std::fs::read(&batch).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let labels = st.tensor("labels.0").unwrap();
    let labels: Vec<i64> = labels
        .data()
        .chunks(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let row_len = labels.len() / 2;
    let trained: Vec<u32> = labels[..row_len]
        .iter()
        .filter(|&&l| l >= 0)
        .map(|&l| l as u32)
        .collect();
    let text = tokenizer.decode(&trained, false).unwrap();
    assert!(
        text.starts_with('a') && text.ends_with("<|im_end|>") && text.len() <= 14,
        "trained on {text:?}"
    );

    // The adapter carries the template, its special tokens and its stop ids.
    let out = root.join("out");
    let saved = ChatTemplate::from_model_dir(&out, &tokenizer).unwrap();
    assert_eq!(saved.source(), chatml);
    assert_eq!(saved.stops(), ["<|endoftext|>", "<|im_end|>"]);
    let generation: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("generation_config.json")).unwrap())
            .unwrap();
    assert_eq!(generation["eos_token_id"], json!([256, 258]));

    // The GGUF file carries the template and both stop tokens for llama.cpp.
    let r = &reference(&[
        &"check-gguf",
        &out.join("merged"),
        &out.join("model-q8_0.gguf"),
    ])[0];
    assert_eq!(r["meta"]["tokenizer.chat_template"], chatml, "{r}");
    assert_eq!(r["meta"]["tokenizer.ggml.eos_token_id"], 256, "{r}");
    assert_eq!(r["meta"]["tokenizer.ggml.eot_token_id"], 258, "{r}");
    assert_eq!(r["missing"], json!([]), "{r}");
    assert_eq!(r["q8_0_bit_exact"], true, "{r}");
}

/// GGUF files as llama.cpp's own reader (the `gguf` package) sees them: metadata, every
/// tensor under llama.cpp's name and shape, dequantized values against the model's,
/// q8_0 bytes identical to ggml's reference quantizer; and llama.cpp itself
/// (llama-cpp-python) running each file, its logits against transformers', and its
/// tokenizer, read from the file, against the Hugging Face one: byte-level BPE (GPT-2,
/// Llama 3, Qwen) and SentencePiece-style with byte fallback (Llama 2, Phi-3, Gemma 1-3).
#[test]
fn gguf_export_reads_back_in_llama_cpps_reader_and_runs_in_llama_cpp() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let models = [
        // (test model, llama.cpp architecture, vocabulary, EOS id)
        ("gpt2", "gpt2", 259, 256),
        ("llama3", "llama", 259, 256),
        ("qwen2", "qwen2", 259, 256),
        ("qwen3", "qwen3", 259, 256),
        ("llama2", "llama", 320, 2),
        ("phi3_spm", "phi3", 320, 2),
        ("gemma_spm", "gemma", 320, 1),
        ("gemma2_spm", "gemma2", 320, 1),
        ("gemma3_spm", "gemma3", 320, 1),
    ];
    let mut make: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"make", &root];
    make.extend(models.iter().map(|m| &m.0 as &dyn AsRef<std::ffi::OsStr>));
    make.extend([&"phi3long" as &dyn AsRef<std::ffi::OsStr>, &"gemma2"]);
    reference(&make);
    // (type, tensor tolerance, llama.cpp logit tolerance against transformers f32)
    let types = [
        ("q8_0", 0.0045, 0.03),
        ("bf16", 0.004, 0.006),
        ("f16", 0.0005, 0.001),
    ];
    for (arch, gguf_arch, vocab, eos) in models {
        let model = root.join(arch);
        let files: Vec<std::path::PathBuf> = types
            .iter()
            .map(|(ty, ..)| {
                let file = root.join(format!("{arch}.{ty}.gguf"));
                let (ok, events, stderr) = torch_helper(&[
                    &"gguf",
                    &"--model",
                    &model,
                    &"--type",
                    ty,
                    &"--output",
                    &file,
                ]);
                assert!(ok, "{arch} {ty}: {events:?} {stderr}");
                file
            })
            .collect();
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"check-gguf", &model];
        args.extend(files.iter().map(|f| f as &dyn AsRef<std::ffi::OsStr>));
        let checks = reference(&args);
        args[0] = &"llama-cpp";
        let ran = reference(&args);
        for (i, (ty, tolerance, logit_tolerance)) in types.into_iter().enumerate() {
            let r = &checks[i];
            let what = format!("{arch} {ty}: {r}");
            assert_eq!(r["meta"]["general.architecture"], gguf_arch, "{what}");
            assert_eq!(r["meta"]["tokenizer.ggml.tokens"], vocab, "{what}");
            assert_eq!(r["meta"]["tokenizer.ggml.eos_token_id"], eos, "{what}");
            let sentencepiece = vocab == 320;
            let tokenizer_model = if sentencepiece { "llama" } else { "gpt2" };
            assert_eq!(r["meta"]["tokenizer.ggml.model"], tokenizer_model, "{what}");
            assert_eq!(r["missing"], json!([]), "{what}");
            assert_eq!(r["unknown"], json!([]), "{what}");
            assert_eq!(r["shapes_ok"], true, "{what}");
            assert_eq!(r["q8_0_bit_exact"], true, "{what}");
            let err = r["max_rel_err"].as_f64().unwrap();
            assert!(err > 0.0 && err < tolerance, "{what}");
            let quantized = r["types"].get(match ty {
                "q8_0" => "Q8_0",
                "bf16" => "BF16",
                _ => "F16",
            });
            assert!(quantized.is_some(), "{what}");
            let rope_freqs = r["tensors"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t == "rope_freqs.weight");
            assert_eq!(rope_freqs, arch == "llama3", "{what}");
            // llama.cpp itself runs the file: its logits on a fixed sequence against
            // transformers' (the same file on another model's weights is off by ~0.9).
            // In 16 bits, as close as transformers' own 16-bit run (or the fixed bound);
            // an argmax may differ only where transformers' top two were that close.
            let l = &ran["logits"][i];
            let what = format!(
                "{arch} {ty} in llama.cpp: {l} {}",
                ran["transformers_16bit_err"]
            );
            let own = ran["transformers_16bit_err"][ty].as_f64().unwrap_or(0.0);
            let bound = f64::max(logit_tolerance, 1.5 * own);
            assert!(l["max_abs_err"].as_f64().unwrap() < bound, "{what}");
            assert!(l["argmax_agree"].as_f64().unwrap() >= 0.9, "{what}");
            assert!(l["flip_margin"].as_f64().unwrap() < bound, "{what}");
            if arch == "qwen3" || arch == "gemma3_spm" {
                // Per-head q/k norms (Qwen3's head size, 24, is not hidden / heads).
                let norms = r["tensors"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|t| {
                        let t = t.as_str().unwrap();
                        t.ends_with("attn_q_norm.weight") || t.ends_with("attn_k_norm.weight")
                    })
                    .count();
                assert_eq!(norms, 4, "{what}");
            }
            if arch == "gemma2_spm" || arch == "gemma3_spm" {
                // Layer 0 slides, layer 1 is global.
                let pattern = &r["meta"][format!("{gguf_arch}.attention.sliding_window_pattern")];
                assert_eq!(pattern, &json!([true, false]), "{what}");
            }
        }
        assert_eq!(
            checks[0]["meta"]["qwen3.attention.key_length"],
            if arch == "qwen3" {
                json!(24)
            } else {
                Value::Null
            }
        );
        // llama.cpp's tokenizer, built from the file's vocabulary, splits text (known
        // words, byte-fallback characters, spaces, newlines) as the Hugging Face one does.
        // (Phi-3's Metaspace pre-tokenizer adds no dummy prefix before a text that starts
        // with a space, where llama.cpp, like SentencePiece, does: the one known difference.)
        let t = &ran["tokenize"];
        assert_eq!(
            t["mismatches"],
            json!([]),
            "{arch} tokenizer in llama.cpp: {t}"
        );
        assert!(t["tokens"].as_u64().unwrap() > 100, "{t}");
        let leading = t["leading_space"].as_array().unwrap().len();
        assert_eq!(leading, if arch == "phi3_spm" { 2 } else { 0 }, "{t}");
    }
    // What llama.cpp would compute differently is refused, with the reason.
    for (arch, why) in [
        ("phi3long", "longrope"),
        ("gemma2", "query_pre_attn_scalar 24"),
    ] {
        let (ok, events, _) = torch_helper(&[
            &"gguf",
            &"--model",
            &root.join(arch),
            &"--output",
            &root.join(format!("{arch}.gguf")),
        ]);
        assert!(!ok, "{events:?}");
        assert!(format!("{events:?}").contains(why), "{arch}: {events:?}");
        assert!(!root.join(format!("{arch}.gguf")).exists());
    }
}

/// The recipes for real models validate before their weights are downloaded.
#[test]
fn model_recipes_validate_without_their_weights() {
    let store = tempfile::tempdir().unwrap();
    for recipe in [
        "llama3_blog_assistant",
        "gpt2_advice_column",
        "gemma_chat_twin",
        "flan_t5_style_rewrite",
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_cairn"))
            .current_dir(repo())
            .env("CAIRN_STORE", store.path())
            .args(["validate", &format!("pipelines/recipes/{recipe}.yaml")])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{recipe}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// scripts/gpu-check, which a GPU session runs as is, works end to end: here on the CPU
/// with small models (no GPU is lent to the tests).
#[test]
fn gpu_check_script_runs_its_checks_on_the_cpu() {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(repo().join("scripts/gpu-check"))
        .current_dir(repo())
        .args(["--device", "cpu", "--small", "--bin"])
        .arg(env!("CARGO_BIN_EXE_cairn-torch"))
        .arg("--out")
        .arg(out.path())
        .output()
        .unwrap();
    let report = std::fs::read_to_string(out.path().join("gpu-check.md")).unwrap_or_default();
    assert!(
        run.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    for arch in ["gpt2", "llama3", "qwen3", "phi3", "gemma2"] {
        let row = report
            .lines()
            .find(|l| l.starts_with(&format!("| {arch} |")))
            .unwrap_or_else(|| panic!("no {arch} row in {report}"));
        assert!(row.ends_with("| yes |"), "{row}");
    }
    assert!(
        report.contains("same tokens as transformers (CPU): yes"),
        "{report}"
    );
    assert!(report.contains("| cairn / theirs |"), "{report}");
    assert!(report.contains("FLOP/token"), "{report}");
    assert!(
        report.contains("## 5. DPO") && report.contains("| TRL DPOTrainer + PEFT |"),
        "{report}"
    );
}

/// `add_tokens`: speaker tokens become single tokens, the embeddings grow by their rows
/// (initialised to the mean of the others) and only those rows train next to the LoRA
/// adapters; PEFT loads the adapter over the resized base (`modules_to_save`) with
/// cairn's logits, and transformers loads the merged model.
#[test]
fn added_tokens_train_and_load_in_peft() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    reference(&[&"make", &root, &"llama"]);
    std::fs::create_dir_all(root.join("ds")).unwrap();
    let rec = |i: usize| {
        json!({"messages": [{"role": "user", "content": format!("<FRIEND> plans for day {i}?")},
            {"role": "assistant", "content": format!("<TWIN> a walk, then bread {i}.")}]})
        .to_string()
    };
    let lines: Vec<String> = (0..10).map(rec).collect();
    std::fs::write(root.join("ds/train.jsonl"), lines[..8].join("\n") + "\n").unwrap();
    std::fs::write(root.join("ds/test.jsonl"), lines[8..].join("\n") + "\n").unwrap();
    let settings = json!({"method": "lora", "template": "chatml", "add_tokens": ["<TWIN>", "<FRIEND>"],
        "lora": {"r": 4, "alpha": 8, "merge": true},
        "learning_rate": 5e-2, "max_steps": 4, "batch_size": 4, "device": "cpu", "max_seq_len": 200,
        "eval_every": 0, "checkpoint_every": 0});
    let job = train_job(root, &root.join("llama"), "added", settings, None);
    let (ok, events, stderr) = torch_helper(&[&"train", &"--job", &job]);
    assert!(ok, "{events:?} {stderr}");
    let out = root.join("added");
    let tokenizer = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let (twin, friend) = (
        tokenizer.token_to_id("<TWIN>").unwrap(),
        tokenizer.token_to_id("<FRIEND>").unwrap(),
    );
    assert_eq!((twin, friend), (259, 260));
    let ids = tokenizer.encode("<TWIN>hi", false).unwrap();
    assert_eq!(ids.get_ids()[0], 259, "a single token");

    // Only the added rows moved: the old rows are the base's, the new ones left the mean.
    let table = |file: &Path, name: &str| -> Vec<f32> {
        let bytes = std::fs::read(file).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensor(name)
            .unwrap()
            .data()
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let base = table(
        &root.join("llama/model.safetensors"),
        "model.embed_tokens.weight",
    );
    let grown = table(
        &out.join("adapter_model.safetensors"),
        "base_model.model.model.embed_tokens.weight",
    );
    let hidden = 64;
    assert_eq!(grown.len(), 261 * hidden);
    assert_eq!(&grown[..base.len()], &base[..]);
    let mean: Vec<f32> = (0..hidden)
        .map(|j| (0..259).map(|r| base[r * hidden + j]).sum::<f32>() / 259.0)
        .collect();
    let moved = (0..hidden)
        .map(|j| (grown[259 * hidden + j] - mean[j]).abs())
        .fold(0f32, f32::max);
    assert!(moved > 1e-3, "the <TWIN> row did not train ({moved})");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        config["modules_to_save"],
        json!(["embed_tokens", "lm_head"]),
        "{config}"
    );

    // Logits over ids that use the new tokens: cairn, PEFT over the resized base, and
    // the merged model in transformers.
    let ids_file = root.join("ids.safetensors");
    let ids: Vec<i64> = (0..40).map(|i| [259, 260, 72, 105][i % 4]).collect();
    let bytes: Vec<u8> = ids.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![1, 40], &bytes).unwrap();
    safetensors::tensor::serialize_to_file([("input_ids", view)], None, &ids_file).unwrap();
    let ours = root.join("added.logits.safetensors");
    cairn_logits(&out, &ids_file, &ours);
    let peft = reference(&[&"check-logits", &out, &ids_file, &ours, &"peft"]);
    assert_eq!(peft["shape"], json!([1, 40, 261]), "{peft}");
    assert!(peft["max_abs_diff"].as_f64().unwrap() < 1e-4, "{peft}");
    let merged = reference(&[&"check-logits", &out.join("merged"), &ids_file, &ours]);
    assert!(merged["max_abs_diff"].as_f64().unwrap() < 1e-4, "{merged}");
}

/// NF4 as bitsandbytes lays it out (its CPU backend): the packed 4-bit codes, the maxima
/// of the double quantization and its offset bit for bit; the 8-bit codes of the block
/// maxima equal except the few where bitsandbytes' approximate search misses the nearest
/// entry (cairn's is then the nearer); shapes with a short last block and several blocks
/// of maxima.
#[test]
fn nf4_matches_bitsandbytes() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, (rows, cols)) in [(160, 72), (300, 130)].into_iter().enumerate() {
        let mut x: u64 = 0x2545_F491_4F6C_DD1D + i as u64;
        let values: Vec<f32> = (0..rows * cols)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x % 20_001) as f32 / 10_000.0 - 1.0) * 0.05
            })
            .collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![rows, cols], &bytes)
                .unwrap();
        let input = tmp.path().join(format!("w{i}.safetensors"));
        safetensors::tensor::serialize_to_file([("weight", view)], None, &input).unwrap();
        let ours = tmp.path().join(format!("w{i}.nf4.safetensors"));
        let (ok, events, stderr) = torch_helper(&[&"nf4", &"--input", &input, &"--output", &ours]);
        assert!(ok, "{events:?} {stderr}");
        let r = reference(&[&"check-nf4", &input, &ours]);
        for key in [
            "packed_equal",
            "absmax2_equal",
            "offset_equal",
            "qabsmax_differ_only_where_ours_is_nearer",
        ] {
            assert_eq!(r[key], true, "{rows}x{cols} {key}: {r}");
        }
        let differ = r["qabsmax_differ"].as_i64().unwrap();
        assert!(
            differ * 50 <= r["qabsmax_count"].as_i64().unwrap(),
            "{differ} of the 8-bit maxima codes differ: {r}"
        );
        // A differing maximum code moves its block's values by less than a step.
        assert!(r["dequantized_max_diff"].as_f64().unwrap() < 1e-4, "{r}");
        assert!(r["quantization_error"].as_f64().unwrap() > 0.0, "{r}");
    }
}

/// QLoRA: the blocks' weights held in NF4 (recomputed blocks in the backward pass), the
/// loss goes down, and the adapter loads in PEFT over the 16/32-bit base with cairn's
/// logits.
#[test]
fn qlora_trains_over_nf4_weights_and_loads_in_peft() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let ids = tiny_llama_with_data(root);
    let settings = json!({"method": "lora", "quantize": "nf4",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "learning_rate": 1e-2, "max_steps": 4, "batch_size": 4, "device": "cpu", "max_seq_len": 200,
        "eval_every": 0, "checkpoint_every": 0});
    let job = train_job(root, &root.join("llama"), "qlora", settings, None);
    let (ok, events, stderr) = torch_helper(&[&"train", &"--job", &job]);
    assert!(ok, "{events:?} {stderr}");
    let f = finished(&events);
    assert_eq!(f["quantize"], "nf4", "{f}");
    // 2 layers x 7 linear weights in NF4: half a byte per value and the block maxima.
    let nf4_bytes = f["quantized_bytes"].as_i64().unwrap();
    let linear_values = 2 * (64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 160 * 64);
    assert!(
        nf4_bytes < linear_values * 6 / 10 && nf4_bytes > linear_values / 2,
        "{nf4_bytes} bytes for {linear_values} values"
    );
    assert!(f["recomputed_blocks"].as_i64().unwrap() > 0, "{f}");
    let losses = losses(&f);
    assert!(losses.last() < losses.first(), "{losses:?}");
    let dir = root.join("qlora");
    let ours = root.join("qlora.logits.safetensors");
    cairn_logits(&dir, &ids, &ours);
    let peft = reference(&[&"check-logits", &dir, &ids, &ours, &"peft"]);
    assert!(peft["max_abs_diff"].as_f64().unwrap() < 1e-4, "{peft}");
}

/// The pids of `pid`'s children (Linux /proc).
fn children_of(pid: u32) -> Vec<u32> {
    let tasks = format!("/proc/{pid}/task");
    let mut out = Vec::new();
    for task in std::fs::read_dir(tasks).into_iter().flatten().flatten() {
        let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        out.extend(
            list.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    out
}

/// `cairn run` killed with SIGKILL mid-training takes its libtorch helper with it, and a
/// helper outlives an idle tokio thread (the one that may have spawned it) as long as
/// `cairn` lives: it watches the process, not the thread.
#[test]
fn a_killed_cairn_leaves_no_training_behind() {
    let p = dataset_project();
    p.write(
        "p.yaml",
        &single_train_pipeline("      learning_rate: 0.002\n      max_steps: 100000\n"),
    );
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"));
    cmd.current_dir(p.dir.path())
        .env("CAIRN_STORE", p.store())
        .args(["run", "p.yaml", "--quiet"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut cairn = cmd.spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let helper = loop {
        let torch: Vec<u32> = children_of(cairn.id())
            .into_iter()
            .filter(|c| {
                std::fs::read_to_string(format!("/proc/{c}/comm"))
                    .is_ok_and(|n| n.trim() == "cairn-torch")
            })
            .collect();
        if let Some(&pid) = torch.first() {
            break pid;
        }
        assert!(std::time::Instant::now() < deadline, "no training started");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    // Past tokio's 10 s keep-alive of idle blocking threads: still training.
    std::thread::sleep(std::time::Duration::from_secs(12));
    assert!(
        std::path::Path::new(&format!("/proc/{helper}")).exists(),
        "the helper died while cairn was alive"
    );
    cairn.kill().unwrap();
    cairn.wait().unwrap();
    let gone = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::path::Path::new(&format!("/proc/{helper}/stat")).exists()
        && !std::fs::read_to_string(format!("/proc/{helper}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
    {
        assert!(
            std::time::Instant::now() < gone,
            "cairn-torch {helper} still runs 5 s after cairn was killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A 3x2 LoRA sweep on a tiny Llama: six real trainings that share the dataset step,
/// `cairn runs compare` with each variant's params and the metrics its model recorded,
/// a new rank that trains only its two variants, and a `when:` that keeps DPO off until
/// it is flipped.
#[test]
fn a_lora_sweep_trains_each_variant_once_and_compares_them() {
    let p = Project::new();
    write_preferences(&p.path("pref"));
    reference(&[&"make", &p.path("models"), &"llama"]);
    p.write(
        "sweep.yaml",
        r#"name: lora_sweep
params:
  ranks: [2, 4, 8]
  use_dpo: false
steps:
  prefs: {uses: source, with: {path: pref}}
  sft:
    uses: finetune
    matrix: {rank: "${params.ranks}", lr: [0.01, 0.003]}
    inputs: {dataset: prefs.data}
    with: {model: models/llama, method: lora, lora: {r: "${item.rank}", alpha: 16}, template: "{instruction}{output}", max_steps: 3, learning_rate: "${item.lr}", eval_every: 3}
  dpo:
    uses: finetune
    when: ${params.use_dpo}
    inputs: {dataset: prefs.data, model: "sft[rank=4,lr=0.01].model"}
    with: {objective: dpo, method: lora, template: "{instruction}{output}", max_steps: 2, learning_rate: 0.01}
"#,
    );
    let cold = p.run("sweep.yaml", &[]);
    assert_eq!(cold.code, 0, "{}\n{}", cold.json, cold.stderr);
    let trained = |o: &common::Outcome, status: &str| -> Vec<String> {
        o.with_status(status)
            .into_iter()
            .filter(|n| n.starts_with("sft["))
            .collect()
    };
    assert_eq!(trained(&cold, "ran").len(), 6, "{}", cold.json);
    assert_eq!(cold.step("prefs")["status"], "ran");
    assert_eq!(cold.step("dpo")["status"], "skipped");
    assert!(
        cold.reason("dpo").starts_with("condition false"),
        "{}",
        cold.reason("dpo")
    );

    let compare = |args: &[&str]| -> Value {
        let mut all = vec!["runs", "compare", "--pipeline", "lora_sweep", "--json"];
        all.extend_from_slice(args);
        let (code, out, err) = p.exec(&all);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(&out).unwrap()
    };
    let check_rows = |table: &Value, expected: usize| {
        let rows = table["rows"].as_array().unwrap();
        assert_eq!(rows.len(), expected, "{table}");
        assert_eq!(table["params"], json!(["lr", "rank"]));
        for metric in ["train_loss", "eval_loss", "tokens_per_second"] {
            assert!(
                table["metrics"]
                    .as_array()
                    .unwrap()
                    .contains(&json!(metric)),
                "{metric} column: {}",
                table["metrics"]
            );
        }
        for row in rows {
            let step = row["steps"][0].as_str().unwrap();
            let meta = artifact(&p, &row_model(&p, row["run"].as_str().unwrap(), step))["metadata"]
                .clone();
            assert_eq!(meta["lora"]["r"], row["params"]["rank"], "{row}");
            assert_eq!(
                meta["learning_rate"].as_f64(),
                row["params"]["lr"].as_f64(),
                "{row}"
            );
            assert_eq!(
                meta["train_loss"].as_f64(),
                row["metrics"]["train_loss"].as_f64(),
                "{row}"
            );
            assert_eq!(
                meta["eval_loss"].as_f64(),
                row["metrics"]["eval_loss"].as_f64(),
                "{row}"
            );
            assert!(row["duration_ms"].as_u64().unwrap() > 0, "{row}");
        }
    };
    check_rows(&compare(&[]), 6);

    let more = p.run("sweep.yaml", &["--set", "ranks=[2,4,8,16]"]);
    assert_eq!(more.code, 0, "{}", more.stderr);
    assert_eq!(
        trained(&more, "ran"),
        vec!["sft[rank=16,lr=0.01]", "sft[rank=16,lr=3e-3]"]
    );
    assert_eq!(trained(&more, "cached").len(), 6);
    let table = compare(&["--sort", "eval_loss"]);
    check_rows(&table, 8);
    let losses: Vec<f64> = table["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["metrics"]["eval_loss"].as_f64().unwrap())
        .collect();
    assert!(
        losses.windows(2).all(|w| w[0] <= w[1]),
        "sorted: {losses:?}"
    );

    let dpo = p.run(
        "sweep.yaml",
        &["--set", "ranks=[2,4,8,16]", "--set", "use_dpo=true"],
    );
    assert_eq!(dpo.code, 0, "{}", dpo.stderr);
    assert_eq!(dpo.step("dpo")["status"], "ran");
    assert!(trained(&dpo, "ran").is_empty(), "{}", dpo.json);
}

/// The model digest a run recorded for a step.
fn row_model(p: &Project, run: &str, step: &str) -> String {
    let (code, out, err) = p.exec(&["runs", "show", run, "--json"]);
    assert_eq!(code, 0, "{err}");
    let shown: Value = serde_json::from_str(&out).unwrap();
    shown["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"] == step)
        .and_then(|s| s["outputs"]["model"]["digest"].as_str())
        .unwrap_or_else(|| panic!("no model for {step} in {shown}"))
        .to_string()
}
