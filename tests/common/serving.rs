//! Helpers of the `cairn serve` tests: the openai client script, a running server,
//! tiny models and a store with a vector collection.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use super::{repo, Project};

/// Runs tests/parity/openai_client.py in the project venv; its last stdout line as JSON.
pub fn client(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Value {
    super::venv_script("tests/parity/openai_client.py", args)
}

/// A running `cairn serve`.
pub type Server = super::process::LoopbackServer;

/// Starts `cairn serve --port 0 ARGS...` and waits for its address.
pub fn start(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Server {
    start_in(None, args)
}

/// As [`start`], in a project (its folder and store).
pub fn start_in(project: Option<&Project>, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Server {
    let mut cmd = Command::new(assert_cmd::cargo::cargo_bin("cairn"));
    if let Some(p) = project {
        cmd.current_dir(p.path("")).env("CAIRN_STORE", p.store());
    }
    cmd.args(["serve", "--port", "0", "--device", "cpu"])
        .args(args.iter().map(|a| a.as_ref()));
    Server::announced(cmd).0
}

/// A tiny random Llama with a ChatML card (`base`) and a LoRA adapter over it (`twin`).
pub fn models(root: &Path) -> (PathBuf, PathBuf) {
    client(&[&"make", &root]);
    (root.join("base"), root.join("twin"))
}

pub const SOURDOUGH: &str = "# Feeding a sourdough starter\n\nI feed my sourdough starter twice a day with equal weights of rye flour and water. \
A starter that doubles within six hours is ready to leaven bread dough. Keep it warm and discard half before each feeding.\n";
pub const BORROW: &str = "# Fighting the borrow checker\n\nRust's borrow checker rejects code where a mutable reference \
overlaps another reference. Most of my fights with it ended when I restructured ownership.\n";
pub const TOMATO: &str = "# Growing tomatoes on a balcony\n\nTomatoes need six hours of sun, a deep pot and steady watering. \
I grow cherry tomatoes in forty litre containers.\n";

/// A project whose store holds the `embedded_notes` collection of three notes.
pub fn notes_project() -> Project {
    let p = Project::new();
    let model = repo().join(".models/all-MiniLM-L6-v2");
    p.write("mine/sourdough.md", SOURDOUGH)
        .write("mine/borrow.md", BORROW)
        .write("mine/tomato.md", TOMATO)
        .write(
            "notes.yaml",
            &format!(
                "name: notes\nsteps:\n  mine: {{uses: source, with: {{path: mine}}}}\n  \
                 docs: {{uses: ingest, inputs: {{files: mine.data}}}}\n  \
                 chunk: {{uses: chunk, inputs: {{documents: docs.documents}}, with: {{model: \"{m}\", size: 64}}}}\n  \
                 embed: {{uses: embed, inputs: {{chunks: chunk.chunks}}, with: {{model: \"{m}\"}}}}\n  \
                 vectors: {{uses: vector_load, inputs: {{embeddings: embed.embeddings}}}}\n",
                m = model.display()
            ),
        );
    let run = p.run("notes.yaml", &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    p
}
