//! A static file server on 127.0.0.1 for benchmarks and manual tests:
//! `cargo run --release --example serve_static -- /usr/share/doc/python3.11/html 8765`

#[path = "../tests/common/static_files.rs"]
mod static_files;

use std::path::PathBuf;
use std::sync::Arc;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let root = PathBuf::from(args.get(1).expect("usage: serve_static DIR [PORT]"));
    let port: u16 = args.get(2).and_then(|p| p.parse().ok()).unwrap_or(8765);
    let app = axum::Router::new()
        .fallback(static_files::static_files)
        .with_state(Arc::new(root));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind");
    eprintln!("serving on http://{}", listener.local_addr().unwrap());
    axum::serve(listener, app).await.unwrap();
}
