//! The `llmvisor` binary: parses arguments, sets up logging, runs one command from
//! [`llmvisor::cli`] and turns its outcome into an exit code. Everything else lives in the library.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::Parser;
use llmvisor::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            // A closed stderr is no reason to panic.
            let _ = writeln!(std::io::stderr(), "error: {}", cli::error_chain(&err));
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = cli::log_filter(
        cli.log_level.as_deref(),
        rust_log.as_deref(),
        cli.command.default_log_level(),
    )?;
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if cli.command.is_serve() {
        logs.init();
    } else {
        logs.without_time().with_target(false).init();
    }

    let runtime = if cli.command.is_serve() {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    }
    .enable_all()
    .build()
    .map_err(|e| anyhow::Error::new(e).context("cannot start the async runtime"))?;
    runtime.block_on(cli::run(cli))
}
