//! The producer on a hand-driven wall clock (`ManualClock`), in-process
//! through the real `cronpipe_producer::run` against real Redis and each
//! broker (RabbitMQ, Kafka on the mock cluster):
//! the 2026 DST transitions of New York, London and Sydney for a fixed-time,
//! an hourly-step and an every-minute schedule, and wall-clock steps of one
//! hour back (nothing past the watermark is published again, not even by a
//! new leader) and forward (the stepped-over slots go through the misfire
//! policy), and an expression changed while no producer ran (the new
//! timing starts from now).
//!
//! Time is driven in steps; after each step the test waits (polling) until
//! the Redis watermarks show the producer handled it. The expected slots are
//! written out by hand (fixed-time) or are plain UTC arithmetic (hourly and
//! every-minute slots are every UTC hour and minute: these zones' offsets are
//! whole hours), never computed with the schedule code under test.

mod producer_common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, DurationRound, Utc};
use cronpipe_producer::clock::ManualClock;
use cronpipe_shared::config::BuiltSchedule;
use cronpipe_tests::{broker_test, wait_until, BrokerKind, TestEnv};
use producer_common::*;

fn minutes(n: i64) -> chrono::Duration {
    chrono::Duration::minutes(n)
}

fn hours(n: i64) -> chrono::Duration {
    chrono::Duration::hours(n)
}

/// Waits until every named watermark equals its expected instant.
async fn wait_marks(env: &TestEnv, expect: &[(&str, DateTime<Utc>)], at: DateTime<Utc>) {
    let ok = wait_until(Duration::from_secs(20), || async {
        let marks = env.store.watermarks().await.unwrap_or_default();
        expect.iter().all(|(n, t)| marks.get(*n) == Some(t))
    })
    .await;
    if !ok {
        let marks = env.store.watermarks().await.unwrap_or_default();
        panic!("clock at {at}: watermarks {marks:?}, expected {expect:?}");
    }
}

/// Slots published per schedule, asserting none was published twice.
fn slots_by_schedule(got: &[Received]) -> HashMap<String, BTreeSet<DateTime<Utc>>> {
    let mut seen: BTreeMap<(String, DateTime<Utc>), usize> = BTreeMap::new();
    for r in got {
        *seen
            .entry((r.env.schedule.clone().expect("schedule"), r.slot()))
            .or_default() += 1;
    }
    let doubled: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "slots published twice: {doubled:?}");
    let mut out: HashMap<String, BTreeSet<DateTime<Utc>>> = HashMap::new();
    for (name, slot) in seen.into_keys() {
        out.entry(name).or_default().insert(slot);
    }
    out
}

/// Every instant `start + k·step` in `(start, end]`.
fn every_step(
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    step: chrono::Duration,
) -> BTreeSet<DateTime<Utc>> {
    let mut out = BTreeSet::new();
    let mut t = start + step;
    while t <= end {
        out.insert(t);
        t += step;
    }
    out
}

/// Asserts two slot sets are equal, naming only the differences.
#[track_caller]
fn assert_slots(got: Option<&BTreeSet<DateTime<Utc>>>, want: &BTreeSet<DateTime<Utc>>, what: &str) {
    let empty = BTreeSet::new();
    let got = got.unwrap_or(&empty);
    let missing: Vec<_> = want.difference(got).collect();
    let extra: Vec<_> = got.difference(want).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what}: {} expected, {} published; missing {missing:?}; unexpected {extra:?}",
        want.len(),
        got.len()
    );
}

/// One DST transition, on a broker: the zone, the UTC instant the offset
/// changes, the fixed-time expression, and its expected slots (UTC) from a
/// day before to a day after.
struct Transition {
    kind: BrokerKind,
    label: &'static str,
    zone: &'static str,
    at: &'static str,
    fixed: &'static str,
    fixed_slots: [&'static str; 3],
}

/// Runs the three schedules across `tr` from 26 h before to 26 h after:
/// hourly steps far from the change, minute steps within 90 minutes of it.
async fn across(tr: Transition) {
    let env = TestEnv::on(tr.label, tr.kind).await;
    let config = env.config(&format!(
        r#"
[schedule.fixed]
cron = "{fixed}"
timezone = "{zone}"
task = "t"
misfire = "fire_all"

[schedule.hourly]
cron = "0 0 */1 * * *"
timezone = "{zone}"
task = "t"
misfire = "fire_all"

[schedule.minutely]
cron = "0 * * * * *"
timezone = "{zone}"
task = "t"
misfire = "fire_all"
{task}"#,
        fixed = tr.fixed,
        zone = tr.zone,
        task = noop_task("t")
    ));
    let change = utc(tr.at);
    let (start, end) = (change - hours(26), change + hours(26));
    let fixed: Vec<DateTime<Utc>> = tr.fixed_slots.iter().map(|s| utc(s)).collect();
    let rec = Recorder::start(&env).await;
    let clock = Arc::new(ManualClock::new(start));
    // A generous misfire threshold: coarse steps must not turn slots into
    // misfires; this test is about which slots exist.
    let producer = InProc::start(
        &env,
        &config,
        "dst",
        clock.clone(),
        Duration::from_secs(3 * 3600),
    )
    .await;
    wait_marks(
        &env,
        &[("fixed", start), ("hourly", start), ("minutely", start)],
        start,
    )
    .await;

    let mut steps = Vec::new();
    let mut t = start;
    while t < change - minutes(90) {
        t += hours(1);
        steps.push(t);
    }
    while t < change + minutes(90) {
        t += minutes(1);
        steps.push(t);
    }
    while t < end {
        t = (t + hours(1)).min(end);
        steps.push(t);
    }
    for t in steps {
        clock.set(t);
        let floor = |step: chrono::TimeDelta| t.duration_trunc(step).expect("trunc").max(start);
        let fixed_mark = fixed
            .iter()
            .copied()
            .filter(|s| *s <= t)
            .max()
            .unwrap_or(start);
        wait_marks(
            &env,
            &[
                ("fixed", fixed_mark),
                ("hourly", floor(hours(1))),
                ("minutely", floor(minutes(1))),
            ],
            t,
        )
        .await;
    }
    producer.shutdown().await;
    let got = rec.finish(&env).await;
    let by = slots_by_schedule(&got);
    let tokens: BTreeSet<u64> = got.iter().map(Received::token).collect();
    assert_eq!(tokens.len(), 1, "one leadership throughout: {tokens:?}");
    let fixed_got: Vec<DateTime<Utc>> = by.get("fixed").into_iter().flatten().copied().collect();
    assert_eq!(
        fixed_got, fixed,
        "{}: fixed-time `{}` slots",
        tr.label, tr.fixed
    );
    assert_slots(
        by.get("hourly"),
        &every_step(start, end, hours(1)),
        &format!("{}: hourly", tr.label),
    );
    assert_slots(
        by.get("minutely"),
        &every_step(start, end, minutes(1)),
        &format!("{}: every minute", tr.label),
    );
    eprintln!(
        "{}: fixed {:?}; {} hourly and {} minute slots, each once",
        tr.label,
        fixed_got
            .iter()
            .map(|t| t
                .with_timezone(&cronpipe_shared::schedule::parse_timezone(tr.zone).expect("tz"))
                .to_rfc3339())
            .collect::<Vec<_>>(),
        by["hourly"].len(),
        by["minutely"].len()
    );
    env.cleanup().await;
}

broker_test!(new_york_spring_forward_2026);
async fn new_york_spring_forward_2026(kind: BrokerKind) {
    // 02:00 EST → 03:00 EDT on 2026-03-08 (07:00Z). 02:30 does not exist that
    // day: the slot fires once, right after the gap, at 03:00 EDT.
    across(Transition {
        kind,
        label: "ny-spring",
        zone: "America/New_York",
        at: "2026-03-08T07:00:00Z",
        fixed: "0 30 2 * * *",
        fixed_slots: [
            "2026-03-07T07:30:00Z",
            "2026-03-08T07:00:00Z",
            "2026-03-09T06:30:00Z",
        ],
    })
    .await;
}

broker_test!(new_york_fall_back_2026);
async fn new_york_fall_back_2026(kind: BrokerKind) {
    // 02:00 EDT → 01:00 EST on 2026-11-01 (06:00Z). 01:30 happens twice that
    // day: the slot fires once, at the first (EDT) one.
    across(Transition {
        kind,
        label: "ny-fall",
        zone: "America/New_York",
        at: "2026-11-01T06:00:00Z",
        fixed: "0 30 1 * * *",
        fixed_slots: [
            "2026-10-31T05:30:00Z",
            "2026-11-01T05:30:00Z",
            "2026-11-02T06:30:00Z",
        ],
    })
    .await;
}

broker_test!(london_spring_forward_2026);
async fn london_spring_forward_2026(kind: BrokerKind) {
    // 01:00 GMT → 02:00 BST on 2026-03-29 (01:00Z): 01:30 fires at 02:00 BST.
    across(Transition {
        kind,
        label: "london-spring",
        zone: "Europe/London",
        at: "2026-03-29T01:00:00Z",
        fixed: "0 30 1 * * *",
        fixed_slots: [
            "2026-03-28T01:30:00Z",
            "2026-03-29T01:00:00Z",
            "2026-03-30T00:30:00Z",
        ],
    })
    .await;
}

broker_test!(london_fall_back_2026);
async fn london_fall_back_2026(kind: BrokerKind) {
    // 02:00 BST → 01:00 GMT on 2026-10-25 (01:00Z): 01:30 fires once (BST).
    across(Transition {
        kind,
        label: "london-fall",
        zone: "Europe/London",
        at: "2026-10-25T01:00:00Z",
        fixed: "0 30 1 * * *",
        fixed_slots: [
            "2026-10-24T00:30:00Z",
            "2026-10-25T00:30:00Z",
            "2026-10-26T01:30:00Z",
        ],
    })
    .await;
}

broker_test!(sydney_fall_back_2026);
async fn sydney_fall_back_2026(kind: BrokerKind) {
    // 03:00 AEDT → 02:00 AEST on 2026-04-05 (2026-04-04T16:00Z): 02:30 fires
    // once, at the first (AEDT) one.
    across(Transition {
        kind,
        label: "sydney-fall",
        zone: "Australia/Sydney",
        at: "2026-04-04T16:00:00Z",
        fixed: "0 30 2 * * *",
        fixed_slots: [
            "2026-04-03T15:30:00Z",
            "2026-04-04T15:30:00Z",
            "2026-04-05T16:30:00Z",
        ],
    })
    .await;
}

broker_test!(sydney_spring_forward_2026);
async fn sydney_spring_forward_2026(kind: BrokerKind) {
    // 02:00 AEST → 03:00 AEDT on 2026-10-04 (2026-10-03T16:00Z): 02:30 fires
    // at 03:00 AEDT.
    across(Transition {
        kind,
        label: "sydney-spring",
        zone: "Australia/Sydney",
        at: "2026-10-03T16:00:00Z",
        fixed: "0 30 2 * * *",
        fixed_slots: [
            "2026-10-02T16:30:00Z",
            "2026-10-03T16:00:00Z",
            "2026-10-04T15:30:00Z",
        ],
    })
    .await;
}

fn every_minute(name: &str, policy: &str, extra: &str) -> String {
    format!("\n[schedule.{name}]\ncron = \"0 * * * * *\"\ntask = \"t\"\nmisfire = \"{policy}\"\n{extra}\n")
}

broker_test!(wall_clock_step_back_one_hour_never_republishes_past_the_watermark);
async fn wall_clock_step_back_one_hour_never_republishes_past_the_watermark(env: TestEnv) {
    let config = env.config(&format!(
        "{}{}",
        every_minute("tick", "fire_all", ""),
        noop_task("t")
    ));
    let t0 = utc("2026-06-01T12:00:00Z");
    let start = t0;
    let rec = Recorder::start(&env).await;
    let clock = Arc::new(ManualClock::new(start));
    let threshold = Duration::from_secs(1);
    let p1 = InProc::start(&env, &config, "p1", clock.clone(), threshold).await;
    wait_marks(&env, &[("tick", start)], start).await;
    for k in 1..=5 {
        clock.set(t0 + minutes(k));
        wait_marks(&env, &[("tick", t0 + minutes(k))], t0 + minutes(k)).await;
    }

    // NTP steps the clock back an hour.
    let back = t0 + minutes(5) - hours(1);
    clock.set(back);
    // A probe schedule added now (every 20 minutes from t0 − 45 m) has slots
    // inside the repeated hour; seeing them published proves the producer
    // ran at those times while `tick` stayed silent.
    let probe = cronpipe_shared::config::ScheduleConfig {
        cron: None,
        every: Some("20m".into()),
        anchor: Some((t0 - minutes(45)).to_rfc3339()),
        iso: None,
        timezone: None,
        task: "t".into(),
        payload: None,
        misfire: cronpipe_shared::config::MisfirePolicy::FireAll,
        catchup_window: None,
        max_catchup: None,
        enabled: true,
    }
    .build("probe")
    .expect("probe schedule");
    let mut set: Vec<BuiltSchedule> = config.built_schedules().expect("schedules");
    set.push(probe);
    p1.schedules.send_replace(Arc::new(set.clone()));
    wait_marks(&env, &[("tick", t0 + minutes(5)), ("probe", back)], back).await;
    let probe_mark = |t: DateTime<Utc>| {
        [t0 - minutes(45), t0 - minutes(25), t0 - minutes(5)]
            .into_iter()
            .filter(|s| *s <= t)
            .max()
            .unwrap_or(back)
    };
    let tick_mark = |t: DateTime<Utc>| {
        t.duration_trunc(minutes(1))
            .expect("trunc")
            .max(t0 + minutes(5))
    };
    let mut t = back;
    // The first leader walks through part of the repeated hour ...
    while t < t0 - minutes(40) {
        t += minutes(1);
        clock.set(t);
        wait_marks(&env, &[("tick", tick_mark(t)), ("probe", probe_mark(t))], t).await;
    }
    // ... then hands over (clean stop) to a new leader, which reads the
    // watermarks from Redis while the clock is still behind them.
    let p1_token = leader(&env).await.expect("p1 leads").0;
    p1.shutdown().await;
    let p2 = InProc::start_with(&env, &config, set, "p2", clock.clone(), threshold).await;
    wait_leader(&env, Duration::from_secs(10), |tok, _| tok > p1_token)
        .await
        .expect("p2 leads");
    while t < t0 + minutes(10) {
        t += minutes(1);
        clock.set(t);
        wait_marks(&env, &[("tick", tick_mark(t)), ("probe", probe_mark(t))], t).await;
    }
    p2.shutdown().await;
    let got = rec.finish(&env).await;
    let by = slots_by_schedule(&got);
    assert_slots(
        by.get("tick"),
        &every_step(t0, t0 + minutes(10), minutes(1)),
        "tick slots, each once",
    );
    assert_slots(
        by.get("probe"),
        &BTreeSet::from([t0 - minutes(45), t0 - minutes(25), t0 - minutes(5)]),
        "probe slots inside the repeated hour",
    );
    for r in got
        .iter()
        .filter(|r| r.env.schedule.as_deref() == Some("tick"))
    {
        let by_p1 = r.slot() <= t0 + minutes(5);
        assert_eq!(
            r.token() == p1_token,
            by_p1,
            "slot {} token {}",
            r.slot(),
            r.token()
        );
    }
    env.cleanup().await;
}

broker_test!(wall_clock_step_forward_one_hour_goes_through_the_misfire_policy);
async fn wall_clock_step_forward_one_hour_goes_through_the_misfire_policy(kind: BrokerKind) {
    // Arrival order is publish order (Kafka: one partition), checked below.
    let env = TestEnv::ordered("clock-fwd", kind).await;
    let config = env.config(&format!(
        "{}{}{}{}{}{}",
        every_minute("skip", "skip", ""),
        every_minute("once", "fire_once", ""),
        every_minute("all", "fire_all", ""),
        every_minute("capped", "fire_all", "max_catchup = 10"),
        every_minute("windowed", "fire_all", "catchup_window = \"30m\""),
        noop_task("t")
    ));
    let names = ["skip", "once", "all", "capped", "windowed"];
    let t0 = utc("2026-06-01T12:00:00Z");
    let start = t0;
    let rec = Recorder::start(&env).await;
    let clock = Arc::new(ManualClock::new(start));
    let p = InProc::start(&env, &config, "fwd", clock.clone(), Duration::from_secs(1)).await;
    let marks = |t: DateTime<Utc>| names.iter().map(|n| (*n, t)).collect::<Vec<_>>();
    wait_marks(&env, &marks(start), start).await;
    for k in 1..=2 {
        clock.set(t0 + minutes(k));
        wait_marks(&env, &marks(t0 + minutes(k)), t0 + minutes(k)).await;
    }
    // NTP steps the clock forward an hour: slots t0+3m ..= t0+61m are late
    // by more than the threshold (missed), t0+62m is on time.
    clock.set(t0 + minutes(62));
    wait_marks(&env, &marks(t0 + minutes(62)), t0 + minutes(62)).await;
    clock.set(t0 + minutes(63));
    wait_marks(&env, &marks(t0 + minutes(63)), t0 + minutes(63)).await;
    p.shutdown().await;
    let got = rec.finish(&env).await;
    let by = slots_by_schedule(&got);
    let m = |ks: &[i64]| ks.iter().map(|k| t0 + minutes(*k)).collect::<BTreeSet<_>>();
    let range = |a: i64, b: i64| (a..=b).collect::<Vec<i64>>();
    assert_slots(
        by.get("skip"),
        &m(&[1, 2, 62, 63]),
        "skip publishes no missed slot",
    );
    assert_slots(
        by.get("once"),
        &m(&[1, 2, 61, 62, 63]),
        "fire_once publishes the latest missed slot",
    );
    assert_slots(
        by.get("all"),
        &m(&range(1, 63)),
        "fire_all publishes every missed slot",
    );
    assert_slots(
        by.get("capped"),
        &m(&[&[1, 2][..], &range(52, 63)[..]].concat()),
        "fire_all with max_catchup = 10 publishes the 10 latest missed slots",
    );
    assert_slots(
        by.get("windowed"),
        &m(&[&[1, 2][..], &range(32, 63)[..]].concat()),
        "fire_all with a 30 m window publishes the missed slots of the last 30 minutes",
    );
    // Catch-up goes out oldest first.
    let all: Vec<_> = got
        .iter()
        .filter(|r| r.env.schedule.as_deref() == Some("all"))
        .map(Received::slot)
        .collect();
    assert!(
        all.windows(2).all(|w| w[0] < w[1]),
        "fire_all catch-up in slot order"
    );
    env.cleanup().await;
}

broker_test!(a_timing_changed_while_no_producer_ran_continues_from_now);
/// A deploy changes a schedule's expression while no producer runs: the new
/// leader finds a watermark written under the old one. Its slots are not the
/// new expression's, so the schedule continues from now, as on a hot reload,
/// instead of catching up every minute since the last daily slot.
async fn a_timing_changed_while_no_producer_ran_continues_from_now(env: TestEnv) {
    let daily = env.config(&format!(
        "\n[schedule.report]\ncron = \"0 0 3 * * *\"\ntask = \"t\"\nmisfire = \"fire_all\"\n{}",
        noop_task("t")
    ));
    let t0 = utc("2026-06-01T03:00:00Z");
    let rec = Recorder::start(&env).await;
    let clock = Arc::new(ManualClock::new(t0 - minutes(1)));
    let p1 = InProc::start(&env, &daily, "p1", clock.clone(), Duration::from_secs(1)).await;
    wait_marks(&env, &[("report", t0 - minutes(1))], t0 - minutes(1)).await;
    clock.set(t0);
    wait_marks(&env, &[("report", t0)], t0).await;
    p1.shutdown().await;

    // Two hours later the new config, every minute, starts.
    let later = t0 + hours(2);
    clock.set(later);
    let p2 = InProc::start(
        &env,
        &env.config(&format!(
            "{}{}",
            every_minute("report", "fire_all", ""),
            noop_task("t")
        )),
        "p2",
        clock.clone(),
        Duration::from_secs(1),
    )
    .await;
    wait_marks(&env, &[("report", later)], later).await;
    clock.set(later + minutes(1));
    wait_marks(&env, &[("report", later + minutes(1))], later + minutes(1)).await;
    p2.shutdown().await;
    let got = rec.finish(&env).await;
    assert_slots(
        slots_by_schedule(&got).get("report"),
        &BTreeSet::from([t0, later + minutes(1)]),
        "the daily slot, then only the new timing's slots after its start",
    );
    env.cleanup().await;
}
