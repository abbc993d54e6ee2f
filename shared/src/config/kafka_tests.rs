//! Config tests of `[broker.kafka]`: defaults, one test per validation rule
//! (each error names the file, the key path, the bad value and what was
//! expected), property pass-through and redaction of secrets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

const FILE: &str = "cronpipe.toml";

fn parse(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
    Config::parse(
        Path::new(FILE),
        text,
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
}

fn only_error(text: &str) -> ConfigError {
    let errs = parse(text, &[]).expect_err("expected a config error");
    assert_eq!(errs.0.len(), 1, "expected exactly one error, got:\n{errs}");
    errs.0.into_iter().next().unwrap()
}

fn check(e: &ConfigError, key: &str, bad: &str, expected: &[&str]) {
    let line = e.to_string();
    assert_eq!(e.key, key, "wrong key path in: {line}");
    assert!(line.starts_with(&format!("{FILE}: {key}")), "{line}");
    assert!(!line.contains('\n'), "one line: {line:?}");
    assert!(line.contains(bad), "should name {bad:?}: {line}");
    for fragment in expected {
        assert!(line.contains(fragment), "should say {fragment:?}: {line}");
    }
}

fn kafka(section: &str) -> String {
    format!("[broker]\nkind = \"kafka\"\n\n[broker.kafka]\n{section}\n")
}

#[test]
fn kafka_is_accepted_with_defaults() {
    let c = parse("[broker]\nkind = \"kafka\"\n", &[]).unwrap();
    assert_eq!(c.broker.kind, BrokerKind::Kafka);
    let k = &c.broker.kafka;
    assert_eq!(k.brokers, "127.0.0.1:9092");
    assert_eq!(k.topic, "cronpipe.tasks");
    assert_eq!(k.retry_topic(), "cronpipe.tasks.retry");
    assert_eq!(k.dlq_topic(), "cronpipe.tasks.dlq");
    assert_eq!(k.group_id, "cronpipe-workers");
    assert_eq!(k.partitions, 6);
    assert_eq!(k.replication_factor, 1);
    assert!(k.create_topics);
    assert!(k.properties.0.is_empty());
}

#[test]
fn kafka_section_is_read_and_properties_pass_through() {
    let c = parse(
        &kafka(
            r#"brokers = "k1:9092, k2:19092"
topic = "jobs"
group_id = "g1"
partitions = 12
replication_factor = 3
create_topics = false

[broker.kafka.properties]
"security.protocol" = "SASL_SSL"
"sasl.mechanism" = "PLAIN"
"sasl.username" = "svc"
"sasl.password" = "hunter2"
"session.timeout.ms" = 6000
"ssl.endpoint.identification.algorithm" = "https"
"#,
        ),
        &[],
    )
    .unwrap();
    let k = &c.broker.kafka;
    assert_eq!(k.topic, "jobs");
    assert_eq!(k.partitions, 12);
    assert!(!k.create_topics);
    let props: Vec<(&str, String)> = k.properties.iter().collect();
    assert!(props.contains(&("session.timeout.ms", "6000".into())));
    assert!(props.contains(&("sasl.password", "hunter2".into())));
    assert!(props.contains(&("security.protocol", "SASL_SSL".into())));
}

#[test]
fn secret_properties_are_redacted_in_debug_output() {
    let c = parse(
        &kafka(
            "[broker.kafka.properties]\n\"sasl.password\" = \"hunter2\"\n\"sasl.jaas.config\" = \"x secret=y\"\n\"ssl.key.password\" = \"k\"\n\"sasl.username\" = \"svc\"\n",
        ),
        &[],
    )
    .unwrap();
    let printed = format!("{c:?}");
    assert!(!printed.contains("hunter2"), "{printed}");
    assert!(!printed.contains("secret=y"), "{printed}");
    assert!(printed.contains("***"), "{printed}");
    assert!(
        printed.contains("svc"),
        "non-secrets stay readable: {printed}"
    );
    let red = c.broker.kafka.properties.redacted();
    assert_eq!(red["sasl.password"], "***");
    assert_eq!(red["ssl.key.password"], "***");
    assert_eq!(red["sasl.username"], "svc");
}

#[test]
fn environment_overrides_reach_kafka_keys_and_properties() {
    let c = parse(
        "[broker]\nkind = \"rabbitmq\"\n",
        &[
            ("CRONPIPE__BROKER__KIND", "kafka"),
            ("CRONPIPE__BROKER__KAFKA__BROKERS", "kafka:9092"),
            (
                "CRONPIPE__BROKER__KAFKA__PROPERTIES__security.protocol",
                "SSL",
            ),
        ],
    )
    .unwrap();
    assert_eq!(c.broker.kind, BrokerKind::Kafka);
    assert_eq!(c.broker.kafka.brokers, "kafka:9092");
    assert_eq!(
        c.broker.kafka.properties.0["security.protocol"].to_string(),
        "SSL"
    );
}

#[test]
fn brokers_must_be_host_port_pairs() {
    for bad in ["", "kafka", "kafka:notaport", ":9092", "a:9092,,b:9092"] {
        let e = only_error(&kafka(&format!("brokers = {bad:?}")));
        check(
            &e,
            "broker.kafka.brokers",
            &format!("{bad:?}"),
            &["host:port", "expected bootstrap servers"],
        );
    }
}

#[test]
fn topic_must_be_a_kafka_topic_name() {
    for bad in ["", "has space", "a/b", ".."] {
        let e = only_error(&kafka(&format!("topic = {bad:?}")));
        check(
            &e,
            "broker.kafka.topic",
            &format!("{bad:?}"),
            &["expected 1 to 243 characters", ".retry"],
        );
    }
    let long = "t".repeat(244);
    let e = only_error(&kafka(&format!("topic = {long:?}")));
    assert_eq!(e.key, "broker.kafka.topic");
}

#[test]
fn group_id_must_not_be_empty() {
    let e = only_error(&kafka("group_id = \" \""));
    check(
        &e,
        "broker.kafka.group_id",
        "\" \"",
        &["non-empty consumer group"],
    );
}

#[test]
fn partitions_and_replication_must_be_positive() {
    let e = only_error(&kafka("partitions = 0"));
    check(&e, "broker.kafka.partitions", "0", &["expected 1 to 10000"]);
    let e = only_error(&kafka("replication_factor = 0"));
    check(
        &e,
        "broker.kafka.replication_factor",
        "0",
        &["expected 1 to 32767"],
    );
}

#[test]
fn delivery_timeout_must_be_in_librdkafka_range() {
    let e = only_error(&kafka("delivery_timeout = \"100ms\""));
    check(
        &e,
        "broker.kafka.delivery_timeout",
        "100ms",
        &["expected from 1s"],
    );
}

#[test]
fn managed_properties_are_rejected_with_the_key_to_use() {
    let e = only_error(&kafka(
        "[broker.kafka.properties]\n\"bootstrap.servers\" = \"x:1\"\n",
    ));
    check(
        &e,
        "broker.kafka.properties.\"bootstrap.servers\"",
        "\"x:1\"",
        &["broker.kafka.brokers", "expected it left out"],
    );
    let e = only_error(&kafka(
        "[broker.kafka.properties]\n\"enable.auto.commit\" = true\n",
    ));
    check(
        &e,
        "broker.kafka.properties.\"enable.auto.commit\"",
        "\"true\"",
        &["commits offsets itself", "expected it left out"],
    );
    let e = only_error(&kafka(
        "[broker.kafka.properties]\n\"enable.idempotence\" = false\n",
    ));
    assert!(e.to_string().contains("idempotent"), "{e}");
}

#[test]
fn unknown_kafka_keys_are_rejected() {
    let errs = parse(&kafka("bootstrap = \"x:1\""), &[]).expect_err("unknown key");
    let line = errs.to_string();
    assert!(line.contains("bootstrap"), "{line}");
}
