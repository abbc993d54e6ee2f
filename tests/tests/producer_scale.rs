//! One producer with 10,000 schedules (in-process, real Redis, RabbitMQ or
//! Kafka, a hand-driven clock): every new schedule's baseline watermark is stored,
//! and the 1,000 of them that fire on the same second go out in one
//! pipelined batch, every time.

mod producer_common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cronpipe_producer::clock::ManualClock;
use cronpipe_shared::config::{BuiltSchedule, MisfirePolicy, ScheduleConfig};
use cronpipe_tests::{broker_test, wait_until, TestEnv};
use producer_common::*;

fn schedule(name: &str, cron: &str) -> BuiltSchedule {
    ScheduleConfig {
        cron: Some(cron.into()),
        every: None,
        anchor: None,
        iso: None,
        timezone: None,
        task: "t".into(),
        payload: Some(serde_json::json!({ "schedule": name })),
        misfire: MisfirePolicy::FireOnce,
        catchup_window: None,
        max_catchup: None,
        enabled: true,
    }
    .build(name)
    .expect("schedule")
}

broker_test!(ten_thousand_schedules_and_a_thousand_on_one_second_in_one_batch);
async fn ten_thousand_schedules_and_a_thousand_on_one_second_in_one_batch(env: TestEnv) {
    let config = env.config(&noop_task("t"));
    // 1,000 fire at second 0 of every minute; 9,000 once a year (at different seconds).
    let mut set: Vec<BuiltSchedule> = (0..1000)
        .map(|i| schedule(&format!("minute-{i:04}"), "0 * * * * *"))
        .collect();
    set.extend((0..9000).map(|i| {
        schedule(
            &format!("yearly-{i:04}"),
            &format!("{} {} 0 1 1 *", i % 60, (i / 60) % 60),
        )
    }));
    let t0 = utc("2026-06-01T12:00:00Z");
    let start = t0 + chrono::Duration::seconds(30);
    let clock = Arc::new(ManualClock::new(start));
    let rec = Recorder::start(&env).await;
    let loading = Instant::now();
    let p = InProc::start_with(
        &env,
        &config,
        set,
        "scale",
        clock.clone(),
        Duration::from_secs(1),
    )
    .await;
    // Every new schedule's baseline ("from now") is stored.
    let mut conn = env.store.connection();
    let key = env.store.keys().watermarks();
    assert!(
        wait_until(Duration::from_secs(60), || {
            let mut conn = conn.clone();
            let key = key.clone();
            async move {
                redis::cmd("HLEN")
                    .arg(&key)
                    .query_async::<usize>(&mut conn)
                    .await
                    .unwrap_or(0)
                    == 10_000
            }
        })
        .await,
        "baseline watermarks of 10,000 schedules"
    );
    eprintln!(
        "10,000 schedules leading with baselines stored after {:?}",
        loading.elapsed()
    );
    let baseline: i64 = redis::cmd("HGET")
        .arg(&key)
        .arg("yearly-0042")
        .query_async(&mut conn)
        .await
        .expect("hget");
    assert_eq!(baseline, start.timestamp_millis());

    for minute in 1..=3 {
        let slot = t0 + chrono::Duration::minutes(minute);
        let before = rec.len();
        let fired = Instant::now();
        clock.set(slot);
        assert!(
            wait_until(Duration::from_secs(30), || async {
                rec.len() >= before + 1000
            })
            .await,
            "minute {minute}: {} of 1,000 published",
            rec.len() - before
        );
        let took = fired.elapsed();
        let got: Vec<Received> = rec.snapshot().split_off(before);
        assert_eq!(got.len(), 1000, "exactly the 1,000 due schedules");
        let names: BTreeSet<String> = got
            .iter()
            .map(|r| r.env.schedule.clone().expect("schedule"))
            .collect();
        assert_eq!(names.len(), 1000);
        assert!(names.iter().all(|n| n.starts_with("minute-")));
        assert!(got.iter().all(|r| r.slot() == slot));
        // One `fire` call builds every envelope of a batch with the same
        // creation instant and publishes them with one pipelined publish_batch.
        let created: BTreeSet<_> = got.iter().map(|r| r.env.created_at).collect();
        assert_eq!(
            created.len(),
            1,
            "all 1,000 in one batch: {} creation instants",
            created.len()
        );
        eprintln!("minute {minute}: 1,000 slots published and delivered {took:?} after the clock reached them");
    }
    p.shutdown().await;
    rec.finish(&env).await;
    env.cleanup().await;
}
