//! Command-line interface of `fake-llm`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// A fake llama-server: an OpenAI-compatible HTTP test double with knobs for
/// misbehaving (slow start, crashes, hangs, ignored signals, stray children).
#[derive(Parser, Debug)]
#[command(name = "fake-llm", version)]
pub struct Args {
    /// Address to listen on. A value containing '/' or ending in ".sock" is a
    /// UNIX socket path (a stale file there is removed first).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,

    /// TCP port; 0 binds an ephemeral port. Ignored for UNIX sockets.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,

    /// How long /health and /v1/* answer 503 "Loading model" after start
    /// ("1s", "250ms", or seconds as a bare number).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "0")]
    pub startup_delay: Duration,

    /// Append "<pid>\n" to this file first thing at start.
    #[arg(long, value_name = "PATH")]
    pub pid_file: Option<PathBuf>,

    /// Exit with this code right after the pid-file append.
    #[arg(long, value_name = "CODE", allow_negative_numbers = true)]
    pub exit_at_startup: Option<i32>,

    /// Pretend the port is taken: print "couldn't bind HTTP server socket"
    /// and exit 1 without listening.
    #[arg(long)]
    pub fail_bind: bool,

    /// Exit with code 3 right after the Nth completion/chat/embedding
    /// response has been fully sent.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub crash_after: Option<u64>,

    /// Ignore SIGTERM (only SIGKILL or SIGINT stop the process).
    #[arg(long)]
    pub ignore_sigterm: bool,

    /// Spawn a sleeping grandchild process in the same process group.
    #[arg(long)]
    pub fork_grandchild: bool,

    /// Append the grandchild's pid to this file (with --fork-grandchild).
    #[arg(long, value_name = "PATH")]
    pub grandchild_pid_file: Option<PathBuf>,

    /// Internal: run as the sleeping grandchild.
    #[arg(long, hide = true)]
    pub grandchild_sleep: bool,

    /// After this long since start, /health requests never get an answer.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub hang_health_after: Option<Duration>,

    /// Number of tokens (chunks) in a response when the request sets no max_tokens.
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub chunks: u64,

    /// Delay between two streamed chunks.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "0")]
    pub chunk_delay: Duration,

    /// Model id reported in responses.
    #[arg(long, value_name = "NAME", default_value = "fake-model")]
    pub model_name: String,

    /// Print "env NAME=VALUE" (or "env NAME unset") to stderr at start; repeatable.
    #[arg(long, value_name = "NAME")]
    pub print_env: Vec<String>,

    /// Print N lines "fake-llm log line i" (i = 1..=N) to stdout at start.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub log_lines: u64,

    /// Accepted for llama-server compatibility; ignored.
    #[arg(short = 'm', long = "model", value_name = "PATH")]
    pub model: Option<String>,

    /// Accepted for llama-server compatibility; ignored.
    #[arg(short = 'c', long = "ctx-size", value_name = "N")]
    pub ctx_size: Option<String>,

    /// Accepted for llama-server compatibility; ignored (requests are not checked).
    #[arg(long = "api-key", value_name = "KEY")]
    pub api_key: Option<String>,

    /// Stay loading (503 on /health) until this file exists, after any startup delay: a test
    /// decides when the load ends, instead of racing a timer.
    #[arg(long, value_name = "PATH")]
    pub ready_file: Option<PathBuf>,

    /// On a kept-alive connection, close it (without answering) when its second request
    /// arrives: the race of a server dropping an idle connection just as a client reuses it.
    #[arg(long)]
    pub close_reused: bool,

    /// Answer every route it does not know (llama-server's /completion, /props, POST /v1/x …)
    /// like /echo: the method, path, query, headers and body it received, as JSON.
    #[arg(long)]
    pub echo_unknown: bool,

    /// Add this header (`NAME:VALUE`) to every answer (repeatable), e.g. to see that a proxy
    /// does not trust or pass on headers a server may not set.
    #[arg(long, value_name = "NAME:VALUE", value_parser = parse_header)]
    pub response_header: Vec<(String, String)>,

    /// Accepted for llama-server compatibility (`kv_persist` adds it); ignored.
    #[arg(long, value_name = "DIR")]
    pub slot_save_path: Option<String>,

    /// Answer `GET /slots` with one idle slot holding tokens, and refuse every
    /// `POST /slots/{id}` like a llama-server without slot support (501).
    #[arg(long)]
    pub refuse_slot_save: bool,
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    let (name, value) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not NAME:VALUE"))?;
    let name = name.trim();
    axum::http::HeaderName::from_bytes(name.as_bytes()).map_err(|e| format!("{name:?}: {e}"))?;
    axum::http::HeaderValue::from_str(value.trim()).map_err(|e| format!("{value:?}: {e}"))?;
    Ok((name.to_string(), value.trim().to_string()))
}

impl Args {
    /// The UNIX socket path, when `--host` names one.
    pub fn unix_socket_path(&self) -> Option<PathBuf> {
        let h = &self.host;
        (h.contains('/') || h.ends_with(".sock")).then(|| PathBuf::from(h))
    }
}

/// Parses "1s", "250ms", "1.5", "2m", "100us" into a [`Duration`].
/// A bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (t, 1.0)
    };
    let value: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (expected e.g. 1s, 250ms, 0.5)"))?;
    Duration::try_from_secs_f64(value * scale)
        .map_err(|_| format!("invalid duration {s:?} (must be finite and not negative)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("0.5").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("").is_err());
    }
}
