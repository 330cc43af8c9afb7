//! Issue 10: what a browser, a slow or greedy client, or a reload must not be able to do.

mod support;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use llmvisor::daemon::{self, AppState};
use llmvisor::Supervisor;
use support::http::{request, TestDaemon, CHAT, JSON};
use support::Scratch;

const WITHIN: Duration = Duration::from_secs(5);

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
        &v1,
        &[("content-type", "application/x-www-form-urlencoded")],
        CHAT,
    )
    .await;
    assert_eq!(r.status, 415, "{}", r.text());
    // No type at all (scripts, older clients): accepted; a browser would have sent Origin.
    let r = request("POST", &v1, &[], CHAT).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = request(
        "POST",
        &format!("{}/api/leases", d.url),
        &[("content-type", "application/x-www-form-urlencoded")],
        r#"{"model":"m"}"#,
    )
    .await;
    assert_eq!(r.status, 415, "{}", r.text());
    d.finish(&s, WITHIN).await;
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
    d.finish(&s, WITHIN).await;
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
    // Over the 64 KiB lease-body limit, but small enough to sit in the socket buffers whole: a
    // multi-MiB body raced the daemon's early 413 and the client saw a reset instead.
    let big = format!(r#"{{"model":"m","pad":"{}"}}"#, "x".repeat(80 << 10));
    let r = d.post("/api/leases", &big).await;
    assert_eq!(r.status, 413, "{}", r.text());
    r.error();
    d.finish(&s, WITHIN).await;
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
    d.finish(&s, WITHIN).await;
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

/// `GET /metrics` until `needle` appears (an event the daemon publishes).
async fn wait_metric(d: &TestDaemon, needle: &str) {
    let deadline = std::time::Instant::now() + WITHIN;
    loop {
        let m = d.get("/metrics").await.text();
        if m.contains(needle) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never saw {needle}:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the model's `leases` equals `n`, up to `within`.
async fn wait_leases(d: &TestDaemon, id: &str, n: u64, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    loop {
        let m = d.model(id).await;
        if m["leases"] == n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "leases never became {n}: {m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A raw client connection that sends `head` (and what of the body it is given) and then
/// neither sends nor reads.
async fn raw_client(d: &TestDaemon, request: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let addr: std::net::SocketAddr = d.url.trim_start_matches("http://").parse().unwrap();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut stream = sock.connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_cut_after_send_timeout() {
    let s = Scratch::new();
    let mut cfg = s.config(vec![s.model("m", &[])]);
    cfg.http.send_timeout = Duration::from_secs(1);
    let d = TestDaemon::start(cfg).await;
    let body = r#"{"model":"m","stream":true,"max_tokens":100000000,"messages":[{"role":"user","content":"hi"}]}"#;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let stuck = raw_client(&d, &head).await;
    wait_leases(&d, "m", 1, WITHIN).await;
    // The buffers fill, then nothing moves for send_timeout: the response is cut and the
    // lease ends.
    wait_leases(&d, "m", 0, Duration::from_secs(20)).await;
    drop(stuck);
    d.finish(&s, WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_sockets_have_tcp_keepalive() {
    use std::os::fd::BorrowedFd;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = Scratch::new();
    let d = TestDaemon::start(s.config(vec![])).await;
    let mut c = raw_client(&d, "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await;
    c.flush().await.unwrap();
    let mut buf = [0u8; 256];
    let n = c.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let client_addr = c.local_addr().unwrap();
    let mut found = None;
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(fd) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // SAFETY: read-only socket queries; a descriptor closed meanwhile answers EBADF.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let Ok(Some(peer)) = rustix::net::getpeername(fd) else {
            continue;
        };
        let peer: Result<std::net::SocketAddr, _> = peer.try_into();
        if peer.ok() == Some(client_addr) {
            found = Some(rustix::net::sockopt::socket_keepalive(fd).unwrap());
        }
    }
    assert_eq!(found, Some(true), "the daemon's side of the connection");
    drop(c);
    d.finish(&s, WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_client_connections_are_capped() {
    let s = Scratch::new();
    let mut cfg = s.config(vec![]);
    cfg.http.max_clients = 2;
    let d = TestDaemon::start(cfg).await;
    let idle1 = raw_client(&d, "").await;
    let _idle2 = raw_client(&d, "").await;
    let url = format!("{}/healthz", d.url);
    let third = tokio::spawn(async move { request("GET", &url, &[], "").await });
    // Nothing can be awaited for "not served": give it a generous moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !third.is_finished(),
        "a third connection was served past max_clients = 2"
    );
    drop(idle1);
    let r = tokio::time::timeout(WITHIN, third).await.unwrap().unwrap();
    assert_eq!(r.status, 200);
    d.finish(&s, WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_request_bodies_share_one_budget() {
    let s = Scratch::new();
    let mut cfg = s.config(vec![s.model("m", &[])]);
    cfg.http.body_budget = 1 << 20;
    let d = TestDaemon::start(cfg).await;
    // A body of 900 000 bytes announced, 100 sent: its bytes are reserved.
    let stalled = raw_client(
        &d,
        &format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 900000\r\n\r\n{}",
            "x".repeat(100)
        ),
    )
    .await;
    wait_metric(&d, "llmvisor_http_body_bytes 900000\n").await;
    let big = format!(r#"{{"model":"m","pad":"{}"}}"#, "x".repeat(200_000));
    let r = d.post("/v1/chat/completions", &big).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.error()["code"], "body_budget_exhausted");
    assert!(r.headers.contains_key("retry-after"));
    let r = d.post("/v1/chat/completions", CHAT).await;
    assert_eq!(r.status, 200, "a small body still fits: {}", r.text());
    drop(stalled);
    wait_metric(&d, "llmvisor_http_body_bytes 0\n").await;
    let r = d.post("/v1/chat/completions", &big).await;
    assert_eq!(r.status, 200, "{}", r.text());
    d.finish(&s, WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_leases_are_capped_per_caller() {
    let s = Scratch::new();
    let mut cfg = s.config(vec![s.model("m", &[])]);
    cfg.http.leases_per_caller = 2;
    let d = TestDaemon::start(cfg).await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let r = d.post("/api/leases", r#"{"model":"m"}"#).await;
        assert_eq!(r.status, 200, "{}", r.text());
        ids.push(r.json()["id"].as_str().unwrap().to_owned());
    }
    let r = d.post("/api/leases", r#"{"model":"m"}"#).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.error()["code"], "too_many_leases");
    let r = request(
        "DELETE",
        &format!("{}/api/leases/{}", d.url, ids[0]),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    let r = d.post("/api/leases", r#"{"model":"m"}"#).await;
    assert_eq!(r.status, 200, "{}", r.text());
    d.finish(&s, WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn argv_secrets_are_not_shown_to_non_admin_callers() {
    let s = Scratch::new();
    let mut m = llmvisor::config::ModelConfig::new(
        "m",
        [
            "sh",
            "-c",
            "echo \"starting with $0 $1\"; exit 1",
            "--api-key",
            "SEKRET-123456",
        ]
        .map(String::from)
        .to_vec(),
    );
    m.startup_timeout = Duration::from_secs(10);
    let mut cfg = s.config(vec![m]);
    cfg.api_keys = vec!["sk".into()];
    cfg.admin_keys = vec!["adm".into()];
    let d = TestDaemon::start(cfg).await;
    let r = request(
        "POST",
        &format!("{}/v1/chat/completions", d.url),
        &[JSON, ("authorization", "Bearer sk")],
        CHAT,
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.text());
    let msg = r.error()["message"].as_str().unwrap().to_owned();
    assert!(msg.contains("starting with --api-key"), "{msg}");
    assert!(!msg.contains("SEKRET"), "{msg}");
    // The admin sees the server's output as it was.
    let r = request(
        "POST",
        &format!("{}/api/models/m/load", d.url),
        &[("authorization", "Bearer adm")],
        "",
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("SEKRET-123456"), "{}", r.text());
    d.finish(&s, WITHIN).await;
}
