//! Producer benchmark (not a test), against the real Redis and RabbitMQ with
//! the release `producer` binary as a child process:
//!
//! 1. publish lag (broker-confirmed time minus slot instant, as the producer
//!    logs it for every slot) p50/p99/max for 1 schedule firing every second,
//!    and for 1,000 schedules firing every second, with the count of slots
//!    missed (never delivered) or delivered twice, checked by a consumer;
//! 2. the producer's resident memory with 10,000 schedules loaded.
//!
//! ```text
//! cargo build --release -p cronpipe-producer --bin producer
//! cargo run --release -p cronpipe-tests --bin bench-producer [-- SECONDS]
//! ```
//!
//! Targets: single schedule p99 ≤ 5 ms; 1,000 schedules p99 ≤ 100 ms with no
//! slot missed; RSS ≤ 30 MB with 10,000 schedules.
//!
//! `BENCH_FLOOR=1` first times the broker alone (`publish_batch` of 1 and of
//! 1,000 prebuilt envelopes, no producer), the floor under the lag figures;
//! `BENCH_ONLY=rss` runs only the memory part.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use cronpipe_shared::config::BrokerConfig;
use cronpipe_shared::{Broker, Envelope};
use cronpipe_tests::{amqp_url, TestEnv};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let secs: i64 = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()
        .context("SECONDS")?
        .unwrap_or(30);
    let producer = producer_binary()?;
    println!(
        "bench-producer: {} ({secs} s per lag run)",
        producer.display()
    );

    // The broker's own cost, for comparison: BENCH_FLOOR=1.
    if std::env::var_os("BENCH_FLOOR").is_some() {
        floor().await?;
    }
    if std::env::var("BENCH_ONLY").as_deref() == Ok("rss") {
        for payloads in [false, true] {
            let rss = rss_run(&producer, 10_000, payloads).await?;
            println!(
                "10,000 schedules loaded{}: RSS {:.1} MB (peak {:.1} MB)",
                if payloads {
                    ", each with a JSON payload"
                } else {
                    ""
                },
                rss.rss_mb,
                rss.hwm_mb
            );
        }
        return Ok(());
    }
    let single = lag_run(&producer, 1, secs).await?;
    let thousand = lag_run(&producer, 1000, secs).await?;
    let rss = rss_run(&producer, 10_000, false).await?;
    let rss_payloads = rss_run(&producer, 10_000, true).await?;

    println!();
    println!("publish lag = broker-confirmed time − slot instant");
    for (label, r, target) in [
        ("1 schedule, every second", &single, 5.0),
        ("1,000 schedules, every second", &thousand, 100.0),
    ] {
        println!(
            "{label:<31} slots {:>6}  p50 {:>7.3} ms  p99 {:>7.3} ms  max {:>7.3} ms  missed {}  doubled {}  (target p99 <= {target} ms{})",
            r.lags.len(),
            percentile(&r.lags, 0.50),
            percentile(&r.lags, 0.99),
            r.lags.last().copied().unwrap_or(0.0),
            r.missed,
            r.doubled,
            if target > 10.0 { ", none missed" } else { "" }
        );
        println!(
            "{:<31} producer RSS {:.1} MB (peak {:.1} MB)",
            "", r.rss_mb, r.hwm_mb
        );
    }
    println!(
        "10,000 schedules loaded           RSS {:.1} MB (peak {:.1} MB), leading with baselines stored {:.1?} after start (target RSS <= 30 MB)",
        rss.rss_mb, rss.hwm_mb, rss.ready
    );
    println!(
        "10,000 schedules, each with a JSON payload: RSS {:.1} MB (peak {:.1} MB)",
        rss_payloads.rss_mb, rss_payloads.hwm_mb
    );
    Ok(())
}

/// The release (or same-profile) `producer` next to this binary.
fn producer_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("current exe")?;
    let dir = exe.parent().context("exe dir")?;
    let path = dir.join("producer");
    if !path.exists() {
        bail!(
            "{} not found: build it first with `cargo build --release -p cronpipe-producer --bin producer`",
            path.display()
        );
    }
    Ok(path)
}

/// Deliveries per (schedule, slot).
type Deliveries = BTreeMap<(String, DateTime<Utc>), usize>;

struct LagRun {
    /// Lags in ms, sorted.
    lags: Vec<f64>,
    missed: usize,
    doubled: usize,
    rss_mb: f64,
    hwm_mb: f64,
}

struct RssRun {
    rss_mb: f64,
    hwm_mb: f64,
    ready: Duration,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn config_text(env: &TestEnv, schedules: &str) -> String {
    format!(
        "{}\n[log]\nlevel = \"info\"\n{schedules}\n[task.t]\nhandler = \"exec\"\ncommand = [\"/bin/true\"]\n",
        env.base_toml()
    )
}

fn spawn(producer: &Path, cfg: &Path, log: &Path) -> anyhow::Result<Child> {
    let file = std::fs::File::create(log).context("log file")?;
    Command::new(producer)
        .arg("run")
        .arg("--config")
        .arg(cfg)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .env("CRONPIPE__PRODUCER__INSTANCE_ID", "bench")
        .stdin(Stdio::null())
        .stdout(file.try_clone().context("dup")?)
        .stderr(file)
        .spawn()
        .context("spawning the producer")
}

fn stop(child: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let end = Instant::now() + Duration::from_secs(15);
    while Instant::now() < end {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// (VmRSS, VmHWM) of `pid` in MB.
fn memory(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> f64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(0.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Fields `key=value` of a text log line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!(" {key}=");
    let at = line.find(&pat)? + pat.len();
    line[at..].split(' ').next()
}

async fn lag_run(producer: &Path, n: usize, secs: i64) -> anyhow::Result<LagRun> {
    let env = TestEnv::new("bench-producer").await;
    let result = lag_run_in(&env, producer, n, secs).await;
    env.cleanup().await;
    result
}

async fn lag_run_in(env: &TestEnv, producer: &Path, n: usize, secs: i64) -> anyhow::Result<LagRun> {
    let mut schedules = String::new();
    for i in 0..n {
        schedules.push_str(&format!(
            "[schedule.s{i:04}]\ncron = \"* * * * * *\"\ntask = \"t\"\nmisfire = \"fire_all\"\n"
        ));
    }
    let cfg = env.dir.path().join("bench.toml");
    std::fs::write(&cfg, config_text(env, &schedules)).context("config")?;
    let log = env.dir.path().join("producer.log");

    // A consumer keeps the queue empty and records (schedule, slot) of every delivery.
    let mut bcfg = BrokerConfig::default();
    bcfg.rabbitmq.url = amqp_url();
    bcfg.rabbitmq.queue = env.queue.clone();
    let consumer_broker = Broker::connect(&bcfg, "bench-consumer").await?;
    let mut consumer = consumer_broker
        .consume(2000, "bench", Duration::ZERO)
        .await?;
    let seen: Arc<Mutex<Deliveries>> = Arc::default();
    let stop_consumer = CancellationToken::new();
    let consuming = {
        let seen = seen.clone();
        let stop = stop_consumer.clone();
        tokio::spawn(async move {
            loop {
                let d = tokio::select! {
                    _ = stop.cancelled() => break,
                    d = consumer.next() => d,
                };
                let Some(d) = d else { break };
                if let Ok(e) = Envelope::decode(d.body()) {
                    if let (Some(s), Some(slot)) = (e.schedule, e.slot) {
                        *seen
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .entry((s, slot))
                            .or_default() += 1;
                    }
                }
                let _ = d.ack().await;
            }
        })
    };

    let mut child = spawn(producer, &cfg, &log)?;
    let started = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("Published slot")
    {
        if started.elapsed() > Duration::from_secs(60) {
            stop(&mut child);
            bail!(
                "no slot published within 60 s:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Measure whole seconds after a short warm-up.
    let from = Utc::now().timestamp() + 3;
    let to = from + secs; // slots in [from, to)
    println!("  {n} schedule(s): measuring {secs} s of slots");
    let mut mem = (0.0, 0.0);
    while Utc::now().timestamp() < to + 2 {
        mem = memory(child.id());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop(&mut child);
    // Let the consumer take what is still in flight, then stop it.
    let mut last = usize::MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now: usize = seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .sum();
        if now == last {
            break;
        }
        last = now;
    }
    stop_consumer.cancel();
    let _ = consuming.await;
    consumer_broker.close().await;

    let text = std::fs::read_to_string(&log).context("log")?;
    let mut lags = Vec::new();
    for line in text.lines().filter(|l| l.contains("Published slot")) {
        let (Some(slot), Some(lag)) = (field(line, "slot"), field(line, "lag_ms")) else {
            continue;
        };
        let Ok(slot) = DateTime::parse_from_rfc3339(slot) else {
            continue;
        };
        let ts = slot.timestamp();
        if ts >= from && ts < to {
            lags.push(lag.parse::<f64>().context("lag_ms")?);
        }
    }
    lags.sort_by(|a, b| a.total_cmp(b));
    let seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut missed = 0;
    let mut doubled = 0;
    for i in 0..n {
        let name = format!("s{i:04}");
        for ts in from..to {
            let slot = DateTime::from_timestamp(ts, 0).context("slot")?;
            match seen.get(&(name.clone(), slot)).copied().unwrap_or(0) {
                0 => missed += 1,
                1 => {}
                _ => doubled += 1,
            }
        }
    }
    let expected = n * secs as usize;
    if lags.len() != expected {
        println!("  note: {} lag samples for {expected} slots", lags.len());
    }
    let misfires: BTreeSet<&str> = text
        .lines()
        .filter(|l| l.contains("Missed slots handled"))
        .collect();
    if !misfires.is_empty() {
        println!(
            "  {} misfire log line(s), e.g. {:?}",
            misfires.len(),
            misfires.iter().next()
        );
    }
    Ok(LagRun {
        lags,
        missed,
        doubled,
        rss_mb: mem.0,
        hwm_mb: mem.1,
    })
}

async fn rss_run(producer: &Path, n: usize, payloads: bool) -> anyhow::Result<RssRun> {
    let env = TestEnv::new("bench-producer-rss").await;
    let result = rss_run_in(&env, producer, n, payloads).await;
    env.cleanup().await;
    result
}

async fn rss_run_in(
    env: &TestEnv,
    producer: &Path,
    n: usize,
    payloads: bool,
) -> anyhow::Result<RssRun> {
    // A realistic spread: daily jobs at different minutes and hours, some every few minutes.
    let mut schedules = String::new();
    for i in 0..n {
        let cron = if i % 10 == 0 {
            format!("0 */{} * * * *", 5 + i % 25)
        } else {
            format!("{} {} {} * * *", i % 60, (i / 60) % 60, (i / 3600) % 24)
        };
        let payload = if payloads {
            format!("payload = {{ n = {i} }}\n")
        } else {
            String::new()
        };
        schedules.push_str(&format!(
            "[schedule.s{i:05}]\ncron = \"{cron}\"\ntimezone = \"Europe/Berlin\"\ntask = \"t\"\n{payload}"
        ));
    }
    let cfg = env.dir.path().join("bench.toml");
    std::fs::write(&cfg, config_text(env, &schedules)).context("config")?;
    let log = env.dir.path().join("producer.log");
    let mut child = spawn(producer, &cfg, &log)?;
    let started = Instant::now();
    let mut conn = env.store.connection();
    let key = env.store.keys().watermarks();
    loop {
        let len: usize = redis::cmd("HLEN")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap_or(0);
        if len >= n {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            stop(&mut child);
            bail!("{len} of {n} baselines after 120 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ready = started.elapsed();
    // Settle a few seconds of steady state, then read the memory.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (rss_mb, hwm_mb) = memory(child.id());
    stop(&mut child);
    Ok(RssRun {
        rss_mb,
        hwm_mb,
        ready,
    })
}

/// The broker's own cost: pipelined publish_batch of prebuilt envelopes, no producer involved.
async fn floor() -> anyhow::Result<()> {
    let env = TestEnv::new("bench-floor").await;
    for n in [1usize, 1000] {
        let mut times = Vec::new();
        for round in 0..20 {
            let now = Utc::now();
            let envs: Vec<Envelope> = (0..n)
                .map(|i| {
                    Envelope::scheduled(
                        &format!("s{i:04}"),
                        now,
                        "t",
                        serde_json::Value::Null,
                        1,
                        now,
                    )
                })
                .collect();
            let t = Instant::now();
            for r in env.broker.publish_batch(&envs).await {
                r.context("publish")?;
            }
            times.push(t.elapsed().as_secs_f64() * 1e3);
            let _ = round;
        }
        times.sort_by(|a, b| a.total_cmp(b));
        println!(
            "floor: publish_batch of {n}: p50 {:.3} ms p99 {:.3} ms",
            percentile(&times, 0.5),
            percentile(&times, 0.99)
        );
        let t = Instant::now();
        let now = Utc::now();
        let envs: Vec<Envelope> = (0..n)
            .map(|i| {
                Envelope::scheduled(
                    &format!("s{i:04}"),
                    now,
                    "t",
                    serde_json::Value::Null,
                    1,
                    now,
                )
            })
            .collect();
        println!("floor: building {n} envelopes: {:?}", t.elapsed());
        drop(envs);
    }
    env.cleanup().await;
    Ok(())
}
