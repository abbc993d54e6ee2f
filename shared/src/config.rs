//! The one TOML config file both binaries read, its environment overrides
//! (`CRONPIPE__SECTION__KEY=value`), and validation that runs before anything
//! connects. Every error names the file, the key path, the bad value and what
//! was expected, and all errors are reported at once.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use crate::duration::Dur;
use crate::redact;
use crate::schedule::{self, Schedule};

mod kafka;
use kafka::validate_kafka;
pub use kafka::{KafkaConfig, KafkaProperties, PropertyValue, MANAGED_KAFKA_PROPERTIES};

/// Prefix of environment variables that override config keys; segments are
/// joined with `__`, for example `CRONPIPE__WORKER__CONCURRENCY=16`.
pub const ENV_PREFIX: &str = "CRONPIPE__";

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Redis connection and key namespace.
    #[serde(default)]
    pub redis: RedisConfig,
    /// Which broker carries tasks, and how to reach it.
    #[serde(default)]
    pub broker: BrokerConfig,
    /// Producer settings.
    #[serde(default)]
    pub producer: ProducerConfig,
    /// Worker settings.
    #[serde(default)]
    pub worker: WorkerConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Schedules by name (`[schedule.NAME]`).
    #[serde(default, rename = "schedule")]
    pub schedules: BTreeMap<String, ScheduleConfig>,
    /// Task handlers by task name (`[task.NAME]`).
    #[serde(default, rename = "task")]
    pub tasks: BTreeMap<String, TaskConfig>,
}

/// `[redis]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Redis URL, `redis://host:port/db`.
    pub url: String,
    /// Prefix of every key cronpipe writes; separate deployments use separate namespaces.
    pub namespace: String,
    /// Replicas that must hold a leader-lease, fencing or watermark write
    /// (Redis `WAIT`) before the producer counts it; 0 (the default) does not
    /// wait. See [`crate::Store::with_replica_wait`].
    pub wait_replicas: u32,
    /// How long one such write waits for those replicas.
    pub wait_timeout: Dur,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".into(),
            namespace: "cronpipe".into(),
            wait_replicas: 0,
            wait_timeout: Dur::millis(250),
        }
    }
}

/// The broker kinds cronpipe speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    /// RabbitMQ over AMQP 0.9.1.
    #[default]
    Rabbitmq,
    /// Apache Kafka (or a Kafka-protocol broker).
    Kafka,
}

/// `[broker]`
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// `rabbitmq` or `kafka`.
    pub kind: BrokerKind,
    /// `[broker.rabbitmq]`
    pub rabbitmq: RabbitConfig,
    /// `[broker.kafka]`
    pub kafka: KafkaConfig,
}

/// RabbitMQ queue types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Replicated Raft-based queues (the default).
    #[default]
    Quorum,
    /// Classic durable queues.
    Classic,
}

/// `[broker.rabbitmq]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RabbitConfig {
    /// AMQP URL; the default vhost is `%2f`.
    pub url: String,
    /// The work queue. Its dead-letter queue is `<queue>.dlq`, its delay queues `<queue>.delay.<ms>`.
    pub queue: String,
    /// `quorum` (default) or `classic`.
    pub queue_type: QueueType,
    /// How long to wait for a publisher confirm before treating the publish as failed.
    pub confirm_timeout: Dur,
    /// Largest AMQP frame this client proposes, in bytes (4096 to 131072;
    /// a `frame_max` in `url` wins). Larger messages span several frames.
    /// The client keeps two I/O buffers of 32 frames each, so this sets its
    /// buffer memory: 16384 → 1 MiB, RabbitMQ's default 131072 → 8 MiB.
    pub frame_max: u32,
}

impl Default for RabbitConfig {
    fn default() -> Self {
        RabbitConfig {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            queue: "cronpipe.tasks".into(),
            queue_type: QueueType::Quorum,
            confirm_timeout: Dur::secs(10),
            frame_max: 16_384,
        }
    }
}

/// `[producer]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProducerConfig {
    /// Name of this producer in the lease and logs; defaults to host name and pid.
    pub instance_id: Option<String>,
    /// Leader lease time to live. Renewal runs every third of it.
    pub lease_ttl: Dur,
    /// A slot published later than this after its instant counts as missed and
    /// goes through the schedule's misfire policy.
    pub misfire_threshold: Dur,
    /// Address of `/metrics`, `/healthz`, `/readyz` and the admin API, e.g. `"0.0.0.0:9464"`; unset = off.
    pub http_addr: Option<std::net::SocketAddr>,
    /// Bearer token the admin API requires; unset = admin API off.
    pub admin_token: Option<Secret>,
}

/// A secret string (token, password): shown as `***` in debug output and logs.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    /// The secret text.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            instance_id: None,
            lease_ttl: Dur::secs(5),
            misfire_threshold: Dur::secs(1),
            http_addr: None,
            admin_token: None,
        }
    }
}

/// `[worker]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Name of this worker in claims, dead letters and logs; defaults to host name and pid.
    pub instance_id: Option<String>,
    /// Tasks run at once; also the broker prefetch.
    pub concurrency: u16,
    /// On shutdown, how long in-flight tasks may take to finish.
    pub shutdown_grace: Dur,
    /// Lifetime of a task's in-progress claim; renewed every third of it while the task runs.
    pub claim_ttl: Dur,
    /// How long a finished task's key is remembered, so duplicates are skipped.
    pub done_ttl: Dur,
    /// Task timeout when the task does not set one.
    pub default_timeout: Dur,
    /// Messages larger than this go to the dead-letter queue unread.
    pub max_message_bytes: usize,
    /// Bytes of stdout/stderr kept from an `exec` task.
    pub output_tail_bytes: usize,
    /// Default retry policy for tasks.
    pub retry: RetryPolicy,
    /// Address of `/metrics`, `/healthz`, `/readyz`, e.g. `"0.0.0.0:9465"`; unset = off.
    pub http_addr: Option<std::net::SocketAddr>,
    /// Most entries kept in the execution history stream (approximate trim).
    pub history_max_len: usize,
    /// Oldest entries kept in the execution history stream.
    pub history_max_age: Dur,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            instance_id: None,
            concurrency: 8,
            shutdown_grace: Dur::secs(30),
            claim_ttl: Dur::secs(30),
            done_ttl: Dur::secs(24 * 3600),
            default_timeout: Dur::secs(300),
            max_message_bytes: 1024 * 1024,
            output_tail_bytes: 4096,
            retry: RetryPolicy::default(),
            http_addr: None,
            history_max_len: 10_000,
            history_max_age: Dur::secs(7 * 24 * 3600),
        }
    }
}

/// Exponential backoff for failed task attempts.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Attempts in all, the first included. 1 means never retry.
    pub max_attempts: u32,
    /// Delay before the second attempt.
    pub initial_delay: Dur,
    /// Each further delay is the previous times this.
    pub multiplier: f64,
    /// No delay is longer than this.
    pub max_delay: Dur,
    /// Fraction (0 to 1) of each delay taken off at random, so retries spread out.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_delay: Dur::secs(1),
            multiplier: 2.0,
            max_delay: Dur::secs(300),
            jitter: 0.2,
        }
    }
}

/// Per-task retry overrides; unset keys come from `[worker.retry]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetryOverride {
    /// See [`RetryPolicy::max_attempts`].
    pub max_attempts: Option<u32>,
    /// See [`RetryPolicy::initial_delay`].
    pub initial_delay: Option<Dur>,
    /// See [`RetryPolicy::multiplier`].
    pub multiplier: Option<f64>,
    /// See [`RetryPolicy::max_delay`].
    pub max_delay: Option<Dur>,
    /// See [`RetryPolicy::jitter`].
    pub jitter: Option<f64>,
}

impl RetryOverride {
    /// This override applied over `base`.
    pub fn over(&self, base: RetryPolicy) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts.unwrap_or(base.max_attempts),
            initial_delay: self.initial_delay.unwrap_or(base.initial_delay),
            multiplier: self.multiplier.unwrap_or(base.multiplier),
            max_delay: self.max_delay.unwrap_or(base.max_delay),
            jitter: self.jitter.unwrap_or(base.jitter),
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` (for terminals) or `json`.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `cronpipe=debug,info`; `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// Log output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// What a schedule does about slots that were not published on time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MisfirePolicy {
    /// Missed slots are not published (they are counted and logged).
    Skip,
    /// Only the most recent missed slot is published.
    #[default]
    FireOnce,
    /// Every missed slot within the window is published, oldest first, up to `max_catchup`.
    FireAll,
}

impl MisfirePolicy {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            MisfirePolicy::Skip => "skip",
            MisfirePolicy::FireOnce => "fire_once",
            MisfirePolicy::FireAll => "fire_all",
        }
    }
}

/// `[schedule.NAME]`: when to publish which task.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Cron expression (5, 6 or 7 fields, or `@daily` and friends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// Fixed interval such as `"90s"`, aligned to `anchor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<String>,
    /// Instant `every` slots are aligned to (RFC 3339); default 1970-01-01T00:00:00Z.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor: Option<String>,
    /// ISO 8601 repeating interval such as `R5/2026-01-01T09:00:00Z/P1M`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iso: Option<String>,
    /// IANA timezone the cron fields are read in; default `UTC`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Task name to publish.
    pub task: String,
    /// JSON payload given to the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
    /// Misfire policy; default `fire_once`.
    #[serde(default)]
    pub misfire: MisfirePolicy,
    /// How far back a misfire policy looks; default 24h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catchup_window: Option<Dur>,
    /// Most missed slots `fire_all` publishes at once; default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_catchup: Option<u32>,
    /// Paused schedules publish nothing.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub enabled: bool,
}

fn yes() -> bool {
    true
}
fn is_true(b: &bool) -> bool {
    *b
}

/// Default misfire look-back window.
pub const DEFAULT_CATCHUP_WINDOW: Dur = Dur::secs(24 * 3600);
/// Default cap of slots `fire_all` publishes.
pub const DEFAULT_MAX_CATCHUP: u32 = 100;

/// Handler kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HandlerKind {
    /// Run a program fixed in config.
    Exec,
    /// A handler registered in Rust through the worker library.
    Rust,
    /// An HTTP call fixed in config; the payload is the request body.
    Http,
}

/// HTTP methods an `http` handler may use.
pub const HTTP_METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE"];

/// RabbitMQ's default `consumer_timeout`: a delivery held unacked longer than
/// this makes the broker close the consumer's channel.
pub const RABBITMQ_DEFAULT_CONSUMER_TIMEOUT: std::time::Duration =
    std::time::Duration::from_secs(30 * 60);

/// `[task.NAME]`: how a worker runs a task.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    /// `exec`, `http` or `rust`.
    pub handler: HandlerKind,
    /// For `exec`: the program and its arguments. A message can never change them.
    #[serde(default)]
    pub command: Vec<String>,
    /// For `exec`: extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// For `exec`: working directory.
    #[serde(default)]
    pub workdir: Option<PathBuf>,
    /// For `exec`: exit codes that mean "do not retry".
    #[serde(default)]
    pub permanent_exit_codes: Vec<i32>,
    /// For `http`: the URL called (`http://` or `https://`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// For `http`: the method; default `POST`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// For `http`: request headers. A message can never change them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Most attempts of this task running at once in one worker; default no
    /// limit beyond `[worker].concurrency`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u16>,
    /// Time limit of one attempt; default `[worker].default_timeout`.
    #[serde(default)]
    pub timeout: Option<Dur>,
    /// Retry overrides.
    #[serde(default)]
    pub retry: RetryOverride,
}

/// One problem found in a config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file read.
    pub file: PathBuf,
    /// Key path such as `schedule "nightly-report".cron`.
    pub key: String,
    /// The offending value as written, when there is one.
    pub value: Option<String>,
    /// What is wrong and what was expected.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.file.display())?;
        if !self.key.is_empty() {
            write!(f, "{}", self.key)?;
            if let Some(v) = &self.value {
                write!(f, " = {v}")?;
            }
            write!(f, ": ")?;
        }
        write!(f, "{}", self.message)
    }
}

/// All problems found in a config, reported together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(f, "{n} problem{} in config:", if n == 1 { "" } else { "s" })?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

/// Formats a key path: names under `schedule` and `task` are quoted.
pub fn key_path(segments: &[String]) -> String {
    let mut out = String::new();
    let mut quote_next = false;
    for seg in segments {
        if quote_next {
            out.push_str(&format!(" \"{seg}\""));
            quote_next = false;
            continue;
        }
        if !out.is_empty() {
            out.push('.');
        }
        out.push_str(seg);
        quote_next = out == "schedule" || out == "task";
    }
    out
}

fn schedule_key(name: &str, field: &str) -> String {
    key_path(&["schedule".into(), name.into(), field.into()])
}

fn task_key(name: &str, field: &str) -> String {
    key_path(&["task".into(), name.into(), field.into()])
}

/// Bounds of `producer.misfire_threshold` (see [`Config::validate`]).
const MISFIRE_THRESHOLD_MIN: std::time::Duration = std::time::Duration::from_millis(100);
const MISFIRE_THRESHOLD_MAX: std::time::Duration = std::time::Duration::from_secs(3600);
/// Accepted AMQP frame sizes, as `broker.rabbitmq.frame_max` or in the URL.
const FRAME_MAX: std::ops::RangeInclusive<u32> = 4096..=131_072;
const FRAME_MAX_RULE: &str =
    "expected 4096 to 131072 bytes (AMQP's minimum frame size to RabbitMQ's default maximum)";

fn quoted(v: &str) -> Option<String> {
    Some(format!("{v:?}"))
}

impl Config {
    /// Reads, overrides from the process environment, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        Self::load_with_env(path, std::env::vars())
    }

    /// As [`Config::load`], with the environment given explicitly (for tests).
    pub fn load_with_env(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: path.to_path_buf(),
                key: String::new(),
                value: None,
                message: format!("cannot read the config file: {e}"),
            }])
        })?;
        Self::parse(path, &text, env)
    }

    /// Parses config text (attributed to `file` in errors) and validates it.
    pub fn parse(
        file: &Path,
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigErrors> {
        let err = |key: String, value: Option<String>, message: String| {
            ConfigErrors(vec![ConfigError {
                file: file.to_path_buf(),
                key,
                value,
                message,
            }])
        };
        let mut table: toml::Table = toml::from_str(text)
            .map_err(|e| err(String::new(), None, format!("not valid TOML: {e}")))?;
        let mut from_env: BTreeMap<String, String> = BTreeMap::new();
        for (name, raw) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let segments: Vec<String> = rest.split("__").map(str::to_string).collect();
            if segments.iter().any(String::is_empty) {
                return Err(err(
                    String::new(),
                    None,
                    format!("environment variable {name} has an empty key segment; expected CRONPIPE__SECTION__KEY"),
                ));
            }
            let path = apply_env(&mut table, &segments, &raw);
            from_env.insert(key_path(&path), name);
        }
        let de = toml::Value::Table(table);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let segments: Vec<String> = e
                .path()
                .iter()
                .map(|s| match s {
                    serde_path_to_error::Segment::Seq { index } => index.to_string(),
                    serde_path_to_error::Segment::Map { key } => key.clone(),
                    serde_path_to_error::Segment::Enum { variant } => variant.clone(),
                    serde_path_to_error::Segment::Unknown => "?".into(),
                })
                .filter(|s| s != "?")
                .collect();
            let key = key_path(&segments);
            // `message()`, not `to_string()`: the latter appends "\nin `<path>`",
            // which repeats the key and breaks the one-line-per-error listing.
            let mut message = e.inner().message().to_string();
            if let Some(var) = from_env.get(&key) {
                message.push_str(&format!(" (value set by environment variable {var})"));
            }
            err(key, None, message)
        })?;
        config.validate(file).map_err(|mut errors| {
            // A bad value that came from the environment is not in the file: say where it is.
            for e in &mut errors.0 {
                if let Some(var) = from_env.get(&e.key) {
                    e.message
                        .push_str(&format!(" (value set by environment variable {var})"));
                }
            }
            errors
        })?;
        Ok(config)
    }

    /// Checks every rule serde's types cannot express; returns every problem found.
    pub fn validate(&self, file: &Path) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        let mut push = |key: String, value: Option<String>, message: String| {
            errors.push(ConfigError {
                file: file.to_path_buf(),
                key,
                value,
                message,
            })
        };
        if !self.redis.url.starts_with("redis://") && !self.redis.url.starts_with("rediss://") {
            push(
                "redis.url".into(),
                quoted(&redact(&self.redis.url)),
                "expected a URL starting with redis:// or rediss://".into(),
            );
        }
        if !valid_name(&self.redis.namespace) {
            push(
                "redis.namespace".into(),
                quoted(&self.redis.namespace),
                NAME_RULE.into(),
            );
        }
        if self.redis.wait_replicas > 0 {
            let wait = self.redis.wait_timeout.get();
            let most = self.producer.lease_ttl.get() / 6;
            if wait.is_zero() || wait > most {
                push(
                    "redis.wait_timeout".into(),
                    quoted(&self.redis.wait_timeout.to_string()),
                    format!(
                        "expected more than 0 and at most a sixth of producer.lease_ttl ({}), \
                         so a lease renewal and its wait for replicas fit in the third of the \
                         TTL that a Redis command may take",
                        Dur(most)
                    ),
                );
            }
        }
        validate_kafka(&self.broker.kafka, &mut push);
        let rabbit = &self.broker.rabbitmq;
        if !rabbit.url.starts_with("amqp://") && !rabbit.url.starts_with("amqps://") {
            push(
                "broker.rabbitmq.url".into(),
                quoted(&redact(&rabbit.url)),
                "expected a URL starting with amqp:// or amqps://".into(),
            );
        } else {
            match rabbit.url.parse::<lapin::uri::AMQPUri>() {
                Err(e) => push(
                    "broker.rabbitmq.url".into(),
                    quoted(&redact(&rabbit.url)),
                    format!("expected a valid AMQP URL: {e}"),
                ),
                Ok(uri) => {
                    if let Some(fm) = uri.query.frame_max.filter(|fm| !FRAME_MAX.contains(fm)) {
                        push(
                            "broker.rabbitmq.url".into(),
                            quoted(&redact(&rabbit.url)),
                            format!("its frame_max = {fm}: {FRAME_MAX_RULE}"),
                        );
                    }
                }
            }
        }
        if !valid_name(&rabbit.queue) {
            push(
                "broker.rabbitmq.queue".into(),
                quoted(&rabbit.queue),
                NAME_RULE.into(),
            );
        }
        if !FRAME_MAX.contains(&rabbit.frame_max) {
            push(
                "broker.rabbitmq.frame_max".into(),
                Some(rabbit.frame_max.to_string()),
                FRAME_MAX_RULE.into(),
            );
        }
        if self.producer.lease_ttl.get() < std::time::Duration::from_millis(300) {
            push(
                "producer.lease_ttl".into(),
                quoted(&self.producer.lease_ttl.to_string()),
                "expected at least 300ms, so renewals (every third of it) have time to complete"
                    .into(),
            );
        }
        let threshold = self.producer.misfire_threshold.get();
        if !(MISFIRE_THRESHOLD_MIN..=MISFIRE_THRESHOLD_MAX).contains(&threshold) {
            push(
                "producer.misfire_threshold".into(),
                quoted(&self.producer.misfire_threshold.to_string()),
                format!(
                    "expected between {} and {}: a slot is always a little late when it \
                     fires, so less would count every slot missed, and a slot later than \
                     this is published as on time, outside the misfire policy and max_catchup",
                    Dur(MISFIRE_THRESHOLD_MIN),
                    Dur(MISFIRE_THRESHOLD_MAX)
                ),
            );
        }
        if self.worker.concurrency == 0 {
            push(
                "worker.concurrency".into(),
                Some("0".into()),
                "expected at least 1".into(),
            );
        }
        if self.worker.claim_ttl.get() < std::time::Duration::from_secs(1) {
            push(
                "worker.claim_ttl".into(),
                quoted(&self.worker.claim_ttl.to_string()),
                "expected at least 1s".into(),
            );
        }
        validate_retry("worker.retry", &self.worker.retry, &mut push);
        for (name, s) in &self.schedules {
            if !valid_name(name) {
                push(
                    key_path(&["schedule".into(), name.clone()]),
                    None,
                    NAME_RULE.into(),
                );
            }
            if let Err(e) = s.build(name) {
                push(e.key, e.value, e.message);
            }
            if !self.tasks.contains_key(&s.task) {
                let known: Vec<&str> = self.tasks.keys().map(String::as_str).collect();
                push(
                    schedule_key(name, "task"),
                    quoted(&s.task),
                    format!(
                        "no handler is configured for this task; expected a [task.{}] section (configured tasks: {})",
                        s.task,
                        if known.is_empty() { "none".into() } else { known.join(", ") }
                    ),
                );
            }
        }
        for (name, t) in &self.tasks {
            if !valid_name(name) {
                push(
                    key_path(&["task".into(), name.clone()]),
                    None,
                    NAME_RULE.into(),
                );
            }
            let exec_only = !t.command.is_empty()
                || !t.env.is_empty()
                || t.workdir.is_some()
                || !t.permanent_exit_codes.is_empty();
            let http_only = t.url.is_some() || t.method.is_some() || !t.headers.is_empty();
            if t.handler != HandlerKind::Exec && exec_only {
                push(
                    task_key(name, "handler"),
                    quoted(t.handler.as_str()),
                    "command, env, workdir and permanent_exit_codes apply only to handler = \"exec\"".into(),
                );
            }
            if t.handler != HandlerKind::Http && http_only {
                push(
                    task_key(name, "handler"),
                    quoted(t.handler.as_str()),
                    "url, method and headers apply only to handler = \"http\"".into(),
                );
            }
            if t.concurrency == Some(0) {
                push(
                    task_key(name, "concurrency"),
                    Some("0".into()),
                    "expected at least 1 (leave it out for no per-task limit)".into(),
                );
            }
            match t.handler {
                HandlerKind::Exec => {
                    if t.command.is_empty() || t.command[0].is_empty() {
                        push(
                            task_key(name, "command"),
                            Some(format!("{:?}", t.command)),
                            "an exec handler needs a program, e.g. command = [\"/usr/bin/env\", \"my-job\"]".into(),
                        );
                    }
                    if let Some(dir) = &t.workdir {
                        if !dir.is_dir() {
                            push(
                                task_key(name, "workdir"),
                                quoted(&dir.display().to_string()),
                                "expected an existing directory".into(),
                            );
                        }
                    }
                }
                HandlerKind::Rust => {}
                HandlerKind::Http => validate_http(name, t, &mut push),
            }
            if let Some(timeout) = t.timeout {
                if timeout.get().is_zero() {
                    push(
                        task_key(name, "timeout"),
                        quoted("0s"),
                        "expected more than zero".into(),
                    );
                }
            }
            // Only a task that overrides the retry policy can add new problems to it.
            if t.retry != RetryOverride::default() {
                let policy = t.retry.over(self.worker.retry);
                validate_retry(&task_key(name, "retry"), &policy, &mut push);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// The built schedules, by name. Only call on a validated config.
    pub fn built_schedules(&self) -> Result<Vec<BuiltSchedule>, ScheduleError> {
        self.schedules.iter().map(|(n, s)| s.build(n)).collect()
    }

    /// The timeout of one attempt of `task`.
    pub fn task_timeout(&self, task: &str) -> std::time::Duration {
        self.tasks
            .get(task)
            .and_then(|t| t.timeout)
            .unwrap_or(self.worker.default_timeout)
            .get()
    }

    /// The worker's advisories that do not stop the config from loading: task timeouts at
    /// or above RabbitMQ's default `consumer_timeout` (the broker would close
    /// the channel of a worker still holding such a task's delivery).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.broker.kind != BrokerKind::Rabbitmq {
            return out;
        }
        let limit = RABBITMQ_DEFAULT_CONSUMER_TIMEOUT;
        let explain = "RabbitMQ's default consumer_timeout (30m): a delivery held unacked that long makes \
             the broker close the worker's channel, so this task's message and every other in-flight \
             delivery on it are redelivered while the task still runs (the claim keeps it from running \
             twice, but the acks are lost); keep task timeouts below the broker's consumer_timeout, or \
             raise consumer_timeout on the broker";
        if self.worker.default_timeout.get() >= limit
            && self.tasks.values().any(|t| t.timeout.is_none())
        {
            out.push(format!(
                "warning: worker.default_timeout = \"{}\" (used by tasks without their own timeout) is at or above {explain}",
                self.worker.default_timeout
            ));
        }
        for (name, t) in &self.tasks {
            if let Some(timeout) = t.timeout.filter(|d| d.get() >= limit) {
                out.push(format!(
                    "warning: {} = \"{timeout}\" is at or above {explain}",
                    task_key(name, "timeout")
                ));
            }
        }
        out
    }

    /// The producer's advisories: one per schedule with no slot left (its
    /// cron year or ISO repetition count is over), which stays loaded and
    /// publishes nothing. ([`Config::warnings`] are the worker's.)
    pub fn schedule_warnings(&self) -> Vec<String> {
        let now = Utc::now();
        self.schedules
            .iter()
            .filter_map(|(name, s)| {
                let built = s.build(name).ok()?;
                built.schedule.next_after(now).is_none().then(|| {
                    format!(
                        "warning: {} has no slot after now (its last one has passed); it publishes nothing more",
                        key_path(&["schedule".into(), name.clone()])
                    )
                })
            })
            .collect()
    }

    /// The per-task concurrency limit of `task`, if it has one.
    pub fn task_concurrency(&self, task: &str) -> Option<u16> {
        self.tasks.get(task).and_then(|t| t.concurrency)
    }

    /// The retry policy of `task`.
    pub fn retry_policy(&self, task: &str) -> RetryPolicy {
        self.tasks
            .get(task)
            .map(|t| t.retry.over(self.worker.retry))
            .unwrap_or(self.worker.retry)
    }
}

const NAME_RULE: &str = "expected 1 to 200 characters from letters, digits, '-', '_', '.' and ':'";

/// Whether `s` is usable as a schedule, task, queue or namespace name.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
}

impl HandlerKind {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            HandlerKind::Exec => "exec",
            HandlerKind::Rust => "rust",
            HandlerKind::Http => "http",
        }
    }
}

/// Rules of `handler = "http"` tasks: a usable http(s) URL, a known method,
/// header names and values HTTP can carry.
fn validate_http(
    name: &str,
    t: &TaskConfig,
    push: &mut impl FnMut(String, Option<String>, String),
) {
    match &t.url {
        None => push(
            task_key(name, "url"),
            None,
            "an http handler needs a URL, e.g. url = \"https://example.com/hook\"".into(),
        ),
        Some(url) => {
            let rest = url
                .strip_prefix("http://")
                .or_else(|| url.strip_prefix("https://"));
            let host = rest.map(|r| r.split(['/', '?', '#']).next().unwrap_or_default());
            let usable = host.is_some_and(|h| {
                !h.is_empty() && !h.starts_with(':') && !h.chars().any(char::is_whitespace)
            }) && !url.chars().any(char::is_whitespace);
            if !usable {
                push(
                    task_key(name, "url"),
                    quoted(url),
                    "expected an absolute URL starting with http:// or https:// and naming a host"
                        .into(),
                );
            }
        }
    }
    if let Some(method) = &t.method {
        if !HTTP_METHODS.contains(&method.as_str()) {
            push(
                task_key(name, "method"),
                quoted(method),
                format!("expected one of {}", HTTP_METHODS.join(", ")),
            );
        }
    }
    for (header, value) in &t.headers {
        let name_ok = !header.is_empty()
            && header
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
        if !name_ok {
            push(
                format!("{}.{header}", task_key(name, "headers")),
                None,
                "expected a header name of letters, digits and !#$%&'*+-.^_`|~".into(),
            );
        }
        if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
            push(
                format!("{}.{header}", task_key(name, "headers")),
                quoted(value),
                "expected a header value without line breaks".into(),
            );
        }
    }
}

fn validate_retry(
    key: &str,
    p: &RetryPolicy,
    push: &mut impl FnMut(String, Option<String>, String),
) {
    if p.max_attempts == 0 {
        push(
            format!("{key}.max_attempts"),
            Some("0".into()),
            "expected at least 1".into(),
        );
    }
    if !(p.multiplier >= 1.0 && p.multiplier <= 100.0) {
        push(
            format!("{key}.multiplier"),
            Some(p.multiplier.to_string()),
            "expected a number from 1 to 100".into(),
        );
    }
    if !(0.0..=1.0).contains(&p.jitter) {
        push(
            format!("{key}.jitter"),
            Some(p.jitter.to_string()),
            "expected a fraction from 0 to 1".into(),
        );
    }
    if p.initial_delay.get() < std::time::Duration::from_millis(10) {
        push(
            format!("{key}.initial_delay"),
            quoted(&p.initial_delay.to_string()),
            "expected at least 10ms".into(),
        );
    }
    if p.max_delay < p.initial_delay {
        push(
            format!("{key}.max_delay"),
            quoted(&p.max_delay.to_string()),
            format!("expected at least initial_delay ({})", p.initial_delay),
        );
    }
}

/// Sets the key at `segments` in `table` from an environment value. Segments
/// match existing keys case-insensitively, otherwise they are lower-cased.
/// The value is read as TOML (numbers, booleans, arrays) or else as a string.
/// Returns the key path as set.
fn apply_env(table: &mut toml::Table, segments: &[String], raw: &str) -> Vec<String> {
    let mut path = Vec::new();
    let mut cur = table;
    for (i, seg) in segments.iter().enumerate() {
        let key = cur
            .keys()
            .find(|k| k.eq_ignore_ascii_case(seg))
            .cloned()
            .unwrap_or_else(|| seg.to_ascii_lowercase());
        path.push(key.clone());
        if i + 1 == segments.len() {
            let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(raw.to_string()));
            cur.insert(key, value);
            break;
        }
        let entry = cur
            .entry(key)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        match entry {
            toml::Value::Table(t) => cur = t,
            _ => break,
        }
    }
    path
}

/// A schedule ready to run: parsed timing plus what to publish.
#[derive(Debug, Clone)]
pub struct BuiltSchedule {
    /// Schedule name.
    pub name: String,
    /// When it fires.
    pub schedule: Schedule,
    /// Timezone name as configured (for status output).
    pub timezone: String,
    /// Task to publish.
    pub task: String,
    /// Payload to publish.
    pub payload: serde_json::Value,
    /// Misfire policy.
    pub misfire: MisfirePolicy,
    /// How far back the policy looks.
    pub catchup_window: std::time::Duration,
    /// Cap of slots `fire_all` publishes.
    pub max_catchup: u32,
    /// Paused when false.
    pub enabled: bool,
}

/// A schedule definition that does not build, with the key at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}{}: {message}", value.as_ref().map(|v| format!(" = {v}")).unwrap_or_default())]
pub struct ScheduleError {
    /// Key path such as `schedule "x".cron`.
    pub key: String,
    /// The value at fault.
    pub value: Option<String>,
    /// What was expected.
    pub message: String,
}

impl ScheduleConfig {
    /// Parses and checks this schedule definition (used for config files and
    /// for schedules added at runtime alike).
    pub fn build(&self, name: &str) -> Result<BuiltSchedule, ScheduleError> {
        let fail = |field: &str, value: Option<String>, message: String| ScheduleError {
            key: schedule_key(name, field),
            value,
            message,
        };
        let tz_name = self.timezone.clone().unwrap_or_else(|| "UTC".into());
        let tz: Tz = schedule::parse_timezone(&tz_name)
            .map_err(|m| fail("timezone", quoted(&tz_name), m))?;
        let kinds = [
            self.cron.is_some(),
            self.every.is_some(),
            self.iso.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if kinds != 1 {
            return Err(fail(
                "cron",
                None,
                format!("expected exactly one of `cron`, `every` or `iso`, found {kinds}"),
            ));
        }
        if self.anchor.is_some() && self.every.is_none() {
            return Err(fail(
                "anchor",
                self.anchor.clone(),
                "`anchor` applies only to `every` schedules".into(),
            ));
        }
        let built = if let Some(expr) = &self.cron {
            Schedule::cron(expr, tz).map_err(|m| fail("cron", quoted(expr), m))?
        } else if let Some(every) = &self.every {
            let period = crate::duration::parse_duration(every)
                .map_err(|m| fail("every", quoted(every), m))?;
            let anchor = match &self.anchor {
                Some(a) => DateTime::parse_from_rfc3339(a)
                    .map_err(|e| {
                        fail(
                            "anchor",
                            quoted(a),
                            format!(
                                "{e}; expected an RFC 3339 instant such as 2026-01-01T00:00:00Z"
                            ),
                        )
                    })?
                    .with_timezone(&Utc),
                None => schedule::epoch(),
            };
            Schedule::every(period, anchor).map_err(|m| {
                // The interval or the anchor: name the one at fault.
                match (&self.anchor, m.starts_with("anchor")) {
                    (Some(a), true) => fail("anchor", quoted(a), m),
                    _ => fail("every", quoted(every), m),
                }
            })?
        } else {
            let iso = self.iso.as_deref().unwrap_or_default();
            if self.timezone.is_some() {
                return Err(fail(
                    "timezone",
                    quoted(&tz_name),
                    "ISO 8601 schedules carry their own UTC offset in the start instant; remove `timezone`".into(),
                ));
            }
            Schedule::Iso(schedule::parse_iso_repeat(iso).map_err(|m| fail("iso", quoted(iso), m))?)
        };
        // A schedule may have ended (a cron year, an ISO count): it plans
        // nothing more, and `Config::warnings` says so. A cron that matches no
        // time at all (`0 0 0 30 2 *`) is a mistake.
        if let Some(expr) = &self.cron {
            if built.next_after(schedule::epoch()).is_none() {
                return Err(fail(
                    "cron",
                    quoted(expr),
                    "the expression matches no time at all; expected one that fires".into(),
                ));
            }
        }
        if !valid_name(&self.task) {
            return Err(fail("task", quoted(&self.task), NAME_RULE.into()));
        }
        if let Some(w) = self.catchup_window {
            if w.get().is_zero() {
                return Err(fail(
                    "catchup_window",
                    quoted("0s"),
                    "expected more than zero".into(),
                ));
            }
        }
        if self.max_catchup == Some(0) {
            return Err(fail(
                "max_catchup",
                Some("0".into()),
                "expected at least 1".into(),
            ));
        }
        Ok(BuiltSchedule {
            name: name.to_string(),
            schedule: built,
            timezone: tz_name,
            task: self.task.clone(),
            payload: self.payload.clone().unwrap_or(serde_json::Value::Null),
            misfire: self.misfire,
            catchup_window: self.catchup_window.unwrap_or(DEFAULT_CATCHUP_WINDOW).get(),
            max_catchup: self.max_catchup.unwrap_or(DEFAULT_MAX_CATCHUP),
            enabled: self.enabled,
        })
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod kafka_tests;
