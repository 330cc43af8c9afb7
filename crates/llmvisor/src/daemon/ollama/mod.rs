//! Ollama's API (`/api/tags`, `/api/ps`, `/api/show`, `/api/version`, `/api/chat`,
//! `/api/generate`, `/api/embed`, `/api/embeddings`), translated to llama-server's
//! OpenAI-compatible routes and back, so that Ollama's clients (Open WebUI, Continue, the
//! `ollama` Python package) work unchanged. Guarded by `api_keys` like `/v1/*`
//! (`auth::scope_of`). The store's own routes (`pull`, `push`, `create`, `copy`, `delete`)
//! answer an error saying where files go instead. Errors are Ollama's `{"error": "..."}`.

mod convert;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use bytes::Bytes;
use http::StatusCode;
use http_body_util::BodyExt;
use serde_json::{json, Value};

use super::error::ApiError;
use super::state::AppState;
use crate::config::ModelConfig;
use crate::supervisor::Phase;
use convert::{Kind, Reply, Target};

type St = State<Arc<AppState>>;

/// The Ollama version reported: one whose API the routes here follow.
const VERSION: &str = "0.12.0";

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route(
            "/api/version",
            get(|| async { Json(json!({"version": VERSION})) }),
        )
        .route("/api/tags", get(tags))
        .route("/api/ps", get(ps))
        .route("/api/show", post(show))
        .route("/api/chat", post(chat))
        .route("/api/generate", post(generate))
        .route("/api/embed", post(embed))
        .route("/api/embeddings", post(embeddings))
        .route("/api/pull", post(store_route))
        .route("/api/push", post(store_route))
        .route("/api/create", post(store_route))
        .route("/api/copy", post(store_route))
        .route("/api/delete", delete(store_route))
}

/// The paths of this module: `auth::scope_of` guards them with `api_keys`.
pub fn is_ollama_path(path: &str) -> bool {
    matches!(
        path,
        "/api/version"
            | "/api/tags"
            | "/api/ps"
            | "/api/show"
            | "/api/chat"
            | "/api/generate"
            | "/api/embed"
            | "/api/embeddings"
            | "/api/pull"
            | "/api/push"
            | "/api/create"
            | "/api/copy"
            | "/api/delete"
    )
}

/// An error in Ollama's shape: `{"error": "..."}` with the status (and `Retry-After`) kept.
struct OllamaError(ApiError);

impl<E: Into<ApiError>> From<E> for OllamaError {
    fn from(e: E) -> Self {
        OllamaError(e.into())
    }
}

impl IntoResponse for OllamaError {
    fn into_response(self) -> Response {
        let mut resp = self.0.clone().into_response();
        *resp.body_mut() = Body::from(json!({"error": self.0.message}).to_string());
        resp.headers_mut().remove(http::header::CONTENT_LENGTH);
        resp
    }
}

fn bad(message: impl Into<String>) -> OllamaError {
    OllamaError(ApiError::bad_request("invalid_request", message))
}

async fn store_route(req: Request) -> OllamaError {
    let what = req.uri().path().trim_start_matches("/api/").to_owned();
    OllamaError(ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        "invalid_request_error",
        "not_supported",
        format!(
            "llmvisor serves the models already on this machine and does not {what} models: put \
             GGUF files in a models_dirs folder (or --models-dir), or use `ollama pull` / \
             `huggingface-cli download`; llmvisor lists what they store within seconds"
        ),
    ))
}

/// A request's JSON body and the model it names (id or alias).
async fn read(
    st: &AppState,
    req: Request,
) -> Result<(http::request::Parts, Value, Arc<crate::Config>, usize), OllamaError> {
    let (parts, body) = req.into_parts();
    let limit = st.config().body_limit;
    let (bytes, _budget) =
        super::proxy::read_body(body, &parts.headers, limit, &st.body_budget).await?;
    let v: Value =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("invalid JSON body: {e}")))?;
    let name = v
        .get("model")
        .or_else(|| v.get("name"))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad("model is required"))?
        .to_owned();
    let cfg = st.config();
    let index = cfg.model_index(&name).ok_or_else(|| {
        OllamaError(ApiError::not_found(format!(
            "model '{name}' not found; known: {}",
            cfg.model_names().join(", ")
        )))
    })?;
    Ok((parts, v, cfg, index))
}

fn rfc3339_secs(secs: u64) -> String {
    convert::rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

/// A stable hex digest: Ollama's for its own models, else one derived from the file's path and
/// size (not a content hash: hashing every GGUF would read every weight).
fn digest(m: &ModelConfig) -> String {
    if let Some(o) = m.found.as_ref().and_then(|f| f.ollama.as_ref()) {
        return o.digest.clone();
    }
    use std::hash::{Hash, Hasher};
    let mut out = String::new();
    for round in 0u8..4 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (
            round,
            &m.id,
            m.model_file(),
            m.found.as_ref().map(|f| f.size),
        )
            .hash(&mut h);
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}

fn details(m: &ModelConfig) -> Value {
    let facts = m.found.as_ref().map(|f| &f.facts);
    let family = facts
        .and_then(|f| f.architecture.clone())
        .unwrap_or_default();
    json!({
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": facts.map(|f| f.parameter_size()).unwrap_or_default(),
        "quantization_level": facts.and_then(|f| f.quantization()).unwrap_or_default(),
    })
}

fn entry(m: &ModelConfig) -> Value {
    let f = m.found.as_deref();
    json!({
        "name": m.id,
        "model": m.id,
        "modified_at": rfc3339_secs(f.map_or(0, |f| f.modified)),
        "size": f.map_or(0, |f| f.size),
        "digest": digest(m),
        "details": details(m),
    })
}

/// `GET /api/tags`: every model.
async fn tags(State(st): St) -> Response {
    Json(tags_json(&st.config())).into_response()
}

/// The body of `GET /api/tags` for `cfg` (public for the benchmark of a large listing).
pub fn tags_json(cfg: &crate::config::Config) -> Value {
    let models: Vec<Value> = cfg
        .models
        .iter()
        .filter(|m| !m.api.unlisted)
        .map(entry)
        .collect();
    json!({"models": models})
}

/// The context its server runs with (`-c`), when the command says.
fn server_ctx(m: &ModelConfig) -> Option<u64> {
    m.arg_value(&["-c", "--ctx-size"])?
        .parse()
        .ok()
        .filter(|c| *c > 0)
}

/// `GET /api/ps`: the running models.
async fn ps(State(st): St) -> Response {
    let cfg = st.config();
    let models: Vec<Value> = st
        .sup
        .status()
        .into_iter()
        .filter(|s| matches!(s.state, Phase::Ready | Phase::Starting))
        .filter_map(|s| {
            let m = cfg.model(&s.id)?;
            let mut e = entry(m);
            e["size"] = json!(s.memory.unwrap_or(0));
            e["size_vram"] = json!(0);
            let ttl = m.ttl.unwrap_or(Duration::from_secs(100 * 365 * 86_400));
            e["expires_at"] = json!(convert::rfc3339(SystemTime::now() + ttl));
            e["context_length"] = json!(server_ctx(m).unwrap_or(0));
            Some(e)
        })
        .collect();
    Json(json!({"models": models})).into_response()
}

fn is_embedding(m: &ModelConfig) -> bool {
    m.found.as_ref().is_some_and(|f| f.facts.embedding)
        || m.cmd
            .iter()
            .any(|a| a == "--embedding" || a == "--embeddings")
}

fn has_vision(m: &ModelConfig) -> bool {
    m.found.as_ref().is_some_and(|f| f.mmproj.is_some())
        || m.arg_value(&["--mmproj", "-mm"]).is_some()
}

/// `POST /api/show`: details from the GGUF header, its template, `model_info`.
async fn show(State(st): St, req: Request) -> Result<Response, OllamaError> {
    let (_, _, cfg, i) = read(&st, req).await?;
    let m = &cfg.models[i];
    let file = m.model_file();
    // Off the runtime's threads: a first read steps over megabytes of vocabulary.
    let header = match file.clone() {
        Some(f) => tokio::task::spawn_blocking(move || crate::gguf::open_shared(&f).ok())
            .await
            .ok()
            .flatten(),
        None => None,
    };
    let mut model_info = serde_json::Map::new();
    let mut template = String::new();
    if let Some(g) = &header {
        for (k, v) in &g.metadata {
            let v = match v {
                crate::gguf::Value::U64(n) => json!(n),
                crate::gguf::Value::I64(n) => json!(n),
                crate::gguf::Value::F64(n) => json!(n),
                crate::gguf::Value::Bool(b) => json!(b),
                crate::gguf::Value::Str(s) if k == "tokenizer.chat_template" => {
                    template = s.clone();
                    continue;
                }
                crate::gguf::Value::Str(s) => json!(s),
                // Arrays (the vocabulary) are left out, as Ollama does without `verbose`.
                _ => Value::Null,
            };
            model_info.insert(k.clone(), v);
        }
        model_info.insert(
            "general.parameter_count".into(),
            json!(crate::discover::Facts::from_gguf(g).parameters),
        );
    }
    let mut capabilities = vec![if is_embedding(m) {
        "embedding"
    } else {
        "completion"
    }];
    if has_vision(m) {
        capabilities.push("vision");
    }
    if template.contains("tools") {
        capabilities.push("tools");
    }
    if template.contains("<think>") || template.contains("enable_thinking") {
        capabilities.push("thinking");
    }
    let params = m.found.as_ref().and_then(|f| f.ollama.as_ref()).map(|o| {
        o.params
            .iter()
            .flat_map(|(k, v)| match v {
                Value::Array(items) => items.iter().map(|i| format!("{k} {i}")).collect::<Vec<_>>(),
                v => vec![format!("{k} {v}")],
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    let from = file.map(|f| f.display().to_string()).unwrap_or_default();
    Ok(Json(json!({
        "modelfile": format!("# served by llmvisor with: {}\nFROM {from}\n", shell_words::join(&m.cmd)),
        "parameters": params.unwrap_or_default(),
        "template": template,
        "details": details(m),
        "model_info": model_info,
        "capabilities": capabilities,
        "modified_at": rfc3339_secs(m.found.as_ref().map_or(0, |f| f.modified)),
    }))
    .into_response())
}

/// A lease while the request is prepared (its wait is `load_duration`), with the request's
/// `keep_alive` set on the model.
async fn hold(
    st: &AppState,
    id: &str,
    keep: Option<Option<Duration>>,
) -> Result<(crate::Lease, Duration), OllamaError> {
    let t = Instant::now();
    let lease = st.sup.acquire(id).await?;
    if let Ok(cell) = st.sup.model(id) {
        match keep {
            Some(k) => cell.set_keep_alive(k),
            None => cell.set_keep_alive(m_ttl(st, id)),
        }
    }
    Ok((lease, t.elapsed()))
}

fn m_ttl(st: &AppState, id: &str) -> Option<Duration> {
    st.config().model(id).and_then(|m| m.ttl)
}

/// Sends `body` to the model's server at `path` through the proxy (its lease, connection slot
/// and events), and reads the answer as Ollama's: NDJSON objects, or one when not streaming.
async fn relay(
    st: Arc<AppState>,
    mut parts: http::request::Parts,
    id: &str,
    body: Value,
    path: &str,
    mut reply: Reply,
) -> Result<Response, OllamaError> {
    parts.method = http::Method::POST;
    parts.headers.remove(http::header::CONTENT_LENGTH);
    parts.headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(http::header::ACCEPT_ENCODING);
    let bytes = super::llama_swap::prepare_json(&st, id, Bytes::from(body.to_string()))?;
    let resp = super::proxy::forward(st, id, parts, Body::from(bytes), path, reply.began).await;
    let (head, body) = resp.into_parts();
    if !head.status.is_success() {
        let bytes = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let v: Value = serde_json::from_slice(&bytes).unwrap_or_default();
        let msg = v["error"]["message"]
            .as_str()
            .or_else(|| v["error"].as_str())
            .map_or_else(
                || String::from_utf8_lossy(&bytes).into_owned(),
                str::to_owned,
            );
        let mut e = ApiError::new(head.status, "server_error", "upstream_error", msg);
        e.retry_after = head
            .headers
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .map(Duration::from_secs);
        return Err(OllamaError(e));
    }
    let mut events = sse_events(body);
    if reply.whole {
        let mut error = None;
        while let Some(ev) = futures_util::StreamExt::next(&mut events).await {
            for o in reply.event(&ev) {
                error = o
                    .get("error")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .or(error);
            }
        }
        if let Some(e) = error {
            return Err(OllamaError(ApiError::bad_gateway(e)));
        }
        return Ok(Json(reply.finish()).into_response());
    }
    let stream = futures_util::stream::unfold(Some((events, reply)), |state| async move {
        let (mut events, mut reply) = state?;
        loop {
            match futures_util::StreamExt::next(&mut events).await {
                Some(ev) => {
                    let out = reply.event(&ev);
                    if !out.is_empty() {
                        return Some((
                            Ok::<_, std::io::Error>(ndjson(&out)),
                            Some((events, reply)),
                        ));
                    }
                }
                None => return Some((Ok(ndjson(&[reply.finish()])), None)),
            }
        }
    });
    Ok((
        [(http::header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

fn ndjson(objects: &[Value]) -> Bytes {
    let mut out = Vec::new();
    for o in objects {
        out.extend(o.to_string().into_bytes());
        out.push(b'\n');
    }
    Bytes::from(out)
}

/// The JSON of each `data:` line of a server-sent event stream (`[DONE]` ends it).
fn sse_events(body: Body) -> std::pin::Pin<Box<dyn futures_util::Stream<Item = Value> + Send>> {
    let data = body.into_data_stream();
    Box::pin(futures_util::stream::unfold(
        (data, Vec::<u8>::new(), false),
        |(mut data, mut buf, mut ended)| async move {
            loop {
                if let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=nl).collect();
                    let line = String::from_utf8_lossy(&line);
                    let Some(payload) = line.trim().strip_prefix("data:") else {
                        continue;
                    };
                    let payload = payload.trim();
                    if payload == "[DONE]" {
                        return None;
                    }
                    if let Ok(v) = serde_json::from_str::<Value>(payload) {
                        return Some((v, (data, buf, ended)));
                    }
                    continue;
                }
                if ended {
                    return None;
                }
                match futures_util::StreamExt::next(&mut data).await {
                    Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                    _ => {
                        ended = true;
                        buf.push(b'\n');
                    }
                }
            }
        },
    ))
}

fn target<'a>(m: &'a ModelConfig) -> Target<'a> {
    Target {
        id: &m.id,
        defaults: m
            .found
            .as_ref()
            .and_then(|f| f.ollama.as_ref())
            .map(|o| &o.params),
        server_ctx: server_ctx(m),
        vision: has_vision(m),
    }
}

fn streams(v: &Value) -> bool {
    v.get("stream").and_then(Value::as_bool).unwrap_or(true)
}

/// A request with nothing to answer (no messages, or an empty prompt) loads the model, or with
/// `keep_alive` 0 unloads it: Ollama's way to manage models through these routes.
async fn load_or_unload(
    st: &AppState,
    m: &ModelConfig,
    kind: Kind,
    keep: Option<Option<Duration>>,
) -> Result<Response, OllamaError> {
    let unload = keep == Some(Some(Duration::ZERO));
    if unload {
        st.sup.unload(&m.id, false).await?;
    } else {
        let (lease, _) = hold(st, &m.id, keep).await?;
        drop(lease);
    }
    let mut o = json!({"model": m.id, "created_at": convert::rfc3339(SystemTime::now()), "done": true,
                       "done_reason": if unload { "unload" } else { "load" }});
    match kind {
        Kind::Chat => o["message"] = json!({"role": "assistant", "content": ""}),
        Kind::Generate => o["response"] = json!(""),
    }
    Ok(Json(o).into_response())
}

async fn chat(State(st): St, req: Request) -> Result<Response, OllamaError> {
    let began = Instant::now();
    let (parts, v, cfg, i) = read(&st, req).await?;
    let m = &cfg.models[i];
    if is_embedding(m) {
        return Err(bad(format!(
            "model '{}' is an embedding model: it does not chat (use /api/embed)",
            m.id
        )));
    }
    let keep = convert::keep_alive(&v).map_err(bad)?;
    if v.get("messages")
        .and_then(Value::as_array)
        .is_none_or(Vec::is_empty)
    {
        return load_or_unload(&st, m, Kind::Chat, keep).await;
    }
    let body = convert::chat(&v, &target(m)).map_err(bad)?;
    let (lease, load) = hold(&st, &m.id, keep).await?;
    let reply = Reply::new(
        Kind::Chat,
        v["model"].as_str().unwrap_or(&m.id).to_owned(),
        began,
        load,
        !streams(&v),
    );
    let out = relay(
        st.clone(),
        parts,
        &m.id,
        body,
        "/v1/chat/completions",
        reply,
    )
    .await;
    drop(lease);
    out
}

async fn generate(State(st): St, req: Request) -> Result<Response, OllamaError> {
    let began = Instant::now();
    let (parts, v, cfg, i) = read(&st, req).await?;
    let m = &cfg.models[i];
    let keep = convert::keep_alive(&v).map_err(bad)?;
    if v.get("prompt")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        return load_or_unload(&st, m, Kind::Generate, keep).await;
    }
    let (body, path) = convert::generate(&v, &target(m)).map_err(bad)?;
    let (lease, load) = hold(&st, &m.id, keep).await?;
    let reply = Reply::new(
        Kind::Generate,
        v["model"].as_str().unwrap_or(&m.id).to_owned(),
        began,
        load,
        !streams(&v),
    );
    let out = relay(st.clone(), parts, &m.id, body, path, reply).await;
    drop(lease);
    out
}

/// `/v1/embeddings` for `inputs`: the vectors, the prompt tokens and the load time.
async fn embed_inputs(
    st: &Arc<AppState>,
    parts: http::request::Parts,
    m: &ModelConfig,
    v: &Value,
    inputs: Value,
) -> Result<(Vec<Value>, u64, Duration), OllamaError> {
    if !is_embedding(m) {
        return Err(bad(format!(
            "model '{}' does not serve embeddings: its GGUF is not an embedding model, so its \
             server runs without --embeddings (add a [models] entry with --embeddings to use it so)",
            m.id
        )));
    }
    let keep = convert::keep_alive(v).map_err(bad)?;
    let (lease, load) = hold(st, &m.id, keep).await?;
    let mut parts = parts;
    parts.method = http::Method::POST;
    parts.headers.remove(http::header::CONTENT_LENGTH);
    parts.headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    let body = json!({"model": m.id, "input": inputs}).to_string();
    let resp = super::proxy::forward(
        st.clone(),
        &m.id,
        parts,
        Body::from(body),
        "/v1/embeddings",
        Instant::now(),
    )
    .await;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    drop(lease);
    let out: Value = serde_json::from_slice(&bytes).unwrap_or_default();
    if !status.is_success() {
        let msg = out["error"]["message"].as_str().map_or_else(
            || String::from_utf8_lossy(&bytes).into_owned(),
            str::to_owned,
        );
        return Err(OllamaError(ApiError::new(
            status,
            "server_error",
            "upstream_error",
            msg,
        )));
    }
    let vectors = out["data"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|d| d["embedding"].clone())
        .collect();
    Ok((
        vectors,
        out["usage"]["prompt_tokens"].as_u64().unwrap_or(0),
        load,
    ))
}

async fn embed(State(st): St, req: Request) -> Result<Response, OllamaError> {
    let began = Instant::now();
    let (parts, v, cfg, i) = read(&st, req).await?;
    let m = &cfg.models[i];
    let inputs = match v.get("input") {
        Some(Value::String(s)) => json!([s]),
        Some(a @ Value::Array(_)) => a.clone(),
        _ => return Err(bad("input must be a string or a list of strings")),
    };
    let (vectors, tokens, load) = embed_inputs(&st, parts, m, &v, inputs).await?;
    Ok(Json(json!({
        "model": v["model"],
        "embeddings": vectors,
        "total_duration": began.elapsed().as_nanos() as u64,
        "load_duration": load.as_nanos() as u64,
        "prompt_eval_count": tokens,
    }))
    .into_response())
}

/// The older `/api/embeddings`: one `prompt`, one `embedding`.
async fn embeddings(State(st): St, req: Request) -> Result<Response, OllamaError> {
    let (parts, v, cfg, i) = read(&st, req).await?;
    let m = &cfg.models[i];
    let prompt = v.get("prompt").and_then(Value::as_str).unwrap_or("");
    let (vectors, _, _) = embed_inputs(&st, parts, m, &v, json!([prompt])).await?;
    Ok(Json(json!({"embedding": vectors.into_iter().next().unwrap_or_default()})).into_response())
}
