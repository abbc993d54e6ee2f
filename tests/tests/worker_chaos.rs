//! Disruptive worker tests: they cut broker connections under a running
//! worker (`rabbitmqctl close_all_connections`), so they live apart from the
//! rest of the suite and take [`CHAOS`] so they never overlap each other. Each
//! runs in a RabbitMQ vhost of its own and cuts only that vhost's connections,
//! so suites running beside it are not disturbed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod worker_support;

use std::time::{Duration, Instant};

use cronpipe_shared::{Broker, Envelope};
use cronpipe_tests::{wait_until, RunCounter, TestEnv};
use cronpipe_worker::{Registry, Settled};
use serde_json::json;
use worker_support::start;

/// Held by every test in this file for its whole run.
static CHAOS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn rabbitmqctl(args: &[&str]) -> String {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A RabbitMQ vhost made for one test (guest may use it), deleted on drop.
struct Vhost(String);

impl Vhost {
    fn new(name: String) -> Vhost {
        rabbitmqctl(&["add_vhost", &name]);
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        Vhost(name)
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", self.0)
    }

    fn close_all_connections(&self) {
        rabbitmqctl(&[
            "close_all_connections",
            "-p",
            &self.0,
            "cronpipe worker chaos test",
        ]);
    }

    /// Messages ready or unacked in the vhost's queues (work, delay tiers, dead letters).
    fn queued(&self) -> u64 {
        rabbitmqctl(&[
            "list_queues",
            "-q",
            "--no-table-headers",
            "-p",
            &self.0,
            "name",
            "messages",
        ])
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.0])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_all_broker_connections_during_10000_tasks_loses_none_and_runs_none_twice() {
    let _serial = CHAOS.lock().await;
    const N: usize = 10_000;
    let env = TestEnv::new("chaos").await;
    let vhost = Vhost::new(format!("cptest-{}", env.id));
    let mut config = env
        .config("[worker]\nconcurrency = 32\nclaim_ttl = \"2s\"\n[task.n]\nhandler = \"rust\"\n");
    config.broker.rabbitmq.url = vhost.url();
    let publisher = Broker::connect(&config.broker, "chaos-publisher")
        .await
        .expect("broker in the test vhost");
    let runs = RunCounter::default();
    // Slow enough (32 × 20 ms at a time) that the cuts land mid-run with
    // deliveries in flight.
    let registry = runs.register(Registry::new(), "n", Duration::from_millis(20));
    let envs: Vec<Envelope> = (0..N).map(|i| Envelope::new("n", json!(i))).collect();
    for chunk in envs.chunks(1000) {
        for r in publisher.publish_batch(chunk).await {
            r.expect("publish");
        }
    }
    let mut w = start(&env, &config, "w-chaos", registry).await;
    let ran = || runs.distinct();
    // Cut every connection twice while the run is under way.
    let mut cuts = Vec::new();
    for at in [N / 5, N / 2] {
        assert!(
            wait_until(Duration::from_secs(120), || {
                let n = ran();
                async move { n >= at }
            })
            .await,
            "only {} of {N} ran before cut {}",
            ran(),
            cuts.len() + 1
        );
        let before = ran();
        vhost.close_all_connections();
        cuts.push((before, ran()));
    }
    let t0 = Instant::now();
    let all_ran = wait_until(Duration::from_secs(240), || {
        let n = ran();
        async move { n == N }
    })
    .await;
    assert!(
        all_ran,
        "only {} of {N} ran; worker finished: {}",
        ran(),
        w.handle.is_finished()
    );
    // Let redelivered and deferred copies come back and settle as duplicates.
    assert!(
        wait_until(Duration::from_secs(60), || {
            let left = vhost.queued();
            async move { left == 0 }
        })
        .await,
        "messages still queued: {}",
        vhost.queued()
    );
    let settled = w.outcomes();
    assert!(!w.handle.is_finished(), "the worker survived the cuts");
    // Evidence the cuts hit deliveries in flight: their acks were lost, the
    // broker redelivered them, and the idempotency record skipped them.
    let skipped = settled
        .get(Settled::Duplicate.as_str())
        .copied()
        .unwrap_or(0)
        + settled
            .get(Settled::Deferred.as_str())
            .copied()
            .unwrap_or(0);
    assert!(
        skipped > 0,
        "no redelivery seen; did the cuts happen? {settled:?}"
    );
    w.shutdown().await;
    runs.assert_each_ran_once(N, &settled);
    eprintln!(
        "cuts at (before, after) {cuts:?} runs; all {N} ran once; {:?} after the last cut; outcomes {settled:?}",
        t0.elapsed()
    );
    // Nothing was dead-lettered: the vhost's queues (the .dlq included) are empty.
    publisher.close().await;
    drop(vhost);
    env.cleanup().await;
}
