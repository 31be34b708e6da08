//! An offline OpenAI-compatible chat-completions server (the one the tests use), for
//! trying the LLM recipes without an API key:
//!
//!   cargo run --example mock_llm -- [--port 8077] [--site DIR] [--latency-ms N]
//!
//! `--site DIR` also serves the files under DIR (the fixture blog of
//! pipelines/recipes/blog_style_transfer.yaml). Replies are made from the extract in
//! each prompt; they are placeholders, not language-model output.

#[path = "../tests/common/mock_llm.rs"]
#[allow(dead_code)]
mod mock_llm;
#[path = "../tests/common/server.rs"]
mod server;
#[path = "../tests/common/static_files.rs"]
mod static_files;

fn main() {
    let mut port = 8077u16;
    let mut site = None;
    let mut latency = 0u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--port" => {
                port = value()
                    .parse()
                    .unwrap_or_else(|_| usage("--port takes a number"))
            }
            "--site" => site = Some(std::path::PathBuf::from(value())),
            "--latency-ms" => {
                latency = value()
                    .parse()
                    .unwrap_or_else(|_| usage("--latency-ms takes a number"))
            }
            _ => usage(&format!("unknown argument `{a}`")),
        }
    }
    let server = mock_llm::MockLlm::start_on(&format!("127.0.0.1:{port}"), site.clone());
    *server.state.latency.lock().unwrap() = std::time::Duration::from_millis(latency);
    eprintln!("mock LLM: base_url {}", server.base_url);
    if let Some(site) = site {
        eprintln!("serving {} at http://127.0.0.1:{port}/", site.display());
    }
    loop {
        std::thread::park();
    }
}

fn usage(msg: &str) -> ! {
    eprintln!("mock_llm: {msg}\nusage: cargo run --example mock_llm -- [--port 8077] [--site DIR] [--latency-ms N]");
    std::process::exit(2);
}
