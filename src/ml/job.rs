//! The settings of training, evaluation and generation, shared by the steps (which
//! validate them as parameters) and `cairn-torch` (which runs them, given as a JSON job).

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Full fine-tuning or LoRA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Every weight is trained.
    Full,
    /// Low-rank adapters on `lora.target_modules`; the base weights stay frozen.
    Lora,
}

/// What training optimizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Supervised fine-tuning: cross-entropy on the responses.
    Sft,
    /// Direct preference optimization on (prompt, chosen, rejected) pairs against a
    /// frozen reference (TRL's `DPOTrainer`).
    Dpo,
    /// Odds-ratio preference optimization: the chosen reply's cross-entropy plus `beta`
    /// times an odds-ratio term, no reference model (TRL's `ORPOTrainer`).
    Orpo,
}

/// The DPO loss (TRL's `loss_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DpoLoss {
    /// -log sigmoid(beta x margin); with `label_smoothing` e, the conservative form
    /// -(1-e) log sigmoid(beta x margin) - e log sigmoid(-beta x margin).
    Sigmoid,
    /// IPO: (margin per completion token - 1/(2 beta))^2.
    Ipo,
}

/// LoRA hyper-parameters (PEFT's names and defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoraSettings {
    /// Rank of the adapters (an input adapter being continued keeps its own rank and alpha).
    #[serde(default = "default_rank")]
    pub r: i64,
    /// Scaling numerator: the update is scaled by alpha / r.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Dropout on the adapter input.
    #[serde(default = "default_lora_dropout")]
    pub dropout: f64,
    /// Module names to adapt (`c_attn` for GPT-2, `q_proj`/`v_proj` for Llama when
    /// empty).
    #[serde(default)]
    pub target_modules: Vec<String>,
    /// Also write merged full weights under `merged/` in the model artifact.
    #[serde(default)]
    pub merge: bool,
}

impl Default for LoraSettings {
    fn default() -> Self {
        Self {
            r: default_rank(),
            alpha: default_alpha(),
            dropout: default_lora_dropout(),
            target_modules: Vec::new(),
            merge: false,
        }
    }
}

fn default_rank() -> i64 {
    8
}
fn default_alpha() -> f64 {
    16.0
}
fn default_lora_dropout() -> f64 {
    0.05
}

/// Learning-rate decay after warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    /// Half a cosine from the peak to 0.
    Cosine,
    /// A straight line from the peak to 0.
    Linear,
    /// The peak throughout.
    Constant,
}

/// A model built from a config instead of a checkpoint (tiny experiments, benchmarks).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScratchConfig {
    /// `gpt2` or `llama`.
    #[serde(default = "default_arch")]
    pub arch: String,
    /// Transformer layers.
    #[serde(default = "default_layers")]
    pub layers: i64,
    /// Hidden width.
    #[serde(default = "default_hidden")]
    pub hidden: i64,
    /// Attention heads.
    #[serde(default = "default_heads")]
    pub heads: i64,
    /// Key/value heads (llama; grouped-query attention when fewer than `heads`).
    #[serde(default)]
    pub kv_heads: Option<i64>,
    /// MLP width (default 4x hidden for gpt2, 8/3x rounded for llama).
    #[serde(default)]
    pub intermediate: Option<i64>,
    /// Longest sequence (position table for gpt2).
    #[serde(default = "default_positions")]
    pub max_positions: i64,
}

fn default_arch() -> String {
    "gpt2".into()
}
fn default_layers() -> i64 {
    2
}
fn default_hidden() -> i64 {
    128
}
fn default_heads() -> i64 {
    4
}
fn default_positions() -> i64 {
    1024
}

/// Everything `finetune` can be told (its `with:` block).
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainSettings {
    /// Base model: a Hugging Face directory (config.json, tokenizer.json, safetensors,
    /// sharded or not) or a model id in the local HF cache. Leave it out to start from an
    /// input `model` artifact, or give `scratch` instead.
    #[serde(default)]
    pub model: Option<String>,
    /// Initialise a fresh model from this config instead of loading one.
    #[serde(default)]
    pub scratch: Option<ScratchConfig>,
    /// tokenizer.json (or a directory with one) for a scratch model; default: cairn's
    /// byte-level tokenizer (259 tokens).
    #[serde(default)]
    pub tokenizer: Option<String>,
    /// `full` or `lora`.
    #[serde(default = "default_method")]
    pub method: Method,
    /// `sft` (default), `dpo` or `orpo` (both need a preference dataset: prompt, chosen,
    /// rejected).
    #[serde(default = "default_objective")]
    pub objective: Objective,
    /// DPO: how far the policy may move from the reference (TRL's default 0.1; the
    /// LLM-twin reference design uses 0.5). ORPO: the weight of the odds-ratio term
    /// (the paper's lambda; TRL's default 0.1).
    #[serde(default = "default_dpo_beta")]
    pub beta: f64,
    /// DPO: `sigmoid` (default) or `ipo`.
    #[serde(default = "default_dpo_loss")]
    pub dpo_loss: DpoLoss,
    /// DPO (sigmoid): the assumed fraction of flipped preference labels (conservative
    /// DPO), in 0..0.5.
    #[serde(default)]
    pub label_smoothing: f64,
    /// DPO: compute the reference's log-probabilities of every pair once, before
    /// training, instead of a reference forward pass per step; with `method: full` no
    /// frozen copy of the model is kept (TRL's `precompute_ref_log_probs`).
    #[serde(default)]
    pub precompute_ref: bool,
    /// LoRA settings (with `method: lora`).
    #[serde(default)]
    pub lora: LoraSettings,
    /// `alpaca`, `chatml`, or a template string with `{instruction}`, `{input}`, `{output}`.
    #[serde(default = "default_template")]
    pub template: String,
    /// End-of-sequence token appended to responses (default: the tokenizer's).
    #[serde(default)]
    pub eos_token: Option<String>,
    /// Tokens per row; longer examples lose the start of their prompt.
    #[serde(default = "default_seq_len")]
    pub max_seq_len: usize,
    /// Concatenate examples into full rows instead of padding each one.
    #[serde(default)]
    pub packing: bool,
    /// Rows per forward pass.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Forward passes per optimizer step.
    #[serde(default = "default_one")]
    pub grad_accum: usize,
    /// Passes over the training split (fractions allowed).
    #[serde(default = "default_epochs")]
    pub epochs: f64,
    /// Stop after this many optimizer steps (overrides `epochs`).
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// Peak learning rate.
    #[serde(default = "default_lr")]
    pub learning_rate: f64,
    /// AdamW decoupled weight decay (matrices only; biases and norms are not decayed).
    #[serde(default)]
    pub weight_decay: f64,
    /// AdamW beta1.
    #[serde(default = "default_beta1")]
    pub adam_beta1: f64,
    /// AdamW beta2.
    #[serde(default = "default_beta2")]
    pub adam_beta2: f64,
    /// AdamW epsilon.
    #[serde(default = "default_eps")]
    pub adam_epsilon: f64,
    /// Linear warm-up steps (`warmup_ratio` x total steps when 0).
    #[serde(default)]
    pub warmup_steps: u64,
    /// Warm-up as a fraction of the total steps.
    #[serde(default)]
    pub warmup_ratio: f64,
    /// `cosine`, `linear` or `constant` after warm-up.
    #[serde(default = "default_scheduler")]
    pub scheduler: Scheduler,
    /// Clip the global gradient norm to this (0: no clipping).
    #[serde(default = "default_clip")]
    pub max_grad_norm: f64,
    /// Recompute each block's activations during the backward pass instead of keeping
    /// them from the forward pass: activation memory of one block instead of all, for
    /// about a third more compute.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Seed of initialisation, data order and dropout.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Evaluate the test split every N optimizer steps (0: only at the end).
    #[serde(default = "default_eval_every")]
    pub eval_every: u64,
    /// Save a resumable checkpoint every N optimizer steps (0: never).
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// Stop when the eval loss has not improved for this many evaluations.
    #[serde(default)]
    pub early_stopping_patience: Option<u32>,
    /// `auto` (CUDA when present, else CPU), `cpu`, `cuda`, `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// `auto` (bf16 autocast on CUDA, f32 on CPU), `f32` or `bf16`.
    #[serde(default = "default_device")]
    pub precision: String,
    /// `nf4`: hold the frozen base weights of the blocks' linear layers in 4-bit
    /// NormalFloat with double-quantized block maxima (QLoRA, bitsandbytes' layout),
    /// computing in `dtype`; blocks are recomputed in the backward pass (gradient
    /// checkpointing) so that only one layer's weights are ever dequantized at a time.
    #[serde(default)]
    pub quantize: Option<String>,
    /// Tokens to add to the tokenizer (e.g. speaker tokens like `<TWIN>`), as special
    /// tokens that are never split; the embeddings (and an untied head) grow by one row
    /// each, initialised to the mean of the others, and these rows are trained, with
    /// LoRA too (saved as PEFT `modules_to_save`).
    #[serde(default)]
    pub add_tokens: Vec<String>,
    /// Also write the trained model (adapters merged) as `model-<type>.gguf` for
    /// llama.cpp and Ollama: `f16`, `bf16` or `q8_0`.
    #[serde(default)]
    pub gguf: Option<String>,
    /// Largest weights file of a saved full or merged model, in MB: bigger models are
    /// written as transformers shards them (model-0000x-of-0000y.safetensors + index).
    #[serde(default = "default_shard_mb")]
    pub max_shard_mb: f64,
    /// How the frozen base weights of LoRA are stored: `auto` (bf16 on CUDA, f32 on
    /// CPU), `f32`, `bf16` or `f16`. Adapters and optimizer state stay f32; full
    /// fine-tuning trains f32 weights.
    #[serde(default = "default_device")]
    pub dtype: String,
    /// CPU threads (0: libtorch's default).
    #[serde(default)]
    pub threads: usize,
}

fn default_method() -> Method {
    Method::Full
}
fn default_objective() -> Objective {
    Objective::Sft
}
fn default_dpo_beta() -> f64 {
    0.1
}
fn default_dpo_loss() -> DpoLoss {
    DpoLoss::Sigmoid
}
fn default_template() -> String {
    "alpaca".into()
}
fn default_seq_len() -> usize {
    512
}
fn default_batch() -> usize {
    4
}
fn default_one() -> usize {
    1
}
fn default_epochs() -> f64 {
    1.0
}
fn default_lr() -> f64 {
    1e-4
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-8
}
fn default_scheduler() -> Scheduler {
    Scheduler::Cosine
}
fn default_clip() -> f64 {
    1.0
}
fn default_seed() -> u64 {
    42
}
fn default_eval_every() -> u64 {
    50
}
fn default_checkpoint_every() -> u64 {
    100
}
fn default_shard_mb() -> f64 {
    5000.0
}
fn default_device() -> String {
    "auto".into()
}

/// The learning rate at optimizer step `step` (0-based), as Hugging Face's schedulers
/// compute it (so warm-up starts at 0).
pub fn learning_rate_at(s: &TrainSettings, step: u64, total: u64) -> f64 {
    let warmup = warmup_steps(s, total);
    if step < warmup {
        return s.learning_rate * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    let factor = match s.scheduler {
        Scheduler::Constant => 1.0,
        Scheduler::Linear => (1.0 - progress).max(0.0),
        Scheduler::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
    };
    s.learning_rate * factor
}

/// Warm-up steps: `warmup_steps`, else `ceil(warmup_ratio x total)`.
pub fn warmup_steps(s: &TrainSettings, total: u64) -> u64 {
    if s.warmup_steps > 0 {
        s.warmup_steps
    } else {
        (s.warmup_ratio * total as f64).ceil() as u64
    }
}

/// A training job as `cairn-torch train` reads it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainJob {
    /// The settings.
    pub settings: TrainSettings,
    /// Resolved base model directory (None for scratch).
    pub base_dir: Option<PathBuf>,
    /// The dataset artifact directory.
    pub dataset: PathBuf,
    /// Where to write the model directory.
    pub output: PathBuf,
    /// Folder for this job's resumable checkpoints.
    pub checkpoints: PathBuf,
    /// Write the first optimizer step's batch (ids, labels) here (parity tests).
    #[serde(default)]
    pub dump_first_batch: Option<PathBuf>,
    /// Free-form facts recorded in `cairn_model.json` (base model name, dataset digest).
    #[serde(default)]
    pub provenance: Value,
}

/// Sampling settings of generation (Hugging Face's names).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerationSettings {
    /// Tokens to generate at most.
    #[serde(default = "default_new_tokens")]
    pub max_new_tokens: usize,
    /// Softmax temperature (0: greedy).
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Sample among the k most likely tokens (0: all).
    #[serde(default = "default_top_k")]
    pub top_k: i64,
    /// Sample within the smallest set holding this probability (1: all).
    #[serde(default = "default_top_p")]
    pub top_p: f64,
    /// >1 discourages tokens already in the text (CTRL's penalty, as in transformers).
    #[serde(default = "default_rep")]
    pub repetition_penalty: f64,
    /// Stop when the text ends with one of these (besides the template's stop and EOS).
    #[serde(default)]
    pub stop: Vec<String>,
    /// Sampling seed.
    #[serde(default = "default_seed")]
    pub seed: u64,
}

impl Default for GenerationSettings {
    fn default() -> Self {
        Self {
            max_new_tokens: default_new_tokens(),
            temperature: default_temperature(),
            top_k: default_top_k(),
            top_p: default_top_p(),
            repetition_penalty: default_rep(),
            stop: Vec::new(),
            seed: default_seed(),
        }
    }
}

fn default_new_tokens() -> usize {
    128
}
fn default_temperature() -> f64 {
    0.7
}
fn default_top_k() -> i64 {
    50
}
fn default_top_p() -> f64 {
    0.95
}
fn default_rep() -> f64 {
    1.1
}

/// An evaluation job for one model, as `cairn-torch evaluate` reads it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalJob {
    /// Model directory (full or LoRA adapter).
    pub model: PathBuf,
    /// Dataset artifact directory (its test split is scored).
    pub dataset: Option<PathBuf>,
    /// Rows longer than this are truncated for perplexity.
    pub max_seq_len: usize,
    /// Test examples generated greedily for ROUGE-L (0: none).
    pub rouge_examples: usize,
    /// Greedy generation length for ROUGE-L.
    pub rouge_max_new_tokens: usize,
    /// Prompts for sample generations (wrapped in the model's template).
    pub prompts: Vec<String>,
    /// Sampling for the prompts.
    pub generation: GenerationSettings,
    /// `auto`, `cpu`, `cuda`, `cuda:N`.
    pub device: String,
    /// CPU threads (0: default).
    pub threads: usize,
    /// Where to write the results JSON.
    pub output: PathBuf,
}

/// A `cairn-torch sample` job: N sampled replies per prompt of a dataset split.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SampleJob {
    /// Model directory (full or LoRA adapter).
    pub model: PathBuf,
    /// Dataset artifact directory.
    pub dataset: PathBuf,
    /// `train.jsonl` or `test.jsonl`.
    pub split_file: String,
    /// Prompts read at most (0: all).
    pub max_prompts: usize,
    /// Replies per prompt.
    pub n: usize,
    /// Sampling; the replies of prompt i are drawn together with seed `seed + i`.
    pub generation: GenerationSettings,
    /// `auto`, `cpu`, `cuda`, `cuda:N`.
    pub device: String,
    /// CPU threads (0: default).
    pub threads: usize,
    /// The samples JSON Lines file to write.
    pub output: PathBuf,
}

/// What `cairn-torch evaluate` writes.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EvalResults {
    /// exp(mean loss over response tokens of the test split).
    pub perplexity: Option<f64>,
    /// Mean loss over response tokens.
    pub loss: Option<f64>,
    /// Response tokens scored.
    pub target_tokens: usize,
    /// Greedy answers to test prompts.
    pub answers: Vec<Answer>,
    /// Sampled answers to the configured prompts.
    pub samples: Vec<Answer>,
    /// Device used.
    pub device: String,
}

/// One generation.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Answer {
    /// The question (user text, before the template).
    pub prompt: String,
    /// The dataset's answer, when there is one.
    #[serde(default)]
    pub reference: Option<String>,
    /// What the model wrote.
    pub output: String,
}

/// `cairn_model.json`: what cairn needs beside the HF files to use a model artifact.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ModelCard {
    /// `gpt2` or `llama`.
    pub arch: String,
    /// `full` or `lora`.
    pub method: String,
    /// Template name or string it was trained with.
    pub template: String,
    /// The EOS token appended to responses.
    pub eos_token: String,
    /// For LoRA: the base model directory the adapter applies to.
    #[serde(default)]
    pub base_model: Option<PathBuf>,
    /// Provenance (base model name, dataset).
    #[serde(default)]
    pub provenance: Value,
}

impl ModelCard {
    /// The template the model in `dir` was trained with (Alpaca for models cairn did not
    /// train); `model` reads the chat template saved with it.
    pub fn template(
        &self,
        dir: &std::path::Path,
        tokenizer: &tokenizers::Tokenizer,
    ) -> Result<crate::ml::template::Template, String> {
        let name = if self.template.is_empty() {
            "alpaca"
        } else {
            &self.template
        };
        crate::ml::template::Template::load(name, Some(dir), tokenizer)
    }

    /// The EOS token and its id: `wanted` if given, else the card's, else the tokenizer's.
    pub fn eos(
        &self,
        tokenizer: &tokenizers::Tokenizer,
        wanted: Option<&str>,
    ) -> Result<(String, u32), String> {
        let from_card = (!self.eos_token.is_empty()).then_some(self.eos_token.as_str());
        crate::ml::data::eos_token(tokenizer, wanted.or(from_card))
    }
}

/// File name of [`ModelCard`] in a model directory.
pub const MODEL_CARD: &str = "cairn_model.json";

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(v: Value) -> TrainSettings {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn schedules_match_hugging_face() {
        // get_cosine_schedule_with_warmup(opt, 2, 10): lambda(s) = s/2 for s<2, then
        // 0.5*(1+cos(pi*(s-2)/8)).
        let s = settings(serde_json::json!({"learning_rate": 1.0, "warmup_steps": 2}));
        let lrs: Vec<f64> = (0..10).map(|i| learning_rate_at(&s, i, 10)).collect();
        assert_eq!(lrs[0], 0.0);
        assert_eq!(lrs[1], 0.5);
        assert_eq!(lrs[2], 1.0);
        assert!((lrs[6] - 0.5).abs() < 1e-12);
        let lin = settings(
            serde_json::json!({"learning_rate": 1.0, "scheduler": "linear", "warmup_ratio": 0.1}),
        );
        assert_eq!(warmup_steps(&lin, 10), 1);
        assert!((learning_rate_at(&lin, 5, 10) - 5.0 / 9.0).abs() < 1e-12);
        let c = settings(serde_json::json!({"learning_rate": 0.3, "scheduler": "constant"}));
        assert_eq!(learning_rate_at(&c, 7, 10), 0.3);
    }
}
