//! Ollama's request and answer shapes ↔ the OpenAI-compatible routes of llama-server.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde_json::{json, Map, Value};

/// Ollama's `options` that llama-server takes under the same meaning (its own names).
const SAMPLING: &[(&str, &str)] = &[
    ("temperature", "temperature"),
    ("top_p", "top_p"),
    ("top_k", "top_k"),
    ("min_p", "min_p"),
    ("typical_p", "typical_p"),
    ("seed", "seed"),
    ("stop", "stop"),
    ("repeat_penalty", "repeat_penalty"),
    ("repeat_last_n", "repeat_last_n"),
    ("presence_penalty", "presence_penalty"),
    ("frequency_penalty", "frequency_penalty"),
    ("mirostat", "mirostat"),
    ("mirostat_tau", "mirostat_tau"),
    ("mirostat_eta", "mirostat_eta"),
];

/// `options` (then the model's Ollama `params` for what the request leaves out) → sampling
/// fields of an OpenAI body. `num_ctx` larger than `server_ctx` is an error.
pub fn options(
    req: &Value,
    defaults: Option<&Map<String, Value>>,
    server_ctx: Option<u64>,
    out: &mut Map<String, Value>,
) -> Result<(), String> {
    let empty = Map::new();
    let given = req
        .get("options")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let pick = |k: &str| given.get(k).or_else(|| defaults.and_then(|d| d.get(k)));
    for (ours, theirs) in SAMPLING {
        if let Some(v) = pick(ours).filter(|v| !v.is_null()) {
            out.insert((*theirs).into(), v.clone());
        }
    }
    if let Some(n) = pick("num_predict")
        .and_then(Value::as_i64)
        .filter(|n| *n >= 0)
    {
        out.insert("max_tokens".into(), json!(n));
    }
    if let (Some(want), Some(have)) = (given.get("num_ctx").and_then(Value::as_u64), server_ctx) {
        if want > have {
            return Err(format!(
                "num_ctx {want} is more than the {have} tokens of context this model's server runs \
                 with (its -c); nothing was cut: start it with a larger context (discovered_args, \
                 or -c in a [models] entry) or send a smaller num_ctx"
            ));
        }
    }
    Ok(())
}

/// `format`: `"json"` or a JSON schema → llama-server's constrained output.
fn format(req: &Value, out: &mut Map<String, Value>) -> Result<(), String> {
    match req.get("format") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(s)) if s.is_empty() => Ok(()),
        Some(Value::String(s)) if s == "json" => {
            out.insert("response_format".into(), json!({"type": "json_object"}));
            Ok(())
        }
        Some(schema @ Value::Object(_)) => {
            out.insert(
                "response_format".into(),
                json!({"type": "json_schema", "json_schema": {"name": "format", "schema": schema}}),
            );
            Ok(())
        }
        Some(other) => Err(format!(
            "format must be \"json\" or a JSON schema, not {other}"
        )),
    }
}

fn image_parts(text: &str, images: &[Value]) -> Result<Value, String> {
    let mut parts = vec![json!({"type": "text", "text": text})];
    for img in images {
        let b64 = img.as_str().ok_or("images must be base64 strings")?;
        parts.push(json!({"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{b64}")}}));
    }
    Ok(Value::Array(parts))
}

/// One Ollama chat message → OpenAI's (images as content parts, tool calls with string
/// arguments).
fn message(m: &Value, vision: bool) -> Result<Value, String> {
    let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
    let text = m.get("content").and_then(Value::as_str).unwrap_or("");
    let images = m
        .get("images")
        .and_then(Value::as_array)
        .filter(|i| !i.is_empty());
    let content = match images {
        Some(_) if !vision => return Err(no_vision()),
        Some(imgs) => image_parts(text, imgs)?,
        None => json!(text),
    };
    let mut out = json!({"role": role, "content": content});
    if let Some(calls) = m.get("tool_calls").and_then(Value::as_array) {
        let calls: Vec<Value> = calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let f = c.get("function").cloned().unwrap_or_default();
                let args = match f.get("arguments") {
                    Some(Value::String(s)) => s.clone(),
                    Some(v) => v.to_string(),
                    None => "{}".into(),
                };
                json!({"id": format!("call_{i}"), "type": "function",
                       "function": {"name": f.get("name").cloned().unwrap_or_default(), "arguments": args}})
            })
            .collect();
        out["tool_calls"] = Value::Array(calls);
    }
    for key in ["tool_call_id", "name"] {
        if let Some(v) = m.get(key) {
            out[key] = v.clone();
        }
    }
    if let Some(name) = m.get("tool_name") {
        out["name"] = name.clone();
    }
    Ok(out)
}

pub fn no_vision() -> String {
    "this model has no vision projector (an mmproj file beside it, or --mmproj in its command); \
     images cannot be read"
        .into()
}

/// What a request gives beyond messages: options, format, tools, think.
fn common(
    req: &Value,
    defaults: Option<&Map<String, Value>>,
    server_ctx: Option<u64>,
    out: &mut Map<String, Value>,
) -> Result<(), String> {
    options(req, defaults, server_ctx, out)?;
    format(req, out)?;
    if let Some(tools) = req.get("tools").filter(|t| !t.is_null()) {
        out.insert("tools".into(), tools.clone());
    }
    if let Some(think) = req.get("think").and_then(Value::as_bool) {
        out.insert(
            "chat_template_kwargs".into(),
            json!({"enable_thinking": think}),
        );
    }
    out.insert("stream".into(), json!(true));
    out.insert("stream_options".into(), json!({"include_usage": true}));
    Ok(())
}

/// The model's facts a request needs.
pub struct Target<'a> {
    pub id: &'a str,
    pub defaults: Option<&'a Map<String, Value>>,
    pub server_ctx: Option<u64>,
    pub vision: bool,
}

/// `/api/chat` → `/v1/chat/completions` (streamed upstream).
pub fn chat(req: &Value, t: &Target<'_>) -> Result<Value, String> {
    let mut out = Map::new();
    out.insert("model".into(), json!(t.id));
    let messages = req
        .get("messages")
        .and_then(Value::as_array)
        .map(|ms| {
            ms.iter()
                .map(|m| message(m, t.vision))
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?
        .unwrap_or_default();
    out.insert("messages".into(), Value::Array(messages));
    common(req, t.defaults, t.server_ctx, &mut out)?;
    Ok(Value::Object(out))
}

/// `/api/generate` → `/v1/completions` for `raw`, else `/v1/chat/completions` with the
/// GGUF's own template (`system` first). Returns the body and the upstream path.
pub fn generate(req: &Value, t: &Target<'_>) -> Result<(Value, &'static str), String> {
    if req
        .get("template")
        .and_then(Value::as_str)
        .is_some_and(|s| !s.is_empty())
    {
        return Err(
            "`template` (a Go template) is not run: llmvisor uses the GGUF's own chat \
                    template; send the prompt already formatted with \"raw\": true instead"
                .into(),
        );
    }
    if req
        .get("suffix")
        .and_then(Value::as_str)
        .is_some_and(|s| !s.is_empty())
    {
        return Err(
            "`suffix` (fill-in-the-middle) is not done through /api/generate: use \
                    llama-server's /infill route (POST /infill with \"model\")"
                .into(),
        );
    }
    let prompt = req.get("prompt").and_then(Value::as_str).unwrap_or("");
    let mut out = Map::new();
    out.insert("model".into(), json!(t.id));
    let raw = req.get("raw").and_then(Value::as_bool).unwrap_or(false);
    let path = if raw {
        if req
            .get("images")
            .and_then(Value::as_array)
            .is_some_and(|i| !i.is_empty())
        {
            return Err("images cannot be sent with \"raw\": true".into());
        }
        out.insert("prompt".into(), json!(prompt));
        "/v1/completions"
    } else {
        let mut messages = Vec::new();
        if let Some(system) = req
            .get("system")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
        {
            messages.push(json!({"role": "system", "content": system}));
        }
        let user = json!({"role": "user", "content": prompt, "images": req.get("images")});
        messages.push(message(&user, t.vision)?);
        out.insert("messages".into(), Value::Array(messages));
        "/v1/chat/completions"
    };
    common(req, t.defaults, t.server_ctx, &mut out)?;
    Ok((Value::Object(out), path))
}

/// `keep_alive`: seconds or a duration (`"5m"`); `0` = stop once idle; negative = never.
/// `Ok(None)` when the request has none.
pub fn keep_alive(req: &Value) -> Result<Option<Option<Duration>>, String> {
    let bad = |v: &Value| format!("keep_alive must be a duration (\"5m\", 300, 0, -1), not {v}");
    match req.get("keep_alive") {
        None | Some(Value::Null) => Ok(None),
        Some(v @ Value::Number(n)) => match n.as_f64() {
            Some(s) if s < 0.0 => Ok(Some(None)),
            Some(s) if s.is_finite() => Ok(Some(Some(Duration::from_secs_f64(s)))),
            _ => Err(bad(v)),
        },
        Some(v @ Value::String(s)) => {
            let s = s.trim();
            if s.starts_with('-') {
                return Ok(Some(None));
            }
            crate::units::parse_duration(s)
                .map(|d| Some(Some(d)))
                .map_err(|_| bad(v))
        }
        Some(v) => Err(bad(v)),
    }
}

/// `2026-12-07T08:40:13.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Which answer shape: `/api/chat`'s `message` or `/api/generate`'s `response`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Generate,
}

/// Turns llama-server's streamed OpenAI chunks into Ollama's objects, keeping what the final
/// object reports (counts, durations, tool calls).
pub struct Reply {
    pub kind: Kind,
    pub model: String,
    pub began: std::time::Instant,
    pub load: Duration,
    /// Accumulate everything into the final object (`"stream": false`).
    pub whole: bool,
    content: String,
    thinking: String,
    tools: BTreeMap<u64, (String, String)>,
    done_reason: Option<String>,
    prompt_n: Option<u64>,
    predicted_n: Option<u64>,
    prompt_ms: f64,
    predicted_ms: f64,
}

fn ns(ms: f64) -> u64 {
    (ms.max(0.0) * 1e6) as u64
}

impl Reply {
    pub fn new(
        kind: Kind,
        model: String,
        began: std::time::Instant,
        load: Duration,
        whole: bool,
    ) -> Self {
        Self {
            kind,
            model,
            began,
            load,
            whole,
            content: String::new(),
            thinking: String::new(),
            tools: BTreeMap::new(),
            done_reason: None,
            prompt_n: None,
            predicted_n: None,
            prompt_ms: 0.0,
            predicted_ms: 0.0,
        }
    }

    fn object(&self, content: &str, thinking: &str, done: bool) -> Map<String, Value> {
        let mut o = Map::new();
        o.insert("model".into(), json!(self.model));
        o.insert("created_at".into(), json!(rfc3339(SystemTime::now())));
        match self.kind {
            Kind::Chat => {
                let mut m = json!({"role": "assistant", "content": content});
                if !thinking.is_empty() {
                    m["thinking"] = json!(thinking);
                }
                o.insert("message".into(), m);
            }
            Kind::Generate => {
                o.insert("response".into(), json!(content));
                if !thinking.is_empty() {
                    o.insert("thinking".into(), json!(thinking));
                }
            }
        }
        o.insert("done".into(), json!(done));
        o
    }

    /// One upstream SSE event's JSON → the Ollama objects to send now (none while streaming
    /// whole, or for a chunk with nothing to show).
    pub fn event(&mut self, v: &Value) -> Vec<Value> {
        if let Some(err) = v.get("error") {
            let msg = err
                .get("message")
                .and_then(Value::as_str)
                .map_or_else(|| err.to_string(), str::to_owned);
            return vec![json!({"error": msg})];
        }
        if let Some(t) = v.get("timings") {
            let f = |k: &str| t.get(k).and_then(Value::as_f64);
            self.prompt_n = f("prompt_n").map(|n| n as u64).or(self.prompt_n);
            self.predicted_n = f("predicted_n").map(|n| n as u64).or(self.predicted_n);
            self.prompt_ms = f("prompt_ms").unwrap_or(self.prompt_ms);
            self.predicted_ms = f("predicted_ms").unwrap_or(self.predicted_ms);
        }
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            self.prompt_n = u
                .get("prompt_tokens")
                .and_then(Value::as_u64)
                .or(self.prompt_n);
            self.predicted_n = u
                .get("completion_tokens")
                .and_then(Value::as_u64)
                .or(self.predicted_n);
        }
        let Some(choice) = v.get("choices").and_then(|c| c.get(0)) else {
            return Vec::new();
        };
        if let Some(r) = choice.get("finish_reason").and_then(Value::as_str) {
            self.done_reason = Some(if r == "tool_calls" {
                "stop".into()
            } else {
                r.to_owned()
            });
        }
        let delta = choice.get("delta").unwrap_or(choice);
        let text = delta
            .get("content")
            .or_else(|| choice.get("text"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let thinking = delta
            .get("reasoning_content")
            .and_then(Value::as_str)
            .unwrap_or("");
        if let Some(calls) = delta.get("tool_calls").and_then(Value::as_array) {
            for (i, c) in calls.iter().enumerate() {
                let idx = c.get("index").and_then(Value::as_u64).unwrap_or(i as u64);
                let entry = self.tools.entry(idx).or_default();
                let f = c.get("function");
                if let Some(n) = f.and_then(|f| f.get("name")).and_then(Value::as_str) {
                    entry.0.push_str(n);
                }
                if let Some(a) = f.and_then(|f| f.get("arguments")).and_then(Value::as_str) {
                    entry.1.push_str(a);
                }
            }
        }
        if self.whole {
            self.content.push_str(text);
            self.thinking.push_str(thinking);
            return Vec::new();
        }
        if text.is_empty() && thinking.is_empty() {
            return Vec::new();
        }
        vec![Value::Object(self.object(text, thinking, false))]
    }

    /// The last object: `done`, `done_reason`, the counts and durations (nanoseconds).
    pub fn finish(&mut self) -> Value {
        let (content, thinking) = (
            std::mem::take(&mut self.content),
            std::mem::take(&mut self.thinking),
        );
        let mut o = self.object(&content, &thinking, true);
        if !self.tools.is_empty() {
            let calls: Vec<Value> = self
                .tools
                .values()
                .map(|(name, args)| {
                    let args: Value = serde_json::from_str(args).unwrap_or_else(|_| json!(args));
                    json!({"function": {"name": name, "arguments": args}})
                })
                .collect();
            if let Some(m) = o.get_mut("message") {
                m["tool_calls"] = Value::Array(calls);
            }
        }
        o.insert(
            "done_reason".into(),
            json!(self.done_reason.as_deref().unwrap_or("stop")),
        );
        o.insert(
            "total_duration".into(),
            json!(self.began.elapsed().as_nanos() as u64),
        );
        o.insert("load_duration".into(), json!(self.load.as_nanos() as u64));
        o.insert(
            "prompt_eval_count".into(),
            json!(self.prompt_n.unwrap_or(0)),
        );
        o.insert("prompt_eval_duration".into(), json!(ns(self.prompt_ms)));
        o.insert("eval_count".into(), json!(self.predicted_n.unwrap_or(0)));
        o.insert("eval_duration".into(), json!(ns(self.predicted_ms)));
        Value::Object(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target<'static> {
        Target {
            id: "m",
            defaults: None,
            server_ctx: Some(2048),
            vision: false,
        }
    }

    #[test]
    fn options_format_tools_and_think_map_to_llama_server() {
        let req = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "options": {"num_predict": 5, "temperature": 0.2, "top_k": 3, "min_p": 0.1, "seed": 7,
                        "stop": ["x"], "repeat_penalty": 1.1, "num_ctx": 1024},
            "format": "json", "tools": [{"type": "function", "function": {"name": "f"}}], "think": false});
        let out = chat(&req, &target()).unwrap();
        assert_eq!(out["max_tokens"], 5);
        assert_eq!(out["temperature"], 0.2);
        assert_eq!(out["top_k"], 3);
        assert_eq!(out["seed"], 7);
        assert_eq!(out["stop"][0], "x");
        assert_eq!(out["repeat_penalty"], 1.1);
        assert_eq!(out["response_format"]["type"], "json_object");
        assert_eq!(out["tools"][0]["function"]["name"], "f");
        assert_eq!(out["chat_template_kwargs"]["enable_thinking"], false);
        assert_eq!(out["stream"], true);
        let schema = json!({"model": "m", "messages": [], "format": {"type": "object"}});
        let out = chat(&schema, &target()).unwrap();
        assert_eq!(
            out["response_format"]["json_schema"]["schema"]["type"],
            "object"
        );
    }

    #[test]
    fn too_large_num_ctx_images_without_projector_and_templates_are_errors() {
        let big = json!({"messages": [], "options": {"num_ctx": 4096}});
        assert!(chat(&big, &target())
            .unwrap_err()
            .contains("num_ctx 4096 is more than the 2048"));
        let img = json!({"messages": [{"role": "user", "content": "x", "images": ["AAAA"]}]});
        assert!(chat(&img, &target())
            .unwrap_err()
            .contains("vision projector"));
        let vision = Target {
            vision: true,
            ..target()
        };
        let out = chat(&img, &vision).unwrap();
        assert_eq!(
            out["messages"][0]["content"][1]["image_url"]["url"],
            "data:image/png;base64,AAAA"
        );
        assert!(generate(
            &json!({"prompt": "x", "template": "{{ .Prompt }}"}),
            &target()
        )
        .is_err());
    }

    #[test]
    fn generate_raw_and_with_system() {
        let (out, path) = generate(&json!({"prompt": "p", "raw": true}), &target()).unwrap();
        assert_eq!(
            (path, out["prompt"].as_str()),
            ("/v1/completions", Some("p"))
        );
        let (out, path) = generate(&json!({"prompt": "p", "system": "s"}), &target()).unwrap();
        assert_eq!(path, "/v1/chat/completions");
        assert_eq!(out["messages"][0]["role"], "system");
        assert_eq!(out["messages"][1]["content"], "p");
    }

    #[test]
    fn keep_alive_forms() {
        let k = |v: Value| keep_alive(&json!({"keep_alive": v}));
        assert_eq!(k(json!(0)).unwrap(), Some(Some(Duration::ZERO)));
        assert_eq!(k(json!(-1)).unwrap(), Some(None));
        assert_eq!(k(json!("-1m")).unwrap(), Some(None));
        assert_eq!(
            k(json!("5m")).unwrap(),
            Some(Some(Duration::from_secs(300)))
        );
        assert_eq!(keep_alive(&json!({})).unwrap(), None);
        assert!(k(json!("soon")).is_err());
    }

    #[test]
    fn dates() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_632_813_123);
        assert_eq!(rfc3339(t), "2026-12-07T08:40:13.123Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn streamed_chunks_become_ollama_objects_and_a_final_one() {
        let mut r = Reply::new(
            Kind::Chat,
            "m".into(),
            std::time::Instant::now(),
            Duration::from_millis(5),
            false,
        );
        let out = r.event(&json!({"choices": [{"delta": {"content": "Hi"}}]}));
        assert_eq!(out[0]["message"]["content"], "Hi");
        assert_eq!(out[0]["done"], false);
        r.event(&json!({"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "{\"a\":"}}]}}]}));
        r.event(&json!({"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}, "finish_reason": "tool_calls"}],
                        "timings": {"prompt_n": 3, "prompt_ms": 1.5, "predicted_n": 2, "predicted_ms": 4.0}}));
        let last = r.finish();
        assert_eq!(last["done"], true);
        assert_eq!(last["done_reason"], "stop");
        assert_eq!(
            last["message"]["tool_calls"][0]["function"]["arguments"]["a"],
            1
        );
        assert_eq!(
            (
                last["prompt_eval_count"].as_u64(),
                last["eval_count"].as_u64()
            ),
            (Some(3), Some(2))
        );
        assert_eq!(last["prompt_eval_duration"], 1_500_000);
        assert_eq!(last["load_duration"], 5_000_000);
        let mut g = Reply::new(
            Kind::Generate,
            "m".into(),
            std::time::Instant::now(),
            Duration::ZERO,
            true,
        );
        assert!(g.event(&json!({"choices": [{"text": "a"}]})).is_empty());
        g.event(&json!({"choices": [{"text": "b", "finish_reason": "length"}]}));
        let last = g.finish();
        assert_eq!(
            (last["response"].as_str(), last["done_reason"].as_str()),
            (Some("ab"), Some("length"))
        );
    }
}
