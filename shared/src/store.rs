//! Redis access: connection setup and the atomic operations cronpipe relies
//! on (leader lease, watermarks, idempotency claims). Check-and-set steps are
//! Lua scripts from `lua/` so they never race; the per-delivery claim and
//! success record are single atomic commands (`SET … NX GET`, `SET … GET`).

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use redis::{AsyncCommands, Script};

use crate::keys::Keys;
pub use crate::redis_conn::Conn;

/// A Redis failure. Redis errors are transient from cronpipe's point of view:
/// the operation can be tried again once Redis answers.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis refused or did not answer.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// No connection could be made to Redis at `url` (password hidden).
    #[error("connecting to Redis at {url}: {error}")]
    Connect {
        /// The configured URL, password hidden.
        url: String,
        /// What went wrong.
        error: redis::RedisError,
    },
    /// Redis answered with data this build cannot read.
    #[error("redis returned unexpected data: {0}")]
    Unexpected(String),
    /// The server behind the connection is not a primary (a replica after a
    /// failover, say), so it would refuse every write.
    #[error("the Redis server behind {url} is a {role}, not the primary; reconnecting")]
    NotPrimary {
        /// The configured URL, password hidden.
        url: String,
        /// The role it reported (`ROLE`).
        role: String,
    },
    /// A write that must reach replicas before it counts (`redis.wait_replicas`)
    /// reached fewer of them in time (`WAIT`). It is on the primary, and a
    /// failover could lose it, so the caller does not rely on it.
    #[error(
        "the {what} write reached {acked} of the {wanted} Redis replicas that \
         redis.wait_replicas asks for within redis.wait_timeout ({timeout_ms} ms); not counted"
    )]
    NotReplicated {
        /// Which write (`leader lease`, `watermark`).
        what: &'static str,
        /// Replicas asked for.
        wanted: u32,
        /// Replicas that acknowledged it.
        acked: i64,
        /// The wait, in milliseconds.
        timeout_ms: u64,
    },
}

impl StoreError {
    /// Whether trying again later can succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Redis(_)
                | StoreError::Connect { .. }
                | StoreError::NotPrimary { .. }
                | StoreError::NotReplicated { .. }
        )
    }
}

/// Result alias for store operations.
pub type StoreResult<T> = Result<T, StoreError>;

/// Outcome of claiming a task key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Ours to run; this is attempt number `attempt` (crashed attempts included).
    Claimed {
        /// Attempts so far, this one included.
        attempt: u32,
    },
    /// Already ran to success within the done window.
    Done,
    /// Already dead-lettered.
    Dead,
    /// Another worker holds a live claim.
    Busy {
        /// The claim's value (`running:<worker>`).
        owner: String,
        /// Time left on its lease.
        ttl: Duration,
    },
}

/// Final state written for a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Success: duplicates are skipped for the done window.
    Done,
    /// Dead-lettered: duplicates are skipped until an operator replays it.
    Dead,
    /// Give the key back (a retry copy is queued, or shutdown interrupted the attempt).
    Release,
}

/// Handle to Redis for one namespace. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    conn: std::sync::Arc<crate::redis_conn::Shared>,
    keys: Keys,
    scripts: std::sync::Arc<Scripts>,
    client: redis::Client,
    /// Replicas a leader-lease, fencing or watermark write must reach.
    replica_wait: Option<ReplicaWait>,
}

/// `WAIT` settings of a store; see [`Store::with_replica_wait`].
#[derive(Debug, Clone, Copy)]
struct ReplicaWait {
    replicas: u32,
    timeout: Duration,
}

struct Scripts {
    lease_acquire: Script,
    lease_renew: Script,
    lease_release: Script,
    watermark_advance: Script,
    watermark_remove: Script,
    idem_renew: Script,
    idem_finish: Script,
    lock_release: Script,
}

impl Scripts {
    fn load() -> Self {
        Scripts {
            lease_acquire: Script::new(include_str!("lua/lease_acquire.lua")),
            lease_renew: Script::new(include_str!("lua/lease_renew.lua")),
            lease_release: Script::new(include_str!("lua/lease_release.lua")),
            watermark_advance: Script::new(include_str!("lua/watermark_advance.lua")),
            watermark_remove: Script::new(include_str!("lua/watermark_remove.lua")),
            idem_renew: Script::new(include_str!("lua/idem_renew.lua")),
            idem_finish: Script::new(include_str!("lua/idem_finish.lua")),
            lock_release: Script::new(include_str!("lua/lock_release.lua")),
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl Store {
    /// Connects to Redis. `response_timeout` bounds every command, so a paused
    /// or partitioned Redis shows up as an error instead of a hang.
    pub async fn connect(
        url: &str,
        namespace: &str,
        response_timeout: Duration,
    ) -> StoreResult<Self> {
        let failed = |error| StoreError::Connect {
            url: crate::redact(url),
            error,
        };
        let client = redis::Client::open(url).map_err(failed)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(response_timeout))
            .set_connection_timeout(Some(response_timeout.max(Duration::from_secs(1))))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let manager = client
            .get_connection_manager_with_config(config.clone())
            .await
            .map_err(failed)?;
        Ok(Store {
            conn: crate::redis_conn::Shared::new(
                manager,
                client.clone(),
                config,
                crate::redact(url),
            ),
            keys: Keys::new(namespace),
            scripts: std::sync::Arc::new(Scripts::load()),
            client,
            replica_wait: None,
        })
    }

    /// Makes the producer's own writes (taking and renewing the leader
    /// lease, the fencing counter, watermarks) count only once `replicas`
    /// replicas acknowledged them within `timeout` (Redis `WAIT`, sent in the
    /// same pipeline as the write, so on the same connection right after it).
    /// Replication is asynchronous: without this, a failover can lose a lease
    /// renewal (a standby then takes the lease while the old leader still
    /// counts on it), the fencing counter (a token is handed out twice) or a
    /// watermark. A lease taken but not acknowledged is released again and
    /// [`StoreError::NotReplicated`] returned; a renewal not acknowledged
    /// fails the same way, so the leader does not move its deadline. `0` turns
    /// it off. Worker claims are not waited for: the cost would fall on every
    /// task, and a claim lost in a failover costs at most a duplicate run,
    /// the same as one whose lease expired.
    pub fn with_replica_wait(mut self, replicas: u32, timeout: Duration) -> Store {
        self.replica_wait = (replicas > 0).then_some(ReplicaWait { replicas, timeout });
        self
    }

    /// Runs a script that writes and, when `durable` and with
    /// [`Store::with_replica_wait`], the `WAIT` after it. The script's reply,
    /// and the replicas that acknowledged the write (`None` when not waiting).
    async fn invoke_replicated<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        invocation: &redis::ScriptInvocation<'_>,
        durable: bool,
    ) -> StoreResult<(T, Option<i64>)> {
        let mut c = self.conn();
        let Some(wait) = self.replica_wait.filter(|_| durable) else {
            return Ok((invocation.invoke_async(&mut c).await?, None));
        };
        // A pipeline is not retried on NOSCRIPT the way `invoke_async` is, so
        // it loads the script first (these writes are a few a second at most).
        let (_, reply, acked): (redis::Value, T, i64) = redis::pipe()
            .load_script(script)
            .invoke_script(invocation)
            .cmd("WAIT")
            .arg(wait.replicas)
            .arg(ms(wait.timeout))
            .query_async(&mut c)
            .await?;
        Ok((reply, Some(acked)))
    }

    /// `Err(NotReplicated)` when `acked` replicas are fewer than asked for.
    fn check_replicated(&self, what: &'static str, acked: Option<i64>) -> StoreResult<()> {
        match (self.replica_wait, acked) {
            (Some(w), Some(acked)) if acked < i64::from(w.replicas) => {
                Err(StoreError::NotReplicated {
                    what,
                    wanted: w.replicas,
                    acked,
                    timeout_ms: ms(w.timeout),
                })
            }
            _ => Ok(()),
        }
    }

    /// The key names of this namespace.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// A fresh connection for pub/sub.
    pub async fn pubsub(&self) -> StoreResult<redis::aio::PubSub> {
        Ok(self.client.get_async_pubsub().await?)
    }

    /// Round trip to Redis that also checks the server is a primary (`ROLE`):
    /// a replica answers reads and `PING` but refuses every write, so after a
    /// failover the connection would look healthy and be useless. On a
    /// replica it fails with [`StoreError::NotPrimary`] and reconnects (see
    /// [`Conn`]), so a process with nothing to write (an idle worker, a
    /// producer's readiness probe) follows the failover too. A server that
    /// refuses `ROLE` (renamed or not allowed by ACL) gets a `PING` instead.
    pub async fn ping(&self) -> StoreResult<()> {
        let mut c = self.conn();
        let role: redis::RedisResult<redis::Value> = redis::cmd("ROLE").query_async(&mut c).await;
        match role {
            Ok(redis::Value::Array(parts)) => match parts.first() {
                Some(redis::Value::BulkString(r)) if r.as_slice() != b"master" => {
                    let role = String::from_utf8_lossy(r).into_owned();
                    c.follow_failover(&role);
                    Err(StoreError::NotPrimary {
                        url: self.conn.url().to_string(),
                        role,
                    })
                }
                _ => Ok(()),
            },
            Ok(_) => Ok(()),
            // Refused (unknown or not allowed): an error reply has a code.
            Err(e) if e.code().is_some() => {
                let _: String = redis::cmd("PING").query_async(&mut c).await?;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Tries to take the lease: `Ok(Ok(token))` when taken (the lease value is
    /// `<token>:<holder>`), `Ok(Err(time left of the current holder))` otherwise.
    pub async fn lease_acquire(
        &self,
        holder: &str,
        ttl: Duration,
    ) -> StoreResult<Result<u64, Duration>> {
        let mut invocation = self.scripts.lease_acquire.prepare_invoke();
        invocation
            .key(self.keys.leader())
            .key(self.keys.fencing())
            .arg(holder)
            .arg(ms(ttl));
        let ((token, pttl), acked): ((u64, i64), _) = self
            .invoke_replicated(&self.scripts.lease_acquire, &invocation, true)
            .await?;
        if token > 0 {
            if let Err(e) = self.check_replicated("leader lease", acked) {
                // Not durable: give it back so that a contender (or this
                // producer, once the replicas catch up) takes it anew,
                // rather than leave it unused until it expires.
                if let Err(release) = self.lease_release(&format!("{token}:{holder}")).await {
                    tracing::warn!(error = %release, "Could not release a lease the replicas did not acknowledge; it expires on its own");
                }
                return Err(e);
            }
            Ok(Ok(token))
        } else {
            Ok(Err(Duration::from_millis(pttl.max(0) as u64)))
        }
    }

    /// Extends the lease if `value` still holds it. With
    /// [`Store::with_replica_wait`], a renewal the replicas did not
    /// acknowledge in time is `Err(NotReplicated)`: the leader must not move
    /// its deadline on it.
    pub async fn lease_renew(&self, value: &str, ttl: Duration) -> StoreResult<bool> {
        self.renew_if_held(&self.keys.leader(), value, ttl, Some("leader lease"))
            .await
    }

    /// Sets `key`'s time to live to `ttl` if its value is `value` (never a
    /// bare `PEXPIRE`: whoever holds it now keeps their own). With `durable`
    /// (the write's name in errors), a renewal counts only once the replicas
    /// of [`Store::with_replica_wait`] acknowledged it.
    async fn renew_if_held(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
        durable: Option<&'static str>,
    ) -> StoreResult<bool> {
        let mut invocation = self.scripts.lease_renew.prepare_invoke();
        invocation.key(key).arg(value).arg(ms(ttl));
        let (ok, acked): (i64, _) = self
            .invoke_replicated(&self.scripts.lease_renew, &invocation, durable.is_some())
            .await?;
        if let (1, Some(what)) = (ok, durable) {
            self.check_replicated(what, acked)?;
        }
        Ok(ok == 1)
    }

    /// Releases the lease if `value` holds it, notifying standbys.
    pub async fn lease_release(&self, value: &str) -> StoreResult<bool> {
        let mut c = self.conn();
        let ok: i64 = self
            .scripts
            .lease_release
            .key(self.keys.leader())
            .arg(value)
            .arg(self.keys.leader_released())
            .invoke_async(&mut c)
            .await?;
        Ok(ok == 1)
    }

    /// The current lease value and its time left, if any.
    pub async fn lease_holder(&self) -> StoreResult<Option<(String, Duration)>> {
        self.value_and_ttl(&self.keys.leader()).await
    }

    /// A key's value and time left, if it exists.
    async fn value_and_ttl(&self, key: &str) -> StoreResult<Option<(String, Duration)>> {
        let (value, pttl): (Option<String>, i64) = redis::pipe()
            .get(key)
            .pttl(key)
            .query_async(&mut self.conn())
            .await?;
        Ok(value.map(|v| (v, Duration::from_millis(pttl.max(0) as u64))))
    }

    /// Watermarks of all schedules. A field that is not milliseconds since
    /// the epoch (written by hand, say) is logged at ERROR and left out, so
    /// that schedule starts from now and its next watermark replaces it; it
    /// does not stop every schedule.
    pub async fn watermarks(&self) -> StoreResult<HashMap<String, DateTime<Utc>>> {
        let mut c = self.conn();
        let key = self.keys.watermarks();
        let raw: HashMap<String, String> = c.hgetall(&key).await?;
        Ok(raw
            .into_iter()
            .filter_map(|(schedule, v)| {
                let t = v
                    .parse::<i64>()
                    .ok()
                    .and_then(|ms| Utc.timestamp_millis_opt(ms).single());
                if t.is_none() {
                    tracing::error!(
                        key = %key,
                        schedule = %schedule,
                        value = %v,
                        "Watermark is not milliseconds since the epoch; ignored (the schedule starts from now)"
                    );
                }
                Some((schedule, t?))
            })
            .collect())
    }

    /// The timing each schedule's watermark was written under (see
    /// [`Store::advance_watermarks`]); schedules without one are absent.
    pub async fn watermark_timings(&self) -> StoreResult<HashMap<String, String>> {
        let mut c = self.conn();
        Ok(c.hgetall(self.keys.timings()).await?)
    }

    /// Advances watermarks (never backwards), only if `lease_value` still
    /// holds the lease, recording with each the schedule's timing
    /// (`Schedule::timing_key`; empty: left as it is) in the same script, so
    /// a later leader knows which expression a watermark belongs to.
    /// Returns false, writing nothing, when the lease is not ours.
    pub async fn advance_watermarks(
        &self,
        lease_value: &str,
        marks: &[(&str, DateTime<Utc>, &str)],
    ) -> StoreResult<bool> {
        if marks.is_empty() {
            return Ok(true);
        }
        self.watermarks_if_leader(&self.scripts.watermark_advance, lease_value, |inv| {
            for (name, slot, timing) in marks {
                inv.arg(*name).arg(slot.timestamp_millis()).arg(*timing);
            }
        })
        .await
    }

    /// Forgets the watermarks of schedules that no longer exist, only if
    /// `lease_value` still holds the lease: a deposed leader that has not
    /// noticed yet, working from an older config, must not erase a watermark
    /// the current leader relies on. Returns false, removing nothing, when the
    /// lease is not ours.
    pub async fn remove_watermarks(
        &self,
        lease_value: &str,
        names: &[String],
    ) -> StoreResult<bool> {
        if names.is_empty() {
            return Ok(true);
        }
        self.watermarks_if_leader(&self.scripts.watermark_remove, lease_value, |inv| {
            for name in names {
                inv.arg(name);
            }
        })
        .await
    }

    /// Runs a watermark script (keys: the lease, the watermarks, the timings; first
    /// argument: `lease_value`; the rest from `args`) that writes only while
    /// `lease_value` holds the lease. Returns whether it did.
    async fn watermarks_if_leader(
        &self,
        script: &Script,
        lease_value: &str,
        args: impl FnOnce(&mut redis::ScriptInvocation<'_>),
    ) -> StoreResult<bool> {
        let mut inv = script.prepare_invoke();
        inv.key(self.keys.leader())
            .key(self.keys.watermarks())
            .key(self.keys.timings())
            .arg(lease_value);
        args(&mut inv);
        let (ok, acked): (i64, _) = self.invoke_replicated(script, &inv, true).await?;
        if ok == 1 {
            self.check_replicated("watermark", acked)?;
        }
        Ok(ok == 1)
    }

    /// Claims a task key for one attempt.
    ///
    /// The hot path of every delivery: no Lua (a script costs Redis several
    /// times the plain commands it runs) and, for a first attempt, one round
    /// trip of two commands: `SET state running:<worker> NX GET PX ttl` takes
    /// the claim or returns the state that stops it, and `SET attempts 1 NX
    /// GET PX keep` starts the attempt counter. Only when the counter already
    /// existed (a retry, or a redelivery after a crash) does a second round
    /// trip count the attempt (`INCR` + `PEXPIRE`); the claim is ours by then,
    /// so nobody races it. Either way the attempt is counted before anything
    /// runs, so an attempt that kills its worker still counts. A claim that
    /// was not taken changes no counter (`NX`).
    pub async fn claim(
        &self,
        key: &str,
        worker: &str,
        ttl: Duration,
        keep: Duration,
    ) -> StoreResult<Claim> {
        let mut c = self.conn();
        let state = self.keys.idem(key);
        let attempts = self.keys.attempts(key);
        let (prev, earlier): (Option<String>, Option<i64>) = redis::pipe()
            .cmd("SET")
            .arg(&state)
            .arg(format!("running:{worker}"))
            .arg("NX")
            .arg("GET")
            .arg("PX")
            .arg(ms(ttl))
            .cmd("SET")
            .arg(&attempts)
            .arg(1)
            .arg("NX")
            .arg("GET")
            .arg("PX")
            .arg(ms(keep))
            .query_async(&mut c)
            .await?;
        match prev.as_deref() {
            None => {
                let attempt = match earlier {
                    None => 1,
                    Some(_) => {
                        let (n,): (i64,) = redis::pipe()
                            .incr(&attempts, 1)
                            .pexpire(&attempts, ms(keep) as i64)
                            .ignore()
                            .query_async(&mut c)
                            .await?;
                        n
                    }
                };
                Ok(Claim::Claimed {
                    attempt: u32::try_from(attempt).unwrap_or(u32::MAX),
                })
            }
            Some("done") => Ok(Claim::Done),
            Some("dead") => Ok(Claim::Dead),
            Some(owner) => {
                let left: i64 = c.pttl(&state).await?;
                Ok(Claim::Busy {
                    owner: owner.to_string(),
                    ttl: Duration::from_millis(left.max(0) as u64),
                })
            }
        }
    }

    /// Extends our claim on `key`. False when it is no longer ours.
    pub async fn renew_claim(&self, key: &str, worker: &str, ttl: Duration) -> StoreResult<bool> {
        let mut c = self.conn();
        let ok: i64 = self
            .scripts
            .idem_renew
            .key(self.keys.idem(key))
            .arg(worker)
            .arg(ms(ttl))
            .invoke_async(&mut c)
            .await?;
        Ok(ok == 1)
    }

    /// Records the outcome of our claim. Returns whether the claim was still ours.
    pub async fn finish(
        &self,
        key: &str,
        worker: &str,
        outcome: Outcome,
        keep: Duration,
    ) -> StoreResult<bool> {
        let state = match outcome {
            Outcome::Done => "done",
            Outcome::Dead => "dead",
            Outcome::Release => "",
        };
        let mut c = self.conn();
        if outcome == Outcome::Done {
            // The hot path: success is recorded whatever the state was (the
            // work did finish), so a plain SET does it, a quarter of the cost
            // of the script; GET tells whether the claim was still ours.
            let prev: Option<String> = redis::cmd("SET")
                .arg(self.keys.idem(key))
                .arg("done")
                .arg("PX")
                .arg(ms(keep))
                .arg("GET")
                .query_async(&mut c)
                .await?;
            return Ok(prev.is_some_and(|p| p.strip_prefix("running:") == Some(worker)));
        }
        let ok: i64 = self
            .scripts
            .idem_finish
            .key(self.keys.idem(key))
            .arg(worker)
            .arg(state)
            .arg(ms(keep))
            .invoke_async(&mut c)
            .await?;
        Ok(ok == 1)
    }

    /// Forgets a key's state and attempt count (used when replaying a dead letter).
    pub async fn reset_key(&self, key: &str) -> StoreResult<()> {
        let mut c = self.conn();
        let _: i64 = c
            .del(&[self.keys.idem(key), self.keys.attempts(key)])
            .await?;
        Ok(())
    }

    /// Takes the dead-letter tools' lock for `holder` for `ttl`:
    /// `Ok(Err((holder, time left)))` when someone else holds it.
    pub async fn dlq_lock(
        &self,
        holder: &str,
        ttl: Duration,
    ) -> StoreResult<Result<(), (String, Duration)>> {
        let key = self.keys.dlq_lock();
        loop {
            let taken: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(holder)
                .arg("NX")
                .arg("PX")
                .arg(ms(ttl))
                .query_async(&mut self.conn())
                .await?;
            if taken.is_some() {
                return Ok(Ok(()));
            }
            // Unless it was released in between, in which case try again.
            if let Some(other) = self.value_and_ttl(&key).await? {
                return Ok(Err(other));
            }
        }
    }

    /// Extends the dead-letter tools' lock if `holder` still holds it.
    pub async fn dlq_lock_renew(&self, holder: &str, ttl: Duration) -> StoreResult<bool> {
        self.renew_if_held(&self.keys.dlq_lock(), holder, ttl, None)
            .await
    }

    /// Releases the dead-letter tools' lock if `holder` holds it.
    pub async fn dlq_unlock(&self, holder: &str) -> StoreResult<bool> {
        let ok: i64 = self
            .scripts
            .lock_release
            .key(self.keys.dlq_lock())
            .arg(holder)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(ok == 1)
    }

    /// Raw connection, for callers with needs of their own (tests, tools).
    pub fn connection(&self) -> Conn {
        self.conn()
    }

    /// A connection for the next commands (it follows a failover, see [`Conn`]).
    fn conn(&self) -> Conn {
        self.conn.conn()
    }
}

/// Runtime-managed schedules: definitions, pause flags and a revision counter.
impl Store {
    /// The revision counter of runtime schedule changes (0 when none yet).
    pub async fn schedules_rev(&self) -> StoreResult<u64> {
        let mut c = self.conn();
        let rev: Option<u64> = c.get(self.keys.schedules_rev()).await?;
        Ok(rev.unwrap_or(0))
    }

    /// All runtime schedule definitions (name → JSON) and the paused names.
    pub async fn dynamic_schedules(&self) -> StoreResult<(HashMap<String, String>, Vec<String>)> {
        let mut c = self.conn();
        let (defs, paused): (HashMap<String, String>, Vec<String>) = redis::pipe()
            .hgetall(self.keys.dynamic_schedules())
            .smembers(self.keys.paused())
            .query_async(&mut c)
            .await?;
        Ok((defs, paused))
    }

    /// Stores a runtime schedule definition. `create` fails (returns false) if
    /// the name exists; otherwise it fails if the name does not exist.
    pub async fn put_dynamic_schedule(
        &self,
        name: &str,
        json: &str,
        create: bool,
    ) -> StoreResult<bool> {
        let mut c = self.conn();
        let exists: bool = c.hexists(self.keys.dynamic_schedules(), name).await?;
        if exists == create {
            return Ok(false);
        }
        let _: () = redis::pipe()
            .atomic()
            .hset(self.keys.dynamic_schedules(), name, json)
            .incr(self.keys.schedules_rev(), 1)
            .query_async(&mut c)
            .await?;
        Ok(true)
    }

    /// Removes a runtime schedule with its pause flag and watermark. False if it did not exist.
    pub async fn remove_dynamic_schedule(&self, name: &str) -> StoreResult<bool> {
        let mut c = self.conn();
        let (removed, _, _, _, _): (i64, i64, i64, i64, i64) = redis::pipe()
            .atomic()
            .hdel(self.keys.dynamic_schedules(), name)
            .srem(self.keys.paused(), name)
            .hdel(self.keys.watermarks(), name)
            .hdel(self.keys.timings(), name)
            .incr(self.keys.schedules_rev(), 1)
            .query_async(&mut c)
            .await?;
        Ok(removed == 1)
    }

    /// Pauses or resumes a schedule by name. Returns whether the flag changed.
    pub async fn set_paused(&self, name: &str, paused: bool) -> StoreResult<bool> {
        let mut c = self.conn();
        let changed: i64 = if paused {
            c.sadd(self.keys.paused(), name).await?
        } else {
            c.srem(self.keys.paused(), name).await?
        };
        if changed == 1 {
            let _: i64 = c.incr(self.keys.schedules_rev(), 1).await?;
        }
        Ok(changed == 1)
    }
}
