//! Serves an axum app on its own thread and runtime, for tests, examples and benches.

use std::net::SocketAddr;

/// Binds `addr` (`127.0.0.1:0` for a free port) and serves `app` until the process ends;
/// returns the bound address.
pub fn serve(addr: &str, app: axum::Router) -> SocketAddr {
    let listener = std::net::TcpListener::bind(addr).unwrap();
    listener.set_nonblocking(true).unwrap();
    let local = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    local
}
