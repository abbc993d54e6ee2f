//! The handler API: what a task handler receives and how it reports failure.
//! Register async handlers by task name in a [`Registry`]; built-in `exec`
//! handlers come from config.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use cronpipe_shared::Envelope;
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

/// One attempt of a task, as a handler sees it.
#[derive(Debug, Clone)]
pub struct Task {
    /// The message.
    pub envelope: Envelope,
    /// Attempt number (crashed attempts included).
    pub attempt: u32,
    /// The worker running it.
    pub worker: String,
    /// Cancelled when the attempt timed out or the worker is stopping; handlers
    /// that hold resources should stop promptly.
    pub cancel: CancellationToken,
}

/// Details of a failed attempt, kept in dead letters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailureDetail {
    /// Exit code of a process.
    pub exit_code: Option<i32>,
    /// HTTP status of a call.
    pub http_status: Option<u16>,
    /// Tail of the output.
    pub output_tail: String,
}

/// A failed attempt: retryable or permanent.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TaskError {
    /// Try again later (after `retry_after` if given, else by the retry policy).
    #[error("{message}")]
    Retryable {
        /// What went wrong.
        message: String,
        /// Earliest time to try again, if the handler knows it.
        retry_after: Option<Duration>,
        /// Extra detail.
        detail: FailureDetail,
    },
    /// Do not try again: dead-letter at once.
    #[error("{message}")]
    Permanent {
        /// What went wrong.
        message: String,
        /// Extra detail.
        detail: FailureDetail,
    },
}

impl TaskError {
    /// A retryable failure.
    pub fn retryable(message: impl Into<String>) -> Self {
        TaskError::Retryable {
            message: message.into(),
            retry_after: None,
            detail: FailureDetail::default(),
        }
    }

    /// A retryable failure that should wait at least `after`.
    pub fn retry_after(message: impl Into<String>, after: Duration) -> Self {
        TaskError::Retryable {
            message: message.into(),
            retry_after: Some(after),
            detail: FailureDetail::default(),
        }
    }

    /// A permanent failure.
    pub fn permanent(message: impl Into<String>) -> Self {
        TaskError::Permanent {
            message: message.into(),
            detail: FailureDetail::default(),
        }
    }

    /// The failure detail.
    pub fn detail(&self) -> &FailureDetail {
        match self {
            TaskError::Retryable { detail, .. } | TaskError::Permanent { detail, .. } => detail,
        }
    }
}

/// A task handler.
pub trait Handler: Send + Sync + 'static {
    /// Runs one attempt.
    fn handle(&self, task: Task) -> BoxFuture<'static, Result<(), TaskError>>;
}

impl<F, Fut> Handler for F
where
    F: Fn(Task) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), TaskError>> + Send + 'static,
{
    fn handle(&self, task: Task) -> BoxFuture<'static, Result<(), TaskError>> {
        Box::pin(self(task))
    }
}

/// Handlers by task name.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, Arc<dyn Handler>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// Registers `handler` for `task`, replacing any earlier one.
    pub fn register(mut self, task: impl Into<String>, handler: impl Handler) -> Self {
        self.handlers.insert(task.into(), Arc::new(handler));
        self
    }

    /// The handler of `task`.
    pub fn get(&self, task: &str) -> Option<Arc<dyn Handler>> {
        self.handlers.get(task).cloned()
    }

    /// Whether a handler is registered for `task`.
    pub fn contains(&self, task: &str) -> bool {
        self.handlers.contains_key(task)
    }

    /// Registered task names.
    pub fn tasks(&self) -> impl Iterator<Item = &str> {
        self.handlers.keys().map(String::as_str)
    }
}
