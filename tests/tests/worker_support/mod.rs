//! Helpers shared by the worker test files: an in-process worker on its own
//! broker connection, raw publishing, reading dead letters, and removing every
//! queue a test's workers declared (delay tiers included).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use cronpipe_shared::deadletter::DeadLetter;
use cronpipe_shared::{Broker, Config};
use cronpipe_tests::{amqp_url, TestEnv};
use cronpipe_worker::{Registry, Report};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A worker running in this process.
pub struct InProc {
    /// Cancel to shut it down.
    pub stop: CancellationToken,
    /// Its `run` future.
    pub handle: JoinHandle<Result<(), cronpipe_worker::WorkerError>>,
    /// Its reports.
    pub reports: mpsc::UnboundedReceiver<Report>,
}

impl InProc {
    /// Next report, failing the test after `limit`.
    pub async fn next(&mut self, limit: Duration) -> Report {
        tokio::time::timeout(limit, self.reports.recv())
            .await
            .expect("no worker report in time")
            .expect("report channel open")
    }

    /// Reports until `done(&all_so_far)` holds, failing after `limit` in all.
    pub async fn until(
        &mut self,
        limit: Duration,
        done: impl Fn(&[Report]) -> bool,
    ) -> Vec<Report> {
        let end = tokio::time::Instant::now() + limit;
        let mut all = Vec::new();
        while !done(&all) {
            match tokio::time::timeout_at(end, self.reports.recv()).await {
                Ok(Some(r)) => all.push(r),
                Ok(None) => panic!("worker stopped; reports so far: {all:?}"),
                Err(_) => panic!("condition not reached in {limit:?}; reports so far: {all:?}"),
            }
        }
        all
    }

    /// Stops the worker and waits for `run` to return.
    pub async fn shutdown(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.handle)
            .await
            .expect("worker stops in time")
            .expect("join")
            .expect("worker run");
    }
}

/// Starts `cronpipe_worker::run` with `registry` plus the config's handlers,
/// on a broker connection of its own (run closes it on the way out).
pub async fn start(env: &TestEnv, config: &Config, id: &str, registry: Registry) -> InProc {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut opts = cronpipe_worker::Options::from_config(config.clone());
    opts.instance_id = id.into();
    opts.reports = Some(tx);
    let registry = cronpipe_worker::registry_from_config(config, registry).expect("registry");
    let broker = Broker::connect(&config.broker, id).await.expect("broker");
    let stop = CancellationToken::new();
    let handle = tokio::spawn(cronpipe_worker::run(
        opts,
        env.store.clone(),
        broker,
        registry,
        stop.clone(),
    ));
    InProc {
        stop,
        handle,
        reports: rx,
    }
}

/// Publishes raw bytes to the work queue (bodies the adapter would never write).
pub async fn publish_raw(env: &TestEnv, bodies: &[Vec<u8>]) {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    for body in bodies {
        ch.basic_publish(
            "".into(),
            env.queue.as_str().into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    }
    let _ = conn.close(200, "bye".into()).await;
}

/// Takes every dead letter now in the test's dead-letter queue.
pub async fn dead_letters(env: &TestEnv) -> Vec<DeadLetter> {
    env.drain(&format!("{}.dlq", env.queue))
        .await
        .into_iter()
        .map(|b| serde_json::from_slice(&b).expect("dead letter JSON"))
        .collect()
}

/// Waits until `n` dead letters were taken from the queue (collecting them), or `limit`.
pub async fn wait_dead_letters(env: &TestEnv, n: usize, limit: Duration) -> Vec<DeadLetter> {
    let end = std::time::Instant::now() + limit;
    let mut got = Vec::new();
    while got.len() < n && std::time::Instant::now() < end {
        got.extend(dead_letters(env).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    got
}

/// Deletes every queue named `<work queue>*` (delay tiers that worker
/// processes declared included), then the rest of the test's world.
pub async fn cleanup(env: TestEnv) {
    if let Ok(out) = std::process::Command::new("rabbitmqctl")
        .args(["list_queues", "-q", "--no-table-headers", "name"])
        .output()
    {
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let conn = Connection::connect(&amqp_url(), ConnectionProperties::default()).await;
        if let Ok(conn) = conn {
            for name in text
                .lines()
                .map(str::trim)
                .filter(|n| n.starts_with(env.queue.as_str()))
            {
                if let Ok(ch) = conn.create_channel().await {
                    let _ = ch
                        .queue_delete(name.into(), QueueDeleteOptions::default())
                        .await;
                    let _ = ch.close(200, "deleted".into()).await;
                }
            }
            let _ = conn.close(200, "bye".into()).await;
        }
    }
    env.cleanup().await;
}

/// The Redis value of a task key's idempotency state.
pub async fn idem_state(env: &TestEnv, key: &str) -> Option<String> {
    let mut c = env.store.connection();
    redis::cmd("GET")
        .arg(env.store.keys().idem(key))
        .query_async(&mut c)
        .await
        .expect("GET")
}

/// The Redis attempt counter of a task key.
pub async fn attempts(env: &TestEnv, key: &str) -> u32 {
    let mut c = env.store.connection();
    let n: Option<u32> = redis::cmd("GET")
        .arg(env.store.keys().attempts(key))
        .query_async(&mut c)
        .await
        .expect("GET");
    n.unwrap_or(0)
}

/// Whether process `pid` is gone (or a zombie awaiting its reaper).
pub fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // Field 3 is the state; the name in parentheses may hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}
