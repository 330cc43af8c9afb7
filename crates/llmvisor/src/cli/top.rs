//! `llmvisor top`: a terminal view of the daemon's event stream (`GET /api/events`), redrawn in
//! place; `q` quits. `--once` prints one frame after the snapshot and exits (scripts, tests).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use http::Method;
use http_body_util::BodyExt;
use serde_json::Value;

use super::client::Daemon;

/// Requests listed at the bottom.
const RECENT: usize = 8;
/// The screen is redrawn at most this often while events pour in.
const REDRAW: Duration = Duration::from_millis(250);

/// What the view knows, built from events.
#[derive(Default)]
pub struct View {
    facts: Value,
    /// When the daemon event came (uptime keeps counting from there).
    facts_at: Option<Instant>,
    models: BTreeMap<String, Value>,
    progress: HashMap<String, (u64, String)>,
    requests: VecDeque<Value>,
    counts: HashMap<String, (u64, Option<f64>)>,
    pub snapshot_done: bool,
}

impl View {
    /// Takes one event (the JSON object of a `data:` line).
    pub fn apply(&mut self, ev: &Value) {
        let model = ev["model"].as_str().unwrap_or_default().to_owned();
        match ev["type"].as_str() {
            Some("daemon") => {
                self.facts = ev.clone();
                self.facts_at = Some(Instant::now());
            }
            Some("model") => {
                if ev["status"]["state"] != "starting" {
                    self.progress.remove(&model);
                }
                self.models.insert(model, ev["status"].clone());
            }
            Some("progress") => {
                let p = ev["percent"].as_u64().unwrap_or(0);
                let stage = ev["stage"].as_str().unwrap_or_default().to_owned();
                self.progress.insert(model, (p, stage));
            }
            Some("queue") => {
                if let Some(m) = self.models.get_mut(&model) {
                    m["queued"] = ev["queued"].clone();
                    m["wait_reason"] = ev["wait_reason"].clone();
                }
            }
            Some("request") => {
                let c = self.counts.entry(model).or_default();
                c.0 += 1;
                if let Some(t) = ev["tokens_per_s"].as_f64() {
                    c.1 = Some(t);
                }
                self.requests.push_front(ev.clone());
                self.requests.truncate(RECENT);
            }
            _ => {}
        }
    }

    /// The screen's text (no escape codes).
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let f = &self.facts;
        let _ = writeln!(
            out,
            "llmvisor {}  up {}s  models {}   (q quits)",
            f["version"].as_str().unwrap_or("?"),
            f["uptime_s"].as_u64().unwrap_or(0)
                + self.facts_at.map_or(0, |t| t.elapsed().as_secs()),
            self.models.len()
        );
        let _ = writeln!(
            out,
            "\n{:<24} {:<9} {:>7} {:>6} {:>6} {:>8} {:>6} {:>8} {:>21} {:>4}  NOTE",
            "MODEL",
            "STATE",
            "PID",
            "LEASES",
            "QUEUE",
            "RESTARTS",
            "REQS",
            "TOK/S",
            "MEMORY EST / MEAS",
            "GPU"
        );
        for (id, m) in &self.models {
            let (reqs, tps) = self.counts.get(id).cloned().unwrap_or_default();
            let note = if let Some((p, stage)) = self.progress.get(id) {
                format!("{p:>3}% {stage}")
            } else if let Some(r) = m["wait_reason"].as_str() {
                r.to_owned()
            } else if let Some(e) = m["error"].as_str() {
                e.lines()
                    .next()
                    .unwrap_or_default()
                    .chars()
                    .take(60)
                    .collect()
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "{:<24} {:<9} {:>7} {:>6} {:>6} {:>8} {:>6} {:>8} {:>21} {:>4}  {}",
                id,
                m["state"].as_str().unwrap_or("-"),
                m["pid"].as_u64().map_or("-".into(), |p| p.to_string()),
                m["leases"].as_u64().unwrap_or(0),
                m["queued"].as_u64().unwrap_or(0),
                m["restarts"].as_u64().unwrap_or(0),
                reqs,
                tps.map_or("-".into(), |t| format!("{t:.1}")),
                memory_cell(m),
                gpu_cell(m),
                note
            );
        }
        let _ = writeln!(out, "\nRECENT REQUESTS");
        for r in &self.requests {
            let _ = writeln!(
                out,
                "{:<24} {:<28} {:>3} {:>9.1}ms  {}/{} tokens  {} tok/s",
                r["model"].as_str().unwrap_or("-"),
                r["route"].as_str().unwrap_or("-"),
                r["status"].as_u64().unwrap_or(0),
                r["duration_ms"].as_f64().unwrap_or(0.0),
                r["prompt_tokens"]
                    .as_u64()
                    .map_or("-".into(), |n| n.to_string()),
                r["completion_tokens"]
                    .as_u64()
                    .map_or("-".into(), |n| n.to_string()),
                r["tokens_per_s"]
                    .as_f64()
                    .map_or("-".into(), |t| format!("{t:.1}")),
            );
        }
        out
    }
}

/// Splits complete SSE blocks off `buf` and returns their JSON objects.
pub fn drain_events(buf: &mut String) -> Vec<Value> {
    let mut out = Vec::new();
    while let Some(i) = buf.find("\n\n") {
        let block: String = buf.drain(..i + 2).collect();
        let data: String = block
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(str::trim)
            .collect();
        if let Ok(v) = serde_json::from_str(&data) {
            out.push(v);
        }
    }
    out
}

/// The terminal in "keys without Enter, no echo" mode until dropped.
struct RawInput {
    saved: Option<libc::termios>,
}

impl RawInput {
    fn enter() -> RawInput {
        // SAFETY: tcgetattr/tcsetattr on fd 0 with a zeroed termios the call fills in.
        unsafe {
            if libc::isatty(0) != 1 {
                return RawInput { saved: None };
            }
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return RawInput { saved: None };
            }
            let saved = t;
            t.c_lflag &= !(libc::ICANON | libc::ECHO);
            t.c_cc[libc::VMIN] = 1;
            t.c_cc[libc::VTIME] = 0;
            libc::tcsetattr(0, libc::TCSANOW, &t);
            RawInput { saved: Some(saved) }
        }
    }
}

impl Drop for RawInput {
    fn drop(&mut self) {
        if let Some(t) = self.saved {
            // SAFETY: restores the settings read in `enter`.
            unsafe {
                libc::tcsetattr(0, libc::TCSANOW, &t);
            }
        }
    }
}

pub async fn run(daemon: &Daemon, once: bool) -> anyhow::Result<ExitCode> {
    let resp = daemon.send(Method::GET, "/api/events").await?;
    let mut body = resp.into_body();
    let mut view = View::default();
    let mut buf = String::new();
    let tty = !once && std::io::IsTerminal::is_terminal(&std::io::stdout());
    let _raw = if tty { Some(RawInput::enter()) } else { None };
    // `q` from a blocking reader thread (it ends with the process).
    let (keys_tx, mut keys) = tokio::sync::mpsc::unbounded_channel::<u8>();
    if tty {
        std::thread::spawn(move || {
            let mut b = [0u8; 1];
            while let Ok(1) = std::io::Read::read(&mut std::io::stdin(), &mut b) {
                if keys_tx.send(b[0]).is_err() {
                    break;
                }
            }
        });
    }
    let mut out = std::io::stdout();
    if tty {
        let _ = write!(out, "\x1b[?1049h\x1b[?25l");
    }
    let mut last_draw = Instant::now() - REDRAW;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let result = loop {
        tokio::select! {
            frame = body.frame() => match frame {
                Some(Ok(f)) => {
                    if let Some(d) = f.data_ref() {
                        buf.push_str(&String::from_utf8_lossy(d));
                        for ev in drain_events(&mut buf) {
                            view.apply(&ev);
                        }
                    }
                }
                Some(Err(e)) => break Err(anyhow::anyhow!("the event stream failed: {e}")),
                None => break Err(anyhow::anyhow!("the daemon closed the event stream")),
            },
            k = keys.recv(), if tty => {
                if matches!(k, Some(b'q') | Some(b'Q') | None) {
                    break Ok(ExitCode::SUCCESS);
                }
            },
            _ = tick.tick() => {},
            _ = tokio::signal::ctrl_c() => break Ok(ExitCode::SUCCESS),
        }
        if once {
            // The snapshot is the daemon event, then its `models` model events; one frame after it.
            let expected = view.facts["models"].as_u64().unwrap_or(u64::MAX) as usize;
            if view.models.len() >= expected {
                let _ = write!(out, "{}", view.render());
                break Ok(ExitCode::SUCCESS);
            }
            continue;
        }
        if last_draw.elapsed() >= REDRAW {
            last_draw = Instant::now();
            let screen = view.render().replace('\n', "\x1b[K\r\n");
            let _ = write!(out, "\x1b[H{screen}\x1b[J");
            let _ = out.flush();
        }
    };
    if tty {
        let _ = write!(out, "\x1b[?25h\x1b[?1049l");
        let _ = out.flush();
    }
    result
}

/// `estimate / measured` of a model's `memory_detail` (`-` for what it lacks).
fn memory_cell(m: &serde_json::Value) -> String {
    let size = |v: &serde_json::Value| {
        v.as_u64()
            .map_or_else(|| "-".to_string(), crate::units::format_size_column)
    };
    let d = &m["memory_detail"];
    format!(
        "{} / {}",
        size(&d["estimate"]["total"]),
        size(&d["measured"]["ram"])
    )
}

/// The GPUs a model runs on (`-` on the CPU).
fn gpu_cell(m: &serde_json::Value) -> String {
    let gpus: Vec<String> = m["gpus"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|g| g.as_u64())
                .map(|g| g.to_string())
                .collect()
        })
        .unwrap_or_default();
    if gpus.is_empty() {
        "-".into()
    } else {
        gpus.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_build_the_screen() {
        let mut buf = String::from(
            "id: 1\ndata: {\"type\":\"daemon\",\"version\":\"0.1.0\",\"uptime_s\":5}\n\n: keep-alive\n\nid: 1\ndata: {\"type\":\"model\",\"model\":\"a\",\"status\":{\"id\":\"a\",\"state\":\"starting\",\"pid\":null,\"leases\":0}}\n\npartial",
        );
        let evs = drain_events(&mut buf);
        assert_eq!(evs.len(), 2);
        assert_eq!(buf, "partial");
        let mut v = View::default();
        for e in &evs {
            v.apply(e);
        }
        v.apply(&json!({"type":"progress","model":"a","percent":40,"stage":"loading tensors"}));
        v.apply(&json!({"type":"request","model":"a","route":"/v1/chat/completions","status":200,"duration_ms":12.5,"prompt_tokens":3,"completion_tokens":9,"tokens_per_s":33.3}));
        let s = v.render();
        assert!(s.starts_with("llmvisor 0.1.0  up 5s  models 1"), "{s}");
        assert!(s.contains(" 40% loading tensors"), "{s}");
        assert!(s.contains("3/9 tokens  33.3 tok/s"), "{s}");
        assert!(
            s.contains("- / -    -"),
            "no estimate, no measurement, no GPU: {s}"
        );
        v.apply(&json!({"type":"model","model":"a","status":{"id":"a","state":"ready","memory_detail":{"estimate":{"total":330_301_440u64},"measured":{"ram":314_572_800u64}},"gpus":[0]}}));
        let s = v.render();
        assert!(s.contains("315.0 MiB / 300.0 MiB    0"), "{s}");
    }
}
