//! Holder-checked writes against the real Redis: only the lease holder moves
//! or removes schedule watermarks, so a deposed producer that has not
//! noticed yet (working from an older config) cannot erase what the current
//! leader relies on; only the holder of the dead-letter tools' lock renews or
//! releases it. A malformed watermark stops nothing and is replaced.

use std::time::Duration;

use chrono::{TimeZone, Utc};
use cronpipe_shared::store::Store;

const TTL: Duration = Duration::from_secs(30);

async fn store() -> Store {
    cronpipe_tests::scratch_store("marks").await
}

/// Takes the free lease for `holder` and returns its full value.
async fn take_lease(s: &Store, holder: &str) -> String {
    let token = s
        .lease_acquire(holder, TTL)
        .await
        .expect("redis")
        .expect("the lease is free");
    format!("{token}:{holder}")
}

#[tokio::test]
async fn only_the_lease_holder_moves_or_removes_watermarks() {
    let s = store().await;
    let slot = Utc.timestamp_millis_opt(1_790_000_000_000).unwrap();
    let old = take_lease(&s, "producer-a").await;
    assert!(s
        .advance_watermarks(&old, &[("nightly", slot, ""), ("hourly", slot, "")])
        .await
        .unwrap());

    // producer-a is deposed: its lease ends and producer-b takes over.
    assert!(s.lease_release(&old).await.unwrap());
    let new = take_lease(&s, "producer-b").await;

    // producer-a, from an older config without `nightly`, tries to forget it.
    assert!(!s
        .remove_watermarks(&old, &["nightly".to_string()])
        .await
        .unwrap());
    assert!(!s
        .advance_watermarks(&old, &[("hourly", slot + chrono::Duration::hours(1), "")])
        .await
        .unwrap());
    let marks = s.watermarks().await.unwrap();
    assert_eq!(marks.get("nightly"), Some(&slot), "{marks:?}");
    assert_eq!(marks.get("hourly"), Some(&slot), "{marks:?}");

    // The holder can.
    assert!(s
        .remove_watermarks(&new, &["nightly".to_string()])
        .await
        .unwrap());
    let marks = s.watermarks().await.unwrap();
    assert_eq!(marks.get("nightly"), None, "{marks:?}");
    assert_eq!(marks.get("hourly"), Some(&slot), "{marks:?}");

    forget(&s).await;
}

/// Deletes what these tests write in `s`'s namespace.
async fn forget(s: &Store) {
    let keys = s.keys();
    let _: i64 = redis::cmd("DEL")
        .arg(keys.leader())
        .arg(keys.fencing())
        .arg(keys.watermarks())
        .arg(keys.timings())
        .query_async(&mut s.connection())
        .await
        .unwrap();
}

#[tokio::test]
async fn only_the_dlq_lock_holder_renews_or_releases_it() {
    let s = store().await;
    assert_eq!(s.dlq_lock("tool-a", TTL).await.unwrap(), Ok(()));
    let Err((holder, left)) = s.dlq_lock("tool-b", TTL).await.unwrap() else {
        panic!("a second holder took a held lock");
    };
    assert_eq!(holder, "tool-a");
    assert!(left > Duration::ZERO && left <= TTL, "{left:?}");
    assert!(!s.dlq_lock_renew("tool-b", TTL * 2).await.unwrap());
    assert!(!s.dlq_unlock("tool-b").await.unwrap());
    assert!(s.dlq_lock_renew("tool-a", TTL * 2).await.unwrap());
    let (_, left) = s.dlq_lock("tool-b", TTL).await.unwrap().unwrap_err();
    assert!(left > TTL, "renewed past the first ttl: {left:?}");
    assert!(s.dlq_unlock("tool-a").await.unwrap());
    assert_eq!(s.dlq_lock("tool-b", TTL).await.unwrap(), Ok(()));
    assert!(s.dlq_unlock("tool-b").await.unwrap());
}

/// A watermark field that is not milliseconds since the epoch (an operator's
/// `HSET … "2026-01-01T00:00:00Z"`) is left out, not an error for every
/// schedule, and the next advance replaces it.
#[tokio::test]
async fn a_malformed_watermark_is_ignored_and_replaced() {
    let s = store().await;
    let slot = Utc.timestamp_millis_opt(1_790_000_000_000).unwrap();
    let lease = take_lease(&s, "producer-a").await;
    assert!(s
        .advance_watermarks(&lease, &[("hourly", slot, "")])
        .await
        .unwrap());
    let mut c = s.connection();
    let _: i64 = redis::cmd("HSET")
        .arg(s.keys().watermarks())
        .arg("nightly")
        .arg("2026-01-01T00:00:00Z")
        .query_async(&mut c)
        .await
        .unwrap();
    let marks = s.watermarks().await.expect("the other watermarks are read");
    assert_eq!(marks.len(), 1, "{marks:?}");
    assert_eq!(marks.get("hourly"), Some(&slot));
    assert!(s
        .advance_watermarks(
            &lease,
            &[
                ("nightly", slot, "cron UTC 0 0 3 * * *"),
                ("hourly", slot + chrono::Duration::hours(1), "")
            ]
        )
        .await
        .expect("the advance script copes with the bad field"));
    let marks = s.watermarks().await.unwrap();
    assert_eq!(marks.get("nightly"), Some(&slot));
    // A timing is recorded with its watermark; an empty one leaves none.
    let timings = s.watermark_timings().await.unwrap();
    assert_eq!(
        timings.get("nightly").map(String::as_str),
        Some("cron UTC 0 0 3 * * *")
    );
    assert_eq!(timings.get("hourly"), None);
    assert_eq!(
        marks.get("hourly"),
        Some(&(slot + chrono::Duration::hours(1)))
    );
    forget(&s).await;
}
