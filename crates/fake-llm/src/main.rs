//! `fake-llm`: a test double for llama.cpp's `llama-server`.
//!
//! It is NOT part of what llmvisor installs or ships. llmvisor's tests and
//! benchmarks spawn it as the child process they supervise: from the outside it
//! looks like `llama-server` (binds at once, answers `/health` with 503
//! "Loading model" until ready, serves OpenAI-style `/v1/*` endpoints with
//! real SSE streaming), and command-line switches make it misbehave on purpose
//! (slow start, failed bind, exit at startup, crash after N responses, hung
//! health checks, ignored SIGTERM, a grandchild left in the process group).
//! See `fake-llm --help` for the switches.

mod api;
mod cli;
mod server;

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};

use cli::Args;
use server::Listener;

/// Writes one `fake-llm: ...` line to stderr with a single write call, so
/// lines from concurrent tasks never interleave.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::log_line(&format!($($arg)*))
    };
}

pub fn log_line(msg: &str) {
    let line = format!("fake-llm: {msg}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Appends "`pid`\n" to `path` in one write (O_APPEND keeps concurrent
/// writers from interleaving).
fn append_pid(path: &Path, pid: u32) -> std::io::Result<()> {
    let line = format!("{pid}\n");
    let mut f = OpenOptions::new().append(true).create(true).open(path)?;
    let n = f.write(line.as_bytes())?;
    if n != line.len() {
        return Err(std::io::Error::other("short write"));
    }
    Ok(())
}

fn main() -> ExitCode {
    let start = Instant::now();
    let args = Args::parse();

    if args.grandchild_sleep {
        // The grandchild: a plain sleeper with default signal dispositions.
        std::thread::sleep(Duration::from_secs(3600));
        return ExitCode::SUCCESS;
    }

    let pid = std::process::id();
    if let Some(path) = &args.pid_file {
        if let Err(e) = append_pid(path, pid) {
            log!("cannot append pid to {}: {e}", path.display());
            return ExitCode::from(1);
        }
    }
    log!(
        "starting, pid {pid}, model {} (startup delay {:?})",
        args.model_name,
        args.startup_delay
    );

    for name in &args.print_env {
        let line = match std::env::var_os(name) {
            Some(v) => format!("env {name}={}\n", v.to_string_lossy()),
            None => format!("env {name} unset\n"),
        };
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
    if args.log_lines > 0 {
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        for i in 1..=args.log_lines {
            let _ = writeln!(out, "fake-llm log line {i}");
        }
        let _ = out.flush();
    }

    if let Some(code) = args.exit_at_startup {
        log!("exiting at startup with code {code}");
        std::process::exit(code);
    }
    if args.fail_bind {
        log!("{}", bind_error_message(&args));
        return ExitCode::from(1);
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            log!("cannot start tokio runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(run(args, start, pid))
}

fn bind_error_message(args: &Args) -> String {
    match args.unix_socket_path() {
        Some(p) => format!("couldn't bind HTTP server socket, path: {}", p.display()),
        None => format!(
            "couldn't bind HTTP server socket, hostname: {}, port: {}",
            args.host, args.port
        ),
    }
}

async fn run(args: Args, start: Instant, pid: u32) -> ExitCode {
    let socket_path = args.unix_socket_path();
    if let Err(e) = install_signal_handlers(args.ignore_sigterm, socket_path.clone()) {
        log!("cannot install signal handlers: {e}");
        return ExitCode::from(1);
    }

    let bound = match &socket_path {
        Some(p) => Listener::bind_unix(p),
        None => Listener::bind_tcp(&args.host, args.port).await,
    };
    let listener = match bound {
        Ok(l) => l,
        Err(e) => {
            log!("{}: {e}", bind_error_message(&args));
            return ExitCode::from(1);
        }
    };
    log!("listening on {}", listener.describe());

    if args.fork_grandchild {
        spawn_grandchild(args.grandchild_pid_file.as_deref());
    }

    let delay = args.startup_delay;
    tokio::spawn(async move {
        tokio::time::sleep_until((start + delay).into()).await;
        log!("model loaded, server is ready");
    });

    let mut state = api::AppState::new(
        pid,
        start,
        args.startup_delay,
        args.hang_health_after,
        args.chunks,
        args.chunk_delay,
        args.model_name,
        args.crash_after,
    );
    state.ready_file = args.ready_file.clone();
    let router = api::with_response_headers(
        api::router(Arc::new(state), args.echo_unknown, args.refuse_slot_save),
        args.response_header,
    );
    server::serve(
        listener,
        router,
        pid,
        args.crash_after.is_some(),
        args.close_reused,
    )
    .await
}

/// SIGTERM and SIGINT exit 0 at once; with `ignore_sigterm`, SIGTERM is
/// caught and only logged (the handler stays installed, so it never kills).
fn install_signal_handlers(
    ignore_sigterm: bool,
    socket_path: Option<std::path::PathBuf>,
) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            if name == "SIGTERM" && ignore_sigterm {
                log!("received SIGTERM, ignoring it (--ignore-sigterm)");
                continue;
            }
            log!("received {name}, exiting");
            if let Some(p) = &socket_path {
                let _ = std::fs::remove_file(p);
            }
            std::process::exit(0);
        }
    });
    Ok(())
}

/// Starts a long sleeper in our own process group (no setsid/setpgid) and
/// records its pid. A detached thread reaps it so it never lingers as a
/// zombie, without keeping us from exiting.
fn spawn_grandchild(pid_file: Option<&Path>) {
    let spawned = match std::env::current_exe() {
        Ok(exe) => Command::new(exe)
            .arg("--grandchild-sleep")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn(),
        Err(_) => Command::new("sleep")
            .arg("3600")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn(),
    };
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            log!("cannot spawn grandchild: {e}");
            return;
        }
    };
    let gpid = child.id();
    log!("spawned grandchild pid {gpid} (same process group)");
    if let Some(path) = pid_file {
        if let Err(e) = append_pid(path, gpid) {
            log!("cannot append grandchild pid to {}: {e}", path.display());
        }
    }
    std::thread::spawn(move || {
        if let Ok(status) = child.wait() {
            log!("grandchild {gpid} exited: {status}");
        }
    });
}
