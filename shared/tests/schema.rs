//! probe
#![allow(clippy::unwrap_used, clippy::expect_used)]
use cronpipe_shared::Envelope;
use serde_json::{json, Value};

fn schema() -> Value {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/envelope.schema.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn probe() {
    let v = jsonschema::draft202012::options().should_validate_formats(true).build(&schema()).unwrap();
    let base = r#"{"v":1,"id":"a","task":"t","created_at":"2026-01-01T00:00:00Z"}"#;
    let cases = [
        base.to_string(),
        base.replace("\"v\":1", "\"v\":1.0"),
        base.replace("\"v\":1", "\"v\":1e0"),
        base.replace("\"task\":\"t\"", "\"task\":\"t\",\"attempt\":2.0"),
        base.replace("\"task\":\"t\"", "\"task\":\"t\",\"fencing_token\":18446744073709551615"),
        base.replace("\"task\":\"t\"", "\"task\":\"t\",\"fencing_token\":18446744073709551616"),
        base.replace("\"task\":\"t\"", "\"task\":\"t\",\"fencing_token\":1.8446744073709552e19"),
        base.replace("\"task\":\"t\"", "\"task\":\"t\",\"attempt\":4294967295"),
        base.replace("\"task\":\"t\"", "\"task\":\"t\",\"attempt\":4294967296"),
        base.replace("2026-01-01T00:00:00Z", "2016-12-31T23:59:60Z"),
        base.replace("2026-01-01T00:00:00Z", "2016-12-31T15:59:60-08:00"),
        base.replace("2026-01-01T00:00:00Z", "2026-01-01t00:00:00z"),
        base.replace("2026-01-01T00:00:00Z", "2026-01-01T00:00:00.1234567890123Z"),
        base.replace("2026-01-01T00:00:00Z", "0000-01-01T00:00:00Z"),
        base.replace("2026-01-01T00:00:00Z", "2026-01-01T00:00:00+23:59"),
        base.replace("2026-01-01T00:00:00Z", "2026-01-01T00:00:00-00:00"),
        base.replace("2026-01-01T00:00:00Z", "2026-01-01 00:00:00Z"),
        base.replace("2026-01-01T00:00:00Z", "2026-02-29T00:00:00Z"),
        base.replace("2026-01-01T00:00:00Z", "2024-02-29T00:00:00Z"),
        base.replace("2026-01-01T00:00:00Z", "9999-12-31T23:59:59.999Z"),
        base.replace("\"id\":\"a\"", &format!("\"id\":\"{}\"", "é".repeat(200))),
        base.replace("\"task\":\"t\"", "\"task\":\"t\",\"schedule\":null,\"slot\":null"),
        base.replace("\"task\":\"t\"", "\"task\":\"t\",\"payload\":null"),
    ];
    for c in cases {
        let inst: Value = serde_json::from_str(&c).unwrap();
        let s = v.is_valid(&inst);
        let r = Envelope::decode(c.as_bytes());
        println!("schema={s:5} rust={:5} {c:.140} {}", r.is_ok(), r.as_ref().err().map(|e| e.to_string()).unwrap_or_default());
    }
    let _ = json!(1);
}
