//! The Redis connection behind every [`Store`](crate::Store) operation: it
//! follows a failover.
//!
//! redis-rs's `ConnectionManager` reconnects when its socket breaks, but not
//! when the server at the other end is demoted to a replica (Sentinel, a
//! managed Redis, a DNS name or Service moved to the new primary). That socket
//! stays up and every write on it is answered `READONLY`, for good: a producer
//! on it could never renew or take the lease again, a worker never claim a
//! task. [`Conn`] watches replies for `READONLY` and then replaces the manager
//! with a new one, which resolves the URL again and so reaches whatever serves
//! it now. The calls that saw `READONLY` still fail; their callers retry them
//! as they retry any Redis error. [`Store::ping`](crate::Store::ping) (the
//! readiness check) does the same when `ROLE` says the server is a replica.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, ServerErrorKind, Value};

/// Least time between two replacements, so a URL that still leads to the
/// demoted server is not redialled in a tight loop.
const MIN_REBUILD_INTERVAL: Duration = Duration::from_secs(1);

/// One connection manager shared by every clone of a store, and what it takes
/// to make the next one.
pub(crate) struct Shared {
    /// The manager in use and its generation (bumped on each replacement).
    current: RwLock<(u64, ConnectionManager)>,
    rebuilding: AtomicBool,
    client: redis::Client,
    config: ConnectionManagerConfig,
    /// The URL with its password hidden, for logs.
    url: String,
}

impl Shared {
    pub(crate) fn new(
        manager: ConnectionManager,
        client: redis::Client,
        config: ConnectionManagerConfig,
        url: String,
    ) -> Arc<Self> {
        Arc::new(Shared {
            current: RwLock::new((0, manager)),
            rebuilding: AtomicBool::new(false),
            client,
            config,
            url,
        })
    }

    /// A handle on the current manager.
    pub(crate) fn conn(self: &Arc<Self>) -> Conn {
        let (generation, manager) = {
            let current = self.current.read().unwrap_or_else(|e| e.into_inner());
            (current.0, current.1.clone())
        };
        Conn {
            generation,
            manager,
            shared: self.clone(),
        }
    }

    /// The URL, password hidden.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// Replaces generation `seen` with a fresh manager, in the background,
    /// unless that was done already or is under way. `reason` says why, for
    /// the log and the metric's label.
    fn replace(self: &Arc<Self>, seen: u64, reason: Reason) {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner()).0;
        if current != seen || self.rebuilding.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.rebuilding.store(false, Ordering::Release);
            return;
        };
        match &reason {
            Reason::ReadOnly => tracing::warn!(
                redis = %self.url,
                "Redis answered READONLY: the server behind this connection is a replica now (a failover?); reconnecting to reach the primary"
            ),
            Reason::Role(role) => tracing::warn!(
                redis = %self.url,
                role = %role,
                "Redis reports it is not the primary (a failover?); reconnecting to reach the primary"
            ),
        }
        let label = match reason {
            Reason::ReadOnly => "readonly",
            Reason::Role(_) => "role",
        };
        metrics::counter!("cronpipe_redis_reconnects_total", "reason" => label).increment(1);
        let shared = self.clone();
        runtime.spawn(async move {
            let started = tokio::time::Instant::now();
            match shared
                .client
                .get_connection_manager_with_config(shared.config.clone())
                .await
            {
                Ok(manager) => {
                    let mut current = shared.current.write().unwrap_or_else(|e| e.into_inner());
                    if current.0 == seen {
                        *current = (seen + 1, manager);
                    }
                }
                Err(error) => tracing::warn!(
                    redis = %shared.url,
                    %error,
                    "Could not reconnect to Redis after READONLY; will try again on the next READONLY"
                ),
            }
            tokio::time::sleep_until(started + MIN_REBUILD_INTERVAL).await;
            shared.rebuilding.store(false, Ordering::Release);
        });
    }
}

/// Why a manager is replaced.
enum Reason {
    /// A write was refused `READONLY`.
    ReadOnly,
    /// `ROLE` named this role, not `master`.
    Role(String),
}

/// A connection to Redis for one or more commands: redis-rs's connection
/// manager, plus the watch for `READONLY`. Cheap to clone.
#[derive(Clone)]
pub struct Conn {
    generation: u64,
    manager: ConnectionManager,
    shared: Arc<Shared>,
}

impl Conn {
    /// Replaces the manager if `error` is a `READONLY` refusal; says whether it was.
    fn watch(&self, error: &RedisError) -> bool {
        let readonly = is_readonly(error);
        if readonly {
            self.shared.replace(self.generation, Reason::ReadOnly);
        }
        readonly
    }

    /// Replaces the manager because the server reported `role` (not a primary).
    pub(crate) fn follow_failover(&self, role: &str) {
        self.shared
            .replace(self.generation, Reason::Role(role.to_string()));
    }

    /// [`Conn::watch`] for an error that arrived as a reply value (a command
    /// of a pipeline, or a single command's reply before conversion).
    fn watch_value(&self, value: &Value) -> bool {
        match value {
            Value::ServerError(e) => self.watch(&e.clone().into()),
            _ => false,
        }
    }
}

/// Whether Redis refused a write because it is a replica. Scripts report the
/// refusal of a write they attempted with the same code.
fn is_readonly(error: &RedisError) -> bool {
    error.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly) || error.code() == Some("READONLY")
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let result = self.manager.req_packed_command(cmd).await;
            match &result {
                Err(e) => self.watch(e),
                Ok(value) => self.watch_value(value),
            };
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let result = self
                .manager
                .req_packed_commands(pipeline, offset, count)
                .await;
            match &result {
                Err(e) => self.watch(e),
                Ok(values) => values.iter().any(|v| self.watch_value(v)),
            };
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.manager.get_db()
    }
}
