//! Execution history: one entry per settled delivery in a capped Redis stream
//! (`{ns}:history`), trimmed by length (`worker.history_max_len`) and age
//! (`worker.history_max_age`). Writing is off the ack path: entries go through
//! a bounded channel to a task that pipelines them; when Redis is slow or down
//! entries are dropped and counted (`cronpipe_worker_history_dropped_total`),
//! never waited for.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use cronpipe_shared::Store;
use redis::streams::{StreamMaxlen, StreamRangeReply};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Entries waiting to be written before new ones are dropped.
const BUFFER: usize = 10_000;
/// Most entries written in one pipeline.
const BATCH: usize = 512;

/// One finished delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// When it finished.
    pub at: DateTime<Utc>,
    /// Envelope id (`-` for messages that were not envelopes).
    pub id: String,
    /// Task name (`(invalid)` for messages that were not envelopes).
    pub task: String,
    /// Outcome (`success`, `retry`, `dead_letter`, `duplicate_skipped`, `deferred`, `returned`, `replayed`).
    pub outcome: String,
    /// Attempt number, when the handler ran.
    pub attempt: Option<u32>,
    /// Time from delivery to settlement, in milliseconds.
    pub duration_ms: u64,
    /// The worker (or tool) that settled it.
    pub worker: String,
}

/// The one stream field an entry is stored in: a compact JSON array
/// `[at_ms, id, task, outcome, attempt|null, duration_ms, worker]`. One field
/// instead of seven makes an entry about half as costly to encode and for
/// Redis to append, which matters at tens of thousands of tasks a second.
const FIELD: &str = "e";

type Packed<'a> = (i64, &'a str, &'a str, &'a str, Option<u32>, u64, &'a str);
type Unpacked = (i64, String, String, String, Option<u32>, u64, String);

impl Entry {
    fn packed(&self) -> String {
        let row: Packed<'_> = (
            self.at.timestamp_millis(),
            &self.id,
            &self.task,
            &self.outcome,
            self.attempt,
            self.duration_ms,
            &self.worker,
        );
        // A tuple of numbers and strings always serializes.
        serde_json::to_string(&row).unwrap_or_default()
    }

    fn unpack(text: &str) -> Option<Entry> {
        let (at, id, task, outcome, attempt, duration_ms, worker): Unpacked =
            serde_json::from_str(text).ok()?;
        Some(Entry {
            at: Utc.timestamp_millis_opt(at).single().unwrap_or_default(),
            id,
            task,
            outcome,
            attempt,
            duration_ms,
            worker,
        })
    }
}

/// Handle for recording entries; cheap to clone.
#[derive(Clone)]
pub struct History {
    tx: mpsc::Sender<Entry>,
}

impl History {
    /// Starts the writer task.
    pub fn spawn(
        store: Store,
        max_len: usize,
        max_age: Duration,
        shutdown: CancellationToken,
    ) -> History {
        let (tx, rx) = mpsc::channel(BUFFER);
        tokio::spawn(writer(store, rx, max_len, max_age, shutdown));
        History { tx }
    }

    /// Records an entry without waiting; drops it (counted) when the buffer is full.
    pub fn record(&self, entry: Entry) {
        if self.tx.try_send(entry).is_err() {
            metrics::counter!("cronpipe_worker_history_dropped_total").increment(1);
        }
    }
}

async fn writer(
    store: Store,
    mut rx: mpsc::Receiver<Entry>,
    max_len: usize,
    max_age: Duration,
    shutdown: CancellationToken,
) {
    let key = store.keys().history();
    let mut last_age_trim = std::time::Instant::now() - Duration::from_secs(3600);
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut batch, BATCH) => n,
            _ = shutdown.cancelled() => {
                // Flush what is already buffered, then stop.
                rx.close();
                rx.recv_many(&mut batch, BUFFER).await
            }
        };
        if n == 0 && batch.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for e in &batch {
            pipe.xadd_maxlen(
                &key,
                StreamMaxlen::Approx(max_len),
                "*",
                &[(FIELD, e.packed())],
            )
            .ignore();
        }
        if last_age_trim.elapsed() >= Duration::from_secs(60) {
            let oldest = Utc::now() - chrono::Duration::from_std(max_age).unwrap_or_default();
            pipe.cmd("XTRIM")
                .arg(&key)
                .arg("MINID")
                .arg("~")
                .arg(oldest.timestamp_millis())
                .ignore();
            last_age_trim = std::time::Instant::now();
        }
        let mut conn = store.connection();
        if let Err(e) = pipe.query_async::<()>(&mut conn).await {
            metrics::counter!("cronpipe_worker_history_dropped_total")
                .increment(batch.len() as u64);
            tracing::debug!(error = %e, dropped = batch.len(), "Could not write execution history");
        }
        batch.clear();
        if shutdown.is_cancelled() && rx.is_closed() && rx.is_empty() {
            return;
        }
    }
}

/// Writes one entry at once (tools such as `worker dlq replay`).
pub async fn record_now(
    store: &Store,
    max_len: usize,
    entry: &Entry,
) -> Result<(), cronpipe_shared::store::StoreError> {
    let mut conn = store.connection();
    let _: String = redis::cmd("XADD")
        .arg(store.keys().history())
        .arg("MAXLEN")
        .arg("~")
        .arg(max_len)
        .arg("*")
        .arg(FIELD)
        .arg(entry.packed())
        .query_async(&mut conn)
        .await?;
    Ok(())
}

/// The most recent entries, newest first, optionally of one task.
pub async fn recent(
    store: &Store,
    task: Option<&str>,
    last: usize,
) -> Result<Vec<Entry>, cronpipe_shared::store::StoreError> {
    let mut conn = store.connection();
    let key = store.keys().history();
    let mut out = Vec::new();
    let mut end = "+".to_string();
    // Page backwards until enough entries match or the stream ends.
    loop {
        let page: StreamRangeReply = redis::cmd("XREVRANGE")
            .arg(&key)
            .arg(&end)
            .arg("-")
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        let Some(last_id) = page.ids.last().map(|i| i.id.clone()) else {
            break;
        };
        for item in &page.ids {
            let Some(entry) = item.get::<String>(FIELD).as_deref().and_then(Entry::unpack) else {
                continue;
            };
            if task.is_none_or(|t| t == entry.task) {
                out.push(entry);
                if out.len() >= last {
                    return Ok(out);
                }
            }
        }
        if page.ids.len() < 1000 {
            break;
        }
        end = format!("({last_id}");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_survives_its_packed_form_whatever_its_strings_hold() {
        let entry = Entry {
            at: Utc.timestamp_millis_opt(1_790_000_000_123).unwrap(),
            id: "id with \"quotes\",\ttabs and [brackets]".into(),
            task: "report".into(),
            outcome: "success".into(),
            attempt: Some(3),
            duration_ms: 42,
            worker: "worker-a".into(),
        };
        assert_eq!(Entry::unpack(&entry.packed()), Some(entry.clone()));
        let no_attempt = Entry {
            attempt: None,
            ..entry
        };
        assert_eq!(Entry::unpack(&no_attempt.packed()), Some(no_attempt));
        assert_eq!(Entry::unpack("not json"), None);
    }
}
