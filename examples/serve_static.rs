//! A static file server on 127.0.0.1 for benchmarks and manual tests:
//! `cargo run --release --example serve_static -- /usr/share/doc/python3.11/html 8765`
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::Response;
use std::path::PathBuf;
use std::sync::Arc;

async fn files(State(root): State<Arc<PathBuf>>, req: Request) -> Response {
    let rel = req.uri().path().trim_start_matches('/');
    if rel.split('/').any(|s| s == "..") {
        return Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .body(Body::empty())
            .unwrap();
    }
    let mut path = root.join(rel);
    if path.is_dir() {
        path = path.join("index.html");
    }
    match tokio::fs::read(&path).await {
        Ok(bytes) => {
            let ct = match path.extension().and_then(|e| e.to_str()) {
                Some("html") => "text/html; charset=utf-8",
                Some("css") => "text/css",
                Some("js") => "application/javascript",
                Some("txt") => "text/plain",
                Some("png") => "image/png",
                _ => "application/octet-stream",
            };
            Response::builder()
                .header(header::CONTENT_TYPE, ct)
                .body(Body::from(bytes))
                .unwrap()
        }
        Err(_) => Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Body::from("not found"))
            .unwrap(),
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let root = PathBuf::from(args.get(1).expect("usage: serve_static DIR [PORT]"));
    let port: u16 = args.get(2).and_then(|p| p.parse().ok()).unwrap_or(8765);
    let app = axum::Router::new()
        .fallback(files)
        .with_state(Arc::new(root));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind");
    eprintln!("serving on http://{}", listener.local_addr().unwrap());
    axum::serve(listener, app).await.unwrap();
}
