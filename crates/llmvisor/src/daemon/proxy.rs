//! Forwarding requests to a model's server and streaming the answer back as it arrives.
//!
//! The lease taken for a request lives inside the response body ([`LeasedBody`]): it ends when
//! the last byte has been handed to the client, or when the client goes away and hyper drops the
//! body — which also drops the upstream connection, so llama-server stops generating.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;
use super::state::{AppState, InFlight};
use crate::supervisor::Lease;

/// A client gets this long to send its request body.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// `POST /v1/...`: routed by the body's `model`.
pub async fn v1(State(st): State<Arc<AppState>>, req: Request) -> Response {
    let began = Instant::now();
    let (parts, body) = req.into_parts();
    // A form upload: routed by its `model` field, streamed through (never buffered whole).
    if let Some(boundary) = super::multipart::boundary(&parts.headers) {
        return super::multipart::forward(st, parts, body, &boundary, began).await;
    }
    if let Err(e) = super::browser::require_json(&parts.headers) {
        return e.into_response();
    }
    let limit = st.config().body_limit;
    // The permit holds the body's bytes in the global budget until the answer's head is back.
    let (body, _budget) = match read_body(body, &parts.headers, limit, &st.body_budget).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let model = match routed_model(&body) {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    // llama-swap's per-model request filters (use_model_name, filters).
    let body = match super::llama_swap::prepare_json(&st, &model, body) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let path = path_and_query(&parts.uri, "/");
    // send_loading_state: a streamed request that waits for a load sees its progress.
    if super::llama_swap::wants_loading_state(&st, &model, &body) {
        return super::llama_swap::loading_stream(st, model, parts, body, path, began).await;
    }
    let mut parts = parts;
    let body = replayable(&mut parts, body);
    forward(st, &model, parts, body, &path, began).await
}

/// A request body held in memory, kept beside the request so that [`forward`] can send it
/// again on a new connection when a reused one was closed before the server read it.
#[derive(Clone)]
struct Replay(Bytes);

/// `bytes` as the body of the request of `parts`, marked as one that may be sent again.
pub(super) fn replayable(parts: &mut http::request::Parts, bytes: Bytes) -> Body {
    parts.extensions.insert(Replay(bytes.clone()));
    Body::from(bytes)
}

/// True when a request failed because the connection it was written to was closed without an
/// answer (a pooled keep-alive connection the server dropped as it was reused), not because
/// nothing listens: the server never read it, so sending it again is safe.
fn closed_under_us(e: &hyper_util::client::legacy::Error) -> bool {
    if e.is_connect() {
        return false;
    }
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_canceled() {
                return true;
            }
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
            if matches!(io.kind(), BrokenPipe | ConnectionReset | ConnectionAborted) {
                return true;
            }
        }
        source = err.source();
    }
    false
}

/// The path and query of `uri` as sent upstream (`default` when it has none).
pub(super) fn path_and_query(uri: &http::Uri, default: &str) -> String {
    uri.path_and_query()
        .map_or_else(|| default.to_owned(), |p| p.as_str().to_owned())
}

/// `ANY /upstream/{model}/{path}`: passthrough, request body streamed. The model is the
/// longest leading part of the path that names a known model (ids may hold `/`: with models
/// `org` and `org/name`, `/upstream/org/name/health` goes to `org/name`); when none does, the
/// first segment (answered 404). Each part may be percent-encoded (`org%2Fname`).
pub async fn upstream(State(st): State<Arc<AppState>>, req: Request) -> Response {
    let began = Instant::now();
    let (parts, body) = req.into_parts();
    let (model, target) = upstream_target(&parts.uri, |name| st.sup.model(name).is_ok());
    let body = super::body_guard::GuardedBody::for_config(body, &st.config());
    forward(st, &model, parts, body, &target, began).await
}

/// The model and the path and query sent upstream for `/upstream/{model}/{tail}?{query}`: the
/// tail exactly as the client wrote it (still percent-encoded: `%2F`, `%3F` and `%23` keep their
/// meaning).
fn upstream_target(uri: &http::Uri, known: impl Fn(&str) -> bool) -> (String, String) {
    let after = uri.path().strip_prefix("/upstream/").unwrap_or("");
    let ends = after
        .match_indices('/')
        .map(|(i, _)| i)
        .chain(std::iter::once(after.len()));
    let ends: Vec<usize> = ends.collect();
    let first = ends.first().copied().unwrap_or(after.len());
    let split = ends
        .iter()
        .rev()
        .copied()
        .find(|&end| known(&crate::ids::decode_segment(&after[..end])))
        .unwrap_or(first);
    let model = crate::ids::decode_segment(&after[..split]);
    let mut target = match &after[split..] {
        "" => "/".to_owned(),
        tail => tail.to_owned(),
    };
    if let Some(q) = uri.query() {
        target.push('?');
        target.push_str(q);
    }
    (model, target)
}

/// Reads a whole request body of at most `limit` bytes (413 beyond, 408 when it does not arrive
/// in time), each byte counted in `budget` while the returned permit is held; a body that finds
/// no room is answered 503 at once (`Retry-After`) instead of waiting with its bytes.
pub(super) async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
    budget: &Arc<Semaphore>,
) -> Result<(Bytes, OwnedSemaphorePermit), ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::too_large(limit));
    }
    let reserve = |n: usize| {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        budget
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|_| budget_exhausted())
    };
    let mut held = reserve(declared.unwrap_or(0) as usize)?;
    let read = async {
        let mut body = body;
        let mut buf = bytes::BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                ApiError::bad_request(
                    "body_read_failed",
                    format!("could not read the request body: {e}"),
                )
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if buf.len() + data.len() > limit {
                return Err(ApiError::too_large(limit));
            }
            let need = (buf.len() + data.len()).saturating_sub(held.num_permits());
            if need > 0 {
                held.merge(reserve(need)?);
            }
            buf.extend_from_slice(&data);
        }
        Ok(buf.freeze())
    };
    match tokio::time::timeout(BODY_READ_TIMEOUT, read).await {
        Err(_) => Err(body_timeout()),
        Ok(Ok(bytes)) => Ok((bytes, held)),
        Ok(Err(e)) => Err(e),
    }
}

fn body_timeout() -> ApiError {
    ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "invalid_request_error",
        "body_timeout",
        format!(
            "the request body did not arrive within {}",
            crate::units::format_duration(BODY_READ_TIMEOUT)
        ),
    )
}

fn budget_exhausted() -> ApiError {
    ApiError {
        retry_after: Some(Duration::from_secs(1)),
        ..ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "body_budget_exhausted",
            "too many request bodies are being received at once (config: body_budget); retry",
        )
    }
}

/// The `model` of a JSON request body, without parsing the rest into values.
pub fn routed_model(body: &[u8]) -> Result<String, ApiError> {
    #[derive(Deserialize)]
    struct Routed {
        model: Option<serde_json::Value>,
    }
    let routed: Routed = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(
            "invalid_json",
            format!("the request body is not a JSON object: {e}"),
        )
    })?;
    match routed.model {
        Some(serde_json::Value::String(m)) if !m.is_empty() => Ok(m),
        Some(serde_json::Value::String(_)) | None | Some(serde_json::Value::Null) => Err(
            ApiError::bad_request("missing_model", "the request body has no \"model\": name one of the models listed at GET /v1/models"),
        ),
        Some(_) => Err(ApiError::bad_request(
            "invalid_model",
            "\"model\" must be a string",
        )),
    }
}

pub(super) async fn forward(
    st: Arc<AppState>,
    model: &str,
    parts: http::request::Parts,
    body: Body,
    path_and_query: &str,
    began: Instant,
) -> Response {
    let (parts, body) = match super::fleet::divert(&st, model, parts, body, path_and_query).await {
        Ok(resp) => return resp,
        Err(local) => local,
    };
    let method = parts.method.clone();
    // llama-swap's concurrencyLimit: 429 beyond it; the slot is held until the answer ends.
    let concurrency = match st.config().model(model) {
        Some(m) => match super::llama_swap::concurrency_slot(&st, m) {
            Ok(slot) => slot,
            Err(e) => return refused(&st, model, path_and_query, &method, e, began),
        },
        None => None,
    };
    let in_flight = InFlight::new(st.clone());
    let acquire_began = Instant::now();
    let lease = match st.sup.acquire(model).await {
        Ok(l) => l,
        Err(e) => {
            let e = acquire_error(&st, model, &parts.headers, e);
            return refused(&st, model, path_and_query, &method, e, began);
        }
    };
    // One of the server's connection slots (max_connections): beyond them requests wait here,
    // in order, rather than inside the server holding one of its HTTP threads.
    let queue_timeout = st.config().queue_timeout;
    let slot = match tokio::time::timeout(queue_timeout, lease.connection_slot()).await {
        Ok(slot) => slot,
        Err(_) => {
            let (_, limit) = st
                .sup
                .model(lease.model())
                .map(|c| c.connections_in_use())
                .unwrap_or_default();
            let busy = crate::AcquireError::NoRoom {
                model: lease.model().to_owned(),
                reason: format!(
                    "all {limit} connections to its server (max_connections) stayed busy for {} (queue_timeout)",
                    crate::units::format_duration(queue_timeout)
                ),
                retry_after: Some(Duration::from_secs(1)),
            };
            let e = acquire_error(&st, model, &parts.headers, busy);
            return refused(&st, model, path_and_query, &method, e, began);
        }
    };
    let acquire_took = acquire_began.elapsed();
    let uri = match lease.endpoint().uri(path_and_query) {
        Ok(u) => u,
        Err(e) => return ApiError::bad_request("invalid_path", e.to_string()).into_response(),
    };
    let auth = upstream_auth(&st, lease.model());
    let build = |body: crate::upstream::UpstreamBody| {
        let mut req = http::Request::new(body);
        *req.method_mut() = method.clone();
        *req.uri_mut() = uri.clone();
        copy_headers(&parts.headers, req.headers_mut());
        if let Some(auth) = &auth {
            req.headers_mut()
                .insert(header::AUTHORIZATION, auth.clone());
        }
        req
    };
    // What can be sent again: a body held in memory, or none at all.
    let replay = match parts.extensions.get::<Replay>() {
        Some(Replay(bytes)) => Some(bytes.clone()),
        None => (body.size_hint().exact() == Some(0)).then(Bytes::new),
    };
    let req = build(crate::upstream::body(body));
    let sent = Instant::now();
    let before_upstream = sent.duration_since(began).saturating_sub(acquire_took);
    let mut answer = st.client.request(req).await;
    // A pooled connection the server closed as we reused it: sent once more, on a new one.
    if let (Err(e), Some(bytes)) = (&answer, replay) {
        if closed_under_us(e) && lease.is_up() {
            tracing::debug!(model = lease.model(), "retrying on a new connection: {e}");
            st.metrics.count_retry();
            let body = http_body_util::Full::new(bytes);
            answer = st
                .fresh_client
                .request(build(crate::upstream::body(body)))
                .await;
        }
    }
    let resp = match answer {
        Ok(r) => r,
        Err(e) if super::body_guard::BodyCut::find(std::error::Error::source(&e)).is_some() => {
            let err = super::body_guard::BodyCut::find(std::error::Error::source(&e))
                .map(super::body_guard::BodyCut::api_error)
                .unwrap_or_else(|| ApiError::bad_gateway(e.to_string()));
            crate::events::RequestObserver::failed(
                &st.events,
                lease.model(),
                path_and_query,
                method.as_str(),
                err.status.as_u16(),
                began,
            );
            return err.into_response();
        }
        Err(e) => {
            let died = !lease.is_up();
            let what = if died {
                format!(
                    "the server of model `{}` died during the request",
                    lease.model()
                )
            } else {
                format!(
                    "the server of model `{}` did not answer: {e}",
                    lease.model()
                )
            };
            // [dashboard hook] the client got a 502: a `request` event says so.
            crate::events::RequestObserver::failed(
                &st.events,
                lease.model(),
                path_and_query,
                method.as_str(),
                502,
                began,
            );
            return ApiError::bad_gateway(what).into_response();
        }
    };
    let answered = Instant::now();
    let (mut head, upstream_body) = resp.into_parts();
    let is_sse = head
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    strip_model_answer(&mut head.headers);
    super::browser::sandbox_model_page(&mut head.headers);
    // [dashboard hook] one `request` event per answer, read as it passes.
    let mut observer = crate::events::RequestObserver::new(
        st.events.clone(),
        lease.model(),
        path_and_query,
        method.as_str(),
        head.status.as_u16(),
        began,
        is_sse,
    );
    observer.check_kv_reuse(lease.kv_check());
    let body = LeasedBody {
        observer,
        inner: upstream_body,
        lease: Some(Held { lease, _slot: slot }),
        sse: is_sse,
        state: BodyState::Streaming,
        _in_flight: in_flight,
        _concurrency: concurrency,
    };
    st.metrics
        .proxy_overhead
        .observe(before_upstream + answered.elapsed());
    Response::from_parts(head, Body::new(body))
}

/// A request refused before it reached a server (429 over `concurrency_limit`, 503 with no room
/// or no free connection): answered with `err`, and shown on the event stream and in the metrics
/// like any answer. Only for configured models: a name a client made up gets no activity entry.
fn refused(
    st: &AppState,
    model: &str,
    path_and_query: &str,
    method: &http::Method,
    err: ApiError,
    began: Instant,
) -> Response {
    if let Ok(cell) = st.sup.model(model) {
        crate::events::RequestObserver::failed(
            &st.events,
            &cell.id,
            path_and_query,
            method.as_str(),
            err.status.as_u16(),
            began,
        );
    }
    err.into_response()
}

/// A failed acquire as the caller sees it: secrets of the model's command line are cut from the
/// message (which quotes the server's output) unless the caller may use the admin routes.
fn acquire_error(
    st: &AppState,
    model: &str,
    headers: &HeaderMap,
    e: crate::supervisor::AcquireError,
) -> ApiError {
    let mut err = ApiError::from(e);
    let hidden = hidden_secrets(st, model, headers);
    if !hidden.is_empty() {
        err.message = super::redact::redact(&err.message, &hidden);
    }
    err
}

/// The secrets of `model`'s command line that this caller must not see in its server's output:
/// none for a caller that may use the admin routes.
pub(super) fn hidden_secrets(st: &AppState, model: &str, headers: &HeaderMap) -> Vec<String> {
    let cfg = st.config();
    let admin = super::auth::allowed(
        super::auth::Scope::Admin,
        headers,
        &cfg.api_keys,
        &cfg.admin_keys,
    );
    match cfg.model(model) {
        Some(m) if !admin => super::redact::secrets(m),
        _ => Vec::new(),
    }
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn is_hop_by_hop(name: &HeaderName, listed: &[String]) -> bool {
    HOP_BY_HOP.contains(&name.as_str()) || listed.iter().any(|l| l == name.as_str())
}

/// Names listed in `Connection:` are hop-by-hop too.
fn connection_listed(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .collect()
}

/// Our own headers (fleet hops, node names, markers): never taken from a client or a model.
fn is_ours(name: &HeaderName) -> bool {
    name.as_str().starts_with("x-llmvisor-")
}

/// A client's request headers as sent on: never hop-by-hop ones, never its credentials for
/// llmvisor (`authorization`, `x-api-key`: a model server started with its own `--api-key` gets
/// that one from us, see [`upstream_auth`]) and never `x-llmvisor-*`.
pub(super) fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    let listed = connection_listed(from);
    for (name, value) in from {
        if is_hop_by_hop(name, &listed)
            || name == header::HOST
            || name == header::CONTENT_LENGTH
            || name == header::AUTHORIZATION
            || name == "x-api-key"
            || is_ours(name)
        {
            continue;
        }
        to.append(name.clone(), value.clone());
    }
}

/// `Authorization: Bearer K` for a model whose command gives its server `--api-key K`: the
/// client's own key is for llmvisor and is never passed on.
fn upstream_auth(st: &AppState, model: &str) -> Option<http::HeaderValue> {
    let cfg = st.config();
    let m = cfg.model(model)?;
    if !m.cmd.iter().any(|a| a.starts_with("--api-key")) {
        return None;
    }
    let key = super::redact::server_api_key(m)?;
    http::HeaderValue::from_str(&format!("Bearer {key}")).ok()
}

/// Removes hop-by-hop headers and the upstream's own CORS headers from a response.
#[cfg_attr(not(feature = "fleet"), allow(dead_code))] // used by fleet hops
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    strip_response(headers, false);
}

/// What a model server answers, as passed to the client: also without `x-llmvisor-*` (a server
/// must not speak for llmvisor, e.g. claim a fleet hop was "not placed").
fn strip_model_answer(headers: &mut HeaderMap) {
    strip_response(headers, true);
}

fn strip_response(headers: &mut HeaderMap, ours_too: bool) {
    let listed = connection_listed(headers);
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|n| {
            is_hop_by_hop(n, &listed)
                || super::browser::is_upstream_cors(n)
                || (ours_too && is_ours(n))
        })
        .cloned()
        .collect();
    for n in names {
        headers.remove(n);
    }
}

enum BodyState {
    Streaming,
    /// The upstream failed mid-stream; an SSE error event has been sent; end next.
    Ending,
    Done,
}

/// What a proxied request holds until its response ends: the lease (the server stays up) and
/// a connection slot (the server's connection stays ours).
struct Held {
    lease: Lease,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

/// The upstream's response body, holding the request's lease until it ends or is dropped.
struct LeasedBody {
    observer: crate::events::RequestObserver,
    inner: Incoming,
    lease: Option<Held>,
    sse: bool,
    state: BodyState,
    _in_flight: InFlight,
    /// The request's slot under the model's `concurrency_limit`, if it has one.
    _concurrency: Option<OwnedSemaphorePermit>,
}

impl HttpBody for LeasedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match this.state {
            BodyState::Done => return Poll::Ready(None),
            BodyState::Ending => {
                this.state = BodyState::Done;
                this.lease = None;
                return Poll::Ready(None);
            }
            BodyState::Streaming => {}
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.observer.data(data);
                }
                if this.inner.is_end_stream() {
                    this.observer.finish(); // its declared length is all there
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.observer.finish();
                this.state = BodyState::Done;
                this.lease = None; // finished: the lease ends now, not when hyper drops us
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                let model = this
                    .lease
                    .as_ref()
                    .map(|h| h.lease.model().to_owned())
                    .unwrap_or_default();
                tracing::warn!(model, "upstream failed mid-response: {e}");
                if this.sse {
                    // Tell the client in-band instead of cutting the stream silently.
                    this.state = BodyState::Ending;
                    let err = ApiError::bad_gateway(format!(
                        "the server of model `{model}` failed during the response: {e}"
                    ));
                    let event = format!("data: {}\n\n", err.body());
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from(event)))))
                } else {
                    this.state = BodyState::Done;
                    this.lease = None;
                    Poll::Ready(Some(Err(Box::new(e))))
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, BodyState::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            BodyState::Streaming => self.inner.size_hint(),
            _ => SizeHint::with_exact(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_is_read_from_the_body() {
        assert_eq!(
            routed_model(br#"{"model":"a","messages":[]}"#).unwrap(),
            "a"
        );
        assert_eq!(routed_model(b"{}").unwrap_err().code, "missing_model");
        assert_eq!(
            routed_model(br#"{"model":""}"#).unwrap_err().code,
            "missing_model"
        );
        assert_eq!(
            routed_model(br#"{"model":3}"#).unwrap_err().code,
            "invalid_model"
        );
        assert_eq!(routed_model(b"{nope").unwrap_err().code, "invalid_json");
        assert_eq!(routed_model(b"[1,2]").unwrap_err().code, "invalid_json");
        assert_eq!(routed_model(b"").unwrap_err().code, "invalid_json");
    }

    #[test]
    fn upstream_cors_headers_are_not_passed_through() {
        let mut h = HeaderMap::new();
        h.insert("access-control-allow-origin", "*".parse().unwrap());
        h.insert("access-control-allow-credentials", "true".parse().unwrap());
        h.insert("content-type", "application/json".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
    }

    #[test]
    fn upstream_tail_is_forwarded_raw() {
        let t = |u: &str| upstream_target(&u.parse().unwrap(), |m| m == "m").1;
        assert_eq!(
            t("/upstream/m/a%3Fb%23c%252F?x=%26"),
            "/a%3Fb%23c%252F?x=%26"
        );
        assert_eq!(t("/upstream/m"), "/");
        assert_eq!(t("/upstream/m/"), "/");
        assert_eq!(t("/upstream/m?q=1"), "/?q=1");
    }

    #[test]
    fn upstream_model_is_the_longest_known_id() {
        let known = [
            "org",
            "org/name",
            "unsloth/Qwen3-8B-GGUF:Q4_K_M",
            "llama3.2:3b",
        ];
        let t = |u: &str| {
            let (m, tail) = upstream_target(&u.parse().unwrap(), |m| known.contains(&m));
            (m, tail)
        };
        let pair = |m: &str, tail: &str| (m.to_owned(), tail.to_owned());
        assert_eq!(t("/upstream/org/name/health"), pair("org/name", "/health"));
        assert_eq!(
            t("/upstream/org/other/health"),
            pair("org", "/other/health")
        );
        assert_eq!(
            t("/upstream/org%2Fname/health"),
            pair("org/name", "/health")
        );
        assert_eq!(t("/upstream/org/name"), pair("org/name", "/"));
        assert_eq!(
            t("/upstream/unsloth/Qwen3-8B-GGUF:Q4_K_M/props?x=1"),
            pair("unsloth/Qwen3-8B-GGUF:Q4_K_M", "/props?x=1")
        );
        assert_eq!(
            t("/upstream/llama3.2%3A3b/v1/models"),
            pair("llama3.2:3b", "/v1/models")
        );
        // Nothing known: the first segment is the model (and is answered 404 by name).
        assert_eq!(t("/upstream/nope/a/b"), pair("nope", "/a/b"));
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_are_not_forwarded() {
        let mut from = HeaderMap::new();
        from.insert("connection", "keep-alive, x-private".parse().unwrap());
        from.insert("x-private", "1".parse().unwrap());
        from.insert("transfer-encoding", "chunked".parse().unwrap());
        from.insert("host", "example".parse().unwrap());
        from.insert("authorization", "Bearer k".parse().unwrap());
        from.insert("x-keep", "yes".parse().unwrap());
        from.insert("x-api-key", "k".parse().unwrap());
        from.insert("x-llmvisor-cluster-key", "k".parse().unwrap());
        from.insert("x-llmvisor-hop", "a".parse().unwrap());
        let mut to = HeaderMap::new();
        copy_headers(&from, &mut to);
        assert_eq!(to.len(), 1, "{to:?}");
        assert_eq!(to["x-keep"], "yes");
    }

    #[test]
    fn a_model_server_cannot_set_our_headers() {
        let mut h = HeaderMap::new();
        h.insert("x-llmvisor-not-placed", "1".parse().unwrap());
        h.insert("x-llmvisor-node", "evil".parse().unwrap());
        h.insert("content-type", "application/json".parse().unwrap());
        let mut hop = h.clone();
        strip_model_answer(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        // A fleet hop's answer comes from another llmvisor, whose markers are read.
        strip_hop_by_hop(&mut hop);
        assert!(hop.contains_key("x-llmvisor-not-placed"));
    }
}
