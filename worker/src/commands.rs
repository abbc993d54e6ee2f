//! Operator subcommands of the `worker` binary: `dlq …` and `history`.

use std::process::ExitCode;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use cronpipe_shared::{Broker, Config, Store};
use cronpipe_worker::dlq::{self, Action, Filter};
use cronpipe_worker::history;

/// `worker dlq …`
#[derive(Subcommand)]
pub enum DlqCmd {
    /// List dead letters (newest last) with their reason.
    #[command(
        after_help = "Examples:\n  worker dlq list -c cronpipe.toml\n  worker dlq list -c cronpipe.toml --task report --reason max_attempts --since 2026-11-20T00:00:00Z"
    )]
    List(DlqArgs),
    /// Show one dead letter in full (JSON), by envelope id.
    #[command(after_help = "Example:\n  worker dlq show -c cronpipe.toml 6f1c2b0e-…")]
    Show {
        /// Envelope id.
        id: String,
    },
    /// Republish matching dead letters as new attempts (attempts reset, marked as replays) and remove them.
    #[command(
        after_help = "Examples:\n  worker dlq replay -c cronpipe.toml --id 6f1c2b0e-…\n  worker dlq replay -c cronpipe.toml --task report --reason permanent_error"
    )]
    Replay(DlqArgs),
    /// Delete matching dead letters (a filter or --all is required). On Kafka they are
    /// skipped past by the `<group_id>.tools` offsets, since a topic keeps its messages.
    #[command(
        after_help = "Examples:\n  worker dlq purge -c cronpipe.toml --reason invalid_json\n  worker dlq purge -c cronpipe.toml --all"
    )]
    Purge {
        #[command(flatten)]
        args: DlqArgs,
        /// Delete every dead letter.
        #[arg(long)]
        all: bool,
    },
}

/// Filters shared by the dlq subcommands.
#[derive(Args, Clone)]
pub struct DlqArgs {
    /// Only this task.
    #[arg(long)]
    task: Option<String>,
    /// Only this reason: invalid_json, unsupported_version, invalid_envelope, unknown_task, too_large, permanent_error, max_attempts.
    #[arg(long)]
    reason: Option<String>,
    /// Only dead-lettered at or after this RFC 3339 instant.
    #[arg(long)]
    since: Option<String>,
    /// Only dead-lettered before this RFC 3339 instant.
    #[arg(long)]
    until: Option<String>,
    /// Only the envelope with this id.
    #[arg(long)]
    id: Option<String>,
    /// Look at no more than this many dead letters.
    #[arg(long, default_value_t = 10_000)]
    limit: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

const REASONS: &[&str] = &[
    "invalid_json",
    "unsupported_version",
    "invalid_envelope",
    "unknown_task",
    "too_large",
    "permanent_error",
    "max_attempts",
];

fn instant(flag: &str, v: &Option<String>) -> Result<Option<DateTime<Utc>>, String> {
    match v {
        None => Ok(None),
        Some(t) => DateTime::parse_from_rfc3339(t)
            .map(|t| Some(t.with_timezone(&Utc)))
            .map_err(|e| format!("--{flag} `{t}`: {e}; expected an RFC 3339 instant such as 2026-11-20T00:00:00Z")),
    }
}

impl DlqArgs {
    fn filter(&self) -> Result<Filter, String> {
        if let Some(r) = &self.reason {
            if !REASONS.contains(&r.as_str()) {
                return Err(format!(
                    "--reason `{r}`: expected one of {}",
                    REASONS.join(", ")
                ));
            }
        }
        Ok(Filter {
            task: self.task.clone(),
            reason: self.reason.clone(),
            since: instant("since", &self.since)?,
            until: instant("until", &self.until)?,
            id: self.id.clone(),
        })
    }
}

async fn connect(config: &Config) -> anyhow::Result<(Store, Broker)> {
    let store = cronpipe_shared::connect::tool_store(config).await?;
    let broker = Broker::connect(&config.broker, "cronpipe-dlq")
        .await
        .context("connecting to the broker")?;
    Ok((store, broker))
}

fn print_items(items: &[dlq::Item], json: bool) -> anyhow::Result<()> {
    if json {
        let records: Vec<serde_json::Value> = items
            .iter()
            .map(|i| match &i.record {
                Some(r) => serde_json::to_value(r).unwrap_or_default(),
                None => serde_json::json!({"unparsed": String::from_utf8_lossy(&i.body)}),
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&records).context("encoding")?
        );
        return Ok(());
    }
    println!(
        "{:<25} {:<20} {:<20} {:<36} {:>8}  ERROR",
        "DEAD-LETTERED AT", "REASON", "TASK", "ID", "ATTEMPTS"
    );
    for i in items {
        match &i.record {
            Some(r) => {
                let (task, id) = r
                    .envelope
                    .as_ref()
                    .map(|e| (e.task.as_str(), e.id.as_str()))
                    .unwrap_or(("-", "-"));
                let mut error = r.error.replace('\n', " ");
                if error.len() > 80 {
                    let mut cut = 80;
                    while !error.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    error.truncate(cut);
                    error.push('…');
                }
                println!(
                    "{:<25} {:<20} {:<20} {:<36} {:>8}  {}",
                    r.dead_lettered_at.format("%Y-%m-%dT%H:%M:%SZ"),
                    r.reason.as_str(),
                    task,
                    id,
                    r.attempts,
                    error
                );
            }
            None => println!("(not a dead-letter record: {} bytes)", i.body.len()),
        }
    }
    Ok(())
}

fn bad_input(msg: String) -> anyhow::Result<ExitCode> {
    eprintln!("error: {msg}");
    Ok(ExitCode::from(2))
}

/// `worker dlq …`
pub async fn dlq(config: Config, cmd: DlqCmd) -> anyhow::Result<ExitCode> {
    let (action, args, purge_all) = match &cmd {
        DlqCmd::List(a) => (Action::Look, a.clone(), false),
        DlqCmd::Show { id } => (
            Action::Look,
            DlqArgs {
                task: None,
                reason: None,
                since: None,
                until: None,
                id: Some(id.clone()),
                limit: 100_000,
                json: true,
            },
            false,
        ),
        DlqCmd::Replay(a) => (Action::Replay, a.clone(), false),
        DlqCmd::Purge { args, all } => (Action::Purge, args.clone(), *all),
    };
    let filter = match args.filter() {
        Ok(f) => f,
        Err(e) => return bad_input(e),
    };
    if action != Action::Look && filter.is_empty() && !purge_all {
        return bad_input(match action {
            Action::Purge => {
                "purge needs a filter (--task, --reason, --since, --until, --id) or --all".into()
            }
            _ => "replay needs a filter (--task, --reason, --since, --until, --id)".into(),
        });
    }
    let (store, broker) = connect(&config).await?;
    let outcome = dlq::run(
        &broker,
        &store,
        &filter,
        action,
        args.limit,
        config.worker.history_max_len,
    )
    .await;
    broker.close().await;
    let outcome = outcome.context("dead-letter tools")?;
    match cmd {
        DlqCmd::List(_) => {
            print_items(&outcome.matched, args.json)?;
            eprintln!(
                "{} matching of {} dead letters looked at",
                outcome.matched.len(),
                outcome.scanned
            );
        }
        DlqCmd::Show { id } => {
            if outcome.matched.is_empty() {
                eprintln!("error: no dead letter with envelope id `{id}`");
                return Ok(ExitCode::from(2));
            }
            print_items(&outcome.matched, true)?;
        }
        DlqCmd::Replay(_) => {
            println!(
                "replayed {} dead letter(s); {} matching could not be replayed (not an envelope)",
                outcome.settled, outcome.skipped
            );
        }
        DlqCmd::Purge { .. } => println!("purged {} dead letter(s)", outcome.settled),
    }
    Ok(ExitCode::SUCCESS)
}

/// `worker history`
#[derive(Args)]
pub struct HistoryArgs {
    /// Only this task.
    #[arg(long)]
    task: Option<String>,
    /// How many entries (newest first).
    #[arg(long, default_value_t = 20)]
    last: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `worker history`
pub async fn history(config: Config, args: HistoryArgs) -> anyhow::Result<ExitCode> {
    let store = cronpipe_shared::connect::tool_store(&config).await?;
    let entries = history::recent(&store, args.task.as_deref(), args.last)
        .await
        .context("reading the execution history")?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&entries).context("encoding")?
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<25} {:<20} {:<18} {:>7} {:>11}  {:<36} WORKER",
        "FINISHED AT", "TASK", "OUTCOME", "ATTEMPT", "DURATION", "ID"
    );
    for e in entries {
        println!(
            "{:<25} {:<20} {:<18} {:>7} {:>9}ms  {:<36} {}",
            e.at.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
            e.task,
            e.outcome,
            e.attempt
                .map(|a| a.to_string())
                .unwrap_or_else(|| "-".into()),
            e.duration_ms,
            e.id,
            e.worker
        );
    }
    Ok(ExitCode::SUCCESS)
}
