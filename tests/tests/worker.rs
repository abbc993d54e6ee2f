//! Worker guarantees against real Redis and each broker (RabbitMQ, and
//! Kafka on librdkafka's mock cluster), one property per test, each written
//! once and run on both (`broker_test!`) except the RabbitMQ consumer-timeout
//! warning and the unwritable dead-letter queue:
//! duplicates run once, retries back off through the broker, permanent and
//! unusable messages are dead-lettered with their reason, crashes count as
//! attempts (a retry whose count in Redis expired still stops at
//! max_attempts), timeouts kill whole process groups, panics are contained,
//! shutdown drains or hands back, per-task limits hold, and the `http` and
//! example Rust handlers behave as documented.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod worker_support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cronpipe_shared::deadletter::DeadReason;
use cronpipe_shared::{Destination, Envelope};
use cronpipe_tests::{broker_test, wait_until, Proc, TestEnv};
use cronpipe_worker::{Registry, Settled, Task, TaskError};
use nix::sys::signal::Signal;
use serde_json::json;
use worker_support::{attempts, idem_state, process_gone, settled, start, wait_dead_letters};

const LONG: Duration = Duration::from_secs(30);

fn count(reports: &[cronpipe_worker::Report], s: Settled) -> usize {
    reports.iter().filter(|r| r.settled == s).count()
}

broker_test!(same_envelope_published_five_times_runs_once);
async fn same_envelope_published_five_times_runs_once(env: TestEnv) {
    let config = env.config("[worker]\nclaim_ttl = \"1s\"\n[task.once]\nhandler = \"rust\"\n");
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let registry = Registry::new().register("once", move |_t: Task| {
        let c = c.clone();
        async move {
            c.fetch_add(1, Ordering::SeqCst);
            // Long enough that some copies arrive while it runs (in progress, not done).
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok(())
        }
    });
    let mut w = start(&env, &config, "w-dup5", registry).await;
    let e = Envelope::new("once", json!({"n": 1}));
    for r in env.broker.publish_batch(&vec![e.clone(); 5]).await {
        r.expect("publish");
    }
    // Deferred copies come back later and end as duplicates.
    let reports = w
        .until(LONG, |r| {
            count(r, Settled::Success) + count(r, Settled::Duplicate) == 5
        })
        .await;
    w.shutdown().await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "ran once: {reports:?}");
    assert_eq!(count(&reports, Settled::Success), 1, "{reports:?}");
    assert_eq!(count(&reports, Settled::Duplicate), 4, "{reports:?}");
    assert!(reports
        .iter()
        .all(|r| r.id.as_deref() == Some(e.id.as_str())));
    assert_eq!(idem_state(&env, &e.id).await.as_deref(), Some("done"));
    assert!(
        env.drain(Destination::Work).await.is_empty(),
        "nothing left unacked"
    );
    assert!(env.drain_dead_letters().await.is_empty());
    env.cleanup().await;
}

broker_test!(failing_twice_then_succeeding_runs_three_times_with_growing_delays);
async fn failing_twice_then_succeeding_runs_three_times_with_growing_delays(env: TestEnv) {
    let config = env.config(
        "[task.flaky]\nhandler = \"rust\"\nretry = { max_attempts = 5, initial_delay = \"400ms\", multiplier = 2.0, jitter = 0.0 }\n",
    );
    let seen: Arc<Mutex<Vec<(u32, Instant)>>> = Arc::default();
    let s = seen.clone();
    let registry = Registry::new().register("flaky", move |t: Task| {
        let s = s.clone();
        async move {
            s.lock().unwrap().push((t.attempt, Instant::now()));
            if t.attempt < 3 {
                Err(TaskError::retryable(format!("flaky failure {}", t.attempt)))
            } else {
                Ok(())
            }
        }
    });
    let mut w = start(&env, &config, "w-retry3", registry).await;
    env.broker
        .publish(&Envelope::new("flaky", json!(null)))
        .await
        .expect("publish");
    let reports = w.until(LONG, |r| count(r, Settled::Success) == 1).await;
    w.shutdown().await;
    assert_eq!(
        settled(&reports),
        vec![
            (Settled::Retry, Some(1)),
            (Settled::Retry, Some(2)),
            (Settled::Success, Some(3))
        ]
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen.iter().map(|(a, _)| *a).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    let gap1 = seen[1].1 - seen[0].1;
    let gap2 = seen[2].1 - seen[1].1;
    eprintln!("retry delays: {gap1:?}, {gap2:?} (policy 400ms, 800ms)");
    let slack = Duration::from_millis(1500);
    assert!(
        gap1 >= Duration::from_millis(400) && gap1 < Duration::from_millis(400) + slack,
        "first delay {gap1:?}"
    );
    assert!(
        gap2 >= Duration::from_millis(800) && gap2 < Duration::from_millis(800) + slack,
        "second delay {gap2:?}"
    );
    assert!(gap2 > gap1, "delays grow: {gap1:?} then {gap2:?}");
    // Acked once: nothing left in the work queue / topic or among the
    // retry copies (delay tiers / retry topic), no dead letter.
    assert!(env.drain(Destination::Work).await.is_empty());
    assert!(env.drain_retry_copies(&[400, 800]).await.is_empty());
    assert!(env.drain_dead_letters().await.is_empty());
    env.cleanup().await;
}

broker_test!(a_retry_whose_attempt_count_expired_still_stops_at_max_attempts);
/// The attempt count in Redis lives for `done_ttl`; a retry copy that waits
/// longer (a long `Retry-After`, say) finds it gone. Here the handler
/// deletes it to stand for that expiry: the retry copy's own attempt number
/// still counts, so the task is dead-lettered at max_attempts instead of
/// starting over at attempt 1 forever.
async fn a_retry_whose_attempt_count_expired_still_stops_at_max_attempts(env: TestEnv) {
    let config = env.config(
        "[task.flaky]\nhandler = \"rust\"\nretry = { max_attempts = 2, initial_delay = \"100ms\", jitter = 0.0 }\n",
    );
    let store = env.store.clone();
    let registry = Registry::new().register("flaky", move |t: Task| {
        let store = store.clone();
        async move {
            let mut c = store.connection();
            let _: i64 = redis::cmd("DEL")
                .arg(store.keys().attempts(t.envelope.key()))
                .query_async(&mut c)
                .await
                .expect("redis");
            Err(TaskError::retryable(format!("failure {}", t.attempt)))
        }
    });
    let mut w = start(&env, &config, "w-expired", registry).await;
    env.broker
        .publish(&Envelope::new("flaky", json!(null)))
        .await
        .expect("publish");
    let reports = w
        .until(LONG, |r| {
            count(r, Settled::DeadLetter) == 1 || count(r, Settled::Retry) > 3
        })
        .await;
    w.shutdown().await;
    assert_eq!(
        settled(&reports),
        vec![(Settled::Retry, Some(1)), (Settled::DeadLetter, Some(2))]
    );
    let dead = wait_dead_letters(&env, 1, LONG).await;
    assert_eq!(
        (dead[0].reason, dead[0].attempts),
        (DeadReason::MaxAttempts, 2)
    );
    env.cleanup().await;
}

broker_test!(a_handler_that_completes_when_cancelled_at_its_timeout_counts_as_success);
/// At its timeout a task is told to stop (`Task::cancel`) and given 5 s; a
/// handler that answers with success finished its work, so no retry runs it
/// again. One that stops with an error, or not at all, is retried.
async fn a_handler_that_completes_when_cancelled_at_its_timeout_counts_as_success(env: TestEnv) {
    let config = env.config(
        "[task.commit]\nhandler = \"rust\"\ntimeout = \"300ms\"\nretry = { max_attempts = 2, initial_delay = \"100ms\" }\n\n[task.stuck]\nhandler = \"rust\"\ntimeout = \"300ms\"\nretry = { max_attempts = 2, initial_delay = \"100ms\" }\n",
    );
    let registry = Registry::new()
        .register("commit", |t: Task| async move {
            t.cancel.cancelled().await;
            Ok(())
        })
        .register("stuck", |t: Task| async move {
            t.cancel.cancelled().await;
            Err(TaskError::retryable("stopped"))
        });
    let mut w = start(&env, &config, "w-late", registry).await;
    let commit = Envelope::new("commit", json!(null));
    let stuck = Envelope::new("stuck", json!(null));
    env.broker.publish(&commit).await.expect("publish");
    env.broker.publish(&stuck).await.expect("publish");
    let reports = w
        .until(LONG, |r| {
            count(r, Settled::Success) + count(r, Settled::DeadLetter) == 2
        })
        .await;
    w.shutdown().await;
    let of = |id: &str| {
        reports
            .iter()
            .filter(|r| r.id.as_deref() == Some(id))
            .map(|r| (r.settled, r.attempt))
            .collect::<Vec<_>>()
    };
    assert_eq!(of(&commit.id), vec![(Settled::Success, Some(1))]);
    assert_eq!(
        of(&stuck.id),
        vec![(Settled::Retry, Some(1)), (Settled::DeadLetter, Some(2))]
    );
    env.cleanup().await;
}

broker_test!(permanent_error_goes_to_the_dead_letter_queue_at_once_with_its_reason);
async fn permanent_error_goes_to_the_dead_letter_queue_at_once_with_its_reason(env: TestEnv) {
    let config = env.config("[task.bill]\nhandler = \"rust\"\nretry = { max_attempts = 5 }\n");
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let registry = Registry::new().register("bill", move |_t: Task| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Err(TaskError::permanent("invoice 42 does not exist")) }
    });
    let mut w = start(&env, &config, "w-perm", registry).await;
    let e = Envelope::new("bill", json!({"invoice": 42}));
    env.broker.publish(&e).await.expect("publish");
    let r = w.next(LONG).await;
    assert_eq!((r.settled, r.attempt), (Settled::DeadLetter, Some(1)));
    w.shutdown().await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "no retry after a permanent error"
    );
    let dead = wait_dead_letters(&env, 1, LONG).await;
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(d.reason, DeadReason::PermanentError);
    assert_eq!(d.error, "invoice 42 does not exist");
    assert_eq!(d.attempts, 1);
    assert_eq!(d.worker, "w-perm");
    assert_eq!(
        d.envelope.as_ref().map(|x| x.id.as_str()),
        Some(e.id.as_str())
    );
    assert_eq!(idem_state(&env, &e.id).await.as_deref(), Some("dead"));
    env.cleanup().await;
}

broker_test!(unusable_messages_are_dead_lettered_with_their_reasons);
async fn unusable_messages_are_dead_lettered_with_their_reasons(env: TestEnv) {
    let config = env.config("[worker]\nmax_message_bytes = 2048\n[task.ok]\nhandler = \"rust\"\n");
    let registry = Registry::new().register("ok", |_t: Task| async { Ok::<(), TaskError>(()) });
    let mut w = start(&env, &config, "w-poison", registry).await;
    let unknown = Envelope::new("nobody-handles-this", json!(null));
    let big = Envelope::new("ok", json!({"blob": "x".repeat(4096)}));
    let bodies = vec![
        b"{not json".to_vec(),
        br#"{"v":2,"id":"a","task":"ok","created_at":"2026-01-01T00:00:00Z"}"#.to_vec(),
        br#"{"v":1,"id":"b","created_at":"2026-01-01T00:00:00Z"}"#.to_vec(),
        unknown.to_json(),
        big.to_json(),
    ];
    env.publish_raw(&bodies).await;
    // A good message after the bad ones still runs: nothing crashed or looped.
    let good = Envelope::new("ok", json!(null));
    env.broker.publish(&good).await.expect("publish");
    let reports = w.until(LONG, |r| r.len() >= 6).await;
    assert_eq!(count(&reports, Settled::DeadLetter), 5, "{reports:?}");
    assert!(
        reports
            .iter()
            .any(|r| (r.settled, r.id.as_deref()) == (Settled::Success, Some(good.id.as_str()))),
        "{reports:?}"
    );
    let dead = wait_dead_letters(&env, 5, LONG).await;
    w.shutdown().await;
    let by_reason: HashMap<&str, &cronpipe_shared::deadletter::DeadLetter> =
        dead.iter().map(|d| (d.reason.as_str(), d)).collect();
    assert_eq!(dead.len(), 5);
    let json = by_reason[DeadReason::InvalidJson.as_str()];
    assert_eq!(json.raw.as_deref(), Some("{not json"));
    assert!(json.error.contains("not valid JSON"), "{}", json.error);
    let version = by_reason[DeadReason::UnsupportedVersion.as_str()];
    assert!(version.error.contains("version 2"), "{}", version.error);
    assert!(by_reason[DeadReason::InvalidEnvelope.as_str()]
        .error
        .contains("task"));
    let unknown_dl = by_reason[DeadReason::UnknownTask.as_str()];
    assert_eq!(
        unknown_dl.envelope.as_ref().map(|e| e.id.as_str()),
        Some(unknown.id.as_str())
    );
    assert!(
        unknown_dl.error.contains("nobody-handles-this"),
        "{}",
        unknown_dl.error
    );
    let too_large = by_reason[DeadReason::TooLarge.as_str()];
    assert!(
        too_large.error.contains("max_message_bytes = 2048"),
        "{}",
        too_large.error
    );
    assert!(too_large.raw.as_ref().is_some_and(|r| r.contains(&big.id)));
    // Nothing left to loop on.
    assert!(env.drain(Destination::Work).await.is_empty());
    env.cleanup().await;
}

broker_test!(panicking_rust_handler_counts_as_failed_attempts_and_the_worker_keeps_going);
async fn panicking_rust_handler_counts_as_failed_attempts_and_the_worker_keeps_going(env: TestEnv) {
    let config = env.config(
        "[task.boom]\nhandler = \"rust\"\nretry = { max_attempts = 2, initial_delay = \"50ms\" }\n[task.fine]\nhandler = \"rust\"\n",
    );
    let fine_runs = Arc::new(AtomicUsize::new(0));
    let f = fine_runs.clone();
    let registry = Registry::new()
        .register("boom", |t: Task| async move {
            if t.attempt > 0 {
                panic!("boom on attempt {}", t.attempt);
            }
            Ok(())
        })
        .register("fine", move |_t: Task| {
            f.fetch_add(1, Ordering::SeqCst);
            async { Ok::<(), TaskError>(()) }
        });
    let mut w = start(&env, &config, "w-panic", registry).await;
    let boom = Envelope::new("boom", json!(null));
    env.broker.publish(&boom).await.expect("publish");
    let first = w.next(LONG).await;
    assert_eq!((first.settled, first.attempt), (Settled::Retry, Some(1)));
    // The worker still takes and runs other work after the panic.
    let fines: Vec<Envelope> = (0..3).map(|_| Envelope::new("fine", json!(null))).collect();
    for r in env.broker.publish_batch(&fines).await {
        r.expect("publish");
    }
    let rest = w
        .until(LONG, |r| {
            count(r, Settled::Success) == 3 && count(r, Settled::DeadLetter) == 1
        })
        .await;
    w.shutdown().await;
    assert_eq!(fine_runs.load(Ordering::SeqCst), 3, "{rest:?}");
    let dead = wait_dead_letters(&env, 1, LONG).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, DeadReason::MaxAttempts);
    assert_eq!(dead[0].attempts, 2);
    assert!(
        dead[0]
            .error
            .contains("handler panicked: boom on attempt 2"),
        "{}",
        dead[0].error
    );
    assert_eq!(attempts(&env, &boom.id).await, 2);
    env.cleanup().await;
}

broker_test!(
    sigkilled_worker_task_is_completed_by_another_worker_exactly_once_after_the_claim_expires
);
async fn sigkilled_worker_task_is_completed_by_another_worker_exactly_once_after_the_claim_expires(
    env: TestEnv,
) {
    let dir = env.dir.path().display().to_string();
    let cfg = env.write_config(
        "cronpipe.toml",
        &format!(
            r#"
[worker]
claim_ttl = "2s"
[task.slow]
handler = "exec"
command = ["/bin/sh", "-c", "echo \"start $CRONPIPE_ATTEMPT $CRONPIPE_WORKER\" >> {dir}/runs; echo $$ > {dir}/pid.$CRONPIPE_ATTEMPT; while [ ! -f {dir}/go ]; do sleep 0.05; done; echo \"done $CRONPIPE_ATTEMPT $CRONPIPE_WORKER\" >> {dir}/runs"]
"#
        ),
    );
    let runs = || std::fs::read_to_string(env.dir.path().join("runs")).unwrap_or_default();
    let mut a = env.worker_process(&cfg, "wa");
    let e = Envelope::new("slow", json!(null));
    env.broker.publish(&e).await.expect("publish");
    let started = wait_until(LONG, || async { runs().contains("start 1 wa") }).await;
    assert!(started, "worker a started the task\n{}", a.log_text());
    let pid1: i32 = wait_pid(&env, 1).await;
    a.signal(Signal::SIGKILL);
    let killed_at = Instant::now();
    assert!(a.wait_exit(Duration::from_secs(5)));
    // The orphaned task must not go on running beside the retry.
    assert!(
        wait_until(Duration::from_secs(5), || async { process_gone(pid1) }).await,
        "the task of the killed worker survived it (pid {pid1})"
    );
    let b = env.worker_process(&cfg, "wb");
    assert!(
        wait_until(LONG, || async { runs().contains("start 2 wb") }).await,
        "worker b took the task over\n{}",
        b.log_text()
    );
    let takeover = killed_at.elapsed();
    std::fs::write(env.dir.path().join("go"), "").unwrap();
    assert!(
        wait_until(LONG, || async {
            idem_state(&env, &e.id).await.as_deref() == Some("done")
        })
        .await,
        "{}",
        b.log_text()
    );
    drop(b);
    let text = runs();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        vec!["start 1 wa", "start 2 wb", "done 2 wb"],
        "completed exactly once"
    );
    assert_eq!(
        attempts(&env, &e.id).await,
        2,
        "the crash counted as an attempt"
    );
    // The claim of the dead worker had to expire first (2 s lease renewed every ~0.7 s).
    assert!(
        takeover >= Duration::from_millis(1200),
        "taken over after {takeover:?}"
    );
    eprintln!("takeover after SIGKILL: {takeover:?}");
    env.cleanup().await;
}

async fn wait_pid(env: &TestEnv, attempt: u32) -> i32 {
    let path = env.dir.path().join(format!("pid.{attempt}"));
    let mut pid = 0;
    let ok = wait_until(LONG, || {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        pid = text.trim().parse().unwrap_or(0);
        let found = pid > 0;
        async move { found }
    })
    .await;
    assert!(ok, "no pid file for attempt {attempt}");
    pid
}

broker_test!(task_that_kills_its_worker_every_time_is_dead_lettered_after_max_attempts);
async fn task_that_kills_its_worker_every_time_is_dead_lettered_after_max_attempts(env: TestEnv) {
    let dir = env.dir.path().display().to_string();
    let cfg = env.write_config(
        "cronpipe.toml",
        &format!(
            r#"
[worker]
claim_ttl = "1s"
[task.killer]
handler = "exec"
command = ["/bin/sh", "-c", "echo \"$CRONPIPE_ATTEMPT\" >> {dir}/runs; kill -KILL $(cut -d' ' -f4 /proc/$PPID/stat); sleep 5"]
retry = {{ max_attempts = 3, initial_delay = "50ms" }}
"#
        ),
    );
    // The program's parent is the exec guard; the worker is the guard's parent
    // (field 4 of /proc/<pid>/stat).
    let e = Envelope::new("killer", json!(null));
    env.broker.publish(&e).await.expect("publish");
    let mut crashes = 0;
    let mut dead = Vec::new();
    // Start workers one after another until the message is dead-lettered.
    for round in 0..6 {
        let mut w = Proc::start("worker", &cfg, &[], env.dir.path(), &format!("w{round}"));
        let end = Instant::now() + LONG;
        loop {
            if matches!(w.child.try_wait(), Ok(Some(_))) {
                break;
            }
            dead.extend(env.drain_dead_letters().await);
            if !dead.is_empty() || Instant::now() >= end {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if matches!(w.child.try_wait(), Ok(Some(_))) {
            assert!(
                dead.is_empty(),
                "worker {round} crashed after dead-lettering"
            );
            crashes += 1;
            continue;
        }
        assert!(
            !dead.is_empty(),
            "worker {round} neither crashed nor dead-lettered\n{}",
            w.log_text()
        );
        assert!(
            !w.wait_exit(Duration::from_millis(100)),
            "the worker that dead-lettered stays up"
        );
        break;
    }
    let runs = std::fs::read_to_string(env.dir.path().join("runs")).unwrap_or_default();
    assert_eq!(
        runs.lines().collect::<Vec<_>>(),
        vec!["1", "2", "3"],
        "three attempts, each crashed its worker"
    );
    assert_eq!(crashes, 3);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, DeadReason::MaxAttempts);
    assert_eq!(dead[0].attempts, 3);
    assert!(
        dead[0].error.contains("exceeds max_attempts = 3"),
        "{}",
        dead[0].error
    );
    assert_eq!(idem_state(&env, &e.id).await.as_deref(), Some("dead"));
    env.cleanup().await;
}

broker_test!(exec_guard_kills_the_whole_task_with_a_sigkilled_worker_and_passes_exit_statuses_on);
async fn exec_guard_kills_the_whole_task_with_a_sigkilled_worker_and_passes_exit_statuses_on(
    env: TestEnv,
) {
    let dir = env.dir.path().display().to_string();
    let cfg = env.write_config(
        "cronpipe.toml",
        &format!(
            r#"
[task.spawner]
handler = "exec"
command = ["/bin/sh", "-c", "sleep 1000 & echo $! > {dir}/pid.$CRONPIPE_ATTEMPT; wait"]
[task.exit3]
handler = "exec"
command = ["/bin/sh", "-c", "echo about to fail; exit 3"]
permanent_exit_codes = [3]
[task.missing]
handler = "exec"
command = ["{dir}/no-such-program"]
[task.exit127]
handler = "exec"
command = ["/bin/sh", "-c", "exit 127"]
permanent_exit_codes = [127]
[task.hang]
handler = "exec"
timeout = "1s"
command = ["/bin/sh", "-c", "sleep 1000 & echo $! > {dir}/hang.pid; wait"]
retry = {{ max_attempts = 1 }}
"#
        ),
    );
    let mut a = env.worker_process(&cfg, "wa");
    // Through the guard (the `worker` binary runs exec tasks under one), an
    // exit code and a program that cannot start are reported as without it.
    // A timeout kills the whole group, the guard's included.
    // The program's own exit code 127 (the guard's code for "cannot start")
    // is the program's, and `permanent_exit_codes` holds for it.
    for task in ["exit3", "missing", "exit127", "hang"] {
        env.broker
            .publish(&Envelope::new(task, json!(null)))
            .await
            .expect("publish");
    }
    let dead: HashMap<String, _> = wait_dead_letters(&env, 4, LONG)
        .await
        .into_iter()
        .map(|d| (d.envelope.as_ref().unwrap().task.clone(), d))
        .collect();
    let hang = &dead["hang"];
    assert!(hang.error.contains("timed out after 1s"), "{}", hang.error);
    let hung: i32 = std::fs::read_to_string(env.dir.path().join("hang.pid"))
        .expect("the hang task wrote its child's pid")
        .trim()
        .parse()
        .expect("a pid");
    assert!(
        wait_until(Duration::from_secs(5), || async { process_gone(hung) }).await,
        "the timed-out task's child {hung} survived"
    );
    let exit3 = &dead["exit3"];
    assert_eq!(exit3.reason, DeadReason::PermanentError);
    assert_eq!(exit3.exit_code, Some(3), "{exit3:?}");
    assert!(
        exit3.error.contains("exited with code 3"),
        "{}",
        exit3.error
    );
    assert_eq!(exit3.output_tail, "about to fail\n");
    let exit127 = &dead["exit127"];
    assert_eq!(exit127.reason, DeadReason::PermanentError, "{exit127:?}");
    assert_eq!(exit127.exit_code, Some(127), "{exit127:?}");
    assert!(
        exit127.error.contains("exited with code 127"),
        "{}",
        exit127.error
    );
    let missing = &dead["missing"];
    assert_eq!(missing.reason, DeadReason::PermanentError);
    assert!(
        missing.error.contains(&format!(
            "cannot start `{dir}/no-such-program`: No such file"
        )),
        "{}",
        missing.error
    );
    // A task whose program started a child of its own: the worker dies, and
    // the child must die too, not run on beside the retry.
    env.broker
        .publish(&Envelope::new("spawner", json!(null)))
        .await
        .expect("publish");
    let grandchild = wait_pid(&env, 1).await;
    a.signal(Signal::SIGKILL);
    assert!(a.wait_exit(Duration::from_secs(5)));
    let gone = wait_until(Duration::from_secs(5), || async {
        process_gone(grandchild)
    })
    .await;
    if !gone {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(grandchild), Signal::SIGKILL);
    }
    assert!(
        gone,
        "the task's child {grandchild} survived the SIGKILLed worker\n{}",
        a.log_text()
    );
    env.cleanup().await;
}

broker_test!(exec_task_past_its_timeout_is_killed_with_its_children_and_retried);
async fn exec_task_past_its_timeout_is_killed_with_its_children_and_retried(env: TestEnv) {
    let dir = env.dir.path().display().to_string();
    let config = env.config(&format!(
        r#"
[task.hang]
handler = "exec"
timeout = "1s"
command = ["/bin/sh", "-c", "sleep 1000 & echo $! > {dir}/pid.$CRONPIPE_ATTEMPT; echo started; wait"]
retry = {{ max_attempts = 2, initial_delay = "100ms" }}
"#
    ));
    let mut w = start(&env, &config, "w-timeout", Registry::new()).await;
    let t0 = Instant::now();
    env.broker
        .publish(&Envelope::new("hang", json!(null)))
        .await
        .expect("publish");
    let reports = w.until(LONG, |r| count(r, Settled::DeadLetter) == 1).await;
    let elapsed = t0.elapsed();
    w.shutdown().await;
    assert_eq!(
        settled(&reports),
        vec![(Settled::Retry, Some(1)), (Settled::DeadLetter, Some(2))]
    );
    assert!(
        elapsed < Duration::from_secs(10),
        "timeouts enforced: {elapsed:?}"
    );
    for attempt in [1, 2] {
        let pid = wait_pid(&env, attempt).await;
        assert!(
            wait_until(Duration::from_secs(5), || async { process_gone(pid) }).await,
            "grandchild {pid} of attempt {attempt} survived the timeout"
        );
    }
    let dead = wait_dead_letters(&env, 1, LONG).await;
    assert_eq!(dead[0].reason, DeadReason::MaxAttempts);
    assert!(
        dead[0].error.contains("timed out after 1s"),
        "{}",
        dead[0].error
    );
    env.cleanup().await;
}

broker_test!(exec_task_that_exits_does_not_wait_for_the_children_it_left_and_they_are_killed);
async fn exec_task_that_exits_does_not_wait_for_the_children_it_left_and_they_are_killed(
    env: TestEnv,
) {
    let dir = env.dir.path().display().to_string();
    let config = env.config(&format!(
        "[task.leave]\nhandler = \"exec\"\ntimeout = \"20s\"\ncommand = [\"/bin/sh\", \"-c\", \"sleep 1000 & echo $! > {dir}/pid.$CRONPIPE_ATTEMPT; echo bye\"]\n"
    ));
    let mut w = start(&env, &config, "w-orphan", Registry::new()).await;
    let t0 = Instant::now();
    env.broker
        .publish(&Envelope::new("leave", json!(null)))
        .await
        .expect("publish");
    let r = w.next(LONG).await;
    let elapsed = t0.elapsed();
    w.shutdown().await;
    assert_eq!(r.settled, Settled::Success);
    assert!(
        elapsed < Duration::from_secs(5),
        "did not wait for the background child: {elapsed:?}"
    );
    let pid = wait_pid(&env, 1).await;
    assert!(
        wait_until(Duration::from_secs(5), || async { process_gone(pid) }).await,
        "background child {pid} survived"
    );
    env.cleanup().await;
}

broker_test!(graceful_shutdown_lets_an_in_flight_task_finish_within_the_grace_period);
async fn graceful_shutdown_lets_an_in_flight_task_finish_within_the_grace_period(env: TestEnv) {
    let config =
        env.config("[worker]\nshutdown_grace = \"20s\"\n[task.work]\nhandler = \"rust\"\n");
    let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel();
    let release = Arc::new(tokio::sync::Notify::new());
    let rel = release.clone();
    let registry = Registry::new().register("work", move |t: Task| {
        let started = started_tx.clone();
        let rel = rel.clone();
        async move {
            let _ = started.send(t.envelope.id.clone());
            rel.notified().await;
            Ok(())
        }
    });
    let mut w = start(&env, &config, "w-grace", registry).await;
    let e = Envelope::new("work", json!(null));
    env.broker.publish(&e).await.expect("publish");
    tokio::time::timeout(LONG, started_rx.recv())
        .await
        .expect("task started");
    w.stop.cancel();
    // Stopped taking deliveries: a message published now stays queued.
    let later = Envelope::new("work", json!("later"));
    env.broker.publish(&later).await.expect("publish");
    tokio::time::sleep(Duration::from_millis(300)).await; // the task is still running here
    assert!(!w.handle.is_finished(), "run waits for the in-flight task");
    release.notify_one();
    let r = w.next(LONG).await;
    assert_eq!(
        (r.settled, r.id.as_deref()),
        (Settled::Success, Some(e.id.as_str()))
    );
    tokio::time::timeout(LONG, &mut w.handle)
        .await
        .expect("stops after the task")
        .expect("join")
        .expect("run");
    assert_eq!(idem_state(&env, &e.id).await.as_deref(), Some("done"));
    let left = env.drain_envelopes().await;
    assert_eq!(
        left.iter().map(|x| x.id.clone()).collect::<Vec<_>>(),
        vec![later.id.clone()]
    );
    env.cleanup().await;
}

broker_test!(past_the_grace_period_the_claim_is_released_and_another_worker_takes_the_task_at_once);
async fn past_the_grace_period_the_claim_is_released_and_another_worker_takes_the_task_at_once(
    env: TestEnv,
) {
    let config = env.config(
        "[worker]\nshutdown_grace = \"500ms\"\nclaim_ttl = \"60s\"\n[task.stubborn]\nhandler = \"rust\"\n",
    );
    let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel();
    let handler = move |t: Task| {
        let started = started_tx.clone();
        async move {
            let _ = started.send(t.attempt);
            if t.attempt == 1 {
                // Outlives the grace period; stops only when told to.
                t.cancel.cancelled().await;
                return Err(TaskError::retryable("interrupted"));
            }
            Ok(())
        }
    };
    let mut a = start(
        &env,
        &config,
        "w-a",
        Registry::new().register("stubborn", handler.clone()),
    )
    .await;
    let e = Envelope::new("stubborn", json!(null));
    env.broker.publish(&e).await.expect("publish");
    assert_eq!(
        tokio::time::timeout(LONG, started_rx.recv())
            .await
            .expect("started"),
        Some(1)
    );
    let t0 = Instant::now();
    a.stop.cancel();
    let r = a.next(LONG).await;
    assert_eq!(r.settled, Settled::Returned);
    tokio::time::timeout(LONG, &mut a.handle)
        .await
        .expect("a stops")
        .expect("join")
        .expect("run");
    let stop_took = t0.elapsed();
    assert!(
        stop_took < Duration::from_secs(8),
        "stopped after grace: {stop_took:?}"
    );
    assert_eq!(idem_state(&env, &e.id).await, None, "claim released");
    let t1 = Instant::now();
    let mut b = start(
        &env,
        &config,
        "w-b",
        Registry::new().register("stubborn", handler),
    )
    .await;
    let r = b.next(LONG).await;
    let took = t1.elapsed();
    b.shutdown().await;
    assert_eq!(
        (r.settled, r.attempt),
        (Settled::Success, Some(2)),
        "taken at once, not deferred"
    );
    assert!(
        took < Duration::from_secs(10),
        "far below the 60 s claim TTL: {took:?}"
    );
    eprintln!(
        "shutdown past grace took {stop_took:?}; the other worker finished it {took:?} later"
    );
    env.cleanup().await;
}

broker_test!(per_task_concurrency_bounds_parallel_runs_without_starving_other_tasks);
async fn per_task_concurrency_bounds_parallel_runs_without_starving_other_tasks(env: TestEnv) {
    let config = env.config(
        "[worker]\nconcurrency = 8\n[task.limited]\nhandler = \"rust\"\nconcurrency = 2\n[task.free]\nhandler = \"rust\"\n",
    );
    let now = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let limited_runs: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let (n, p, runs) = (now.clone(), peak.clone(), limited_runs.clone());
    let registry = Registry::new()
        .register("limited", move |t: Task| {
            let (n, p, runs) = (n.clone(), p.clone(), runs.clone());
            async move {
                let cur = n.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(cur, Ordering::SeqCst);
                *runs
                    .lock()
                    .unwrap()
                    .entry(t.envelope.id.clone())
                    .or_default() += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
                n.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .register("free", |_t: Task| async { Ok::<(), TaskError>(()) });
    let mut w = start(&env, &config, "w-limit", registry).await;
    let limited: Vec<Envelope> = (0..12)
        .map(|i| Envelope::new("limited", json!(i)))
        .collect();
    let free: Vec<Envelope> = (0..12).map(|i| Envelope::new("free", json!(i))).collect();
    for r in env.broker.publish_batch(&limited).await {
        r.expect("publish");
    }
    for r in env.broker.publish_batch(&free).await {
        r.expect("publish");
    }
    let reports = w
        .until(Duration::from_secs(60), |r| {
            count(r, Settled::Success) == 24
        })
        .await;
    w.shutdown().await;
    assert_eq!(
        peak.load(Ordering::SeqCst),
        2,
        "limited task ran at most (and at best) 2 at once"
    );
    let runs = limited_runs.lock().unwrap().clone();
    assert_eq!(runs.len(), 12);
    assert!(runs.values().all(|n| *n == 1), "{runs:?}");
    // The free tasks, queued behind 12 limited ones, were not held up by them:
    // all finished before the limited backlog (≥ 6 rounds of 250 ms) drained.
    let successes: Vec<&cronpipe_worker::Report> = reports
        .iter()
        .filter(|r| r.settled == Settled::Success)
        .collect();
    let last_free = successes
        .iter()
        .rposition(|r| r.task.as_deref() == Some("free"))
        .unwrap();
    let last_limited = successes
        .iter()
        .rposition(|r| r.task.as_deref() == Some("limited"))
        .unwrap();
    assert!(
        last_free < last_limited,
        "free tasks finished first: {reports:?}"
    );
    env.cleanup().await;
}

broker_test!(example_custom_handler_succeeds_retries_and_dead_letters);
async fn example_custom_handler_succeeds_retries_and_dead_letters(env: TestEnv) {
    use cronpipe_worker::examples_support::{self, Greetings};
    // The same task section as worker/examples/custom_handler.toml.
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../worker/examples/custom_handler.toml"
    ))
    .unwrap();
    let task_section = &example[example
        .find("[task.greet]")
        .expect("example config has [task.greet]")..];
    let config =
        env.config(&task_section.replace("initial_delay = \"1s\"", "initial_delay = \"50ms\""));
    let greetings = Greetings::default();
    let registry = examples_support::register(Registry::new(), greetings.clone());
    let mut w = start(&env, &config, "w-example", registry).await;
    let ada = Envelope::new("greet", json!({"name": "Ada"}));
    let bob = Envelope::new("greet", json!({"name": "Bob", "fail_before_attempt": 2}));
    let nobody = Envelope::new("greet", json!({}));
    for e in [&ada, &bob, &nobody] {
        env.broker.publish(e).await.expect("publish");
    }
    let reports = w
        .until(LONG, |r| {
            count(r, Settled::Success) == 2 && count(r, Settled::DeadLetter) == 1
        })
        .await;
    w.shutdown().await;
    assert_eq!(count(&reports, Settled::Retry), 1, "{reports:?}");
    let mut got = greetings.list();
    got.sort();
    assert_eq!(got, vec!["Hello, Ada!", "Hello, Bob!"]);
    let dead = wait_dead_letters(&env, 1, LONG).await;
    assert_eq!(dead[0].reason, DeadReason::PermanentError);
    assert_eq!(
        dead[0].envelope.as_ref().map(|e| e.id.as_str()),
        Some(nobody.id.as_str())
    );
    assert!(dead[0].error.contains("no `name`"), "{}", dead[0].error);
    env.cleanup().await;
}

/// A dead-letter queue that refuses the record (deleted here, so the dead
/// letter comes back unroutable) must not make the message spin: the broker
/// hands a returned message out again at once, so the worker waits 500 ms,
/// then 1 s, 2 s, … before returning it. Once the queue is back, the dead
/// letter is written, once. (RabbitMQ only: the wait is broker-independent
/// code, and the mock Kafka cluster cannot refuse one topic's writes quickly.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_dead_letter_queue_returns_the_message_with_growing_waits_and_loses_nothing()
{
    let env = TestEnv::new("dlq-refused").await;
    let config = env.config("[task.known]\nhandler = \"rust\"\n");
    let registry = Registry::new().register("known", |_t: Task| async { Ok(()) });
    let mut w = start(&env, &config, "w-dlq", registry).await;
    let dlq = format!("{}.dlq", env.queue);
    let out = std::process::Command::new("rabbitmqctl")
        .args(["delete_queue", &dlq])
        .output()
        .expect("rabbitmqctl");
    assert!(out.status.success(), "delete_queue: {out:?}");
    let e = Envelope::new("no-such-task", json!(null));
    env.broker.publish(&e).await.expect("publish");
    let mut returned = Vec::new();
    for _ in 0..3 {
        let r = w.next(LONG).await;
        assert_eq!(
            (r.settled, r.id.as_deref()),
            (Settled::Returned, Some(e.id.as_str()))
        );
        returned.push(Instant::now());
    }
    let (gap1, gap2) = (returned[1] - returned[0], returned[2] - returned[1]);
    eprintln!("returned after waits of about 1 s and 2 s: {gap1:?}, {gap2:?}");
    assert!(
        gap1 >= Duration::from_millis(900) && gap2 >= Duration::from_millis(1900),
        "the waits before returning the message did not grow: {gap1:?}, {gap2:?}"
    );
    // The queue back (declared again, as at startup): the next try writes
    // the dead letter and acks the message.
    let again = cronpipe_shared::Broker::connect(&env.broker_config(), "dlq-back")
        .await
        .expect("connect");
    again.close().await;
    w.until(LONG, |r| count(r, Settled::DeadLetter) == 1).await;
    w.shutdown().await;
    let dead = wait_dead_letters(&env, 1, LONG).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, DeadReason::UnknownTask);
    assert!(env.drain(Destination::Work).await.is_empty());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_check_warns_about_timeouts_at_the_rabbitmq_consumer_timeout() {
    let env = TestEnv::new("check").await;
    let cfg = env.write_config(
        "cronpipe.toml",
        "[task.nightly-etl]\nhandler = \"exec\"\ncommand = [\"/bin/true\"]\ntimeout = \"45m\"\n[task.quick]\nhandler = \"exec\"\ncommand = [\"/bin/true\"]\ntimeout = \"5m\"\n",
    );
    let out = std::process::Command::new(cronpipe_tests::binary("worker"))
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .expect("run worker check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "a warning does not fail the check: {stdout}"
    );
    let warnings: Vec<&str> = stdout.lines().filter(|l| l.contains("warning:")).collect();
    assert_eq!(warnings.len(), 1, "{stdout}");
    assert!(
        warnings[0].contains("task \"nightly-etl\".timeout = \"45m\""),
        "{stdout}"
    );
    assert!(warnings[0].contains("consumer_timeout"), "{stdout}");
    assert!(stdout.contains("ok (2 task handlers)"), "{stdout}");
    env.cleanup().await;
}

// ------------------------------------------------------------------ http

mod http {
    use super::*;
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::post;

    /// One request the test server saw: path, time, headers, body.
    type Call = (String, Instant, HeaderMap, String);

    #[derive(Clone, Default)]
    struct Seen {
        calls: Arc<Mutex<Vec<Call>>>,
    }

    async fn record(seen: &Seen, path: &str, headers: HeaderMap, body: String) -> usize {
        let mut calls = seen.calls.lock().unwrap();
        calls.push((path.to_string(), Instant::now(), headers, body));
        calls.iter().filter(|c| c.0 == path).count()
    }

    async fn serve() -> (String, Seen) {
        let seen = Seen::default();
        let app = axum::Router::new()
            .route(
                "/ok",
                post(
                    |State(s): State<Seen>, h: HeaderMap, body: String| async move {
                        record(&s, "/ok", h, body).await;
                        StatusCode::NO_CONTENT
                    },
                ),
            )
            .route(
                "/flaky",
                post(
                    |State(s): State<Seen>, h: HeaderMap, body: String| async move {
                        if record(&s, "/flaky", h, body).await == 1 {
                            (
                                StatusCode::SERVICE_UNAVAILABLE,
                                [("retry-after", "1")],
                                "busy",
                            )
                                .into_response()
                        } else {
                            StatusCode::OK.into_response()
                        }
                    },
                ),
            )
            .route(
                "/missing",
                post(
                    |State(s): State<Seen>, h: HeaderMap, body: String| async move {
                        record(&s, "/missing", h, body).await;
                        (StatusCode::NOT_FOUND, "no such hook")
                    },
                ),
            )
            .with_state(seen.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (format!("http://{addr}"), seen)
    }

    broker_test!(http_handler_posts_the_payload_and_classifies_statuses);
    async fn http_handler_posts_the_payload_and_classifies_statuses(env: TestEnv) {
        let (base, seen) = serve().await;
        // A port nothing listens on: connection refused.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let config = env.config(&format!(
            r#"
[task.hook-ok]
handler = "http"
url = "{base}/ok"
headers = {{ Authorization = "Bearer s3cret" }}
[task.hook-flaky]
handler = "http"
url = "{base}/flaky"
retry = {{ max_attempts = 3, initial_delay = "50ms", jitter = 0.0 }}
[task.hook-missing]
handler = "http"
url = "{base}/missing"
retry = {{ max_attempts = 5 }}
[task.hook-down]
handler = "http"
url = "http://{closed}/nothing"
retry = {{ max_attempts = 2, initial_delay = "50ms" }}
"#
        ));
        let mut w = start(&env, &config, "w-http", Registry::new()).await;
        let ok = Envelope::new("hook-ok", json!({"report": "daily", "n": 3}));
        let flaky = Envelope::new("hook-flaky", json!({"x": 1}));
        let missing = Envelope::new("hook-missing", json!(null));
        let down = Envelope::new("hook-down", json!(null));
        for e in [&ok, &flaky, &missing, &down] {
            env.broker.publish(e).await.expect("publish");
        }
        let reports = w
            .until(LONG, |r| {
                count(r, Settled::Success) == 2 && count(r, Settled::DeadLetter) == 2
            })
            .await;
        w.shutdown().await;
        let calls = seen.calls.lock().unwrap().clone();
        // 2xx: success; the body is the payload JSON, configured and task headers are sent.
        let (_, _, h, body) = calls.iter().find(|c| c.0 == "/ok").unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(body).unwrap(),
            ok.payload
        );
        assert_eq!(h["authorization"], "Bearer s3cret");
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(h["idempotency-key"], ok.id.as_str());
        assert_eq!(h["x-cronpipe-attempt"], "1");
        // 503 with Retry-After: 1 → retried after at least a second (the policy said 50 ms).
        let flaky_calls: Vec<Instant> = calls
            .iter()
            .filter(|c| c.0 == "/flaky")
            .map(|c| c.1)
            .collect();
        assert_eq!(flaky_calls.len(), 2, "{reports:?}");
        let waited = flaky_calls[1] - flaky_calls[0];
        assert!(
            waited >= Duration::from_millis(950),
            "Retry-After honoured: {waited:?}"
        );
        // 404: permanent at once, with the status and the body tail.
        assert_eq!(calls.iter().filter(|c| c.0 == "/missing").count(), 1);
        let dead = wait_dead_letters(&env, 2, LONG).await;
        let nf = dead
            .iter()
            .find(|d| d.envelope.as_ref().map(|e| &e.id) == Some(&missing.id))
            .unwrap();
        assert_eq!(nf.reason, DeadReason::PermanentError);
        assert_eq!(nf.http_status, Some(404));
        assert_eq!(nf.output_tail, "no such hook");
        assert_eq!(nf.attempts, 1);
        // Connection refused: retryable, then out of attempts.
        let dn = dead
            .iter()
            .find(|d| d.envelope.as_ref().map(|e| &e.id) == Some(&down.id))
            .unwrap();
        assert_eq!(dn.reason, DeadReason::MaxAttempts);
        assert_eq!(dn.attempts, 2);
        assert_eq!(dn.http_status, None);
        assert!(dn.error.contains("failed"), "{}", dn.error);
        env.cleanup().await;
    }

    broker_test!(http_handler_speaks_tls_to_https_urls);
    async fn http_handler_speaks_tls_to_https_urls(env: TestEnv) {
        use tokio::io::AsyncReadExt;
        // A bare TCP server: it reads what the client sends first, then hangs up.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let first_bytes = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 3];
            sock.read_exact(&mut buf).await.unwrap();
            buf
        });
        let config = env.config(&format!(
            "[task.secure]\nhandler = \"http\"\nurl = \"https://{addr}/hook\"\nretry = {{ max_attempts = 1 }}\n"
        ));
        let mut w = start(&env, &config, "w-https", Registry::new()).await;
        env.broker
            .publish(&Envelope::new("secure", json!(null)))
            .await
            .expect("publish");
        let hello = tokio::time::timeout(LONG, first_bytes)
            .await
            .expect("client connected")
            .unwrap();
        // A TLS record of type handshake (ClientHello), protocol 3.x.
        assert_eq!(
            hello[0], 0x16,
            "TLS handshake record expected, got {hello:?}"
        );
        assert_eq!(hello[1], 0x03);
        let r = w.next(LONG).await;
        w.shutdown().await;
        assert_eq!(
            r.settled,
            Settled::DeadLetter,
            "the handshake never completed"
        );
        let dead = wait_dead_letters(&env, 1, LONG).await;
        assert_eq!(dead[0].reason, DeadReason::MaxAttempts);
        assert!(dead[0].error.contains("https://"), "{}", dead[0].error);
        env.cleanup().await;
    }
}
