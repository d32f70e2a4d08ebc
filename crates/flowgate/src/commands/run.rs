//! `flowgate run`: the engine, until SIGTERM or SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use flowgate_server::{Config, Engine};

/// Arguments of `flowgate run`.
#[derive(clap::Args)]
pub struct Args {
    /// TOML config file; the embedded default without it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory (overrides server.data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

/// Runs the engine until a signal, then drains and exits 0.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut config = Config::load(args.config.as_deref())?;
    if let Some(dir) = args.data_dir {
        config.server.data_dir = dir;
    }
    super::runtime()?.block_on(async move {
        let engine = Engine::start(config).await?;
        wait_for_signal().await?;
        engine.shutdown().await?;
        Ok(ExitCode::SUCCESS)
    })
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    Ok(())
}
