//! The leader's loop: a timer heap over all schedules (not a task per
//! schedule), firing every due slot in one pipelined batch, advancing
//! watermarks only after the broker confirmed, and stepping down the moment
//! the lease is no longer valid.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use chrono::{DateTime, Utc};
use cronpipe_shared::config::BuiltSchedule;
use cronpipe_shared::schedule::Schedule;
use cronpipe_shared::{Broker, Envelope, Store};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::leader::Lease;
use crate::misfire;

/// Everything the leader loop needs.
pub struct Ctx<'a> {
    /// Redis.
    pub store: &'a Store,
    /// Broker to publish to.
    pub broker: &'a Broker,
    /// Wall clock.
    pub clock: &'a Arc<dyn Clock>,
    /// Lateness beyond which a slot is missed.
    pub threshold: Duration,
    /// Current schedule set (hot-reloadable).
    pub schedules: &'a mut watch::Receiver<Arc<Vec<BuiltSchedule>>>,
    /// Process shutdown.
    pub shutdown: &'a CancellationToken,
}

/// Run state of one schedule; its definition is `State::defs` at the same index.
struct Entry {
    /// Last slot handled (published or deliberately skipped).
    cursor: DateTime<Utc>,
    /// Publishing backoff while the broker fails.
    backoff: Option<backon::ExponentialBackoff>,
    retry_at: Option<DateTime<Utc>>,
    gen: u64,
}

impl Entry {
    fn due(&self, def: &BuiltSchedule) -> Option<DateTime<Utc>> {
        if !def.enabled {
            return None;
        }
        let next = def.schedule.next_after(self.cursor)?;
        Some(match self.retry_at {
            Some(r) => r.max(next),
            None => next,
        })
    }
}

struct State {
    /// The schedule set being run, shared with the sender (not copied).
    defs: Arc<Vec<BuiltSchedule>>,
    /// `entries[i]` is the run state of `defs[i]`.
    entries: Vec<Entry>,
    heap: BinaryHeap<Reverse<(DateTime<Utc>, usize, u64)>>,
    /// Watermarks to write (cursor moved but not yet stored).
    dirty: HashMap<usize, DateTime<Utc>>,
}

impl State {
    fn push(&mut self, idx: usize) {
        let e = &mut self.entries[idx];
        e.gen += 1;
        if let Some(due) = e.due(&self.defs[idx]) {
            self.heap.push(Reverse((due, idx, e.gen)));
        }
    }

    fn next_due(&mut self) -> Option<DateTime<Utc>> {
        while let Some(Reverse((due, idx, gen))) = self.heap.peek().copied() {
            if self.entries[idx].gen == gen {
                return Some(due);
            }
            self.heap.pop();
        }
        None
    }

    fn take_due(&mut self, now: DateTime<Utc>) -> Vec<usize> {
        let mut out = Vec::new();
        while let Some(due) = self.next_due() {
            if due > now {
                break;
            }
            if let Some(Reverse((_, idx, _))) = self.heap.pop() {
                out.push(idx);
            }
        }
        out
    }
}

/// Why the leader loop returned.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// Shutdown was requested.
    Shutdown,
    /// The lease was lost or its deadline passed.
    LostLease,
}

fn publish_backoff() -> backon::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(10))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Stored watermarks and the timing each was written under.
struct Marks {
    at: HashMap<String, DateTime<Utc>>,
    timing: HashMap<String, String>,
}

async fn read_marks(store: &Store) -> Result<Marks, cronpipe_shared::store::StoreError> {
    Ok(Marks {
        at: store.watermarks().await?,
        timing: store.watermark_timings().await?,
    })
}

async fn load(ctx: &mut Ctx<'_>, lease: &Lease) -> Option<State> {
    let defs = ctx.schedules.borrow_and_update().clone();
    let marks = loop {
        if !lease.is_valid() || ctx.shutdown.is_cancelled() {
            return None;
        }
        match read_marks(ctx.store).await {
            Ok(m) => break m,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot read watermarks; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    Some(build_state(&defs, &marks, ctx.clock.now(), None))
}

fn build_state(
    defs: &Arc<Vec<BuiltSchedule>>,
    marks: &Marks,
    now: DateTime<Utc>,
    previous: Option<&State>,
) -> State {
    let mut state = State {
        defs: defs.clone(),
        entries: Vec::with_capacity(defs.len()),
        heap: BinaryHeap::with_capacity(defs.len()),
        dirty: HashMap::new(),
    };
    let old: HashMap<&str, (&BuiltSchedule, &Entry)> = previous
        .map(|p| {
            p.defs
                .iter()
                .zip(&p.entries)
                .map(|(d, e)| (d.name.as_str(), (d, e)))
                .collect()
        })
        .unwrap_or_default();
    for def in defs.iter() {
        let idx = state.entries.len();
        let timing = def.schedule.timing_key();
        let stored_timing = marks.timing.get(&def.name);
        let (cursor, fresh) = match (old.get(def.name.as_str()), marks.at.get(&def.name)) {
            // A changed expression's slots are not the old one's: the schedule
            // continues from now under its new timing, without catching up
            // slots the new timing would have had in the past.
            (Some((old_def, e)), _) if !same_timing(&old_def.schedule, &def.schedule) => {
                tracing::info!(schedule = %def.name, "Schedule timing changed; it continues from now");
                (e.cursor.max(now), true)
            }
            (Some((_, e)), _) => (e.cursor, false),
            // The same, across a restart or a failover: the watermark was
            // written under another expression (a deploy changed it).
            (None, Some(wm)) if stored_timing.is_some_and(|t| *t != timing) => {
                tracing::info!(
                    schedule = %def.name,
                    was = stored_timing.map(String::as_str).unwrap_or_default(),
                    now = %timing,
                    "Schedule timing changed since its watermark was written; it continues from now"
                );
                ((*wm).max(now), true)
            }
            // A watermark from before timings were recorded: rewritten
            // with its timing at the next watermark write.
            (None, Some(wm)) if stored_timing.is_none() => {
                state.dirty.insert(idx, *wm);
                (*wm, false)
            }
            (None, Some(wm)) => (*wm, false),
            // A new schedule starts from now; it never back-fills.
            (None, None) => {
                tracing::info!(schedule = %def.name, "New schedule starts from now");
                (now, true)
            }
        };
        if fresh {
            // Persisted with the next watermark write, so a new leader starts from here too.
            state.dirty.insert(idx, cursor);
        }
        state.entries.push(Entry {
            cursor,
            backoff: None,
            retry_at: None,
            gen: 0,
        });
        state.push(idx);
    }
    state
}

/// Leads until the lease is lost or shutdown.
pub async fn lead(ctx: &mut Ctx<'_>, lease: &Lease) -> Exit {
    let Some(mut state) = load(ctx, lease).await else {
        return exit_reason(ctx, lease);
    };
    // The watermark map and the old state are gone: hand their pages back.
    cronpipe_shared::memory::release_free();
    tracing::info!(
        token = lease.token,
        schedules = state.entries.len(),
        "Leading"
    );
    let mut reload = false;
    loop {
        if ctx.shutdown.is_cancelled() || !lease.is_valid() {
            return exit_reason(ctx, lease);
        }
        // `changed()` in the wait below marks the value seen, so remember it here.
        if std::mem::take(&mut reload) || ctx.schedules.has_changed().unwrap_or(false) {
            // Schedules new to this leader resume from their stored watermark
            // (a dynamic schedule after a failover), never from "now".
            let marks = match read_marks(ctx.store).await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "Cannot read watermarks to apply the new schedule set; retrying");
                    reload = true;
                    tokio::select! {
                        _ = ctx.shutdown.cancelled() => {}
                        _ = lease.lost.cancelled() => {}
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                    continue;
                }
            };
            let defs = ctx.schedules.borrow_and_update().clone();
            let removed: Vec<String> = state
                .defs
                .iter()
                .map(|d| d.name.clone())
                .filter(|n| !defs.iter().any(|d| &d.name == n))
                .collect();
            let dirty_before: Vec<(String, DateTime<Utc>)> = state
                .dirty
                .iter()
                .map(|(i, t)| (state.defs[*i].name.clone(), *t))
                .collect();
            let mut next = build_state(&defs, &marks, ctx.clock.now(), Some(&state));
            for (name, t) in dirty_before {
                if let Some(i) = next.defs.iter().position(|d| d.name == name) {
                    let mark = next.dirty.entry(i).or_insert(t);
                    *mark = (*mark).max(t);
                }
            }
            state = next;
            drop(marks);
            cronpipe_shared::memory::release_free();
            if !removed.is_empty() {
                match ctx.store.remove_watermarks(&lease.value, &removed).await {
                    Ok(true) => {}
                    Ok(false) => lease.refused("Watermark removal"),
                    Err(e) => {
                        tracing::warn!(error = %e, "Could not forget watermarks of removed schedules");
                    }
                }
            }
            tracing::info!(
                schedules = state.entries.len(),
                removed = removed.len(),
                "Applied new schedule set"
            );
        }
        let now = ctx.clock.now();
        let due = state.take_due(now);
        if !due.is_empty() {
            fire(ctx, lease, &mut state, due, now).await;
        }
        if !state.dirty.is_empty() && lease.is_valid() {
            flush_watermarks(ctx, lease, &mut state).await;
        }
        let now = ctx.clock.now();
        if state.next_due().is_some_and(|d| d <= now) {
            continue;
        }
        let wake = state
            .next_due()
            .unwrap_or(now + chrono::Duration::seconds(1));
        tokio::select! {
            _ = ctx.shutdown.cancelled() => {}
            _ = lease.lost.cancelled() => {}
            changed = ctx.schedules.changed() => {
                reload = changed.is_ok();
                if changed.is_err() {
                    // The sender is gone: no more reloads. Without this the
                    // closed channel would wake this loop at once, forever.
                    tokio::select! {
                        _ = ctx.shutdown.cancelled() => {}
                        _ = lease.lost.cancelled() => {}
                        _ = tokio::time::sleep_until(lease.deadline()) => {}
                        _ = ctx.clock.sleep_until(wake) => {}
                    }
                }
            }
            _ = tokio::time::sleep_until(lease.deadline()) => {}
            _ = ctx.clock.sleep_until(wake) => {}
        }
    }
}

fn exit_reason(ctx: &Ctx<'_>, _lease: &Lease) -> Exit {
    if ctx.shutdown.is_cancelled() {
        Exit::Shutdown
    } else {
        Exit::LostLease
    }
}

async fn flush_watermarks(ctx: &Ctx<'_>, lease: &Lease, state: &mut State) {
    let marks: Vec<(usize, DateTime<Utc>)> = state.dirty.iter().map(|(i, t)| (*i, *t)).collect();
    let timings: Vec<String> = marks
        .iter()
        .map(|(i, _)| state.defs[*i].schedule.timing_key())
        .collect();
    let named: Vec<(&str, DateTime<Utc>, &str)> = marks
        .iter()
        .zip(&timings)
        .map(|((i, t), timing)| (state.defs[*i].name.as_str(), *t, timing.as_str()))
        .collect();
    match ctx.store.advance_watermarks(&lease.value, &named).await {
        Ok(true) => state.dirty.clear(),
        Ok(false) => lease.refused("Watermark write"),
        Err(e) => {
            // Published but not recorded: a next leader would publish these slots
            // again, and their deterministic ids make workers run them once.
            tracing::warn!(error = %e, pending = marks.len(), "Could not advance watermarks; will retry");
        }
    }
}

async fn fire(
    ctx: &Ctx<'_>,
    lease: &Lease,
    state: &mut State,
    due: Vec<usize>,
    now: DateTime<Utc>,
) {
    let mut batch: Vec<Envelope> = Vec::new();
    // (entry, slots of this entry in `batch` as a range, plan cursor)
    let mut owners: Vec<(usize, std::ops::Range<usize>, Option<DateTime<Utc>>)> = Vec::new();
    for idx in due {
        let (def, entry) = (&state.defs[idx], &state.entries[idx]);
        let plan = misfire::plan(def, entry.cursor, now, ctx.threshold);
        let name = def.name.as_str();
        let policy = def.misfire.as_str();
        if plan.truncated {
            tracing::warn!(
                schedule = name,
                "Schedule far behind: slots older than its catch-up window were skipped without counting each; missed and skipped are lower bounds"
            );
        }
        if plan.missed > 0 {
            metrics::counter!("cronpipe_producer_slots_missed_total", "schedule" => name.to_string(), "policy" => policy).increment(plan.missed);
            metrics::counter!("cronpipe_producer_slots_skipped_total", "schedule" => name.to_string(), "policy" => policy).increment(plan.skipped);
            metrics::counter!("cronpipe_producer_slots_caught_up_total", "schedule" => name.to_string(), "policy" => policy).increment(plan.caught_up);
            tracing::warn!(
                schedule = name,
                policy,
                missed = plan.missed,
                skipped = plan.skipped,
                caught_up = plan.caught_up,
                "Missed slots handled by the misfire policy"
            );
        }
        let start = batch.len();
        for slot in &plan.publish {
            batch.push(Envelope::scheduled(
                name,
                *slot,
                def.task.clone(),
                def.payload.clone(),
                lease.token,
                now,
            ));
        }
        owners.push((idx, start..batch.len(), plan.cursor));
    }
    if !lease.is_valid() {
        return;
    }
    let results = if batch.is_empty() {
        Vec::new()
    } else {
        // The lease is checked again for the whole publish, not just before it:
        // a broker that stalls (a send waiting for connection recovery) must
        // not let this process go on sending once its deadline has passed.
        // Dropping the batch stops further sends; slots not yet recorded in
        // the watermark are published again by the next leader.
        tokio::select! {
            biased;
            _ = lease.expired() => {
                tracing::warn!(token = lease.token, slots = batch.len(), "Lease deadline passed while publishing; stopped sending");
                return;
            }
            results = ctx.broker.publish_batch(&batch) => results,
        }
    };
    let confirmed_at = ctx.clock.now();
    for (idx, range, plan_cursor) in owners {
        let entry = &mut state.entries[idx];
        let name = state.defs[idx].name.clone();
        let mut failed_at: Option<(DateTime<Utc>, String)> = None;
        for i in range {
            let env = &batch[i];
            let slot = env.slot.unwrap_or(now);
            match &results[i] {
                Ok(()) => {
                    let lag = (confirmed_at - slot).to_std().unwrap_or_default();
                    metrics::counter!("cronpipe_producer_slots_published_total", "schedule" => name.clone()).increment(1);
                    metrics::histogram!("cronpipe_producer_publish_lag_seconds", "schedule" => name.clone()).record(lag.as_secs_f64());
                    tracing::info!(
                        schedule = %name, slot = %slot.to_rfc3339(), task_id = %env.id, task = %env.task,
                        token = lease.token, lag_ms = lag.as_micros() as f64 / 1000.0, "Published slot"
                    );
                }
                Err(e) => {
                    failed_at = Some((slot, e.to_string()));
                    break;
                }
            }
        }
        match failed_at {
            None => {
                if let Some(c) = plan_cursor {
                    entry.cursor = c;
                    state.dirty.insert(idx, c);
                }
                entry.backoff = None;
                entry.retry_at = None;
            }
            Some((slot, error)) => {
                // Everything before the failed slot is handled; the failed slot
                // is planned again (as missed, if it is late by then).
                let before = slot - chrono::Duration::milliseconds(1);
                if before > entry.cursor {
                    entry.cursor = before;
                    state.dirty.insert(idx, before);
                }
                let delay = entry
                    .backoff
                    .get_or_insert_with(publish_backoff)
                    .next()
                    .unwrap_or(Duration::from_secs(10));
                entry.retry_at =
                    Some(ctx.clock.now() + chrono::Duration::from_std(delay).unwrap_or_default());
                metrics::counter!("cronpipe_producer_publish_retries_total", "schedule" => name.clone()).increment(1);
                tracing::warn!(
                    schedule = %name, slot = %slot.to_rfc3339(), error = %error,
                    retry_in_ms = delay.as_millis() as u64, "Publish failed; will retry"
                );
            }
        }
        state.push(idx);
    }
}

/// Whether two schedules fire at the same instants (same expression and zone,
/// same interval and anchor, or same ISO 8601 repetition).
fn same_timing(a: &Schedule, b: &Schedule) -> bool {
    a.timing_key() == b.timing_key()
}
