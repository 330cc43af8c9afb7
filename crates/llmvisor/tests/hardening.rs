//! Issue 10: what a browser, a slow or greedy client, or a reload must not be able to do.

mod support;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use llmvisor::daemon::{self, AppState};
use llmvisor::Supervisor;
use support::http::{request, TestDaemon};
use support::Scratch;

const WITHIN: Duration = Duration::from_secs(5);
const CHAT: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
const JSON: (&str, &str) = ("content-type", "application/json");

async fn finish(d: TestDaemon, s: &Scratch) {
    d.stop().await;
    s.assert_all_gone(WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_rules_host_origin_content_type() {
    let s = Scratch::new();
    let mut cfg = s.config(vec![s.model("m", &[])]);
    cfg.http.cors_origins = vec!["http://localhost:3000".into()];
    let d = TestDaemon::start(cfg).await;
    let v1 = format!("{}/v1/chat/completions", d.url);

    // DNS rebinding: a name that is not loopback, without keys.
    let r = request("POST", &v1, &[JSON, ("host", "evil.example:8080")], CHAT).await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.error()["code"], "forbidden_host");
    let r = request(
        "GET",
        &format!("{}/api/models", d.url),
        &[("host", "rebind.test")],
        "",
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text());
    let r = request(
        "GET",
        &format!("{}/api/models", d.url),
        &[("host", "localhost:1")],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());

    // CSRF: a foreign Origin, even on a body-less POST.
    let r = request(
        "POST",
        &format!("{}/api/models/m/load", d.url),
        &[("origin", "http://evil.example")],
        "",
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.error()["code"], "forbidden_origin");
    assert_eq!(d.model("m").await["state"], "stopped");

    // A listed origin passes and gets CORS headers; a preflight is answered.
    let r = request(
        "POST",
        &v1,
        &[JSON, ("origin", "http://localhost:3000")],
        CHAT,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.headers["access-control-allow-origin"],
        "http://localhost:3000"
    );
    let r = request(
        "OPTIONS",
        &v1,
        &[
            ("origin", "http://localhost:3000"),
            ("access-control-request-method", "POST"),
        ],
        "",
    )
    .await;
    assert_eq!(r.status, 204);
    assert!(r.headers.contains_key("access-control-allow-methods"));

    // A "simple" cross-site request: text/plain body.
    let r = request("POST", &v1, &[("content-type", "text/plain")], CHAT).await;
    assert_eq!(r.status, 415, "{}", r.text());
    assert_eq!(r.error()["code"], "unsupported_media_type");
    let r = request(
        "POST",
        &format!("{}/api/leases", d.url),
        &[("content-type", "application/x-www-form-urlencoded")],
        r#"{"model":"m"}"#,
    )
    .await;
    assert_eq!(r.status, 415, "{}", r.text());
    finish(d, &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_forwards_the_raw_path_tail_and_query() {
    let s = Scratch::new();
    let d = TestDaemon::start(s.config(vec![s.model("m", &[])])).await;
    let r = request(
        "GET",
        &format!("{}/upstream/m/echo/a%3Fb%23c%252Fd?x=%26y", d.url),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let echo = r.json();
    assert_eq!(echo["path"], "/echo/a%3Fb%23c%252Fd");
    assert_eq!(echo["query"], "x=%26y");
    finish(d, &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extractor_rejections_are_openai_errors() {
    let s = Scratch::new();
    let d = TestDaemon::start(s.config(vec![s.model("m", &[])])).await;
    // Not UTF-8 once decoded.
    let r = d.get("/api/models/%FF").await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.error()["code"], "invalid_path");
    let r = d.post("/api/models/m/load?wait=maybe", "").await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.error()["code"], "invalid_query");
    let big = format!(r#"{{"model":"m","pad":"{}"}}"#, "x".repeat(3 << 20));
    let r = d.post("/api/leases", &big).await;
    assert_eq!(r.status, 413, "{}", r.text());
    r.error();
    finish(d, &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renew_without_a_body_extends_by_the_leases_own_ttl() {
    let s = Scratch::new();
    let d = TestDaemon::start(s.config(vec![s.model("m", &[])])).await;
    let r = d.post("/api/leases", r#"{"model":"m","ttl_s":600}"#).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let r = request("POST", &format!("{}/api/leases/{id}/renew", d.url), &[], "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let left = r.json()["expires_at"].as_f64().unwrap() - now;
    assert!(
        left > 590.0,
        "renewed for {left} s instead of the lease's 600 s"
    );
    finish(d, &s).await;
}

/// A daemon on `0.0.0.0` with keys: a reload whose file drops the keys and names a loopback
/// `listen` must not leave the bound wildcard listener open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_cannot_open_a_non_loopback_listener() {
    let s = Scratch::new();
    let with_keys = s.write_config(&[("m", "")], "");
    let text = std::fs::read_to_string(&with_keys).unwrap();
    std::fs::write(&with_keys, format!("api_keys = [\"sk-1\"]\n{text}")).unwrap();
    let cfg = llmvisor::config::load(&with_keys).unwrap();
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let sup = Supervisor::new(&cfg).await.unwrap();
    let state: Arc<AppState> = AppState::new(sup, cfg);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(daemon::run(listener, state.clone(), async move {
        let _ = rx.await;
    }));
    // The new file: loopback listen, no keys (valid on its own).
    std::fs::write(&with_keys, format!("listen = \"127.0.0.1:{port}\"\n{text}")).unwrap();
    daemon::reload(&state, &with_keys, None, None).await;
    assert_eq!(state.config().api_keys, vec!["sk-1".to_string()]);
    let r = request(
        "GET",
        &format!("http://127.0.0.1:{port}/api/models"),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.text());
    let _ = tx.send(());
    task.await.unwrap();
    s.assert_all_gone(WITHIN).await;
}
