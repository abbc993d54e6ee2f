//! Support for the integration suite: every test gets its own Redis namespace
//! and RabbitMQ queue names (random), talks to the real services on
//! 127.0.0.1, and removes what it created when it ends.

pub mod kafka;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cronpipe_shared::broker::rabbitmq::Rabbit;
use cronpipe_shared::{Broker, Config, Envelope, Store};

/// Redis URL used by the suite (`CRONPIPE_TEST_REDIS_URL` overrides).
pub fn redis_url() -> String {
    std::env::var("CRONPIPE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// AMQP URL used by the suite (`CRONPIPE_TEST_AMQP_URL` overrides).
pub fn amqp_url() -> String {
    std::env::var("CRONPIPE_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Scratch files of a test world, shared by the RabbitMQ [`TestEnv`] and the
/// Kafka [`kafka::KafkaEnv`]: config files and the exec tasks' runs file.
pub mod scratch {
    use std::path::{Path, PathBuf};

    use cronpipe_shared::Config;

    /// Writes `base + extra` to `dir/file` and returns its path.
    pub fn write_config(dir: &Path, base: &str, file: &str, extra: &str) -> PathBuf {
        let path = dir.join(file);
        std::fs::write(&path, format!("{base}\n{extra}")).expect("write config");
        path
    }

    /// Writes and parses `base + extra` into a validated config (panics with the problems).
    pub fn config(dir: &Path, base: &str, extra: &str) -> Config {
        let path = write_config(dir, base, "cronpipe.toml", extra);
        match Config::load_with_env(&path, Vec::new()) {
            Ok(c) => c,
            Err(e) => panic!("test config invalid:\n{e}"),
        }
    }

    /// The file exec tasks from [`exec_task`] append one line to per run.
    pub fn runs_file(dir: &Path) -> PathBuf {
        dir.join("runs.log")
    }

    /// TOML for an exec task `name` that appends
    /// `<task id> <schedule> <slot> <attempt> <fencing token>` to [`runs_file`], then runs `then` (shell).
    pub fn exec_task(dir: &Path, name: &str, then: &str) -> String {
        format!(
            r#"
[task.{name}]
handler = "exec"
command = ["/bin/sh", "-c", "echo \"$CRONPIPE_TASK_ID ${{CRONPIPE_SCHEDULE:--}} ${{CRONPIPE_SLOT:--}} $CRONPIPE_ATTEMPT ${{CRONPIPE_FENCING_TOKEN:--}}\" >> {file}; {then}"]
"#,
            file = runs_file(dir).display(),
            then = if then.is_empty() { "true" } else { then },
        )
    }

    /// Lines of [`runs_file`].
    pub fn runs(dir: &Path) -> Vec<String> {
        std::fs::read_to_string(runs_file(dir))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// One test's isolated world.
pub struct TestEnv {
    /// Random id of this test.
    pub id: String,
    /// Redis namespace.
    pub namespace: String,
    /// Work queue name.
    pub queue: String,
    /// Scratch directory (config files, task side-effect files).
    pub dir: tempfile::TempDir,
    /// Redis handle on the namespace.
    pub store: Store,
    /// Broker handle on the queue.
    pub broker: Broker,
}

/// Polls `cond` every 20 ms until it holds or `limit` passes; returns whether it held.
pub async fn wait_until<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + limit;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl TestEnv {
    /// A fresh world with `extra` TOML appended to the base config (schedules, tasks, overrides).
    pub async fn new(name: &str) -> TestEnv {
        let id = format!("{name}-{:08x}", rand::random::<u32>());
        let namespace = format!("cptest-{id}");
        let queue = format!("cptest.{id}");
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::connect(&redis_url(), &namespace, Duration::from_secs(5))
            .await
            .expect("Redis must run on 127.0.0.1:6379 (see README: Testing)");
        let mut cfg = cronpipe_shared::config::BrokerConfig::default();
        cfg.rabbitmq.url = amqp_url();
        cfg.rabbitmq.queue = queue.clone();
        let broker = Broker::connect(&cfg, &format!("test-{id}"))
            .await
            .expect("RabbitMQ must run on 127.0.0.1:5672 (see README: Testing)");
        TestEnv {
            id,
            namespace,
            queue,
            dir,
            store,
            broker,
        }
    }

    /// The RabbitMQ adapter.
    pub fn rabbit(&self) -> &Rabbit {
        match &self.broker {
            Broker::Rabbit(r) => r,
            Broker::Kafka(_) => {
                panic!("TestEnv runs on RabbitMQ; Kafka tests use cronpipe_tests::kafka")
            }
        }
    }

    /// Base config text for this world: its namespace and queue, short timings.
    pub fn base_toml(&self) -> String {
        format!(
            r#"
[redis]
url = "{redis}"
namespace = "{ns}"

[broker]
kind = "rabbitmq"

[broker.rabbitmq]
url = "{amqp}"
queue = "{queue}"
"#,
            redis = redis_url(),
            ns = self.namespace,
            amqp = amqp_url(),
            queue = self.queue
        )
    }

    /// Writes `base_toml() + extra` to a file and returns its path.
    pub fn write_config(&self, file: &str, extra: &str) -> PathBuf {
        scratch::write_config(self.dir.path(), &self.base_toml(), file, extra)
    }

    /// Parses `base_toml() + extra` into a validated config.
    pub fn config(&self, extra: &str) -> Config {
        scratch::config(self.dir.path(), &self.base_toml(), extra)
    }

    /// A file an exec task appends one line to per run (see [`Self::exec_task`]).
    pub fn runs_file(&self) -> PathBuf {
        scratch::runs_file(self.dir.path())
    }

    /// TOML for an exec task `name` that records each run in [`Self::runs_file`], then runs `then`.
    pub fn exec_task(&self, name: &str, then: &str) -> String {
        scratch::exec_task(self.dir.path(), name, then)
    }

    /// Lines of the runs file.
    pub fn runs(&self) -> Vec<String> {
        scratch::runs(self.dir.path())
    }

    /// Takes every message now in `queue` (acking them).
    pub async fn drain(&self, queue: &str) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(m) = self.rabbit().get(queue, true).await.expect("basic.get") {
            out.push(m);
        }
        out
    }

    /// Takes every envelope now in the work queue.
    pub async fn drain_envelopes(&self) -> Vec<Envelope> {
        self.drain(&self.queue)
            .await
            .into_iter()
            .map(|b| Envelope::decode(&b).expect("producer wrote a valid envelope"))
            .collect()
    }

    /// Removes the queues and every Redis key of this world.
    pub async fn cleanup(self) {
        let _ = self.rabbit().delete_topology().await;
        let mut conn = self.store.connection();
        let pattern = format!(
            "{}*",
            self.store
                .keys()
                .prefix()
                .replace('{', "\\{")
                .replace('}', "\\}")
        );
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(&pattern)
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<i64, _> = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
        }
        self.broker.close().await;
    }
}

/// Path of a workspace binary (`producer` or `worker`), built by `cargo build --bins`
/// (scripts/test does this before the suite).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: build the binaries first (cargo build --workspace --bins), as scripts/test does",
        path.display()
    );
    path
}

/// A child process killed when dropped.
pub struct Proc {
    /// The child.
    pub child: Child,
    /// Its log file.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `bin run --config cfg` with extra environment, logging to a file in `dir`.
    pub fn start(bin: &str, cfg: &Path, env: &[(&str, &str)], dir: &Path, label: &str) -> Proc {
        let log = dir.join(format!("{label}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(binary(bin));
        cmd.arg("run")
            .arg("--config")
            .arg(cfg)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup"))
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Proc {
            child: cmd.spawn().expect("spawn binary"),
            log,
        }
    }

    /// Sends a signal.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, sig);
    }

    /// Waits for exit up to `limit`; true when it exited.
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
