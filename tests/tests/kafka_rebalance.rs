//! Kafka rebalances: a revocation stops handing out work of the revoked
//! partitions, lets the tasks already running finish within the grace period
//! (`worker.shutdown_grace`), and commits them before the partitions move, so
//! the new owner starts after them instead of finding them still running.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cronpipe_shared::Envelope;
use cronpipe_tests::{wait_until, TestEnv};
use cronpipe_worker::{Registry, Settled, Task, TaskError};

type Runs = Arc<Mutex<Vec<(String, String)>>>;

fn handler(
    runs: Runs,
    pause: Duration,
) -> impl Fn(Task) -> futures::future::BoxFuture<'static, Result<(), TaskError>> + Send + Sync {
    move |task: Task| {
        let runs = runs.clone();
        Box::pin(async move {
            runs.lock()
                .expect("runs")
                .push((task.envelope.id.clone(), task.worker.clone()));
            tokio::time::sleep(pause).await;
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_lets_running_tasks_finish_and_commits_them_before_the_partition_moves() {
    // One partition: whichever member owns it after the rebalance reads on
    // from the committed offset.
    let env = TestEnv::kafka_mock("revoke", 1).await;
    let config = env.config(
        "[worker]\nconcurrency = 4\nshutdown_grace = \"20s\"\n\n[task.slow]\nhandler = \"rust\"\n\n[task.fast]\nhandler = \"rust\"\n",
    );
    let runs: Runs = Arc::default();
    let registry = || {
        Registry::new()
            .register("slow", handler(runs.clone(), Duration::from_secs(8)))
            .register("fast", handler(runs.clone(), Duration::ZERO))
    };
    let ran = |id: &str| {
        runs.lock()
            .expect("runs")
            .iter()
            .filter(|(r, _)| r == id)
            .count()
    };
    // Publishes a `task` envelope and waits for it to start running.
    let (world, ran_ref) = (&env, &ran);
    let publish_and_start = |task: &'static str, limit: u64, what: &'static str| async move {
        let e = Envelope::new(task, serde_json::Value::Null);
        world.broker.publish(&e).await.expect("publish");
        assert!(
            wait_until(Duration::from_secs(limit), || async { ran_ref(&e.id) == 1 }).await,
            "{what}"
        );
        e
    };
    let mut a = env.spawn_worker(&config, "wa", registry()).await;
    let slow = publish_and_start("slow", 20, "the first member starts the slow task").await;
    // A second member joins while the slow task runs: the partition is
    // revoked from the first one mid-task.
    let mut b = env.spawn_worker(&config, "wb", registry()).await;
    let marker = publish_and_start(
        "fast",
        30,
        "the group settles and the partition's new owner runs the next message",
    )
    .await;
    env.expect_committed(
        env.topic(),
        &[(0, Some(2))],
        Duration::from_secs(20),
        "both messages committed",
    )
    .await;
    let stragglers = Duration::from_millis(500);
    let mut reports = Vec::new();
    for w in [&mut a, &mut b] {
        while let Some(r) = w.next_report(stragglers).await {
            reports.push(r);
        }
    }
    a.shutdown().await;
    b.shutdown().await;
    let mut per_id: HashMap<String, Vec<Settled>> = HashMap::new();
    for r in reports {
        if let Some(id) = r.id {
            per_id.entry(id).or_default().push(r.settled);
        }
    }
    // Without the grace period the partition would move while the slow task
    // runs, and its new owner would find the key busy (`deferred`). With it,
    // the task finishes first. librdkafka's mock cluster refuses the commit
    // made during the rebalance (REBALANCE_IN_PROGRESS; a real Kafka broker
    // accepts commits of the current generation then), so on the mock the
    // new owner may read the message once more and finds it finished.
    let slow_reports = per_id.get(&slow.id).cloned().unwrap_or_default();
    assert!(
        matches!(
            slow_reports.as_slice(),
            [Settled::Success] | [Settled::Success, Settled::Duplicate]
        ),
        "the slow task finished within the grace period before its partition moved (a move mid-task shows up as deferred): {per_id:?}"
    );
    // The same refused commit can hand the marker out again after a further
    // rebalance: it then shows up as a duplicate, never as a second run.
    let marker_reports = per_id.get(&marker.id).cloned().unwrap_or_default();
    assert!(
        marker_reports.first() == Some(&Settled::Success)
            && marker_reports[1..].iter().all(|s| *s == Settled::Duplicate),
        "the marker ran once; any later delivery was a duplicate: {per_id:?}"
    );
    assert_eq!(ran(&marker.id), 1);
    assert_eq!(ran(&slow.id), 1);
    env.cleanup().await;
}
