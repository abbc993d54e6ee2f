//! The dead-letter record: what lands in a dead-letter queue, the original
//! message plus why it could not run. Same shape on every broker.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::envelope::Envelope;

/// Why a message was dead-lettered (machine-readable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadReason {
    /// The body is not JSON.
    InvalidJson,
    /// The envelope's `v` is not supported.
    UnsupportedVersion,
    /// The envelope breaks a field rule.
    InvalidEnvelope,
    /// No handler is configured for the task.
    UnknownTask,
    /// The body exceeds `worker.max_message_bytes`.
    TooLarge,
    /// The handler said the failure is permanent.
    PermanentError,
    /// The task failed on its last allowed attempt (crashes included).
    MaxAttempts,
}

impl DeadReason {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::InvalidJson => "invalid_json",
            DeadReason::UnsupportedVersion => "unsupported_version",
            DeadReason::InvalidEnvelope => "invalid_envelope",
            DeadReason::UnknownTask => "unknown_task",
            DeadReason::TooLarge => "too_large",
            DeadReason::PermanentError => "permanent_error",
            DeadReason::MaxAttempts => "max_attempts",
        }
    }
}

/// One dead letter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Record format version.
    pub v: u32,
    /// Why.
    pub reason: DeadReason,
    /// Human-readable error text.
    pub error: String,
    /// The original envelope, when the message was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envelope: Option<Envelope>,
    /// The original body (lossy UTF-8, truncated) when it was not a usable envelope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<String>,
    /// Attempts made (crashed ones included).
    pub attempts: u32,
    /// Exit code of the last `exec` attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// HTTP status of the last `http` attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// Tail of the task's output.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub output_tail: String,
    /// The worker that gave up.
    pub worker: String,
    /// When the message was first created, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_seen_at: Option<DateTime<Utc>>,
    /// When it was dead-lettered.
    pub dead_lettered_at: DateTime<Utc>,
}

/// Longest raw body kept in a dead letter.
pub const MAX_RAW_BYTES: usize = 64 * 1024;

impl DeadLetter {
    /// Serializes to JSON.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// A raw body, kept as lossy UTF-8 and truncated to [`MAX_RAW_BYTES`].
    pub fn raw_body(body: &[u8]) -> String {
        let cut = &body[..body.len().min(MAX_RAW_BYTES)];
        String::from_utf8_lossy(cut).into_owned()
    }
}
