//! A real `producer` process through a Redis failover: it keeps publishing,
//! loses no slot, and holds its lease on the new primary.
//!
//! The producer reaches Redis through a proxy (the address a deployment's
//! clients use) in front of a primary A replicated by B, both throw-away
//! `redis-server`s of this test. The failover is Sentinel's: B is promoted,
//! the address moves to B, A becomes B's replica. The producer's open
//! connection still leads to A, which now refuses every write `READONLY`;
//! cronpipe must notice and reconnect, or the producer could never renew or
//! take the lease again and every later slot would be missed.

mod producer_common;

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::Utc;
use cronpipe_tests::redis_failover::Pair;
use cronpipe_tests::{broker_test, TestEnv};
use producer_common::*;

broker_test!(a_redis_failover_loses_no_slot_and_the_lease_moves_to_the_new_primary);
async fn a_redis_failover_loses_no_slot_and_the_lease_moves_to_the_new_primary(env: TestEnv) {
    let pair = Pair::start().await;
    let cfg = env.write_config("cronpipe.toml", &tick_config("fire_all"));
    let mut fleet = Fleet::new(&cfg, env.dir.path());
    fleet.set_env("p0", &[("CRONPIPE__REDIS__URL", pair.url().as_str())]);
    let rec = Recorder::start(&env).await;
    fleet.start("p0");
    let first = rec
        .wait_for(Duration::from_secs(30), |_| true)
        .await
        .unwrap_or_else(|| panic!("nothing published\n{}", fleet.log_tails()));
    // A few slots on A first.
    assert!(
        rec.reaches(
            first.slot() + chrono::Duration::seconds(2),
            Duration::from_secs(10)
        )
        .await,
        "{}",
        fleet.log_tails()
    );
    let failed_over_at = Utc::now();
    pair.fail_over();
    // Slots keep coming after the failover.
    assert!(
        rec.reaches(
            failed_over_at + chrono::Duration::seconds(4),
            Duration::from_secs(20)
        )
        .await,
        "no slot published after the Redis failover\n{}",
        fleet.log_tails()
    );
    let logs = fleet.all_logs();
    assert!(
        logs.contains("Redis answered READONLY"),
        "the producer never saw the demoted server refuse a write, so this test did not test the failover\n{}",
        fleet.log_tails()
    );
    let lease = pair
        .b
        .get(&env.store.keys().leader())
        .expect("the lease is on the new primary");
    let (token, holder) = parse_lease(&lease).expect("lease value");
    assert_eq!(holder, "p0");
    fleet.stop_all();
    let got = rec.finish(&env).await;

    // Every slot from the first to the last, none twice in one leadership.
    let by_slot = once_per_leadership(&got);
    let slots: BTreeSet<_> = by_slot.keys().copied().collect();
    let missing = gaps(&slots, chrono::Duration::seconds(1));
    assert!(
        missing.is_empty(),
        "slots lost in the failover: {missing:?}"
    );
    let doubles = by_slot.values().filter(|t| t.len() > 1).count();
    eprintln!(
        "redis failover: {} slots, {doubles} published twice (by different leaderships), tokens {:?}, lease on B: token {token}",
        slots.len(),
        leadership_spans(&got).keys().collect::<Vec<_>>()
    );
    env.cleanup().await;
}
