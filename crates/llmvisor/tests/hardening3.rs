//! Issue 19: one request must not freeze the daemon, no web page may drive it, no key leaves it.
//! (Slow clients and fleet hops have their own files: `slow_clients.rs`, `fleet.rs`.)

mod support;

use std::time::Duration;

use support::http::{request, TestDaemon, CHAT, JSON};
use support::Scratch;

const WITHIN: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multipart_boundary_longer_than_rfc_2046_allows_is_refused() {
    let s = Scratch::new();
    let d = TestDaemon::start(s.config(vec![s.model("m", &["--echo-unknown"])])).await;
    let url = format!("{}/v1/audio/transcriptions", d.url);
    let form = |b: &str| {
        format!("--{b}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm\r\n--{b}--\r\n")
    };
    let long = "b".repeat(71);
    let r = request(
        "POST",
        &url,
        &[(
            "content-type",
            &format!("multipart/form-data; boundary={long}"),
        )],
        form(&long),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.error()["code"], "invalid_boundary");
    assert_eq!(d.model("m").await["state"], "stopped", "nothing started");
    // 70 is the longest allowed.
    let ok = "b".repeat(70);
    let r = request(
        "POST",
        &url,
        &[(
            "content-type",
            &format!("multipart/form-data; boundary={ok}"),
        )],
        form(&ok),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    d.finish(&s, WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_on_other_sites_cannot_drive_a_keyless_daemon() {
    let s = Scratch::new();
    let mut cfg = s.config(vec![s.model("m", &[])]);
    cfg.http.cors_origins = vec!["http://localhost:3000".into()];
    let d = TestDaemon::start(cfg).await;
    let site = |v: &'static str| ("sec-fetch-site", v);

    // `<img src=http://127.0.0.1:PORT/upstream/m/health>` on another site: no Origin header.
    for v in ["cross-site", "same-site"] {
        let r = request(
            "GET",
            &format!("{}/upstream/m/health", d.url),
            &[site(v)],
            "",
        )
        .await;
        assert_eq!(r.status, 403, "{v}: {}", r.text());
        assert_eq!(r.error()["code"], "forbidden_site");
    }
    let r = request(
        "GET",
        &format!("{}/healthz", d.url),
        &[site("cross-site")],
        "",
    )
    .await;
    assert_eq!(r.status, 403, "every route: {}", r.text());
    assert_eq!(d.model("m").await["state"], "stopped", "nothing started");

    // A listed origin's script may call the API from its own site.
    let r = request(
        "POST",
        &format!("{}/v1/chat/completions", d.url),
        &[
            JSON,
            site("cross-site"),
            ("origin", "http://localhost:3000"),
        ],
        CHAT,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(d.model("m").await["state"], "ready");

    // `GET /unload` from a page — even the daemon's own site's other ports — stops nothing.
    let r = request(
        "GET",
        &format!("{}/unload", d.url),
        &[site("same-site")],
        "",
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text());
    let r = request(
        "GET",
        &format!("{}/props?model=m", d.url),
        &[site("cross-site"), ("origin", "http://evil.example")],
        "",
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(d.model("m").await["state"], "ready");

    // The user typing the URL (`none`) and the daemon's own pages (`same-origin`) may.
    let r = request(
        "GET",
        &format!("{}/upstream/m/health", d.url),
        &[site("none")],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = request(
        "GET",
        &format!("{}/unload", d.url),
        &[site("same-origin")],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    d.finish(&s, WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_keys_the_site_rules_guard_only_credentials_a_browser_sends_by_itself() {
    let s = Scratch::new();
    let mut cfg = s.config(vec![s.model("m", &[])]);
    cfg.api_keys = vec!["sk-one".into()];
    let d = TestDaemon::start(cfg).await;
    let url = format!("{}/upstream/m/health", d.url);
    let cross = ("sec-fetch-site", "cross-site");
    // Basic auth a browser remembers would ride along on an `<img>`.
    let r = request(
        "GET",
        &url,
        &[cross, ("authorization", "Basic dXNlcjpzay1vbmU=")],
        "",
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.error()["code"], "forbidden_site");
    // A bearer key is sent only by a script that holds it.
    let r = request(
        "GET",
        &url,
        &[cross, ("authorization", "Bearer sk-one")],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // /healthz and the dashboard hold no secret: any Host name once keys are set.
    for path in ["/healthz", "/ui/"] {
        let r = request(
            "GET",
            &format!("{}{path}", d.url),
            &[("host", "box.lan:8080")],
            "",
        )
        .await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
    d.finish(&s, WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loading_stream_hides_the_commands_secrets_from_api_key_callers() {
    let s = Scratch::new();
    let mut m = s.model(
        "m",
        &["--api-key", "SEKRET-123456", "--startup-delay", "300ms"],
    );
    m.api.send_loading_state = true;
    let mut cfg = s.config(vec![m]);
    cfg.api_keys = vec!["sk".into()];
    cfg.admin_keys = vec!["adm".into()];
    let d = TestDaemon::start(cfg).await;
    let r = request(
        "POST",
        &format!("{}/v1/chat/completions", d.url),
        &[JSON, ("authorization", "Bearer sk")],
        r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    assert!(text.contains("--api-key [redacted]"), "{text}");
    assert!(!text.contains("SEKRET"), "{text}");
    d.finish(&s, WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_key_and_no_llmvisor_header_reach_a_model_server() {
    let s = Scratch::new();
    let plain = s.model("m", &["--echo-unknown"]);
    let keyed = s.model("k", &["--echo-unknown", "--api-key", "server-key-1"]);
    let mut cfg = s.config(vec![plain, keyed]);
    // Only admin keys: /v1 and /upstream need none, and used to pass every header on.
    cfg.admin_keys = vec!["adm-secret".into()];
    let d = TestDaemon::start(cfg).await;
    let sent = [
        JSON,
        ("authorization", "Bearer adm-secret"),
        ("x-api-key", "adm-secret"),
        ("x-llmvisor-cluster-key", "cluster-secret"),
        ("x-llmvisor-hop", "node-a"),
        ("x-kept", "yes"),
    ];
    let seen = |r: support::http::Resp| {
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["headers"].clone()
    };
    for model in ["m", "k"] {
        let body = format!(r#"{{"model":"{model}","x":1}}"#);
        let via_v1 = seen(request("POST", &format!("{}/v1/anything", d.url), &sent, body).await);
        let via_upstream = seen(
            request(
                "POST",
                &format!("{}/upstream/{model}/anything", d.url),
                &sent,
                "{}",
            )
            .await,
        );
        for h in [via_v1, via_upstream] {
            assert_eq!(h["x-kept"], "yes", "{h}");
            assert!(h.get("x-api-key").is_none(), "{h}");
            assert!(h.get("x-llmvisor-cluster-key").is_none(), "{h}");
            assert!(h.get("x-llmvisor-hop").is_none(), "{h}");
            // The server's own key, given by its command line, is what it gets.
            let expected = (model == "k").then_some("Bearer server-key-1");
            assert_eq!(h["authorization"].as_str(), expected, "{model}: {h}");
        }
    }
    d.finish(&s, WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_servers_pages_run_sandboxed_not_as_the_dashboards_origin() {
    let s = Scratch::new();
    let d = TestDaemon::start(s.config(vec![s.model("m", &[])])).await;
    let r = d.get("/upstream/m/page").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let csp = r.headers["content-security-policy"].to_str().unwrap();
    assert!(csp.starts_with("sandbox"), "{csp}");
    assert!(!csp.contains("allow-same-origin"), "{csp}");
    assert_eq!(r.headers["x-content-type-options"], "nosniff");
    // JSON answers are left alone.
    let r = d.get("/upstream/m/small").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.headers.get("content-security-policy").is_none());
    d.finish(&s, WITHIN).await;
}

/// A server that drops a kept-alive connection just as it is reused (`--close-reused` closes
/// each connection unanswered when its second request arrives): every request still gets its
/// answer, the reused ones after one retry on a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_on_a_connection_closed_under_it_is_sent_again_once() {
    let s = Scratch::new();
    let d = TestDaemon::start(s.config(vec![s.model("m", &["--close-reused"])])).await;
    for i in 0..6 {
        let r = d.post("/v1/chat/completions", CHAT).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        let r = d.get("/upstream/m/small").await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
    }
    let metrics = d.get("/metrics").await.text();
    let retries: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("llmvisor_upstream_retries_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no retry counter: {metrics}"));
    assert!(retries >= 1, "the pool reused no connection? {metrics}");
    d.finish(&s, WITHIN).await;
}
