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
    next_tokens(&logits.view([1, -1]), &[seen], g)[0]
}

/// The next token of each row of `logits` [rows, vocab], `seen[r]` the tokens row r's
/// repetition penalty looks at.
pub fn next_tokens(logits: &Tensor, seen: &[&[i64]], g: &GenerationSettings) -> Vec<i64> {
    let mut scores = logits.to_kind(Kind::Float);
    if g.repetition_penalty != 1.0 {
        for (r, row_seen) in seen.iter().enumerate() {
            if row_seen.is_empty() {
                continue;
            }
            let mut uniq = row_seen.to_vec();
            uniq.sort_unstable();
            uniq.dedup();
            let idx = Tensor::from_slice(&uniq).to_device(scores.device());
            let row = scores.get(r as i64);
            let picked = row.gather(0, &idx, false);
            let penalised = picked.where_self(&picked.lt(0.0), &(&picked / g.repetition_penalty));
            let penalised =
                (&picked * g.repetition_penalty).where_self(&picked.lt(0.0), &penalised);
            let _ = scores.get(r as i64).scatter_(0, &idx, &penalised);
        }
    }
    if g.temperature <= 0.0 {
        return Vec::try_from(scores.argmax(1, false)).unwrap_or_default();
    }
    scores /= g.temperature;
    let vocab = scores.size()[1];
    if g.top_k > 0 && g.top_k < vocab {
        let (top, _) = scores.topk(g.top_k, 1, true, true);
        let kth = top.narrow(1, g.top_k - 1, 1);
        scores = scores.masked_fill(&scores.lt_tensor(&kth), f64::NEG_INFINITY);
    }
    if g.top_p < 1.0 {
        let (sorted, order) = scores.sort(1, true);
        let probs = sorted.softmax(1, Kind::Float);
        let cum = probs.cumsum(1, Kind::Float);
        // Drop tokens once the mass before them already reaches top_p (keeps at least one).
        let remove_sorted = (&cum - &probs).gt(g.top_p);
        let remove = remove_sorted.scatter(1, &order, &remove_sorted);
        scores = scores.masked_fill(&remove, f64::NEG_INFINITY);
    }
    Vec::try_from(
        scores
            .softmax(1, Kind::Float)
            .multinomial(1, false)
            .view([-1]),
    )
    .unwrap_or_default()
}

/// The text of one reply as its tokens arrive: decoded, cut at the first stop string,
/// and released only once it can no longer turn out to be part of a stop string or of a
/// multi-byte character.
pub struct TextStream {
    stops: Vec<String>,
    hold: usize,
    generated: Vec<u32>,
    text: String,
    emitted: usize,
    stopped: bool,
}

impl TextStream {
    /// A stream that ends at any of `stops`.
    pub fn new(stops: &[String]) -> Self {
        let hold = stops
            .iter()
            .map(|s| s.len())
            .max()
            .unwrap_or(1)
            .saturating_sub(1);
        Self {
            stops: stops.to_vec(),
            hold,
            generated: Vec::new(),
            text: String::new(),
            emitted: 0,
            stopped: false,
        }
    }

    /// Adds a generated token; returns the text that settled (possibly empty). After a
    /// stop string, [`TextStream::stopped`] is true and the text ends before it.
    pub fn push(&mut self, tokenizer: &Tokenizer, token: u32) -> Result<String, String> {
        self.generated.push(token);
        self.text = tokenizer
            .decode(&self.generated, false)
            .map_err(|e| e.to_string())?;
        if let Some(pos) = self
            .stops
            .iter()
            .filter_map(|s| self.text.find(s.as_str()))
            .min()
        {
            self.text.truncate(pos);
            self.stopped = true;
            return Ok(String::new());
        }
        if self.text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let mut safe = self.text.len().saturating_sub(self.hold);
        while !self.text.is_char_boundary(safe) {
            safe -= 1;
        }
        if safe <= self.emitted {
            return Ok(String::new());
        }
        let piece = self.text[self.emitted..safe].to_string();
        self.emitted = safe;
        Ok(piece)
    }

    /// Whether a stop string ended the reply.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Tokens generated so far.
    pub fn tokens(&self) -> usize {
        self.generated.len()
    }

    /// Ends the reply: the text not yet released, and the whole text.
    pub fn finish(mut self) -> (String, String) {
        let end = self.text.trim_end_matches('\u{FFFD}').len();
        self.text.truncate(end);
        let rest = if self.text.len() > self.emitted && self.text.is_char_boundary(self.emitted) {
            self.text[self.emitted..].to_string()
        } else {
            String::new()
        };
        (rest, self.text)
    }
}

/// A model mid-generation: its caches, and the encoder output for T5.
pub enum Session {
    Decoder(Cache),
    Seq2Seq { encoded: Tensor, cache: Cache },
}

impl Session {
    /// Reads the prompt `ids` and returns the logits of the first new token.
    pub fn start(model: &Model, ids: &[i64], eos: i64) -> (Self, Tensor) {
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
    pub fn step(&mut self, model: &Model, token: i64) -> Tensor {
        self.step_rows(model, &[token])
    }

    /// Feeds one token per row and returns the logits [rows, vocab] of the next.
    fn step_rows(&mut self, model: &Model, tokens: &[i64]) -> Tensor {
        let input = Tensor::from_slice(tokens)
            .view([tokens.len() as i64, 1])
            .to_device(model.device);
        match self {
            Self::Decoder(cache) => model.forward(&input, Some(cache)),
            Self::Seq2Seq { encoded, cache } => model.decode(&input, encoded, None, Some(cache)),
        }
        .select(1, -1)
    }

    /// Turns a one-row session into `rows` identical rows (the prompt is read once).
    fn widen(&mut self, rows: i64) {
        let repeat = |t: &Tensor| {
            let mut shape = vec![1i64; t.dim()];
            shape[0] = rows;
            t.repeat(shape.as_slice())
        };
        let (cache, encoded) = match self {
            Self::Decoder(cache) => (cache, None),
            Self::Seq2Seq { encoded, cache } => (cache, Some(encoded)),
        };
        for slot in cache.iter_mut().flatten() {
            *slot = (repeat(&slot.0), repeat(&slot.1));
        }
        if let Some(e) = encoded {
            *e = repeat(e);
        }
    }
}

/// The prompt's token ids, cut from the left to leave room for `max_new` tokens (a
/// decoder holds prompt and answer in one window; an encoder-decoder model reads the
/// prompt and its closing EOS apart), and the number of new tokens allowed.
pub fn prompt_ids(
    model: &Model,
    tokenizer: &Tokenizer,
    prompt: &str,
    max_new_tokens: usize,
    eos: i64,
) -> Result<(Vec<i64>, usize), String> {
    let enc = tokenizer
        .encode(prompt, false)
        .map_err(|e| format!("tokenizing the prompt: {e}"))?;
    let mut ids: Vec<i64> = enc.get_ids().iter().map(|&i| i64::from(i)).collect();
    let limit = model.cfg.max_positions as usize;
    let max_new = max_new_tokens.min(limit.saturating_sub(1));
    let room = if model.is_seq2seq() {
        limit - 1
    } else {
        limit - max_new
    };
    if ids.len() > room {
        ids.drain(..ids.len() - room);
    }
    if ids.is_empty() {
        ids.push(eos);
    }
    Ok((ids, max_new))
}

/// `n` sampled continuations of one prompt, generated as one batch: the prompt is read
/// once, its cache copied to `n` rows, and every step samples a token per row (rows that
/// ended keep a place in the batch until all have). Seeded once with `g.seed`, so the
/// same settings draw the same replies.
pub fn generate_many(
    model: &Model,
    tokenizer: &Tokenizer,
    prompt: &str,
    g: &GenerationSettings,
    n: usize,
    stops: &[String],
    eos_ids: &[u32],
) -> Result<Vec<Generated>, String> {
    let _guard = tch::no_grad_guard();
    tch::manual_seed(g.seed as i64);
    let eos = i64::from(eos_ids.first().copied().unwrap_or(0));
    let (ids, max_new) = prompt_ids(model, tokenizer, prompt, g.max_new_tokens, eos)?;
    let (mut session, logits) = Session::start(model, &ids, eos);
    session.widen(n as i64);
    let mut logits = logits.view([1, -1]).repeat([n as i64, 1]);
    let t0 = Instant::now();
    let prompt_seen: &[i64] = if model.is_seq2seq() { &[] } else { &ids };
    let mut rows: Vec<Vec<i64>> = vec![Vec::new(); n];
    let mut texts = vec![String::new(); n];
    let mut done = vec![false; n];
    for _ in 0..max_new {
        let seen: Vec<Vec<i64>> = rows
            .iter()
            .map(|r| prompt_seen.iter().chain(r).copied().collect())
            .collect();
        let seen: Vec<&[i64]> = seen.iter().map(Vec::as_slice).collect();
        let next = next_tokens(&logits, &seen, g);
        for (r, &token) in next.iter().enumerate() {
            if done[r] {
                continue;
            }
            if eos_ids.contains(&(token as u32)) {
                done[r] = true;
                continue;
            }
            rows[r].push(token);
            let ids: Vec<u32> = rows[r].iter().map(|&t| t as u32).collect();
            texts[r] = tokenizer.decode(&ids, false).map_err(|e| e.to_string())?;
            if let Some(pos) = stops.iter().filter_map(|s| texts[r].find(s.as_str())).min() {
                texts[r].truncate(pos);
                done[r] = true;
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        let feed: Vec<i64> = next
            .iter()
            .zip(&done)
            .map(|(&t, &d)| if d { eos } else { t })
            .collect();
        logits = session.step_rows(model, &feed);
    }
    let seconds = t0.elapsed().as_secs_f64();
    Ok(texts
        .into_iter()
        .zip(&rows)
        .map(|(text, row)| Generated {
            text: text.trim_end_matches('\u{FFFD}').to_string(),
            tokens: row.len(),
            seconds,
        })
        .collect())
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
    let eos = i64::from(eos_ids.first().copied().unwrap_or(0));
    let (mut ids, max_new) = prompt_ids(model, tokenizer, prompt, g.max_new_tokens, eos)?;
    let prompt_len = ids.len();
    let (mut session, mut logits) = Session::start(model, &ids, eos);
    // What the repetition penalty looks at: the prompt too, unless it was the source.
    let seen_from = if model.is_seq2seq() { prompt_len } else { 0 };
    let t0 = Instant::now();
    let mut stream = TextStream::new(stops);
    for _ in 0..max_new {
        let next = next_token(&logits, &ids[seen_from..], g);
        if eos_ids.contains(&(next as u32)) {
            break;
        }
        ids.push(next);
        let piece = stream.push(tokenizer, next as u32)?;
        if stream.stopped() {
            break;
        }
        if !piece.is_empty() {
            on_text(&piece);
        }
        logits = session.step(model, next);
    }
    let (rest, text) = stream.finish();
    if !rest.is_empty() {
        on_text(&rest);
    }
    Ok(Generated {
        text,
        tokens: ids.len() - prompt_len,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
