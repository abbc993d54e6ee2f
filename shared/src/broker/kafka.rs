//! Kafka adapter (rdkafka over a bundled librdkafka).
//!
//! Topics for a work topic `T` (created at startup when missing, with
//! `broker.kafka.partitions` partitions each):
//! - `T`: tasks. The message key is the envelope's idempotency key, so every
//!   copy of one slot lands on one partition; headers `x-cronpipe-task`,
//!   `x-cronpipe-attempt`, `x-cronpipe-id` carry the envelope's routing fields.
//! - `T.retry`: retry copies and deferred messages, each with a not-before time
//!   in the header `x-cronpipe-not-before` (milliseconds since the Unix epoch).
//!   Workers consume it along with `T`. A retry partition whose next message is
//!   not yet due is paused (its later messages wait behind it) and resumed when
//!   it is due; the message is then handed to the worker like any delivery, and
//!   acking it commits the retry partition. Other partitions, and every
//!   partition of `T`, keep flowing and committing meanwhile. One topic keeps
//!   the topology small; the cost is head-of-line waiting within one retry
//!   partition: a copy runs no earlier than its own not-before and no later
//!   than the latest not-before of the copies ahead of it in that partition.
//! - `T.dlq`: dead letters, the same JSON record as on RabbitMQ, header
//!   `x-cronpipe-reason`.
//!
//! Producer: idempotent (`enable.idempotence=true`, `acks=all`); a publish
//! returns once its delivery report arrived; batches have every delivery in flight.
//!
//! Consumer: one group (`broker.kafka.group_id`), no automatic commits or
//! offset stores. A background poll loop owns the librdkafka consumer: it
//! serves rebalances, hands deliveries to [`KafkaConsumer::next`] through a
//! bounded channel (pausing every partition while too many are waiting), holds
//! retry messages until due, and commits. An [`OffsetTracker`] per partition
//! commits an offset only once that message and every earlier one in the
//! partition are settled (acked, or requeued), so a slow message never lets the
//! committed offset pass it, however many later ones finish.
//!
//! Rebalance: on revocation no more deliveries of the revoked partitions are
//! handed out (those still queued are dropped: the new owner reads them), and
//! the ones the worker holds get the grace period ([`Kafka::consume`];
//! the worker passes `worker.shutdown_grace`) to finish; then the safe offsets
//! are committed synchronously and the partitions' tracking dropped (a new
//! epoch starts on assignment). A message still running after the grace
//! period commits nothing when it ends; the new owner reads it again from the
//! committed offset, where the Redis idempotency claim keeps it from running
//! twice.
//!
//! Requeue: the same bytes (key, headers) are re-published to `T` and then the
//! original is settled, so the message comes back at the end of its partition.
//! Seeking back instead would replay every later message of the partition too,
//! and those are in flight or done.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::util::Timeout;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{BrokerError, BrokerResult};
use crate::config::KafkaConfig;
use crate::deadletter::DeadLetter;
use crate::envelope::Envelope;

/// Header: task name.
pub const HEADER_TASK: &str = "x-cronpipe-task";
/// Header: attempt number.
pub const HEADER_ATTEMPT: &str = "x-cronpipe-attempt";
/// Header: envelope id.
pub const HEADER_ID: &str = "x-cronpipe-id";
/// Header on retry-topic messages: not before this time (ms since the Unix epoch).
pub const HEADER_NOT_BEFORE: &str = "x-cronpipe-not-before";
/// Header on dead letters: the reason.
pub const HEADER_REASON: &str = "x-cronpipe-reason";
/// Header on messages re-published by [`KafkaDelivery::requeue`].
pub const HEADER_REQUEUED: &str = "x-cronpipe-requeued";

/// How often the poll loop releases due retry messages, resumes and commits.
const TICK: Duration = Duration::from_millis(25);
/// How often every partition's committable offset is committed again, moved
/// or not. rdkafka 0.39 never reports how a manual async commit ended (its
/// commit callback is not called for them: librdkafka sends those results
/// only to an `offset_commit_cb`, and rdkafka listens for events), so a commit
/// the broker refused would otherwise stand until the partition's offset
/// moves again, and an idle partition's next owner would rerun finished work.
const RECOMMIT: Duration = Duration::from_secs(5);
/// How long the poll loop may go without reading (every worker slot busy,
/// the hand-off buffer full) before it pauses every partition and reads again.
const STALL_PAUSE: Duration = Duration::from_secs(5);
/// How long metadata and admin requests at startup may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the final synchronous commit of a closing consumer may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which of cronpipe's consumed topics a message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Lane {
    /// The work topic `T`.
    Work,
    /// The retry topic `T.retry`.
    Retry,
}

/// The three topic names derived from `broker.kafka.topic`.
#[derive(Debug, Clone)]
pub struct Topics {
    /// `T`
    pub work: String,
    /// `T.retry`
    pub retry: String,
    /// `T.dlq`
    pub dlq: String,
}

impl Topics {
    fn of(config: &KafkaConfig) -> Topics {
        Topics {
            work: config.topic.clone(),
            retry: config.retry_topic(),
            dlq: config.dlq_topic(),
        }
    }

    fn lane(&self, topic: &str) -> Option<Lane> {
        if topic == self.work {
            Some(Lane::Work)
        } else if topic == self.retry {
            Some(Lane::Retry)
        } else {
            None
        }
    }

    /// The topic a lane reads.
    pub fn of_lane(&self, lane: Lane) -> &str {
        match lane {
            Lane::Work => &self.work,
            Lane::Retry => &self.retry,
        }
    }
}

/// Maps a librdkafka error to a [`BrokerError`]: configuration, authorization
/// and size problems are permanent ([`BrokerError::Setup`]), the rest transient.
fn classify(context: &str, e: &KafkaError) -> BrokerError {
    use RDKafkaErrorCode as C;
    let text = format!("{context}: {e}");
    match e {
        KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) => BrokerError::Setup(text),
        _ => match e.rdkafka_error_code() {
            Some(
                C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::GroupAuthorizationFailed
                | C::SaslAuthenticationFailed
                | C::Authentication
                | C::InvalidConfig
                | C::InvalidReplicationFactor
                | C::InvalidPartitions
                | C::InvalidTopic
                | C::MessageSizeTooLarge
                | C::InvalidMessageSize,
            ) => BrokerError::Setup(text),
            Some(C::QueueFull) => BrokerError::Refused(text),
            _ => BrokerError::Unavailable(text),
        },
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Forwards librdkafka's log lines to `tracing`.
fn forward_log(level: RDKafkaLogLevel, fac: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => {
            tracing::error!(target: "librdkafka", facility = fac, "{message}")
        }
        RDKafkaLogLevel::Warning => {
            tracing::warn!(target: "librdkafka", facility = fac, "{message}")
        }
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", facility = fac, "{message}")
        }
        RDKafkaLogLevel::Debug => {
            tracing::debug!(target: "librdkafka", facility = fac, "{message}")
        }
    }
}

/// Producer-side context: logs, and tracks whether any broker is reachable.
struct ProducerCtx {
    connected: Arc<AtomicBool>,
}

impl ClientContext for ProducerCtx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        forward_log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.connected.store(false, Ordering::Relaxed);
        }
        tracing::warn!(error = %error, reason, "Kafka producer error");
    }
}

/// A connection to Kafka: an idempotent producer and the topic names. Cheap to clone.
#[derive(Clone)]
pub struct Kafka {
    inner: Arc<Inner>,
}

struct Inner {
    config: KafkaConfig,
    client_name: String,
    topics: Topics,
    producer: FutureProducer<ProducerCtx>,
    connected: Arc<AtomicBool>,
    consumers: Mutex<Vec<(CancellationToken, JoinHandle<()>)>>,
}

impl Kafka {
    /// Creates the producer, checks the cluster answers, and creates the
    /// missing topics when `create_topics` is set.
    pub async fn connect(config: &KafkaConfig, client_name: &str) -> BrokerResult<Kafka> {
        tracing::debug!(brokers = %config.brokers, topic = %config.topic, properties = ?config.properties, "Connecting to Kafka");
        let connected = Arc::new(AtomicBool::new(true));
        let mut cc = base_config(config, client_name);
        cc.set("enable.idempotence", "true").set("acks", "all").set(
            "message.timeout.ms",
            config.delivery_timeout.get().as_millis().to_string(),
        );
        let producer: FutureProducer<ProducerCtx> = cc
            .create_with_context(ProducerCtx {
                connected: connected.clone(),
            })
            .map_err(|e| classify("creating the Kafka producer", &e))?;
        let kafka = Kafka {
            inner: Arc::new(Inner {
                config: config.clone(),
                client_name: client_name.to_string(),
                topics: Topics::of(config),
                producer,
                connected,
                consumers: Mutex::new(Vec::new()),
            }),
        };
        kafka.ensure_topics().await?;
        Ok(kafka)
    }

    /// The topic names.
    pub fn topics(&self) -> &Topics {
        &self.inner.topics
    }

    /// The config this connection was made with.
    pub fn config(&self) -> &KafkaConfig {
        &self.inner.config
    }

    /// Names of the topics that exist on the cluster.
    async fn existing_topics(&self) -> BrokerResult<BTreeSet<String>> {
        let producer = self.inner.producer.clone();
        let brokers = self.inner.config.brokers.clone();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, SETUP_TIMEOUT)
                .map(|m| m.topics().iter().map(|t| t.name().to_string()).collect())
                .map_err(|e| classify(&format!("reading cluster metadata from {brokers}"), &e))
        })
        .await
        .map_err(|e| BrokerError::Unavailable(format!("metadata task failed: {e}")))?
    }

    /// Creates whichever of the three topics is missing.
    async fn ensure_topics(&self) -> BrokerResult<()> {
        let t = &self.inner.topics;
        let wanted = [t.work.clone(), t.retry.clone(), t.dlq.clone()];
        let existing = self.existing_topics().await?;
        let missing: Vec<&String> = wanted.iter().filter(|n| !existing.contains(*n)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let cfg = &self.inner.config;
        let names = missing
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        if !cfg.create_topics {
            return Err(BrokerError::Setup(format!(
                "Kafka topics missing: {names}; create them or set broker.kafka.create_topics = true"
            )));
        }
        let admin: AdminClient<DefaultClientContext> = base_config(cfg, &self.inner.client_name)
            .create()
            .map_err(|e| classify("creating the Kafka admin client", &e))?;
        let specs: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|n| {
                NewTopic::new(
                    n,
                    cfg.partitions,
                    TopicReplication::Fixed(cfg.replication_factor),
                )
            })
            .collect();
        let opts = AdminOptions::new().operation_timeout(Some(SETUP_TIMEOUT));
        let outcome = tokio::time::timeout(
            SETUP_TIMEOUT + Duration::from_secs(5),
            admin.create_topics(specs.iter(), &opts),
        )
        .await;
        let mut failures = Vec::new();
        match outcome {
            Err(_) => failures.push("no answer to CreateTopics".to_string()),
            Ok(Err(e)) => failures.push(e.to_string()),
            Ok(Ok(results)) => {
                for r in results {
                    match r {
                        Ok(name) => {
                            tracing::info!(topic = %name, partitions = cfg.partitions, replication_factor = cfg.replication_factor, "Created Kafka topic")
                        }
                        Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                        Err((name, code)) => failures.push(format!("{name}: {code}")),
                    }
                }
            }
        }
        if failures.is_empty() {
            return Ok(());
        }
        // Another process may have created them meanwhile; only what is still missing matters.
        let existing = self.existing_topics().await?;
        let still: Vec<&String> = wanted.iter().filter(|n| !existing.contains(*n)).collect();
        if still.is_empty() {
            return Ok(());
        }
        Err(BrokerError::Setup(format!(
            "could not create Kafka topics {names} ({}); create them by hand (partitions = {}) or grant CreateTopics",
            failures.join("; "),
            cfg.partitions
        )))
    }

    fn record_headers(env: &Envelope) -> OwnedHeaders {
        let attempt = env.attempt.to_string();
        OwnedHeaders::new_with_capacity(4)
            .insert(Header {
                key: HEADER_TASK,
                value: Some(env.task.as_bytes()),
            })
            .insert(Header {
                key: HEADER_ATTEMPT,
                value: Some(attempt.as_bytes()),
            })
            .insert(Header {
                key: HEADER_ID,
                value: Some(env.id.as_bytes()),
            })
            .insert(Header {
                key: "content-type",
                value: Some("application/json".as_bytes()),
            })
    }

    /// Sends one record and waits for its delivery report.
    async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        body: &[u8],
        headers: OwnedHeaders,
    ) -> BrokerResult<()> {
        let mut record = FutureRecord::<[u8], [u8]>::to(topic)
            .payload(body)
            .headers(headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        let wait = Timeout::After(self.inner.config.delivery_timeout.get());
        match self.inner.producer.send(record, wait).await {
            Ok(_) => {
                self.inner.connected.store(true, Ordering::Relaxed);
                Ok(())
            }
            Err((e, _)) => Err(classify(&format!("publishing to `{topic}`"), &e)),
        }
    }

    /// Publishes a task to the work topic and waits for the delivery report.
    pub async fn publish(&self, env: &Envelope) -> BrokerResult<()> {
        self.send(
            &self.inner.topics.work,
            Some(env.key().as_bytes()),
            &env.to_json(),
            Self::record_headers(env),
        )
        .await
    }

    /// Publishes tasks with every delivery in flight at once; one result per task, in order.
    pub async fn publish_batch(&self, envs: &[Envelope]) -> Vec<BrokerResult<()>> {
        futures::future::join_all(envs.iter().map(|e| self.publish(e))).await
    }

    /// Publishes to the retry topic with a not-before time `delay` from now.
    pub async fn publish_delayed(&self, env: &Envelope, delay: Duration) -> BrokerResult<()> {
        let not_before = now_ms()
            .saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX))
            .to_string();
        let headers = Self::record_headers(env).insert(Header {
            key: HEADER_NOT_BEFORE,
            value: Some(not_before.as_bytes()),
        });
        self.send(
            &self.inner.topics.retry,
            Some(env.key().as_bytes()),
            &env.to_json(),
            headers,
        )
        .await
    }

    /// Publishes a dead letter to `T.dlq`.
    pub async fn publish_dead_letter(&self, record: &DeadLetter) -> BrokerResult<()> {
        let key = record.envelope.as_ref().map(|e| e.key().as_bytes());
        let headers = OwnedHeaders::new_with_capacity(2)
            .insert(Header {
                key: HEADER_REASON,
                value: Some(record.reason.as_str().as_bytes()),
            })
            .insert(Header {
                key: "content-type",
                value: Some("application/json".as_bytes()),
            });
        self.send(&self.inner.topics.dlq, key, &record.to_json(), headers)
            .await
    }

    /// Joins the consumer group on `T` and `T.retry`. At most `prefetch`
    /// deliveries wait in the hand-off channel; `tag` names the client. On a
    /// revocation no more work of the revoked partitions is handed out and
    /// the messages of theirs already handed out get up to `revoke_grace` to
    /// finish before the offsets are committed, so a rebalance moves finished
    /// work rather than re-reading it (zero: commit at once).
    pub async fn consume(
        &self,
        prefetch: u16,
        tag: &str,
        revoke_grace: Duration,
    ) -> BrokerResult<KafkaConsumer> {
        let cfg = &self.inner.config;
        let shared = Arc::new(Shared {
            kafka: self.clone(),
            topics: self.inner.topics.clone(),
            tracker: Mutex::new(OffsetTracker::default()),
            returned: Condvar::new(),
            revoke_grace,
            reassigned: AtomicBool::new(false),
        });
        let mut cc = consumer_config(cfg, tag);
        cc.set("group.id", &cfg.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        let consumer: StreamConsumer<ConsumerCtx> = cc
            .create_with_context(ConsumerCtx {
                shared: shared.clone(),
            })
            .map_err(|e| classify("creating the Kafka consumer", &e))?;
        let topics = &self.inner.topics;
        consumer
            .subscribe(&[topics.work.as_str(), topics.retry.as_str()])
            .map_err(|e| classify("subscribing", &e))?;
        let capacity = usize::from(prefetch.max(1));
        let (tx, rx) = mpsc::channel(capacity);
        let stop = CancellationToken::new();
        let high = (capacity * 4).max(256);
        let poll = PollLoop {
            consumer: Arc::new(consumer),
            shared: shared.clone(),
            tx,
            overflow: VecDeque::new(),
            held: BTreeMap::new(),
            bp_paused: false,
            stalled_since: None,
            recommitted: std::time::Instant::now(),
            probing: Arc::new(AtomicBool::new(false)),
            high,
            low: high / 4,
        };
        let handle = tokio::spawn(poll.run(stop.clone()));
        self.consumers().push((stop.clone(), handle));
        tracing::info!(group = %cfg.group_id, topics = ?[&topics.work, &topics.retry], "Kafka consumer subscribed");
        Ok(KafkaConsumer {
            rx,
            shared,
            stop,
            cancelled: false,
        })
    }

    fn consumers(&self) -> MutexGuard<'_, Vec<(CancellationToken, JoinHandle<()>)>> {
        self.inner
            .consumers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether a broker answered lately: false after librdkafka reported all
    /// brokers down, true again after the next delivery report or fetched
    /// message, or, for an idle worker, the metadata request its consumer
    /// sends every 5 s while this is false.
    pub fn is_connected(&self) -> bool {
        self.inner.connected.load(Ordering::Relaxed)
    }

    fn set_connected(&self, up: bool) {
        self.inner.connected.store(up, Ordering::Relaxed);
    }

    /// Stops this connection's consumers (final commit, leave the group) and
    /// flushes the producer. The producer stays usable.
    pub async fn close(&self) {
        let consumers: Vec<_> = self.consumers().drain(..).collect();
        for (stop, handle) in consumers {
            stop.cancel();
            let _ = handle.await;
        }
        let producer = self.inner.producer.clone();
        let _ = tokio::task::spawn_blocking(move || producer.flush(CLOSE_TIMEOUT)).await;
    }

    /// A plain (non-group-member) consumer of the given group, for tools.
    fn tool_consumer(&self, group: &str) -> BrokerResult<BaseConsumer> {
        let mut cc = consumer_config(
            &self.inner.config,
            &format!("{}-tool", self.inner.client_name),
        );
        cc.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        cc.create()
            .map_err(|e| classify("creating a Kafka tool consumer", &e))
    }

    /// The worker group's committed offsets on `topic`, by partition (`None`
    /// where nothing is committed), for tests and tools.
    pub async fn committed_offsets(&self, topic: &str) -> BrokerResult<Vec<(i32, Option<i64>)>> {
        let consumer = self.tool_consumer(&self.inner.config.group_id)?;
        let topic = topic.to_string();
        tokio::task::spawn_blocking(move || {
            let meta = consumer
                .fetch_metadata(Some(&topic), SETUP_TIMEOUT)
                .map_err(|e| classify("reading metadata", &e))?;
            let mut tpl = TopicPartitionList::new();
            for t in meta.topics() {
                for p in t.partitions() {
                    tpl.add_partition(&topic, p.id());
                }
            }
            let got = consumer
                .committed_offsets(tpl, SETUP_TIMEOUT)
                .map_err(|e| classify("reading committed offsets", &e))?;
            let mut out: Vec<(i32, Option<i64>)> = got
                .elements()
                .iter()
                .map(|e| match e.offset() {
                    Offset::Offset(o) => (e.partition(), Some(o)),
                    _ => (e.partition(), None),
                })
                .collect();
            out.sort();
            Ok(out)
        })
        .await
        .map_err(|e| BrokerError::Unavailable(format!("tool task failed: {e}")))?
    }

    /// Reads every message of `topic` from `group`'s committed offsets (the
    /// start where none) up to the current end, then commits the end for
    /// `group`: the messages are taken, as a queue read would. Run it only
    /// while no member of `group` is consuming `topic`. For tests and tools.
    pub async fn take_all(&self, topic: &str, group: &str) -> BrokerResult<Vec<Vec<u8>>> {
        Ok(self
            .take_from(topic, group, HashMap::new(), true)
            .await?
            .messages)
    }

    /// [`Kafka::take_all`], starting no earlier than `floors` (partition →
    /// offset) where those are past the committed offsets. With `must_commit`
    /// false a refused commit is not an error (librdkafka's mock cluster
    /// refuses commits from non-members of a group that ever had members,
    /// where Kafka accepts them once the group is empty); the caller keeps the
    /// returned ends as its next floors.
    pub async fn take_from(
        &self,
        topic: &str,
        group: &str,
        floors: HashMap<i32, i64>,
        must_commit: bool,
    ) -> BrokerResult<Taken> {
        let consumer = self.tool_consumer(group)?;
        let topic = topic.to_string();
        tokio::task::spawn_blocking(move || take_blocking(&consumer, &topic, &floors, must_commit))
            .await
            .map_err(|e| BrokerError::Unavailable(format!("tool task failed: {e}")))?
    }

    /// The consumer group of the dead-letter tools (`<group_id>.tools`): its
    /// committed offsets on the dead-letter topic mark where the dead letters
    /// not yet replayed or purged begin.
    pub fn dlq_tools_group(&self) -> String {
        format!("{}.tools", self.inner.config.group_id)
    }

    /// Reads up to `limit` dead letters not yet replayed or purged, oldest
    /// first within each partition. Changes nothing.
    pub async fn dlq_read(&self, limit: usize) -> BrokerResult<Vec<ToolMessage>> {
        let consumer = self.tool_consumer(&self.dlq_tools_group())?;
        let topic = self.inner.topics.dlq.clone();
        tokio::task::spawn_blocking(move || {
            read_blocking(&consumer, &topic, &HashMap::new(), limit).map(|(m, _)| m)
        })
        .await
        .map_err(|e| BrokerError::Unavailable(format!("tool task failed: {e}")))?
    }

    /// Removes dead letters from the tools' view: appends `keep` again at the
    /// end of the dead-letter topic (each confirmed), then commits `through`
    /// (partition → first offset not removed) for the tools group. Kafka
    /// cannot delete single messages, so the ones to keep that lie below a
    /// removed one move to the end, in their order; a crash between the two
    /// steps leaves them twice, never loses one.
    pub async fn dlq_remove(
        &self,
        keep: &[ToolMessage],
        through: &BTreeMap<i32, i64>,
    ) -> BrokerResult<()> {
        let topic = &self.inner.topics.dlq;
        for m in keep {
            self.send(
                topic,
                m.key.as_deref(),
                &m.body,
                m.headers.clone().unwrap_or_default(),
            )
            .await?;
        }
        let mut offsets = TopicPartitionList::new();
        for (p, o) in through {
            offsets
                .add_partition_offset(topic, *p, Offset::Offset(*o))
                .map_err(|e| classify("building offsets", &e))?;
        }
        let consumer = self.tool_consumer(&self.dlq_tools_group())?;
        tokio::task::spawn_blocking(move || commit_blocking(&consumer, &offsets, true))
            .await
            .map_err(|e| BrokerError::Unavailable(format!("tool task failed: {e}")))?
    }

    /// Deletes the three topics (for tests and tear-down tools); errors are ignored.
    pub async fn delete_topology(&self) {
        let Ok(admin) = base_config(&self.inner.config, &self.inner.client_name)
            .create::<AdminClient<DefaultClientContext>>()
        else {
            return;
        };
        let t = &self.inner.topics;
        let names = [t.work.as_str(), t.retry.as_str(), t.dlq.as_str()];
        let opts = AdminOptions::new().operation_timeout(Some(SETUP_TIMEOUT));
        let _ = tokio::time::timeout(SETUP_TIMEOUT, admin.delete_topics(&names, &opts)).await;
    }
}

/// What [`Kafka::take_from`] read.
#[derive(Debug, Default)]
pub struct Taken {
    /// Message bodies, in partition order.
    pub messages: Vec<Vec<u8>>,
    /// Where reading stopped: partition → next offset.
    pub ends: HashMap<i32, i64>,
}

/// One message read by a tool, with where it was.
#[derive(Debug, Clone)]
pub struct ToolMessage {
    /// Partition.
    pub partition: i32,
    /// Offset in its partition.
    pub offset: i64,
    /// Message key.
    pub key: Option<Vec<u8>>,
    /// Message body.
    pub body: Vec<u8>,
    /// Message headers.
    pub headers: Option<OwnedHeaders>,
}

/// Reads `topic` from `group`'s committed offsets (raised to `floors`) up to
/// the ends the partitions had when it started, or until `limit` messages.
/// Returns the messages and, per partition, where reading stopped (meaningful
/// only when the limit was not reached). Commits nothing.
fn read_blocking(
    consumer: &BaseConsumer,
    topic: &str,
    floors: &HashMap<i32, i64>,
    limit: usize,
) -> BrokerResult<(Vec<ToolMessage>, TopicPartitionList)> {
    let meta = consumer
        .fetch_metadata(Some(topic), SETUP_TIMEOUT)
        .map_err(|e| classify("reading metadata", &e))?;
    let mut all = TopicPartitionList::new();
    for t in meta.topics() {
        for p in t.partitions() {
            all.add_partition(topic, p.id());
        }
    }
    let committed = consumer
        .committed_offsets(all, SETUP_TIMEOUT)
        .map_err(|e| classify("reading committed offsets", &e))?;
    let mut assign = TopicPartitionList::new();
    let mut ends = TopicPartitionList::new();
    let mut remaining = HashMap::new();
    for e in committed.elements() {
        let p = e.partition();
        let (low, high) = consumer
            .fetch_watermarks(topic, p, SETUP_TIMEOUT)
            .map_err(|e| classify("reading watermarks", &e))?;
        let mut start = match e.offset() {
            Offset::Offset(o) => o.max(low),
            _ => low,
        };
        if let Some(floor) = floors.get(&p) {
            start = start.max(*floor);
        }
        if start < high {
            assign
                .add_partition_offset(topic, p, Offset::Offset(start))
                .map_err(|e| classify("assigning", &e))?;
            remaining.insert(p, high);
        }
        ends.add_partition_offset(topic, p, Offset::Offset(high.max(start)))
            .map_err(|e| classify("building offsets", &e))?;
    }
    let mut out = Vec::new();
    if !remaining.is_empty() && limit > 0 {
        consumer
            .assign(&assign)
            .map_err(|e| classify("assigning", &e))?;
        let deadline = std::time::Instant::now() + SETUP_TIMEOUT;
        while !remaining.is_empty() && out.len() < limit && std::time::Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    let p = m.partition();
                    if let Some(high) = remaining.get(&p).copied() {
                        if m.offset() < high {
                            out.push(ToolMessage {
                                partition: p,
                                offset: m.offset(),
                                key: m.key().map(<[u8]>::to_vec),
                                body: m.payload().unwrap_or_default().to_vec(),
                                headers: m.headers().map(|h| h.detach()),
                            });
                        }
                        if m.offset() + 1 >= high {
                            remaining.remove(&p);
                        }
                    }
                }
                Some(Err(e)) => return Err(classify("reading", &e)),
                None => {}
            }
        }
        if !remaining.is_empty() && out.len() < limit {
            return Err(BrokerError::Unavailable(format!(
                "reading `{topic}` did not reach its end within {}s",
                SETUP_TIMEOUT.as_secs()
            )));
        }
    }
    Ok((out, ends))
}

/// Commits `offsets` for the tool consumer's group. With `must_commit` false
/// a refused commit is not an error (see [`Kafka::take_from`]).
fn commit_blocking(
    consumer: &BaseConsumer,
    offsets: &TopicPartitionList,
    must_commit: bool,
) -> BrokerResult<()> {
    if offsets.count() == 0 {
        return Ok(());
    }
    // A member that just left may still be counted by the coordinator for a moment.
    let mut tries = 0;
    loop {
        match consumer.commit(offsets, CommitMode::Sync) {
            Ok(()) => return Ok(()),
            Err(_) if !must_commit => return Ok(()),
            Err(e) if tries < 10 => {
                tracing::debug!(error = %e, "Commit of a tool's offsets refused; retrying");
                tries += 1;
                std::thread::sleep(Duration::from_millis(300));
            }
            Err(e) => return Err(classify("committing", &e)),
        }
    }
}

fn take_blocking(
    consumer: &BaseConsumer,
    topic: &str,
    floors: &HashMap<i32, i64>,
    must_commit: bool,
) -> BrokerResult<Taken> {
    let (messages, ends) = read_blocking(consumer, topic, floors, usize::MAX)?;
    commit_blocking(consumer, &ends, must_commit)?;
    let ends = ends
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect();
    Ok(Taken {
        messages: messages.into_iter().map(|m| m.body).collect(),
        ends,
    })
}

/// Settings every client shares: bootstrap servers, client id, then the
/// pass-through properties (validation keeps managed keys out of them).
fn base_config(config: &KafkaConfig, client_name: &str) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &config.brokers)
        .set("client.id", client_name);
    for (k, v) in config.properties.iter() {
        cc.set(k, v);
    }
    cc
}

/// [`base_config`] plus the consumer-only settings (set on a producer,
/// librdkafka would warn that it ignores them).
fn consumer_config(config: &KafkaConfig, client_name: &str) -> ClientConfig {
    let mut cc = base_config(config, client_name);
    if !config.properties.0.contains_key("auto.offset.reset") {
        cc.set("auto.offset.reset", "earliest");
    }
    cc.set("enable.partition.eof", "false");
    cc
}

/// Per-partition bookkeeping of received and settled offsets.
///
/// Each assignment of a partition starts a new epoch; deliveries carry the
/// epoch they were received in, so a settle from before a revocation is
/// recognised and commits nothing.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    parts: HashMap<(Lane, i32), PartState>,
    next_epoch: u64,
}

#[derive(Debug)]
struct PartState {
    epoch: u64,
    /// Received and not yet settled.
    pending: BTreeSet<i64>,
    /// Handed to the worker and neither settled nor dropped yet: the work a
    /// revocation waits for.
    handed: BTreeSet<i64>,
    /// Being revoked: nothing more is handed out.
    revoking: bool,
    /// One past the highest offset received.
    next: Option<i64>,
    /// Last offset handed to a commit.
    committed: Option<i64>,
}

impl PartState {
    fn committable(&self) -> Option<i64> {
        self.pending.first().copied().or(self.next)
    }
}

impl OffsetTracker {
    /// Starts tracking a newly assigned partition; returns its epoch.
    pub fn assign(&mut self, lane: Lane, partition: i32) -> u64 {
        self.next_epoch += 1;
        let epoch = self.next_epoch;
        self.parts.insert(
            (lane, partition),
            PartState {
                epoch,
                pending: BTreeSet::new(),
                handed: BTreeSet::new(),
                revoking: false,
                next: None,
                committed: None,
            },
        );
        epoch
    }

    /// Stops tracking a revoked partition; returns the offset safe to commit
    /// if it differs from the last one committed.
    pub fn revoke(&mut self, lane: Lane, partition: i32) -> Option<i64> {
        // Even when already sent: an async commit's failure goes unseen
        // (see `RECOMMIT`), and this is the last chance to commit it.
        self.parts.remove(&(lane, partition))?.committable()
    }

    /// Records a received message; returns the partition's epoch, or `None`
    /// when the partition is not assigned or the offset was already received
    /// in this epoch (a re-fetch).
    pub fn received(&mut self, lane: Lane, partition: i32, offset: i64) -> Option<u64> {
        let state = self.parts.get_mut(&(lane, partition))?;
        if state.next.is_some_and(|n| offset < n) {
            return None;
        }
        state.pending.insert(offset);
        state.next = Some(offset + 1);
        Some(state.epoch)
    }

    /// Hands a received message to the worker; false (do not run it) when
    /// its partition was revoked or is being revoked.
    pub fn hand_out(&mut self, lane: Lane, partition: i32, offset: i64, epoch: u64) -> bool {
        match self.parts.get_mut(&(lane, partition)) {
            Some(s) if s.epoch == epoch && !s.revoking => {
                s.handed.insert(offset);
                true
            }
            _ => false,
        }
    }

    /// The worker is done with a handed-out message (settled, or dropped
    /// unsettled). True when its partition is being revoked, so a revocation
    /// may be waiting for it.
    pub fn hand_back(&mut self, lane: Lane, partition: i32, offset: i64, epoch: u64) -> bool {
        match self.parts.get_mut(&(lane, partition)) {
            Some(s) if s.epoch == epoch => {
                s.handed.remove(&offset);
                s.revoking
            }
            _ => false,
        }
    }

    /// Stops handing out messages of a partition about to be revoked.
    pub fn start_revoking(&mut self, lane: Lane, partition: i32) {
        if let Some(s) = self.parts.get_mut(&(lane, partition)) {
            s.revoking = true;
        }
    }

    /// Messages of revoking partitions still in the worker's hands.
    pub fn in_flight_revoking(&self) -> usize {
        self.parts
            .values()
            .filter(|s| s.revoking)
            .map(|s| s.handed.len())
            .sum()
    }

    /// Whether `epoch` is the partition's current epoch.
    pub fn is_current(&self, lane: Lane, partition: i32, epoch: u64) -> bool {
        self.parts
            .get(&(lane, partition))
            .is_some_and(|s| s.epoch == epoch)
    }

    /// Marks a message settled; false when its epoch is over (the partition was revoked).
    pub fn settle(&mut self, lane: Lane, partition: i32, offset: i64, epoch: u64) -> bool {
        match self.parts.get_mut(&(lane, partition)) {
            Some(s) if s.epoch == epoch => {
                s.pending.remove(&offset);
                true
            }
            _ => false,
        }
    }

    /// The offset that may be committed for a partition now: the lowest
    /// unsettled offset, or one past the highest received when all are settled.
    pub fn committable(&self, lane: Lane, partition: i32) -> Option<i64> {
        self.parts.get(&(lane, partition))?.committable()
    }

    /// Offsets that moved since last taken (with `all`, every partition's
    /// committable offset, moved or not), marked as committed.
    pub fn take_commits(&mut self, all: bool) -> Vec<(Lane, i32, i64)> {
        let mut out = Vec::new();
        for ((lane, p), s) in self.parts.iter_mut() {
            if let Some(c) = s.committable() {
                if all || s.committed != Some(c) {
                    s.committed = Some(c);
                    out.push((*lane, *p, c));
                }
            }
        }
        out
    }
}

/// State shared by the poll loop, the rebalance callbacks and the deliveries.
struct Shared {
    kafka: Kafka,
    topics: Topics,
    tracker: Mutex<OffsetTracker>,
    /// Signalled when a handed-out message comes back (see `OffsetTracker::hand_back`).
    returned: Condvar,
    /// How long a revocation waits for in-flight messages of its partitions.
    revoke_grace: Duration,
    reassigned: AtomicBool,
}

impl Shared {
    fn tracker(&self) -> MutexGuard<'_, OffsetTracker> {
        self.tracker
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits up to the grace period for the worker to finish the messages
    /// of revoking partitions. Runs on the consumer's poll (the rebalance
    /// callback); on a multi-threaded runtime the wait moves this thread's
    /// other tasks elsewhere, on a current-thread runtime it cannot wait (the
    /// tasks it would wait for run on this very thread).
    fn wait_for_revoking(&self) {
        if self.revoke_grace.is_zero() {
            return;
        }
        let wait = || {
            let guard = self.tracker();
            let (guard, timeout) = self
                .returned
                .wait_timeout_while(guard, self.revoke_grace, |t| t.in_flight_revoking() > 0)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if timeout.timed_out() {
                tracing::warn!(
                    in_flight = guard.in_flight_revoking(),
                    grace_ms = self.revoke_grace.as_millis() as u64,
                    "Revoked partitions still had tasks running after the grace period; their new owner reads them again (the Redis claim keeps them from running twice)"
                );
            }
        };
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(wait),
            Ok(_) => {}
            Err(_) => wait(),
        }
    }

    fn commit_list(&self, commits: &[(Lane, i32, i64)]) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for (lane, p, o) in commits {
            let _ = tpl.add_partition_offset(self.topics.of_lane(*lane), *p, Offset::Offset(*o));
        }
        tpl
    }
}

/// Consumer-side context: rebalance handling and commit results.
struct ConsumerCtx {
    shared: Arc<Shared>,
}

/// Reports librdkafka moving a partition's position because the group's
/// committed offset is no longer on the broker: retention (or the mock
/// cluster's size cap) deleted messages this group had not read, and with
/// `auto.offset.reset = earliest` the consumer continues from the oldest
/// message left. The deleted tasks are lost; nothing else would say so but
/// a librdkafka warning. `message` is librdkafka's warning,
/// `"<topic> [<partition>]: offset reset (at offset N …) to …: <reason>"`.
/// A new group starting from `auto.offset.reset` is not logged this way.
fn report_offset_reset(message: &str) {
    let topic = message.split(" [").next().unwrap_or("?").to_string();
    metrics::counter!("cronpipe_kafka_offset_resets_total", "topic" => topic.clone()).increment(1);
    tracing::error!(
        topic,
        detail = message,
        "Kafka position lost: the group's committed offset is no longer on the broker \
         (deleted by retention before this group read it), so consuming goes on from the \
         oldest message left; the tasks deleted in between are lost. Keep topic retention \
         longer than any stretch without workers"
    );
}

impl ClientContext for ConsumerCtx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        let warning_or_worse = matches!(
            level,
            RDKafkaLogLevel::Emerg
                | RDKafkaLogLevel::Alert
                | RDKafkaLogLevel::Critical
                | RDKafkaLogLevel::Error
                | RDKafkaLogLevel::Warning
        );
        if fac == "OFFSET" && warning_or_worse && log_message.contains(": offset reset (at ") {
            report_offset_reset(log_message);
        }
        forward_log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.shared.kafka.set_connected(false);
        }
        tracing::warn!(error = %error, reason, "Kafka consumer error");
    }
}

impl ConsumerContext for ConsumerCtx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let shared = &self.shared;
        match rebalance {
            Rebalance::Revoke(tpl) => {
                // Stop handing out work of these partitions, and give what is
                // running the grace period to finish, so its offsets are
                // committed before the partitions move.
                {
                    let mut tracker = shared.tracker();
                    for e in tpl.elements() {
                        if let Some(lane) = shared.topics.lane(e.topic()) {
                            tracker.start_revoking(lane, e.partition());
                        }
                    }
                }
                shared.wait_for_revoking();
                let mut commits = Vec::new();
                {
                    let mut tracker = shared.tracker();
                    for e in tpl.elements() {
                        if let Some(lane) = shared.topics.lane(e.topic()) {
                            if let Some(o) = tracker.revoke(lane, e.partition()) {
                                commits.push((lane, e.partition(), o));
                            }
                        }
                    }
                }
                // Commit what is settled before the partitions go to another member.
                if !commits.is_empty() {
                    if let Err(e) = consumer.commit(&shared.commit_list(&commits), CommitMode::Sync)
                    {
                        tracing::warn!(error = %e, "Commit on revocation failed; the new owner re-reads from the last commit");
                    }
                }
                tracing::info!(partitions = tpl.count(), "Kafka partitions revoked");
            }
            Rebalance::Assign(tpl) => {
                let mut tracker = shared.tracker();
                for e in tpl.elements() {
                    if let Some(lane) = shared.topics.lane(e.topic()) {
                        tracker.assign(lane, e.partition());
                    }
                }
                shared.reassigned.store(true, Ordering::SeqCst);
                tracing::info!(partitions = tpl.count(), "Kafka partitions assigned");
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "Kafka rebalance error"),
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        _offsets: &TopicPartitionList,
    ) {
        match result {
            Ok(()) => self.shared.kafka.set_connected(true),
            Err(e) => {
                tracing::warn!(error = %e, "Offset commit failed; it is sent again within 5 s")
            }
        }
    }
}

/// The background loop that owns the librdkafka consumer.
struct PollLoop {
    consumer: Arc<StreamConsumer<ConsumerCtx>>,
    shared: Arc<Shared>,
    tx: mpsc::Sender<KafkaDelivery>,
    /// Received, not yet in the channel (it was full).
    overflow: VecDeque<KafkaDelivery>,
    /// Retry messages not yet due, by retry partition (each such partition is paused).
    held: BTreeMap<i32, VecDeque<(KafkaDelivery, i64)>>,
    /// Whether every partition is paused because `overflow` stayed full.
    bp_paused: bool,
    /// Since when `overflow` is full and the loop stopped reading messages.
    stalled_since: Option<std::time::Instant>,
    /// When every partition's offset was last committed (see [`RECOMMIT`]).
    recommitted: std::time::Instant,
    /// A metadata request is under way to learn whether a broker answers
    /// again (see [`PollLoop::probe_if_down`]).
    probing: Arc<AtomicBool>,
    high: usize,
    low: usize,
}

impl PollLoop {
    async fn run(mut self, stop: CancellationToken) {
        let consumer = self.consumer.clone();
        let mut stream = consumer.stream();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.shared.reassigned.swap(false, Ordering::SeqCst) {
                self.after_rebalance();
            }
            let tx = self.tx.clone();
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                permit = tx.reserve(), if !self.overflow.is_empty() => match permit {
                    Ok(permit) => {
                        if let Some(d) = self.overflow.pop_front() {
                            permit.send(d);
                        }
                        self.maybe_resume();
                    }
                    Err(_) => self.overflow.clear(),
                },
                // Backpressure: with `high` deliveries waiting, stop reading and
                // let librdkafka's own prefetch limit stop the fetching. Pausing
                // instead would throw its prefetched messages away and cost a
                // re-fetch per cycle; it is kept for long stalls (see `housekeeping`).
                m = stream.next(), if self.overflow.len() < self.high || self.bp_paused => match m {
                    Some(Ok(m)) => self.on_message(m.detach()),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "Kafka consume error");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    None => break,
                },
                _ = tick.tick() => self.housekeeping(),
            }
        }
        drop(stream);
        // Final commit of everything settled, then leave the group.
        let commits = self.shared.tracker().take_commits(true);
        if !commits.is_empty() {
            let tpl = self.shared.commit_list(&commits);
            let consumer = self.consumer.clone();
            let _ = tokio::time::timeout(
                CLOSE_TIMEOUT,
                tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync)),
            )
            .await;
        }
        drop(self);
        // Dropping the last handle closes the consumer, which polls until the
        // group is left; keep that off the async threads.
        let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
    }

    fn on_message(&mut self, m: OwnedMessage) {
        self.shared.kafka.set_connected(true);
        let Some(lane) = self.shared.topics.lane(m.topic()) else {
            return;
        };
        let Some(epoch) = self
            .shared
            .tracker()
            .received(lane, m.partition(), m.offset())
        else {
            return;
        };
        let d = KafkaDelivery::new(m, lane, epoch, self.shared.clone());
        if lane == Lane::Retry {
            let due = d.not_before_ms().unwrap_or(0);
            let partition = d.partition;
            let queue = self.held.entry(partition).or_default();
            if !queue.is_empty() || due > now_ms() {
                let first = queue.is_empty();
                queue.push_back((d, due));
                if first {
                    self.pause_retry(partition);
                }
                return;
            }
            if queue.is_empty() {
                self.held.remove(&partition);
            }
        }
        self.enqueue(d);
    }

    fn enqueue(&mut self, d: KafkaDelivery) {
        if self.overflow.is_empty() {
            match self.tx.try_send(d) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(d)) => self.overflow.push_back(d),
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        } else {
            self.overflow.push_back(d);
        }
        if self.overflow.len() >= self.high && self.stalled_since.is_none() {
            self.stalled_since = Some(std::time::Instant::now());
        }
    }

    /// Pauses every partition after the loop stopped reading for [`STALL_PAUSE`]:
    /// it can then read again, so rebalances and `max.poll.interval.ms` are
    /// served while every worker slot is busy with long tasks.
    fn pause_if_stalled(&mut self) {
        let stalled = self
            .stalled_since
            .is_some_and(|at| at.elapsed() >= STALL_PAUSE);
        if stalled && !self.bp_paused {
            match self.consumer.assignment() {
                Ok(all) => {
                    tracing::info!(
                        partitions = all.count(),
                        waiting = self.overflow.len(),
                        "Every worker slot stayed busy for {STALL_PAUSE:?}: pausing the partitions until the backlog drains"
                    );
                    if let Err(e) = self.consumer.pause(&all) {
                        tracing::warn!(error = %e, "Could not pause partitions");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "Could not read the assignment to pause it"),
            }
            self.bp_paused = true;
        }
    }

    fn maybe_resume(&mut self) {
        if self.overflow.len() < self.high {
            self.stalled_since = None;
        }
        if self.bp_paused && self.overflow.len() <= self.low {
            // Until the resume is done the partitions stay marked paused, so
            // a failure here is tried again on the next tick instead of
            // leaving them paused for good.
            let all = match self.consumer.assignment() {
                Ok(all) => all,
                Err(e) => {
                    tracing::warn!(error = %e, "Could not read the assignment to resume it; trying again");
                    return;
                }
            };
            let mut tpl = TopicPartitionList::new();
            for e in all.elements() {
                let held = self.shared.topics.lane(e.topic()) == Some(Lane::Retry)
                    && self.held.contains_key(&e.partition());
                if !held {
                    tpl.add_partition(e.topic(), e.partition());
                }
            }
            match self.consumer.resume(&tpl) {
                Ok(()) => {
                    self.bp_paused = false;
                    tracing::info!(
                        partitions = tpl.count(),
                        waiting = self.overflow.len(),
                        "Backlog drained: resumed the paused partitions"
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Could not resume partitions; trying again")
                }
            }
        }
    }

    fn pause_retry(&self, partition: i32) {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.shared.topics.retry, partition);
        if let Err(e) = self.consumer.pause(&tpl) {
            tracing::warn!(error = %e, partition, "Could not pause a retry partition");
        }
    }

    /// After librdkafka reported all brokers down, an idle consumer sees no
    /// message or delivery report that would mark Kafka reachable again
    /// (rdkafka does not report manual commits' results), so `/readyz` would
    /// stay 503 until the next task: ask a broker for the work topic's
    /// metadata, off the async threads, and mark Kafka reachable on an answer.
    fn probe_if_down(&self) {
        if self.shared.kafka.is_connected() || self.probing.swap(true, Ordering::SeqCst) {
            return;
        }
        let (consumer, kafka, probing) = (
            self.consumer.clone(),
            self.shared.kafka.clone(),
            self.probing.clone(),
        );
        let topic = self.shared.topics.work.clone();
        tokio::task::spawn_blocking(move || {
            if consumer
                .fetch_metadata(Some(&topic), Duration::from_secs(5))
                .is_ok()
            {
                kafka.set_connected(true);
            }
            probing.store(false, Ordering::SeqCst);
        });
    }

    fn after_rebalance(&mut self) {
        let current = |d: &KafkaDelivery| d.is_current();
        self.overflow.retain(current);
        self.held.retain(|_, q| {
            q.retain(|(d, _)| d.is_current());
            !q.is_empty()
        });
        // librdkafka keeps an application's pause on a partition across its
        // revocation and a later re-assignment (confluent-kafka-go#193), so
        // a partition paused for backpressure, handed to another member and
        // given back would never be fetched again. Every assignment is set
        // to what this loop wants now: all paused while the backlog drains,
        // else all running but the retry partitions holding a copy not yet due.
        let all = match self.consumer.assignment() {
            Ok(all) => all,
            Err(e) => {
                tracing::warn!(error = %e, "Could not read the new assignment to set its pauses");
                TopicPartitionList::new()
            }
        };
        let (mut pause, mut resume) = (TopicPartitionList::new(), TopicPartitionList::new());
        for e in all.elements() {
            let held = self.shared.topics.lane(e.topic()) == Some(Lane::Retry)
                && self.held.contains_key(&e.partition());
            let list = if self.bp_paused || held {
                &mut pause
            } else {
                &mut resume
            };
            list.add_partition(e.topic(), e.partition());
        }
        if pause.count() > 0 {
            if let Err(e) = self.consumer.pause(&pause) {
                tracing::warn!(error = %e, "Could not pause partitions after a rebalance");
            }
        }
        if resume.count() > 0 {
            if let Err(e) = self.consumer.resume(&resume) {
                tracing::warn!(error = %e, "Could not resume partitions after a rebalance");
            }
        }
        self.maybe_resume();
    }

    fn housekeeping(&mut self) {
        let now = now_ms();
        let mut due = Vec::new();
        let mut emptied = Vec::new();
        for (p, q) in self.held.iter_mut() {
            while let Some((d, at)) = q.front() {
                if !d.is_current() {
                    q.pop_front();
                } else if *at <= now {
                    if let Some((d, _)) = q.pop_front() {
                        due.push(d);
                    }
                } else {
                    break;
                }
            }
            if q.is_empty() {
                emptied.push(*p);
            }
        }
        for d in due {
            self.enqueue(d);
        }
        if !emptied.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for p in emptied {
                self.held.remove(&p);
                tpl.add_partition(&self.shared.topics.retry, p);
            }
            if !self.bp_paused {
                if let Err(e) = self.consumer.resume(&tpl) {
                    tracing::warn!(error = %e, "Could not resume retry partitions");
                }
            }
        }
        self.maybe_resume();
        self.pause_if_stalled();
        let all = self.recommitted.elapsed() >= RECOMMIT;
        if all {
            self.recommitted = std::time::Instant::now();
            self.probe_if_down();
        }
        let commits = self.shared.tracker().take_commits(all);
        if !commits.is_empty() {
            if let Err(e) = self
                .consumer
                .commit(&self.shared.commit_list(&commits), CommitMode::Async)
            {
                tracing::warn!(error = %e, "Offset commit failed; it is sent again within 5 s");
            }
        }
    }
}

/// A stream of deliveries from the work and retry topics.
pub struct KafkaConsumer {
    rx: mpsc::Receiver<KafkaDelivery>,
    shared: Arc<Shared>,
    stop: CancellationToken,
    cancelled: bool,
}

impl KafkaConsumer {
    /// The next delivery of a partition this consumer still owns; `None` once cancelled or closed.
    pub async fn next(&mut self) -> Option<KafkaDelivery> {
        while !self.cancelled {
            let d = self.rx.recv().await?;
            if d.hand_out() {
                return Some(d);
            }
            // Its partition was revoked after it was fetched: the new owner reads it again.
        }
        None
    }

    /// Stops handing out deliveries. The poll loop keeps committing the acks of
    /// those in flight until the broker is closed.
    pub async fn cancel(&mut self) {
        self.cancelled = true;
        self.rx.close();
    }

    /// The offset the group may commit now for a partition (see [`OffsetTracker::committable`]).
    pub fn committable(&self, lane: Lane, partition: i32) -> Option<i64> {
        self.shared.tracker().committable(lane, partition)
    }
}

impl Drop for KafkaConsumer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One Kafka message and the means to settle it.
pub struct KafkaDelivery {
    lane: Lane,
    partition: i32,
    offset: i64,
    epoch: u64,
    /// The message as received (detached once; body, key and headers are read from it).
    msg: OwnedMessage,
    shared: Arc<Shared>,
}

impl KafkaDelivery {
    fn new(m: OwnedMessage, lane: Lane, epoch: u64, shared: Arc<Shared>) -> Self {
        KafkaDelivery {
            lane,
            partition: m.partition(),
            offset: m.offset(),
            epoch,
            msg: m,
            shared,
        }
    }

    fn header(&self, name: &str) -> Option<&[u8]> {
        self.msg
            .headers()?
            .iter()
            .find(|h| h.key == name)
            .and_then(|h| h.value)
    }

    fn not_before_ms(&self) -> Option<i64> {
        std::str::from_utf8(self.header(HEADER_NOT_BEFORE)?)
            .ok()?
            .parse()
            .ok()
    }

    fn hand_out(&self) -> bool {
        self.shared
            .tracker()
            .hand_out(self.lane, self.partition, self.offset, self.epoch)
    }

    fn is_current(&self) -> bool {
        self.shared
            .tracker()
            .is_current(self.lane, self.partition, self.epoch)
    }

    /// The message body.
    pub fn body(&self) -> &[u8] {
        self.msg.payload().unwrap_or_default()
    }

    /// Which topic it came from.
    pub fn lane(&self) -> Lane {
        self.lane
    }

    /// Its partition.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// Its offset.
    pub fn offset(&self) -> i64 {
        self.offset
    }

    /// Whether it was handed back once already ([`KafkaDelivery::requeue`]).
    pub fn redelivered(&self) -> bool {
        self.header(HEADER_REQUEUED).is_some()
    }

    /// Settles it: its offset may be committed once every earlier one in the
    /// partition is settled too. An error means the partition was revoked
    /// meanwhile; the new owner reads the message again.
    pub async fn ack(self) -> BrokerResult<()> {
        if self
            .shared
            .tracker()
            .settle(self.lane, self.partition, self.offset, self.epoch)
        {
            Ok(())
        } else {
            Err(BrokerError::Unavailable(format!(
                "partition {} of `{}` was revoked before the ack; its new owner reads offset {} again",
                self.partition,
                self.shared.topics.of_lane(self.lane),
                self.offset
            )))
        }
    }

    /// Hands it back: re-publishes the same bytes to the work topic, then
    /// settles the original. A failed re-publish (a broker outage longer than
    /// `delivery_timeout`) is tried again, 8 times over about half a minute
    /// with backoff, while the partition stays ours: until the copy is out, the
    /// original holds the partition's commits and runs nowhere. Past that,
    /// the original stays unsettled and comes back after a restart or
    /// rebalance. A delivery of a revoked partition is simply dropped: its
    /// new owner reads it again.
    pub async fn requeue(self) -> BrokerResult<()> {
        if !self.is_current() {
            return Ok(());
        }
        let mut headers = OwnedHeaders::new();
        if let Some(h) = self.msg.headers() {
            for h in h.iter() {
                if h.key != HEADER_NOT_BEFORE && h.key != HEADER_REQUEUED {
                    headers = headers.insert(Header {
                        key: h.key,
                        value: h.value,
                    });
                }
            }
        }
        headers = headers.insert(Header {
            key: HEADER_REQUEUED,
            value: Some("1".as_bytes()),
        });
        let kafka = &self.shared.kafka;
        let mut waits = backon::BackoffBuilder::build(
            backon::ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(250))
                .with_max_delay(Duration::from_secs(8))
                .with_jitter()
                .with_max_times(8),
        );
        loop {
            let sent = kafka
                .send(
                    &kafka.inner.topics.work,
                    self.msg.key(),
                    self.msg.payload().unwrap_or_default(),
                    headers.clone(),
                )
                .await;
            let e = match sent {
                Ok(()) => break,
                Err(e) => e,
            };
            if !self.is_current() {
                // Revoked meanwhile: the new owner reads the original again.
                return Ok(());
            }
            let Some(wait) = waits.next() else {
                return Err(e);
            };
            tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, partition = self.partition, offset = self.offset, "Could not hand the message back to the work topic; retrying");
            tokio::time::sleep(wait).await;
        }
        self.shared
            .tracker()
            .settle(self.lane, self.partition, self.offset, self.epoch);
        Ok(())
    }
}

impl Drop for KafkaDelivery {
    fn drop(&mut self) {
        // Settled or not, the worker is done with it: a revocation waiting
        // for this partition may go on.
        let revoking =
            self.shared
                .tracker()
                .hand_back(self.lane, self.partition, self.offset, self.epoch);
        // Waking is a system call; only a revocation waits on it.
        if revoking {
            self.shared.returned.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revoking_partition_hands_out_nothing_and_counts_what_is_still_out() {
        let mut t = OffsetTracker::default();
        let e = t.assign(Lane::Work, 0);
        let other = t.assign(Lane::Work, 1);
        for o in 0..3 {
            t.received(Lane::Work, 0, o);
        }
        t.received(Lane::Work, 1, 0);
        assert!(t.hand_out(Lane::Work, 0, 0, e));
        assert!(t.hand_out(Lane::Work, 0, 1, e));
        assert!(t.hand_out(Lane::Work, 1, 0, other));
        assert_eq!(t.in_flight_revoking(), 0, "nothing is being revoked yet");
        t.start_revoking(Lane::Work, 0);
        assert!(
            !t.hand_out(Lane::Work, 0, 2, e),
            "offset 2 stays for the new owner"
        );
        assert_eq!(
            t.in_flight_revoking(),
            2,
            "partition 1's message is not waited for"
        );
        assert!(t.settle(Lane::Work, 0, 0, e));
        assert!(
            !t.hand_back(Lane::Work, 1, 0, other),
            "no revocation waits for partition 1"
        );
        assert_eq!(t.in_flight_revoking(), 2);
        assert!(
            t.hand_back(Lane::Work, 0, 0, e),
            "a revocation may wait for partition 0"
        );
        assert!(t.hand_back(Lane::Work, 0, 1, e)); // dropped unsettled
        assert_eq!(t.in_flight_revoking(), 0);
        assert_eq!(
            t.revoke(Lane::Work, 0),
            Some(1),
            "commit stops before the unsettled offset 1"
        );
    }

    #[test]
    fn commits_never_pass_an_unsettled_offset() {
        let mut t = OffsetTracker::default();
        let e = t.assign(Lane::Work, 0);
        for o in 10..15 {
            assert_eq!(t.received(Lane::Work, 0, o), Some(e));
        }
        assert_eq!(t.committable(Lane::Work, 0), Some(10));
        for o in 11..15 {
            assert!(t.settle(Lane::Work, 0, o, e));
        }
        assert_eq!(
            t.committable(Lane::Work, 0),
            Some(10),
            "10 is still running"
        );
        assert_eq!(t.take_commits(false), vec![(Lane::Work, 0, 10)]);
        assert!(
            t.take_commits(false).is_empty(),
            "unchanged offsets are not re-committed"
        );
        assert!(t.settle(Lane::Work, 0, 10, e));
        assert_eq!(t.take_commits(false), vec![(Lane::Work, 0, 15)]);
    }

    #[test]
    fn refetched_offsets_are_ignored() {
        let mut t = OffsetTracker::default();
        let e = t.assign(Lane::Retry, 3);
        assert_eq!(t.received(Lane::Retry, 3, 5), Some(e));
        assert_eq!(t.received(Lane::Retry, 3, 5), None);
        assert_eq!(t.received(Lane::Retry, 3, 4), None);
        assert_eq!(t.received(Lane::Work, 3, 4), None, "not assigned");
    }

    #[test]
    fn revocation_ends_the_epoch_and_returns_the_safe_offset() {
        let mut t = OffsetTracker::default();
        let e1 = t.assign(Lane::Work, 1);
        t.received(Lane::Work, 1, 0);
        t.received(Lane::Work, 1, 1);
        t.settle(Lane::Work, 1, 0, e1);
        assert_eq!(t.revoke(Lane::Work, 1), Some(1));
        assert!(
            !t.settle(Lane::Work, 1, 1, e1),
            "late ack of a revoked partition"
        );
        let e2 = t.assign(Lane::Work, 1);
        assert_ne!(e1, e2);
        assert!(!t.is_current(Lane::Work, 1, e1));
        assert!(
            !t.settle(Lane::Work, 1, 1, e1),
            "old epoch never settles the new one"
        );
        assert_eq!(t.received(Lane::Work, 1, 1), Some(e2));
        assert_eq!(t.committable(Lane::Work, 1), Some(1));
    }

    #[test]
    fn settled_offsets_are_sent_again_on_the_full_round_and_at_revocation() {
        // An async commit's outcome is never reported, so an offset once
        // sent is sent again: with every full round, and on revocation.
        let mut t = OffsetTracker::default();
        let e = t.assign(Lane::Work, 0);
        t.received(Lane::Work, 0, 7);
        t.settle(Lane::Work, 0, 7, e);
        assert_eq!(t.take_commits(false), vec![(Lane::Work, 0, 8)]);
        assert_eq!(t.take_commits(false), vec![]);
        assert_eq!(t.take_commits(true), vec![(Lane::Work, 0, 8)]);
        assert_eq!(t.revoke(Lane::Work, 0), Some(8));
    }
}
