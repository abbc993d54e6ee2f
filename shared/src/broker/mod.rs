//! The broker abstraction. A closed set of adapters chosen by config at
//! runtime; an enum over them is simpler than trait objects with async methods.
//! Every publish returns only after the broker confirmed the message; a
//! consumed [`Delivery`] carries its own `ack` and `requeue`. Retry copies and
//! dead letters are confirmed publishes made before the original is acked.
//!
//! - [`rabbitmq`]: queues, per-delay TTL queues, publisher confirms;
//!   `rabbit_acks` coalesces a consumer's acks into `multiple` acks.
//! - [`kafka`]: topics `T`, `T.retry`, `T.dlq`, idempotent producer, manual
//!   per-partition offset commits.

pub mod kafka;
mod rabbit_acks;
pub mod rabbitmq;

use std::time::Duration;

use crate::config::{BrokerConfig, BrokerKind};
use crate::deadletter::DeadLetter;
use crate::envelope::Envelope;

/// A broker failure.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The broker is unreachable, closed the channel, or did not confirm in time. Try again.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker refused the message (negative confirm). Try again; it may be a resource alarm.
    #[error("broker refused the message: {0}")]
    Refused(String),
    /// The broker's setup conflicts with cronpipe's (for example a queue of another type). Fix the config.
    #[error("broker setup conflict: {0}")]
    Setup(String),
}

impl BrokerError {
    /// Whether trying again later can succeed.
    pub fn is_transient(&self) -> bool {
        !matches!(self, BrokerError::Setup(_))
    }
}

/// Result alias for broker operations.
pub type BrokerResult<T> = Result<T, BrokerError>;

/// A connected broker.
#[derive(Clone)]
pub enum Broker {
    /// RabbitMQ.
    Rabbit(rabbitmq::Rabbit),
    /// Kafka.
    Kafka(kafka::Kafka),
}

/// A broker destination, for [`Broker::drain`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// The work queue / topic.
    Work,
    /// Where retry copies wait (RabbitMQ delay queues this process declared; the Kafka retry topic).
    Retry,
    /// The dead-letter queue / topic.
    DeadLetter,
}

impl Broker {
    /// Connects and declares the topology (work queue, dead-letter queue).
    pub async fn connect(config: &BrokerConfig, client_name: &str) -> BrokerResult<Broker> {
        match config.kind {
            BrokerKind::Rabbitmq => Ok(Broker::Rabbit(
                rabbitmq::Rabbit::connect(&config.rabbitmq, client_name).await?,
            )),
            BrokerKind::Kafka => Ok(Broker::Kafka(
                kafka::Kafka::connect(&config.kafka, client_name).await?,
            )),
        }
    }

    /// Publishes one task, returning once the broker confirmed it.
    pub async fn publish(&self, env: &Envelope) -> BrokerResult<()> {
        match self {
            Broker::Rabbit(r) => r.publish(env).await,
            Broker::Kafka(k) => k.publish(env).await,
        }
    }

    /// Publishes many tasks with their confirms in flight together; one result per task, in order.
    pub async fn publish_batch(&self, envs: &[Envelope]) -> Vec<BrokerResult<()>> {
        match self {
            Broker::Rabbit(r) => r.publish_batch(envs).await,
            Broker::Kafka(k) => k.publish_batch(envs).await,
        }
    }

    /// Publishes a task to be delivered to the work queue after `delay` (held by the broker).
    pub async fn publish_delayed(&self, env: &Envelope, delay: Duration) -> BrokerResult<()> {
        match self {
            Broker::Rabbit(r) => r.publish_delayed(env, delay).await,
            Broker::Kafka(k) => k.publish_delayed(env, delay).await,
        }
    }

    /// Publishes a dead letter, returning once the broker confirmed it.
    pub async fn publish_dead_letter(&self, record: &DeadLetter) -> BrokerResult<()> {
        match self {
            Broker::Rabbit(r) => r.publish_dead_letter(record).await,
            Broker::Kafka(k) => k.publish_dead_letter(record).await,
        }
    }

    /// Starts consuming the work queue with at most `prefetch` unacked
    /// deliveries. `revoke_grace` is for Kafka rebalances: a revocation waits
    /// up to that long for the in-flight messages of the revoked partitions
    /// before committing (see [`kafka::Kafka::consume`]); RabbitMQ has no
    /// revocations and ignores it.
    pub async fn consume(
        &self,
        prefetch: u16,
        tag: &str,
        revoke_grace: Duration,
    ) -> BrokerResult<Consumer> {
        match self {
            Broker::Rabbit(r) => Ok(Consumer::Rabbit(r.consume(prefetch, tag).await?)),
            Broker::Kafka(k) => Ok(Consumer::Kafka(
                k.consume(prefetch, tag, revoke_grace).await?,
            )),
        }
    }

    /// Whether the connection is up.
    pub fn is_connected(&self) -> bool {
        match self {
            Broker::Rabbit(r) => r.is_connected(),
            Broker::Kafka(k) => k.is_connected(),
        }
    }

    /// Closes the connection (Kafka: stops this connection's consumers after a
    /// final commit and flushes the producer).
    pub async fn close(&self) {
        match self {
            Broker::Rabbit(r) => r.close().await,
            Broker::Kafka(k) => k.close().await,
        }
    }

    /// Takes every message now waiting at `dest` and returns their bodies (for
    /// tests and tools; run it while no worker consumes `dest`). RabbitMQ: gets
    /// and acks them. Kafka: reads from the worker group's committed offsets
    /// (`Work`, `Retry`) or a `<group_id>.tools` group's (`DeadLetter`) to the
    /// end, then commits the end.
    pub async fn drain(&self, dest: Destination) -> BrokerResult<Vec<Vec<u8>>> {
        match self {
            Broker::Rabbit(r) => {
                let queues = match dest {
                    Destination::Work => vec![r.queue().to_string()],
                    Destination::DeadLetter => vec![r.dlq_name()],
                    Destination::Retry => r.delay_queue_names().await,
                };
                let mut out = Vec::new();
                for q in queues {
                    while let Some(m) = r.get(&q, true).await? {
                        out.push(m);
                    }
                }
                Ok(out)
            }
            Broker::Kafka(k) => {
                let topics = k.topics();
                let group = &k.config().group_id;
                match dest {
                    Destination::Work => k.take_all(&topics.work, group).await,
                    Destination::Retry => k.take_all(&topics.retry, group).await,
                    Destination::DeadLetter => k.take_all(&topics.dlq, &k.dlq_tools_group()).await,
                }
            }
        }
    }
}

/// A stream of deliveries from the work queue.
// The RabbitMQ variant is the larger; boxing it would add an allocation per
// delivery on the RabbitMQ path, and these values are short-lived.
#[allow(clippy::large_enum_variant)]
pub enum Consumer {
    /// RabbitMQ consumer.
    Rabbit(rabbitmq::RabbitConsumer),
    /// Kafka consumer.
    Kafka(kafka::KafkaConsumer),
}

impl Consumer {
    /// The next delivery; `None` once the consumer is cancelled or the broker is gone for good.
    pub async fn next(&mut self) -> Option<Delivery> {
        match self {
            Consumer::Rabbit(c) => c.next().await.map(Delivery::Rabbit),
            Consumer::Kafka(c) => c.next().await.map(Delivery::Kafka),
        }
    }

    /// Stops new deliveries; unacked ones stay with this consumer until acked or the channel closes.
    pub async fn cancel(&mut self) {
        match self {
            Consumer::Rabbit(c) => c.cancel().await,
            Consumer::Kafka(c) => c.cancel().await,
        }
    }
}

/// One delivered message and the means to settle it.
// The RabbitMQ variant is the larger; boxing it would add an allocation per
// delivery on the RabbitMQ path, and these values are short-lived.
#[allow(clippy::large_enum_variant)]
pub enum Delivery {
    /// RabbitMQ delivery.
    Rabbit(rabbitmq::RabbitDelivery),
    /// Kafka delivery.
    Kafka(kafka::KafkaDelivery),
}

impl Delivery {
    /// The message body.
    pub fn body(&self) -> &[u8] {
        match self {
            Delivery::Rabbit(d) => d.body(),
            Delivery::Kafka(d) => d.body(),
        }
    }

    /// Whether the broker says this was delivered before.
    pub fn redelivered(&self) -> bool {
        match self {
            Delivery::Rabbit(d) => d.redelivered(),
            Delivery::Kafka(d) => d.redelivered(),
        }
    }

    /// Acknowledges: the message is done with. An error means the channel died
    /// and the broker will deliver the message again.
    pub async fn ack(self) -> BrokerResult<()> {
        match self {
            Delivery::Rabbit(d) => d.ack().await,
            Delivery::Kafka(d) => d.ack().await,
        }
    }

    /// Hands the message back to the broker for redelivery (Kafka: re-published
    /// to the work topic, then settled; see [`kafka`]).
    pub async fn requeue(self) -> BrokerResult<()> {
        match self {
            Delivery::Rabbit(d) => d.requeue().await,
            Delivery::Kafka(d) => d.requeue().await,
        }
    }
}
