//! HTTP endpoints: llama-server look-alikes plus test helpers (`/echo`, `/small`).

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::{any, get, post};
use axum::Router;
use bytes::Bytes;
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::log;
use crate::server::{CrashArm, OnComplete, TrackedBody};

/// Upper bound on tokens per response, whatever `max_tokens` asks for.
const MAX_TOKENS: u64 = 1_000_000;

const LOADING_BODY: &str =
    r#"{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}"#;
const HEALTH_OK_BODY: &str = r#"{"status":"ok"}"#;
const SMALL_BODY: &str = r#"{"ok":true}"#;
const DONE_EVENT: &[u8] = b"data: [DONE]\n\n";

/// Settings and counters shared by all requests.
pub struct AppState {
    pub pid: u32,
    pub start: Instant,
    pub start_unix: u64,
    pub startup_delay: Duration,
    pub hang_health_after: Option<Duration>,
    pub chunks: u64,
    pub chunk_delay: Duration,
    pub model_name: String,
    pub crash_after: Option<u64>,
    /// `--ready-file`: loading until this file exists.
    pub ready_file: Option<std::path::PathBuf>,
    completed: AtomicU64,
    next_id: AtomicU64,
    health_hang_logged: AtomicBool,
}

impl AppState {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        pid: u32,
        start: Instant,
        startup_delay: Duration,
        hang_health_after: Option<Duration>,
        chunks: u64,
        chunk_delay: Duration,
        model_name: String,
        crash_after: Option<u64>,
    ) -> Self {
        AppState {
            pid,
            start,
            start_unix: unix_now().saturating_sub(start.elapsed().as_secs()),
            startup_delay,
            hang_health_after,
            chunks,
            chunk_delay,
            model_name,
            crash_after,
            ready_file: None,
            completed: AtomicU64::new(0),
            next_id: AtomicU64::new(0),
            health_hang_logged: AtomicBool::new(false),
        }
    }

    fn loading(&self) -> bool {
        (!self.startup_delay.is_zero() && self.start.elapsed() < self.startup_delay)
            || self.ready_file.as_ref().is_some_and(|f| !f.exists())
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }
}

impl OnComplete for AppState {
    fn completed(&self, conn: Option<&CrashArm>) {
        let n = self.completed.fetch_add(1, Ordering::AcqRel) + 1;
        if self.crash_after == Some(n) {
            log!("response #{n} sent completely; will crash (--crash-after {n})");
            if let Some(c) = conn {
                c.arm();
            }
            // Backstop in case the connection is never flushed again (the
            // client vanished): crash anyway shortly.
            std::thread::spawn(|| {
                std::thread::sleep(Duration::from_millis(500));
                log!("crashing now (--crash-after, backstop): exit code 3");
                std::process::exit(3);
            });
        }
    }

    fn aborted(&self, what: &'static str) {
        log!("{what}: response abandoned before completion (client disconnected)");
    }
}

pub fn router(state: Arc<AppState>, echo_unknown: bool, refuse_slot_save: bool) -> Router {
    let r = Router::new()
        .route("/small", get(small))
        .route("/page", get(page))
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/echo", any(echo))
        .route("/echo/{*rest}", any(echo));
    let r = if refuse_slot_save {
        r.route("/slots", get(slots_holding_tokens))
            .route("/slots/{id}", post(slot_action_refused))
    } else {
        r
    };
    let r = if echo_unknown {
        r.fallback(echo)
    } else {
        r.fallback(not_found)
    };
    r.method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// `router` adding `headers` (`--response-header`) to every answer.
pub fn with_response_headers(r: Router, headers: Vec<(String, String)>) -> Router {
    if headers.is_empty() {
        return r;
    }
    r.layer(axum::middleware::map_response(move |mut resp: Response| {
        let headers = headers.clone();
        async move {
            for (name, value) in &headers {
                if let (Ok(n), Ok(v)) = (
                    header::HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(value),
                ) {
                    resp.headers_mut().insert(n, v);
                }
            }
            resp
        }
    }))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn json_body(status: StatusCode, body: impl Into<Body>) -> Response {
    let mut resp = Response::new(body.into());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// An OpenAI-shaped error response.
fn error(status: StatusCode, message: &str, kind: &str) -> Response {
    let body = json!({"error": {"code": status.as_u16(), "message": message, "type": kind}});
    json_body(status, body.to_string())
}

fn bad_request(message: &str) -> Response {
    error(StatusCode::BAD_REQUEST, message, "invalid_request_error")
}

fn loading_response() -> Response {
    json_body(StatusCode::SERVICE_UNAVAILABLE, LOADING_BODY)
}

async fn small() -> Response {
    json_body(StatusCode::OK, SMALL_BODY)
}

/// A web page, as llama-server serves its chat UI at `/`.
async fn page() -> Response {
    let mut resp = Response::new(Body::from(
        "<!doctype html><title>fake-llm</title><p>hello</p>",
    ));
    resp.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp
}

/// `GET /slots` as llama-server answers it for one idle slot that served a task.
async fn slots_holding_tokens() -> Response {
    json_body(
        StatusCode::OK,
        r#"[{"id":0,"n_ctx":1024,"is_processing":false,"id_task":1,"n_prompt_tokens":42}]"#,
    )
}

/// `POST /slots/{id}?action=...` as llama-server answers it without slot support.
async fn slot_action_refused() -> Response {
    log!("slot action refused (--refuse-slot-save)");
    json_body(
        StatusCode::NOT_IMPLEMENTED,
        r#"{"error":{"code":501,"message":"This server does not support slots action","type":"not_supported_error"}}"#,
    )
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    if let Some(after) = st.hang_health_after {
        if st.start.elapsed() >= after {
            if !st.health_hang_logged.swap(true, Ordering::Relaxed) {
                log!("/health now hangs (--hang-health-after)");
            }
            std::future::pending::<()>().await;
        }
    }
    if st.loading() {
        loading_response()
    } else {
        json_body(StatusCode::OK, HEALTH_OK_BODY)
    }
}

async fn models(State(st): State<Arc<AppState>>) -> Response {
    if st.loading() {
        return loading_response();
    }
    let body = json!({
        "object": "list",
        "data": [{
            "id": st.model_name,
            "object": "model",
            "created": st.start_unix,
            "owned_by": "llamacpp",
        }],
    });
    json_body(StatusCode::OK, body.to_string())
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "File Not Found", "not_found_error")
}

async fn method_not_allowed() -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "Method Not Allowed",
        "invalid_request_error",
    )
}

/// Reads the request body as a JSON object, or explains (as a 400) why not.
/// The start of every generating endpoint: 503 while loading, else the request's crash arm and
/// its JSON object body (a 400, logged for `endpoint`, when it is not one).
async fn accept_json(
    st: &AppState,
    req: Request,
    endpoint: &str,
) -> Result<(Option<CrashArm>, Map<String, Value>), Response> {
    if st.loading() {
        return Err(loading_response());
    }
    let (parts, body) = req.into_parts();
    let conn = parts.extensions.get::<CrashArm>().cloned();
    match read_json_object(body).await {
        Ok(obj) => Ok((conn, obj)),
        Err(resp) => {
            log!("{endpoint}: 400 bad request");
            Err(resp)
        }
    }
}

async fn read_json_object(body: Body) -> Result<Map<String, Value>, Response> {
    let bytes = to_bytes(body, usize::MAX)
        .await
        .map_err(|e| bad_request(&format!("failed to read request body: {e}")))?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(bad_request("request body must be a JSON object")),
        Err(e) => Err(bad_request(&format!("Failed to parse JSON: {e}"))),
    }
}

/// Rough prompt size: whitespace-separated words in every string of `v`.
fn count_words(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.split_whitespace().count() as u64,
        Value::Array(a) => a.iter().map(count_words).sum(),
        Value::Object(o) => o.values().map(count_words).sum(),
        _ => 0,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

impl Kind {
    fn endpoint(self) -> &'static str {
        match self {
            Kind::Chat => "POST /v1/chat/completions",
            Kind::Text => "POST /v1/completions",
        }
    }
}

async fn chat_completions(State(st): State<Arc<AppState>>, req: Request) -> Response {
    completion(st, req, Kind::Chat).await
}

async fn completions(State(st): State<Arc<AppState>>, req: Request) -> Response {
    completion(st, req, Kind::Text).await
}

/// Everything a streamed or one-shot completion needs to render itself.
struct Gen {
    kind: Kind,
    id: String,
    created: u64,
    st: Arc<AppState>,
}

#[derive(Serialize)]
struct ChatDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

#[derive(Serialize)]
struct ChatChunkChoice<'a> {
    finish_reason: Option<&'static str>,
    index: u32,
    delta: ChatDelta<'a>,
}

#[derive(Serialize)]
struct TextChoice<'a> {
    text: &'a str,
    index: u32,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct ChatMessage<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Serialize)]
struct ChatChoice<'a> {
    finish_reason: &'static str,
    index: u32,
    message: ChatMessage<'a>,
}

#[derive(Serialize)]
struct Usage {
    completion_tokens: u64,
    prompt_tokens: u64,
    total_tokens: u64,
}

#[derive(Serialize)]
struct Envelope<'a, C: Serialize> {
    choices: [C; 1],
    created: u64,
    id: &'a str,
    model: &'a str,
    system_fingerprint: &'static str,
    object: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
    fake_pid: u32,
}

impl Gen {
    fn envelope<C: Serialize>(
        &self,
        choice: C,
        object: &'static str,
        usage: Option<Usage>,
    ) -> Vec<u8> {
        let env = Envelope {
            choices: [choice],
            created: self.created,
            id: &self.id,
            model: &self.st.model_name,
            system_fingerprint: "fake",
            object,
            usage,
            fake_pid: self.st.pid,
        };
        serde_json::to_vec(&env).expect("serializing plain structs cannot fail")
    }

    /// One SSE event: a content chunk (`Some(token)`) or the final stop chunk.
    fn event(&self, token: Option<&str>) -> Bytes {
        let finish_reason = if token.is_some() { None } else { Some("stop") };
        let json = match self.kind {
            Kind::Chat => self.envelope(
                ChatChunkChoice {
                    finish_reason,
                    index: 0,
                    delta: ChatDelta { content: token },
                },
                "chat.completion.chunk",
                None,
            ),
            Kind::Text => self.envelope(
                TextChoice {
                    text: token.unwrap_or(""),
                    index: 0,
                    logprobs: None,
                    finish_reason,
                },
                "text_completion",
                None,
            ),
        };
        let mut out = Vec::with_capacity(json.len() + 8);
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&json);
        out.extend_from_slice(b"\n\n");
        Bytes::from(out)
    }

    fn whole(&self, n: u64, prompt_tokens: u64) -> Vec<u8> {
        let mut text = String::with_capacity(n as usize * 7);
        for i in 0..n {
            let _ = write!(text, "tok{i} ");
        }
        let usage = Some(Usage {
            completion_tokens: n,
            prompt_tokens,
            total_tokens: n + prompt_tokens,
        });
        match self.kind {
            Kind::Chat => self.envelope(
                ChatChoice {
                    finish_reason: "stop",
                    index: 0,
                    message: ChatMessage {
                        role: "assistant",
                        content: &text,
                    },
                },
                "chat.completion",
                usage,
            ),
            Kind::Text => self.envelope(
                TextChoice {
                    text: &text,
                    index: 0,
                    logprobs: None,
                    finish_reason: Some("stop"),
                },
                "text_completion",
                usage,
            ),
        }
    }
}

async fn completion(st: Arc<AppState>, req: Request, kind: Kind) -> Response {
    let (conn, obj) = match accept_json(&st, req, kind.endpoint()).await {
        Ok(accepted) => accepted,
        Err(resp) => return resp,
    };
    let stream = obj.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let n = obj
        .get("max_tokens")
        .or_else(|| obj.get("max_completion_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(st.chunks)
        .min(MAX_TOKENS);
    let prompt_tokens = match kind {
        Kind::Chat => obj.get("messages").and_then(Value::as_array).map(|msgs| {
            msgs.iter()
                .filter_map(|m| m.get("content"))
                .map(count_words)
                .sum()
        }),
        Kind::Text => obj.get("prompt").map(count_words),
    }
    .unwrap_or(0)
    .max(1);
    let prefix = if kind == Kind::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    };
    let gen = Gen {
        kind,
        id: format!("{prefix}-{}-{}", st.pid, st.next_id()),
        created: unix_now(),
        st: st.clone(),
    };
    log!(
        "{}: 200 id={} stream={stream} tokens={n}",
        kind.endpoint(),
        gen.id
    );
    let sink: Arc<dyn OnComplete> = st.clone();
    if !stream {
        let body = Body::from(gen.whole(n, prompt_tokens));
        return json_body(
            StatusCode::OK,
            TrackedBody::wrap(body, kind.endpoint(), conn, sink),
        );
    }

    let delay = st.chunk_delay;
    // Steps 0..n are content chunks, n is the stop chunk, n+1 is [DONE].
    let events = futures_util::stream::unfold((0u64, gen), move |(i, gen)| async move {
        let bytes = if i < n {
            if i > 0 && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            gen.event(Some(&format!("tok{i} ")))
        } else if i == n {
            gen.event(None)
        } else if i == n + 1 {
            Bytes::from_static(DONE_EVENT)
        } else {
            return None;
        };
        Some((Ok::<_, Infallible>(bytes), (i + 1, gen)))
    });
    let body = TrackedBody::wrap(Body::from_stream(events), kind.endpoint(), conn, sink);
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

#[derive(Serialize)]
struct Embedding {
    object: &'static str,
    index: usize,
    embedding: [f64; 4],
}

async fn embeddings(State(st): State<Arc<AppState>>, req: Request) -> Response {
    const ENDPOINT: &str = "POST /v1/embeddings";
    let (conn, obj) = match accept_json(&st, req, ENDPOINT).await {
        Ok(accepted) => accepted,
        Err(resp) => return resp,
    };
    let count = match obj.get("input").or_else(|| obj.get("content")) {
        None | Some(Value::Null) => {
            log!("{ENDPOINT}: 400 no input");
            return bad_request("\"input\" must be provided");
        }
        Some(Value::Array(items)) if items.is_empty() => {
            log!("{ENDPOINT}: 400 empty input");
            return bad_request("\"input\" must not be empty");
        }
        // A single prompt given as token ids.
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => 1,
        Some(Value::Array(items)) => items.len(),
        Some(_) => 1,
    };
    log!("{ENDPOINT}: 200 inputs={count}");
    let data: Vec<Embedding> = (0..count)
        .map(|index| Embedding {
            object: "embedding",
            index,
            embedding: [0.1, 0.2, 0.3, 0.4],
        })
        .collect();
    let body = json!({
        "object": "list",
        "data": data,
        "model": st.model_name,
        "usage": {"prompt_tokens": count, "total_tokens": count},
    });
    let sink: Arc<dyn OnComplete> = st.clone();
    json_body(
        StatusCode::OK,
        TrackedBody::wrap(Body::from(body.to_string()), ENDPOINT, conn, sink),
    )
}

/// Bodies up to this size are echoed back; larger ones only as `body_len`.
const ECHO_BODY_MAX: usize = 16 << 20;

async fn echo(req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let bytes = match to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(e) => return bad_request(&format!("failed to read request body: {e}")),
    };
    let mut headers = Map::new();
    for (name, value) in &parts.headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        match headers.get_mut(name.as_str()) {
            // Repeated headers are joined like HTTP allows: "a, b".
            Some(Value::String(prev)) => {
                prev.push_str(", ");
                prev.push_str(&value);
            }
            _ => {
                headers.insert(name.as_str().to_owned(), Value::String(value.into_owned()));
            }
        }
    }
    let body = json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        // A large upload is only counted (echoing it would double the test's traffic).
        "body": if bytes.len() <= ECHO_BODY_MAX { String::from_utf8_lossy(&bytes).into_owned() } else { String::new() },
        "body_len": bytes.len(),
    });
    json_body(StatusCode::OK, body.to_string())
}
