//! The pipeline on Kafka, against librdkafka's in-process mock cluster: the
//! producer publishes each slot once and a worker runs each once; duplicates
//! run once; retries go through the retry topic with growing delays; failures
//! and undecodable messages reach the dead-letter topic with their reasons;
//! two workers share a group; offsets are committed only past settled
//! messages, and a retry copy that is not due holds up nothing else.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use cronpipe_shared::deadletter::DeadReason;
use cronpipe_shared::Envelope;
use cronpipe_tests::kafka::KafkaEnv;
use cronpipe_tests::wait_until;
use cronpipe_worker::{Registry, Report, Settled, Task, TaskError};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const REPORT_WAIT: Duration = Duration::from_secs(20);

fn spawn_producer(
    env: &KafkaEnv,
    config: &cronpipe_shared::Config,
    id: &str,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = CancellationToken::new();
    let (tx, rx) = watch::channel(Arc::new(config.built_schedules().expect("schedules")));
    let store = env.store.clone();
    let mut opts = cronpipe_producer::Options::from_config(config);
    opts.instance_id = id.into();
    let cfg = config.broker.clone();
    let s = stop.clone();
    let name = id.to_string();
    let handle = tokio::spawn(async move {
        let broker = cronpipe_shared::Broker::connect(&cfg, &name)
            .await
            .expect("broker");
        let _keep = tx;
        cronpipe_producer::run(opts, store, broker, rx, s)
            .await
            .expect("producer run");
    });
    (stop, handle)
}

/// Collects reports until `done` holds for them, or fails after `limit`.
async fn reports_until(
    w: &mut cronpipe_tests::kafka::RunningWorker,
    limit: Duration,
    done: impl Fn(&[Report]) -> bool,
) -> Vec<Report> {
    let end = Instant::now() + limit;
    let mut out = Vec::new();
    while !done(&out) {
        let left = end.saturating_duration_since(Instant::now());
        match w.next_report(left).await {
            Some(r) => out.push(r),
            None => panic!("worker reports did not complete within {limit:?}: {out:#?}"),
        }
    }
    out
}

fn count(reports: &[Report], s: Settled) -> usize {
    reports.iter().filter(|r| r.settled == s).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_publishes_each_slot_once_and_a_worker_runs_each_once() {
    let env = KafkaEnv::mock("e2e", 3).await;
    let config = env.config(&format!(
        "[schedule.tick]\ncron = \"* * * * * *\"\ntask = \"count\"\nmisfire = \"fire_all\"\n{}",
        env.exec_task("count", "")
    ));

    // Phase 1: the producer alone; inspect what reached the topic.
    let (stop, handle) = spawn_producer(&env, &config, "p1");
    tokio::time::sleep(Duration::from_millis(4500)).await;
    stop.cancel();
    handle.await.expect("producer task");
    let envs = env.drain_envelopes().await;
    let slots: Vec<DateTime<Utc>> = envs.iter().map(|e| e.slot.expect("slot")).collect();
    let distinct: BTreeSet<_> = slots.iter().copied().collect();
    assert!(
        distinct.len() >= 3,
        "expected at least 3 slots, got {slots:?}"
    );
    assert_eq!(
        distinct.len(),
        slots.len(),
        "a slot was published twice: {slots:?}"
    );
    let v: Vec<_> = distinct.iter().collect();
    for w in v.windows(2) {
        assert_eq!(*w[1] - *w[0], chrono::Duration::seconds(1), "gap in {v:?}");
    }
    for e in &envs {
        assert_eq!(
            e.id,
            cronpipe_shared::envelope::slot_id("tick", e.slot.expect("slot"))
        );
        assert_eq!(e.fencing_token, Some(1));
    }
    assert!(
        env.drain_envelopes().await.is_empty(),
        "drain takes the messages"
    );

    // Phase 2: each twice more (as a failover could publish), then a worker.
    for e in envs.iter().chain(envs.iter()) {
        env.broker.publish(e).await.expect("publish");
    }
    let mut w = env.spawn_worker(&config, "w1", Registry::new()).await;
    let n = envs.len();
    // A copy that finds the claim busy is deferred (through the retry topic);
    // one that finds the task done is acked as a duplicate. Neither runs.
    let reports = reports_until(&mut w, REPORT_WAIT, |r| {
        count(r, Settled::Success) == n
            && count(r, Settled::Duplicate) + count(r, Settled::Deferred) == n
    })
    .await;
    w.shutdown().await;
    let runs = env.runs();
    let ran: HashSet<&str> = runs
        .iter()
        .map(|l| l.split(' ').next().unwrap_or(""))
        .collect();
    assert_eq!(runs.len(), n, "each slot runs exactly once: {runs:?}");
    assert_eq!(ran.len(), n);
    assert_eq!(count(&reports, Settled::Success), n);
    // Everything is committed: nothing comes back for the group.
    let committed: i64 = env
        .committed(&env.topic)
        .await
        .iter()
        .map(|(_, o)| o.unwrap_or(0))
        .sum();
    // The n originals (taken by the drain) and the 2n copies.
    assert_eq!(committed as usize, 3 * n, "all work offsets committed");
    env.cleanup().await;
}

fn counting_handler(
    runs: Arc<Mutex<Vec<(String, String, u32)>>>,
    pause: Duration,
) -> impl Fn(Task) -> futures::future::BoxFuture<'static, Result<(), TaskError>> + Send + Sync {
    move |task: Task| {
        let runs = runs.clone();
        Box::pin(async move {
            runs.lock().expect("runs").push((
                task.envelope.id.clone(),
                task.worker.clone(),
                task.attempt,
            ));
            tokio::time::sleep(pause).await;
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_of_one_envelope_run_once() {
    let env = KafkaEnv::mock("dup", 2).await;
    // A short claim makes deferred copies come back (as duplicates) quickly.
    let config = env.config("[worker]\nclaim_ttl = \"2s\"\n\n[task.once]\nhandler = \"rust\"\n");
    let env1 = Envelope::new("once", serde_json::json!({"n": 1}));
    for _ in 0..5 {
        env.broker.publish(&env1).await.expect("publish");
    }
    let runs = Arc::new(Mutex::new(Vec::new()));
    let registry = Registry::new().register(
        "once",
        counting_handler(runs.clone(), Duration::from_millis(100)),
    );
    let mut w = env.spawn_worker(&config, "w1", registry).await;
    // Copies that found the claim busy are deferred through the retry topic
    // and come back as duplicates.
    let reports = reports_until(&mut w, REPORT_WAIT, |r| {
        count(r, Settled::Success) == 1 && count(r, Settled::Duplicate) == 4
    })
    .await;
    w.shutdown().await;
    assert_eq!(runs.lock().expect("runs").len(), 1, "{reports:#?}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_twice_then_succeeding_retries_via_the_retry_topic_with_growing_delays() {
    let env = KafkaEnv::mock("retry", 2).await;
    let config = env.config(
        "[task.flaky]\nhandler = \"rust\"\n[task.flaky.retry]\nmax_attempts = 5\ninitial_delay = \"300ms\"\nmultiplier = 3.0\njitter = 0.0\nmax_delay = \"10s\"\n",
    );
    let seen: Arc<Mutex<Vec<(u32, Instant)>>> = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let registry = Registry::new().register("flaky", move |task: Task| {
        let s = s.clone();
        async move {
            s.lock().expect("seen").push((task.attempt, Instant::now()));
            if task.attempt < 3 {
                Err(TaskError::retryable(format!(
                    "attempt {} fails",
                    task.attempt
                )))
            } else {
                Ok(())
            }
        }
    });
    let mut w = env.spawn_worker(&config, "w1", registry).await;
    let e = Envelope::new("flaky", serde_json::json!(null));
    env.broker.publish(&e).await.expect("publish");
    let reports = reports_until(&mut w, REPORT_WAIT, |r| count(r, Settled::Success) == 1).await;
    let settled: Vec<(Settled, Option<u32>)> =
        reports.iter().map(|r| (r.settled, r.attempt)).collect();
    assert_eq!(
        settled,
        vec![
            (Settled::Retry, Some(1)),
            (Settled::Retry, Some(2)),
            (Settled::Success, Some(3))
        ]
    );
    let seen = seen.lock().expect("seen").clone();
    let gap1 = seen[1].1 - seen[0].1;
    let gap2 = seen[2].1 - seen[1].1;
    assert!(gap1 >= Duration::from_millis(300), "first delay {gap1:?}");
    assert!(gap2 >= Duration::from_millis(900), "second delay {gap2:?}");
    assert!(gap2 > gap1, "delays grow: {gap1:?} then {gap2:?}");
    // Both topics end fully committed: the work message and the two retry copies.
    let retry_topic = format!("{}.retry", env.topic);
    assert!(
        wait_until(Duration::from_secs(5), || async {
            let work: i64 = env
                .committed(&env.topic)
                .await
                .iter()
                .filter_map(|x| x.1)
                .sum();
            let retry: i64 = env
                .committed(&retry_topic)
                .await
                .iter()
                .filter_map(|x| x.1)
                .sum();
            work == 1 && retry == 2
        })
        .await,
        "offsets committed: work {:?}, retry {:?}",
        env.committed(&env.topic).await,
        env.committed(&retry_topic).await
    );
    w.shutdown().await;
    eprintln!("retry delays on Kafka: {gap1:?}, {gap2:?}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_error_goes_to_the_dead_letter_topic_with_its_reason() {
    let env = KafkaEnv::mock("perm", 2).await;
    let config = env.config("[task.doomed]\nhandler = \"rust\"\n");
    let registry = Registry::new().register("doomed", |_task: Task| async {
        Err(TaskError::permanent("bad input: no such account"))
    });
    let mut w = env.spawn_worker(&config, "w1", registry).await;
    let e = Envelope::new("doomed", serde_json::json!({"account": 7}));
    env.broker.publish(&e).await.expect("publish");
    let reports = reports_until(&mut w, REPORT_WAIT, |r| count(r, Settled::DeadLetter) == 1).await;
    assert_eq!(reports.len(), 1, "{reports:#?}");
    w.shutdown().await;
    let dead = env.drain_dead_letters().await;
    assert_eq!(dead.len(), 1, "{dead:#?}");
    let d = &dead[0];
    assert_eq!(d.reason, DeadReason::PermanentError);
    assert!(d.error.contains("no such account"), "{}", d.error);
    assert_eq!(
        d.envelope.as_ref().map(|x| x.id.clone()),
        Some(e.id.clone())
    );
    assert_eq!(d.attempts, 1);
    assert_eq!(d.worker, "w1");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_unknown_and_oversize_messages_are_dead_lettered_with_reasons() {
    let env = KafkaEnv::mock("bad", 2).await;
    let config =
        env.config("[worker]\nmax_message_bytes = 1024\n\n[task.known]\nhandler = \"rust\"\n");
    let registry = Registry::new().register("known", |_task: Task| async { Ok(()) });
    let mut w = env.spawn_worker(&config, "w1", registry).await;
    env.produce_raw("a", b"{not json").await;
    env.produce_raw(
        "b",
        br#"{"v":2,"id":"x","task":"known","created_at":"2026-01-01T00:00:00Z"}"#,
    )
    .await;
    let unknown = Envelope::new("no-such-task", serde_json::json!(null));
    env.broker.publish(&unknown).await.expect("publish");
    let big = Envelope::new("known", serde_json::json!("x".repeat(2000)));
    env.broker.publish(&big).await.expect("publish");
    let reports = reports_until(&mut w, REPORT_WAIT, |r| count(r, Settled::DeadLetter) == 4).await;
    assert_eq!(reports.len(), 4, "{reports:#?}");
    w.shutdown().await;
    let dead = env.drain_dead_letters().await;
    let reasons: BTreeSet<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    assert_eq!(
        reasons,
        [
            "invalid_json",
            "too_large",
            "unknown_task",
            "unsupported_version"
        ]
        .into_iter()
        .collect::<BTreeSet<_>>(),
        "{dead:#?}"
    );
    let unknown_dl = dead
        .iter()
        .find(|d| d.reason == DeadReason::UnknownTask)
        .expect("unknown task record");
    assert_eq!(
        unknown_dl.envelope.as_ref().map(|e| e.id.as_str()),
        Some(unknown.id.as_str())
    );
    let raw = dead
        .iter()
        .find(|d| d.reason == DeadReason::InvalidJson)
        .expect("invalid json record");
    assert_eq!(raw.raw.as_deref(), Some("{not json"));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_in_one_group_share_a_four_partition_topic_and_run_each_task_once() {
    let env = KafkaEnv::mock("group", 4).await;
    let config = env.config("[worker]\nconcurrency = 2\n\n[task.count]\nhandler = \"rust\"\n");
    let runs = Arc::new(Mutex::new(Vec::new()));
    let registry = || {
        Registry::new().register(
            "count",
            counting_handler(runs.clone(), Duration::from_millis(40)),
        )
    };
    let mut a = env.spawn_worker(&config, "wa", registry()).await;
    let mut b = env.spawn_worker(&config, "wb", registry()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut ids = Vec::new();
    for batch in 0..2 {
        let envs: Vec<Envelope> = (0..20)
            .map(|i| Envelope::new("count", serde_json::json!({"batch": batch, "i": i})))
            .collect();
        for r in env.broker.publish_batch(&envs).await {
            r.expect("publish");
        }
        ids.extend(envs.into_iter().map(|e| e.id));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let expected: HashSet<String> = ids.iter().cloned().collect();
    assert!(
        wait_until(REPORT_WAIT, || async {
            let got: HashSet<String> = runs
                .lock()
                .expect("runs")
                .iter()
                .map(|r| r.0.clone())
                .collect();
            got == expected
        })
        .await,
        "every task ran"
    );
    // Let any redelivery after a rebalance show up before counting.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let runs = runs.lock().expect("runs").clone();
    let mut per_id: HashMap<&str, usize> = HashMap::new();
    let mut per_worker: HashMap<&str, usize> = HashMap::new();
    for (id, worker, _) in &runs {
        *per_id.entry(id).or_default() += 1;
        *per_worker.entry(worker).or_default() += 1;
    }
    assert!(
        per_id.values().all(|n| *n == 1),
        "a task ran twice: {per_id:?}"
    );
    assert_eq!(per_id.len(), 40);
    assert!(
        per_worker.get("wa").copied().unwrap_or(0) > 0
            && per_worker.get("wb").copied().unwrap_or(0) > 0,
        "both members got partitions: {per_worker:?}"
    );
    eprintln!("runs per worker: {per_worker:?}");
    while a.reports.try_recv().is_ok() {}
    while b.reports.try_recv().is_ok() {}
    a.shutdown().await;
    b.shutdown().await;
    let committed: i64 = env
        .committed(&env.topic)
        .await
        .iter()
        .filter_map(|x| x.1)
        .sum();
    assert_eq!(
        committed, 40,
        "all work offsets committed after a clean stop"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_message_holds_the_committed_offset_until_it_finishes() {
    let env = KafkaEnv::mock("slow", 1).await;
    let config = env.config(
        "[worker]\nconcurrency = 4\n\n[task.slow]\nhandler = \"rust\"\n\n[task.fast]\nhandler = \"rust\"\n",
    );
    let (release_tx, release_rx) = watch::channel(false);
    let registry = Registry::new()
        .register("slow", move |_task: Task| {
            let mut rx = release_rx.clone();
            async move {
                let _ = rx.wait_for(|v| *v).await;
                Ok(())
            }
        })
        .register("fast", |_task: Task| async { Ok(()) });
    env.broker
        .publish(&Envelope::new("slow", serde_json::json!(null)))
        .await
        .expect("publish");
    for i in 0..10 {
        env.broker
            .publish(&Envelope::new("fast", serde_json::json!(i)))
            .await
            .expect("publish");
    }
    let mut w = env.spawn_worker(&config, "w1", registry).await;
    reports_until(&mut w, REPORT_WAIT, |r| count(r, Settled::Success) == 10).await;
    // Offsets 1..=10 are done, 0 is stuck: the commit must stay at 0.
    for _ in 0..8 {
        let c = env.committed(&env.topic).await;
        assert_eq!(c.len(), 1);
        assert!(
            c[0].1.unwrap_or(0) == 0,
            "committed offset passed the stuck message: {c:?}"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let _ = release_tx.send(true);
    reports_until(&mut w, REPORT_WAIT, |r| count(r, Settled::Success) == 1).await;
    assert!(
        wait_until(Duration::from_secs(5), || async {
            env.committed(&env.topic).await == vec![(0, Some(11))]
        })
        .await,
        "commit moves past the slow message once it is done: {:?}",
        env.committed(&env.topic).await
    );
    w.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_copy_not_yet_due_blocks_neither_work_nor_commits() {
    let env = KafkaEnv::mock("due", 1).await;
    let config = env.config("[task.t]\nhandler = \"rust\"\n");
    let runs = Arc::new(Mutex::new(Vec::new()));
    let registry = Registry::new().register("t", counting_handler(runs.clone(), Duration::ZERO));
    let later = Envelope::new("t", serde_json::json!("later"));
    let published = Instant::now();
    env.broker
        .publish_delayed(&later, Duration::from_secs(3))
        .await
        .expect("publish delayed");
    let mut w = env.spawn_worker(&config, "w1", registry).await;
    for i in 0..5 {
        env.broker
            .publish(&Envelope::new("t", serde_json::json!(i)))
            .await
            .expect("publish");
    }
    reports_until(&mut w, REPORT_WAIT, |r| count(r, Settled::Success) == 5).await;
    assert!(
        published.elapsed() < Duration::from_secs(3),
        "work ran while the retry copy waited"
    );
    assert!(
        !runs.lock().expect("runs").iter().any(|r| r.0 == later.id),
        "the retry copy ran before it was due"
    );
    assert!(
        wait_until(Duration::from_secs(2), || async {
            env.committed(&env.topic).await == vec![(0, Some(5))]
        })
        .await,
        "work commits advance while the retry copy waits: {:?}",
        env.committed(&env.topic).await
    );
    let retry_topic = format!("{}.retry", env.topic);
    let c = env.committed(&retry_topic).await;
    assert!(c[0].1.unwrap_or(0) == 0, "{c:?}");
    reports_until(&mut w, REPORT_WAIT, |r| count(r, Settled::Success) == 1).await;
    assert!(
        published.elapsed() >= Duration::from_millis(2950),
        "not before it is due"
    );
    assert!(
        wait_until(Duration::from_secs(5), || async {
            env.committed(&retry_topic).await == vec![(0, Some(1))]
        })
        .await
    );
    w.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeue_republishes_the_message_and_it_comes_back_flagged_redelivered() {
    let env = KafkaEnv::mock("requeue", 1).await;
    let e = Envelope::new("t", serde_json::json!(1));
    env.broker.publish(&e).await.expect("publish");
    let mut consumer = env
        .broker
        .consume(4, "requeue-test")
        .await
        .expect("consume");
    let first = tokio::time::timeout(REPORT_WAIT, consumer.next())
        .await
        .expect("a delivery")
        .expect("open");
    assert!(!first.redelivered());
    assert_eq!(Envelope::decode(first.body()).expect("envelope").id, e.id);
    first.requeue().await.expect("requeue");
    let again = tokio::time::timeout(REPORT_WAIT, consumer.next())
        .await
        .expect("the message comes back")
        .expect("open");
    assert!(again.redelivered());
    assert_eq!(Envelope::decode(again.body()).expect("envelope").id, e.id);
    again.ack().await.expect("ack");
    assert!(
        wait_until(Duration::from_secs(5), || async {
            env.committed(&env.topic).await == vec![(0, Some(2))]
        })
        .await,
        "both the original and the copy are committed: {:?}",
        env.committed(&env.topic).await
    );
    consumer.cancel().await;
    env.cleanup().await;
}
