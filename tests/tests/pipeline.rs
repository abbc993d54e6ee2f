//! Foundation: a schedule fires in the producer, the leader publishes
//! confirmed persistent messages, a worker runs each once; leadership is
//! exclusive and a clean stop hands over quickly. Every test runs on
//! RabbitMQ and on Kafka (mock cluster).

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use cronpipe_tests::{broker_test, wait_until, Proc, TestEnv};
use cronpipe_worker::{Registry, Settled};
use nix::sys::signal::Signal;

fn slots_of(envs: &[cronpipe_shared::Envelope]) -> Vec<DateTime<Utc>> {
    envs.iter()
        .map(|e| e.slot.expect("scheduled message has a slot"))
        .collect()
}

fn assert_contiguous_seconds(slots: &BTreeSet<DateTime<Utc>>) {
    let v: Vec<_> = slots.iter().collect();
    for w in v.windows(2) {
        assert_eq!(
            *w[1] - *w[0],
            chrono::Duration::seconds(1),
            "gap or overlap between {} and {}",
            w[0],
            w[1]
        );
    }
}

broker_test!(every_second_schedule_publishes_each_slot_once_and_runs_it_once);
async fn every_second_schedule_publishes_each_slot_once_and_runs_it_once(env: TestEnv) {
    let config = env.config(&format!(
        "[schedule.tick]\ncron = \"* * * * * *\"\ntask = \"count\"\nmisfire = \"fire_all\"\n{}",
        env.exec_task("count", "")
    ));

    // Phase 1: the producer alone for over 5 seconds; inspect what reached the queue.
    let producer = env.spawn_producer(&config, "p1").await;
    let started = Instant::now();
    let counted = wait_until(Duration::from_secs(15), || async {
        started.elapsed() >= Duration::from_millis(5500)
    })
    .await;
    assert!(counted);
    producer.shutdown().await;
    let envs = env.drain_envelopes().await;
    let slots = slots_of(&envs);
    let distinct: BTreeSet<_> = slots.iter().copied().collect();
    assert!(
        distinct.len() >= 5,
        "expected at least 5 slots in 5.5 s, got {}",
        distinct.len()
    );
    assert_eq!(
        distinct.len(),
        slots.len(),
        "a slot was published twice: {slots:?}"
    );
    assert_contiguous_seconds(&distinct);
    let ids: HashSet<_> = envs.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids.len(), envs.len(), "ids must be unique per slot");
    for e in &envs {
        assert_eq!(
            e.id,
            cronpipe_shared::envelope::slot_id("tick", e.slot.unwrap()),
            "deterministic id"
        );
        assert_eq!(e.task, "count");
        assert_eq!(e.fencing_token, Some(1));
    }

    // Phase 2: republish them (and each twice, as a failover could) and let a worker run them.
    for e in envs.iter().chain(envs.iter()) {
        env.broker.publish(e).await.expect("publish");
    }
    let mut worker = env.spawn_worker(&config, "w1", Registry::new()).await;
    let mut outcomes = Vec::new();
    while outcomes.len() < envs.len() * 2 {
        outcomes.push(worker.next(Duration::from_secs(20)).await.settled);
    }
    worker.shutdown().await;
    let runs = env.runs();
    let ran: Vec<&str> = runs
        .iter()
        .map(|l| l.split(' ').next().unwrap_or(""))
        .collect();
    let ran_set: HashSet<&str> = ran.iter().copied().collect();
    assert_eq!(
        ran.len(),
        envs.len(),
        "each slot runs exactly once: {runs:?}"
    );
    assert_eq!(ran_set.len(), envs.len());
    assert_eq!(
        outcomes.iter().filter(|s| **s == Settled::Success).count(),
        envs.len()
    );
    let skipped = outcomes
        .iter()
        .filter(|s| matches!(s, Settled::Duplicate | Settled::Deferred))
        .count();
    assert_eq!(
        skipped,
        envs.len(),
        "every duplicate was skipped or deferred, none ran"
    );
    if env.is_kafka() {
        // Every settled message was committed by the clean stop: the n
        // originals (taken by the drain) and the 2n copies.
        let committed: i64 = env
            .committed(env.topic())
            .await
            .iter()
            .filter_map(|(_, o)| *o)
            .sum();
        assert_eq!(committed as usize, 3 * envs.len(), "work offsets committed");
    }
    env.cleanup().await;
}

broker_test!(two_producers_started_together_only_one_publishes);
async fn two_producers_started_together_only_one_publishes(env: TestEnv) {
    let config = env.config(&format!(
        "[schedule.tick]\ncron = \"* * * * * *\"\ntask = \"count\"\nmisfire = \"fire_all\"\n{}",
        env.exec_task("count", "")
    ));
    let pa = env.spawn_producer(&config, "pa").await;
    let pb = env.spawn_producer(&config, "pb").await;
    let started = Instant::now();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            started.elapsed() >= Duration::from_millis(4200)
        })
        .await
    );
    pa.stop.cancel();
    pb.stop.cancel();
    pa.handle.await.expect("pa");
    pb.handle.await.expect("pb");
    let envs = env.drain_envelopes().await;
    assert!(
        envs.len() >= 3,
        "the leader published ({} messages)",
        envs.len()
    );
    let tokens: HashSet<_> = envs.iter().map(|e| e.fencing_token).collect();
    assert_eq!(tokens.len(), 1, "one leader, one fencing token: {tokens:?}");
    let slots = slots_of(&envs);
    let distinct: BTreeSet<_> = slots.iter().copied().collect();
    assert_eq!(distinct.len(), slots.len(), "no slot published twice");
    assert_contiguous_seconds(&distinct);
    env.cleanup().await;
}

/// Polls the lease value until `pred` holds; returns it.
async fn holder_within(
    env: &TestEnv,
    limit: Duration,
    pred: impl Fn(&str) -> bool,
) -> Option<String> {
    let end = Instant::now() + limit;
    loop {
        let v = env
            .store
            .lease_holder()
            .await
            .ok()
            .flatten()
            .map(|(v, _)| v)
            .unwrap_or_default();
        if pred(&v) {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn lease_holder_instance(value: &str) -> String {
    // <token>:<instance>:<nonce>
    let mut parts = value.splitn(2, ':');
    let _token = parts.next();
    let rest = parts.next().unwrap_or("");
    rest.rsplit_once(':')
        .map(|(i, _)| i.to_string())
        .unwrap_or_default()
}

broker_test!(sigterm_on_the_leader_hands_over_to_the_standby_quickly);
async fn sigterm_on_the_leader_hands_over_to_the_standby_quickly(env: TestEnv) {
    let cfg = env.write_config(
        "cronpipe.toml",
        &format!(
            "[schedule.tick]\ncron = \"* * * * * *\"\ntask = \"count\"\nmisfire = \"fire_all\"\n{}",
            env.exec_task("count", "")
        ),
    );
    let a = Proc::start(
        "producer",
        &cfg,
        &[("CRONPIPE__PRODUCER__INSTANCE_ID", "pa")],
        env.dir.path(),
        "pa",
    );
    let first = holder_within(&env, Duration::from_secs(10), |h| !h.is_empty()).await;
    assert!(first.is_some(), "a leader within 10 s");
    let b = Proc::start(
        "producer",
        &cfg,
        &[("CRONPIPE__PRODUCER__INSTANCE_ID", "pb")],
        env.dir.path(),
        "pb",
    );
    // Wait until the standby is up (it logs that it stands by).
    assert!(
        wait_until(Duration::from_secs(10), || async {
            b.log_text().contains("Standing by")
        })
        .await,
        "{}",
        b.log_text()
    );
    let (mut leader, standby) = (a, "pb");
    assert_eq!(lease_holder_instance(&first.unwrap_or_default()), "pa");
    let t0 = Instant::now();
    leader.signal(Signal::SIGTERM);
    let holder = holder_within(&env, Duration::from_secs(5), |h| {
        lease_holder_instance(h) == standby
    })
    .await;
    let gap = t0.elapsed();
    assert!(
        holder.is_some(),
        "standby never took over\n{}",
        leader.log_text()
    );
    assert!(gap <= Duration::from_secs(2), "takeover took {gap:?}");
    assert!(
        leader.wait_exit(Duration::from_secs(5)),
        "leader exits after SIGTERM"
    );
    assert!(
        leader.log_text().contains("Released the leader lease"),
        "{}",
        leader.log_text()
    );
    // The new leader publishes under a higher fencing token.
    assert!(
        wait_until(Duration::from_secs(5), || async {
            env.drain_envelopes()
                .await
                .iter()
                .any(|e| e.fencing_token == Some(2))
        })
        .await
    );
    drop(b);
    eprintln!("takeover after SIGTERM: {gap:?}");
    env.cleanup().await;
}
