//! Helpers shared by the worker test files: an in-process worker on its own
//! broker connection, waiting for dead letters, and reading a task's Redis
//! state.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use cronpipe_shared::deadletter::DeadLetter;
use cronpipe_shared::Config;
use cronpipe_tests::TestEnv;
use cronpipe_worker::{Registry, Report, Settled};

/// A worker running in this process (see [`TestEnv::spawn_worker`]).
pub use cronpipe_tests::RunningWorker as InProc;

/// Starts `cronpipe_worker::run` with `registry` plus the config's handlers,
/// on a broker connection of its own (run closes it on the way out).
pub async fn start(env: &TestEnv, config: &Config, id: &str, registry: Registry) -> InProc {
    env.spawn_worker(config, id, registry).await
}

/// Waits until `n` dead letters were taken from the dead-letter queue /
/// topic (collecting them), or `limit`.
pub async fn wait_dead_letters(env: &TestEnv, n: usize, limit: Duration) -> Vec<DeadLetter> {
    let end = std::time::Instant::now() + limit;
    let mut got = Vec::new();
    while got.len() < n && std::time::Instant::now() < end {
        got.extend(env.drain_dead_letters().await);
        if got.len() < n {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    got
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

/// How each report settled, with its attempt, in order.
pub fn settled(reports: &[Report]) -> Vec<(Settled, Option<u32>)> {
    reports.iter().map(|r| (r.settled, r.attempt)).collect()
}
