//! The exec guard: on Linux an `exec` task's program runs under a small
//! process, a second copy of the worker binary, that leads the task's process
//! group. The kernel signals the guard when the worker dies
//! (`PR_SET_PDEATHSIG`), and the guard then kills the whole group: the program
//! and everything it started (a shell's commands, a script's subprocesses).
//! Without it only the program itself dies with the worker; its children
//! would go on running beside the retry another worker starts once the claim
//! expires, and the task would run twice at once. The guard passes the
//! program's exit status on as its own (a signal by dying of the same signal).
//!
//! A binary that runs exec tasks calls [`main_if_requested`] first thing in
//! `main`, as the `worker` binary does. In one that does not, exec tasks run
//! as before: the program alone is killed when the worker dies.

use std::ffi::{OsStr, OsString};
use std::sync::OnceLock;

/// The first argument that makes the binary a guard.
const ARG: &str = "__cronpipe-exec-guard";
/// The guard's exit code when it could not start the program.
pub(crate) const CANNOT_START: i32 = 127;
/// How the guard's message about that begins on stderr.
const CANNOT_START_MARK: &str = "cronpipe-exec-guard: cannot start: ";
/// The same, when the cause may pass (see [`spawn_error_is_transient`]).
const CANNOT_START_NOW_MARK: &str = "cronpipe-exec-guard: cannot start now: ";

/// Whether a failure to start a program may pass: the system is out of
/// processes, memory or file descriptors, or the file is being written. The
/// task is then retried; otherwise (no such program, not executable) it can
/// never start, and is dead-lettered at once.
pub(crate) fn spawn_error_is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            nix::libc::EAGAIN
                | nix::libc::ENOMEM
                | nix::libc::EMFILE
                | nix::libc::ENFILE
                | nix::libc::ETXTBSY
        )
    )
}

/// The binary to run as guard; set by [`main_if_requested`].
static GUARD: OnceLock<&'static str> = OnceLock::new();

/// Runs the guard and exits when this process was started as one; otherwise
/// returns, and exec tasks of this process run under a guard from now on.
/// Call it first thing in `main`, before any thread is started.
pub fn main_if_requested() {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() == Some(OsStr::new(ARG)) {
        std::process::exit(guard(args.collect()));
    }
    if cfg!(target_os = "linux") {
        // The running binary itself, even if the file was replaced since.
        let _ = GUARD.set("/proc/self/exe");
    }
}

/// Whether exec tasks of this process run under a guard, that is whether
/// [`main_if_requested`] was called (and this is Linux).
pub fn installed() -> bool {
    GUARD.get().is_some()
}

/// The command that runs `program` with `args` under a guard, when this
/// process has one (see [`main_if_requested`]).
pub(crate) fn command(program: &str, args: &[String]) -> Option<tokio::process::Command> {
    let exe = GUARD.get()?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg(ARG)
        .arg(std::process::id().to_string())
        .arg(program)
        .args(args);
    Some(cmd)
}

/// The guard's message on stderr when it could not start the program, and
/// whether the cause may pass.
pub(crate) fn cannot_start(stderr: &[u8]) -> Option<(String, bool)> {
    String::from_utf8_lossy(stderr).lines().find_map(|l| {
        if let Some(why) = l.strip_prefix(CANNOT_START_NOW_MARK) {
            Some((why.to_string(), true))
        } else {
            l.strip_prefix(CANNOT_START_MARK)
                .map(|why| (why.to_string(), false))
        }
    })
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn guard(args: Vec<OsString>) -> i32 {
    use std::os::unix::process::{CommandExt, ExitStatusExt};

    use nix::sys::signal::{
        killpg, raise, sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal,
    };
    use nix::unistd::{getpgrp, getpid, getppid, Pid};

    extern "C" fn kill_group(_: nix::libc::c_int) {
        // The worker died: everything in this group goes, the guard too.
        // killpg(2) is async-signal-safe.
        let _ = killpg(Pid::from_raw(0), Signal::SIGKILL);
    }

    let (Some(parent), Some(program)) = (
        args.first()
            .and_then(|p| p.to_str())
            .and_then(|p| p.parse::<i32>().ok()),
        args.get(1),
    ) else {
        eprintln!("{ARG}: expected the worker's pid and a program");
        return 2;
    };
    // The group it kills must be the task's own, never its caller's.
    if getpgrp() != getpid() {
        eprintln!("{ARG}: must lead its own process group");
        return 2;
    }
    let on_death = SigAction::new(
        SigHandler::Handler(kill_group),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handler only calls killpg(2), which is async-signal-safe.
    if let Err(e) = unsafe { sigaction(Signal::SIGTERM, &on_death) } {
        eprintln!("{CANNOT_START_NOW_MARK}installing the guard's SIGTERM handler: {e}");
        return CANNOT_START;
    }
    // The worker may have died before the handler was there.
    if getppid() != Pid::from_raw(parent) {
        let _ = killpg(Pid::from_raw(0), Signal::SIGKILL);
        return CANNOT_START;
    }
    let mut cmd = std::process::Command::new(program);
    cmd.args(&args[2..]);
    // SAFETY: runs in the forked child before exec and only calls prctl(2),
    // which is async-signal-safe and allocates nothing. If the guard itself
    // is killed, the program goes with it.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            let mark = if spawn_error_is_transient(&e) {
                CANNOT_START_NOW_MARK
            } else {
                CANNOT_START_MARK
            };
            eprintln!("{mark}{e}");
            return CANNOT_START;
        }
    };
    let status = match child.wait() {
        Ok(status) => status,
        Err(e) => {
            // Cannot happen for our own child; kill the group rather than leave it.
            eprintln!("{ARG}: waiting for the program: {e}");
            let _ = killpg(Pid::from_raw(0), Signal::SIGKILL);
            return 1;
        }
    };
    if let Some(code) = status.code() {
        return code;
    }
    // Killed by a signal: die of the same one, so the worker reports it as such.
    let signal = status.signal().unwrap_or(nix::libc::SIGKILL);
    if let Ok(sig) = Signal::try_from(signal) {
        let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
        // SAFETY: restores the default action; no handler involved.
        let _ = unsafe { sigaction(sig, &default) };
        let _ = raise(sig);
    }
    128 + signal
}

#[cfg(not(target_os = "linux"))]
fn guard(_args: Vec<OsString>) -> i32 {
    eprintln!("{ARG}: the exec guard runs on Linux only");
    2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guards_cannot_start_message_says_whether_it_may_pass() {
        let missing = std::io::Error::from_raw_os_error(nix::libc::ENOENT);
        let busy = std::io::Error::from_raw_os_error(nix::libc::EAGAIN);
        assert!(!spawn_error_is_transient(&missing));
        assert!(spawn_error_is_transient(&busy));
        let stderr = format!("noise\n{CANNOT_START_MARK}{missing}\n");
        assert_eq!(
            cannot_start(stderr.as_bytes()),
            Some((missing.to_string(), false))
        );
        let stderr = format!("{CANNOT_START_NOW_MARK}{busy}\n");
        assert_eq!(
            cannot_start(stderr.as_bytes()),
            Some((busy.to_string(), true))
        );
        assert_eq!(cannot_start(b"exit 127 from the program itself\n"), None);
    }
}
