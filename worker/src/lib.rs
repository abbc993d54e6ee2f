//! cronpipe worker: consumes task messages and runs each to a durable outcome.
//! Also a library: register Rust handlers in a [`Registry`] and call [`run`].
//!
//! - [`handler`]: the handler API (`Task`, `TaskError`, `Registry`).
//! - [`exec`]: the built-in `exec` handler.
//! - [`http`]: the built-in `http` handler.
//! - [`examples_support`]: the handler of `examples/custom_handler.rs`, shared with its test.
//! - [`process`]: one delivery from claim to ack, and per-task concurrency limits.
//! - [`run`]: the consume loop with bounded concurrency and graceful shutdown.

pub mod dlq;
pub mod examples_support;
pub mod exec;
pub mod exec_guard;
pub mod handler;
pub mod history;
pub mod http;
pub mod process;

use std::sync::Arc;
use std::time::Duration;

use cronpipe_shared::config::HandlerKind;
use cronpipe_shared::{Broker, BrokerError, Config, Store};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use handler::{FailureDetail, Handler, Registry, Task, TaskError};
pub use process::{Report, Settled};

/// Errors that stop the worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A task in config uses `handler = "rust"` but no Rust handler was registered for it.
    #[error("task `{0}` is configured with handler = \"rust\" but this worker binary registers no handler for it")]
    MissingRustHandler(String),
    /// A task with `handler = "http"` cannot be set up.
    #[error("task `{0}`: {1}")]
    HttpSetup(String, http::HttpSetupError),
    /// The broker failed in a way that retrying will not fix, or the consumer ended.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// Redis could not be reached.
    #[error(transparent)]
    Store(#[from] cronpipe_shared::store::StoreError),
}

/// Worker settings.
#[derive(Clone)]
pub struct Options {
    /// Worker id (claims, dead letters, logs).
    pub instance_id: String,
    /// The validated config (per-task timeouts and retry policies).
    pub config: Arc<Config>,
    /// Receives a report per settled delivery (tests, embedding programs).
    pub reports: Option<mpsc::UnboundedSender<Report>>,
}

impl Options {
    /// Settings from config.
    pub fn from_config(config: Config) -> Self {
        Options {
            instance_id: config
                .worker
                .instance_id
                .clone()
                .unwrap_or_else(|| cronpipe_shared::telemetry::default_instance_id("worker")),
            config: Arc::new(config),
            reports: None,
        }
    }
}

/// Adds an `exec` or `http` handler for every `handler = "exec"` or
/// `handler = "http"` task in config to `registry`, and checks every
/// `handler = "rust"` task is registered.
pub fn registry_from_config(
    config: &Config,
    mut registry: Registry,
) -> Result<Registry, WorkerError> {
    if let Some(warning) = unguarded_exec_warning(config, exec_guard::installed()) {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| tracing::warn!("{warning}"));
    }
    let mut client = None;
    for (name, task) in &config.tasks {
        match task.handler {
            HandlerKind::Http => {
                let setup = |e| WorkerError::HttpSetup(name.clone(), e);
                let c = match &client {
                    Some(c) => Clone::clone(c),
                    None => {
                        let c = http::client().map_err(setup)?;
                        client = Some(c.clone());
                        c
                    }
                };
                let handler = http::HttpHandler::new(
                    c,
                    task.url.as_deref().unwrap_or_default(),
                    task.method.as_deref(),
                    &task.headers,
                    config.worker.output_tail_bytes,
                )
                .map_err(setup)?;
                registry = registry.register(name.clone(), handler);
            }
            HandlerKind::Exec => {
                registry = registry.register(
                    name.clone(),
                    exec::ExecHandler {
                        command: task.command.clone(),
                        env: task.env.clone(),
                        workdir: task.workdir.clone(),
                        permanent_exit_codes: task.permanent_exit_codes.clone(),
                        tail_bytes: config.worker.output_tail_bytes,
                    },
                );
            }
            HandlerKind::Rust => {
                if !registry.contains(name) {
                    return Err(WorkerError::MissingRustHandler(name.clone()));
                }
            }
        }
    }
    Ok(registry)
}

/// The warning for `config`'s exec tasks when they run without the exec
/// guard (Linux only; elsewhere there is none to miss).
fn unguarded_exec_warning(config: &Config, guard_installed: bool) -> Option<String> {
    let exec: Vec<&str> = config
        .tasks
        .iter()
        .filter(|(_, t)| t.handler == HandlerKind::Exec)
        .map(|(name, _)| name.as_str())
        .collect();
    if !cfg!(target_os = "linux") || guard_installed || exec.is_empty() {
        return None;
    }
    Some(format!(
        "exec tasks {exec:?} run without the exec guard: what their programs start can outlive \
         a killed worker and run beside the retry (the program itself still dies with it). Call \
         cronpipe_worker::exec_guard::main_if_requested() first thing in main"
    ))
}

/// Connects to Redis and the broker, retrying with backoff until they answer or `shutdown`.
pub async fn connect(
    config: &Config,
    name: &str,
    shutdown: &CancellationToken,
) -> Result<Option<(Store, Broker)>, WorkerError> {
    Ok(
        cronpipe_shared::connect::connect_all(config, name, Duration::from_secs(5), shutdown)
            .await?,
    )
}

/// Consumes until `shutdown`, then stops taking deliveries, lets in-flight
/// tasks finish within `worker.shutdown_grace`, and after that interrupts the
/// rest: their claims are released and their messages left unacked, so the
/// broker hands them to another worker at once.
pub async fn run(
    opts: Options,
    store: Store,
    broker: Broker,
    registry: Registry,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let cfg = opts.config.clone();
    let concurrency = usize::from(cfg.worker.concurrency.max(1));
    let task_cfg = cfg.clone();
    let ctx = Arc::new(process::Ctx {
        store,
        broker: broker.clone(),
        registry,
        worker: opts.instance_id.clone(),
        claim_ttl: cfg.worker.claim_ttl.get(),
        done_ttl: cfg.worker.done_ttl.get(),
        max_message_bytes: cfg.worker.max_message_bytes,
        tasks: Arc::new(move |task: &str| {
            (task_cfg.task_timeout(task), task_cfg.retry_policy(task))
        }),
        limits: process::TaskLimits::new(
            cfg.tasks
                .iter()
                .filter_map(|(name, t)| t.concurrency.map(|n| (name.clone(), n))),
            concurrency,
        ),
        stopping: shutdown.clone(),
        dead_letter_failures: Default::default(),
    });
    let tag = format!("{}-{:08x}", opts.instance_id, rand::random::<u32>());
    // On Kafka a rebalance gives the revoked partitions' running tasks the
    // same grace as a shutdown before their offsets are committed.
    let mut consumer = broker
        .consume(
            cfg.worker.concurrency.max(1),
            &tag,
            cfg.worker.shutdown_grace.get(),
        )
        .await?;
    tracing::info!(worker = %opts.instance_id, concurrency, "Consuming");
    let history_stop = CancellationToken::new();
    let history = history::History::spawn(
        ctx.store.clone(),
        cfg.worker.history_max_len,
        cfg.worker.history_max_age.get(),
        history_stop.clone(),
    );
    let slots = Arc::new(Semaphore::new(concurrency));
    let tracker = TaskTracker::new();
    let abort = CancellationToken::new();
    let mut failure = None;
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let delivery = tokio::select! {
            _ = shutdown.cancelled() => break,
            d = consumer.next() => match d {
                Some(d) => d,
                None => {
                    failure = Some(BrokerError::Unavailable("the consumer ended: the broker connection is gone for good".into()));
                    break;
                }
            },
        };
        let ctx = ctx.clone();
        let abort = abort.clone();
        let reports = opts.reports.clone();
        let history = history.clone();
        let worker = opts.instance_id.clone();
        // Boxed: the task's future is several kilobytes, and spawning moves it
        // more than once; a box is moved as a pointer.
        tracker.spawn(Box::pin(async move {
            let started = std::time::Instant::now();
            let report = process::process(&ctx, delivery, abort).await;
            drop(permit);
            history.record(history::Entry {
                at: chrono::Utc::now(),
                id: report.id.clone().unwrap_or_else(|| "-".into()),
                task: report.task.clone().unwrap_or_else(|| "(invalid)".into()),
                outcome: report.settled.as_str().to_string(),
                attempt: report.attempt,
                duration_ms: started.elapsed().as_millis() as u64,
                worker,
            });
            if let Some(tx) = reports {
                let _ = tx.send(report);
            }
        }));
    }
    consumer.cancel().await;
    tracker.close();
    let grace = cfg.worker.shutdown_grace.get();
    if !tracker.is_empty() {
        tracing::info!(
            in_flight = tracker.len(),
            grace_ms = grace.as_millis() as u64,
            "Waiting for in-flight tasks"
        );
    }
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            in_flight = tracker.len(),
            "Shutdown grace period over; interrupting the rest"
        );
        abort.cancel();
        tracker.wait().await;
    }
    history_stop.cancel();
    broker.close().await;
    tracing::info!("Worker stopped");
    match failure {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(std::path::Path::new("t.toml"), text, std::iter::empty()).unwrap()
    }

    #[test]
    fn exec_tasks_without_the_guard_are_warned_about_by_name() {
        let with_exec = config(
            "[task.backup]\nhandler = \"exec\"\ncommand = [\"true\"]\n\
             [task.hook]\nhandler = \"http\"\nurl = \"http://example.com/\"\n",
        );
        let warning = unguarded_exec_warning(&with_exec, false);
        if cfg!(target_os = "linux") {
            let warning = warning.expect("a warning");
            assert!(warning.contains("[\"backup\"]"), "{warning}");
            assert!(!warning.contains("hook"), "{warning}");
            assert!(warning.contains("main_if_requested()"), "{warning}");
        } else {
            assert_eq!(warning, None);
        }
        assert_eq!(unguarded_exec_warning(&with_exec, true), None);
        let without_exec =
            config("[task.hook]\nhandler = \"http\"\nurl = \"http://example.com/\"\n");
        assert_eq!(unguarded_exec_warning(&without_exec, false), None);
    }
}
