//! Dead-letter tools: list, show, replay and purge dead letters, filtered by
//! task, reason, time or id.
//!
//! - RabbitMQ: messages are read by holding them unacked on a private
//!   channel; what is not replayed or purged goes back to the queue, in
//!   order, when the channel closes.
//! - Kafka: the dead-letter topic is read from the tools group's committed
//!   offsets; replayed and purged ones are removed by committing past them,
//!   and the ones kept that lay below a removed one are appended again at the
//!   end of the topic first (Kafka cannot delete single messages).
//!
//! Either way a replay is confirmed by the broker before its dead letter is
//! removed, and nothing is lost if the tool dies midway.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use cronpipe_shared::broker::kafka::{Kafka, ToolMessage};
use cronpipe_shared::broker::rabbitmq::Rabbit;
use cronpipe_shared::deadletter::DeadLetter;
use cronpipe_shared::store::StoreError;
use cronpipe_shared::{Broker, BrokerError, Envelope, Store};
use lapin::options::{BasicAckOptions, BasicGetOptions};

/// Which dead letters an operation applies to.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this task.
    pub task: Option<String>,
    /// Only this reason (`permanent_error`, `max_attempts`, `invalid_json`, …).
    pub reason: Option<String>,
    /// Only dead-lettered at or after this instant.
    pub since: Option<DateTime<Utc>>,
    /// Only dead-lettered before this instant.
    pub until: Option<DateTime<Utc>>,
    /// Only the envelope with this id.
    pub id: Option<String>,
}

impl Filter {
    /// Whether `d` matches.
    pub fn matches(&self, d: &DeadLetter) -> bool {
        let env = d.envelope.as_ref();
        self.task
            .as_deref()
            .is_none_or(|t| env.is_some_and(|e| e.task == t))
            && self
                .reason
                .as_deref()
                .is_none_or(|r| d.reason.as_str() == r)
            && self.since.is_none_or(|s| d.dead_lettered_at >= s)
            && self.until.is_none_or(|u| d.dead_lettered_at < u)
            && self
                .id
                .as_deref()
                .is_none_or(|i| env.is_some_and(|e| e.id == i))
    }

    /// Whether no criterion is set.
    pub fn is_empty(&self) -> bool {
        self.task.is_none()
            && self.reason.is_none()
            && self.since.is_none()
            && self.until.is_none()
            && self.id.is_none()
    }
}

/// What to do with matching dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Leave them.
    Look,
    /// Republish their envelopes (attempts reset, `replay: true`) and remove them.
    Replay,
    /// Remove them.
    Purge,
}

/// A dead letter as read from the queue (body kept when it is not a record).
#[derive(Debug, Clone)]
pub struct Item {
    /// The parsed record, if the body is one.
    pub record: Option<DeadLetter>,
    /// The raw body.
    pub body: Vec<u8>,
}

/// What an operation did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Matching dead letters (as they were).
    pub matched: Vec<Item>,
    /// Dead letters looked at.
    pub scanned: usize,
    /// Replayed or purged.
    pub settled: usize,
    /// Matching ones that could not be replayed (no envelope), left in place.
    pub skipped: usize,
}

/// How long the dead-letter tools' lock lives without renewal (it is renewed
/// every third of it while a replay or purge runs).
const LOCK_TTL: Duration = Duration::from_secs(60);

/// Why a dead-letter operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// The broker failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// Another replay or purge holds the lock.
    #[error("another `worker dlq replay` or `purge` is running (lock held by `{holder}`, {left_s}s left unless renewed); run this one when it is done")]
    Busy {
        /// Who holds the lock.
        holder: String,
        /// Seconds left on its lock.
        left_s: u64,
    },
    /// Redis failed while taking the lock.
    #[error("taking the dead-letter tools' lock in Redis: {0}")]
    Store(#[from] StoreError),
}

/// Reads up to `limit` dead letters and applies `action` to those matching `filter`.
/// Replays reset the task's idempotency state and attempt count first, so the task runs again.
///
/// A replay or purge holds a lock in Redis (`{ns}:dlq:lock`) while it runs,
/// so two never act on the same dead letters (on Kafka nothing else would
/// stop them); listing takes none.
pub async fn run(
    broker: &Broker,
    store: &Store,
    filter: &Filter,
    action: Action,
    limit: usize,
    history_max_len: usize,
) -> Result<Outcome, DlqError> {
    let ctx = Ctx {
        broker,
        store,
        history_max_len,
        filter,
        action,
        limit,
    };
    let op = async {
        match broker {
            Broker::Rabbit(r) => run_rabbit(&ctx, r).await,
            Broker::Kafka(k) => run_kafka(&ctx, k).await,
        }
    };
    if action == Action::Look {
        return Ok(op.await?);
    }
    let holder = format!(
        "{}-{:08x}",
        cronpipe_shared::telemetry::default_instance_id("worker-dlq"),
        rand::random::<u32>()
    );
    if let Err((other, left)) = store.dlq_lock(&holder, LOCK_TTL).await? {
        return Err(DlqError::Busy {
            holder: other,
            left_s: left.as_secs(),
        });
    }
    tokio::pin!(op);
    let result = loop {
        tokio::select! {
            r = &mut op => break r,
            _ = tokio::time::sleep(LOCK_TTL / 3) => {
                if !matches!(store.dlq_lock_renew(&holder, LOCK_TTL).await, Ok(true)) {
                    tracing::warn!("Could not renew the dead-letter tools' lock; another replay or purge could start");
                }
            }
        }
    };
    if let Err(e) = store.dlq_unlock(&holder).await {
        tracing::warn!(error = %e, "Could not release the dead-letter tools' lock; it expires by itself");
    }
    Ok(result?)
}

/// One dead-letter operation: where it runs and what it does.
struct Ctx<'a> {
    broker: &'a Broker,
    store: &'a Store,
    history_max_len: usize,
    filter: &'a Filter,
    action: Action,
    limit: usize,
}

/// The parsed record of a dead letter's body, and whether `filter` takes it.
fn classify(filter: &Filter, body: &[u8]) -> (Option<DeadLetter>, bool) {
    let record: Option<DeadLetter> = serde_json::from_slice(body).ok();
    let matched = match &record {
        Some(r) => filter.matches(r),
        None => filter.is_empty(),
    };
    (record, matched)
}

/// Replays a dead letter's envelope: resets the task's idempotency state and
/// attempt count, records the replay in the history, and republishes it
/// (confirmed) as attempt 1 marked `replay`. The caller removes the dead
/// letter afterwards.
async fn replay(ctx: &Ctx<'_>, mut env: Envelope) -> Result<(), BrokerError> {
    ctx.store.reset_key(env.key()).await.map_err(|e| {
        BrokerError::Unavailable(format!("resetting the task's state in Redis: {e}"))
    })?;
    env.attempt = 1;
    env.replay = true;
    // Recorded before the republish, so the history reads in order.
    let entry = crate::history::Entry {
        at: Utc::now(),
        id: env.id.clone(),
        task: env.task.clone(),
        outcome: "replayed".into(),
        attempt: None,
        duration_ms: 0,
        worker: "worker dlq replay".into(),
    };
    if let Err(e) = crate::history::record_now(ctx.store, ctx.history_max_len, &entry).await {
        tracing::warn!(error = %e, "Could not record the replay in the execution history");
    }
    ctx.broker.publish(&env).await
}

async fn run_rabbit(ctx: &Ctx<'_>, rabbit: &Rabbit) -> Result<Outcome, BrokerError> {
    let queue = rabbit.dlq_name();
    let ch = rabbit.channel().await?;
    let mut out = Outcome::default();
    while out.scanned < ctx.limit {
        let got = ch
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .map_err(|e| BrokerError::Unavailable(format!("reading `{queue}`: {e}")))?;
        let Some(msg) = got else { break };
        out.scanned += 1;
        let body = msg.delivery.data.clone();
        let (record, matched) = classify(ctx.filter, &body);
        if !matched {
            continue;
        }
        match ctx.action {
            Action::Look => {}
            Action::Purge => {
                remove(&msg.delivery.acker, "removing a dead letter").await?;
                out.settled += 1;
            }
            Action::Replay => match record.as_ref().and_then(|r| r.envelope.clone()) {
                None => out.skipped += 1,
                Some(env) => {
                    // Confirmed republish first, then remove the dead letter.
                    replay(ctx, env).await?;
                    remove(
                        &msg.delivery.acker,
                        "removing a replayed dead letter (its copy is already \
                         republished; remove it by id rather than replay it again)",
                    )
                    .await?;
                    out.settled += 1;
                }
            },
        }
        out.matched.push(Item { record, body });
    }
    // Everything still unacked goes back to the queue.
    let _ = ch.close(200, "done".into()).await;
    Ok(out)
}

/// Acks a dead letter away; an ack lapin could not send (its channel is
/// gone, so the message goes back to the queue) is an error, not a removal.
async fn remove(acker: &lapin::Acker, what: &str) -> Result<(), BrokerError> {
    match acker.ack(BasicAckOptions::default()).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(BrokerError::Unavailable(format!(
            "{what}: the channel is gone, so the dead letter stays in the queue"
        ))),
        Err(e) => Err(BrokerError::Unavailable(format!("{what}: {e}"))),
    }
}

async fn run_kafka(ctx: &Ctx<'_>, kafka: &Kafka) -> Result<Outcome, BrokerError> {
    let read = kafka.dlq_read(ctx.limit).await?;
    let mut out = Outcome::default();
    // Per partition, the offset of the last dead letter removed.
    let mut removed: BTreeMap<i32, i64> = BTreeMap::new();
    let mut removed_at = std::collections::HashSet::new();
    let mut failure = None;
    for m in &read {
        out.scanned += 1;
        let (record, matched) = classify(ctx.filter, &m.body);
        if !matched {
            continue;
        }
        let remove = match ctx.action {
            Action::Look => false,
            Action::Purge => true,
            Action::Replay => match record.as_ref().and_then(|r| r.envelope.clone()) {
                None => {
                    out.skipped += 1;
                    false
                }
                Some(env) => match replay(ctx, env).await {
                    Ok(()) => true,
                    Err(e) => {
                        // Remove what was already replayed, then report.
                        failure = Some(e);
                        break;
                    }
                },
            },
        };
        if remove {
            removed.insert(m.partition, m.offset);
            removed_at.insert((m.partition, m.offset));
            out.settled += 1;
        }
        out.matched.push(Item {
            record,
            body: m.body.clone(),
        });
    }
    if !removed.is_empty() {
        let keep: Vec<ToolMessage> = read
            .iter()
            .filter(|m| {
                !removed_at.contains(&(m.partition, m.offset))
                    && removed
                        .get(&m.partition)
                        .is_some_and(|last| m.offset < *last)
            })
            .cloned()
            .collect();
        let through = removed.iter().map(|(p, o)| (*p, o + 1)).collect();
        kafka.dlq_remove(&keep, &through).await?;
    }
    // Partitions are read side by side; list them oldest first, as on RabbitMQ.
    out.matched
        .sort_by_key(|i| i.record.as_ref().map(|r| r.dead_lettered_at));
    match failure {
        Some(e) => Err(e),
        None => Ok(out),
    }
}
