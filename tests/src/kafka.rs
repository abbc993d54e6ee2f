//! Kafka test worlds: librdkafka's in-process mock cluster (or a real
//! Kafka-protocol broker named by `CRONPIPE_TEST_KAFKA_BROKERS`), and the
//! Kafka-only helpers of [`TestEnv`] (committed offsets, raw produce,
//! sibling worlds on one cluster).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cronpipe_shared::broker::kafka::Kafka;
use cronpipe_shared::Broker;
use rdkafka::producer::{BaseProducer, FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;

use crate::{redis_url, TestEnv};

/// Env var naming a real Kafka-protocol broker (`host:port`) for process-level tests.
pub const EXTERNAL_BROKERS_VAR: &str = "CRONPIPE_TEST_KAFKA_BROKERS";

/// The bootstrap servers of an external broker for process-level tests, if one is configured.
pub fn external_brokers() -> Option<String> {
    std::env::var(EXTERNAL_BROKERS_VAR)
        .ok()
        .filter(|s| !s.trim().is_empty())
}

/// librdkafka's mock cluster, living inside this process (one broker, group
/// rebalances without the initial 3 s delay).
pub struct MockKafka {
    // The client that owns the cluster (`test.mock.num.brokers`); dropping it destroys the cluster.
    owner: BaseProducer,
}

impl MockKafka {
    /// Starts a one-broker mock cluster.
    pub fn start() -> MockKafka {
        let owner: BaseProducer = ClientConfig::new()
            .set("test.mock.num.brokers", "1")
            .create()
            .expect("mock cluster");
        let mock = MockKafka { owner };
        mock.no_rebalance_delay();
        mock
    }

    #[allow(unsafe_code)]
    fn no_rebalance_delay(&self) {
        let client = self.owner.client();
        // SAFETY: `client` is a live librdkafka handle created with
        // `test.mock.num.brokers`, so it owns a mock cluster and
        // `rd_kafka_handle_mock_cluster` returns a pointer to it (or null,
        // checked) that stays valid while `self.owner` lives. The setter only
        // stores an integer in the cluster's settings.
        unsafe {
            let cluster = rdkafka::bindings::rd_kafka_handle_mock_cluster(client.native_ptr());
            assert!(!cluster.is_null(), "client owns a mock cluster");
            rdkafka::bindings::rd_kafka_mock_group_initial_rebalance_delay_ms(cluster, 0);
        }
    }

    /// The cluster's bootstrap servers.
    pub fn bootstrap_servers(&self) -> String {
        self.owner
            .client()
            .mock_cluster()
            .expect("mock cluster")
            .bootstrap_servers()
    }

    /// Takes the cluster's broker down: connections close and new ones are
    /// refused until [`MockKafka::broker_up`] (an outage; the cluster's own
    /// timers, group sessions included, keep running).
    pub fn broker_down(&self) {
        self.owner
            .client()
            .mock_cluster()
            .expect("mock cluster")
            .broker_down(1)
            .expect("mock broker down");
    }

    /// Brings the broker back after [`MockKafka::broker_down`].
    pub fn broker_up(&self) {
        self.owner
            .client()
            .mock_cluster()
            .expect("mock cluster")
            .broker_up(1)
            .expect("mock broker up");
    }

    /// Makes the broker answer the next `n` requests of kind `api` with `error`.
    pub fn fail_requests(
        &self,
        api: rdkafka::types::RDKafkaApiKey,
        error: rdkafka::types::RDKafkaRespErr,
        n: usize,
    ) {
        self.owner
            .client()
            .mock_cluster()
            .expect("mock cluster")
            .request_errors(api, &vec![error; n]);
    }

    /// Creates a topic (the mock does not implement the CreateTopics admin request).
    pub fn create_topic(&self, name: &str, partitions: i32) {
        self.owner
            .client()
            .mock_cluster()
            .expect("mock cluster")
            .create_topic(name, partitions, 1)
            .expect("create mock topic");
    }
}

/// Where a Kafka test world's broker lives.
#[derive(Clone)]
pub enum Cluster {
    /// In this process.
    Mock(Arc<MockKafka>),
    /// A separate broker process (`CRONPIPE_TEST_KAFKA_BROKERS`).
    External(String),
}

impl Cluster {
    /// Its bootstrap servers.
    pub fn bootstrap_servers(&self) -> String {
        match self {
            Cluster::Mock(m) => m.bootstrap_servers(),
            Cluster::External(b) => b.clone(),
        }
    }
}

/// Kafka worlds: constructors and Kafka-only helpers of [`TestEnv`].
impl TestEnv {
    /// A fresh Kafka world on a new mock cluster with `partitions` per topic.
    pub async fn kafka_mock(name: &str, partitions: i32) -> TestEnv {
        let mock = Arc::new(MockKafka::start());
        Self::kafka_on(name, partitions, Cluster::Mock(mock)).await
    }

    /// A fresh Kafka world on the external broker, or `None` (with a notice)
    /// when `CRONPIPE_TEST_KAFKA_BROKERS` is unset. Its topics are created by
    /// the connection (AdminClient).
    pub async fn kafka_external(name: &str, partitions: i32) -> Option<TestEnv> {
        match external_brokers() {
            Some(b) => Some(Self::kafka_on(name, partitions, Cluster::External(b)).await),
            None => {
                eprintln!(
                    "SKIPPED {name}: set {EXTERNAL_BROKERS_VAR}=127.0.0.1:PORT (scripts/kafka-broker starts one)"
                );
                None
            }
        }
    }

    /// A Kafka world on the external broker when `CRONPIPE_TEST_KAFKA_BROKERS`
    /// is set, on a new mock cluster otherwise.
    pub async fn kafka_external_or_mock(name: &str, partitions: i32) -> TestEnv {
        match external_brokers() {
            Some(b) => Self::kafka_on(name, partitions, Cluster::External(b)).await,
            None => Self::kafka_mock(name, partitions).await,
        }
    }

    /// Another Kafka world (its own topics, group and Redis namespace) on the same cluster.
    pub async fn sibling(&self, name: &str) -> TestEnv {
        Self::kafka_on(name, self.partitions, self.cluster().clone()).await
    }

    /// Where its cluster lives (panics on RabbitMQ).
    pub fn cluster(&self) -> &Cluster {
        self.cluster
            .as_ref()
            .expect("this test world runs on RabbitMQ, not Kafka")
    }

    /// The mock cluster of this world (panics on RabbitMQ or an external broker).
    pub fn mock(&self) -> &MockKafka {
        match self.cluster() {
            Cluster::Mock(m) => m,
            Cluster::External(b) => panic!("this test world runs on the external broker {b}"),
        }
    }

    /// Kafka bootstrap servers.
    pub fn brokers(&self) -> String {
        self.cluster().bootstrap_servers()
    }

    /// The work topic (`.retry` and `.dlq` beside it).
    pub fn topic(&self) -> &str {
        &self.queue
    }

    /// The Kafka adapter (panics on RabbitMQ).
    pub fn kafka(&self) -> &Kafka {
        match &self.broker {
            Broker::Kafka(k) => k,
            Broker::Rabbit(_) => panic!("this test world runs on RabbitMQ, not Kafka"),
        }
    }

    /// Takes every message of `topic` past `group`'s committed offsets and
    /// this world's earlier drains (see [`TestEnv::drain`]).
    ///
    /// Why not [`Broker::drain`]: it must commit through a non-member
    /// consumer, and the mock cluster refuses that (`UNKNOWN_MEMBER_ID`) for
    /// any group that ever had a member, where Kafka accepts it once the group
    /// is empty. Here the commit is best effort, and the world's own marks
    /// keep later drains from returning a message twice either way.
    pub async fn kafka_take(&self, topic: &str, group: &str) -> Vec<Vec<u8>> {
        let floors: HashMap<i32, i64> = self
            .taken
            .lock()
            .expect("taken")
            .iter()
            .filter(|((t, _), _)| t == topic)
            .map(|((_, p), o)| (*p, *o))
            .collect();
        let taken = self
            .kafka()
            .take_from(topic, group, floors, false)
            .await
            .unwrap_or_else(|e| panic!("draining `{topic}`: {e}"));
        let mut marks = self.taken.lock().expect("taken");
        for (p, o) in taken.ends {
            marks.insert((topic.to_string(), p), o);
        }
        taken.messages
    }

    /// The worker group's committed offsets on `topic`, by partition.
    pub async fn committed(&self, topic: &str) -> Vec<(i32, Option<i64>)> {
        self.kafka()
            .committed_offsets(topic)
            .await
            .expect("committed offsets")
    }

    /// Each partition of `topic` with the first offset the broker still
    /// holds and the next offset (its watermarks), by partition. A first
    /// offset above 0 means messages were deleted (retention; on the mock
    /// cluster, its cap of 5 MiB per partition).
    pub async fn log_ranges(&self, topic: &str) -> Vec<(i32, i64, i64)> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let brokers = self.brokers();
        let topic = topic.to_string();
        tokio::task::spawn_blocking(move || {
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .create()
                .expect("watermark consumer");
            let meta = c
                .fetch_metadata(Some(&topic), Duration::from_secs(5))
                .expect("topic metadata");
            let mut ranges: Vec<(i32, i64, i64)> = meta
                .topics()
                .iter()
                .flat_map(|t| t.partitions())
                .map(|p| {
                    let (lo, hi) = c
                        .fetch_watermarks(&topic, p.id(), Duration::from_secs(5))
                        .expect("watermarks");
                    (p.id(), lo, hi)
                })
                .collect();
            ranges.sort();
            ranges
        })
        .await
        .expect("joining the watermark read")
    }

    /// Waits up to `limit` for the committed offsets of `topic` to be
    /// `expected`; fails the test with `what` and the offsets last seen if
    /// they are not by then.
    pub async fn expect_committed(
        &self,
        topic: &str,
        expected: &[(i32, Option<i64>)],
        limit: Duration,
        what: &str,
    ) {
        crate::wait_until(limit, || async { self.committed(topic).await == expected }).await;
        assert_eq!(self.committed(topic).await, expected, "{what}");
    }

    /// Produces raw bytes to the work topic with a plain producer (no envelope checks).
    pub async fn produce_raw(&self, key: &str, body: &[u8]) {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .create()
            .expect("raw producer");
        producer
            .send(
                FutureRecord::to(self.topic()).key(key).payload(body),
                Duration::from_secs(10),
            )
            .await
            .expect("raw produce");
    }
}

/// How far a world's drains took each partition: (topic, partition) → next offset.
pub type Taken = Arc<Mutex<HashMap<(String, i32), i64>>>;

/// Base config text of a Kafka test world: Redis namespace, kind = kafka,
/// topic and group, quick group timings. On the mock the topics exist before
/// any client connects (it has no CreateTopics), so no AdminClient is ever
/// made; `create_topics = false` turns a missing topic into an error at once.
pub(crate) fn base_toml(
    namespace: &str,
    cluster: &Cluster,
    topic: &str,
    group: &str,
    partitions: i32,
) -> String {
    let create = matches!(cluster, Cluster::External(_));
    format!(
        r#"
[redis]
url = "{redis}"
namespace = "{ns}"

[broker]
kind = "kafka"

[broker.kafka]
brokers = "{brokers}"
topic = "{topic}"
group_id = "{group}"
partitions = {partitions}
create_topics = {create}

[broker.kafka.properties]
"session.timeout.ms" = 6000
"heartbeat.interval.ms" = 500
"topic.metadata.refresh.interval.ms" = 2000
"#,
        redis = redis_url(),
        ns = namespace,
        brokers = cluster.bootstrap_servers(),
    )
}
