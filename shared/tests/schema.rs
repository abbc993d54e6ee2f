//! The envelope JSON Schema (`docs/envelope.schema.json`) against the Rust
//! decoder (`Envelope::decode`): what Rust writes validates, hand-written
//! samples get the same verdict from both, and the schema's documentation of
//! the scheduled-id rule matches the code. This is what keeps the published
//! contract and the worker from drifting apart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use chrono::{DateTime, TimeZone, Utc};
use cronpipe_shared::envelope::{slot_id, Envelope, MAX_NAME_LEN, SLOT_ID_NAMESPACE};
use serde_json::{json, Value};

fn docs_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs")
}

fn read_json(path: &std::path::Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn schema() -> Value {
    read_json(&docs_dir().join("envelope.schema.json"))
}

/// The validator, with `format` asserted: in draft 2020-12 `format` is only an
/// annotation unless validation of formats is switched on, and `date-time` is
/// part of the contract.
fn validator() -> jsonschema::Validator {
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&schema())
        .expect("the schema compiles")
}

/// Every schema error for `instance`, as "message at /path".
fn schema_errors(v: &jsonschema::Validator, instance: &Value) -> Vec<String> {
    v.iter_errors(instance)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect()
}

fn decode(instance: &Value) -> Result<Envelope, cronpipe_shared::envelope::EnvelopeError> {
    Envelope::decode(&serde_json::to_vec(instance).unwrap())
}

/// Both the schema and the decoder accept `instance`.
fn assert_both_accept(v: &jsonschema::Validator, name: &str, instance: &Value) -> Envelope {
    let errors = schema_errors(v, instance);
    assert!(
        errors.is_empty(),
        "{name}: the schema rejects it: {errors:?}\n{instance}"
    );
    match decode(instance) {
        Ok(env) => env,
        Err(e) => {
            panic!("{name}: the schema accepts it but Envelope::decode rejects it: {e}\n{instance}")
        }
    }
}

/// Both reject `instance`; the schema for a reason that mentions `field`, the
/// decoder with reason `rust_reason`.
fn assert_both_reject(
    v: &jsonschema::Validator,
    name: &str,
    instance: &Value,
    field: &str,
    rust_reason: &str,
) {
    let errors = schema_errors(v, instance);
    assert!(
        !errors.is_empty(),
        "{name}: the schema accepts it\n{instance}"
    );
    assert!(
        errors.iter().any(|e| e.contains(field)),
        "{name}: no schema error mentions `{field}`: {errors:?}"
    );
    match decode(instance) {
        Ok(env) => panic!("{name}: the schema rejects it but Envelope::decode accepts it: {env:?}"),
        Err(e) => assert_eq!(e.reason(), rust_reason, "{name}: {e}"),
    }
}

fn minimal() -> Value {
    json!({"v": 1, "id": "a", "task": "t", "created_at": "2026-01-01T00:00:00Z"})
}

/// `minimal()` with `key` set to `value`.
fn with(key: &str, value: Value) -> Value {
    let mut m = minimal();
    m[key] = value;
    m
}

/// `minimal()` without `key`.
fn without(key: &str) -> Value {
    let mut m = minimal();
    m.as_object_mut().unwrap().remove(key);
    m
}

fn utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

// ---------------------------------------------------------------- the schema itself

#[test]
fn schema_is_a_valid_draft_2020_12_schema() {
    let s = schema();
    assert_eq!(s["$schema"], "https://json-schema.org/draft/2020-12/schema");
    if let Err(e) = jsonschema::draft202012::meta::validate(&s) {
        panic!("not a valid 2020-12 schema: {e} at {}", e.instance_path());
    }
    validator();
}

#[test]
fn schema_describes_exactly_the_envelope_fields() {
    let s = schema();
    // Every field a fully populated envelope writes, and no other.
    let slot = utc("2026-03-08T07:00:00Z");
    let mut full = Envelope::scheduled("s", slot, "t", json!({"a": 1}), 3, slot);
    full.idempotency_key = Some("k".into());
    full.replay = true;
    let written: Value = serde_json::from_slice(&full.to_json()).unwrap();
    let mut fields: Vec<&String> = written.as_object().unwrap().keys().collect();
    let props = s["properties"].as_object().unwrap();
    let mut described: Vec<&String> = props.keys().collect();
    fields.sort();
    described.sort();
    assert_eq!(fields, described, "schema properties vs Envelope fields");

    assert_eq!(s["type"], "object");
    assert_eq!(s["required"], json!(["v", "id", "task", "created_at"]));
    assert_eq!(s["additionalProperties"], json!(true));
    assert_eq!(
        s["dependentRequired"],
        json!({"schedule": ["slot"], "slot": ["schedule"]})
    );
    assert!(
        s["description"]
            .as_str()
            .unwrap()
            .contains("Unknown properties are allowed and ignored"),
        "the top-level description documents that unknown fields are ignored"
    );
    for (name, prop) in props {
        let d = prop["description"].as_str().unwrap_or_default();
        assert!(
            d.len() >= 40,
            "property `{name}` needs a real description, got {d:?}"
        );
    }
    assert_eq!(props["attempt"]["default"], json!(1));
    assert_eq!(props["replay"]["default"], json!(false));
    assert_eq!(
        s["$defs"]["name"]["maxLength"],
        json!(MAX_NAME_LEN),
        "the schema's length limit follows MAX_NAME_LEN"
    );
}

#[test]
fn documented_scheduled_id_rule_matches_slot_id() {
    let s = schema();
    let doc = s["properties"]["id"]["description"].as_str().unwrap();
    // The namespace UUID written in the description is the one the code uses.
    let ns = SLOT_ID_NAMESPACE.to_string();
    assert_eq!(ns, "6c1f0e5a-2b7d-4e8f-9a31-c4520de9173b");
    assert!(doc.contains(&format!("namespace UUID {ns}")), "{doc}");
    // The worked example in the description is right.
    let slot = utc("2026-03-08T07:00:00Z");
    let id = slot_id("nightly-report", slot);
    assert_eq!(id, "9198eaf6-dd59-5e30-9e54-bb00039aa1e3");
    assert!(doc.contains(&id), "{doc}");
    assert!(
        doc.contains("nightly-report\\n2026-03-08T07:00:00.000Z"),
        "{doc}"
    );
    // Following the description by hand (UUIDv5 over "<schedule>\n<slot, UTC,
    // millis, Z>") gives what slot_id gives, whatever offset the slot had.
    let slot = DateTime::parse_from_rfc3339("2026-06-01T09:30:15.250+02:00").unwrap();
    let by_hand = uuid::Uuid::new_v5(
        &uuid::Uuid::parse_str(&ns).unwrap(),
        "hourly\n2026-06-01T07:30:15.250Z".as_bytes(),
    );
    assert_eq!(
        slot_id("hourly", slot.with_timezone(&Utc)),
        by_hand.to_string()
    );
}

// ---------------------------------------------------------------- valid messages

#[test]
fn envelopes_written_by_rust_validate() {
    let v = validator();
    let now = Utc::now();
    let mut written = vec![
        ("new, null payload", Envelope::new("t", Value::Null)),
        (
            "new, object payload",
            Envelope::new(
                "send-invoice",
                json!({"invoice": "INV-1", "lines": [1, 2.5, "x"]}),
            ),
        ),
        ("new, string payload", Envelope::new("t", json!("hello"))),
        (
            "new, array payload",
            Envelope::new("t", json!([true, null])),
        ),
        (
            "scheduled",
            Envelope::scheduled(
                "nightly-report",
                utc("2026-03-08T07:00:00Z"),
                "report",
                json!({"kind": "daily"}),
                42,
                now,
            ),
        ),
        (
            "scheduled, fencing token 0, slot with millis",
            Envelope::scheduled(
                "s",
                utc("2026-03-08T07:00:00.123Z"),
                "t",
                Value::Null,
                0,
                now,
            ),
        ),
        (
            "scheduled, largest fencing token",
            Envelope::scheduled(
                "s",
                utc("2026-03-08T07:00:00Z"),
                "t",
                Value::Null,
                u64::MAX,
                now,
            ),
        ),
    ];
    let mut retry = Envelope::new("t", json!({}));
    retry.attempt = u32::MAX;
    retry.idempotency_key = Some("k".repeat(MAX_NAME_LEN));
    retry.replay = true;
    written.push(("retry copy, replayed", retry));
    for (name, env) in written {
        let instance: Value = serde_json::from_slice(&env.to_json()).unwrap();
        let back = assert_both_accept(&v, name, &instance);
        assert_eq!(back, env, "{name}: round trip");
    }
}

#[test]
fn hand_written_valid_samples_are_accepted_by_both() {
    let v = validator();
    let ascii_256 = "x".repeat(256);
    let four_byte_64 = "🦀".repeat(64); // 256 bytes
    let samples = [
        ("minimal", minimal()),
        (
            "unknown fields are ignored",
            with("trace_id", json!({"any": ["thing"]})),
        ),
        (
            "offset created_at",
            with("created_at", json!("2026-01-01T08:00:00+08:00")),
        ),
        (
            "negative offset, fraction",
            with("created_at", json!("2026-01-01T00:00:00.5-05:30")),
        ),
        (
            "nanoseconds",
            with("created_at", json!("2026-01-01T00:00:00.123456789Z")),
        ),
        (
            "more than 9 fraction digits",
            with("created_at", json!("2026-01-01T00:00:00.1234567891234Z")),
        ),
        (
            "lowercase t and z",
            with("created_at", json!("2026-01-01t00:00:00z")),
        ),
        (
            "leap second",
            with("created_at", json!("2016-12-31T23:59:60Z")),
        ),
        (
            "leap day",
            with("created_at", json!("2024-02-29T12:00:00Z")),
        ),
        ("payload null", with("payload", Value::Null)),
        ("payload number", with("payload", json!(-1.5))),
        (
            "payload object",
            with("payload", json!({"nested": {"deep": [1, {"x": null}]}})),
        ),
        ("attempt 1", with("attempt", json!(1))),
        ("attempt u32::MAX", with("attempt", json!(u32::MAX))),
        (
            "idempotency key",
            with("idempotency_key", json!("order:42")),
        ),
        ("replay false", with("replay", json!(false))),
        ("replay true", with("replay", json!(true))),
        ("fencing token 0", with("fencing_token", json!(0))),
        (
            "fencing token u64::MAX",
            with("fencing_token", json!(u64::MAX)),
        ),
        ("id of 256 ASCII characters", with("id", json!(ascii_256))),
        (
            "id of 64 four-byte characters",
            with("id", json!(four_byte_64)),
        ),
        (
            "non-ASCII task",
            with("task", json!("rapport-journalier-été")),
        ),
        ("one-character names", with("idempotency_key", json!("k"))),
        ("schedule and slot", {
            let mut m = minimal();
            m["schedule"] = json!("nightly");
            m["slot"] = json!("2026-01-01T03:00:00+01:00");
            m["fencing_token"] = json!(5);
            m
        }),
    ];
    for (name, sample) in &samples {
        assert_both_accept(&v, name, sample);
    }
    // Defaults the schema documents are the decoder's defaults.
    let env = assert_both_accept(&v, "minimal", &minimal());
    let props = &schema()["properties"];
    assert_eq!(json!(env.attempt), props["attempt"]["default"]);
    assert_eq!(json!(env.replay), props["replay"]["default"]);
    assert_eq!(env.payload, Value::Null);
}

#[test]
fn published_examples_are_accepted_and_follow_the_id_rule() {
    let v = validator();
    let mut examples: Vec<(String, Value)> = schema()["examples"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, e)| (format!("schema examples[{i}]"), e.clone()))
        .collect();
    assert!(examples.len() >= 2, "the schema has examples");
    let dir = docs_dir().join("examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no examples in {}", dir.display());
    for f in files {
        examples.push((f.display().to_string(), read_json(&f)));
    }
    let mut scheduled = 0;
    for (name, example) in &examples {
        let env = assert_both_accept(&v, name, example);
        if let (Some(schedule), Some(slot)) = (&env.schedule, env.slot) {
            scheduled += 1;
            assert_eq!(
                env.id,
                slot_id(schedule, slot),
                "{name}: a scheduled fire's id is the UUIDv5 of its schedule and slot"
            );
        }
    }
    assert!(scheduled >= 2, "examples include scheduled fires");
}

// ---------------------------------------------------------------- invalid messages

#[test]
fn invalid_samples_are_rejected_by_both() {
    let v = validator();
    let invalid = [
        ("v = 2", with("v", json!(2)), "v", "unsupported_version"),
        ("v = 0", with("v", json!(0)), "v", "unsupported_version"),
        (
            "v as a string",
            with("v", json!("1")),
            "v",
            "unsupported_version",
        ),
        ("v null", with("v", Value::Null), "v", "unsupported_version"),
        ("missing v", without("v"), "v", "invalid_envelope"),
        ("missing id", without("id"), "id", "invalid_envelope"),
        ("missing task", without("task"), "task", "invalid_envelope"),
        (
            "missing created_at",
            without("created_at"),
            "created_at",
            "invalid_envelope",
        ),
        ("empty id", with("id", json!("")), "id", "invalid_envelope"),
        (
            "empty task",
            with("task", json!("")),
            "task",
            "invalid_envelope",
        ),
        (
            "id of 257 bytes",
            with("id", json!("x".repeat(257))),
            "id",
            "invalid_envelope",
        ),
        (
            "id not a string",
            with("id", json!(42)),
            "id",
            "invalid_envelope",
        ),
        (
            "task not a string",
            with("task", json!(["t"])),
            "task",
            "invalid_envelope",
        ),
        (
            "task null",
            with("task", Value::Null),
            "task",
            "invalid_envelope",
        ),
        (
            "empty idempotency_key",
            with("idempotency_key", json!("")),
            "idempotency_key",
            "invalid_envelope",
        ),
        (
            "idempotency_key of 257 bytes",
            with("idempotency_key", json!("k".repeat(257))),
            "idempotency_key",
            "invalid_envelope",
        ),
        (
            "attempt 0",
            with("attempt", json!(0)),
            "attempt",
            "invalid_envelope",
        ),
        (
            "attempt negative",
            with("attempt", json!(-1)),
            "attempt",
            "invalid_envelope",
        ),
        (
            "attempt above u32",
            with("attempt", json!(u64::from(u32::MAX) + 1)),
            "attempt",
            "invalid_envelope",
        ),
        (
            "attempt as a string",
            with("attempt", json!("2")),
            "attempt",
            "invalid_envelope",
        ),
        (
            "schedule without slot",
            with("schedule", json!("nightly")),
            "slot",
            "invalid_envelope",
        ),
        (
            "slot without schedule",
            with("slot", json!("2026-01-01T03:00:00Z")),
            "schedule",
            "invalid_envelope",
        ),
        (
            "empty schedule",
            {
                let mut m = with("schedule", json!(""));
                m["slot"] = json!("2026-01-01T03:00:00Z");
                m
            },
            "schedule",
            "invalid_envelope",
        ),
        (
            "slot not a date-time",
            {
                let mut m = with("schedule", json!("nightly"));
                m["slot"] = json!("tomorrow at 3");
                m
            },
            "slot",
            "invalid_envelope",
        ),
        (
            "created_at not a date-time",
            with("created_at", json!("yesterday")),
            "created_at",
            "invalid_envelope",
        ),
        (
            "created_at a date only",
            with("created_at", json!("2026-01-01")),
            "created_at",
            "invalid_envelope",
        ),
        (
            "created_at without offset",
            with("created_at", json!("2026-01-01T00:00:00")),
            "created_at",
            "invalid_envelope",
        ),
        (
            "created_at on a day that does not exist",
            with("created_at", json!("2026-02-29T00:00:00Z")),
            "created_at",
            "invalid_envelope",
        ),
        (
            "created_at hour 24",
            with("created_at", json!("2026-01-01T24:00:00Z")),
            "created_at",
            "invalid_envelope",
        ),
        (
            "created_at as a number",
            with("created_at", json!(1_767_225_600)),
            "created_at",
            "invalid_envelope",
        ),
        (
            "fencing_token negative",
            with("fencing_token", json!(-1)),
            "fencing_token",
            "invalid_envelope",
        ),
        (
            "fencing_token as a string",
            with("fencing_token", json!("7")),
            "fencing_token",
            "invalid_envelope",
        ),
        (
            "replay as a string",
            with("replay", json!("yes")),
            "replay",
            "invalid_envelope",
        ),
    ];
    for (name, sample, field, reason) in &invalid {
        assert_both_reject(&v, name, sample, field, reason);
    }
    // Not an object at all.
    for body in [json!([1]), json!("envelope"), json!(1), Value::Null] {
        assert!(!v.is_valid(&body), "schema accepts {body}");
        assert_eq!(
            decode(&body).unwrap_err().reason(),
            "invalid_envelope",
            "{body}"
        );
    }
}

#[test]
fn the_schema_accepts_only_what_the_worker_is_sure_to_accept() {
    // Names: the worker counts bytes, the schema characters; the schema keeps
    // to strings that fit in 256 bytes whatever their characters.
    let v = validator();
    let over = "é".repeat(129); // 129 characters, 258 bytes
    assert!(decode(&with("id", json!(over))).is_err());
    assert!(
        !v.is_valid(&with("id", json!(over))),
        "schema accepts 258 bytes"
    );
    let fits = "é".repeat(100); // 200 bytes: fine for the worker, beyond what the schema can prove
    assert!(decode(&with("id", json!(fits))).is_ok());
    assert!(!v.is_valid(&with("id", json!(fits))));
    assert!(v.is_valid(&with("id", json!("é".repeat(64)))));
    // The schema is stricter than the decoder here too: null for an optional
    // field, and a space instead of `T` in a date-time.
    let lenient = [
        with("idempotency_key", Value::Null),
        with("created_at", json!("2026-01-01 00:00:00Z")),
    ];
    for sample in lenient {
        assert!(!v.is_valid(&sample), "{sample}");
        assert!(decode(&sample).is_ok(), "{sample}");
    }
}

#[test]
fn integers_with_a_fraction_are_the_one_documented_gap() {
    // JSON Schema cannot tell 1.0 from 1, serde can; the top-level description
    // tells publishers to write plain integers. If this test starts failing,
    // the gap has closed (or moved): update the description.
    let v = validator();
    let doc = schema()["description"].as_str().unwrap().to_string();
    assert!(doc.contains("`1`, not `1.0` or `1e0`"), "{doc}");
    for (field, value) in [
        ("v", json!(1.0)),
        ("attempt", json!(2.0)),
        ("fencing_token", json!(3.0)),
    ] {
        let sample = with(field, value);
        assert!(v.is_valid(&sample), "{sample}");
        assert!(decode(&sample).is_err(), "{sample}");
    }
    let slot = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    // What cronpipe writes never has that form.
    let text =
        String::from_utf8(Envelope::scheduled("s", slot, "t", Value::Null, 9, slot).to_json())
            .unwrap();
    assert!(
        text.contains("\"v\":1,")
            && text.contains("\"attempt\":1,")
            && text.contains("\"fencing_token\":9"),
        "{text}"
    );
}
