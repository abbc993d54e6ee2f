//! Kafka tests with real `worker` processes: two in one consumer group, a
//! worker SIGKILLed with uncommitted messages, one whose slots stay busy long
//! enough for its partitions to be paused and resumed (also across a
//! rebalance that moves them away and back), and one whose group's
//! committed offset was deleted while it was down. They run against librdkafka's
//! mock cluster, which lives in this test process but listens on TCP, so the
//! workers reach it like any broker; with `CRONPIPE_TEST_KAFKA_BROKERS` set
//! (`scripts/kafka-broker` starts one), against that broker instead. Topic
//! creation through the AdminClient needs a real broker (the mock has no
//! CreateTopics): that test is ignored unless run with `--ignored` and the
//! variable set. The worker binaries must be built first (`cargo build
//! --workspace --bins`, as scripts/test does).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use cronpipe_shared::Envelope;
use cronpipe_tests::kafka::EXTERNAL_BROKERS_VAR;
use cronpipe_tests::{wait_until, Proc, TestEnv};
use nix::sys::signal::Signal;

/// A `job` exec task that runs `script` with `sh -c`; `$RUNS` names the
/// runs file.
fn job_task(env: &TestEnv, script: &str) -> String {
    format!(
        r#"
[task.job]
handler = "exec"
command = ["/bin/sh", "-c", {script:?}]
env = {{ RUNS = "{f}" }}
"#,
        f = env.runs_file().display()
    )
}

/// A `job` task that logs `start <id> <worker> <pid>`, sleeps `secs`, then
/// logs `done <id> <worker> <pid>`.
fn logged_task(env: &TestEnv, secs: &str) -> String {
    let line =
        |what: &str| format!("echo \"{what} $CRONPIPE_TASK_ID $CRONPIPE_WORKER $$\" >> \"$RUNS\"");
    job_task(
        env,
        &format!("{}; sleep {secs}; {}", line("start"), line("done")),
    )
}

/// A `job` task that appends its task id to the runs file.
fn recorded_job(env: &TestEnv) -> String {
    job_task(env, "echo \"$CRONPIPE_TASK_ID\" >> \"$RUNS\"")
}

/// One line of the runs file.
#[derive(Debug, Clone)]
struct Event {
    what: String,
    id: String,
    worker: String,
    pid: i32,
}

fn events(env: &TestEnv) -> Vec<Event> {
    env.runs()
        .iter()
        .filter_map(|l| {
            let mut it = l.split(' ');
            Some(Event {
                what: it.next()?.to_string(),
                id: it.next()?.to_string(),
                worker: it.next()?.to_string(),
                pid: it.next()?.parse().ok()?,
            })
        })
        .collect()
}

fn ids_where(ev: &[Event], pred: impl Fn(&Event) -> bool) -> HashSet<String> {
    ev.iter()
        .filter(|e| pred(e))
        .map(|e| e.id.clone())
        .collect()
}

/// The ids among `ids` whose outcome Redis holds as done.
async fn recorded_done(env: &TestEnv, ids: &[String]) -> HashSet<String> {
    let mut conn = env.store.connection();
    let mut out = HashSet::new();
    for id in ids {
        let state: Option<String> = redis::cmd("GET")
            .arg(env.store.keys().idem(id))
            .query_async(&mut conn)
            .await
            .expect("redis");
        if state.as_deref() == Some("done") {
            out.insert(id.clone());
        }
    }
    out
}

async fn publish_jobs(env: &TestEnv, n: usize) -> Vec<String> {
    let envs: Vec<Envelope> = (0..n)
        .map(|i| Envelope::new("job", serde_json::json!(i)))
        .collect();
    for r in env.broker.publish_batch(&envs).await {
        r.expect("publish");
    }
    envs.into_iter().map(|e| e.id).collect()
}

/// A config for one worker slot with a `slow` task (`sleep secs`) and the
/// recorded `job`; publishes one slow task, then `jobs` jobs (their ids).
async fn slow_task_then_jobs(
    env: &TestEnv,
    secs: u32,
    jobs: usize,
) -> (std::path::PathBuf, Vec<String>) {
    let cfg = env.write_config(
        "cronpipe.toml",
        &format!(
            r#"
[worker]
concurrency = 1
[task.slow]
handler = "exec"
command = ["/bin/sh", "-c", "sleep {secs}"]
{}"#,
            recorded_job(env)
        ),
    );
    env.broker
        .publish(&Envelope::new("slow", serde_json::json!(null)))
        .await
        .expect("publish");
    (cfg, publish_jobs(env, jobs).await)
}

/// How many partitions (of the work and retry topics) a worker process holds
/// now, from its "Kafka partitions assigned / revoked" log lines.
fn held_partitions(p: &Proc) -> usize {
    let mut held = 0;
    for line in p.log_text().lines() {
        if line.contains("Kafka partitions revoked") {
            held = 0;
        } else if line.contains("Kafka partitions assigned") {
            held = line
                .split("partitions=")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        }
    }
    held
}

/// Waits until the two worker processes split the group's partitions between them.
async fn wait_shared(env: &TestEnv, a: &Proc, b: &Proc) {
    // Each member holds some of the work and retry topics' partitions, none holds all.
    let total = 2 * env.partitions as usize;
    assert!(
        wait_until(Duration::from_secs(30), || async {
            let (x, y) = (held_partitions(a), held_partitions(b));
            x > 0 && y > 0 && x + y == total
        })
        .await,
        "the two workers never shared the partitions\n--- a ---\n{}\n--- b ---\n{}",
        a.log_text(),
        b.log_text()
    );
}

/// Whether process `pid` is gone (or a zombie awaiting its reaper).
fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs CRONPIPE_TEST_KAFKA_BROKERS (scripts/kafka-broker)"]
async fn topics_are_created_at_startup_with_the_configured_partitions() {
    let env = TestEnv::kafka_external("create", 3)
        .await
        .unwrap_or_else(|| panic!("set {EXTERNAL_BROKERS_VAR}=host:port to a Kafka broker"));
    // An external world connects with create_topics = true and creates nothing itself.
    for topic in [
        env.topic().to_string(),
        format!("{}.retry", env.topic()),
        format!("{}.dlq", env.topic()),
    ] {
        let parts = env.committed(&topic).await;
        assert_eq!(parts.len(), 3, "{topic}: {parts:?}");
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_worker_processes_in_one_group_run_each_task_once() {
    let env = TestEnv::kafka_external_or_mock("procs", 4).await;
    let cfg = env.write_config(
        "cronpipe.toml",
        &format!("[worker]\nconcurrency = 4\n{}", logged_task(&env, "0.05")),
    );
    let a = env.worker_process(&cfg, "wa");
    let b = env.worker_process(&cfg, "wb");
    wait_shared(&env, &a, &b).await;
    let mut ids = publish_jobs(&env, 40).await;
    ids.extend(publish_jobs(&env, 40).await);
    let expected: HashSet<String> = ids.iter().cloned().collect();
    assert!(
        wait_until(Duration::from_secs(60), || async {
            ids_where(&events(&env), |e| e.what == "done") == expected
        })
        .await,
        "all 80 tasks finish\n--- wa ---\n{}\n--- wb ---\n{}",
        a.log_text(),
        b.log_text()
    );
    // Both commit as they go. (Waited for before stopping: once one member
    // leaves, the mock cluster refuses the other's commits until the
    // rebalance completes, where Kafka accepts them.)
    let committed = || async {
        env.committed(env.topic())
            .await
            .iter()
            .filter_map(|(_, o)| *o)
            .sum::<i64>()
    };
    assert!(
        wait_until(Duration::from_secs(30), || async {
            committed().await == 80
        })
        .await,
        "every work offset committed while both run: {:?}",
        env.committed(env.topic()).await
    );
    // Stop both cleanly, then count: a task that ran twice shows.
    for p in [&a, &b] {
        p.signal(Signal::SIGTERM);
    }
    let (mut a, mut b) = (a, b);
    assert!(a.wait_exit(Duration::from_secs(30)) && b.wait_exit(Duration::from_secs(30)));
    let ev = events(&env);
    let mut starts: HashMap<&str, usize> = HashMap::new();
    let mut per_worker: HashMap<&str, usize> = HashMap::new();
    for e in ev.iter().filter(|e| e.what == "start") {
        *starts.entry(&e.id).or_default() += 1;
        *per_worker.entry(&e.worker).or_default() += 1;
    }
    assert!(
        starts.values().all(|n| *n == 1),
        "a task ran twice: {starts:?}"
    );
    assert_eq!(starts.len(), 80);
    assert!(
        per_worker.len() == 2,
        "both processes ran tasks: {per_worker:?}"
    );
    assert_eq!(committed().await, 80, "the clean stop moved no commit back");
    eprintln!("tasks per worker process: {per_worker:?}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_worker_leaves_exactly_its_unfinished_tasks_to_the_survivor() {
    let env = TestEnv::kafka_external_or_mock("sigkill", 4).await;
    // Short claims, so the survivor need not wait long for the dead worker's.
    let cfg = env.write_config(
        "cronpipe.toml",
        &format!(
            "[worker]\nconcurrency = 2\nclaim_ttl = \"2s\"\n{}",
            logged_task(&env, "1")
        ),
    );
    let mut a = env.worker_process(&cfg, "wa");
    let b = env.worker_process(&cfg, "wb");
    wait_shared(&env, &a, &b).await;
    let ids = publish_jobs(&env, 24).await;
    assert!(
        wait_until(Duration::from_secs(30), || async {
            let ev = events(&env);
            ev.iter()
                .filter(|e| e.what == "done" && e.worker == "wa")
                .count()
                >= 2
                && ev.iter().any(|e| e.worker == "wb")
        })
        .await,
        "both workers make progress\n--- wa ---\n{}\n--- wb ---\n{}",
        a.log_text(),
        b.log_text()
    );
    a.signal(Signal::SIGKILL);
    let killed_at = Instant::now();
    assert!(a.wait_exit(Duration::from_secs(5)));
    // Exec children die with their worker (PR_SET_PDEATHSIG): once a's
    // unfinished tasks are gone, nothing more of a's lands in the file.
    let ev = events(&env);
    let done_before = ids_where(&ev, |e| e.what == "done");
    let a_unfinished: Vec<i32> = ev
        .iter()
        .filter(|e| e.what == "start" && e.worker == "wa" && !done_before.contains(&e.id))
        .map(|e| e.pid)
        .collect();
    assert!(
        wait_until(Duration::from_secs(5), || async {
            a_unfinished.iter().all(|pid| process_gone(*pid))
        })
        .await,
        "tasks of the killed worker survived it: {a_unfinished:?}"
    );
    // Finished, for the system, means the outcome is recorded in Redis. A
    // task whose script printed "done" just before the kill while its worker
    // had not yet recorded it is unfinished and runs again: the at-least-once
    // window between a handler's end and its record. Read before the events,
    // so every task recorded here has its start among them.
    let recorded_at_kill = recorded_done(&env, &ids).await;
    let at_kill = events(&env);
    let n_at_kill = at_kill.len();
    let done_by_a = ids_where(&at_kill, |e| e.what == "done" && e.worker == "wa");
    let done_at_kill = ids_where(&at_kill, |e| e.what == "done");
    let started_by_b = ids_where(&at_kill, |e| e.what == "start" && e.worker == "wb");
    let all: HashSet<String> = ids.iter().cloned().collect();
    assert!(
        all.len() > done_at_kill.len() + started_by_b.len(),
        "the kill left work unfinished on a's side"
    );
    // The group notices the dead member when its session times out
    // (session.timeout.ms = 6000) and gives the survivor every partition.
    let total = 2 * env.partitions as usize;
    assert!(
        wait_until(Duration::from_secs(30), || async {
            held_partitions(&b) == total
        })
        .await,
        "the survivor never got the dead worker's partitions\n--- wb ---\n{}",
        b.log_text()
    );
    let rebalanced = killed_at.elapsed();
    assert!(
        wait_until(Duration::from_secs(90), || async {
            ids_where(&events(&env), |e| e.what == "done") == all
        })
        .await,
        "the survivor finishes the rest\n--- wb ---\n{}",
        b.log_text()
    );
    let took_over = killed_at.elapsed();
    let ev = events(&env);
    let after_kill = &ev[n_at_kill..];
    assert!(
        after_kill.iter().all(|e| e.worker == "wb"),
        "{after_kill:?}"
    );
    let started_after = ids_where(after_kill, |e| e.what == "start");
    // Every task was finished exactly once ...
    let mut dones: HashMap<&str, usize> = HashMap::new();
    for e in ev.iter().filter(|e| e.what == "done") {
        *dones.entry(&e.id).or_default() += 1;
    }
    // (a task of a's that printed "done" but was not recorded runs once more).
    let unrecorded_by_a: HashSet<String> =
        done_by_a.difference(&recorded_at_kill).cloned().collect();
    assert!(
        dones
            .iter()
            .all(|(id, n)| *n == 1 || (*n == 2 && unrecorded_by_a.contains(*id))),
        "finished twice: {dones:?} (done by a but not recorded at the kill: {unrecorded_by_a:?})"
    );
    // ... and the survivor started exactly what was neither recorded as
    // finished at the kill nor already running on it: a's unfinished and
    // unstarted tasks.
    let expected: HashSet<String> = all
        .iter()
        .filter(|id| !recorded_at_kill.contains(*id) && !started_by_b.contains(*id))
        .cloned()
        .collect();
    assert_eq!(
        started_after, expected,
        "the survivor runs exactly the unfinished tasks, nothing finished runs twice"
    );
    eprintln!(
        "done by a before the kill: {} ({} of them not yet recorded), left to the survivor: {}; it held every partition {rebalanced:?} and had all done {took_over:?} after the kill",
        done_by_a.len(),
        unrecorded_by_a.len(),
        expected.len()
    );
    b.signal(Signal::SIGTERM);
    drop(b);
    env.cleanup().await;
}

/// When every worker slot stays busy for 5 s while messages wait, the
/// consumer pauses its partitions (so it goes on polling, for rebalances and
/// `max.poll.interval.ms`) and resumes them once the backlog has drained.
/// Nothing is lost or run twice on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_busy_for_seconds_pauses_and_resumes_its_partitions_losing_nothing() {
    let env = TestEnv::kafka_external_or_mock("kafka-pause", 1).await;
    // The slow task takes the one slot; more jobs than the consumer keeps
    // waiting (256 at concurrency 1) queue up behind it on the one partition.
    let (cfg, ids) = slow_task_then_jobs(&env, 6, 400).await;
    let w = env.worker_process(&cfg, "wp");
    let all_ran = wait_until(Duration::from_secs(60), || async {
        env.runs().len() >= ids.len()
    })
    .await;
    let log = w.log_text();
    assert!(
        all_ran,
        "{} of {} jobs ran\n{log}",
        env.runs().len(),
        ids.len()
    );
    let ran = env.runs();
    assert_eq!(ran.len(), ids.len(), "a job ran twice");
    assert_eq!(
        ran.into_iter().collect::<HashSet<_>>(),
        ids.iter().cloned().collect::<HashSet<_>>()
    );
    assert!(log.contains("pausing the partitions"), "{log}");
    assert!(log.contains("resumed the paused partitions"), "{log}");
    drop(w);
    env.cleanup().await;
}

/// librdkafka keeps a pause on a partition through its revocation and a later
/// re-assignment. A worker whose partitions were paused for backpressure when
/// a second worker joined (its resume then found no partitions to resume)
/// gets partitions back after the rebalance, and when the second worker
/// leaves, and must fetch from all of them. Before the fix, none ran again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_paused_for_backpressure_runs_again_when_given_back_after_a_rebalance() {
    let env = TestEnv::kafka_external_or_mock("kafka-pause-moved", 2).await;
    // One slow task holds a's only slot while jobs pile up on both
    // partitions: after 5 s a pauses them all.
    let (cfg, mut ids) = slow_task_then_jobs(&env, 7, 1000).await;
    let a = env.worker_process(&cfg, "pa");
    assert!(
        wait_until(Duration::from_secs(30), || async {
            a.log_text().contains("pausing the partitions")
        })
        .await,
        "a never paused\n{}",
        a.log_text()
    );
    // b joins while a is paused; a drains its share and resumes what it
    // still holds; then b leaves and a gets b's partitions back.
    let mut b = env.worker_process(&cfg, "pb");
    wait_shared(&env, &a, &b).await;
    assert!(
        wait_until(Duration::from_secs(60), || async {
            a.log_text().contains("resumed the paused partitions")
        })
        .await,
        "a never resumed\n{}",
        a.log_text()
    );
    b.signal(Signal::SIGTERM);
    assert!(b.wait_exit(Duration::from_secs(40)), "b did not stop");
    let total = 2 * env.partitions as usize;
    assert!(
        wait_until(Duration::from_secs(30), || async {
            held_partitions(&a) == total
        })
        .await,
        "a never got every partition back\n{}",
        a.log_text()
    );
    // Jobs on both partitions now: a runs them all, the ones on the
    // partition it had paused before the handover included.
    ids.extend(publish_jobs(&env, 40).await);
    let all_ran = wait_until(Duration::from_secs(30), || async {
        env.runs().iter().collect::<HashSet<_>>().len() >= ids.len()
    })
    .await;
    let ran: HashSet<String> = env.runs().into_iter().collect();
    let missing: Vec<&String> = ids.iter().filter(|id| !ran.contains(*id)).collect();
    assert!(
        all_ran,
        "{} jobs never ran, e.g. {:?}\n--- a ---\n{}\n--- b ---\n{}",
        missing.len(),
        missing.iter().take(3).collect::<Vec<_>>(),
        a.log_text(),
        b.log_text()
    );
    assert_eq!(env.runs().len(), ids.len(), "a job ran twice");
    drop(a);
    env.cleanup().await;
}

/// The group's committed position deleted before the group read on from it
/// (retention; here the mock cluster's cap of 5 MiB per partition): the
/// worker says the skipped tasks are lost, with the offset, and goes on with
/// what is left.
#[tokio::test]
async fn a_committed_position_deleted_by_retention_is_reported_as_lost_tasks() {
    // Only the mock drops old messages on its own within a test's time.
    let env = TestEnv::kafka_mock("kafka-retention", 1).await;
    let cfg = env.write_config("cronpipe.toml", &recorded_job(&env));
    let first = publish_jobs(&env, 10).await;
    let w = env.worker_process(&cfg, "wr1");
    assert!(
        wait_until(Duration::from_secs(30), || async {
            env.runs().len() >= first.len()
        })
        .await,
        "{}",
        w.log_text()
    );
    let topic = env.topic().to_string();
    env.expect_committed(
        &topic,
        &[(0, Some(10))],
        Duration::from_secs(10),
        "the first ten committed",
    )
    .await;
    drop(w);

    // 7 MiB of jobs while no worker runs: the mock keeps the newest 5 MiB,
    // so offset 10, where the group would go on, is deleted.
    let big = "x".repeat(256 * 1024);
    let envs: Vec<Envelope> = (0..28)
        .map(|_| Envelope::new("job", serde_json::json!(big)))
        .collect();
    for r in env.broker.publish_batch(&envs).await {
        r.expect("publish");
    }
    let [(0, lo, hi)] = env.log_ranges(&topic).await[..] else {
        panic!("one partition expected");
    };
    assert!(lo > 10 && hi == 38, "log range {lo}..{hi}");
    let kept: HashSet<String> = envs[(lo - 10) as usize..]
        .iter()
        .map(|e| e.id.clone())
        .collect();

    let w = env.worker_process(&cfg, "wr2");
    let done = wait_until(Duration::from_secs(30), || async {
        env.runs().len() >= first.len() + kept.len()
    })
    .await;
    let log = w.log_text();
    assert!(done, "{} ran\n{log}", env.runs().len());
    let ran: HashSet<String> = env.runs().into_iter().skip(first.len()).collect();
    assert_eq!(ran, kept, "the tasks still on the broker run, once each");
    let reset = log
        .lines()
        .find(|l| l.contains("Kafka position lost"))
        .unwrap_or_else(|| panic!("no lost-position report:\n{log}"));
    assert!(reset.contains("offset 10"), "{reset}");
    assert!(reset.contains(&topic), "{reset}");
    drop(w);
    env.cleanup().await;
}
