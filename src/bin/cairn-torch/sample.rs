//! `cairn-torch sample`: N sampled replies per prompt of a dataset split (the `sample`
//! step, the first stage of RLAIF). The N replies of a prompt are generated as one batch
//! over a KV cache (the prompt read once, its cache copied to N rows), seeded with
//! `seed + i` for prompt i, so a rerun draws the same replies.

use std::io::Write;

use serde_json::{json, Value};

use cairn::ml::job::{GenerationSettings, SampleJob};
use cairn::ml::template::{Conversation, Role};

use crate::evaluate::{load_trained, stop_ids, Trained};
use crate::generate::generate_many;

/// Runs a sampling job; returns how many prompts and replies it wrote.
pub fn run(job: &SampleJob, emit: &mut dyn FnMut(Value)) -> Result<Value, String> {
    let Trained {
        model,
        tokenizer,
        template,
        eos,
        device,
        ..
    } = load_trained(&job.model, &job.device, job.threads, emit)?;
    let mut stops = template.stop_strings();
    stops.extend(job.generation.stop.iter().cloned());
    let eos_ids = stop_ids(&tokenizer, &eos, &stops);
    let path = job.dataset.join(&job.split_file);
    let records = cairn::documents::read_jsonl(&path)?;
    let mut prompts: Vec<(Value, Conversation, Option<String>)> = Vec::new();
    let mut unreadable = 0usize;
    for record in &records {
        let Some(conv) = Conversation::from_record(record) else {
            unreadable += 1;
            continue;
        };
        // A record ending with a reply is asked what came before it; a bare prompt as is.
        let (prompt, reference) = match conv.split_last_reply() {
            Some((p, r)) => (p, Some(r)),
            None => (conv, None),
        };
        if prompt.turns.is_empty() {
            unreadable += 1;
            continue;
        }
        prompts.push((
            record.get("id").cloned().unwrap_or(Value::Null),
            prompt,
            reference,
        ));
        if job.max_prompts > 0 && prompts.len() == job.max_prompts {
            break;
        }
    }
    if prompts.is_empty() {
        return Err(format!(
            "{}: no prompt to sample from ({} records, {unreadable} in no known format)",
            path.display(),
            records.len()
        ));
    }
    let file =
        std::fs::File::create(&job.output).map_err(|e| format!("{}: {e}", job.output.display()))?;
    let mut out = std::io::BufWriter::new(file);
    let total = prompts.len() * job.n;
    let mut tokens = 0usize;
    let mut seconds = 0.0;
    for (i, (id, conv, reference)) in prompts.iter().enumerate() {
        let text = template.prompt(conv)?;
        emit(json!({"progress": {"phase": "sampling", "done": i * job.n, "total": total}}));
        let seed = job.generation.seed.wrapping_add(i as u64);
        let g = GenerationSettings {
            seed,
            ..job.generation.clone()
        };
        let replies = generate_many(&model, &tokenizer, &text, &g, job.n, &stops, &eos_ids)?;
        seconds += replies.first().map_or(0.0, |r| r.seconds);
        let samples: Vec<Value> = replies
            .iter()
            .map(|r| {
                tokens += r.tokens;
                json!({"text": r.text.trim(), "seed": seed, "tokens": r.tokens})
            })
            .collect();
        let messages: Vec<Value> = conv
            .turns
            .iter()
            .map(|(role, content)| {
                let role = match role {
                    Role::System => "system",
                    Role::User => "user",
                    Role::Assistant => "assistant",
                };
                json!({"role": role, "content": content})
            })
            .collect();
        let question = conv.last_user();
        let line = json!({"id": id, "prompt": question, "messages": messages,
            "reference": reference, "samples": samples});
        writeln!(out, "{line}").map_err(|e| format!("{}: {e}", job.output.display()))?;
    }
    out.flush()
        .map_err(|e| format!("{}: {e}", job.output.display()))?;
    Ok(
        json!({"prompts": prompts.len(), "samples": total, "unreadable": unreadable,
        "tokens": tokens, "tokens_per_second": tokens as f64 / seconds.max(1e-9),
        "device": crate::device::name(device)}),
    )
}
