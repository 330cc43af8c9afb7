//! Ports for children: never the same port to two live children, never one that is busy.
//!
//! Peers pick a port and let the child bind it later, a race they lose now and then. llmvisor
//! narrows it from both sides: a port is *claimed* here (no other start of this process can get it
//! until the claim is dropped), it is probed with a real bind on the address the child will use,
//! and a child that dies during startup because someone took the port in between is retried on
//! another port by the supervisor.

use crate::sync::LockExt;
use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PortError {
    #[error("no free port in {lo}-{hi}: every port is claimed or busy")]
    Exhausted { lo: u16, hi: u16 },
    #[error("port {0} is already used by another model of this llmvisor")]
    FixedClaimed(u16),
    #[error("port {0} is in use by another process (fix: stop that process, or change `port`)")]
    FixedBusy(u16),
}

/// Hands out ports from a range; cheap to clone (shared state).
#[derive(Clone)]
pub struct PortAllocator {
    inner: Arc<Inner>,
}

struct Inner {
    lo: u16,
    hi: u16,
    /// Ports configured as fixed `port`s: never handed out from the range.
    reserved: Mutex<HashSet<u16>>,
    state: Mutex<State>,
}

struct State {
    claimed: HashSet<u16>,
    /// Where the next search starts: rotating spreads restarts over the range, so a port that
    /// was just released (and may linger in TIME_WAIT or in a client's pool) is not reused first.
    next: u16,
}

/// A claimed port; released when dropped.
#[derive(Debug)]
pub struct PortClaim {
    port: u16,
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PortAllocator({}-{})", self.lo, self.hi)
    }
}

impl PortClaim {
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for PortClaim {
    fn drop(&mut self) {
        self.inner.state.locked().claimed.remove(&self.port);
    }
}

impl PortAllocator {
    pub fn new(range: (u16, u16)) -> Self {
        Self {
            inner: Arc::new(Inner {
                lo: range.0,
                hi: range.1,
                reserved: Mutex::new(HashSet::new()),
                state: Mutex::new(State {
                    claimed: HashSet::new(),
                    next: range.0,
                }),
            }),
        }
    }

    /// Keeps `ports` (the models' fixed ports) out of the range.
    pub fn set_reserved(&self, ports: impl IntoIterator<Item = u16>) {
        *self.inner.reserved.locked() = ports.into_iter().collect();
    }

    /// Claims a free port from the range, skipping `avoid` (e.g. a port that just failed).
    pub fn claim(&self, avoid: &[u16]) -> Result<PortClaim, PortError> {
        let reserved = self.inner.reserved.locked().clone();
        let mut state = self.inner.state.locked();
        let (lo, hi) = (self.inner.lo, self.inner.hi);
        let span = u32::from(hi - lo) + 1;
        let start = state.next.clamp(lo, hi);
        for i in 0..span {
            let port = (u32::from(start - lo) + i) % span + u32::from(lo);
            let port = port as u16;
            if state.claimed.contains(&port) || reserved.contains(&port) || avoid.contains(&port) {
                continue;
            }
            if !bind_probe(port) {
                continue;
            }
            state.claimed.insert(port);
            state.next = if port == hi { lo } else { port + 1 };
            return Ok(PortClaim {
                port,
                inner: self.inner.clone(),
            });
        }
        Err(PortError::Exhausted { lo, hi })
    }

    /// Claims a model's fixed port; a conflict is an error, not a fallback.
    pub fn claim_fixed(&self, port: u16) -> Result<PortClaim, PortError> {
        let mut state = self.inner.state.locked();
        if state.claimed.contains(&port) {
            return Err(PortError::FixedClaimed(port));
        }
        if !bind_probe(port) {
            return Err(PortError::FixedBusy(port));
        }
        state.claimed.insert(port);
        Ok(PortClaim {
            port,
            inner: self.inner.clone(),
        })
    }
}

/// True if nothing listens on `127.0.0.1:port` right now (the address children are told to use).
pub fn bind_probe(port: u16) -> bool {
    TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_range(n: u16) -> (u16, u16) {
        // Find n consecutive bindable ports well away from common ones.
        let mut lo = 21000;
        while let Some(busy) = (lo..lo + n).find(|p| !bind_probe(*p)) {
            lo = busy + 1;
        }
        (lo, lo + n - 1)
    }

    #[test]
    fn never_the_same_port_twice_while_claimed() {
        let alloc = PortAllocator::new(free_range(3));
        let a = alloc.claim(&[]).unwrap();
        let b = alloc.claim(&[]).unwrap();
        let c = alloc.claim(&[]).unwrap();
        let mut ports = vec![a.port(), b.port(), c.port()];
        ports.sort();
        ports.dedup();
        assert_eq!(ports.len(), 3);
        assert!(matches!(alloc.claim(&[]), Err(PortError::Exhausted { .. })));
        let freed = b.port();
        drop(b);
        assert_eq!(alloc.claim(&[]).unwrap().port(), freed);
    }

    #[test]
    fn skips_busy_and_reserved_ports() {
        let (lo, hi) = free_range(3);
        let busy = TcpListener::bind((Ipv4Addr::LOCALHOST, lo)).unwrap();
        let alloc = PortAllocator::new((lo, hi));
        alloc.set_reserved([lo + 1]);
        assert_eq!(alloc.claim(&[]).unwrap().port(), hi);
        drop(busy);
    }

    #[test]
    fn fixed_port_conflicts_are_errors() {
        let (lo, _) = free_range(1);
        let alloc = PortAllocator::new((lo, lo));
        let claim = alloc.claim_fixed(lo).unwrap();
        assert_eq!(
            alloc.claim_fixed(lo).unwrap_err(),
            PortError::FixedClaimed(lo)
        );
        drop(claim);
        let busy = TcpListener::bind((Ipv4Addr::LOCALHOST, lo)).unwrap();
        assert_eq!(alloc.claim_fixed(lo).unwrap_err(), PortError::FixedBusy(lo));
        drop(busy);
    }
}
