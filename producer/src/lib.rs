//! cronpipe producer: turns schedules into task messages, exactly one leader at a time.
//!
//! - [`admin`]: status, runtime schedules and enqueue (CLI and HTTP API).
//! - [`clock`]: wall-clock abstraction (system clock, manual clock for tests).
//! - [`leader`]: the Redis lease with fencing token, renewal and release.
//! - [`misfire`]: which slots to publish now, and what the misfire policy drops.
//! - [`scheduler`]: the leader loop (timer heap, pipelined publishing, watermarks).
//! - [`sources`]: config-file schedules merged with runtime ones from Redis.
//! - [`run`]: standby ⇄ leader until shutdown.

pub mod admin;
pub mod clock;
pub mod leader;
pub mod misfire;
pub mod scheduler;
pub mod sources;

use std::sync::Arc;
use std::time::Duration;

use cronpipe_shared::config::BuiltSchedule;
use cronpipe_shared::{Broker, BrokerError, Config, Store};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::leader::LeaseTiming;

/// Errors that stop the producer (everything transient is retried inside).
#[derive(Debug, thiserror::Error)]
pub enum ProducerError {
    /// The broker's setup conflicts with the config.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// Redis could not be reached at startup.
    #[error(transparent)]
    Store(#[from] cronpipe_shared::store::StoreError),
}

/// Live state of a producer, for `/readyz` and status output.
#[derive(Debug, Default)]
pub struct Status {
    /// Whether this process leads now.
    pub leader: std::sync::atomic::AtomicBool,
    /// Fencing token of the current or last leadership.
    pub token: std::sync::atomic::AtomicU64,
}

impl Status {
    /// Role fields for `/readyz`.
    pub fn fields(&self) -> serde_json::Map<String, serde_json::Value> {
        use std::sync::atomic::Ordering;
        let mut m = serde_json::Map::new();
        let leader = self.leader.load(Ordering::Relaxed);
        m.insert(
            "role".into(),
            if leader { "leader" } else { "standby" }.into(),
        );
        if leader {
            m.insert(
                "fencing_token".into(),
                self.token.load(Ordering::Relaxed).into(),
            );
        }
        m
    }
}

/// Producer settings.
#[derive(Clone)]
pub struct Options {
    /// Name in the lease and logs.
    pub instance_id: String,
    /// Lease TTL.
    pub lease_ttl: Duration,
    /// Lateness that makes a slot missed.
    pub misfire_threshold: Duration,
    /// Wall clock.
    pub clock: Arc<dyn Clock>,
    /// Live state (leader or standby).
    pub status: Arc<Status>,
}

impl Options {
    /// Settings from config, on the system clock.
    pub fn from_config(config: &Config) -> Self {
        Options {
            instance_id: config
                .producer
                .instance_id
                .clone()
                .unwrap_or_else(|| cronpipe_shared::telemetry::default_instance_id("producer")),
            lease_ttl: config.producer.lease_ttl.get(),
            misfire_threshold: config.producer.misfire_threshold.get(),
            clock: Arc::new(clock::SystemClock),
            status: Arc::new(Status::default()),
        }
    }
}

/// Connects to Redis and the broker, retrying transient failures with backoff
/// until they answer or `shutdown`. `None` on shutdown. Redis commands are
/// bounded by a third of the lease TTL, so a stalled Redis cannot hold a
/// renewal past the leader's deadline.
pub async fn connect(
    config: &Config,
    name: &str,
    shutdown: &CancellationToken,
) -> Result<Option<(Store, Broker)>, ProducerError> {
    let response_timeout = (config.producer.lease_ttl.get() / 3).max(Duration::from_millis(200));
    Ok(cronpipe_shared::connect::connect_all(config, name, response_timeout, shutdown).await?)
}

/// Runs the producer: stand by, lead when the lease is ours, step down when it
/// is lost, and on shutdown release the lease. Returns once `shutdown` is
/// cancelled.
pub async fn run(
    opts: Options,
    store: Store,
    broker: Broker,
    file_schedules: watch::Receiver<Arc<Vec<BuiltSchedule>>>,
    shutdown: CancellationToken,
) -> Result<(), ProducerError> {
    // The leader runs the file schedules merged with runtime ones from Redis.
    let (merged_tx, mut schedules) = watch::channel(file_schedules.borrow().clone());
    let merged_ready = Arc::new(Notify::new());
    let merger = tokio::spawn(sources::run(
        store.clone(),
        file_schedules,
        merged_tx,
        merged_ready.clone(),
        shutdown.clone(),
    ));
    tokio::select! {
        _ = merged_ready.notified() => {}
        _ = shutdown.cancelled() => {
            merger.abort();
            return Ok(());
        }
    }
    schedules.borrow_and_update();
    let timing = LeaseTiming {
        ttl: opts.lease_ttl,
    };
    let released = Arc::new(Notify::new());
    let watcher = tokio::spawn(leader::watch_releases(
        store.clone(),
        released.clone(),
        shutdown.clone(),
    ));
    metrics::gauge!("cronpipe_producer_leader").set(0.0);
    loop {
        let holder = format!("{}:{:016x}", opts.instance_id, rand::random::<u64>());
        let Some(lease) = leader::acquire(&store, &holder, timing, &released, &shutdown).await
        else {
            break;
        };
        tracing::info!(token = lease.token, instance = %opts.instance_id, "Became leader");
        metrics::gauge!("cronpipe_producer_leader").set(1.0);
        opts.status
            .token
            .store(lease.token, std::sync::atomic::Ordering::Relaxed);
        opts.status
            .leader
            .store(true, std::sync::atomic::Ordering::Relaxed);
        metrics::counter!("cronpipe_producer_leaderships_total").increment(1);
        let stop_renewal = CancellationToken::new();
        let renewal = tokio::spawn(leader::keep(
            store.clone(),
            lease.clone(),
            timing,
            stop_renewal.clone(),
        ));
        let mut ctx = scheduler::Ctx {
            store: &store,
            broker: &broker,
            clock: &opts.clock,
            threshold: opts.misfire_threshold,
            schedules: &mut schedules,
            shutdown: &shutdown,
        };
        let exit = scheduler::lead(&mut ctx, &lease).await;
        stop_renewal.cancel();
        let _ = renewal.await;
        metrics::gauge!("cronpipe_producer_leader").set(0.0);
        opts.status
            .leader
            .store(false, std::sync::atomic::Ordering::Relaxed);
        match exit {
            scheduler::Exit::Shutdown => {
                leader::release(&store, &lease).await;
                break;
            }
            scheduler::Exit::LostLease => {
                tracing::warn!(token = lease.token, "Lost leadership; standing by");
                // Give the lease back if it is somehow still ours, so a standby need not wait.
                leader::release(&store, &lease).await;
            }
        }
    }
    watcher.abort();
    merger.abort();
    broker.close().await;
    Ok(())
}
