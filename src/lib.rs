//! cairn: a DAG workflow orchestrator with declarative YAML pipelines and a
//! content-addressed artifact store, made for "LLM twin" projects.
//!
//! The map (see ARCHITECTURE.md): `pipeline` parses and resolves YAML, `graph` orders
//! steps, `engine` decides and schedules, `steps` holds the step kinds, `store` keeps
//! objects and records, `cli` is the thin command-line layer.

pub mod chunk;
pub mod clean;
pub mod cli;
pub mod crawl;
pub mod dataset;
pub mod docstore;
pub mod documents;
pub mod embed;
pub mod engine;
pub mod experiments;
pub mod extract;
pub mod graph;
pub mod helper;
pub mod inference;
pub mod ingest;
#[cfg(test)]
mod layers;
pub mod llm;
pub mod ml;
pub mod models;
pub mod pipeline;
pub mod rag;
pub mod redact;
pub mod remote;
pub mod serve;
pub mod steps;
pub mod store;
pub mod ui;
pub mod util;
pub mod vectorstore;
