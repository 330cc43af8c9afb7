//! What every request handler shares.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use super::leases::HttpLeases;
use crate::config::Config;
use crate::metrics::{Histogram, OVERHEAD_BOUNDS};
use crate::supervisor::Supervisor;
use crate::sync::RwLockExt;
use crate::upstream::{self, UpstreamClient};

pub struct AppState {
    pub sup: Supervisor,
    config: RwLock<Arc<Config>>,
    pub client: UpstreamClient,
    /// For a retry on a new connection (see `proxy::forward`).
    pub fresh_client: UpstreamClient,
    pub metrics: DaemonMetrics,
    pub leases: HttpLeases,
    /// The address the listener is bound to (set by `run`): what a reload is checked against.
    bound: RwLock<Option<std::net::SocketAddr>>,
    /// Bytes of request bodies buffered at once (`body_budget`), one permit per byte.
    pub body_budget: Arc<tokio::sync::Semaphore>,
    body_budget_total: usize,
    /// Fleet mode (set once at start when the config has `[cluster]`).
    pub fleet: std::sync::OnceLock<super::fleet::FleetHandle>,
    /// llama-swap's per-model request slots (`concurrency_limit`).
    pub swap: super::llama_swap::SwapState,
    /// The event stream (`/api/events`) and per-model request activity.
    pub events: Arc<crate::events::EventBus>,
    /// Its readers (capped).
    pub subscribers: Arc<super::subscribers::Subscribers>,
}

impl AppState {
    pub fn new(sup: Supervisor, config: Config) -> Arc<Self> {
        let budget = usize::try_from(config.http.body_budget)
            .unwrap_or(usize::MAX)
            .min(tokio::sync::Semaphore::MAX_PERMITS);
        let events = Arc::new(crate::events::EventBus::new());
        crate::events::attach(sup.clone(), &events);
        Arc::new(Self {
            events,
            sup,
            config: RwLock::new(Arc::new(config)),
            client: upstream::client(),
            fresh_client: upstream::fresh_client(),
            metrics: DaemonMetrics::default(),
            leases: HttpLeases::default(),
            bound: RwLock::new(None),
            body_budget: Arc::new(tokio::sync::Semaphore::new(budget)),
            body_budget_total: budget,
            fleet: std::sync::OnceLock::new(),
            swap: Default::default(),
            subscribers: Default::default(),
        })
    }

    /// The configuration in force (replaced as a whole by a reload).
    pub fn config(&self) -> Arc<Config> {
        self.config.read_locked().clone()
    }

    /// Bytes of request bodies buffered right now.
    pub fn body_bytes_buffered(&self) -> usize {
        self.body_budget_total - self.body_budget.available_permits()
    }

    pub fn bound(&self) -> Option<std::net::SocketAddr> {
        *self.bound.read_locked()
    }

    pub fn set_bound(&self, addr: std::net::SocketAddr) {
        *self.bound.write_locked() = Some(addr);
    }

    pub fn set_config(&self, config: Config) {
        *self.config.write_locked() = Arc::new(config);
    }
}

pub struct DaemonMetrics {
    /// Responses by status code (index = code - 100).
    by_status: Vec<AtomicU64>,
    pub in_flight: AtomicI64,
    /// Requests sent again on a new connection after a reused one was closed under them.
    pub upstream_retries: AtomicU64,
    /// Time spent in llmvisor per proxied request, excluding the model's start and the server's
    /// own work.
    pub proxy_overhead: Histogram,
}

impl Default for DaemonMetrics {
    fn default() -> Self {
        Self {
            by_status: (100..600).map(|_| AtomicU64::new(0)).collect(),
            in_flight: AtomicI64::new(0),
            upstream_retries: AtomicU64::new(0),
            proxy_overhead: Histogram::new(OVERHEAD_BOUNDS),
        }
    }
}

impl DaemonMetrics {
    pub fn count_status(&self, status: u16) {
        if let Some(c) = self.by_status.get(usize::from(status.saturating_sub(100))) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn count_retry(&self) {
        self.upstream_retries.fetch_add(1, Ordering::Relaxed);
    }

    /// (status, count) for every status seen.
    pub fn statuses(&self) -> Vec<(u16, u64)> {
        self.by_status
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let n = c.load(Ordering::Relaxed);
                (n > 0).then_some((i as u16 + 100, n))
            })
            .collect()
    }
}

/// Counts one proxied request as in flight until dropped (with its response body).
pub struct InFlight(Arc<AppState>);

impl InFlight {
    pub fn new(st: Arc<AppState>) -> Self {
        st.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(st)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
