//! `kv_persist` end to end on a real llama-server: one chat with a history of more than 2,000
//! tokens survives every stop llmvisor decides — eviction by another model's load
//! (`max_loaded = 1`), unload, the idle TTL, a reload that changes the model's key, a daemon
//! restart on the same state dir — and each time the next turn evaluates at most 10 % of what
//! the same turn costs on a model without `kv_persist`, with the same answer at temperature 0.
//! Then a truncated slot file and a file of another shape (`-c` changed) are discarded, not
//! loaded, and the chat is still served; and a save into a full disk fails with a warning while
//! the stop goes on.
//!
//! The model is SmolLM2-135M (architecture `llama`): Gemma 3, the other installed model, is a
//! sliding-window model whose restored state llama.cpp does not reuse (docs/kv-persist.md).
//! Needs LLAMA_SERVER, LLAMA_VENV and LLAMA_MODEL_SMOL (scripts/setup-llama.sh).

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::llama::{LlamaEnv, Serve};
use support::Scratch;

/// Ten percent, as the acceptance says.
const MAX_SHARE: f64 = 0.10;

struct Env {
    server: PathBuf,
    model: PathBuf,
}

/// LLAMA_SERVER and LLAMA_MODEL_SMOL, or `None` after saying why (a failure in CI).
fn env() -> Option<Env> {
    let llama = LlamaEnv::get()?;
    let model = match std::env::var_os("LLAMA_MODEL_SMOL") {
        Some(m) if !m.is_empty() => PathBuf::from(m),
        _ => {
            assert!(
                std::env::var_os("CI").is_none(),
                "LLAMA_MODEL_SMOL not set, but CI is (scripts/setup-llama.sh provides it)"
            );
            eprintln!("skipping: LLAMA_MODEL_SMOL not set (run scripts/test.sh)");
            return None;
        }
    };
    assert!(
        model.is_file(),
        "LLAMA_MODEL_SMOL={} is not a file",
        model.display()
    );
    Some(Env {
        server: llama.server,
        model,
    })
}

fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// `chat` (kv_persist) and `plain` (the same server without it), one at a time.
/// `chat_env`: more `chat` environment (`, NAME = "VALUE"`); `save_path`: its own
/// `--slot-save-path`.
fn config(s: &Scratch, e: &Env, ctx: u32, chat_env: &str, save_path: Option<&Path>) -> String {
    let cmd = |extra: &[String]| {
        let mut argv: Vec<String> = vec![
            e.server.display().to_string(),
            "-m".into(),
            e.model.display().to_string(),
            "--host".into(),
            "127.0.0.1".into(),
            "--port".into(),
            "${PORT}".into(),
            "-c".into(),
            ctx.to_string(),
            "-np".into(),
            "1".into(),
            "-t".into(),
            "2".into(),
        ];
        argv.extend(extra.iter().cloned());
        argv.iter()
            .map(|a| toml_str(a))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let own: Vec<String> = save_path
        .map(|p| vec!["--slot-save-path".into(), format!("{}/", p.display())])
        .unwrap_or_default();
    let mark = format!(
        "{} = {}, {} = \"${{MODEL_ID}}\"",
        support::llama::MARK,
        toml_str(&s.root().display().to_string()),
        support::llama::MARK_MODEL
    );
    format!(
        "listen = \"127.0.0.1:0\"\nstate_dir = {}\nport_range = [{}, {}]\nmax_loaded = 1\n\n\
         [defaults]\nstartup_timeout = \"60s\"\nstop_timeout = \"5s\"\nttl = \"10m\"\n\n\
         [models.chat]\ncmd = [{}]\nenv = {{ {mark}{chat_env} }}\nkv_persist = true\nkv_save_timeout = \"20s\"\nttl = \"4s\"\n\n\
         [models.plain]\ncmd = [{}]\nenv = {{ {mark} }}\n",
        toml_str(&s.state_dir().display().to_string()),
        s.ports.0,
        s.ports.1,
        cmd(&own),
        cmd(&[]),
    )
}

/// A user message of well over 2,000 tokens.
fn long_history() -> String {
    (1..=160)
        .map(|i| format!("Note {i}: the lighthouse keeper counted {i} ships passing the northern rocks today."))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One chat completion at temperature 0: (answer, timings.prompt_n, timings.cache_n).
async fn turn(d: &Serve, model: &str, messages: &Value, max_tokens: u32) -> (String, u64, u64) {
    let body = json!({
        "model": model, "messages": messages, "max_tokens": max_tokens,
        "temperature": 0, "seed": 1,
    });
    let r = d
        .call(
            "POST",
            "/v1/chat/completions",
            Some(&body.to_string()),
            Duration::from_secs(180),
        )
        .await;
    assert_eq!(r.status, 200, "{}\n{}", r.text(), d.log_text());
    let v = r.json();
    let answer = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    let t = &v["timings"];
    (
        answer,
        t["prompt_n"].as_u64().unwrap(),
        t["cache_n"].as_u64().unwrap_or(0),
    )
}

async fn wait_state(d: &Serve, id: &str, state: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let m = d.model(id).await;
        if m["state"] == state {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "{id} never {state}: {m}\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn kv_files(s: &Scratch) -> Vec<(String, u64)> {
    let dir = s.state_dir().join("kv").join("chat");
    let mut files: Vec<(String, u64)> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .map(|e| {
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        e.metadata().unwrap().len(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

fn sighup(pid: u32) {
    let pid = rustix::process::Pid::from_raw(pid as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_chat_survives_every_stop_llmvisor_decides() {
    let Some(e) = env() else { return };
    let s = Scratch::new();
    let mut d = Serve::start(&s, &config(&s, &e, 4096, "", None)).await;
    let history = long_history();

    // The history, on the chat model.
    let first = json!([{"role": "user", "content": history}]);
    let (a1, built, _) = turn(&d, "chat", &first, 8).await;
    assert!(
        built >= 2000,
        "the history is {built} tokens, fewer than 2,000"
    );
    let next = json!([
        {"role": "user", "content": history},
        {"role": "assistant", "content": a1},
        {"role": "user", "content": "Which ship number came last?"},
    ]);

    // Route 1, eviction: `plain` (no kv_persist) takes the only place; its answer to the same
    // turn, evaluated in full, is the measure.
    let (expected, full, _) = turn(&d, "plain", &next, 16).await;
    assert_eq!(d.model("chat").await["state"], "stopped");
    assert!(
        !kv_files(&s).is_empty(),
        "nothing saved on eviction:\n{}",
        d.log_text()
    );
    let check = |route: &str, (answer, prompt_n, cache_n): (String, u64, u64), d: &Serve| {
        assert!(
            (prompt_n as f64) <= MAX_SHARE * full as f64,
            "after {route}: {prompt_n} tokens evaluated (cache_n {cache_n}), more than 10 % of {full}\n{}",
            d.log_text()
        );
        assert_eq!(
            answer, expected,
            "after {route}: another answer at temperature 0"
        );
        eprintln!("after {route}: prompt_n {prompt_n} of {full}, cache_n {cache_n}");
    };
    check("eviction", turn(&d, "chat", &next, 16).await, &d);
    let m = d.model("chat").await;
    assert!(m["kv_saved"].as_u64().is_some_and(|b| b > 0), "{m}");

    // Route 2, unload.
    let r = d.post("/api/models/chat/unload", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    check("unload", turn(&d, "chat", &next, 16).await, &d);

    // Route 3, the idle TTL (4 s).
    wait_state(&d, "chat", "stopped", Duration::from_secs(30)).await;
    check("the idle TTL", turn(&d, "chat", &next, 16).await, &d);

    // Route 4, a reload that changes a key of the model (its environment): stop, start again.
    let before = d.model("chat").await["pid"].clone();
    let changed = config(&s, &e, 4096, ", RELOADED = \"1\"", None);
    std::fs::write(&d.config, changed).unwrap();
    sighup(d.pid());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = d.model("chat").await;
        if m["state"] == "ready" && m["pid"] != before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never restarted by the reload: {m}\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    check(
        "a reload with a changed key",
        turn(&d, "chat", &next, 16).await,
        &d,
    );

    // Route 5, a daemon restart on the same state dir (the shutdown saves).
    d.shutdown().await;
    d = Serve::start(&s, &config(&s, &e, 4096, "", None)).await;
    check("a daemon restart", turn(&d, "chat", &next, 16).await, &d);

    // A truncated file is refused by the server, discarded, and the chat served in full.
    let r = d.post("/api/models/chat/unload", "").await;
    assert_eq!(r.status, 200);
    let files = kv_files(&s);
    assert_eq!(files.len(), 1, "{files:?}");
    let path = s.state_dir().join("kv").join("chat").join(&files[0].0);
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(files[0].1 / 3).unwrap();
    drop(f);
    let (answer, prompt_n, _) = turn(&d, "chat", &next, 16).await;
    assert!(
        prompt_n as f64 > 0.5 * full as f64,
        "a truncated file cannot have helped: {prompt_n}"
    );
    assert_eq!(answer, expected);
    assert!(d.log_text().contains("truncated: "), "{}", d.log_text());

    // A corrupt file of the right size: llama-server refuses it or dies loading it; either
    // way it is discarded and the chat served.
    let r = d.post("/api/models/chat/unload", "").await;
    assert_eq!(r.status, 200);
    let files = kv_files(&s);
    assert_eq!(files.len(), 1, "{files:?}");
    let path = s.state_dir().join("kv").join("chat").join(&files[0].0);
    let mut bytes = std::fs::read(&path).unwrap();
    for b in bytes.iter_mut().take(64) {
        *b ^= 0x5a;
    }
    std::fs::write(&path, bytes).unwrap();
    let (answer, prompt_n, _) = turn(&d, "chat", &next, 16).await;
    assert!(
        prompt_n as f64 > 0.5 * full as f64,
        "a corrupt file cannot have helped: {prompt_n}"
    );
    assert_eq!(answer, expected);
    assert!(
        d.log_text().contains("the server refused it"),
        "{}",
        d.log_text()
    );

    // A file of another shape (-c changed) is discarded, never loaded.
    d.shutdown().await;
    let saved = kv_files(&s);
    assert_eq!(saved.len(), 1, "{saved:?}");
    d = Serve::start(&s, &config(&s, &e, 8192, "", None)).await;
    let (answer, prompt_n, cache_n) = turn(&d, "chat", &next, 16).await;
    assert_eq!(cache_n, 0, "another shape's file was loaded");
    assert!(prompt_n as f64 > 0.5 * full as f64);
    assert_eq!(answer.is_empty(), expected.is_empty());
    assert!(
        !kv_files(&s).iter().any(|f| f.0 == saved[0].0),
        "the old shape's file is still there: {:?}",
        kv_files(&s)
    );
    d.shutdown().await;
}

/// A 1 MiB tmpfs, unmounted on drop (even when the test fails).
struct TinyDisk(PathBuf);

impl TinyDisk {
    /// `None` when this machine lets no tmpfs be mounted (not root): said, and skipped.
    fn mount(at: PathBuf) -> Option<Self> {
        std::fs::create_dir_all(&at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&at)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipping the full-disk case: cannot mount a tmpfs here (needs root)");
            return None;
        }
        Some(Self(at))
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_into_a_full_disk_is_a_warning_and_the_stop_goes_on() {
    let Some(e) = env() else { return };
    let s = Scratch::new();
    let Some(disk) = TinyDisk::mount(s.path("tiny")) else {
        return;
    };
    // A slot of even a few dozen tokens takes more than 1 MiB (1.4 MB for 60 with SmolLM2).
    let d = Serve::start(&s, &config(&s, &e, 4096, "", Some(&disk.0))).await;
    let chat = json!([{"role": "user", "content": "Tell me about lighthouses, please."}]);
    let (answer, _, _) = turn(&d, "chat", &chat, 32).await;
    let r = d.post("/api/models/chat/unload", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "stopped");
    let log = d.log_text();
    assert!(log.contains("KV save failed (the stop goes on)"), "{log}");
    let left: Vec<_> = std::fs::read_dir(&disk.0).unwrap().flatten().collect();
    assert!(left.is_empty(), "a failed save left {left:?}");
    // Nothing else lost: the model starts and answers as before.
    let (again, _, cache_n) = turn(&d, "chat", &chat, 32).await;
    assert_eq!(again, answer);
    assert_eq!(cache_n, 0, "nothing was saved, so nothing can be reused");
    d.shutdown().await;
}
