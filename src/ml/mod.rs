//! Fine-tuning, evaluation and generation: the parts that need no libtorch (templates,
//! tokenised rows, ROUGE-L, job settings, the worker protocol). The tch models and the
//! training loop run in the `cairn-torch` helper (src/bin/cairn-torch/), which reads the
//! jobs defined here.

pub mod chat_template;
pub mod data;
pub mod family;
pub mod job;
pub mod report;
pub mod rouge;
pub mod template;
pub mod worker;

/// Artifact kind of trained models (a Hugging Face / PEFT directory).
pub const MODEL_KIND: &str = "model";
/// Artifact kind of evaluation reports.
pub const REPORT_KIND: &str = "report";
/// Artifact kind of `sample`'s output: sampled replies per prompt (JSON Lines).
pub const SAMPLES_KIND: &str = "samples";
