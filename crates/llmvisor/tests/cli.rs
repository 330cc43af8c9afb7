//! The `llmvisor` binary as users run it: exit codes and messages of `check`, the client
//! commands against no daemon, and `serve`/`ps`/`load`/`unload`/`logs` against a live daemon
//! supervising the fake server.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use llmvisor::procfs;
use support::serve::{closed_port, ServeProcess as Daemon};
use support::{fake_llm, Scratch};

const BIN: &str = env!("CARGO_BIN_EXE_llmvisor");

/// Runs `llmvisor ARGS` with a clean client environment (no URL or key inherited).
fn llmvisor(args: &[&str]) -> Output {
    llmvisor_env(args, &[])
}

fn llmvisor_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("LLMVISOR_URL")
        .env_remove("LLMVISOR_API_KEY")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run llmvisor")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn check_accepts_a_valid_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "ok.toml",
        r#"listen = "127.0.0.1:18080"

[models.beta]
cmd = ["/bin/true", "--port", "${PORT}"]

[models.alpha]
cmd = "/bin/true --port ${PORT}"
ttl = "5m"
"#,
    );
    // An empty home: no model store of this machine's user adds to what is checked.
    let home = dir.path().to_str().unwrap();
    let out = llmvisor_env(
        &["check", "--config", path.to_str().unwrap()],
        &[
            ("HOME", home),
            ("HF_HOME", home),
            ("OLLAMA_MODELS", home),
            ("LLAMA_CACHE", home),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!(
            "{}: ok (2 models: alpha, beta)\ndiscovery adds no models\n",
            path.display()
        )
    );
}

#[test]
fn check_prints_what_the_auto_budgets_make_of_this_machine() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "auto.toml",
        r#"memory_budget = "auto"
memory_reserve = "256MiB"
gpu_budget = "auto"

[models.m]
cmd = ["/bin/true", "--port", "${PORT}"]
"#,
    );
    let out = llmvisor(&["check", "--config", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("  memory_budget: ")
            && text.contains("on this machine now (auto: ")
            && text.contains("available at start less memory_reserve 256 MiB)"),
        "{text}"
    );
    // This machine may have GPUs or not; either way one line says what counts.
    assert!(text.contains("  gpu_budget: "), "{text}");
}

#[test]
fn check_reports_a_broken_config_with_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "bad.toml",
        r#"[models.m]
cmd = ["/bin/true", "--port", "${PORT}"]
aliases = ["mm"]
tll = "5m"
"#,
    );
    let out = llmvisor(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("{}:4:1:", path.display())),
        "no position in: {err}"
    );
    assert!(err.contains("did you mean"), "no suggestion in: {err}");
    assert!(stdout(&out).is_empty());
}

#[test]
fn check_reports_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "bad.toml",
        r#"lisen = "127.0.0.1:8080"

[models.m]
cmd = ["/bin/true", "--port", "${PORT}"]
tll = "5m"
"#,
    );
    let out = llmvisor(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains(&format!("{}:1:1:", path.display())), "{err}");
    assert!(err.contains(&format!("{}:5:1:", path.display())), "{err}");
}

#[test]
fn a_bad_worker_thread_count_is_refused_with_the_fix() {
    for bad in ["0", "two", "-1", "99999"] {
        let o = llmvisor_env(
            &["serve", "--config", "/nonexistent/llmvisor.toml"],
            &[("LLMVISOR_WORKER_THREADS", bad)],
        );
        assert_eq!(o.status.code(), Some(1), "{bad}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(
            err.contains("LLMVISOR_WORKER_THREADS") && err.contains("fix: a number from 1 to 1024"),
            "{bad}: {err}"
        );
    }
}

#[test]
fn check_of_a_missing_file_says_so() {
    let out = llmvisor(&["check", "--config", "/nonexistent/llmvisor.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("/nonexistent/llmvisor.toml"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn ps_without_a_daemon_says_none_runs_there() {
    let url = format!("http://127.0.0.1:{}", closed_port());
    let out = llmvisor(&["ps", "--url", &format!("{url}/")]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        format!("error: no llmvisor at {url} (start one with `llmvisor serve --config FILE`)\n")
    );
    assert!(stdout(&out).is_empty());
}

#[test]
fn client_commands_find_the_daemon_through_config_then_environment() {
    let env_url = format!("http://127.0.0.1:{}", closed_port());
    // LLMVISOR_URL when nothing else names one.
    let out = llmvisor_env(&["load", "m"], &[("LLMVISOR_URL", &env_url)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("no llmvisor at {env_url} ")),
        "{}",
        stderr(&out)
    );

    // The `listen` of --config comes before LLMVISOR_URL.
    let port = closed_port();
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "c.toml",
        &format!(
            "listen = \"0.0.0.0:{port}\"\nallow_insecure = true\n\n[models.m]\ncmd = [\"/bin/true\", \"${{PORT}}\"]\n"
        ),
    );
    let out = llmvisor_env(
        &["unload", "m", "--config", path.to_str().unwrap()],
        &[("LLMVISOR_URL", &env_url)],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("no llmvisor at http://127.0.0.1:{port} ")),
        "{}",
        stderr(&out)
    );
}

#[test]
fn gc_of_a_state_dir_without_state_finds_nothing() {
    let s = Scratch::new();
    let dir = s.path("empty");
    let out = llmvisor(&["gc", "--state-dir", dir.to_str().unwrap(), "--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("nothing to clean up"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn a_bad_url_is_an_error_not_a_crash() {
    let out = llmvisor(&["ps", "--url", "https://127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("error: unsupported URL"),
        "{}",
        stderr(&out)
    );
}

// ---- against a live daemon -------------------------------------------------------------------

fn model_state(url: &str, id: &str) -> serde_json::Value {
    let out = llmvisor(&["ps", "--json", "--url", url]);
    assert!(out.status.success(), "ps --json failed: {}", stderr(&out));
    let all: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("ps --json is not JSON ({e}): {}", stdout(&out)));
    let arr = all.as_array().expect("ps --json prints an array");
    arr.iter()
        .find(|m| m["id"] == id)
        .unwrap_or_else(|| panic!("no model {id} in {all}"))
        .clone()
}

#[tokio::test(flavor = "current_thread")]
async fn serve_ps_load_unload_logs_and_a_clean_sigterm() {
    let scratch = Scratch::new();
    let config = write(
        scratch.root(),
        "llmvisor.toml",
        &format!(
            r#"state_dir = "{state}"
port_range = [{lo}, {hi}]

[models.fake]
cmd = ["{fake}", "--port", "${{PORT}}", "--pid-file", "{pids}", "--startup-delay", "300ms"]
aliases = ["fk"]
startup_timeout = "20s"
stop_timeout = "2s"
"#,
            state = scratch.state_dir().display(),
            lo = scratch.ports.0,
            hi = scratch.ports.1,
            fake = fake_llm().display(),
            pids = scratch.path("fake.pids").display(),
        ),
    );
    let check = llmvisor(&["check", "--config", config.to_str().unwrap()]);
    assert!(check.status.success(), "{}", stderr(&check));

    let mut daemon = Daemon::start(&config);
    let url = daemon.url.clone();

    // Nothing runs yet.
    let m = model_state(&url, "fake");
    assert_eq!(m["state"], "stopped", "{m}");
    assert!(m["pid"].is_null());
    let table = llmvisor(&["ps", "--url", &url]);
    assert!(table.status.success(), "{}", stderr(&table));
    let text = stdout(&table);
    let mut lines = text.lines();
    assert!(lines.next().unwrap().starts_with("MODEL"), "{text}");
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(row[..2], ["fake", "stopped"], "{text}");

    // load waits until ready; without a TTY the progress is one plain line.
    let load = llmvisor(&["load", "fake", "--url", &url]);
    assert!(load.status.success(), "load failed: {}", stderr(&load));
    assert_eq!(stderr(&load), "loading fake…\n");
    let said = stdout(&load);
    assert!(said.starts_with("loaded fake in "), "{said}");
    let m = model_state(&url, "fake");
    assert_eq!(m["state"], "ready", "{m}");
    let pid = m["pid"].as_u64().expect("a ready model has a pid") as u32;
    assert!(
        said.contains(&format!("(pid {pid}, http://127.0.0.1:")),
        "{said}"
    );
    assert_eq!(scratch.pids("fake.pids"), vec![pid]);

    // Loading a ready model (by alias) does not start another server.
    let again = llmvisor(&["load", "fk", "--url", &url]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(
        stdout(&again).starts_with("fake is already loaded (pid "),
        "{}",
        stdout(&again)
    );
    assert_eq!(scratch.pids("fake.pids"), vec![pid]);

    // The model's output is there to read.
    let logs = llmvisor(&["logs", "fake", "--url", &url]);
    assert!(logs.status.success(), "{}", stderr(&logs));

    // Errors from the daemon come out as its message.
    let unknown = llmvisor(&["load", "nope", "--url", &url]);
    assert_eq!(unknown.status.code(), Some(1));
    let err = stderr(&unknown);
    assert!(err.starts_with("error: ") && err.contains("nope"), "{err}");
    assert_eq!(
        err.lines().count(),
        1,
        "no progress line for an unknown model: {err}"
    );
    assert!(
        err.contains("fake"),
        "the message names the known models: {err}"
    );

    // unload stops it.
    let unload = llmvisor(&["unload", "fake", "--url", &url]);
    assert!(unload.status.success(), "{}", stderr(&unload));
    assert!(
        stdout(&unload).starts_with("unloaded fake"),
        "{}",
        stdout(&unload)
    );
    assert_eq!(model_state(&url, "fake")["state"], "stopped");
    support::assert_gone(&[pid], Duration::from_secs(3)).await;

    // Start it again, then SIGTERM the daemon: exit 0 and no server left behind.
    let load = llmvisor(&["load", "fake", "--url", &url]);
    assert!(load.status.success(), "{}", stderr(&load));
    let pid2 = model_state(&url, "fake")["pid"].as_u64().unwrap() as u32;
    assert!(procfs::is_alive(pid2));
    let status = daemon.terminate(Duration::from_secs(15));
    assert!(
        status.success(),
        "llmvisor exited with {status} after SIGTERM; stderr:\n{}",
        daemon.stderr_so_far()
    );
    scratch.assert_all_gone(Duration::from_secs(3)).await;
}
