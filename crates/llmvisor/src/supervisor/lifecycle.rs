//! The lifecycle of one model, as one enum whose variants carry what is true in them.
//!
//! Only the model's actor (`actor.rs`) holds a [`State`] and changes it; the phase everyone else
//! sees (`/api/models`' `state`, the fast path's "is it ready?") is [`State::phase`], written to
//! the cell on every transition and never kept anywhere else. `docs/architecture.md` draws the
//! transitions; each is one arm of a `match` in the actor.

use std::fmt;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::start::Running;
use super::status::Phase;

/// Why a running server is being stopped. It decides what follows the stop; when a second
/// reason comes while the first is under way, the stronger one ([`Why::merge`]) wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    /// Its idle TTL passed.
    Idle,
    /// Admission needs its room for another model. Called off by `CancelEvict`.
    Evict,
    /// Settings that shape the server changed: start again with the new ones.
    Reconfigure,
    /// The health monitor gave up on it: the restart policy decides what follows.
    Unhealthy(String),
    /// An operator's unload.
    Unload,
    /// Shutdown, or the model was removed by a reload: the actor ends after the stop.
    Retire,
}

impl Why {
    fn strength(&self) -> u8 {
        match self {
            Why::Idle => 0,
            Why::Evict => 1,
            Why::Reconfigure => 2,
            Why::Unhealthy(_) => 3,
            Why::Unload => 4,
            Why::Retire => 5,
        }
    }

    /// The stronger of two reasons (an unload overrides an eviction; a retire overrides all).
    pub fn merge(self, other: Why) -> Why {
        if other.strength() > self.strength() {
            other
        } else {
            self
        }
    }

    /// The stronger of an optional reason and a new one.
    pub fn merge_opt(current: Option<Why>, new: Why) -> Why {
        match current {
            Some(c) => c.merge(new),
            None => new,
        }
    }
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Why::Idle => f.write_str("idle"),
            Why::Evict => f.write_str("evicted"),
            Why::Reconfigure => f.write_str("reconfigured"),
            Why::Unhealthy(reason) => write!(f, "unhealthy: {reason}"),
            Why::Unload => f.write_str("unloaded"),
            Why::Retire => f.write_str("retired"),
        }
    }
}

/// Where a model is in its life. See the module docs.
pub enum State {
    /// No server. `restart_at`: the restart policy starts it again then, by itself.
    Stopped { restart_at: Option<Instant> },
    /// A start failed, or the server crash-looped: requests are refused with the reason until
    /// `until` (an operator's load skips the wait); then `Stopped`.
    Failed { until: Instant },
    /// Waiting in the admission queue for room under the limits. `withdrawn`: asked to leave the
    /// queue (unload, retire); the scheduler answers `Closed`.
    Admitting {
        since: Instant,
        withdrawn: Option<Why>,
    },
    /// The server is being started (ports, spawn, readiness). Dropping `cancel` cancels it;
    /// `then`: a stop wanted once it is ready (or, if cancelled, what follows).
    Starting {
        cancel: Option<oneshot::Sender<()>>,
        then: Option<Why>,
    },
    /// Serving. `ttl`: when it stops if still idle (armed while no lease is held).
    Ready {
        running: Running,
        ttl: Option<Instant>,
    },
    /// Takes no new lease; stops when its last lease ends, or at `until` (`drain_timeout`)
    /// whatever is still in flight.
    Draining {
        running: Running,
        why: Why,
        until: Instant,
    },
    /// The stop task runs (SIGTERM to the group, `stop_timeout`, SIGKILL) and reports back.
    Stopping { running: Running, why: Why },
    /// The actor has ended.
    Retired,
}

impl State {
    /// The phase the outside sees.
    pub fn phase(&self) -> Phase {
        match self {
            State::Stopped { .. } | State::Retired => Phase::Stopped,
            State::Failed { .. } => Phase::Failed,
            State::Admitting { .. } | State::Starting { .. } => Phase::Starting,
            State::Ready { .. } => Phase::Ready,
            State::Draining { .. } | State::Stopping { .. } => Phase::Stopping,
        }
    }

    /// The state's name, for logs and tests.
    pub fn name(&self) -> &'static str {
        match self {
            State::Stopped { .. } => "stopped",
            State::Failed { .. } => "failed",
            State::Admitting { .. } => "admitting",
            State::Starting { .. } => "starting",
            State::Ready { .. } => "ready",
            State::Draining { .. } => "draining",
            State::Stopping { .. } => "stopping",
            State::Retired => "retired",
        }
    }

    /// True once the model is on its way out for good: acquires are refused.
    pub fn retiring(&self) -> bool {
        match self {
            State::Retired => true,
            State::Admitting { withdrawn: w, .. } | State::Starting { then: w, .. } => {
                *w == Some(Why::Retire)
            }
            State::Draining { why, .. } | State::Stopping { why, .. } => *why == Why::Retire,
            _ => false,
        }
    }

    /// The running server, in the states that have one.
    pub fn running(&self) -> Option<&Running> {
        match self {
            State::Ready { running, .. }
            | State::Draining { running, .. }
            | State::Stopping { running, .. } => Some(running),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stronger_reason_wins() {
        assert_eq!(Why::Evict.merge(Why::Unload), Why::Unload);
        assert_eq!(Why::Unload.merge(Why::Evict), Why::Unload);
        assert_eq!(Why::Reconfigure.merge(Why::Retire), Why::Retire);
        assert_eq!(Why::merge_opt(None, Why::Idle), Why::Idle);
        assert_eq!(
            Why::merge_opt(Some(Why::Unhealthy("x".into())), Why::Reconfigure),
            Why::Unhealthy("x".into())
        );
    }

    #[test]
    fn phases_are_derived() {
        let cases = [
            (State::Stopped { restart_at: None }, Phase::Stopped),
            (
                State::Failed {
                    until: Instant::now(),
                },
                Phase::Failed,
            ),
            (
                State::Admitting {
                    since: Instant::now(),
                    withdrawn: None,
                },
                Phase::Starting,
            ),
            (
                State::Starting {
                    cancel: None,
                    then: Some(Why::Retire),
                },
                Phase::Starting,
            ),
            (State::Retired, Phase::Stopped),
        ];
        for (state, phase) in cases {
            assert_eq!(state.phase(), phase, "{}", state.name());
        }
        assert!(State::Starting {
            cancel: None,
            then: Some(Why::Retire)
        }
        .retiring());
        assert!(!State::Stopped { restart_at: None }.retiring());
    }
}
