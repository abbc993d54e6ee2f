//! Which slots to publish now: the slots of a schedule between its cursor (the
//! last slot handled) and now, sorted into on-time slots (published) and missed
//! ones (handled by the schedule's misfire policy). The same rule covers a
//! leader starting or taking over, a broker outage, and a wall clock stepped
//! forward: whatever is late by more than the misfire threshold is "missed".

use std::time::Duration;

use chrono::{DateTime, Utc};
use cronpipe_shared::config::{BuiltSchedule, MisfirePolicy};

/// Most slots looked at in one plan; beyond this the rest are counted as skipped in one step.
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
    /// The cursor once this plan is carried out: the latest slot at or before now.
    pub cursor: Option<DateTime<Utc>>,
}

/// Plans the slots in `(cursor, now]`.
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
    let threshold = chrono::Duration::from_std(threshold).unwrap_or_default();
    let oldest_considered = now - window;
    let mut missed: Vec<DateTime<Utc>> = Vec::new();
    let mut on_time: Vec<DateTime<Utc>> = Vec::new();
    let mut t = cursor;
    let mut scanned = 0usize;
    while let Some(slot) = def.schedule.next_after(t) {
        if slot > now {
            break;
        }
        scanned += 1;
        out.cursor = Some(slot);
        if slot < oldest_considered {
            out.missed += 1;
            out.skipped += 1;
        } else if now - slot > threshold {
            missed.push(slot);
        } else {
            on_time.push(slot);
        }
        t = slot;
        if scanned >= MAX_SCAN && slot < oldest_considered {
            // Far behind: jump to the window without walking every slot.
            t = oldest_considered;
        }
    }
    out.missed += missed.len() as u64;
    let keep = match def.misfire {
        MisfirePolicy::Skip => 0,
        MisfirePolicy::FireOnce => missed.len().min(1),
        MisfirePolicy::FireAll => missed.len().min(def.max_catchup as usize),
    };
    out.skipped += (missed.len() - keep) as u64;
    out.caught_up = keep as u64;
    out.publish = missed.split_off(missed.len() - keep);
    out.publish.extend(on_time);
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
}
