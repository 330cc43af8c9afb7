//! llama-server's slot routes: `GET /slots` (which slots hold tokens) and
//! `POST /slots/{id}?action=save|restore` with `{"filename": NAME}` (a name inside its
//! `--slot-save-path`). Fields as build 11434 answers them: a slot is `{"id", "n_ctx",
//! "is_processing", "n_prompt_tokens"?}` (the last only once it served a task); a save answers
//! `{"n_saved", "n_written", "timings": {"save_ms"}}`, a restore `{"n_restored", "n_read",
//! "timings": {"restore_ms"}}`, a failure `{"error": {"message"}}` with 400 or 501.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde::Deserialize;

use crate::upstream::{self, Endpoint, UpstreamClient};

/// Bytes of a slot route's answer read at most.
const ANSWER_CAP: usize = 1 << 20;

#[derive(Debug, Clone, Deserialize)]
pub struct Slot {
    pub id: u32,
    #[serde(default)]
    pub is_processing: bool,
    #[serde(default)]
    pub n_prompt_tokens: u64,
}

/// What a save or a restore did, as llama-server tells it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Moved {
    pub tokens: u64,
    pub bytes: u64,
    pub ms: f64,
}

#[derive(Deserialize)]
struct Answer {
    n_saved: Option<u64>,
    n_written: Option<u64>,
    n_restored: Option<u64>,
    n_read: Option<u64>,
    timings: Option<Timings>,
}

#[derive(Deserialize)]
struct Timings {
    save_ms: Option<f64>,
    restore_ms: Option<f64>,
}

async fn call(
    client: &UpstreamClient,
    endpoint: &Endpoint,
    method: http::Method,
    path: &str,
    body: Option<String>,
) -> Result<Bytes, String> {
    let uri = endpoint.uri(path).map_err(|e| e.to_string())?;
    let body = match body {
        Some(b) => upstream::body(Full::new(Bytes::from(b))),
        None => upstream::empty_body(),
    };
    let req = http::Request::builder()
        .method(method)
        .uri(uri)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body)
        .map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = http_body_util::Limited::new(resp.into_body(), ANSWER_CAP)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if !status.is_success() {
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(200).collect());
        return Err(format!("{path} answered {status}: {message}"));
    }
    Ok(body)
}

/// The server's slots.
pub async fn list(client: &UpstreamClient, endpoint: &Endpoint) -> Result<Vec<Slot>, String> {
    let body = call(client, endpoint, http::Method::GET, "/slots", None).await?;
    serde_json::from_slice(&body).map_err(|e| format!("/slots answered something else: {e}"))
}

/// Saves slot `id` to `file` in the server's save dir.
pub async fn save(
    client: &UpstreamClient,
    endpoint: &Endpoint,
    id: u32,
    file: &str,
) -> Result<Moved, String> {
    let a = action(client, endpoint, id, "save", file).await?;
    Ok(Moved {
        tokens: a.n_saved.unwrap_or(0),
        bytes: a.n_written.unwrap_or(0),
        ms: a.timings.and_then(|t| t.save_ms).unwrap_or(0.0),
    })
}

/// Loads `file` from the server's save dir into slot `id`.
pub async fn restore(
    client: &UpstreamClient,
    endpoint: &Endpoint,
    id: u32,
    file: &str,
) -> Result<Moved, String> {
    let a = action(client, endpoint, id, "restore", file).await?;
    Ok(Moved {
        tokens: a.n_restored.unwrap_or(0),
        bytes: a.n_read.unwrap_or(0),
        ms: a.timings.and_then(|t| t.restore_ms).unwrap_or(0.0),
    })
}

async fn action(
    client: &UpstreamClient,
    endpoint: &Endpoint,
    id: u32,
    action: &str,
    file: &str,
) -> Result<Answer, String> {
    let path = format!("/slots/{id}?action={action}");
    let body = serde_json::json!({ "filename": file }).to_string();
    let answer = call(client, endpoint, http::Method::POST, &path, Some(body)).await?;
    serde_json::from_slice(&answer).map_err(|e| format!("{path} answered something else: {e}"))
}
