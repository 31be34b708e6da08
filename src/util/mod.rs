//! Leaf helpers every layer may use: the clock, "did you mean" suggestions and wording,
//! `${ns.NAME}` templates, and progress reporting. Nothing here imports another module of
//! cairn, so any layer can depend on it without creating a cycle.

pub mod blocking;
pub mod clock;
pub mod progress;
pub mod suggest;
pub mod template;
pub mod variant;
