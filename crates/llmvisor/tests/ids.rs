//! Model ids with `/`, `:` and `.` (as discovery names them: `Qwen/Qwen3-8B`, `llama3.2:3b`,
//! `unsloth/Qwen3-8B-GGUF:Q4_K_M`) on every route that takes an id, raw and percent-encoded.

mod support;

use std::time::Duration;

use llmvisor::ids::encode_segment;
use support::http::{request, TestDaemon};
use support::Scratch;

const IDS: [&str; 3] = [
    "Qwen/Qwen3-8B",
    "llama3.2:3b",
    "unsloth/Qwen3-8B-GGUF:Q4_K_M",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_with_slashes_colons_and_dots_work_on_every_route() {
    let s = Scratch::new();
    // `Qwen` beside `Qwen/Qwen3-8B`: the longer id wins where a path could name either.
    let mut models: Vec<_> = IDS
        .iter()
        .map(|id| s.model(id, &["--log-lines", "1"]))
        .collect();
    models.push(s.model("Qwen", &[]));
    let d = TestDaemon::start(s.config(models)).await;

    let list = d.get("/v1/models").await.json();
    let listed: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    for id in IDS {
        assert!(listed.contains(&id), "{id} not in {listed:?}");
        // OpenAI's clients send `org/name` unencoded in this path.
        for path in [
            format!("/v1/models/{id}"),
            format!("/v1/models/{}", encode_segment(id)),
        ] {
            let r = d.get(&path).await;
            assert_eq!(r.status, 200, "{path}: {}", r.text());
            assert_eq!(r.json()["id"], id, "{path}");
        }
        for path in [
            format!("/api/models/{id}"),
            format!("/api/models/{}", encode_segment(id)),
        ] {
            let r = d.get(&path).await;
            assert_eq!(r.status, 200, "{path}: {}", r.text());
            assert_eq!(r.json()["id"], id, "{path}");
        }
    }
    assert_eq!(d.get("/api/models/Qwen").await.json()["id"], "Qwen");
    assert_eq!(d.get("/api/models/Qwen/nope").await.status, 404);

    // Load raw, then encoded; logs; the log file is one file per id.
    let r = d.post("/api/models/Qwen/Qwen3-8B/load", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["id"], "Qwen/Qwen3-8B");
    assert_eq!(r.json()["state"], "ready");
    assert_eq!(
        d.model("Qwen").await["state"],
        "stopped",
        "the shorter id was not loaded"
    );
    let enc = encode_segment("unsloth/Qwen3-8B-GGUF:Q4_K_M");
    let r = d.post(&format!("/api/models/{enc}/load"), "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["id"], "unsloth/Qwen3-8B-GGUF:Q4_K_M");
    for path in [
        "/api/models/Qwen/Qwen3-8B/logs",
        "/api/models/Qwen%2FQwen3-8B/logs",
    ] {
        let logs = d.get(path).await;
        assert_eq!(logs.status, 200, "{path}");
        assert!(
            logs.text().contains("fake-llm log line 1"),
            "{path}: {}",
            logs.text()
        );
    }
    let file = s.state_dir().join("logs").join("Qwen%2FQwen3-8B.log");
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    assert!(text.contains("fake-llm log line 1"), "{text}");

    // Passthrough: the longest known id, raw or encoded; the tail as written.
    for prefix in ["/upstream/Qwen/Qwen3-8B", "/upstream/Qwen%2FQwen3-8B"] {
        let r = request("GET", &format!("{}{prefix}/echo/x%2Fy?z=1", d.url), &[], "").await;
        assert_eq!(r.status, 200, "{prefix}: {}", r.text());
        assert_eq!(r.json()["path"], "/echo/x%2Fy", "{prefix}");
        assert_eq!(r.json()["query"], "z=1");
    }
    assert_eq!(d.model("Qwen").await["state"], "stopped");

    // Routed by the body's model.
    let chat = r#"{"model":"llama3.2:3b","messages":[{"role":"user","content":"hi"}]}"#;
    let (status, _, _) = d.send_chat(chat).await;
    assert_eq!(status, 200);
    assert_eq!(d.model("llama3.2:3b").await["state"], "ready");
    // llama-server's own routes by `?model=`: reaches the server (fake-llm has no /props and
    // answers its own 404; an unknown model would be llmvisor's, naming the known ones).
    let r = d.get("/props?model=llama3.2%3A3b").await;
    assert!(r.text().contains("File Not Found"), "{}", r.text());

    // Unload raw and encoded, and the llama-swap form.
    let r = d.post("/api/models/Qwen/Qwen3-8B/unload", "").await;
    assert_eq!(r.json()["state"], "stopped", "{}", r.text());
    let r = d
        .post(&format!("/api/models/{enc}/unload?force=true"), "")
        .await;
    assert_eq!(r.json()["state"], "stopped", "{}", r.text());
    let r = d.post("/api/models/unload/llama3.2:3b", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    d.stop().await;
    s.assert_all_gone(Duration::from_secs(5)).await;
}
