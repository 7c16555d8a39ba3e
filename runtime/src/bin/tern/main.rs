//! `tern`: boot a microVM and run a command in it, or check whether this host can.

mod check;
mod run;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// tern runs workloads inside KVM microVMs whose VMM lives in the tern process itself.
///
/// Configuration comes from --config, $TERN_CONFIG or /etc/tern/config.toml (all optional;
/// see runtime/config.example.toml); flags override it. Logs go to stderr, filtered by
/// RUST_LOG (default: warn).
#[derive(Debug, Parser)]
#[command(name = "tern", version, about, long_about)]
struct Cli {
    /// Config file (TOML). Default: $TERN_CONFIG, else /etc/tern/config.toml if present.
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a microVM, run CMD in it with stdin/stdout/stderr attached, exit with its status.
    ///
    /// The exit code is CMD's, or 128+N when a signal N killed it. The VM is shut down
    /// afterwards in every case. Errors of tern itself exit with 125 (as `docker run` does).
    Run(run::RunArgs),
    /// Check that this host can run tern microVMs, like `kata-runtime check`.
    ///
    /// Prints one pass/fail line per requirement with what to do about failures, and exits
    /// non-zero if any requirement fails.
    Check(check::CheckArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let code = match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tern: {e:#}");
            run::TERN_FAILURE_EXIT
        }
    };
    std::process::exit(code);
}

fn dispatch(cli: Cli) -> Result<i32> {
    let config = tern_runtime::config::Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Run(args) => run::run(config, args),
        Command::Check(args) => check::check(&config, args),
    }
}
