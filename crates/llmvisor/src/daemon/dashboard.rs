//! The dashboard's routes: `GET /api/events` (Server-Sent Events), `GET /api/activity` and the
//! `/ui/` assets, embedded in the binary. Merged into the router in one place ([`routes`]).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::broadcast::{self, error::RecvError};

use super::error::ApiError;
use super::extract::Query;
use super::state::AppState;
use crate::events::{self, Event};

/// A comment line this often keeps proxies and idle timers from closing a quiet stream.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// Request events (still in the replay ring) sent after a snapshot's models.
const RECENT_REQUESTS: usize = 50;
/// Lines of a model's log sent first on `?logs=MODEL`.
const LOG_BACKLOG: usize = 200;

const INDEX_HTML: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const APP_CSS: &str = include_str!("ui/app.css");

type St = State<Arc<AppState>>;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/events", get(events))
        .route("/api/activity", get(activity))
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route(
            "/ui/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/ui/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/ui/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'self'; style-src 'self'; script-src 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    r
}

/// `GET /api/activity`: per-model request figures (`llmvisor ps`).
async fn activity(State(st): St) -> Response {
    let rows: Vec<_> = st
        .events
        .activity
        .all()
        .into_iter()
        .map(|(model, a)| {
            let c = a.counts();
            json!({
                "model": model,
                "requests": c.by_status.values().sum::<u64>(),
                "requests_per_min": c.per_minute(),
                "last_tokens_per_s": c.last_tokens_per_s,
                "prompt_tokens": c.prompt_tokens,
                "completion_tokens": c.completion_tokens,
            })
        })
        .collect();
    Json(rows).into_response()
}

/// The request activity's lines of `/metrics`: per model, requests by status, tokens, time to
/// first byte and duration.
pub fn render_metrics(st: &AppState, out: &mut String) {
    use crate::metrics::label;
    use std::fmt::Write;
    let all = st.events.activity.all();
    let counts: Vec<_> = all.iter().map(|(m, a)| (label(m), a.counts())).collect();
    out.push_str("# HELP llmvisor_model_requests_total Proxied requests per model by the status the server answered.\n# TYPE llmvisor_model_requests_total counter\n");
    for (m, c) in &counts {
        for (status, n) in &c.by_status {
            let _ = writeln!(
                out,
                "llmvisor_model_requests_total{{model=\"{m}\",status=\"{status}\"}} {n}"
            );
        }
    }
    for (name, help, get) in [
        (
            "llmvisor_model_prompt_tokens_total",
            "Prompt tokens per model, as the answers' usage/timings report them.",
            (|c: &events::ActivityCounts| c.prompt_tokens) as fn(&events::ActivityCounts) -> u64,
        ),
        (
            "llmvisor_model_completion_tokens_total",
            "Generated tokens per model, as the answers' usage/timings report them.",
            |c: &events::ActivityCounts| c.completion_tokens,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (m, c) in &counts {
            let _ = writeln!(out, "{name}{{model=\"{m}\"}} {}", get(c));
        }
    }
    out.push_str("# HELP llmvisor_model_ttfb_seconds Time from a proxied request's arrival to the first byte of its answer.\n# TYPE llmvisor_model_ttfb_seconds histogram\n");
    for (m, a) in &all {
        a.ttfb.render(
            out,
            "llmvisor_model_ttfb_seconds",
            &format!("model=\"{}\"", label(m)),
        );
    }
    out.push_str("# HELP llmvisor_model_request_duration_seconds Time from a proxied request's arrival to the end of its answer.\n# TYPE llmvisor_model_request_duration_seconds histogram\n");
    for (m, a) in &all {
        a.duration.render(
            out,
            "llmvisor_model_request_duration_seconds",
            &format!("model=\"{}\"", label(m)),
        );
    }
}

#[derive(Deserialize)]
struct EventsQuery {
    logs: Option<String>,
}

/// `GET /api/events`: see SPEC.md.
async fn events(
    State(st): St,
    Query(q): Query<EventsQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let logs = match q.logs {
        Some(m) => {
            let sink = st.sup.logs(&m)?;
            let id = st.sup.model(&m)?.id.to_string();
            let (backlog, rx) = sink.follow();
            Some((id, backlog, rx))
        }
        None => None,
    };
    let last_seen = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let mut reader = Reader::new(st, last_seen);
    let mut log_rx = None;
    if let Some((id, backlog, rx)) = logs {
        let skip = backlog.len().saturating_sub(LOG_BACKLOG);
        for line in backlog.into_iter().skip(skip) {
            reader.queue.push_back(log_frame(&id, &line));
        }
        log_rx = Some((id, rx));
    }
    reader.logs = log_rx;
    let stream = futures_util::stream::unfold(reader, |mut r| async move {
        let chunk = r.next().await?;
        Some((Ok::<_, std::io::Error>(chunk), r))
    });
    let mut resp = Body::from_stream(stream).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(resp)
}

fn frame(event: &Event) -> Bytes {
    Bytes::from(format!("id: {}\ndata: {}\n\n", event.id, event.json))
}

fn log_frame(model: &str, line: &str) -> Bytes {
    let v = json!({"type": "log", "model": model, "line": line});
    Bytes::from(format!("data: {v}\n\n"))
}

/// One subscriber: frames queued to send, the bus receiver and the optional log receiver.
struct Reader {
    st: Arc<AppState>,
    rx: broadcast::Receiver<Arc<Event>>,
    logs: Option<(String, broadcast::Receiver<String>)>,
    queue: VecDeque<Bytes>,
    ping: tokio::time::Interval,
    /// Its place among the capped readers; cut to make room, or at its age limit.
    place: super::subscribers::Subscription,
    ends_at: tokio::time::Instant,
    ended: bool,
}

impl Reader {
    fn new(st: Arc<AppState>, last_seen: Option<u64>) -> Self {
        let sub = st.events.subscribe(last_seen);
        let mut ping = tokio::time::interval(KEEPALIVE);
        ping.reset();
        let cap = (st.config().http.max_clients / 4).max(1);
        let place = st.subscribers.join(cap, 2 * KEEPALIVE);
        let mut r = Reader {
            st,
            rx: sub.rx,
            logs: None,
            queue: VecDeque::new(),
            ping,
            place,
            ends_at: tokio::time::Instant::now() + super::subscribers::MAX_AGE,
            ended: false,
        };
        match sub.replay {
            Some(missed) => r.queue.extend(missed.iter().map(|e| frame(e))),
            None => r.snapshot(sub.head),
        }
        r
    }

    /// The daemon's facts and every model's state, numbered `head` (resume after it).
    fn snapshot(&mut self, head: u64) {
        let cfg = self.st.config();
        let bus = &self.st.events;
        let facts = json!({
            "version": env!("CARGO_PKG_VERSION"),
            "started_ms": bus.started_ms(),
            "uptime_s": bus.uptime().as_secs(),
            "memory_budget": self.st.sup.memory_budget(),
            "max_loaded": cfg.max_loaded,
            "keys": !cfg.admin_keys.is_empty() || !cfg.api_keys.is_empty(),
        });
        drop(cfg);
        let statuses = self.st.sup.status();
        let mut facts = facts;
        // How many `model` events follow: the snapshot's end.
        facts["models"] = json!(statuses.len());
        let mut frames = vec![events::render(head, "daemon", facts)];
        for s in statuses {
            frames.push(events::render(head, "model", events::model_body(&s)));
        }
        // Recent requests still buffered, so a new page shows some history (numbered `head` too:
        // a resume never goes back).
        let recent = self.st.events.recent("request", RECENT_REQUESTS);
        frames.extend(
            recent
                .iter()
                .filter(|e| e.id <= head)
                .map(|e| e.json.clone()),
        );
        for json in frames {
            self.queue
                .push_back(Bytes::from(format!("id: {head}\ndata: {json}\n\n")));
        }
    }

    /// A last `lagged` event that says the stream ends, then its end.
    fn end(&mut self, why: &str) {
        let v = json!({"type": "lagged", "missed": 0, "cut": true, "reason": why});
        self.queue.push_back(Bytes::from(format!("data: {v}\n\n")));
        self.ended = true;
    }

    async fn next(&mut self) -> Option<Bytes> {
        self.place.pulled();
        loop {
            if let Some(b) = self.queue.pop_front() {
                return Some(b);
            }
            if self.ended {
                return None;
            }
            let log = async {
                match self.logs.as_mut() {
                    Some((_, rx)) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = self.rx.recv() => match r {
                    Ok(e) => return Some(frame(&e)),
                    Err(RecvError::Lagged(n)) => {
                        // Too slow: say so, and start over from a fresh snapshot.
                        let sub = self.st.events.subscribe(None);
                        self.rx = sub.rx;
                        let v = json!({"type": "lagged", "missed": n});
                        self.queue.push_back(Bytes::from(format!("data: {v}\n\n")));
                        self.snapshot(sub.head);
                    }
                    Err(RecvError::Closed) => return None,
                },
                l = log => match l {
                    Ok(line) => {
                        let model = self.logs.as_ref().map(|(m, _)| m.clone()).unwrap_or_default();
                        return Some(log_frame(&model, &line));
                    }
                    Err(RecvError::Lagged(n)) => {
                        let model = self.logs.as_ref().map(|(m, _)| m.clone()).unwrap_or_default();
                        return Some(log_frame(&model, &format!("llmvisor: … {n} lines skipped (reader too slow)")));
                    }
                    Err(RecvError::Closed) => self.logs = None,
                },
                _ = self.ping.tick() => return Some(Bytes::from_static(b": keep-alive\n\n")),
                // The end of this stream: resume with Last-Event-ID.
                () = self.place.cut.notified() => self.end("too many readers: the most silent or oldest is cut"),
                () = tokio::time::sleep_until(self.ends_at) => self.end("the stream's age limit: reconnect"),
            }
        }
    }
}
