//! The event stream behind `GET /api/events`, `/ui/` and `llmvisor top`.
//!
//! [`EventBus`] numbers every event (ids increase by one, from 1), keeps the last
//! [`REPLAY_EVENTS`] for `Last-Event-ID`, and fans them out on a bounded broadcast: a reader that
//! stops reading costs at most the channel's fixed capacity (shared by all readers) and never
//! slows the publisher; it is told it lagged and starts over from a snapshot.
//!
//! [`attach`] feeds the bus from a [`Supervisor`]: `model` events from its phase changes, `progress`
//! parsed from each server's own output while it starts, `queue` when who waits for room changes.
//! [`RequestObserver`] (held by the proxy's response body) gives one `request` event per answer.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::metrics::Histogram;
use crate::supervisor::{ModelStatus, Phase, Supervisor};

/// Events kept for `Last-Event-ID` resumption.
pub const REPLAY_EVENTS: usize = 1024;
/// Events buffered between the publisher and the slowest reader (shared by all readers).
pub const FANOUT_EVENTS: usize = 512;
/// Bytes of a non-streamed answer kept to read its `usage`; a line of a streamed one likewise.
const USAGE_SCAN_CAP: usize = 256 * 1024;
/// Buckets (seconds) of the time-to-first-byte and request duration histograms.
pub const REQUEST_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
/// Requests remembered per model for the requests-per-minute figure.
const RECENT_WINDOW: Duration = Duration::from_secs(60);

/// One numbered event, serialised once for every reader.
#[derive(Debug)]
pub struct Event {
    pub id: u64,
    /// Its `type`.
    pub kind: String,
    /// The JSON object (with `id` and `type`).
    pub json: String,
}

struct Ring {
    next_id: u64,
    events: VecDeque<Arc<Event>>,
}

pub struct EventBus {
    ring: Mutex<Ring>,
    tx: broadcast::Sender<Arc<Event>>,
    started: SystemTime,
    started_at: Instant,
    pub activity: Activity,
}

/// What a new reader gets: the events it missed (when it resumes), and the live receiver.
pub struct Subscription {
    /// `Some`: every event after the reader's `Last-Event-ID`, in order. `None`: start from a
    /// snapshot (no id given, or the id is no longer buffered).
    pub replay: Option<Vec<Arc<Event>>>,
    /// The id of the last event published before this subscription (a snapshot's id).
    pub head: u64,
    pub rx: broadcast::Receiver<Arc<Event>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

impl EventBus {
    pub fn new() -> Self {
        Self {
            ring: Mutex::new(Ring {
                next_id: 1,
                events: VecDeque::with_capacity(REPLAY_EVENTS),
            }),
            tx: broadcast::channel(FANOUT_EVENTS).0,
            started: SystemTime::now(),
            started_at: Instant::now(),
            activity: Activity::default(),
        }
    }

    /// Milliseconds since the Unix epoch when the bus (the daemon) started.
    pub fn started_ms(&self) -> u64 {
        self.started
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    pub fn uptime(&self) -> Duration {
        self.started_at.elapsed()
    }

    /// Publishes an event of `kind` with the fields of `body` (a JSON object: a `json!` value or
    /// a struct); returns its id.
    pub fn publish(&self, kind: &str, body: impl Serialize) -> u64 {
        let mut ring = self.ring.lock().unwrap();
        let id = ring.next_id;
        ring.next_id += 1;
        let event = Arc::new(Event {
            id,
            kind: kind.to_owned(),
            json: render(id, kind, body),
        });
        if ring.events.len() == REPLAY_EVENTS {
            ring.events.pop_front();
        }
        ring.events.push_back(event.clone());
        // Under the ring lock, so readers see events in id order.
        let _ = self.tx.send(event);
        id
    }

    /// The id of the last event published (0: none yet).
    pub fn head(&self) -> u64 {
        self.ring.lock().unwrap().next_id - 1
    }

    /// A new reader; `last_seen`: its `Last-Event-ID`.
    pub fn subscribe(&self, last_seen: Option<u64>) -> Subscription {
        let ring = self.ring.lock().unwrap();
        let head = ring.next_id - 1;
        let rx = self.tx.subscribe();
        let replay = last_seen.and_then(|last| {
            if last > head {
                return None; // from another daemon's life
            }
            let oldest = ring.events.front().map_or(head + 1, |e| e.id);
            (last + 1 >= oldest).then(|| {
                ring.events
                    .iter()
                    .filter(|e| e.id > last)
                    .cloned()
                    .collect()
            })
        });
        Subscription { replay, head, rx }
    }

    /// The last `n` buffered events of type `kind`, oldest first (a snapshot's recent requests).
    pub fn recent(&self, kind: &str, n: usize) -> Vec<Arc<Event>> {
        let ring = self.ring.lock().unwrap();
        let mut v: Vec<_> = ring
            .events
            .iter()
            .rev()
            .filter(|e| e.kind == kind)
            .take(n)
            .cloned()
            .collect();
        v.reverse();
        v
    }

    /// Readers connected now.
    pub fn readers(&self) -> usize {
        self.tx.receiver_count()
    }
}

/// The JSON of one event: `{"id":…,"type":…,"time":…, …body}`, written straight from `body`
/// (no intermediate tree: a `request` event is rendered for every proxied request).
pub fn render(id: u64, kind: &str, body: impl Serialize) -> String {
    #[derive(Serialize)]
    struct Envelope<'a, B> {
        id: u64,
        #[serde(rename = "type")]
        kind: &'a str,
        time: u64,
        #[serde(flatten)]
        body: B,
    }
    let event = Envelope {
        id,
        kind,
        time: now_ms(),
        body,
    };
    // Serialising plain fields and a JSON object cannot fail; a body that is not an object is
    // a bug, shown as an event without it rather than as a panic.
    serde_json::to_string(&event).unwrap_or_else(|e| {
        format!(
            r#"{{"id":{id},"type":{},"error":{}}}"#,
            json!(kind),
            json!(e.to_string())
        )
    })
}

/// The body of a `model` event.
pub fn model_body(status: &ModelStatus) -> Value {
    json!({"model": status.id, "status": status})
}

// ---------------------------------------------------------------------------------------------
// Load progress from a server's output

/// Where a start is, read from one line of the server's output: `(percent, stage)`. Knows
/// llama-server's lines (model load, tensors, context, warm-up, listening) and fake-llm's.
pub fn progress_of(line: &str) -> Option<(u8, &'static str)> {
    let l = line.to_ascii_lowercase();
    let table: &[(&str, u8, &'static str)] = &[
        ("server is listening", 100, "listening"),
        ("listening on http", 100, "listening"),
        ("model loaded", 95, "model loaded"),
        ("warming up", 85, "warming up"),
        ("warmup", 85, "warming up"),
        ("initializing, n_slots", 80, "initializing slots"),
        ("llama_context", 70, "creating context"),
        ("kv_cache", 70, "creating context"),
        ("threadpool init", 60, "creating context"),
        ("load_tensors", 40, "loading tensors"),
        ("loading tensors", 40, "loading tensors"),
        ("print_info", 25, "reading metadata"),
        ("llama_model_loader", 20, "reading metadata"),
        ("loading model", 10, "loading model"),
        ("starting, pid", 5, "process started"),
        ("initializing", 5, "process started"),
    ];
    table
        .iter()
        .find(|(needle, _, _)| l.contains(needle))
        .map(|&(_, p, s)| (p, s))
}

// ---------------------------------------------------------------------------------------------
// Feeding the bus from a supervisor

/// Spawns the tasks that feed `bus` from `sup`: model, progress and queue events. They end when
/// the bus is dropped.
pub fn attach(sup: Supervisor, bus: &Arc<EventBus>) {
    let progress: Arc<Mutex<HashMap<String, u8>>> = Arc::default();
    // Model events, in the order the actors made them.
    let mut changes = sup.changes();
    let weak = Arc::downgrade(bus);
    let prog = progress.clone();
    let sup2 = sup.clone();
    tokio::spawn(async move {
        // The last status sent per model: a transition the outside cannot tell apart
        // (Admitting → Starting are both `starting`) is not sent twice.
        let mut last: HashMap<String, ModelStatus> = HashMap::new();
        // Evictions counted per model at its last event; models whose last stop was a crash.
        let mut evicted: HashMap<String, u64> = HashMap::new();
        let mut crashed: std::collections::HashSet<String> = Default::default();
        loop {
            let status = changes.recv().await;
            let Some(bus) = weak.upgrade() else { return };
            match status {
                Ok(status) => {
                    let mut p = prog.lock().unwrap();
                    match status.state {
                        Phase::Starting if !p.contains_key(&status.id) => {
                            p.insert(status.id.clone(), 0);
                        }
                        Phase::Starting => {}
                        _ => {
                            p.remove(&status.id);
                        }
                    }
                    drop(p);
                    let prev = last.get(&status.id);
                    if prev != Some(&status) {
                        let evictions = sup2
                            .model(&status.id)
                            .map(|c| c.counters().evictions)
                            .unwrap_or(0);
                        let seen = evicted.insert(status.id.clone(), evictions).unwrap_or(0);
                        let was_crash = crashed.remove(&status.id);
                        let reason =
                            reason_of(prev.map(|p| p.state), &status, evictions > seen, was_crash);
                        if reason == Some("crashed") {
                            crashed.insert(status.id.clone());
                        }
                        let mut body = model_body(&status);
                        body["reason"] = json!(reason);
                        bus.publish("model", body);
                        last.insert(status.id.clone(), status);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Changes were missed: send every model's state as it is now.
                    for s in sup2.status() {
                        bus.publish("model", model_body(&s));
                        last.insert(s.id.clone(), s);
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    // `kv_persist` saves and restores, as the stop and start tasks report them.
    let mut kv = sup.kv_events();
    let weak = Arc::downgrade(bus);
    tokio::spawn(async move {
        loop {
            let event = kv.recv().await;
            let Some(bus) = weak.upgrade() else { return };
            match event {
                Ok(e) => {
                    bus.publish(e.kind, &e);
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    // Progress followers per model (new models after a reload too) and queue changes.
    let weak = Arc::downgrade(bus);
    tokio::spawn(async move {
        let mut followed: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
        let mut queues: HashMap<String, (usize, Option<String>)> = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(bus) = weak.upgrade() else { break };
            let statuses = sup.status();
            followed.retain(|id, task| {
                let keep = statuses.iter().any(|s| &s.id == id);
                if !keep {
                    task.abort();
                }
                keep
            });
            for s in &statuses {
                if !followed.contains_key(&s.id) {
                    if let Ok(sink) = sup.logs(&s.id) {
                        let task = follow_progress(
                            s.id.clone(),
                            sink,
                            Arc::downgrade(&bus),
                            progress.clone(),
                        );
                        followed.insert(s.id.clone(), task);
                    }
                }
                let now = (s.queued, s.wait_reason.clone());
                let before = queues.insert(s.id.clone(), now.clone());
                if before.unwrap_or((0, None)) != now {
                    bus.publish(
                        "queue",
                        json!({"model": s.id, "queued": now.0, "wait_reason": now.1}),
                    );
                }
            }
        }
        for (_, t) in followed {
            t.abort();
        }
    });
}

/// Why a model changed, where the change tells: `evicted` (stopping for another model's room),
/// `crashed` (its server went away while ready), `start_failed`, `restart` (starting after a
/// crash). None otherwise (a load, an unload, an idle stop).
fn reason_of(
    prev: Option<Phase>,
    now: &ModelStatus,
    evicted: bool,
    after_crash: bool,
) -> Option<&'static str> {
    match (prev, now.state) {
        (_, Phase::Stopping) if evicted => Some("evicted"),
        (Some(Phase::Ready), Phase::Stopped | Phase::Failed) => Some("crashed"),
        (Some(Phase::Starting), Phase::Failed) => Some("start_failed"),
        (_, Phase::Starting) if after_crash => Some("restart"),
        _ => None,
    }
}

fn follow_progress(
    model: String,
    sink: Arc<crate::logs::LogSink>,
    bus: std::sync::Weak<EventBus>,
    progress: Arc<Mutex<HashMap<String, u8>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (_, mut rx) = sink.follow();
        loop {
            let line = match rx.recv().await {
                Ok(l) => l,
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            };
            let Some((percent, stage)) = progress_of(&line) else {
                continue;
            };
            // Only while starting, and never backwards within one start.
            let publish = {
                let mut p = progress.lock().unwrap();
                match p.get_mut(&model) {
                    Some(cur) if percent > *cur => {
                        *cur = percent;
                        true
                    }
                    _ => false,
                }
            };
            if publish {
                let Some(bus) = bus.upgrade() else { return };
                bus.publish(
                    "progress",
                    json!({"model": model, "percent": percent, "stage": stage}),
                );
            }
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Request activity

/// Per-model request figures for `/metrics`, `llmvisor ps` and the dashboard.
#[derive(Default)]
pub struct Activity {
    models: Mutex<HashMap<String, Arc<ModelActivity>>>,
}

pub struct ModelActivity {
    inner: Mutex<ActivityCounts>,
    pub ttfb: Histogram,
    pub duration: Histogram,
}

#[derive(Default, Clone)]
pub struct ActivityCounts {
    /// Finished requests by status code.
    pub by_status: std::collections::BTreeMap<u16, u64>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub last_tokens_per_s: Option<f64>,
    /// Requests finished per second of the last minute, oldest first: a fixed size whatever
    /// the request rate (one entry per request would be a million at 20,000 requests/s).
    recent: VecDeque<(Instant, usize)>,
}

impl ActivityCounts {
    /// Requests finished in the last minute (to the second).
    pub fn per_minute(&self) -> usize {
        self.recent
            .iter()
            .filter(|(t, _)| t.elapsed() <= RECENT_WINDOW)
            .map(|(_, n)| n)
            .sum()
    }

    fn count_finished(&mut self, now: Instant) {
        match self.recent.back_mut() {
            Some((second, n)) if now.duration_since(*second) < Duration::from_secs(1) => *n += 1,
            _ => self.recent.push_back((now, 1)),
        }
        while self
            .recent
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > RECENT_WINDOW)
        {
            self.recent.pop_front();
        }
    }
}

impl Activity {
    pub fn model(&self, id: &str) -> Arc<ModelActivity> {
        let mut models = self.models.lock().unwrap();
        if let Some(a) = models.get(id) {
            return a.clone();
        }
        models
            .entry(id.to_owned())
            .or_insert_with(|| {
                Arc::new(ModelActivity {
                    inner: Mutex::default(),
                    ttfb: Histogram::new(REQUEST_BOUNDS),
                    duration: Histogram::new(REQUEST_BOUNDS),
                })
            })
            .clone()
    }

    /// Every model with activity, by id.
    pub fn all(&self) -> Vec<(String, Arc<ModelActivity>)> {
        let mut v: Vec<_> = self
            .models
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

impl ModelActivity {
    pub fn counts(&self) -> ActivityCounts {
        self.inner.lock().unwrap().clone()
    }

    fn record(&self, r: &RequestSummary) {
        if let Some(t) = r.ttfb {
            self.ttfb.observe(t);
        }
        self.duration.observe(r.duration);
        let mut c = self.inner.lock().unwrap();
        *c.by_status.entry(r.status).or_default() += 1;
        c.prompt_tokens += r.prompt_tokens.unwrap_or(0);
        c.completion_tokens += r.completion_tokens.unwrap_or(0);
        if r.tokens_per_s.is_some() {
            c.last_tokens_per_s = r.tokens_per_s;
        }
        c.count_finished(Instant::now());
    }
}

/// What one finished request did.
#[derive(Debug, Clone, Default)]
pub struct RequestSummary {
    pub status: u16,
    pub duration: Duration,
    pub ttfb: Option<Duration>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub tokens_per_s: Option<f64>,
    /// The answer ended before its end (client gone or upstream failed).
    pub cut: bool,
}

/// Watches one proxied answer pass (without holding it back) and, when dropped, records it and
/// publishes its `request` event. Reads `usage` (OpenAI) and `timings` (llama-server) from a
/// whole JSON answer or from the SSE chunks of a streamed one.
pub struct RequestObserver {
    bus: Arc<EventBus>,
    model: String,
    route: String,
    method: String,
    status: u16,
    began: Instant,
    first_byte: Option<Instant>,
    sse: bool,
    /// The current SSE line, or the whole answer so far; emptied and disabled past the cap.
    buf: Vec<u8>,
    overflow: bool,
    finished: bool,
    usage: Usage,
    /// After a `kv_persist` restore: where this answer's `timings` go.
    kv_check: Option<crate::supervisor::KvCheck>,
}

#[derive(Default, Debug)]
struct Usage {
    prompt: Option<u64>,
    completion: Option<u64>,
    per_s: Option<f64>,
    /// llama-server's `timings`: tokens taken from its cache, and evaluated.
    cache_n: Option<u64>,
    prompt_n: Option<u64>,
}

/// The fields of an answer (or of one SSE chunk) that carry token counts, read without building
/// the rest of the document: every other field is skipped as it is parsed.
#[derive(serde::Deserialize)]
struct Counted {
    usage: Option<CountedUsage>,
    timings: Option<CountedTimings>,
}

#[derive(serde::Deserialize)]
struct CountedUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
}

#[derive(serde::Deserialize)]
struct CountedTimings {
    cache_n: Option<u64>,
    prompt_n: Option<u64>,
    predicted_n: Option<u64>,
    predicted_per_second: Option<f64>,
}

impl Usage {
    /// Reads the counts of one JSON document; one without `usage` or `timings` is not parsed.
    fn scan(&mut self, json: &[u8]) {
        let has = |needle: &[u8]| json.windows(needle.len()).any(|w| w == needle);
        if !has(b"\"usage\"") && !has(b"\"timings\"") {
            return;
        }
        match serde_json::from_slice::<Counted>(json) {
            Ok(c) => self.read(c),
            // Odd shapes (`"usage": null`, a count as a float): the lenient, slower way.
            Err(_) => {
                if let Ok(v) = serde_json::from_slice::<Value>(json) {
                    self.read_value(&v);
                }
            }
        }
    }

    fn read(&mut self, c: Counted) {
        if let Some(u) = c.usage {
            self.prompt = u.prompt_tokens.or(self.prompt);
            self.completion = u.completion_tokens.or(self.completion);
        }
        if let Some(t) = c.timings {
            self.cache_n = t.cache_n.or(self.cache_n);
            self.prompt_n = t.prompt_n.or(self.prompt_n);
            if let Some(n) = t.prompt_n {
                self.prompt.get_or_insert(n);
            }
            if let Some(n) = t.predicted_n {
                self.completion.get_or_insert(n);
            }
            self.per_s = t.predicted_per_second.or(self.per_s);
        }
    }

    fn read_value(&mut self, v: &Value) {
        let field = |obj: &str, key: &str| v.get(obj).filter(|o| o.is_object())?.get(key).cloned();
        self.read(Counted {
            usage: Some(CountedUsage {
                prompt_tokens: field("usage", "prompt_tokens").and_then(|n| n.as_u64()),
                completion_tokens: field("usage", "completion_tokens").and_then(|n| n.as_u64()),
            }),
            timings: Some(CountedTimings {
                cache_n: field("timings", "cache_n").and_then(|n| n.as_u64()),
                prompt_n: field("timings", "prompt_n").and_then(|n| n.as_u64()),
                predicted_n: field("timings", "predicted_n").and_then(|n| n.as_u64()),
                predicted_per_second: field("timings", "predicted_per_second")
                    .and_then(|n| n.as_f64()),
            }),
        });
    }
}

impl RequestObserver {
    pub fn new(
        bus: Arc<EventBus>,
        model: &str,
        route: &str,
        method: &str,
        status: u16,
        began: Instant,
        sse: bool,
    ) -> Self {
        Self {
            bus,
            model: model.to_owned(),
            route: route.split('?').next().unwrap_or(route).to_owned(),
            method: method.to_owned(),
            status,
            began,
            first_byte: None,
            sse,
            buf: Vec::new(),
            overflow: false,
            finished: false,
            usage: Usage::default(),
            kv_check: None,
        }
    }

    /// Hands this answer's llama-server `timings` to a pending KV reuse check when it ends.
    pub fn check_kv_reuse(&mut self, check: Option<crate::supervisor::KvCheck>) {
        self.kv_check = check;
    }

    /// Publishes the `request` event of a request that got no answer from its server (`status`:
    /// what the client got instead, e.g. 502).
    pub fn failed(
        bus: &Arc<EventBus>,
        model: &str,
        route: &str,
        method: &str,
        status: u16,
        began: Instant,
    ) {
        let mut o = RequestObserver::new(bus.clone(), model, route, method, status, began, false);
        o.finish();
    }

    /// A chunk of the answer on its way to the client.
    pub fn data(&mut self, chunk: &[u8]) {
        if self.first_byte.is_none() && !chunk.is_empty() {
            self.first_byte = Some(Instant::now());
        }
        if !self.sse {
            if !self.overflow {
                if self.buf.len() + chunk.len() > USAGE_SCAN_CAP {
                    self.overflow = true;
                    self.buf = Vec::new();
                } else {
                    self.buf.extend_from_slice(chunk);
                }
            }
            return;
        }
        let mut rest = chunk;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            if !self.overflow {
                self.buf.extend_from_slice(&rest[..i]);
                self.sse_line();
            }
            self.buf.clear();
            self.overflow = false;
            rest = &rest[i + 1..];
        }
        if !self.overflow {
            if self.buf.len() + rest.len() > USAGE_SCAN_CAP {
                self.overflow = true;
                self.buf.clear();
            } else {
                self.buf.extend_from_slice(rest);
            }
        }
    }

    fn sse_line(&mut self) {
        let Some(data) = self.buf.strip_prefix(b"data:") else {
            return;
        };
        self.usage.scan(data.trim_ascii());
    }

    /// The answer ended normally.
    pub fn finish(&mut self) {
        self.finished = true;
    }

    fn summary(&mut self) -> RequestSummary {
        if self.sse {
            self.sse_line();
        } else if !self.overflow && !self.buf.is_empty() {
            self.usage.scan(&self.buf);
        }
        let duration = self.began.elapsed();
        let ttfb = self.first_byte.map(|t| t.duration_since(self.began));
        let per_s = self.usage.per_s.or_else(|| {
            let n = self.usage.completion? as f64;
            // Generation time: from the first byte when streamed, else the whole request.
            let gen = match (self.sse, ttfb) {
                (true, Some(t)) if duration > t => duration - t,
                _ => duration,
            };
            (n > 0.0 && gen.as_secs_f64() > 0.0).then(|| n / gen.as_secs_f64())
        });
        RequestSummary {
            status: self.status,
            duration,
            ttfb,
            prompt_tokens: self.usage.prompt,
            completion_tokens: self.usage.completion,
            tokens_per_s: per_s.map(|r| (r * 10.0).round() / 10.0),
            cut: !self.finished,
        }
    }
}

/// The body of a `request` event.
#[derive(Serialize)]
struct RequestEvent<'a> {
    model: &'a str,
    route: &'a str,
    method: &'a str,
    status: u16,
    duration_ms: f64,
    ttfb_ms: Option<f64>,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    tokens_per_s: Option<f64>,
    cut: bool,
}

impl Drop for RequestObserver {
    fn drop(&mut self) {
        let s = self.summary();
        self.bus.activity.model(&self.model).record(&s);
        if let (Some(check), Some(cache_n), Some(prompt_n)) =
            (&self.kv_check, self.usage.cache_n, self.usage.prompt_n)
        {
            check.observe(cache_n, prompt_n);
        }
        let ms = |d: Duration| (d.as_secs_f64() * 1000.0 * 10.0).round() / 10.0;
        self.bus.publish(
            "request",
            RequestEvent {
                model: &self.model,
                route: &self.route,
                method: &self.method,
                status: s.status,
                duration_ms: ms(s.duration),
                ttfb_ms: s.ttfb.map(ms),
                prompt_tokens: s.prompt_tokens,
                completion_tokens: s.completion_tokens,
                tokens_per_s: s.tokens_per_s,
                cut: s.cut,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_increase_and_resume_replays_only_what_was_missed() {
        let bus = EventBus::new();
        for i in 0..5 {
            bus.publish("x", json!({"n": i}));
        }
        let sub = bus.subscribe(Some(3));
        let ids: Vec<u64> = sub.replay.unwrap().iter().map(|e| e.id).collect();
        assert_eq!(ids, [4, 5]);
        assert_eq!(sub.head, 5);
        assert!(bus.subscribe(None).replay.is_none());
        assert!(
            bus.subscribe(Some(99)).replay.is_none(),
            "id from the future"
        );
        for i in 0..REPLAY_EVENTS {
            bus.publish("x", json!({"n": i}));
        }
        assert!(
            bus.subscribe(Some(1)).replay.is_none(),
            "no longer buffered"
        );
    }

    #[test]
    fn llama_server_lines_give_rising_progress() {
        let lines = [
            "0.00.008.217 I srv    load_model: loading model '/m.gguf'",
            "0.07.883.924 I cmn          init: llama threadpool init, n_threads = 2",
            "0.11.646.287 I srv    load_model: initializing, n_slots = 4, n_ctx_slot = 32768",
            "0.11.661.367 I srv  llama_server: model loaded",
            "0.11.661.382 I srv  llama_server: listening on http://127.0.0.1:18999",
        ];
        let p: Vec<u8> = lines.iter().map(|l| progress_of(l).unwrap().0).collect();
        assert_eq!(p, [10, 60, 80, 95, 100]);
        assert_eq!(progress_of("some other line"), None);
    }

    #[test]
    fn usage_is_read_from_split_sse_chunks_and_whole_answers() {
        let bus = Arc::new(EventBus::new());
        let mut sub = bus.subscribe(None);
        {
            let mut o = RequestObserver::new(
                bus.clone(),
                "m",
                "/v1/chat/completions",
                "POST",
                200,
                Instant::now(),
                true,
            );
            o.data(b"data: {\"choices\":[]}\n\ndata: {\"usage\":{\"prompt_");
            o.data(b"tokens\":3,\"completion_tokens\":7}}\n\ndata: [DONE]\n\n");
            o.finish();
        }
        let e = sub.rx.try_recv().unwrap();
        let v: Value = serde_json::from_str(&e.json).unwrap();
        assert_eq!(v["type"], "request");
        assert_eq!(v["prompt_tokens"], 3);
        assert_eq!(v["completion_tokens"], 7);
        assert_eq!(v["cut"], false);
        {
            let mut o = RequestObserver::new(
                bus.clone(),
                "m",
                "/v1/x?a=1",
                "POST",
                200,
                Instant::now(),
                false,
            );
            o.data(br#"{"usage":{"prompt_tokens":2,"completion_tokens":4},"timings":{"predicted_per_second":51.25}}"#);
        }
        let v: Value = serde_json::from_str(&sub.rx.try_recv().unwrap().json).unwrap();
        assert_eq!(v["route"], "/v1/x");
        assert_eq!(v["completion_tokens"], 4);
        assert_eq!(v["tokens_per_s"], 51.3);
        assert_eq!(v["cut"], true);
        let c = bus.activity.model("m").counts();
        assert_eq!(c.by_status[&200], 2);
        assert_eq!((c.prompt_tokens, c.completion_tokens), (5, 11));
        assert_eq!(c.per_minute(), 2);
    }

    #[test]
    fn odd_usage_shapes_are_read_leniently_and_others_are_not_parsed() {
        let scan = |json: &[u8]| {
            let mut u = Usage::default();
            u.scan(json);
            (u.prompt, u.completion, u.per_s)
        };
        // `usage: null` beside llama-server's timings: the typed read fails, the lenient one
        // still finds the timings.
        assert_eq!(
            scan(br#"{"usage":null,"timings":{"prompt_n":5,"predicted_n":9,"predicted_per_second":2.5}}"#),
            (Some(5), Some(9), Some(2.5))
        );
        // a float count is no count; the other one stays
        assert_eq!(
            scan(br#"{"usage":{"prompt_tokens":1.5,"completion_tokens":2}}"#),
            (None, Some(2), None)
        );
        // usage wins over timings for the counts
        assert_eq!(
            scan(br#"{"timings":{"prompt_n":1,"predicted_n":1},"usage":{"prompt_tokens":3,"completion_tokens":4},"x":[{"y":{}}]}"#),
            (Some(3), Some(4), None)
        );
        assert_eq!(
            scan(br#"{"choices":[{"text":"usage"}]}"#),
            (None, None, None)
        );
        assert_eq!(scan(b"not json \"usage\""), (None, None, None));
    }

    #[test]
    fn an_event_is_its_envelope_then_the_fields_of_its_body() {
        #[derive(Serialize)]
        struct Body<'a> {
            model: &'a str,
            n: Option<u64>,
        }
        let typed = render(
            7,
            "request",
            Body {
                model: "m",
                n: None,
            },
        );
        let v: Value = serde_json::from_str(&typed).unwrap();
        assert_eq!(
            (v["id"].clone(), v["type"].clone()),
            (json!(7), json!("request"))
        );
        assert!(v["time"].as_u64().unwrap() > 1_600_000_000_000);
        assert_eq!(
            (v["model"].clone(), v["n"].clone()),
            (json!("m"), Value::Null)
        );
        assert!(
            typed.starts_with(r#"{"id":7,"type":"request","time":"#),
            "{typed}"
        );
        let untyped: Value =
            serde_json::from_str(&render(8, "model", json!({"model": "m", "n": null}))).unwrap();
        assert_eq!(untyped["model"], "m");
        assert_eq!(untyped.as_object().unwrap().len(), 5);
    }

    #[test]
    fn requests_per_minute_counts_whole_seconds_in_fixed_space() {
        let mut c = ActivityCounts::default();
        let t0 = Instant::now();
        for i in 0..10_000u64 {
            c.count_finished(t0 + Duration::from_micros(i * 10)); // 10,000 in 0.1 s
        }
        assert_eq!(c.recent.len(), 1);
        c.count_finished(t0 + Duration::from_secs(30));
        assert_eq!(c.recent.len(), 2);
        // a minute and a bit later the first second has left the window
        c.count_finished(t0 + Duration::from_secs(61));
        assert_eq!(c.recent.len(), 2);
        assert_eq!(c.recent.iter().map(|(_, n)| n).sum::<usize>(), 2);
    }
}
