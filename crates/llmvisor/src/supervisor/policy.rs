//! The restart policy: what failures in a row mean, and how long to wait before the next try.
//!
//! Two kinds of failure are counted, each in a row: *starts* that failed (the server exited or
//! timed out before it was ready), and *crashes* of a ready server (it exited, or the health
//! monitor gave up on it). Both wait by one formula, [`backoff`]: 1 s, doubling, at most 60 s.
//! A failed start refuses requests until its backoff has passed (an operator's load skips it).
//! The first crash restarts at once, later ones after the backoff of the crashes before them; a
//! third crash in a row is a crash loop, which marks the model failed for [`CRASH_LOOP_COOLDOWN`]
//! — after which it is stopped again and the next request may start it. A run that stayed up
//! for [`STABLE_RUN`] ends the crash streak.

use std::time::Duration;

use super::error::AcquireError;

/// Backoff after the first failure; doubles per failure in a row up to the cap.
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
pub const BACKOFF_CAP: Duration = Duration::from_secs(60);
/// A run that stayed up this long ends a crash streak.
pub const STABLE_RUN: Duration = Duration::from_secs(30);
/// Crashes or health failures in a row that make a crash loop.
pub const CRASH_LOOP_LIMIT: u32 = 3;
/// How long a crash-looping model stays `failed` before requests may start it again.
pub const CRASH_LOOP_COOLDOWN: Duration = Duration::from_secs(60);

/// The wait after the `n`th failure in a row (`n ≥ 1`): 1 s, 2 s, 4 s, … at most 60 s.
pub fn backoff(n: u32) -> Duration {
    BACKOFF_BASE
        .saturating_mul(1 << n.saturating_sub(1).min(16))
        .min(BACKOFF_CAP)
}

/// What to do after a ready server failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterCrash {
    /// Start it again after this long (if the model's `on_unhealthy` policy restarts).
    RestartIn(Duration),
    /// Too many in a row: refuse requests for the cool-down; `failures` is the streak.
    CrashLoop { failures: u32 },
}

/// The failure counters of one model.
#[derive(Debug, Default)]
pub struct RestartPolicy {
    /// Failed starts in a row.
    start_failures: u32,
    /// Crashes and health failures in a row.
    crash_streak: u32,
    /// The error that put the model into backoff, quoted while it lasts.
    last_failure: Option<AcquireError>,
}

impl RestartPolicy {
    /// A start succeeded: failed starts are forgiven (the crash streak is not: a server that
    /// crashes soon after every start is still a crash loop).
    pub fn started(&mut self) {
        self.start_failures = 0;
        self.last_failure = None;
    }

    /// A start failed with `error`: how long to refuse requests.
    pub fn start_failed(&mut self, error: AcquireError) -> Duration {
        self.start_failures += 1;
        self.last_failure = Some(error);
        backoff(self.start_failures)
    }

    /// A ready server failed after running for `ran_for`.
    pub fn crashed(&mut self, ran_for: Duration) -> AfterCrash {
        if ran_for >= STABLE_RUN {
            self.crash_streak = 0;
        }
        self.crash_streak += 1;
        match self.crash_streak {
            n if n >= CRASH_LOOP_LIMIT => {
                self.crash_streak = 0;
                self.start_failures = n;
                AfterCrash::CrashLoop { failures: n }
            }
            1 => AfterCrash::RestartIn(Duration::ZERO),
            n => AfterCrash::RestartIn(backoff(n - 1)),
        }
    }

    /// Remembers the crash-loop error, quoted to requests during the cool-down.
    pub fn crash_loop_error(&mut self, error: AcquireError) {
        self.last_failure = Some(error);
    }

    /// The answer to a request that comes while the model backs off for `retry_after` more.
    pub fn refusal(&self, model: &str, retry_after: Duration) -> AcquireError {
        match self.last_failure.clone() {
            Some(AcquireError::StartFailed {
                model,
                reason,
                log_tail,
                ..
            }) => AcquireError::StartFailed {
                model,
                reason: format!(
                    "{reason} (failed {} times in a row; next try in {}s)",
                    self.start_failures,
                    retry_after.as_secs_f64().ceil()
                ),
                log_tail,
                retry_after: Some(retry_after),
            },
            Some(AcquireError::StartTimeout {
                model,
                after,
                log_tail,
            }) => AcquireError::StartFailed {
                model,
                reason: format!(
                    "it did not become ready within {} last time",
                    crate::units::format_duration(after)
                ),
                log_tail,
                retry_after: Some(retry_after),
            },
            _ => AcquireError::StartFailed {
                model: model.to_owned(),
                reason: "backing off after failed starts".into(),
                log_tail: Vec::new(),
                retry_after: Some(retry_after),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn backoff_doubles_from_one_second_to_the_cap() {
        let waits: Vec<Duration> = (1..=8).map(backoff).collect();
        assert_eq!(
            waits,
            [1, 2, 4, 8, 16, 32, 60, 60].map(secs).to_vec(),
            "one formula for every failure count"
        );
        assert_eq!(backoff(u32::MAX), BACKOFF_CAP);
    }

    #[test]
    fn failed_starts_back_off_and_a_good_start_forgives_them() {
        let mut p = RestartPolicy::default();
        let err = |n: u32| AcquireError::StartFailed {
            model: "m".into(),
            reason: format!("exit {n}"),
            log_tail: vec![],
            retry_after: None,
        };
        assert_eq!(p.start_failed(err(1)), secs(1));
        assert_eq!(p.start_failed(err(2)), secs(2));
        assert_eq!(p.start_failed(err(3)), secs(4));
        let refusal = p.refusal("m", Duration::from_millis(3500)).to_string();
        assert!(
            refusal.contains("exit 3 (failed 3 times in a row; next try in 4s)"),
            "{refusal}"
        );
        p.started();
        assert_eq!(p.start_failed(err(4)), secs(1));
    }

    #[test]
    fn crashes_restart_at_once_then_back_off_then_loop() {
        let mut p = RestartPolicy::default();
        let quick = secs(1);
        assert_eq!(p.crashed(quick), AfterCrash::RestartIn(Duration::ZERO));
        assert_eq!(p.crashed(quick), AfterCrash::RestartIn(secs(1)));
        assert_eq!(p.crashed(quick), AfterCrash::CrashLoop { failures: 3 });
        // The loop resets the streak: after the cool-down, the next crash restarts at once.
        assert_eq!(p.crashed(quick), AfterCrash::RestartIn(Duration::ZERO));
        // A run that stayed up ends the streak.
        assert_eq!(p.crashed(quick), AfterCrash::RestartIn(secs(1)));
        assert_eq!(p.crashed(STABLE_RUN), AfterCrash::RestartIn(Duration::ZERO));
    }
}
