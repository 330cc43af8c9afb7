//! A desktop chat app that embeds llmvisor as a library.
//!
//! ```text
//! cargo build -p fake-llm            # the stand-in for llama-server used here
//! cargo run --example chat_app       # RUST_LOG=llmvisor=info shows the supervisor's own log
//! ```
//!
//! The app configures three models (served by the fake server, which takes 1 s, 2 s and 3 s to
//! "load" its model) and opens several chat windows at once. Each chat asks the supervisor for a
//! lease on its model and keeps it while the window is open. What to watch:
//!
//! - A model starts on demand, once: chats asking for the same model while it starts all join
//!   that one start (the pid files the fake servers append to prove one process per model).
//! - Different models start in parallel: gemma (1 s) and qwen (2 s) are both up after ~2 s.
//! - A chat opened once the model is ready gets the running server at once.
//! - A model nobody asked for (phi) is never started.
//! - `shutdown()` stops every server before the app exits.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use llmvisor::{Lease, Phase, Supervisor};

/// The chat windows: (chat number, model asked for, opened after).
const CHATS: &[(u32, &str, Duration)] = &[
    (1, "gemma", Duration::ZERO),
    (2, "qwen", Duration::ZERO),
    (3, "gemma", Duration::ZERO),
    (4, "qwen", Duration::ZERO),
    (5, "gemma", Duration::from_millis(500)),
    (6, "gemma", Duration::from_millis(2500)),
    (7, "qwen", Duration::from_millis(2500)),
];

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();

    let Some(fake_llm) = find_fake_llm() else {
        eprintln!(
            "error: the fake server `fake-llm` was not found (looked next to this example).\n  \
             help: run `cargo build -p fake-llm` first (or set FAKE_LLM_BIN=/path/to/fake-llm)"
        );
        return ExitCode::FAILURE;
    };

    // A real app would keep its state under e.g. ~/.local/state/<app>; here a temporary directory
    // holds the state dir (server logs, sockets) and the pid files of the fake servers.
    let scratch = tempfile::Builder::new()
        .prefix("chat-app")
        .tempdir()
        .expect("temporary directory");
    let config = match llmvisor::config::parse(&config_text(&fake_llm, scratch.path()), None) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    let sup = Supervisor::new(&config).await.expect("supervisor");

    // Open every chat window; each gets its lease (or an error) back.
    let app_start = Instant::now();
    let claimed = Arc::new(Mutex::new(HashSet::new()));
    let windows: Vec<_> = CHATS
        .iter()
        .map(|&(n, model, after)| {
            let (sup, claimed) = (sup.clone(), claimed.clone());
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                open_chat(n, model, &sup, &claimed, app_start).await
            })
        })
        .collect();
    let mut leases = Vec::new();
    for window in windows {
        match window.await.expect("chat task") {
            Ok(lease) => leases.push(lease),
            Err(e) => eprintln!("{e}"),
        }
    }

    println!();
    for model in ["gemma", "qwen", "phi"] {
        let spawned = pids(&scratch.path().join(format!("{model}.pids")));
        let chats = CHATS.iter().filter(|c| c.1 == model).count();
        println!(
            "{model}: {chats} chat(s), {} server process(es) started {spawned:?}",
            spawned.len()
        );
    }

    // The chats are still open, so every model they use shows its leases.
    println!();
    print_status(&sup);

    // Closing the windows ends their leases; the servers would now stop after their idle TTL.
    drop(leases);
    // Quitting the app: stop every server and wait for them to exit.
    sup.shutdown().await;
    let all: Vec<u32> = ["gemma", "qwen", "phi"]
        .iter()
        .flat_map(|m| pids(&scratch.path().join(format!("{m}.pids"))))
        .collect();
    let still_running: Vec<u32> = all
        .into_iter()
        .filter(|&p| llmvisor::procfs::is_alive(p))
        .collect();
    if still_running.is_empty() {
        println!("\nshut down: every server stopped");
        ExitCode::SUCCESS
    } else {
        eprintln!("\nservers still running after shutdown: {still_running:?}");
        ExitCode::FAILURE
    }
}

/// One chat window: acquire a lease on `model`, say how it was obtained, send one message.
async fn open_chat(
    n: u32,
    model: &str,
    sup: &Supervisor,
    claimed: &Mutex<HashSet<String>>,
    app_start: Instant,
) -> Result<Lease, llmvisor::AcquireError> {
    // The phase before asking tells how this chat will get its server. Among chats that all see
    // it stopped, one start is made for all of them; this example credits the first chat to
    // ask (whichever request reaches the model first really triggers it, and the pid file shows
    // there was a single start either way).
    let phase = sup.model(model)?.phase();
    let how = match phase {
        Phase::Ready => How::ReusedReady,
        Phase::Starting => How::Joined,
        _ if claimed.lock().unwrap().insert(model.to_owned()) => How::Started,
        _ => How::Joined,
    };
    let at = app_start.elapsed().as_secs_f64();
    println!("[{at:5.2}s] [chat {n}] opened, asking for {model} (it is {phase})");
    let asked = Instant::now();
    let lease = sup.acquire(model).await?;
    let waited = asked.elapsed().as_secs_f64();
    let at = app_start.elapsed().as_secs_f64();
    let url = lease.url();
    match how {
        How::Started => println!(
            "[{at:5.2}s] [chat {n}] {model}: started the server at {url} (ready after {waited:.2}s)"
        ),
        How::Joined => println!(
            "[{at:5.2}s] [chat {n}] {model}: reused the server at {url} \
             (waited {waited:.2}s: joined the start in progress)"
        ),
        How::ReusedReady => println!(
            "[{at:5.2}s] [chat {n}] {model}: reused the server at {url} \
             (waited {waited:.2}s: it was already ready)"
        ),
    }
    match say(&lease, &format!("hello from chat {n}")).await {
        Ok(answer) => println!("          [chat {n}] {model} answered: {answer}"),
        Err(e) => println!("          [chat {n}] {model} did not answer: {e}"),
    }
    Ok(lease)
}

enum How {
    Started,
    Joined,
    ReusedReady,
}

/// Sends one chat message to the leased server (any HTTP client would do; this one is llmvisor's
/// own, which also speaks to servers behind a unix socket).
async fn say(lease: &Lease, text: &str) -> Result<String, Box<dyn std::error::Error>> {
    let body = serde_json::json!({
        "model": lease.model(),
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 4,
    });
    let request = http::Request::post(lease.endpoint().uri("/v1/chat/completions")?)
        .header("content-type", "application/json")
        .body(llmvisor::upstream::body(http_body_util::Full::new(
            bytes::Bytes::from(body.to_string()),
        )))?;
    let response = llmvisor::upstream::client().request(request).await?;
    let bytes = response.into_body().collect().await?.to_bytes();
    let answer: serde_json::Value = serde_json::from_slice(&bytes)?;
    Ok(answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or("(no content)")
        .trim()
        .to_owned())
}

/// The app's configuration, as it could ship in a TOML file (see SPEC.md for every key).
fn config_text(fake_llm: &Path, scratch: &Path) -> String {
    let quote = |s: String| toml::Value::String(s).to_string();
    let model = |id: &str, delay: &str| {
        format!(
            r#"
[models.{id}]
cmd = [{bin}, "--port", "${{PORT}}", "--model-name", "{id}",
       "--startup-delay", "{delay}", "--pid-file", {pid_file}]
"#,
            bin = quote(fake_llm.display().to_string()),
            pid_file = quote(scratch.join(format!("{id}.pids")).display().to_string()),
        )
    };
    format!(
        r#"
state_dir = {state_dir}

[defaults]
ttl = "10m"              # stop a server 10 minutes after its last chat closed
startup_timeout = "30s"
stop_timeout = "5s"
{gemma}{qwen}{phi}"#,
        state_dir = quote(scratch.join("state").display().to_string()),
        gemma = model("gemma", "1s"),
        qwen = model("qwen", "2s"),
        phi = model("phi", "3s"),
    )
}

fn print_status(sup: &Supervisor) {
    println!(
        "{:<6} {:<8} {:>7} {:<24} {:>6} {:>8} {:>8}",
        "MODEL", "STATE", "PID", "URL", "LEASES", "RESTARTS", "READY_MS"
    );
    for m in sup.status() {
        let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        println!(
            "{:<6} {:<8} {:>7} {:<24} {:>6} {:>8} {:>8}",
            m.id,
            m.state.as_str(),
            or_dash(m.pid.map(|p| p.to_string())),
            or_dash(m.url),
            m.leases,
            m.restarts,
            or_dash(m.ready_ms.map(|ms| ms.to_string())),
        );
    }
}

/// The fake server, found like the tests find it: `$FAKE_LLM_BIN`, else next to this example's
/// profile directory (`target/debug` for `cargo run --example`), else `target/release`.
fn find_fake_llm() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FAKE_LLM_BIN") {
        return Some(PathBuf::from(p)).filter(|p| p.exists());
    }
    // target/<profile>/examples/chat_app → target/<profile>
    let exe = std::env::current_exe().ok()?;
    let profile_dir = exe.parent()?.parent()?;
    let target = profile_dir.parent()?;
    [
        profile_dir.join("fake-llm"),
        target.join("debug").join("fake-llm"),
        target.join("release").join("fake-llm"),
    ]
    .into_iter()
    .find(|p| p.exists())
}

/// The pids a fake server appended to its pid file, one per start.
fn pids(path: &Path) -> Vec<u32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}
