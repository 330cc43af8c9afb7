//! End to end on a real `llama-server` with a real model (Gemma 3 270M), through the real
//! `llmvisor serve` binary: chat completions plain and streamed, one server for 20 concurrent
//! cold requests, unload, SIGKILL of the daemon, the official `openai` Python client, and a
//! model reached over a unix socket.
//!
//! Needs LLAMA_SERVER, LLAMA_MODEL and LLAMA_VENV (scripts/test.sh sets them from
//! scripts/setup-llama.sh). Without them each test says it skips, except in CI, where it fails.
//! The model's text is junk at this size: the tests assert the protocol, never the content.
//!
//! Every test counts only its own llama-servers (`/proc` entries carrying `LLMVISOR_INSTANCE`
//! and its scratch dir, see `support::llama::servers_of`) and ends with none of them alive.

mod support;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use llmvisor::procfs;
use serde_json::{json, Value};
use support::llama::{self, LlamaEnv, Serve, Transport};
use support::Scratch;

/// The env, or return from the test (after `LlamaEnv::get` said why).
macro_rules! llama_env {
    () => {
        match LlamaEnv::get() {
            Some(env) => env,
            None => return,
        }
    };
}

fn chat_body(model: &str, max_tokens: u32, stream: bool) -> String {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": "Count from one to twenty in words."}],
        "max_tokens": max_tokens,
        "stream": stream,
    })
    .to_string()
}

/// Asserts the shape of a non-streamed chat completion.
fn assert_chat_completion(v: &Value, max_tokens: u64) {
    assert_eq!(v["object"], "chat.completion", "{v}");
    let msg = &v["choices"][0]["message"];
    assert_eq!(msg["role"], "assistant", "{v}");
    assert!(msg["content"].is_string(), "{v}");
    let used = v["usage"]["completion_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("no usage.completion_tokens: {v}"));
    assert!(
        used <= max_tokens,
        "max_tokens {max_tokens} not honoured: {v}"
    );
}

/// Reads a streamed chat completion as it arrives: (body frames read, `data:` payloads).
async fn read_sse(serve: &Serve, model: &str, max_tokens: u32) -> (usize, Vec<String>) {
    let url = format!("{}/v1/chat/completions", serve.url);
    let body = chat_body(model, max_tokens, true);
    let read = async {
        let (status, headers, mut body) =
            support::http::send("POST", &url, &[("content-type", "application/json")], body).await;
        assert_eq!(status, 200, "streamed chat: {headers:?}");
        let ctype = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        assert!(ctype.starts_with("text/event-stream"), "{headers:?}");
        let mut frames = 0;
        let mut text = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("the stream broke");
            if let Some(data) = frame.data_ref() {
                if !data.is_empty() {
                    frames += 1;
                    text.extend_from_slice(data);
                }
            }
        }
        (frames, String::from_utf8(text).expect("SSE is UTF-8"))
    };
    let (frames, text) = match tokio::time::timeout(Duration::from_secs(60), read).await {
        Ok(r) => r,
        Err(_) => panic!("streamed chat did not end within 60 s"),
    };
    let data = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.trim().to_owned())
        .collect();
    (frames, data)
}

/// The pid `/api/models` gives for `id`, asserting it is a live llama-server.
fn server_pid(m: &Value) -> u32 {
    let pid = m["pid"].as_u64().unwrap_or_else(|| panic!("no pid: {m}")) as u32;
    assert!(procfs::is_alive(pid), "pid {pid} is not alive: {m}");
    assert_eq!(
        procfs::comm(pid).as_deref(),
        Some("llama-server"),
        "pid {pid} is not a llama-server (no wrapper in between)"
    );
    pid
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completion_plain_and_streamed() {
    let env = llama_env!();
    let s = Scratch::new();
    let serve = Serve::start(&s, &llama::config(&s, &env, &[("gemma", Transport::Tcp)])).await;
    assert_eq!(serve.model("gemma").await["state"], "stopped");

    // Plain: the first request starts the server.
    let began = Instant::now();
    let r = serve
        .post("/v1/chat/completions", &chat_body("gemma", 8, false))
        .await;
    let cold = began.elapsed();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_chat_completion(&r.json(), 8);
    let m = serve.model("gemma").await;
    assert_eq!(m["state"], "ready", "{m}");
    let pid = server_pid(&m);
    assert!(m["ready_ms"].is_u64(), "{m}");
    let port = m["port"].as_u64().unwrap_or_else(|| panic!("no port: {m}")) as u16;
    assert!((s.ports.0..=s.ports.1).contains(&port), "{m}");
    assert_eq!(m["url"], format!("http://127.0.0.1:{port}"), "{m}");
    assert_eq!(serve.servers().len(), 1);
    eprintln!(
        "cold chat completion: {cold:?} (ready_ms {})",
        m["ready_ms"]
    );

    // Streamed: chunk objects, then [DONE].
    let (frames, data) = read_sse(&serve, "gemma", 8).await;
    assert!(data.len() >= 2, "too few events: {data:?}");
    assert_eq!(data.last().unwrap(), "[DONE]", "{data:?}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("event not JSON ({e}): {d}")))
        .collect();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk", "{c}");
        assert_eq!(c["id"], chunks[0]["id"], "one completion: {c}");
        assert!(c["choices"][0]["delta"].is_object(), "{c}");
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(
        chunks
            .iter()
            .any(|c| c["choices"][0]["finish_reason"].is_string()),
        "no finish_reason: {data:?}"
    );
    // Streamed through as it was produced, not buffered into one piece.
    assert!(frames >= 2, "the stream arrived in {frames} piece(s)");
    eprintln!("streamed: {} events in {frames} body frames", data.len());

    // Same server for both.
    let m = serve.model("gemma").await;
    assert_eq!(m["pid"], pid, "{m}");
    assert_eq!(m["restarts"], 0, "{m}");
    assert_eq!(m["leases"], 0, "requests are over: {m}");
    serve.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_cold_requests_start_one_server() {
    let env = llama_env!();
    let s = Scratch::new();
    let serve = Serve::start(&s, &llama::config(&s, &env, &[("gemma", Transport::Tcp)])).await;

    // Watch /proc the whole time: every llama-server of this test that ever lived.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        let root = s.root().to_owned();
        std::thread::spawn(move || {
            let mut seen = BTreeSet::new();
            while !stop.load(Ordering::Relaxed) {
                seen.extend(llama::servers_of(&root).into_iter().map(|s| s.pid));
                std::thread::sleep(Duration::from_millis(10));
            }
            seen
        })
    };

    let url = format!("{}/v1/chat/completions", serve.url);
    let began = Instant::now();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let r = tokio::time::timeout(
                    Duration::from_secs(90),
                    support::http::request(
                        "POST",
                        &url,
                        &[("content-type", "application/json")],
                        chat_body("gemma", 4, false),
                    ),
                )
                .await
                .expect("no answer within 90 s");
                (r.status, r.text(), began.elapsed())
            })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    let took = began.elapsed();
    stop.store(true, Ordering::Relaxed);
    let seen = watcher.join().unwrap();

    for (status, text, _) in &answers {
        assert_eq!(*status, 200, "{text}");
        assert_chat_completion(&serde_json::from_str(text).unwrap(), 4);
    }
    let mut times: Vec<Duration> = answers.iter().map(|a| a.2).collect();
    times.sort();
    let m = serve.model("gemma").await;
    let pid = server_pid(&m);
    assert_eq!(m["restarts"], 0, "{m}");
    assert_eq!(
        seen,
        BTreeSet::from([pid]),
        "20 concurrent first requests must start exactly one server"
    );
    let now = serve.servers();
    assert_eq!(now.iter().map(|s| s.pid).collect::<Vec<_>>(), vec![pid]);
    assert_eq!(now[0].model, "gemma");
    // The time is only reported: llama-server's HTTP pool has n_parallel + 4 fixed threads, and
    // a thread that answered on a keep-alive connection waits up to 5 s (cpp-httplib's
    // keep-alive timeout) for that connection's next request. A burst of new connections that
    // finds no thread idle may then be served 5 at a time with ~5 s gaps (2.5 s to 17 s here),
    // with llmvisor as with any keep-alive client.
    eprintln!(
        "20 concurrent cold requests answered in {took:?} (first {:?}, median {:?}, last {:?})",
        times[0], times[10], times[19]
    );
    serve.shutdown().await;
}

#[tokio::test]
async fn unload_stops_the_server_process() {
    let env = llama_env!();
    let s = Scratch::new();
    let serve = Serve::start(&s, &llama::config(&s, &env, &[("gemma", Transport::Tcp)])).await;
    let m = serve.load("gemma").await;
    let pid = server_pid(&m);
    assert_eq!(
        serve.servers().iter().map(|s| s.pid).collect::<Vec<_>>(),
        vec![pid]
    );

    let began = Instant::now();
    let r = serve.post("/api/models/gemma/unload", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let took = began.elapsed();
    let m = r.json();
    assert_eq!(m["state"], "stopped", "{m}");
    assert!(m["pid"].is_null(), "{m}");
    // The answer comes once the process is gone (a zombie counts as gone).
    support::assert_gone(&[pid], Duration::from_millis(500)).await;
    assert!(serve.servers().is_empty());
    eprintln!("unload took {took:?}; last_exit {}", m["last_exit"]);
    assert_eq!(serve.model("gemma").await["state"], "stopped");
    serve.shutdown().await;
}

#[tokio::test]
async fn sigkill_of_the_daemon_leaves_no_llama_server() {
    let env = llama_env!();
    let s = Scratch::new();
    // Orphans are reparented to this process, which reaps them: no zombie outlives the test.
    rustix::process::set_child_subreaper(Some(rustix::process::getpid())).unwrap();
    let mut serve = Serve::start(
        &s,
        &llama::config(
            &s,
            &env,
            &[("ready", Transport::Tcp), ("loading", Transport::Tcp)],
        ),
    )
    .await;
    let ready = server_pid(&serve.load("ready").await);

    // Start the second one and catch it while it loads: its process shows up (with its marker
    // environment, i.e. after exec) long before the ~1.3 s the model takes to load.
    let r = serve.post("/api/models/loading/load?wait=false", "").await;
    assert_eq!(r.status, 202, "{}", r.text());
    let deadline = Instant::now() + Duration::from_secs(20);
    let loading = loop {
        if let Some(srv) = serve.servers().into_iter().find(|s| s.model == "loading") {
            break srv.pid;
        }
        assert!(Instant::now() < deadline, "the second server never started");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    assert_eq!(procfs::comm(loading).as_deref(), Some("llama-server"));
    assert_eq!(
        procfs::stat(loading).unwrap().pgrp,
        loading,
        "each server leads its own process group"
    );

    // Still loading when the daemon dies (the load takes ~1.3 s; this is milliseconds later).
    let m = serve.model("loading").await;
    assert_eq!(m["state"], "starting", "{m}");

    let killed = Instant::now();
    serve.kill9();
    support::assert_gone(&[ready, loading], Duration::from_secs(1)).await;
    let gone_after = killed.elapsed();
    assert!(
        gone_after <= Duration::from_millis(1100),
        "servers outlived the daemon by {gone_after:?}"
    );
    assert!(serve.servers().is_empty(), "{:?}", serve.servers());
    eprintln!("after SIGKILL of llmvisor both servers (one ready, one loading) were gone in {gone_after:?}");
    // They were reparented to this process (the subreaper): reap them.
    llama::reap_children(&[ready, loading], Duration::from_secs(2)).await;
    support::assert_no_zombies(&[ready, loading]);
}

const OPENAI_SCRIPT: &str = r#"
import json, os
from openai import OpenAI

client = OpenAI(base_url=os.environ["E2E_URL"] + "/v1", api_key="x")
model = os.environ["E2E_MODEL"]
messages = [{"role": "user", "content": "Count from one to twenty in words."}]

r = client.chat.completions.create(model=model, messages=messages, max_tokens=8)
plain = {
    "object": r.object,
    "role": r.choices[0].message.role,
    "content": r.choices[0].message.content,
    "finish_reason": r.choices[0].finish_reason,
    "completion_tokens": r.usage.completion_tokens if r.usage else None,
}

chunks = []
for ch in client.chat.completions.create(model=model, messages=messages, max_tokens=8, stream=True):
    c = ch.choices[0] if ch.choices else None
    chunks.append({
        "object": ch.object,
        "content": c.delta.content if c else None,
        "finish_reason": c.finish_reason if c else None,
    })

models = [m.id for m in client.models.list()]
print(json.dumps({"plain": plain, "stream": chunks, "models": models}))
"#;

#[tokio::test]
async fn the_official_openai_python_client_works_unchanged() {
    let env = llama_env!();
    let s = Scratch::new();
    let serve = Serve::start(
        &s,
        &llama::config(
            &s,
            &env,
            &[("gemma", Transport::Tcp), ("gemma-idle", Transport::Tcp)],
        ),
    )
    .await;

    let mut cmd = std::process::Command::new(env.python());
    cmd.args(["-c", OPENAI_SCRIPT])
        .env("E2E_URL", &serve.url)
        .env("E2E_MODEL", "gemma")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost");
    // Nothing from the caller's environment may redirect or configure the client.
    for v in [
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "OPENAI_ORG_ID",
        "OPENAI_PROJECT_ID",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        cmd.env_remove(v);
    }
    let began = Instant::now();
    let (status, out, err) = tokio::task::spawn_blocking(move || {
        llama::run_with_timeout(&mut cmd, Duration::from_secs(90))
    })
    .await
    .unwrap();
    assert!(status.success(), "python exited with {status}:\n{err}");
    let v: Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("script output is not JSON ({e}): {out}\n{err}"));
    eprintln!("openai client run took {:?}", began.elapsed());

    let plain = &v["plain"];
    assert_eq!(plain["object"], "chat.completion", "{v}");
    assert_eq!(plain["role"], "assistant", "{v}");
    assert!(plain["content"].is_string(), "{v}");
    assert!(
        plain["completion_tokens"].as_u64().is_some_and(|n| n <= 8),
        "{v}"
    );

    let chunks = v["stream"].as_array().unwrap();
    assert!(chunks.len() >= 2, "{v}");
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk"),
        "{v}"
    );
    assert!(
        chunks.iter().any(|c| c["finish_reason"].is_string()),
        "the stream ends with a finish_reason: {v}"
    );

    let mut models: Vec<&str> = v["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    models.sort();
    assert_eq!(models, ["gemma", "gemma-idle"], "{v}");
    // Listing models starts nothing.
    assert_eq!(serve.model("gemma-idle").await["state"], "stopped");
    let servers = serve.servers();
    assert_eq!(servers.len(), 1, "{servers:?}");
    assert_eq!(servers[0].model, "gemma");
    assert_eq!(serve.model("gemma").await["restarts"], 0);
    serve.shutdown().await;
}

#[tokio::test]
async fn a_unix_socket_model_serves_without_a_port() {
    let env = llama_env!();
    let s = Scratch::new();
    let serve = Serve::start(
        &s,
        &llama::config(&s, &env, &[("gemma-sock", Transport::Socket)]),
    )
    .await;

    let r = serve
        .post("/v1/chat/completions", &chat_body("gemma-sock", 8, false))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_chat_completion(&r.json(), 8);
    let (_, data) = read_sse(&serve, "gemma-sock", 4).await;
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");

    let all = serve.get("/api/models").await.json();
    let m = all
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "gemma-sock")
        .unwrap_or_else(|| panic!("{all}"))
        .clone();
    assert_eq!(m["state"], "ready", "{m}");
    assert!(m["port"].is_null(), "{m}");
    let url = m["url"].as_str().unwrap_or_else(|| panic!("no url: {m}"));
    let path = url
        .strip_prefix("unix:")
        .unwrap_or_else(|| panic!("url {url} is not unix:"));
    let sockets = s.state_dir().join("sockets");
    assert!(
        std::path::Path::new(path).starts_with(&sockets) && path.ends_with(".sock"),
        "socket {path} is not under {}",
        sockets.display()
    );
    {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        assert!(std::fs::metadata(path).unwrap().file_type().is_socket());
        let mode = std::fs::metadata(&sockets).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{} is {mode:o}", sockets.display());
    }

    let pid = server_pid(&m);
    let servers = serve.servers();
    assert_eq!(servers.iter().map(|s| s.pid).collect::<Vec<_>>(), vec![pid]);
    let args = &servers[0].cmdline;
    assert!(!args.iter().any(|a| a == "--port"), "{args:?}");
    let host = args.iter().position(|a| a == "--host").unwrap();
    assert_eq!(args[host + 1], path, "{args:?}");
    // The server listens on that socket, and on no TCP port at all.
    let mine = llama::socket_inodes(pid);
    let tcp: Vec<_> = llama::tcp_listeners()
        .into_iter()
        .filter(|(_, inode)| mine.contains(inode))
        .collect();
    assert!(tcp.is_empty(), "llama-server listens on TCP: {tcp:?}");
    assert!(
        llama::unix_sockets()
            .iter()
            .any(|(p, inode)| p == path && mine.contains(inode)),
        "llama-server does not hold {path}"
    );
    // Stopped and started again: the socket file the old server may leave behind (llama-server
    // does not unlink it) does not keep the new one from binding.
    let r = serve.post("/api/models/gemma-sock/unload", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    support::assert_gone(&[pid], Duration::from_millis(500)).await;
    eprintln!(
        "socket file after unload: {}",
        if std::path::Path::new(path).exists() {
            "left behind"
        } else {
            "removed"
        }
    );
    let again = server_pid(&serve.load("gemma-sock").await);
    assert_ne!(again, pid);
    let r = serve
        .post("/v1/chat/completions", &chat_body("gemma-sock", 4, false))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_chat_completion(&r.json(), 4);
    let m = serve.model("gemma-sock").await;
    assert_eq!(m["url"], url, "{m}");
    assert!(m["port"].is_null(), "{m}");
    serve.shutdown().await;
}

/// Reads `/api/events` frames from `body` into JSON objects until `done` holds for one.
async fn events_until(
    body: &mut hyper::body::Incoming,
    buf: &mut String,
    seen: &mut Vec<Value>,
    mut done: impl FnMut(&Value) -> bool,
) {
    let read = async {
        loop {
            while let Some(i) = buf.find("\n\n") {
                let block: String = buf.drain(..i + 2).collect();
                let data: String = block
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .collect();
                if let Ok(v) = serde_json::from_str::<Value>(&data) {
                    let stop = done(&v);
                    seen.push(v);
                    if stop {
                        return;
                    }
                }
            }
            let frame = body.frame().await.expect("event stream ended").unwrap();
            if let Some(d) = frame.data_ref() {
                buf.push_str(std::str::from_utf8(d).unwrap());
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(90), read)
        .await
        .expect("events did not come in time");
}

#[tokio::test]
async fn events_progress_requests_and_metrics_match_what_the_client_saw() {
    let env = llama_env!();
    let s = Scratch::new();
    let serve = Serve::start(&s, &llama::config(&s, &env, &[("gemma", Transport::Tcp)])).await;
    let (status, _, mut events) = support::http::send(
        "GET",
        &format!("{}/api/events", serve.url),
        &[("accept", "text/event-stream")],
        "",
    )
    .await;
    assert_eq!(status, 200);
    let (mut buf, mut seen) = (String::new(), Vec::new());
    serve.load("gemma").await;
    events_until(&mut events, &mut buf, &mut seen, |v| {
        v["type"] == "model" && v["status"]["state"] == "ready"
    })
    .await;
    let states: Vec<&str> = seen
        .iter()
        .filter(|v| v["type"] == "model")
        .map(|v| v["status"]["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["stopped", "starting", "ready"], "{seen:?}");
    let progress: Vec<u64> = seen
        .iter()
        .filter(|v| v["type"] == "progress")
        .map(|v| v["percent"].as_u64().unwrap())
        .collect();
    eprintln!("progress while loading: {progress:?}");
    assert!(!progress.is_empty(), "no progress events: {seen:?}");
    assert!(progress.windows(2).all(|w| w[0] < w[1]), "{progress:?}");

    // One plain and one streamed answer; the client's own token counts.
    let r = serve
        .post("/v1/chat/completions", &chat_body("gemma", 8, false))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let plain = r.json()["usage"]["completion_tokens"].as_u64().unwrap();
    let mut body: Value = serde_json::from_str(&chat_body("gemma", 8, true)).unwrap();
    body["stream_options"] = json!({"include_usage": true});
    let r = serve.post("/v1/chat/completions", &body.to_string()).await;
    assert_eq!(r.status, 200);
    let streamed = r
        .text()
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["usage"]["completion_tokens"].as_u64())
        .next_back()
        .expect("usage in the stream");
    seen.clear();
    let mut n = 0;
    events_until(&mut events, &mut buf, &mut seen, |v| {
        if v["type"] == "request" {
            n += 1;
        }
        n == 2
    })
    .await;
    let reqs: Vec<&Value> = seen.iter().filter(|v| v["type"] == "request").collect();
    eprintln!("request events: {reqs:?}");
    for (ev, tokens) in reqs.iter().zip([plain, streamed]) {
        assert_eq!(ev["model"], "gemma");
        assert_eq!(ev["status"], 200);
        assert_eq!(ev["cut"], false);
        assert_eq!(ev["completion_tokens"], tokens, "{ev}");
        assert!(ev["tokens_per_s"].as_f64().unwrap() > 0.0, "{ev}");
    }
    let metrics = serve.get("/metrics").await.text();
    for line in [
        "llmvisor_model_requests_total{model=\"gemma\",status=\"200\"} 2".to_string(),
        format!(
            "llmvisor_model_completion_tokens_total{{model=\"gemma\"}} {}",
            plain + streamed
        ),
    ] {
        assert!(metrics.contains(&line), "missing {line}");
    }
    drop(events);
    serve.shutdown().await;
}
