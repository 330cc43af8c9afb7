//! The status snapshot of one model: the fields of `GET /api/models` in SPEC.md.

use serde::Serialize;

/// Lifecycle phase of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Stopped,
    Starting,
    Ready,
    Stopping,
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Stopped => "stopped",
            Phase::Starting => "starting",
            Phase::Ready => "ready",
            Phase::Stopping => "stopping",
            Phase::Failed => "failed",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelStatus {
    pub id: String,
    pub aliases: Vec<String>,
    pub state: Phase,
    pub pid: Option<u32>,
    pub port: Option<u16>,
    /// Base URL of the running server (`http://127.0.0.1:PORT`, or `unix:/path` for a socket).
    pub url: Option<String>,
    /// Active leases, in-flight requests included.
    pub leases: usize,
    /// How many times the server was started after its first start.
    pub restarts: u32,
    /// How the last server process ended ("exit code 1", "signal 9 (SIGKILL)").
    pub last_exit: Option<String>,
    /// Milliseconds its last successful start took.
    pub ready_ms: Option<u64>,
    pub error: Option<String>,
    /// Bytes the memory budget counts for it (None: unknown).
    pub memory: Option<u64>,
    /// Where `memory` comes from: "declared", "estimated", "learned", "measured" or "unknown".
    pub memory_source: &'static str,
    /// The estimate's parts, the measured figures and the learned one.
    pub memory_detail: super::memory::MemoryDetail,
    /// The GPUs its server runs on (`[]`: CPU only).
    pub gpus: Vec<u32>,
    /// Requests waiting for room to start it.
    pub queued: usize,
    /// Why its start waits for room (which models it waits for), while it does.
    pub wait_reason: Option<String>,
    pub pinned: bool,
    /// `"config"`, or the store discovery found it in (`"ollama"`, `"huggingface"` …).
    pub source: &'static str,
    /// The GGUF it serves, when discovered.
    pub file: Option<String>,
    /// Bytes of saved KV state on disk (`kv_persist`), or None.
    pub kv_saved: Option<u64>,
}
