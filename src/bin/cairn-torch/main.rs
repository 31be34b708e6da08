//! `cairn-torch`: the process that runs libtorch for cairn. `cairn` spawns it for `embed`
//! and `cairn query` (see `cairn::embed::worker` for the protocol), so the orchestrator
//! never pays libtorch's start-up time or memory. Also measures the fp32 GEMM rate for the
//! benchmark.

mod bert;
mod embedder;

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
    /// Print libtorch's fp32 matrix-multiply rate (GFLOP/s) for a few shapes.
    Gemm {
        /// CPU threads.
        #[arg(long, default_value_t = 0)]
        threads: i32,
    },
}

fn emit(value: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
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
