//! llama-swap's endpoints and the OpenAI/llama-server API gaps, in llama-swap's shapes:
//! `GET /running`, `GET /unload`, `POST /api/models/unload[/{model}]`, `GET /logs`,
//! `GET /logs/stream[/{model}]`, `GET /health`, `GET /v1/models/{id}`, llama-server's own routes
//! routed by body `model` or `?model=`, `GET /metrics?model=`; plus what the proxy applies per
//! model: request filters (`use_model_name`, `filters`) and `concurrency_limit`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use http::{header, StatusCode};
use serde_json::{json, Map, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;
use super::extract::Path;
use super::state::AppState;
use crate::config::ModelConfig;
use crate::supervisor::Phase;

type St = State<Arc<AppState>>;

/// llama-server's own routes, routed by body `model` or `?model=`.
const LLAMA_SERVER_ROUTES: &[&str] = &[
    "/completion",
    "/completions",
    "/infill",
    "/rerank",
    "/reranking",
    "/tokenize",
    "/detokenize",
    "/apply-template",
    "/embedding",
    "/embeddings",
    "/props",
    "/slots",
];

/// The routes of this module (merged into the daemon's router).
pub fn routes() -> Router<Arc<AppState>> {
    let mut r = Router::new()
        .route("/running", get(running))
        .route("/unload", get(unload_all_text))
        .route("/api/models/unload", post(unload_all_json))
        .route("/api/models/unload/{*model}", post(unload_one))
        .route("/logs", get(logs))
        .route("/logs/stream", get(logs_stream_all))
        .route("/logs/stream/{*model}", get(logs_stream_one))
        .route("/health", get(|| async { "OK" }))
        .route("/v1/models/{*id}", get(retrieve_model));
    for path in LLAMA_SERVER_ROUTES {
        r = r.route(path, get(llama_route).post(llama_route));
    }
    r
}

/// What the proxy keeps per model for `concurrency_limit`.
#[derive(Default)]
pub struct SwapState {
    slots: Mutex<HashMap<String, (usize, Arc<Semaphore>)>>,
}

/// A request slot under the model's `concurrency_limit` (`None` when it has none); 429 with
/// `Retry-After` when every slot is taken.
pub fn concurrency_slot(
    st: &AppState,
    model: &ModelConfig,
) -> Result<Option<OwnedSemaphorePermit>, ApiError> {
    let Some(limit) = model.api.concurrency_limit else {
        return Ok(None);
    };
    let sem = {
        let mut slots = st.swap.slots.lock().unwrap_or_else(|p| p.into_inner());
        let entry = slots
            .entry(model.id.clone())
            .or_insert_with(|| (limit, Arc::new(Semaphore::new(limit))));
        if entry.0 != limit {
            // A reload changed the limit: requests holding old slots finish on the old one.
            *entry = (limit, Arc::new(Semaphore::new(limit)));
        }
        entry.1.clone()
    };
    match sem.try_acquire_owned() {
        Ok(p) => Ok(Some(p)),
        Err(_) => Err(ApiError {
            retry_after: Some(Duration::from_secs(1)),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "concurrency_limit",
                format!(
                    "model `{}` is answering {limit} requests already (its concurrency_limit); retry",
                    model.id
                ),
            )
        }),
    }
}

/// The body sent upstream for a request that named `requested`: the model's filters applied
/// (`strip_params`, `set_params`, `set_params_by_id[requested]`) and `model` rewritten to
/// `use_model_name`. Unchanged (not even re-serialized) when the model has neither.
pub fn rewrite_body(model: &ModelConfig, requested: &str, body: Bytes) -> Result<Bytes, ApiError> {
    let by_id = model.api.filters.set_params_by_id.get(requested);
    if model.api.use_model_name.is_none()
        && model.api.filters.strip_params.is_empty()
        && model.api.filters.set_params.is_empty()
        && by_id.is_none()
    {
        return Ok(body);
    }
    let mut obj: Map<String, Value> = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "invalid_json",
            format!("the request body is not a JSON object: {e}"),
        )
    })?;
    for p in &model.api.filters.strip_params {
        if p != "model" {
            obj.remove(p);
        }
    }
    for (k, v) in model
        .api
        .filters
        .set_params
        .iter()
        .chain(by_id.into_iter().flatten())
    {
        if k != "model" {
            obj.insert(k.clone(), v.clone());
        }
    }
    if let Some(name) = &model.api.use_model_name {
        obj.insert("model".into(), Value::String(name.clone()));
    }
    serde_json::to_vec(&obj)
        .map(Bytes::from)
        .map_err(|e| ApiError::bad_request("invalid_json", e.to_string()))
}

/// [`rewrite_body`] for the model `requested` names (an unknown name is left for the router to
/// answer 404).
pub fn prepare_json(st: &AppState, requested: &str, body: Bytes) -> Result<Bytes, ApiError> {
    let cfg = st.config();
    match cfg.model(requested) {
        Some(m) => rewrite_body(m, requested, body),
        None => Ok(body),
    }
}

/// llama.cpp router's `status.value`: `loaded`, `loading` or `unloaded`.
fn status_value(phase: Phase) -> &'static str {
    match phase {
        Phase::Ready => "loaded",
        Phase::Starting => "loading",
        Phase::Stopped | Phase::Stopping | Phase::Failed => "unloaded",
    }
}

/// One `/v1/models` entry for `id` (a model's id or one of its aliases).
fn entry(m: &ModelConfig, id: &str, phase: Phase) -> Value {
    let mut e = json!({
        "id": id,
        "object": "model",
        "owned_by": "llmvisor",
        "created": 0,
        "status": {"value": status_value(phase)},
    });
    if let Some(n) = &m.api.name {
        e["name"] = json!(n.trim());
    }
    if let Some(d) = &m.api.description {
        e["description"] = json!(d.trim());
    }
    let mut meta = m.api.metadata.clone().unwrap_or_default();
    if id == m.id {
        meta.insert("type".into(), json!("model"));
        if !m.aliases.is_empty() {
            meta.insert("aliases".into(), json!(m.aliases));
        }
    } else {
        meta.insert("type".into(), json!("alias"));
        meta.insert("modelID".into(), json!(m.id));
    }
    e["meta"] = json!({ "llamaswap": meta });
    e
}

fn phases(st: &AppState) -> HashMap<String, Phase> {
    st.sup
        .status()
        .into_iter()
        .map(|s| (s.id, s.state))
        .collect()
}

/// `GET /v1/models`: listed models (not `unlisted` ones), with aliases as entries of their own
/// when `include_aliases_in_list`.
pub fn model_list(st: &AppState) -> Value {
    let cfg = st.config();
    let phases = phases(st);
    let mut data = Vec::new();
    for m in cfg.models.iter().filter(|m| !m.api.unlisted) {
        let phase = phases.get(&m.id).copied().unwrap_or(Phase::Stopped);
        data.push(entry(m, &m.id, phase));
        if cfg.http.include_aliases_in_list {
            for a in &m.aliases {
                data.push(entry(m, a, phase));
            }
        }
    }
    json!({"object": "list", "data": data})
}

/// `GET /v1/models/{id}`: OpenAI's retrieve; an alias answers as itself.
async fn retrieve_model(State(st): St, Path(id): Path<String>) -> Result<Response, ApiError> {
    let cfg = st.config();
    let cell = st.sup.model(&id)?;
    let m = cfg
        .model(&id)
        .ok_or_else(|| ApiError::not_found(format!("no model `{id}`")))?;
    Ok(Json(entry(m, &id, cell.status().state)).into_response())
}

/// `GET /running`: `{"running": [{model, state, cmd, proxy, ttl, name, description}]}` for
/// every model that is not stopped.
async fn running(State(st): St) -> Response {
    let cfg = st.config();
    let list: Vec<Value> = st
        .sup
        .status()
        .into_iter()
        .filter(|s| !matches!(s.state, Phase::Stopped | Phase::Failed))
        .map(|s| {
            let m = cfg.model(&s.id);
            json!({
                "model": s.id,
                "state": s.state.as_str(),
                "cmd": m.map(|m| shell_words::join(&m.cmd)).unwrap_or_default(),
                "proxy": s.url.unwrap_or_default(),
                "ttl": m.and_then(|m| m.ttl).map_or(0, |d| d.as_secs()),
                "name": m.and_then(|m| m.api.name.clone()).unwrap_or_default(),
                "description": m.and_then(|m| m.api.description.clone()).unwrap_or_default(),
            })
        })
        .collect();
    Json(json!({ "running": list })).into_response()
}

/// Stops every running model (each waits for its in-flight requests).
async fn unload_all(st: &AppState) -> Result<(), ApiError> {
    let ids: Vec<String> = st
        .sup
        .status()
        .into_iter()
        .filter(|s| !matches!(s.state, Phase::Stopped))
        .map(|s| s.id)
        .collect();
    let stops = ids.iter().map(|id| st.sup.unload(id, false));
    for r in futures_util::future::join_all(stops).await {
        r?;
    }
    Ok(())
}

async fn unload_all_text(State(st): St) -> Result<Response, ApiError> {
    unload_all(&st).await?;
    Ok("OK".into_response())
}

async fn unload_all_json(State(st): St) -> Result<Response, ApiError> {
    unload_all(&st).await?;
    Ok(Json(json!({"msg": "ok"})).into_response())
}

async fn unload_one(State(st): St, Path(model): Path<String>) -> Result<Response, ApiError> {
    st.sup.unload(model.trim_start_matches('/'), false).await?;
    Ok("OK".into_response())
}

fn plain(body: impl Into<Body>) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        body.into(),
    )
        .into_response()
}

/// `GET /logs`: every model's recent output, each line prefixed with `[model] `.
async fn logs(State(st): St) -> Result<Response, ApiError> {
    let mut text = String::new();
    for id in st.sup.model_ids() {
        let (lines, _) = st.sup.logs(&id)?.follow();
        for l in lines {
            text.push_str(&format!("[{id}] {l}\n"));
        }
    }
    Ok(plain(text))
}

/// `GET /logs/stream/{model}`: the model's history (unless `?no-history`), then its output as
/// it comes. `upstream` is every model's output.
async fn logs_stream_one(
    State(st): St,
    Path(model): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let model = model.trim_start_matches('/');
    let history = !no_history(&req);
    if model == "upstream" {
        return stream_of(&st, st.sup.model_ids(), history, true);
    }
    let cell = st.sup.model(model)?;
    let id = cell.status().id;
    stream_of(&st, vec![id], history, false)
}

/// `GET /logs/stream`: every model's output, each line prefixed with `[model] `.
async fn logs_stream_all(State(st): St, req: Request) -> Result<Response, ApiError> {
    let history = !no_history(&req);
    stream_of(&st, st.sup.model_ids(), history, true)
}

fn no_history(req: &Request) -> bool {
    let q = req.uri().query().unwrap_or("");
    q.split('&')
        .any(|kv| kv == "no-history" || kv.starts_with("no-history="))
}

fn stream_of(
    st: &AppState,
    ids: Vec<String>,
    history: bool,
    prefixed: bool,
) -> Result<Response, ApiError> {
    let mut first = String::new();
    let mut streams = Vec::new();
    for id in ids {
        let (lines, rx) = st.sup.logs(&id)?.follow();
        let tag = if prefixed {
            format!("[{id}] ")
        } else {
            String::new()
        };
        if history {
            for l in lines {
                first.push_str(&tag);
                first.push_str(&l);
                first.push('\n');
            }
        }
        let s = futures_util::stream::unfold((rx, tag), |(mut rx, tag)| async move {
            use tokio::sync::broadcast::error::RecvError;
            let chunk = match rx.recv().await {
                Ok(line) => format!("{tag}{line}\n"),
                Err(RecvError::Lagged(n)) => format!("{tag}llmvisor: … {n} lines skipped\n"),
                Err(RecvError::Closed) => return None,
            };
            Some((Ok::<_, std::io::Error>(Bytes::from(chunk)), (rx, tag)))
        });
        streams.push(Box::pin(s));
    }
    let head = futures_util::stream::once(async move { Ok(Bytes::from(first)) });
    let body = futures_util::StreamExt::chain(head, futures_util::stream::select_all(streams));
    Ok(plain(Body::from_stream(body)))
}

/// The model named by `?model=` in a query string.
fn query_model(query: Option<&str>) -> Option<String> {
    let q = query?;
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        // A query string writes a space as `+` (a literal `+` arrives as `%2B`).
        (k == "model" && !v.is_empty()).then(|| crate::ids::decode_segment(&v.replace('+', " ")))
    })
}

/// llama-server's own routes: the model from `?model=`, else from the JSON body's `model`;
/// forwarded to the same path and query.
async fn llama_route(State(st): St, req: Request) -> Response {
    let began = Instant::now();
    let (parts, body) = req.into_parts();
    let path = super::proxy::path_and_query(&parts.uri, "/");
    if let Some(model) = query_model(parts.uri.query()) {
        let body = super::body_guard::GuardedBody::for_config(body, &st.config());
        return super::proxy::forward(st, &model, parts, body, &path, began).await;
    }
    if parts.method == http::Method::GET {
        return ApiError::bad_request(
            "missing_model",
            "name the model: ?model=ID (one of GET /v1/models)",
        )
        .into_response();
    }
    if let Err(e) = super::browser::require_json(&parts.headers) {
        return e.into_response();
    }
    let limit = st.config().body_limit;
    let (bytes, _budget) =
        match super::proxy::read_body(body, &parts.headers, limit, &st.body_budget).await {
            Ok(b) => b,
            Err(e) => return e.into_response(),
        };
    let model = match super::proxy::routed_model(&bytes) {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    let bytes = match prepare_json(&st, &model, bytes) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let mut parts = parts;
    let body = super::proxy::replayable(&mut parts, bytes);
    super::proxy::forward(st, &model, parts, body, &path, began).await
}

/// `GET /metrics`: llmvisor's own metrics, or with `?model=ID` that model's server's.
pub async fn metrics(State(st): St, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    match query_model(parts.uri.query()) {
        Some(model) => {
            let path = super::proxy::path_and_query(&parts.uri, "/metrics");
            super::proxy::forward(st, &model, parts, body, &path, Instant::now()).await
        }
        None => super::api::metrics(State(st)).await,
    }
}

/// True when a request for `requested` should get loading progress in its stream: the model has
/// `send_loading_state`, the request asks for a stream, and the model is not ready yet.
pub fn wants_loading_state(st: &AppState, requested: &str, body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Streamed {
        stream: Option<bool>,
    }
    let cfg = st.config();
    let Some(m) = cfg.model(requested) else {
        return false;
    };
    if !m.api.send_loading_state {
        return false;
    }
    let streamed = serde_json::from_slice::<Streamed>(body)
        .ok()
        .and_then(|s| s.stream)
        .unwrap_or(false);
    streamed
        && st
            .sup
            .model(requested)
            .is_ok_and(|c| c.status().state != Phase::Ready)
}

/// One SSE chunk in OpenAI's delta format carrying `text` as `reasoning_content`.
fn loading_chunk(model: &str, text: &str) -> Bytes {
    let chunk = json!({
        "id": "llmvisor-loading",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "delta": {"reasoning_content": text}, "finish_reason": null}],
    });
    Bytes::from(format!("data: {chunk}\n\n"))
}

/// A streamed request that waits for its model to load: answered at once with SSE, sending the
/// server's output lines as `reasoning_content` chunks until the model is ready, then the
/// upstream's own stream. A failed start ends the stream with an error event.
pub async fn loading_stream(
    st: Arc<AppState>,
    requested: String,
    parts: http::request::Parts,
    body: Bytes,
    path: String,
    began: Instant,
) -> Response {
    let logs = match st.sup.logs(&requested) {
        Ok(l) => l,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let (_, mut lines) = logs.follow();
    // The same redaction as a failed start's 503: an `--api-key` in the command line (echoed in
    // "starting …" and often by the server) is not shown to a caller without the admin key.
    let hidden = super::proxy::hidden_secrets(&st, &requested, &parts.headers);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let first = format!("loading model `{requested}`…\n");
        if tx.send(loading_chunk(&requested, &first)).await.is_err() {
            return;
        }
        let mut parts = parts;
        let body = super::proxy::replayable(&mut parts, body);
        let fwd = super::proxy::forward(st, &requested, parts, body, &path, began);
        tokio::pin!(fwd);
        let resp = loop {
            tokio::select! {
                resp = &mut fwd => break resp,
                line = lines.recv() => {
                    if let Ok(line) = line {
                        let line = super::redact::redact(&line, &hidden);
                        if tx.send(loading_chunk(&requested, &format!("{line}\n"))).await.is_err() {
                            return; // the client went away: dropping `fwd` gives up the wait
                        }
                    }
                }
            }
        };
        let ok = resp.status().is_success();
        let mut upstream = resp.into_body();
        if ok {
            let _ = tx.send(loading_chunk(&requested, "model ready\n")).await;
        }
        let mut text = Vec::new();
        while let Some(frame) = http_body_util::BodyExt::frame(&mut upstream).await {
            let Ok(frame) = frame else { break };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if ok {
                if tx.send(data).await.is_err() {
                    return;
                }
            } else {
                text.extend_from_slice(&data);
            }
        }
        if !ok {
            // The error answer (OpenAI's shape) as an SSE event, then the end.
            let event = format!("data: {}\n\n", String::from_utf8_lossy(&text));
            let _ = tx.send(Bytes::from(event)).await;
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx))
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> ModelConfig {
        let mut m = ModelConfig::new("a", vec!["x".into()]);
        m.aliases = vec!["a:hot".into()];
        m
    }

    #[test]
    fn body_is_untouched_without_filters() {
        let body = Bytes::from_static(br#"{"model":"a",  "x":1}"#);
        assert_eq!(rewrite_body(&model(), "a", body.clone()).unwrap(), body);
    }

    #[test]
    fn filters_and_use_model_name_rewrite_the_body() {
        let mut m = model();
        m.api.use_model_name = Some("org/a".into());
        m.api.filters.strip_params = vec!["temperature".into(), "model".into()];
        m.api.filters.set_params.insert("top_k".into(), json!(3));
        let mut hot = Map::new();
        hot.insert("temperature".into(), json!(1.5));
        m.api.filters.set_params_by_id.insert("a:hot".into(), hot);
        let body =
            Bytes::from_static(br#"{"model":"a:hot","temperature":0.1,"top_k":9,"keep":true}"#);
        let out: Value =
            serde_json::from_slice(&rewrite_body(&m, "a:hot", body.clone()).unwrap()).unwrap();
        assert_eq!(
            out,
            json!({"model": "org/a", "temperature": 1.5, "top_k": 3, "keep": true})
        );
        let out: Value = serde_json::from_slice(&rewrite_body(&m, "a", body).unwrap()).unwrap();
        assert_eq!(out, json!({"model": "org/a", "top_k": 3, "keep": true}));
        assert_eq!(
            rewrite_body(&m, "a", Bytes::from_static(b"[1]"))
                .unwrap_err()
                .status,
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn query_model_is_decoded() {
        assert_eq!(
            query_model(Some("a=1&model=x%2Fy+z")).as_deref(),
            Some("x/y z")
        );
        assert_eq!(query_model(Some("model=")), None);
        assert_eq!(query_model(Some("model=%")).as_deref(), Some("%"));
        assert_eq!(query_model(Some("model=%4")).as_deref(), Some("%4"));
        assert_eq!(query_model(None), None);
    }
}
