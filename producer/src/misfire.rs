//! Which slots to publish now: the slots of a schedule between its cursor (the
//! last slot handled) and now, sorted into on-time slots (published) and missed
//! ones (handled by the schedule's misfire policy). The same rule covers a
//! leader starting or taking over, a broker outage, and a wall clock stepped
//! forward: whatever is late by more than the misfire threshold is "missed".

use std::collections::VecDeque;
use std::time::Duration;

use chrono::{DateTime, Utc};
use cronpipe_shared::config::{BuiltSchedule, MisfirePolicy};

/// Most slots walked one by one in one plan. A schedule further behind than
/// this (a per-second schedule after a day or more of downtime) stops counting
/// the slots older than its catch-up window one by one and jumps to the window;
/// its `missed` and `skipped` counts are then lower bounds ([`Plan::truncated`]).
pub const MAX_SCAN: usize = 100_000;

/// What to do for one schedule now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Slots to publish, oldest first.
    pub publish: Vec<DateTime<Utc>>,
    /// Slots found late by more than the threshold (published or not).
    pub missed: u64,
    /// Missed slots not published (policy, window or cap).
    pub skipped: u64,
    /// Missed slots published anyway (catch-up).
    pub caught_up: u64,
    /// The cursor once this plan is carried out: every slot at or before it is
    /// handled. The latest slot at or before now, or `None` when no slot was due.
    pub cursor: Option<DateTime<Utc>>,
    /// True when slots older than the window were jumped over uncounted
    /// (more than [`MAX_SCAN`] of them): `missed` and `skipped` are lower bounds.
    pub truncated: bool,
}

/// Plans the slots in `(cursor, now]`.
///
/// - A slot at most `threshold` old is on time and always published.
/// - An older slot is missed. Missed slots older than the schedule's
///   `catchup_window` are skipped; the others go through the misfire policy:
///   `skip` publishes none, `fire_once` the most recent one, `fire_all` the most
///   recent `max_catchup` ones. Everything published goes out oldest first.
/// - `now <= cursor` (nothing due, or the wall clock stepped back behind the
///   watermark) plans nothing: a slot at or before the cursor is never planned again.
pub fn plan(
    def: &BuiltSchedule,
    cursor: DateTime<Utc>,
    now: DateTime<Utc>,
    threshold: Duration,
) -> Plan {
    let mut out = Plan::default();
    if now <= cursor {
        return out;
    }
    let window = chrono::Duration::from_std(def.catchup_window).unwrap_or(chrono::Duration::MAX);
    let threshold = chrono::Duration::from_std(threshold).unwrap_or(chrono::Duration::MAX);
    let oldest_considered = now
        .checked_sub_signed(window)
        .unwrap_or(DateTime::<Utc>::MIN_UTC);
    let keep_cap = match def.misfire {
        MisfirePolicy::Skip => 0,
        MisfirePolicy::FireOnce => 1,
        MisfirePolicy::FireAll => def.max_catchup as usize,
    };
    // Only the most recent `keep_cap` missed slots are kept, so a long outage
    // costs time to count but no memory.
    let mut kept: VecDeque<DateTime<Utc>> = VecDeque::with_capacity(keep_cap.min(1024));
    let mut missed_in_window = 0u64;
    let mut on_time: Vec<DateTime<Utc>> = Vec::new();
    let mut t = cursor;
    let mut scanned = 0usize;
    while let Some(slot) = def.schedule.next_after(t) {
        if slot > now {
            break;
        }
        scanned += 1;
        t = slot;
        out.cursor = Some(slot);
        if now - slot <= threshold {
            on_time.push(slot);
        } else if slot < oldest_considered {
            out.missed += 1;
            out.skipped += 1;
            if scanned >= MAX_SCAN {
                // Far behind: jump to just before the window (a slot exactly
                // at its start is still considered) without walking the rest.
                let before_window = oldest_considered - chrono::Duration::milliseconds(1);
                if before_window > t {
                    t = before_window;
                    out.cursor = Some(before_window);
                    out.truncated = true;
                }
            }
        } else {
            missed_in_window += 1;
            if keep_cap > 0 {
                if kept.len() == keep_cap {
                    kept.pop_front();
                }
                kept.push_back(slot);
            }
        }
    }
    let keep = kept.len() as u64;
    out.missed += missed_in_window;
    out.skipped += missed_in_window - keep;
    out.caught_up = keep;
    out.publish = kept.into_iter().chain(on_time).collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use cronpipe_shared::config::ScheduleConfig;

    fn def(policy: MisfirePolicy, window: &str, cap: u32) -> BuiltSchedule {
        ScheduleConfig {
            cron: Some("* * * * * *".into()),
            every: None,
            anchor: None,
            iso: None,
            timezone: None,
            task: "t".into(),
            payload: None,
            misfire: policy,
            catchup_window: Some(cronpipe_shared::duration::Dur(
                cronpipe_shared::duration::parse_duration(window).unwrap(),
            )),
            max_catchup: Some(cap),
            enabled: true,
        }
        .build("s")
        .unwrap()
    }

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    const T: Duration = Duration::from_secs(1);

    #[test]
    fn on_time_slots_are_published() {
        let p = plan(&def(MisfirePolicy::Skip, "1h", 10), at(0), at(1), T);
        assert_eq!(p.publish, vec![at(1)]);
        assert_eq!((p.missed, p.skipped), (0, 0));
        assert_eq!(p.cursor, Some(at(1)));
    }

    #[test]
    fn nothing_due_before_cursor() {
        let p = plan(&def(MisfirePolicy::FireAll, "1h", 10), at(5), at(3), T);
        assert_eq!(p, Plan::default());
    }

    #[test]
    fn skip_publishes_only_on_time() {
        let p = plan(&def(MisfirePolicy::Skip, "1h", 10), at(0), at(10), T);
        assert_eq!(p.publish, vec![at(9), at(10)]);
        assert_eq!((p.missed, p.skipped, p.caught_up), (8, 8, 0));
        assert_eq!(p.cursor, Some(at(10)));
    }

    #[test]
    fn fire_once_publishes_latest_missed() {
        let p = plan(&def(MisfirePolicy::FireOnce, "1h", 10), at(0), at(10), T);
        assert_eq!(p.publish, vec![at(8), at(9), at(10)]);
        assert_eq!((p.missed, p.skipped, p.caught_up), (8, 7, 1));
    }

    #[test]
    fn fire_all_publishes_all_up_to_cap() {
        let p = plan(&def(MisfirePolicy::FireAll, "1h", 100), at(0), at(10), T);
        assert_eq!(p.publish, (1..=10).map(at).collect::<Vec<_>>());
        assert_eq!((p.missed, p.skipped, p.caught_up), (8, 0, 8));
        let p = plan(&def(MisfirePolicy::FireAll, "1h", 3), at(0), at(10), T);
        assert_eq!(p.publish, vec![at(6), at(7), at(8), at(9), at(10)]);
        assert_eq!((p.missed, p.skipped, p.caught_up), (8, 5, 3));
    }

    #[test]
    fn window_bounds_the_look_back() {
        let p = plan(&def(MisfirePolicy::FireAll, "5s", 100), at(0), at(20), T);
        // Slots 15..=20 are within 5 s of now; 1..=14 are outside the window.
        assert_eq!(p.publish, (15..=20).map(at).collect::<Vec<_>>());
        assert_eq!(p.skipped, 14);
        assert_eq!(p.missed, 14 + 4);
    }

    fn every(policy: MisfirePolicy, period: &str, window: &str, cap: u32) -> BuiltSchedule {
        ScheduleConfig {
            cron: None,
            every: Some(period.into()),
            anchor: None,
            iso: None,
            timezone: None,
            task: "t".into(),
            payload: None,
            misfire: policy,
            catchup_window: Some(cronpipe_shared::duration::Dur(
                cronpipe_shared::duration::parse_duration(window).unwrap(),
            )),
            max_catchup: Some(cap),
            enabled: true,
        }
        .build("e")
        .unwrap()
    }

    fn ms(t: DateTime<Utc>, ms: i64) -> DateTime<Utc> {
        t + chrono::Duration::milliseconds(ms)
    }

    #[test]
    fn lateness_equal_to_the_threshold_is_on_time() {
        // Slot 9 is exactly 1 s late at now = 10: on time, not missed.
        let p = plan(&def(MisfirePolicy::Skip, "1h", 10), at(8), at(10), T);
        assert_eq!(p.publish, vec![at(9), at(10)]);
        assert_eq!((p.missed, p.skipped), (0, 0));
        // One millisecond later it is missed and skipped.
        let p = plan(&def(MisfirePolicy::Skip, "1h", 10), at(8), ms(at(10), 1), T);
        assert_eq!(p.publish, vec![at(10)]);
        assert_eq!((p.missed, p.skipped), (1, 1));
    }

    #[test]
    fn fire_once_without_misses_publishes_only_on_time_slots() {
        let p = plan(&def(MisfirePolicy::FireOnce, "1h", 10), at(0), at(2), T);
        assert_eq!(p.publish, vec![at(1), at(2)]);
        assert_eq!((p.missed, p.skipped, p.caught_up), (0, 0, 0));
    }

    #[test]
    fn fire_all_cap_keeps_the_most_recent_missed_slots_oldest_first() {
        let p = plan(&def(MisfirePolicy::FireAll, "1h", 1), at(0), at(10), T);
        assert_eq!(p.publish, vec![at(8), at(9), at(10)]);
        assert_eq!((p.missed, p.skipped, p.caught_up), (8, 7, 1));
        let p = plan(&def(MisfirePolicy::FireAll, "1h", 100), at(0), at(200), T);
        assert_eq!(p.publish.len(), 100 + 2);
        assert_eq!(p.publish[0], at(99));
        assert!(p.publish.windows(2).all(|w| w[0] < w[1]), "oldest first");
        assert_eq!((p.missed, p.skipped, p.caught_up), (198, 98, 100));
    }

    #[test]
    fn on_time_slots_are_published_even_with_a_window_shorter_than_the_threshold() {
        let p = plan(
            &def(MisfirePolicy::Skip, "500ms", 10),
            at(0),
            ms(at(2), 900),
            T,
        );
        // Slot 2 is 900 ms late: on time although outside the 500 ms window.
        assert_eq!(p.publish, vec![at(2)]);
        assert_eq!((p.missed, p.skipped), (1, 1));
    }

    #[test]
    fn a_cursor_just_before_a_slot_includes_that_slot() {
        // After a partial batch failure the cursor is the failed slot − 1 ms.
        for d in [
            def(MisfirePolicy::FireAll, "1h", 10),
            every(MisfirePolicy::FireAll, "1s", "1h", 10),
        ] {
            let p = plan(&d, ms(at(3), -1), at(4), T);
            assert_eq!(p.publish, vec![at(3), at(4)], "{}", d.name);
            assert_eq!(p.cursor, Some(at(4)));
        }
    }

    #[test]
    fn a_clock_stepped_back_behind_the_cursor_plans_nothing() {
        let p = plan(&def(MisfirePolicy::FireAll, "1h", 10), at(3600), at(0), T);
        assert_eq!(p, Plan::default());
        // Equal to the cursor: the slot at the cursor is handled already.
        let p = plan(&def(MisfirePolicy::FireAll, "1h", 10), at(10), at(10), T);
        assert_eq!(p, Plan::default());
    }

    #[test]
    fn a_slot_exactly_at_the_window_start_is_considered() {
        let p = plan(&def(MisfirePolicy::FireAll, "5s", 100), at(0), at(20), T);
        assert_eq!(p.publish.first(), Some(&at(15)));
    }

    #[test]
    fn far_behind_jumps_to_the_window_and_says_counts_are_lower_bounds() {
        // A per-second schedule 10 days behind with a 1 h window: 864,000 slots.
        let d = every(MisfirePolicy::FireAll, "1s", "1h", 5);
        let now = at(10 * 86_400);
        let started = std::time::Instant::now();
        let p = plan(&d, at(0), now, T);
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        assert!(p.truncated);
        assert_eq!(p.cursor, Some(now));
        assert_eq!(
            p.publish,
            vec![
                at(864_000 - 6),
                at(864_000 - 5),
                at(864_000 - 4),
                at(864_000 - 3),
                at(864_000 - 2),
                at(864_000 - 1),
                now
            ]
        );
        assert!(p.skipped >= MAX_SCAN as u64, "{}", p.skipped);
        assert!(p.missed >= p.skipped + 5);
        assert_eq!(p.caught_up, 5);
        // The window's 3,599 missed slots were all counted exactly.
        let outside = p.skipped - (3_599 - 5);
        assert_eq!(outside as usize, MAX_SCAN);
    }

    #[test]
    fn behind_by_less_than_max_scan_counts_exactly() {
        let d = every(MisfirePolicy::Skip, "1s", "1h", 5);
        let p = plan(&d, at(0), at(7200), T);
        assert!(!p.truncated);
        assert_eq!(p.missed, 7200 - 2);
        assert_eq!(p.skipped, 7200 - 2);
        assert_eq!(p.publish, vec![at(7199), at(7200)]);
    }

    #[test]
    fn an_ended_schedule_plans_nothing() {
        let d = ScheduleConfig {
            cron: None,
            every: None,
            anchor: None,
            iso: Some("R2/2026-01-01T00:00:00Z/PT1H".into()),
            timezone: None,
            task: "t".into(),
            payload: None,
            misfire: MisfirePolicy::FireAll,
            catchup_window: None,
            max_catchup: None,
            enabled: true,
        }
        .build("iso")
        .unwrap();
        let start = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let p = plan(
            &d,
            start + chrono::Duration::hours(1),
            start + chrono::Duration::days(3),
            T,
        );
        assert_eq!(p, Plan::default());
        // Both slots missed within the 24 h default window: all published.
        let p = plan(
            &d,
            start - chrono::Duration::seconds(1),
            start + chrono::Duration::hours(3),
            T,
        );
        assert_eq!(p.publish, vec![start, start + chrono::Duration::hours(1)]);
        assert_eq!(p.caught_up, 2);
    }
}
