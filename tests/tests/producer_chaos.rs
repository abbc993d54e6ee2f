//! The producer while shared services misbehave, with real `producer`
//! processes: a leader cut off from Redis stops publishing before its lease
//! can expire and leaderships never overlap (on RabbitMQ and on Kafka);
//! RabbitMQ connections closed and the broker app stopped and started lose no
//! slot with `fire_all` (RabbitMQ only; kafka.rs has the Kafka outage).
//!
//! These tests disturb services other tests use, so they run one at a time
//! (a static mutex) and keep the disturbance narrow: each producer reaches
//! Redis through its own TCP proxy and only the leader's is partitioned
//! (bytes stop flowing, nothing is reset, as in a real network partition),
//! connections are closed only in the test's own RabbitMQ vhost, and a
//! stopped broker app is always started again by a guard, even when the
//! test fails.

mod producer_common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chrono::Utc;
use cronpipe_shared::Broker;
use cronpipe_tests::{broker_test, wait_until, TestEnv};
use producer_common::*;

/// Serializes the tests of this file.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

broker_test!(redis_cut_leader_stops_before_its_lease_can_expire_and_leaderships_never_overlap);
async fn redis_cut_leader_stops_before_its_lease_can_expire_and_leaderships_never_overlap(
    env: TestEnv,
) {
    let _serial = SERIAL.lock().await;
    let cfg = env.write_config("cronpipe.toml", &tick_config("fire_all"));
    let mut fleet = Fleet::new(&cfg, env.dir.path());
    let ids = ["p0", "p1", "p2"];
    // Each producer reaches Redis through its own partitionable proxy.
    let redis_addr: std::net::SocketAddr = "127.0.0.1:6379".parse().expect("addr");
    let mut proxies = std::collections::HashMap::new();
    for id in ids {
        let proxy = Proxy::start(redis_addr).await;
        fleet.set_env(id, &[("CRONPIPE__REDIS__URL", proxy.redis_url().as_str())]);
        proxies.insert(id.to_string(), proxy);
    }
    let rec = Recorder::start(&env).await;
    for id in ids {
        fleet.start(id);
    }
    assert!(
        rec.wait_for(Duration::from_secs(30), |_| true)
            .await
            .is_some(),
        "{}",
        fleet.log_tails()
    );
    for round in 0..2 {
        random_pause(300, 1500).await;
        let (token, id) = leader(&env).await.expect("a leader");
        let steps_before = fleet.get(&id).log_text().matches("Lost leadership").count();
        let standbys_before = fleet.get(&id).log_text().matches("Standing by").count();
        proxies[&id].cut();
        // Nothing can renew the lease any more: its expiry is fixed now (a
        // renewal already on its way was answered before this read).
        let (_, left) = env
            .store
            .lease_holder()
            .await
            .expect("redis")
            .expect("the cut leader's lease is still there");
        let expires_at = Utc::now() + chrono::Duration::from_std(left).expect("pttl");
        let cut_at = Instant::now();
        assert!(
            wait_until(Duration::from_secs(10), || async {
                fleet.get(&id).log_text().matches("Lost leadership").count() > steps_before
            })
            .await,
            "round {round}: the cut leader {id} never stepped down\n{}",
            fleet.log_tails()
        );
        let stepped_down_after = cut_at.elapsed();
        let first_new = rec
            .wait_for(Duration::from_secs(15), |r| r.token() > token)
            .await
            .unwrap_or_else(|| {
                panic!(
                    "round {round}: no new leader published\n{}",
                    fleet.log_tails()
                )
            });
        let got = rec.snapshot();
        let last_old = got
            .iter()
            .filter(|r| r.token() == token)
            .map(|r| r.at)
            .max()
            .expect("the cut leader had published");
        assert!(
            last_old < expires_at,
            "round {round}: {id} published at {last_old} after its lease could expire at {expires_at}"
        );
        assert!(
            first_new.at >= expires_at - chrono::Duration::milliseconds(50),
            "round {round}: the next leader published at {} before the old lease expired at {expires_at}",
            first_new.at
        );
        eprintln!(
            "round {round}: cut {id} (token {token}); it stepped down {stepped_down_after:?} after the cut; its last publish arrived {} ms before its lease could expire; token {} first published {} ms after that expiry",
            (expires_at - last_old).num_milliseconds(),
            first_new.token(),
            (first_new.at - expires_at).num_milliseconds()
        );
        proxies[&id].restore();
        // Reconnected, it contends again as a standby.
        assert!(
            wait_until(Duration::from_secs(15), || async {
                fleet.get(&id).log_text().matches("Standing by").count() > standbys_before
            })
            .await,
            "round {round}: {id} did not come back as a standby\n{}",
            fleet.get(&id).log_text()
        );
    }
    let last = rec.snapshot().last().map(|r| r.slot()).expect("messages");
    assert!(
        rec.reaches(last + chrono::Duration::seconds(2), Duration::from_secs(10))
            .await
    );
    fleet.stop_all();
    let got = rec.finish(&env).await;

    // Leaderships, by fencing token, never overlap in time: each one's last
    // message arrived before the next one's first.
    let spans = leadership_spans(&got);
    let mut ordered: Vec<_> = spans.iter().collect();
    ordered.sort_by_key(|(_, (first, _))| *first);
    for w in ordered.windows(2) {
        let ((ta, (_, a_last)), (tb, (b_first, _))) = (w[0], w[1]);
        assert!(ta < tb, "tokens out of order: {ordered:?}");
        assert!(
            a_last < b_first,
            "leaderships {ta} and {tb} overlap: {a_last} >= {b_first}"
        );
    }
    let by_slot = once_per_leadership(&got);
    let slots: BTreeSet<_> = by_slot.keys().copied().collect();
    assert!(
        gaps(&slots, chrono::Duration::seconds(1)).is_empty(),
        "fire_all lost a slot"
    );
    let doubles = by_slot.values().filter(|t| t.len() > 1).count();
    eprintln!(
        "redis cut: {} leaderships {:?}, {} slots, {doubles} published twice (by different leaderships)",
        spans.len(),
        spans.keys().collect::<Vec<_>>(),
        slots.len()
    );
    env.cleanup().await;
}

/// A RabbitMQ vhost made for one test, deleted on drop.
struct Vhost(String);

impl Drop for Vhost {
    fn drop(&mut self) {
        rabbitmqctl(&["delete_vhost", &self.0]);
    }
}

/// Starts the RabbitMQ app again on drop (the test may fail while it is stopped).
struct AppGuard;

impl Drop for AppGuard {
    fn drop(&mut self) {
        start_broker();
    }
}

fn start_broker() {
    let (ok, out) = rabbitmqctl(&["start_app"]);
    if !ok {
        eprintln!("rabbitmqctl start_app: {out}");
    }
    let end = Instant::now() + Duration::from_secs(120);
    while !port_open(5672) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn published(fleet: &Fleet) -> usize {
    fleet.all_logs().matches("Published slot").count()
}

async fn wait_published(fleet: &Fleet, more_than: usize, limit: Duration, what: &str) -> usize {
    let ok = wait_until(limit, || async { published(fleet) >= more_than + 3 }).await;
    assert!(
        ok,
        "{what}: publishing did not resume\n{}",
        fleet.log_tails()
    );
    published(fleet)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_connections_closed_and_app_restarted_fire_all_loses_no_slot() {
    let _serial = SERIAL.lock().await;
    let env = TestEnv::new("rabbit-chaos").await;
    let vhost = Vhost(format!("cptest-{}", env.id));
    let (ok, out) = rabbitmqctl(&["add_vhost", &vhost.0]);
    assert!(ok, "add_vhost: {out}");
    let (ok, out) = rabbitmqctl(&["set_permissions", "-p", &vhost.0, "guest", ".*", ".*", ".*"]);
    assert!(ok, "set_permissions: {out}");
    let url = format!("amqp://guest:guest@127.0.0.1:5672/{}", vhost.0);
    let cfg = env.write_config("cronpipe.toml", &tick_config("fire_all"));
    let mut fleet = Fleet::new(&cfg, env.dir.path());
    for id in ["p0", "p1"] {
        fleet.set_env(
            id,
            &[
                ("CRONPIPE__BROKER__RABBITMQ__URL", url.as_str()),
                ("CRONPIPE__BROKER__RABBITMQ__CONFIRM_TIMEOUT", "2s"),
            ],
        );
        fleet.start(id);
    }
    let mut n = wait_published(&fleet, 0, Duration::from_secs(30), "start").await;
    let started = Utc::now();
    for round in 0..2 {
        random_pause(300, 1200).await;
        let (ok, out) = rabbitmqctl(&[
            "close_all_connections",
            "-p",
            &vhost.0,
            "cronpipe producer chaos test",
        ]);
        assert!(ok, "close_all_connections: {out}");
        eprintln!(
            "round {round}: closed every connection of vhost {}",
            vhost.0
        );
        n = wait_published(
            &fleet,
            n,
            Duration::from_secs(30),
            "after close_all_connections",
        )
        .await;
    }
    random_pause(300, 1200).await;
    let guard = AppGuard;
    let stopped_at = Utc::now();
    let (ok, out) = rabbitmqctl(&["stop_app"]);
    assert!(ok, "stop_app: {out}");
    let stopped_done = Utc::now();
    // The outage itself: a random few seconds with the broker down.
    random_pause(2000, 4000).await;
    let (ok, out) = rabbitmqctl(&["start_app"]);
    assert!(ok, "start_app: {out}");
    let start_end = Instant::now() + Duration::from_secs(120);
    while !port_open(5672) && Instant::now() < start_end {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let restarted_at = Utc::now();
    drop(guard);
    eprintln!(
        "broker stopped {stopped_at} (stop_app took {} ms), back {restarted_at}",
        (stopped_done - stopped_at).num_milliseconds()
    );
    let before = published(&fleet);
    wait_published(&fleet, before, Duration::from_secs(90), "after start_app").await;
    // The first publishes after the restart may all be catch-up slots from
    // before it; run on until a slot due after the restart is published too.
    while Utc::now() < restarted_at + chrono::Duration::milliseconds(1500) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let caught_up = published(&fleet);
    wait_published(
        &fleet,
        caught_up,
        Duration::from_secs(30),
        "a slot due after the restart",
    )
    .await;
    fleet.stop_all();

    let broker = Broker::connect(&broker_config(&env, &url), "drain")
        .await
        .expect("broker is back");
    let Broker::Rabbit(rabbit) = &broker else {
        panic!("rabbitmq")
    };
    let mut slots = Vec::new();
    while let Some(body) = rabbit.get(&env.queue, true).await.expect("basic.get") {
        let e = cronpipe_shared::Envelope::decode(&body).expect("envelope");
        slots.push(e.slot.expect("slot"));
    }
    let _ = rabbit.delete_topology().await;
    broker.close().await;
    let distinct: BTreeSet<_> = slots.iter().copied().collect();
    let missing = gaps(&distinct, chrono::Duration::seconds(1));
    assert!(
        missing.is_empty(),
        "slots lost: {missing:?}\n{}",
        fleet.log_tails()
    );
    let first = *distinct.first().expect("slots");
    let last = *distinct.last().expect("slots");
    assert!(
        first <= started && last >= restarted_at,
        "the run spans the outage: {first}..{last}"
    );
    let during: usize = distinct
        .iter()
        .filter(|s| **s > stopped_done && **s < restarted_at)
        .count();
    assert!(
        during > 0,
        "slots due while the broker was down were caught up"
    );
    let logs = fleet.all_logs();
    eprintln!(
        "rabbit chaos: {} slots {first}..{last} without a gap ({during} due while the broker was down), {} messages ({} duplicates), {} publish retries, {} caught up by fire_all",
        distinct.len(),
        slots.len(),
        slots.len() - distinct.len(),
        logs.matches("Publish failed; will retry").count(),
        sum_field(&logs, "Missed slots handled by the misfire policy", "caught_up")
    );
    drop(vhost);
    env.cleanup().await;
}
