//! `cairn-torch`: the process that runs libtorch for cairn. `cairn` spawns it for `embed`
//! and `cairn query` (see `cairn::embed::worker` for the protocol), so the orchestrator
//! never pays libtorch's start-up time or memory. It also trains, evaluates and samples
//! decoder models for `finetune`, `evaluate` and `cairn generate` (see `cairn::ml`), and
//! measures the fp32 GEMM rate for the benchmark.

mod bert;
mod crossencoder;
mod decoder;
mod device;
mod embedder;
mod evaluate;
mod generate;
mod gguf;
mod int8;
mod modeldir;
mod nf4;
mod preference;
mod sample;
mod serve;
mod train;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use serde_json::json;

use cairn::embed::{DeviceChoice, Precision};
use embedder::Embedder;

/// libtorch worker for cairn (not meant to be run by hand, but it can be).
#[derive(Parser)]
#[command(name = "cairn-torch", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Embed the `text` field of every line of a JSON Lines file into a safetensors file.
    Embed {
        /// Model directory.
        #[arg(long)]
        model: PathBuf,
        /// auto, cpu, cuda, cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
        /// auto, f32, f16, bf16.
        #[arg(long, value_enum, default_value = "auto")]
        precision: Precision,
        /// Sentences per forward pass.
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
        /// CPU threads (0: libtorch's default).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// JSON Lines input.
        #[arg(long)]
        input: PathBuf,
        /// safetensors output (tensor `embeddings`, f32 [n, dim]).
        #[arg(long)]
        output: PathBuf,
    },
    /// Train a decoder model: a `cairn::ml::job::TrainJob` as JSON (the finetune step).
    Train {
        /// The job file.
        #[arg(long)]
        job: PathBuf,
    },
    /// Evaluate a model: a `cairn::ml::job::EvalJob` as JSON (the evaluate step).
    Evaluate {
        /// The job file.
        #[arg(long)]
        job: PathBuf,
    },
    /// Sample N replies per prompt of a dataset split: a `cairn::ml::job::SampleJob` as
    /// JSON (the sample step).
    Sample {
        /// The job file.
        #[arg(long)]
        job: PathBuf,
    },
    /// Generate text from a model directory, streaming it to stdout.
    Generate {
        /// Model directory (full or LoRA adapter).
        #[arg(long)]
        model: PathBuf,
        /// The prompt (wrapped in the model's template unless --raw).
        #[arg(long)]
        prompt: String,
        /// Feed the prompt as is.
        #[arg(long)]
        raw: bool,
        /// Override the template (alpaca, chatml, model: its own chat template, or a string with {output}).
        #[arg(long)]
        template: Option<String>,
        /// Sampling settings as JSON (`cairn::ml::job::GenerationSettings`).
        #[arg(long, default_value = "{}")]
        settings: String,
        /// auto, cpu, cuda, cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
        /// CPU threads (0: default).
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// The model worker of `cairn serve`: loads the models a `cairn::inference::protocol::
    /// WorkerConfig` JSON file names, then answers requests on stdin until it closes.
    Serve {
        /// The worker configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Write a model directory (adapters merged) as a GGUF file for llama.cpp/Ollama.
    Gguf {
        /// Model directory (full or LoRA adapter).
        #[arg(long)]
        model: PathBuf,
        /// f16, bf16 or q8_0.
        #[arg(long, default_value = "q8_0")]
        r#type: String,
        /// The .gguf file to write.
        #[arg(long)]
        output: PathBuf,
    },
    /// Quantize the tensor `weight` of a safetensors file to NF4 and write its parts and
    /// its dequantized values (parity tests against bitsandbytes).
    Nf4 {
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
    },
    /// Write the logits of a model for token ids (parity tests): safetensors `logits`.
    Logits {
        /// Model directory.
        #[arg(long)]
        model: PathBuf,
        /// safetensors file with an int64 tensor `input_ids` [batch, seq] (for T5 also
        /// `decoder_input_ids` and optionally `attention_mask`).
        #[arg(long)]
        input: PathBuf,
        /// Output safetensors file.
        #[arg(long)]
        output: PathBuf,
        /// Dtype of the base weights: f32, bf16 or f16 (logits are written as f32).
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// cpu, cuda, cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Hold the blocks' linear weights in NF4 (`nf4`), computing in --dtype.
        #[arg(long)]
        quantize: Option<String>,
    },
    /// Print libtorch's fp32 matrix-multiply rate (GFLOP/s) for a few shapes.
    Gemm {
        /// CPU threads.
        #[arg(long, default_value_t = 0)]
        threads: i32,
    },
}

fn generate_command(
    model: &std::path::Path,
    prompt: &str,
    raw: bool,
    template: Option<&str>,
    settings: &str,
    device: &str,
    threads: usize,
) -> Result<(), String> {
    let g: cairn::ml::job::GenerationSettings =
        serde_json::from_str(settings).map_err(|e| format!("--settings: {e}"))?;
    let (device, reason, _) = train::device_for(device, "auto", threads)?;
    let (mut m, tokenizer, card) =
        modeldir::load_any(model, device, modeldir::Storage::plain(tch::Kind::Float))?;
    m.merge_lora();
    let template = match template {
        Some(t) => cairn::ml::template::Template::load(t, Some(model), &tokenizer)?,
        None => card.template(model, &tokenizer)?,
    };
    let text = if raw {
        prompt.to_string()
    } else {
        template.prompt(&cairn::ml::template::Conversation {
            turns: vec![(cairn::ml::template::Role::User, prompt.to_string())],
        })?
    };
    // A tokenizer without a known EOS still generates, up to max_new_tokens.
    let eos = card.eos(&tokenizer, None).map(|e| e.0).unwrap_or_default();
    let mut stops = if raw {
        Vec::new()
    } else {
        template.stop_strings()
    };
    stops.extend(g.stop.iter().cloned());
    let eos_ids = evaluate::stop_ids(&tokenizer, &eos, &stops);
    let mut out = std::io::stdout().lock();
    let done = generate::generate(&m, &tokenizer, &text, &g, &stops, &eos_ids, &mut |piece| {
        let _ = out.write_all(piece.as_bytes());
        let _ = out.flush();
    })?;
    let _ = writeln!(out);
    eprintln!(
        "[{} tokens in {:.2} s, {:.1} tokens/s, {} ({reason})]",
        done.tokens,
        done.seconds,
        done.tokens as f64 / done.seconds.max(1e-9),
        device::name(device)
    );
    Ok(())
}

fn emit(value: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

/// Runs `f`, turning an error or a panic into an `{"error"}` event and exit code 1.
fn guarded(f: impl FnOnce() -> Result<serde_json::Value, String>) -> ExitCode {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into());
        Err(format!("internal error: {msg}"))
    });
    match result {
        Ok(v) => {
            emit(json!({ "finished": v }));
            ExitCode::SUCCESS
        }
        Err(e) => {
            emit(json!({ "error": e }));
            eprintln!("cairn-torch: {e}");
            ExitCode::FAILURE
        }
    }
}

fn read_job<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Exits (as if killed) once the parent process is gone: polled every 200 ms on a
/// thread of its own; re-parenting (to init or a subreaper) is what a parent's death looks
/// like from here.
fn die_with_parent() {
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    let _ = std::thread::Builder::new()
        .name("parent-watch".into())
        .spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_millis(200));
            // SAFETY: as above.
            if unsafe { libc::getppid() } != parent {
                std::process::exit(137);
            }
        });
}

/// Keeps freed heap memory in the process instead of handing it back to the kernel:
/// generation frees and re-allocates its growing KV cache every token, and with glibc's
/// defaults each round trip unmapped the pages and faulted them in again.
fn keep_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator thresholds; called before any other thread runs.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

fn main() -> ExitCode {
    // Die with the parent: a killed `cairn run` must not leave training running.
    // PR_SET_PDEATHSIG would fire when the *thread* that spawned this process ends (a
    // tokio blocking thread retires after 10 s idle), so the parent process is watched.
    die_with_parent();
    keep_freed_memory();
    let cli = Cli::parse();
    match cli.command {
        Command::Train { job } => guarded(|| {
            let job: cairn::ml::job::TrainJob = read_job(&job)?;
            train::run(&job, &mut emit)
        }),
        Command::Serve { config } => guarded(|| {
            let config: cairn::inference::protocol::WorkerConfig = read_job(&config)?;
            serve::run(&config)?;
            Ok(json!({}))
        }),
        Command::Sample { job } => guarded(|| {
            let job: cairn::ml::job::SampleJob = read_job(&job)?;
            sample::run(&job, &mut emit)
        }),
        Command::Evaluate { job } => guarded(|| {
            let job: cairn::ml::job::EvalJob = read_job(&job)?;
            let results = evaluate::run(&job, &mut emit)?;
            let text = serde_json::to_string(&results).map_err(|e| e.to_string())?;
            std::fs::write(&job.output, text)
                .map_err(|e| format!("{}: {e}", job.output.display()))?;
            Ok(json!({"output": job.output}))
        }),
        Command::Generate {
            model,
            prompt,
            raw,
            template,
            settings,
            device,
            threads,
        } => {
            match generate_command(
                &model,
                &prompt,
                raw,
                template.as_deref(),
                &settings,
                &device,
                threads,
            ) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("cairn-torch: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Nf4 { input, output } => guarded(|| {
            let tensors = tch::Tensor::read_safetensors(&input).map_err(|e| e.to_string())?;
            let w = tensors
                .into_iter()
                .find(|(n, _)| n == "weight")
                .ok_or("no tensor `weight`")?
                .1;
            let q = nf4::Nf4Weight::quantize(&w);
            let offset = tch::Tensor::from_slice(&[q.offset]);
            let back = q.dequantize(tch::Kind::Float);
            tch::Tensor::write_safetensors(
                &[
                    ("packed", &q.packed),
                    ("qabsmax", &q.qabsmax),
                    ("absmax2", &q.absmax2),
                    ("offset", &offset),
                    ("dequantized", &back),
                ],
                &output,
            )
            .map_err(|e| e.to_string())?;
            Ok(json!({"bytes": q.nbytes()}))
        }),
        Command::Gguf {
            model,
            r#type,
            output,
        } => guarded(|| {
            let ty = gguf::GgufType::parse(&r#type)?;
            let (m, tokenizer, card) = modeldir::load_any(
                &model,
                tch::Device::Cpu,
                modeldir::Storage::plain(tch::Kind::Float),
            )?;
            let template = card.template(&model, &tokenizer)?;
            let eos = card.eos(&tokenizer, None)?.0;
            gguf::export(&m, &tokenizer, &eos, template.chat_template(), ty, &output)?;
            Ok(json!({"gguf": output, "type": ty.name()}))
        }),
        Command::Logits {
            model,
            input,
            output,
            dtype,
            device,
            quantize,
        } => guarded(|| {
            let kind = train::weight_kind(&dtype, false, true)?;
            let (device, _, _) = train::device_for(&device, "f32", 0)?;
            let storage = modeldir::Storage {
                kind,
                nf4: match quantize.as_deref() {
                    None => false,
                    Some("nf4") => true,
                    Some(other) => return Err(format!("--quantize {other:?}: use nf4")),
                },
            };
            let (mut m, _, _) = modeldir::load_any(&model, device, storage)?;
            m.merge_lora();
            let tensors: std::collections::HashMap<String, tch::Tensor> =
                tch::Tensor::read_safetensors(&input)
                    .map_err(|e| e.to_string())?
                    .into_iter()
                    .map(|(n, t)| (n, t.to_device(device)))
                    .collect();
            let ids = tensors.get("input_ids").ok_or("no input_ids tensor")?;
            let logits = tch::no_grad(|| {
                if m.is_seq2seq() {
                    let dec = tensors
                        .get("decoder_input_ids")
                        .ok_or("an encoder-decoder model needs a decoder_input_ids tensor")?;
                    let mask = tensors.get("attention_mask");
                    let encoded = m.encode(ids, mask);
                    Ok::<_, String>(m.decode(dec, &encoded, mask, None))
                } else {
                    Ok(m.forward(ids, None))
                }
            })?
            .to_kind(tch::Kind::Float);
            modeldir::write_safetensors(&output, &[("logits".to_string(), &logits)])?;
            Ok(json!({"shape": logits.size()}))
        }),
        Command::Embed {
            model,
            device,
            precision,
            batch_size,
            threads,
            input,
            output,
        } => {
            let result = (|| -> Result<(), String> {
                let device: DeviceChoice = device.parse()?;
                #[derive(serde::Deserialize)]
                struct Line {
                    text: String,
                }
                let lines: Vec<Line> = cairn::documents::read_jsonl(&input)?;
                let embedder = Embedder::load(&model, device, precision, threads)
                    .map_err(|e| e.to_string())?;
                emit(json!({"loaded": embedder.info()}));
                let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
                let t0 = Instant::now();
                let vectors = embedder
                    .embed(&texts, batch_size, &mut |done| {
                        emit(json!({"done": done}));
                        true
                    })
                    .map_err(|e| e.to_string())?;
                let seconds = t0.elapsed().as_secs_f64();
                let tokens: usize = embedder
                    .tokenize(&texts)
                    .map_err(|e| e.to_string())?
                    .iter()
                    .map(Vec::len)
                    .sum();
                cairn::embed::write_tensor(&output, &vectors, embedder.info().dim)?;
                emit(json!({"finished": {"tokens": tokens, "seconds": seconds}}));
                Ok(())
            })();
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    emit(json!({"error": e}));
                    eprintln!("cairn-torch: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Gemm { threads } => {
            if threads > 0 {
                tch::set_num_threads(threads);
            }
            let _guard = tch::no_grad_guard();
            let mut results = serde_json::Map::new();
            // Shapes like the encoder's linear layers, and a square one.
            for (m, k, n) in [
                (4096i64, 384i64, 1536i64),
                (4096, 1536, 384),
                (1024, 1024, 1024),
            ] {
                let a = tch::Tensor::randn([m, k], (tch::Kind::Float, tch::Device::Cpu));
                let b = tch::Tensor::randn([k, n], (tch::Kind::Float, tch::Device::Cpu));
                let _ = a.matmul(&b);
                let reps = 20;
                let mut best = f64::INFINITY;
                for _ in 0..3 {
                    let t0 = Instant::now();
                    for _ in 0..reps {
                        let _ = a.matmul(&b);
                    }
                    best = best.min(t0.elapsed().as_secs_f64());
                }
                results.insert(
                    format!("{m}x{k}x{n}"),
                    json!(2.0 * (m * k * n) as f64 * reps as f64 / best / 1e9),
                );
            }
            emit(json!({"gemm_gflops": results, "threads": tch::get_num_threads()}));
            ExitCode::SUCCESS
        }
    }
}
