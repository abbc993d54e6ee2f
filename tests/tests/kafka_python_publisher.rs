//! Other publishers on Kafka: `examples/publish_kafka.py` (Python,
//! confluent-kafka) builds an envelope by the JSON Schema's rules and produces
//! it to the work topic of a librdkafka mock cluster (a real Kafka-protocol
//! listener inside this test process); a worker runs the task exactly once,
//! with the id the script printed and the payload it sent, and skips a second
//! message with the same idempotency key.
//!
//! Needs `python3` with confluent-kafka (scripts/test installs it when
//! missing). Without it this test fails.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cronpipe_tests::TestEnv;
use cronpipe_worker::{Registry, Settled};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/publish_kafka.py")
}

/// Runs the example publisher and returns the id it printed.
async fn publish(brokers: &str, topic: &str, task: &str, payload: &str, key: &str) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("python3")
            .arg(script())
            .args([
                "--brokers",
                brokers,
                "--topic",
                topic,
                "--task",
                task,
                "--payload",
                payload,
                "--key",
                key,
            ])
            .output(),
    )
    .await
    .expect("examples/publish_kafka.py finished within 60 s")
    .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success(),
        "examples/publish_kafka.py failed ({}); if confluent-kafka is missing: \
         python3 -m pip install 'confluent-kafka==2.16.1'\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_confluent_kafka_publisher_task_runs_once() {
    let env = TestEnv::kafka_mock("pykafka", 2).await;
    let payload_file = env.dir.path().join("payload.json");
    let config = env.config(&env.exec_task("report", &format!("cat > {}", payload_file.display())));
    let mut worker = env.spawn_worker(&config, "w1", Registry::new()).await;

    let id = publish(
        &env.brokers(),
        env.topic(),
        "report",
        r#"{"a":[1,2],"b":"ü"}"#,
        "py-key-1",
    )
    .await;
    let report = worker
        .next_report(Duration::from_secs(30))
        .await
        .expect("the task was settled");
    assert_eq!(report.settled, Settled::Success);
    assert_eq!(
        report.id.as_deref(),
        Some(id.as_str()),
        "the worker ran the envelope the script published"
    );
    let sent: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&payload_file).expect("payload written"))
            .expect("json");
    assert_eq!(sent, serde_json::json!({"a": [1, 2], "b": "ü"}));

    // Same idempotency key, new message: skipped, never run again.
    let id2 = publish(&env.brokers(), env.topic(), "report", "{}", "py-key-1").await;
    assert_ne!(id, id2);
    let report = worker
        .next_report(Duration::from_secs(30))
        .await
        .expect("settled");
    assert_eq!(report.settled, Settled::Duplicate);
    let runs = env.runs();
    assert_eq!(runs.len(), 1, "ran once: {runs:?}");
    assert!(runs[0].starts_with(&id));
    worker.shutdown().await;
    env.cleanup().await;
}
