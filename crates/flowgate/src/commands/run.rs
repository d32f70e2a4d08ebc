//! `flowgate run`: the engine, until SIGTERM or SIGINT.
//!
//! Exit codes: 0 when shutdown finished within the grace period (every connection
//! drained, every pipeline committed, the log closed); 1 on an error, or when something
//! was still busy at the end of the grace period and was cut off (a pipeline behind a
//! stalled sink resumes from its last checkpoint); 128 + the signal number (143 for
//! SIGTERM, 130 for SIGINT) when a second signal ended the process at once.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use flowgate_server::trace::export::Exporter;
use flowgate_server::{Config, Engine, ShutdownOutcome};
use tokio::signal::unix::{signal, Signal, SignalKind};

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

/// Runs the engine until a signal, then shuts down within `server.shutdown_grace_ms` plus
/// `server.shutdown_flush_ms`; a second signal exits at once. See the module doc for the
/// exit codes.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut config = Config::load(args.config.as_deref())?;
    if let Some(dir) = args.data_dir {
        config.server.data_dir = dir;
    }
    let mut exporter = Exporter::new(&config.tracing)?;
    crate::init_logging(exporter.as_ref());
    let runtime = super::runtime()?;
    let code = runtime.block_on(async move {
        let mut signals = Signals::new()?;
        if let Some(exporter) = &mut exporter {
            exporter.start();
        }
        let engine = Engine::start(config).await?;
        let first = signals.next().await;
        tracing::info!(signal = first.name, "shutting down; a second signal exits at once");
        // Shutdown bounds each of its steps; this bounds the whole in case one of them
        // cannot be interrupted.
        let bound = engine.shutdown_bound().saturating_add(Duration::from_secs(1));
        // Spans still queued are sent after the engine stopped, within the same bound.
        let deadline = tokio::time::Instant::now() + engine.shutdown_bound();
        let shutdown = async move {
            let outcome = engine.shutdown().await;
            if let Some(exporter) = exporter {
                exporter.shutdown(deadline).await;
            }
            outcome
        };
        tokio::select! {
            ended = tokio::time::timeout(bound, shutdown) => match ended {
                Ok(Ok(ShutdownOutcome::Clean)) => Ok(ExitCode::SUCCESS),
                Ok(Ok(ShutdownOutcome::CutOff)) => {
                    tracing::warn!("shutdown cut off work still busy at the end of the grace period");
                    Ok(ExitCode::FAILURE)
                }
                Ok(Err(e)) => Err(e),
                Err(_) => anyhow::bail!("shutdown did not end within {} ms; exiting anyway", bound.as_millis()),
            },
            second = signals.next() => {
                tracing::warn!(signal = second.name, "second signal: exiting at once");
                Ok(ExitCode::from(128 + second.number))
            }
        }
    });
    // Do not wait for threads stuck in a system call (a hung disk or peer).
    runtime.shutdown_timeout(Duration::from_millis(100));
    code
}

/// SIGTERM and SIGINT, listened to from before the engine starts to the end.
struct Signals {
    term: Signal,
    int: Signal,
}

/// A received signal.
struct Received {
    name: &'static str,
    number: u8,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        Ok(Signals { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    async fn next(&mut self) -> Received {
        tokio::select! {
            _ = self.term.recv() => Received { name: "SIGTERM", number: 15 },
            _ = self.int.recv() => Received { name: "SIGINT", number: 2 },
        }
    }
}
