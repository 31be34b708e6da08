//! `cairn ui`: a read-only local web server over the store. This module holds the server
//! and the JSON API under `/api/...` (documented in the README); parameters are redacted
//! ([`crate::redact`]) before they leave, and files are only ever served from inside an
//! artifact's own object.

mod api;
mod preview;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;

use crate::store::Store;

/// Shared by every request.
pub struct UiState {
    /// The open store (read-only use).
    pub store: Arc<Store>,
    /// Where the chat page finds `cairn serve` (its OpenAI-compatible API).
    pub serve_url: String,
}

/// The page and its assets, embedded in the binary (no build step, no network).
const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

/// The router with every route, over `state`.
pub fn router(state: Arc<UiState>) -> Router {
    use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
    use axum::routing::get;
    let asset = |body: &'static str, mime: &'static str| {
        get(move || async move { ([(CONTENT_TYPE, mime), (CACHE_CONTROL, "no-cache")], body) })
    };
    api::routes()
        .route("/", asset(INDEX_HTML, "text/html; charset=utf-8"))
        .route(
            "/assets/app.js",
            asset(APP_JS, "text/javascript; charset=utf-8"),
        )
        .route(
            "/assets/style.css",
            asset(STYLE_CSS, "text/css; charset=utf-8"),
        )
        .with_state(state)
}

/// Serves the store at `store_root` on `addr` until Ctrl-C.
pub async fn serve(store_root: PathBuf, addr: SocketAddr, serve_url: String) -> anyhow::Result<()> {
    let store = Store::open_existing(&store_root)?;
    let state = Arc::new(UiState {
        store: Arc::new(store),
        serve_url,
    });
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr()?;
    eprintln!(
        "cairn ui: serving {} at http://{local}/ (JSON API under /api; Ctrl-C stops)",
        store_root.display()
    );
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
