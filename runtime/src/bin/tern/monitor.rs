//! `tern monitor`: serve the metrics of every tern sandbox on this host (see
//! `tern_runtime::monitor`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use tern_runtime::config::Config;
use tern_runtime::monitor::{self, MonitorOptions};

#[derive(Debug, Args)]
pub struct MonitorArgs {
    /// Address to serve /metrics, /sandboxes and /agent-url?sandbox=ID on.
    #[arg(long, default_value = monitor::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// The sandbox directory to watch. Default: `<shim.root_dir>/sbs` from the config
    /// (/run/tern/sbs).
    #[arg(long, value_name = "DIR")]
    sbs_root: Option<PathBuf>,
    /// CRI socket asked for pod metadata (uid, name, namespace labels); "" disables it.
    #[arg(long, value_name = "PATH", default_value = monitor::DEFAULT_CRI_SOCKET)]
    cri_socket: String,
    /// Per-sandbox scrape timeout in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = monitor::DEFAULT_SCRAPE_TIMEOUT.as_millis() as u64)]
    scrape_timeout: u64,
}

pub fn monitor(config: &Config, args: MonitorArgs) -> Result<i32> {
    let options = MonitorOptions {
        listen: args.listen,
        sbs_root: args.sbs_root.unwrap_or_else(|| tern_runtime::metrics::sbs::sbs_root(&config.shim.root_dir)),
        cri_socket: (!args.cri_socket.is_empty()).then(|| PathBuf::from(args.cri_socket)),
        scrape_timeout: Duration::from_millis(args.scrape_timeout.max(1)),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        tokio::select! {
            r = monitor::run(options) => r.context("tern monitor failed"),
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    })?;
    Ok(0)
}
