//! An in-process daemon on 127.0.0.1:0 and a small HTTP client for tests.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use llmvisor::config::Config;
use llmvisor::daemon::{self, AppState};
use llmvisor::Supervisor;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The smallest chat request for model `m`.
pub const CHAT: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
/// The content-type header of a JSON body.
pub const JSON: (&str, &str) = ("content-type", "application/json");

pub struct TestDaemon {
    pub url: String,
    pub state: Arc<AppState>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestDaemon {
    pub async fn start(cfg: Config) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let sup = Supervisor::new(&cfg).await.unwrap();
        let state = AppState::new(sup, cfg);
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(daemon::run(listener, state.clone(), async move {
            let _ = rx.await;
        }));
        Self {
            url,
            state,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// The daemon's shutdown protocol: drain, stop every server.
    pub async fn stop(mut self) {
        let _ = self.shutdown.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap();
    }

    /// Stops the daemon, then fails unless every process `s` started is gone within `within`.
    pub async fn finish(self, s: &super::Scratch, within: std::time::Duration) {
        self.stop().await;
        s.assert_all_gone(within).await;
    }

    pub async fn get(&self, path: &str) -> Resp {
        request("GET", &format!("{}{path}", self.url), &[], "").await
    }

    pub async fn post(&self, path: &str, body: &str) -> Resp {
        request(
            "POST",
            &format!("{}{path}", self.url),
            &[("content-type", "application/json")],
            body.to_owned(),
        )
        .await
    }

    /// `POST /v1/chat/completions` with `body`, returning the head and the unread body (to read
    /// a stream as it arrives).
    pub async fn send_chat(&self, body: &str) -> (u16, http::HeaderMap, Incoming) {
        send(
            "POST",
            &format!("{}/v1/chat/completions", self.url),
            &[("content-type", "application/json")],
            body.to_owned(),
        )
        .await
    }

    /// `GET /api/models/{id}` as JSON.
    pub async fn model(&self, id: &str) -> serde_json::Value {
        let r = self.get(&format!("/api/models/{id}")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// Asserts OpenAI's error shape and returns the error object.
    pub fn error(&self) -> serde_json::Value {
        let v = self.json();
        let e = v
            .get("error")
            .unwrap_or_else(|| panic!("no error object: {v}"))
            .clone();
        assert!(e["message"].is_string(), "{v}");
        assert!(e["type"].is_string(), "{v}");
        assert!(e.get("code").is_some(), "{v}");
        e
    }
}

fn client() -> llmvisor::upstream::UpstreamClient {
    llmvisor::upstream::client()
}

pub async fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Resp {
    let (status, headers, body) = send(method, url, headers, body).await;
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    Resp {
        status,
        headers,
        body,
    }
}

/// Sends a request and returns the response head with its unread body (to read it as a stream).
pub async fn send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> (u16, http::HeaderMap, Incoming) {
    let mut req = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(llmvisor::upstream::body(http_body_util::Full::new(
            body.into(),
        )))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    let (head, body) = resp.into_parts();
    (head.status.as_u16(), head.headers, body)
}
