//! The `producer` binary: argument parsing, logging and signals; the work is in the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use cronpipe_shared::config::BuiltSchedule;
use cronpipe_shared::schedule::{self, Schedule};
use cronpipe_shared::Config;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

mod commands;

#[derive(Parser)]
#[command(
    name = "producer",
    version,
    about = "cronpipe producer: fires schedules as task messages, one leader at a time"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the producer: contend for leadership and publish every schedule slot.
    #[command(
        after_help = "Examples:\n  producer run --config examples/cronpipe.toml\n  CRONPIPE__PRODUCER__LEASE_TTL=10s producer run -c /etc/cronpipe.toml\n\nSignals: SIGINT/SIGTERM release the lease and exit; SIGHUP reloads schedules (so does saving the file)."
    )]
    Run {
        /// Config file.
        #[arg(short, long, env = "CRONPIPE_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config file without connecting to anything.
    #[command(after_help = "Example:\n  producer check --config examples/cronpipe.toml")]
    Check {
        /// Config file.
        #[arg(short, long, env = "CRONPIPE_CONFIG")]
        config: PathBuf,
    },
    /// Show the leader (instance, fencing token, lease time left) and every schedule's state.
    #[command(
        after_help = "Examples:\n  producer status -c cronpipe.toml\n  producer status -c cronpipe.toml --json"
    )]
    Status {
        /// Config file.
        #[arg(short, long, env = "CRONPIPE_CONFIG")]
        config: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Manage schedules at runtime: list, add, update, pause, resume, remove.
    Schedule {
        /// Config file.
        #[arg(short, long, env = "CRONPIPE_CONFIG", global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: commands::ScheduleCmd,
    },
    /// Publish an ad-hoc task through the same path other publishers use.
    #[command(
        after_help = "Examples:\n  producer enqueue report -c cronpipe.toml --payload '{\"format\":\"pdf\"}'\n  producer enqueue report -c cronpipe.toml --key report-2026-11-21 --delay 10m"
    )]
    Enqueue {
        /// Config file.
        #[arg(short, long, env = "CRONPIPE_CONFIG")]
        config: PathBuf,
        #[command(flatten)]
        args: commands::EnqueueArgs,
    },
    /// Print the next fire instants of a schedule expression.
    #[command(
        after_help = "EXPR is a cron expression (5, 6 or 7 fields, or @daily etc.), an interval such as 90s,\nor an ISO 8601 repeating interval such as R5/2026-01-01T09:00:00Z/P1M.\n\nExamples:\n  producer next \"0 30 2 * * *\" --tz America/New_York -n 3\n  producer next \"0 0 12 L * ?\" -n 3 --from 2026-01-01T00:00:00Z\n  producer next 90s --from 2026-01-01T00:00:00Z\n  producer next R5/2026-01-31T09:00:00Z/P1M -n 10"
    )]
    Next {
        /// The expression.
        expr: String,
        /// IANA timezone for cron fields (default UTC; cron expressions only).
        #[arg(long)]
        tz: Option<String>,
        /// Start after this RFC 3339 instant (default: now).
        #[arg(long)]
        from: Option<String>,
        /// How many instants (1 to 10000).
        #[arg(short = 'n', default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        n: u64,
        /// Anchor of an interval expression (RFC 3339; default 1970-01-01T00:00:00Z).
        #[arg(long)]
        anchor: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Next {
            expr,
            tz,
            from,
            n,
            anchor,
        } => next(
            &expr,
            tz.as_deref(),
            from.as_deref(),
            n as usize,
            anchor.as_deref(),
        ),
        Command::Check { config } => check(&config),
        Command::Run { config } => run(&config),
        Command::Status { config, json } => {
            cronpipe_shared::cli::run_tool(&config, |c| commands::status(&config, c, json))
        }
        Command::Schedule { config, command } => match config {
            Some(config) => {
                cronpipe_shared::cli::run_tool(&config, |c| commands::schedule(c, command))
            }
            None => {
                eprintln!("error: --config FILE (or CRONPIPE_CONFIG) is required");
                Ok(ExitCode::from(2))
            }
        },
        Command::Enqueue { config, args } => {
            cronpipe_shared::cli::run_tool(&config, |c| commands::enqueue(c, args))
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &Path) -> anyhow::Result<ExitCode> {
    let config = match cronpipe_shared::cli::load_config(path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    for warning in config.schedule_warnings() {
        println!("{}: {warning}", path.display());
    }
    println!(
        "{}: ok ({} schedule{}, {} task{})",
        path.display(),
        config.schedules.len(),
        if config.schedules.len() == 1 { "" } else { "s" },
        config.tasks.len(),
        if config.tasks.len() == 1 { "" } else { "s" }
    );
    Ok(ExitCode::SUCCESS)
}

fn next(
    expr: &str,
    tz: Option<&str>,
    from: Option<&str>,
    n: usize,
    anchor: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let fail = |msg: String| {
        eprintln!("error: {msg}");
        Ok(ExitCode::from(2))
    };
    let zone = match schedule::parse_timezone(tz.unwrap_or("UTC")) {
        Ok(z) => z,
        Err(e) => return fail(format!("--tz: {e}")),
    };
    let from: DateTime<Utc> = match from {
        None => Utc::now(),
        Some(f) => match DateTime::parse_from_rfc3339(f) {
            Ok(t) => t.with_timezone(&Utc),
            Err(e) => {
                return fail(format!(
                    "--from `{f}`: {e}; expected an RFC 3339 instant such as 2026-01-01T00:00:00Z"
                ))
            }
        },
    };
    let trimmed = expr.trim();
    let iso = trimmed.starts_with('R') && trimmed.contains('/');
    let interval = !iso && cronpipe_shared::duration::parse_duration(trimmed).is_ok();
    if tz.is_some() && (iso || interval) {
        return fail(format!(
            "--tz applies to cron expressions only; `{expr}` is {}",
            if iso {
                "an ISO 8601 repetition, whose start carries its own UTC offset"
            } else {
                "an interval, counted in absolute time from --anchor"
            }
        ));
    }
    if anchor.is_some() && !interval {
        return fail(format!(
            "--anchor applies to interval expressions (such as `90s`) only; `{expr}` is {}",
            if iso {
                "an ISO 8601 repetition, which starts at its own start instant"
            } else {
                "a cron expression"
            }
        ));
    }
    let built = if iso {
        schedule::parse_iso_repeat(trimmed).map(Schedule::Iso)
    } else if let Ok(period) = cronpipe_shared::duration::parse_duration(trimmed) {
        let anchor = match anchor {
            None => schedule::epoch(),
            Some(a) => match DateTime::parse_from_rfc3339(a) {
                Ok(t) => t.with_timezone(&Utc),
                Err(e) => return fail(format!("--anchor `{a}`: {e}")),
            },
        };
        Schedule::every(period, anchor)
    } else {
        Schedule::cron(trimmed, zone)
    };
    let schedule = match built {
        Ok(s) => s,
        Err(e) => return fail(format!("expression `{expr}`: {e}")),
    };
    let zone = schedule.display_zone();
    for t in schedule.upcoming(from, n) {
        println!("{}", zone.format(t));
    }
    Ok(ExitCode::SUCCESS)
}

fn run(path: &Path) -> anyhow::Result<ExitCode> {
    // Parsed apart (see `memory::isolated`): with 10,000 schedules the parse
    // is megabytes of temporary nodes the producer must not stay fragmented by.
    let loaded = cronpipe_shared::memory::isolated(|| cronpipe_shared::cli::load_config(path));
    let config = match loaded {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    cronpipe_shared::telemetry::init_logging(&config.log);
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async_run(path.to_path_buf(), config))?;
    Ok(ExitCode::SUCCESS)
}

async fn async_run(path: PathBuf, config: Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let schedules: Vec<BuiltSchedule> = config
        .built_schedules()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (tx, rx) = watch::channel(Arc::new(schedules));
    spawn_signals(shutdown.clone(), path.clone(), tx)?;
    let opts = cronpipe_producer::Options::from_config(&config);
    tracing::info!(instance = %opts.instance_id, config = %path.display(), schedules = config.schedules.len(), "Producer starting");
    for warning in config.schedule_warnings() {
        tracing::warn!(config = %path.display(), "{warning}");
    }
    let Some((store, broker)) = cronpipe_producer::connect(&config, &opts.instance_id, &shutdown)
        .await
        .context("connecting")?
    else {
        return Ok(());
    };
    if let Some(addr) = config.producer.http_addr {
        let conns: cronpipe_shared::ops::Connections = Default::default();
        let _ = conns.set((store.clone(), broker.clone()));
        let status = opts.status.clone();
        let ready = cronpipe_shared::ops::readiness(conns, Some(Arc::new(move || status.fields())));
        let admin = cronpipe_producer::admin::Admin::new(store.clone(), Arc::new(config.clone()));
        let token = config
            .producer
            .admin_token
            .as_ref()
            .map(|t| t.expose().to_string());
        let api = cronpipe_producer::admin::router(admin, broker.clone(), token);
        cronpipe_shared::ops::serve(addr, ready, Some(api), shutdown.clone())
            .await
            .with_context(|| format!("serving producer.http_addr = {addr}"))?;
    }
    // Not needed past this point (the admin API holds its own copy), and with
    // 10,000 schedules the parsed file is megabytes of heap.
    drop(config);
    cronpipe_shared::memory::release_free();
    cronpipe_producer::run(opts, store, broker, rx, shutdown)
        .await
        .context("producer stopped")?;
    tracing::info!("Producer stopped");
    Ok(())
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// SIGINT/SIGTERM cancel `shutdown`; SIGHUP or a changed config file reloads schedules.
fn spawn_signals(
    shutdown: CancellationToken,
    path: PathBuf,
    tx: watch::Sender<Arc<Vec<BuiltSchedule>>>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    tokio::spawn(async move {
        let mut seen = mtime(&path);
        loop {
            let reason = tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); shutdown.cancel(); return; }
                _ = int.recv() => { tracing::info!("SIGINT: shutting down"); shutdown.cancel(); return; }
                _ = hup.recv() => "SIGHUP",
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    let now = mtime(&path);
                    if now == seen { continue; }
                    seen = now;
                    "config file changed"
                }
            };
            reload(&path, &tx, reason);
        }
    });
    Ok(())
}

fn reload(path: &Path, tx: &watch::Sender<Arc<Vec<BuiltSchedule>>>, reason: &str) {
    match cronpipe_shared::memory::isolated(|| Config::load(path)) {
        Err(errors) => {
            for e in &errors.0 {
                tracing::error!(problem = %e, "Config reload rejected; keeping the running schedules");
            }
        }
        Ok(config) => match config.built_schedules() {
            Ok(s) => {
                tracing::info!(reason, schedules = s.len(), "Reloaded schedules");
                tx.send_replace(Arc::new(s));
            }
            Err(e) => {
                tracing::error!(problem = %e, "Config reload rejected; keeping the running schedules")
            }
        },
    }
    // The parsed file is gone now; return its pages.
    cronpipe_shared::memory::release_free();
}
