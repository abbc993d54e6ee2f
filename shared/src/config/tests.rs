//! Config tests: one per validation rule, each checking that the error names
//! the file, the key path, the bad value and what was expected; plus defaults,
//! environment overrides and the per-task lookups.
//!
//! Every test passes its environment explicitly, so the process environment
//! (which may well hold `CRONPIPE__*` variables) never leaks in.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use super::*;

const FILE: &str = "cronpipe.toml";

/// A task section that makes schedules pointing at `report` valid.
const REPORT_TASK: &str = "\n[task.report]\nhandler = \"rust\"\n";

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn parse_env(text: &str, pairs: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
    Config::parse(Path::new(FILE), text, env(pairs))
}

fn parse_ok(text: &str, pairs: &[(&str, &str)]) -> Config {
    match parse_env(text, pairs) {
        Ok(c) => c,
        Err(e) => panic!("expected a valid config, got:\n{e}\n--- config ---\n{text}"),
    }
}

fn parse_err(text: &str, pairs: &[(&str, &str)]) -> ConfigErrors {
    match parse_env(text, pairs) {
        Ok(c) => {
            panic!("expected config errors, got a valid config: {c:?}\n--- config ---\n{text}")
        }
        Err(e) => e,
    }
}

/// The single error `text` produces (fails if there are none or several).
fn only_error(text: &str, pairs: &[(&str, &str)]) -> ConfigError {
    let errs = parse_err(text, pairs);
    assert_eq!(errs.0.len(), 1, "expected exactly one error, got:\n{errs}");
    errs.0.into_iter().next().unwrap()
}

/// Asserts `e` is attributed to the config file and `key`, renders on one
/// line, and that the rendering names `bad` (the offending value) and every
/// fragment of what was expected.
fn check(e: &ConfigError, key: &str, bad: &str, expected: &[&str]) {
    let line = e.to_string();
    assert_eq!(e.file, Path::new(FILE), "{line}");
    assert_eq!(e.key, key, "wrong key path in: {line}");
    assert!(
        line.starts_with(&format!("{FILE}: {key}")),
        "should start with file and key: {line}"
    );
    assert!(!line.contains('\n'), "should be one line: {line:?}");
    assert!(
        line.contains(bad),
        "should name the bad value {bad:?}: {line}"
    );
    for fragment in expected {
        assert!(
            line.contains(fragment),
            "should say what was expected ({fragment:?}): {line}"
        );
    }
}

/// The error at `key` among several.
fn error_at<'a>(errs: &'a ConfigErrors, key: &str) -> &'a ConfigError {
    errs.0
        .iter()
        .find(|e| e.key == key)
        .unwrap_or_else(|| panic!("no error at {key}; got:\n{errs}"))
}

// ---------------------------------------------------------------- defaults

#[test]
fn empty_config_parses_with_defaults() {
    let c = parse_ok("", &[]);
    assert_eq!(c.redis.url, "redis://127.0.0.1:6379");
    assert_eq!(c.redis.namespace, "cronpipe");
    assert_eq!(c.broker.kind, BrokerKind::Rabbitmq);
    assert_eq!(
        c.broker.rabbitmq.url,
        "amqp://guest:guest@127.0.0.1:5672/%2f"
    );
    assert_eq!(c.broker.rabbitmq.queue, "cronpipe.tasks");
    assert_eq!(c.broker.rabbitmq.queue_type, QueueType::Quorum);
    assert_eq!(c.broker.rabbitmq.confirm_timeout, Dur::secs(10));
    assert_eq!(c.broker.rabbitmq.frame_max, 16_384);
    assert_eq!(c.producer.instance_id, None);
    assert_eq!(c.producer.lease_ttl, Dur::secs(5));
    assert_eq!(c.producer.misfire_threshold, Dur::secs(1));
    assert_eq!(c.worker.instance_id, None);
    assert_eq!(c.worker.concurrency, 8);
    assert_eq!(c.worker.shutdown_grace, Dur::secs(30));
    assert_eq!(c.worker.claim_ttl, Dur::secs(30));
    assert_eq!(c.worker.done_ttl, Dur::secs(24 * 3600));
    assert_eq!(c.worker.default_timeout, Dur::secs(300));
    assert_eq!(c.worker.max_message_bytes, 1024 * 1024);
    assert_eq!(c.worker.output_tail_bytes, 4096);
    assert_eq!(
        c.worker.retry,
        RetryPolicy {
            max_attempts: 5,
            initial_delay: Dur::secs(1),
            multiplier: 2.0,
            max_delay: Dur::secs(300),
            jitter: 0.2,
        }
    );
    assert_eq!(c.log.format, LogFormat::Text);
    assert_eq!(c.log.level, "info");
    assert!(c.schedules.is_empty());
    assert!(c.tasks.is_empty());
}

#[test]
fn minimal_schedule_gets_schedule_defaults() {
    let c = parse_ok(
        &format!("[schedule.nightly]\ncron = \"0 3 * * *\"\ntask = \"report\"\n{REPORT_TASK}"),
        &[],
    );
    let built = c.built_schedules().unwrap();
    assert_eq!(built.len(), 1);
    let s = &built[0];
    assert_eq!(s.name, "nightly");
    assert_eq!(s.task, "report");
    assert_eq!(s.timezone, "UTC");
    assert_eq!(s.payload, serde_json::Value::Null);
    assert_eq!(s.misfire, MisfirePolicy::FireOnce);
    assert_eq!(s.catchup_window, Duration::from_secs(24 * 3600));
    assert_eq!(s.max_catchup, 100);
    assert!(s.enabled);
    let t0 = DateTime::parse_from_rfc3339("2026-01-01T12:00:00Z")
        .unwrap()
        .with_timezone(&Utc);
    assert_eq!(
        s.schedule.next_after(t0).unwrap().to_rfc3339(),
        "2026-01-02T03:00:00+00:00"
    );
    assert_eq!(c.tasks["report"].handler, HandlerKind::Rust);
}

#[test]
fn every_documented_key_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
[redis]
url = "rediss://cache.internal:6380/2"
namespace = "prod:cronpipe"

[broker]
kind = "rabbitmq"

[broker.rabbitmq]
url = "amqps://user:pw@mq.internal:5671/prod"
queue = "prod.tasks"
queue_type = "classic"
confirm_timeout = "3s"
frame_max = 131072

[producer]
instance_id = "producer-a"
lease_ttl = "2s"
misfire_threshold = "500ms"

[worker]
instance_id = "worker-a"
concurrency = 3
shutdown_grace = "10s"
claim_ttl = "20s"
done_ttl = "7days"
default_timeout = "2m"
max_message_bytes = 2048
output_tail_bytes = 100

[worker.retry]
max_attempts = 3
initial_delay = "250ms"
multiplier = 3.0
max_delay = "1m"
jitter = 0.5

[log]
format = "json"
level = "cronpipe=debug,info"

[schedule.nightly-report]
cron = "0 3 * * *"
timezone = "Europe/London"
task = "report"
payload = {{ kind = "daily", recipients = ["ops"] }}
misfire = "fire_all"
catchup_window = "6h"
max_catchup = 10
enabled = false

[schedule.tick]
every = "90s"
anchor = "2026-01-01T00:00:07Z"
task = "backup"
misfire = "skip"

[schedule.monthly]
iso = "R5/2026-01-31T09:00:00Z/P1M"
task = "backup"

[task.report]
handler = "rust"
timeout = "30s"
retry = {{ max_attempts = 1 }}

[task.backup]
handler = "exec"
command = ["/usr/bin/env", "backup", "--all"]
env = {{ MODE = "full" }}
workdir = {workdir:?}
permanent_exit_codes = [2, 64]
"#,
        workdir = dir.path().display().to_string()
    );
    let c = parse_ok(&text, &[]);
    assert_eq!(c.redis.namespace, "prod:cronpipe");
    assert_eq!(c.broker.rabbitmq.queue_type, QueueType::Classic);
    assert_eq!(c.broker.rabbitmq.confirm_timeout, Dur::secs(3));
    assert_eq!(c.broker.rabbitmq.frame_max, 131_072);
    assert_eq!(c.producer.misfire_threshold, Dur::millis(500));
    assert_eq!(c.worker.done_ttl, Dur::secs(7 * 24 * 3600));
    assert_eq!(c.worker.retry.multiplier, 3.0);
    assert_eq!(c.log.format, LogFormat::Json);
    let nightly = &c.schedules["nightly-report"];
    assert!(!nightly.enabled);
    assert_eq!(nightly.misfire, MisfirePolicy::FireAll);
    assert_eq!(
        nightly.payload,
        Some(serde_json::json!({"kind": "daily", "recipients": ["ops"]}))
    );
    assert_eq!(c.schedules["tick"].misfire, MisfirePolicy::Skip);
    let backup = &c.tasks["backup"];
    assert_eq!(backup.command, ["/usr/bin/env", "backup", "--all"]);
    assert_eq!(backup.env["MODE"], "full");
    assert_eq!(backup.workdir.as_deref(), Some(dir.path()));
    assert_eq!(backup.permanent_exit_codes, [2, 64]);
    let built = c.built_schedules().unwrap();
    assert_eq!(built.len(), 3);
    let monthly = built.iter().find(|b| b.name == "monthly").unwrap();
    assert!(matches!(monthly.schedule, Schedule::Iso(_)));
}

#[test]
fn key_paths_quote_schedule_and_task_names() {
    let segs = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        key_path(&segs(&["schedule", "nightly-report", "cron"])),
        "schedule \"nightly-report\".cron"
    );
    assert_eq!(
        key_path(&segs(&["task", "backup", "retry", "jitter"])),
        "task \"backup\".retry.jitter"
    );
    assert_eq!(
        key_path(&segs(&["worker", "retry", "jitter"])),
        "worker.retry.jitter"
    );
    // A schedule may be called "task" without confusing the quoting.
    assert_eq!(
        key_path(&segs(&["schedule", "task", "cron"])),
        "schedule \"task\".cron"
    );
}

// ---------------------------------------------------------------- unknown keys

#[test]
fn unknown_top_level_key_is_rejected() {
    let e = only_error("shedule = 1\n", &[]);
    check(
        &e,
        "shedule",
        "unknown field `shedule`",
        &["expected one of", "`schedule`"],
    );
}

#[test]
fn unknown_key_in_schedule_is_rejected() {
    let e = only_error(
        &format!(
            "[schedule.nightly-report]\ncron = \"0 3 * * *\"\ntask = \"report\"\ncolour = \"red\"\n{REPORT_TASK}"
        ),
        &[],
    );
    check(
        &e,
        "schedule \"nightly-report\".colour",
        "unknown field `colour`",
        &["`cron`", "`every`", "`iso`"],
    );
}

#[test]
fn unknown_key_in_worker_is_rejected() {
    let e = only_error("[worker]\nconcurency = 4\n", &[]);
    check(
        &e,
        "worker.concurency",
        "unknown field `concurency`",
        &["`concurrency`"],
    );
}

#[test]
fn unknown_key_in_task_retry_is_rejected() {
    let e = only_error(
        "[task.report]\nhandler = \"rust\"\n[task.report.retry]\nattempts = 3\n",
        &[],
    );
    check(
        &e,
        "task \"report\".retry.attempts",
        "unknown field `attempts`",
        &["`max_attempts`"],
    );
}

#[test]
fn unknown_enum_value_names_the_choices() {
    let e = only_error("[broker]\nkind = \"nats\"\n", &[]);
    check(&e, "broker.kind", "`nats`", &["`rabbitmq`", "`kafka`"]);
    let e = only_error("[log]\nformat = \"xml\"\n", &[]);
    check(&e, "log.format", "`xml`", &["`text`", "`json`"]);
}

#[test]
fn invalid_toml_is_reported_with_the_file() {
    let errs = parse_err("[worker\nconcurrency = 4\n", &[]);
    assert_eq!(errs.0.len(), 1);
    let e = &errs.0[0];
    assert_eq!(e.file, Path::new(FILE));
    assert_eq!(e.key, "");
    assert!(e.message.contains("not valid TOML"), "{e}");
    assert!(e.message.contains("line 1"), "{e}");
}

// ---------------------------------------------------------------- schedules

fn schedule(name: &str, body: &str) -> String {
    format!("[schedule.{name}]\n{body}\n{REPORT_TASK}")
}

#[test]
fn bad_cron_names_the_field_and_value() {
    let e = only_error(
        &schedule("nightly-report", "cron = \"61 * * * *\"\ntask = \"report\""),
        &[],
    );
    check(
        &e,
        "schedule \"nightly-report\".cron",
        "\"61 * * * *\"",
        &["minute", "`61`", "0-59"],
    );
    assert_eq!(e.value.as_deref(), Some("\"61 * * * *\""));
}

#[test]
fn cron_with_wrong_field_count_is_rejected() {
    let e = only_error(&schedule("x", "cron = \"0 3 * *\"\ntask = \"report\""), &[]);
    check(
        &e,
        "schedule \"x\".cron",
        "\"0 3 * *\"",
        &["expected 5 fields", "got 4"],
    );
}

#[test]
fn cron_that_matches_no_time_is_rejected_and_one_that_ended_is_a_warning() {
    let e = only_error(
        &schedule("x", "cron = \"0 0 0 30 2 *\"\ntask = \"report\""),
        &[],
    );
    check(
        &e,
        "schedule \"x\".cron",
        "\"0 0 0 30 2 *\"",
        &["matches no time at all"],
    );
    // Fired for the last time in 2020: a config that loaded then still
    // loads, and says the schedule is over.
    let c = parse_ok(
        &schedule("x", "cron = \"0 0 0 1 1 * 2020\"\ntask = \"report\""),
        &[],
    );
    assert_eq!(
        c.schedule_warnings(),
        vec![
            "warning: schedule \"x\" has no slot after now (its last one has passed); it publishes nothing more"
        ]
    );
    assert!(
        parse_ok(&schedule("y", "cron = \"@daily\"\ntask = \"report\""), &[])
            .schedule_warnings()
            .is_empty()
    );
}

#[test]
fn bad_timezone_is_rejected() {
    let e = only_error(
        &schedule(
            "x",
            "cron = \"0 3 * * *\"\ntimezone = \"Mars/Olympus\"\ntask = \"report\"",
        ),
        &[],
    );
    check(
        &e,
        "schedule \"x\".timezone",
        "\"Mars/Olympus\"",
        &["IANA name"],
    );
    // A real zone is accepted and kept.
    let c = parse_ok(
        &schedule(
            "x",
            "cron = \"0 3 * * *\"\ntimezone = \"America/New_York\"\ntask = \"report\"",
        ),
        &[],
    );
    assert_eq!(c.built_schedules().unwrap()[0].timezone, "America/New_York");
}

#[test]
fn cron_and_every_both_set_is_rejected() {
    let e = only_error(
        &schedule(
            "x",
            "cron = \"0 3 * * *\"\nevery = \"1h\"\ntask = \"report\"",
        ),
        &[],
    );
    check(
        &e,
        "schedule \"x\".cron",
        "found 2",
        &["exactly one of `cron`, `every` or `iso`"],
    );
}

#[test]
fn no_timing_set_is_rejected() {
    let e = only_error(&schedule("x", "task = \"report\""), &[]);
    check(
        &e,
        "schedule \"x\".cron",
        "found 0",
        &["exactly one of `cron`, `every` or `iso`"],
    );
}

#[test]
fn bad_iso_is_rejected() {
    let e = only_error(
        &schedule("x", "iso = \"R5/2026-01-01/P1M\"\ntask = \"report\""),
        &[],
    );
    check(
        &e,
        "schedule \"x\".iso",
        "\"R5/2026-01-01/P1M\"",
        &["RFC 3339", "R5/2026-01-01T09:00:00Z/P1M"],
    );
    let e = only_error(
        &schedule(
            "x",
            "iso = \"R5/2026-01-01T00:00:00Z/P0D\"\ntask = \"report\"",
        ),
        &[],
    );
    check(
        &e,
        "schedule \"x\".iso",
        "\"R5/2026-01-01T00:00:00Z/P0D\"",
        &["longer than zero"],
    );
}

#[test]
fn iso_with_timezone_is_rejected() {
    let e = only_error(
        &schedule(
            "x",
            "iso = \"R5/2026-01-01T09:00:00Z/P1M\"\ntimezone = \"Europe/Paris\"\ntask = \"report\"",
        ),
        &[],
    );
    check(
        &e,
        "schedule \"x\".timezone",
        "\"Europe/Paris\"",
        &["remove `timezone`"],
    );
}

#[test]
fn bad_every_is_rejected() {
    let e = only_error(
        &schedule("x", "every = \"90 parsecs\"\ntask = \"report\""),
        &[],
    );
    check(
        &e,
        "schedule \"x\".every",
        "90 parsecs",
        &["expected a number with a unit", "\"30s\""],
    );
    let e = only_error(&schedule("x", "every = \"500ms\"\ntask = \"report\""), &[]);
    check(
        &e,
        "schedule \"x\".every",
        "\"500ms\"",
        &["shorter than the 1s resolution"],
    );
    let e = only_error(&schedule("x", "every = \"1500ms\"\ntask = \"report\""), &[]);
    check(
        &e,
        "schedule \"x\".every",
        "\"1500ms\"",
        &["whole number of seconds"],
    );
    parse_ok(&schedule("x", "every = \"1s\"\ntask = \"report\""), &[]);
}

#[test]
fn anchor_without_every_is_rejected() {
    let e = only_error(
        &schedule(
            "x",
            "cron = \"0 3 * * *\"\nanchor = \"2026-01-01T00:00:00Z\"\ntask = \"report\"",
        ),
        &[],
    );
    check(
        &e,
        "schedule \"x\".anchor",
        "2026-01-01T00:00:00Z",
        &["only to `every` schedules"],
    );
}

#[test]
fn bad_anchor_is_rejected_and_good_anchor_aligns_slots() {
    let e = only_error(
        &schedule(
            "x",
            "every = \"1m\"\nanchor = \"yesterday\"\ntask = \"report\"",
        ),
        &[],
    );
    check(
        &e,
        "schedule \"x\".anchor",
        "\"yesterday\"",
        &["RFC 3339 instant"],
    );
    let c = parse_ok(
        &schedule(
            "x",
            "every = \"1m\"\nanchor = \"2026-01-01T00:00:07Z\"\ntask = \"report\"",
        ),
        &[],
    );
    let t0 = DateTime::parse_from_rfc3339("2026-03-01T10:00:00Z")
        .unwrap()
        .with_timezone(&Utc);
    let next = c.built_schedules().unwrap()[0].schedule.next_after(t0);
    assert_eq!(next.unwrap().to_rfc3339(), "2026-03-01T10:00:07+00:00");
}

#[test]
fn schedule_task_without_task_section_is_rejected() {
    let e = only_error(
        &schedule("nightly", "cron = \"0 3 * * *\"\ntask = \"reprot\""),
        &[],
    );
    check(
        &e,
        "schedule \"nightly\".task",
        "\"reprot\"",
        &[
            "expected a [task.reprot] section",
            "configured tasks: report",
        ],
    );
    let e = only_error("[schedule.n]\ncron = \"0 3 * * *\"\ntask = \"t\"\n", &[]);
    check(
        &e,
        "schedule \"n\".task",
        "\"t\"",
        &["[task.t]", "configured tasks: none"],
    );
}

#[test]
fn invalid_schedule_name_is_rejected() {
    let e = only_error(
        &schedule(
            "\"nightly report\"",
            "cron = \"0 3 * * *\"\ntask = \"report\"",
        ),
        &[],
    );
    check(
        &e,
        "schedule \"nightly report\"",
        "\"nightly report\"",
        &["letters, digits, '-', '_', '.' and ':'"],
    );
    let long = "a".repeat(201);
    let e = only_error(
        &schedule(&long, "cron = \"0 3 * * *\"\ntask = \"report\""),
        &[],
    );
    check(
        &e,
        &format!("schedule \"{long}\""),
        &long,
        &["1 to 200 characters"],
    );
    // Every allowed character class, at the length limit.
    let ok = format!("Ab-9_x.y:z{}", "a".repeat(190));
    assert_eq!(ok.len(), 200);
    parse_ok(
        &schedule(
            &format!("\"{ok}\""),
            "cron = \"0 3 * * *\"\ntask = \"report\"",
        ),
        &[],
    );
}

#[test]
fn invalid_task_name_is_rejected() {
    let e = only_error("[task.\"re port\"]\nhandler = \"rust\"\n", &[]);
    check(
        &e,
        "task \"re port\"",
        "\"re port\"",
        &["1 to 200 characters"],
    );
}

#[test]
fn zero_catchup_window_and_max_catchup_are_rejected() {
    let e = only_error(
        &schedule(
            "x",
            "cron = \"0 3 * * *\"\ntask = \"report\"\ncatchup_window = \"0s\"",
        ),
        &[],
    );
    check(
        &e,
        "schedule \"x\".catchup_window",
        "\"0s\"",
        &["more than zero"],
    );
    let e = only_error(
        &schedule(
            "x",
            "cron = \"0 3 * * *\"\ntask = \"report\"\nmax_catchup = 0",
        ),
        &[],
    );
    check(&e, "schedule \"x\".max_catchup", "= 0", &["at least 1"]);
}

// ---------------------------------------------------------------- tasks

#[test]
fn exec_task_with_empty_command_is_rejected() {
    let e = only_error("[task.backup]\nhandler = \"exec\"\n", &[]);
    check(
        &e,
        "task \"backup\".command",
        "[]",
        &["exec handler needs a program"],
    );
    let e = only_error(
        "[task.backup]\nhandler = \"exec\"\ncommand = [\"\", \"x\"]\n",
        &[],
    );
    check(
        &e,
        "task \"backup\".command",
        "command",
        &["exec handler needs a program"],
    );
}

#[test]
fn exec_workdir_must_exist() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().display().to_string();
    parse_ok(
        &format!(
            "[task.backup]\nhandler = \"exec\"\ncommand = [\"/bin/true\"]\nworkdir = {good:?}\n"
        ),
        &[],
    );
    let missing = dir.path().join("no-such-dir").display().to_string();
    let e = only_error(
        &format!(
            "[task.backup]\nhandler = \"exec\"\ncommand = [\"/bin/true\"]\nworkdir = {missing:?}\n"
        ),
        &[],
    );
    check(
        &e,
        "task \"backup\".workdir",
        &missing,
        &["expected an existing directory"],
    );
    // A regular file is not a directory either.
    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let file = file.display().to_string();
    let e = only_error(
        &format!(
            "[task.backup]\nhandler = \"exec\"\ncommand = [\"/bin/true\"]\nworkdir = {file:?}\n"
        ),
        &[],
    );
    check(
        &e,
        "task \"backup\".workdir",
        &file,
        &["existing directory"],
    );
}

#[test]
fn rust_task_with_exec_settings_is_rejected() {
    let e = only_error(
        "[task.report]\nhandler = \"rust\"\ncommand = [\"/bin/true\"]\n",
        &[],
    );
    check(
        &e,
        "task \"report\".handler",
        "\"rust\"",
        &["only to handler = \"exec\""],
    );
}

#[test]
fn zero_task_timeout_is_rejected() {
    let e = only_error("[task.report]\nhandler = \"rust\"\ntimeout = \"0s\"\n", &[]);
    check(&e, "task \"report\".timeout", "\"0s\"", &["more than zero"]);
}

// ---------------------------------------------------------------- retry

#[test]
fn retry_multiplier_must_be_1_to_100() {
    for bad in ["0.5", "100.5", "nan"] {
        let e = only_error(&format!("[worker.retry]\nmultiplier = {bad}\n"), &[]);
        check(
            &e,
            "worker.retry.multiplier",
            &format!("= {}", bad.replace("nan", "NaN")),
            &["a number from 1 to 100"],
        );
    }
    parse_ok("[worker.retry]\nmultiplier = 1.0\n", &[]);
    parse_ok("[worker.retry]\nmultiplier = 100.0\n", &[]);
}

#[test]
fn retry_jitter_must_be_a_fraction() {
    for bad in ["1.5", "-0.1"] {
        let e = only_error(&format!("[worker.retry]\njitter = {bad}\n"), &[]);
        check(
            &e,
            "worker.retry.jitter",
            &format!("= {bad}"),
            &["a fraction from 0 to 1"],
        );
    }
    parse_ok("[worker.retry]\njitter = 0.0\n", &[]);
    parse_ok("[worker.retry]\njitter = 1.0\n", &[]);
}

#[test]
fn retry_max_attempts_must_be_positive() {
    let e = only_error("[worker.retry]\nmax_attempts = 0\n", &[]);
    check(&e, "worker.retry.max_attempts", "= 0", &["at least 1"]);
    parse_ok("[worker.retry]\nmax_attempts = 1\n", &[]);
}

#[test]
fn retry_max_delay_below_initial_delay_is_rejected() {
    let e = only_error(
        "[worker.retry]\ninitial_delay = \"10s\"\nmax_delay = \"5s\"\n",
        &[],
    );
    check(
        &e,
        "worker.retry.max_delay",
        "\"5s\"",
        &["at least initial_delay (10s)"],
    );
    parse_ok(
        "[worker.retry]\ninitial_delay = \"10s\"\nmax_delay = \"10s\"\n",
        &[],
    );
}

#[test]
fn retry_initial_delay_has_a_floor() {
    let e = only_error("[worker.retry]\ninitial_delay = \"5ms\"\n", &[]);
    check(
        &e,
        "worker.retry.initial_delay",
        "\"5ms\"",
        &["at least 10ms"],
    );
}

#[test]
fn task_retry_override_is_validated_against_worker_retry() {
    // The task only raises initial_delay, above the worker's max_delay of 1m.
    let e = only_error(
        "[worker.retry]\nmax_delay = \"1m\"\n[task.report]\nhandler = \"rust\"\nretry = { initial_delay = \"2m\" }\n",
        &[],
    );
    check(
        &e,
        "task \"report\".retry.max_delay",
        "\"1m\"",
        &["at least initial_delay (2m)"],
    );
    let e = only_error(
        "[task.report]\nhandler = \"rust\"\nretry = { max_attempts = 0 }\n",
        &[],
    );
    check(
        &e,
        "task \"report\".retry.max_attempts",
        "= 0",
        &["at least 1"],
    );
}

#[test]
fn retry_override_merges_over_worker_retry() {
    let c = parse_ok(
        r#"
[worker.retry]
max_attempts = 7
jitter = 0.1

[task.flaky]
handler = "rust"
retry = { max_attempts = 2, initial_delay = "5s" }

[task.plain]
handler = "rust"
"#,
        &[],
    );
    let worker = RetryPolicy {
        max_attempts: 7,
        initial_delay: Dur::secs(1),
        multiplier: 2.0,
        max_delay: Dur::secs(300),
        jitter: 0.1,
    };
    assert_eq!(c.worker.retry, worker);
    assert_eq!(
        c.retry_policy("flaky"),
        RetryPolicy {
            max_attempts: 2,
            initial_delay: Dur::secs(5),
            ..worker
        }
    );
    assert_eq!(c.retry_policy("plain"), worker);
    assert_eq!(c.retry_policy("not-configured"), worker);
}

// ---------------------------------------------------------------- other sections

#[test]
fn worker_concurrency_zero_is_rejected() {
    let e = only_error("[worker]\nconcurrency = 0\n", &[]);
    check(&e, "worker.concurrency", "= 0", &["at least 1"]);
    assert_eq!(e.value.as_deref(), Some("0"));
    assert_eq!(
        parse_ok("[worker]\nconcurrency = 1\n", &[])
            .worker
            .concurrency,
        1
    );
}

#[test]
fn worker_concurrency_out_of_type_range_is_rejected() {
    let e = only_error("[worker]\nconcurrency = 70000\n", &[]);
    check(&e, "worker.concurrency", "70000", &["u16"]);
}

#[test]
fn worker_claim_ttl_has_a_floor() {
    let e = only_error("[worker]\nclaim_ttl = \"500ms\"\n", &[]);
    check(&e, "worker.claim_ttl", "\"500ms\"", &["at least 1s"]);
}

#[test]
fn bad_duration_names_the_key() {
    let e = only_error("[producer]\nlease_ttl = \"5 parsecs\"\n", &[]);
    check(
        &e,
        "producer.lease_ttl",
        "5 parsecs",
        &["expected a number with a unit", "\"30s\""],
    );
    let e = only_error("[producer]\nlease_ttl = 5\n", &[]);
    check(
        &e,
        "producer.lease_ttl",
        "5",
        &["a duration string such as \"30s\""],
    );
}

#[test]
fn lease_ttl_too_small_is_rejected() {
    let e = only_error("[producer]\nlease_ttl = \"100ms\"\n", &[]);
    check(&e, "producer.lease_ttl", "\"100ms\"", &["at least 300ms"]);
    let c = parse_ok("[producer]\nlease_ttl = \"300ms\"\n", &[]);
    assert_eq!(c.producer.lease_ttl, Dur::millis(300));
}

#[test]
fn an_anchor_finer_than_a_millisecond_is_named() {
    let e = only_error(
        &schedule(
            "x",
            "every = \"1m\"\nanchor = \"2026-01-01T00:00:00.0000005Z\"\ntask = \"report\"",
        ),
        &[],
    );
    check(
        &e,
        "schedule \"x\".anchor",
        "\"2026-01-01T00:00:00.0000005Z\"",
        &[
            "finer than a millisecond",
            "published again after every restart",
        ],
    );
}

#[test]
fn misfire_threshold_must_leave_room_for_firing_and_the_misfire_policy() {
    for ok in ["100ms", "1h"] {
        let c = parse_ok(&format!("[producer]\nmisfire_threshold = \"{ok}\"\n"), &[]);
        assert_eq!(c.producer.misfire_threshold.to_string(), ok);
    }
    for bad in ["0s", "99ms", "1day"] {
        let e = only_error(&format!("[producer]\nmisfire_threshold = \"{bad}\"\n"), &[]);
        check(
            &e,
            "producer.misfire_threshold",
            &format!("\"{bad}\""),
            &[
                "between 100ms and 1h",
                "count every slot missed",
                "max_catchup",
            ],
        );
    }
}

#[test]
fn redis_wait_timeout_must_fit_the_lease() {
    // Off by default; the timeout is then not checked.
    let c = parse_ok("[redis]\nwait_timeout = \"0s\"\n", &[]);
    assert_eq!(c.redis.wait_replicas, 0);
    let c = parse_ok(
        "[redis]\nwait_replicas = 1\nwait_timeout = \"500ms\"\n[producer]\nlease_ttl = \"3s\"\n",
        &[],
    );
    assert_eq!(
        (c.redis.wait_replicas, c.redis.wait_timeout),
        (1, Dur::millis(500))
    );
    let e = only_error(
        "[redis]\nwait_replicas = 1\nwait_timeout = \"501ms\"\n[producer]\nlease_ttl = \"3s\"\n",
        &[],
    );
    check(
        &e,
        "redis.wait_timeout",
        "\"501ms\"",
        &["at most a sixth of producer.lease_ttl (500ms)"],
    );
    let e = only_error("[redis]\nwait_replicas = 2\nwait_timeout = \"0s\"\n", &[]);
    check(&e, "redis.wait_timeout", "\"0s\"", &["more than 0"]);
    let c = parse_ok("", &[("CRONPIPE__REDIS__WAIT_REPLICAS", "1")]);
    assert_eq!(c.redis.wait_replicas, 1);
}

#[test]
fn redis_url_scheme_is_checked() {
    let e = only_error("[redis]\nurl = \"http://cache:6379\"\n", &[]);
    check(
        &e,
        "redis.url",
        "\"http://cache:6379\"",
        &["redis://", "rediss://"],
    );
    parse_ok("[redis]\nurl = \"redis://cache:6379/1\"\n", &[]);
    parse_ok("[redis]\nurl = \"rediss://cache:6380\"\n", &[]);
}

#[test]
fn redis_namespace_must_be_a_name() {
    let e = only_error("[redis]\nnamespace = \"my app\"\n", &[]);
    check(
        &e,
        "redis.namespace",
        "\"my app\"",
        &["1 to 200 characters"],
    );
}

#[test]
fn rabbitmq_url_scheme_is_checked() {
    let e = only_error("[broker.rabbitmq]\nurl = \"redis://mq:5672\"\n", &[]);
    check(
        &e,
        "broker.rabbitmq.url",
        "\"redis://mq:5672\"",
        &["amqp://", "amqps://"],
    );
    parse_ok("[broker.rabbitmq]\nurl = \"amqps://mq:5671/%2f\"\n", &[]);
}

#[test]
fn rabbitmq_url_must_parse_and_its_frame_max_is_range_checked() {
    let e = only_error(
        "[broker.rabbitmq]\nurl = \"amqp://guest:hunter2@mq:notaport/%2f\"\n",
        &[],
    );
    check(
        &e,
        "broker.rabbitmq.url",
        "\"amqp://guest:***@mq:notaport/%2f\"",
        &["expected a valid AMQP URL"],
    );
    assert!(!e.to_string().contains("hunter2"), "{e}");
    for bad in ["100", "1048576"] {
        let url = format!("amqp://guest:hunter2@mq:5672/%2f?frame_max={bad}");
        let e = only_error(&format!("[broker.rabbitmq]\nurl = \"{url}\"\n"), &[]);
        check(
            &e,
            "broker.rabbitmq.url",
            &format!("frame_max = {bad}"),
            &["4096 to 131072"],
        );
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }
    let ok = parse_ok(
        "[broker.rabbitmq]\nurl = \"amqp://mq:5672/%2f?frame_max=131072\"\n",
        &[],
    );
    assert!(ok.broker.rabbitmq.url.ends_with("frame_max=131072"));
}

#[test]
fn url_errors_hide_passwords() {
    let e = only_error("[redis]\nurl = \"http://:hunter2@cache:6379\"\n", &[]);
    check(&e, "redis.url", "\"http://:***@cache:6379\"", &["redis://"]);
    assert!(!e.to_string().contains("hunter2"), "{e}");
    let e = only_error(
        "[broker.rabbitmq]\nurl = \"http://guest:hunter2@mq:5672\"\n",
        &[],
    );
    assert!(!e.to_string().contains("hunter2"), "{e}");
}

#[test]
fn rabbitmq_queue_must_be_a_name() {
    let e = only_error("[broker.rabbitmq]\nqueue = \"\"\n", &[]);
    check(
        &e,
        "broker.rabbitmq.queue",
        "\"\"",
        &["1 to 200 characters"],
    );
}

#[test]
fn rabbitmq_frame_max_is_bounded() {
    for bad in ["4095", "131073", "0"] {
        let e = only_error(&format!("[broker.rabbitmq]\nframe_max = {bad}\n"), &[]);
        check(&e, "broker.rabbitmq.frame_max", bad, &["4096 to 131072"]);
    }
    parse_ok("[broker.rabbitmq]\nframe_max = 4096\n", &[]);
}

// ---------------------------------------------------------------- many errors

const MANY_PROBLEMS: &str = r#"
[redis]
url = "http://cache"

[worker]
concurrency = 0

[schedule.nightly-report]
cron = "61 * * * *"
task = "report"

[task.report]
handler = "exec"
"#;

#[test]
fn multiple_errors_are_reported_together() {
    let errs = parse_err(MANY_PROBLEMS, &[]);
    assert_eq!(errs.0.len(), 4, "{errs}");
    check(
        error_at(&errs, "redis.url"),
        "redis.url",
        "\"http://cache\"",
        &["redis://"],
    );
    check(
        error_at(&errs, "worker.concurrency"),
        "worker.concurrency",
        "= 0",
        &["at least 1"],
    );
    check(
        error_at(&errs, "schedule \"nightly-report\".cron"),
        "schedule \"nightly-report\".cron",
        "\"61 * * * *\"",
        &["minute"],
    );
    check(
        error_at(&errs, "task \"report\".command"),
        "task \"report\".command",
        "[]",
        &["needs a program"],
    );
}

#[test]
fn display_lists_every_error() {
    let errs = parse_err(MANY_PROBLEMS, &[]);
    let text = errs.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "4 problems in config:", "{text}");
    assert_eq!(lines.len(), 1 + errs.0.len(), "one line per error:\n{text}");
    for (line, e) in lines[1..].iter().zip(&errs.0) {
        assert_eq!(*line, format!("  - {e}"));
        assert!(line.starts_with("  - cronpipe.toml: "), "{line}");
    }
    for key in [
        "redis.url",
        "worker.concurrency",
        "schedule \"nightly-report\".cron",
        "task \"report\".command",
    ] {
        assert!(
            text.contains(&format!("cronpipe.toml: {key}")),
            "{key} missing:\n{text}"
        );
    }
    let one = parse_err("[worker]\nconcurrency = 0\n", &[]).to_string();
    assert_eq!(
        one,
        "1 problem in config:\n  - cronpipe.toml: worker.concurrency = 0: expected at least 1\n"
    );
}

// ---------------------------------------------------------------- environment

const NIGHTLY: &str = r#"
[worker]
concurrency = 4

[schedule.nightly]
cron = "0 3 * * *"
task = "report"

[task.report]
handler = "rust"
"#;

#[test]
fn env_override_sets_worker_concurrency() {
    assert_eq!(parse_ok(NIGHTLY, &[]).worker.concurrency, 4);
    let c = parse_ok(NIGHTLY, &[("CRONPIPE__WORKER__CONCURRENCY", "16")]);
    assert_eq!(c.worker.concurrency, 16);
    // Sections the file does not have are created.
    let c = parse_ok("", &[("CRONPIPE__WORKER__CONCURRENCY", "16")]);
    assert_eq!(c.worker.concurrency, 16);
}

#[test]
fn env_override_replaces_an_existing_schedule_cron_case_insensitively() {
    let c = parse_ok(
        NIGHTLY,
        &[("CRONPIPE__SCHEDULE__NIGHTLY__CRON", "30 4 * * *")],
    );
    assert_eq!(
        c.schedules.len(),
        1,
        "no second schedule: {:?}",
        c.schedules
    );
    assert_eq!(c.schedules["nightly"].cron.as_deref(), Some("30 4 * * *"));
    assert_eq!(c.schedules["nightly"].task, "report");
    // Mixed case in the file is matched too, and keeps its spelling.
    let mixed = NIGHTLY.replace("[schedule.nightly]", "[schedule.Nightly]");
    let c = parse_ok(
        &mixed,
        &[("CRONPIPE__SCHEDULE__NIGHTLY__CRON", "30 4 * * *")],
    );
    assert_eq!(c.schedules.len(), 1, "{:?}", c.schedules);
    assert_eq!(c.schedules["Nightly"].cron.as_deref(), Some("30 4 * * *"));
}

#[test]
fn env_override_values_are_read_as_toml_or_text() {
    let c = parse_ok(
        NIGHTLY,
        &[
            ("CRONPIPE__REDIS__URL", "redis://cache.internal:6379/3"),
            ("CRONPIPE__SCHEDULE__NIGHTLY__ENABLED", "false"),
            ("CRONPIPE__WORKER__RETRY__JITTER", "0.5"),
            ("CRONPIPE__TASK__REPORT__TIMEOUT", "45s"),
            ("CRONPIPE__WORKER__INSTANCE_ID", "\"42\""),
        ],
    );
    assert_eq!(c.redis.url, "redis://cache.internal:6379/3");
    assert!(!c.schedules["nightly"].enabled);
    assert_eq!(c.worker.retry.jitter, 0.5);
    assert_eq!(c.task_timeout("report"), Duration::from_secs(45));
    assert_eq!(c.worker.instance_id.as_deref(), Some("42"));
}

#[test]
fn env_override_can_set_an_anchor_instant() {
    // An RFC 3339 instant is a TOML datetime; it must still reach the string field.
    let text = format!("[schedule.tick]\nevery = \"1m\"\ntask = \"report\"\n{REPORT_TASK}");
    let c = parse_ok(
        &text,
        &[("CRONPIPE__SCHEDULE__TICK__ANCHOR", "2026-01-01T00:00:07Z")],
    );
    let anchor = c.schedules["tick"].anchor.as_deref().unwrap();
    assert_eq!(
        DateTime::parse_from_rfc3339(anchor).unwrap().timestamp(),
        1_767_225_607
    );
}

#[test]
fn env_override_with_bad_value_names_the_variable() {
    // A value of the wrong type.
    let e = only_error(NIGHTLY, &[("CRONPIPE__WORKER__CONCURRENCY", "lots")]);
    check(
        &e,
        "worker.concurrency",
        "\"lots\"",
        &["u16", "environment variable CRONPIPE__WORKER__CONCURRENCY"],
    );
    // A value of the right type that breaks a rule.
    let e = only_error(NIGHTLY, &[("CRONPIPE__WORKER__CONCURRENCY", "0")]);
    check(
        &e,
        "worker.concurrency",
        "= 0",
        &[
            "at least 1",
            "environment variable CRONPIPE__WORKER__CONCURRENCY",
        ],
    );
    let e = only_error(
        NIGHTLY,
        &[("CRONPIPE__SCHEDULE__NIGHTLY__CRON", "61 * * * *")],
    );
    check(
        &e,
        "schedule \"nightly\".cron",
        "\"61 * * * *\"",
        &[
            "minute",
            "environment variable CRONPIPE__SCHEDULE__NIGHTLY__CRON",
        ],
    );
    let e = only_error(NIGHTLY, &[("CRONPIPE__PRODUCER__LEASE_TTL", "5 parsecs")]);
    check(
        &e,
        "producer.lease_ttl",
        "5 parsecs",
        &["environment variable CRONPIPE__PRODUCER__LEASE_TTL"],
    );
    // A misspelt key.
    let e = only_error(NIGHTLY, &[("CRONPIPE__WORKER__CONCURENCY", "4")]);
    check(
        &e,
        "worker.concurency",
        "unknown field `concurency`",
        &["environment variable CRONPIPE__WORKER__CONCURENCY"],
    );
    // A bad value from the file does not blame the environment.
    let e = only_error(
        "[worker]\nconcurrency = 0\n",
        &[("CRONPIPE__REDIS__NAMESPACE", "x")],
    );
    assert!(!e.message.contains("environment variable"), "{e}");
}

#[test]
fn env_variables_without_the_prefix_are_ignored() {
    let c = parse_ok(
        NIGHTLY,
        &[
            ("WORKER__CONCURRENCY", "0"),
            ("CRONPIPE_WORKER__CONCURRENCY", "0"),
            ("cronpipe__worker__concurrency", "0"),
            ("PATH", "/usr/bin"),
        ],
    );
    assert_eq!(c.worker.concurrency, 4);
}

#[test]
fn env_variable_with_empty_segment_is_rejected() {
    let e = only_error(NIGHTLY, &[("CRONPIPE__WORKER____CONCURRENCY", "4")]);
    assert_eq!(e.file, Path::new(FILE));
    assert!(
        e.message.contains("CRONPIPE__WORKER____CONCURRENCY")
            && e.message.contains("CRONPIPE__SECTION__KEY"),
        "{e}"
    );
}

// ---------------------------------------------------------------- lookups

#[test]
fn task_timeout_defaults_to_worker_default_timeout() {
    let c = parse_ok(
        r#"
[worker]
default_timeout = "2m"

[task.slow]
handler = "rust"
timeout = "1h"

[task.fast]
handler = "rust"
"#,
        &[],
    );
    assert_eq!(c.task_timeout("slow"), Duration::from_secs(3600));
    assert_eq!(c.task_timeout("fast"), Duration::from_secs(120));
    assert_eq!(c.task_timeout("not-configured"), Duration::from_secs(120));
    let defaults = parse_ok("[task.fast]\nhandler = \"rust\"\n", &[]);
    assert_eq!(defaults.task_timeout("fast"), Duration::from_secs(300));
}

#[test]
fn load_reads_the_file_and_names_it_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cronpipe.toml");
    std::fs::write(&path, "[worker]\nconcurrency = 0\n").unwrap();
    let errs = Config::load_with_env(&path, env(&[])).unwrap_err();
    assert_eq!(errs.0.len(), 1);
    assert_eq!(errs.0[0].file, path);
    assert!(
        errs.to_string().contains(&path.display().to_string()),
        "{errs}"
    );
    let c = Config::load_with_env(&path, env(&[("CRONPIPE__WORKER__CONCURRENCY", "2")])).unwrap();
    assert_eq!(c.worker.concurrency, 2);
    let missing = dir.path().join("missing.toml");
    let errs = Config::load_with_env(&missing, env(&[])).unwrap_err();
    assert_eq!(errs.0[0].file, missing);
    assert!(
        errs.0[0].message.contains("cannot read the config file"),
        "{errs}"
    );
}

// ====================================================================
// http handler, per-task concurrency and timeout warnings (worker issue 4).
// Kept as one block at the end of the file; owned by the worker work.
// ====================================================================

const HOOK: &str = "[task.hook]\nhandler = \"http\"\nurl = \"https://example.com/hooks/run\"\n";

#[test]
fn http_task_parses_with_defaults_and_fixed_headers() {
    let c = parse_ok(
        &format!("{HOOK}method = \"PUT\"\nheaders = {{ Authorization = \"Bearer x\", X-Team = \"ops\" }}\n"),
        &[],
    );
    let t = &c.tasks["hook"];
    assert_eq!(t.handler, HandlerKind::Http);
    assert_eq!(t.url.as_deref(), Some("https://example.com/hooks/run"));
    assert_eq!(t.method.as_deref(), Some("PUT"));
    assert_eq!(t.headers["X-Team"], "ops");
    let plain = parse_ok(HOOK, &[]);
    assert_eq!(
        plain.tasks["hook"].method, None,
        "POST is applied by the worker"
    );
}

#[test]
fn http_task_needs_a_url() {
    let e = only_error("[task.hook]\nhandler = \"http\"\n", &[]);
    check(&e, "task \"hook\".url", "url", &["needs a URL"]);
}

#[test]
fn http_url_must_be_http_or_https_with_a_host() {
    for bad in [
        "ftp://example.com/x",
        "example.com/x",
        "https://",
        "http:///path",
        "https://exa mple.com",
    ] {
        let e = only_error(
            &format!("[task.hook]\nhandler = \"http\"\nurl = \"{bad}\"\n"),
            &[],
        );
        check(&e, "task \"hook\".url", bad, &["http://", "https://"]);
    }
    parse_ok(
        "[task.hook]\nhandler = \"http\"\nurl = \"http://127.0.0.1:8080\"\n",
        &[],
    );
}

#[test]
fn http_method_must_be_known() {
    for bad in ["FETCH", "post", ""] {
        let e = only_error(&format!("{HOOK}method = \"{bad}\"\n"), &[]);
        check(
            &e,
            "task \"hook\".method",
            &format!("{bad:?}"),
            &["GET", "POST", "DELETE"],
        );
    }
}

#[test]
fn http_header_names_and_values_must_be_sendable() {
    let e = only_error(
        &format!("{HOOK}headers = {{ \"Bad Name\" = \"v\" }}\n"),
        &[],
    );
    check(
        &e,
        "task \"hook\".headers.Bad Name",
        "Bad Name",
        &["header name"],
    );
    let e = only_error(
        &format!("{HOOK}headers = {{ X-A = \"one\\r\\ntwo\" }}\n"),
        &[],
    );
    check(
        &e,
        "task \"hook\".headers.X-A",
        "X-A",
        &["without line breaks"],
    );
}

#[test]
fn exec_only_keys_are_rejected_for_http_and_rust() {
    let e = only_error(&format!("{HOOK}command = [\"/bin/true\"]\n"), &[]);
    check(
        &e,
        "task \"hook\".handler",
        "\"http\"",
        &["apply only to handler = \"exec\""],
    );
    let e = only_error(&format!("{HOOK}permanent_exit_codes = [2]\n"), &[]);
    check(
        &e,
        "task \"hook\".handler",
        "\"http\"",
        &["permanent_exit_codes"],
    );
    let e = only_error("[task.r]\nhandler = \"rust\"\nworkdir = \"/tmp\"\n", &[]);
    check(
        &e,
        "task \"r\".handler",
        "\"rust\"",
        &["apply only to handler = \"exec\""],
    );
}

#[test]
fn http_only_keys_are_rejected_for_exec_and_rust() {
    let e = only_error(
        "[task.e]\nhandler = \"exec\"\ncommand = [\"/bin/true\"]\nurl = \"https://example.com\"\n",
        &[],
    );
    check(
        &e,
        "task \"e\".handler",
        "\"exec\"",
        &["apply only to handler = \"http\""],
    );
    let e = only_error(
        "[task.r]\nhandler = \"rust\"\nheaders = { A = \"b\" }\n",
        &[],
    );
    check(
        &e,
        "task \"r\".handler",
        "\"rust\"",
        &["url, method and headers"],
    );
    let e = only_error("[task.r]\nhandler = \"rust\"\nmethod = \"GET\"\n", &[]);
    check(
        &e,
        "task \"r\".handler",
        "\"rust\"",
        &["apply only to handler = \"http\""],
    );
}

#[test]
fn task_concurrency_must_be_positive() {
    let e = only_error("[task.r]\nhandler = \"rust\"\nconcurrency = 0\n", &[]);
    check(&e, "task \"r\".concurrency", "0", &["at least 1"]);
    let c = parse_ok("[task.r]\nhandler = \"rust\"\nconcurrency = 2\n", &[]);
    assert_eq!(c.task_concurrency("r"), Some(2));
    assert_eq!(c.task_concurrency("other"), None);
}

#[test]
fn timeouts_at_or_above_the_rabbitmq_consumer_timeout_warn() {
    let c = parse_ok(
        "[task.long]\nhandler = \"rust\"\ntimeout = \"30m\"\n[task.short]\nhandler = \"rust\"\ntimeout = \"29m\"\n",
        &[],
    );
    let w = c.warnings();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("task \"long\".timeout") && w[0].contains("consumer_timeout"),
        "{w:?}"
    );
    // default_timeout warns only when some task relies on it.
    let c = parse_ok(
        "[worker]\ndefault_timeout = \"1h\"\n[task.r]\nhandler = \"rust\"\ntimeout = \"1m\"\n",
        &[],
    );
    assert!(c.warnings().is_empty(), "{:?}", c.warnings());
    let c = parse_ok(
        "[worker]\ndefault_timeout = \"1h\"\n[task.r]\nhandler = \"rust\"\n",
        &[],
    );
    let w = c.warnings();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("worker.default_timeout") && w[0].contains("30m"),
        "{w:?}"
    );
    assert!(parse_ok(REPORT_TASK, &[]).warnings().is_empty());
}
