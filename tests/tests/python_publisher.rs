//! Other publishers: `examples/publish.py` (Python, pika) builds an envelope
//! from the JSON Schema's rules and publishes it to the real broker; a worker
//! runs the task exactly once, with the id the script printed and the payload
//! it sent, and skips a second message with the same idempotency key.
//!
//! Needs `python3` with pika (`python3 -m pip install 'pika==1.3.2'`;
//! scripts/test installs it when missing). Without it this test fails.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use cronpipe_tests::{amqp_url, TestEnv};
use cronpipe_worker::{Registry, Report, Settled};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const PIKA_HINT: &str = "install it with: python3 -m pip install 'pika==1.3.2' \
     (scripts/test does this before cargo test)";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/publish.py")
}

/// Fails the test, with the install command, when python3 or pika is missing.
async fn require_pika() {
    let out = tokio::process::Command::new("python3")
        .args(["-c", "import pika; print(pika.__version__)"])
        .output()
        .await
        .unwrap_or_else(|e| panic!("python3 is needed to run examples/publish.py: {e}"));
    assert!(
        out.status.success(),
        "the Python package pika is not importable by python3; {PIKA_HINT}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs the example publisher and returns the id it printed.
async fn publish(queue: &str, task: &str, payload: Option<&str>, key: Option<&str>) -> String {
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg(script())
        .args(["--url", &amqp_url(), "--queue", queue, "--task", task]);
    if let Some(p) = payload {
        cmd.args(["--payload", p]);
    }
    if let Some(k) = key {
        cmd.args(["--key", k]);
    }
    let out = match tokio::time::timeout(Duration::from_secs(30), cmd.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("running python3 examples/publish.py: {e}"),
        Err(_) => panic!("examples/publish.py did not finish within 30 s"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "examples/publish.py failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    let id = stdout.trim().to_string();
    let uuid = uuid::Uuid::parse_str(&id)
        .unwrap_or_else(|e| panic!("publish.py printed {stdout:?}, not a UUID: {e}"));
    assert_eq!(uuid.get_version_num(), 4, "ad-hoc ids are UUIDv4: {id}");
    assert_eq!(
        id,
        uuid.hyphenated().to_string(),
        "lowercase hyphenated form"
    );
    id
}

/// Waits for the next report of a finished message.
async fn next_report(rx: &mut mpsc::UnboundedReceiver<Report>) -> Report {
    match tokio::time::timeout(Duration::from_secs(20), rx.recv()).await {
        Ok(Some(r)) => r,
        Ok(None) => panic!("the worker's report channel closed"),
        Err(_) => panic!("the worker settled no message within 20 s"),
    }
}

/// Waits for `id`'s final report, skipping deferrals.
async fn settled(rx: &mut mpsc::UnboundedReceiver<Report>, id: &str) -> Report {
    loop {
        let r = next_report(rx).await;
        assert_eq!(
            r.id.as_deref(),
            Some(id),
            "unexpected report {r:?} while waiting for {id}"
        );
        if r.settled != Settled::Deferred {
            return r;
        }
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_publisher_task_runs_once_with_its_id_and_payload() {
    require_pika().await;
    let env = TestEnv::new("pypub").await;
    let dir = env.dir.path().display().to_string();
    // After the runs-file line, the task saves its stdin (the payload) and the
    // envelope fields it sees, one file per task id.
    let then = format!(
        "cat > {dir}/payload-$CRONPIPE_TASK_ID.json; \
         echo $CRONPIPE_TASK $CRONPIPE_IDEMPOTENCY_KEY $CRONPIPE_CREATED_AT > {dir}/meta-$CRONPIPE_TASK_ID.txt"
    );
    let config = env.config(&env.exec_task("report", &then));

    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut opts = cronpipe_worker::Options::from_config(config.clone());
    opts.instance_id = "py-w1".into();
    opts.reports = Some(tx);
    let registry =
        cronpipe_worker::registry_from_config(&config, Registry::new()).expect("registry");
    // Its own connection: the worker closes it on stop, and env.broker is
    // still needed to inspect the queues afterwards.
    let broker = cronpipe_shared::Broker::connect(&config.broker, "py-w1")
        .await
        .expect("broker");
    let stop = CancellationToken::new();
    let worker = tokio::spawn(cronpipe_worker::run(
        opts,
        env.store.clone(),
        broker,
        registry,
        stop.clone(),
    ));

    // 1. A payload and an idempotency key.
    let payload = r#"{"a":1,"nested":{"list":[1,2.5,"x"],"none":null},"text":"héllo \"q\""}"#;
    let key = format!("py-{}", env.id);
    let before = Utc::now();
    let id1 = publish(&env.queue, "report", Some(payload), Some(&key)).await;
    let r1 = settled(&mut rx, &id1).await;
    assert_eq!(r1.settled, Settled::Success, "{r1:?}");
    assert_eq!(r1.task.as_deref(), Some("report"));
    assert_eq!(r1.attempt, Some(1));

    // 2. Same key, new id: a duplicate, skipped without running.
    let id2 = publish(&env.queue, "report", Some(r#"{"a":2}"#), Some(&key)).await;
    assert_ne!(id1, id2, "each message gets a new id");
    let r2 = settled(&mut rx, &id2).await;
    assert_eq!(r2.settled, Settled::Duplicate, "{r2:?}");

    // 3. No payload, no key: the handler gets null and the key is the id.
    let id3 = publish(&env.queue, "report", None, None).await;
    let r3 = settled(&mut rx, &id3).await;
    assert_eq!(r3.settled, Settled::Success, "{r3:?}");
    let after = Utc::now();

    stop.cancel();
    worker.await.expect("join worker").expect("worker run");

    // Ran exactly once per distinct key, with the printed ids, as attempt 1 of an ad-hoc task.
    let runs = env.runs();
    assert_eq!(
        runs,
        vec![format!("{id1} - - 1 -"), format!("{id3} - - 1 -")],
        "runs file"
    );
    let dir = env.dir.path();
    assert!(
        !dir.join(format!("payload-{id2}.json")).exists(),
        "the duplicate ran"
    );

    // The payload arrived unchanged.
    let got: serde_json::Value =
        serde_json::from_str(&read(&dir.join(format!("payload-{id1}.json"))))
            .expect("payload file holds JSON");
    let sent: serde_json::Value = serde_json::from_str(payload).unwrap();
    assert_eq!(got, sent);
    assert_eq!(
        read(&dir.join(format!("payload-{id3}.json"))).trim(),
        "null"
    );

    // Task name, idempotency key and created_at as the script wrote them.
    for (id, want_key) in [(&id1, key.as_str()), (&id3, id3.as_str())] {
        let meta = read(&dir.join(format!("meta-{id}.txt")));
        let fields: Vec<&str> = meta.split_whitespace().collect();
        assert_eq!(fields.len(), 3, "meta {meta:?}");
        assert_eq!(fields[0], "report");
        assert_eq!(fields[1], want_key, "idempotency key of {id}");
        let created: DateTime<Utc> = DateTime::parse_from_rfc3339(fields[2])
            .unwrap_or_else(|e| panic!("created_at {:?}: {e}", fields[2]))
            .with_timezone(&Utc);
        let slack = chrono::Duration::seconds(2);
        assert!(
            created >= before - slack && created <= after + slack,
            "created_at {created} outside the test's run {before}..{after}"
        );
    }

    // Nothing left over, nothing dead-lettered.
    assert!(
        env.drain_queue(&env.queue).await.is_empty(),
        "work queue not empty"
    );
    let dlq = env.rabbit().dlq_name();
    assert!(
        env.drain_queue(&dlq).await.is_empty(),
        "dead letters: {dlq}"
    );
    env.cleanup().await;
}
