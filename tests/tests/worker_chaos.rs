//! Disruptive worker tests: they cut every broker connection on the machine
//! (`rabbitmqctl close_all_connections`), so they live apart from the rest of
//! the suite and take [`CHAOS`] so they never overlap each other.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod worker_support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cronpipe_shared::Envelope;
use cronpipe_tests::{wait_until, TestEnv};
use cronpipe_worker::{Registry, Settled, Task, TaskError};
use serde_json::json;
use worker_support::{cleanup, start};

/// Held by every test in this file for its whole run.
static CHAOS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn close_all_connections() {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["close_all_connections", "cronpipe chaos test"])
        .output()
        .expect("rabbitmqctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Messages ready or unacked in every queue of this test (work, delay tiers, dead letters).
fn queued(prefix: &str) -> u64 {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "messages",
        ])
        .output()
        .expect("rabbitmqctl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (name, n) = (it.next()?, it.next()?);
            name.starts_with(prefix)
                .then(|| n.parse::<u64>().ok())
                .flatten()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_all_broker_connections_during_10000_tasks_loses_none_and_runs_none_twice() {
    let _serial = CHAOS.lock().await;
    const N: usize = 10_000;
    let env = TestEnv::new("chaos").await;
    let config = env
        .config("[worker]\nconcurrency = 32\nclaim_ttl = \"2s\"\n[task.n]\nhandler = \"rust\"\n");
    let runs: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let r = runs.clone();
    let registry = Registry::new().register("n", move |t: Task| {
        *r.lock().unwrap().entry(t.envelope.id.clone()).or_default() += 1;
        async { Ok::<(), TaskError>(()) }
    });
    let envs: Vec<Envelope> = (0..N).map(|i| Envelope::new("n", json!(i))).collect();
    for chunk in envs.chunks(1000) {
        for r in env.broker.publish_batch(chunk).await {
            r.expect("publish");
        }
    }
    let mut w = start(&env, &config, "w-chaos", registry).await;
    let ran = || runs.lock().unwrap().len();
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
        close_all_connections();
        cuts.push(ran());
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
    let prefix = env.queue.clone();
    assert!(
        wait_until(Duration::from_secs(60), || {
            let left = queued(&prefix);
            async move { left == 0 }
        })
        .await,
        "messages still queued: {}",
        queued(&prefix)
    );
    let mut settled: HashMap<&'static str, usize> = HashMap::new();
    while let Ok(r) = w.reports.try_recv() {
        *settled.entry(r.settled.as_str()).or_default() += 1;
    }
    assert!(!w.handle.is_finished(), "the worker survived the cuts");
    w.shutdown().await;
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs.len(), N, "none lost");
    let twice: Vec<(&String, &u32)> = runs.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "ran more than once: {twice:?}");
    assert_eq!(
        settled.get(Settled::Success.as_str()).copied().unwrap_or(0),
        N,
        "{settled:?}"
    );
    assert!(worker_support::dead_letters(&env).await.is_empty());
    eprintln!(
        "cuts at {cuts:?} runs; all {N} ran once; {:?} after the last cut; outcomes {settled:?}",
        t0.elapsed()
    );
    cleanup(env).await;
}
