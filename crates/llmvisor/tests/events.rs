//! `GET /api/events`, request activity and their metrics, in process against the fake server.

mod support;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::Value;
use support::http::{send, TestDaemon};
use support::Scratch;

/// The tests of this file run one at a time: one of them measures the process's RSS, which the
/// others (200 subscribers, daemons, fake servers) would inflate if they ran beside it.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const WITHIN: Duration = Duration::from_secs(10);

/// One subscriber of `/api/events`, parsing frames as they come.
struct Events {
    body: Incoming,
    buf: String,
}

#[derive(Debug, Clone)]
struct Ev {
    id: Option<u64>,
    v: Value,
}

impl Events {
    async fn open(d: &TestDaemon, last_id: Option<u64>) -> Events {
        let id = last_id.map(|i| i.to_string());
        let mut headers = vec![("accept", "text/event-stream")];
        if let Some(i) = &id {
            headers.push(("last-event-id", i.as_str()));
        }
        let (status, head, body) =
            send("GET", &format!("{}/api/events", d.url), &headers, "").await;
        assert_eq!(status, 200);
        assert_eq!(head["content-type"], "text/event-stream");
        Events {
            body,
            buf: String::new(),
        }
    }

    async fn next(&mut self) -> Ev {
        tokio::time::timeout(WITHIN, self.next_inner())
            .await
            .expect("no event in time")
    }

    async fn next_inner(&mut self) -> Ev {
        loop {
            if let Some(i) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..i + 2).collect();
                let mut id = None;
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.parse().unwrap());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push_str(v);
                    }
                }
                if data.is_empty() {
                    continue; // keep-alive comment
                }
                return Ev {
                    id,
                    v: serde_json::from_str(&data).unwrap(),
                };
            }
            let frame = self.body.frame().await.expect("stream ended").unwrap();
            if let Some(d) = frame.data_ref() {
                self.buf.push_str(std::str::from_utf8(d).unwrap());
            }
        }
    }

    /// The snapshot: the daemon's facts, then one `model` event per model.
    async fn snapshot(&mut self, models: usize) -> Vec<Ev> {
        let first = self.next().await;
        assert_eq!(first.v["type"], "daemon", "{:?}", first.v);
        let mut out = vec![first];
        for _ in 0..models {
            let e = self.next().await;
            assert_eq!(e.v["type"], "model", "{:?}", e.v);
            out.push(e);
        }
        out
    }

    /// The next `model` events until `pred` holds for one, as `model:state` strings.
    async fn model_states_until(&mut self, pred: impl Fn(&Value) -> bool) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let e = self.next().await;
            if e.v["type"] != "model" {
                continue;
            }
            seen.push(format!(
                "{}:{}",
                e.v["model"].as_str().unwrap(),
                e.v["status"]["state"].as_str().unwrap()
            ));
            if pred(&e.v) {
                return seen;
            }
        }
    }
}

fn is(model: &str, state: &str) -> impl Fn(&Value) -> bool {
    let (m, s) = (model.to_owned(), state.to_owned());
    move |v| v["model"] == m.as_str() && v["status"]["state"] == s.as_str()
}

const CHAT: &str = r#"{"model":"a","messages":[{"role":"user","content":"hi"}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_events_for_load_eviction_and_crash_restart_come_in_order() {
    let _serial = SERIAL.lock().await;
    let s = Scratch::new();
    let mut cfg = s.config(vec![
        s.model("a", &["--crash-after", "1"]),
        s.model("b", &[]),
    ]);
    cfg.max_loaded = Some(1);
    let d = TestDaemon::start(cfg).await;
    let mut ev = Events::open(&d, None).await;
    let snap = ev.snapshot(2).await;
    let head = snap[0].id.unwrap();
    assert!(snap.iter().all(|e| e.id == Some(head)), "snapshot ids");
    assert_eq!(snap[1].v["status"]["state"], "stopped");

    // A load.
    assert_eq!(d.post("/api/models/a/load", "").await.status, 200);
    let load = ev.model_states_until(is("a", "ready")).await;
    assert_eq!(load, ["a:starting", "a:ready"]);

    // An eviction: b needs a's room (max_loaded = 1).
    assert_eq!(d.post("/api/models/b/load", "").await.status, 200);
    let evict = ev.model_states_until(is("b", "ready")).await;
    assert_eq!(
        evict,
        ["b:starting", "a:stopping", "a:stopped", "b:ready"],
        "{evict:?}"
    );

    // A crash (a crashes after one answer), then the restart the next request asks for.
    assert_eq!(d.post("/api/models/b/unload", "").await.status, 200);
    let unload = ev.model_states_until(is("b", "stopped")).await;
    assert_eq!(unload, ["b:stopping", "b:stopped"]);
    assert_eq!(d.post("/v1/chat/completions", CHAT).await.status, 200);
    let crash = ev.model_states_until(is("a", "stopped")).await;
    assert_eq!(crash, ["a:starting", "a:ready", "a:stopped"], "{crash:?}");
    assert_eq!(d.post("/v1/chat/completions", CHAT).await.status, 200);
    let restart = ev.model_states_until(is("a", "ready")).await;
    assert_eq!(restart, ["a:starting", "a:ready"]);
    // Each change says why, where it can tell.
    let reasons = d.state.events.recent("model", 64);
    let why: Vec<String> = reasons
        .iter()
        .map(|e| serde_json::from_str::<Value>(&e.json).unwrap())
        .filter(|v| !v["reason"].is_null())
        .map(|v| {
            format!(
                "{}:{}",
                v["model"].as_str().unwrap(),
                v["reason"].as_str().unwrap()
            )
        })
        .collect();
    // (a crashes after every answer: the restarted one may already have crashed again.)
    assert!(
        why.starts_with(&[
            "a:evicted".to_string(),
            "a:crashed".into(),
            "a:restart".into()
        ]) && why[3..].iter().all(|w| w == "a:crashed"),
        "{why:?}"
    );
    d.stop().await;
    s.assert_all_gone(WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_increase_and_last_event_id_resumes_or_falls_back_to_a_snapshot() {
    let _serial = SERIAL.lock().await;
    let s = Scratch::new();
    let d = TestDaemon::start(s.config(vec![s.model("a", &[])])).await;
    let bus = d.state.events.clone();
    let mut ev = Events::open(&d, None).await;
    ev.snapshot(1).await;
    let first = bus.publish("test", serde_json::json!({"n": 1}));
    bus.publish("test", serde_json::json!({"n": 2}));
    let e1 = ev.next().await;
    let e2 = ev.next().await;
    assert_eq!((e1.id, e2.id), (Some(first), Some(first + 1)));
    assert_eq!(e1.v["id"], first);
    drop(ev);
    bus.publish("test", serde_json::json!({"n": 3}));
    bus.publish("test", serde_json::json!({"n": 4}));
    // Resumed: exactly what it missed, no snapshot.
    let mut ev = Events::open(&d, Some(first + 1)).await;
    let got: Vec<_> = [ev.next().await, ev.next().await]
        .iter()
        .map(|e| e.v["n"].as_u64().unwrap())
        .collect();
    assert_eq!(got, [3, 4]);
    drop(ev);
    // No longer buffered: a fresh snapshot.
    for n in 0..(llmvisor::events::REPLAY_EVENTS + 10) {
        bus.publish("test", serde_json::json!({"n": n}));
    }
    let mut ev = Events::open(&d, Some(first)).await;
    ev.snapshot(1).await;
    drop(ev);
    d.stop().await;
    s.assert_all_gone(WITHIN).await;
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_never_reads_is_bounded_and_delays_no_one() {
    let _serial = SERIAL.lock().await;
    let s = Scratch::new();
    let d = TestDaemon::start(s.config(vec![s.model("a", &[])])).await;
    let bus = d.state.events.clone();
    // A raw connection that asks for the stream and never reads it.
    let addr = d.url.trim_start_matches("http://").to_owned();
    let mut stuck = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        stuck,
        "GET /api/events HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    let mut reader = Events::open(&d, None).await;
    reader.snapshot(1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss_bytes();
    // 20 000 events of 2 KiB: 40 MiB through the bus.
    let pad = "x".repeat(2048);
    let began = Instant::now();
    let mut worst = Duration::ZERO;
    for n in 0..20_000u64 {
        let id = bus.publish("test", serde_json::json!({"n": n, "pad": pad}));
        if n % 100 == 0 {
            // The reader keeps up: every event reaches it promptly despite the stuck one.
            let sent = Instant::now();
            loop {
                let e = reader.next().await;
                if e.id == Some(id) {
                    break;
                }
            }
            worst = worst.max(sent.elapsed());
        }
    }
    let took = began.elapsed();
    let grown = rss_bytes().saturating_sub(before);
    eprintln!(
        "20000 events with a stuck subscriber: {took:?}, worst delay to a reader {worst:?}, rss grew {} KiB",
        grown / 1024
    );
    assert!(worst < Duration::from_secs(1), "reader delayed {worst:?}");
    assert!(
        grown < 24 * 1024 * 1024,
        "memory grew by {grown} bytes for 40 MiB of events"
    );
    // When it finally reads, it is told it lagged and gets a fresh snapshot.
    stuck
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    let deadline = Instant::now() + WITHIN;
    while Instant::now() < deadline {
        bus.publish("test", serde_json::json!({"after": true}));
        let n = stuck.read(&mut chunk).unwrap();
        got.extend_from_slice(&chunk[..n]);
        if String::from_utf8_lossy(&got).contains("\"type\":\"daemon\"")
            && String::from_utf8_lossy(&got).contains("\"type\":\"lagged\"")
        {
            break;
        }
    }
    let text = String::from_utf8_lossy(&got);
    let lagged = text.find("\"type\":\"lagged\"").expect("told it lagged");
    assert!(
        text[lagged..].contains("\"type\":\"daemon\""),
        "snapshot after the lag"
    );
    drop(stuck);
    drop(reader);
    d.stop().await;
    s.assert_all_gone(WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_subscribers_all_get_every_event() {
    let _serial = SERIAL.lock().await;
    let s = Scratch::new();
    let d = TestDaemon::start(s.config(vec![s.model("a", &[])])).await;
    let mut readers = Vec::new();
    for _ in 0..200 {
        let mut r = Events::open(&d, None).await;
        r.snapshot(1).await;
        readers.push(r);
    }
    let began = Instant::now();
    assert_eq!(d.post("/api/models/a/load", "").await.status, 200);
    let tasks: Vec<_> = readers
        .into_iter()
        .map(|mut r| tokio::spawn(async move { r.model_states_until(is("a", "ready")).await }))
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), ["a:starting", "a:ready"]);
    }
    eprintln!("200 subscribers saw the load within {:?}", began.elapsed());
    d.stop().await;
    s.assert_all_gone(WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_events_and_activity_match_what_the_client_saw() {
    let _serial = SERIAL.lock().await;
    let s = Scratch::new();
    let d = TestDaemon::start(s.config(vec![s.model("a", &["--chunks", "6"])])).await;
    assert_eq!(d.post("/api/models/a/load", "").await.status, 200);
    let mut ev = Events::open(&d, None).await;
    ev.snapshot(1).await;
    let r = d.post("/v1/chat/completions", CHAT).await;
    assert_eq!(r.status, 200);
    let usage = r.json()["usage"].clone();
    let stream = r#"{"model":"a","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let r2 = d.post("/v1/chat/completions", stream).await;
    assert_eq!(r2.status, 200);
    let r3 = d.post("/v1/chat/completions", r#"{"model":"nope"}"#).await;
    assert_eq!(r3.status, 404);
    let mut reqs = Vec::new();
    while reqs.len() < 2 {
        let e = ev.next().await;
        if e.v["type"] == "request" {
            reqs.push(e.v);
        }
    }
    let (a, b) = (&reqs[0], &reqs[1]);
    assert_eq!(a["model"], "a");
    assert_eq!(a["route"], "/v1/chat/completions");
    assert_eq!(a["status"], 200);
    assert_eq!(a["cut"], false);
    assert_eq!(a["prompt_tokens"], usage["prompt_tokens"]);
    assert_eq!(a["completion_tokens"], usage["completion_tokens"]);
    assert!(a["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(a["ttfb_ms"].as_f64().unwrap() <= a["duration_ms"].as_f64().unwrap());
    assert_eq!(b["status"], 200);
    assert_eq!(b["cut"], false);
    // A new subscriber's snapshot ends with the recent requests.
    let mut late = Events::open(&d, None).await;
    let snap = late.snapshot(1).await;
    let head = snap[0].id;
    for want in [a, b] {
        let e = late.next().await;
        assert_eq!(e.id, head, "numbered as the snapshot");
        assert_eq!(e.v["id"], want["id"]);
    }
    drop(late);
    let act = d.get("/api/activity").await.json();
    assert_eq!(act[0]["model"], "a");
    assert_eq!(act[0]["requests"], 2);
    assert_eq!(act[0]["requests_per_min"], 2);
    assert_eq!(act[0]["completion_tokens"], usage["completion_tokens"]);
    let metrics = d.get("/metrics").await.text();
    for line in [
        "llmvisor_model_requests_total{model=\"a\",status=\"200\"} 2",
        &format!(
            "llmvisor_model_completion_tokens_total{{model=\"a\"}} {}",
            usage["completion_tokens"]
        ),
        "llmvisor_model_ttfb_seconds_count{model=\"a\"} 2",
        "llmvisor_model_request_duration_seconds_count{model=\"a\"} 2",
    ] {
        assert!(metrics.contains(line), "missing {line}:\n{metrics}");
    }
    drop(ev);
    d.stop().await;
    s.assert_all_gone(WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_once_prints_every_model_and_recent_requests() {
    let _serial = SERIAL.lock().await;
    let s = Scratch::new();
    let d = TestDaemon::start(s.config(vec![s.model("a", &[]), s.model("b", &[])])).await;
    assert_eq!(d.post("/api/models/a/load", "").await.status, 200);
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_llmvisor"))
        .args(["top", "--once", "--url", &d.url])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(WITHIN, out).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.starts_with("llmvisor "), "{text}");
    let a = text
        .lines()
        .find(|l| l.starts_with("a "))
        .expect("a listed");
    assert!(a.contains("ready"), "{a}");
    let b = text
        .lines()
        .find(|l| l.starts_with("b "))
        .expect("b listed");
    assert!(b.contains("stopped"), "{b}");
    d.stop().await;
    s.assert_all_gone(WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_opt_in_per_model_and_events_need_the_admin_key() {
    let _serial = SERIAL.lock().await;
    let s = Scratch::new();
    let mut cfg = s.config(vec![s.model("a", &["--log-lines", "3"])]);
    cfg.admin_keys = vec!["adm".into()];
    let d = TestDaemon::start(cfg).await;
    let url = format!("{}/api/events", d.url);
    let (status, _, _) = send("GET", &url, &[], "").await;
    assert_eq!(status, 401, "events need the admin key");
    let (status, head, _) = send("GET", &format!("{}/ui/", d.url), &[], "").await;
    assert_eq!(status, 200, "the page itself is open");
    assert!(head["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let auth = [("authorization", "Bearer adm")];
    let (status, _, _) = send("GET", &format!("{url}?logs=nope"), &auth, "").await;
    assert_eq!(status, 404, "unknown model");
    let r =
        support::http::request("POST", &format!("{}/api/models/a/load", d.url), &auth, "").await;
    assert_eq!(r.status, 200);
    let (status, _, body) = send("GET", &format!("{url}?logs=a"), &auth, "").await;
    assert_eq!(status, 200);
    let mut ev = Events {
        body,
        buf: String::new(),
    };
    let mut lines = Vec::new();
    while lines.len() < 3 {
        let e = ev.next().await;
        if e.v["type"] == "log" {
            assert_eq!(e.v["model"], "a");
            assert_eq!(e.id, None, "log events carry no id");
            let line = e.v["line"].as_str().unwrap().to_owned();
            if line.starts_with("fake-llm log line") {
                lines.push(line);
            }
        }
    }
    assert_eq!(
        lines,
        [
            "fake-llm log line 1",
            "fake-llm log line 2",
            "fake-llm log line 3"
        ]
    );
    drop(ev);
    d.stop().await;
    s.assert_all_gone(WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_waiting_for_room_gives_queue_events() {
    let _serial = SERIAL.lock().await;
    let s = Scratch::new();
    let mut cfg = s.config(vec![s.model("a", &[]), s.model("b", &[])]);
    cfg.max_loaded = Some(1);
    let d = TestDaemon::start(cfg).await;
    // a is held: b's start must wait for its room.
    let lease = d.post("/api/leases", r#"{"model":"a"}"#).await;
    assert_eq!(lease.status, 200, "{}", lease.text());
    let lease_id = lease.json()["id"].as_str().unwrap().to_owned();
    let mut ev = Events::open(&d, None).await;
    ev.snapshot(2).await;
    let url = d.url.clone();
    let waiting = tokio::spawn(async move {
        support::http::request(
            "POST",
            &format!("{url}/v1/chat/completions"),
            &[("content-type", "application/json")],
            r#"{"model":"b","messages":[{"role":"user","content":"hi"}]}"#,
        )
        .await
        .status
    });
    let queued = loop {
        let e = ev.next().await;
        if e.v["type"] == "queue" && e.v["model"] == "b" {
            break e.v;
        }
    };
    assert!(queued["queued"].as_u64().unwrap() >= 1, "{queued}");
    assert!(
        queued["wait_reason"].as_str().unwrap().contains('a'),
        "{queued}"
    );
    let r = support::http::request(
        "DELETE",
        &format!("{}/api/leases/{lease_id}", d.url),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(waiting.await.unwrap(), 200);
    let cleared = loop {
        let e = ev.next().await;
        if e.v["type"] == "queue" && e.v["model"] == "b" {
            break e.v;
        }
    };
    assert_eq!(cleared["queued"], 0, "{cleared}");
    drop(ev);
    d.stop().await;
    s.assert_all_gone(WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_refused_before_reaching_a_server_is_an_event_too() {
    let _serial = SERIAL.lock().await;
    let s = Scratch::new();
    let mut m = s.model("a", &["--chunks", "3", "--chunk-delay", "200ms"]);
    m.aliases = vec!["alias-a".into()];
    m.api.concurrency_limit = Some(1);
    let d = TestDaemon::start(s.config(vec![m])).await;
    assert_eq!(d.post("/api/models/a/load", "").await.status, 200);
    let mut ev = Events::open(&d, None).await;
    ev.snapshot(1).await;
    // One streamed answer holds the only slot; the next request (by alias) is refused.
    let stream = r#"{"model":"a","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let (status, _, body) = d.send_chat(stream).await;
    assert_eq!(status, 200);
    let over = r#"{"model":"alias-a","messages":[{"role":"user","content":"hi"}]}"#;
    assert_eq!(d.post("/v1/chat/completions", over).await.status, 429);
    // A made-up model name is refused without an event (nor an activity entry).
    let r = d.post("/v1/chat/completions", r#"{"model":"nope"}"#).await;
    assert_eq!(r.status, 404);
    body.collect().await.unwrap();
    let mut statuses = Vec::new();
    while statuses.len() < 2 {
        let e = ev.next().await;
        if e.v["type"] == "request" {
            assert_eq!(e.v["model"], "a", "{}", e.v);
            statuses.push(e.v["status"].as_u64().unwrap());
        }
    }
    assert_eq!(statuses, [429, 200], "the refusal is told at once");
    let act = d.get("/api/activity").await.json();
    assert_eq!(act.as_array().unwrap().len(), 1, "{act}");
    let metrics = d.get("/metrics").await.text();
    assert!(
        metrics.contains("llmvisor_model_requests_total{model=\"a\",status=\"429\"} 1"),
        "{metrics}"
    );
    drop(ev);
    d.stop().await;
    s.assert_all_gone(WITHIN).await;
}
