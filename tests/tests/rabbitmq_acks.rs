//! RabbitMQ acks are coalesced: a run of finished deliveries at the low end
//! of the channel's unsettled tags goes as one `multiple` ack. These tests
//! check that such an ack never covers a delivery that is not finished: a
//! delivery left unsettled, or requeued, between finished ones comes back,
//! and every finished one is gone.

use std::time::Duration;

use cronpipe_shared::broker::Consumer;
use cronpipe_shared::broker::Destination;
use cronpipe_shared::{Broker, Delivery, Envelope};
use cronpipe_tests::TestEnv;
use futures::future::join_all;

/// Publishes `n` envelopes, consumes them all on a connection of its own
/// (prefetch `n`) and returns that connection, the consumer (its acks are
/// coalesced while it lives) and the deliveries, in the
/// order received, which is delivery-tag order.
async fn receive_all(env: &TestEnv, n: usize) -> (Broker, Consumer, Vec<(Delivery, Envelope)>) {
    let envs: Vec<Envelope> = (0..n)
        .map(|i| Envelope::new("t", serde_json::json!(i)))
        .collect();
    for r in env.broker.publish_batch(&envs).await {
        r.expect("publish");
    }
    let broker = Broker::connect(&env.broker_config(), "acks-test")
        .await
        .expect("connect");
    let mut consumer = broker
        .consume(n as u16, "acks-test", Duration::ZERO)
        .await
        .expect("consume");
    let mut got = Vec::new();
    for _ in 0..n {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("a delivery in time")
            .expect("a delivery");
        let e = Envelope::decode(d.body()).expect("envelope");
        got.push((d, e));
    }
    (broker, consumer, got)
}

#[tokio::test]
async fn acks_above_an_unfinished_delivery_leave_it_unacked() {
    let env = TestEnv::new("acks-gap").await;
    let (broker, _consumer, mut got) = receive_all(&env, 10).await;
    // Tag 1 stays unfinished: nothing may form a run, every ack goes alone.
    let (first, first_env) = got.remove(0);
    let acked = join_all(got.into_iter().map(|(d, _)| d.ack())).await;
    assert!(acked.iter().all(Result::is_ok), "acks sent: {acked:?}");
    drop(first);
    broker.close().await;
    let left = env.drain_envelopes().await;
    let ids: Vec<&str> = left.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(
        ids,
        vec![first_env.id.as_str()],
        "only the unfinished delivery is back in the queue"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_run_of_acks_stops_at_unfinished_and_requeued_deliveries() {
    let env = TestEnv::new("acks-run").await;
    let (broker, _consumer, got) = receive_all(&env, 12).await;
    // Tags 1-3 finished (a run), 4 unfinished, 5-6 finished, 7 requeued,
    // 8-12 finished; all settled at once, in any order the tasks run.
    let mut held = None;
    let mut expect_back = Vec::new();
    let mut settles = Vec::new();
    for (i, (d, e)) in got.into_iter().enumerate() {
        match i {
            3 => {
                expect_back.push(e.id.clone());
                held = Some(d);
            }
            6 => {
                expect_back.push(e.id.clone());
                settles.push(tokio::spawn(d.requeue()));
            }
            _ => settles.push(tokio::spawn(d.ack())),
        }
    }
    for s in settles {
        s.await.expect("join").expect("settled");
    }
    // The requeued delivery may already be back with this consumer (unacked,
    // prefetch allows it); closing the connection returns it with the held one.
    drop(held);
    broker.close().await;
    let mut back: Vec<String> = env
        .drain(Destination::Work)
        .await
        .iter()
        .map(|b| Envelope::decode(b).expect("envelope").id)
        .collect();
    back.sort();
    expect_back.sort();
    assert_eq!(
        back, expect_back,
        "exactly the unfinished and the requeued deliveries are back"
    );
    env.cleanup().await;
}
