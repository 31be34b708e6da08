//! `cairn-torch serve`: the model side of `cairn serve`. Reads requests on stdin and
//! answers with events on stdout (`cairn::inference::protocol`), until stdin closes.
//!
//! Generation uses continuous batching: a new request's prompt is read on its own (its
//! key/value cache built), then the request joins the running batch of its model and
//! every step decodes one token for every row. Rows have different lengths, so the
//! batch's cache is left-padded and a key mask hides the padding; positions (rotary or
//! learned) are per row, so a row decodes exactly as it would alone. Finished rows leave
//! at once and padding columns no row needs any more are cut. Adapters served over one
//! base share its weights; each served model has its own batch. Encoder-decoder models
//! (T5) are generated one request at a time.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, Write};
use std::sync::mpsc;

use tch::{Device, Kind, Tensor};
use tokenizers::Tokenizer;

use cairn::inference::protocol::{
    FailureKind, FinishReason, LoadedModel, Prompt, WorkerConfig, WorkerEvent, WorkerRequest,
};
use cairn::ml::job::GenerationSettings;
use cairn::ml::template::{Conversation, Template};

use crate::decoder::{Cache, Model};
use crate::generate::{next_tokens, TextStream};
use crate::{evaluate, modeldir, train};

/// A model requests can name.
struct Served {
    model: Model,
    tokenizer: Tokenizer,
    template: Template,
    /// Template stop strings (chat requests only).
    stops: Vec<String>,
    eos: String,
}

impl Served {
    fn context(&self) -> usize {
        self.model.cfg.max_positions.max(1) as usize
    }
}

/// One request being decoded.
struct Row {
    id: u64,
    /// What the repetition penalty looks at (prompt and reply).
    seen: Vec<i64>,
    settings: GenerationSettings,
    eos_ids: Vec<u32>,
    stream: TextStream,
    max_new: usize,
    prompt_tokens: usize,
    /// The token to feed next and the position it sits at.
    last: i64,
    position: i64,
}

/// The rows of one model decoded together, and their shared left-padded cache.
#[derive(Default)]
struct Batch {
    rows: Vec<Row>,
    cache: Cache,
    /// [rows, cached columns], true where a row has a token.
    mask: Option<Tensor>,
}

fn emit(event: &WorkerEvent) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, event);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

fn fail(id: u64, kind: FailureKind, message: impl Into<String>) {
    emit(&WorkerEvent::Failed {
        id,
        kind,
        message: message.into(),
    });
}

/// Loads what `config` names and serves requests until stdin closes.
pub fn run(config: &WorkerConfig) -> Result<(), String> {
    let (device, _reason, _) = train::device_for(&config.device, "auto", config.threads)?;
    let kind = if device.is_cuda() {
        Kind::BFloat16
    } else {
        Kind::Float
    };
    let models = load_models(config, device, kind)?;
    let embedder = match &config.embedder {
        Some(dir) => Some(
            crate::embedder::Embedder::load(
                dir,
                config.device.parse()?,
                cairn::embed::Precision::Auto,
                config.threads,
            )
            .map_err(|e| e.to_string())?,
        ),
        None => None,
    };
    let reranker = match &config.reranker {
        Some(dir) => {
            let (kind, int8) = match (config.reranker_precision.as_str(), device.is_cuda()) {
                ("bf16", _) | ("auto", true) => (Kind::BFloat16, false),
                ("f32", _) | ("auto", false) => (Kind::Float, false),
                ("int8", false) if crate::int8::fast_on_this_cpu() => (Kind::Float, true),
                ("int8", false) => {
                    return Err("reranker precision int8 needs a CPU with AVX512-VNNI (libtorch's int8 product is slower than f32 without it); use f32 or bf16".into())
                }
                ("int8", true) => {
                    return Err(
                        "reranker precision int8 runs on the CPU; on CUDA use bf16 (or auto)"
                            .into(),
                    )
                }
                (other, _) => {
                    return Err(format!(
                        "reranker precision {other:?}: use auto, f32, bf16 or int8"
                    ))
                }
            };
            let mut reranker = crate::crossencoder::CrossEncoder::load(dir, device, kind)?;
            if int8 {
                reranker.quantize_int8()?;
            }
            Some(reranker)
        }
        None => None,
    };
    emit(&WorkerEvent::Ready {
        models: models
            .iter()
            .map(|(name, s)| LoadedModel {
                name: name.clone(),
                arch: s.model.cfg.arch.name().to_string(),
                context: s.model.cfg.max_positions,
                template: s.template.name(),
            })
            .collect(),
        device: crate::device::name(device),
        embedding_dim: embedder.as_ref().map(|e| e.info().dim),
    });

    let requests = spawn_reader();
    let mut pending: VecDeque<(u64, String, Prompt, GenerationSettings)> = VecDeque::new();
    let mut batches: BTreeMap<String, Batch> = BTreeMap::new();
    let _guard = tch::no_grad_guard();
    // Stdin closed: what was asked is still answered, then the worker ends.
    let mut closed = false;
    loop {
        let active: usize = batches.values().map(|b| b.rows.len()).sum();
        // Wait for work when there is none; otherwise take what has arrived.
        let mut incoming = Vec::new();
        if active == 0 && pending.is_empty() {
            if closed {
                return Ok(());
            }
            match requests.recv() {
                Ok(r) => incoming.push(r),
                Err(_) => return Ok(()),
            }
        }
        while !closed {
            match requests.try_recv() {
                Ok(r) => incoming.push(r),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => closed = true,
            }
        }
        for request in incoming {
            match request {
                WorkerRequest::Generate {
                    id,
                    model,
                    prompt,
                    settings,
                } => pending.push_back((id, model, prompt, settings)),
                WorkerRequest::Cancel { id } => {
                    pending.retain(|p| p.0 != id);
                    for batch in batches.values_mut() {
                        if let Some(i) = batch.rows.iter().position(|r| r.id == id) {
                            batch.remove(&[i]);
                        }
                    }
                }
                WorkerRequest::Embed { id, texts } => match &embedder {
                    None => fail(
                        id,
                        FailureKind::Invalid,
                        "this server has no embedding model (start it with --embedder DIR or a --rag config)",
                    ),
                    Some(e) => embed(e, id, &texts),
                },
                WorkerRequest::Rerank {
                    id,
                    query,
                    documents,
                } => match &reranker {
                    None => fail(
                        id,
                        FailureKind::Invalid,
                        "this server has no reranker (a cross-encoder under `rerank:` in the RAG config)",
                    ),
                    Some(r) => match r.score(&query, &documents) {
                        Ok(scores) => emit(&WorkerEvent::Scored { id, scores }),
                        Err(e) => fail(id, FailureKind::Internal, e),
                    },
                },
            }
        }
        let mut active: usize = batches.values().map(|b| b.rows.len()).sum();
        while active < config.max_batch.max(1) {
            let Some((id, name, prompt, settings)) = pending.pop_front() else {
                break;
            };
            let Some(served) = models.get(&name) else {
                fail(id, FailureKind::Invalid, format!("no model named {name:?}"));
                continue;
            };
            let batch = batches.entry(name).or_default();
            let admitted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                admit(served, batch, id, &prompt, settings)
            }));
            match admitted {
                Ok(Ok(())) => {}
                Ok(Err((kind, message))) => fail(id, kind, message),
                Err(panic) => fail(id, FailureKind::Internal, panic_text(panic)),
            }
            active = batches.values().map(|b| b.rows.len()).sum();
        }
        for (name, batch) in batches.iter_mut() {
            if batch.rows.is_empty() {
                continue;
            }
            let served = &models[name];
            let stepped =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| batch.step(served)));
            if let Err(panic) = stepped {
                let message = panic_text(panic);
                for row in std::mem::take(&mut batch.rows) {
                    fail(row.id, FailureKind::Internal, message.clone());
                }
                *batch = Batch::default();
            }
        }
    }
}

fn panic_text(panic: Box<dyn std::any::Any + Send>) -> String {
    let text = panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into());
    format!("internal error in the model worker: {text}")
}

/// Stdin lines as requests, on a thread of their own (closing the channel at EOF).
fn spawn_reader() -> mpsc::Receiver<WorkerRequest> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            match serde_json::from_str::<WorkerRequest>(&line) {
                Ok(r) => {
                    if tx.send(r).is_err() {
                        break;
                    }
                }
                Err(e) => eprintln!("cairn-torch serve: ignoring a malformed request: {e}"),
            }
        }
    });
    rx
}

/// Loads every model; adapters over the same base share the base's weights.
fn load_models(
    config: &WorkerConfig,
    device: Device,
    kind: Kind,
) -> Result<BTreeMap<String, Served>, String> {
    let mut bases: BTreeMap<std::path::PathBuf, (Model, Tokenizer)> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for spec in &config.models {
        let adapter = modeldir::is_adapter(&spec.dir);
        let base_dir = if adapter {
            modeldir::adapter_base(&spec.dir)?
        } else {
            spec.dir.clone()
        };
        let key = std::fs::canonicalize(&base_dir).unwrap_or(base_dir.clone());
        if !bases.contains_key(&key) {
            let loaded = modeldir::load_full(&base_dir, device, modeldir::Storage::plain(kind))?;
            bases.insert(key.clone(), loaded);
        }
        let (base, base_tokenizer) = &bases[&key];
        let mut model = base.share();
        let (tokenizer, card, card_dir) = if adapter {
            let (tokenizer, card) = modeldir::attach_adapter(
                &mut model,
                &spec.dir,
                &base_dir,
                base_tokenizer.clone(),
                kind,
            )?;
            (tokenizer, card, spec.dir.clone())
        } else {
            let card = modeldir::read_card(&spec.dir, base_tokenizer, model.cfg.arch.name());
            (base_tokenizer.clone(), card, spec.dir.clone())
        };
        let template = card.template(&card_dir, &tokenizer)?;
        let eos = card.eos(&tokenizer, None).map(|e| e.0).unwrap_or_default();
        let stops = template.stop_strings();
        out.insert(
            spec.name.clone(),
            Served {
                model,
                tokenizer,
                template,
                stops,
                eos,
            },
        );
    }
    Ok(out)
}

fn embed(embedder: &crate::embedder::Embedder, id: u64, texts: &[String]) {
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let tokens = match embedder.tokenize(&refs) {
        Ok(ids) => ids.iter().map(Vec::len).sum(),
        Err(e) => return fail(id, FailureKind::Invalid, e.to_string()),
    };
    match embedder.embed(&refs, 32, &mut |_| true) {
        Ok(flat) => {
            let dim = embedder.info().dim;
            emit(&WorkerEvent::Embedded {
                id,
                vectors: flat.chunks(dim).map(<[f32]>::to_vec).collect(),
                tokens,
            });
        }
        Err(e) => fail(id, FailureKind::Internal, e.to_string()),
    }
}

type Refusal = (FailureKind, String);

/// Reads a request's prompt and starts its row (or, for T5, generates it whole).
fn admit(
    served: &Served,
    batch: &mut Batch,
    id: u64,
    prompt: &Prompt,
    settings: GenerationSettings,
) -> Result<(), Refusal> {
    let invalid = |m: String| (FailureKind::Invalid, m);
    let (text, mut stops) = match prompt {
        Prompt::Messages(turns) => {
            let conv = Conversation {
                turns: turns.clone(),
            };
            let text = served.template.prompt(&conv).map_err(invalid)?;
            (text, served.stops.clone())
        }
        Prompt::Text(t) => (t.clone(), Vec::new()),
    };
    stops.extend(settings.stop.iter().cloned());
    let eos_ids = evaluate::stop_ids(&served.tokenizer, &served.eos, &stops);
    let enc = served
        .tokenizer
        .encode(text.as_str(), false)
        .map_err(|e| invalid(format!("tokenizing the prompt: {e}")))?;
    let mut ids: Vec<i64> = enc.get_ids().iter().map(|&i| i64::from(i)).collect();
    let context = served.context();
    let budget = if served.model.is_seq2seq() {
        ids.len() + 1
    } else {
        ids.len() + settings.max_new_tokens
    };
    if budget > context || (served.model.is_seq2seq() && settings.max_new_tokens >= context) {
        return Err((FailureKind::ContextLength, format!(
            "This model's maximum context length is {context} tokens. However, you requested {} tokens ({} in the messages, {} in the completion). Please reduce the length of the messages or completion.",
            ids.len() + settings.max_new_tokens,
            ids.len(),
            settings.max_new_tokens
        )));
    }
    let eos = i64::from(eos_ids.first().copied().unwrap_or(0));
    if ids.is_empty() {
        ids.push(eos);
    }
    let prompt_tokens = ids.len();
    if served.model.is_seq2seq() {
        emit(&WorkerEvent::Started { id, prompt_tokens });
        let done = crate::generate::generate(
            &served.model,
            &served.tokenizer,
            &text,
            &settings,
            &stops,
            &eos_ids,
            &mut |piece| {
                emit(&WorkerEvent::Delta {
                    id,
                    text: piece.to_string(),
                })
            },
        )
        .map_err(|e| (FailureKind::Internal, e))?;
        emit(&WorkerEvent::Done {
            id,
            text: done.text,
            prompt_tokens,
            completion_tokens: done.tokens,
            finish_reason: if done.tokens >= settings.max_new_tokens {
                FinishReason::Length
            } else {
                FinishReason::Stop
            },
        });
        return Ok(());
    }
    let model = &served.model;
    let mut cache = Cache::new();
    let input = Tensor::from_slice(&ids)
        .view([1, -1])
        .to_device(model.device);
    let logits = model.forward(&input, Some(&mut cache)).select(1, -1);
    let mut row = Row {
        id,
        seen: ids.clone(),
        max_new: settings.max_new_tokens,
        settings,
        eos_ids,
        stream: TextStream::new(&stops),
        prompt_tokens,
        last: 0,
        position: prompt_tokens as i64,
    };
    if row.max_new == 0 {
        emit(&WorkerEvent::Started { id, prompt_tokens });
        row.finish(FinishReason::Length);
        return Ok(());
    }
    let token = next_tokens(&logits, &[&row.seen], &row.settings)[0];
    // `started` marks the first token (its text may not be printable yet): the
    // server's time to first token.
    emit(&WorkerEvent::Started { id, prompt_tokens });
    match row.accept(&served.tokenizer, token) {
        Some(reason) => row.finish(reason),
        None => batch.join(row, cache, prompt_tokens as i64),
    }
    Ok(())
}

impl Row {
    /// Takes a sampled token; `Some` when the reply is complete.
    fn accept(&mut self, tokenizer: &Tokenizer, token: i64) -> Option<FinishReason> {
        if self.eos_ids.contains(&(token as u32)) {
            return Some(FinishReason::Stop);
        }
        self.seen.push(token);
        self.last = token;
        let piece = match self.stream.push(tokenizer, token as u32) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("cairn-torch serve: decoding: {e}");
                return Some(FinishReason::Stop);
            }
        };
        if self.stream.stopped() {
            return Some(FinishReason::Stop);
        }
        if !piece.is_empty() {
            emit(&WorkerEvent::Delta {
                id: self.id,
                text: piece,
            });
        }
        (self.stream.tokens() >= self.max_new).then_some(FinishReason::Length)
    }

    fn finish(self, reason: FinishReason) {
        let completion_tokens = self.stream.tokens();
        let (rest, text) = self.stream.finish();
        if !rest.is_empty() {
            emit(&WorkerEvent::Delta {
                id: self.id,
                text: rest,
            });
        }
        emit(&WorkerEvent::Done {
            id: self.id,
            text,
            prompt_tokens: self.prompt_tokens,
            completion_tokens,
            finish_reason: reason,
        });
    }
}

/// Pads `t` with `n` zero (false) columns on the left of dimension `dim`.
fn pad_left(t: &Tensor, dim: i64, n: i64) -> Tensor {
    if n == 0 {
        return t.shallow_clone();
    }
    let mut shape = t.size();
    shape[dim as usize] = n;
    Tensor::cat(&[&Tensor::zeros(&shape, (t.kind(), t.device())), t], dim)
}

impl Batch {
    /// Adds a row whose prompt filled `cache` with `len` columns.
    fn join(&mut self, row: Row, cache: Cache, len: i64) {
        let device = cache
            .iter()
            .flatten()
            .next()
            .map(|(k, _)| k.device())
            .unwrap_or(Device::Cpu);
        let row_mask = Tensor::ones([1, len], (Kind::Bool, device));
        let Some(mask) = &self.mask else {
            self.cache = cache;
            self.mask = Some(row_mask);
            self.rows.push(row);
            return;
        };
        let cols = mask.size()[1];
        let width = cols.max(len);
        let (grow, row_pad) = (width - cols, width - len);
        for (slot, new) in self.cache.iter_mut().zip(cache) {
            if let (Some((k, v)), Some((nk, nv))) = (slot.as_mut(), new) {
                *k = Tensor::cat(&[pad_left(k, 2, grow), pad_left(&nk, 2, row_pad)], 0);
                *v = Tensor::cat(&[pad_left(v, 2, grow), pad_left(&nv, 2, row_pad)], 0);
            }
        }
        self.mask = Some(Tensor::cat(
            &[pad_left(mask, 1, grow), pad_left(&row_mask, 1, row_pad)],
            0,
        ));
        self.rows.push(row);
    }

    /// Decodes one token for every row; finished rows report and leave.
    fn step(&mut self, served: &Served) {
        let model = &served.model;
        let device = model.device;
        let rows = self.rows.len() as i64;
        let last: Vec<i64> = self.rows.iter().map(|r| r.last).collect();
        let positions: Vec<i64> = self.rows.iter().map(|r| r.position).collect();
        let ids = Tensor::from_slice(&last).view([rows, 1]).to_device(device);
        let positions = Tensor::from_slice(&positions).to_device(device);
        let mask = self.mask.as_ref().expect("a batch with rows has a mask");
        let mask = Tensor::cat(&[mask, &Tensor::ones([rows, 1], (Kind::Bool, device))], 1);
        let logits = model.decode_rows(&ids, &positions, &mask, &mut self.cache);
        self.mask = Some(mask);
        // Rows sharing sampling settings are sampled together.
        let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, r) in self.rows.iter().enumerate() {
            let s = &r.settings;
            let key = format!(
                "{}/{}/{}/{}",
                s.temperature, s.top_k, s.top_p, s.repetition_penalty
            );
            groups.entry(key).or_default().push(i);
        }
        let mut next = vec![0i64; self.rows.len()];
        for members in groups.values() {
            let index: Vec<i64> = members.iter().map(|&i| i as i64).collect();
            let sub = logits.index_select(0, &Tensor::from_slice(&index).to_device(device));
            let seen: Vec<&[i64]> = members
                .iter()
                .map(|&i| self.rows[i].seen.as_slice())
                .collect();
            let picked = next_tokens(&sub, &seen, &self.rows[members[0]].settings);
            for (&i, t) in members.iter().zip(picked) {
                next[i] = t;
            }
        }
        let mut finished = Vec::new();
        for (i, row) in self.rows.iter_mut().enumerate() {
            row.position += 1;
            if let Some(reason) = row.accept(&served.tokenizer, next[i]) {
                finished.push((i, reason));
            }
        }
        let which: Vec<usize> = finished.iter().map(|f| f.0).collect();
        for (row, (_, reason)) in self.remove(&which).into_iter().zip(finished) {
            row.finish(reason);
        }
    }

    /// Takes rows `which` (ascending) out of the batch, with their cache rows; cuts the
    /// padding columns no remaining row uses.
    fn remove(&mut self, which: &[usize]) -> Vec<Row> {
        if which.is_empty() {
            return Vec::new();
        }
        let mut taken = Vec::new();
        for &i in which.iter().rev() {
            taken.push(self.rows.remove(i));
        }
        taken.reverse();
        if self.rows.is_empty() {
            self.cache = Cache::new();
            self.mask = None;
            return taken;
        }
        let keep: Vec<i64> = (0..(self.rows.len() + which.len()) as i64)
            .filter(|i| !which.contains(&(*i as usize)))
            .collect();
        let mask = self.mask.as_ref().expect("mask");
        let index = Tensor::from_slice(&keep).to_device(mask.device());
        let mask = mask.index_select(0, &index);
        // The first column some row still has a token in.
        let used = mask.any_dim(0, false);
        let first = i64::try_from(used.to_kind(Kind::Int64).argmax(0, false)).unwrap_or(0);
        let cols = mask.size()[1];
        for (k, v) in self.cache.iter_mut().flatten() {
            *k = k.index_select(0, &index).narrow(2, first, cols - first);
            *v = v.index_select(0, &index).narrow(2, first, cols - first);
        }
        self.mask = Some(mask.narrow(1, first, cols - first));
        taken
    }
}
