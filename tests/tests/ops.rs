//! Operating cronpipe: metrics that match what happened, runtime schedules
//! through the CLI, dead-letter replay, and the admin API's auth and validation.
//! Everything runs on RabbitMQ and on Kafka (mock cluster).

use std::collections::{BTreeSet, HashMap};
use std::process::Command;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use cronpipe_tests::{binary, broker_test, wait_until, BrokerKind, Proc, TestEnv};
use cronpipe_worker::{Registry, Settled};
use nix::sys::signal::Signal;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Re-evaluates `$cond` (an expression that may `.await` and mutate locals)
/// every 20 ms until it is true or `$limit` passes; yields whether it held.
macro_rules! poll_until {
    ($limit:expr, $cond:expr) => {{
        let end = Instant::now() + $limit;
        loop {
            if $cond {
                break true;
            }
            if Instant::now() >= end {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }};
}

/// The address a process logged for its ops endpoint ("Serving /metrics ... addr=…").
async fn served_addr(p: &Proc) -> String {
    let mut found = String::new();
    poll_until!(Duration::from_secs(20), {
        if let Some(line) = p
            .log_text()
            .lines()
            .find(|l| l.contains("Serving /metrics"))
        {
            found = line
                .split("addr=")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .unwrap_or("")
                .to_string();
        }
        !found.is_empty()
    });
    assert!(
        !found.is_empty(),
        "no ops endpoint logged:\n{}",
        p.log_text()
    );
    found
}

/// Parses Prometheus text into `name{labels}` → value.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

async fn scrape(addr: &str) -> HashMap<String, f64> {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("body");
    parse_metrics(&text)
}

fn metric(m: &HashMap<String, f64>, key: &str) -> f64 {
    m.get(key).copied().unwrap_or(0.0)
}

fn cli(bin: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary(bin))
        .args(args)
        .output()
        .expect("run cli");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

broker_test!(metrics_count_exactly_what_happened);
async fn metrics_count_exactly_what_happened(env: TestEnv) {
    let start = (Utc::now() + chrono::Duration::seconds(2)).format("%Y-%m-%dT%H:%M:%SZ");
    let flaky_marker = env.dir.path().join("flaky-once");
    let extra = format!(
        r#"
[producer]
lease_ttl = "2s"
http_addr = "127.0.0.1:0"

[worker]
concurrency = 1
http_addr = "127.0.0.1:0"

[worker.retry]
initial_delay = "100ms"
jitter = 0.0

[schedule.four]
iso = "R4/{start}/PT1S"
task = "tick"
misfire = "fire_all"
{tick}
[task.perm]
handler = "exec"
command = ["/bin/sh", "-c", "exit 64"]
permanent_exit_codes = [64]

[task.flaky]
handler = "exec"
command = ["/bin/sh", "-c", "if [ -f {marker} ]; then exit 0; fi; touch {marker}; exit 1"]
"#,
        tick = env.exec_task("tick", ""),
        marker = flaky_marker.display()
    );
    let cfg = env.write_config("cronpipe.toml", &extra);
    let producer = Proc::start("producer", &cfg, &[], env.dir.path(), "producer");
    let worker = Proc::start("worker", &cfg, &[], env.dir.path(), "worker");
    let paddr = served_addr(&producer).await;
    let waddr = served_addr(&worker).await;

    // Ad-hoc tasks: one permanent failure, one that fails once, and one envelope delivered three times.
    let perm = cronpipe_shared::Envelope::new("perm", serde_json::json!({}));
    let flaky = cronpipe_shared::Envelope::new("flaky", serde_json::json!({}));
    let dup = cronpipe_shared::Envelope::new("tick", serde_json::json!({}));
    env.broker.publish(&perm).await.expect("publish");
    env.broker.publish(&flaky).await.expect("publish");
    for _ in 0..3 {
        env.broker.publish(&dup).await.expect("publish");
    }

    let key = |name: &str, labels: &str| format!("{name}{{{labels}}}");
    let outcome = |task: &str, o: &str| {
        key(
            "cronpipe_worker_tasks_total",
            &format!("task=\"{task}\",outcome=\"{o}\""),
        )
    };
    // Everything settles: 4 slots + 1 duplicate-delivered envelope succeed for `tick`.
    let mut last: HashMap<String, f64>;
    let settled = poll_until!(Duration::from_secs(30), {
        last = scrape(&waddr).await;
        metric(&last, &outcome("tick", "success")) >= 5.0
            && metric(&last, &outcome("flaky", "success")) >= 1.0
            && metric(&last, &outcome("perm", "dead_letter")) >= 1.0
    });
    assert!(
        settled,
        "worker metrics never showed everything settled: {last:?}\n{}",
        worker.log_text()
    );
    let pm = scrape(&paddr).await;
    let published = metric(
        &pm,
        &key(
            "cronpipe_producer_slots_published_total",
            "schedule=\"four\"",
        ),
    );
    assert_eq!(published, 4.0, "the R4 schedule publishes exactly 4 slots");
    assert_eq!(metric(&pm, "cronpipe_producer_leader"), 1.0);
    assert_eq!(metric(&pm, "cronpipe_producer_fencing_token"), 1.0);

    // The worker's counters match the side effects and the dead-letter queue.
    let wm = scrape(&waddr).await;
    let runs = env.runs();
    assert_eq!(
        runs.len(),
        5,
        "tick ran for 4 slots + 1 ad-hoc envelope: {runs:?}"
    );
    assert_eq!(metric(&wm, &outcome("tick", "success")), runs.len() as f64);
    assert_eq!(
        metric(&wm, &outcome("tick", "duplicate_skipped")),
        2.0,
        "{wm:?}"
    );
    assert_eq!(metric(&wm, &outcome("flaky", "retry")), 1.0);
    assert_eq!(metric(&wm, &outcome("flaky", "success")), 1.0);
    assert_eq!(metric(&wm, &outcome("perm", "dead_letter")), 1.0);
    let dead = env.drain_dead_letters().await;
    assert_eq!(dead.len(), 1, "one dead letter: {dead:?}");
    assert_eq!(
        dead[0].envelope.as_ref().map(|e| e.id.as_str()),
        Some(perm.id.as_str())
    );
    let hist = key(
        "cronpipe_worker_task_duration_seconds_count",
        "task=\"tick\"",
    );
    assert_eq!(metric(&wm, &hist), 5.0, "one duration sample per tick run");
    let attempts = key("cronpipe_worker_task_attempt_count", "task=\"flaky\"");
    let attempt_sum = key("cronpipe_worker_task_attempt_sum", "task=\"flaky\"");
    assert_eq!(
        metric(&wm, &attempts),
        2.0,
        "flaky ran two attempts: {wm:?}"
    );
    assert_eq!(metric(&wm, &attempt_sum), 3.0, "attempts 1 and 2");

    // Health endpoints.
    let ready: serde_json::Value = reqwest::get(format!("http://{paddr}/readyz"))
        .await
        .expect("readyz")
        .json()
        .await
        .expect("json");
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["role"], "leader");
    let health = reqwest::get(format!("http://{waddr}/healthz"))
        .await
        .expect("healthz");
    assert!(health.status().is_success());
    drop(producer);
    drop(worker);
    env.cleanup().await;
}

fn slots_for(envs: &[cronpipe_shared::Envelope], schedule: &str) -> Vec<DateTime<Utc>> {
    envs.iter()
        .filter(|e| e.schedule.as_deref() == Some(schedule))
        .filter_map(|e| e.slot)
        .collect()
}

broker_test!(runtime_schedule_add_pause_resume_remove_through_the_cli);
async fn runtime_schedule_add_pause_resume_remove_through_the_cli(env: TestEnv) {
    let cfg = env.write_config(
        "cronpipe.toml",
        &format!(
            "[producer]\nlease_ttl = \"2s\"\n{}",
            env.exec_task("count", "")
        ),
    );
    let c = cfg.to_str().expect("utf-8 path");
    let producer = Proc::start("producer", &cfg, &[], env.dir.path(), "producer");
    assert!(
        wait_until(Duration::from_secs(10), || async {
            producer.log_text().contains("Leading")
        })
        .await,
        "{}",
        producer.log_text()
    );

    // Added: fires within its first slot at least 1 s away.
    let added_at = Utc::now();
    let (code, out, err) = cli(
        "producer",
        &[
            "schedule",
            "add",
            "dyn",
            "-c",
            c,
            "--every",
            "2s",
            "--task",
            "count",
            "--misfire",
            "fire_all",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let mut seen: Vec<DateTime<Utc>> = Vec::new();
    let fired = poll_until!(Duration::from_secs(6), {
        seen.extend(slots_for(&env.drain_envelopes().await, "dyn"));
        !seen.is_empty()
    });
    assert!(
        fired,
        "runtime schedule never fired\n{}",
        producer.log_text()
    );
    let first = seen[0];
    assert!(
        first > added_at,
        "no back-fill: first slot {first} after the add at {added_at}"
    );
    assert!(
        first - added_at <= chrono::Duration::seconds(3),
        "first slot {first} is its first slot ≥ 1 s after {added_at}"
    );

    // Paused: it stops.
    let (code, out, err) = cli("producer", &["schedule", "pause", "dyn", "-c", c]);
    assert_eq!(code, 0, "{out}{err}");
    let paused_at = Utc::now();
    // Within the 1 s apply window at most the slot already due may still appear; then nothing.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    seen.extend(slots_for(&env.drain_envelopes().await, "dyn"));
    let before_quiet = seen.len();
    tokio::time::sleep(Duration::from_secs(5)).await; // an observation window, not synchronisation
    let during_pause = slots_for(&env.drain_envelopes().await, "dyn");
    assert!(
        during_pause.is_empty(),
        "paused schedule published {during_pause:?}"
    );
    let (_, list, _) = cli("producer", &["schedule", "list", "-c", c]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("dyn ") && l.contains("runtime") && l.contains(" yes ")),
        "{list}"
    );

    // Resumed: continues per its misfire policy (fire_all publishes the slots missed while paused).
    let (code, out, err) = cli("producer", &["schedule", "resume", "dyn", "-c", c]);
    assert_eq!(code, 0, "{out}{err}");
    let resumed_at = Utc::now();
    let caught_up = poll_until!(Duration::from_secs(6), {
        seen.extend(slots_for(&env.drain_envelopes().await, "dyn"));
        seen.iter().any(|s| *s > resumed_at)
    });
    assert!(caught_up, "resumed schedule never fired again");
    let distinct: BTreeSet<_> = seen.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        seen.len(),
        "no slot published twice: {seen:?}"
    );
    let v: Vec<_> = distinct.iter().collect();
    for w in v.windows(2) {
        assert_eq!(
            *w[1] - *w[0],
            chrono::Duration::seconds(2),
            "fire_all leaves no gap across the pause: {v:?}"
        );
    }
    assert!(
        seen.len() > before_quiet,
        "slots missed during the pause ({paused_at}..{resumed_at}) were caught up"
    );

    // Removed: stops, and its state is gone.
    let (code, out, err) = cli("producer", &["schedule", "remove", "dyn", "-c", c]);
    assert_eq!(code, 0, "{out}{err}");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let _ = env.drain_envelopes().await;
    tokio::time::sleep(Duration::from_secs(3)).await; // observation window
    assert!(
        slots_for(&env.drain_envelopes().await, "dyn").is_empty(),
        "removed schedule still fires"
    );
    let mut conn = env.store.connection();
    let keys = env.store.keys();
    let wm: Option<String> = redis::cmd("HGET")
        .arg(keys.watermarks())
        .arg("dyn")
        .query_async(&mut conn)
        .await
        .expect("hget");
    let def: Option<String> = redis::cmd("HGET")
        .arg(keys.dynamic_schedules())
        .arg("dyn")
        .query_async(&mut conn)
        .await
        .expect("hget");
    let paused: bool = redis::cmd("SISMEMBER")
        .arg(keys.paused())
        .arg("dyn")
        .query_async(&mut conn)
        .await
        .expect("sismember");
    assert_eq!((wm, def, paused), (None, None, false), "state cleaned up");
    let (code, _, err) = cli("producer", &["schedule", "remove", "dyn", "-c", c]);
    assert_eq!(code, 2, "removing again is an error: {err}");
    drop(producer);
    env.cleanup().await;
}

broker_test!(dlq_replay_runs_the_task_once_and_keeps_the_other_dead_letters);
async fn dlq_replay_runs_the_task_once_and_keeps_the_other_dead_letters(kind: BrokerKind) {
    // One partition on Kafka: the kept dead letter lies below the replayed
    // one, so removing the replayed one has to move the kept one.
    let env = TestEnv::ordered("replay", kind).await;
    let flag = env.dir.path().join("fixed");
    let extra = format!(
        r#"
[task.fragile]
handler = "exec"
command = ["/bin/sh", "-c", "echo \"$CRONPIPE_TASK_ID\" >> {runs}; [ -f {flag} ] || exit 64"]
permanent_exit_codes = [64]
"#,
        runs = env.runs_file().display(),
        flag = flag.display()
    );
    let config = env.config(&extra);
    let cfg = env.write_config("cronpipe.toml", &extra);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut opts = cronpipe_worker::Options::from_config(config.clone());
    opts.reports = Some(tx);
    let registry =
        cronpipe_worker::registry_from_config(&config, Registry::new()).expect("registry");
    let stop = CancellationToken::new();
    // The worker closes the broker connection it is given when it stops; give it its own.
    let worker_broker = cronpipe_shared::Broker::connect(&config.broker, "replay-worker")
        .await
        .expect("broker");
    let worker = tokio::spawn(cronpipe_worker::run(
        opts,
        env.store.clone(),
        worker_broker,
        registry,
        stop.clone(),
    ));

    // A dead letter that stays (no worker handles `nosuch`), then the one to replay.
    // Each is dead-lettered before the next is published, so they are in this order.
    let other = cronpipe_shared::Envelope::new("nosuch", serde_json::json!({}));
    let env_msg = cronpipe_shared::Envelope::new("fragile", serde_json::json!({"n": 1}));
    for e in [&other, &env_msg] {
        env.broker.publish(e).await.expect("publish");
        let r = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("report")
            .expect("open");
        assert_eq!(r.settled, Settled::DeadLetter, "{r:?}");
        assert_eq!(r.id.as_deref(), Some(e.id.as_str()));
    }

    let c = cfg.to_str().expect("path");
    // Listing changes nothing: both are listed, twice over.
    for _ in 0..2 {
        let (code, out, err) = cli("worker", &["dlq", "list", "-c", c, "--json"]);
        assert_eq!(code, 0, "{err}");
        let listed: Vec<serde_json::Value> = serde_json::from_str(&out).expect("json");
        let ids: Vec<&str> = listed
            .iter()
            .filter_map(|d| d["envelope"]["id"].as_str())
            .collect();
        assert_eq!(ids, vec![other.id.as_str(), env_msg.id.as_str()], "{out}");
    }
    let (code, out, err) = cli("worker", &["dlq", "list", "-c", c, "--task", "fragile"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&env_msg.id) && out.contains("permanent_error"),
        "{out}"
    );
    let (code, out, _) = cli("worker", &["dlq", "show", "-c", c, &env_msg.id]);
    assert_eq!(code, 0);
    let shown: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(shown[0]["envelope"]["id"], env_msg.id.as_str());
    assert_eq!(shown[0]["exit_code"], 64);

    // The cause is fixed; replay.
    std::fs::write(&flag, "").expect("flag");
    let (code, out, err) = cli("worker", &["dlq", "replay", "-c", c, "--id", &env_msg.id]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("replayed 1"), "{out}");
    let r = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("report")
        .expect("open");
    assert_eq!(r.settled, Settled::Success);
    assert_eq!(r.id.as_deref(), Some(env_msg.id.as_str()));
    stop.cancel();
    worker.await.expect("join").expect("worker");
    assert_eq!(
        env.runs(),
        vec![env_msg.id.clone(), env_msg.id.clone()],
        "one failed run, then exactly one replayed run"
    );
    let (code, out, err) = cli("worker", &["dlq", "list", "-c", c, "--json"]);
    assert_eq!(code, 0, "{err}");
    let listed: Vec<serde_json::Value> = serde_json::from_str(&out).expect("json");
    assert_eq!(listed.len(), 1, "only the other dead letter is left: {out}");
    assert_eq!(listed[0]["envelope"]["id"], other.id.as_str());
    assert_eq!(listed[0]["reason"], "unknown_task");
    let (code, out, err) = cli(
        "worker",
        &["dlq", "purge", "-c", c, "--reason", "unknown_task"],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("purged 1"), "{out}");
    let left = env.drain_dead_letters().await;
    assert!(
        left.is_empty(),
        "replayed and purged entries are gone: {left:?}"
    );
    let (_, hist, _) = cli(
        "worker",
        &["history", "-c", c, "--task", "fragile", "--json"],
    );
    let hist: Vec<serde_json::Value> = serde_json::from_str(&hist).expect("history json");
    let outcomes: Vec<&str> = hist.iter().filter_map(|h| h["outcome"].as_str()).collect();
    assert_eq!(
        outcomes,
        vec!["success", "replayed", "dead_letter"],
        "history newest first: {hist:?}"
    );
    env.cleanup().await;
}

broker_test!(one_dlq_replay_or_purge_at_a_time);
async fn one_dlq_replay_or_purge_at_a_time(env: TestEnv) {
    let cfg = env.write_config("cronpipe.toml", "");
    let c = cfg.to_str().expect("path");
    use cronpipe_shared::deadletter::{DeadLetter, DeadReason};
    let record = DeadLetter {
        v: 1,
        reason: DeadReason::InvalidJson,
        error: "expected value at line 1 column 1".into(),
        envelope: None,
        raw: Some(DeadLetter::raw_body(b"not json at all")),
        attempts: 0,
        exit_code: None,
        http_status: None,
        output_tail: String::new(),
        worker: "w".into(),
        first_seen_at: None,
        dead_lettered_at: Utc::now(),
    };
    env.broker
        .publish_dead_letter(&record)
        .await
        .expect("dead letter");
    // Another replay or purge holds the lock.
    let lock = env.store.keys().dlq_lock();
    let mut conn = env.store.connection();
    let _: () = redis::cmd("SET")
        .arg(&lock)
        .arg("worker-dlq-elsewhere")
        .arg("PX")
        .arg(30_000)
        .query_async(&mut conn)
        .await
        .expect("redis");
    for args in [
        &["dlq", "purge", "-c", c, "--all"][..],
        &["dlq", "replay", "-c", c, "--reason", "invalid_json"][..],
    ] {
        let (code, out, err) = cli("worker", args);
        assert_ne!(code, 0, "{args:?} must not run beside another: {out}{err}");
        assert!(
            err.contains("worker-dlq-elsewhere") && err.contains("is running"),
            "names the holder: {err}"
        );
    }
    // Listing needs no lock, and the dead letter is still there.
    let (code, out, err) = cli("worker", &["dlq", "list", "-c", c, "--json"]);
    assert_eq!(code, 0, "{err}");
    let listed: Vec<serde_json::Value> = serde_json::from_str(&out).expect("json");
    assert_eq!(listed.len(), 1, "{out}");
    // Once the other is done, purge runs, and leaves no lock behind.
    let _: i64 = redis::cmd("DEL")
        .arg(&lock)
        .query_async(&mut conn)
        .await
        .expect("redis");
    let (code, out, err) = cli("worker", &["dlq", "purge", "-c", c, "--all"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("purged 1"), "{out}");
    let held: Option<String> = redis::cmd("GET")
        .arg(&lock)
        .query_async(&mut conn)
        .await
        .expect("redis");
    assert_eq!(held, None, "the lock is released");
    env.cleanup().await;
}

broker_test!(admin_api_requires_the_token_and_names_bad_fields);
async fn admin_api_requires_the_token_and_names_bad_fields(env: TestEnv) {
    let cfg = env.write_config(
        "cronpipe.toml",
        &format!(
            "[producer]\nhttp_addr = \"127.0.0.1:0\"\nadmin_token = \"s3cret\"\n{}",
            env.exec_task("count", "")
        ),
    );
    let producer = Proc::start("producer", &cfg, &[], env.dir.path(), "producer");
    let addr = served_addr(&producer).await;
    let http = reqwest::Client::new();
    let url = |p: &str| format!("http://{addr}{p}");

    let r = http.get(url("/api/v1/status")).send().await.expect("req");
    assert_eq!(r.status(), 401, "no token");
    let r = http
        .get(url("/api/v1/status"))
        .bearer_auth("wrong")
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 401, "wrong token");
    let r = http
        .post(url("/api/v1/schedules/x"))
        .json(&serde_json::json!({"cron": "* * * * *", "task": "count"}))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 401, "mutations need the token too");

    let authed = |rb: reqwest::RequestBuilder| rb.bearer_auth("s3cret");
    let r = authed(http.post(url("/api/v1/schedules/x")))
        .json(&serde_json::json!({"cron": "61 * * * *", "task": "count"}))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.expect("json");
    let msg = body["error"].as_str().unwrap_or_default();
    assert!(
        msg.contains("schedule \"x\".cron") && msg.contains("minute"),
        "{msg}"
    );
    let r = authed(http.post(url("/api/v1/schedules/x")))
        .json(
            &serde_json::json!({"cron": "* * * * *", "timezone": "Mars/Olympus", "task": "count"}),
        )
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 400);
    let msg = r.json::<serde_json::Value>().await.expect("json")["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        msg.contains("schedule \"x\".timezone") && msg.contains("Mars/Olympus"),
        "{msg}"
    );
    let r = authed(http.post(url("/api/v1/schedules/x")))
        .json(&serde_json::json!({"cron": "* * * * *", "task": "count", "colour": 1}))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap_or_default().contains("colour"));

    let good = serde_json::json!({"every": "5s", "task": "count"});
    let r = authed(http.post(url("/api/v1/schedules/x")))
        .json(&good)
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 201);
    let r = authed(http.post(url("/api/v1/schedules/x")))
        .json(&good)
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 409, "exists");
    let r = authed(http.get(url("/api/v1/status")))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 200);
    let status: serde_json::Value = r.json().await.expect("json");
    assert!(
        status["schedules"].as_array().is_some_and(|s| s
            .iter()
            .any(|v| v["name"] == "x" && v["source"] == "runtime")),
        "{status}"
    );
    assert!(
        status["leader"]["fencing_token"].as_u64().is_some(),
        "{status}"
    );
    let r = authed(http.post(url("/api/v1/enqueue")))
        .json(&serde_json::json!({"task": "nope"}))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 400, "unknown task");
    let r = authed(http.delete(url("/api/v1/schedules/x")))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 204);
    let r = authed(http.delete(url("/api/v1/schedules/x")))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 404);
    producer.signal(Signal::SIGTERM);
    drop(producer);
    env.cleanup().await;
}

/// `producer next` prints wall-clock slots across a DST change once each
/// (a list of hours, 2026-11-01 in New York), and bounds `-n`.
#[test]
fn producer_next_prints_slots_and_names_a_bad_count() {
    let (code, out, err) = cli(
        "producer",
        &[
            "next",
            "0 30 1,13 * * *",
            "--tz",
            "America/New_York",
            "--from",
            "2026-11-01T04:00:00Z",
            "-n",
            "3",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        vec![
            "2026-11-01T01:30:00-04:00",
            "2026-11-01T13:30:00-05:00",
            "2026-11-02T01:30:00-05:00"
        ]
    );
    for bad in ["0", "18446744073709551615"] {
        let (code, _, err) = cli("producer", &["next", "0 * * * *", "-n", bad]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("-n <N>") && err.contains("1..=10000"), "{err}");
    }
    // A flag that does not apply to the expression is an error, not ignored.
    for (args, says) in [
        (
            &["next", "90s", "--tz", "Europe/Berlin"][..],
            "--tz applies to cron expressions only",
        ),
        (
            &["next", "R/2026-01-01T00:00:00Z/P1D", "--tz", "UTC"][..],
            "--tz applies to cron expressions only",
        ),
        (
            &["next", "0 * * * *", "--anchor", "2026-01-01T00:00:00Z"][..],
            "--anchor applies to interval expressions",
        ),
    ] {
        let (code, _, err) = cli("producer", args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    let (code, out, err) = cli(
        "producer",
        &[
            "next",
            "90s",
            "--anchor",
            "2026-01-01T00:00:00Z",
            "--from",
            "2026-01-01T00:00:00Z",
            "-n",
            "1",
        ],
    );
    assert_eq!(
        (code, out.trim()),
        (0, "2026-01-01T00:01:30+00:00"),
        "{err}"
    );
}
