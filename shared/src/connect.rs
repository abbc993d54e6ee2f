//! Startup connections shared by both binaries: Redis and the broker, each
//! retried with exponential backoff and jitter (100 ms doubling to 5 s, without
//! end) until it answers or shutdown is requested. A broker setup conflict
//! (for example a queue of another type) is not retried: it needs a fix.
//! Operator tools connect once ([`tool_store`]). URLs in logs and errors go
//! through [`redact`].

use std::time::Duration;

use backon::BackoffBuilder;
use tokio_util::sync::CancellationToken;

use crate::store::StoreError;
use crate::{Broker, BrokerError, Config, Store};

/// Hides the password of a URL (broker or Redis) for logs and errors.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Connects to Redis as `[redis]` says (URL, namespace, replicas to wait
/// for), commands bounded by `response_timeout`.
async fn store(config: &Config, response_timeout: Duration) -> Result<Store, StoreError> {
    let redis = &config.redis;
    Ok(
        Store::connect(&redis.url, &redis.namespace, response_timeout)
            .await?
            .with_replica_wait(redis.wait_replicas, redis.wait_timeout.get()),
    )
}

/// Connects an operator tool to Redis, once (commands bounded by 5 s).
pub async fn tool_store(config: &Config) -> Result<Store, StoreError> {
    store(config, Duration::from_secs(5)).await
}

/// Exponential backoff with jitter, 100 ms to 5 s, without end.
pub fn backoff_forever() -> impl Iterator<Item = Duration> {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Connects to Redis (commands bounded by `response_timeout`) and the broker
/// (as client `name`). `Ok(None)` when `shutdown` came first.
pub async fn connect_all(
    config: &Config,
    name: &str,
    response_timeout: Duration,
    shutdown: &CancellationToken,
) -> Result<Option<(Store, Broker)>, BrokerError> {
    let mut delays = backoff_forever();
    let store = loop {
        match store(config, response_timeout).await {
            Ok(s) => break s,
            Err(e) => {
                let d = delays.next().unwrap_or(Duration::from_secs(5));
                tracing::warn!(error = %e, retry_in_ms = d.as_millis() as u64, "Redis unavailable at startup");
                tokio::select! { _ = shutdown.cancelled() => return Ok(None), _ = tokio::time::sleep(d) => {} }
            }
        }
    };
    let mut delays = backoff_forever();
    let broker = loop {
        match Broker::connect(&config.broker, name).await {
            Ok(b) => break b,
            Err(e) if e.is_transient() => {
                let d = delays.next().unwrap_or(Duration::from_secs(5));
                tracing::warn!(error = %e, retry_in_ms = d.as_millis() as u64, "Broker unavailable at startup");
                tokio::select! { _ = shutdown.cancelled() => return Ok(None), _ = tokio::time::sleep(d) => {} }
            }
            Err(e) => return Err(e),
        }
    };
    Ok(Some((store, broker)))
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(
            redact("redis://:secret@cache:6379/0"),
            "redis://:***@cache:6379/0"
        );
        assert_eq!(redact("amqp://host"), "amqp://host");
    }
}
