//! A lease: while it lives, its model is not stopped (nor evicted, nor idled out).

use std::sync::Arc;

use tokio::sync::watch;

use super::cell::ModelCell;
use crate::upstream::Endpoint;

/// Proof that a model's server is in use. Dropping it, or [`Lease::release`], ends it; when a
/// model's last lease ends its idle TTL starts.
pub struct Lease {
    cell: Arc<ModelCell>,
    run: u64,
    endpoint: Endpoint,
    down: watch::Receiver<bool>,
}

impl Lease {
    pub(crate) fn new(
        cell: Arc<ModelCell>,
        run: u64,
        endpoint: Endpoint,
        down: watch::Receiver<bool>,
    ) -> Self {
        Self {
            cell,
            run,
            endpoint,
            down,
        }
    }

    /// The model's id (never an alias).
    pub fn model(&self) -> &str {
        &self.cell.id
    }

    /// Where the server listens.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The server's base URL, e.g. `http://127.0.0.1:10500`.
    pub fn url(&self) -> String {
        self.endpoint.base_url()
    }

    /// False once the server this lease was given for has exited or been stopped.
    pub fn is_up(&self) -> bool {
        !*self.down.borrow()
    }

    /// Resolves when the server this lease was given for is gone (crashed, or force-stopped).
    pub async fn server_gone(&self) {
        let mut rx = self.down.clone();
        let _ = rx.wait_for(|down| *down).await;
    }

    /// Waits for one of the server's connection slots (`max_connections`): hold it while a
    /// request to the server is in flight, so the server never has more connections than it
    /// has slots and the rest wait here, not inside it.
    pub async fn connection_slot(&self) -> tokio::sync::OwnedSemaphorePermit {
        self.cell.connection_slot().await
    }

    /// After a `kv_persist` restore, until the next request tells whether it was reused: the
    /// model's KV state, to be given that request's llama-server `timings`.
    pub fn kv_check(&self) -> Option<KvCheck> {
        self.cell
            .kv
            .check_pending()
            .then(|| KvCheck(self.cell.clone()))
    }

    /// Ends the lease now (same as dropping it).
    pub fn release(self) {}
}

/// Where a request's llama-server `timings` go after a restore (see [`Lease::kv_check`]).
pub struct KvCheck(Arc<ModelCell>);

impl KvCheck {
    /// `cache_n` tokens taken from the cache, `prompt_n` evaluated.
    pub fn observe(&self, cache_n: u64, prompt_n: u64) {
        self.0.kv.observe(cache_n, prompt_n);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.cell.release(self.run);
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("model", &self.model())
            .field("url", &self.url())
            .finish()
    }
}
