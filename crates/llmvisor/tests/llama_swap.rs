//! llama-swap configs (YAML, its documented keys) run by the daemon against the fake server:
//! each test asserts behaviour, not only parsing.

mod support;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use llmvisor::config::Config;
use support::http::{request, send, TestDaemon};
use support::{fake_llm, Scratch};

const WITHIN: Duration = Duration::from_secs(10);

/// `cmd` of a fake-llm model that records its pid in `<id>.pids`.
fn fake(s: &Scratch, id: &str, extra: &str) -> String {
    format!(
        "{} --port ${{PORT}} --pid-file {} {extra}",
        fake_llm().display(),
        s.path(&format!("{id}.pids")).display()
    )
}

/// Writes `yaml` as `llama-swap.yaml` and loads it the way `serve` does; the scratch's state
/// dir and ports replace the defaults (llama-swap's format has no state dir), and stops are
/// quick.
fn load(s: &Scratch, yaml: &str) -> Config {
    let path = s.path("llama-swap.yaml");
    std::fs::write(&path, yaml).unwrap();
    let (mut cfg, _warnings) =
        llmvisor::config::load_with_warnings(&path).unwrap_or_else(|e| panic!("{e}"));
    cfg.state_dir = s.state_dir();
    cfg.port_range = s.ports;
    for m in &mut cfg.models {
        m.stop_timeout = Duration::from_secs(2);
    }
    cfg
}

fn alive(s: &Scratch, id: &str) -> bool {
    s.pids(&format!("{id}.pids"))
        .iter()
        .any(|p| llmvisor::procfs::is_alive(*p))
}

async fn chat(d: &TestDaemon, model: &str) -> u16 {
    let body = format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#);
    let r = d.post("/v1/chat/completions", &body).await;
    assert!(r.status == 200 || r.status == 429, "{model}: {}", r.text());
    r.status
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WITHIN;
    while !cond() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Samples /proc for the pids of `ids` until stopped; the most alive at once.
fn sampler(s: &Scratch, ids: &[&str]) -> (Arc<AtomicBool>, tokio::task::JoinHandle<usize>) {
    let files: Vec<PathBuf> = ids.iter().map(|i| s.path(&format!("{i}.pids"))).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let task = tokio::task::spawn_blocking(move || {
        let mut most = 0;
        while !stop2.load(Ordering::Relaxed) {
            let n = files
                .iter()
                .filter(|f| {
                    std::fs::read_to_string(f)
                        .unwrap_or_default()
                        .lines()
                        .filter_map(|l| l.trim().parse::<u32>().ok())
                        .any(llmvisor::procfs::is_alive)
                })
                .count();
            most = most.max(n);
            std::thread::yield_now();
        }
        most
    });
    (stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_swap_never_runs_two_models_together() {
    let s = Scratch::new();
    let yaml = format!(
        "models:\n  a:\n    cmd: {}\n  b:\n    cmd: {}\n",
        fake(&s, "a", ""),
        fake(&s, "b", "")
    );
    let d = TestDaemon::start(load(&s, &yaml)).await;
    let (stop, most) = sampler(&s, &["a", "b"]);
    for model in ["a", "b", "a", "b"] {
        assert_eq!(chat(&d, model).await, 200);
        assert!(alive(&s, model));
    }
    assert!(!alive(&s, "a"), "a was swapped out for b");
    stop.store(true, Ordering::Relaxed);
    assert_eq!(most.await.unwrap(), 1, "two models ran at the same time");
    d.finish(&s, WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_false_runs_together_exclusive_unloads_others_persistent_stays() {
    let s = Scratch::new();
    let yaml = format!(
        r#"
groups:
  together:
    swap: false
    members: [a, b]
  forever:
    persistent: true
    swap: false
    exclusive: false
    members: [p]
models:
  a:
    cmd: {}
  b:
    cmd: {}
  c:
    cmd: {}
  p:
    cmd: {}
"#,
        fake(&s, "a", ""),
        fake(&s, "b", ""),
        fake(&s, "c", ""),
        fake(&s, "p", "")
    );
    let d = TestDaemon::start(load(&s, &yaml)).await;
    assert_eq!(chat(&d, "p").await, 200);
    assert_eq!(chat(&d, "a").await, 200);
    assert_eq!(chat(&d, "b").await, 200);
    assert!(
        alive(&s, "a") && alive(&s, "b"),
        "swap: false runs members together"
    );
    assert!(
        alive(&s, "p"),
        "a persistent group is not unloaded by others"
    );
    // c is in the implicit (default) group: exclusive, so the `together` group goes.
    assert_eq!(chat(&d, "c").await, 200);
    assert!(
        !alive(&s, "a") && !alive(&s, "b"),
        "exclusive unloads the other groups"
    );
    assert!(
        alive(&s, "p"),
        "persistent survives an exclusive group's start"
    );
    d.finish(&s, WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preload_ttl_and_global_ttl() {
    let s = Scratch::new();
    let yaml = format!(
        "globalTTL: 1\nhooks:\n  on_startup:\n    preload: [pre]\ngroups:\n  all:\n    swap: false\n    \
         members: [pre, short, global]\nmodels:\n  pre:\n    cmd: {}\n    ttl: 0\n  short:\n    cmd: {}\n    ttl: 1\n  global:\n    cmd: {}\n",
        fake(&s, "pre", ""),
        fake(&s, "short", ""),
        fake(&s, "global", "")
    );
    let d = TestDaemon::start(load(&s, &yaml)).await;
    llmvisor::daemon::preload(&d.state);
    wait_until("pre preloaded", || alive(&s, "pre")).await;
    assert_eq!(chat(&d, "short").await, 200);
    assert_eq!(chat(&d, "global").await, 200);
    wait_until("short and global idle out", || {
        !alive(&s, "short") && !alive(&s, "global")
    })
    .await;
    assert!(alive(&s, "pre"), "ttl: 0 = never unloaded");
    d.finish(&s, WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_list_retrieve_unlisted_running_unload_logs_health() {
    let s = Scratch::new();
    let yaml = format!(
        r#"
includeAliasesInList: true
models:
  a:
    cmd: {}
    name: "Model A"
    description: "the first"
    aliases: [a1]
    metadata:
      family: fake
  hidden:
    cmd: {}
    unlisted: true
"#,
        fake(&s, "a", "--log-lines 3"),
        fake(&s, "hidden", "")
    );
    let d = TestDaemon::start(load(&s, &yaml)).await;
    assert_eq!(d.get("/health").await.text(), "OK");
    let list = d.get("/v1/models").await.json();
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a", "a1"], "unlisted left out, alias listed");
    let a = &list["data"][0];
    assert_eq!(a["name"], "Model A");
    assert_eq!(a["description"], "the first");
    assert_eq!(a["status"]["value"], "unloaded");
    assert_eq!(a["meta"]["llamaswap"]["family"], "fake");

    let r = d.get("/v1/models/a1").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["id"], "a1");
    assert_eq!(
        d.get("/v1/models/hidden").await.status,
        200,
        "unlisted is still served"
    );
    let r = d.get("/v1/models/nope").await;
    assert_eq!(r.status, 404);
    r.error();

    assert_eq!(chat(&d, "a1").await, 200);
    assert_eq!(
        d.get("/v1/models/a").await.json()["status"]["value"],
        "loaded"
    );
    let running = d.get("/running").await.json();
    assert_eq!(running["running"][0]["model"], "a");
    assert_eq!(running["running"][0]["state"], "ready");
    assert_eq!(running["running"][0]["name"], "Model A");
    let logs = d.get("/logs").await.text();
    assert!(logs.contains("[a] "), "{logs}");

    // /logs/stream/a: history first, then live output; ?no-history skips the history.
    let (status, _, mut body) = send("GET", &format!("{}/logs/stream/a", d.url), &[], "").await;
    assert_eq!(status, 200);
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(!first.is_empty(), "history comes first");
    drop(body);
    let (status, _, _) = send(
        "GET",
        &format!("{}/logs/stream/a?no-history", d.url),
        &[],
        "",
    )
    .await;
    assert_eq!(status, 200);

    assert_eq!(d.get("/unload").await.text(), "OK");
    assert!(!alive(&s, "a"));
    assert_eq!(
        d.get("/running").await.json()["running"],
        serde_json::json!([])
    );
    assert_eq!(chat(&d, "hidden").await, 200);
    let r = d.post("/api/models/unload/hidden", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!alive(&s, "hidden"));
    assert_eq!(chat(&d, "a").await, 200);
    assert_eq!(d.post("/api/models/unload", "").await.json()["msg"], "ok");
    assert!(!alive(&s, "a"));
    d.finish(&s, WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn use_model_name_and_filters_rewrite_what_the_upstream_sees() {
    let s = Scratch::new();
    let yaml = format!(
        r#"
models:
  a:
    cmd: {}
    useModelName: "org/real-a"
    filters:
      stripParams: "temperature, top_p"
      setParams:
        top_k: 7
      setParamsByID:
        "${{MODEL_ID}}:hot":
          temperature: 1.5
"#,
        fake(&s, "a", "--echo-unknown")
    );
    let d = TestDaemon::start(load(&s, &yaml)).await;
    let body = r#"{"model":"a","temperature":0.1,"top_p":0.5,"top_k":1,"keep":"yes"}"#;
    let r = d.post("/v1/echo", body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen: serde_json::Value = serde_json::from_str(r.json()["body"].as_str().unwrap()).unwrap();
    assert_eq!(
        seen,
        serde_json::json!({"model": "org/real-a", "top_k": 7, "keep": "yes"})
    );
    // The setParamsByID key is an alias too, with its own params.
    let r = d
        .post("/v1/echo", r#"{"model":"a:hot","temperature":0.1}"#)
        .await;
    let seen: serde_json::Value = serde_json::from_str(r.json()["body"].as_str().unwrap()).unwrap();
    assert_eq!(
        seen,
        serde_json::json!({"model": "org/real-a", "top_k": 7, "temperature": 1.5})
    );
    // llama-server's own routes: by body model, or by ?model=.
    let r = d.post("/completion", r#"{"model":"a","prompt":"x"}"#).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["path"], "/completion");
    for path in ["/props?model=a", "/slots?model=a", "/metrics?model=a"] {
        let r = d.get(path).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(r.json()["path"], path.split('?').next().unwrap());
    }
    let r = d
        .post("/tokenize", r#"{"model":"a:hot","content":"x"}"#)
        .await;
    assert_eq!(r.json()["path"], "/tokenize");
    let r = d.get("/props").await;
    assert_eq!(r.status, 400);
    r.error();
    d.finish(&s, WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limit_answers_429_with_retry_after() {
    let s = Scratch::new();
    let yaml = format!(
        "models:\n  a:\n    cmd: {}\n    concurrencyLimit: 1\n",
        fake(&s, "a", "--chunks 3 --chunk-delay 100ms")
    );
    let d = TestDaemon::start(load(&s, &yaml)).await;
    let stream = r#"{"model":"a","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let (status, _, body) = d.send_chat(stream).await;
    assert_eq!(status, 200);
    // The first answer is still open: a second request is over the limit.
    let r = d
        .post(
            "/v1/chat/completions",
            r#"{"model":"a","messages":[{"role":"user","content":"hi"}]}"#,
        )
        .await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(r.error()["code"], "concurrency_limit");
    body.collect().await.unwrap();
    assert_eq!(
        chat(&d, "a").await,
        200,
        "the slot is free once the answer ended"
    );
    d.finish(&s, WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cmd_stop_runs_and_a_server_ignoring_it_is_still_reaped() {
    let s = Scratch::new();
    let marker = s.path("stopped-pid");
    let yaml = format!(
        r#"
groups:
  both:
    swap: false
    members: [polite, stubborn]
models:
  polite:
    cmd: {}
    cmdStop: sh -c 'echo ${{PID}} > {} && kill -TERM ${{PID}}'
  stubborn:
    cmd: {}
    cmdStop: "true"
"#,
        fake(&s, "polite", ""),
        marker.display(),
        fake(&s, "stubborn", "--ignore-sigterm")
    );
    let d = TestDaemon::start(load(&s, &yaml)).await;
    assert_eq!(chat(&d, "polite").await, 200);
    assert_eq!(chat(&d, "stubborn").await, 200);
    let polite_pid = s.pids("polite.pids")[0];
    assert_eq!(d.post("/api/models/polite/unload", "").await.status, 200);
    let written = std::fs::read_to_string(&marker).expect("cmdStop ran");
    assert_eq!(written.trim(), polite_pid.to_string(), "${{PID}} expanded");
    assert!(!alive(&s, "polite"));
    // `true` stops nothing and the server ignores SIGTERM: the group is still killed and reaped.
    assert_eq!(d.post("/api/models/stubborn/unload", "").await.status, 200);
    assert!(!alive(&s, "stubborn"));
    d.finish(&s, WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_with_a_fixed_port_and_check_endpoint_none() {
    let s = Scratch::new();
    let port = support::serve::closed_port();
    let yaml = format!(
        "models:\n  a:\n    cmd: {} --port {port} --pid-file {}\n    proxy: http://127.0.0.1:{port}\n    checkEndpoint: none\n",
        fake_llm().display(),
        s.path("a.pids").display()
    );
    let cfg = load(&s, &yaml);
    assert_eq!(cfg.models[0].port, Some(port));
    let d = TestDaemon::start(cfg).await;
    assert_eq!(chat(&d, "a").await, 200);
    let running = d.get("/running").await.json();
    assert_eq!(
        running["running"][0]["proxy"],
        format!("http://127.0.0.1:{port}")
    );
    d.finish(&s, WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_in_all_three_header_forms_and_never_forwarded() {
    let s = Scratch::new();
    let yaml = format!(
        "apiKeys: [sk-one]\nmodels:\n  a:\n    cmd: {}\n",
        fake(&s, "a", "--echo-unknown")
    );
    let d = TestDaemon::start(load(&s, &yaml)).await;
    let url = format!("{}/v1/echo", d.url);
    let body = r#"{"model":"a"}"#;
    let json = ("content-type", "application/json");
    // "user:sk-one" and "user:wrong" in base64
    for (header, ok) in [
        (("authorization", "Bearer sk-one"), true),
        (("x-api-key", "sk-one"), true),
        (("authorization", "Basic dXNlcjpzay1vbmU="), true),
        (("authorization", "Bearer wrong"), false),
        (("x-api-key", "wrong"), false),
        (("authorization", "Basic dXNlcjp3cm9uZw=="), false),
    ] {
        let r = request("POST", &url, &[json, header], body).await;
        if ok {
            assert_eq!(r.status, 200, "{header:?}: {}", r.text());
            let seen = &r.json()["headers"];
            assert!(seen.get("authorization").is_none(), "{seen}");
            assert!(seen.get("x-api-key").is_none(), "{seen}");
        } else {
            assert_eq!(r.status, 401, "{header:?}");
        }
    }
    assert_eq!(request("POST", &url, &[json], body).await.status, 401);
    d.finish(&s, WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_and_convert_name_every_unsupported_key_and_yaml_errors_have_line_col() {
    let s = Scratch::new();
    let yaml = format!(
        "logLevel: info\nmetricsMaxInMemory: 5\npeers: {{}}\nmatrix: {{}}\nprofiles: {{}}\nmodels:\n  a:\n    cmd: {}\n    timeouts: {{}}\n",
        fake(&s, "a", "")
    );
    let path = s.path("ls.yaml");
    std::fs::write(&path, yaml).unwrap();
    let bin = env!("CARGO_BIN_EXE_llmvisor");
    let out = std::process::Command::new(bin)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("a: cmd "), "{stdout}");
    assert!(
        stdout.contains("group (default): one member at a time"),
        "{stdout}"
    );
    for key in [
        "logLevel",
        "metricsMaxInMemory",
        "peers",
        "matrix",
        "profiles",
        "timeouts",
    ] {
        assert!(stderr.contains(&format!("`{key}")), "{key}: {stderr}");
    }
    let out = std::process::Command::new(bin)
        .arg("convert")
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let toml_text = String::from_utf8(out.stdout).unwrap();
    let toml_path = s.path("converted.toml");
    std::fs::write(&toml_path, &toml_text).unwrap();
    let out = std::process::Command::new(bin)
        .args(["check", "--config"])
        .arg(&toml_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    std::fs::write(
        &path,
        "models:\n  a:\n    cmd: x --port ${PORT}\n    ttl: [1\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let prefix = format!("{}:", path.display());
    let rest = stderr
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{stderr}"));
    let mut parts = rest.splitn(3, ':');
    assert!(
        parts.next().unwrap().parse::<usize>().is_ok(),
        "line: {stderr}"
    );
    assert!(
        parts.next().unwrap().parse::<usize>().is_ok(),
        "col: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_upload_is_routed_by_its_model_field_and_streamed_past_body_limit() {
    let s = Scratch::new();
    let yaml = format!(
        "models:\n  whisper:\n    cmd: {}\n",
        fake(&s, "whisper", "--echo-unknown")
    );
    let mut cfg = load(&s, &yaml);
    cfg.body_limit = 1 << 20;
    let d = TestDaemon::start(cfg).await;
    let file = vec![b'x'; 4 << 20];
    let mut form = Vec::new();
    form.extend_from_slice(
        b"--BoUnD\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n",
    );
    form.extend_from_slice(
        b"--BoUnD\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n",
    );
    form.extend_from_slice(&file);
    form.extend_from_slice(b"\r\n--BoUnD--\r\n");
    let sent = form.len();
    let r = request(
        "POST",
        &format!("{}/v1/audio/transcriptions", d.url),
        &[("content-type", "multipart/form-data; boundary=BoUnD")],
        form,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let echo = r.json();
    assert_eq!(echo["path"], "/v1/audio/transcriptions");
    assert_eq!(
        echo["body"].as_str().unwrap().len(),
        sent,
        "the whole form arrived"
    );
    let r = request(
        "POST",
        &format!("{}/v1/audio/transcriptions", d.url),
        &[("content-type", "multipart/form-data; boundary=BoUnD")],
        "--BoUnD\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc\r\n--BoUnD--\r\n",
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.error()["code"], "missing_model");
    d.finish(&s, WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_loading_state_streams_progress_while_the_model_loads() {
    let s = Scratch::new();
    let yaml = format!(
        "sendLoadingState: true\ngroups:\n  all:\n    swap: false\n    members: [slow, quiet, broken]\n\
         models:\n  slow:\n    cmd: {}\n  quiet:\n    cmd: {}\n    sendLoadingState: false\n  broken:\n    cmd: {}\n",
        fake(&s, "slow", "--startup-delay 300ms"),
        fake(&s, "quiet", ""),
        fake(&s, "broken", "--exit-at-startup 3")
    );
    let d = TestDaemon::start(load(&s, &yaml)).await;
    let stream = |m: &str| {
        format!(r#"{{"model":"{m}","stream":true,"messages":[{{"role":"user","content":"hi"}}]}}"#)
    };
    let (status, headers, body) = d.send_chat(&stream("slow")).await;
    assert_eq!(status, 200);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap();
    let first = text.split("\n\n").next().unwrap();
    assert!(first.contains("reasoning_content"), "{text}");
    assert!(first.contains("loading model"), "{text}");
    assert!(text.contains("model ready"), "{text}");
    assert!(text.contains("\"content\""), "the answer follows: {text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");

    // Ready now: no progress any more.
    let (_, _, body) = d.send_chat(&stream("slow")).await;
    let text = String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(!text.contains("reasoning_content"), "{text}");
    // Off for this model.
    let (_, _, body) = d.send_chat(&stream("quiet")).await;
    let text = String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(!text.contains("reasoning_content"), "{text}");
    // A failed start ends the stream with an error event.
    let (status, _, body) = d.send_chat(&stream("broken")).await;
    assert_eq!(status, 200);
    let text = String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(text.contains("\"error\""), "{text}");
    d.finish(&s, WITHIN).await;
}

/// The official openai client's `models.retrieve` (GET /v1/models/{id}), by id and by alias,
/// with the key as its Bearer header. Needs `LLAMA_VENV` (a venv with `openai`, from
/// scripts/setup-llama.sh); skipped without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_client_models_retrieve() {
    let Some(venv) = std::env::var_os("LLAMA_VENV") else {
        eprintln!("skipped: LLAMA_VENV is not set (eval \"$(scripts/setup-llama.sh)\")");
        return;
    };
    let s = Scratch::new();
    let yaml = format!(
        "apiKeys: [sk-one]\nmodels:\n  a:\n    cmd: {}\n    aliases: [gpt-x]\n",
        fake(&s, "a", "")
    );
    let d = TestDaemon::start(load(&s, &yaml)).await;
    let script = r#"
import sys, openai
c = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="sk-one")
print(c.models.retrieve("a").id)
print(c.models.retrieve("gpt-x").id)
try:
    c.models.retrieve("nope")
except openai.NotFoundError:
    print("not found")
"#;
    let out = tokio::process::Command::new(PathBuf::from(venv).join("bin/python"))
        .arg("-c")
        .arg(script)
        .arg(&d.url)
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        ["a", "gpt-x", "not found"]
    );
    d.finish(&s, WITHIN).await;
}

/// SIGHUP's reload reads the YAML again: a new model appears, an unchanged running one keeps
/// its process, and a broken file is rejected with the running config kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_reads_the_yaml_again() {
    let s = Scratch::new();
    let path = s.path("llama-swap.yaml");
    let a = format!(
        "startPort: {}\nmodels:\n  a:\n    cmd: {}\n",
        s.ports.0,
        fake(&s, "a", "")
    );
    std::fs::write(&path, &a).unwrap();
    let (mut cfg, _) = llmvisor::config::load_with_warnings(&path).unwrap();
    cfg.state_dir = s.state_dir();
    let d = TestDaemon::start(cfg).await;
    assert_eq!(chat(&d, "a").await, 200);
    let pid = s.pids("a.pids")[0];

    let ab = format!(
        "{a}  b:\n    cmd: {}\ngroups:\n  both:\n    swap: false\n    members: [a, b]\n",
        fake(&s, "b", "")
    );
    std::fs::write(&path, ab).unwrap();
    llmvisor::daemon::reload(&d.state, &path, None, Some(s.state_dir())).await;
    let ids: Vec<String> = d.get("/v1/models").await.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["a", "b"]);
    assert_eq!(chat(&d, "b").await, 200);
    assert!(
        llmvisor::procfs::is_alive(pid),
        "a runs on, now together with b"
    );

    std::fs::write(&path, "models:\n  a: [").unwrap();
    llmvisor::daemon::reload(&d.state, &path, None, Some(s.state_dir())).await;
    assert_eq!(
        d.get("/v1/models").await.json()["data"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    d.finish(&s, WITHIN).await;
}

/// A 200 MiB form upload through a `llmvisor serve` process: streamed, so the daemon's peak
/// RSS (VmHWM) stays under 64 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_mib_multipart_upload_streams_through_in_little_memory() {
    let s = Scratch::new();
    let cfg = s.write_config(&[("whisper", "--echo-unknown")], "");
    let mut serve = support::serve::ServeProcess::start(&cfg);
    const CHUNK: usize = 1 << 20;
    const CHUNKS: usize = 200;
    let head = b"--BoUnD\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n\
--BoUnD\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.wav\"\r\n\r\n"
        .to_vec();
    let tail = b"\r\n--BoUnD--\r\n".to_vec();
    let total = head.len() + CHUNK * CHUNKS + tail.len();
    let chunk = bytes::Bytes::from(vec![b'x'; CHUNK]);
    let parts = std::iter::once(bytes::Bytes::from(head))
        .chain(std::iter::repeat_n(chunk, CHUNKS))
        .chain(std::iter::once(bytes::Bytes::from(tail)))
        .map(Ok::<_, std::io::Error>);
    let body = axum::body::Body::from_stream(futures_util::stream::iter(parts));
    let req = http::Request::post(format!("{}/v1/audio/transcriptions", serve.url))
        .header("content-type", "multipart/form-data; boundary=BoUnD")
        .body(body)
        .unwrap();
    let resp = llmvisor::upstream::client()
        .request(req.map(llmvisor::upstream::body))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let echo: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(echo["body_len"], total, "every byte arrived");
    let status = std::fs::read_to_string(format!("/proc/{}/status", serve.pid())).unwrap();
    let hwm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(
        hwm_kib < 64 * 1024,
        "the daemon's peak RSS was {hwm_kib} KiB"
    );
    assert!(serve.terminate(WITHIN).success());
    s.assert_all_gone(WITHIN).await;
}
