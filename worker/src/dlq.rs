//! Dead-letter queue tools: list, show, replay and purge dead letters,
//! filtered by task, reason, time or id. Messages are read by holding them
//! unacked on a private channel; what is not replayed or purged goes back to
//! the queue, in order, when the channel closes.

use chrono::{DateTime, Utc};
use cronpipe_shared::broker::rabbitmq::Rabbit;
use cronpipe_shared::deadletter::DeadLetter;
use cronpipe_shared::{Broker, BrokerError, Store};
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

fn rabbit(broker: &Broker) -> Result<&Rabbit, BrokerError> {
    match broker {
        Broker::Rabbit(r) => Ok(r),
        #[allow(unreachable_patterns)]
        _ => Err(BrokerError::Setup(
            "dead-letter tools support RabbitMQ only in this build".into(),
        )),
    }
}

/// Reads up to `limit` dead letters and applies `action` to those matching `filter`.
/// Replays reset the task's idempotency state and attempt count first, so the task runs again.
pub async fn run(
    broker: &Broker,
    store: &Store,
    filter: &Filter,
    action: Action,
    limit: usize,
    history_max_len: usize,
) -> Result<Outcome, BrokerError> {
    let rabbit = rabbit(broker)?;
    let queue = rabbit.dlq_name();
    let ch = rabbit.channel().await?;
    let mut out = Outcome::default();
    while out.scanned < limit {
        let got = ch
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .map_err(|e| BrokerError::Unavailable(format!("reading `{queue}`: {e}")))?;
        let Some(msg) = got else { break };
        out.scanned += 1;
        let body = msg.delivery.data.clone();
        let record: Option<DeadLetter> = serde_json::from_slice(&body).ok();
        let matched = match &record {
            Some(r) => filter.matches(r),
            None => filter.is_empty(),
        };
        if !matched {
            continue;
        }
        match action {
            Action::Look => {}
            Action::Purge => {
                msg.delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(|e| {
                        BrokerError::Unavailable(format!("removing a dead letter: {e}"))
                    })?;
                out.settled += 1;
            }
            Action::Replay => match record.as_ref().and_then(|r| r.envelope.clone()) {
                None => out.skipped += 1,
                Some(mut env) => {
                    store.reset_key(env.key()).await.map_err(|e| {
                        BrokerError::Unavailable(format!(
                            "resetting the task's state in Redis: {e}"
                        ))
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
                    if let Err(e) = crate::history::record_now(store, history_max_len, &entry).await
                    {
                        tracing::warn!(error = %e, "Could not record the replay in the execution history");
                    }
                    // Confirmed republish first, then remove the dead letter.
                    broker.publish(&env).await?;
                    msg.delivery
                        .acker
                        .ack(BasicAckOptions::default())
                        .await
                        .map_err(|e| {
                            BrokerError::Unavailable(format!(
                                "removing a replayed dead letter: {e}"
                            ))
                        })?;
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
