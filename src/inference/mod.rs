//! The long-running model worker (`cairn-torch serve`) and its client: generation with
//! continuous batching, sentence embeddings and cross-encoder scores, asked for over
//! JSON lines (`protocol`) through a bounded queue (`worker`). `cairn serve` answers HTTP
//! with it; retrieval evaluation embeds and reranks with it.

pub mod protocol;
pub mod worker;
