//! `cairn ui`: a read-only local web server over the store. This module holds the server
//! and the JSON API under `/api/...` (documented in the README); parameters are redacted
//! ([`crate::redact`]) before they leave, and files are only ever served from inside an
//! artifact's own object.

mod api;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;

use crate::store::Store;

/// Shared by every request.
pub struct UiState {
    /// The open store (read-only use).
    pub store: Store,
}

/// The router with every route, over `state`.
pub fn router(state: Arc<UiState>) -> Router {
    api::routes().with_state(state)
}

/// Serves the store at `store_root` on `addr` until Ctrl-C.
pub async fn serve(store_root: PathBuf, addr: SocketAddr) -> anyhow::Result<()> {
    let store = Store::open_existing(&store_root)?;
    let state = Arc::new(UiState { store });
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
