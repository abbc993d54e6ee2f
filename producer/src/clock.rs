//! Wall-clock time as the scheduler sees it, behind a trait so tests can run a
//! schedule across DST transitions and NTP steps in seconds of test time.
//! (Lease deadlines use the monotonic clock, never this one.)

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use tokio::sync::watch;

/// A source of wall-clock time.
pub trait Clock: Send + Sync + 'static {
    /// Now.
    fn now(&self) -> DateTime<Utc>;
    /// Resolves at `t` or a little before when the wall clock may have jumped;
    /// callers re-read [`Clock::now`] after waking. Never sleeps longer than
    /// one second of real time, so a stepped clock is noticed promptly.
    fn sleep_until(&self, t: DateTime<Utc>) -> BoxFuture<'static, ()>;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

/// Longest single real sleep, so that wall-clock steps are seen within it.
pub const MAX_SLEEP: Duration = Duration::from_secs(1);

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn sleep_until(&self, t: DateTime<Utc>) -> BoxFuture<'static, ()> {
        let left = (t - Utc::now()).to_std().unwrap_or_default();
        if left > MAX_SLEEP {
            return Box::pin(tokio::time::sleep(MAX_SLEEP));
        }
        Box::pin(async move {
            // tokio's timer counts whole milliseconds and rounds up, so a
            // plain sleep wakes 1-2 ms late: sleep to just before `t`, then
            // yield until it (bounded on the monotonic clock, in case the
            // wall clock steps back meanwhile).
            if left > PRECISE {
                tokio::time::sleep(left - PRECISE).await;
            }
            let give_up = std::time::Instant::now() + 2 * PRECISE;
            while Utc::now() < t && std::time::Instant::now() < give_up {
                tokio::task::yield_now().await;
            }
        })
    }
}

/// The last stretch of a [`SystemClock`] sleep, spent yielding rather than
/// on the timer, so slots fire on their instant instead of a timer tick later.
const PRECISE: Duration = Duration::from_millis(2);

/// A clock moved by hand (tests, simulations).
#[derive(Debug, Clone)]
pub struct ManualClock {
    tx: Arc<watch::Sender<DateTime<Utc>>>,
}

impl ManualClock {
    /// A clock reading `start`.
    pub fn new(start: DateTime<Utc>) -> Self {
        ManualClock {
            tx: Arc::new(watch::channel(start).0),
        }
    }

    /// Sets the time (forwards or backwards, as an NTP step would).
    pub fn set(&self, t: DateTime<Utc>) {
        self.tx.send_replace(t);
    }

    /// Moves the time forward by `d`.
    pub fn advance(&self, d: chrono::Duration) {
        self.tx.send_modify(|t| *t += d);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.tx.borrow()
    }

    fn sleep_until(&self, t: DateTime<Utc>) -> BoxFuture<'static, ()> {
        let mut rx = self.tx.subscribe();
        Box::pin(async move {
            // Wake when the time reaches `t`, or on any change (a step backwards
            // must be noticed too), or after MAX_SLEEP of real time.
            let _ = tokio::time::timeout(MAX_SLEEP, async {
                if *rx.borrow_and_update() >= t {
                    return;
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            })
            .await;
        })
    }
}
