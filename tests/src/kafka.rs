//! Kafka test worlds: librdkafka's in-process mock cluster (or a real
//! Kafka-protocol broker named by `CRONPIPE_TEST_KAFKA_BROKERS`), random
//! topic, group and Redis namespace per test, and in-process workers.

use crate::scratch;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cronpipe_shared::broker::kafka::Kafka;
use cronpipe_shared::{Broker, Config, Destination, Envelope, Store};
use cronpipe_worker::{Registry, Report};
use rdkafka::producer::{BaseProducer, FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::redis_url;

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
pub enum Cluster {
    /// In this process.
    Mock(Arc<MockKafka>),
    /// A separate broker process (`CRONPIPE_TEST_KAFKA_BROKERS`).
    External(String),
}

/// One Kafka test's isolated world.
pub struct KafkaEnv {
    /// Random id of this test.
    pub id: String,
    /// Redis namespace.
    pub namespace: String,
    /// Work topic (`.retry` and `.dlq` beside it).
    pub topic: String,
    /// Worker consumer group.
    pub group: String,
    /// Partitions of each topic.
    pub partitions: i32,
    /// Scratch directory.
    pub dir: tempfile::TempDir,
    /// Redis handle on the namespace.
    pub store: Store,
    /// Broker handle (kind = kafka).
    pub broker: Broker,
    /// The cluster.
    pub cluster: Cluster,
}

/// A worker running in this process.
pub struct RunningWorker {
    /// Cancels the worker (graceful stop).
    pub stop: CancellationToken,
    /// Its run.
    pub join: JoinHandle<Result<(), cronpipe_worker::WorkerError>>,
    /// One report per settled delivery.
    pub reports: mpsc::UnboundedReceiver<Report>,
}

impl RunningWorker {
    /// Next report within `limit`.
    pub async fn next_report(&mut self, limit: Duration) -> Option<Report> {
        tokio::time::timeout(limit, self.reports.recv())
            .await
            .ok()
            .flatten()
    }

    /// Stops the worker and waits for it.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.join.await.expect("join").expect("worker run");
    }
}

impl KafkaEnv {
    /// A fresh world on a new mock cluster with `partitions` per topic.
    pub async fn mock(name: &str, partitions: i32) -> KafkaEnv {
        let mock = Arc::new(MockKafka::start());
        Self::with_cluster(name, partitions, Cluster::Mock(mock)).await
    }

    /// A fresh world on the external broker, or `None` (with a notice) when
    /// `CRONPIPE_TEST_KAFKA_BROKERS` is unset.
    pub async fn external(name: &str, partitions: i32) -> Option<KafkaEnv> {
        match external_brokers() {
            Some(b) => Some(Self::with_cluster(name, partitions, Cluster::External(b)).await),
            None => {
                eprintln!(
                    "SKIPPED {name}: set {EXTERNAL_BROKERS_VAR}=127.0.0.1:PORT (scripts/kafka-broker starts one)"
                );
                None
            }
        }
    }

    async fn with_cluster(name: &str, partitions: i32, cluster: Cluster) -> KafkaEnv {
        let id = format!("{name}-{:08x}", rand::random::<u32>());
        let namespace = format!("cptest-{id}");
        let topic = format!("cptest.{id}");
        let group = format!("cptest-{id}");
        if let Cluster::Mock(m) = &cluster {
            for t in [
                topic.clone(),
                format!("{topic}.retry"),
                format!("{topic}.dlq"),
            ] {
                m.create_topic(&t, partitions);
            }
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::connect(&redis_url(), &namespace, Duration::from_secs(5))
            .await
            .expect("Redis must run on 127.0.0.1:6379 (see README: Testing)");
        let brokers = match &cluster {
            Cluster::Mock(m) => m.bootstrap_servers(),
            Cluster::External(b) => b.clone(),
        };
        let text = base_toml(&namespace, &brokers, &topic, &group, partitions);
        let cfg = Config::parse(std::path::Path::new("kafka-test.toml"), &text, Vec::new())
            .expect("base Kafka test config");
        let broker = Broker::connect(&cfg.broker, &format!("test-{id}"))
            .await
            .expect("Kafka broker");
        KafkaEnv {
            id,
            namespace,
            topic,
            group,
            partitions,
            dir,
            store,
            broker,
            cluster,
        }
    }

    /// Another world (its own topics, group and Redis namespace) on the same cluster.
    pub async fn sibling(&self, name: &str) -> KafkaEnv {
        let cluster = match &self.cluster {
            Cluster::Mock(m) => Cluster::Mock(m.clone()),
            Cluster::External(b) => Cluster::External(b.clone()),
        };
        Self::with_cluster(name, self.partitions, cluster).await
    }

    /// Bootstrap servers.
    pub fn brokers(&self) -> String {
        match &self.cluster {
            Cluster::Mock(m) => m.bootstrap_servers(),
            Cluster::External(b) => b.clone(),
        }
    }

    /// The Kafka adapter.
    pub fn kafka(&self) -> &Kafka {
        match &self.broker {
            Broker::Kafka(k) => k,
            Broker::Rabbit(_) => unreachable!("KafkaEnv connects to Kafka"),
        }
    }

    /// Base config text: Redis namespace, kind = kafka, topic and group, quick group timings.
    pub fn base_toml(&self) -> String {
        base_toml(
            &self.namespace,
            &self.brokers(),
            &self.topic,
            &self.group,
            self.partitions,
        )
    }

    /// Writes `base_toml() + extra` to a file and returns its path.
    pub fn write_config(&self, file: &str, extra: &str) -> PathBuf {
        scratch::write_config(self.dir.path(), &self.base_toml(), file, extra)
    }

    /// Parses `base_toml() + extra` into a validated config.
    pub fn config(&self, extra: &str) -> Config {
        scratch::config(self.dir.path(), &self.base_toml(), extra)
    }

    /// A file an exec task appends one line to per run (see [`Self::exec_task`]).
    pub fn runs_file(&self) -> PathBuf {
        scratch::runs_file(self.dir.path())
    }

    /// TOML for an exec task `name` that records each run in [`Self::runs_file`], then runs `then`.
    pub fn exec_task(&self, name: &str, then: &str) -> String {
        scratch::exec_task(self.dir.path(), name, then)
    }

    /// Lines of the runs file.
    pub fn runs(&self) -> Vec<String> {
        scratch::runs(self.dir.path())
    }

    /// Takes every message now at `dest` (see [`Broker::drain`]).
    pub async fn drain(&self, dest: Destination) -> Vec<Vec<u8>> {
        self.broker.drain(dest).await.expect("drain")
    }

    /// Takes every envelope now in the work topic.
    pub async fn drain_envelopes(&self) -> Vec<Envelope> {
        self.drain(Destination::Work)
            .await
            .into_iter()
            .map(|b| Envelope::decode(&b).expect("producer wrote a valid envelope"))
            .collect()
    }

    /// Takes every dead letter now in the DLQ topic.
    pub async fn drain_dead_letters(&self) -> Vec<cronpipe_shared::deadletter::DeadLetter> {
        self.drain(Destination::DeadLetter)
            .await
            .into_iter()
            .map(|b| serde_json::from_slice(&b).expect("dead letter JSON"))
            .collect()
    }

    /// The worker group's committed offsets on `topic`, by partition.
    pub async fn committed(&self, topic: &str) -> Vec<(i32, Option<i64>)> {
        self.kafka()
            .committed_offsets(topic)
            .await
            .expect("committed offsets")
    }

    /// Produces raw bytes to the work topic with a plain producer (no envelope checks).
    pub async fn produce_raw(&self, key: &str, body: &[u8]) {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .create()
            .expect("raw producer");
        producer
            .send(
                FutureRecord::to(&self.topic).key(key).payload(body),
                Duration::from_secs(10),
            )
            .await
            .expect("raw produce");
    }

    /// Starts a worker in this process with its own broker connection.
    pub async fn spawn_worker(
        &self,
        config: &Config,
        instance: &str,
        registry: Registry,
    ) -> RunningWorker {
        let broker = Broker::connect(&config.broker, instance)
            .await
            .expect("worker broker");
        let (tx, reports) = mpsc::unbounded_channel();
        let mut opts = cronpipe_worker::Options::from_config(config.clone());
        opts.instance_id = instance.into();
        opts.reports = Some(tx);
        let registry = cronpipe_worker::registry_from_config(config, registry).expect("registry");
        let stop = CancellationToken::new();
        let join = tokio::spawn(cronpipe_worker::run(
            opts,
            self.store.clone(),
            broker,
            registry,
            stop.clone(),
        ));
        RunningWorker {
            stop,
            join,
            reports,
        }
    }

    /// Removes every Redis key of this world (and, on an external broker, its topics).
    pub async fn cleanup(self) {
        if let Cluster::External(_) = &self.cluster {
            self.kafka().delete_topology().await;
        }
        let mut conn = self.store.connection();
        let pattern = format!(
            "{}*",
            self.store
                .keys()
                .prefix()
                .replace('{', "\\{")
                .replace('}', "\\}")
        );
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(&pattern)
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<i64, _> = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
        }
        self.broker.close().await;
    }
}

/// Base config text of a Kafka test world.
fn base_toml(namespace: &str, brokers: &str, topic: &str, group: &str, partitions: i32) -> String {
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

[broker.kafka.properties]
"session.timeout.ms" = 6000
"heartbeat.interval.ms" = 500
"topic.metadata.refresh.interval.ms" = 2000
"#,
        redis = redis_url(),
        ns = namespace,
    )
}
