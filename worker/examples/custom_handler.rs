//! A worker with a Rust handler of its own: registers `greet` by task name,
//! adds the config's `exec`/`http` handlers, and runs until Ctrl-C.
//!
//! ```text
//! cargo run -p cronpipe-worker --example custom_handler -- worker/examples/custom_handler.toml
//! ```
//!
//! The handler itself is `cronpipe_worker::examples_support::greet`: it
//! returns `Ok(())`, `TaskError::retryable(..)` or `TaskError::permanent(..)`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use cronpipe_shared::Config;
use cronpipe_worker::examples_support::{self, Greetings};
use cronpipe_worker::{Options, Registry};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    // First, before any thread: when this process was started as the guard of
    // an exec task, it runs as that and exits here.
    cronpipe_worker::exec_guard::main_if_requested();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let path: PathBuf = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| "worker/examples/custom_handler.toml".into());
    let config = Config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
    cronpipe_shared::telemetry::init_logging(&config.log);

    // 1. Register Rust handlers by task name; 2. add the config's built-in ones
    // (this also checks every `handler = "rust"` task has a registration).
    let greetings = Greetings::default();
    let registry = examples_support::register(Registry::new(), greetings.clone());
    let registry = cronpipe_worker::registry_from_config(&config, registry)
        .with_context(|| format!("{}", path.display()))?;

    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    let opts = Options::from_config(config);
    let Some((store, broker)) =
        cronpipe_worker::connect(&opts.config, &opts.instance_id, &shutdown)
            .await
            .context("connecting")?
    else {
        return Ok(());
    };
    cronpipe_worker::run(opts, store, broker, registry, shutdown)
        .await
        .context("worker stopped")?;
    println!("greeted: {:?}", greetings.list());
    Ok(())
}
