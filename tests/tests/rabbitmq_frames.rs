//! `broker.rabbitmq.frame_max`: the client proposes it to RabbitMQ (it sizes
//! the client's I/O buffers, 32 frames each), and a message larger than one
//! frame still travels whole.

use std::time::Duration;

use cronpipe_shared::broker::rabbitmq::Rabbit;
use cronpipe_shared::config::RabbitConfig;
use cronpipe_shared::{Broker, Envelope};

/// `frame_max` of the RabbitMQ connection named `name` (its client-provided
/// `connection_name`), as the broker reports it.
fn negotiated_frame_max(name: &str) -> Option<u32> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "client_properties", "frame_max", "-q"])
        .output()
        .expect("rabbitmqctl");
    let tag = format!("{{\"connection_name\",\"{name}\"}}");
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let (props, frame) = l.rsplit_once('\t')?;
        props.contains(&tag).then(|| frame.trim().parse().ok())?
    })
}

async fn round_trip(frame_max: u32, url: String) -> (Option<u32>, Vec<u8>, Vec<u8>) {
    let id = format!("{:08x}", rand::random::<u32>());
    let name = format!("frames-test-{id}");
    let config = RabbitConfig {
        url,
        queue: format!("cronpipe.test.frames.{id}"),
        frame_max,
        ..RabbitConfig::default()
    };
    let rabbit = Rabbit::connect(&config, &name).await.expect("connect");
    let negotiated = negotiated_frame_max(&name);
    let broker = Broker::Rabbit(rabbit.clone());
    // 100 KB of payload: many frames at 8 KiB.
    let env = Envelope::new("big", serde_json::json!("x".repeat(100_000)));
    broker.publish(&env).await.expect("publish");
    let mut consumer = broker
        .consume(1, "frames", Duration::ZERO)
        .await
        .expect("consume");
    let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("delivery in time")
        .expect("a delivery");
    let got = d.body().to_vec();
    d.ack().await.expect("ack");
    drop(consumer);
    rabbit.delete_topology().await.expect("delete queues");
    rabbit.close().await;
    (negotiated, env.to_json(), got)
}

#[tokio::test]
async fn configured_frame_max_is_negotiated_and_large_messages_span_frames() {
    let (negotiated, sent, got) = round_trip(8192, cronpipe_tests::amqp_url()).await;
    assert_eq!(
        negotiated,
        Some(8192),
        "the broker reports the proposed frame_max"
    );
    assert!(sent.len() > 100_000);
    assert_eq!(
        got, sent,
        "a 100 KB message arrives whole across 8 KiB frames"
    );
}

#[tokio::test]
async fn a_frame_max_in_the_url_wins_over_the_config_key() {
    let url = format!("{}?frame_max=4096", cronpipe_tests::amqp_url());
    let (negotiated, sent, got) = round_trip(65_536, url).await;
    assert_eq!(negotiated, Some(4096));
    assert_eq!(got, sent);
}
