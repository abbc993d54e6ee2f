//! The task message envelope (v1): the public contract between anything that
//! publishes tasks and the workers that run them. Its JSON Schema lives at
//! `docs/envelope.schema.json`; this module is the Rust side of the same rules.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The envelope schema version this build writes and accepts.
pub const SCHEMA_VERSION: u32 = 1;

/// Namespace of the UUIDv5 ids given to scheduled fires. Other programs can
/// compute the same id: `uuidv5(SLOT_ID_NAMESPACE, "<schedule>\n<slot as RFC 3339 UTC, millis, Z>")`.
pub const SLOT_ID_NAMESPACE: Uuid = Uuid::from_bytes([
    0x6c, 0x1f, 0x0e, 0x5a, 0x2b, 0x7d, 0x4e, 0x8f, 0x9a, 0x31, 0xc4, 0x52, 0x0d, 0xe9, 0x17, 0x3b,
]);

/// Longest task name, schedule name, id or idempotency key accepted.
pub const MAX_NAME_LEN: usize = 256;

/// A task message. Serialized as JSON; unknown fields are ignored so that
/// minor additions stay compatible within one schema version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Schema version; always [`SCHEMA_VERSION`] when written by this build.
    pub v: u32,
    /// Message id. Deterministic for scheduled fires (see [`slot_id`]).
    pub id: String,
    /// Name of the task; the worker maps it to a handler.
    pub task: String,
    /// Arbitrary JSON given to the handler.
    #[serde(default)]
    pub payload: serde_json::Value,
    /// Key under which the worker records that the task ran. Defaults to `id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Attempt number, starting at 1. Retry copies carry the next number.
    #[serde(default = "first_attempt")]
    pub attempt: u32,
    /// When the message (its first attempt) was created.
    pub created_at: DateTime<Utc>,
    /// Name of the schedule that fired this task, for scheduled fires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// The slot instant (UTC) the schedule fired for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<DateTime<Utc>>,
    /// Fencing token of the producer leadership that published this fire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fencing_token: Option<u64>,
    /// Set on copies republished from the dead-letter queue by an operator.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replay: bool,
}

fn first_attempt() -> u32 {
    1
}

/// Why a message body is not a usable envelope. Every variant is permanent:
/// the same bytes will never decode, so the message belongs in the dead-letter queue.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// The body is not JSON at all.
    #[error("message body is not valid JSON: {0}")]
    NotJson(String),
    /// The body is JSON, but its `v` is not a version this worker understands.
    #[error("unsupported envelope version {found} (this worker understands v{SCHEMA_VERSION})")]
    UnsupportedVersion {
        /// The version found in the message (as written).
        found: String,
    },
    /// The body is JSON of the right version but breaks a field rule.
    #[error("invalid envelope: {0}")]
    Invalid(String),
}

impl EnvelopeError {
    /// Short machine-readable reason, used in dead letters and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            EnvelopeError::NotJson(_) => "invalid_json",
            EnvelopeError::UnsupportedVersion { .. } => "unsupported_version",
            EnvelopeError::Invalid(_) => "invalid_envelope",
        }
    }
}

/// The deterministic id of a scheduled fire: the same schedule and slot always
/// give the same id, so a slot published twice (after a failover) runs once.
pub fn slot_id(schedule: &str, slot: DateTime<Utc>) -> String {
    let name = format!(
        "{schedule}\n{}",
        slot.to_rfc3339_opts(SecondsFormat::Millis, true)
    );
    Uuid::new_v5(&SLOT_ID_NAMESPACE, name.as_bytes()).to_string()
}

impl Envelope {
    /// An ad-hoc task with a random id.
    pub fn new(task: impl Into<String>, payload: serde_json::Value) -> Self {
        Envelope {
            v: SCHEMA_VERSION,
            id: Uuid::new_v4().to_string(),
            task: task.into(),
            payload,
            idempotency_key: None,
            attempt: 1,
            created_at: Utc::now(),
            schedule: None,
            slot: None,
            fencing_token: None,
            replay: false,
        }
    }

    /// The message for one schedule slot, with its deterministic id.
    pub fn scheduled(
        schedule: &str,
        slot: DateTime<Utc>,
        task: impl Into<String>,
        payload: serde_json::Value,
        fencing_token: u64,
        now: DateTime<Utc>,
    ) -> Self {
        Envelope {
            v: SCHEMA_VERSION,
            id: slot_id(schedule, slot),
            task: task.into(),
            payload,
            idempotency_key: None,
            attempt: 1,
            created_at: now,
            schedule: Some(schedule.to_string()),
            slot: Some(slot),
            fencing_token: Some(fencing_token),
            replay: false,
        }
    }

    /// The idempotency key: the explicit one, or the id.
    pub fn key(&self) -> &str {
        self.idempotency_key.as_deref().unwrap_or(&self.id)
    }

    /// Serializes to the JSON wire form.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing this struct cannot fail: every field is a plain JSON value.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses and checks a message body.
    pub fn decode(body: &[u8]) -> Result<Envelope, EnvelopeError> {
        // Fast path, one pass: a well-formed envelope of this version. Anything
        // else takes the slow path below, which tells why it is unusable.
        if let Ok(env) = serde_json::from_slice::<Envelope>(body) {
            if env.v == SCHEMA_VERSION {
                env.check()?;
                return Ok(env);
            }
        }
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| EnvelopeError::NotJson(e.to_string()))?;
        let obj = value
            .as_object()
            .ok_or_else(|| EnvelopeError::Invalid("expected a JSON object".into()))?;
        match obj.get("v") {
            Some(serde_json::Value::Number(n)) if n.as_u64() == Some(u64::from(SCHEMA_VERSION)) => {
            }
            Some(other) => {
                return Err(EnvelopeError::UnsupportedVersion {
                    found: other.to_string(),
                })
            }
            None => {
                return Err(EnvelopeError::Invalid(
                    "missing field `v` (schema version)".into(),
                ))
            }
        }
        let env: Envelope =
            serde_json::from_value(value).map_err(|e| EnvelopeError::Invalid(e.to_string()))?;
        env.check()?;
        Ok(env)
    }

    /// Field rules that serde's types alone do not enforce (mirrors the schema).
    fn check(&self) -> Result<(), EnvelopeError> {
        let non_empty = |field: &str, value: &str| {
            if value.is_empty() || value.len() > MAX_NAME_LEN {
                Err(EnvelopeError::Invalid(format!(
                    "field `{field}` must be 1 to {MAX_NAME_LEN} bytes, got {} bytes",
                    value.len()
                )))
            } else {
                Ok(())
            }
        };
        non_empty("id", &self.id)?;
        non_empty("task", &self.task)?;
        if let Some(key) = &self.idempotency_key {
            non_empty("idempotency_key", key)?;
        }
        if let Some(schedule) = &self.schedule {
            non_empty("schedule", schedule)?;
        }
        if self.attempt == 0 {
            return Err(EnvelopeError::Invalid(
                "field `attempt` must be 1 or more, got 0".into(),
            ));
        }
        if self.schedule.is_some() != self.slot.is_some() {
            return Err(EnvelopeError::Invalid(
                "fields `schedule` and `slot` go together: give both or neither".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn slot_ids_are_deterministic_and_distinct() {
        let slot = Utc.with_ymd_and_hms(2026, 3, 8, 7, 0, 0).unwrap();
        assert_eq!(slot_id("nightly", slot), slot_id("nightly", slot));
        assert_ne!(slot_id("nightly", slot), slot_id("hourly", slot));
        assert_ne!(
            slot_id("nightly", slot),
            slot_id("nightly", slot + chrono::Duration::seconds(1))
        );
        // Pinned: other languages compute the same id from the documented rule.
        assert_eq!(
            slot_id("nightly", slot),
            Uuid::new_v5(&SLOT_ID_NAMESPACE, b"nightly\n2026-03-08T07:00:00.000Z").to_string()
        );
    }

    #[test]
    fn round_trip() {
        let slot = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let env = Envelope::scheduled("s", slot, "t", serde_json::json!({"a": [1, 2]}), 7, slot);
        let back = Envelope::decode(&env.to_json()).unwrap();
        assert_eq!(env, back);
        assert_eq!(back.key(), back.id);
        let mut adhoc = Envelope::new("t", serde_json::json!(null));
        adhoc.idempotency_key = Some("k1".into());
        let back = Envelope::decode(&adhoc.to_json()).unwrap();
        assert_eq!(back.key(), "k1");
        assert_eq!(back, adhoc);
    }

    #[test]
    fn decode_errors_are_classified() {
        assert_eq!(
            Envelope::decode(b"{nope").unwrap_err().reason(),
            "invalid_json"
        );
        let e =
            Envelope::decode(br#"{"v":2,"id":"a","task":"t","created_at":"2026-01-01T00:00:00Z"}"#)
                .unwrap_err();
        assert_eq!(e.reason(), "unsupported_version");
        assert!(e.to_string().contains("version 2"), "{e}");
        let e = Envelope::decode(br#"{"v":1,"id":"a","created_at":"2026-01-01T00:00:00Z"}"#)
            .unwrap_err();
        assert_eq!(e.reason(), "invalid_envelope");
        assert!(e.to_string().contains("task"), "{e}");
        let e =
            Envelope::decode(br#"{"v":1,"id":"","task":"t","created_at":"2026-01-01T00:00:00Z"}"#)
                .unwrap_err();
        assert!(e.to_string().contains("`id`"), "{e}");
        let e = Envelope::decode(br#"[1]"#).unwrap_err();
        assert_eq!(e.reason(), "invalid_envelope");
        let e = Envelope::decode(
            br#"{"v":1,"id":"a","task":"t","created_at":"2026-01-01T00:00:00Z","schedule":"s"}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("slot"), "{e}");
    }

    #[test]
    fn minimal_foreign_message_gets_defaults() {
        let env = Envelope::decode(
            br#"{"v":1,"id":"x1","task":"t","created_at":"2026-01-01T00:00:00+02:00","extra":true}"#,
        )
        .unwrap();
        assert_eq!(env.attempt, 1);
        assert_eq!(env.payload, serde_json::Value::Null);
        assert_eq!(env.key(), "x1");
        assert_eq!(
            env.created_at,
            Utc.with_ymd_and_hms(2025, 12, 31, 22, 0, 0).unwrap()
        );
    }
}
