//! The Rust handler of `examples/custom_handler.rs`, in the library so the
//! example and its integration test run the very same code.
//!
//! Task `greet` takes a payload `{"name": "Ada", "fail_before_attempt": 2}`:
//! a missing or empty `name` is a permanent error (the message can never
//! succeed), attempts before `fail_before_attempt` fail with a retryable error
//! (standing in for a flaky dependency), and a success records the greeting.

use std::sync::{Arc, Mutex};

use crate::handler::{Registry, Task, TaskError};

/// The task name the example registers.
pub const GREET_TASK: &str = "greet";

/// Greetings made so far, in order; shared between the handler and its owner.
#[derive(Debug, Clone, Default)]
pub struct Greetings(Arc<Mutex<Vec<String>>>);

impl Greetings {
    /// A copy of the greetings made so far.
    pub fn list(&self) -> Vec<String> {
        self.0.lock().map(|g| g.clone()).unwrap_or_default()
    }

    fn push(&self, greeting: String) {
        if let Ok(mut g) = self.0.lock() {
            g.push(greeting);
        }
    }
}

/// Handles one attempt of a `greet` task.
pub async fn greet(task: Task, greetings: Greetings) -> Result<(), TaskError> {
    let payload = &task.envelope.payload;
    let name = payload
        .get("name")
        .and_then(|n| n.as_str())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| TaskError::permanent("payload has no `name` to greet"))?;
    let fail_before = payload
        .get("fail_before_attempt")
        .and_then(|n| n.as_u64())
        .unwrap_or(0);
    if u64::from(task.attempt) < fail_before {
        return Err(TaskError::retryable(format!(
            "greeting service unavailable (attempt {})",
            task.attempt
        )));
    }
    let greeting = format!("Hello, {name}!");
    tracing::info!(task_id = %task.envelope.id, %greeting, "Greeted");
    greetings.push(greeting);
    Ok(())
}

/// Registers the `greet` handler in `registry`, recording into `greetings`.
pub fn register(registry: Registry, greetings: Greetings) -> Registry {
    registry.register(GREET_TASK, move |task: Task| greet(task, greetings.clone()))
}
