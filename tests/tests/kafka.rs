//! Kafka-only behaviour, against librdkafka's in-process mock cluster: two
//! workers share a group; offsets are committed only past settled messages;
//! a retry copy that is not due holds up nothing else; requeue re-publishes;
//! a broker outage (the mock's broker down, then up) under a worker or a
//! producer loses nothing and runs nothing twice (the counterparts of the
//! RabbitMQ `*_chaos.rs` tests; the outage touches only the test's own
//! cluster, so they run beside the rest).
//! The behaviours Kafka shares with RabbitMQ (slots published and run once,
//! duplicates, retries, dead letters, ...) are tested on both brokers by the
//! other files (`broker_test!`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cronpipe_shared::Envelope;
use cronpipe_tests::wait_until;
use cronpipe_tests::{RunCounter, TestEnv};
use cronpipe_worker::{Registry, Report, Settled, Task, TaskError};
use tokio::sync::watch;

const REPORT_WAIT: Duration = Duration::from_secs(20);

fn count(reports: &[Report], s: Settled) -> usize {
    reports.iter().filter(|r| r.settled == s).count()
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
async fn two_workers_in_one_group_share_a_four_partition_topic_and_run_each_task_once() {
    let env = TestEnv::kafka_mock("group", 4).await;
    let config = env.config("[worker]\nconcurrency = 2\n\n[task.count]\nhandler = \"rust\"\n");
    let runs = Arc::new(Mutex::new(Vec::new()));
    let registry = || {
        Registry::new().register(
            "count",
            counting_handler(runs.clone(), Duration::from_millis(40)),
        )
    };
    let a = env.spawn_worker(&config, "wa", registry()).await;
    let b = env.spawn_worker(&config, "wb", registry()).await;
    let ran = || -> HashSet<String> {
        runs.lock()
            .expect("runs")
            .iter()
            .map(|r| r.0.clone())
            .collect()
    };
    let both_ran = || {
        let workers: HashSet<String> = runs
            .lock()
            .expect("runs")
            .iter()
            .map(|r| r.1.clone())
            .collect();
        workers.len() == 2
    };
    // Batches of 20 until both members have run tasks: the group settles
    // (the second member joins, a rebalance splits the partitions) while
    // tasks flow, and every task must still run once.
    let mut ids: HashSet<String> = HashSet::new();
    for batch in 0..20 {
        let envs: Vec<Envelope> = (0..20)
            .map(|i| Envelope::new("count", serde_json::json!({"batch": batch, "i": i})))
            .collect();
        for r in env.broker.publish_batch(&envs).await {
            r.expect("publish");
        }
        ids.extend(envs.into_iter().map(|e| e.id));
        assert!(
            wait_until(REPORT_WAIT, || async { ran() == ids }).await,
            "batch {batch}: every task ran"
        );
        if both_ran() && batch >= 1 {
            break;
        }
    }
    // Both members commit as they go. (Waited for before stopping: once one
    // member leaves, the mock cluster refuses the other's commits until the
    // rebalance completes, where Kafka accepts them.)
    let committed = || async {
        env.committed(env.topic())
            .await
            .iter()
            .filter_map(|(_, o)| *o)
            .sum::<i64>() as usize
    };
    assert!(
        wait_until(REPORT_WAIT, || async { committed().await == ids.len() }).await,
        "every work offset committed while both run: {:?}",
        env.committed(env.topic()).await
    );
    // A clean stop of both ends every run: count then.
    a.shutdown().await;
    b.shutdown().await;
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
    assert_eq!(per_id.len(), ids.len());
    assert!(
        per_worker.get("wa").copied().unwrap_or(0) > 0
            && per_worker.get("wb").copied().unwrap_or(0) > 0,
        "both members got partitions: {per_worker:?}"
    );
    eprintln!("runs per worker: {per_worker:?}");
    assert_eq!(
        committed().await,
        ids.len(),
        "the clean stop moved no commit back"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_message_holds_the_committed_offset_until_it_finishes() {
    let env = TestEnv::kafka_mock("slow", 1).await;
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
    w.until(REPORT_WAIT, |r| count(r, Settled::Success) == 10)
        .await;
    // Offsets 1..=10 are done, 0 is stuck: the commit must stay at 0.
    for _ in 0..8 {
        let c = env.committed(env.topic()).await;
        assert_eq!(c.len(), 1);
        assert!(
            c[0].1.unwrap_or(0) == 0,
            "committed offset passed the stuck message: {c:?}"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let _ = release_tx.send(true);
    w.until(REPORT_WAIT, |r| count(r, Settled::Success) == 1)
        .await;
    env.expect_committed(
        env.topic(),
        &[(0, Some(11))],
        Duration::from_secs(5),
        "commit moves past the slow message once it is done",
    )
    .await;
    w.shutdown().await;
    env.cleanup().await;
}

/// A commit the broker refuses is sent again, even when nothing else settles
/// on that partition afterwards: the group's position must not stay behind
/// finished work, or the partition's next owner would run it again. (rdkafka
/// never reports how an async commit ended, so every settled offset is sent
/// again every 5 s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_offset_commit_is_sent_again_while_the_partition_is_idle() {
    let env = TestEnv::kafka_mock("commit-refused", 1).await;
    let config = env.config("[task.t]\nhandler = \"rust\"\n");
    let registry = Registry::new().register("t", |_task: Task| async { Ok(()) });
    env.mock().fail_requests(
        rdkafka::types::RDKafkaApiKey::OffsetCommit,
        rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_OFFSET_METADATA_TOO_LARGE,
        1,
    );
    env.broker
        .publish(&Envelope::new("t", serde_json::json!(null)))
        .await
        .expect("publish");
    let mut w = env.spawn_worker(&config, "w1", registry).await;
    w.until(REPORT_WAIT, |r| count(r, Settled::Success) == 1)
        .await;
    env.expect_committed(
        env.topic(),
        &[(0, Some(1))],
        Duration::from_secs(10),
        "the refused commit is sent again",
    )
    .await;
    w.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_copy_not_yet_due_blocks_neither_work_nor_commits() {
    let env = TestEnv::kafka_mock("due", 1).await;
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
    w.until(REPORT_WAIT, |r| count(r, Settled::Success) == 5)
        .await;
    assert!(
        published.elapsed() < Duration::from_secs(3),
        "work ran while the retry copy waited"
    );
    assert!(
        !runs.lock().expect("runs").iter().any(|r| r.0 == later.id),
        "the retry copy ran before it was due"
    );
    env.expect_committed(
        env.topic(),
        &[(0, Some(5))],
        Duration::from_secs(2),
        "work commits advance while the retry copy waits",
    )
    .await;
    let retry_topic = format!("{}.retry", env.topic());
    let c = env.committed(&retry_topic).await;
    assert!(c[0].1.unwrap_or(0) == 0, "{c:?}");
    w.until(REPORT_WAIT, |r| count(r, Settled::Success) == 1)
        .await;
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

/// Publishes one envelope and takes its delivery from a consumer on `broker`.
async fn one_delivery(
    env: &TestEnv,
    broker: &cronpipe_shared::Broker,
    tag: &str,
) -> (
    Envelope,
    cronpipe_shared::Consumer,
    cronpipe_shared::Delivery,
) {
    let e = Envelope::new("t", serde_json::json!(1));
    env.broker.publish(&e).await.expect("publish");
    let mut consumer = broker
        .consume(4, tag, Duration::ZERO)
        .await
        .expect("consume");
    let first = tokio::time::timeout(REPORT_WAIT, consumer.next())
        .await
        .expect("a delivery")
        .expect("open");
    assert!(!first.redelivered());
    assert_eq!(Envelope::decode(first.body()).expect("envelope").id, e.id);
    (e, consumer, first)
}

/// After a requeue of `e`: its copy comes back flagged redelivered, and once
/// acked the original and the copy are both committed.
async fn expect_requeued_copy(
    env: &TestEnv,
    consumer: &mut cronpipe_shared::Consumer,
    e: &Envelope,
) {
    let again = tokio::time::timeout(REPORT_WAIT, consumer.next())
        .await
        .expect("the message comes back")
        .expect("open");
    assert!(again.redelivered());
    assert_eq!(Envelope::decode(again.body()).expect("envelope").id, e.id);
    again.ack().await.expect("ack");
    env.expect_committed(
        env.topic(),
        &[(0, Some(2))],
        Duration::from_secs(10),
        "both the original and the copy are committed",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeue_republishes_the_message_and_it_comes_back_flagged_redelivered() {
    let env = TestEnv::kafka_mock("requeue", 1).await;
    let (e, mut consumer, first) = one_delivery(&env, &env.broker, "requeue-test").await;
    first.requeue().await.expect("requeue");
    expect_requeued_copy(&env, &mut consumer, &e).await;
    consumer.cancel().await;
    env.cleanup().await;
}

/// A hand-back whose re-publish fails (the broker down for longer than
/// `delivery_timeout`) is sent again once the broker is back: the message
/// comes back and both offsets are committed, instead of the original
/// holding the partition's commits until a restart or rebalance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requeue_during_a_broker_outage_is_sent_once_the_broker_is_back() {
    let env = TestEnv::kafka_mock("requeue-outage", 1).await;
    let mut cfg = env.broker_config();
    cfg.kafka.delivery_timeout = cronpipe_shared::duration::Dur::millis(1000);
    let broker = cronpipe_shared::Broker::connect(&cfg, "requeue-outage")
        .await
        .expect("connect");
    let (e, mut consumer, first) = one_delivery(&env, &broker, "requeue-outage-test").await;
    // The outage outlasts the delivery timeout, so the first re-publish
    // fails; the group session (longer) keeps the partition ours.
    env.mock().broker_down();
    let requeue = tokio::spawn(first.requeue());
    tokio::time::sleep(Duration::from_millis(2500)).await;
    env.mock().broker_up();
    requeue
        .await
        .expect("join")
        .expect("the copy is sent once the broker is back");
    expect_requeued_copy(&env, &mut consumer, &e).await;
    consumer.cancel().await;
    broker.close().await;
    env.cleanup().await;
}

/// An idle worker's Kafka readiness after an outage: librdkafka reports all
/// brokers down, and nothing arrives afterwards that would say they are back
/// (no task, no delivery report), so the consumer asks for metadata until a
/// broker answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_is_ready_again_after_a_broker_outage() {
    let env = TestEnv::kafka_mock("ready-again", 1).await;
    let config = env.config("[task.t]\nhandler = \"rust\"\n");
    let registry = Registry::new().register("t", |_task: Task| async { Ok(()) });
    let broker = cronpipe_shared::Broker::connect(&env.broker_config(), "ready-again")
        .await
        .expect("connect");
    let w = env
        .spawn_worker_on(&config, "w1", registry, broker.clone())
        .await;
    env.mock().broker_down();
    assert!(
        wait_until(Duration::from_secs(20), || async { !broker.is_connected() }).await,
        "the outage is never noticed"
    );
    env.mock().broker_up();
    assert!(
        wait_until(Duration::from_secs(20), || async { broker.is_connected() }).await,
        "an idle worker stays not ready after the broker came back"
    );
    w.shutdown().await;
    env.cleanup().await;
}

/// The counterpart of worker_chaos.rs on Kafka: the mock cluster's broker
/// goes down mid-run for longer than the group session (the worker's member
/// expires, its in-flight acks cannot be committed), then comes back. Every
/// task runs exactly once, the worker survives, and the commits catch up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_during_a_run_loses_no_task_and_runs_none_twice() {
    const N: usize = 3000;
    let env = TestEnv::kafka_mock("outage-worker", 4).await;
    let config = env
        .config("[worker]\nconcurrency = 32\nclaim_ttl = \"2s\"\n[task.n]\nhandler = \"rust\"\n");
    let runs = RunCounter::default();
    let registry = runs.register(Registry::new(), "n", Duration::from_millis(20));
    let envs: Vec<Envelope> = (0..N)
        .map(|i| Envelope::new("n", serde_json::json!(i)))
        .collect();
    for chunk in envs.chunks(1000) {
        for r in env.broker.publish_batch(chunk).await {
            r.expect("publish");
        }
    }
    let mut w = env.spawn_worker(&config, "w-outage", registry).await;
    let ran = || runs.distinct();
    assert!(
        wait_until(Duration::from_secs(60), || async { ran() >= N / 4 }).await,
        "only {} of {N} ran before the outage",
        ran()
    );
    env.mock().broker_down();
    let down_at = ran();
    // The outage itself: longer than session.timeout.ms (6 s), so the group
    // drops the worker's member and hands its partitions out again.
    tokio::time::sleep(Duration::from_secs(8)).await;
    env.mock().broker_up();
    let up_at = ran();
    let t0 = Instant::now();
    assert!(
        wait_until(Duration::from_secs(120), || async { ran() == N }).await,
        "only {} of {N} ran; worker finished: {}",
        ran(),
        w.handle.is_finished()
    );
    let committed = || async {
        env.committed(env.topic())
            .await
            .iter()
            .filter_map(|(_, o)| *o)
            .sum::<i64>() as usize
    };
    assert!(
        wait_until(Duration::from_secs(60), || async { committed().await == N }).await,
        "commits caught up after the outage: {:?}",
        env.committed(env.topic()).await
    );
    assert!(!w.handle.is_finished(), "the worker survived the outage");
    let settled = w.outcomes();
    w.shutdown().await;
    runs.assert_each_ran_once(N, &settled);
    assert!(
        env.drain_dead_letters().await.is_empty(),
        "nothing dead-lettered"
    );
    eprintln!(
        "outage: {down_at} ran before it, {up_at} by its end; all {N} ran once {:?} after it; outcomes {settled:?}",
        t0.elapsed()
    );
    env.cleanup().await;
}

/// The counterpart of producer_chaos.rs's broker restart on Kafka: the mock
/// cluster's broker goes down for a few seconds under a leading producer with
/// an every-second fire_all schedule; no slot is lost, and the slots due
/// during the outage are published once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_under_the_producer_loses_no_slot() {
    let env = TestEnv::kafka_mock("outage-producer", 2).await;
    let config = env.config(
        "[producer]\nlease_ttl = \"2s\"\n\n[schedule.tick]\ncron = \"* * * * * *\"\ntask = \"t\"\nmisfire = \"fire_all\"\n\n[task.t]\nhandler = \"exec\"\ncommand = [\"/bin/true\"]\n",
    );
    let mark = || async {
        env.store
            .watermarks()
            .await
            .unwrap_or_default()
            .get("tick")
            .copied()
    };
    let p = env.spawn_producer(&config, "p0").await;
    let start = chrono::Utc::now();
    assert!(
        wait_until(Duration::from_secs(30), || async {
            mark()
                .await
                .is_some_and(|m| m >= start + chrono::Duration::seconds(2))
        })
        .await,
        "the producer publishes"
    );
    env.mock().broker_down();
    let down = chrono::Utc::now();
    // The outage itself: a few seconds with the broker unreachable.
    tokio::time::sleep(Duration::from_secs(4)).await;
    env.mock().broker_up();
    let up = chrono::Utc::now();
    // The watermark moves only after the broker confirmed: wait for a slot
    // due after the outage.
    assert!(
        wait_until(Duration::from_secs(60), || async {
            mark()
                .await
                .is_some_and(|m| m >= up + chrono::Duration::seconds(2))
        })
        .await,
        "publishing resumed after the outage: watermark {:?}",
        mark().await
    );
    p.shutdown().await;
    let envs = env.drain_envelopes().await;
    let slots: Vec<chrono::DateTime<chrono::Utc>> =
        envs.iter().map(|e| e.slot.expect("slot")).collect();
    let distinct: std::collections::BTreeSet<_> = slots.iter().copied().collect();
    let v: Vec<_> = distinct.iter().collect();
    let gaps: Vec<_> = v
        .windows(2)
        .filter(|w| *w[1] - *w[0] != chrono::Duration::seconds(1))
        .collect();
    assert!(gaps.is_empty(), "slots lost: {gaps:?}");
    let (first, last) = (**v.first().expect("slots"), **v.last().expect("slots"));
    assert!(
        first <= down && last >= up,
        "the run spans the outage: {first}..{last}"
    );
    let during = distinct.iter().filter(|s| **s > down && **s < up).count();
    assert!(
        during >= 3,
        "slots due during the outage were published: {during}"
    );
    eprintln!(
        "producer outage: {} slots {first}..{last} without a gap ({during} due while the broker was down), {} messages",
        distinct.len(),
        slots.len()
    );
    env.cleanup().await;
}
