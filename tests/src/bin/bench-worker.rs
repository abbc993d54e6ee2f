//! Worker throughput benchmark (not a test). In one run, against the real
//! Redis and RabbitMQ, it queues N no-op tasks and drains them through the full
//! worker path (claim, run, done, ack), then queues N more and drains them
//! through a minimal raw lapin consumer doing one Redis `SET NX` and an ack
//! per message with the same prefetch, and prints both rates and their ratio.
//!
//! ```text
//! cargo run --release -p cronpipe-tests --bin bench-worker [-- N CONCURRENCY ROUNDS]
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cronpipe_shared::Envelope;
use cronpipe_tests::{amqp_url, TestEnv};
use cronpipe_worker::{Registry, Settled, Task, TaskError};
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The same allocator as the `worker` binary (mimalloc), for every path this
/// benchmark compares.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    let mut args = std::env::args().skip(1).collect::<Vec<_>>().into_iter();
    let n: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()
        .context("N")?
        .unwrap_or(100_000);
    let conc: u16 = args
        .next()
        .map(|a| a.parse())
        .transpose()
        .context("CONCURRENCY")?
        .unwrap_or(64);
    let rounds: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()
        .context("ROUNDS")?
        .unwrap_or(1);
    println!(
        "bench-worker: {n} no-op tasks per phase, concurrency/prefetch {conc}, {rounds} round(s)"
    );

    // Rounds after the first alternate the order (worker, raw, raw, worker, ...),
    // so drift in the machine's load does not favour either path.
    // BENCH_ONLY=worker or BENCH_ONLY=raw runs one path (for profiling).
    let only = std::env::var("BENCH_ONLY").ok();
    if let Some(o) = only.as_deref().filter(|o| !matches!(*o, "worker" | "raw")) {
        bail!("BENCH_ONLY = `{o}`: expected `worker` or `raw`");
    }
    let (mut worker_secs, mut raw_secs) = (0.0, 0.0);
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for worker_first in order {
            if only.as_deref() == Some(if worker_first { "raw" } else { "worker" }) {
                continue;
            }
            if worker_first {
                let env = TestEnv::new("bench-worker").await;
                let r = worker_path(&env, n, conc).await;
                env.cleanup().await;
                worker_secs += r?;
            } else {
                let env = TestEnv::new("bench-raw").await;
                let r = raw_path(&env, n, conc).await;
                env.cleanup().await;
                raw_secs += r?;
            }
        }
    }
    let total = (n * rounds) as f64;
    let (worker_rate, raw_rate) = (total / worker_secs, total / raw_secs);
    println!("worker (claim, run, done, ack): {worker_rate:>9.0} msgs/s");
    println!("raw (SET NX, ack):              {raw_rate:>9.0} msgs/s");
    println!(
        "ratio worker/raw:               {:>9.2} (target >= 0.80)",
        worker_rate / raw_rate
    );
    Ok(())
}

async fn fill(env: &TestEnv, n: usize) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let envs: Vec<Envelope> = (0..n)
        .map(|_| Envelope::new("noop", serde_json::Value::Null))
        .collect();
    for chunk in envs.chunks(5000) {
        for r in env.broker.publish_batch(chunk).await {
            r.context("publishing")?;
        }
    }
    println!("  queued {n} in {:.1?}", t0.elapsed());
    Ok(())
}

async fn worker_path(env: &TestEnv, n: usize, conc: u16) -> anyhow::Result<f64> {
    fill(env, n).await?;
    let config = env.config(&format!(
        "[worker]\nconcurrency = {conc}\n[task.noop]\nhandler = \"rust\"\n"
    ));
    let registry = Registry::new().register("noop", |_t: Task| async { Ok::<(), TaskError>(()) });
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut opts = cronpipe_worker::Options::from_config(config.clone());
    opts.instance_id = "bench".into();
    opts.reports = Some(tx);
    let registry = cronpipe_worker::registry_from_config(&config, registry)?;
    let broker = cronpipe_shared::Broker::connect(&config.broker, "bench-worker").await?;
    let stop = CancellationToken::new();
    let t0 = Instant::now();
    let handle = tokio::spawn(cronpipe_worker::run(
        opts,
        env.store.clone(),
        broker,
        registry,
        stop.clone(),
    ));
    let (mut ok, mut skipped) = (0usize, 0usize);
    while ok < n {
        match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
            Ok(Some(r)) if r.settled == Settled::Success => ok += 1,
            // A broker hiccup redelivers a few finished tasks: skipped, not run again.
            Ok(Some(r)) if matches!(r.settled, Settled::Duplicate | Settled::Deferred) => {
                skipped += 1
            }
            Ok(Some(r)) => bail!("unexpected outcome {r:?}"),
            Ok(None) | Err(_) => bail!("worker stalled after {ok} of {n}"),
        }
    }
    let took = t0.elapsed();
    stop.cancel();
    handle.await.context("joining the worker")??;
    println!(
        "  worker drained {n} in {took:.2?} ({:.0} msgs/s; {skipped} redelivered copies skipped)",
        n as f64 / took.as_secs_f64()
    );
    Ok(took.as_secs_f64())
}

async fn raw_path(env: &TestEnv, n: usize, conc: u16) -> anyhow::Result<f64> {
    fill(env, n).await?;
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.basic_qos(conc, BasicQosOptions::default()).await?;
    let redis = env.store.connection();
    let prefix = env.store.keys().prefix().to_string();
    let t0 = Instant::now();
    let mut consumer = ch
        .basic_consume(
            env.queue.as_str().into(),
            "bench-raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let (tx, mut rx) = mpsc::unbounded_channel::<anyhow::Result<()>>();
    let prefix = Arc::new(prefix);
    let reader = tokio::spawn(async move {
        while let Some(d) = consumer.next().await {
            let d = match d {
                Ok(d) => d,
                Err(e) => {
                    let _ = tx.send(Err(e.into()));
                    return;
                }
            };
            let (mut redis, tx, prefix) = (redis.clone(), tx.clone(), prefix.clone());
            tokio::spawn(async move {
                let id = d
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                let set: redis::RedisResult<Option<String>> = redis::cmd("SET")
                    .arg(format!("{prefix}:raw:{id}"))
                    .arg("done")
                    .arg("NX")
                    .arg("PX")
                    .arg(86_400_000u64)
                    .query_async(&mut redis)
                    .await;
                let r = match set {
                    Ok(_) => d
                        .acker
                        .ack(BasicAckOptions::default())
                        .await
                        .map(|_| ())
                        .map_err(Into::into),
                    Err(e) => Err(e.into()),
                };
                let _ = tx.send(r);
            });
        }
    });
    let mut ok = 0usize;
    while ok < n {
        match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
            Ok(Some(Ok(()))) => ok += 1,
            Ok(Some(Err(e))) => bail!("raw consumer failed: {e:#}"),
            Ok(None) | Err(_) => bail!("raw consumer stalled after {ok} of {n}"),
        }
    }
    let took = t0.elapsed();
    reader.abort();
    let _ = conn.close(200, "bye".into()).await;
    println!(
        "  raw consumer drained {n} in {took:.2?} ({:.0} msgs/s)",
        n as f64 / took.as_secs_f64()
    );
    Ok(took.as_secs_f64())
}
