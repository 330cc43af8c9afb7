//! Fleet mode in the router (issue 15): requests for a model placed on another node are
//! forwarded there, streamed both ways, authenticated with the cluster key (never the client's);
//! `GET /api/cluster`. Without the `fleet` feature or without `[cluster]` everything here is
//! inert and requests are served locally.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::HeaderMap;

use super::error::ApiError;
use super::state::AppState;

/// Marks a hop's 503 "not placed here": the forwarding node routes the request again.
#[cfg(feature = "fleet")]
const NOT_PLACED_HEADER: &str = "x-llmvisor-not-placed";

/// The fleet handle a daemon in fleet mode holds.
#[cfg(feature = "fleet")]
pub type FleetHandle = Arc<crate::cluster::Fleet>;
/// Built without fleet mode: no value of this type exists.
#[cfg(not(feature = "fleet"))]
pub enum FleetHandle {}

/// Whether a node-to-node hop presents the cluster key (then the client API keys do not apply).
pub fn hop_allowed(st: &AppState, path: &str, headers: &HeaderMap) -> bool {
    #[cfg(feature = "fleet")]
    {
        use crate::cluster::{HOP_HEADER, KEY_HEADER};
        use subtle::ConstantTimeEq;
        let Some(fleet) = st.fleet.get() else {
            return false;
        };
        if super::auth::scope_of(path) != super::auth::Scope::Api
            || !headers.contains_key(HOP_HEADER)
        {
            return false;
        }
        let (Some(key), Some(sent)) = (fleet.cluster_key(), headers.get(KEY_HEADER)) else {
            return false;
        };
        bool::from(key.as_bytes().ct_eq(sent.as_bytes()))
    }
    #[cfg(not(feature = "fleet"))]
    {
        let _ = (st, path, headers);
        false
    }
}

/// Serves the request through another node when fleet mode places `model` there; gives the
/// request back (`Err`) when it is to be served locally.
pub async fn divert(
    st: &Arc<AppState>,
    model: &str,
    parts: http::request::Parts,
    body: Body,
    path_and_query: &str,
) -> Result<Response, (http::request::Parts, Body)> {
    #[cfg(feature = "fleet")]
    {
        use crate::cluster::{FleetError, Route, HOP_HEADER};
        let Some(fleet) = st.fleet.get() else {
            return Err((parts, body));
        };
        use http_body::Body as _;
        use http_body_util::BodyExt;
        let hop = parts.headers.contains_key(HOP_HEADER);
        // A body already in memory (every `/v1/...` request) can be sent again when the node it
        // went to is unreachable: the request then waits for that node's placement to expire
        // (at most `lease_ttl`) and goes where the model is placed next.
        let mut body = Some(body);
        let replay = match body.as_ref().and_then(|b| b.size_hint().exact()) {
            Some(n) if n <= st.config().body_limit as u64 => match body.take() {
                Some(b) => b.collect().await.ok().map(|c| c.to_bytes()),
                None => None,
            },
            _ => None,
        };
        let take_body = |body: &mut Option<Body>| match &replay {
            Some(bytes) => Body::from(bytes.clone()),
            None => body.take().unwrap_or_else(Body::empty),
        };
        let deadline =
            std::time::Instant::now() + fleet.lease_ttl() + std::time::Duration::from_secs(2);
        let routed: FleetError = loop {
            match fleet.route(model, hop).await {
                Ok(Route::Local) => return Err((parts, take_body(&mut body))),
                Ok(Route::Remote { node, advertise }) => {
                    let sent = take_body(&mut body);
                    match forward(st, fleet, &node, &advertise, &parts, sent, path_and_query).await
                    {
                        // The placement moved after this node looked: route again.
                        Ok(resp)
                            if resp.headers().contains_key(NOT_PLACED_HEADER)
                                && replay.is_some()
                                && std::time::Instant::now() < deadline =>
                        {
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        }
                        Ok(resp) => return Ok(resp),
                        Err(e) if replay.is_some() && std::time::Instant::now() < deadline => {
                            tracing::info!(model, node = %node, "fleet mode: node unreachable ({e}); waiting for its placement to expire");
                            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                        }
                        Err(e) => {
                            return Ok(ApiError::bad_gateway(format!(
                                "fleet mode: node `{node}` ({advertise}) did not answer: {e}"
                            ))
                            .into_response())
                        }
                    }
                }
                Err(e) => break e,
            }
        };
        let code = match routed {
            FleetError::Fenced => "fleet_fenced",
            FleetError::Etcd(_) | FleetError::Connect { .. } => "fleet_etcd_unavailable",
            FleetError::NoRoom { .. } => "fleet_no_room",
            FleetError::NotPlacedHere(_) => "fleet_not_placed_here",
        };
        let mut resp = ApiError::new(
            http::StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            code,
            routed.to_string(),
        )
        .into_response();
        if matches!(routed, FleetError::NotPlacedHere(_)) {
            resp.headers_mut()
                .insert(NOT_PLACED_HEADER, http::HeaderValue::from_static("1"));
        }
        Ok(resp)
    }
    #[cfg(not(feature = "fleet"))]
    {
        let _ = (st, model, path_and_query);
        Err((parts, body))
    }
}

/// One hop to `node`; `Err` when the node could not be reached (nothing was answered).
#[cfg(feature = "fleet")]
async fn forward(
    st: &Arc<AppState>,
    fleet: &FleetHandle,
    node: &str,
    advertise: &str,
    parts: &http::request::Parts,
    body: Body,
    path_and_query: &str,
) -> Result<Response, String> {
    use crate::cluster::{HOP_HEADER, KEY_HEADER};
    use http_body_util::BodyExt;
    let guard = fleet.forwarding_to(node);
    let uri = match format!("{advertise}{path_and_query}").parse::<http::Uri>() {
        Ok(u) => u,
        Err(e) => return Ok(ApiError::bad_request("invalid_path", e.to_string()).into_response()),
    };
    let mut req = http::Request::new(crate::upstream::body(body));
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    super::proxy::copy_headers(&parts.headers, req.headers_mut());
    let h = req.headers_mut();
    h.insert(
        HOP_HEADER,
        http::HeaderValue::from_str(fleet.node()).unwrap_or(http::HeaderValue::from_static("?")),
    );
    if let Some(key) = fleet.cluster_key() {
        if let Ok(v) = http::HeaderValue::from_str(key) {
            h.insert(KEY_HEADER, v);
        }
    }
    let resp = st.client.request(req).await.map_err(|e| e.to_string())?;
    let (mut head, upstream) = resp.into_parts();
    super::proxy::strip_hop_by_hop(&mut head.headers);
    head.headers.insert(
        "x-llmvisor-node",
        http::HeaderValue::from_str(node).unwrap_or(http::HeaderValue::from_static("?")),
    );
    // The guard lives as long as the body: the request counts as in flight to `node` until
    // its last byte is passed on (or the client goes away).
    let streamed = upstream.map_frame(move |frame| {
        let _held = &guard;
        frame
    });
    Ok(Response::from_parts(head, Body::new(streamed)))
}

/// `GET /api/cluster`.
pub async fn cluster(State(st): State<Arc<AppState>>) -> Response {
    #[cfg(feature = "fleet")]
    if let Some(fleet) = st.fleet.get() {
        return match fleet.snapshot().await {
            Ok(v) => axum::Json(v).into_response(),
            Err(e) => ApiError::new(
                http::StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "fleet_etcd_unavailable",
                e.to_string(),
            )
            .into_response(),
        };
    }
    let _ = st;
    ApiError::not_found("not in fleet mode: the config has no [cluster] table").into_response()
}

/// This node's id, for the `node` field of `/api/models` in fleet mode.
pub fn node_id(st: &AppState) -> Option<String> {
    #[cfg(feature = "fleet")]
    {
        st.fleet.get().map(|f| f.node().to_string())
    }
    #[cfg(not(feature = "fleet"))]
    {
        let _ = st;
        None
    }
}

/// Starts fleet mode when the config has `[cluster]`.
pub async fn start(st: &Arc<AppState>) -> Result<(), String> {
    let cfg = st.config();
    let Some(cluster) = cfg.cluster.as_ref() else {
        return Ok(());
    };
    #[cfg(feature = "fleet")]
    {
        let fleet = crate::cluster::Fleet::start(&cfg, cluster, st.sup.clone())
            .await
            .map_err(|e| e.to_string())?;
        let _ = st.fleet.set(fleet);
        Ok(())
    }
    #[cfg(not(feature = "fleet"))]
    {
        let _ = cluster;
        Err(
            "the config has a [cluster] table, but this llmvisor was built without fleet mode \
             (build with `cargo build --features fleet`)"
                .into(),
        )
    }
}

/// Fleet mode's `preload`: true when it took it over (the models are then placed, not just
/// started here).
pub fn preload(st: &AppState) -> bool {
    #[cfg(feature = "fleet")]
    if let Some(fleet) = st.fleet.get() {
        fleet.preload_all();
        return true;
    }
    let _ = st;
    false
}

/// Leaves the fleet at shutdown (the lease is revoked, so placements go at once).
pub async fn leave(st: &AppState) {
    #[cfg(feature = "fleet")]
    if let Some(fleet) = st.fleet.get() {
        fleet.leave().await;
    }
    let _ = st;
}

/// Fleet lines of `/metrics`.
pub fn metrics(st: &AppState, out: &mut String) {
    #[cfg(feature = "fleet")]
    if let Some(fleet) = st.fleet.get() {
        use std::fmt::Write;
        use std::sync::atomic::Ordering;
        let _ = writeln!(
            out,
            "# TYPE llmvisor_fleet_forwards_total counter\nllmvisor_fleet_forwards_total {}\n\
             # TYPE llmvisor_fleet_placements_claimed_total counter\nllmvisor_fleet_placements_claimed_total {}\n\
             # TYPE llmvisor_fleet_fences_total counter\nllmvisor_fleet_fences_total {}",
            fleet.forwards.load(Ordering::Relaxed),
            fleet.placements_claimed.load(Ordering::Relaxed),
            fleet.fences.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            out,
            "# TYPE llmvisor_fleet_fenced gauge\nllmvisor_fleet_fenced {}\n\
             # HELP llmvisor_fleet_placements Placements cluster-wide as this node's watch sees them.\n\
             # TYPE llmvisor_fleet_placements gauge",
            u8::from(fleet.is_fenced())
        );
        let mut placed = fleet.cached_placements().unwrap_or_default();
        placed.sort_by(|a, b| (&a.model, &a.node).cmp(&(&b.model, &b.node)));
        for p in placed {
            let _ = writeln!(
                out,
                "llmvisor_fleet_placements{{model=\"{}\",node=\"{}\"}} 1",
                crate::metrics::label(&p.model),
                crate::metrics::label(&p.node)
            );
        }
    }
    let _ = (st, out);
}
