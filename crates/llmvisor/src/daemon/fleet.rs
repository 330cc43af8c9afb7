//! Fleet mode in the router (issue 15): requests for a model placed on another node are
//! forwarded there, streamed both ways, as hops signed with the cluster key (never carrying it,
//! nor the client's key: `cluster::hop`); `GET /api/cluster`. Without the `fleet` feature or
//! without `[cluster]` everything here is inert and requests are served locally.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::state::AppState;

/// The fleet handle a daemon in fleet mode holds.
#[cfg(feature = "fleet")]
pub type FleetHandle = Arc<crate::cluster::Fleet>;
/// Built without fleet mode: no value of this type exists.
#[cfg(not(feature = "fleet"))]
pub enum FleetHandle {}

/// What the guard makes of a request's hop headers.
pub enum HopAdmission {
    /// Not a hop (no hop headers, not a model route, not fleet mode): the API keys decide.
    NotAHop(Request),
    /// A hop that verified: it passes without a client key.
    Hop(Request),
    /// Hop headers that do not verify.
    Refused(Response),
}

/// Checks a node-to-node hop before anything else reads (or strips) its headers: the
/// signature, the replay window and, for a signed body, the body's digest (the body is then
/// read here, at most `body_limit`). A verified hop carries a `cluster::hop::VerifiedHop` in
/// its extensions for [`divert`].
pub async fn admit_hop(st: &Arc<AppState>, req: Request) -> HopAdmission {
    #[cfg(feature = "fleet")]
    {
        use crate::cluster::{hop, HOP_HEADER, HOP_NONCE_HEADER, HOP_PLACE_HEADER};
        let Some(fleet) = st.fleet.get() else {
            return HopAdmission::NotAHop(req);
        };
        let path = req.uri().path();
        if super::auth::scope_of(path) != super::auth::Scope::Api
            || !req.headers().contains_key(HOP_HEADER)
        {
            return HopAdmission::NotAHop(req);
        }
        let refused = |why: String| {
            HopAdmission::Refused(
                ApiError::new(
                    http::StatusCode::UNAUTHORIZED,
                    "authentication_error",
                    "invalid_hop",
                    format!("fleet mode: hop refused: {why}"),
                )
                .into_response(),
            )
        };
        let (mut parts, body) = req.into_parts();
        let Some(key) = fleet.cluster_key() else {
            // A keyless fleet on loopback (the config requires a cluster_key otherwise): there
            // is nothing to verify a hop with, as there is no key to ask a client for.
            let text = |name| {
                parts
                    .headers
                    .get(name)
                    .and_then(|v: &http::HeaderValue| v.to_str().ok())
                    .unwrap_or("")
                    .to_string()
            };
            let unsigned = hop::VerifiedHop {
                from: text(HOP_HEADER),
                nonce: text(HOP_NONCE_HEADER),
                place: parts.headers.contains_key(HOP_PLACE_HEADER),
                body_sha256: None,
            };
            parts.extensions.insert(unsigned);
            return HopAdmission::Hop(Request::from_parts(parts, body));
        };
        let target = super::proxy::path_and_query(&parts.uri, "/");
        let verified = match hop::verify_headers(
            key.as_bytes(),
            fleet.node(),
            parts.method.as_str(),
            &target,
            &parts.headers,
            fleet.replay_guard(),
        ) {
            Ok(v) => v,
            Err(e) => return refused(e.to_string()),
        };
        let body = match &verified.body_sha256 {
            None => body,
            Some(digest) => {
                let limit = st.config().body_limit;
                let bytes =
                    match super::proxy::read_body(body, &parts.headers, limit, &st.body_budget)
                        .await
                    {
                        Ok((bytes, _budget)) => bytes,
                        Err(e) => return HopAdmission::Refused(e.into_response()),
                    };
                if hop::body_sha256(&bytes) != *digest {
                    return refused(hop::HopError::BodyMismatch.to_string());
                }
                Body::from(bytes)
            }
        };
        parts.extensions.insert(verified);
        HopAdmission::Hop(Request::from_parts(parts, body))
    }
    #[cfg(not(feature = "fleet"))]
    {
        let _ = st;
        HopAdmission::NotAHop(req)
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
        use crate::cluster::{hop, FleetError, Hop, Route, NOT_PLACED_HEADER};
        let Some(fleet) = st.fleet.get() else {
            return Err((parts, body));
        };
        use http_body::Body as _;
        use http_body_util::BodyExt;
        let verified = parts.extensions.get::<hop::VerifiedHop>().cloned();
        let hop = match &verified {
            None => Hop::None,
            Some(h) if h.place => Hop::Place,
            Some(_) => Hop::Route,
        };
        // The other node routes the request as this one did: it gets the request's own path
        // (`/upstream/m/tail`, not the tail meant for the model's server).
        let target = super::proxy::path_and_query(&parts.uri, path_and_query);
        // A body already in memory (every `/v1/...` request) can be sent again when the node it
        // went to is unreachable: the request then waits for that node's placement to expire
        // (at most `lease_ttl`) and goes where the model is placed next. It is also signed.
        let mut body = Some(body);
        let replay = match body.as_ref().and_then(|b| b.size_hint().exact()) {
            Some(n) if n <= st.config().body_limit as u64 => match body.take() {
                Some(b) => b.collect().await.ok().map(|c| c.to_bytes()),
                None => None,
            },
            _ => None,
        };
        let digest = replay
            .as_ref()
            .map_or_else(|| hop::UNSIGNED_BODY.to_string(), |b| hop::body_sha256(b));
        let take_body = |body: &mut Option<Body>| match &replay {
            Some(bytes) => Body::from(bytes.clone()),
            None => body.take().unwrap_or_else(Body::empty),
        };
        let deadline =
            std::time::Instant::now() + fleet.lease_ttl() + std::time::Duration::from_secs(2);
        let routed: FleetError = loop {
            match fleet.route(model, hop).await {
                Ok(Route::Local) => return Err((parts, take_body(&mut body))),
                Ok(Route::Remote {
                    node,
                    advertise,
                    place,
                }) => {
                    let sent = take_body(&mut body);
                    let to = Target {
                        node: &node,
                        advertise: &advertise,
                        place,
                        path_and_query: &target,
                        body_sha256: &digest,
                    };
                    match forward(st, fleet, &to, &parts, sent).await {
                        // The placement moved after this node looked: route again.
                        Ok((_, true))
                            if replay.is_some() && std::time::Instant::now() < deadline =>
                        {
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        }
                        Ok((resp, _)) => return Ok(resp),
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
        if let (FleetError::NotPlacedHere(_), Some(h)) = (&routed, &verified) {
            // Tagged for the node that sent the hop, so nothing behind this node can fake it.
            let key = fleet.cluster_key().unwrap_or_default().as_bytes();
            let tag = hop::not_placed_tag(key, fleet.node(), &h.nonce);
            if let Ok(v) = http::HeaderValue::from_str(&tag) {
                resp.headers_mut().insert(NOT_PLACED_HEADER, v);
            }
        }
        Ok(resp)
    }
    #[cfg(not(feature = "fleet"))]
    {
        let _ = (st, model, path_and_query);
        Err((parts, body))
    }
}

/// Where and how one hop goes.
#[cfg(feature = "fleet")]
struct Target<'a> {
    node: &'a str,
    advertise: &'a str,
    /// The node is asked to claim a placement for itself.
    place: bool,
    path_and_query: &'a str,
    /// What the signature says of the body (`cluster::hop`).
    body_sha256: &'a str,
}

/// One signed hop; `Err` when the node could not be reached (nothing was answered). The flag
/// says the node answered "not placed here" (its tag verified): the caller routes again.
#[cfg(feature = "fleet")]
async fn forward(
    st: &Arc<AppState>,
    fleet: &FleetHandle,
    to: &Target<'_>,
    parts: &http::request::Parts,
    body: Body,
) -> Result<(Response, bool), String> {
    use crate::cluster::{hop, NODE_HEADER, NOT_PLACED_HEADER};
    use http_body_util::BodyExt;
    let guard = fleet.forwarding_to(to.node);
    let uri = match format!("{}{}", to.advertise, to.path_and_query).parse::<http::Uri>() {
        Ok(u) => u,
        Err(e) => {
            let resp = ApiError::bad_request("invalid_path", e.to_string()).into_response();
            return Ok((resp, false));
        }
    };
    let mut req = http::Request::new(crate::upstream::body(body));
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    super::proxy::copy_headers(&parts.headers, req.headers_mut());
    // Added after copy_headers, replacing any hop header a client sent: they are this node's.
    // Without a cluster_key (a keyless fleet on loopback) the "signature" is keyed with "".
    let key = fleet.cluster_key().unwrap_or_default().as_bytes();
    let nonce = hop::new_nonce();
    hop::HopRequest {
        method: parts.method.as_str(),
        path_and_query: to.path_and_query,
        body: to.body_sha256,
        from: fleet.node(),
        to: to.node,
        place: to.place,
        time: hop::unix_now(),
        nonce: &nonce,
    }
    .write_headers(key, req.headers_mut());
    let resp = st.client.request(req).await.map_err(|e| e.to_string())?;
    let (mut head, upstream) = resp.into_parts();
    // Read before anything strips x-llmvisor-*, and never passed on: only the node the hop
    // went to can tag its answer (a model server behind it cannot).
    let not_placed = head.headers.remove(NOT_PLACED_HEADER).is_some_and(|tag| {
        tag.to_str()
            .is_ok_and(|t| hop::verify_not_placed(key, to.node, &nonce, t))
    });
    super::proxy::strip_hop_by_hop(&mut head.headers);
    head.headers.insert(
        NODE_HEADER,
        http::HeaderValue::from_str(to.node).unwrap_or(http::HeaderValue::from_static("?")),
    );
    // The guard lives as long as the body: the request counts as in flight to `node` until
    // its last byte is passed on (or the client goes away).
    let streamed = upstream.map_frame(move |frame| {
        let _held = &guard;
        frame
    });
    Ok((Response::from_parts(head, Body::new(streamed)), not_placed))
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
