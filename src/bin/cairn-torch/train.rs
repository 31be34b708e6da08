//! The training loop: AdamW (PyTorch's update, decoupled weight decay on matrices only),
//! linear warm-up then cosine/linear decay (Hugging Face's schedules), global-norm
//! clipping, gradient accumulation with the loss normalised over all response tokens of
//! the optimizer step (as transformers does), bf16 autocast on CUDA, periodic evaluation
//! with early stopping, and resumable checkpoints. The optimizer is written out here
//! rather than using tch's because its moments must be saved in checkpoints, which tch's
//! optimizer does not expose.

use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};
use tokenizers::Tokenizer;

use cairn::embed::DeviceChoice;
use cairn::ml::data::{self, Pair, Row, IGNORE};
use cairn::ml::job::{learning_rate_at, Method, ModelCard, Objective, TrainJob, TrainSettings};
use cairn::ml::template::Template;

use crate::decoder::{Config, Model};
use crate::{modeldir, preference};

/// One point of the training curve.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Point {
    pub step: u64,
    pub loss: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval_loss: Option<f64>,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_second: f64,
    /// DPO: rewards and log-probabilities over the step's pairs.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub preference: Option<preference::Metrics>,
    /// DPO: the same over the test split, when it was evaluated.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval_preference: Option<preference::Metrics>,
}

/// The training examples of one split: token rows (SFT) or preference pairs (DPO).
enum Examples {
    Rows(Vec<Row>),
    Pairs(Vec<Pair>),
}

impl Examples {
    fn len(&self) -> usize {
        match self {
            Examples::Rows(r) => r.len(),
            Examples::Pairs(p) => p.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What example `i` adds to the loss's normaliser: its trained tokens, or one pair.
    fn targets(&self, i: usize) -> usize {
        match self {
            Examples::Rows(r) => r[i].target_count(),
            Examples::Pairs(_) => 1,
        }
    }

    /// Tokens example `i` puts through the model.
    fn tokens(&self, i: usize) -> usize {
        match self {
            Examples::Rows(r) => r[i].ids.len(),
            Examples::Pairs(p) => p[i].chosen.ids.len() + p[i].rejected.ids.len(),
        }
    }
}

/// What a checkpoint records beside the tensors.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct State {
    step: u64,
    curve: Vec<Point>,
    best_eval: Option<f64>,
    bad_evals: u32,
    tokens: u64,
    seconds: f64,
}

/// A trainable tensor with its AdamW moments.
struct Slot {
    name: String,
    param: Tensor,
    m: Tensor,
    v: Tensor,
    decay: bool,
}

/// A padded micro-batch.
pub struct Batch {
    /// Token ids [batch, t] (the decoder's inputs for an encoder-decoder model).
    pub ids: Tensor,
    /// Labels aligned with `ids`, shifted by the loss.
    pub labels: Tensor,
    /// Encoder-decoder models: source ids [batch, s] and their 0/1 padding mask.
    pub source: Option<(Tensor, Tensor)>,
}

impl Batch {
    /// Rows as `model` reads them: one sequence for a decoder; for an encoder-decoder
    /// model, the prompt as the source and the response as the target (see
    /// [`Row::seq2seq`]). Right-padded with `pad`.
    pub fn new(model: &Model, rows: &[&Row], pad: i64, device: Device) -> Self {
        if !model.is_seq2seq() {
            let (ids, labels) = batch_tensors(rows, pad, device);
            return Self {
                ids,
                labels,
                source: None,
            };
        }
        let (start, eos) = (model.decoder_start() as u32, pad as u32);
        let (sources, targets): (Vec<Vec<u32>>, Vec<Row>) =
            rows.iter().map(|r| r.seq2seq(start, eos)).unzip();
        let s = sources.iter().map(Vec::len).max().unwrap_or(1);
        let mut src = Vec::with_capacity(rows.len() * s);
        let mut mask = Vec::with_capacity(rows.len() * s);
        for source in &sources {
            src.extend(source.iter().map(|&i| i64::from(i)));
            src.extend(std::iter::repeat_n(pad, s - source.len()));
            mask.extend(std::iter::repeat_n(1i64, source.len()));
            mask.extend(std::iter::repeat_n(0i64, s - source.len()));
        }
        let shape = [rows.len() as i64, s as i64];
        let refs: Vec<&Row> = targets.iter().collect();
        let (ids, labels) = batch_tensors(&refs, pad, device);
        Self {
            ids,
            labels,
            source: Some((
                Tensor::from_slice(&src).view(shape).to_device(device),
                Tensor::from_slice(&mask).view(shape).to_device(device),
            )),
        }
    }

    /// The model's logits for this batch.
    pub fn logits(&self, model: &Model) -> Tensor {
        match &self.source {
            Some((src, mask)) => {
                let encoded = model.encode(src, Some(mask));
                model.decode(&self.ids, &encoded, Some(mask), None)
            }
            None => model.forward(&self.ids, None),
        }
    }
}

/// Puts rows into an ids tensor and a labels tensor, right-padded.
pub fn batch_tensors(rows: &[&Row], pad: i64, device: Device) -> (Tensor, Tensor) {
    let t = rows.iter().map(|r| r.ids.len()).max().unwrap_or(1);
    let mut ids = Vec::with_capacity(rows.len() * t);
    let mut labels = Vec::with_capacity(rows.len() * t);
    for r in rows {
        ids.extend(r.ids.iter().map(|&i| i64::from(i)));
        labels.extend(r.labels.iter().copied());
        ids.extend(std::iter::repeat_n(pad, t - r.ids.len()));
        labels.extend(std::iter::repeat_n(IGNORE, t - r.ids.len()));
    }
    let shape = [rows.len() as i64, t as i64];
    (
        Tensor::from_slice(&ids).view(shape).to_device(device),
        Tensor::from_slice(&labels).view(shape).to_device(device),
    )
}

/// Summed cross-entropy of next-token predictions over labelled positions.
pub fn loss_sum(model: &Model, batch: &Batch, bf16: bool) -> Tensor {
    loss_of_logits(&tch::autocast(bf16, || batch.logits(model)), &batch.labels)
}

fn loss_of_logits(logits: &Tensor, labels: &Tensor) -> Tensor {
    let t = logits.size()[1];
    let v = logits.size()[2];
    let logits = logits
        .narrow(1, 0, t - 1)
        .to_kind(Kind::Float)
        .reshape([-1, v]);
    let targets = labels.narrow(1, 1, t - 1).reshape([-1]);
    logits.cross_entropy_loss::<Tensor>(&targets, None, tch::Reduction::Sum, IGNORE, 0.0)
}

/// Forward and backward of one micro-batch with the loss scaled by `scale`; returns the
/// summed (unscaled) loss and how many blocks were recomputed. With `checkpointing`, the forward pass keeps only each block's
/// input and the backward pass recomputes one block at a time: the gradient reaching a
/// block's output is pushed through it as d(sum(output * grad))/d(input, weights), which
/// is exactly the chain rule. Dropout is reseeded per block so the recomputation draws
/// the same masks. Encoder-decoder models keep every activation.
fn forward_backward(
    model: &Model,
    batch: &Batch,
    scale: f64,
    bf16: bool,
    checkpointing: bool,
    seed: i64,
) -> (f64, u64) {
    let (ids, labels) = (&batch.ids, &batch.labels);
    if !checkpointing || model.is_seq2seq() {
        let loss = loss_sum(model, batch, bf16);
        let value = loss.double_value(&[]);
        (loss * scale).backward();
        return (value, 0);
    }
    let layers = model.cfg.layers;
    let (h0, pos) = tch::autocast(bf16, || model.embed(ids, 0));
    let mut inputs = Vec::with_capacity(layers as usize);
    let mut h = h0.detach();
    tch::no_grad(|| {
        for l in 0..layers {
            inputs.push(h.shallow_clone());
            tch::manual_seed(seed.wrapping_add(l));
            h = tch::autocast(bf16, || model.block(l, &h, &pos, None));
        }
    });
    let x = h.detach().set_requires_grad(true);
    let loss = loss_of_logits(
        &tch::autocast(bf16, || model.head(&model.final_norm(&x))),
        labels,
    );
    let value = loss.double_value(&[]);
    (loss * scale).backward();
    let mut grad = x.grad();
    for l in (0..layers).rev() {
        let input = inputs[l as usize].detach().set_requires_grad(true);
        tch::manual_seed(seed.wrapping_add(l));
        let out = tch::autocast(bf16, || model.block(l, &input, &pos, None));
        (out.to_kind(Kind::Float) * grad.to_kind(Kind::Float))
            .sum(Kind::Float)
            .backward();
        grad = input.grad();
    }
    if h0.requires_grad() {
        (h0.to_kind(Kind::Float) * grad.to_kind(Kind::Float))
            .sum(Kind::Float)
            .backward();
    }
    (value, layers as u64)
}

/// Mean loss over the response tokens of `rows` (no gradients).
pub fn evaluate_loss(
    model: &Model,
    rows: &[Row],
    batch: usize,
    pad: i64,
    bf16: bool,
) -> Option<(f64, usize)> {
    let _guard = tch::no_grad_guard();
    let mut total = 0.0;
    let mut count = 0usize;
    for chunk in rows.chunks(batch.max(1)) {
        let refs: Vec<&Row> = chunk.iter().collect();
        let batch = Batch::new(model, &refs, pad, model.device);
        total += loss_sum(model, &batch, bf16).double_value(&[]);
        count += chunk.iter().map(Row::target_count).sum::<usize>();
    }
    (count > 0).then(|| (total / count as f64, count))
}

/// Resolves device and precision, and says why.
pub fn device_for(
    device: &str,
    precision: &str,
    threads: usize,
) -> Result<(Device, String, bool), String> {
    let choice: DeviceChoice = device.parse()?;
    let (device, reason) = crate::device::pick(choice)?;
    if threads > 0 {
        tch::set_num_threads(threads as i32);
    }
    let bf16 = match (precision, device.is_cuda()) {
        ("auto" | "bf16", true) => true,
        ("auto" | "f32", _) => false,
        ("bf16", false) => return Err("precision bf16 needs CUDA; on CPU use f32 (or auto)".into()),
        (other, _) => {
            return Err(format!(
                "unknown precision {other:?}; use auto, f32 or bf16"
            ))
        }
    };
    Ok((device, reason, bf16))
}

fn latest_checkpoint(dir: &Path) -> Option<(u64, PathBuf)> {
    let entries = std::fs::read_dir(dir).ok()?;
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step: u64 = name.strip_prefix("step-")?.parse().ok()?;
            e.path()
                .join("state.json")
                .exists()
                .then(|| (step, e.path()))
        })
        .max_by_key(|(s, _)| *s)
}

fn save_checkpoint(dir: &Path, slots: &[Slot], state: &State, keep: usize) -> Result<(), String> {
    let final_dir = dir.join(format!("step-{}", state.step));
    let tmp = dir.join(format!(".step-{}.tmp", state.step));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let mut tensors: Vec<(String, &Tensor)> = Vec::new();
    for s in slots {
        tensors.push((format!("param.{}", s.name), &s.param));
        tensors.push((format!("m.{}", s.name), &s.m));
        tensors.push((format!("v.{}", s.name), &s.v));
    }
    modeldir::write_safetensors(&tmp.join("tensors.safetensors"), &tensors)?;
    let text = serde_json::to_string(state).map_err(|e| e.to_string())?;
    std::fs::write(tmp.join("state.json"), text).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&tmp, &final_dir).map_err(|e| format!("{}: {e}", final_dir.display()))?;
    // Keep the newest `keep`.
    let mut steps: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .map_err(|e| e.to_string())?
        .filter_map(Result::ok)
        .filter_map(|e| {
            Some((
                e.file_name()
                    .to_string_lossy()
                    .strip_prefix("step-")?
                    .parse()
                    .ok()?,
                e.path(),
            ))
        })
        .collect();
    steps.sort();
    for (_, old) in steps.iter().rev().skip(keep) {
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(())
}

fn load_checkpoint(path: &Path, slots: &mut [Slot]) -> Result<State, String> {
    let state: State = serde_json::from_str(
        &std::fs::read_to_string(path.join("state.json")).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let file = path.join("tensors.safetensors");
    let tensors: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&file)
        .map_err(|e| format!("{}: {e}", file.display()))?
        .into_iter()
        .collect();
    let _guard = tch::no_grad_guard();
    for s in slots.iter_mut() {
        for (prefix, target) in [("param", &mut s.param), ("m", &mut s.m), ("v", &mut s.v)] {
            let t = tensors
                .get(&format!("{prefix}.{}", s.name))
                .ok_or_else(|| format!("{}: no {prefix}.{}", file.display(), s.name))?;
            target.copy_(&t.to_device(target.device()));
        }
    }
    Ok(state)
}

/// How base weights are stored for `dtype` (`auto`: bf16 when they stay frozen on CUDA).
pub fn weight_kind(dtype: &str, cuda: bool, frozen: bool) -> Result<Kind, String> {
    Ok(match (dtype, cuda && frozen) {
        ("f32", _) | ("auto", false) => Kind::Float,
        ("bf16", _) | ("auto", true) => Kind::BFloat16,
        ("f16", _) => Kind::Half,
        (other, _) => {
            return Err(format!(
                "unknown dtype {other:?}; use auto, f32, bf16 or f16"
            ))
        }
    })
}

/// The tokenizer and base model of a job, base weights held as `storage` says.
fn build_model(
    job: &TrainJob,
    device: Device,
    storage: modeldir::Storage,
) -> Result<(Model, Tokenizer, ModelCard), String> {
    let s = &job.settings;
    if let Some(scratch) = &s.scratch {
        let tokenizer = match &s.tokenizer {
            Some(p) => {
                let p = Path::new(p);
                let file = if p.is_dir() {
                    p.join("tokenizer.json")
                } else {
                    p.to_path_buf()
                };
                Tokenizer::from_file(&file).map_err(|e| format!("{}: {e}", file.display()))?
            }
            None => data::byte_tokenizer()?,
        };
        let (eos, eos_id) = data::eos_token(&tokenizer, s.eos_token.as_deref())?;
        let cfg = Config::scratch(
            scratch,
            tokenizer.get_vocab_size(true) as i64,
            i64::from(eos_id),
        )?;
        let card = ModelCard {
            arch: cfg.arch.name().into(),
            method: "full".into(),
            template: String::new(),
            eos_token: eos,
            base_model: None,
            provenance: Value::Null,
        };
        return Ok((Model::init(cfg, device, s.seed), tokenizer, card));
    }
    let base = job
        .base_dir
        .as_ref()
        .ok_or("no base model: give `model`, `scratch`, or an input `model` artifact")?;
    modeldir::load_any(base, device, storage)
}

/// Runs a training job; `emit` receives the progress events.
pub fn run(job: &TrainJob, emit: &mut dyn FnMut(Value)) -> Result<Value, String> {
    let s: &TrainSettings = &job.settings;
    let (device, reason, bf16) = device_for(&s.device, &s.precision, s.threads)?;
    emit(
        json!({"device": {"device": crate::device::name(device), "reason": reason, "bf16": bf16, "threads": tch::get_num_threads()}}),
    );
    let kind = weight_kind(&s.dtype, device.is_cuda(), s.method == Method::Lora)?;
    if kind != Kind::Float && s.method != Method::Lora {
        return Err(format!(
            "dtype {} needs method: lora (full fine-tuning trains f32 weights)",
            s.dtype
        ));
    }
    let nf4 = s.quantize.as_deref() == Some("nf4");
    if nf4 && s.method != Method::Lora {
        return Err(
            "quantize: nf4 freezes the base weights in 4 bits; it needs method: lora".into(),
        );
    }
    let (mut model, mut tokenizer, mut card) =
        build_model(job, device, modeldir::Storage { kind, nf4 })?;
    if !s.add_tokens.is_empty() {
        let tokens: Vec<tokenizers::AddedToken> = s
            .add_tokens
            .iter()
            .map(|t| tokenizers::AddedToken::from(t.clone(), true))
            .collect();
        tokenizer.add_special_tokens(&tokens);
        let vocab = tokenizer.get_vocab_size(true) as i64;
        model.grow_vocab(vocab, s.method == Method::Lora);
    }
    let template = Template::load(&s.template, job.base_dir.as_deref(), &tokenizer)?;
    let (eos, eos_id) = card.eos(&tokenizer, s.eos_token.as_deref())?;
    let pad = i64::from(eos_id);
    let max_len = s.max_seq_len.min(model.cfg.max_positions as usize);
    let read = |file: &str| -> Result<(Examples, data::SplitStats), String> {
        let path = job.dataset.join(file);
        Ok(match s.objective {
            Objective::Sft => {
                let (rows, stats) = data::read_split(&path, &tokenizer, &template, &eos, max_len)?;
                let rows = if s.packing {
                    data::pack(&rows, max_len)
                } else {
                    rows
                };
                (Examples::Rows(rows), stats)
            }
            Objective::Dpo | Objective::Orpo => {
                let (pairs, stats) = data::read_pairs(&path, &tokenizer, &template, &eos, max_len)?;
                (Examples::Pairs(pairs), stats)
            }
        })
    };
    if s.gguf.is_some() && model.is_seq2seq() {
        return Err(format!(
            "gguf: llama.cpp export is for decoder models; this is a {} model (drop `gguf`)",
            model.cfg.arch.name()
        ));
    }
    if s.packing && model.is_seq2seq() {
        return Err(format!(
            "packing joins examples into one sequence; a {} model reads each source apart: set packing: false",
            model.cfg.arch.name()
        ));
    }
    let (mut train, train_stats) = read(cairn::dataset::TRAIN_FILE)?;
    let (mut test, test_stats) = read(cairn::dataset::TEST_FILE)?;
    if train.is_empty() {
        let unreadable = match s.objective {
            Objective::Sft => "unreadable",
            Objective::Dpo | Objective::Orpo => "without a prompt, a chosen and a rejected reply (objectives dpo and orpo need a preference dataset)",
        };
        return Err(format!("the dataset's train split has no usable example ({} records, {} {unreadable}, {} with no response token left after truncation to {max_len})", train_stats.records, train_stats.unreadable, train_stats.empty));
    }

    // Trainable tensors.
    let base_params = model.num_params();
    let lora_targets;
    let mut continued: Option<(i64, f64)> = None;
    match s.method {
        Method::Full => {
            if !model.lora.is_empty() {
                model.merge_lora();
            }
            lora_targets = Vec::new();
        }
        Method::Lora => {
            if model.lora.is_empty() {
                let targets = if s.lora.target_modules.is_empty() {
                    model.cfg.default_lora_targets()
                } else {
                    s.lora.target_modules.clone()
                };
                let modules = model.linear_modules(&targets);
                if modules.is_empty() {
                    return Err(format!(
                        "lora.target_modules {targets:?} match no linear module of this {} model",
                        model.cfg.arch.name()
                    ));
                }
                model.add_lora(&modules, s.lora.r, s.lora.alpha, s.lora.dropout, s.seed);
                lora_targets = targets;
            } else {
                // Continue the adapters of the input model, with their rank and alpha.
                continued = model.lora.values().next().map(|p| {
                    let r = p.a.size()[0];
                    (r, model.lora_scaling * r as f64)
                });
                lora_targets = model
                    .lora
                    .keys()
                    .filter_map(|m| m.rsplit('.').next().map(str::to_string))
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect();
                model.lora_dropout = s.lora.dropout;
            }
        }
    }
    // DPO's reference, taken before anything trains (and before a checkpoint loads).
    let reference = match (s.objective, s.method) {
        (Objective::Sft, _) => None,
        (Objective::Dpo, _) if s.precompute_ref => {
            if continued.is_some() {
                model.reference_lora = Some(model.frozen_copy().lora);
            }
            for examples in [&mut train, &mut test] {
                if let Examples::Pairs(pairs) = examples {
                    preference::precompute(&model, pairs, s.batch_size.max(1), pad, bf16);
                }
            }
            model.reference_lora = None;
            Some(preference::Reference::Precomputed)
        }
        (Objective::Dpo, Method::Lora) => {
            if continued.is_some() {
                model.reference_lora = Some(model.frozen_copy().lora);
            }
            Some(preference::Reference::Adapters)
        }
        (Objective::Dpo, Method::Full) => {
            Some(preference::Reference::Frozen(Box::new(model.frozen_copy())))
        }
        (Objective::Orpo, _) => Some(preference::Reference::None),
    };
    let mut slots: Vec<Slot> = Vec::new();
    let mut add_slot = |name: String, t: &Tensor, decay: bool| {
        let param = t.set_requires_grad(true);
        slots.push(Slot {
            name,
            m: param.zeros_like(),
            v: param.zeros_like(),
            param,
            decay,
        });
    };
    if s.method == Method::Full {
        for (name, t) in &model.params {
            add_slot(name.clone(), t, t.dim() >= 2);
        }
    } else {
        for t in model.params.values() {
            let _ = t.set_requires_grad(false);
        }
        for (m, pair) in &model.lora {
            add_slot(format!("{m}.lora_A"), &pair.a, true);
            add_slot(format!("{m}.lora_B"), &pair.b, true);
        }
        // The rows of added tokens train with the adapters (matrices: decayed, like
        // every 2-D parameter here).
        if let Some(rows) = &model.new_rows {
            add_slot("added_tokens.embed".into(), &rows.embed, true);
            if let Some(head) = &rows.head {
                add_slot("added_tokens.head".into(), head, true);
            }
        }
    }
    let trainable: i64 = slots.iter().map(|s| s.param.numel() as i64).sum();

    // The schedule of micro-batches: a seeded shuffle per epoch, so a resumed run sees
    // exactly the batches the uninterrupted one would have.
    let bs = s.batch_size.max(1);
    let accum = s.grad_accum.max(1);
    let micro_per_epoch = train.len().div_ceil(bs);
    let steps_per_epoch = micro_per_epoch.div_ceil(accum) as u64;
    let total = s
        .max_steps
        .unwrap_or_else(|| ((s.epochs * steps_per_epoch as f64).ceil() as u64).max(1));
    let order_of = |epoch: u64| {
        let mut order: Vec<usize> = (0..train.len()).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(s.seed.wrapping_add(epoch));
        order.shuffle(&mut rng);
        order
    };
    let mut cached_order: (u64, Vec<usize>) = (0, order_of(0));
    let mut micro_batch = |k: usize| -> Vec<usize> {
        let epoch = (k / micro_per_epoch) as u64;
        if cached_order.0 != epoch {
            cached_order = (epoch, order_of(epoch));
        }
        let i = k % micro_per_epoch;
        let end = ((i + 1) * bs).min(train.len());
        cached_order.1[i * bs..end].to_vec()
    };

    let mut state = State::default();
    let mut resumed_from = None;
    if let Some((step, path)) = latest_checkpoint(&job.checkpoints) {
        state = load_checkpoint(&path, &mut slots)?;
        resumed_from = Some(step);
    }
    emit(json!({"loaded": {
        "arch": model.cfg.arch.name(), "params": base_params, "trainable_params": trainable,
        "method": s.method, "objective": s.objective, "train_rows": train.len(), "test_rows": test.len(),
        "total_steps": total, "resumed_from": resumed_from,
        "train_stats": train_stats, "test_stats": test_stats,
    }}));

    model.train = true;
    let (b1, b2) = (s.adam_beta1, s.adam_beta2);
    // Blocks recomputed by gradient checkpointing (this process; shows the path ran).
    let mut recomputed_blocks = 0u64;
    let mut stopped_early = false;
    let mut last_eval: Option<f64> = state.curve.iter().rev().find_map(|p| p.eval_loss);
    while state.step < total {
        let step = state.step;
        let t0 = Instant::now();
        tch::manual_seed(s.seed.wrapping_add(step) as i64);
        let lr = learning_rate_at(s, step, total);
        let batches: Vec<Vec<usize>> = (0..accum)
            .map(|a| micro_batch(step as usize * accum + a))
            .collect();
        // What the loss is normalised by: trained tokens (SFT) or pairs (DPO, ORPO, whose
        // loss is a mean over pairs).
        let targets: usize = batches.iter().flatten().map(|&i| train.targets(i)).sum();
        let tokens: usize = batches.iter().flatten().map(|&i| train.tokens(i)).sum();
        if step == 0 {
            if let Some(path) = &job.dump_first_batch {
                let mut dump: Vec<(String, Tensor)> = Vec::new();
                for (k, idx) in batches.iter().enumerate() {
                    let batch = match &train {
                        Examples::Rows(rows) => {
                            let refs: Vec<&Row> = idx.iter().map(|&i| &rows[i]).collect();
                            Batch::new(&model, &refs, pad, Device::Cpu)
                        }
                        Examples::Pairs(pairs) => {
                            let refs: Vec<&Pair> = idx.iter().map(|&i| &pairs[i]).collect();
                            preference::dump_batch(&model, &refs, pad)
                        }
                    };
                    dump.push((format!("input_ids.{k}"), batch.ids));
                    dump.push((format!("labels.{k}"), batch.labels));
                    if let Some((src, mask)) = batch.source {
                        dump.push((format!("source_ids.{k}"), src));
                        dump.push((format!("source_mask.{k}"), mask));
                    }
                }
                Tensor::write_safetensors(&dump, path).map_err(|e| e.to_string())?;
            }
        }
        let mut loss_total = 0.0;
        let mut pair_sums = preference::Sums::default();
        for (k, idx) in batches.iter().enumerate() {
            let scale = 1.0 / targets.max(1) as f64;
            match (&train, &reference) {
                (Examples::Pairs(pairs), Some(reference)) => {
                    let refs: Vec<&Pair> = idx.iter().map(|&i| &pairs[i]).collect();
                    let sums = preference::forward_backward(
                        &model, reference, &refs, pad, device, bf16, s, scale,
                    );
                    loss_total += sums.loss();
                    pair_sums.add(&sums);
                }
                (Examples::Rows(rows), _) => {
                    let refs: Vec<&Row> = idx.iter().map(|&i| &rows[i]).collect();
                    let batch = Batch::new(&model, &refs, pad, device);
                    let seed = (s.seed.wrapping_add(step) as i64)
                        .wrapping_mul(1000)
                        .wrapping_add(k as i64 * 100);
                    let (loss, recomputed) = forward_backward(
                        &model,
                        &batch,
                        scale,
                        bf16,
                        s.gradient_checkpointing || nf4,
                        seed,
                    );
                    loss_total += loss;
                    recomputed_blocks += recomputed;
                }
                (Examples::Pairs(_), None) => unreachable!("pairs come with a reference"),
            }
        }
        let grad_norm = {
            let _guard = tch::no_grad_guard();
            let norms: Vec<Tensor> = slots
                .iter()
                .map(|s| {
                    s.param
                        .grad()
                        .to_kind(Kind::Float)
                        .square()
                        .sum(Kind::Float)
                })
                .collect();
            Tensor::stack(&norms, 0)
                .sum(Kind::Float)
                .sqrt()
                .double_value(&[])
        };
        {
            let _guard = tch::no_grad_guard();
            let clip = if s.max_grad_norm > 0.0 {
                (s.max_grad_norm / (grad_norm + 1e-6)).min(1.0)
            } else {
                1.0
            };
            let t = (step + 1) as i32;
            let bc1 = 1.0 - b1.powi(t);
            let bc2_sqrt = (1.0 - b2.powi(t)).sqrt();
            for slot in slots.iter_mut() {
                let mut g = slot.param.grad();
                if s.max_grad_norm > 0.0 {
                    let _ = g.g_mul_scalar_(clip);
                }
                if slot.decay && s.weight_decay > 0.0 {
                    let _ = slot.param.g_mul_scalar_(1.0 - lr * s.weight_decay);
                }
                let _ = slot.m.lerp_(&g, 1.0 - b1);
                let _ = slot.v.g_mul_scalar_(b2);
                let _ = slot.v.g_add_(&(&g * &g * (1.0 - b2)));
                let denom = slot.v.sqrt() / bc2_sqrt + s.adam_epsilon;
                let _ = slot.param.g_add_(&(&slot.m / denom * (-lr / bc1)));
                slot.param.zero_grad();
            }
        }
        let seconds = t0.elapsed().as_secs_f64();
        state.step += 1;
        state.tokens += tokens as u64;
        state.seconds += seconds;
        let mut point = Point {
            step: state.step,
            loss: loss_total / targets.max(1) as f64,
            eval_loss: None,
            lr,
            grad_norm,
            tokens_per_second: tokens as f64 / seconds.max(1e-9),
            preference: pair_sums.means(),
            eval_preference: None,
        };
        let eval_now = s.eval_every > 0 && state.step % s.eval_every == 0 || state.step == total;
        if eval_now && !test.is_empty() {
            model.train = false;
            let eval = match (&test, &reference) {
                (Examples::Rows(rows), _) => {
                    evaluate_loss(&model, rows, bs, pad, bf16).map(|x| x.0)
                }
                (Examples::Pairs(pairs), Some(reference)) => {
                    point.eval_preference =
                        preference::evaluate(&model, reference, pairs, bs, pad, bf16, s);
                    point.eval_preference.as_ref().map(|m| m.loss)
                }
                (Examples::Pairs(_), None) => unreachable!("pairs come with a reference"),
            };
            model.train = true;
            point.eval_loss = eval;
            last_eval = eval;
            if let Some(e) = eval {
                if state.best_eval.is_none_or(|b| e < b) {
                    state.best_eval = Some(e);
                    state.bad_evals = 0;
                } else {
                    state.bad_evals += 1;
                }
                emit(json!({"eval": {"step": state.step, "eval_loss": e}}));
            }
            if s.early_stopping_patience
                .is_some_and(|p| state.bad_evals >= p)
            {
                stopped_early = true;
            }
        }
        emit(json!({"step": point}));
        state.curve.push(point);
        if s.checkpoint_every > 0
            && state.step % s.checkpoint_every == 0
            && state.step < total
            && !stopped_early
        {
            std::fs::create_dir_all(&job.checkpoints)
                .map_err(|e| format!("{}: {e}", job.checkpoints.display()))?;
            save_checkpoint(&job.checkpoints, &slots, &state, 2)?;
            emit(json!({"checkpoint": state.step}));
        }
        if std::env::var("CAIRN_TORCH_ABORT_AFTER_STEP")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            == Some(state.step)
        {
            // Test hook: die like a killed process, without cleaning up.
            std::process::abort();
        }
        if stopped_early {
            break;
        }
    }
    model.train = false;
    for t in model.params.values() {
        let _ = t.set_requires_grad(false);
    }

    card.method = match s.method {
        Method::Full => "full".into(),
        Method::Lora => "lora".into(),
    };
    card.template = template.name();
    card.eos_token = eos;
    card.provenance = job.provenance.clone();
    let save = modeldir::SaveOptions {
        chat: template.chat_template(),
        max_shard_bytes: (s.max_shard_mb * 1e6) as u64,
    };
    match s.method {
        Method::Full => modeldir::save_full(&model, &tokenizer, &card, &save, &job.output)?,
        Method::Lora => {
            let base = job.base_dir.clone().ok_or("LoRA needs a base model")?;
            let base = if modeldir::is_adapter(&base) {
                modeldir::adapter_base(&base)?
            } else {
                base
            };
            card.base_model = Some(base.clone());
            let mut lora = s.lora.clone();
            lora.target_modules = lora_targets.clone();
            if let Some((r, alpha)) = continued {
                (lora.r, lora.alpha) = (r, alpha);
            }
            modeldir::save_adapter(
                &model,
                &tokenizer,
                &card,
                &save,
                &lora,
                &base.display().to_string(),
                &job.output,
            )?;
        }
    }
    if let Some(ty) = &s.gguf {
        let ty = crate::gguf::GgufType::parse(ty)?;
        let path = job.output.join(format!("model-{}.gguf", ty.name()));
        crate::gguf::export(
            &model,
            &tokenizer,
            &card.eos_token,
            template.chat_template(),
            ty,
            &path,
        )?;
    }
    let flops = model.cfg.train_flops_per_token(base_params, max_len as i64);
    Ok(json!({
        "steps": state.step, "total_steps": total, "stopped_early": stopped_early,
        "train_loss": state.curve.last().map(|p| p.loss), "eval_loss": last_eval,
        "best_eval_loss": state.best_eval, "curve": state.curve, "resumed_from": resumed_from,
        "params": base_params, "trainable_params": trainable, "tokens": state.tokens,
        "seconds": state.seconds, "tokens_per_second": state.tokens as f64 / state.seconds.max(1e-9),
        "flops_per_token": flops, "device": crate::device::name(device), "device_reason": reason,
        "precision": if bf16 { "bf16" } else { "f32" }, "arch": model.cfg.arch.name(),
        "dtype": model.dtype_name(),
        "train_rows": train.len(), "test_rows": test.len(), "objective": s.objective,
        "max_seq_len": max_len, "eos_token": card.eos_token, "template": card.template,
        "lora_targets": lora_targets,
        "recomputed_blocks": recomputed_blocks,
        "quantize": s.quantize, "quantized_bytes": model.quantized.values().map(crate::nf4::Nf4Weight::nbytes).sum::<i64>(),
    }))
}
