//! Model directories in the Hugging Face layout: loading full checkpoints and PEFT LoRA
//! adapters, and writing both (config.json + model.safetensors, or adapter_config.json +
//! adapter_model.safetensors), plus cairn's `cairn_model.json` (template, EOS, base).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};
use tokenizers::Tokenizer;

use cairn::ml::chat_template::ChatTemplate;
use cairn::ml::job::{LoraSettings, ModelCard, MODEL_CARD};

use crate::decoder::{Config, LoraPair, Model};

/// PEFT's prefix of adapter tensor names.
const PEFT_PREFIX: &str = "base_model.model.";

fn read_json(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The card of a model directory, or one inferred for a plain Hugging Face model.
pub fn read_card(dir: &Path, tokenizer: &Tokenizer, arch: &str) -> ModelCard {
    if let Ok(v) = read_json(&dir.join(MODEL_CARD)) {
        if let Ok(card) = serde_json::from_value::<ModelCard>(v) {
            return card;
        }
    }
    ModelCard {
        arch: arch.into(),
        method: "full".into(),
        template: "alpaca".into(),
        eos_token: cairn::ml::data::eos_token(tokenizer, None)
            .map(|e| e.0)
            .unwrap_or_default(),
        base_model: None,
        provenance: Value::Null,
    }
}

/// How a model's base weights are held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Storage {
    /// Dtype of the weights (and what NF4 weights compute in).
    pub kind: Kind,
    /// The blocks' linear weights in NF4, quantized as each is read (QLoRA).
    pub nf4: bool,
}

impl Storage {
    /// Plain weights in `kind`.
    pub fn plain(kind: Kind) -> Self {
        Self { kind, nf4: false }
    }
}

/// While loading, allocations of 1 MiB and more get their own mappings, handed back to
/// the system when freed: the per-tensor temporaries of conversion and quantization
/// would otherwise stay in the heap and in the resident set (glibc's adaptive threshold
/// serves them from the heap after the first big free). Afterwards the threshold is
/// glibc's usual ceiling, so the many activations of training come from the heap.
struct LoadingAllocator;

impl LoadingAllocator {
    fn start() -> Self {
        // SAFETY: mallopt only tunes glibc's allocator.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        }
        Self
    }
}

impl Drop for LoadingAllocator {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        }
    }
}

/// Loads a full model directory, its weights held as `storage` says.
pub fn load_full(
    dir: &Path,
    device: Device,
    storage: Storage,
) -> Result<(Model, Tokenizer), String> {
    let _allocator = LoadingAllocator::start();
    let cfg = Config::from_hf(&read_json(&dir.join("config.json"))?)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut quantized = std::collections::BTreeMap::new();
    // Quantized one tensor at a time as read: the 16/32-bit weights never exist whole.
    let tensors =
        crate::decoder::read_weights(dir, storage.kind, &cfg.uses_tensor(), &mut |name, t| {
            let name = cfg.hf_name(name);
            if storage.nf4 && crate::decoder::is_block_linear(&name, &t) {
                quantized.insert(name, crate::nf4::Nf4Weight::quantize(&t.to_device(device)));
                None
            } else {
                Some((name, t))
            }
        })?;
    let model = Model::from_tensors(cfg, tensors, quantized, device, storage.kind)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let tokenizer = cairn::models::load_tokenizer(dir).map_err(|e| e.to_string())?;
    Ok((model, tokenizer))
}

/// Whether `dir` holds a PEFT adapter rather than full weights.
pub fn is_adapter(dir: &Path) -> bool {
    dir.join("adapter_config.json").exists()
}

/// The base model directory a PEFT adapter applies to.
pub fn adapter_base(dir: &Path) -> Result<PathBuf, String> {
    let card: Option<ModelCard> = read_json(&dir.join(MODEL_CARD))
        .ok()
        .and_then(|v| serde_json::from_value(v).ok());
    if let Some(base) = card.and_then(|c| c.base_model) {
        return Ok(base);
    }
    let cfg = read_json(&dir.join("adapter_config.json"))?;
    let base = cfg["base_model_name_or_path"].as_str().ok_or_else(|| {
        format!(
            "{}: adapter_config.json names no base_model_name_or_path",
            dir.display()
        )
    })?;
    let cwd = std::env::current_dir().unwrap_or_default();
    cairn::models::resolve(base, &cwd).map_err(|e| e.to_string())
}

/// Loads any model directory: a full model, or a LoRA adapter on its base (adapters
/// kept separate, in f32, so training can continue them). Base weights are stored in
/// `kind`.
pub fn load_any(
    dir: &Path,
    device: Device,
    storage: Storage,
) -> Result<(Model, Tokenizer, ModelCard), String> {
    let kind = storage.kind;
    if !is_adapter(dir) {
        let (model, tokenizer) = load_full(dir, device, storage)?;
        let card = read_card(dir, &tokenizer, model.cfg.arch.name());
        return Ok((model, tokenizer, card));
    }
    let base = adapter_base(dir)?;
    let (mut model, base_tokenizer) = load_full(&base, device, storage)?;
    let (tokenizer, card) = attach_adapter(&mut model, dir, &base, base_tokenizer, kind)?;
    Ok((model, tokenizer, card))
}

/// Puts the PEFT adapter in `dir` on `model`, its base loaded from `base` (adapters kept
/// separate, in f32; tables the adapter saves whole replace the base's, in `kind`).
/// Returns the tokenizer (the adapter's own when it has one) and the adapter's card.
pub fn attach_adapter(
    model: &mut Model,
    dir: &Path,
    base: &Path,
    base_tokenizer: Tokenizer,
    kind: Kind,
) -> Result<(Tokenizer, ModelCard), String> {
    let device = model.device;
    let tokenizer = if dir.join("tokenizer.json").exists() {
        cairn::models::load_tokenizer(dir).map_err(|e| e.to_string())?
    } else {
        base_tokenizer
    };
    let cfg = read_json(&dir.join("adapter_config.json"))?;
    let r = cfg["r"].as_f64().unwrap_or(8.0);
    let alpha = cfg["lora_alpha"].as_f64().unwrap_or(r);
    model.lora_scaling = alpha / r;
    model.lora_dropout = cfg["lora_dropout"].as_f64().unwrap_or(0.0);
    let path = dir.join("adapter_model.safetensors");
    let tensors =
        Tensor::read_safetensors(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut pairs: HashMap<String, (Option<Tensor>, Option<Tensor>)> = HashMap::new();
    for (name, t) in tensors {
        let name = name.strip_prefix(PEFT_PREFIX).unwrap_or(&name).to_string();
        // `modules_to_save`: whole tables (the embeddings and head grown by added tokens).
        if name == model.embed_name() || name == "lm_head.weight" {
            let t = t.to_kind(kind).to_device(device);
            let rows = t.size()[0];
            model.params.insert(name, t);
            if rows > model.cfg.vocab {
                model.cfg.vocab = rows;
                model.cfg.raw["vocab_size"] = json!(rows);
            }
            continue;
        }
        let t = t.to_kind(Kind::Float).to_device(device);
        if let Some(m) = name.strip_suffix(".lora_A.weight") {
            pairs.entry(m.to_string()).or_default().0 = Some(t);
        } else if let Some(m) = name.strip_suffix(".lora_B.weight") {
            pairs.entry(m.to_string()).or_default().1 = Some(t);
        } else {
            return Err(format!(
                "{}: unexpected tensor {name} (cairn reads LoRA adapters: lora_A/lora_B)",
                path.display()
            ));
        }
    }
    for (m, pair) in pairs {
        let (Some(a), Some(b)) = pair else {
            return Err(format!(
                "{}: module {m} lacks lora_A or lora_B",
                path.display()
            ));
        };
        if !model.params.contains_key(&format!("{m}.weight")) {
            return Err(format!(
                "{}: adapter for {m}, which the base model {} does not have",
                path.display(),
                base.display()
            ));
        }
        model.lora.insert(m, LoraPair { a, b });
    }
    let mut card = read_card(dir, &tokenizer, model.cfg.arch.name());
    card.base_model = Some(base.to_path_buf());
    Ok((tokenizer, card))
}

/// Writes tensors as safetensors with the `format: pt` metadata `transformers` expects:
/// bf16 and f16 tensors as they are, everything else as f32.
pub fn write_safetensors(path: &Path, tensors: &[(String, &Tensor)]) -> Result<(), String> {
    let mut buffers: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in tensors {
        let t = t.detach().to_device(Device::Cpu);
        let (t, dtype) = match t.kind() {
            Kind::BFloat16 => (t, safetensors::Dtype::BF16),
            Kind::Half => (t, safetensors::Dtype::F16),
            _ => (t.to_kind(Kind::Float), safetensors::Dtype::F32),
        };
        let t = t.contiguous();
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        let n = t.numel();
        let mut bytes = vec![0u8; n * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut bytes, n).map_err(|e| e.to_string())?;
        buffers.push((name.clone(), dtype, shape, bytes));
    }
    let views = buffers
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, _>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize_to_file(views, Some(meta), path)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Writes `tensors` as model.safetensors, or, past `max_shard_bytes`, as shards filled in
/// order plus the index transformers reads (`metadata.total_size`, `weight_map`).
fn write_sharded(
    dir: &Path,
    tensors: &[(String, &Tensor)],
    max_shard_bytes: u64,
) -> Result<(), String> {
    let bytes = |t: &Tensor| {
        let elt = match t.kind() {
            Kind::BFloat16 | Kind::Half => 2,
            _ => 4,
        };
        (t.numel() * elt) as u64
    };
    let total: u64 = tensors.iter().map(|(_, t)| bytes(t)).sum();
    if total <= max_shard_bytes {
        return write_safetensors(&dir.join("model.safetensors"), tensors);
    }
    let mut shards: Vec<Vec<(String, &Tensor)>> = vec![Vec::new()];
    let mut filled = 0;
    for (name, t) in tensors {
        let size = bytes(t);
        if filled > 0 && filled + size > max_shard_bytes {
            shards.push(Vec::new());
            filled = 0;
        }
        filled += size;
        shards
            .last_mut()
            .expect("one shard at least")
            .push((name.clone(), *t));
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        write_safetensors(&dir.join(&file), shard)?;
        for (name, _) in shard {
            weight_map.insert(name.clone(), json!(file));
        }
    }
    write_json(
        &dir.join("model.safetensors.index.json"),
        &json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
    )
}

fn write_json(path: &Path, v: &Value) -> Result<(), String> {
    let text = serde_json::to_string_pretty(v).map_err(|e| e.to_string())?;
    std::fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))
}

/// tokenizer.json and tokenizer_config.json; with the model's chat template, the template
/// and its special tokens too, and generation_config.json's end-of-turn ids, so that
/// transformers, llama.cpp converters and servers render and stop as training did.
fn write_tokenizer(
    dir: &Path,
    tokenizer: &Tokenizer,
    card: &ModelCard,
    chat: Option<&ChatTemplate>,
) -> Result<(), String> {
    tokenizer
        .save(dir.join("tokenizer.json"), false)
        .map_err(|e| format!("tokenizer.json: {e}"))?;
    let mut config = json!({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": card.eos_token,
        "pad_token": card.eos_token, "model_max_length": 1_000_000_000_000_000_000i64});
    if let Some(chat) = chat {
        config["chat_template"] = json!(chat.source());
        if !chat.bos_token().is_empty() {
            config["bos_token"] = json!(chat.bos_token());
        }
        if !chat.eos_token().is_empty() {
            config["eos_token"] = json!(chat.eos_token());
        }
        let stop_ids: Vec<u32> = chat
            .stops()
            .iter()
            .filter_map(|s| tokenizer.token_to_id(s))
            .collect();
        let mut generation = json!({"eos_token_id": stop_ids});
        if let Some(bos) = tokenizer.token_to_id(chat.bos_token()) {
            generation["bos_token_id"] = json!(bos);
        }
        write_json(&dir.join("generation_config.json"), &generation)?;
    }
    write_json(&dir.join("tokenizer_config.json"), &config)
}

/// What is written beside the weights, and how the weights are split.
#[derive(Clone, Copy)]
pub struct SaveOptions<'a> {
    /// The model's chat template (`template: model`), kept with the tokenizer.
    pub chat: Option<&'a ChatTemplate>,
    /// Largest weights file: bigger models are written as transformers shards them
    /// (`model-0000x-of-0000y.safetensors` + `model.safetensors.index.json`).
    pub max_shard_bytes: u64,
}

/// Writes a full model directory (merged adapters included).
pub fn save_full(
    model: &Model,
    tokenizer: &Tokenizer,
    card: &ModelCard,
    opts: &SaveOptions<'_>,
    dir: &Path,
) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let model = model.folded();
    let tensors: Vec<(String, &Tensor)> =
        model.params.iter().map(|(k, v)| (k.clone(), v)).collect();
    write_sharded(dir, &tensors, opts.max_shard_bytes)?;
    let mut config = model.cfg.raw.clone();
    config["torch_dtype"] = json!(model.dtype_name());
    if let Some(eos) = tokenizer.token_to_id(&card.eos_token) {
        config["eos_token_id"] = json!(eos);
    }
    write_json(&dir.join("config.json"), &config)?;
    let mut card = card.clone();
    card.method = "full".into();
    card.base_model = None;
    write_tokenizer(dir, tokenizer, &card, opts.chat)?;
    write_json(
        &dir.join(MODEL_CARD),
        &serde_json::to_value(&card).map_err(|e| e.to_string())?,
    )
}

/// Writes the adapters in PEFT's format (and, with `merge`, full weights in `merged/`).
pub fn save_adapter(
    model: &Model,
    tokenizer: &Tokenizer,
    card: &ModelCard,
    opts: &SaveOptions<'_>,
    lora: &LoraSettings,
    base_ref: &str,
    dir: &Path,
) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut tensors: Vec<(String, &Tensor)> = Vec::new();
    for (m, pair) in &model.lora {
        tensors.push((format!("{PEFT_PREFIX}{m}.lora_A.weight"), &pair.a));
        tensors.push((format!("{PEFT_PREFIX}{m}.lora_B.weight"), &pair.b));
    }
    // Added tokens: the grown tables as PEFT `modules_to_save` (loaded over a base whose
    // embeddings were resized to the tokenizer: `model.resize_token_embeddings(len(tok))`).
    let (embed, head);
    let mut modules_to_save: Vec<String> = Vec::new();
    if model.new_rows.is_some() {
        let embed_module = model.embed_name().trim_end_matches(".weight");
        embed = model.embed_table().detach();
        tensors.push((format!("{PEFT_PREFIX}{embed_module}.weight"), &embed));
        modules_to_save.push(
            embed_module
                .rsplit('.')
                .next()
                .unwrap_or(embed_module)
                .into(),
        );
        if !model.cfg.tie_embeddings {
            head = model.head_table().detach();
            tensors.push((format!("{PEFT_PREFIX}lm_head.weight"), &head));
            modules_to_save.push("lm_head".into());
        }
    }
    write_safetensors(&dir.join("adapter_model.safetensors"), &tensors)?;
    write_json(
        &dir.join("adapter_config.json"),
        &json!({
            "peft_type": "LORA", "task_type": if model.is_seq2seq() { "SEQ_2_SEQ_LM" } else { "CAUSAL_LM" }, "base_model_name_or_path": base_ref,
            "r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
            "target_modules": lora.target_modules, "fan_in_fan_out": model.cfg.is_conv1d(), "bias": "none",
            "inference_mode": true, "init_lora_weights": true,
            "modules_to_save": (!modules_to_save.is_empty()).then_some(&modules_to_save),
            "use_rslora": false, "use_dora": false, "layers_to_transform": null,
        }),
    )?;
    write_tokenizer(dir, tokenizer, card, opts.chat)?;
    write_json(
        &dir.join(MODEL_CARD),
        &serde_json::to_value(card).map_err(|e| e.to_string())?,
    )?;
    if lora.merge {
        save_full(model, tokenizer, card, opts, &dir.join("merged"))?;
    }
    Ok(())
}
