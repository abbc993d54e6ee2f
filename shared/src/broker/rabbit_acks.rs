//! Ack coalescing for one RabbitMQ consumer channel.
//!
//! Every delivery is tracked here when it is received. When one is finished
//! its ack is handed to a flusher task, which settles everything finished
//! since its last round: the run of finished deliveries at the low end of the
//! channel's unsettled tags goes as one `basic.ack` with `multiple = true`,
//! and any other finished delivery (one whose lower neighbour is still
//! running) as an ack of its own. So no ack waits for a slower delivery (that
//! would hold prefetch), and under load many acks become one frame, which
//! saves the broker (a quorum queue turns each ack into a Raft command) and
//! the client most of their per-ack work.
//!
//! Why a `multiple` ack never covers a delivery that is not finished:
//! - deliveries are tracked in the order the channel received them, and the
//!   channel has this one consumer, so every tag below the highest tracked one
//!   was tracked;
//! - a tracked delivery leaves the map only once its own ack or nack frame was
//!   written (a nack is sent before [`AckCoalescer::forget`]), and frames on a
//!   channel are written in order;
//! - after a channel recovers, its tags restart at 1. lapin poisons the old
//!   incarnation's ackers before the channel reconnects, and [`track`] drops
//!   poisoned entries before it tracks the first delivery of the new one, so
//!   old and new tags never mix. A poisoned entry never joins a `multiple` run,
//!   and a delivery with a poisoned acker never finishes or forgets a slot
//!   (its tag may be a new delivery's by then).
//!
//! A delivery dropped without being settled (the worker leaves it for
//! redelivery at shutdown) stays tracked and unfinished: acks above it are
//! then sent one by one, which is safe.
//!
//! [`track`]: AckCoalescer::track

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures::future::join_all;
use lapin::options::BasicAckOptions;
use lapin::Acker;
use tokio::sync::{oneshot, Notify};

use super::{BrokerError, BrokerResult};

type Waiter = oneshot::Sender<BrokerResult<()>>;

struct Slot {
    acker: Acker,
    /// Set when the delivery is finished and waits for its ack to be sent.
    done: Option<Waiter>,
}

#[derive(Default)]
struct State {
    /// Received and not yet settled, by delivery tag.
    unsettled: BTreeMap<u64, Slot>,
    /// The consumer is gone: finished deliveries are acked directly.
    closed: bool,
}

/// The ack coalescer of one consumer channel; see the module docs.
pub(crate) struct AckCoalescer {
    state: Mutex<State>,
    wake: Notify,
}

/// One flusher round: the low run of finished deliveries, and the others.
struct Round {
    /// The acker of the run's highest tag.
    run: Option<Acker>,
    /// One per delivery of the run.
    run_waiters: Vec<Waiter>,
    singles: Vec<(Acker, Waiter)>,
}

fn not_sent() -> BrokerError {
    BrokerError::Unavailable(
        "ack not sent: the delivery's channel is gone; the broker will redeliver".into(),
    )
}

/// Sends one ack and maps lapin's answer.
async fn send_ack(acker: &Acker, multiple: bool) -> Result<(), String> {
    match acker.ack(BasicAckOptions { multiple }).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(not_sent().to_string()),
        Err(e) => Err(format!("acking: {e}")),
    }
}

fn answer(waiter: Waiter, result: &Result<(), String>) {
    let _ = waiter.send(match result {
        Ok(()) => Ok(()),
        Err(e) => Err(BrokerError::Unavailable(e.clone())),
    });
}

impl AckCoalescer {
    /// A coalescer with its flusher task running on the current runtime.
    pub(crate) fn start() -> Arc<AckCoalescer> {
        let c = Arc::new(AckCoalescer {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
        });
        tokio::spawn(flusher(c.clone()));
        c
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tracks a delivery just received.
    pub(crate) fn track(&self, tag: u64, acker: &Acker) {
        let mut s = self.lock();
        if s.closed {
            return;
        }
        let stale = |m: &BTreeMap<u64, Slot>| {
            m.first_key_value().is_some_and(|(_, s)| s.acker.poisoned())
                || m.last_key_value().is_some_and(|(_, s)| s.acker.poisoned())
        };
        if stale(&s.unsettled) {
            // The channel recovered: the old incarnation's deliveries will be
            // redelivered; their finished ones learn that their ack failed.
            let old = std::mem::take(&mut s.unsettled);
            for (t, slot) in old {
                if slot.acker.poisoned() {
                    if let Some(w) = slot.done {
                        let _ = w.send(Err(not_sent()));
                    }
                } else {
                    s.unsettled.insert(t, slot);
                }
            }
        }
        s.unsettled.insert(
            tag,
            Slot {
                acker: acker.clone(),
                done: None,
            },
        );
    }

    /// Hands a finished delivery's ack to the flusher. `None` when it is not
    /// tracked, its channel incarnation is gone, or the consumer is gone: the
    /// caller acks it directly (lapin refuses a poisoned acker).
    pub(crate) fn finish(
        &self,
        tag: u64,
        acker: &Acker,
    ) -> Option<oneshot::Receiver<BrokerResult<()>>> {
        let mut s = self.lock();
        // After a recovery the tag may belong to a delivery of the new
        // incarnation: settling it would ack that one while it still runs.
        // lapin poisons this acker before the channel reconnects, and a
        // poisoned acker stays poisoned, so a live one here means no
        // recovery since this delivery arrived and the slot is its own.
        if s.closed || acker.poisoned() {
            return None;
        }
        let slot = s.unsettled.get_mut(&tag)?;
        let (tx, rx) = oneshot::channel();
        slot.done = Some(tx);
        drop(s);
        self.wake.notify_one();
        Some(rx)
    }

    /// Stops tracking a delivery whose nack (or reject) frame has been
    /// written. Its channel incarnation gone, the tag may be another
    /// delivery's (see [`AckCoalescer::finish`]); its own slot, if still
    /// there, is dropped with the other stale ones.
    pub(crate) fn forget(&self, tag: u64, acker: &Acker) {
        if acker.poisoned() {
            return;
        }
        let removed = self.lock().unsettled.remove(&tag);
        if removed.is_some() {
            // Finished deliveries above it may now form a run.
            self.wake.notify_one();
        }
    }

    /// The consumer is gone: the flusher sends what is finished and stops;
    /// later acks go directly.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_one();
    }

    fn take(&self) -> (Round, bool) {
        let mut s = self.lock();
        let mut round = Round {
            run: None,
            run_waiters: Vec::new(),
            singles: Vec::new(),
        };
        while let Some(entry) = s.unsettled.first_entry() {
            let slot = entry.get();
            if slot.done.is_none() || slot.acker.poisoned() {
                break;
            }
            let slot = entry.remove();
            round.run_waiters.extend(slot.done);
            round.run = Some(slot.acker);
        }
        let finished: Vec<u64> = s
            .unsettled
            .iter()
            .filter(|(_, slot)| slot.done.is_some())
            .map(|(t, _)| *t)
            .collect();
        for t in finished {
            if let Some(Slot {
                acker,
                done: Some(w),
            }) = s.unsettled.remove(&t)
            {
                round.singles.push((acker, w));
            }
        }
        (round, s.closed)
    }
}

async fn flusher(c: Arc<AckCoalescer>) {
    loop {
        c.wake.notified().await;
        loop {
            let (round, closed) = c.take();
            if round.run.is_none() && round.singles.is_empty() {
                if closed {
                    return;
                }
                break;
            }
            let run = async {
                if let Some(acker) = &round.run {
                    let n = round.run_waiters.len();
                    let result = send_ack(acker, n > 1).await;
                    if let Err(e) = &result {
                        tracing::warn!(error = %e, acks = n, "Ack failed; the broker will redeliver");
                    }
                    Some(result)
                } else {
                    None
                }
            };
            let singles = join_all(round.singles.iter().map(|(a, _)| send_ack(a, false)));
            let (run_result, single_results) = futures::join!(run, singles);
            if let Some(result) = run_result {
                for w in round.run_waiters {
                    answer(w, &result);
                }
            }
            for ((_, w), result) in round.singles.into_iter().zip(single_results) {
                answer(w, &result);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use futures::StreamExt;
    use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, Connection, ConnectionProperties};

    use super::*;

    fn rabbitmqctl(args: &[&str]) {
        let out = std::process::Command::new("rabbitmqctl")
            .args(args)
            .output()
            .expect("rabbitmqctl (RabbitMQ's CLI) on PATH");
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Deletes its vhost when dropped, so a failed test leaves nothing behind.
    struct Vhost(String);

    impl Drop for Vhost {
        fn drop(&mut self) {
            let _ = std::process::Command::new("rabbitmqctl")
                .args(["delete_vhost", &self.0])
                .output();
        }
    }

    /// Against the local RabbitMQ, in a vhost of its own: a delivery of a
    /// connection that failed finishes after the recovered channel handed
    /// its tag out again; its ack must not settle the new delivery (which
    /// would ack that one while it still runs).
    #[tokio::test]
    async fn a_finish_from_before_a_connection_recovery_never_settles_the_new_tag() {
        let vhost = format!("cptest-acks-unit-{}", uuid::Uuid::new_v4());
        rabbitmqctl(&["add_vhost", &vhost]);
        let _guard = Vhost(vhost.clone());
        rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
        let url = format!("amqp://guest:guest@127.0.0.1:5672/{vhost}");
        let conn = Connection::connect(&url, ConnectionProperties::default().enable_auto_recover())
            .await
            .expect("RabbitMQ at 127.0.0.1:5672 (scripts/services.sh starts it)");
        let ch = conn.create_channel().await.unwrap();
        ch.queue_declare(
            "q".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.basic_publish(
            "".into(),
            "q".into(),
            BasicPublishOptions::default(),
            b"m",
            BasicProperties::default(),
        )
        .await
        .unwrap();
        let mut consumer = ch
            .basic_consume(
                "q".into(),
                "acks-unit".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let coalescer = AckCoalescer::start();
        let old = consumer.next().await.unwrap().unwrap();
        coalescer.track(old.delivery_tag, &old.acker);

        // The broker drops the connection; lapin reconnects, the unacked
        // message comes again under a restarted tag.
        rabbitmqctl(&["close_all_connections", "-p", &vhost, "acks unit test"]);
        let new = loop {
            match consumer.next().await.expect("consumer stream") {
                Ok(d) => break d,
                Err(e) => ch.wait_for_recovery(e).await.expect("recovery"),
            }
        };
        assert!(old.acker.poisoned() && !new.acker.poisoned());
        assert_eq!(old.delivery_tag, new.delivery_tag, "tags restart at 1");
        coalescer.track(new.delivery_tag, &new.acker);

        assert!(coalescer.finish(old.delivery_tag, &old.acker).is_none());
        coalescer.forget(old.delivery_tag, &old.acker);
        {
            let s = coalescer.lock();
            let slot = s
                .unsettled
                .get(&new.delivery_tag)
                .expect("the old delivery's forget left the new one tracked");
            assert!(
                slot.done.is_none(),
                "the old delivery's finish marked the new one done"
            );
        }
        // The new delivery's own finish is acked.
        let sent = coalescer
            .finish(new.delivery_tag, &new.acker)
            .expect("tracked");
        sent.await.unwrap().expect("acked");
        let _ = conn.close(200, "done".into()).await;
    }
}
