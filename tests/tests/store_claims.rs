//! The idempotency claim against the real Redis: what counts as an attempt.
//! A claim that is taken counts one (crashed attempts included, since the
//! count happens before anything runs); a duplicate that finds the key busy
//! or finished counts none.

use std::time::Duration;

use cronpipe_shared::store::{Claim, Outcome, Store};

const TTL: Duration = Duration::from_secs(30);
const KEEP: Duration = Duration::from_secs(600);

async fn store() -> Store {
    cronpipe_tests::scratch_store("claims").await
}

#[tokio::test]
async fn only_taken_claims_count_attempts() {
    let s = store().await;
    let key = "task-1";
    assert_eq!(
        s.claim(key, "w1", TTL, KEEP).await.unwrap(),
        Claim::Claimed { attempt: 1 }
    );
    // A duplicate while w1 runs: deferred, and no attempt spent.
    assert!(matches!(
        s.claim(key, "w2", TTL, KEEP).await.unwrap(),
        Claim::Busy { ref owner, ttl } if owner == "running:w1" && ttl > Duration::ZERO && ttl <= TTL
    ));
    // w1 fails and gives the key back (its retry copy is queued).
    assert!(s.finish(key, "w1", Outcome::Release, KEEP).await.unwrap());
    assert_eq!(
        s.claim(key, "w2", TTL, KEEP).await.unwrap(),
        Claim::Claimed { attempt: 2 }
    );
    assert!(s.finish(key, "w2", Outcome::Done, KEEP).await.unwrap());
    // Finished: duplicates are skipped and count nothing.
    assert_eq!(s.claim(key, "w3", TTL, KEEP).await.unwrap(), Claim::Done);
    s.reset_key(key).await.unwrap();
    // After a reset (a dead-letter replay) the count starts again.
    assert_eq!(
        s.claim(key, "w3", TTL, KEEP).await.unwrap(),
        Claim::Claimed { attempt: 1 }
    );
    s.reset_key(key).await.unwrap();
}

#[tokio::test]
async fn a_claim_whose_worker_died_counts_when_the_next_worker_takes_it() {
    let s = store().await;
    let key = "task-crash";
    let short = Duration::from_millis(200);
    assert_eq!(
        s.claim(key, "w1", short, KEEP).await.unwrap(),
        Claim::Claimed { attempt: 1 }
    );
    // w1 dies mid-task: nothing releases the key; its lease runs out.
    let mut next = s.claim(key, "w2", TTL, KEEP).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while matches!(next, Claim::Busy { .. }) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        next = s.claim(key, "w2", TTL, KEEP).await.unwrap();
    }
    assert_eq!(
        next,
        Claim::Claimed { attempt: 2 },
        "the crashed attempt counted"
    );
    s.reset_key(key).await.unwrap();
}
