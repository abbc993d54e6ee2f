//! The schedule set the leader runs: the config file's schedules (reloaded on
//! SIGHUP or file change) merged with schedules managed at runtime in Redis
//! (`producer schedule add`, the admin API), with pause flags applied. On a
//! name clash the config file wins and the runtime schedule is ignored (adding
//! one with a config file schedule's name is refused up front).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use cronpipe_shared::config::{BuiltSchedule, ScheduleConfig};
use cronpipe_shared::Store;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often producers look for runtime schedule changes (one GET).
pub const POLL_EVERY: Duration = Duration::from_millis(250);

/// Builds the merged set from file schedules, runtime definitions (JSON) and paused names.
pub fn merge(
    file: &[BuiltSchedule],
    dynamic: &std::collections::HashMap<String, String>,
    paused: &[String],
) -> Vec<BuiltSchedule> {
    let paused: HashSet<&str> = paused.iter().map(String::as_str).collect();
    let mut out: Vec<BuiltSchedule> = file.to_vec();
    let file_names: HashSet<String> = file.iter().map(|s| s.name.clone()).collect();
    let mut names: Vec<&String> = dynamic.keys().collect();
    names.sort();
    for name in names {
        if file_names.contains(name) {
            tracing::warn!(schedule = %name, "Runtime schedule ignored: the config file defines one with this name");
            continue;
        }
        let built = serde_json::from_str::<ScheduleConfig>(&dynamic[name])
            .map_err(|e| e.to_string())
            .and_then(|def| def.build(name).map_err(|e| e.to_string()));
        match built {
            Ok(b) => out.push(b),
            Err(e) => {
                tracing::error!(schedule = %name, error = %e, "Runtime schedule is invalid; ignored")
            }
        }
    }
    for s in &mut out {
        if paused.contains(s.name.as_str()) {
            s.enabled = false;
        }
    }
    out
}

/// Keeps `out` equal to the merge of `file` and Redis until `shutdown`.
/// `ready` is notified after the first successful merge.
pub async fn run(
    store: Store,
    mut file: watch::Receiver<Arc<Vec<BuiltSchedule>>>,
    out: watch::Sender<Arc<Vec<BuiltSchedule>>>,
    ready: Arc<tokio::sync::Notify>,
    shutdown: CancellationToken,
) {
    let mut seen_rev: Option<u64> = None;
    let mut first = true;
    // Set when the file set changed and not yet merged: `changed()` below
    // marks the change as seen, so `has_changed()` alone would miss it.
    let mut file_changed = false;
    loop {
        file_changed |= file.has_changed().unwrap_or(false);
        let rev = store.schedules_rev().await;
        match rev {
            Ok(rev) if first || file_changed || seen_rev != Some(rev) => {
                match store.dynamic_schedules().await {
                    Ok((defs, paused)) => {
                        let files = file.borrow_and_update().clone();
                        // Without runtime schedules or pauses the file set is
                        // passed on as is, not copied (10,000 schedules are MBs).
                        let merged = if defs.is_empty() && paused.is_empty() {
                            files
                        } else {
                            Arc::new(merge(&files, &defs, &paused))
                        };
                        tracing::debug!(schedules = merged.len(), rev, "Schedule set updated");
                        out.send_replace(merged);
                        seen_rev = Some(rev);
                        file_changed = false;
                        if first {
                            first = false;
                            ready.notify_one();
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "Cannot read runtime schedules; retrying"),
                }
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "Cannot poll runtime schedules; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = async {
                // A dropped sender means the file set never changes again.
                if file.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            } => file_changed = true,
            _ = tokio::time::sleep(POLL_EVERY) => {}
        }
    }
}
