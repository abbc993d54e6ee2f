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
    /// Safety margin taken off the local deadline: a fifth of the TTL, at least 100 ms.
    pub fn margin(&self) -> Duration {
        (self.ttl / 5)
            .max(Duration::from_millis(100))
            .min(self.ttl / 2)
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
        let wait = match store.lease_acquire(holder, timing.ttl).await {
            Ok(Ok(token)) => {
                let deadline = sent + timing.ttl - timing.margin();
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
                tracing::warn!(error = %e, "Cannot reach Redis to contend for leadership; retrying");
                timing.renew_every().min(Duration::from_secs(1))
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = released.notified() => {}
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
                lease.set_deadline(sent + timing.ttl - timing.margin());
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
