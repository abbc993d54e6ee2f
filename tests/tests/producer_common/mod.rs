//! Helpers shared by the producer test files: a recorder that consumes the
//! work queue (or topic) and notes when each message arrived, a fleet of
//! producer processes that can be killed and restarted, lease and log
//! readers, slot bookkeeping, and an in-process producer on a chosen clock.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use cronpipe_shared::config::{BrokerConfig, PropertyValue};
use cronpipe_shared::{Broker, Envelope};
use cronpipe_tests::{Proc, TestEnv};
use nix::sys::signal::Signal;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A producer running in this test process, on a chosen clock.
#[allow(unused_imports)]
pub use cronpipe_tests::RunningProducer as InProc;

/// One message as the recorder saw it.
#[derive(Debug, Clone)]
pub struct Received {
    /// The envelope.
    pub env: Envelope,
    /// Wall-clock arrival at the recorder.
    pub at: DateTime<Utc>,
    /// Monotonic arrival at the recorder.
    pub instant: Instant,
}

impl Received {
    /// The slot instant.
    pub fn slot(&self) -> DateTime<Utc> {
        self.env.slot.expect("scheduled message has a slot")
    }

    /// The fencing token.
    pub fn token(&self) -> u64 {
        self.env
            .fencing_token
            .expect("scheduled message has a token")
    }

    /// Arrival minus slot instant (negative values clamp to zero).
    pub fn lateness(&self) -> Duration {
        (self.at - self.slot()).to_std().unwrap_or_default()
    }
}

/// RabbitMQ settings for the queue of `env` at `url` (another vhost, a proxy).
pub fn broker_config(env: &TestEnv, url: &str) -> BrokerConfig {
    let mut cfg = BrokerConfig::default();
    cfg.rabbitmq.url = url.to_string();
    cfg.rabbitmq.queue = env.queue.clone();
    cfg
}

/// Consumes the work queue (Kafka: the work topic, in the workers' group) on
/// its own connection, recording every message with its arrival time before
/// acking it.
pub struct Recorder {
    got: Arc<Mutex<Vec<Received>>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Recorder {
    /// Starts consuming the work queue / topic of `env`. On Kafka the fetch
    /// wait is cut to 10 ms: the mock cluster holds an empty fetch for the
    /// whole `fetch.wait.max.ms` (500 ms by default) even when a message
    /// arrives meanwhile, which would add up to half a second to every
    /// arrival time measured here.
    pub async fn start(env: &TestEnv) -> Recorder {
        let mut cfg = env.broker_config();
        cfg.kafka
            .properties
            .0
            .insert("fetch.wait.max.ms".into(), PropertyValue::Int(10));
        Self::start_with(cfg).await
    }

    /// Starts consuming with `cfg`.
    pub async fn start_with(cfg: BrokerConfig) -> Recorder {
        let broker = Broker::connect(&cfg, "recorder")
            .await
            .expect("recorder connects");
        let mut consumer = broker
            .consume(256, "recorder", Duration::ZERO)
            .await
            .expect("consume");
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let stop = CancellationToken::new();
        let task = {
            let got = got.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                loop {
                    let delivery = tokio::select! {
                        _ = stop.cancelled() => break,
                        d = consumer.next() => d,
                    };
                    let Some(d) = delivery else { break };
                    let (at, instant) = (Utc::now(), Instant::now());
                    let env = Envelope::decode(d.body()).expect("producer wrote a valid envelope");
                    got.lock().unwrap().push(Received { env, at, instant });
                    let _ = d.ack().await;
                }
                consumer.cancel().await;
                broker.close().await;
            })
        };
        Recorder { got, stop, task }
    }

    /// Everything received so far, in arrival order.
    pub fn snapshot(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    /// Number of messages received so far.
    pub fn len(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    /// The first message (in arrival order) matching `pred`, waiting up to `limit`.
    pub async fn wait_for(
        &self,
        limit: Duration,
        pred: impl Fn(&Received) -> bool,
    ) -> Option<Received> {
        let end = Instant::now() + limit;
        loop {
            if let Some(r) = self.got.lock().unwrap().iter().find(|r| pred(r)) {
                return Some(r.clone());
            }
            if Instant::now() >= end {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Whether a message for a slot at or after `slot` arrives within `limit`
    /// (publishing got that far).
    pub async fn reaches(&self, slot: DateTime<Utc>, limit: Duration) -> bool {
        self.wait_for(limit, |r| r.slot() >= slot).await.is_some()
    }

    /// Stops consuming (unacked deliveries go back to the queue) and returns
    /// what was received, followed by whatever is still in the queue of `env`
    /// (those with arrival = now).
    pub async fn finish(self, env: &TestEnv) -> Vec<Received> {
        self.stop.cancel();
        let _ = self.task.await;
        let mut got = self.got.lock().unwrap().clone();
        for env in env.drain_envelopes().await {
            got.push(Received {
                env,
                at: Utc::now(),
                instant: Instant::now(),
            });
        }
        got
    }
}

/// The current lease: (fencing token, instance id), if held.
pub async fn leader(env: &TestEnv) -> Option<(u64, String)> {
    let (value, _) = env.store.lease_holder().await.ok().flatten()?;
    parse_lease(&value)
}

/// Splits a lease value `<token>:<instance>:<nonce>`.
pub fn parse_lease(value: &str) -> Option<(u64, String)> {
    let (token, rest) = value.split_once(':')?;
    let (instance, _nonce) = rest.rsplit_once(':')?;
    Some((token.parse().ok()?, instance.to_string()))
}

/// Polls until a lease is held satisfying `pred`; returns it.
pub async fn wait_leader(
    env: &TestEnv,
    limit: Duration,
    pred: impl Fn(u64, &str) -> bool,
) -> Option<(u64, String)> {
    let end = Instant::now() + limit;
    loop {
        if let Some((t, i)) = leader(env).await {
            if pred(t, &i) {
                return Some((t, i));
            }
        }
        if Instant::now() >= end {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Producer processes by instance id, restartable; every incarnation logs to its own file.
pub struct Fleet {
    cfg: PathBuf,
    dir: PathBuf,
    env: HashMap<String, Vec<(String, String)>>,
    procs: BTreeMap<String, Proc>,
    logs: Vec<PathBuf>,
    incarnations: HashMap<String, u32>,
}

impl Fleet {
    /// A fleet running `producer run --config cfg`, logging into `dir`.
    pub fn new(cfg: &Path, dir: &Path) -> Fleet {
        Fleet {
            cfg: cfg.to_path_buf(),
            dir: dir.to_path_buf(),
            env: HashMap::new(),
            procs: BTreeMap::new(),
            logs: Vec::new(),
            incarnations: HashMap::new(),
        }
    }

    /// Extra environment for instance `id` (applies to later starts).
    pub fn set_env(&mut self, id: &str, vars: &[(&str, &str)]) {
        self.env.insert(
            id.to_string(),
            vars.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
    }

    /// Starts (or restarts) instance `id`.
    pub fn start(&mut self, id: &str) {
        let n = self.incarnations.entry(id.to_string()).or_insert(0);
        *n += 1;
        let label = format!("{id}-{n}");
        let mut vars: Vec<(String, String)> =
            vec![("CRONPIPE__PRODUCER__INSTANCE_ID".into(), id.into())];
        vars.extend(self.env.get(id).cloned().unwrap_or_default());
        let refs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let p = Proc::start("producer", &self.cfg, &refs, &self.dir, &label);
        self.logs.push(p.log.clone());
        self.procs.insert(id.to_string(), p);
    }

    /// The running process of instance `id`.
    pub fn get(&self, id: &str) -> &Proc {
        &self.procs[id]
    }

    /// Sends `sig` to instance `id`; for SIGKILL also reaps it.
    pub fn signal(&mut self, id: &str, sig: Signal) {
        let p = self.procs.get_mut(id).expect("known instance");
        p.signal(sig);
        if sig == Signal::SIGKILL {
            assert!(p.wait_exit(Duration::from_secs(5)), "{id} did not die");
        }
    }

    /// Waits up to `limit` for instance `id` to exit; true when it did.
    pub fn wait_exit(&mut self, id: &str, limit: Duration) -> bool {
        self.procs
            .get_mut(id)
            .expect("known instance")
            .wait_exit(limit)
    }

    /// SIGTERMs every running instance and waits for each to exit.
    pub fn stop_all(&mut self) {
        for p in self.procs.values() {
            p.signal(Signal::SIGTERM);
        }
        for (id, p) in self.procs.iter_mut() {
            assert!(
                p.wait_exit(Duration::from_secs(15)),
                "{id} did not exit after SIGTERM"
            );
        }
    }

    /// All logs of all incarnations, concatenated.
    pub fn all_logs(&self) -> String {
        self.logs
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The tail of every log, for failure messages.
    pub fn log_tails(&self) -> String {
        self.logs
            .iter()
            .map(|p| {
                let text = std::fs::read_to_string(p).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(15)..].join("\n");
                format!("--- {}\n{tail}", p.display())
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Sum of the integer field `field=N` over log lines containing `message`.
pub fn sum_field(log: &str, message: &str, field: &str) -> u64 {
    let key = format!("{field}=");
    log.lines()
        .filter(|l| l.contains(message))
        .filter_map(|l| {
            let at = l.find(&key)? + key.len();
            let digits: String = l[at..].chars().take_while(|c| c.is_ascii_digit()).collect();
            digits.parse::<u64>().ok()
        })
        .sum()
}

/// The slots missing from `slots` between its first and last, stepping by `step`.
pub fn gaps(slots: &BTreeSet<DateTime<Utc>>, step: chrono::Duration) -> Vec<DateTime<Utc>> {
    let (Some(first), Some(last)) = (slots.first(), slots.last()) else {
        return Vec::new();
    };
    let mut missing = Vec::new();
    let mut t = *first;
    while t <= *last {
        if !slots.contains(&t) {
            missing.push(t);
        }
        t += step;
    }
    missing
}

/// Publishes grouped by slot, after asserting that no leadership (fencing
/// token) published a slot twice; the slots published form the keys.
pub fn once_per_leadership(got: &[Received]) -> BTreeMap<DateTime<Utc>, Vec<u64>> {
    let by_slot = publishes_by_slot(got);
    for (slot, tokens) in &by_slot {
        let distinct: BTreeSet<_> = tokens.iter().collect();
        assert_eq!(
            distinct.len(),
            tokens.len(),
            "slot {slot} twice in one leadership"
        );
    }
    by_slot
}

/// Slot → fencing tokens of every publish of it.
pub fn publishes_by_slot(got: &[Received]) -> BTreeMap<DateTime<Utc>, Vec<u64>> {
    let mut out: BTreeMap<DateTime<Utc>, Vec<u64>> = BTreeMap::new();
    for r in got {
        out.entry(r.slot()).or_default().push(r.token());
    }
    out
}

/// Fencing token → (first, last) arrival of its messages.
pub fn leadership_spans(got: &[Received]) -> BTreeMap<u64, (DateTime<Utc>, DateTime<Utc>)> {
    let mut out: BTreeMap<u64, (DateTime<Utc>, DateTime<Utc>)> = BTreeMap::new();
    for r in got {
        let e = out.entry(r.token()).or_insert((r.at, r.at));
        e.0 = e.0.min(r.at);
        e.1 = e.1.max(r.at);
    }
    out
}

/// Sleeps a random time in `[min_ms, max_ms]`: the random moments of a
/// kill experiment (not synchronisation).
pub async fn random_pause(min_ms: u64, max_ms: u64) {
    let ms = rand::random_range(min_ms..=max_ms);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// TOML for a `[task.NAME]` the config validation accepts (never run here).
pub fn noop_task(name: &str) -> String {
    format!("\n[task.{name}]\nhandler = \"exec\"\ncommand = [\"/bin/true\"]\n")
}

/// Config of the process tests: a 2 s lease and one every-second schedule
/// `tick` with misfire `policy`, running a no-op task.
pub fn tick_config(policy: &str) -> String {
    format!(
        r#"
[producer]
lease_ttl = "2s"
misfire_threshold = "1s"

[schedule.tick]
cron = "* * * * * *"
task = "count"
misfire = "{policy}"
{task}"#,
        task = noop_task("count")
    )
}

/// A TCP proxy in front of a service that the test can partition: when cut,
/// bytes stop flowing both ways on open connections and new connections are
/// accepted but never answered (packets "dropped", no reset), like a network
/// partition. When restored, the held connections are closed (their clients
/// see the connection drop and reconnect) and new ones are forwarded again.
pub struct Proxy {
    /// Local port clients connect to.
    pub port: u16,
    cut: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy to `upstream` on a free local port.
    pub async fn start(upstream: std::net::SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let (cut, cut_rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut cut_rx = cut_rx.clone();
                tokio::spawn(async move {
                    let partitioned = |rx: &mut watch::Receiver<bool>| {
                        let mut rx = rx.clone();
                        async move {
                            let _ = rx.wait_for(|c| *c).await;
                        }
                    };
                    let healed = |rx: &mut watch::Receiver<bool>| {
                        let mut rx = rx.clone();
                        async move {
                            let _ = rx.wait_for(|c| !*c).await;
                        }
                    };
                    if *cut_rx.borrow_and_update() {
                        // Accepted while partitioned: hold it, unanswered, until healed.
                        healed(&mut cut_rx).await;
                        return;
                    }
                    let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = partitioned(&mut cut_rx) => {
                            // Keep both sockets open and silent until healed, then drop them.
                            healed(&mut cut_rx).await;
                        }
                    }
                });
            }
        });
        Proxy { port, cut, task }
    }

    /// Partitions every connection through this proxy.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Heals the partition.
    pub fn restore(&self) {
        self.cut.send_replace(false);
    }

    /// A Redis URL through this proxy.
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Parses an RFC 3339 instant.
pub fn utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .expect("RFC 3339")
        .with_timezone(&Utc)
}

/// Runs `rabbitmqctl` with `args`, returning (success, stdout + stderr).
pub fn rabbitmqctl(args: &[&str]) -> (bool, String) {
    match std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
    {
        Ok(o) => (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        ),
        Err(e) => (false, e.to_string()),
    }
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
pub fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}
