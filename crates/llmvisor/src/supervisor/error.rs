//! Why an acquire, load or unload did not succeed.

use std::time::Duration;

/// The error of [`super::Supervisor::acquire`] and friends. Each variant maps to one HTTP status
/// in the router (404, 503, 504, 503).
#[derive(Debug, Clone, thiserror::Error)]
pub enum AcquireError {
    #[error("model `{name}` does not exist; known models: {}", known.join(", "))]
    UnknownModel { name: String, known: Vec<String> },

    /// The server could not be started (it exited, could not be executed, had no port, …).
    #[error("model `{model}` failed to start: {reason}{}", tail_suffix(log_tail))]
    StartFailed {
        model: String,
        reason: String,
        log_tail: Vec<String>,
        /// Set while the model is backing off after repeated failures: try again after this.
        retry_after: Option<Duration>,
    },

    #[error(
        "model `{model}` did not become ready within {} (its server was stopped){}",
        crate::units::format_duration(*after),
        tail_suffix(log_tail)
    )]
    StartTimeout {
        model: String,
        after: Duration,
        log_tail: Vec<String>,
    },

    /// No room under `max_loaded` / `memory_budget` / an exclusive group (now, or ever).
    #[error("model `{model}` was not started: {reason}")]
    NoRoom {
        model: String,
        reason: String,
        /// None when it can never fit.
        retry_after: Option<Duration>,
    },

    /// The model was unloaded, removed by a reload, or the supervisor is shutting down while the
    /// caller waited.
    #[error("model `{model}` is unavailable: {reason}")]
    Unavailable { model: String, reason: String },
}

fn tail_suffix(tail: &[String]) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!("; last output of the server:\n{}", tail.join("\n"))
    }
}
