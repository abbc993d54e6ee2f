//! The built-in `exec` handler: runs a program fixed in config (a message can
//! never choose what runs), payload as JSON on stdin, envelope fields in the
//! environment, in its own process group so a timeout kills everything it
//! started, and (on Linux) killed with everything it started if the worker
//! itself dies (see [`crate::exec_guard`]).

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::process::Stdio;

use futures::future::BoxFuture;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use crate::handler::{FailureDetail, Handler, Task, TaskError};

/// How long output is still read after the program exited and its group was killed.
const PIPE_DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

/// An `exec` task definition.
#[derive(Debug, Clone)]
pub struct ExecHandler {
    /// Program and arguments.
    pub command: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Working directory.
    pub workdir: Option<PathBuf>,
    /// Exit codes meaning "do not retry".
    pub permanent_exit_codes: Vec<i32>,
    /// Bytes of output kept.
    pub tail_bytes: usize,
}

/// Asks the kernel to signal the process the worker starts for a task if the
/// worker dies (SIGKILL, OOM, abort): SIGTERM to the guard, which then kills
/// the task's whole group (see [`crate::exec_guard`]), or, without a guard,
/// SIGKILL to the program itself. Otherwise an orphaned program would keep
/// running while another worker retries the task after the claim expires,
/// and the task would run twice.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn die_with_worker(cmd: &mut Command, guarded: bool) {
    let signal = if guarded {
        Signal::SIGTERM
    } else {
        Signal::SIGKILL
    };
    // SAFETY: the closure runs in the forked child before exec and only calls
    // prctl(2), which is async-signal-safe and allocates nothing.
    unsafe {
        cmd.pre_exec(move || nix::sys::prctl::set_pdeathsig(signal).map_err(std::io::Error::from));
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_worker(_cmd: &mut Command, _guarded: bool) {}

/// The failure of a program that could not start: retried when the cause
/// may pass, permanent otherwise.
fn cannot_start(program: &str, why: String, transient: bool) -> TaskError {
    let message = format!("cannot start `{program}`: {why}");
    if transient {
        TaskError::retryable(message)
    } else {
        TaskError::Permanent {
            message,
            detail: FailureDetail::default(),
        }
    }
}

/// One request to the spawner thread: the command, the runtime its child
/// belongs to, and where the child goes.
type SpawnJob = (
    Command,
    tokio::runtime::Handle,
    tokio::sync::oneshot::Sender<std::io::Result<tokio::process::Child>>,
);

/// Starts `cmd` from a thread that lives as long as the process.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked exits, not the
/// process, and a runtime thread can exit while the worker runs on: after
/// `tokio::task::block_in_place` (the Kafka consumer's rebalance callback
/// waits in one) it ends up in the blocking pool and exits once idle. A
/// program forked from it would then be killed mid-run. So every program is
/// forked from one dedicated thread, which never exits; if that thread cannot
/// be started, from the calling thread as before.
async fn spawn_from_lasting_thread(mut cmd: Command) -> std::io::Result<tokio::process::Child> {
    use std::sync::mpsc;
    use std::sync::OnceLock;
    static SPAWNER: OnceLock<Option<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("cronpipe-exec-spawner".into())
            .spawn(move || {
                for (mut cmd, runtime, reply) in rx {
                    let _entered = runtime.enter();
                    let _ = reply.send(cmd.spawn());
                }
            })
            .map_err(|e| tracing::warn!(error = %e, "Could not start the exec spawner thread; programs are started from runtime threads"))
            .ok()
            .map(|_| tx)
    });
    let Some(spawner) = spawner else {
        return cmd.spawn();
    };
    let (reply, child) = tokio::sync::oneshot::channel();
    let job = (cmd, tokio::runtime::Handle::current(), reply);
    match spawner.send(job) {
        Ok(()) => child.await.unwrap_or_else(|_| {
            Err(std::io::Error::other(
                "the exec spawner thread dropped the request",
            ))
        }),
        // The thread is gone (it never exits, so this is not expected): start it here.
        Err(mpsc::SendError((mut cmd, _, _))) => cmd.spawn(),
    }
}

/// Kills the whole process group when dropped, unless disarmed.
struct GroupGuard(Option<i32>);

impl GroupGuard {
    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Keeps the last `cap` bytes read.
async fn tail<R: AsyncRead + Unpin>(mut r: R, cap: usize) -> Vec<u8> {
    let mut kept: VecDeque<u8> = VecDeque::with_capacity(cap.min(64 * 1024));
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                kept.extend(&buf[..n]);
                while kept.len() > cap {
                    kept.pop_front();
                }
            }
        }
    }
    kept.into_iter().collect()
}

fn joined_tail(out: &[u8], err: &[u8], cap: usize) -> String {
    let mut s = String::new();
    if !out.is_empty() {
        s.push_str(&String::from_utf8_lossy(out));
    }
    if !err.is_empty() {
        if !s.is_empty() && !s.ends_with('\n') {
            s.push('\n');
        }
        s.push_str(&String::from_utf8_lossy(err));
    }
    if s.len() > cap {
        let mut start = s.len() - cap;
        while !s.is_char_boundary(start) {
            start += 1;
        }
        s = s[start..].to_string();
    }
    s
}

impl ExecHandler {
    async fn run(self, task: Task) -> Result<(), TaskError> {
        let env = &task.envelope;
        let Some(program) = self.command.first() else {
            return Err(TaskError::permanent("exec handler has no command"));
        };
        let args = &self.command[1..];
        let (mut cmd, guarded) = match crate::exec_guard::command(program, args) {
            Some(cmd) => (cmd, true),
            None => {
                let mut cmd = Command::new(program);
                cmd.args(args);
                (cmd, false)
            }
        };
        cmd.envs(&self.env)
            .env("CRONPIPE_TASK_ID", &env.id)
            .env("CRONPIPE_TASK", &env.task)
            .env("CRONPIPE_IDEMPOTENCY_KEY", env.key())
            .env("CRONPIPE_ATTEMPT", task.attempt.to_string())
            .env("CRONPIPE_CREATED_AT", env.created_at.to_rfc3339())
            .env("CRONPIPE_WORKER", &task.worker)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(s) = &env.schedule {
            cmd.env("CRONPIPE_SCHEDULE", s);
        }
        if let Some(slot) = env.slot {
            cmd.env("CRONPIPE_SLOT", slot.to_rfc3339());
        }
        if let Some(t) = env.fencing_token {
            cmd.env("CRONPIPE_FENCING_TOKEN", t.to_string());
        }
        if let Some(dir) = &self.workdir {
            cmd.current_dir(dir);
        }
        die_with_worker(&mut cmd, guarded);
        let mut child = spawn_from_lasting_thread(cmd).await.map_err(|e| {
            let transient = crate::exec_guard::spawn_error_is_transient(&e);
            cannot_start(program, e.to_string(), transient)
        })?;
        let mut guard = GroupGuard(child.id().and_then(|p| i32::try_from(p).ok()));
        let payload = serde_json::to_vec(&env.payload).unwrap_or_default();
        // Feeding stdin and reading the output run beside the wait, so a chatty
        // program never blocks on a full pipe; they are not part of "done":
        // a background child left holding the pipes must not keep the task open.
        if let Some(mut stdin) = child.stdin.take() {
            tokio::spawn(async move {
                // A program that does not read stdin closes it early; that is fine.
                let _ = stdin.write_all(&payload).await;
                let _ = stdin.shutdown().await;
            });
        }
        let cap = self.tail_bytes;
        let read_out = child.stdout.take().map(|o| tokio::spawn(tail(o, cap)));
        let read_err = child.stderr.take().map(|e| tokio::spawn(tail(e, cap)));
        let collect = |h: Option<tokio::task::JoinHandle<Vec<u8>>>| async move {
            match h {
                // Once the group is killed the pipes close; the bound covers
                // children that left the group (setsid) and still hold them.
                Some(h) => match tokio::time::timeout(PIPE_DRAIN, h).await {
                    Ok(Ok(v)) => v,
                    _ => Vec::new(),
                },
                None => Vec::new(),
            }
        };
        let pgid = guard.0;
        let wait = async {
            let status = child.wait().await;
            // The main process exited; anything it left in its group goes too.
            if let Some(pgid) = pgid {
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            }
            let (o, e) = tokio::join!(collect(read_out), collect(read_err));
            (o, e, status)
        };
        tokio::select! {
            (o, e, status) = wait => {
                let output_tail = joined_tail(&o, &e, cap);
                let status = status.map_err(|e| TaskError::retryable(format!("waiting for `{program}`: {e}")))?;
                // The guard's own report that the program never started; an
                // exit code 127 of the program itself goes the usual way below.
                if guarded && status.code() == Some(crate::exec_guard::CANNOT_START) {
                    if let Some((why, transient)) = crate::exec_guard::cannot_start(&e) {
                        return Err(cannot_start(program, why, transient));
                    }
                }
                match status.code() {
                    Some(0) => {
                        tracing::info!(task_id = %env.id, task = %env.task, output_tail = %output_tail, "Exec task exited 0");
                        Ok(())
                    }
                    Some(code) => {
                        let detail = FailureDetail { exit_code: Some(code), http_status: None, output_tail };
                        let message = format!("`{program}` exited with code {code}");
                        if self.permanent_exit_codes.contains(&code) {
                            Err(TaskError::Permanent { message, detail })
                        } else {
                            Err(TaskError::Retryable { message, retry_after: None, detail })
                        }
                    }
                    None => {
                        use std::os::unix::process::ExitStatusExt;
                        let sig = status.signal().unwrap_or(0);
                        Err(TaskError::Retryable {
                            message: format!("`{program}` was killed by signal {sig}"),
                            retry_after: None,
                            detail: FailureDetail { exit_code: None, http_status: None, output_tail },
                        })
                    }
                }
            }
            _ = task.cancel.cancelled() => {
                guard.kill();
                Err(TaskError::retryable(format!("`{program}` was stopped (timeout or shutdown); its process group was killed")))
            }
        }
    }
}

impl Handler for ExecHandler {
    fn handle(&self, task: Task) -> BoxFuture<'static, Result<(), TaskError>> {
        Box::pin(self.clone().run(task))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use cronpipe_shared::Envelope;
    use tokio_util::sync::CancellationToken;

    use super::*;

    /// `PR_SET_PDEATHSIG` fires when the *thread* that started the program
    /// exits, not the process. A runtime thread can leave the runtime and
    /// exit (after `block_in_place`, which the Kafka consumer uses during a
    /// rebalance, it idles in the blocking pool for `thread_keep_alive`), and
    /// a program it had started must not be killed with it.
    #[test]
    fn a_program_outlives_the_runtime_thread_that_started_it() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_keep_alive(Duration::from_millis(50))
            .enable_all()
            .build()
            .unwrap();
        let handler = ExecHandler {
            command: vec!["/bin/sh".into(), "-c".into(), "sleep 1; exit 0".into()],
            env: BTreeMap::new(),
            workdir: None,
            permanent_exit_codes: vec![],
            tail_bytes: 1024,
        };
        let task = Task {
            envelope: Envelope::new("t", serde_json::Value::Null),
            attempt: 1,
            worker: "w".into(),
            cancel: CancellationToken::new(),
        };
        let result = rt.block_on(async move {
            tokio::spawn(async move {
                let mut run = handler.handle(task);
                // The first poll starts the program, on this thread.
                assert!(futures::poll!(&mut run).is_pending());
                // This thread leaves the runtime when the task next waits,
                // and exits 50 ms later.
                tokio::task::block_in_place(|| std::thread::sleep(Duration::from_millis(100)));
                run.await
            })
            .await
            .unwrap()
        });
        assert!(result.is_ok(), "{result:?}");
    }
}
