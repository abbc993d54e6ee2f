//! The test harness itself: a test that fails (panics) before its cleanup
//! still leaves no RabbitMQ queue and no Redis key behind, so failing runs do
//! not litter the shared Redis and RabbitMQ that CI reuses.

use std::time::Duration;

use cronpipe_tests::TestEnv;

fn rabbit_queues() -> Vec<String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_queues", "-q", "--no-table-headers", "name"])
        .output()
        .expect("rabbitmqctl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .collect()
}

#[tokio::test]
async fn a_test_that_panics_before_its_cleanup_leaves_no_queue_and_no_key() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let failing = tokio::spawn(async move {
        let env = TestEnv::new("harness-panic").await;
        env.store
            .claim("k", "w", Duration::from_secs(30), Duration::from_secs(60))
            .await
            .expect("claim");
        assert!(
            rabbit_queues().contains(&env.queue),
            "the queue was declared"
        );
        let _ = tx.send((env.queue.clone(), env.store.keys().prefix().to_string()));
        panic!("the test fails here, before env.cleanup()");
    });
    let (queue, prefix) = rx.await.expect("the world was made");
    assert!(failing.await.is_err_and(|e| e.is_panic()));
    assert!(
        !rabbit_queues().contains(&queue),
        "queue {queue} left behind"
    );
    let mut conn = redis::Client::open(cronpipe_tests::redis_url())
        .and_then(|c| c.get_connection())
        .expect("redis");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!(
            "{}*",
            prefix.replace('{', "\\{").replace('}', "\\}")
        ))
        .query(&mut conn)
        .expect("KEYS");
    assert!(keys.is_empty(), "keys left behind: {keys:?}");
}
