//! Producer failover with real `producer` processes against real Redis and
//! each broker (RabbitMQ, Kafka on the mock cluster): leaders killed with
//! SIGKILL at random moments (fire_all: no slot lost; skip: nothing published
//! late, skips counted), failover time after SIGKILL (≤ TTL + 0.5 s) and
//! after SIGTERM (≤ 0.5 s).
//!
//! Every message is read by a [`Recorder`] consuming the work queue / topic,
//! which notes when it arrived. The tests of this file, on both brokers, run
//! one at a time (a static mutex): they measure time, and three producers
//! per test already keep a two-core machine busy.

mod producer_common;

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant};

use chrono::Utc;
use cronpipe_tests::{broker_test, TestEnv};
use nix::sys::signal::Signal;
use producer_common::*;

/// Serializes the tests of this file.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Lease TTL used here: short, so failovers are quick.
const TTL: Duration = Duration::from_secs(2);

/// Kills the leader `kills` times at random moments, restarting each killed
/// producer once a new leader has published. Returns what the recorder got,
/// the failover times (SIGKILL to the first message of the next leader) and
/// the fleet (stopped).
async fn kill_leaders(
    env: &TestEnv,
    policy: &str,
    producers: usize,
    kills: usize,
) -> (Vec<Received>, Vec<Duration>, Fleet) {
    let cfg = env.write_config("cronpipe.toml", &tick_config(policy));
    let rec = Recorder::start(env).await;
    let mut fleet = Fleet::new(&cfg, env.dir.path());
    for i in 0..producers {
        fleet.start(&format!("p{i}"));
    }
    assert!(
        rec.wait_for(Duration::from_secs(30), |_| true)
            .await
            .is_some(),
        "nothing published\n{}",
        fleet.log_tails()
    );
    let mut failovers = Vec::new();
    for n in 0..kills {
        random_pause(200, 1500).await;
        let (token, id) = leader(env).await.expect("a leader holds the lease");
        fleet.signal(&id, Signal::SIGKILL);
        let killed_at = Instant::now();
        let Some(first) = rec
            .wait_for(Duration::from_secs(20), |r| r.token() > token)
            .await
        else {
            panic!(
                "kill {n}: no leader after token {token} published\n{}",
                fleet.log_tails()
            );
        };
        let failover = first.instant.saturating_duration_since(killed_at);
        eprintln!(
            "kill {n}: SIGKILL {id} (token {token}); token {} published after {failover:?}",
            first.token()
        );
        failovers.push(failover);
        fleet.start(&id);
    }
    // Let the last leader publish a few more slots before stopping everyone.
    let last = rec.snapshot().last().map(|r| r.slot()).expect("messages");
    assert!(
        rec.reaches(last + chrono::Duration::seconds(2), Duration::from_secs(10))
            .await,
        "publishing stopped after the last kill\n{}",
        fleet.log_tails()
    );
    fleet.stop_all();
    let got = rec.finish(env).await;
    (got, failovers, fleet)
}

fn describe(failovers: &[Duration]) -> String {
    let mut v = failovers.to_vec();
    v.sort();
    format!(
        "min {:?}, median {:?}, max {:?}",
        v.first().copied().unwrap_or_default(),
        v.get(v.len() / 2).copied().unwrap_or_default(),
        v.last().copied().unwrap_or_default()
    )
}

broker_test!(fire_all_three_producers_ten_leader_kills_no_slot_lost);
async fn fire_all_three_producers_ten_leader_kills_no_slot_lost(env: TestEnv) {
    let _serial = SERIAL.lock().await;
    let (got, failovers, fleet) = kill_leaders(&env, "fire_all", 3, 10).await;

    let by_slot = once_per_leadership(&got);
    let slots: BTreeSet<_> = by_slot.keys().copied().collect();
    let missing = gaps(&slots, chrono::Duration::seconds(1));
    assert!(
        missing.is_empty(),
        "slots lost between {:?} and {:?}: {missing:?}\n{}",
        slots.first(),
        slots.last(),
        fleet.log_tails()
    );
    let tokens: HashSet<u64> = got.iter().map(Received::token).collect();
    assert!(
        tokens.len() >= 11,
        "ten kills, eleven leaderships: {tokens:?}"
    );
    let doubles: Vec<_> = by_slot.iter().filter(|(_, t)| t.len() > 1).collect();
    eprintln!(
        "fire_all, 10 SIGKILLs: {} slots from {} to {}, {} messages, {} slot(s) published twice {:?}; failover {}",
        slots.len(),
        slots.first().expect("slots"),
        slots.last().expect("slots"),
        got.len(),
        doubles.len(),
        doubles,
        describe(&failovers)
    );
    env.cleanup().await;
}

broker_test!(skip_three_producers_ten_leader_kills_nothing_late_and_skips_counted);
async fn skip_three_producers_ten_leader_kills_nothing_late_and_skips_counted(env: TestEnv) {
    let _serial = SERIAL.lock().await;
    let (got, failovers, fleet) = kill_leaders(&env, "skip", 3, 10).await;

    // Lateness is measured as arrival at a consumer that was already waiting
    // on the queue minus the slot instant: an upper bound of the publish
    // lateness (it adds broker routing and delivery, never subtracts), on the
    // same host clock as the producers.
    let bound = TTL + Duration::from_millis(500);
    let latest = got.iter().max_by_key(|r| r.lateness()).expect("messages");
    assert!(
        latest.lateness() <= bound,
        "slot {} arrived {:?} after its time (bound: the failover gap, {bound:?})",
        latest.slot(),
        latest.lateness()
    );
    let by_slot = once_per_leadership(&got);
    let slots: BTreeSet<_> = by_slot.keys().copied().collect();
    let missing = gaps(&slots, chrono::Duration::seconds(1));
    let logs = fleet.all_logs();
    let skipped = sum_field(
        &logs,
        "Missed slots handled by the misfire policy",
        "skipped",
    );
    assert!(
        !missing.is_empty(),
        "ten failovers of ~{TTL:?} with skip must leave slots unpublished"
    );
    assert!(
        skipped >= missing.len() as u64,
        "{} slots never published but only {skipped} counted as skipped: {missing:?}",
        missing.len()
    );
    eprintln!(
        "skip, 10 SIGKILLs: {} slots published, {} not published, {skipped} counted skipped in logs; max lateness {:?} (slot {}); failover {}",
        slots.len(),
        missing.len(),
        latest.lateness(),
        latest.slot(),
        describe(&failovers)
    );
    env.cleanup().await;
}

broker_test!(failover_after_sigkill_within_ttl_plus_half_a_second);
async fn failover_after_sigkill_within_ttl_plus_half_a_second(env: TestEnv) {
    let _serial = SERIAL.lock().await;
    let (got, failovers, _fleet) = kill_leaders(&env, "fire_all", 2, 4).await;
    let bound = TTL + Duration::from_millis(500);
    eprintln!(
        "failover after SIGKILL: {failovers:?} ({})",
        describe(&failovers)
    );
    for (n, f) in failovers.iter().enumerate() {
        assert!(*f <= bound, "kill {n}: failover took {f:?} > {bound:?}");
    }
    let slots: BTreeSet<_> = got.iter().map(Received::slot).collect();
    assert!(gaps(&slots, chrono::Duration::seconds(1)).is_empty());
    env.cleanup().await;
}

broker_test!(handover_after_sigterm_within_half_a_second);
async fn handover_after_sigterm_within_half_a_second(env: TestEnv) {
    let _serial = SERIAL.lock().await;
    let cfg = env.write_config("cronpipe.toml", &tick_config("fire_all"));
    let rec = Recorder::start(&env).await;
    let mut fleet = Fleet::new(&cfg, env.dir.path());
    fleet.start("p0");
    fleet.start("p1");
    assert!(rec
        .wait_for(Duration::from_secs(30), |_| true)
        .await
        .is_some());
    let bound = Duration::from_millis(500);
    let mut lease_gaps = Vec::new();
    let mut publish_gaps = Vec::new();
    for n in 0..4 {
        // Both running: the standby has said so, the leader is publishing.
        let (token, id) = wait_leader(&env, Duration::from_secs(10), |_, _| true)
            .await
            .expect("a leader");
        let standby = if id == "p0" { "p1" } else { "p0" };
        assert!(
            cronpipe_tests::wait_until(Duration::from_secs(10), || async {
                fleet.get(standby).log_text().contains("Standing by")
            })
            .await,
            "{}",
            fleet.log_tails()
        );
        random_pause(200, 1500).await;
        let (sent, sent_at) = (Instant::now(), Utc::now());
        fleet.signal(&id, Signal::SIGTERM);
        let (new_token, new_id) = wait_leader(&env, Duration::from_secs(5), |t, _| t > token)
            .await
            .expect("the standby takes over");
        let lease_gap = sent.elapsed();
        assert_eq!(new_id, standby);
        let first = rec
            .wait_for(Duration::from_secs(5), |r| r.token() == new_token)
            .await
            .expect("the new leader publishes");
        // The first slot after SIGTERM may be due up to a second later: what
        // the handover adds is the arrival minus the later of SIGTERM and the slot.
        let publish_gap = (first.at - sent_at.max(first.slot()))
            .to_std()
            .unwrap_or_default();
        eprintln!(
            "SIGTERM {n} to {id}: lease taken by {new_id} after {lease_gap:?}; its first slot {} arrived {publish_gap:?} after max(SIGTERM, slot)",
            first.slot()
        );
        assert!(
            fleet.wait_exit(&id, Duration::from_secs(10)),
            "{id} did not exit after SIGTERM\n{}",
            fleet.log_tails()
        );
        assert!(fleet
            .get(&id)
            .log_text()
            .contains("Released the leader lease"));
        lease_gaps.push(lease_gap);
        publish_gaps.push(publish_gap);
        fleet.start(&id);
    }
    fleet.stop_all();
    let got = rec.finish(&env).await;
    let slots: BTreeSet<_> = got.iter().map(Received::slot).collect();
    assert!(
        gaps(&slots, chrono::Duration::seconds(1)).is_empty(),
        "no slot lost on handover"
    );
    eprintln!(
        "SIGTERM handover: lease {} ; publish {}",
        describe(&lease_gaps),
        describe(&publish_gaps)
    );
    for (n, (l, p)) in lease_gaps.iter().zip(&publish_gaps).enumerate() {
        assert!(*l <= bound, "handover {n}: lease taken after {l:?}");
        assert!(*p <= bound, "handover {n}: first publish delayed {p:?}");
    }
    env.cleanup().await;
}
