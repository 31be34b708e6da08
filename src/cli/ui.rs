//! `cairn ui`: serve the store's runs, artifacts and lineage to a browser (read-only).

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;

use clap::Args;

use super::{Cli, UsageError};

/// Arguments of `cairn ui`.
#[derive(Debug, Args)]
pub struct UiArgs {
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Address to bind. Anything but a loopback address exposes the store to the network.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Where the chat page finds `cairn serve` (its browser calls it directly).
    #[arg(long, env = "CAIRN_SERVE_URL", default_value = "http://127.0.0.1:8000")]
    pub serve_url: String,
}

/// Runs the server until Ctrl-C.
pub fn ui(cli: &Cli, args: &UiArgs) -> anyhow::Result<ExitCode> {
    let ip: IpAddr = args.host.parse().map_err(|_| {
        UsageError(format!(
            "--host `{}` is not an IP address (e.g. 127.0.0.1)",
            args.host
        ))
    })?;
    if !ip.is_loopback() {
        eprintln!(
            "warning: binding {ip}: anyone who can reach this machine can read every artifact in the store"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(crate::ui::serve(
        cli.store_dir(),
        SocketAddr::new(ip, args.port),
        args.serve_url.trim_end_matches('/').to_string(),
    ))?;
    Ok(ExitCode::SUCCESS)
}
