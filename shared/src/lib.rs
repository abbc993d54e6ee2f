//! cronpipe's shared library: everything the producer and the worker agree on.
//!
//! - [`envelope`]: the versioned task message (public contract, JSON Schema in `docs/`).
//! - [`connect`]: startup connections to Redis and the broker, with backoff.
//! - [`cli`]: config loading and tool runner shared by both binaries.
//! - [`config`]: the TOML config, environment overrides and validation.
//! - [`schedule`]: cron / interval / ISO 8601 slot computation with DST rules.
//! - [`duration`]: `"30s"`-style durations in config.
//! - [`keys`]: every Redis key name.
//! - [`memory`]: returning freed heap pages to the OS after big bursts.
//! - [`store`]: Redis operations (lease, watermarks, idempotency claims), atomic (Lua scripts or single commands).
//! - `redis_conn`: the connection under the store, which follows a Redis failover (reconnects on `READONLY`).
//! - [`broker`]: the broker abstraction and its RabbitMQ and Kafka adapters.
//! - [`deadletter`]: the dead-letter record.
//! - [`backoff`]: retry delays for failed tasks.
//! - [`telemetry`]: logging setup.
//! - [`ops`]: the `/metrics`, `/healthz` and `/readyz` HTTP endpoint.

pub mod backoff;
pub mod broker;
pub mod cli;
pub mod config;
pub mod connect;
pub mod deadletter;
pub mod duration;
pub mod envelope;
pub mod keys;
pub mod memory;
pub mod ops;
mod redis_conn;
pub mod schedule;
pub mod store;
pub mod telemetry;

pub use broker::{Broker, BrokerError, Consumer, Delivery, Destination};
pub use config::Config;
pub use connect::redact;
pub use envelope::Envelope;
pub use store::Store;
