//! `[broker.kafka]`: how to reach a Kafka cluster, the topic names derived
//! from `topic`, and librdkafka settings passed through verbatim (TLS, SASL,
//! timeouts), with secrets redacted whenever the config is printed.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::duration::Dur;

/// `[broker.kafka]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port...]`.
    pub brokers: String,
    /// The work topic. Retry copies go to `<topic>.retry`, dead letters to `<topic>.dlq`.
    pub topic: String,
    /// Consumer group of the workers.
    pub group_id: String,
    /// Partitions of each topic cronpipe creates at startup (existing topics are left alone).
    pub partitions: i32,
    /// Replication factor of each topic cronpipe creates at startup.
    pub replication_factor: i32,
    /// Create the three topics at startup when they are missing (AdminClient).
    pub create_topics: bool,
    /// How long a publish may wait for its delivery report (librdkafka `message.timeout.ms`).
    pub delivery_timeout: Dur,
    /// librdkafka settings passed through verbatim to every client cronpipe
    /// creates, e.g. `"security.protocol" = "SASL_SSL"`. Values of secret
    /// settings are redacted when the config is printed.
    pub properties: KafkaProperties,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            topic: "cronpipe.tasks".into(),
            group_id: "cronpipe-workers".into(),
            partitions: 6,
            replication_factor: 1,
            create_topics: true,
            delivery_timeout: Dur::secs(30),
            properties: KafkaProperties::default(),
        }
    }
}

impl KafkaConfig {
    /// The retry topic: `<topic>.retry`.
    pub fn retry_topic(&self) -> String {
        format!("{}.retry", self.topic)
    }

    /// The dead-letter topic: `<topic>.dlq`.
    pub fn dlq_topic(&self) -> String {
        format!("{}.dlq", self.topic)
    }
}

/// One librdkafka setting's value as written in TOML (a string, number or boolean).
#[derive(Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum PropertyValue {
    /// A string, e.g. `"SASL_SSL"`.
    Str(String),
    /// An integer, e.g. `6000`.
    Int(i64),
    /// A boolean, e.g. `true`.
    Bool(bool),
    /// A float, e.g. `0.5`.
    Float(f64),
}

impl fmt::Display for PropertyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PropertyValue::Str(s) => f.write_str(s),
            PropertyValue::Int(i) => write!(f, "{i}"),
            PropertyValue::Bool(b) => write!(f, "{b}"),
            PropertyValue::Float(x) => write!(f, "{x}"),
        }
    }
}

impl fmt::Debug for PropertyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.to_string())
    }
}

/// librdkafka settings by name. `Debug` (and [`KafkaProperties::redacted`])
/// print the values of secret settings as `***`.
#[derive(Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct KafkaProperties(pub BTreeMap<String, PropertyValue>);

impl KafkaProperties {
    /// Whether the value of the setting `key` is a secret (passwords, keys, JAAS and OAuth configs).
    pub fn is_secret(key: &str) -> bool {
        let k = key.to_ascii_lowercase();
        [
            "password",
            "secret",
            "jaas",
            "ssl.key.pem",
            "oauthbearer.config",
            "token",
        ]
        .iter()
        .any(|s| k.contains(s))
    }

    /// The settings with secret values replaced by `***`, for logs.
    pub fn redacted(&self) -> BTreeMap<String, String> {
        self.0
            .iter()
            .map(|(k, v)| {
                let shown = if Self::is_secret(k) {
                    "***".to_string()
                } else {
                    v.to_string()
                };
                (k.clone(), shown)
            })
            .collect()
    }

    /// The settings as librdkafka strings.
    pub fn iter(&self) -> impl Iterator<Item = (&str, String)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.to_string()))
    }
}

impl fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.redacted()).finish()
    }
}

/// librdkafka settings cronpipe sets itself (from other keys, or fixed for its
/// guarantees); `[broker.kafka.properties]` may not override them.
pub const MANAGED_KAFKA_PROPERTIES: &[(&str, &str)] = &[
    ("bootstrap.servers", "set broker.kafka.brokers instead"),
    ("metadata.broker.list", "set broker.kafka.brokers instead"),
    ("group.id", "set broker.kafka.group_id instead"),
    (
        "message.timeout.ms",
        "set broker.kafka.delivery_timeout instead",
    ),
    (
        "delivery.timeout.ms",
        "set broker.kafka.delivery_timeout instead",
    ),
    (
        "enable.idempotence",
        "cronpipe always enables the idempotent producer",
    ),
    ("acks", "cronpipe always publishes with acks=all"),
    (
        "request.required.acks",
        "cronpipe always publishes with acks=all",
    ),
    (
        "enable.auto.commit",
        "cronpipe commits offsets itself, only once messages are settled",
    ),
    (
        "enable.auto.offset.store",
        "cronpipe commits offsets itself, only once messages are settled",
    ),
    (
        "transactional.id",
        "cronpipe does not use Kafka transactions",
    ),
];

/// Longest Kafka topic name.
const MAX_TOPIC_LEN: usize = 249;

/// Rules of `[broker.kafka]`.
pub(super) fn validate_kafka(
    k: &KafkaConfig,
    push: &mut impl FnMut(String, Option<String>, String),
) {
    let quoted = |v: &str| Some(format!("{v:?}"));
    let servers: Vec<&str> = k.brokers.split(',').map(str::trim).collect();
    let bad_server = servers.iter().find(|s| {
        let Some((host, port)) = s.rsplit_once(':') else {
            return true;
        };
        host.is_empty() || host.contains(char::is_whitespace) || port.parse::<u16>().is_err()
    });
    if let Some(bad) = bad_server {
        push(
            "broker.kafka.brokers".into(),
            quoted(&k.brokers),
            format!(
                "`{bad}` is not host:port; expected bootstrap servers such as \"kafka-1:9092,kafka-2:9092\""
            ),
        );
    }
    let longest_suffix = ".retry".len();
    let topic_ok = !k.topic.is_empty()
        && k.topic.len() + longest_suffix <= MAX_TOPIC_LEN
        && k.topic != "."
        && k.topic != ".."
        && k.topic
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !topic_ok {
        push(
            "broker.kafka.topic".into(),
            quoted(&k.topic),
            format!(
                "expected 1 to {} characters from letters, digits, '.', '_' and '-' \
                 (the topic plus \".retry\" must be a valid Kafka topic name)",
                MAX_TOPIC_LEN - longest_suffix
            ),
        );
    }
    if k.group_id.trim().is_empty() {
        push(
            "broker.kafka.group_id".into(),
            quoted(&k.group_id),
            "expected a non-empty consumer group id".into(),
        );
    }
    if !(1..=10_000).contains(&k.partitions) {
        push(
            "broker.kafka.partitions".into(),
            Some(k.partitions.to_string()),
            "expected 1 to 10000".into(),
        );
    }
    if !(1..=32_767).contains(&k.replication_factor) {
        push(
            "broker.kafka.replication_factor".into(),
            Some(k.replication_factor.to_string()),
            "expected 1 to 32767".into(),
        );
    }
    let timeout = k.delivery_timeout.get();
    if timeout < std::time::Duration::from_secs(1)
        || timeout > std::time::Duration::from_millis(i32::MAX as u64)
    {
        push(
            "broker.kafka.delivery_timeout".into(),
            quoted(&k.delivery_timeout.to_string()),
            "expected from 1s to 24d (librdkafka's message.timeout.ms range)".into(),
        );
    }
    for (key, value) in &k.properties.0 {
        let path = format!("broker.kafka.properties.\"{key}\"");
        let shown = if KafkaProperties::is_secret(key) {
            quoted("***")
        } else {
            quoted(&value.to_string())
        };
        if let Some((_, why)) = MANAGED_KAFKA_PROPERTIES
            .iter()
            .find(|(m, _)| m.eq_ignore_ascii_case(key))
        {
            push(
                path,
                shown,
                format!("cronpipe manages this setting ({why}); expected it left out"),
            );
        } else if key.is_empty() || key.contains(char::is_whitespace) {
            push(
                path,
                shown,
                "expected a librdkafka setting name such as \"security.protocol\"".into(),
            );
        }
    }
}
