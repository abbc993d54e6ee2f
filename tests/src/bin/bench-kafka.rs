//! Kafka throughput benchmark (not a test). In one run, on one librdkafka mock
//! cluster (or the broker in `CRONPIPE_TEST_KAFKA_BROKERS`) and the real Redis:
//!
//! - cronpipe: N no-op tasks published with `Broker::publish_batch`
//!   (idempotent producer, acks=all, delivery reports awaited), then drained
//!   through the full worker path (decode, claim, run, done, ack, tracked
//!   offset commits);
//! - raw: N messages of the same size produced by a plain rdkafka
//!   `FutureProducer` with the same producer settings, then consumed by a
//!   plain `StreamConsumer` with the same concurrency, storing offsets after
//!   each message and committing every 25 ms. Twice: once doing one Redis
//!   `SET NX` per message (the cheapest idempotency record), once doing the
//!   worker's own Redis work (`Store::claim` then `Store::finish`), which
//!   isolates what the Kafka adapter and the worker loop cost.
//!
//! Each path first publishes 500 untimed warm-up messages (consumed along).
//! Consuming is timed from the first finished message to the last: the
//! consumer's start-up before it (joining the group, getting partitions) is
//! printed apart, since it varies by hundreds of milliseconds between runs.
//! It prints produce, consume and end-to-end rates of each and the ratios.
//!
//! ```text
//! cargo run --release -p cronpipe-tests --bin bench-kafka [-- N CONCURRENCY PARTITIONS]
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cronpipe_shared::store::Outcome;
use cronpipe_shared::Envelope;
use cronpipe_tests::kafka::{external_brokers, Cluster};
use cronpipe_tests::TestEnv;
use cronpipe_worker::{Registry, Settled, Task, TaskError};
use futures::StreamExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};
use tokio::sync::{mpsc, Semaphore};

/// The same allocator as the `worker` binary (mimalloc), for every path this
/// benchmark compares.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Messages published (and consumed) before the produce timing starts, so
/// producer start-up (InitProducerId, leader lookup) is not measured.
const WARMUP: usize = 500;

struct Rates {
    produce: f64,
    consume: f64,
    end_to_end: f64,
}

impl Rates {
    /// Rates of `n` timed publishes in `produced` and a drain of the `n` and
    /// the warm-up messages, less the first, in `consumed` (see [`Drain`]).
    /// End-to-end is messages over the time to publish and consume them.
    fn of(n: usize, produced: Duration, consumed: Duration) -> Rates {
        let drained = (n + WARMUP - 1) as f64;
        let publish_each = produced.as_secs_f64() / n as f64;
        Rates {
            produce: n as f64 / produced.as_secs_f64(),
            consume: drained / consumed.as_secs_f64(),
            end_to_end: drained / (publish_each * drained + consumed.as_secs_f64()),
        }
    }
}

/// Times a drain from its first finished message to its last. Consumer
/// start-up (joining the group, getting partitions assigned) comes before the
/// first and varies by hundreds of milliseconds from run to run in every
/// path, so it is reported apart rather than counted in the rates.
struct Drain {
    started: Instant,
    first: Option<Instant>,
}

impl Drain {
    fn start() -> Drain {
        Drain {
            started: Instant::now(),
            first: None,
        }
    }

    fn one_done(&mut self) {
        self.first.get_or_insert_with(Instant::now);
    }

    /// Start-up (to the first finished message) and the drain after it.
    fn finish(&self) -> (Duration, Duration) {
        let first = self.first.unwrap_or(self.started);
        (first - self.started, first.elapsed())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The benchmark runs as a task on the runtime's workers, not on the main
    // thread: a task on the main thread is woken across threads (a futex
    // wake) for every message a path reports, which would measure the
    // harness rather than the paths.
    tokio::spawn(bench())
        .await
        .context("joining the benchmark")?
}

async fn bench() -> anyhow::Result<()> {
    // RUST_LOG=warn (say) shows what the paths log; off by default.
    if std::env::var_os("RUST_LOG").is_some() {
        cronpipe_shared::telemetry::init_logging(&Default::default());
    }
    let mut args = std::env::args().skip(1).collect::<Vec<_>>().into_iter();
    let mut arg = |name: &str, default: usize| -> anyhow::Result<usize> {
        Ok(args
            .next()
            .map(|a| a.parse())
            .transpose()
            .with_context(|| name.to_string())?
            .unwrap_or(default))
    };
    let n = arg("N", 20_000)?;
    let conc = arg("CONCURRENCY", 64)?;
    let partitions = arg("PARTITIONS", 6)?;
    let env = match external_brokers() {
        Some(_) => TestEnv::kafka_external("bench-kafka", partitions as i32)
            .await
            .context("external broker")?,
        None => TestEnv::kafka_mock("bench-kafka", partitions as i32).await,
    };
    println!(
        "bench-kafka: {n} no-op tasks, concurrency {conc}, {partitions} partitions, broker {}",
        match env.cluster() {
            Cluster::Mock(_) => "librdkafka mock cluster (in process)".to_string(),
            Cluster::External(b) => b.clone(),
        }
    );
    // BENCH_ONLY=cronpipe, adapter, raw-store or raw runs that path alone,
    // for profiling.
    if let Ok(only) = std::env::var("BENCH_ONLY") {
        let r = match only.as_str() {
            "cronpipe" => cronpipe_path(&env, n, conc).await,
            "adapter" => adapter_path(&env, n, conc).await,
            "raw-store" => raw_path(&env, n, conc, partitions as i32, RawWork::ClaimFinish).await,
            "raw" => raw_path(&env, n, conc, partitions as i32, RawWork::SetNx).await,
            other => Err(anyhow::anyhow!(
                "BENCH_ONLY = `{other}`: expected `cronpipe`, `adapter`, `raw-store` or `raw`"
            )),
        };
        env.cleanup().await;
        r?;
        return Ok(());
    }
    let cronpipe = cronpipe_path(&env, n, conc).await;
    let raw = raw_path(&env, n, conc, partitions as i32, RawWork::SetNx).await;
    let raw_store = raw_path(&env, n, conc, partitions as i32, RawWork::ClaimFinish).await;
    let adapter_env = env.sibling("bench-adapter").await;
    let adapter = adapter_path(&adapter_env, n, conc).await;
    adapter_env.cleanup().await;
    env.cleanup().await;
    let (c, r, rs, a) = (cronpipe?, raw?, raw_store?, adapter?);
    println!("{:<50}  produce/s   consume/s   end-to-end/s", "");
    for (name, x) in [
        ("cronpipe worker (full path)", &c),
        ("raw rdkafka + SET NX", &r),
        ("raw rdkafka + claim/finish", &rs),
        ("cronpipe Kafka consumer + claim/finish (no worker)", &a),
    ] {
        println!(
            "{name:<50}  {:>9.0}   {:>9.0}   {:>12.0}",
            x.produce, x.consume, x.end_to_end
        );
    }
    for (name, x) in [
        ("ratio vs raw + SET NX", &r),
        ("ratio vs raw + claim/finish", &rs),
    ] {
        println!(
            "{name:<50}  {:>9.2}   {:>9.2}   {:>12.2}   (target end-to-end >= 0.80)",
            c.produce / x.produce,
            c.consume / x.consume,
            c.end_to_end / x.end_to_end
        );
    }
    Ok(())
}

/// The Kafka adapter alone: `Broker::consume` deliveries with the raw
/// harness's claim/finish work and an ack, without the worker loop.
async fn adapter_path(env: &TestEnv, n: usize, conc: usize) -> anyhow::Result<Rates> {
    let envs: Vec<Envelope> = (0..n + WARMUP)
        .map(|_| Envelope::new("noop", serde_json::Value::Null))
        .collect();
    for r in env.broker.publish_batch(&envs[..WARMUP]).await {
        r.context("publishing")?;
    }
    let t0 = Instant::now();
    for chunk in envs[WARMUP..].chunks(5000) {
        for r in env.broker.publish_batch(chunk).await {
            r.context("publishing")?;
        }
    }
    let produced = t0.elapsed();
    all_retained(env, env.topic()).await?;
    let config = env.config("");
    let broker = cronpipe_shared::Broker::connect(&config.broker, "bench-adapter").await?;
    let mut drain = Drain::start();
    let mut consumer = broker
        .consume(conc as u16, "bench-adapter", Duration::ZERO)
        .await?;
    let slots = Arc::new(Semaphore::new(conc));
    let (tx, mut rx) = mpsc::unbounded_channel::<anyhow::Result<()>>();
    let store = env.store.clone();
    let reader = tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let Some(d) = consumer.next().await else {
                return;
            };
            let (tx, store) = (tx.clone(), store.clone());
            tokio::spawn(async move {
                let day = Duration::from_secs(86_400);
                let r: anyhow::Result<()> = async {
                    let e = Envelope::decode(d.body())?;
                    store
                        .claim(e.key(), "adapter", Duration::from_secs(30), day)
                        .await?;
                    store.finish(e.key(), "adapter", Outcome::Done, day).await?;
                    d.ack().await?;
                    Ok(())
                }
                .await;
                drop(permit);
                let _ = tx.send(r);
            });
        }
    });
    let mut ok = 0usize;
    while ok < n + WARMUP {
        match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
            Ok(Some(Ok(()))) => {
                drain.one_done();
                ok += 1
            }
            Ok(Some(Err(e))) => bail!("adapter consumer failed: {e:#}"),
            Ok(None) | Err(_) => bail!("adapter consumer stalled after {ok} of {n}"),
        }
    }
    let (startup, consumed) = drain.finish();
    reader.abort();
    broker.close().await;
    println!(
        "  adapter: first message after {startup:.2?}, then drained {} more in {consumed:.2?}",
        n + WARMUP - 1
    );
    Ok(Rates::of(n, produced, consumed))
}

async fn cronpipe_path(env: &TestEnv, n: usize, conc: usize) -> anyhow::Result<Rates> {
    let envs: Vec<Envelope> = (0..n + WARMUP)
        .map(|_| Envelope::new("noop", serde_json::Value::Null))
        .collect();
    for r in env.broker.publish_batch(&envs[..WARMUP]).await {
        r.context("publishing")?;
    }
    let t0 = Instant::now();
    for chunk in envs[WARMUP..].chunks(5000) {
        for r in env.broker.publish_batch(chunk).await {
            r.context("publishing")?;
        }
    }
    let produced = t0.elapsed();
    all_retained(env, env.topic()).await?;
    println!("  cronpipe: published {n} in {produced:.2?}");
    let config = env.config(&format!(
        "[worker]\nconcurrency = {conc}\n[task.noop]\nhandler = \"rust\"\n"
    ));
    let registry = Registry::new().register("noop", |_t: Task| async { Ok::<(), TaskError>(()) });
    let mut drain = Drain::start();
    let mut w = env.spawn_worker(&config, "bench", registry).await;
    let mut ok = 0usize;
    while ok < n + WARMUP {
        match w.next_report(Duration::from_secs(60)).await {
            Some(r) if r.settled == Settled::Success => {
                drain.one_done();
                ok += 1
            }
            Some(r) => bail!("unexpected outcome {r:?}"),
            None => bail!(
                "worker stalled after {ok} of {n}; committed offsets {:?}, log ranges {:?}",
                env.committed(env.topic()).await,
                env.log_ranges(env.topic()).await
            ),
        }
    }
    let (startup, consumed) = drain.finish();
    w.shutdown().await;
    println!(
        "  cronpipe: worker's first task done after {startup:.2?}, then drained {} more in {consumed:.2?}",
        n + WARMUP - 1
    );
    Ok(Rates::of(n, produced, consumed))
}

/// Fails when the broker no longer holds every message published to `topic`.
/// librdkafka's mock cluster keeps at most 5 MiB per partition (about 16,800
/// of these messages) and silently drops the oldest beyond that; unchecked,
/// a run over that size looked like a consumer that stalled short of the end.
async fn all_retained(env: &TestEnv, topic: &str) -> anyhow::Result<()> {
    let ranges = env.log_ranges(topic).await;
    let dropped: i64 = ranges.iter().map(|(_, lo, _)| lo).sum();
    if dropped > 0 {
        bail!(
            "the broker dropped the oldest {dropped} messages of `{topic}` before they were \
             consumed (partition, first held, end: {ranges:?}). librdkafka's mock cluster keeps \
             at most 5 MiB per partition, about 16,800 of these messages: use more partitions \
             or fewer messages"
        );
    }
    Ok(())
}

/// What the raw consumer does per message before storing its offset.
#[derive(Clone, Copy, Debug)]
enum RawWork {
    /// One `SET NX PX`.
    SetNx,
    /// The worker's claim and done record (`Store::claim`, `Store::finish`).
    ClaimFinish,
}

async fn raw_path(
    env: &TestEnv,
    n: usize,
    conc: usize,
    partitions: i32,
    work: RawWork,
) -> anyhow::Result<Rates> {
    let topic = format!("{}.raw-{work:?}", env.queue).to_lowercase();
    match env.cluster() {
        Cluster::Mock(m) => m.create_topic(&topic, partitions),
        // As many partitions as cronpipe's topic (the worker creates its own
        // the same way), not whatever a broker auto-creates.
        Cluster::External(_) => {
            let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                .set("bootstrap.servers", env.brokers())
                .create()
                .context("raw admin client")?;
            let spec = NewTopic::new(&topic, partitions, TopicReplication::Fixed(1));
            for r in admin
                .create_topics([&spec], &AdminOptions::new())
                .await
                .context("creating the raw topic")?
            {
                if let Err((t, e)) = r {
                    bail!("creating topic {t}: {e}");
                }
            }
        }
    }
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", env.brokers())
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .context("raw producer")?;
    let body = Envelope::new("noop", serde_json::Value::Null).to_json();
    let keys: Vec<String> = (0..n + WARMUP)
        .map(|_| uuid::Uuid::new_v4().to_string())
        .collect();
    let mut t0 = Instant::now();
    for (i, chunk) in [&keys[..WARMUP], &keys[WARMUP..]]
        .into_iter()
        .flat_map(|part| part.chunks(5000))
        .enumerate()
    {
        if i == 1 {
            t0 = Instant::now();
        }
        let sends = chunk.iter().map(|k| {
            producer.send(
                FutureRecord::to(&topic).key(k.as_str()).payload(&body),
                Duration::from_secs(30),
            )
        });
        for r in futures::future::join_all(sends).await {
            if let Err((e, _)) = r {
                bail!("raw produce: {e}");
            }
        }
    }
    let produced = t0.elapsed();
    all_retained(env, &topic).await?;
    println!("  raw ({work:?}): produced {n} in {produced:.2?}");

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", env.brokers())
        .set("group.id", format!("{}-raw-{work:?}", env.group))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .context("raw consumer")?;
    consumer.subscribe(&[topic.as_str()])?;
    let consumer = Arc::new(consumer);
    let slots = Arc::new(Semaphore::new(conc));
    let redis = env.store.connection();
    let store = env.store.clone();
    let prefix = Arc::new(env.store.keys().prefix().to_string());
    let (tx, mut rx) = mpsc::unbounded_channel::<anyhow::Result<()>>();
    let mut drain = Drain::start();
    let c = consumer.clone();
    let reader = tokio::spawn(async move {
        let mut stream = c.stream();
        let mut tick = tokio::time::interval(Duration::from_millis(25));
        loop {
            let m = tokio::select! {
                m = stream.next() => m,
                _ = tick.tick() => {
                    let _ = c.commit_consumer_state(CommitMode::Async);
                    continue;
                }
            };
            let m = match m {
                Some(Ok(m)) => m.detach(),
                Some(Err(e)) => {
                    let _ = tx.send(Err(e.into()));
                    return;
                }
                None => return,
            };
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let (mut redis, tx, prefix, c, store) = (
                redis.clone(),
                tx.clone(),
                prefix.clone(),
                c.clone(),
                store.clone(),
            );
            tokio::spawn(async move {
                let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                let set: anyhow::Result<()> = match work {
                    RawWork::SetNx => redis::cmd("SET")
                        .arg(format!("{prefix}:raw:{key}"))
                        .arg("done")
                        .arg("NX")
                        .arg("PX")
                        .arg(86_400_000u64)
                        .query_async::<Option<String>>(&mut redis)
                        .await
                        .map(|_| ())
                        .map_err(Into::into),
                    RawWork::ClaimFinish => {
                        let day = Duration::from_secs(86_400);
                        match store.claim(&key, "raw", Duration::from_secs(30), day).await {
                            Ok(_) => store
                                .finish(&key, "raw", Outcome::Done, day)
                                .await
                                .map(|_| ())
                                .map_err(Into::into),
                            Err(e) => Err(e.into()),
                        }
                    }
                };
                let r = match set {
                    Ok(_) => c
                        .store_offset(m.topic(), m.partition(), m.offset() + 1)
                        .map_err(Into::into),
                    Err(e) => Err(e),
                };
                drop(permit);
                let _ = tx.send(r);
            });
        }
    });
    let mut ok = 0usize;
    while ok < n + WARMUP {
        match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
            Ok(Some(Ok(()))) => {
                drain.one_done();
                ok += 1
            }
            Ok(Some(Err(e))) => bail!("raw consumer failed: {e:#}"),
            Ok(None) | Err(_) => bail!("raw consumer stalled after {ok} of {n}"),
        }
    }
    let (startup, consumed) = drain.finish();
    reader.abort();
    let _ = consumer.commit_consumer_state(CommitMode::Sync);
    println!(
        "  raw ({work:?}): first message after {startup:.2?}, then drained {} more in {consumed:.2?}",
        n + WARMUP - 1
    );
    Ok(Rates::of(n, produced, consumed))
}
