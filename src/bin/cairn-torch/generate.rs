//! Text generation with a key/value cache: the prompt is run once, then one token per
//! forward pass. Sampling follows transformers' processors in the same order
//! (repetition penalty, temperature, top-k, top-p); temperature 0 is greedy. Text is
//! streamed as it is decoded, holding back what could still turn out to be a stop string.
//! An encoder-decoder model (T5) reads the prompt as its source once and decodes from its
//! start token; the repetition penalty then sees only the decoded tokens, as in
//! transformers.

use std::time::Instant;

use tch::{Kind, Tensor};
use tokenizers::Tokenizer;

use cairn::ml::job::GenerationSettings;

use crate::decoder::{Cache, Model};

/// What a generation produced.
pub struct Generated {
    /// The text (stop string excluded).
    pub text: String,
    /// Tokens generated.
    pub tokens: usize,
    /// Seconds spent after the prompt was read.
    pub seconds: f64,
}

fn next_token(logits: &Tensor, seen: &[i64], g: &GenerationSettings) -> i64 {
    let mut scores = logits.to_kind(Kind::Float).view([-1]);
    if g.repetition_penalty != 1.0 && !seen.is_empty() {
        let mut uniq = seen.to_vec();
        uniq.sort_unstable();
        uniq.dedup();
        let idx = Tensor::from_slice(&uniq).to_device(scores.device());
        let picked = scores.gather(0, &idx, false);
        let penalised = picked.where_self(&picked.lt(0.0), &(&picked / g.repetition_penalty));
        let penalised = (&picked * g.repetition_penalty).where_self(&picked.lt(0.0), &penalised);
        scores = scores.scatter(0, &idx, &penalised);
    }
    if g.temperature <= 0.0 {
        return scores.argmax(0, false).int64_value(&[]);
    }
    scores /= g.temperature;
    let vocab = scores.size()[0];
    if g.top_k > 0 && g.top_k < vocab {
        let (top, _) = scores.topk(g.top_k, 0, true, true);
        let kth = top.get(g.top_k - 1);
        scores = scores.masked_fill(&scores.lt_tensor(&kth), f64::NEG_INFINITY);
    }
    if g.top_p < 1.0 {
        let (sorted, order) = scores.sort(0, true);
        let probs = sorted.softmax(0, Kind::Float);
        let cum = probs.cumsum(0, Kind::Float);
        // Drop tokens once the mass before them already reaches top_p (keeps at least one).
        let remove_sorted = (&cum - &probs).gt(g.top_p);
        let remove = remove_sorted.scatter(0, &order, &remove_sorted);
        scores = scores.masked_fill(&remove, f64::NEG_INFINITY);
    }
    scores
        .softmax(0, Kind::Float)
        .multinomial(1, false)
        .int64_value(&[0])
}

/// A model mid-generation: its caches, and the encoder output for T5.
enum Session {
    Decoder(Cache),
    Seq2Seq { encoded: Tensor, cache: Cache },
}

impl Session {
    /// Reads the prompt `ids` and returns the logits of the first new token.
    fn start(model: &Model, ids: &[i64], eos: i64) -> (Self, Tensor) {
        let input = |ids: &[i64]| {
            Tensor::from_slice(ids)
                .view([1, -1])
                .to_device(model.device)
        };
        if model.is_seq2seq() {
            let mut source = ids.to_vec();
            if source.last() != Some(&eos) {
                source.push(eos);
            }
            let encoded = model.encode(&input(&source), None);
            let mut cache = Cache::new();
            let logits = model.decode(
                &input(&[model.decoder_start()]),
                &encoded,
                None,
                Some(&mut cache),
            );
            (Self::Seq2Seq { encoded, cache }, logits.select(1, -1))
        } else {
            let mut cache = Cache::new();
            let logits = model.forward(&input(ids), Some(&mut cache));
            (Self::Decoder(cache), logits.select(1, -1))
        }
    }

    /// Feeds one chosen token and returns the logits of the next.
    fn step(&mut self, model: &Model, token: i64) -> Tensor {
        let input = Tensor::from_slice(&[token])
            .view([1, 1])
            .to_device(model.device);
        match self {
            Self::Decoder(cache) => model.forward(&input, Some(cache)),
            Self::Seq2Seq { encoded, cache } => model.decode(&input, encoded, None, Some(cache)),
        }
        .select(1, -1)
    }
}

/// Generates a continuation of `prompt`; `on_text` receives the text as it settles.
pub fn generate(
    model: &Model,
    tokenizer: &Tokenizer,
    prompt: &str,
    g: &GenerationSettings,
    stops: &[String],
    eos_ids: &[u32],
    on_text: &mut dyn FnMut(&str),
) -> Result<Generated, String> {
    let _guard = tch::no_grad_guard();
    tch::manual_seed(g.seed as i64);
    let enc = tokenizer
        .encode(prompt, false)
        .map_err(|e| format!("tokenizing the prompt: {e}"))?;
    let mut ids: Vec<i64> = enc.get_ids().iter().map(|&i| i64::from(i)).collect();
    let limit = model.cfg.max_positions as usize;
    let max_new = g.max_new_tokens.min(limit.saturating_sub(1));
    // A decoder holds prompt and answer in one window; an encoder-decoder model reads
    // the prompt (and its closing EOS) apart.
    let room = if model.is_seq2seq() {
        limit - 1
    } else {
        limit - max_new
    };
    if ids.len() > room {
        ids.drain(..ids.len() - room);
    }
    if ids.is_empty() {
        ids.push(i64::from(eos_ids.first().copied().unwrap_or(0)));
    }
    let prompt_len = ids.len();
    let eos = i64::from(eos_ids.first().copied().unwrap_or(0));
    let (mut session, mut logits) = Session::start(model, &ids, eos);
    // What the repetition penalty looks at: the prompt too, unless it was the source.
    let seen_from = if model.is_seq2seq() { prompt_len } else { 0 };
    let t0 = Instant::now();
    let hold = stops
        .iter()
        .map(|s| s.len())
        .max()
        .unwrap_or(1)
        .saturating_sub(1);
    let mut emitted = 0usize;
    let mut text = String::new();
    let mut generated: Vec<u32> = Vec::new();
    let mut stopped_at = None;
    for _ in 0..max_new {
        let next = next_token(&logits, &ids[seen_from..], g);
        if eos_ids.contains(&(next as u32)) {
            break;
        }
        ids.push(next);
        generated.push(next as u32);
        text = tokenizer
            .decode(&generated, false)
            .map_err(|e| e.to_string())?;
        if let Some(pos) = stops.iter().filter_map(|s| text.find(s.as_str())).min() {
            stopped_at = Some(pos);
            break;
        }
        // Emit what can no longer become part of a stop string or a multi-byte character.
        if !text.ends_with('\u{FFFD}') {
            let mut safe = text.len().saturating_sub(hold);
            while !text.is_char_boundary(safe) {
                safe -= 1;
            }
            if safe > emitted {
                on_text(&text[emitted..safe]);
                emitted = safe;
            }
        }
        logits = session.step(model, next);
    }
    if let Some(pos) = stopped_at {
        text.truncate(pos);
    }
    let text = text.trim_end_matches('\u{FFFD}').to_string();
    if text.len() > emitted && text.is_char_boundary(emitted) {
        on_text(&text[emitted..]);
    }
    Ok(Generated {
        text,
        tokens: ids.len() - prompt_len,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
