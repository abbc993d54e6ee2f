//! Kafka tests that need a broker in a separate process (the mock cluster
//! lives inside one process): real `worker` binaries in one consumer group,
//! a worker SIGKILLed with uncommitted messages, topic creation through the
//! AdminClient. They run when `CRONPIPE_TEST_KAFKA_BROKERS` names a
//! Kafka-protocol broker (`scripts/kafka-broker` starts one) and are skipped
//! with a notice otherwise. The worker binaries must be built first
//! (`cargo build --workspace --bins`, as scripts/test does).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use cronpipe_shared::Envelope;
use cronpipe_tests::kafka::KafkaEnv;
use cronpipe_tests::{wait_until, Proc};
use nix::sys::signal::Signal;

/// An exec task that logs `start <id> <worker>`, sleeps `secs`, then logs `done <id> <worker>`.
fn logged_task(env: &KafkaEnv, secs: &str) -> String {
    let file = env.runs_file();
    format!(
        r#"
[task.job]
handler = "exec"
command = ["/bin/sh", "-c", "echo \"start $CRONPIPE_TASK_ID $CRONPIPE_WORKER\" >> {f}; sleep {secs}; echo \"done $CRONPIPE_TASK_ID $CRONPIPE_WORKER\" >> {f}"]
"#,
        f = file.display()
    )
}

/// `(event, id, worker)` lines of the runs file.
fn events(env: &KafkaEnv) -> Vec<(String, String, String)> {
    env.runs()
        .iter()
        .filter_map(|l| {
            let mut it = l.split(' ');
            Some((
                it.next()?.to_string(),
                it.next()?.to_string(),
                it.next()?.to_string(),
            ))
        })
        .collect()
}

async fn publish_jobs(env: &KafkaEnv, n: usize) -> Vec<String> {
    let envs: Vec<Envelope> = (0..n)
        .map(|i| Envelope::new("job", serde_json::json!(i)))
        .collect();
    for r in env.broker.publish_batch(&envs).await {
        r.expect("publish");
    }
    envs.into_iter().map(|e| e.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_are_created_at_startup_with_the_configured_partitions() {
    let Some(env) = KafkaEnv::external("create", 3).await else {
        return;
    };
    // KafkaEnv::external connects with create_topics = true and creates nothing itself.
    for topic in [
        env.topic.clone(),
        format!("{}.retry", env.topic),
        format!("{}.dlq", env.topic),
    ] {
        let parts = env.committed(&topic).await;
        assert_eq!(parts.len(), 3, "{topic}: {parts:?}");
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_worker_processes_in_one_group_run_each_task_once() {
    let Some(env) = KafkaEnv::external("procs", 4).await else {
        return;
    };
    let cfg = env.write_config(
        "cronpipe.toml",
        &format!("[worker]\nconcurrency = 4\n{}", logged_task(&env, "0.05")),
    );
    let a = Proc::start(
        "worker",
        &cfg,
        &[("CRONPIPE__WORKER__INSTANCE_ID", "wa")],
        env.dir.path(),
        "wa",
    );
    let b = Proc::start(
        "worker",
        &cfg,
        &[("CRONPIPE__WORKER__INSTANCE_ID", "wb")],
        env.dir.path(),
        "wb",
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut ids = publish_jobs(&env, 40).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    ids.extend(publish_jobs(&env, 40).await);
    let done = || {
        events(&env)
            .into_iter()
            .filter(|e| e.0 == "done")
            .map(|e| e.1)
            .collect::<HashSet<_>>()
    };
    let expected: HashSet<String> = ids.iter().cloned().collect();
    assert!(
        wait_until(Duration::from_secs(60), || async { done() == expected }).await,
        "all 80 tasks finish\n--- wa ---\n{}\n--- wb ---\n{}",
        a.log_text(),
        b.log_text()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ev = events(&env);
    let mut starts: HashMap<&str, usize> = HashMap::new();
    let mut per_worker: HashMap<&str, usize> = HashMap::new();
    for (what, id, worker) in &ev {
        if what == "start" {
            *starts.entry(id).or_default() += 1;
            *per_worker.entry(worker).or_default() += 1;
        }
    }
    assert!(
        starts.values().all(|n| *n == 1),
        "a task ran twice: {starts:?}"
    );
    assert_eq!(starts.len(), 80);
    assert!(
        per_worker.len() == 2,
        "both processes got partitions: {per_worker:?}"
    );
    eprintln!("tasks per worker process: {per_worker:?}");
    for p in [&a, &b] {
        p.signal(Signal::SIGTERM);
    }
    drop((a, b));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_worker_leaves_exactly_its_unfinished_tasks_to_the_survivor() {
    let Some(env) = KafkaEnv::external("sigkill", 4).await else {
        return;
    };
    // Short claims, so the survivor need not wait long for the dead worker's.
    let cfg = env.write_config(
        "cronpipe.toml",
        &format!(
            "[worker]\nconcurrency = 2\nclaim_ttl = \"2s\"\n{}",
            logged_task(&env, "1")
        ),
    );
    let mut a = Proc::start(
        "worker",
        &cfg,
        &[("CRONPIPE__WORKER__INSTANCE_ID", "wa")],
        env.dir.path(),
        "wa",
    );
    let ids = publish_jobs(&env, 16).await;
    assert!(
        wait_until(Duration::from_secs(30), || async {
            events(&env).iter().filter(|e| e.0 == "done").count() >= 5
        })
        .await,
        "worker a makes progress\n{}",
        a.log_text()
    );
    a.signal(Signal::SIGKILL);
    assert!(a.wait_exit(Duration::from_secs(5)));
    // Exec children die with their worker (PR_SET_PDEATHSIG); let any last line land.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = events(&env);
    let done_by_a: HashSet<String> = before
        .iter()
        .filter(|e| e.0 == "done")
        .map(|e| e.1.clone())
        .collect();
    let unfinished: HashSet<String> = ids
        .iter()
        .filter(|id| !done_by_a.contains(*id))
        .cloned()
        .collect();
    assert!(!unfinished.is_empty(), "the kill left work unfinished");
    let b = Proc::start(
        "worker",
        &cfg,
        &[("CRONPIPE__WORKER__INSTANCE_ID", "wb")],
        env.dir.path(),
        "wb",
    );
    let all: HashSet<String> = ids.iter().cloned().collect();
    assert!(
        wait_until(Duration::from_secs(90), || async {
            let done: HashSet<String> = events(&env)
                .into_iter()
                .filter(|e| e.0 == "done")
                .map(|e| e.1)
                .collect();
            done == all
        })
        .await,
        "the survivor finishes the rest\n--- wb ---\n{}",
        b.log_text()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started_by_b: HashSet<String> = events(&env)
        .into_iter()
        .filter(|e| e.0 == "start" && e.2 == "wb")
        .map(|e| e.1)
        .collect();
    assert_eq!(
        started_by_b, unfinished,
        "the survivor runs exactly the unfinished tasks, nothing finished runs twice"
    );
    eprintln!(
        "done before the kill: {}, left to the survivor: {}",
        done_by_a.len(),
        unfinished.len()
    );
    b.signal(Signal::SIGTERM);
    drop(b);
    env.cleanup().await;
}
