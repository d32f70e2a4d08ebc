//! `flowgate run`: the engine, until SIGTERM or SIGINT. SIGHUP reloads the config file
//! (pipelines, sources and alert rules change without a restart; see
//! `flowgate_server::reload`), as does a change of the file with `--watch-config`.
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
    /// Reload the config when its file changes (checked every second), as SIGHUP does.
    #[arg(long, requires = "config")]
    watch_config: bool,
}

/// How often `--watch-config` looks at the file.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Runs the engine until a signal, then shuts down within `server.shutdown_grace_ms` plus
/// `server.shutdown_flush_ms`; a second signal exits at once. See the module doc for the
/// exit codes.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let (path, data_dir) = (args.config.clone(), args.data_dir.clone());
    let load = move || -> anyhow::Result<Config> {
        let mut config = Config::load(path.as_deref())?;
        if let Some(dir) = &data_dir {
            config.server.data_dir = dir.clone();
        }
        Ok(config)
    };
    // Read before the config is: a change from here on is a change.
    let mut watched = match (&args.config, args.watch_config) {
        (Some(path), true) => Some(Watched::new(path.clone())),
        _ => None,
    };
    let config = load()?;
    let mut exporter = Exporter::new(&config.tracing)?;
    crate::init_logging(exporter.as_ref());
    let runtime = super::runtime()?;
    let code = runtime.block_on(async move {
        let mut signals = Signals::new()?;
        if let Some(exporter) = &mut exporter {
            exporter.start();
        }
        let engine = Engine::start_with_source(config, Some(std::sync::Arc::new(load))).await?;
        let first = loop {
            tokio::select! {
                received = signals.next_or_hangup() => match received {
                    Some(stop) => break stop,
                    None => engine.spawn_reload("SIGHUP"),
                },
                true = async { match watched.as_mut() {
                    Some(w) => w.changed().await,
                    None => std::future::pending().await,
                } } => engine.spawn_reload("the config file changed"),
            }
        };
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

/// A config file watched for changes of its content.
struct Watched {
    path: PathBuf,
    last: Option<Vec<u8>>,
}

impl Watched {
    fn new(path: PathBuf) -> Watched {
        let last = std::fs::metadata(&path)
            .ok()
            .filter(|m| m.is_file() && m.len() <= MAX_CONFIG_BYTES)
            .and_then(|_| std::fs::read(&path).ok());
        Watched { path, last }
    }

    /// Resolves (true) once the file's content differs from when it was last seen, and
    /// has stayed the same for a moment (an editor may write it in parts).
    async fn changed(&mut self) -> bool {
        loop {
            tokio::time::sleep(WATCH_INTERVAL).await;
            let Some(now) = read_config(&self.path).await else { continue };
            if self.last.as_ref() == Some(&now) {
                continue;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            if read_config(&self.path).await.as_ref() != Some(&now) {
                continue;
            }
            self.last = Some(now);
            return true;
        }
    }
}

/// Largest config file `--watch-config` reads.
const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// The file's content, if it is a regular file (after symlinks) of at most
/// [`MAX_CONFIG_BYTES`]: a FIFO or device put in its place is not read.
async fn read_config(path: &std::path::Path) -> Option<Vec<u8>> {
    let meta = tokio::fs::metadata(path).await.ok()?;
    if !meta.is_file() || meta.len() > MAX_CONFIG_BYTES {
        tracing::warn!(path = %path.display(), "the watched config is not a regular file of at most 16 MiB; not read");
        return None;
    }
    use tokio::io::AsyncReadExt;
    let mut content = Vec::new();
    tokio::fs::File::open(path).await.ok()?.take(MAX_CONFIG_BYTES).read_to_end(&mut content).await.ok()?;
    Some(content)
}

/// SIGTERM and SIGINT (which stop the engine) and SIGHUP (which reloads its config),
/// listened to from before the engine starts to the end.
struct Signals {
    term: Signal,
    int: Signal,
    hangup: Signal,
}

/// A received signal.
struct Received {
    name: &'static str,
    number: u8,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    /// The next SIGTERM or SIGINT, or `None` for a SIGHUP.
    async fn next_or_hangup(&mut self) -> Option<Received> {
        tokio::select! {
            _ = self.term.recv() => Some(Received { name: "SIGTERM", number: 15 }),
            _ = self.int.recv() => Some(Received { name: "SIGINT", number: 2 }),
            _ = self.hangup.recv() => None,
        }
    }

    async fn next(&mut self) -> Received {
        tokio::select! {
            _ = self.term.recv() => Received { name: "SIGTERM", number: 15 },
            _ = self.int.recv() => Received { name: "SIGINT", number: 2 },
        }
    }
}
