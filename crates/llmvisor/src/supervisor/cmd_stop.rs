//! A model's `cmd_stop` (llama-swap's `cmdStop`): run before the usual stop, never instead of
//! it. The process group is still sent SIGTERM/SIGKILL and reaped afterwards, and the sweep
//! still covers it, so a server that ignores `cmd_stop` goes all the same.

use std::process::Stdio;
use std::time::Duration;

use crate::child::ChildProcess;
use crate::units;

/// `argv` with `${PID}`, `${PORT}` and `${MODEL_ID}` expanded.
pub fn expand(argv: &[String], pid: u32, port: Option<u16>, model_id: &str) -> Vec<String> {
    let port = port.map(|p| p.to_string()).unwrap_or_default();
    argv.iter()
        .map(|a| {
            a.replace("${PID}", &pid.to_string())
                .replace("${PORT}", &port)
                .replace("${MODEL_ID}", model_id)
        })
        .collect()
}

/// Runs `argv` (no shell) and waits, at most `grace` in all, for it to finish and for `server`
/// to exit. Whatever happens, the caller stops the group next.
pub async fn run(argv: &[String], server: &ChildProcess, grace: Duration, model_id: &str) {
    let Some((prog, args)) = argv.split_first() else {
        return;
    };
    let spawned = tokio::process::Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let mut cmd = match spawned {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(
                model = model_id,
                "cmd_stop `{prog}` could not be started: {e}"
            );
            return;
        }
    };
    let both = async {
        match cmd.wait().await {
            Ok(s) if !s.success() => {
                tracing::warn!(model = model_id, "cmd_stop `{prog}` ended with {s}")
            }
            Err(e) => tracing::warn!(model = model_id, "cmd_stop `{prog}`: {e}"),
            Ok(_) => {}
        }
        server.exited().await
    };
    if tokio::time::timeout(grace, both).await.is_err() {
        tracing::info!(
            model = model_id,
            "the server did not exit within {} of cmd_stop; stopping its process group",
            units::format_duration(grace)
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn macros_are_expanded() {
        let argv = vec![
            "kill".into(),
            "-TERM".into(),
            "${PID}".into(),
            "m=${MODEL_ID}:${PORT}".into(),
        ];
        assert_eq!(
            super::expand(&argv, 42, Some(9000), "a"),
            ["kill", "-TERM", "42", "m=a:9000"]
        );
    }
}
