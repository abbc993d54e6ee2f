//! Operator subcommands of the `producer` binary: `status`, `schedule …` and
//! `enqueue`. They talk to Redis (and the broker, for enqueue) directly using
//! the same config file as `producer run`.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Subcommand};
use cronpipe_producer::admin::{Admin, AdminError, EnqueueRequest, ScheduleView};
use cronpipe_shared::config::{MisfirePolicy, ScheduleConfig};
use cronpipe_shared::duration::Dur;
use cronpipe_shared::{Broker, Config, Store};

/// `producer schedule …`
#[derive(Subcommand)]
pub enum ScheduleCmd {
    /// List every schedule (config file and runtime) with its state.
    #[command(after_help = "Example:\n  producer schedule list -c cronpipe.toml")]
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add a runtime schedule (validated like config-file schedules; the leader applies it within a second).
    #[command(
        after_help = "Examples:\n  producer schedule add cleanup -c cronpipe.toml --cron \"0 */15 * * * *\" --task cleanup\n  producer schedule add report -c cronpipe.toml --cron \"0 30 2 * * *\" --tz Europe/London --task report --misfire fire_all\n  producer schedule add poll -c cronpipe.toml --every 90s --task poll --payload '{\"source\":\"a\"}'"
    )]
    Add(SpecArgs),
    /// Replace a runtime schedule's definition (its last slot is kept).
    #[command(
        after_help = "Example:\n  producer schedule update cleanup -c cronpipe.toml --cron \"0 */5 * * * *\" --task cleanup"
    )]
    Update(SpecArgs),
    /// Pause a schedule (config file or runtime): it publishes nothing until resumed.
    #[command(after_help = "Example:\n  producer schedule pause nightly-report -c cronpipe.toml")]
    Pause {
        /// Schedule name.
        name: String,
    },
    /// Resume a paused schedule; slots missed while paused follow its misfire policy.
    #[command(after_help = "Example:\n  producer schedule resume nightly-report -c cronpipe.toml")]
    Resume {
        /// Schedule name.
        name: String,
    },
    /// Remove a runtime schedule and its state.
    #[command(after_help = "Example:\n  producer schedule remove cleanup -c cronpipe.toml")]
    Remove {
        /// Schedule name.
        name: String,
    },
}

/// A schedule definition given as flags.
#[derive(Args)]
pub struct SpecArgs {
    /// Schedule name.
    name: String,
    /// Cron expression.
    #[arg(long, conflicts_with_all = ["every", "iso"])]
    cron: Option<String>,
    /// Fixed interval such as 90s.
    #[arg(long, conflicts_with = "iso")]
    every: Option<String>,
    /// Anchor instant of --every (RFC 3339).
    #[arg(long, requires = "every")]
    anchor: Option<String>,
    /// ISO 8601 repeating interval, e.g. R5/2026-01-01T09:00:00Z/P1M.
    #[arg(long)]
    iso: Option<String>,
    /// IANA timezone of cron fields (default UTC).
    #[arg(long)]
    tz: Option<String>,
    /// Task to publish.
    #[arg(long)]
    task: String,
    /// JSON payload.
    #[arg(long)]
    payload: Option<String>,
    /// Misfire policy: skip, fire_once or fire_all.
    #[arg(long, default_value = "fire_once")]
    misfire: String,
    /// How far back the misfire policy looks, e.g. 6h.
    #[arg(long)]
    catchup_window: Option<String>,
    /// Most slots fire_all publishes at once.
    #[arg(long)]
    max_catchup: Option<u32>,
}

impl SpecArgs {
    fn spec(&self) -> Result<ScheduleConfig, String> {
        let misfire = match self.misfire.as_str() {
            "skip" => MisfirePolicy::Skip,
            "fire_once" => MisfirePolicy::FireOnce,
            "fire_all" => MisfirePolicy::FireAll,
            other => {
                return Err(format!(
                    "--misfire `{other}`: expected skip, fire_once or fire_all"
                ))
            }
        };
        let payload = match &self.payload {
            None => None,
            Some(p) => {
                Some(serde_json::from_str(p).map_err(|e| format!("--payload is not JSON: {e}"))?)
            }
        };
        let catchup_window = match &self.catchup_window {
            None => None,
            Some(w) => Some(Dur(cronpipe_shared::duration::parse_duration(w)
                .map_err(|e| format!("--catchup-window: {e}"))?)),
        };
        Ok(ScheduleConfig {
            cron: self.cron.clone(),
            every: self.every.clone(),
            anchor: self.anchor.clone(),
            iso: self.iso.clone(),
            timezone: self.tz.clone(),
            task: self.task.clone(),
            payload,
            misfire,
            catchup_window,
            max_catchup: self.max_catchup,
            enabled: true,
        })
    }
}

/// `producer enqueue …`
#[derive(Args)]
pub struct EnqueueArgs {
    /// Task name.
    task: String,
    /// JSON payload.
    #[arg(long, default_value = "null")]
    payload: String,
    /// Idempotency key (duplicates with the same key run once).
    #[arg(long)]
    key: Option<String>,
    /// Deliver after this delay, e.g. 30s (held by the broker).
    #[arg(long)]
    delay: Option<String>,
}

async fn store_of(config: &Config) -> anyhow::Result<Store> {
    Ok(cronpipe_shared::connect::tool_store(config).await?)
}

fn report(result: Result<String, AdminError>) -> ExitCode {
    match result {
        Ok(msg) => {
            println!("{msg}");
            ExitCode::SUCCESS
        }
        Err(e @ (AdminError::Invalid(_) | AdminError::Conflict(_) | AdminError::NotFound(_))) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn fmt_time(t: Option<chrono::DateTime<chrono::Utc>>, zone: &str) -> String {
    match t {
        None => "-".into(),
        Some(t) => match cronpipe_shared::schedule::parse_timezone(zone) {
            Ok(tz) => t.with_timezone(&tz).to_rfc3339(),
            Err(_) => t.to_rfc3339(),
        },
    }
}

fn table(views: &[ScheduleView]) -> String {
    let mut out = format!(
        "{:<24} {:<8} {:<22} {:<10} {:<7} {:<27} {:<27}\n",
        "NAME", "SOURCE", "TIMEZONE", "MISFIRE", "PAUSED", "LAST SLOT", "NEXT SLOT"
    );
    for v in views {
        out.push_str(&format!(
            "{:<24} {:<8} {:<22} {:<10} {:<7} {:<27} {:<27}\n",
            v.name,
            match v.source {
                cronpipe_producer::admin::Source::File => "file",
                cronpipe_producer::admin::Source::Runtime => "runtime",
            },
            v.timezone,
            v.misfire,
            if v.paused { "yes" } else { "no" },
            fmt_time(v.last_slot, &v.timezone),
            fmt_time(v.next_slot, &v.timezone),
        ));
    }
    out.trim_end().to_string()
}

/// `producer status`
pub async fn status(path: &Path, config: Config, json: bool) -> anyhow::Result<ExitCode> {
    let admin = Admin::new(store_of(&config).await?, Arc::new(config));
    let status = match admin.status().await {
        Ok(s) => s,
        Err(e) => return Ok(report(Err(e))),
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).context("encoding status")?
        );
        return Ok(ExitCode::SUCCESS);
    }
    match &status.leader {
        Some(l) => println!(
            "leader: {} (fencing token {}, lease {} ms left)",
            l.instance, l.fencing_token, l.lease_left_ms
        ),
        None => println!("leader: none (no producer holds the lease)"),
    }
    println!("config: {}\n", path.display());
    println!("{}", table(&status.schedules));
    Ok(ExitCode::SUCCESS)
}

/// `producer schedule …`
pub async fn schedule(config: Config, cmd: ScheduleCmd) -> anyhow::Result<ExitCode> {
    let admin = Admin::new(store_of(&config).await?, Arc::new(config));
    let result = match cmd {
        ScheduleCmd::List { json } => match admin.list().await {
            Ok(v) if json => serde_json::to_string_pretty(&v)
                .context("encoding")
                .map(Ok)?,
            Ok(v) => Ok(table(&v)),
            Err(e) => Err(e),
        },
        ScheduleCmd::Add(args) => match args.spec() {
            Err(e) => Err(AdminError::Invalid(e)),
            Ok(spec) => admin
                .add(&args.name, &spec)
                .await
                .map(|_| format!("added schedule `{}`", args.name)),
        },
        ScheduleCmd::Update(args) => match args.spec() {
            Err(e) => Err(AdminError::Invalid(e)),
            Ok(spec) => admin
                .update(&args.name, &spec)
                .await
                .map(|_| format!("updated schedule `{}`", args.name)),
        },
        ScheduleCmd::Pause { name } => admin
            .set_paused(&name, true)
            .await
            .map(|_| format!("paused `{name}`")),
        ScheduleCmd::Resume { name } => admin
            .set_paused(&name, false)
            .await
            .map(|_| format!("resumed `{name}`")),
        ScheduleCmd::Remove { name } => admin
            .remove(&name)
            .await
            .map(|_| format!("removed `{name}`")),
    };
    Ok(report(result))
}

/// `producer enqueue …`
pub async fn enqueue(config: Config, args: EnqueueArgs) -> anyhow::Result<ExitCode> {
    let payload: serde_json::Value = match serde_json::from_str(&args.payload) {
        Ok(p) => p,
        Err(e) => {
            return Ok(report(Err(AdminError::Invalid(format!(
                "--payload is not JSON: {e}"
            )))))
        }
    };
    let store = store_of(&config).await?;
    let broker = Broker::connect(&config.broker, "cronpipe-enqueue")
        .await
        .context("connecting to the broker")?;
    let admin = Admin::new(store, Arc::new(config));
    let req = EnqueueRequest {
        task: args.task,
        payload,
        idempotency_key: args.key,
        delay: args.delay,
    };
    let result = admin
        .enqueue(&broker, &req)
        .await
        .map(|env| format!("enqueued {} ({})", env.id, env.task));
    broker.close().await;
    Ok(report(result))
}
