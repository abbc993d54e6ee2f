//! Pieces both binaries' command lines share: loading a config file (every
//! problem printed, exit status 2) and running an operator command on a small
//! single-threaded runtime.

use std::future::Future;
use std::path::Path;
use std::process::ExitCode;

use crate::Config;

/// Exit status for bad input (config, expression, flag).
pub const BAD_INPUT: u8 = 2;

/// Loads and validates `path`. On failure prints every problem to stderr and
/// returns the exit status to end with.
pub fn load_config(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|errors| {
        eprint!("{errors}");
        ExitCode::from(BAD_INPUT)
    })
}

/// Loads the config and runs an operator command `f` on a current-thread runtime.
pub fn run_tool<F, Fut, E>(path: &Path, f: F) -> Result<ExitCode, E>
where
    F: FnOnce(Config) -> Fut,
    Fut: Future<Output = Result<ExitCode, E>>,
    E: From<std::io::Error>,
{
    let config = match load_config(path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(f(config))
}
