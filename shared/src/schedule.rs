//! When a schedule fires: cron expressions (croner) in an IANA timezone,
//! fixed intervals (`every`) aligned to an anchor, and ISO 8601 repeating
//! intervals. All three answer one question: the first slot strictly after an
//! instant, in UTC.
//!
//! DST follows classic cron semantics (pinned by the tests below): a schedule
//! with no wildcard or step in its second, minute and hour fields names
//! wall-clock times ([`is_wall_clock`]); such a time in the spring-forward
//! gap fires once, right after the gap, and one in the repeated fall-back
//! hour once, at its first occurrence. The rest follow real elapsed time.

use std::str::FromStr;

use chrono::{DateTime, Datelike, Duration as ChronoDuration, FixedOffset, Months, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;

/// A parsed, validated schedule.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// A cron expression evaluated in a timezone.
    Cron {
        /// The expression as written (validated; its parsed pattern lives in
        /// a bounded cache shared by all schedules, see [`parsed_cron`]).
        expr: String,
        /// Zone the expression's wall-clock fields are read in.
        tz: Tz,
    },
    /// Every `period`, at `anchor + k * period`.
    Every {
        /// The interval.
        period: ChronoDuration,
        /// An instant every slot is aligned to.
        anchor: DateTime<Utc>,
    },
    /// An ISO 8601 repeating interval `R[n]/start/period`.
    Iso(IsoRepeat),
}

/// An ISO 8601 repeating interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsoRepeat {
    /// Number of slots, or unbounded.
    pub repetitions: Option<u32>,
    /// The first slot, with its UTC offset (calendar steps are taken in that offset).
    pub start: DateTime<FixedOffset>,
    /// The step between slots.
    pub period: IsoPeriod,
}

/// An ISO 8601 duration, kept in calendar units so months and years step by the calendar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IsoPeriod {
    /// Whole months (years are stored as 12 months).
    pub months: u32,
    /// Whole days (weeks are stored as 7 days).
    pub days: u32,
    /// Seconds of clock time.
    pub seconds: u64,
}

/// Names of cron fields by position, for each accepted field count.
fn field_names(count: usize) -> Option<&'static [&'static str]> {
    const FIVE: &[&str] = &["minute", "hour", "day-of-month", "month", "day-of-week"];
    const SIX: &[&str] = &[
        "second",
        "minute",
        "hour",
        "day-of-month",
        "month",
        "day-of-week",
    ];
    const SEVEN: &[&str] = &[
        "second",
        "minute",
        "hour",
        "day-of-month",
        "month",
        "day-of-week",
        "year",
    ];
    match count {
        5 => Some(FIVE),
        6 => Some(SIX),
        7 => Some(SEVEN),
        _ => None,
    }
}

/// Parses a cron expression (5, 6 or 7 fields, or an `@` nickname). The error
/// names the offending field and value where one field is at fault.
pub fn parse_cron(expr: &str) -> Result<Cron, String> {
    let trimmed = expr.trim();
    if trimmed.is_empty() {
        return Err("expected a cron expression, got an empty string".into());
    }
    if let Some(nick) = trimmed.strip_prefix('@') {
        const NICKS: &[&str] = &[
            "yearly", "annually", "monthly", "weekly", "daily", "midnight", "hourly",
        ];
        if !NICKS.contains(&nick.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "unknown nickname `{trimmed}`; expected one of @yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly"
            ));
        }
        return Cron::from_str(trimmed).map_err(|e| e.to_string());
    }
    let fields: Vec<&str> = trimmed.split_whitespace().collect();
    let Some(names) = field_names(fields.len()) else {
        return Err(format!(
            "expected 5 fields (minute hour day-of-month month day-of-week), 6 (with seconds first) or 7 (with a year last), got {}",
            fields.len()
        ));
    };
    match Cron::from_str(trimmed) {
        Ok(cron) => Ok(cron),
        Err(whole) => {
            // Find the field at fault by parsing it alone, every other field a wildcard.
            for (i, field) in fields.iter().enumerate() {
                let probe: Vec<&str> = (0..fields.len())
                    .map(|j| if j == i { *field } else { "*" })
                    .collect();
                if let Err(e) = Cron::from_str(&probe.join(" ")) {
                    return Err(format!(
                        "{} field has invalid value `{field}`: {}",
                        names[i],
                        describe_cron_error(names[i], &e)
                    ));
                }
            }
            Err(whole.to_string())
        }
    }
}

fn describe_cron_error(field: &str, e: &croner::errors::CronError) -> String {
    let range = match field {
        "second" | "minute" => "0-59",
        "hour" => "0-23",
        "day-of-month" => "1-31, L or nW",
        "month" => "1-12 or JAN-DEC",
        "day-of-week" => "0-7, SUN-SAT, nL or d#n",
        "year" => "a year such as 2030",
        _ => "",
    };
    format!("{e} (expected {range}, or * , - / ?)")
}

/// Parses an IANA timezone name such as `Europe/London`.
pub fn parse_timezone(name: &str) -> Result<Tz, String> {
    Tz::from_str(name).map_err(|_| {
        format!(
            "unknown timezone `{name}`; expected an IANA name such as `UTC` or `America/New_York`"
        )
    })
}

/// Parses an ISO 8601 repeating interval `R[n]/<RFC 3339 start>/<period>`.
pub fn parse_iso_repeat(text: &str) -> Result<IsoRepeat, String> {
    let expected = "expected an ISO 8601 repeating interval such as `R5/2026-01-01T09:00:00Z/P1M` or `R/2026-06-01T08:00:00+02:00/PT2H`";
    let parts: Vec<&str> = text.trim().split('/').collect();
    if parts.len() != 3 {
        return Err(format!("`{text}` has {} part(s); {expected}", parts.len()));
    }
    let reps = parts[0]
        .strip_prefix('R')
        .ok_or_else(|| format!("`{}` does not start with R; {expected}", parts[0]))?;
    let repetitions = if reps.is_empty() {
        None
    } else {
        let n: u32 = reps
            .parse()
            .map_err(|_| format!("repetition count `{reps}` is not a whole number; {expected}"))?;
        if n == 0 {
            return Err(format!("repetition count must be at least 1; {expected}"));
        }
        Some(n)
    };
    let start = DateTime::parse_from_rfc3339(parts[1]).map_err(|e| {
        format!(
            "start `{}` is not an RFC 3339 instant ({e}); {expected}",
            parts[1]
        )
    })?;
    if !whole_millis(&start) {
        return Err(format!(
            "start `{}` is finer than a millisecond; {SUB_MILLI}",
            parts[1]
        ));
    }
    let period = parse_iso_period(parts[2]).map_err(|e| format!("{e}; {expected}"))?;
    Ok(IsoRepeat {
        repetitions,
        start,
        period,
    })
}

fn parse_iso_period(text: &str) -> Result<IsoPeriod, String> {
    let body = text
        .strip_prefix('P')
        .ok_or_else(|| format!("period `{text}` does not start with P"))?;
    let (date, time) = match body.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (body, None),
    };
    let mut period = IsoPeriod::default();
    let mut any = false;
    let mut take = |part: &str, in_time: bool| -> Result<(), String> {
        let mut num = String::new();
        for c in part.chars() {
            if c.is_ascii_digit() {
                num.push(c);
                continue;
            }
            let n: u64 = num
                .parse()
                .map_err(|_| format!("period `{text}` has a unit `{c}` without a number"))?;
            num.clear();
            any = true;
            let small =
                |n: u64| u32::try_from(n).map_err(|_| format!("period `{text}` is too large"));
            match (in_time, c) {
                (false, 'Y') => period.months += small(n)?.saturating_mul(12),
                (false, 'M') => period.months += small(n)?,
                (false, 'W') => period.days += small(n)?.saturating_mul(7),
                (false, 'D') => period.days += small(n)?,
                (true, 'H') => period.seconds += n.saturating_mul(3600),
                (true, 'M') => period.seconds += n.saturating_mul(60),
                (true, 'S') => period.seconds += n,
                _ => return Err(format!("period `{text}` has an unknown unit `{c}`")),
            }
        }
        if num.is_empty() {
            Ok(())
        } else {
            Err(format!("period `{text}` ends with a number without a unit"))
        }
    };
    take(date, false)?;
    if let Some(t) = time {
        take(t, true)?;
    }
    if !any || (period.months == 0 && period.days == 0 && period.seconds == 0) {
        return Err(format!("period `{text}` must be longer than zero"));
    }
    Ok(period)
}

impl IsoRepeat {
    /// The k-th slot (k = 0 is the start), computed from the start each time so
    /// calendar steps never drift (Jan 31 + 1 month = Feb 28, + 2 months = Mar 31).
    pub fn slot(&self, k: u32) -> Option<DateTime<Utc>> {
        let months = self.period.months.checked_mul(k)?;
        let base = self.start.checked_add_months(Months::new(months))?;
        let days = i64::from(self.period.days).checked_mul(i64::from(k))?;
        let secs = i64::try_from(self.period.seconds)
            .ok()?
            .checked_mul(i64::from(k))?;
        let t = base
            .checked_add_signed(ChronoDuration::try_days(days)?)?
            .checked_add_signed(ChronoDuration::try_seconds(secs)?)?;
        Some(t.with_timezone(&Utc))
    }

    fn approx_seconds(&self) -> i64 {
        let p = self.period;
        i64::from(p.months) * 28 * 86_400 + i64::from(p.days) * 86_400 + p.seconds as i64
    }

    fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let last = self.repetitions.map(|n| n - 1).unwrap_or(u32::MAX);
        let elapsed = (after - self.start.with_timezone(&Utc)).num_seconds();
        // Start from an under-estimate of k and walk forward.
        let mut k: u32 = if elapsed <= 0 {
            0
        } else {
            let step = self.approx_seconds().max(1);
            u32::try_from((elapsed / step).saturating_sub(2).max(0)).unwrap_or(u32::MAX)
        };
        // Without months every step has the same length (days are 86,400 s
        // in a fixed offset), so the estimate is exact to within the two
        // steps taken off above. A month step is at most 31/28 of its
        // estimate: walk back to be safe (month counts stay small, so the
        // walk does too; with seconds alone it would be millions of steps).
        if self.period.months > 0 {
            k = k.saturating_sub(k / 9);
        }
        while k <= last {
            let slot = self.slot(k)?;
            if slot > after {
                return Some(slot);
            }
            k = k.checked_add(1)?;
        }
        None
    }
}

/// Why slot instants must be whole milliseconds.
const SUB_MILLI: &str = "expected at most millisecond precision (watermarks are kept in \
     milliseconds, so a finer slot would be published again after every restart)";

fn whole_millis<Tz: TimeZone>(t: &DateTime<Tz>) -> bool {
    t.timestamp_subsec_nanos().is_multiple_of(1_000_000)
}

/// Whether a cron expression names wall-clock times: no wildcard or step in
/// its second, minute or hour field (single values, lists and ranges:
/// `0 30 1,13 * * *`, `0 0,30 2 * * *`, `@daily`). Those fire once per
/// matching local time across DST changes; the rest (`0 0 * * * *`,
/// `*/15 1 * * *`, `@hourly`) follow real elapsed time.
///
/// croner itself treats only single values as fixed times, so a list or a
/// range in those fields would fire twice in the repeated fall-back hour and
/// not at all in the spring-forward gap; [`next_wall_clock`] does it instead.
fn is_wall_clock(expr: &str) -> bool {
    let expr = expr.trim();
    if let Some(nick) = expr.strip_prefix('@') {
        return !nick.eq_ignore_ascii_case("hourly");
    }
    let fields: Vec<&str> = expr.split_whitespace().collect();
    let time = match fields.len() {
        5 => &fields[..2],
        _ => &fields[..fields.len().min(3)],
    };
    !time.iter().any(|f| f.contains('*') || f.contains('/'))
}

/// The first slot strictly after `after` of a wall-clock cron in `tz`: the
/// expression's matching local times in order, each at its instant; a time
/// the fall-back repeats counts at its first occurrence only, and a time in
/// the spring-forward gap at the first instant after the gap.
fn next_wall_clock(cron: &Cron, tz: Tz, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    use chrono::offset::LocalResult;
    // Walk local (naive) times: croner in UTC matches wall-clock fields
    // exactly, as UTC has no DST.
    let mut cursor = Utc.from_utc_datetime(&after.with_timezone(&tz).naive_local());
    // Matches already passed in real time (the repeated hour's second pass
    // re-reads local times already fired) are skipped; a day of per-second
    // matches bounds that walk.
    for _ in 0..100_000 {
        let local = cron.find_next_occurrence(&cursor, false).ok()?;
        let instant = match tz.from_local_datetime(&local.naive_utc()) {
            LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => t,
            LocalResult::None => first_after_gap(tz, local.naive_utc())?,
        };
        let instant = instant.with_timezone(&Utc);
        if instant > after {
            return Some(instant);
        }
        cursor = local;
    }
    None
}

/// The first instant after the DST gap that swallows local time `local`
/// (transitions fall on whole minutes; gaps last at most a day).
fn first_after_gap(tz: Tz, local: chrono::NaiveDateTime) -> Option<DateTime<Tz>> {
    use chrono::Timelike;
    let mut m = local.with_second(0)?.with_nanosecond(0)?;
    for _ in 0..(26 * 60) {
        m += ChronoDuration::minutes(1);
        if let Some(t) = tz.from_local_datetime(&m).earliest() {
            return Some(t);
        }
    }
    None
}

impl Schedule {
    /// Builds a cron schedule.
    pub fn cron(expr: &str, tz: Tz) -> Result<Self, String> {
        let expr = expr.trim().to_string();
        let cron = parse_cron(&expr)?;
        cron_cache::insert(&expr, std::sync::Arc::new(cron));
        Ok(Schedule::Cron { expr, tz })
    }

    /// Builds an interval schedule.
    pub fn every(period: std::time::Duration, anchor: DateTime<Utc>) -> Result<Self, String> {
        if !whole_millis(&anchor) {
            return Err(format!(
                "anchor {} is finer than a millisecond; {SUB_MILLI}",
                anchor.to_rfc3339()
            ));
        }
        if period < std::time::Duration::from_secs(1) {
            return Err(format!(
                "interval {} is shorter than the 1s resolution of slots",
                humantime::format_duration(period)
            ));
        }
        if period.subsec_nanos() != 0 {
            return Err(format!(
                "interval {} must be a whole number of seconds",
                humantime::format_duration(period)
            ));
        }
        let period = ChronoDuration::from_std(period).map_err(|e| e.to_string())?;
        Ok(Schedule::Every { period, anchor })
    }

    /// What decides its slots, as text: equal keys, equal slots. Stored with
    /// the schedule's watermark so a leader knows which expression it was
    /// written under (stable across releases: no `Debug` output).
    pub fn timing_key(&self) -> String {
        match self {
            Schedule::Cron { expr, tz } => format!("cron {tz} {expr}"),
            Schedule::Every { period, anchor } => format!(
                "every {}ms {}",
                period.num_milliseconds(),
                anchor.timestamp_millis()
            ),
            Schedule::Iso(iso) => format!(
                "iso {} {} {}mo {}d {}s",
                iso.repetitions
                    .map_or_else(|| "unbounded".to_string(), |n| n.to_string()),
                iso.start.to_rfc3339(),
                iso.period.months,
                iso.period.days,
                iso.period.seconds
            ),
        }
    }

    /// The first slot strictly after `after`, or `None` when the schedule has no more slots.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Cron { expr, tz } => {
                let cron = parsed_cron(expr)?;
                if is_wall_clock(expr) {
                    return next_wall_clock(&cron, *tz, after);
                }
                // Elapsed time: croner walks real instants, so a repeated
                // hour fires again and a skipped one does not fire.
                let base = after.with_timezone(tz);
                cron.find_next_occurrence(&base, false)
                    .ok()
                    .map(|t| t.with_timezone(&Utc))
            }
            Schedule::Every { period, anchor } => {
                let p = period.num_milliseconds();
                let since = (after - *anchor).num_milliseconds();
                let k = since.div_euclid(p) + 1;
                anchor.checked_add_signed(ChronoDuration::milliseconds(k.checked_mul(p)?))
            }
            Schedule::Iso(iso) => iso.next_after(after),
        }
    }

    /// The next `n` slots strictly after `after`.
    pub fn upcoming(&self, after: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
        let mut out = Vec::with_capacity(n);
        let mut cursor = after;
        while out.len() < n {
            match self.next_after(cursor) {
                Some(t) => {
                    out.push(t);
                    cursor = t;
                }
                None => break,
            }
        }
        out
    }

    /// The zone slots are shown in: the cron zone, the ISO start's offset, or UTC.
    pub fn display_zone(&self) -> DisplayZone {
        match self {
            Schedule::Cron { tz, .. } => DisplayZone::Tz(*tz),
            Schedule::Iso(iso) => DisplayZone::Fixed(*iso.start.offset()),
            Schedule::Every { .. } => DisplayZone::Tz(Tz::UTC),
        }
    }
}

/// A zone to print slot instants in.
#[derive(Debug, Clone, Copy)]
pub enum DisplayZone {
    /// A named IANA zone.
    Tz(Tz),
    /// A fixed UTC offset.
    Fixed(FixedOffset),
}

impl DisplayZone {
    /// RFC 3339 text of `t` in this zone, with its offset.
    pub fn format(&self, t: DateTime<Utc>) -> String {
        match self {
            DisplayZone::Tz(tz) => t.with_timezone(tz).to_rfc3339(),
            DisplayZone::Fixed(off) => t.with_timezone(off).to_rfc3339(),
        }
    }
}

/// The parsed pattern of a validated cron expression, from a bounded cache
/// shared by every schedule (parsed again if it was evicted). Parsed patterns
/// are not kept per schedule because croner holds about 5 KB per pattern (a
/// bit for every year it can search), which for 10,000 schedules would be
/// 50 MB per copy of the schedule set.
pub fn parsed_cron(expr: &str) -> Option<std::sync::Arc<Cron>> {
    if let Some(c) = cron_cache::get(expr) {
        return Some(c);
    }
    let cron = std::sync::Arc::new(parse_cron(expr).ok()?);
    cron_cache::insert(expr, cron.clone());
    Some(cron)
}

/// Parsed cron patterns by expression text, least recently used evicted
/// beyond [`cron_cache::CAPACITY`]. A working set larger than that (more
/// distinct expressions firing every second than it holds) still works, at
/// the cost of parsing again (about 20 µs per expression) when evicted.
pub mod cron_cache {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, PoisonError};

    use croner::Cron;

    /// Most parsed patterns kept (about 5 KB each).
    pub const CAPACITY: usize = 256;

    struct Cache {
        map: HashMap<String, (Arc<Cron>, u64)>,
        tick: u64,
    }

    static CACHE: Mutex<Option<Cache>> = Mutex::new(None);

    fn with<T>(f: impl FnOnce(&mut Cache) -> T) -> T {
        let mut guard = CACHE.lock().unwrap_or_else(PoisonError::into_inner);
        let cache = guard.get_or_insert_with(|| Cache {
            map: HashMap::new(),
            tick: 0,
        });
        cache.tick += 1;
        f(cache)
    }

    /// The cached pattern of `expr`, if present (marks it recently used).
    pub fn get(expr: &str) -> Option<Arc<Cron>> {
        with(|c| {
            let tick = c.tick;
            c.map.get_mut(expr).map(|(cron, used)| {
                *used = tick;
                cron.clone()
            })
        })
    }

    /// Caches the pattern of `expr`, evicting the least recently used when full.
    pub fn insert(expr: &str, cron: Arc<Cron>) {
        with(|c| {
            if !c.map.contains_key(expr) && c.map.len() >= CAPACITY {
                if let Some(oldest) = c
                    .map
                    .iter()
                    .min_by_key(|(_, (_, used))| *used)
                    .map(|(k, _)| k.clone())
                {
                    c.map.remove(&oldest);
                }
            }
            let tick = c.tick;
            c.map.insert(expr.to_string(), (cron, tick));
        })
    }

    /// Number of cached patterns.
    pub fn len() -> usize {
        with(|c| c.map.len())
    }
}

/// Whether a year is within the range cron searches; used by tests and `next`.
pub fn year_of(t: DateTime<Utc>) -> i32 {
    t.year()
}

/// Midnight UTC on 1970-01-01: the default anchor of `every` schedules.
pub fn epoch() -> DateTime<Utc> {
    Utc.timestamp_opt(0, 0).single().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn tz(name: &str) -> Tz {
        parse_timezone(name).unwrap()
    }

    fn slots(expr: &str, zone: &str, from: &str, to: &str) -> Vec<String> {
        let s = Schedule::cron(expr, tz(zone)).unwrap();
        let zone = s.display_zone();
        let end = utc(to);
        let mut out = vec![];
        let mut cursor = utc(from);
        while let Some(t) = s.next_after(cursor) {
            if t > end {
                break;
            }
            out.push(zone.format(t));
            cursor = t;
        }
        out
    }

    #[test]
    fn spring_forward_fixed_time_fires_once_after_gap() {
        // 02:30 does not exist in New York on 2026-03-08; it fires at 03:00 EDT.
        assert_eq!(
            slots(
                "0 30 2 * * *",
                "America/New_York",
                "2026-03-07T00:00:00Z",
                "2026-03-10T00:00:00Z"
            ),
            vec![
                "2026-03-07T02:30:00-05:00",
                "2026-03-08T03:00:00-04:00",
                "2026-03-09T02:30:00-04:00",
            ]
        );
    }

    #[test]
    fn fall_back_fixed_time_fires_once() {
        // 01:30 happens twice in New York on 2026-11-01; it fires once, at the first.
        assert_eq!(
            slots(
                "0 30 1 * * *",
                "America/New_York",
                "2026-10-31T00:00:00Z",
                "2026-11-03T00:00:00Z"
            ),
            vec![
                "2026-10-31T01:30:00-04:00",
                "2026-11-01T01:30:00-04:00",
                "2026-11-02T01:30:00-05:00",
            ]
        );
    }

    #[test]
    fn slot_origins_finer_than_a_millisecond_are_rejected() {
        let e = parse_iso_repeat("R/2026-01-01T00:00:00.0000005Z/PT1M").unwrap_err();
        assert!(e.contains("finer than a millisecond"), "{e}");
        assert!(parse_iso_repeat("R/2026-01-01T00:00:00.250Z/PT1M").is_ok());
        let e = Schedule::every(
            std::time::Duration::from_secs(60),
            utc("2026-01-01T00:00:00.0000005Z"),
        )
        .unwrap_err();
        assert!(e.contains("at most millisecond precision"), "{e}");
        assert!(Schedule::every(
            std::time::Duration::from_secs(60),
            utc("2026-01-01T00:00:00.5Z")
        )
        .is_ok());
    }

    #[test]
    fn a_short_iso_period_from_long_ago_steps_to_the_next_slot() {
        // About 217 million one-second steps since the start: the slot
        // right after `after` (this walked back 24 million slots per call).
        let s = Schedule::Iso(parse_iso_repeat("R/2020-01-01T00:00:00Z/PT1S").unwrap());
        assert_eq!(
            s.next_after(utc("2026-11-22T02:55:43.5Z")),
            Some(utc("2026-11-22T02:55:44Z"))
        );
        assert_eq!(
            s.next_after(utc("2026-11-22T02:55:44Z")),
            Some(utc("2026-11-22T02:55:45Z"))
        );
        let s = Schedule::Iso(parse_iso_repeat("R/2020-01-01T00:00:00+05:30/P1DT1S").unwrap());
        assert_eq!(
            s.next_after(utc("2026-11-22T00:00:00Z")),
            Some(utc("2026-11-22T19:11:58Z"))
        );
    }

    #[test]
    fn lists_and_ranges_of_times_fire_once_per_local_time_across_dst() {
        // croner alone fires these twice at 01:30 on fall-back day (EDT and
        // EST) and never at 02:30 on spring-forward day.
        let fall = |e| {
            slots(
                e,
                "America/New_York",
                "2026-11-01T04:00:00Z",
                "2026-11-01T08:00:00Z",
            )
        };
        assert_eq!(fall("0 30 1,13 * * *"), vec!["2026-11-01T01:30:00-04:00"]);
        assert_eq!(
            fall("0 0,30 1 * * *"),
            vec!["2026-11-01T01:00:00-04:00", "2026-11-01T01:30:00-04:00"]
        );
        assert_eq!(
            fall("30 1-2 * * *"),
            vec!["2026-11-01T01:30:00-04:00", "2026-11-01T02:30:00-05:00"]
        );
        let spring = |e| {
            slots(
                e,
                "America/New_York",
                "2026-03-08T05:00:00Z",
                "2026-03-08T19:00:00Z",
            )
        };
        assert_eq!(
            spring("0 30 2,14 * * *"),
            vec!["2026-03-08T03:00:00-04:00", "2026-03-08T14:30:00-04:00"]
        );
        // Both gap times land on the same instant: one slot.
        assert_eq!(spring("0 0,30 2 * * *"), vec!["2026-03-08T03:00:00-04:00"]);
        assert_eq!(
            spring("0 1-3 * * *"),
            vec!["2026-03-08T01:00:00-05:00", "2026-03-08T03:00:00-04:00"]
        );
    }

    #[test]
    fn a_half_hour_gap_moves_a_wall_clock_slot_to_its_end() {
        // Lord Howe Island springs forward 30 minutes, 02:00 -> 02:30, on 2026-10-04.
        assert_eq!(
            slots(
                "0 15 2,3 * * *",
                "Australia/Lord_Howe",
                "2026-10-03T14:00:00Z",
                "2026-10-03T17:00:00Z"
            ),
            vec!["2026-10-04T02:30:00+11:00", "2026-10-04T03:15:00+11:00"]
        );
    }

    #[test]
    fn a_minute_step_in_a_fixed_hour_follows_elapsed_time() {
        // A wildcard or step in the minute field is elapsed time, as in
        // classic cron: both passes of the repeated hour fire.
        assert_eq!(
            slots(
                "*/30 1 * * *",
                "America/New_York",
                "2026-11-01T04:00:00Z",
                "2026-11-01T08:00:00Z"
            ),
            vec![
                "2026-11-01T01:00:00-04:00",
                "2026-11-01T01:30:00-04:00",
                "2026-11-01T01:00:00-05:00",
                "2026-11-01T01:30:00-05:00",
            ]
        );
        assert_eq!(
            slots(
                "*/30 2 * * *",
                "America/New_York",
                "2026-03-08T05:00:00Z",
                "2026-03-08T12:00:00Z"
            ),
            Vec::<String>::new()
        );
        assert!(is_wall_clock("@daily") && !is_wall_clock("@hourly"));
        assert!(is_wall_clock("0 30 1-3,5 * * * 2027") && !is_wall_clock("0 30 * * * *"));
    }

    #[test]
    fn hourly_step_follows_elapsed_time_across_transitions() {
        // Wildcard hour: every real hour fires once, none doubled, none skipped.
        let s = slots(
            "0 0 * * * *",
            "America/New_York",
            "2026-11-01T03:30:00Z",
            "2026-11-01T08:30:00Z",
        );
        assert_eq!(
            s,
            vec![
                "2026-11-01T00:00:00-04:00",
                "2026-11-01T01:00:00-04:00",
                "2026-11-01T01:00:00-05:00",
                "2026-11-01T02:00:00-05:00",
                "2026-11-01T03:00:00-05:00",
            ]
        );
        let s = slots(
            "0 */1 * * *",
            "America/New_York",
            "2026-03-08T05:30:00Z",
            "2026-03-08T08:30:00Z",
        );
        assert_eq!(
            s,
            vec![
                "2026-03-08T01:00:00-05:00",
                "2026-03-08T03:00:00-04:00",
                "2026-03-08T04:00:00-04:00",
            ]
        );
    }

    #[test]
    fn five_six_and_seven_fields() {
        assert_eq!(
            slots(
                "*/20 10 * * *",
                "UTC",
                "2026-01-01T00:00:00Z",
                "2026-01-01T23:00:00Z"
            ),
            vec![
                "2026-01-01T10:00:00+00:00",
                "2026-01-01T10:20:00+00:00",
                "2026-01-01T10:40:00+00:00"
            ]
        );
        assert_eq!(
            slots(
                "15 0 0 1 1 *",
                "UTC",
                "2026-01-01T00:00:00Z",
                "2026-01-01T00:01:00Z"
            ),
            vec!["2026-01-01T00:00:15+00:00"]
        );
        assert_eq!(
            slots(
                "0 0 0 1 1 * 2028",
                "UTC",
                "2026-01-01T00:00:00Z",
                "2030-01-01T00:00:00Z"
            ),
            vec!["2028-01-01T00:00:00+00:00"]
        );
    }

    #[test]
    fn last_weekday_and_nth_specials() {
        assert_eq!(
            slots(
                "0 0 12 L * ?",
                "UTC",
                "2026-01-01T00:00:00Z",
                "2026-04-01T00:00:00Z"
            ),
            vec![
                "2026-01-31T12:00:00+00:00",
                "2026-02-28T12:00:00+00:00",
                "2026-03-31T12:00:00+00:00"
            ]
        );
        // 15W: nearest weekday to the 15th. 2026-02-15 is a Sunday -> Monday 16th.
        assert_eq!(
            slots(
                "0 9 15W * *",
                "UTC",
                "2026-02-01T00:00:00Z",
                "2026-03-01T00:00:00Z"
            ),
            vec!["2026-02-16T09:00:00+00:00"]
        );
        // FRI#2: the second Friday of the month.
        assert_eq!(
            slots(
                "0 9 * JAN,FEB FRI#2",
                "UTC",
                "2026-01-01T00:00:00Z",
                "2026-03-01T00:00:00Z"
            ),
            vec!["2026-01-09T09:00:00+00:00", "2026-02-13T09:00:00+00:00"]
        );
        // 5L: the last Friday.
        assert_eq!(
            slots(
                "0 9 * MAR 5L",
                "UTC",
                "2026-01-01T00:00:00Z",
                "2026-12-01T00:00:00Z"
            ),
            vec!["2026-03-27T09:00:00+00:00"]
        );
    }

    #[test]
    fn nicknames() {
        assert_eq!(
            slots(
                "@monthly",
                "UTC",
                "2026-01-15T00:00:00Z",
                "2026-03-15T00:00:00Z"
            ),
            vec!["2026-02-01T00:00:00+00:00", "2026-03-01T00:00:00+00:00"]
        );
        assert_eq!(
            slots(
                "@hourly",
                "UTC",
                "2026-01-01T00:30:00Z",
                "2026-01-01T02:00:00Z"
            )
            .len(),
            2
        );
        assert!(parse_cron("@fortnightly").unwrap_err().contains("@yearly"));
    }

    #[test]
    fn errors_name_the_field_and_value() {
        let e = parse_cron("61 * * * *").unwrap_err();
        assert!(e.contains("minute") && e.contains("`61`"), "{e}");
        let e = parse_cron("0 25 * * *").unwrap_err();
        assert!(e.contains("hour") && e.contains("`25`"), "{e}");
        let e = parse_cron("* * * FOO *").unwrap_err();
        assert!(e.contains("month"), "{e}");
        let e = parse_cron("* * *").unwrap_err();
        assert!(e.contains("got 3"), "{e}");
        assert!(parse_timezone("Mars/Olympus")
            .unwrap_err()
            .contains("Mars/Olympus"));
    }

    #[test]
    fn every_is_aligned_to_anchor() {
        let s = Schedule::every(std::time::Duration::from_secs(90), epoch()).unwrap();
        let t = s.next_after(utc("2026-01-01T00:00:00Z")).unwrap();
        assert_eq!(t, utc("2026-01-01T00:01:30Z"));
        assert_eq!(s.next_after(t).unwrap(), utc("2026-01-01T00:03:00Z"));
        let anchored = Schedule::every(
            std::time::Duration::from_secs(60),
            utc("2026-01-01T00:00:07Z"),
        )
        .unwrap();
        assert_eq!(
            anchored.next_after(utc("2026-01-01T05:00:00Z")).unwrap(),
            utc("2026-01-01T05:00:07Z")
        );
        assert!(Schedule::every(std::time::Duration::from_millis(500), epoch()).is_err());
    }

    #[test]
    fn iso_repeat_steps_by_calendar() {
        let iso = parse_iso_repeat("R5/2026-01-31T09:00:00Z/P1M").unwrap();
        let s = Schedule::Iso(iso);
        let got: Vec<String> = s
            .upcoming(utc("2020-01-01T00:00:00Z"), 10)
            .into_iter()
            .map(|t| t.to_rfc3339())
            .collect();
        assert_eq!(
            got,
            vec![
                "2026-01-31T09:00:00+00:00",
                "2026-02-28T09:00:00+00:00",
                "2026-03-31T09:00:00+00:00",
                "2026-04-30T09:00:00+00:00",
                "2026-05-31T09:00:00+00:00",
            ]
        );
        let s = Schedule::Iso(parse_iso_repeat("R/2026-06-01T08:00:00+02:00/PT2H").unwrap());
        assert_eq!(
            s.next_after(utc("2027-06-01T07:00:00Z")).unwrap(),
            utc("2027-06-01T08:00:00Z")
        );
        assert!(parse_iso_repeat("R5/2026-01-01/P1M")
            .unwrap_err()
            .contains("RFC 3339"));
        assert!(parse_iso_repeat("R5/2026-01-01T00:00:00Z/P0D")
            .unwrap_err()
            .contains("zero"));
        assert!(parse_iso_repeat("5/2026-01-01T00:00:00Z/P1D").is_err());
        assert!(parse_iso_repeat("R5/2026-01-01T00:00:00Z/P1X")
            .unwrap_err()
            .contains("unit"));
    }

    #[test]
    fn cron_patterns_are_cached_with_a_bound_and_reparsed_after_eviction() {
        let exprs: Vec<String> = (0..cron_cache::CAPACITY + 50)
            .map(|i| format!("{} {} {} * * 1", i % 60, (i / 60) % 60, i / 3600 + 3))
            .collect();
        let schedules: Vec<Schedule> = exprs
            .iter()
            .map(|e| Schedule::cron(e, Tz::UTC).unwrap())
            .collect();
        assert!(cron_cache::len() <= cron_cache::CAPACITY);
        // The first ones were evicted; they still compute the same slots.
        let from = utc("2026-01-01T00:00:00Z");
        let first = schedules[0].next_after(from).unwrap();
        assert_eq!(first, utc("2026-01-05T03:00:00Z"));
        assert_eq!(
            schedules[61].next_after(from).unwrap(),
            utc("2026-01-05T03:01:01Z")
        );
    }
}
