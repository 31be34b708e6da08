//! `cairn-torch evaluate`: perplexity on the test split's responses, greedy answers to
//! test prompts (for ROUGE-L, scored by cairn), and sampled answers to fixed prompts.

use serde_json::{json, Value};

use cairn::ml::data;
use cairn::ml::job::{Answer, EvalJob, EvalResults, GenerationSettings};
use cairn::ml::template::{Conversation, Role};

use std::path::Path;

use cairn::ml::template::Template;
use tokenizers::Tokenizer;

use crate::decoder::Model;
use crate::generate::generate;
use crate::{modeldir, train};

/// EOS ids: the card's token and any stop string that is a single token.
pub fn stop_ids(tokenizer: &tokenizers::Tokenizer, eos: &str, stops: &[String]) -> Vec<u32> {
    let mut ids: Vec<u32> = tokenizer.token_to_id(eos).into_iter().collect();
    ids.extend(stops.iter().filter_map(|s| tokenizer.token_to_id(s)));
    ids
}

/// A model loaded to generate as it was trained: adapters merged, with its template and
/// EOS (what `evaluate` and `sample` both start from).
pub struct Trained {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub template: Template,
    pub eos: String,
    pub device: tch::Device,
    pub bf16: bool,
}

/// Loads the model in `dir` on `device` (reporting the choice through `emit`).
pub fn load_trained(
    dir: &Path,
    device: &str,
    threads: usize,
    emit: &mut dyn FnMut(Value),
) -> Result<Trained, String> {
    let (device, reason, bf16) = train::device_for(device, "auto", threads)?;
    emit(json!({"device": {"device": crate::device::name(device), "reason": reason}}));
    let (mut model, tokenizer, card) =
        modeldir::load_any(dir, device, modeldir::Storage::plain(tch::Kind::Float))?;
    model.merge_lora();
    let template = card.template(dir, &tokenizer)?;
    let (eos, _) = card.eos(&tokenizer, None)?;
    Ok(Trained {
        model,
        tokenizer,
        template,
        eos,
        device,
        bf16,
    })
}

/// Runs an evaluation job.
pub fn run(job: &EvalJob, emit: &mut dyn FnMut(Value)) -> Result<EvalResults, String> {
    let Trained {
        model,
        tokenizer,
        template,
        eos,
        device,
        bf16,
    } = load_trained(&job.model, &job.device, job.threads, emit)?;
    let pad = tokenizer.token_to_id(&eos).map(i64::from).unwrap_or(0);
    let stops = template.stop_strings();
    let eos_ids = stop_ids(&tokenizer, &eos, &stops);
    let mut results = EvalResults {
        device: crate::device::name(device),
        ..EvalResults::default()
    };

    let mut tests: Vec<Value> = Vec::new();
    if let Some(dir) = &job.dataset {
        let test = dir.join(cairn::dataset::TEST_FILE);
        let max_len = job.max_seq_len.min(model.cfg.max_positions as usize);
        let (rows, _) = data::read_split(&test, &tokenizer, &template, &eos, max_len)?;
        emit(json!({"progress": {"phase": "perplexity", "done": 0, "total": rows.len()}}));
        if let Some((loss, n)) = train::evaluate_loss(&model, &rows, 8, pad, bf16) {
            results.loss = Some(loss);
            results.perplexity = Some(loss.exp());
            results.target_tokens = n;
        }
        if test.exists() {
            tests = cairn::documents::read_jsonl(&test)?;
        }
    }
    let greedy = GenerationSettings {
        temperature: 0.0,
        repetition_penalty: 1.0,
        max_new_tokens: job.rouge_max_new_tokens,
        ..GenerationSettings::default()
    };
    let picked: Vec<(Conversation, String)> = tests
        .iter()
        .filter_map(|r| Conversation::from_record(r)?.split_last_reply())
        .take(job.rouge_examples)
        .collect();
    for (i, (conv, reference)) in picked.iter().enumerate() {
        emit(json!({"progress": {"phase": "answers", "done": i, "total": picked.len()}}));
        let out = generate(
            &model,
            &tokenizer,
            &template.prompt(conv)?,
            &greedy,
            &stops,
            &eos_ids,
            &mut |_| {},
        )?;
        let question = conv.last_user();
        results.answers.push(Answer {
            prompt: question,
            reference: Some(reference.clone()),
            output: out.text.trim().to_string(),
        });
    }
    for (i, prompt) in job.prompts.iter().enumerate() {
        emit(json!({"progress": {"phase": "samples", "done": i, "total": job.prompts.len()}}));
        let conv = Conversation {
            turns: vec![(Role::User, prompt.clone())],
        };
        let g = GenerationSettings {
            seed: job.generation.seed.wrapping_add(i as u64),
            ..job.generation.clone()
        };
        let mut stop_all = stops.clone();
        stop_all.extend(g.stop.iter().cloned());
        let out = generate(
            &model,
            &tokenizer,
            &template.prompt(&conv)?,
            &g,
            &stop_all,
            &eos_ids,
            &mut |_| {},
        )?;
        results.samples.push(Answer {
            prompt: prompt.clone(),
            reference: None,
            output: out.text.trim().to_string(),
        });
    }
    Ok(results)
}
