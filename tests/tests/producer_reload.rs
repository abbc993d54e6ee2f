//! Hot reload of a running `producer` process, on RabbitMQ and on Kafka:
//! editing the config file adds and changes schedules without a restart and
//! without losing the lease; an invalid edit is rejected with the key named
//! and the running set stays; SIGHUP reloads too.

mod producer_common;

use std::path::Path;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Timelike, Utc};
use cronpipe_tests::{broker_test, wait_until, TestEnv};
use nix::sys::signal::Signal;
use producer_common::*;

fn schedules(defs: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (name, cron) in defs {
        out.push_str(&format!(
            "\n[schedule.{name}]\ncron = \"{cron}\"\ntask = \"t\"\nmisfire = \"skip\"\n"
        ));
    }
    out.push_str(&noop_task("t"));
    out
}

fn mtime(path: &Path) -> SystemTime {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .expect("mtime")
}

/// Messages of `schedule` whose slot is after `after`.
fn of(got: &[Received], schedule: &str, after: DateTime<Utc>) -> Vec<Received> {
    got.iter()
        .filter(|r| r.env.schedule.as_deref() == Some(schedule) && r.slot() > after)
        .cloned()
        .collect()
}

broker_test!(config_edits_and_sighup_reload_schedules_without_losing_the_lease);
async fn config_edits_and_sighup_reload_schedules_without_losing_the_lease(env: TestEnv) {
    let v1 = schedules(&[("alpha", "* * * * * *"), ("beta", "*/5 * * * * *")]);
    let cfg = env.write_config("cronpipe.toml", &v1);
    let rec = Recorder::start(&env).await;
    let mut fleet = Fleet::new(&cfg, env.dir.path());
    fleet.start("p0");
    let first = rec
        .wait_for(Duration::from_secs(30), |r| {
            r.env.schedule.as_deref() == Some("alpha")
        })
        .await
        .expect("alpha publishes");
    let token = first.token();
    let (lease_value, _) = env
        .store
        .lease_holder()
        .await
        .expect("redis")
        .expect("lease");
    let log = || fleet.get("p0").log_text();

    // 1. Edit the file: add gamma, make beta fire every second.
    let edited_at = Utc::now();
    env.write_config(
        "cronpipe.toml",
        &schedules(&[
            ("alpha", "* * * * * *"),
            ("beta", "* * * * * *"),
            ("gamma", "* * * * * *"),
        ]),
    );
    let gamma = rec
        .wait_for(Duration::from_secs(10), |r| {
            r.env.schedule.as_deref() == Some("gamma")
        })
        .await
        .unwrap_or_else(|| panic!("gamma never published\n{}", log()));
    assert!(
        gamma.slot() >= edited_at - chrono::Duration::seconds(1),
        "a new schedule starts from now: first gamma slot {} (edited at {edited_at})",
        gamma.slot()
    );
    let beta = rec
        .wait_for(Duration::from_secs(10), |r| {
            r.env.schedule.as_deref() == Some("beta") && r.slot().second() % 5 != 0
        })
        .await
        .unwrap_or_else(|| panic!("beta still fires every 5 s\n{}", log()));
    assert!(
        log().contains("Reloaded schedules") && log().contains("config file changed"),
        "{}",
        log()
    );
    eprintln!(
        "file edit applied: gamma from {}, beta every second from {}",
        gamma.slot(),
        beta.slot()
    );

    // 2. An invalid edit (and a valid new schedule in the same file) is rejected whole.
    let before_rejects = log().matches("Config reload rejected").count();
    env.write_config(
        "cronpipe.toml",
        &schedules(&[
            ("alpha", "* * * * * *"),
            ("beta", "61 * * * * *"),
            ("gamma", "* * * * * *"),
            ("delta", "* * * * * *"),
        ]),
    );
    assert!(
        wait_until(Duration::from_secs(10), || async {
            log().matches("Config reload rejected").count() > before_rejects
        })
        .await,
        "{}",
        log()
    );
    let rejected_at = Utc::now();
    let rejection = log()
        .lines()
        .find(|l| l.contains("Config reload rejected"))
        .map(str::to_string)
        .expect("rejection line");
    assert!(
        rejection.contains(r#"schedule \"beta\".cron"#)
            || rejection.contains(r#"schedule "beta".cron"#),
        "the rejection names the key: {rejection}"
    );
    // The running set stays: alpha, beta (every second) and gamma go on, delta never starts.
    assert!(rec
        .wait_for(Duration::from_secs(10), |r| r.slot()
            > rejected_at + chrono::Duration::seconds(3))
        .await
        .is_some());
    let got = rec.snapshot();
    for name in ["alpha", "beta", "gamma"] {
        assert!(
            of(&got, name, rejected_at).len() >= 2,
            "{name} stopped after the rejected edit"
        );
    }
    assert!(
        of(&got, "beta", rejected_at)
            .iter()
            .any(|r| r.slot().second() % 5 != 0),
        "beta kept its every-second timing"
    );
    assert!(
        of(&got, "delta", edited_at).is_empty(),
        "nothing of the rejected file applies"
    );
    eprintln!("rejected: {rejection}");

    // 3. SIGHUP: a valid file whose mtime is put back, so only the signal can reload it.
    let old_mtime = mtime(&cfg);
    env.write_config(
        "cronpipe.toml",
        &schedules(&[
            ("alpha", "* * * * * *"),
            ("beta", "*/5 * * * * *"),
            ("delta", "* * * * * *"),
        ]),
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(&cfg)
        .and_then(|f| f.set_modified(old_mtime))
        .expect("set mtime");
    let hup_at = Utc::now();
    fleet.get("p0").signal(Signal::SIGHUP);
    let delta = rec
        .wait_for(Duration::from_secs(10), |r| {
            r.env.schedule.as_deref() == Some("delta")
        })
        .await
        .unwrap_or_else(|| panic!("delta never published after SIGHUP\n{}", log()));
    assert!(
        log()
            .lines()
            .any(|l| l.contains("Reloaded schedules") && l.contains("SIGHUP")),
        "{}",
        log()
    );
    let applied = delta.at;
    assert!(rec
        .wait_for(Duration::from_secs(10), |r| r.slot()
            > applied + chrono::Duration::seconds(3))
        .await
        .is_some());
    let got = rec.snapshot();
    let settled = applied + chrono::Duration::seconds(1);
    assert!(of(&got, "gamma", settled).is_empty(), "gamma was removed");
    assert!(
        of(&got, "beta", settled)
            .iter()
            .all(|r| r.slot().second() % 5 == 0),
        "beta is back to every 5 s"
    );
    assert!(of(&got, "alpha", settled).len() >= 3);
    eprintln!("SIGHUP at {hup_at} applied: delta from {}", delta.slot());

    // One leadership throughout: same token on every message, same lease value.
    let tokens: std::collections::BTreeSet<u64> = got.iter().map(Received::token).collect();
    assert_eq!(tokens, [token].into(), "all messages carry the first token");
    let (lease_now, _) = env
        .store
        .lease_holder()
        .await
        .expect("redis")
        .expect("lease");
    assert_eq!(lease_now, lease_value, "the lease was never given up");
    assert_eq!(log().matches("Became leader").count(), 1, "{}", log());
    fleet.stop_all();
    rec.finish(&env).await;
    env.cleanup().await;
}
