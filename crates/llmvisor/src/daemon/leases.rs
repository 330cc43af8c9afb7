//! HTTP leases: how an app that talks to a server's URL directly says "a chat is using this
//! model" (`POST /api/leases`) and "the chat is done" (`DELETE`, or just stop renewing).
//!
//! Each HTTP lease holds a real [`Lease`]; a small task per lease drops it at its deadline unless
//! a renewal moved the deadline first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::supervisor::Lease;
use crate::sync::LockExt;

pub const DEFAULT_TTL: Duration = Duration::from_secs(60);
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Default, Clone)]
pub struct HttpLeases {
    table: Arc<Mutex<HashMap<String, Entry>>>,
}

struct Entry {
    model: String,
    url: String,
    deadline: watch::Sender<Instant>,
    expires_at: f64,
    /// Who asked for it (the key presented, else the IP address), for the per-caller cap.
    caller: String,
    /// The TTL asked for at creation (or at the last renewal that named one).
    ttl: Duration,
    _lease: Lease,
}

/// The JSON answer of the lease routes.
#[derive(Debug, Clone, Serialize)]
pub struct LeaseInfo {
    pub id: String,
    pub model: String,
    pub url: String,
    /// Unix time in seconds (with milliseconds) at which the lease ends unless renewed.
    pub expires_at: f64,
    pub ttl_s: f64,
}

impl HttpLeases {
    /// Leases held by `caller`.
    pub fn held_by(&self, caller: &str) -> usize {
        let table = self.table.locked();
        table.values().filter(|e| e.caller == caller).count()
    }

    /// Holds `lease` for `ttl` for `caller`, unless `caller` already holds `cap` leases (then
    /// the lease is dropped and `None` returned).
    pub fn insert(
        &self,
        lease: Lease,
        ttl: Duration,
        caller: &str,
        cap: usize,
    ) -> Option<LeaseInfo> {
        let mut table = self.table.locked();
        if table.values().filter(|e| e.caller == caller).count() >= cap {
            return None;
        }
        let id = format!("lease-{}", crate::ids::random_hex(12));
        let (deadline, mut rx) = watch::channel(Instant::now() + ttl);
        let info = LeaseInfo {
            id: id.clone(),
            model: lease.model().to_owned(),
            url: lease.url(),
            expires_at: unix_in(ttl),
            ttl_s: ttl.as_secs_f64(),
        };
        table.insert(
            id.clone(),
            Entry {
                caller: caller.to_owned(),
                model: info.model.clone(),
                url: info.url.clone(),
                deadline,
                expires_at: info.expires_at,
                ttl,
                _lease: lease,
            },
        );
        drop(table);
        let table = self.table.clone();
        tokio::spawn(async move {
            loop {
                let at = *rx.borrow_and_update();
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {
                        if *rx.borrow() <= Instant::now() {
                            if table.locked().remove(&id).is_some() {
                                tracing::info!(lease = %id, "HTTP lease expired");
                            }
                            return;
                        }
                    }
                    changed = rx.changed() => if changed.is_err() {
                        return; // released
                    }
                }
            }
        });
        Some(info)
    }

    /// Moves the deadline of lease `id` to now + `ttl` (by default the lease's own TTL).
    pub fn renew(&self, id: &str, ttl: Option<Duration>) -> Option<LeaseInfo> {
        let mut table = self.table.locked();
        let entry = table.get_mut(id)?;
        let ttl = ttl.unwrap_or(entry.ttl);
        entry.ttl = ttl;
        entry.deadline.send_replace(Instant::now() + ttl);
        entry.expires_at = unix_in(ttl);
        Some(LeaseInfo {
            id: id.to_owned(),
            model: entry.model.clone(),
            url: entry.url.clone(),
            expires_at: entry.expires_at,
            ttl_s: ttl.as_secs_f64(),
        })
    }

    /// Ends lease `id` now. False if there was none.
    pub fn release(&self, id: &str) -> bool {
        self.table.locked().remove(id).is_some()
    }

    pub fn count(&self) -> usize {
        self.table.locked().len()
    }

    /// Ends every lease (shutdown).
    pub fn clear(&self) {
        self.table.locked().clear();
    }
}

fn unix_in(ttl: Duration) -> f64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        + ttl;
    (t.as_millis() as f64) / 1000.0
}

/// A requested TTL in seconds, checked: positive, finite, at most a day.
pub fn ttl_from_secs(secs: Option<f64>) -> Result<Duration, String> {
    match secs {
        None => Ok(DEFAULT_TTL),
        Some(s) if s.is_finite() && s > 0.0 && s <= MAX_TTL.as_secs_f64() => {
            Ok(Duration::from_secs_f64(s))
        }
        Some(s) => Err(format!(
            "ttl_s must be a number of seconds between 0 and {} (got {s})",
            MAX_TTL.as_secs()
        )),
    }
}
