//! Management routes (`/api/*`), the model list, health and metrics.

use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use http::{header, StatusCode};
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::extract::{Path, Query};
use super::leases::ttl_from_secs;
use super::state::AppState;
use crate::metrics::label;
use crate::supervisor::Phase;

type St = State<Arc<AppState>>;

pub async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

/// `GET /v1/models`: OpenAI's list; aliases are not listed separately.
pub async fn v1_models(State(st): St) -> Response {
    Json(super::llama_swap::model_list(&st)).into_response()
}

pub async fn models(State(st): St) -> Response {
    let Some(node) = super::fleet::node_id(&st) else {
        return Json(st.sup.status()).into_response();
    };
    // Fleet mode: each model says which node this answer is about.
    let mut list = serde_json::to_value(st.sup.status()).unwrap_or_default();
    if let Some(items) = list.as_array_mut() {
        for m in items.iter_mut().filter_map(|m| m.as_object_mut()) {
            m.insert("node".into(), json!(node));
        }
    }
    Json(list).into_response()
}

/// `GET /api/models/{id}` and `GET /api/models/{id}/logs`. The id may be percent-encoded
/// (`Qwen%2FQwen3-8B`) or raw (`Qwen/Qwen3-8B`): a known id or alias is the model itself even when
/// it ends in `/logs`; otherwise a trailing `/logs` is the action.
pub async fn model_get(
    State(st): St,
    Path(rest): Path<String>,
    Query(q): Query<ModelQuery>,
) -> Result<Response, ApiError> {
    match rest.strip_suffix("/logs") {
        Some(id) if st.sup.model(&rest).is_err() => logs(&st, id, q.follow == Some(true)),
        _ => Ok(Json(st.sup.model(&rest)?.status()).into_response()),
    }
}

/// `POST /api/models/{id}/load` and `POST /api/models/{id}/unload` (the id percent-encoded or
/// raw: the last segment is the action, everything before it the id).
pub async fn model_post(
    State(st): St,
    Path(rest): Path<String>,
    Query(q): Query<ModelQuery>,
) -> Result<Response, ApiError> {
    if let Some(id) = rest.strip_suffix("/load") {
        load(&st, id, q.wait != Some(false)).await
    } else if let Some(id) = rest.strip_suffix("/unload") {
        let status = st.sup.unload(id, q.force.unwrap_or(false)).await?;
        Ok(Json(status).into_response())
    } else {
        Err(ApiError::method_not_allowed())
    }
}

/// The query flags of the `/api/models/{id}/...` routes.
#[derive(Deserialize)]
pub struct ModelQuery {
    wait: Option<bool>,
    force: Option<bool>,
    follow: Option<bool>,
}

async fn load(st: &Arc<AppState>, id: &str, wait: bool) -> Result<Response, ApiError> {
    let cell = st.sup.model(id)?;
    if !wait {
        let sup = st.sup.clone();
        let name = id.to_owned();
        tokio::spawn(async move {
            if let Err(e) = sup.load(&name).await {
                tracing::warn!(model = %name, "load failed: {e}");
            }
        });
        return Ok((StatusCode::ACCEPTED, Json(cell.status())).into_response());
    }
    let status = st.sup.load(id).await?;
    Ok(Json(status).into_response())
}

fn logs(st: &AppState, id: &str, follow: bool) -> Result<Response, ApiError> {
    let sink = st.sup.logs(id)?;
    let (lines, rx) = sink.follow();
    let mut text = String::new();
    for l in &lines {
        text.push_str(l);
        text.push('\n');
    }
    let plain = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    if !follow {
        return Ok((plain, text).into_response());
    }
    let first =
        futures_util::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(text)) });
    // Ends when the client disconnects (the body is dropped); a log sink itself never closes.
    let rest = futures_util::stream::unfold(rx, |mut rx| async move {
        use tokio::sync::broadcast::error::RecvError;
        let chunk = match rx.recv().await {
            Ok(line) => format!("{line}\n"),
            Err(RecvError::Lagged(n)) => {
                format!("llmvisor: … {n} lines skipped (reader too slow)\n")
            }
            Err(RecvError::Closed) => return None,
        };
        Some((Ok(Bytes::from(chunk)), rx))
    });
    let stream = futures_util::StreamExt::chain(first, rest);
    Ok((plain, Body::from_stream(stream)).into_response())
}

#[derive(Deserialize)]
pub struct LeaseRequest {
    model: String,
    ttl_s: Option<f64>,
}

/// Largest body of the lease routes (a model id and a number).
const LEASE_BODY_LIMIT: usize = 64 * 1024;

/// The body of a lease route: JSON (when there is one), at most [`LEASE_BODY_LIMIT`].
async fn lease_body(st: &AppState, req: Request) -> Result<Bytes, ApiError> {
    let (parts, body) = req.into_parts();
    let (body, _budget) =
        super::proxy::read_body(body, &parts.headers, LEASE_BODY_LIMIT, &st.body_budget).await?;
    if !body.iter().all(u8::is_ascii_whitespace) {
        super::browser::require_json(&parts.headers)?;
    }
    Ok(body)
}

/// Who holds an HTTP lease: the key presented, else the client's IP address.
fn caller_of(req: &Request) -> String {
    if let Some(key) = super::auth::presented_key(req.headers()) {
        return format!("key:{key}");
    }
    match req.extensions().get::<super::Peer>() {
        Some(p) => format!("ip:{}", p.0.ip()),
        None => "unknown".into(),
    }
}

fn too_many_leases(cap: usize) -> ApiError {
    ApiError {
        retry_after: Some(std::time::Duration::from_secs(1)),
        ..ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "too_many_leases",
            format!(
                "this caller already holds {cap} leases (config: leases_per_caller); release or \
                 let one expire first"
            ),
        )
    }
}

pub async fn create_lease(State(st): St, req: Request) -> Result<Response, ApiError> {
    let caller = caller_of(&req);
    let cap = st.config().http.leases_per_caller;
    if st.leases.held_by(&caller) >= cap {
        return Err(too_many_leases(cap));
    }
    let body = lease_body(&st, req).await?;
    let req: LeaseRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "invalid_json",
            format!("expected {{\"model\": ID, \"ttl_s\": SECONDS}}: {e}"),
        )
    })?;
    let ttl = ttl_from_secs(req.ttl_s).map_err(|m| ApiError::bad_request("invalid_ttl", m))?;
    let lease = st.sup.acquire(&req.model).await?;
    let info = st
        .leases
        .insert(lease, ttl, &caller, cap)
        .ok_or_else(|| too_many_leases(cap))?;
    Ok(Json(info).into_response())
}

#[derive(Deserialize, Default)]
pub struct RenewRequest {
    ttl_s: Option<f64>,
}

pub async fn renew_lease(
    State(st): St,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let body = lease_body(&st, req).await?;
    let req: RenewRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RenewRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(
                "invalid_json",
                format!("expected {{\"ttl_s\": SECONDS}}: {e}"),
            )
        })?
    };
    // No ttl_s: the lease's own ttl again.
    let ttl = match req.ttl_s {
        None => None,
        s => Some(ttl_from_secs(s).map_err(|m| ApiError::bad_request("invalid_ttl", m))?),
    };
    let info = st.leases.renew(&id, ttl).ok_or_else(|| {
        ApiError::not_found(format!("no lease `{id}` (it expired or was released)"))
    })?;
    Ok(Json(info).into_response())
}

pub async fn release_lease(State(st): St, Path(id): Path<String>) -> Result<Response, ApiError> {
    if st.leases.release(&id) {
        Ok(Json(json!({"id": id, "released": true})).into_response())
    } else {
        Err(ApiError::not_found(format!(
            "no lease `{id}` (it expired or was released)"
        )))
    }
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(st): St) -> Response {
    let mut out = String::with_capacity(4096);
    let statuses = st.sup.status();
    out.push_str("# HELP llmvisor_model_state Current lifecycle state of each model (1 = in this state).\n# TYPE llmvisor_model_state gauge\n");
    for m in &statuses {
        for phase in [
            Phase::Stopped,
            Phase::Starting,
            Phase::Ready,
            Phase::Stopping,
            Phase::Failed,
        ] {
            let v = u8::from(m.state == phase);
            let _ = writeln!(
                out,
                "llmvisor_model_state{{model=\"{}\",state=\"{phase}\"}} {v}",
                label(&m.id)
            );
        }
    }
    per_model(
        &mut out,
        "llmvisor_model_leases",
        "gauge",
        "Active leases per model.",
        statuses.iter().map(|m| (m.id.as_str(), m.leases as u64)),
    );
    let cells: Vec<_> = statuses
        .iter()
        .filter_map(|m| st.sup.model(&m.id).ok())
        .collect();
    let counters: Vec<(&str, crate::supervisor::Counters)> =
        cells.iter().map(|c| (&*c.id, c.counters())).collect();
    per_model(
        &mut out,
        "llmvisor_model_starts_total",
        "counter",
        "Server starts per model.",
        counters.iter().map(|(id, c)| (*id, c.starts)),
    );
    per_model(
        &mut out,
        "llmvisor_model_start_failures_total",
        "counter",
        "Failed server starts per model.",
        counters.iter().map(|(id, c)| (*id, c.start_failures)),
    );
    per_model(
        &mut out,
        "llmvisor_model_evictions_total",
        "counter",
        "Times a model was stopped to make room for another.",
        counters.iter().map(|(id, c)| (*id, c.evictions)),
    );
    per_model(
        &mut out,
        "llmvisor_model_swaps_total",
        "counter",
        "Starts that had to wait for other models to stop (swaps); their wait is in llmvisor_model_queue_wait_seconds.",
        counters.iter().map(|(id, c)| (*id, c.swaps)),
    );
    let kv: Vec<_> = cells.iter().map(|c| (&*c.id, c.kv.counters())).collect();
    for (name, help, value) in crate::supervisor::kv::METRICS {
        per_model(
            &mut out,
            name,
            "counter",
            help,
            kv.iter().map(|(id, c)| (*id, value(c))),
        );
    }
    per_model(
        &mut out,
        "llmvisor_model_connections_in_use",
        "gauge",
        "Proxied requests holding one of the server's connection slots (max_connections).",
        counters
            .iter()
            .map(|(id, c)| (*id, c.connections_in_use as u64)),
    );
    per_model(
        &mut out,
        "llmvisor_model_max_connections",
        "gauge",
        "The server's connection slots (max_connections).",
        counters
            .iter()
            .map(|(id, c)| (*id, c.max_connections as u64)),
    );
    per_model(
        &mut out,
        "llmvisor_model_queued",
        "gauge",
        "Requests waiting for room to start the model.",
        statuses.iter().map(|m| (m.id.as_str(), m.queued as u64)),
    );
    super::memory_metrics::render(
        &mut out,
        statuses.iter().map(|m| super::memory_metrics::ModelMemory {
            id: &m.id,
            counted: m.memory,
            detail: &m.memory_detail,
        }),
    );
    out.push_str("# HELP llmvisor_model_start_seconds Time from start request to ready.\n# TYPE llmvisor_model_start_seconds histogram\n");
    for c in &cells {
        let labels = format!("model=\"{}\"", label(&c.id));
        c.stats
            .start_time
            .render(&mut out, "llmvisor_model_start_seconds", &labels);
    }
    out.push_str("# HELP llmvisor_model_queue_wait_seconds Time a start waited for room.\n# TYPE llmvisor_model_queue_wait_seconds histogram\n");
    for c in &cells {
        let labels = format!("model=\"{}\"", label(&c.id));
        c.stats
            .queue_wait
            .render(&mut out, "llmvisor_model_queue_wait_seconds", &labels);
    }
    out.push_str("# HELP llmvisor_http_requests_total HTTP responses by status.\n# TYPE llmvisor_http_requests_total counter\n");
    for (status, n) in st.metrics.statuses() {
        let _ = writeln!(
            out,
            "llmvisor_http_requests_total{{status=\"{status}\"}} {n}"
        );
    }
    out.push_str("# HELP llmvisor_http_in_flight Proxied requests whose response has not finished.\n# TYPE llmvisor_http_in_flight gauge\n");
    let _ = writeln!(
        out,
        "llmvisor_http_in_flight {}",
        st.metrics.in_flight.load(Ordering::Relaxed)
    );
    out.push_str("# HELP llmvisor_upstream_retries_total Requests sent again on a new connection because the reused one was closed before the server read them.\n# TYPE llmvisor_upstream_retries_total counter\n");
    let _ = writeln!(
        out,
        "llmvisor_upstream_retries_total {}",
        st.metrics.upstream_retries.load(Ordering::Relaxed)
    );
    out.push_str("# HELP llmvisor_http_body_bytes Bytes of request bodies buffered now (config: body_budget).\n# TYPE llmvisor_http_body_bytes gauge\n");
    let _ = writeln!(out, "llmvisor_http_body_bytes {}", st.body_bytes_buffered());
    out.push_str("# HELP llmvisor_http_leases HTTP leases held for clients.\n# TYPE llmvisor_http_leases gauge\n");
    let _ = writeln!(out, "llmvisor_http_leases {}", st.leases.count());
    out.push_str("# HELP llmvisor_proxy_overhead_seconds Time spent in llmvisor's request handler per proxied request: body read, routing, forwarding (model start, server work and HTTP parsing excluded).\n# TYPE llmvisor_proxy_overhead_seconds histogram\n");
    st.metrics
        .proxy_overhead
        .render(&mut out, "llmvisor_proxy_overhead_seconds", "");
    super::fleet::metrics(&st, &mut out);
    super::dashboard::render_metrics(&st, &mut out);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// One metric with a value per model: HELP, TYPE, then `name{model="id"} value` lines.
fn per_model<'a>(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    values: impl Iterator<Item = (&'a str, u64)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (model, v) in values {
        let _ = writeln!(out, "{name}{{model=\"{}\"}} {v}", label(model));
    }
}
