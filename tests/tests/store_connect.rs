//! Connecting to Redis: a failure names the configured URL, with its password hidden.

use std::time::Duration;

use cronpipe_shared::store::Store;

#[tokio::test]
async fn a_failed_connection_names_the_url_without_its_password() {
    // Nothing listens on port 1.
    let Err(e) = Store::connect(
        "redis://:hunter2@127.0.0.1:1/0",
        "cptest-connect",
        Duration::from_secs(1),
    )
    .await
    else {
        panic!("connected to a port nothing listens on");
    };
    let text = e.to_string();
    assert!(
        text.contains("connecting to Redis at redis://:***@127.0.0.1:1/0"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");
    assert!(
        e.is_transient(),
        "a Redis that does not answer may answer later"
    );
}
