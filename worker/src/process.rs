//! One delivery, start to finish: check → decode → claim → run → record the
//! outcome durably (done / retry copy confirmed / dead letter confirmed) → ack.
//! Nothing is acked before its outcome is durable, and nothing is dropped: a
//! message that cannot run goes to the dead-letter queue with its reason.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use cronpipe_shared::backoff::retry_delay;
use cronpipe_shared::config::RetryPolicy;
use cronpipe_shared::deadletter::{DeadLetter, DeadReason};
use cronpipe_shared::envelope::EnvelopeError;
use cronpipe_shared::store::{Claim, Outcome};
use cronpipe_shared::{Broker, Delivery, Envelope, Store};
use futures::FutureExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::handler::{FailureDetail, Registry, Task, TaskError};

/// Looks up a task's attempt timeout and retry policy by task name.
pub type TaskSettings = Arc<dyn Fn(&str) -> (Duration, RetryPolicy) + Send + Sync>;

/// Shared, read-only context of the worker's tasks.
pub struct Ctx {
    /// Redis.
    pub store: Store,
    /// Broker (for retry copies and dead letters).
    pub broker: Broker,
    /// Handlers.
    pub registry: Registry,
    /// This worker's id.
    pub worker: String,
    /// Claim lease.
    pub claim_ttl: Duration,
    /// Done window.
    pub done_ttl: Duration,
    /// Largest accepted body.
    pub max_message_bytes: usize,
    /// Per-task settings: timeout of one attempt and retry policy.
    pub tasks: TaskSettings,
    /// Per-task concurrency limits.
    pub limits: TaskLimits,
    /// Cancelled when the worker stops taking deliveries.
    pub stopping: CancellationToken,
    /// Dead letters that could not be published since the last one that
    /// could (they set the wait before returning the message: `DEAD_LETTER_WAIT`).
    pub dead_letter_failures: std::sync::atomic::AtomicU32,
}

/// How long a delivery whose dead letter could not be published waits
/// before it goes back to the broker, by failures in a row: 500 ms doubling
/// to at most 30 s (the task retry delays' own formula). The broker hands it
/// out again at once, so without the wait a dead-letter queue or topic that
/// refuses writes (deleted, no ACL, the record too large) would spin every
/// such message through the worker.
const DEAD_LETTER_WAIT: RetryPolicy = RetryPolicy {
    max_attempts: u32::MAX,
    initial_delay: cronpipe_shared::duration::Dur::millis(500),
    multiplier: 2.0,
    max_delay: cronpipe_shared::duration::Dur::secs(30),
    jitter: 0.0,
};

/// How a delivery ended, for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// The task ran and succeeded.
    Success = 0,
    /// The task failed and a retry copy is queued.
    Retry,
    /// Dead-lettered.
    DeadLetter,
    /// A duplicate of a finished task, acked without running.
    Duplicate,
    /// Another worker holds the claim; re-queued for later.
    Deferred,
    /// Left unacked for redelivery (shutdown or infrastructure failure).
    Returned,
}

impl Settled {
    /// Every outcome, in discriminant order.
    pub const ALL: [Settled; 6] = [
        Settled::Success,
        Settled::Retry,
        Settled::DeadLetter,
        Settled::Duplicate,
        Settled::Deferred,
        Settled::Returned,
    ];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Settled::Success => "success",
            Settled::Retry => "retry",
            Settled::DeadLetter => "dead_letter",
            Settled::Duplicate => "duplicate_skipped",
            Settled::Deferred => "deferred",
            Settled::Returned => "returned",
        }
    }
}

/// A task's metric handles, registered once per task name rather than on
/// every delivery (registering builds the labels and looks the series up).
struct TaskMetrics {
    consume_lag: metrics::Histogram,
    attempt: metrics::Histogram,
    duration: metrics::Histogram,
    /// By [`Settled`] discriminant.
    outcomes: [metrics::Counter; 6],
}

/// Task names whose handles are kept; more (from a flood of unknown task
/// names) are registered on each use, as they would be without the cache.
const MAX_CACHED_TASKS: usize = 1024;

fn task_metrics(task: &str) -> Arc<TaskMetrics> {
    static CACHE: std::sync::OnceLock<std::sync::Mutex<HashMap<String, Arc<TaskMetrics>>>> =
        std::sync::OnceLock::new();
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(m) = cache.get(task) {
        return m.clone();
    }
    let label = task.to_string();
    let m = Arc::new(TaskMetrics {
        consume_lag: metrics::histogram!("cronpipe_worker_consume_lag_seconds", "task" => label.clone()),
        attempt: metrics::histogram!("cronpipe_worker_task_attempt", "task" => label.clone()),
        duration: metrics::histogram!("cronpipe_worker_task_duration_seconds", "task" => label.clone()),
        outcomes: Settled::ALL.map(|s| {
            metrics::counter!("cronpipe_worker_tasks_total", "task" => label.clone(), "outcome" => s.as_str())
        }),
    });
    if cache.len() < MAX_CACHED_TASKS {
        cache.insert(label, m.clone());
    }
    m
}

fn in_flight() -> &'static metrics::Gauge {
    static GAUGE: std::sync::OnceLock<metrics::Gauge> = std::sync::OnceLock::new();
    GAUGE.get_or_init(|| metrics::gauge!("cronpipe_worker_in_flight"))
}

fn dead_letter(
    reason: DeadReason,
    error: String,
    envelope: Option<Envelope>,
    raw: Option<&[u8]>,
    attempts: u32,
    detail: &FailureDetail,
    worker: &str,
) -> DeadLetter {
    DeadLetter {
        v: 1,
        reason,
        error,
        first_seen_at: envelope.as_ref().map(|e| e.created_at),
        envelope,
        raw: raw.map(DeadLetter::raw_body),
        attempts,
        exit_code: detail.exit_code,
        http_status: detail.http_status,
        output_tail: detail.output_tail.clone(),
        worker: worker.to_string(),
        dead_lettered_at: Utc::now(),
    }
}

/// Retries a Redis operation briefly (infrastructure retry, not task retry).
async fn with_redis_retry<T, F, Fut>(
    what: &str,
    mut op: F,
) -> Result<T, cronpipe_shared::store::StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, cronpipe_shared::store::StoreError>>,
{
    use backon::{ExponentialBuilder, Retryable};
    let policy = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .with_jitter()
        .with_max_times(8);
    (|| op())
        .retry(policy)
        .when(|e| e.is_transient())
        .notify(|e, d| tracing::warn!(error = %e, retry_in_ms = d.as_millis() as u64, "{what} failed; retrying"))
        .await
}

/// What happened to one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// How it was settled.
    pub settled: Settled,
    /// Envelope id, when the message was an envelope.
    pub id: Option<String>,
    /// Task name, when the message was an envelope.
    pub task: Option<String>,
    /// Attempt number of the run, when the handler ran (crashed attempts included).
    pub attempt: Option<u32>,
}

/// How long a delivery whose task is at its `concurrency` limit waits in the
/// broker's delay stage before it is offered again, when waiting in-process
/// would hold too many of the worker's slots.
pub const LIMIT_DEFER: Duration = Duration::from_secs(1);

/// Per-task concurrency limits inside one worker.
///
/// A delivery of a limited task takes a task permit before it claims the key.
/// When none is free it may wait for one while holding its worker slot, but at
/// most `max_waiting` deliveries (half the worker's slots, all tasks together)
/// wait at once; any more are deferred through the broker's delay stage
/// ([`LIMIT_DEFER`]) and acked. So waiting deliveries never hold more than half
/// the worker's slots, and tasks without a limit (or with free permits) always
/// have the other half: a limited task's backlog cannot starve other tasks,
/// and nothing deadlocks, since a waiter holds no task permit and no claim.
#[derive(Default)]
pub struct TaskLimits {
    per_task: HashMap<String, Arc<Semaphore>>,
    waiting: AtomicUsize,
    max_waiting: usize,
}

impl TaskLimits {
    /// Limits for `(task, concurrency)` pairs in a worker with `slots` slots.
    pub fn new(limits: impl IntoIterator<Item = (String, u16)>, slots: usize) -> Self {
        TaskLimits {
            per_task: limits
                .into_iter()
                .map(|(t, n)| (t, Arc::new(Semaphore::new(usize::from(n.max(1))))))
                .collect(),
            waiting: AtomicUsize::new(0),
            max_waiting: slots / 2,
        }
    }
}

enum Permit {
    Unlimited,
    Held(#[allow(dead_code)] OwnedSemaphorePermit),
    Full,
    Stopping,
}

impl TaskLimits {
    async fn acquire(&self, task: &str, stopping: &CancellationToken) -> Permit {
        let Some(sem) = self.per_task.get(task) else {
            return Permit::Unlimited;
        };
        if let Ok(p) = sem.clone().try_acquire_owned() {
            return Permit::Held(p);
        }
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Permit::Full;
        }
        let got = tokio::select! {
            p = sem.clone().acquire_owned() => match p {
                Ok(p) => Permit::Held(p),
                Err(_) => Permit::Stopping,
            },
            _ = stopping.cancelled() => Permit::Stopping,
        };
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        got
    }
}

/// Processes one delivery. `abort` is cancelled when the shutdown grace period is over.
pub async fn process(ctx: &Ctx, delivery: Delivery, abort: CancellationToken) -> Report {
    let body = delivery.body();
    if body.len() > ctx.max_message_bytes {
        let error = format!(
            "message is {} bytes, over worker.max_message_bytes = {}",
            body.len(),
            ctx.max_message_bytes
        );
        let record = dead_letter(
            DeadReason::TooLarge,
            error,
            None,
            Some(&body[..body.len().min(4096)]),
            0,
            &FailureDetail::default(),
            &ctx.worker,
        );
        let settled = Box::pin(settle_dead(ctx, delivery, record, None)).await;
        return report(settled, None, None);
    }
    let env = match Envelope::decode(body) {
        Ok(env) => env,
        Err(e) => {
            let reason = match &e {
                EnvelopeError::NotJson(_) => DeadReason::InvalidJson,
                EnvelopeError::UnsupportedVersion { .. } => DeadReason::UnsupportedVersion,
                EnvelopeError::Invalid(_) => DeadReason::InvalidEnvelope,
            };
            let record = dead_letter(
                reason,
                e.to_string(),
                None,
                Some(body),
                0,
                &FailureDetail::default(),
                &ctx.worker,
            );
            let settled = Box::pin(settle_dead(ctx, delivery, record, None)).await;
            return report(settled, None, None);
        }
    };
    let span = tracing::info_span!("task", task_id = %env.id, task = %env.task);
    let id = env.id.clone();
    let task = env.task.clone();
    let (settled, attempt) = process_envelope(ctx, delivery, env, abort)
        .instrument(span)
        .await;
    report(settled, Some((id, task)), attempt)
}

fn report(settled: Settled, named: Option<(String, String)>, attempt: Option<u32>) -> Report {
    let (id, task) = match named {
        Some((id, task)) => (Some(id), Some(task)),
        None => (None, None),
    };
    task_metrics(task.as_deref().unwrap_or("(invalid)")).outcomes[settled as usize].increment(1);
    Report {
        settled,
        id,
        task,
        attempt,
    }
}

/// Puts `env` in the broker's delay stage for `delay`, then acks the delivery.
async fn defer(ctx: &Ctx, delivery: Delivery, env: &Envelope, delay: Duration) -> Settled {
    match ctx.broker.publish_delayed(env, delay).await {
        Ok(()) => {
            ack(delivery).await;
            Settled::Deferred
        }
        Err(e) => {
            tracing::warn!(error = %e, "Could not defer; returning the message to the broker");
            let _ = delivery.requeue().await;
            Settled::Returned
        }
    }
}

async fn process_envelope(
    ctx: &Ctx,
    delivery: Delivery,
    env: Envelope,
    abort: CancellationToken,
) -> (Settled, Option<u32>) {
    let Some(handler) = ctx.registry.get(&env.task) else {
        let known: Vec<&str> = ctx.registry.tasks().collect();
        let error = format!(
            "no handler for task `{}` (this worker handles: {})",
            env.task,
            known.join(", ")
        );
        let record = dead_letter(
            DeadReason::UnknownTask,
            error,
            Some(env),
            None,
            0,
            &FailureDetail::default(),
            &ctx.worker,
        );
        return (
            Box::pin(settle_dead(ctx, delivery, record, None)).await,
            None,
        );
    };
    // The task permit comes before the claim: a delivery waiting for a permit
    // holds no claim, so it blocks nobody else and costs no attempt.
    let permit = ctx.limits.acquire(&env.task, &ctx.stopping).await;
    match permit {
        Permit::Unlimited | Permit::Held(_) => {}
        Permit::Full => {
            tracing::debug!("Task at its concurrency limit; deferred");
            return (
                Box::pin(defer(ctx, delivery, &env, LIMIT_DEFER)).await,
                None,
            );
        }
        Permit::Stopping => {
            let _ = delivery.requeue().await;
            return (Settled::Returned, None);
        }
    };
    let (timeout, policy) = (ctx.tasks)(&env.task);
    let since = env.slot.unwrap_or(env.created_at);
    task_metrics(&env.task).consume_lag.record(
        (Utc::now() - since)
            .to_std()
            .unwrap_or_default()
            .as_secs_f64(),
    );
    let key = env.key().to_string();
    let claim = with_redis_retry("Claiming the task", || {
        ctx.store
            .claim(&key, &ctx.worker, ctx.claim_ttl, ctx.done_ttl)
    })
    .await;
    let attempt = match claim {
        Err(e) => {
            tracing::error!(error = %e, "Cannot claim the task in Redis; returning it to the broker");
            let _ = delivery.requeue().await;
            return (Settled::Returned, None);
        }
        Ok(Claim::Done) | Ok(Claim::Dead) => {
            tracing::info!("Duplicate of a finished task; acked without running");
            ack(delivery).await;
            return (Settled::Duplicate, None);
        }
        Ok(Claim::Busy { owner, ttl }) => {
            // Neither run in parallel nor drop: look again once the claim could have ended.
            let delay = ttl.clamp(Duration::from_millis(500), ctx.claim_ttl);
            tracing::info!(owner = %owner, recheck_in_ms = delay.as_millis() as u64, "Task in progress elsewhere; deferred");
            return (Box::pin(defer(ctx, delivery, &env, delay)).await, None);
        }
        // Redis counts attempts (crashed ones too); a retry copy also
        // carries its number, which stands when the count has expired
        // meanwhile (a retry delay or Retry-After longer than done_ttl), so
        // the task still reaches max_attempts instead of retrying forever.
        Ok(Claim::Claimed { attempt }) => attempt.max(env.attempt),
    };
    if attempt > policy.max_attempts {
        let error = format!(
            "attempt {attempt} exceeds max_attempts = {} (earlier attempts crashed, timed out or were lost)",
            policy.max_attempts
        );
        tracing::warn!(attempt, "Giving up: too many attempts");
        let record = dead_letter(
            DeadReason::MaxAttempts,
            error,
            Some(env),
            None,
            attempt - 1,
            &FailureDetail::default(),
            &ctx.worker,
        );
        return (
            Box::pin(settle_dead(ctx, delivery, record, Some(&key))).await,
            Some(attempt),
        );
    }
    let settled = run_claimed(ctx, delivery, env, handler, attempt, timeout, policy, abort).await;
    drop(permit);
    (settled, Some(attempt))
}

/// Runs a claimed attempt, renewing the claim meanwhile, then records its outcome and acks.
#[allow(clippy::too_many_arguments)]
async fn run_claimed(
    ctx: &Ctx,
    delivery: Delivery,
    env: Envelope,
    handler: Arc<dyn crate::handler::Handler>,
    attempt: u32,
    timeout: Duration,
    policy: RetryPolicy,
    abort: CancellationToken,
) -> Settled {
    let key = env.key().to_string();
    let cancel = abort.child_token();
    let task = Task {
        envelope: env.clone(),
        attempt,
        worker: ctx.worker.clone(),
        cancel: cancel.clone(),
    };
    let started = Instant::now();
    in_flight().increment(1.0);
    // One sample per attempt run: its count is attempts made, its
    // distribution shows how many tasks need retries (crashed attempts included).
    task_metrics(&env.task).attempt.record(f64::from(attempt));
    // The handler runs inside this task (no spawn per message); a panic while
    // polling it is caught here and counts as a failed attempt.
    let mut running = std::panic::AssertUnwindSafe(handler.handle(task)).catch_unwind();
    // Boxed, like the rare outcome paths below: the task's future is moved
    // when spawned, so its size is paid per delivery.
    let mut renewer = Box::pin(renew_claim(&ctx.store, &key, &ctx.worker, ctx.claim_ttl));
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut renewing = true;
    let result: Result<(), TaskError> = loop {
        tokio::select! {
            joined = &mut running => break match joined {
                Ok(r) => r,
                Err(p) => Err(TaskError::retryable(format!("handler panicked: {}", panic_text(p)))),
            },
            _ = &mut renewer, if renewing => renewing = false,
            _ = &mut deadline => {
                cancel.cancel();
                // Let the handler clean up (exec kills its process group), briefly;
                // dropping it afterwards aborts whatever is left. A handler
                // that answers the cancel with success finished its work:
                // retrying would run it again.
                let timed_out = || Err(TaskError::retryable(format!("timed out after {}", humantime::format_duration(timeout))));
                break match tokio::time::timeout(Duration::from_secs(5), &mut running).await {
                    Ok(Ok(Ok(()))) => Ok(()),
                    _ => timed_out(),
                };
            }
            _ = abort.cancelled() => {
                cancel.cancel();
                break match tokio::time::timeout(Duration::from_secs(5), &mut running).await {
                    Ok(Ok(Ok(()))) => Ok(()),
                    _ => Err(TaskError::retryable("interrupted by shutdown")),
                };
            }
        }
    };
    cancel.cancel();
    in_flight().decrement(1.0);
    if result.is_err() && abort.is_cancelled() {
        // Shutdown grace is over and the attempt did not succeed (a handler
        // that stops when told to fails): not the task's fault, so no retry
        // copy. Give the claim back so another worker can take the redelivered
        // message at once, and leave the delivery unacked.
        let _ = ctx
            .store
            .finish(&key, &ctx.worker, Outcome::Release, ctx.done_ttl)
            .await;
        tracing::warn!(
            attempt,
            "Interrupted by shutdown; claim released, message left for redelivery"
        );
        drop(delivery);
        return Settled::Returned;
    }
    let elapsed = started.elapsed();
    task_metrics(&env.task)
        .duration
        .record(elapsed.as_secs_f64());

    match result {
        Ok(()) => {
            if let Err(e) = with_redis_retry("Recording success", || {
                ctx.store
                    .finish(&key, &ctx.worker, Outcome::Done, ctx.done_ttl)
            })
            .await
            {
                tracing::error!(error = %e, "Could not record success in Redis; acking anyway (a redelivery could run it again)");
            }
            tracing::info!(
                attempt,
                duration_ms = elapsed.as_millis() as u64,
                "Task succeeded"
            );
            ack(delivery).await;
            Settled::Success
        }
        Err(TaskError::Retryable {
            message,
            retry_after,
            detail,
        }) if attempt < policy.max_attempts => {
            let delay = retry_after
                .unwrap_or_else(|| retry_delay(&policy, attempt, rand::random::<f64>()))
                .min(Duration::from_secs(7 * 24 * 3600));
            let mut next = env.clone();
            next.attempt = attempt + 1;
            tracing::warn!(attempt, error = %message, http_status = ?detail.http_status, exit_code = ?detail.exit_code, output_tail = %detail.output_tail, retry_in_ms = delay.as_millis() as u64, "Task failed; retry queued");
            Box::pin(queue_retry(ctx, delivery, &next, delay, &key)).await
        }
        Err(err) => {
            let (reason, what) = match &err {
                TaskError::Permanent { .. } => (DeadReason::PermanentError, "permanent error"),
                TaskError::Retryable { .. } => (DeadReason::MaxAttempts, "out of attempts"),
            };
            tracing::warn!(attempt, error = %err, output_tail = %err.detail().output_tail, "Task failed ({what}); dead-lettering");
            let record = dead_letter(
                reason,
                err.to_string(),
                Some(env),
                None,
                attempt,
                err.detail(),
                &ctx.worker,
            );
            Box::pin(settle_dead(ctx, delivery, record, Some(&key))).await
        }
    }
}

/// Queues the retry copy (confirmed by the broker) before acking the original.
async fn queue_retry(
    ctx: &Ctx,
    delivery: Delivery,
    next: &Envelope,
    delay: Duration,
    key: &str,
) -> Settled {
    match ctx.broker.publish_delayed(next, delay).await {
        Ok(()) => {
            let _ = with_redis_retry("Releasing the claim", || {
                ctx.store
                    .finish(key, &ctx.worker, Outcome::Release, ctx.done_ttl)
            })
            .await;
            ack(delivery).await;
            Settled::Retry
        }
        Err(e) => {
            tracing::error!(error = %e, "Could not queue the retry copy; returning the message to the broker");
            give_back(ctx, delivery, Some(key)).await
        }
    }
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".into()
    }
}

/// Renews the claim every third of its lifetime; returns only when the claim is lost.
async fn renew_claim(store: &Store, key: &str, worker: &str, ttl: Duration) {
    let every = ttl / 3;
    loop {
        tokio::time::sleep(every).await;
        match store.renew_claim(key, worker, ttl).await {
            Ok(true) => metrics::counter!("cronpipe_worker_claim_renewals_total", "result" => "ok")
                .increment(1),
            Ok(false) => {
                metrics::counter!("cronpipe_worker_claim_renewals_total", "result" => "lost")
                    .increment(1);
                tracing::warn!(
                    "Claim lost while running (it expired); another worker may run this task"
                );
                return;
            }
            Err(e) => {
                metrics::counter!("cronpipe_worker_claim_renewals_total", "result" => "error")
                    .increment(1);
                tracing::warn!(error = %e, "Claim renewal failed; retrying");
            }
        }
    }
}

async fn ack(delivery: Delivery) {
    if let Err(e) = delivery.ack().await {
        // The broker redelivers; the idempotency record makes that harmless.
        tracing::warn!(error = %e, "Ack failed; the message will be redelivered and skipped as a duplicate");
    }
}

async fn settle_dead(
    ctx: &Ctx,
    delivery: Delivery,
    record: DeadLetter,
    key: Option<&str>,
) -> Settled {
    tracing::warn!(reason = record.reason.as_str(), error = %record.error, "Dead-lettering");
    // The dead letter must be confirmed before the original is acked.
    match ctx.broker.publish_dead_letter(&record).await {
        Ok(()) => {
            ctx.dead_letter_failures.store(0, Ordering::Relaxed);
            if let Some(key) = key {
                if let Err(e) = with_redis_retry("Recording the dead letter", || {
                    ctx.store
                        .finish(key, &ctx.worker, Outcome::Dead, ctx.done_ttl)
                })
                .await
                {
                    tracing::error!(error = %e, "Could not record the dead letter in Redis");
                }
            }
            ack(delivery).await;
            Settled::DeadLetter
        }
        Err(e) => {
            let failures = ctx.dead_letter_failures.fetch_add(1, Ordering::Relaxed) + 1;
            let wait = retry_delay(&DEAD_LETTER_WAIT, failures, 0.0);
            tracing::error!(error = %e, failures_in_a_row = failures, wait_ms = wait.as_millis() as u64, "Could not publish the dead letter; returning the message to the broker after a wait");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = ctx.stopping.cancelled() => {}
            }
            give_back(ctx, delivery, key).await
        }
    }
}

/// The outcome could not be made durable: releases the claim (if any) so the
/// next delivery can take it at once, and hands the message back to the broker.
async fn give_back(ctx: &Ctx, delivery: Delivery, key: Option<&str>) -> Settled {
    if let Some(key) = key {
        let _ = ctx
            .store
            .finish(key, &ctx.worker, Outcome::Release, ctx.done_ttl)
            .await;
    }
    let _ = delivery.requeue().await;
    Settled::Returned
}
