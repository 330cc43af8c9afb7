//! Who reads `/api/events`, and which reader is cut when there are too many.
//!
//! A reader that never reads still takes every keep-alive (they never fill its socket's
//! buffers, so `send_timeout` never fires): without a cap, silent readers would hold client
//! slots forever. So readers are capped (a quarter of `max_clients`), each stream ends after
//! [`MAX_AGE`] (the dashboard and `EventSource` reconnect with `Last-Event-ID` and miss
//! nothing), and a reader arriving over the cap cuts one already there: first one that is
//! *silent* — its stream has not been pulled for two keep-alive periods, so its socket is full —
//! else the oldest. A cut reader gets a last `lagged` event (`"cut": true`) and the stream's end.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// The longest one `/api/events` stream lasts before it is ended (and resumed by its client).
pub const MAX_AGE: Duration = Duration::from_secs(600);

struct Entry {
    id: u64,
    since: Instant,
    pulled: Instant,
    cut: Arc<Notify>,
}

/// The readers of the event stream.
#[derive(Default)]
pub struct Subscribers {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    entries: Vec<Entry>,
}

/// A reader's place; dropping it leaves.
pub struct Subscription {
    owner: Arc<Subscribers>,
    id: u64,
    /// Notified when this reader is cut to make room.
    pub cut: Arc<Notify>,
}

impl Subscribers {
    /// Joins, cutting one reader first when `cap` are already there. `silent_after`: how long
    /// a stream may go unpulled before it counts as silent.
    pub fn join(self: &Arc<Self>, cap: usize, silent_after: Duration) -> Subscription {
        let now = Instant::now();
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        while inner.entries.len() >= cap.max(1) {
            let victim = inner
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| (now.duration_since(e.pulled) < silent_after, e.since))
                .map(|(i, _)| i);
            let Some(i) = victim else { break };
            let gone = inner.entries.swap_remove(i);
            gone.cut.notify_one();
        }
        inner.next_id += 1;
        let id = inner.next_id;
        let cut = Arc::new(Notify::new());
        inner.entries.push(Entry {
            id,
            since: now,
            pulled: now,
            cut: cut.clone(),
        });
        Subscription {
            owner: self.clone(),
            id,
            cut,
        }
    }

    /// Readers now.
    pub fn count(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entries
            .len()
    }
}

impl Subscription {
    /// The stream was pulled (its client took the last chunk into its socket).
    pub fn pulled(&self) {
        let mut inner = self.owner.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = inner.entries.iter_mut().find(|e| e.id == self.id) {
            e.pulled = Instant::now();
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut inner = self.owner.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.entries.retain(|e| e.id != self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn over_the_cap_a_silent_reader_goes_first_then_the_oldest() {
        let subs = Arc::new(Subscribers::default());
        let silent_after = Duration::from_secs(30);
        let a = subs.join(2, silent_after);
        tokio::time::advance(Duration::from_secs(10)).await;
        let b = subs.join(2, silent_after);
        tokio::time::advance(Duration::from_secs(25)).await;
        a.pulled(); // a reads; b has not been pulled for 25 s
        tokio::time::advance(Duration::from_secs(10)).await; // b: 35 s, silent
        let c = subs.join(2, silent_after);
        assert_eq!(subs.count(), 2);
        let cut = |s: &Subscription| {
            let n = s.cut.notified();
            tokio::pin!(n);
            n.as_mut().enable()
        };
        assert!(cut(&b), "the silent one was cut");
        assert!(!cut(&a));
        // Nobody silent: the oldest goes.
        a.pulled();
        c.pulled();
        let _d = subs.join(2, silent_after);
        assert!(cut(&a), "the oldest was cut");
        assert!(!cut(&c));
        drop(c);
        assert_eq!(subs.count(), 1);
    }
}
