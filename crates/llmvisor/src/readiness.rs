//! Readiness: poll a starting server's health path until it answers 2xx.
//!
//! The interval starts at a few milliseconds and doubles up to 25 ms, so a server that is ready
//! quickly is seen quickly, and a 30-second load costs a few hundred cheap requests. Each poll has
//! its own timeout (a server that accepts but never answers cannot stall the wait), and the wait
//! ends the moment the child exits: nobody waits out a timeout for a process that is already dead.

use std::future::Future;
use std::process::ExitStatus;
use std::time::Duration;

use http_body_util::BodyExt;
use tokio::sync::broadcast;
use tokio::time::{timeout, Instant};

use crate::upstream::{Endpoint, UpstreamClient};

const FIRST_INTERVAL: Duration = Duration::from_millis(2);
/// Loopback polls are cheap; a short cap keeps the delay between "ready" and "seen ready" small.
const MAX_INTERVAL: Duration = Duration::from_millis(25);
const POLL_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub enum NotReady {
    /// The child exited before it became ready.
    Exited(ExitStatus),
    /// `deadline` passed first.
    TimedOut,
}

/// Waits until `GET {endpoint}{health_path}` answers 2xx, the child exits (`exited` resolves), or
/// `deadline` passes. 503 ("loading") and refused connections mean "not yet".
///
/// `output` carries the child's output lines: a server usually says something when it becomes
/// ready ("model loaded", "listening on …"), so a new line triggers a probe at once instead of
/// at the end of the current interval.
pub async fn wait_ready(
    client: &UpstreamClient,
    endpoint: &Endpoint,
    health_path: &str,
    deadline: Instant,
    exited: impl Future<Output = ExitStatus>,
    mut output: broadcast::Receiver<String>,
) -> Result<(), NotReady> {
    let poll_loop = async {
        let mut interval = FIRST_INTERVAL;
        let mut output_open = true;
        loop {
            if probe(client, endpoint, health_path, POLL_TIMEOUT).await {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => interval = (interval * 2).min(MAX_INTERVAL),
                line = output.recv(), if output_open => {
                    output_open = !matches!(line, Err(broadcast::error::RecvError::Closed));
                }
            }
        }
    };
    tokio::select! {
        biased;
        status = exited => Err(NotReady::Exited(status)),
        _ = tokio::time::sleep_until(deadline) => Err(NotReady::TimedOut),
        () = poll_loop => Ok(()),
    }
}

/// One health request: true on a 2xx answer within `within`.
pub async fn probe(
    client: &UpstreamClient,
    endpoint: &Endpoint,
    health_path: &str,
    within: Duration,
) -> bool {
    // `health_path = "none"`: any HTTP answer at `/` means up (llama-swap's checkEndpoint: none).
    let any_answer = health_path == crate::config::NO_HEALTH_CHECK;
    let path = if any_answer { "/" } else { health_path };
    let Ok(uri) = endpoint.uri(path) else {
        return false;
    };
    let req = match http::Request::get(uri).body(crate::upstream::empty_body()) {
        Ok(r) => r,
        Err(_) => return false,
    };
    let answer = async {
        let resp = client.request(req).await.ok()?;
        let ok = any_answer || resp.status().is_success();
        // Read the (small) body so the connection goes back to the pool.
        resp.into_body().collect().await.ok()?;
        Some(ok)
    };
    matches!(timeout(within, answer).await, Ok(Some(true)))
}
