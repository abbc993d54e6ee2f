//! Leader election: a Redis lease with a fencing token.
//!
//! - Acquire: `SET NX PX` semantics in a Lua script that also increments the
//!   fencing counter; the lease value is `<token>:<instance>:<nonce>`.
//! - Renew: every TTL/3, compare-and-extend (never a bare `PEXPIRE`).
//! - Deadline: the leader may publish only while `now < last successful renewal
//!   sent + TTL − margin` on the monotonic clock. Redis expires the key no
//!   earlier than TTL after it received that renewal, so the leader stops
//!   before any standby can take over, even if Redis stops answering.
//! - Release: compare-and-delete plus a pub/sub notice, so a standby takes over
//!   at once instead of waiting out the TTL. Standbys otherwise wake exactly
//!   when the current lease would expire.

use std::sync::Arc;
use std::time::Duration;

use cronpipe_shared::Store;
use futures::StreamExt;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A held lease.
#[derive(Clone)]
pub struct Lease {
    /// Full lease value in Redis.
    pub value: String,
    /// Fencing token: grows with every new leadership.
    pub token: u64,
    deadline: Arc<std::sync::Mutex<Instant>>,
    /// Cancelled when the lease is lost or its deadline passed.
    pub lost: CancellationToken,
}

impl Lease {
    /// Redis refused a write because the lease is no longer ours: logs
    /// what was refused and ends the leadership at once.
    pub fn refused(&self, what: &str) {
        tracing::warn!(
            token = self.token,
            "{what} refused: the lease is no longer ours"
        );
        self.lost.cancel();
    }

    /// Whether this process may still act as leader right now.
    pub fn is_valid(&self) -> bool {
        if self.lost.is_cancelled() {
            return false;
        }
        if Instant::now() >= self.deadline() {
            self.lost.cancel();
            return false;
        }
        true
    }

    fn set_deadline(&self, d: Instant) {
        match self.deadline.lock() {
            Ok(mut g) => *g = d,
            Err(p) => *p.into_inner() = d,
        }
    }

    /// The instant (monotonic) after which this process must not act as leader.
    pub fn deadline(&self) -> Instant {
        match self.deadline.lock() {
            Ok(g) => *g,
            Err(p) => *p.into_inner(),
        }
    }

    /// Resolves once this lease may no longer be used: it was lost, or its
    /// deadline passed without a renewal moving it (renewals that do move it
    /// are followed). Racing a publish against this stops the publish the
    /// moment leadership can no longer be proven.
    pub async fn expired(&self) {
        loop {
            let deadline = self.deadline();
            tokio::select! {
                _ = self.lost.cancelled() => return,
                _ = tokio::time::sleep_until(deadline) => {
                    if !self.is_valid() {
                        return;
                    }
                }
            }
        }
    }

    /// A lease for tests and tools that is valid until `deadline` (not backed by Redis).
    pub fn detached(value: String, token: u64, deadline: Instant) -> Self {
        Lease {
            value,
            token,
            deadline: Arc::new(std::sync::Mutex::new(deadline)),
            lost: CancellationToken::new(),
        }
    }
}

/// Lease timing.
#[derive(Debug, Clone, Copy)]
pub struct LeaseTiming {
    /// Time to live in Redis.
    pub ttl: Duration,
}

impl LeaseTiming {
    /// Renewal period: a third of the TTL.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 3
    }
    /// Safety margin taken off the local deadline: a fifth of the TTL, at
    /// least 100 ms, at most half the TTL. It absorbs clock-rate drift between
    /// this host and Redis and the time a publish already on the wire needs to
    /// reach the broker.
    pub fn margin(&self) -> Duration {
        (self.ttl / 5)
            .max(Duration::from_millis(100))
            .min(self.ttl / 2)
    }

    /// The local deadline earned by an acquire or renewal *sent* at `sent`.
    /// Redis starts the TTL when it receives the command, which is after
    /// `sent`, so the key cannot expire before `sent + ttl`: stopping at
    /// `sent + ttl − margin` stops at least `margin` before any standby can
    /// take the lease.
    pub fn deadline_after(&self, sent: Instant) -> Instant {
        sent + self.ttl - self.margin()
    }
}

/// Waits (as a standby) until this producer holds the lease, or shutdown.
pub async fn acquire(
    store: &Store,
    holder: &str,
    timing: LeaseTiming,
    released: &Notify,
    shutdown: &CancellationToken,
) -> Option<Lease> {
    let mut announced = false;
    loop {
        let sent = Instant::now();
        // After an error, wait the full period: a release notification may be
        // this producer's own (a lease the replicas did not acknowledge is
        // given back), and would otherwise retry at once, in a loop.
        let mut on_release = true;
        let wait = match store.lease_acquire(holder, timing.ttl).await {
            Ok(Ok(token)) => {
                let deadline = timing.deadline_after(sent);
                let lease = Lease {
                    value: format!("{token}:{holder}"),
                    token,
                    deadline: Arc::new(std::sync::Mutex::new(deadline)),
                    lost: CancellationToken::new(),
                };
                metrics::gauge!("cronpipe_producer_fencing_token").set(token as f64);
                return Some(lease);
            }
            Ok(Err(left)) => {
                if !announced {
                    tracing::info!(
                        lease_left_ms = left.as_millis() as u64,
                        "Standing by: another producer leads"
                    );
                    announced = true;
                }
                // Wake just after the holder's lease would expire (it renews before then if alive).
                (left + Duration::from_millis(5)).min(timing.ttl)
            }
            Err(e) => {
                tracing::warn!(error = %e, "Could not contend for leadership (Redis refused, did not answer, or its replicas did not acknowledge the lease); retrying");
                on_release = false;
                timing.renew_every().min(Duration::from_secs(1))
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = released.notified(), if on_release => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Renews `lease` until it is lost, its deadline passes, or `stop` is cancelled.
pub async fn keep(store: Store, lease: Lease, timing: LeaseTiming, stop: CancellationToken) {
    let mut next = Instant::now() + timing.renew_every();
    loop {
        let deadline = lease.deadline();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = lease.lost.cancelled() => return,
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(token = lease.token, "Lease deadline passed without a renewal; stepping down");
                metrics::counter!("cronpipe_producer_lease_lost_total", "reason" => "deadline").increment(1);
                lease.lost.cancel();
                return;
            }
            _ = tokio::time::sleep_until(next) => {}
        }
        let sent = Instant::now();
        let result = tokio::time::timeout(
            deadline.saturating_duration_since(sent),
            store.lease_renew(&lease.value, timing.ttl),
        )
        .await;
        metrics::histogram!("cronpipe_producer_lease_renewal_seconds")
            .record(sent.elapsed().as_secs_f64());
        match result {
            Ok(Ok(true)) => {
                metrics::counter!("cronpipe_producer_lease_renewals_total", "result" => "ok")
                    .increment(1);
                lease.set_deadline(timing.deadline_after(sent));
                next = sent + timing.renew_every();
            }
            Ok(Ok(false)) => {
                metrics::counter!("cronpipe_producer_lease_renewals_total", "result" => "lost")
                    .increment(1);
                metrics::counter!("cronpipe_producer_lease_lost_total", "reason" => "taken")
                    .increment(1);
                tracing::warn!(
                    token = lease.token,
                    "Lease is no longer ours; stepping down"
                );
                lease.lost.cancel();
                return;
            }
            Ok(Err(e)) => {
                metrics::counter!("cronpipe_producer_lease_renewals_total", "result" => "error")
                    .increment(1);
                tracing::warn!(error = %e, "Lease renewal failed; retrying before the deadline");
                next = Instant::now() + (timing.renew_every() / 4).max(Duration::from_millis(20));
            }
            Err(_) => {
                metrics::counter!("cronpipe_producer_lease_renewals_total", "result" => "timeout")
                    .increment(1);
                next = Instant::now();
            }
        }
    }
}

/// Releases the lease (compare-and-delete, notifying standbys).
pub async fn release(store: &Store, lease: &Lease) {
    match store.lease_release(&lease.value).await {
        Ok(true) => tracing::info!(token = lease.token, "Released the leader lease"),
        Ok(false) => tracing::info!(token = lease.token, "Lease already gone at release"),
        Err(e) => tracing::warn!(error = %e, "Could not release the lease; it expires by itself"),
    }
}

/// Forwards "lease released" notices from Redis pub/sub to `notify`, resubscribing on errors.
pub async fn watch_releases(store: Store, notify: Arc<Notify>, shutdown: CancellationToken) {
    let channel = store.keys().leader_released();
    loop {
        let attempt = async {
            let mut pubsub = store.pubsub().await?;
            pubsub.subscribe(&channel).await?;
            let mut messages = pubsub.on_message();
            while messages.next().await.is_some() {
                notify.notify_waiters();
                notify.notify_one();
            }
            Ok::<(), cronpipe_shared::store::StoreError>(())
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = attempt => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "Release notices unavailable; standbys fall back to lease expiry");
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn renewal_runs_every_third_of_the_ttl() {
        assert_eq!(LeaseTiming { ttl: ms(3000) }.renew_every(), ms(1000));
        assert_eq!(
            LeaseTiming { ttl: ms(2000) }.renew_every(),
            Duration::from_nanos(666_666_666)
        );
        assert_eq!(LeaseTiming { ttl: ms(300) }.renew_every(), ms(100));
    }

    #[test]
    fn margin_is_a_fifth_of_the_ttl_bounded() {
        assert_eq!(LeaseTiming { ttl: ms(5000) }.margin(), ms(1000));
        assert_eq!(LeaseTiming { ttl: ms(2000) }.margin(), ms(400));
        // At least 100 ms ...
        assert_eq!(LeaseTiming { ttl: ms(300) }.margin(), ms(100));
        // ... but never more than half the TTL.
        assert_eq!(LeaseTiming { ttl: ms(150) }.margin(), ms(75));
    }

    #[test]
    fn deadline_is_before_the_earliest_expiry_and_after_two_renewals() {
        // For every TTL the config accepts (>= 300 ms): the local deadline
        // after a renewal sent at `s` is at least `margin` before the earliest
        // moment Redis can expire the key (s + ttl), and a failed renewal
        // still leaves time for a retry before the deadline.
        let s = Instant::now();
        for ttl in [300, 301, 450, 1000, 2000, 5000, 30_000, 600_000] {
            let t = LeaseTiming { ttl: ms(ttl) };
            let deadline = t.deadline_after(s);
            assert!(deadline + t.margin() <= s + t.ttl, "ttl {ttl}");
            assert!(deadline > s, "ttl {ttl}");
            assert!(
                s + t.renew_every() * 2 <= deadline,
                "ttl {ttl}: two renewal periods must fit before the deadline"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn lease_is_invalid_from_its_deadline_on() {
        let t = LeaseTiming { ttl: ms(2000) };
        let lease = Lease::detached("1:a:b".into(), 1, t.deadline_after(Instant::now()));
        assert!(lease.is_valid());
        tokio::time::advance(ms(1599)).await;
        assert!(lease.is_valid());
        tokio::time::advance(ms(1)).await;
        assert!(!lease.is_valid());
        assert!(lease.lost.is_cancelled(), "an expired lease stays lost");
    }

    #[tokio::test(start_paused = true)]
    async fn expired_follows_renewals_and_resolves_at_the_deadline() {
        let t = LeaseTiming { ttl: ms(2000) };
        let start = Instant::now();
        let lease = Lease::detached("1:a:b".into(), 1, t.deadline_after(start));
        let watcher = {
            let lease = lease.clone();
            tokio::spawn(async move {
                lease.expired().await;
                Instant::now()
            })
        };
        // A renewal sent at +1 s moves the deadline to +2.6 s.
        tokio::time::sleep(ms(1000)).await;
        lease.set_deadline(t.deadline_after(Instant::now()));
        let ended = watcher.await.expect("join");
        assert_eq!(ended - start, ms(2600));
        assert!(!lease.is_valid());
    }

    #[tokio::test(start_paused = true)]
    async fn expired_resolves_at_once_when_lost() {
        let lease = Lease::detached("1:a:b".into(), 1, Instant::now() + ms(10_000));
        lease.lost.cancel();
        let start = Instant::now();
        lease.expired().await;
        assert_eq!(Instant::now(), start);
    }
}
