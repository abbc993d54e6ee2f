//! The `worker` binary: argument parsing, logging and signals; the work is in the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use cronpipe_worker::Registry;
use tokio_util::sync::CancellationToken;

mod commands;

/// mimalloc instead of the system allocator: a worker allocates and frees a
/// few kilobytes per delivery from several threads, where glibc's malloc
/// spent about a quarter of the worker's CPU (measured with `bench-kafka`).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "worker",
    version,
    about = "cronpipe worker: runs task messages to a durable outcome"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume and run tasks until SIGINT/SIGTERM.
    #[command(
        after_help = "Examples:\n  worker run --config examples/cronpipe.toml\n  CRONPIPE__WORKER__CONCURRENCY=32 worker run -c /etc/cronpipe.toml\n\nOn SIGINT/SIGTERM the worker stops taking messages, lets running tasks finish within\nworker.shutdown_grace, then releases the claims of the rest and leaves them for redelivery."
    )]
    Run {
        /// Config file.
        #[arg(short, long, env = "CRONPIPE_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config file without connecting to anything.
    #[command(after_help = "Example:\n  worker check --config examples/cronpipe.toml")]
    Check {
        /// Config file.
        #[arg(short, long, env = "CRONPIPE_CONFIG")]
        config: PathBuf,
    },
    /// Inspect and act on the dead-letter queue: list, show, replay, purge.
    Dlq {
        /// Config file.
        #[arg(short, long, env = "CRONPIPE_CONFIG", global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: commands::DlqCmd,
    },
    /// Show recent task executions (outcome, duration, attempt, worker), newest first.
    #[command(
        after_help = "Examples:\n  worker history -c cronpipe.toml\n  worker history -c cronpipe.toml --task report --last 50"
    )]
    History {
        /// Config file.
        #[arg(short, long, env = "CRONPIPE_CONFIG")]
        config: PathBuf,
        #[command(flatten)]
        args: commands::HistoryArgs,
    },
}

fn main() -> ExitCode {
    // Exec tasks run under a guard, a second copy of this binary (see
    // `cronpipe_worker::exec_guard`); when this process is one, it runs here.
    cronpipe_worker::exec_guard::main_if_requested();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { config } => check(&config),
        Command::Run { config } => run(&config),
        Command::Dlq { config, command } => match config {
            Some(config) => cronpipe_shared::cli::run_tool(&config, |c| commands::dlq(c, command)),
            None => {
                eprintln!("error: --config FILE (or CRONPIPE_CONFIG) is required");
                Ok(ExitCode::from(2))
            }
        },
        Command::History { config, args } => {
            cronpipe_shared::cli::run_tool(&config, |c| commands::history(c, args))
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
    if let Err(e) = cronpipe_worker::registry_from_config(&config, Registry::new()) {
        eprintln!("{}: {e}", path.display());
        return Ok(ExitCode::from(2));
    }
    for warning in config.warnings() {
        println!("{}: {warning}", path.display());
    }
    println!(
        "{}: ok ({} task handler{})",
        path.display(),
        config.tasks.len(),
        if config.tasks.len() == 1 { "" } else { "s" }
    );
    Ok(ExitCode::SUCCESS)
}

fn run(path: &Path) -> anyhow::Result<ExitCode> {
    let config = match cronpipe_shared::cli::load_config(path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    cronpipe_shared::telemetry::init_logging(&config.log);
    let registry = match cronpipe_worker::registry_from_config(&config, Registry::new()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            return Ok(ExitCode::from(2));
        }
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        spawn_signals(shutdown.clone())?;
        for warning in config.warnings() {
            tracing::warn!(config = %path.display(), "{warning}");
        }
        let opts = cronpipe_worker::Options::from_config(config);
        tracing::info!(worker = %opts.instance_id, config = %path.display(), "Worker starting");
        let Some((store, broker)) =
            cronpipe_worker::connect(&opts.config, &opts.instance_id, &shutdown)
                .await
                .context("connecting")?
        else {
            return Ok(());
        };
        if let Some(addr) = opts.config.worker.http_addr {
            let conns: cronpipe_shared::ops::Connections = Default::default();
            let _ = conns.set((store.clone(), broker.clone()));
            let ready = cronpipe_shared::ops::readiness(conns, None);
            cronpipe_shared::ops::serve(addr, ready, None, shutdown.clone())
                .await
                .with_context(|| format!("serving worker.http_addr = {addr}"))?;
        }
        cronpipe_worker::run(opts, store, broker, registry, shutdown)
            .await
            .context("worker stopped")
    })?;
    Ok(ExitCode::SUCCESS)
}

fn spawn_signals(shutdown: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        shutdown.cancel();
    });
    Ok(())
}
