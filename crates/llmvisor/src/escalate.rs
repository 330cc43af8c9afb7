//! Stopping processes: SIGTERM, a grace period, then SIGKILL — one implementation for a server's
//! process group ([`crate::child`]) and for the orphan sweep ([`crate::sweep`]).
//!
//! What is signalled, and how it is proven to be the right process, is the [`Targets`]'
//! business; this module only owns the order and the waiting.

use std::time::Duration;

use rustix::process::Signal;
use tokio::time::Instant;

use crate::units;

/// After SIGKILL, how long to wait for the kernel to finish the targets off before giving up.
pub const KILL_WAIT: Duration = Duration::from_secs(2);
/// How often the targets are asked whether they are gone.
const POLL: Duration = Duration::from_millis(10);

/// Something [`escalate`] can stop: one process, a group, or a set of proven processes.
pub trait Targets {
    /// Sends `sig` to every target still there (best effort: a target that is gone is not an
    /// error).
    fn signal(&mut self, sig: Signal);
    /// True once every target is gone (exited; a zombie counts as gone).
    fn all_gone(&self) -> bool;
    /// Called once when the grace after SIGTERM is over and targets are left, just before
    /// SIGKILL: a chance to note which targets SIGTERM did stop, or to add late-comers.
    fn grace_over(&mut self) {}
}

/// How an [`escalate`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Everything was already gone: nothing was signalled.
    AlreadyGone,
    /// Gone within the grace after SIGTERM.
    Terminated,
    /// SIGKILL was needed, and everything is gone.
    Killed,
    /// Something was still there [`KILL_WAIT`] after SIGKILL.
    Survived,
}

impl Outcome {
    /// True unless something survived SIGKILL.
    pub fn all_gone(self) -> bool {
        self != Self::Survived
    }
}

/// SIGTERM to `targets`, up to `grace` for them to go, then SIGKILL and up to [`KILL_WAIT`].
pub async fn escalate<T: Targets + ?Sized>(targets: &mut T, grace: Duration) -> Outcome {
    if targets.all_gone() {
        return Outcome::AlreadyGone;
    }
    targets.signal(Signal::TERM);
    if wait_gone(targets, grace).await {
        return Outcome::Terminated;
    }
    targets.grace_over();
    match kill(targets).await {
        Outcome::AlreadyGone => Outcome::Terminated,
        other => other,
    }
}

/// SIGKILL to `targets` (unless they are gone already), then up to [`KILL_WAIT`] for them to go.
pub async fn kill<T: Targets + ?Sized>(targets: &mut T) -> Outcome {
    if targets.all_gone() {
        return Outcome::AlreadyGone;
    }
    targets.signal(Signal::KILL);
    if wait_gone(targets, KILL_WAIT).await {
        Outcome::Killed
    } else {
        Outcome::Survived
    }
}

/// Waits up to `within` until `targets` are all gone; true if they are.
async fn wait_gone<T: Targets + ?Sized>(targets: &T, within: Duration) -> bool {
    let deadline = units::deadline(Instant::now(), within);
    loop {
        if targets.all_gone() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        tokio::time::sleep_until((now + POLL).min(deadline)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted target: gone after it has received `gone_after` (TERM or KILL).
    struct Script {
        received: Vec<Signal>,
        gone_after: Option<Signal>,
        grace_over: bool,
    }

    impl Targets for Script {
        fn signal(&mut self, sig: Signal) {
            self.received.push(sig);
        }
        fn all_gone(&self) -> bool {
            match self.gone_after {
                Some(s) => self.received.contains(&s),
                None => false,
            }
        }
        fn grace_over(&mut self) {
            self.grace_over = true;
        }
    }

    fn script(gone_after: Option<Signal>) -> Script {
        Script {
            received: Vec::new(),
            gone_after,
            grace_over: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn term_then_kill_in_order() {
        let mut t = script(Some(Signal::TERM));
        assert_eq!(
            escalate(&mut t, Duration::from_secs(5)).await,
            Outcome::Terminated
        );
        assert_eq!(t.received, vec![Signal::TERM]);
        assert!(!t.grace_over);

        let mut t = script(Some(Signal::KILL));
        let began = Instant::now();
        assert_eq!(
            escalate(&mut t, Duration::from_secs(5)).await,
            Outcome::Killed
        );
        assert_eq!(t.received, vec![Signal::TERM, Signal::KILL]);
        assert!(t.grace_over);
        assert!(began.elapsed() >= Duration::from_secs(5));

        let mut t = script(None);
        assert_eq!(
            escalate(&mut t, Duration::from_secs(1)).await,
            Outcome::Survived
        );
        assert_eq!(t.received, vec![Signal::TERM, Signal::KILL]);
        assert!(!Outcome::Survived.all_gone());
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_signalled_when_all_are_gone() {
        let mut t = script(Some(Signal::TERM));
        t.received.push(Signal::TERM);
        assert_eq!(
            escalate(&mut t, Duration::from_secs(5)).await,
            Outcome::AlreadyGone
        );
        assert_eq!(kill(&mut t).await, Outcome::AlreadyGone);
        assert_eq!(t.received, vec![Signal::TERM]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_grace_beyond_any_instant_does_not_panic() {
        let mut t = script(Some(Signal::TERM));
        assert_eq!(escalate(&mut t, Duration::MAX).await, Outcome::Terminated);
    }
}
