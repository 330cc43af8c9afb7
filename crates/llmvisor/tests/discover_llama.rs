//! Discovery and Ollama's API end to end, on the real llama-server and model: each store's
//! real layout built in the test's own HOME (Ollama's manifest and `sha256-` blob, the Hugging
//! Face cache with its symlinks and `refs/main`, a plain folder, LM Studio's folder), served with
//! no `[models]` entry, a chat to each; the official `ollama` Python client and the `openai`
//! client's `models.retrieve("org/name")`; the folder watcher; a bad file beside good ones.
//!
//! Needs LLAMA_SERVER, LLAMA_MODEL and LLAMA_VENV (with `ollama` and `openai`), as
//! tests/e2e_llama.rs does. The model files are hard links of LLAMA_MODEL (no copy).

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::llama::{self, LlamaEnv, Serve};
use support::Scratch;

macro_rules! llama_env {
    () => {
        match LlamaEnv::get() {
            Some(env) => env,
            None => return,
        }
    };
}

fn link(real: &Path, at: &Path) {
    std::fs::create_dir_all(at.parent().unwrap()).unwrap();
    if std::fs::hard_link(real, at).is_err() {
        std::os::unix::fs::symlink(real, at).unwrap();
    }
}

fn write(at: &Path, text: &str) {
    std::fs::create_dir_all(at.parent().unwrap()).unwrap();
    std::fs::write(at, text).unwrap();
}

/// Every store's layout under `home`, each holding the real model; `models` is a models_dir.
fn stores(home: &Path, models: &Path, real: &Path) {
    // Ollama: manifest → blobs/sha256-<hex>; a params layer with a stop word.
    let ollama = home.join(".ollama/models");
    let hex = "a".repeat(64);
    let phex = "b".repeat(64);
    link(real, &ollama.join(format!("blobs/sha256-{hex}")));
    write(
        &ollama.join(format!("blobs/sha256-{phex}")),
        r#"{"stop":["<end_of_turn>"]}"#,
    );
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "layers": [
            {"mediaType": "application/vnd.ollama.image.model", "digest": format!("sha256:{hex}"), "size": 1},
            {"mediaType": "application/vnd.ollama.image.params", "digest": format!("sha256:{phex}"), "size": 1},
        ]
    });
    write(
        &ollama.join("manifests/registry.ollama.ai/library/gemma3/270m"),
        &manifest.to_string(),
    );
    // A manifest whose blob is missing: a warning, the rest served.
    write(
        &ollama.join("manifests/registry.ollama.ai/library/gone/latest"),
        &manifest.to_string().replace(&hex, &"c".repeat(64)),
    );
    // Hugging Face: snapshots/<rev>/file → ../../blobs/<sha>; refs/main names the revision.
    let repo = home.join(".cache/huggingface/hub/models--ggml-org--gemma-3-270m-GGUF");
    link(real, &repo.join("blobs/0123abcd"));
    write(&repo.join("refs/main"), "rev1");
    std::fs::create_dir_all(repo.join("snapshots/rev1")).unwrap();
    std::os::unix::fs::symlink(
        "../../blobs/0123abcd",
        repo.join("snapshots/rev1/gemma-3-270m-Q4_K_M.gguf"),
    )
    .unwrap();
    // LM Studio: publisher/repo/file.
    link(
        real,
        &home
            .join(".lmstudio/models/lmstudio-community/gemma-3-270m-GGUF/gemma-3-270m-Q4_K_M.gguf"),
    );
    // A plain folder, with a truncated GGUF beside the good one.
    link(real, &models.join("gemma-plain.gguf"));
    write(&models.join("truncated.gguf"), "GGUF\u{3}");
}

const IDS: [&str; 4] = [
    "gemma3:270m",
    "ggml-org/gemma-3-270m-GGUF",
    "lmstudio-community/gemma-3-270m-GGUF",
    "gemma-plain",
];

fn config(s: &Scratch, env: &LlamaEnv, models: &Path) -> String {
    let q = |p: &Path| serde_json::to_string(&p.display().to_string()).unwrap();
    format!(
        "listen = \"127.0.0.1:0\"\nstate_dir = {}\nport_range = [{}, {}]\nmodels_dirs = [{}]\n\
         llama_server = {}\ndiscovered_args = [\"--host\", \"127.0.0.1\", \"-c\", \"1024\", \"-t\", \"1\", \"-np\", \"1\"]\n\
         [models.gemma-embed]\ncmd = [{}, \"-m\", {}, \"--port\", \"${{PORT}}\", \"-c\", \"512\", \"-t\", \"1\", \"--embeddings\", \"--pooling\", \"mean\"]\n",
        q(&s.state_dir()),
        s.ports.0,
        s.ports.1,
        q(models),
        q(&env.server),
        q(&env.server),
        q(&env.model),
    )
}

async fn wait_for(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) -> Duration {
    let began = Instant::now();
    loop {
        if check().await {
            return began.elapsed();
        }
        assert!(began.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn tag_ids(serve: &Serve) -> Vec<String> {
    let tags = serve.get("/api/tags").await.json();
    tags["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_owned())
        .collect()
}

const CLIENTS: &str = r#"
import json, os, sys, time
import ollama, openai
url = os.environ["E2E_URL"]
c = ollama.Client(host=url)
out = {}
out["list"] = [m.model for m in c.list().models]
show = c.show("gemma3:270m")
out["show"] = {"family": show.details.family, "quant": show.details.quantization_level,
               "ctx": show.modelinfo.get("gemma3.context_length"), "template": bool(show.template),
               "capabilities": show.capabilities}
opts = {"num_predict": 4, "temperature": 0}
r = c.chat(model="gemma3:270m", messages=[{"role": "user", "content": "Say hi"}], options=opts)
out["chat"] = {"role": r.message.role, "done": r.done, "eval_count": r.eval_count,
               "prompt_eval_count": r.prompt_eval_count, "total_duration": r.total_duration}
parts = list(c.chat(model="gemma3:270m", messages=[{"role": "user", "content": "Say hi"}], options=opts, stream=True))
out["stream"] = {"n": len(parts), "last_done": parts[-1].done, "first_done": parts[0].done,
                 "done_reason": parts[-1].done_reason}
j = c.chat(model="gemma3:270m", messages=[{"role": "user", "content": "Give a JSON object"}], format="json",
           options={"num_predict": 12, "temperature": 0})
out["json"] = j.message.content
g = c.generate(model="gemma-plain", prompt="Hello", options=opts)
out["generate"] = {"done": g.done, "eval_count": g.eval_count, "has_text": isinstance(g.response, str)}
e = c.embed(model="gemma-embed", input=["a", "b"])
out["embed"] = {"n": len(e.embeddings), "dim": len(e.embeddings[0])}
out["ps"] = sorted(m.model for m in c.ps().models)
try:
    c.pull("gemma3:270m")
    out["pull"] = "no error"
except ollama.ResponseError as err:
    out["pull"] = {"status": err.status_code, "error": err.error}
c.generate(model="gemma3:270m", prompt="Hi", keep_alive=0, options={"num_predict": 1})
oa = openai.OpenAI(base_url=url + "/v1", api_key="none")
out["retrieve"] = oa.models.retrieve("ggml-org/gemma-3-270m-GGUF").id
print(json.dumps(out))
"#;

#[tokio::test]
async fn every_store_is_served_with_no_models_configured_and_ollamas_clients_work() {
    let env = llama_env!();
    let s = Scratch::new();
    let home = s.path("home");
    let models = s.path("models");
    stores(&home, &models, &env.model);
    let serve = Serve::start_with(&s, &config(&s, &env, &models), &[("HOME", &home)]).await;

    let ids = tag_ids(&serve).await;
    for id in IDS {
        assert!(
            ids.iter().any(|i| i == id),
            "{id} not in /api/tags: {ids:?}\n{}",
            serve.log_text()
        );
    }
    let log = serve.log_text();
    for bad in ["truncated.gguf", "gone/latest"] {
        assert!(log.contains(bad), "no warning naming {bad}:\n{log}");
    }
    let all = serve.get("/api/models").await.json();
    let source = |id: &str| {
        all.as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .unwrap()["source"]
            .clone()
    };
    assert_eq!(source("gemma3:270m"), "ollama");
    assert_eq!(source("ggml-org/gemma-3-270m-GGUF"), "huggingface");
    assert_eq!(source("lmstudio-community/gemma-3-270m-GGUF"), "lmstudio");
    assert_eq!(source("gemma-plain"), "models_dir");
    assert_eq!(source("gemma-embed"), "config");

    // A chat to each discovered model on the real llama-server.
    for id in IDS {
        let body = serde_json::json!({"model": id, "max_tokens": 2,
            "messages": [{"role": "user", "content": "hi"}]})
        .to_string();
        let r = serve
            .call(
                "POST",
                "/v1/chat/completions",
                Some(&body),
                Duration::from_secs(120),
            )
            .await;
        assert_eq!(r.status, 200, "{id}: {}\n{}", r.text(), serve.log_text());
        assert_eq!(r.json()["object"], "chat.completion", "{id}");
        serve
            .post(
                &format!("/api/models/{}/unload", llmvisor::ids::encode_segment(id)),
                "",
            )
            .await;
    }

    // The official clients.
    let mut cmd = std::process::Command::new(env.python());
    cmd.args(["-c", CLIENTS])
        .env("E2E_URL", &serve.url)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env_remove("OLLAMA_HOST")
        .env_remove("OPENAI_BASE_URL")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy");
    let (status, out, err) = tokio::task::spawn_blocking(move || {
        llama::run_with_timeout(&mut cmd, Duration::from_secs(240))
    })
    .await
    .unwrap();
    assert!(
        status.success(),
        "python exited with {status}:\n{err}\n{}",
        serve.log_text()
    );
    let v: Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}\n{err}"));
    eprintln!("clients: {v:#}");
    let list: Vec<&str> = v["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    assert!(
        list.contains(&"gemma3:270m") && list.contains(&"gemma-embed"),
        "{v}"
    );
    assert_eq!(v["show"]["family"], "gemma3", "{v}");
    assert_eq!(v["show"]["quant"], "Q4_K_M", "{v}");
    assert_eq!(v["show"]["ctx"], 32768, "{v}");
    // Gemma 3 270M (a base model) carries no chat template; the field is there all the same.
    assert_eq!(v["show"]["template"], false, "{v}");
    assert_eq!(v["show"]["capabilities"][0], "completion", "{v}");
    assert_eq!(v["chat"]["role"], "assistant", "{v}");
    assert_eq!(v["chat"]["done"], true, "{v}");
    assert!(v["chat"]["eval_count"].as_u64().unwrap() >= 1, "{v}");
    assert!(v["chat"]["prompt_eval_count"].as_u64().unwrap() >= 1, "{v}");
    assert!(v["chat"]["total_duration"].as_u64().unwrap() > 0, "{v}");
    assert!(v["stream"]["n"].as_u64().unwrap() >= 2, "{v}");
    assert_eq!(
        (
            v["stream"]["first_done"].as_bool(),
            v["stream"]["last_done"].as_bool()
        ),
        (Some(false), Some(true)),
        "{v}"
    );
    let json_text = v["json"].as_str().unwrap();
    assert!(
        json_text.trim_start().starts_with('{'),
        "format=json gave {json_text:?}"
    );
    assert_eq!(v["generate"]["done"], true, "{v}");
    assert_eq!(v["embed"]["n"], 2, "{v}");
    assert!(v["embed"]["dim"].as_u64().unwrap() > 0, "{v}");
    assert!(
        v["ps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m == "gemma3:270m"),
        "{v}"
    );
    assert_eq!(v["pull"]["status"], 501, "{v}");
    assert!(
        v["pull"]["error"].as_str().unwrap().contains("models_dirs"),
        "{v}"
    );
    assert_eq!(v["retrieve"], "ggml-org/gemma-3-270m-GGUF", "{v}");
    // keep_alive=0: the model stops once its request is done.
    wait_for(
        "gemma3:270m stopped after keep_alive=0",
        Duration::from_secs(15),
        async || serve.model("gemma3:270m").await["state"] == "stopped",
    )
    .await;

    // The watcher: a file copied in is listed within 2 s; removed, it is unlisted and its
    // server stopped.
    link(&env.model, &s.path("staging.gguf"));
    std::fs::rename(s.path("staging.gguf"), models.join("gemma-new.gguf")).unwrap();
    let took = wait_for("gemma-new listed", Duration::from_secs(2), async || {
        tag_ids(&serve).await.iter().any(|i| i == "gemma-new")
    })
    .await;
    eprintln!("a new model was listed after {took:?}");
    let loaded = serve.load("gemma-new").await;
    let pid = loaded["pid"].as_u64().unwrap() as u32;
    std::fs::remove_file(models.join("gemma-new.gguf")).unwrap();
    wait_for("gemma-new unlisted", Duration::from_secs(20), async || {
        !tag_ids(&serve).await.iter().any(|i| i == "gemma-new")
    })
    .await;
    support::assert_gone(&[pid], Duration::from_secs(10)).await;
    assert_eq!(serve.get("/api/models/gemma-new").await.status, 404);
    serve.shutdown().await;
}
