//! A Redis failover behind one address: the store follows it.
//!
//! Two throw-away `redis-server`s, a primary A and its replica B, sit behind a
//! TCP proxy that plays the part of a DNS name, Sentinel-managed endpoint or
//! Kubernetes Service: new connections go wherever it points now. The failover
//! is Sentinel's: B is promoted, the proxy points at it, A becomes B's
//! replica. The store's open
//! connection still leads to A, so its next write is refused `READONLY`;
//! after that the store must reconnect and reach B. redis-rs alone keeps the
//! old connection (it only reconnects on I/O errors), so without cronpipe's
//! watch every write would be refused for good: the producer could never hold
//! the lease again, the worker never claim a task.

use std::time::{Duration, Instant};

use cronpipe_shared::store::{Claim, Outcome, Store, StoreError};
use cronpipe_tests::redis_failover::{Pair, Server};

/// A store connected through the proxy to A, which B replicates.
async fn store_on(pair: &Pair) -> Store {
    let store = Store::connect(&pair.url(), "cptest-failover", Duration::from_secs(2))
        .await
        .expect("connect through the proxy");
    store.ping().await.expect("ping A");
    store
}

/// Retries `op` until it succeeds, for at most 10 s, and returns its value.
/// The first call must fail with `READONLY` (the old connection leads to A).
async fn succeeds_after_readonly<T, F, Fut>(mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    match op().await {
        Err(e) => {
            assert!(
                e.to_string().contains("read only replica"),
                "first error: {e}"
            );
            assert!(e.is_transient(), "READONLY must be worth retrying");
        }
        Ok(_) => panic!("the write reached the demoted server and was not refused"),
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = String::new();
    while Instant::now() < deadline {
        match op().await {
            Ok(v) => return v,
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("still failing 10 s after the failover: {last}");
}

#[tokio::test]
async fn the_lease_holder_renews_on_the_new_primary_after_a_readonly_script() {
    let pair = Pair::start().await;
    let store = store_on(&pair).await;
    let ttl = Duration::from_secs(30);
    let token = store
        .lease_acquire("p1", ttl)
        .await
        .expect("redis")
        .expect("the lease is free");
    let value = format!("{token}:p1");
    pair.fail_over();
    // The lease was replicated: its holder keeps it, on B.
    let renewed = succeeds_after_readonly(|| store.lease_renew(&value, ttl)).await;
    assert!(renewed, "B has the lease, held by p1");
    assert_eq!(pair.b.get(&store.keys().leader()), Some(value));
    // And B is where writes go now: a release there frees the lease.
    assert!(store
        .lease_release(&format!("{token}:p1"))
        .await
        .expect("redis"));
    assert_eq!(pair.b.get(&store.keys().leader()), None);
}

#[tokio::test]
async fn a_claim_pipeline_refused_readonly_reconnects_to_the_new_primary() {
    let pair = Pair::start().await;
    let store = store_on(&pair).await;
    let (ttl, keep) = (Duration::from_secs(30), Duration::from_secs(60));
    pair.fail_over();
    let claim = succeeds_after_readonly(|| store.claim("k1", "w1", ttl, keep)).await;
    assert_eq!(claim, Claim::Claimed { attempt: 1 });
    assert_eq!(
        pair.b.get(&store.keys().idem("k1")).as_deref(),
        Some("running:w1")
    );
}

#[tokio::test]
async fn a_command_refused_readonly_reconnects_to_the_new_primary() {
    let pair = Pair::start().await;
    let store = store_on(&pair).await;
    let (ttl, keep) = (Duration::from_secs(30), Duration::from_secs(60));
    assert_eq!(
        store.claim("k2", "w1", ttl, keep).await.expect("redis"),
        Claim::Claimed { attempt: 1 }
    );
    pair.fail_over();
    // The claim was replicated, so finishing it on B finds it ours.
    let ours = succeeds_after_readonly(|| store.finish("k2", "w1", Outcome::Done, keep)).await;
    assert!(ours, "B has w1's claim");
    assert_eq!(
        pair.b.get(&store.keys().idem("k2")).as_deref(),
        Some("done")
    );
}

#[tokio::test]
async fn a_ping_on_the_demoted_primary_fails_and_reconnects_to_the_new_one() {
    let pair = Pair::start().await;
    let store = store_on(&pair).await;
    pair.fail_over();
    // A still answers PING, as a replica: the readiness check must not take
    // that for health, since every write there would be refused.
    let e = store.ping().await.expect_err("A is a replica now");
    assert!(
        matches!(&e, StoreError::NotPrimary { role, .. } if role == "slave"),
        "{e}"
    );
    assert!(e.is_transient(), "{e}");
    // The ping started the reconnect: without any write refused first, the
    // store reaches B.
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = store.ping().await {
        assert!(Instant::now() < deadline, "still not on B 10 s after: {e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let token = store
        .lease_acquire("p1", Duration::from_secs(30))
        .await
        .expect("the first write after the reconnect lands on B")
        .expect("the lease is free");
    assert_eq!(
        pair.b.get(&store.keys().leader()),
        Some(format!("{token}:p1"))
    );
}

#[tokio::test]
async fn a_ping_where_role_is_not_allowed_checks_with_ping() {
    let server = Server::start();
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "app", "on", ">secret", "~*", "+@all", "-role"])
        .query(&mut server.client())
        .expect("ACL SETUSER");
    let url = server.url().replace("redis://", "redis://app:secret@");
    let store = Store::connect(&url, "cptest-failover", Duration::from_secs(2))
        .await
        .expect("connect as app");
    let role: redis::RedisResult<redis::Value> = redis::cmd("ROLE")
        .query_async(&mut store.connection())
        .await;
    let refused = role.expect_err("app may not run ROLE");
    assert_eq!(refused.code(), Some("NOPERM"), "{refused}");
    store
        .ping()
        .await
        .expect("a primary that refuses ROLE is still ready");
}

#[tokio::test]
async fn writes_refused_for_want_of_replicas_fail_as_transient_errors_and_resume() {
    // Redis's own guard against losing writes in a failover: with
    // `min-replicas-to-write 1` and no replica, the primary refuses writes.
    let server = Server::start();
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "min-replicas-to-write", "1"])
        .query(&mut server.client())
        .expect("CONFIG SET");
    let store = Store::connect(&server.url(), "cptest-failover", Duration::from_secs(2))
        .await
        .expect("connect");
    let ttl = Duration::from_secs(30);
    let e = store
        .claim("k", "w1", ttl, ttl)
        .await
        .expect_err("no replica to write with");
    assert!(e.to_string().contains("NOREPLICAS"), "{e}");
    assert!(
        e.is_transient(),
        "worth retrying once replicas are back: {e}"
    );
    let e = store
        .lease_acquire("p1", ttl)
        .await
        .expect_err("no replica to write with");
    assert!(e.to_string().contains("NOREPLICAS"), "{e}");
    // It is still the primary, so ready.
    store.ping().await.expect("a primary");
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "min-replicas-to-write", "0"])
        .query(&mut server.client())
        .expect("CONFIG SET");
    assert_eq!(
        store
            .claim("k", "w1", ttl, ttl)
            .await
            .expect("writes again"),
        Claim::Claimed { attempt: 1 }
    );
}

#[tokio::test]
async fn with_wait_replicas_lease_and_watermark_writes_count_only_once_a_replica_holds_them() {
    let a = Server::start();
    let b = Server::start();
    b.replicate(&a);
    b.wait_synced();
    // After a full sync the primary streams writes to a replica only from
    // its first acknowledgement on (up to a second later); until then WAIT
    // cannot count it. This returns once a write has been acknowledged.
    a.wait_replicated();
    let plain = Store::connect(&a.url(), "cptest-wait", Duration::from_secs(2))
        .await
        .expect("connect to A");
    let store = plain
        .clone()
        .with_replica_wait(1, Duration::from_millis(200));
    let ttl = Duration::from_secs(30);
    let slot = chrono::Utc::now();

    // Replica attached: the lease is taken, and B holds the fencing token
    // and the lease as soon as the call returns (WAIT saw B acknowledge).
    let t1 = store
        .lease_acquire("p1", ttl)
        .await
        .expect("acquire")
        .expect("the lease is free");
    let v1 = format!("{t1}:p1");
    assert_eq!(b.get(&store.keys().fencing()), Some(t1.to_string()));
    assert_eq!(b.get(&store.keys().leader()), Some(v1.clone()));
    assert!(store.lease_renew(&v1, ttl).await.expect("renew"));
    assert!(store
        .advance_watermarks(&v1, &[("nightly", slot, "")])
        .await
        .expect("watermark"));

    // B leaves: A keeps taking writes, but none of them may count.
    b.promote();
    a.wait_connected_replicas(0);
    let not_replicated = |e: StoreError| {
        assert!(
            matches!(
                e,
                StoreError::NotReplicated {
                    wanted: 1,
                    acked: 0,
                    ..
                }
            ),
            "expected NotReplicated, got {e}"
        );
        assert!(e.is_transient(), "worth retrying once replicas return");
        assert!(e.to_string().contains("redis.wait_replicas"), "{e}");
    };
    not_replicated(
        store
            .lease_renew(&v1, ttl)
            .await
            .expect_err("renewal counted without a replica"),
    );
    not_replicated(
        store
            .advance_watermarks(&v1, &[("nightly", slot + chrono::Duration::minutes(1), "")])
            .await
            .expect_err("watermark counted without a replica"),
    );
    assert!(store.lease_release(&v1).await.expect("release"));
    not_replicated(
        store
            .lease_acquire("p2", ttl)
            .await
            .expect_err("lease taken without a replica"),
    );
    // The lease it could not count was given back, not left to expire.
    assert_eq!(store.lease_holder().await.expect("holder"), None);
    // Without the setting the same acquire succeeds on A alone.
    let t2 = plain
        .lease_acquire("p3", ttl)
        .await
        .expect("acquire")
        .expect("free");
    assert!(plain
        .lease_release(&format!("{t2}:p3"))
        .await
        .expect("release"));

    // B back: the lease is taken again, with a token above every one before.
    b.replicate(&a);
    b.wait_synced();
    a.wait_replicated();
    let t3 = store
        .lease_acquire("p2", ttl)
        .await
        .expect("acquire")
        .expect("free");
    assert!(t3 > t2 && t2 > t1, "tokens {t1}, {t2}, {t3}");
    assert_eq!(b.get(&store.keys().fencing()), Some(t3.to_string()));
}

/// `[redis] wait_replicas` reaches the store the binaries and tools connect:
/// on a server without replicas the lease cannot be taken with it, and can
/// without it.
#[tokio::test]
async fn the_configured_wait_replicas_reaches_the_connected_store() {
    let alone = Server::start();
    let connect = |wait: u32| {
        let text = format!(
            "[redis]\nurl = \"{}\"\nnamespace = \"cptest-waitcfg\"\nwait_replicas = {wait}\nwait_timeout = \"100ms\"\n",
            alone.url()
        );
        let config = cronpipe_shared::Config::parse(
            std::path::Path::new("cronpipe.toml"),
            &text,
            std::iter::empty(),
        )
        .expect("valid config");
        async move {
            cronpipe_shared::connect::tool_store(&config)
                .await
                .expect("connect")
        }
    };
    let ttl = Duration::from_secs(30);
    let e = connect(1)
        .await
        .lease_acquire("p1", ttl)
        .await
        .expect_err("taken without the replica the config asks for");
    assert!(
        matches!(e, StoreError::NotReplicated { wanted: 1, .. }),
        "{e}"
    );
    let token = connect(0)
        .await
        .lease_acquire("p1", ttl)
        .await
        .expect("acquire")
        .expect("the refused lease was given back");
    assert!(token > 1, "the refused attempt drew token 1 first: {token}");
}
