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

    let threads = if cli.command.is_serve() {
        worker_threads()?
    } else {
        1
    };
    // One thread runs every task, like one nginx worker: a proxied request then costs no
    // cross-thread wake-ups (with two workers: one context switch per request, and about a
    // fifth more CPU per request: docs/benchmarks-http.md). Nothing on the daemon's tasks
    // blocks: the state store, spawning and reaping have threads of their own.
    let runtime = if threads > 1 {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    } else {
        tokio::runtime::Builder::new_current_thread()
    }
    .enable_all()
    .build()
    .map_err(|e| anyhow::Error::new(e).context("cannot start the async runtime"))?;
    runtime.block_on(cli::run(cli))
}

/// `LLMVISOR_WORKER_THREADS`: threads that run the daemon's tasks (default 1; more only pays off
/// when the proxy itself, not the models, is the bottleneck).
fn worker_threads() -> anyhow::Result<usize> {
    match std::env::var("LLMVISOR_WORKER_THREADS") {
        Err(_) => Ok(1),
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if (1..=1024).contains(&n) => Ok(n),
            _ => anyhow::bail!(
                "LLMVISOR_WORKER_THREADS={v:?} is not a thread count (fix: a number from 1 to 1024, or unset it)"
            ),
        },
    }
}
