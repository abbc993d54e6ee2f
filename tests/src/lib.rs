//! Support for the integration suite: every test gets its own world (a
//! [`TestEnv`]) on RabbitMQ or Kafka: a random Redis namespace, random queue
//! or topic names, a scratch directory, and in-process workers and
//! producers; it talks to the real Redis and RabbitMQ on 127.0.0.1 or to
//! librdkafka's in-process mock cluster, and removes what it created when it
//! ends. [`broker_test!`] turns one test body into one test per broker.

pub mod kafka;
pub mod redis_failover;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cronpipe_producer::clock::{Clock, SystemClock};
use cronpipe_shared::broker::rabbitmq::Rabbit;
pub use cronpipe_shared::config::BrokerKind;
use cronpipe_shared::config::{BrokerConfig, BuiltSchedule};
use cronpipe_shared::deadletter::DeadLetter;
use cronpipe_shared::{Broker, Config, Destination, Envelope, Store};
use cronpipe_worker::{Registry, Report, Settled, Task, TaskError};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::kafka::Cluster;

/// Redis URL used by the suite (`CRONPIPE_TEST_REDIS_URL` overrides).
pub fn redis_url() -> String {
    std::env::var("CRONPIPE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A store on the suite's Redis in a fresh random namespace `cptest-<what>-…`,
/// for tests of Redis operations alone.
pub async fn scratch_store(what: &str) -> Store {
    let ns = format!("cptest-{what}-{:08x}", rand::random::<u32>());
    Store::connect(&redis_url(), &ns, Duration::from_secs(5))
        .await
        .expect("redis")
}

/// AMQP URL used by the suite (`CRONPIPE_TEST_AMQP_URL` overrides).
pub fn amqp_url() -> String {
    std::env::var("CRONPIPE_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Scratch files of a test world: config files and the exec tasks' runs file.
pub mod scratch {
    use std::path::{Path, PathBuf};

    use cronpipe_shared::Config;

    /// Writes `base + extra` to `dir/file` and returns its path.
    pub fn write_config(dir: &Path, base: &str, file: &str, extra: &str) -> PathBuf {
        let path = dir.join(file);
        std::fs::write(&path, format!("{base}\n{extra}")).expect("write config");
        path
    }

    /// Writes and parses `base + extra` into a validated config (panics with the problems).
    pub fn config(dir: &Path, base: &str, extra: &str) -> Config {
        let path = write_config(dir, base, "cronpipe.toml", extra);
        match Config::load_with_env(&path, Vec::new()) {
            Ok(c) => c,
            Err(e) => panic!("test config invalid:\n{e}"),
        }
    }

    /// The file exec tasks from [`exec_task`] append one line to per run.
    pub fn runs_file(dir: &Path) -> PathBuf {
        dir.join("runs.log")
    }

    /// TOML for an exec task `name` that appends
    /// `<task id> <schedule> <slot> <attempt> <fencing token>` to [`runs_file`], then runs `then` (shell).
    pub fn exec_task(dir: &Path, name: &str, then: &str) -> String {
        format!(
            r#"
[task.{name}]
handler = "exec"
command = ["/bin/sh", "-c", "echo \"$CRONPIPE_TASK_ID ${{CRONPIPE_SCHEDULE:--}} ${{CRONPIPE_SLOT:--}} $CRONPIPE_ATTEMPT ${{CRONPIPE_FENCING_TOKEN:--}}\" >> {file}; {then}"]
"#,
            file = runs_file(dir).display(),
            then = if then.is_empty() { "true" } else { then },
        )
    }

    /// Lines of [`runs_file`].
    pub fn runs(dir: &Path) -> Vec<String> {
        std::fs::read_to_string(runs_file(dir))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// Kafka partitions of each topic in a [`TestEnv::on`] world.
pub const DEFAULT_PARTITIONS: i32 = 2;

/// One test's isolated world, on RabbitMQ or Kafka.
pub struct TestEnv {
    /// Random id of this test.
    pub id: String,
    /// The broker this world runs on.
    pub kind: BrokerKind,
    /// Redis namespace.
    pub namespace: String,
    /// Work queue (RabbitMQ; `.dlq` and `.delay.<ms>` beside it) or work
    /// topic (Kafka; `.retry` and `.dlq` beside it).
    pub queue: String,
    /// Kafka: the workers' consumer group (unused on RabbitMQ).
    pub group: String,
    /// Kafka: partitions of each topic (unused on RabbitMQ).
    pub partitions: i32,
    /// Scratch directory (config files, task side-effect files).
    pub dir: tempfile::TempDir,
    /// Redis handle on the namespace.
    pub store: Store,
    /// Broker handle on the queue / topics.
    pub broker: Broker,
    /// Kafka: where the cluster lives.
    pub(crate) cluster: Option<Cluster>,
    /// Kafka: how far [`TestEnv::drain`] took each partition, by topic.
    pub(crate) taken: kafka::Taken,
    /// Set by [`TestEnv::cleanup`]; otherwise dropping the world cleans up.
    cleaned: bool,
}

/// Polls `cond` every 20 ms until it holds or `limit` passes; returns whether it held.
pub async fn wait_until<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + limit;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A random test id: `name` (cut to 40 characters) and 8 hex digits.
fn test_id(name: &str) -> String {
    let name: String = name.chars().take(40).collect();
    format!("{name}-{:08x}", rand::random::<u32>())
}

/// Connects to Redis on a test namespace.
async fn test_store(namespace: &str) -> Store {
    Store::connect(&redis_url(), namespace, Duration::from_secs(5))
        .await
        .expect("Redis must run on 127.0.0.1:6379 (see README: Testing)")
}

impl TestEnv {
    /// A fresh RabbitMQ world.
    pub async fn new(name: &str) -> TestEnv {
        Self::on(name, BrokerKind::Rabbitmq).await
    }

    /// A fresh world on `kind`: RabbitMQ on 127.0.0.1, or Kafka on a new
    /// in-process mock cluster with [`DEFAULT_PARTITIONS`] per topic.
    pub async fn on(name: &str, kind: BrokerKind) -> TestEnv {
        match kind {
            BrokerKind::Rabbitmq => Self::rabbitmq(name).await,
            BrokerKind::Kafka => Self::kafka_mock(name, DEFAULT_PARTITIONS).await,
        }
    }

    /// As [`TestEnv::on`], with a work queue / topic that delivers in publish
    /// order (Kafka: one partition per topic), for tests of publish order.
    pub async fn ordered(name: &str, kind: BrokerKind) -> TestEnv {
        match kind {
            BrokerKind::Rabbitmq => Self::rabbitmq(name).await,
            BrokerKind::Kafka => Self::kafka_mock(name, 1).await,
        }
    }

    async fn rabbitmq(name: &str) -> TestEnv {
        let id = test_id(name);
        let namespace = format!("cptest-{id}");
        let queue = format!("cptest.{id}");
        let dir = tempfile::tempdir().expect("tempdir");
        let store = test_store(&namespace).await;
        let mut cfg = BrokerConfig::default();
        cfg.rabbitmq.url = amqp_url();
        cfg.rabbitmq.queue = queue.clone();
        let broker = Broker::connect(&cfg, &format!("test-{id}"))
            .await
            .expect("RabbitMQ must run on 127.0.0.1:5672 (see README: Testing)");
        TestEnv {
            id,
            kind: BrokerKind::Rabbitmq,
            namespace,
            queue,
            group: String::new(),
            partitions: 0,
            dir,
            store,
            broker,
            cluster: None,
            taken: Default::default(),
            cleaned: false,
        }
    }

    /// A Kafka world on `cluster`: topics `T`, `T.retry`, `T.dlq` with
    /// `partitions` each (created here on the mock; by the connection, through
    /// the AdminClient, on an external broker), its own group and namespace.
    pub async fn kafka_on(name: &str, partitions: i32, cluster: Cluster) -> TestEnv {
        let id = test_id(name);
        let namespace = format!("cptest-{id}");
        let queue = format!("cptest.{id}");
        let group = format!("cptest-{id}");
        if let Cluster::Mock(m) = &cluster {
            for t in [
                queue.clone(),
                format!("{queue}.retry"),
                format!("{queue}.dlq"),
            ] {
                m.create_topic(&t, partitions);
            }
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let store = test_store(&namespace).await;
        let text = kafka::base_toml(&namespace, &cluster, &queue, &group, partitions);
        let cfg = Config::parse(Path::new("kafka-test.toml"), &text, Vec::new())
            .expect("base Kafka test config");
        let broker = Broker::connect(&cfg.broker, &format!("test-{id}"))
            .await
            .expect("Kafka broker");
        TestEnv {
            id,
            kind: BrokerKind::Kafka,
            namespace,
            queue,
            group,
            partitions,
            dir,
            store,
            broker,
            cluster: Some(cluster),
            taken: Default::default(),
            cleaned: false,
        }
    }

    /// The RabbitMQ adapter (panics on Kafka).
    pub fn rabbit(&self) -> &Rabbit {
        match &self.broker {
            Broker::Rabbit(r) => r,
            Broker::Kafka(_) => panic!("this test world runs on Kafka, not RabbitMQ"),
        }
    }

    /// Whether this world runs on Kafka.
    pub fn is_kafka(&self) -> bool {
        self.kind == BrokerKind::Kafka
    }

    /// Base config text for this world: its Redis namespace and broker
    /// section (queue, or brokers, topic and group with quick group timings).
    pub fn base_toml(&self) -> String {
        match &self.cluster {
            Some(c) => kafka::base_toml(
                &self.namespace,
                c,
                &self.queue,
                &self.group,
                self.partitions,
            ),
            None => format!(
                r#"
[redis]
url = "{redis}"
namespace = "{ns}"

[broker]
kind = "rabbitmq"

[broker.rabbitmq]
url = "{amqp}"
queue = "{queue}"
"#,
                redis = redis_url(),
                ns = self.namespace,
                amqp = amqp_url(),
                queue = self.queue
            ),
        }
    }

    /// The `[broker]` settings of [`Self::base_toml`] (nothing written to disk).
    pub fn broker_config(&self) -> BrokerConfig {
        Config::parse(Path::new("base.toml"), &self.base_toml(), Vec::new())
            .expect("base test config")
            .broker
    }

    /// Writes `base_toml() + extra` to a file and returns its path.
    pub fn write_config(&self, file: &str, extra: &str) -> PathBuf {
        scratch::write_config(self.dir.path(), &self.base_toml(), file, extra)
    }

    /// A `worker` process on `cfg` with instance id (and log name) `id`.
    pub fn worker_process(&self, cfg: &Path, id: &str) -> Proc {
        Proc::start(
            "worker",
            cfg,
            &[("CRONPIPE__WORKER__INSTANCE_ID", id)],
            self.dir.path(),
            id,
        )
    }

    /// Parses `base_toml() + extra` into a validated config (written to `cronpipe.toml`).
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

    /// RabbitMQ: takes every message now in the queue `queue` (acking them).
    pub async fn drain_queue(&self, queue: &str) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(m) = self.rabbit().get(queue, true).await.expect("basic.get") {
            out.push(m);
        }
        out
    }

    /// Takes every message now waiting at `dest`. RabbitMQ: gets and acks
    /// them ([`Broker::drain`]). Kafka: reads `T` or `T.retry` from the
    /// worker group's committed offsets, `T.dlq` from those of a
    /// `<group>.tools` group (or from where the last drain of this world
    /// stopped, if later) to the end (see [`TestEnv::kafka_take`]). Run it
    /// while no worker consumes.
    pub async fn drain(&self, dest: Destination) -> Vec<Vec<u8>> {
        match self.kind {
            BrokerKind::Rabbitmq => self.broker.drain(dest).await.expect("drain"),
            BrokerKind::Kafka => {
                let (topic, group) = match dest {
                    Destination::Work => (self.queue.clone(), self.group.clone()),
                    Destination::Retry => (format!("{}.retry", self.queue), self.group.clone()),
                    Destination::DeadLetter => (
                        format!("{}.dlq", self.queue),
                        format!("{}.tools", self.group),
                    ),
                };
                self.kafka_take(&topic, &group).await
            }
        }
    }

    /// Takes every envelope now in the work queue / topic.
    pub async fn drain_envelopes(&self) -> Vec<Envelope> {
        self.drain(Destination::Work)
            .await
            .into_iter()
            .map(|b| Envelope::decode(&b).expect("a valid envelope in the work queue"))
            .collect()
    }

    /// Takes every dead letter now in the dead-letter queue / topic.
    pub async fn drain_dead_letters(&self) -> Vec<DeadLetter> {
        self.drain(Destination::DeadLetter)
            .await
            .into_iter()
            .map(|b| serde_json::from_slice(&b).expect("dead letter JSON"))
            .collect()
    }

    /// Takes every retry copy still waiting: RabbitMQ, in the delay queues
    /// of the tiers `tiers_ms` (workers declare them on their own
    /// connections); Kafka, in the retry topic past the worker group's
    /// committed offsets.
    pub async fn drain_retry_copies(&self, tiers_ms: &[u64]) -> Vec<Vec<u8>> {
        match self.kind {
            BrokerKind::Rabbitmq => {
                let mut out = Vec::new();
                for ms in tiers_ms {
                    let name = self.rabbit().delay_queue_name(*ms);
                    out.extend(self.drain_queue(&name).await);
                }
                out
            }
            BrokerKind::Kafka => self.drain(Destination::Retry).await,
        }
    }

    /// Publishes raw bodies to the work queue / topic as they are (bodies
    /// the adapter would never write), each confirmed.
    pub async fn publish_raw(&self, bodies: &[Vec<u8>]) {
        match self.kind {
            BrokerKind::Rabbitmq => rabbit_publish_raw(&self.queue, bodies).await,
            BrokerKind::Kafka => {
                for (i, body) in bodies.iter().enumerate() {
                    self.produce_raw(&format!("raw-{i}"), body).await;
                }
            }
        }
    }

    /// Starts a worker in this process with `registry` plus the config's
    /// handlers, on a broker connection of its own (closed when it stops).
    pub async fn spawn_worker(
        &self,
        config: &Config,
        instance: &str,
        registry: Registry,
    ) -> RunningWorker {
        let broker = Broker::connect(&config.broker, instance)
            .await
            .expect("worker broker");
        self.spawn_worker_on(config, instance, registry, broker)
            .await
    }

    /// As [`TestEnv::spawn_worker`], on a broker connection the test keeps
    /// a handle to (to watch `Broker::is_connected`, say).
    pub async fn spawn_worker_on(
        &self,
        config: &Config,
        instance: &str,
        registry: Registry,
        broker: Broker,
    ) -> RunningWorker {
        let (tx, reports) = mpsc::unbounded_channel();
        let mut opts = cronpipe_worker::Options::from_config(config.clone());
        opts.instance_id = instance.into();
        opts.reports = Some(tx);
        let registry = cronpipe_worker::registry_from_config(config, registry).expect("registry");
        let stop = CancellationToken::new();
        let handle = tokio::spawn(cronpipe_worker::run(
            opts,
            self.store.clone(),
            broker,
            registry,
            stop.clone(),
        ));
        RunningWorker {
            stop,
            handle,
            reports,
        }
    }

    /// Starts a producer in this process with `config`'s schedules on the
    /// system clock and `config`'s lease and misfire settings.
    pub async fn spawn_producer(&self, config: &Config, instance: &str) -> RunningProducer {
        RunningProducer::start(
            self,
            config,
            instance,
            Arc::new(SystemClock),
            config.producer.misfire_threshold.get(),
        )
        .await
    }

    /// Removes what this world created: RabbitMQ, every queue named after
    /// the work queue (the dead-letter queue and the delay tiers any worker
    /// declared included); Kafka on an external broker, the three topics (a
    /// mock cluster goes with its last world); every Redis key of the
    /// namespace.
    pub async fn cleanup(mut self) {
        match &self.cluster {
            None => {
                let _ = self.rabbit().delete_topology().await;
                delete_rabbit_queues_named_after(&self.queue).await;
            }
            Some(Cluster::External(_)) => self.kafka().delete_topology().await,
            Some(Cluster::Mock(_)) => {}
        }
        let mut conn = self.store.connection();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(key_pattern(self.store.keys().prefix()))
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<i64, _> = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
        }
        self.broker.close().await;
        self.cleaned = true;
    }
}

/// A `KEYS` pattern for every key under `prefix` (its hash-tag braces escaped).
fn key_pattern(prefix: &str) -> String {
    format!("{}*", prefix.replace('{', "\\{").replace('}', "\\}"))
}

impl Drop for TestEnv {
    /// A test that failed (panicked) never reached [`TestEnv::cleanup`]: its
    /// RabbitMQ queues and Redis keys are removed here instead, so failing
    /// runs leave nothing behind either. On a thread of its own, since this
    /// may run on the test's runtime.
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        let queue = self.cluster.is_none().then(|| self.queue.clone());
        let pattern = key_pattern(self.store.keys().prefix());
        let _ = std::thread::spawn(move || {
            if let Some(queue) = queue {
                if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    rt.block_on(delete_rabbit_queues_named_after(&queue));
                }
            }
            let Ok(mut conn) = redis::Client::open(redis_url()).and_then(|c| c.get_connection())
            else {
                return;
            };
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(&pattern)
                .query(&mut conn)
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: Result<i64, _> = redis::cmd("DEL").arg(&keys).query(&mut conn);
            }
        })
        .join();
    }
}

/// Publishes raw bodies to a RabbitMQ queue on a connection of its own, with confirms.
async fn rabbit_publish_raw(queue: &str, bodies: &[Vec<u8>]) {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    use lapin::{BasicProperties, Connection, ConnectionProperties};
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    for body in bodies {
        ch.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    }
    let _ = conn.close(200, "bye".into()).await;
}

/// Deletes every RabbitMQ queue (default vhost) named `queue` or `queue.*`:
/// delay tiers are declared by whichever worker needed them, so they are
/// listed (`rabbitmqctl`) rather than known.
async fn delete_rabbit_queues_named_after(queue: &str) {
    use lapin::options::QueueDeleteOptions;
    use lapin::{Connection, ConnectionProperties};
    let Ok(out) = tokio::process::Command::new("rabbitmqctl")
        .args(["list_queues", "-q", "--no-table-headers", "name"])
        .output()
        .await
    else {
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let prefix = format!("{queue}.");
    let names: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|n| *n == queue || n.starts_with(&prefix))
        .collect();
    if names.is_empty() {
        return;
    }
    let Ok(conn) = Connection::connect(&amqp_url(), ConnectionProperties::default()).await else {
        return;
    };
    for name in names {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .queue_delete(name.into(), QueueDeleteOptions::default())
                .await;
            let _ = ch.close(200, "deleted".into()).await;
        }
    }
    let _ = conn.close(200, "bye".into()).await;
}

/// A worker running in this process (see [`TestEnv::spawn_worker`]).
pub struct RunningWorker {
    /// Cancels the worker (graceful stop).
    pub stop: CancellationToken,
    /// Its `run`.
    pub handle: JoinHandle<Result<(), cronpipe_worker::WorkerError>>,
    /// One report per settled delivery.
    pub reports: mpsc::UnboundedReceiver<Report>,
}

impl RunningWorker {
    /// Next report within `limit`, if any.
    pub async fn next_report(&mut self, limit: Duration) -> Option<Report> {
        tokio::time::timeout(limit, self.reports.recv())
            .await
            .ok()
            .flatten()
    }

    /// Next report, failing the test after `limit`.
    pub async fn next(&mut self, limit: Duration) -> Report {
        tokio::time::timeout(limit, self.reports.recv())
            .await
            .expect("no worker report in time")
            .expect("report channel open")
    }

    /// Reports until `done(&all_so_far)` holds, failing after `limit` in all.
    pub async fn until(
        &mut self,
        limit: Duration,
        done: impl Fn(&[Report]) -> bool,
    ) -> Vec<Report> {
        let end = tokio::time::Instant::now() + limit;
        let mut all = Vec::new();
        while !done(&all) {
            match tokio::time::timeout_at(end, self.reports.recv()).await {
                Ok(Some(r)) => all.push(r),
                Ok(None) => panic!("worker stopped; reports so far: {all:?}"),
                Err(_) => panic!("condition not reached in {limit:?}; reports so far: {all:?}"),
            }
        }
        all
    }

    /// How many of the reports received so far ended each way, by
    /// [`cronpipe_worker::Settled::as_str`] (takes them).
    pub fn outcomes(&mut self) -> HashMap<&'static str, usize> {
        let mut settled = HashMap::new();
        while let Ok(r) = self.reports.try_recv() {
            *settled.entry(r.settled.as_str()).or_default() += 1;
        }
        settled
    }

    /// Stops the worker and waits (up to a minute) for `run` to return.
    pub async fn shutdown(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.handle)
            .await
            .expect("worker stops in time")
            .expect("join")
            .expect("worker run");
    }
}

/// Counts the runs of each envelope, for tests that every task ran exactly once.
#[derive(Clone, Default)]
pub struct RunCounter(Arc<Mutex<HashMap<String, u32>>>);

impl RunCounter {
    /// `registry` with a handler for `task` that counts a run, works for
    /// `work`, and succeeds.
    pub fn register(&self, registry: Registry, task: &str, work: Duration) -> Registry {
        let runs = self.clone();
        registry.register(task.to_string(), move |t: Task| {
            *runs.lock().entry(t.envelope.id.clone()).or_default() += 1;
            async move {
                tokio::time::sleep(work).await;
                Ok::<(), TaskError>(())
            }
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How many distinct envelopes have run.
    pub fn distinct(&self) -> usize {
        self.lock().len()
    }

    /// Asserts that `n` envelopes ran, none more than once, and that the
    /// worker's reports (`outcomes`, see [`RunningWorker::outcomes`]) count
    /// `n` successes.
    pub fn assert_each_ran_once(&self, n: usize, outcomes: &HashMap<&'static str, usize>) {
        let runs = self.lock();
        assert_eq!(runs.len(), n, "none lost");
        let twice: Vec<(&String, &u32)> = runs.iter().filter(|(_, r)| **r != 1).collect();
        assert!(twice.is_empty(), "ran more than once: {twice:?}");
        assert_eq!(
            outcomes
                .get(Settled::Success.as_str())
                .copied()
                .unwrap_or(0),
            n,
            "{outcomes:?}"
        );
    }
}

/// A producer running in this process, on a broker connection of its own.
pub struct RunningProducer {
    /// Cancel to shut it down (it releases its lease).
    pub stop: CancellationToken,
    /// Its `run` task.
    pub handle: JoinHandle<()>,
    /// Send a new schedule set (a reload).
    pub schedules: watch::Sender<Arc<Vec<BuiltSchedule>>>,
}

impl RunningProducer {
    /// Starts `cronpipe_producer::run` with `config`'s schedules on `clock`.
    pub async fn start(
        env: &TestEnv,
        config: &Config,
        instance: &str,
        clock: Arc<dyn Clock>,
        misfire_threshold: Duration,
    ) -> RunningProducer {
        Self::start_with(
            env,
            config,
            config.built_schedules().expect("schedules"),
            instance,
            clock,
            misfire_threshold,
        )
        .await
    }

    /// As [`RunningProducer::start`] with an explicit schedule set.
    pub async fn start_with(
        env: &TestEnv,
        config: &Config,
        schedules: Vec<BuiltSchedule>,
        instance: &str,
        clock: Arc<dyn Clock>,
        misfire_threshold: Duration,
    ) -> RunningProducer {
        let mut opts = cronpipe_producer::Options::from_config(config);
        opts.instance_id = instance.to_string();
        opts.clock = clock;
        opts.misfire_threshold = misfire_threshold;
        let (tx, rx) = watch::channel(Arc::new(schedules));
        let broker = Broker::connect(&config.broker, instance)
            .await
            .expect("producer broker");
        let store = env.store.clone();
        let stop = CancellationToken::new();
        let s = stop.clone();
        let handle = tokio::spawn(async move {
            cronpipe_producer::run(opts, store, broker, rx, s)
                .await
                .expect("producer run");
        });
        RunningProducer {
            stop,
            handle,
            schedules: tx,
        }
    }

    /// Shuts it down and waits for it.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.handle.await.expect("producer task");
    }
}

/// What a [`broker_test!`] body takes: a fresh world ([`TestEnv`], made by
/// [`TestEnv::on`] and named after the test) or just the broker kind
/// ([`BrokerKind`], for bodies that build their own worlds).
pub trait BrokerTestArg: Sized {
    /// The argument for the test `name` on `kind`.
    fn make(name: &str, kind: BrokerKind) -> impl std::future::Future<Output = Self> + Send;
}

impl BrokerTestArg for TestEnv {
    async fn make(name: &str, kind: BrokerKind) -> TestEnv {
        TestEnv::on(name, kind).await
    }
}

impl BrokerTestArg for BrokerKind {
    async fn make(_name: &str, kind: BrokerKind) -> BrokerKind {
        kind
    }
}

/// Runs a [`broker_test!`] body on `kind` (what the generated tests call).
pub async fn run_broker_test<A, F, Fut>(name: &str, kind: BrokerKind, body: F)
where
    A: BrokerTestArg,
    F: FnOnce(A) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    body(A::make(name, kind).await).await;
}

/// Turns one async test body into one `#[tokio::test]` per broker:
/// `broker_test!(name);` next to `async fn name(env: TestEnv) { ... }` makes
/// the tests `name::rabbitmq` and `name::kafka`, each calling the body with
/// a fresh world on its broker (a body taking `kind: BrokerKind` builds its
/// own). Attributes for one broker's test only follow the name:
/// `broker_test!(name, kafka: #[ignore = "why"]);`.
///
/// ```ignore
/// broker_test!(same_envelope_published_five_times_runs_once);
/// async fn same_envelope_published_five_times_runs_once(env: TestEnv) {
///     // ...
///     env.cleanup().await;
/// }
/// ```
#[macro_export]
macro_rules! broker_test {
    (
        $name:ident
        $(, rabbitmq: #[$rabbit:meta])*
        $(, kafka: #[$kafka:meta])*
        $(,)?
    ) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$rabbit])*
            async fn rabbitmq() {
                $crate::run_broker_test(stringify!($name), $crate::BrokerKind::Rabbitmq, super::$name)
                    .await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$kafka])*
            async fn kafka() {
                $crate::run_broker_test(stringify!($name), $crate::BrokerKind::Kafka, super::$name)
                    .await;
            }
        }
    };
}

/// Path of a workspace binary (`producer` or `worker`), built by `cargo build --bins`
/// (scripts/test does this before the suite).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: build the binaries first (cargo build --workspace --bins), as scripts/test does",
        path.display()
    );
    path
}

/// A child process killed when dropped.
pub struct Proc {
    /// The child.
    pub child: Child,
    /// Its log file.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `bin run --config cfg` with extra environment, logging to a file in `dir`.
    pub fn start(bin: &str, cfg: &Path, env: &[(&str, &str)], dir: &Path, label: &str) -> Proc {
        let log = dir.join(format!("{label}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(binary(bin));
        cmd.arg("run")
            .arg("--config")
            .arg(cfg)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup"))
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Proc {
            child: cmd.spawn().expect("spawn binary"),
            log,
        }
    }

    /// Sends a signal.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, sig);
    }

    /// Waits for exit up to `limit`; true when it exited.
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
