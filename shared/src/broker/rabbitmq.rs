//! RabbitMQ adapter (lapin, auto-recovering connection).
//!
//! Topology for a work queue `Q` (all durable, all of the configured type):
//! - `Q`: tasks, published through the default exchange with routing key `Q`;
//! - `Q.dlq`: dead letters;
//! - `Q.delay.<ms>`: one delay queue per retry delay (rounded to two significant
//!   digits), with `x-message-ttl = ms` and dead-lettering back into `Q`. Each
//!   expires (`x-expires`) an hour after its delay once unused, so tiers that are
//!   no longer needed go away by themselves. Quorum delay queues use the
//!   `at-least-once` dead-letter strategy so a retry copy is never dropped
//!   between the delay queue and `Q`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use tokio::sync::Mutex;

use super::rabbit_acks::AckCoalescer;
use super::{BrokerError, BrokerResult};
use crate::config::{QueueType, RabbitConfig};
use crate::connect::redact;
use crate::deadletter::DeadLetter;
use crate::envelope::Envelope;

/// How often a delay queue is re-declared while in use, which keeps its `x-expires` from firing.
const REDECLARE_EVERY: Duration = Duration::from_secs(600);
/// Extra lifetime of an unused delay queue beyond its delay.
const DELAY_QUEUE_IDLE: Duration = Duration::from_secs(3600);

/// A connection to RabbitMQ with a publisher-confirm channel. Cheap to clone.
#[derive(Clone)]
pub struct Rabbit {
    inner: Arc<Inner>,
}

/// Publisher-confirm channels per connection. RabbitMQ runs each channel in
/// a process of its own, so a burst (1,000 schedules on one second) spread
/// over two is confirmed sooner than on one; a schedule's slots always take
/// the same channel, so they stay in order.
const PUBLISH_CHANNELS: usize = 2;

struct Inner {
    conn: Connection,
    /// Never empty ([`PUBLISH_CHANNELS`] of them).
    publish: Vec<Channel>,
    config: RabbitConfig,
    delay_queues: Mutex<HashMap<u64, Instant>>,
}

fn unavailable(context: &str, e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(format!("{context}: {e}"))
}

/// A stable publish-channel lane for `name`.
fn lane_of(name: &str) -> usize {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    name.hash(&mut h);
    h.finish() as usize
}

/// Rounds a delay to two significant digits of milliseconds, so delay queues stay few.
pub fn delay_tier_ms(delay: Duration) -> u64 {
    let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX).max(1);
    let mut scale = 1u64;
    while ms / scale >= 100 {
        scale *= 10;
    }
    ((ms + scale / 2) / scale).max(1) * scale
}

impl Rabbit {
    /// Connects with auto-recovery and declares the work and dead-letter queues.
    pub async fn connect(config: &RabbitConfig, client_name: &str) -> BrokerResult<Rabbit> {
        let props = ConnectionProperties::default()
            .with_connection_name(client_name.to_string().into())
            .enable_auto_recover()
            .configure_backoff(|b| {
                b.with_min_delay(Duration::from_millis(100))
                    .with_max_delay(Duration::from_secs(2))
                    .with_max_times(100_000)
            });
        let mut uri: lapin::uri::AMQPUri = config.url.parse().map_err(|e: String| {
            BrokerError::Setup(format!(
                "broker.rabbitmq.url {} is not a valid AMQP URL: {e}",
                redact(&config.url)
            ))
        })?;
        if uri.query.frame_max.is_none() {
            uri.query.frame_max = Some(config.frame_max);
        }
        let conn = Connection::connect_uri(uri, props)
            .await
            .map_err(|e| unavailable(&format!("connecting to {}", redact(&config.url)), e))?;
        let mut publish = Vec::with_capacity(PUBLISH_CHANNELS);
        for _ in 0..PUBLISH_CHANNELS {
            let ch = conn
                .create_channel()
                .await
                .map_err(|e| unavailable("opening a publish channel", e))?;
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(|e| unavailable("enabling publisher confirms", e))?;
            publish.push(ch);
        }
        let rabbit = Rabbit {
            inner: Arc::new(Inner {
                conn,
                publish,
                config: config.clone(),
                delay_queues: Mutex::new(HashMap::new()),
            }),
        };
        rabbit.declare(&config.queue, FieldTable::default()).await?;
        rabbit
            .declare(&rabbit.dlq_name(), FieldTable::default())
            .await?;
        Ok(rabbit)
    }

    /// The work queue name.
    pub fn queue(&self) -> &str {
        &self.inner.config.queue
    }

    /// The dead-letter queue name.
    pub fn dlq_name(&self) -> String {
        format!("{}.dlq", self.inner.config.queue)
    }

    /// The delay queue name for a delay.
    pub fn delay_queue_name(&self, tier_ms: u64) -> String {
        format!("{}.delay.{tier_ms}", self.inner.config.queue)
    }

    /// Names of the delay queues this process declared.
    pub async fn delay_queue_names(&self) -> Vec<String> {
        let tiers: Vec<u64> = self
            .inner
            .delay_queues
            .lock()
            .await
            .keys()
            .copied()
            .collect();
        tiers
            .into_iter()
            .map(|t| self.delay_queue_name(t))
            .collect()
    }

    /// Declares a durable queue of the configured type, on a throwaway channel
    /// so that a conflict (406) closes only that channel.
    async fn declare(&self, name: &str, mut args: FieldTable) -> BrokerResult<()> {
        let kind = match self.inner.config.queue_type {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        };
        args.insert("x-queue-type".into(), AMQPValue::LongString(kind.into()));
        let ch = self
            .inner
            .conn
            .create_channel()
            .await
            .map_err(|e| unavailable("opening a channel", e))?;
        let result = ch
            .queue_declare(name.into(), QueueDeclareOptions::durable(), args)
            .await;
        let _ = ch.close(200, "declared".into()).await;
        result.map(|_| ()).map_err(|e| {
            let text = e.to_string();
            if text.contains("PRECONDITION_FAILED") || text.contains("inequivalent") {
                BrokerError::Setup(format!(
                    "queue `{name}` exists with other arguments than cronpipe declares ({kind}): {text}; \
                     delete the queue or set broker.rabbitmq.queue_type to match it"
                ))
            } else {
                unavailable(&format!("declaring queue `{name}`"), text)
            }
        })
    }

    /// Declares (or refreshes) the delay queue for `tier_ms`.
    async fn ensure_delay_queue(&self, tier_ms: u64) -> BrokerResult<String> {
        let name = self.delay_queue_name(tier_ms);
        let mut declared = self.inner.delay_queues.lock().await;
        let fresh = declared
            .get(&tier_ms)
            .is_some_and(|at| at.elapsed() < REDECLARE_EVERY);
        if !fresh {
            let mut args = FieldTable::default();
            let ttl = i64::try_from(tier_ms).unwrap_or(i64::MAX);
            let expires = ttl.saturating_add(DELAY_QUEUE_IDLE.as_millis() as i64);
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
            args.insert("x-expires".into(), AMQPValue::LongLongInt(expires));
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString("".into()),
            );
            args.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(self.queue().into()),
            );
            if self.inner.config.queue_type == QueueType::Quorum {
                args.insert(
                    "x-dead-letter-strategy".into(),
                    AMQPValue::LongString("at-least-once".into()),
                );
                args.insert(
                    "x-overflow".into(),
                    AMQPValue::LongString("reject-publish".into()),
                );
            }
            self.declare(&name, args).await?;
            declared.insert(tier_ms, Instant::now());
        }
        Ok(name)
    }

    fn properties(env: &Envelope) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(
            "x-cronpipe-task".into(),
            AMQPValue::LongString(env.task.as_str().into()),
        );
        headers.insert(
            "x-cronpipe-attempt".into(),
            AMQPValue::LongLongInt(i64::from(env.attempt)),
        );
        BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(env.id.as_str().into())
            .with_timestamp(u64::try_from(env.created_at.timestamp()).unwrap_or(0))
            .with_app_id("cronpipe".into())
            .with_headers(headers)
    }

    /// Sends one message on publish channel `lane` (modulo their number)
    /// and returns its pending confirm.
    async fn send(
        &self,
        lane: usize,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> BrokerResult<lapin::PublisherConfirm> {
        let ch = &self.inner.publish[lane % self.inner.publish.len()];
        match ch
            .basic_publish(
                ShortString::from(""),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                body,
                props,
            )
            .await
        {
            Ok(confirm) => Ok(confirm),
            Err(e) => {
                let text = e.to_string();
                // Give an auto-recovering connection a moment before the caller retries.
                let _ = tokio::time::timeout(
                    self.inner.config.confirm_timeout.get(),
                    ch.wait_for_recovery(e),
                )
                .await;
                Err(unavailable("publishing", text))
            }
        }
    }

    async fn confirmed(
        &self,
        routing_key: &str,
        confirm: lapin::PublisherConfirm,
    ) -> BrokerResult<()> {
        let wait = self.inner.config.confirm_timeout.get();
        match tokio::time::timeout(wait, confirm).await {
            Err(_) => Err(BrokerError::Unavailable(format!(
                "no publisher confirm within {}",
                humantime::format_duration(wait)
            ))),
            Ok(Err(e)) => Err(unavailable("waiting for the publisher confirm", e)),
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(_)))) => Err(BrokerError::Refused(format!(
                "no queue is bound to `{routing_key}` (message returned unroutable)"
            ))),
            Ok(Ok(Confirmation::Nack(_))) => Err(BrokerError::Refused(format!(
                "negative confirm publishing to `{routing_key}`"
            ))),
            Ok(Ok(Confirmation::NotRequested)) => Err(BrokerError::Unavailable(
                "publisher confirms are not enabled on the channel".into(),
            )),
        }
    }

    /// Publishes a task to the work queue and waits for the confirm.
    pub async fn publish(&self, env: &Envelope) -> BrokerResult<()> {
        let q = self.queue().to_string();
        let confirm = self
            .send(0, &q, &env.to_json(), Self::properties(env))
            .await?;
        self.confirmed(&q, confirm).await
    }

    /// Publishes tasks with all confirms in flight at once.
    pub async fn publish_batch(&self, envs: &[Envelope]) -> Vec<BrokerResult<()>> {
        let q = self.queue();
        // Every publish in flight at once: lapin queues a publish's frames on
        // its first poll and resolves it once its I/O thread wrote them, so
        // awaiting them one by one would cost a thread hand-off per message
        // (about 40 ms for 1,000). `join_all` first-polls in order, so the
        // frames still go out in batch order; then the confirms are awaited.
        let sends = envs.iter().map(|env| {
            let body = env.to_json();
            let props = Self::properties(env);
            // By schedule (or id for ad-hoc tasks): one schedule's slots share a channel.
            let lane = lane_of(env.schedule.as_deref().unwrap_or(&env.id));
            async move {
                let confirm = self.send(lane, q, &body, props).await?;
                self.confirmed(q, confirm).await
            }
        });
        futures::future::join_all(sends).await
    }

    /// Publishes to the delay queue for `delay`; the broker moves it to the work queue when due.
    pub async fn publish_delayed(&self, env: &Envelope, delay: Duration) -> BrokerResult<()> {
        let tier = delay_tier_ms(delay);
        let name = self.ensure_delay_queue(tier).await?;
        let confirm = self
            .send(0, &name, &env.to_json(), Self::properties(env))
            .await?;
        self.confirmed(&name, confirm).await
    }

    /// Publishes a dead letter to `Q.dlq`.
    pub async fn publish_dead_letter(&self, record: &DeadLetter) -> BrokerResult<()> {
        let name = self.dlq_name();
        let mut headers = FieldTable::default();
        headers.insert(
            "x-cronpipe-reason".into(),
            AMQPValue::LongString(record.reason.as_str().into()),
        );
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_app_id("cronpipe".into())
            .with_headers(headers);
        if let Some(env) = &record.envelope {
            props = props.with_message_id(env.id.as_str().into());
        }
        let confirm = self.send(0, &name, &record.to_json(), props).await?;
        self.confirmed(&name, confirm).await
    }

    /// Starts a consumer on the work queue on its own channel.
    pub async fn consume(&self, prefetch: u16, tag: &str) -> BrokerResult<RabbitConsumer> {
        let (channel, consumer) = self.open_consumer(prefetch, tag).await?;
        Ok(RabbitConsumer {
            channel,
            consumer,
            tag: tag.to_string(),
            cancelled: false,
            acks: AckCoalescer::start(),
            rabbit: self.clone(),
            prefetch,
        })
    }

    /// A new channel with prefetch `prefetch` and a consumer `tag` on the work queue.
    async fn open_consumer(
        &self,
        prefetch: u16,
        tag: &str,
    ) -> BrokerResult<(Channel, lapin::Consumer)> {
        let channel = self
            .inner
            .conn
            .create_channel()
            .await
            .map_err(|e| unavailable("opening the consume channel", e))?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| unavailable("setting prefetch", e))?;
        let consumer = channel
            .basic_consume(
                self.queue().into(),
                tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| unavailable(&format!("consuming `{}`", self.queue()), e))?;
        Ok((channel, consumer))
    }

    /// A new channel on this connection, for tools that need AMQP operations
    /// of their own (the dead-letter queue tools hold deliveries unacked and
    /// close the channel to put them back).
    pub async fn channel(&self) -> BrokerResult<Channel> {
        self.inner
            .conn
            .create_channel()
            .await
            .map_err(|e| unavailable("opening a channel", e))
    }

    /// Whether the connection is up.
    pub fn is_connected(&self) -> bool {
        self.inner.conn.status().connected()
    }

    /// Closes the connection; unacked deliveries go back to their queues.
    pub async fn close(&self) {
        let _ = self.inner.conn.close(200, "bye".into()).await;
    }

    /// Deletes the work queue, the dead-letter queue and the delay queues this
    /// process declared (for tests and tear-down tools).
    pub async fn delete_topology(&self) -> BrokerResult<()> {
        let mut names = vec![self.queue().to_string(), self.dlq_name()];
        names.extend(
            self.inner
                .delay_queues
                .lock()
                .await
                .keys()
                .map(|t| self.delay_queue_name(*t)),
        );
        for name in names {
            let ch = self
                .inner
                .conn
                .create_channel()
                .await
                .map_err(|e| unavailable("opening a channel", e))?;
            let _ = ch
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await;
            let _ = ch.close(200, "deleted".into()).await;
        }
        Ok(())
    }

    /// Fetches one message from `queue` without consuming continuously (for tools and tests).
    /// The message is acked when `ack` is true, otherwise requeued.
    pub async fn get(&self, queue: &str, ack: bool) -> BrokerResult<Option<Vec<u8>>> {
        let ch = self
            .inner
            .conn
            .create_channel()
            .await
            .map_err(|e| unavailable("opening a channel", e))?;
        let got = ch
            .basic_get(queue.into(), lapin::options::BasicGetOptions::default())
            .await
            .map_err(|e| unavailable(&format!("reading `{queue}`"), e))?;
        let out = match got {
            Some(msg) => {
                let data = msg.delivery.data.clone();
                if ack {
                    msg.delivery
                        .acker
                        .ack(BasicAckOptions::default())
                        .await
                        .map_err(|e| unavailable("acking", e))?;
                } else {
                    msg.delivery
                        .acker
                        .nack(BasicNackOptions {
                            multiple: false,
                            requeue: true,
                        })
                        .await
                        .map_err(|e| unavailable("requeueing", e))?;
                }
                Some(data)
            }
            None => None,
        };
        let _ = ch.close(200, "done".into()).await;
        Ok(out)
    }
}

/// A consumer of the work queue.
pub struct RabbitConsumer {
    channel: Channel,
    consumer: lapin::Consumer,
    tag: String,
    cancelled: bool,
    acks: Arc<AckCoalescer>,
    /// To open a new channel when the broker closes this one.
    rabbit: Rabbit,
    prefetch: u16,
}

impl Drop for RabbitConsumer {
    fn drop(&mut self) {
        self.acks.close();
    }
}

impl RabbitConsumer {
    /// The next delivery. Channel errors wait for auto-recovery; `None` when cancelled or unrecoverable.
    pub async fn next(&mut self) -> Option<RabbitDelivery> {
        loop {
            match self.consumer.next().await {
                Some(Ok(d)) => {
                    self.acks.track(d.delivery_tag, &d.acker);
                    return Some(RabbitDelivery {
                        inner: d,
                        acks: self.acks.clone(),
                    });
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "Consumer channel failed; waiting for recovery");
                    match self.channel.wait_for_recovery(e).await {
                        Ok(()) => tracing::info!("Consumer channel recovered"),
                        // The broker closed this channel alone (consumer_timeout,
                        // a refused frame): lapin reopens channels only with their
                        // connection, so open another. The old channel's
                        // deliveries go back to the queue; their acks are refused
                        // (poisoned), and the Redis claim keeps the ones still
                        // running from running twice.
                        Err(e) if e.is_amqp_soft_error() && !self.cancelled => {
                            match self.rabbit.open_consumer(self.prefetch, &self.tag).await {
                                Ok((channel, consumer)) => {
                                    tracing::warn!(error = %e, "The broker closed the consumer channel; consuming on a new one");
                                    self.channel = channel;
                                    let old = std::mem::replace(&mut self.consumer, consumer);
                                    // Dropped, lapin 4.12's consumer would send a cancel
                                    // on its channel, which lapin has already removed,
                                    // and take the refusal for a connection error,
                                    // reconnecting everything. Forgotten instead: a
                                    // few hundred bytes per channel the broker closes.
                                    std::mem::forget(old);
                                }
                                Err(e2) => {
                                    tracing::error!(error = %e, reopen_error = %e2, "The broker closed the consumer channel and a new one cannot consume");
                                    return None;
                                }
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "Consumer channel cannot recover");
                            return None;
                        }
                    }
                }
                None => return None,
            }
        }
    }

    /// Cancels the consumer; deliveries already received stay unacked until settled.
    pub async fn cancel(&mut self) {
        if !self.cancelled {
            self.cancelled = true;
            let _ = self
                .channel
                .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default())
                .await;
        }
    }
}

/// One RabbitMQ delivery.
pub struct RabbitDelivery {
    inner: lapin::message::Delivery,
    acks: Arc<AckCoalescer>,
}

impl RabbitDelivery {
    /// Body bytes.
    pub fn body(&self) -> &[u8] {
        &self.inner.data
    }

    /// Broker's redelivered flag.
    pub fn redelivered(&self) -> bool {
        self.inner.redelivered
    }

    /// Acks (coalesced with other finished deliveries of the channel; returns
    /// once the ack frame covering this delivery was sent).
    pub async fn ack(self) -> BrokerResult<()> {
        if let Some(sent) = self.acks.finish(self.inner.delivery_tag, &self.inner.acker) {
            return sent.await.unwrap_or_else(|_| {
                Err(BrokerError::Unavailable(
                    "ack not sent: the consumer is gone; the broker will redeliver".into(),
                ))
            });
        }
        match self.inner.acker.ack(BasicAckOptions::default()).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(BrokerError::Unavailable(
                "ack not sent: the delivery's channel is gone; the broker will redeliver".into(),
            )),
            Err(e) => Err(unavailable("acking", e)),
        }
    }

    /// Nacks with requeue.
    pub async fn requeue(self) -> BrokerResult<()> {
        let sent = self
            .inner
            .acker
            .nack(BasicNackOptions {
                multiple: false,
                requeue: true,
            })
            .await;
        // Only once the nack frame is written may a `multiple` ack pass this tag.
        if matches!(sent, Ok(true)) {
            self.acks.forget(self.inner.delivery_tag, &self.inner.acker);
        }
        sent.map(|_| ()).map_err(|e| unavailable("requeueing", e))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// Against the local RabbitMQ: the broker closes the consumer's channel
    /// alone (here for a refused declare on it; in production, say,
    /// `consumer_timeout`). lapin does not reopen such a channel, so the
    /// consumer opens another and the unacked delivery comes again, instead
    /// of the stream ending (which stopped the worker).
    #[tokio::test]
    async fn a_consumer_channel_closed_by_the_broker_is_replaced() {
        let config = RabbitConfig {
            url: std::env::var("CRONPIPE_TEST_AMQP_URL")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
            queue: format!("cptest.reopen-{}", uuid::Uuid::new_v4()),
            ..RabbitConfig::default()
        };
        let rabbit = Rabbit::connect(&config, "reopen-test")
            .await
            .expect("RabbitMQ at 127.0.0.1:5672 (scripts/services.sh starts it)");
        let env = Envelope::new("t", serde_json::json!(1));
        rabbit.publish(&env).await.expect("publish");
        let mut consumer = rabbit.consume(4, "reopen-test").await.expect("consume");
        let first = consumer.next().await.expect("a delivery");
        assert!(!first.redelivered());
        // A declare that contradicts the queue's arguments: the broker
        // closes this channel with PRECONDITION_FAILED.
        let refused = consumer
            .channel
            .queue_declare(
                config.queue.as_str().into(),
                QueueDeclareOptions {
                    durable: false,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        assert!(refused.is_err(), "the contradicting declare must fail");
        let again = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("a delivery in time")
            .expect("the consumer goes on");
        assert!(again.redelivered());
        assert_eq!(Envelope::decode(again.body()).expect("envelope").id, env.id);
        assert!(
            first.ack().await.is_err(),
            "the old channel's ack is refused"
        );
        again.ack().await.expect("ack on the new channel");
        consumer.cancel().await;
        drop(consumer);
        rabbit.delete_topology().await.expect("delete queues");
        rabbit.close().await;
    }

    #[test]
    fn delay_tiers_have_two_significant_digits() {
        assert_eq!(delay_tier_ms(Duration::from_millis(1)), 1);
        assert_eq!(delay_tier_ms(Duration::from_millis(99)), 99);
        assert_eq!(delay_tier_ms(Duration::from_millis(1234)), 1200);
        assert_eq!(delay_tier_ms(Duration::from_millis(1250)), 1300);
        assert_eq!(delay_tier_ms(Duration::from_millis(57_891)), 58_000);
        assert_eq!(delay_tier_ms(Duration::from_secs(300)), 300_000);
    }
}
