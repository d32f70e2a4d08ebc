//! The OTLP/HTTP exporter: finished spans go into a bounded queue that never blocks the
//! thread ending them (a full queue drops and counts), and one task sends them in
//! batches, each request bounded by `export_timeout_ms`, through the workspace's
//! reqwest client. A collector that is slow or down costs dropped spans, never ingest.
//!
//! The SDK's own batch processor is not used: it drops silently (a count logged once at
//! shutdown) and runs its exports on a thread of its own that blocks in them.

use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter as _, SpanProcessor};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::Layer;

use super::{stats, TracingConfig};

/// Largest collector answer read: an OTLP answer is a few bytes (partial success).
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// The workspace's reqwest client as OpenTelemetry's HTTP transport.
#[derive(Debug)]
struct Client(reqwest::Client);

#[async_trait]
impl HttpClient for Client {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let request = reqwest::Request::try_from(request)?;
        let mut response = self.0.execute(request).await?;
        let status = response.status();
        let headers = std::mem::take(response.headers_mut());
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await? {
            // The collector is trusted no further than this.
            if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(format!("the collector's answer is over {MAX_RESPONSE_BYTES} bytes").into());
            }
            body.extend_from_slice(&chunk);
        }
        let mut answer = Response::builder().status(status).body(Bytes::from(body))?;
        *answer.headers_mut() = headers;
        Ok(answer)
    }
}

/// Hands finished spans to the export task through a bounded queue; a full queue drops
/// the span and counts it. Never blocks, whichever thread ends the span.
#[derive(Debug)]
struct QueueProcessor {
    queue: mpsc::Sender<SpanData>,
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _: &mut opentelemetry_sdk::trace::Span, _: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        // A closed queue is a shutdown under way: what ends then is not exported.
        if let Err(mpsc::error::TrySendError::Full(_)) = self.queue.try_send(span) {
            stats().dropped_queue_full.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        // The export task sends at every interval, and everything at `Exporter::shutdown`.
        Ok(())
    }

    fn shutdown_with_timeout(&self, _: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// The tracing pipeline of a process: the OpenTelemetry layer for the subscriber, the
/// queue its spans go to, and the task that exports them.
pub struct Exporter {
    provider: SdkTracerProvider,
    queue: Option<mpsc::Receiver<SpanData>>,
    exporter: Option<opentelemetry_otlp::SpanExporter>,
    config: TracingConfig,
    endpoint: String,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter").field("endpoint", &self.endpoint).finish_non_exhaustive()
    }
}

impl Exporter {
    /// The exporter `config` asks for; `None` when tracing is off (no endpoint).
    pub fn new(config: &TracingConfig) -> anyhow::Result<Option<Exporter>> {
        let Some(endpoint) = config.endpoint() else { return Ok(None) };
        let timeout = Duration::from_millis(config.export_timeout_ms);
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .build()
            .map_err(|e| anyhow::anyhow!("tracing: cannot build the HTTP client: {e}"))?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(config.service_name.clone())
            .with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(Client(client))
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(endpoint)
            .with_timeout(timeout)
            .with_headers(config.otlp_headers.clone().into_iter().collect())
            // No retries: the exporter would sleep in them, and a span that waits is a
            // span the queue cannot take. A failed batch is dropped and counted.
            .with_retry_policy(opentelemetry_otlp::RetryPolicy::disabled())
            .build()
            .map_err(|e| anyhow::anyhow!("tracing: cannot build the OTLP exporter for {endpoint}: {e}"))?;
        exporter.set_resource(&resource);
        let (tx, rx) = mpsc::channel(config.max_queue_spans);
        let provider = SdkTracerProvider::builder()
            .with_span_processor(QueueProcessor { queue: tx })
            // flowgate samples each batch before it makes a span: every span made is kept.
            .with_sampler(opentelemetry_sdk::trace::Sampler::AlwaysOn)
            .with_resource(resource)
            .build();
        Ok(Some(Exporter {
            provider,
            queue: Some(rx),
            exporter: Some(exporter),
            config: config.clone(),
            endpoint: endpoint.to_owned(),
            stop: CancellationToken::new(),
            task: None,
        }))
    }

    /// The layer that turns flowgate's spans (and only those: target
    /// [`flowgate_engine::trace::TARGET`]) into OpenTelemetry spans.
    pub fn layer<S>(&self) -> impl Layer<S>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer("flowgate"))
            // Spans are made and ended by hand, never entered across their work: the
            // thread, source location and busy/idle times would say nothing.
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_tracked_inactivity(false)
            .with_filter(Targets::new().with_target(flowgate_engine::trace::TARGET, tracing::Level::TRACE))
    }

    /// Starts the export task on the current tokio runtime and turns sampling on.
    pub fn start(&mut self) {
        let (Some(queue), Some(exporter)) = (self.queue.take(), self.exporter.take()) else { return };
        let task = export_loop(queue, exporter, self.config.clone(), self.endpoint.clone(), self.stop.clone());
        self.task = Some(tokio::spawn(task));
        flowgate_engine::trace::enable(self.config.sample_ratio);
        tracing::info!(endpoint = %self.endpoint, sample_ratio = self.config.sample_ratio, "tracing: exporting spans over OTLP/HTTP");
    }

    /// Turns sampling off and sends what is queued, giving up at the first failed export
    /// (the rest is dropped and counted) or at `deadline` (what is still queued then is
    /// dropped, uncounted: the process is ending).
    pub async fn shutdown(mut self, deadline: tokio::time::Instant) {
        flowgate_engine::trace::disable();
        self.stop.cancel();
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                task.abort();
                tracing::warn!("tracing: spans still queued at the end of shutdown were dropped");
            }
        }
        let _ = self.provider.shutdown();
    }
}

/// Sends queued spans in batches of `max_export_batch_spans`, when a batch is full or
/// every `export_interval_ms`; at `stop`, sends what is left and ends.
async fn export_loop(
    mut queue: mpsc::Receiver<SpanData>,
    exporter: opentelemetry_otlp::SpanExporter,
    config: TracingConfig,
    endpoint: String,
    stop: CancellationToken,
) {
    let max = config.max_export_batch_spans;
    let timeout = Duration::from_millis(config.export_timeout_ms);
    let mut tick = tokio::time::interval(Duration::from_millis(config.export_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch: Vec<SpanData> = Vec::with_capacity(max);
    let failures_log = crate::shared::RateLimit::new(Duration::from_secs(10));
    loop {
        let room = max - batch.len();
        let stopping = tokio::select! {
            received = queue.recv_many(&mut batch, room) => {
                if received == 0 {
                    true
                } else if batch.len() < max {
                    continue;
                } else {
                    false
                }
            }
            _ = tick.tick() => false,
            _ = stop.cancelled() => true,
        };
        if stopping {
            // The last flush gives up at its first failed export: a collector that is
            // down or hangs costs one export timeout, not one per batch left.
            queue.close();
            let mut failed = false;
            loop {
                let room = max - batch.len();
                if queue.recv_many(&mut batch, room).await == 0 {
                    break;
                }
                if batch.len() == max {
                    let full = std::mem::take(&mut batch);
                    if failed {
                        drop_failed(full.len());
                    } else {
                        failed = !send(&exporter, full, timeout, &endpoint, &failures_log).await;
                    }
                }
            }
            if failed {
                drop_failed(batch.len());
            } else if !batch.is_empty() {
                send(&exporter, batch, timeout, &endpoint, &failures_log).await;
            }
            return;
        }
        if !batch.is_empty() {
            let full = std::mem::replace(&mut batch, Vec::with_capacity(max));
            send(&exporter, full, timeout, &endpoint, &failures_log).await;
        }
    }
}

/// Counts spans dropped unsent at the end, after an export failed.
fn drop_failed(spans: usize) {
    stats().dropped_export_failed.fetch_add(spans as u64, Ordering::Relaxed);
}

/// One export request; its spans are dropped and counted if it fails or times out.
/// True when it went through.
async fn send(
    exporter: &opentelemetry_otlp::SpanExporter,
    batch: Vec<SpanData>,
    timeout: Duration,
    endpoint: &str,
    failures_log: &crate::shared::RateLimit,
) -> bool {
    let n = batch.len() as u64;
    let error = match tokio::time::timeout(timeout, exporter.export(batch)).await {
        Ok(Ok(())) => {
            stats().exported.fetch_add(n, Ordering::Relaxed);
            return true;
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer within {} ms", timeout.as_millis()),
    };
    stats().export_failures.fetch_add(1, Ordering::Relaxed);
    stats().dropped_export_failed.fetch_add(n, Ordering::Relaxed);
    if let Some(suppressed) = failures_log.allow() {
        tracing::warn!(endpoint, spans = n, error = %error, earlier_failures_not_logged = suppressed,
            "tracing: span export failed; its spans are dropped (flowgate_trace_spans_dropped_total)");
    }
    false
}
