//! `cairn generate`: sample text from a trained `model` artifact (or any Hugging Face
//! model directory) in the `cairn-torch` helper, streaming tokens to the terminal.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

use super::{Cli, UsageError};
use crate::ml::job::GenerationSettings;
use crate::store::Store;

/// `cairn generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// A `model` artifact (digest or 8+ char prefix) or a model directory.
    pub model: String,
    /// The prompt; wrapped in the template the model was trained with unless --raw.
    pub prompt: String,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Softmax temperature (0: greedy).
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f64,
    /// Sample among the k most likely tokens (0: all).
    #[arg(long, default_value_t = 50)]
    pub top_k: i64,
    /// Nucleus sampling mass (1: off).
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f64,
    /// >1 discourages repeating tokens.
    #[arg(long, default_value_t = 1.1)]
    pub repetition_penalty: f64,
    /// Stop when this text appears (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Sampling seed.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Feed the prompt as is, without the model's template.
    #[arg(long)]
    pub raw: bool,
    /// Use this template instead of the model's (alpaca, chatml, model: its own chat template, or a string with {output}).
    #[arg(long)]
    pub template: Option<String>,
    /// auto, cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// CPU threads (0: libtorch's default).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// The directory of `model`: a model directory, or a `model` artifact by digest or prefix.
pub(super) fn model_dir(cli: &Cli, model: &str) -> anyhow::Result<PathBuf> {
    let path = Path::new(model);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if path.components().count() > 1 || !model.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(UsageError(format!("{model:?} is neither a model directory nor an artifact id (a digest or an 8+ char prefix)")).into());
    }
    let store = Store::open_existing(&cli.store_dir())?;
    let record = store.resolve_artifact(model)?;
    if record.kind != crate::ml::MODEL_KIND {
        return Err(UsageError(format!(
            "artifact {} is a `{}`, not a `model` (from step {}); `cairn artifacts ls --kind model` lists models",
            &record.digest.to_hex()[..12],
            record.kind,
            record.producer_step
        ))
        .into());
    }
    Ok(store.object_path(&record.digest))
}

/// Runs `cairn generate`.
pub fn generate(cli: &Cli, args: &GenerateArgs) -> anyhow::Result<ExitCode> {
    if args.temperature < 0.0
        || !(0.0..=1.0).contains(&args.top_p)
        || args.repetition_penalty <= 0.0
    {
        return Err(UsageError(
            "--temperature must be >= 0, --top-p in 0..1, --repetition-penalty > 0".into(),
        )
        .into());
    }
    if let Err(e) = args.device.parse::<crate::embed::DeviceChoice>() {
        return Err(UsageError(format!("--device: {e}")).into());
    }
    if let Some(t) = &args.template {
        crate::ml::template::Template::check(t)
            .map_err(|e| UsageError(format!("--template: {e}")))?;
    }
    let dir = model_dir(cli, &args.model)?;
    let settings = GenerationSettings {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        stop: args.stop.clone(),
        seed: args.seed,
    };
    let helper = crate::helper::helper_path()?;
    let mut cmd = std::process::Command::new(helper);
    cmd.arg("generate")
        .arg("--model")
        .arg(&dir)
        .arg("--prompt")
        .arg(&args.prompt);
    cmd.args([
        "--settings",
        &serde_json::to_string(&settings)?,
        "--device",
        &args.device,
        "--threads",
        &args.threads.to_string(),
    ]);
    if args.raw {
        cmd.arg("--raw");
    }
    if let Some(t) = &args.template {
        cmd.arg("--template").arg(t);
    }
    let status = cmd
        .status()
        .map_err(|e| anyhow::anyhow!("starting cairn-torch: {e}"))?;
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
