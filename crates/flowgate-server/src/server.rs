//! Starting and stopping an engine: open the log, bind the listeners, run the
//! background jobs, and on shutdown stop accepting, drain connections, fsync, close.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowgate_log::{Log, LogObserver};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::ingest::Ingest;
use crate::metrics::{IngestPath, Metrics};
use crate::shared::{RateLimit, Shared};

/// A running engine. Drop it or call [`Engine::shutdown`] to stop.
#[derive(Debug)]
pub struct Engine {
    shared: Arc<Shared>,
    /// Where the binary protocol listens.
    pub binary_addr: SocketAddr,
    /// Where the HTTP API listens.
    pub http_addr: SocketAddr,
    /// Where the NDJSON listener listens.
    pub ndjson_addr: SocketAddr,
    grace: Duration,
    flush: Duration,
    background: TaskTracker,
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!("cannot listen for {what} on {addr}: {e}; is another flowgate running? change ingest.*_addr")
    })
}

impl Engine {
    /// Opens the log in `config.server.data_dir` and starts every listener. Port 0 in
    /// an address picks a free port; the bound addresses are in the returned engine.
    pub async fn start(config: Config) -> anyhow::Result<Engine> {
        Engine::start_with_source(config, None).await
    }

    /// [`Engine::start`], with where reloads read the config again (`flowgate run`: its
    /// config file, with its overrides; see [`crate::reload`]), set before the engine
    /// says it is ready.
    pub async fn start_with_source(
        config: Config,
        source: Option<crate::reload::ConfigLoader>,
    ) -> anyhow::Result<Engine> {
        crate::fd_limit::raise(crate::fd_limit::files_needed(config.log.max_partitions, config.ingest.max_connections));
        let metrics = Metrics::new();
        let fsync_metrics = metrics.clone();
        let observer = LogObserver { on_fsync: Some(Arc::new(move |d| fsync_metrics.fsync(d))) };
        let data_dir = config.server.data_dir.clone();
        let log_config = config.log.clone();
        let log = tokio::task::spawn_blocking(move || Log::open_with(&data_dir, log_config, observer))
            .await?
            .map_err(|e| anyhow::anyhow!("cannot open the log in {}: {e}", config.server.data_dir.display()))?;
        let memory = crate::memory::governor(&config.server, &config.ingest);
        let ingest_config = config.ingest.clone();
        let fields = crate::fields::IngestFields::from_config(&ingest_config)
            .map_err(|(key, message)| anyhow::anyhow!("key `{key}`: {message}"))?;
        let binary = bind(ingest_config.binary_addr, "the binary protocol").await?;
        let http = bind(ingest_config.http_addr, "HTTP").await?;
        let ndjson = bind(ingest_config.ndjson_addr, "NDJSON").await?;
        let shared = Arc::new(Shared {
            ingest: Ingest::new(log.clone(), metrics, ingest_config.compression),
            connections: Arc::new(Semaphore::new(ingest_config.max_connections)),
            buffer_budget: Arc::new(Semaphore::new(ingest_config.max_buffered_bytes.min(Semaphore::MAX_PERMITS))),
            config: ingest_config,
            fields,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            ready: false.into(),
            started: Instant::now(),
            bad_input_log: RateLimit::new(Duration::from_secs(1)),
            pipelines: Default::default(),
            pipeline_configs: Default::default(),
            source_configs: Default::default(),
            memory: memory.clone(),
            memory_policy: config.server.memory_policy,
            replayer: Default::default(),
            sources: Default::default(),
            alerts: Default::default(),
            stats_feed: Default::default(),
            reloader: Default::default(),
        });
        let engine = Engine {
            binary_addr: binary.local_addr()?,
            http_addr: http.local_addr()?,
            ndjson_addr: ndjson.local_addr()?,
            grace: Duration::from_millis(config.server.shutdown_grace_ms),
            flush: Duration::from_millis(config.server.shutdown_flush_ms),
            shared: shared.clone(),
            background: TaskTracker::new(),
        };
        engine.background.spawn(accept_loop(binary, shared.clone(), IngestPath::Binary));
        engine.background.spawn(accept_loop(ndjson, shared.clone(), IngestPath::Ndjson));
        let router = crate::http::router(shared.clone());
        let http_shutdown = shared.shutdown.clone();
        let http_shared = shared.clone();
        engine.background.spawn(async move {
            let listener = crate::http::listener::LimitedListener::new(http, http_shared);
            let service = router.into_make_service_with_connect_info::<crate::http::listener::Peer>();
            let serve =
                axum::serve(listener, service).with_graceful_shutdown(async move { http_shutdown.cancelled().await });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "HTTP server failed");
            }
        });
        engine.background.spawn(retention_loop(shared.clone()));
        engine.background.spawn(crate::throughput::run(shared.clone()));
        let mut components = shared.reloader.lock().await;
        if !config.pipelines.is_empty() {
            components.pipelines = Some(crate::reload::start_pipelines(&shared, &config, &config.pipelines)?);
            tracing::info!(pipelines = config.pipelines.len(), "pipelines started");
        }
        if !config.sources.is_empty() {
            components.sources = Some(crate::reload::start_sources(&shared, &config, &config.sources)?);
            tracing::info!(sources = config.sources.len(), "sources started");
        }
        let alerts = Arc::new(crate::alerts::Alerts::new(&config.alerts, &config.alerting));
        let _ = shared.alerts.set(alerts.clone());
        // Runs without rules too: a reload may add some.
        engine.background.spawn(crate::alerts::run(shared.clone(), alerts));
        if !config.alerts.is_empty() {
            tracing::info!(rules = config.alerts.len(), "alert rules loaded");
        }
        components.config = Some(config.clone());
        drop(components);
        if let Some(source) = source {
            shared.reloader.set_loader(source);
        }
        shared.ready.store(true, Ordering::Release);
        tracing::info!(
            binary = %engine.binary_addr, http = %engine.http_addr, ndjson = %engine.ndjson_addr,
            data_dir = %config.server.data_dir.display(), fsync = ?config.log.fsync,
            "flowgate is ready"
        );
        Ok(engine)
    }

    /// The log.
    pub fn log(&self) -> &Log {
        self.shared.ingest.log()
    }

    /// The memory budget.
    pub fn memory(&self) -> &flowgate_memory::MemoryGovernor {
        &self.shared.memory
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        self.shared.ingest.metrics()
    }

    /// Where [`Engine::reload_from_source`], `SIGHUP` and `POST /v1/reload` read the
    /// config again (`flowgate run` sets it: its config file, with its overrides).
    pub fn set_config_source(&self, loader: crate::reload::ConfigLoader) {
        self.shared.reloader.set_loader(loader);
    }

    /// Applies `config` to the running engine: pipelines, sources and alert rules are
    /// added, removed, restarted or left alone (see [`crate::reload`]).
    pub async fn reload(&self, config: Config) -> Result<crate::reload::ReloadReport, crate::reload::ReloadError> {
        crate::reload::reload(&self.shared, config).await
    }

    /// Reads the config from its source again and applies it ([`Engine::set_config_source`]).
    pub async fn reload_from_source(&self) -> Result<crate::reload::ReloadReport, crate::reload::ReloadError> {
        crate::reload::reload_from_source(&self.shared).await
    }

    /// Starts a reload from the config source and returns at once, logging the outcome
    /// (for SIGHUP and a watched file: signals keep being handled meanwhile).
    pub fn spawn_reload(&self, trigger: &'static str) {
        crate::reload::spawn_and_log(&self.shared, trigger);
    }

    /// The longest [`Engine::shutdown`] takes: the grace period plus the final flush.
    pub fn shutdown_bound(&self) -> Duration {
        self.grace.saturating_add(self.flush)
    }

    /// Stops accepting; lets connections drain and pipelines flush their sinks and
    /// commit, both until the grace period ends; then fsyncs and closes the log, within
    /// the flush bound. Whatever is still busy at the end of the grace period (a client
    /// that does not read, a stalled sink) is cut off: acknowledged events are in the log
    /// already, and a cut-off pipeline resumes from its last checkpoint.
    pub async fn shutdown(self) -> anyhow::Result<ShutdownOutcome> {
        tracing::info!(grace_ms = self.grace.as_millis() as u64, "shutting down: no new connections, draining");
        let deadline = tokio::time::Instant::now() + self.grace;
        self.shared.ready.store(false, Ordering::Release);
        self.shared.shutdown.cancel();
        self.background.close();
        self.shared.tasks.close();
        // Waits for a reload under way; none starts after the cancel.
        let (pipelines, sources) = match tokio::time::timeout_at(deadline, self.shared.reloader.lock()).await {
            Ok(mut components) => {
                components.config = None;
                (components.pipelines.take(), components.sources.take())
            }
            Err(_) => {
                tracing::warn!(
                    "a config reload still under way at the end of the grace period; its pipelines are cut off"
                );
                (None, None)
            }
        };
        // Sources stop first: what they appended is in the log, what they did not
        // confirm upstream is sent again at the next start.
        if let Some(mut sources) = sources {
            sources.shutdown(deadline.saturating_duration_since(tokio::time::Instant::now())).await;
        }
        let drain = async {
            let drained = tokio::time::timeout_at(deadline, self.shared.tasks.wait()).await.is_ok();
            if !drained {
                tracing::warn!("connections did not drain within the grace period; closing them");
            }
            // Listeners and background jobs end with the cancel; their wait is bounded
            // but is not work that can be cut off.
            let _ = tokio::time::timeout_at(deadline, self.background.wait()).await;
            drained
        };
        let flush = async {
            match pipelines {
                // Flush every sink and commit every pipeline's offsets.
                Some(p) => p.shutdown_within(Some(deadline.into_std())).await,
                None => true,
            }
        };
        let (drained, flushed) = tokio::join!(drain, flush);
        let log = self.shared.ingest.log().clone();
        match tokio::time::timeout(self.flush, tokio::task::spawn_blocking(move || log.close())).await {
            Ok(closed) => closed??,
            Err(_) => anyhow::bail!(
                "the log did not close within server.shutdown_flush_ms ({} ms); acknowledged events were written \
                 before, and the next start recovers the log",
                self.flush.as_millis()
            ),
        }
        tracing::info!("log closed cleanly");
        Ok(if drained && flushed { ShutdownOutcome::Clean } else { ShutdownOutcome::CutOff })
    }
}

/// How a shutdown ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownOutcome {
    /// Every connection drained and every pipeline committed within the grace period.
    Clean,
    /// Something was still busy at the end of the grace period and was cut off; the
    /// log was closed cleanly all the same.
    CutOff,
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, path: IngestPath) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shared.shutdown.cancelled() => return,
        };
        let stream: TcpStream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors and similar: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = shared.connections.clone().try_acquire_owned() else {
            shared.ingest.metrics().rejected(path, "too_many_connections", 1);
            if path == IngestPath::Binary {
                shared.tasks.spawn(crate::binary::refuse(stream));
            }
            continue;
        };
        let shared2 = shared.clone();
        shared.tasks.spawn(async move {
            let _permit = permit;
            let _open = shared2.ingest.metrics().connection_opened(path);
            match path {
                IngestPath::Binary => crate::binary::serve_connection(stream, shared2.clone()).await,
                IngestPath::Ndjson => crate::ndjson::serve_connection(stream, shared2.clone()).await,
                IngestPath::Http => {}
            }
        });
    }
}

async fn retention_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.ingest.log().config().retention_check_interval());
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.shutdown.cancelled() => return,
        }
        let log = shared.ingest.log().clone();
        match tokio::task::spawn_blocking(move || log.enforce_retention()).await {
            Ok(Ok((0, _))) => {}
            Ok(Ok((n, bytes))) => {
                tracing::info!(segments = n, bytes, "retention deleted old segments")
            }
            Ok(Err(e)) => tracing::error!(error = %e, "retention failed"),
            Err(e) => tracing::error!(error = %e, "retention task panicked"),
        }
    }
}
