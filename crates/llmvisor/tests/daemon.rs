//! The daemon's HTTP surface, in process, against the fake server.

mod support;

use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use support::http::{request, TestDaemon, CHAT};
use support::{assert_gone, Scratch};

const WITHIN: Duration = Duration::from_secs(5);

/// Waits until `pred` holds for the model's status JSON.
async fn wait_model(
    d: &TestDaemon,
    id: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + WITHIN;
    loop {
        let m = d.model(id).await;
        if pred(&m) {
            return m;
        }
        assert!(Instant::now() < deadline, "condition never held: {m}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

const CHAT_STREAM: &str =
    r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_chunk_for_chunk() {
    let s = Scratch::new();
    let d = TestDaemon::start(s.config(vec![
        s.model("m", &["--chunks", "10", "--chunk-delay", "200ms"]),
    ]))
    .await;
    // Load first so the timing below is about streaming only.
    assert_eq!(d.post("/api/models/m/load", "").await.status, 200);
    let began = Instant::now();
    let (status, headers, mut body) = d.send_chat(CHAT_STREAM).await;
    assert_eq!(status, 200);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut text = String::new();
    let mut first_chunk_at = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap();
        if let Some(data) = frame.data_ref() {
            if first_chunk_at.is_none() && !data.is_empty() {
                first_chunk_at = Some(began.elapsed());
            }
            text.push_str(std::str::from_utf8(data).unwrap());
        }
    }
    let total = began.elapsed();
    let first = first_chunk_at.unwrap();
    // The last chunk is sent 9 × 200 ms after the first: 1.8 s. Buffering would deliver the
    // first chunk only then.
    assert!(total >= Duration::from_millis(1800), "{total:?}");
    assert!(
        first < Duration::from_millis(900),
        "first chunk after {first:?}"
    );
    let tokens: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|l| *l != "[DONE]")
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    let expected: Vec<String> = (0..10).map(|i| format!("tok{i} ")).collect();
    assert_eq!(tokens, expected);
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    d.finish(&s, WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_requests_for_a_cold_model_spawn_once() {
    let s = Scratch::new();
    let d = TestDaemon::start(s.config(vec![s.model("m", &["--startup-delay", "300ms"])])).await;
    let url = format!("{}/v1/chat/completions", d.url);
    let reqs: Vec<_> = (0..50)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                request("POST", &url, &[("content-type", "application/json")], CHAT).await
            })
        })
        .collect();
    for r in reqs {
        let r = r.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["object"], "chat.completion");
    }
    assert_eq!(s.pids("m.pids").len(), 1);
    assert_eq!(d.model("m").await["leases"], 0);
    d.finish(&s, WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_stream_releases_its_lease_at_once() {
    let s = Scratch::new();
    let d = TestDaemon::start(s.config(vec![
        s.model("m", &["--chunks", "50", "--chunk-delay", "200ms"]),
    ]))
    .await;
    let (status, _, mut body) = d.send_chat(CHAT_STREAM).await;
    assert_eq!(status, 200);
    body.frame().await.unwrap().unwrap();
    assert_eq!(d.model("m").await["leases"], 1, "the stream holds a lease");
    drop(body); // the client goes away after the first chunk
    let gone_at = Instant::now();
    wait_model(&d, "m", |m| m["leases"] == 0).await;
    // 50 chunks × 200 ms = 10 s of stream left: "at once" means long before that.
    assert!(gone_at.elapsed() < Duration::from_secs(2));
    d.finish(&s, WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_row_of_the_spec_then_a_normal_request() {
    let s = Scratch::new();
    let mut slow = s.model("slow", &["--startup-delay", "60s"]);
    slow.startup_timeout = Duration::from_millis(300);
    let mut cfg = s.config(vec![
        s.model("m", &[]),
        s.model("broken", &["--exit-at-startup", "9", "--log-lines", "2"]),
        slow,
        s.model("hang", &["--hang-health-after", "0"]),
    ]);
    cfg.body_limit = 1024;
    // "hang" must pass readiness: give it a health path that still answers.
    cfg.models
        .iter_mut()
        .find(|m| m.id == "hang")
        .unwrap()
        .health_path = "/v1/models".into();
    let d = TestDaemon::start(cfg).await;
    let ct = [("content-type", "application/json")];
    let v1 = format!("{}/v1/chat/completions", d.url);

    // 400: malformed JSON, missing model.
    let r = request("POST", &v1, &ct, "{not json").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.error()["code"], "invalid_json");
    let r = request("POST", &v1, &ct, r#"{"messages":[]}"#).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.error()["code"], "missing_model");

    // 404: unknown model (names the known ones), unknown route.
    let r = request("POST", &v1, &ct, r#"{"model":"nope"}"#).await;
    assert_eq!(r.status, 404);
    let msg = r.error()["message"].as_str().unwrap().to_owned();
    assert!(
        msg.contains("nope") && msg.contains("broken, hang, m, slow"),
        "{msg}"
    );
    let r = d.get("/no/such/route").await;
    assert_eq!(r.status, 404);
    r.error();

    // 405: wrong method on a known route.
    let r = d.get("/v1/chat/completions").await;
    assert_eq!(r.status, 405);
    r.error();

    // 413: body over the limit (declared, and streamed without a length).
    let big = format!(r#"{{"model":"m","pad":"{}"}}"#, "x".repeat(2000));
    let r = request("POST", &v1, &ct, big.clone()).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.error()["code"], "body_too_large");

    // 503: the start failed; the reason and the server's last lines are in the message.
    let r = request("POST", &v1, &ct, r#"{"model":"broken"}"#).await;
    assert_eq!(r.status, 503);
    let msg = r.error()["message"].as_str().unwrap().to_owned();
    assert!(
        msg.contains("exit code 9") && msg.contains("fake-llm log line 2"),
        "{msg}"
    );
    // ...and while it backs off: 503 at once with Retry-After, no new spawn.
    let r = request("POST", &v1, &ct, r#"{"model":"broken"}"#).await;
    assert_eq!(r.status, 503);
    assert!(r.headers.contains_key("retry-after"), "{:?}", r.headers);
    assert_eq!(s.pids("broken.pids").len(), 1);

    // 504: the start timed out.
    let r = request("POST", &v1, &ct, r#"{"model":"slow"}"#).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.error()["code"], "start_timeout");

    // 502: the server dies while the request is in flight.
    let hang_url = format!("{}/upstream/hang/health", d.url);
    let pending = tokio::spawn(async move { request("GET", &hang_url, &[], "").await });
    let pid = wait_model(&d, "hang", |m| m["state"] == "ready").await["pid"]
        .as_u64()
        .unwrap() as u32;
    wait_model(&d, "hang", |m| m["leases"] == 1).await;
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let r = pending.await.unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    r.error();

    // After all that, a normal request is served.
    let r = request("POST", &v1, &ct, CHAT).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["choices"][0]["message"]["role"], "assistant");
    let r = d.get("/healthz").await;
    assert_eq!(r.status, 200);
    d.finish(&s, WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_dying_mid_stream_ends_the_stream_with_an_error_event() {
    let s = Scratch::new();
    let d = TestDaemon::start(s.config(vec![
        s.model("m", &["--chunks", "50", "--chunk-delay", "100ms"]),
    ]))
    .await;
    let (status, _, mut body) = d.send_chat(CHAT_STREAM).await;
    assert_eq!(status, 200);
    body.frame().await.unwrap().unwrap();
    let pid = d.model("m").await["pid"].as_u64().unwrap() as i32;
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let rest = tokio::time::timeout(WITHIN, body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    let rest = String::from_utf8_lossy(&rest);
    let last = rest.lines().rfind(|l| l.starts_with("data: ")).unwrap();
    let event: serde_json::Value =
        serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(event["error"]["code"], "upstream_failed", "{rest}");
    d.finish(&s, WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_lease_keeps_the_model_until_it_expires_then_the_ttl_runs() {
    let s = Scratch::new();
    let mut m = s.model("m", &[]);
    m.ttl = Some(Duration::from_millis(300));
    let d = TestDaemon::start(s.config(vec![m])).await;
    let r = d.post("/api/leases", r#"{"model":"m","ttl_s":0.6}"#).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let lease = r.json();
    let id = lease["id"].as_str().unwrap().to_owned();
    assert_eq!(lease["model"], "m");
    assert!(lease["url"]
        .as_str()
        .unwrap()
        .starts_with("http://127.0.0.1:"));
    assert!(lease["expires_at"].as_f64().unwrap() > 0.0);
    assert_eq!(d.model("m").await["leases"], 1);

    // Renewing keeps it past its first deadline (and past the model's 300 ms TTL).
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let r = d
            .post(&format!("/api/leases/{id}/renew"), r#"{"ttl_s":0.6}"#)
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(d.model("m").await["state"], "ready");
    assert_eq!(d.model("m").await["leases"], 1);

    // Left alone, it expires; only then does the TTL start.
    let expired = wait_model(&d, "m", |m| m["leases"] == 0).await;
    assert_eq!(
        expired["state"], "ready",
        "the TTL must start only after the lease expired"
    );
    let released_at = Instant::now();
    wait_model(&d, "m", |m| m["state"] == "stopped").await;
    assert!(released_at.elapsed() >= Duration::from_millis(250));
    let r = d.post(&format!("/api/leases/{id}/renew"), "").await;
    assert_eq!(r.status, 404);

    // Explicit release.
    let id = d.post("/api/leases", r#"{"model":"m"}"#).await.json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = request("DELETE", &format!("{}/api/leases/{id}", d.url), &[], "").await;
    assert_eq!(r.status, 200);
    assert_eq!(d.model("m").await["leases"], 0);
    let r = d.post("/api/leases", r#"{"model":"m","ttl_s":-1}"#).await;
    assert_eq!(r.status, 400);
    d.finish(&s, WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_and_admin_scope() {
    let s = Scratch::new();
    let mut cfg = s.config(vec![s.model("m", &[])]);
    cfg.api_keys = vec!["sk-user".into()];
    cfg.admin_keys = vec!["sk-admin".into()];
    let d = TestDaemon::start(cfg).await;
    let v1 = format!("{}/v1/chat/completions", d.url);
    let api = format!("{}/api/models", d.url);
    let json = ("content-type", "application/json");
    let r = request("POST", &v1, &[json], CHAT).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.error()["type"], "authentication_error");
    assert_eq!(
        request(
            "POST",
            &v1,
            &[json, ("authorization", "Bearer wrong")],
            CHAT
        )
        .await
        .status,
        401
    );
    assert_eq!(
        request(
            "POST",
            &v1,
            &[json, ("authorization", "Bearer sk-user")],
            CHAT
        )
        .await
        .status,
        200
    );
    assert_eq!(
        request("GET", &format!("{}/v1/models", d.url), &[], "")
            .await
            .status,
        401
    );
    // Admin scope: the user key is not enough.
    assert_eq!(
        request("GET", &api, &[("authorization", "Bearer sk-user")], "")
            .await
            .status,
        401
    );
    assert_eq!(
        request("GET", &api, &[("authorization", "Bearer sk-admin")], "")
            .await
            .status,
        200
    );
    assert_eq!(
        request("GET", &format!("{}/metrics", d.url), &[], "")
            .await
            .status,
        401
    );
    // Open.
    assert_eq!(d.get("/healthz").await.status, 200);
    d.finish(&s, WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_list_status_logs_upstream_and_metrics() {
    let s = Scratch::new();
    let mut a = s.model("alpha", &["--log-lines", "2"]);
    a.aliases = vec!["a".into()];
    let d = TestDaemon::start(s.config(vec![a, s.model("beta", &[])])).await;
    let list = d.get("/v1/models").await.json();
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["alpha", "beta"], "aliases are not listed separately");

    let all = d.get("/api/models").await.json();
    let fields = [
        "id",
        "aliases",
        "state",
        "pid",
        "port",
        "url",
        "leases",
        "restarts",
        "last_exit",
        "ready_ms",
        "error",
    ];
    for f in fields {
        assert!(all[0].get(f).is_some(), "missing field {f}: {all}");
    }
    assert_eq!(all[0]["state"], "stopped");
    assert_eq!(d.get("/api/models/nope").await.status, 404);

    // Load via alias, without waiting.
    let r = d.post("/api/models/a/load?wait=false", "").await;
    assert_eq!(r.status, 202);
    let m = wait_model(&d, "alpha", |m| m["state"] == "ready").await;
    assert!(m["ready_ms"].is_u64() && m["pid"].is_u64() && m["port"].is_u64());

    // Passthrough with query string and method.
    let r = request(
        "PUT",
        &format!("{}/upstream/alpha/echo/x?y=1", d.url),
        &[],
        "hello",
    )
    .await;
    assert_eq!(r.status, 200);
    let echo = r.json();
    assert_eq!(echo["method"], "PUT");
    assert_eq!(echo["path"], "/echo/x");
    assert_eq!(echo["query"], "y=1");
    assert_eq!(echo["body"], "hello");

    // Logs.
    let logs = d.get("/api/models/alpha/logs").await;
    assert!(
        logs.text().contains("fake-llm log line 2"),
        "{}",
        logs.text()
    );

    // Unload.
    let r = d.post("/api/models/alpha/unload", "").await;
    assert_eq!(r.json()["state"], "stopped");

    let metrics = d.get("/metrics").await.text();
    for needle in [
        "llmvisor_model_state{model=\"alpha\",state=\"stopped\"} 1",
        "llmvisor_model_starts_total{model=\"alpha\"} 1",
        "llmvisor_model_start_failures_total{model=\"beta\"} 0",
        "llmvisor_model_start_seconds_count{model=\"alpha\"} 1",
        "llmvisor_http_requests_total{status=\"200\"}",
        "llmvisor_http_in_flight 0",
        "llmvisor_proxy_overhead_seconds_count 1",
    ] {
        assert!(metrics.contains(needle), "missing {needle}:\n{metrics}");
    }
    d.finish(&s, WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_two_ready_models_stops_both() {
    let s = Scratch::new();
    let d = TestDaemon::start(s.config(vec![s.model("a", &[]), s.model("b", &[])])).await;
    assert_eq!(d.post("/api/models/a/load", "").await.status, 200);
    assert_eq!(d.post("/api/models/b/load", "").await.status, 200);
    let pids = s.all_pids();
    assert_eq!(pids.len(), 2);
    d.stop().await;
    assert_gone(&pids, WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_unchanged_restarts_changed_stops_removed_and_rejects_bad_files() {
    let s = Scratch::new();
    let path = s.write_config(&[("a", ""), ("b", ""), ("c", "")], "");
    let cfg = llmvisor::config::load(&path).unwrap();
    let d = TestDaemon::start(cfg).await;
    for m in ["a", "b", "c"] {
        assert_eq!(
            d.post(&format!("/api/models/{m}/load"), "").await.status,
            200
        );
    }
    let pid = |m: serde_json::Value| m["pid"].as_u64().unwrap();
    let (a1, b1, c1) = (
        pid(d.model("a").await),
        pid(d.model("b").await),
        pid(d.model("c").await),
    );
    // b holds a lease across the reload: its restart waits for it.
    let lease = d
        .post("/api/leases", r#"{"model":"b","ttl_s":60}"#)
        .await
        .json();

    s.write_config(&[("a", ""), ("b", "--chunks 3"), ("d", "")], "");
    llmvisor::daemon::reload(&d.state, &path, None, None).await;

    assert_eq!(
        pid(d.model("a").await),
        a1,
        "unchanged model keeps its server"
    );
    assert_eq!(
        d.get("/api/models/c").await.status,
        404,
        "removed model is gone"
    );
    assert_gone(&[c1 as u32], WITHIN).await;
    assert_eq!(
        d.model("d").await["state"],
        "stopped",
        "added model appears"
    );
    let b = d.model("b").await;
    assert_eq!(
        (b["state"].as_str(), b["pid"].as_u64()),
        (Some("stopping"), Some(b1)),
        "changed model drains first"
    );
    let id = lease["id"].as_str().unwrap();
    request("DELETE", &format!("{}/api/leases/{id}", d.url), &[], "").await;
    let b = wait_model(&d, "b", |m| {
        m["state"] == "ready" && m["pid"].as_u64() != Some(b1)
    })
    .await;
    assert_eq!(b["restarts"], 1);
    let r = d.post("/v1/completions", r#"{"model":"b"}"#).await;
    assert_eq!(
        r.json()["choices"][0]["text"],
        "tok0 tok1 tok2 ",
        "new settings in force"
    );

    // A broken file changes nothing.
    std::fs::write(&path, "[models.a]\ncmd = []\nbogus = 1\n").unwrap();
    llmvisor::daemon::reload(&d.state, &path, None, None).await;
    assert_eq!(pid(d.model("a").await), a1);
    assert_eq!(d.get("/api/models/d").await.status, 200);
    assert_eq!(
        d.post("/v1/completions", r#"{"model":"a"}"#).await.status,
        200
    );
    d.finish(&s, WITHIN).await;
}
