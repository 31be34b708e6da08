//! The feature pipeline through the real binary: documents -> clean -> chunk -> embed ->
//! vector_load (embedded Qdrant Edge) -> `cairn query`, with the model from
//! `scripts/setup` (.models/all-MiniLM-L6-v2).

mod common;

use std::path::PathBuf;

use common::Project;
use serde_json::Value;

fn model_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".models/all-MiniLM-L6-v2");
    assert!(
        dir.join("tokenizer.json").exists(),
        "{} is missing: run `scripts/setup` first",
        dir.display()
    );
    dir
}

fn artifact(p: &Project, digest: &str) -> Value {
    let (code, out, err) = p.exec(&["artifacts", "show", digest, "--json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

fn cat(p: &Project, digest: &str, path: Option<&str>) -> String {
    let mut args = vec!["artifacts", "cat", digest];
    args.extend(path);
    let (code, out, err) = p.exec(&args);
    assert_eq!(code, 0, "{err}");
    out
}

const SOURDOUGH: &str = "# Feeding a sourdough starter\n\nI feed my sourdough starter twice a day with equal weights of rye flour and water. \
A starter that doubles within six hours is ready to leaven bread dough. Keep it warm, discard half before each feeding, \
and watch for bubbles on the surface.\n\nSubscribe\n\n12 likes\n";
const BORROW: &str = "# Fighting the borrow checker\n\nRust's borrow checker rejects code where a mutable reference \
overlaps another reference. Most of my fights with it ended when I restructured ownership: pass indices instead of \
references, or clone the small thing. See https://doc.rust-lang.org/book/ for the rules.\n";
const TOMATO: &str = "# Growing tomatoes on a balcony\n\nTomatoes need six hours of sun, a deep pot and steady watering. \
I grow cherry tomatoes in forty litre containers and tie the stems to bamboo canes as they climb. \
Pinch out the side shoots every week.\n";

fn notes(p: &Project) {
    p.write("mine/sourdough.md", SOURDOUGH)
        .write("mine/borrow.md", BORROW)
        .write("mine/tomato.md", TOMATO)
        // same text under another name: an exact duplicate once cleaned
        .write("mine/sourdough-copy.md", SOURDOUGH)
        .write("mine/tiny.md", "ok\n");
}

fn pipeline(p: &Project, model: &str, with_vectors: bool) {
    let mut yaml = format!(
        "name: features\nparams: {{size: 64}}\nsteps:\n  \
         mine: {{uses: source, with: {{path: mine}}}}\n  \
         docs: {{uses: ingest, inputs: {{files: mine.data}}}}\n  \
         clean: {{uses: clean, inputs: {{documents: docs.documents}}, with: {{urls: mask}}}}\n  \
         chunk: {{uses: chunk, inputs: {{documents: clean.documents}}, with: {{model: \"{model}\", size: \"${{params.size}}\", overlap: 8}}}}\n"
    );
    if with_vectors {
        yaml.push_str(&format!(
            "  embed: {{uses: embed, inputs: {{chunks: chunk.chunks}}, with: {{model: \"{model}\", batch_size: 4}}}}\n  \
             vectors: {{uses: vector_load, inputs: {{embeddings: embed.embeddings}}}}\n"
        ));
    }
    p.write("f.yaml", &yaml);
}

#[test]
fn clean_and_chunk_record_why_data_disappeared_and_rerun_only_what_changed() {
    let p = Project::new();
    notes(&p);
    pipeline(&p, model_dir().to_str().unwrap(), false);
    let first = p.run("f.yaml", &[]);
    assert_eq!(first.code, 0, "{}", first.stderr);

    let cleaned = artifact(&p, &first.output("clean", "documents"));
    let meta = &cleaned["metadata"];
    assert_eq!(meta["clean"]["input"], 5);
    assert_eq!(meta["clean"]["kept"], 3);
    assert_eq!(meta["dropped_by_reason"]["exact_duplicate"], 1);
    assert_eq!(meta["dropped_by_reason"]["too_short"], 1);
    assert_eq!(meta["clean"]["dropped"]["too_short"]["note"], 1);
    let body = cat(&p, &first.output("clean", "documents"), None);
    assert!(
        !body.contains("Subscribe") && !body.contains("12 likes"),
        "{body}"
    );
    assert!(
        body.contains("[URL]") && !body.contains("doc.rust-lang.org"),
        "{body}"
    );
    assert!(
        !body.contains("# Feeding"),
        "markdown heading markers are removed: {body}"
    );

    let chunks_digest = first.output("chunk", "chunks");
    let chunks: Vec<Value> = cat(&p, &chunks_digest, None)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(chunks.len() >= 3, "{chunks:?}");
    assert!(chunks
        .iter()
        .all(|c| c["token_count"].as_u64().unwrap() <= 64));
    assert!(chunks.iter().all(|c| c["id"].as_str().unwrap().len() == 32));
    let chunk_meta = artifact(&p, &chunks_digest)["metadata"].clone();
    assert_eq!(chunk_meta["chunks"], chunks.len());
    assert_eq!(chunk_meta["model"], "all-MiniLM-L6-v2");
    assert_eq!(chunk_meta["max_tokens"], 254, "256 minus [CLS] and [SEP]");
    let hist = chunk_meta["token_counts"]["all"]["histogram"]
        .as_object()
        .unwrap();
    assert_eq!(
        hist.values().map(|v| v.as_u64().unwrap()).sum::<u64>(),
        chunks.len() as u64
    );

    // A smaller chunk size reruns chunk only; clean comes from the cache.
    let second = p.run("f.yaml", &["--set", "size=24"]);
    assert_eq!(second.code, 0, "{}", second.stderr);
    assert_eq!(second.step("clean")["status"], "cached");
    assert_eq!(second.step("chunk")["status"], "ran");
    assert!(
        second
            .reason("chunk")
            .starts_with("param size changed 64 -> 24"),
        "{}",
        second.reason("chunk")
    );
    let small: Vec<Value> = cat(&p, &second.output("chunk", "chunks"), None)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(small.len() > chunks.len());
    assert!(small
        .iter()
        .all(|c| c["token_count"].as_u64().unwrap() <= 24));
}

#[test]
fn bad_feature_parameters_are_rejected_before_anything_runs() {
    let p = Project::new();
    notes(&p);
    p.write(
        "bad.yaml",
        "name: bad\nsteps:\n  mine: {uses: source, with: {path: mine}}\n  docs: {uses: ingest, inputs: {files: mine.data}}\n  \
         clean: {uses: clean, inputs: {documents: docs.documents}, with: {languages: [english], drop_patterns: [\"(\"]}}\n  \
         chunk: {uses: chunk, inputs: {documents: clean.documents}, with: {size: 10, overlap: 10}}\n  \
         embed: {uses: embed, inputs: {chunks: chunk.chunks}, with: {device: tpu}}\n",
    );
    let (code, _, err) = p.exec(&["run", "bad.yaml"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("bad.yaml:"),
        "errors carry file:line:column: {err}"
    );
    assert!(err.contains("invalid regular expression"), "{err}");
    assert!(
        err.contains("overlap 10 must be smaller than size 10"),
        "{err}"
    );
    assert!(err.contains("unknown device \"tpu\""), "{err}");
    assert!(
        !p.store().exists(),
        "nothing is written for an invalid pipeline"
    );
}

#[test]
fn a_missing_model_fails_the_step_with_a_fix() {
    let p = Project::new();
    notes(&p);
    pipeline(&p, "no/such-model", false);
    let out = p.run("f.yaml", &[]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert_eq!(out.step("chunk")["status"], "failed");
    let reason = out.step("chunk")["error"].as_str().unwrap().to_string();
    assert!(
        reason.contains("model `no/such-model` not found"),
        "{reason}"
    );
    assert!(reason.contains("scripts/setup"), "{reason}");
}

#[cfg(all(feature = "torch", feature = "qdrant-edge"))]
mod vectors {
    use super::*;

    fn query(p: &Project, args: &[&str]) -> Value {
        let mut all = vec!["query"];
        all.extend_from_slice(args);
        all.push("--json");
        let (code, out, err) = p.exec(&all);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(&out).unwrap()
    }

    #[test]
    fn documents_become_searchable_vectors_and_reloads_are_verified() {
        let p = Project::new();
        notes(&p);
        pipeline(&p, model_dir().to_str().unwrap(), true);
        let first = p.run("f.yaml", &[]);
        assert_eq!(first.code, 0, "{}", first.stderr);

        // The embeddings artifact: one f32 row per chunk line.
        let emb = first.output("embed", "embeddings");
        let meta = artifact(&p, &emb)["metadata"].clone();
        assert_eq!(meta["dim"], 384);
        assert_eq!(meta["pooling"], "mean");
        assert_eq!(meta["device"], "cpu");
        let tensor = p.path("e.safetensors");
        std::fs::write(&tensor, {
            let out = p
                .cmd()
                .args(["artifacts", "cat", &emb, "embeddings.safetensors"])
                .output()
                .unwrap();
            out.stdout
        })
        .unwrap();
        let (rows, dim, values) = cairn::embed::read_tensor(&tensor).unwrap();
        let lines = cat(&p, &emb, Some("chunks.jsonl")).lines().count();
        assert_eq!((rows, dim), (lines, 384));
        let norm: f32 = values[..dim].iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "normalised: {norm}");

        // Retrieval finds the right note for each topic.
        for (question, expected) in [
            (
                "how often should I feed the starter for bread?",
                "Feeding a sourdough starter",
            ),
            (
                "why does the compiler reject my mutable reference",
                "Fighting the borrow checker",
            ),
            (
                "what pot size for cherry tomatoes",
                "Growing tomatoes on a balcony",
            ),
        ] {
            let res = query(&p, &["embedded_notes", question, "-k", "3"]);
            let hits = res["hits"].as_array().unwrap();
            assert_eq!(hits[0]["payload"]["title"], expected, "{question}: {res:#}");
            assert!(hits[0]["score"].as_f64().unwrap() > hits[1]["score"].as_f64().unwrap());
        }
        let filtered = query(
            &p,
            &["embedded_notes", "bread", "--filter", "category=article"],
        );
        assert_eq!(filtered["hits"].as_array().unwrap().len(), 0);
        let (code, _, err) = p.exec(&["query", "embedded_articles", "bread"]);
        assert_eq!(code, 2);
        assert!(
            err.contains("collections loaded here: embedded_notes"),
            "{err}"
        );

        // Rerun: everything cached, the vector load verified against the collection.
        let again = p.run("f.yaml", &[]);
        assert_eq!(
            again.with_status("ran"),
            Vec::<String>::new(),
            "{}",
            again.json
        );

        // Someone wiped the vector store: vector_load notices and reloads.
        std::fs::remove_dir_all(p.store().join("vectors")).unwrap();
        let reload = p.run("f.yaml", &[]);
        assert_eq!(reload.step("vectors")["status"], "ran");
        assert!(
            reload
                .reason("vectors")
                .starts_with("external state changed: collection embedded_notes is gone"),
            "{}",
            reload.reason("vectors")
        );
        assert_eq!(reload.step("embed")["status"], "cached");
        let res = query(&p, &["embedded_notes", "sourdough starter"]);
        assert_eq!(
            res["hits"][0]["payload"]["title"],
            "Feeding a sourdough starter"
        );
    }

    #[test]
    fn a_pytorch_bin_only_model_gets_a_conversion_hint() {
        let p = Project::new();
        notes(&p);
        let model = p.path("binmodel");
        std::fs::create_dir(&model).unwrap();
        for f in [
            "config.json",
            "tokenizer.json",
            "modules.json",
            "sentence_bert_config.json",
        ] {
            std::fs::copy(model_dir().join(f), model.join(f)).unwrap();
        }
        std::fs::write(model.join("pytorch_model.bin"), b"not really a checkpoint").unwrap();
        pipeline(&p, "binmodel", true);
        let out = p.run("f.yaml", &[]);
        assert_eq!(out.code, 1, "{}", out.stderr);
        assert_eq!(
            out.step("chunk")["status"],
            "ran",
            "the tokenizer is enough to chunk"
        );
        let reason = out.step("embed")["error"].as_str().unwrap().to_string();
        assert!(reason.contains("missing model.safetensors"), "{reason}");
        assert!(
            reason.contains("save_pretrained(DIR, safe_serialization=True)"),
            "{reason}"
        );
    }

    #[test]
    fn changing_the_model_files_reruns_chunk_and_embed() {
        let p = Project::new();
        notes(&p);
        let model = p.path("model");
        std::fs::create_dir(&model).unwrap();
        for entry in std::fs::read_dir(model_dir()).unwrap() {
            let entry = entry.unwrap();
            let target = model.join(entry.file_name());
            if entry.path().is_dir() {
                std::fs::create_dir(&target).unwrap();
                for f in std::fs::read_dir(entry.path()).unwrap() {
                    let f = f.unwrap();
                    std::fs::copy(f.path(), target.join(f.file_name())).unwrap();
                }
            } else {
                std::fs::copy(entry.path(), &target).unwrap();
            }
        }
        pipeline(&p, "model", true);
        let first = p.run("f.yaml", &[]);
        assert_eq!(first.code, 0, "{}", first.stderr);
        std::fs::write(model.join("README.md"), "edited model card\n").unwrap();
        let second = p.run("f.yaml", &[]);
        assert_eq!(second.code, 0, "{}", second.stderr);
        assert_eq!(second.step("clean")["status"], "cached");
        for step in ["chunk", "embed"] {
            assert_eq!(second.step(step)["status"], "ran", "{step}");
            assert!(
                second.reason(step).starts_with("model files changed ("),
                "{step}: {}",
                second.reason(step)
            );
        }
        // Same weights: the vectors are identical, so the load is cut off early.
        assert_eq!(
            second.step("vectors")["status"],
            "cached",
            "{}",
            second.reason("vectors")
        );
    }

    /// `semantic_dedup` between embed and vector_load: a rephrasing of a note (few shared
    /// words, so MinHash keeps it) is dropped as within the cosine threshold of the
    /// original, per category; unrelated notes stay; only the kept chunks are loaded; a
    /// new threshold reruns only the dedup and the load.
    #[test]
    fn semantic_duplicates_are_dropped_before_loading() {
        let p = Project::new();
        notes(&p);
        p.write(
            "mine/starter-again.md",
            "# Keeping a sourdough culture alive\n\nTwice daily I give my sourdough culture the same weight of rye flour as water. \
             Once the culture has doubled in six hours it can raise a loaf. Keep it somewhere warm, throw away half before feeding it, \
             and look for bubbles on top.\n",
        );
        let model = model_dir();
        let yaml = |threshold: &str| {
            format!(
                "name: features\nsteps:\n  \
                 mine: {{uses: source, with: {{path: mine}}}}\n  \
                 docs: {{uses: ingest, inputs: {{files: mine.data}}}}\n  \
                 clean: {{uses: clean, inputs: {{documents: docs.documents}}}}\n  \
                 chunk: {{uses: chunk, inputs: {{documents: clean.documents}}, with: {{model: \"{m}\", size: 200, overlap: 0}}}}\n  \
                 embed: {{uses: embed, inputs: {{chunks: chunk.chunks}}, with: {{model: \"{m}\", batch_size: 4}}}}\n  \
                 dedup: {{uses: semantic_dedup, inputs: {{embeddings: embed.embeddings}}, with: {{threshold: {threshold}}}}}\n  \
                 vectors: {{uses: vector_load, inputs: {{embeddings: dedup.embeddings}}}}\n",
                m = model.display()
            )
        };
        p.write("f.yaml", &yaml("0.7"));
        let run = p.run("f.yaml", &[]);
        assert_eq!(run.code, 0, "{}", run.stderr);

        // The rephrasing's cosine to the original, measured on embed's own vectors.
        let emb = run.output("embed", "embeddings");
        let chunks: Vec<Value> = cat(&p, &emb, Some("chunks.jsonl"))
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let tensor = p.path("emb.safetensors");
        let bytes = p
            .cmd()
            .args(["artifacts", "cat", &emb, "embeddings.safetensors"])
            .output()
            .unwrap()
            .stdout;
        std::fs::write(&tensor, bytes).unwrap();
        let (_, dim, values) = cairn::embed::read_tensor(&tensor).unwrap();
        let row_of = |needle: &str| {
            chunks
                .iter()
                .position(|c| c["text"].as_str().unwrap().contains(needle))
                .unwrap()
        };
        let (original, again) = (row_of("I feed my sourdough starter"), row_of("Twice daily"));
        let vector = |i: usize| &values[i * dim..(i + 1) * dim];
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        let cosine = |a: &[f32], b: &[f32]| {
            a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>() / (norm(a) * norm(b))
        };
        let c = cosine(vector(original), vector(again));
        assert!(c >= 0.7, "the rephrasing is at cosine {c} only");
        for other in [row_of("borrow checker"), row_of("Tomatoes need")] {
            let c = cosine(vector(original), vector(other));
            assert!(c < 0.7, "an unrelated note is at cosine {c}");
        }

        let dedup = run.output("dedup", "embeddings");
        let meta = artifact(&p, &dedup)["metadata"].clone();
        let d = &meta["semantic_dedup"];
        assert_eq!(d["dropped"]["note"], 1, "{meta:#}");
        assert_eq!(d["samples"][0]["of"], chunks[original]["id"], "{meta:#}");
        assert_eq!(meta["count"].as_u64().unwrap() as usize, chunks.len() - 1);
        assert_eq!(meta["dim"], 384, "the embedder's metadata is carried over");
        let kept = cat(&p, &dedup, Some("chunks.jsonl"));
        assert!(
            !kept.contains("Twice daily") && kept.contains("borrow checker"),
            "{kept}"
        );
        let res = query(
            &p,
            &[
                "embedded_notes",
                "rye flour and water for the starter",
                "-k",
                "10",
            ],
        );
        let texts: Vec<&str> = res["hits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["payload"]["text"].as_str().unwrap())
            .collect();
        assert_eq!(texts.len(), chunks.len() - 1, "{texts:?}");
        assert!(
            texts.iter().all(|t| !t.contains("Twice daily")),
            "{texts:?}"
        );

        // A threshold nothing reaches keeps everything; embed is not rerun.
        p.write("f.yaml", &yaml("1.0"));
        let again = p.run("f.yaml", &[]);
        assert_eq!(again.code, 0, "{}", again.stderr);
        assert_eq!(again.step("embed")["status"], "cached");
        assert_eq!(
            again.step("dedup")["status"],
            "ran",
            "{}",
            again.reason("dedup")
        );
        let meta = artifact(&p, &again.output("dedup", "embeddings"))["metadata"].clone();
        assert_eq!(
            meta["count"].as_u64().unwrap() as usize,
            chunks.len(),
            "{meta:#}"
        );

        // A threshold outside (0, 1] is refused at load time.
        p.write("f.yaml", &yaml("1.5"));
        let (code, _, err) = p.exec(&["validate", "f.yaml"]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("threshold 1.5 is outside"), "{err}");
    }
}

/// `clean` with PII rules: e-mail addresses and phone numbers masked, a document holding
/// an API key dropped (reason `pii`), counts per kind in the metadata; a wrong action
/// or kind is a load-time error that names what is allowed.
#[test]
fn clean_masks_personal_data_and_drops_documents_with_secrets() {
    let p = Project::new();
    p.write(
        "chats/friend.md",
        "Lunch on Friday? Write to maria.rossi@example.org or call +39 06 6982 1234 if the \
         train is late, I will wait at the station with the tickets.\n",
    )
    .write(
        "chats/deploy.md",
        "Here is the deploy key for the blog, keep it safe: ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789 \
         and rotate it after the migration is done next week.\n",
    )
    .write("chats/plain.md", &TOMATO.replace("balcony", "terrace"));
    let yaml = "name: pii\nsteps:\n  mine: {uses: source, with: {path: chats}}\n  \
                docs: {uses: ingest, inputs: {files: mine.data}}\n  \
                clean: {uses: clean, inputs: {documents: docs.documents}, \
                with: {pii: {email: mask, phone: mask, api_key: drop}}}\n";
    p.write("p.yaml", yaml);
    let run = p.run("p.yaml", &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let cleaned = run.output("clean", "documents");
    let body = cat(&p, &cleaned, None);
    assert!(
        body.contains("Write to [EMAIL] or call [PHONE] if the train"),
        "{body}"
    );
    assert!(
        !body.contains("maria.rossi") && !body.contains("6982"),
        "{body}"
    );
    assert!(
        !body.contains("ghp_") && !body.contains("deploy key"),
        "{body}"
    );
    let meta = &artifact(&p, &cleaned)["metadata"];
    assert_eq!(meta["dropped_by_reason"]["pii"], 1, "{meta}");
    assert_eq!(
        meta["clean"]["dropped_examples"]["pii"][0]["detail"],
        "api_key"
    );
    assert_eq!(meta["clean"]["pii_found"]["email"], 1, "{meta}");
    assert_eq!(meta["clean"]["pii_found"]["phone"], 1, "{meta}");
    assert_eq!(meta["clean"]["pii_found"]["api_key"], 1, "{meta}");
    assert_eq!(meta["clean"]["kept"], 2);

    for (with, expected) in [
        (
            "{pii: masked}",
            "pii action \"masked\" is not keep, mask or drop",
        ),
        ("{pii: {emails: mask}}", "unknown pii kind `emails`"),
    ] {
        p.write(
            "bad.yaml",
            &yaml.replace("{pii: {email: mask, phone: mask, api_key: drop}}", with),
        );
        let (code, _, err) = p.exec(&["validate", "bad.yaml"]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("bad.yaml:") && err.contains(expected), "{err}");
    }
}

/// The Gopher quality rules on real pages: the Python tutorial (prose with examples)
/// mostly stays; the generated index pages (link lists) go, each with the rule it broke
/// and the measured value, counted per rule in the metadata.
#[test]
fn quality_rules_drop_index_pages_and_keep_the_tutorial() {
    let docs = std::path::Path::new("/usr/share/doc/python3.11/html");
    if !common::process::installed_or_skip(
        docs.join("tutorial/classes.html").exists(),
        "Debian's python3.11-doc",
        "apt-get install python3.11-doc; .ci/run does",
    ) {
        return;
    }
    let p = Project::new();
    let mut tutorial = 0;
    for entry in std::fs::read_dir(docs.join("tutorial")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "html") {
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            p.write(
                &format!("site/tutorial-{name}"),
                &std::fs::read_to_string(&path).unwrap(),
            );
            tutorial += 1;
        }
    }
    for letter in ["A", "B", "C", "D", "E"] {
        let name = format!("genindex-{letter}.html");
        p.write(
            &format!("site/{name}"),
            &std::fs::read_to_string(docs.join(&name)).unwrap(),
        );
    }
    p.write(
        "q.yaml",
        "name: quality\nsteps:\n  site: {uses: source, with: {path: site}}\n  \
         docs: {uses: ingest, inputs: {files: site.data}}\n  \
         clean: {uses: clean, inputs: {documents: docs.documents}, with: {quality: {preset: gopher}}}\n",
    );
    let run = p.run("q.yaml", &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let meta = artifact(&p, &run.output("clean", "documents"))["metadata"].clone();
    let dropped = meta["clean"]["dropped"].as_object().unwrap();
    let quality: Vec<&String> = dropped
        .keys()
        .filter(|k| k.starts_with("quality."))
        .collect();
    assert!(!quality.is_empty(), "{meta:#}");
    // Every index page is dropped by a named quality rule, with what was measured.
    let examples: Vec<Value> = quality
        .iter()
        .flat_map(|k| {
            meta["clean"]["dropped_examples"][k.as_str()]
                .as_array()
                .unwrap()
                .clone()
        })
        .collect();
    for letter in ["A", "B", "C", "D", "E"] {
        let ex = examples
            .iter()
            .find(|e| {
                e["url"]
                    .as_str()
                    .unwrap()
                    .ends_with(&format!("genindex-{letter}.html"))
            })
            .unwrap_or_else(|| {
                panic!("genindex-{letter} was not dropped by a quality rule: {meta:#}")
            });
        let detail = ex["detail"].as_str().unwrap();
        assert!(detail.contains('<') || detail.contains('>'), "{detail}");
    }
    // The tutorial's prose mostly stays.
    let kept = meta["clean"]["kept"].as_u64().unwrap() as usize;
    assert!(
        kept * 10 >= tutorial * 7,
        "kept {kept} of {tutorial} tutorial pages: {meta:#}"
    );
    let reasons = meta["dropped_by_reason"].as_object().unwrap();
    assert!(
        reasons.keys().any(|k| k.starts_with("quality.")),
        "{reasons:?}"
    );

    // Bad rule values are refused before anything runs.
    p.write(
        "bad.yaml",
        "name: bad\nsteps:\n  site: {uses: source, with: {path: site}}\n  \
         docs: {uses: ingest, inputs: {files: site.data}}\n  \
         clean: {uses: clean, inputs: {documents: docs.documents}, with: {quality: {max_short_lines: 1.5}}}\n",
    );
    let (code, _, err) = p.exec(&["validate", "bad.yaml"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("max_short_lines is a share"), "{err}");
}

/// `pseudonymize_speakers`: in two real-format chat exports (Android and iOS), everyone
/// but the twin becomes the same `Contact-xxxx` in both, in headers, mentions, titles
/// and the structured messages; the twin keeps its name; without the flag nothing moves.
#[test]
fn chat_correspondents_get_stable_pseudonyms() {
    let p = Project::new();
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ingest");
    for f in ["whatsapp_android.txt", "whatsapp_ios.txt"] {
        p.write(
            &format!("chats/{f}"),
            &std::fs::read_to_string(fixtures.join(f)).unwrap(),
        );
    }
    // A mention of Bob by first name inside a message.
    let mut ios = std::fs::read_to_string(fixtures.join("whatsapp_ios.txt")).unwrap();
    ios.push_str("[12/03/2024, 14:09:00] Alice: Thanks Bob, see you tomorrow.\n");
    p.write("chats/whatsapp_ios.txt", &ios);
    let pipeline = |flag: bool| {
        format!(
            "name: chats\nsteps:\n  mine: {{uses: source, with: {{path: chats}}}}\n  \
             docs: {{uses: ingest, inputs: {{files: mine.data}}, with: {{format: whatsapp, target_speaker: Alice}}}}\n  \
             clean: {{uses: clean, inputs: {{documents: docs.documents}}, with: {{pseudonymize_speakers: {flag}}}}}\n"
        )
    };
    p.write("on.yaml", &pipeline(true))
        .write("off.yaml", &pipeline(false));
    let off = p.run("off.yaml", &[]);
    assert_eq!(off.code, 0, "{}", off.stderr);
    assert!(cat(&p, &off.output("clean", "documents"), None).contains("Bob"));

    let on = p.run("on.yaml", &[]);
    assert_eq!(on.code, 0, "{}", on.stderr);
    let out = on.output("clean", "documents");
    let body = cat(&p, &out, None);
    let bob = cairn::clean::pseudonym::pseudonym("Bob");
    let docs: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(docs.len(), 2, "{body}");
    let word = |name: &str| regex::Regex::new(&format!(r"\b{name}\b")).unwrap();
    for doc in &docs {
        let all = doc.to_string();
        assert!(!word("Bob").is_match(&all), "{all}");
        assert!(!word("Carol").is_match(&all), "{all}");
        assert!(
            all.contains(&bob),
            "the same pseudonym in both chats: {all}"
        );
        assert!(
            word("Alice").is_match(doc["content"].as_str().unwrap()),
            "the twin keeps its name"
        );
        assert!(doc["metadata"]["messages"].to_string().contains(&bob));
    }
    assert!(
        body.contains(&format!("Thanks {bob}, see you tomorrow.")),
        "{body}"
    );
    let meta = artifact(&p, &out)["metadata"].clone();
    assert!(
        meta["clean"]["pseudonymized_speakers"].as_u64().unwrap() >= 2,
        "{meta:#}"
    );
}
