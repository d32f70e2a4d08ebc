//! `flowgate demo`: the main job in one command. Starts an engine in-process on the
//! embedded default config plus the demo pipeline (`demo.toml`), drives realistic IoT
//! telemetry through it over the binary protocol — many devices, arrays of readings,
//! some duplicate deliveries, some late events — and prints a report.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flowgate_client::Client;
use flowgate_core::{BatchBuilder, Codec, ProducerStamp};
use flowgate_server::trace::export::Exporter;
use flowgate_server::{Config, Engine};
use hdrhistogram::Histogram;

/// Arguments of `flowgate demo`.
#[derive(clap::Args)]
pub struct Args {
    /// Seconds of load.
    #[arg(long, default_value_t = 20.0)]
    duration: f64,
    /// Events per second to aim for (`max` for as fast as the engine takes them).
    #[arg(long, default_value = "200000")]
    rate: String,
    /// Simulated devices.
    #[arg(long, default_value_t = 5000)]
    devices: u32,
    /// Data directory (emptied first if it holds an earlier demo).
    #[arg(long, default_value = "./flowgate-demo-data")]
    data_dir: PathBuf,
    /// Stop the engine after the report (the default when not run from a terminal);
    /// from a terminal the engine otherwise stays up, with its dashboard, until Ctrl-C.
    #[arg(long)]
    exit: bool,
}

/// Sends the engine's log lines to `path` instead of the terminal (`RUST_LOG` filters
/// as for `flowgate run`), and its spans to `exporter` when `[tracing]` names one.
fn log_to_file(path: &std::path::Path, exporter: Option<&Exporter>) -> anyhow::Result<()> {
    let file = std::fs::File::create(path)?;
    super::init_logging(std::sync::Mutex::new(file), false, exporter);
    Ok(())
}

/// The demo's pipeline, added to the embedded default (which has none).
const DEMO_PIPELINE: &str = include_str!("demo.toml");

/// The embedded default plus the demo pipeline, with `FLOWGATE_*` overrides applied.
fn demo_config() -> Result<Config, flowgate_server::ConfigError> {
    let text = format!("{}\n{DEMO_PIPELINE}", flowgate_server::config::DEFAULT_CONFIG);
    Config::parse_with_env(&text, "embedded default with the demo pipeline", std::env::vars())
}

/// A tiny deterministic PRNG (xorshift), so the demo needs no dependency for noise.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

struct Counters {
    sent: AtomicU64,
    duplicates: AtomicU64,
    late: AtomicU64,
    acked: AtomicU64,
}

/// Builds one batch of telemetry. About 2 % of events are re-sent duplicates (same id),
/// about 1 % are late (event time 3–8 s in the past).
fn telemetry_batch(rng: &mut Rng, next_id: &mut u64, devices: u32, n: usize, counters: &Counters) -> Vec<u8> {
    let mut b = BatchBuilder::with_capacity(n * 200);
    let now = flowgate_core::time::now_ms();
    let mut last: Option<(String, String)> = None;
    for _ in 0..n {
        if let (Some((key, payload)), true) = (&last, rng.unit() < 0.02) {
            b.push_payload(now, Some(key.as_bytes()), payload.as_bytes());
            counters.duplicates.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let device = rng.next() % u64::from(devices);
        let late = rng.unit() < 0.01;
        let ts = if late {
            counters.late.fetch_add(1, Ordering::Relaxed);
            now - 3000 - (rng.next() % 5000) as i64
        } else {
            now - (rng.next() % 200) as i64
        };
        let base = 15.0 + (device % 20) as f64;
        let temp = base + rng.unit() * 5.0;
        let readings: Vec<String> = (0..8).map(|_| format!("{:.2}", base + rng.unit() * 20.0)).collect();
        let key = format!("dev-{device:05}");
        let payload = format!(
            r#"{{"id":"evt-{id}","device":"{key}","ts":{ts},"temp":{temp:.2},"readings":[{r}],"fw":"2.4.{fw}"}}"#,
            id = *next_id,
            r = readings.join(","),
            fw = device % 7
        );
        *next_id += 1;
        b.push_payload(now, Some(key.as_bytes()), payload.as_bytes());
        last = Some((key, payload));
    }
    b.finish(Codec::None, ProducerStamp::default()).expect("non-empty batch").bytes
}

fn quantile_from_buckets(text: &str, metric: &str, q: f64) -> Option<f64> {
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.starts_with(metric) && l.contains("_bucket{"))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            let count: f64 = l.rsplit(' ').next()?.parse().ok()?;
            Some((le, count))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total == 0.0 {
        return None;
    }
    let want = q * total;
    let mut prev = (0.0, 0.0);
    for (le, count) in buckets {
        if count >= want {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let frac = if count > prev.1 { (want - prev.1) / (count - prev.1) } else { 1.0 };
            return Some(prev.0 + (le - prev.0) * frac);
        }
        prev = (le, count);
    }
    None
}

fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>()
        + 0.0
}

/// Runs the demo and prints its report.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let rate: Option<f64> = match args.rate.as_str() {
        "max" => None,
        r => Some(r.parse().map_err(|_| anyhow::anyhow!("--rate must be a number or max"))?),
    };
    if args.data_dir.join(".flowgate-demo").exists() {
        std::fs::remove_dir_all(&args.data_dir)?;
    }
    std::fs::create_dir_all(&args.data_dir)?;
    std::fs::write(args.data_dir.join(".flowgate-demo"), b"created by flowgate demo; removed by the next demo\n")?;
    let log_path = args.data_dir.join("flowgate.log");
    let mut config = demo_config()?;
    let mut exporter = Exporter::new(&config.tracing)?;
    log_to_file(&log_path, exporter.as_ref())?;
    let stay = !args.exit && std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    config.server.data_dir = args.data_dir.clone();
    // Free ports, so the demo runs beside a `flowgate run` on the defaults; the HTTP
    // API keeps its port when it is free, for the dashboard.
    for addr in [&mut config.ingest.binary_addr, &mut config.ingest.ndjson_addr] {
        addr.set_port(0);
    }
    if std::net::TcpListener::bind(config.ingest.http_addr).is_err() {
        config.ingest.http_addr.set_port(0);
    }
    // Two partitions, so both cores run the pipeline.
    {
        let log = flowgate_log::Log::open(&args.data_dir, config.log.clone())?;
        log.create_topic("telemetry", 2)?;
        log.close()?;
    }
    let tty = std::io::stderr().is_terminal();
    super::runtime()?.block_on(async move {
        if let Some(exporter) = &mut exporter {
            exporter.start();
        }
        let engine = Engine::start(config).await?;
        let addr = engine.binary_addr.to_string();
        eprintln!("flowgate demo: engine up (binary {addr}, dashboard http://{}/), {} devices, {} s of load", engine.http_addr, args.devices, args.duration);
        let counters = Arc::new(Counters { sent: AtomicU64::new(0), duplicates: AtomicU64::new(0), late: AtomicU64::new(0), acked: AtomicU64::new(0) });
        let histogram = Arc::new(std::sync::Mutex::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?));
        let started = Instant::now();
        let duration = Duration::from_secs_f64(args.duration.max(1.0));
        let mut producers = Vec::new();
        let connections = 2;
        for c in 0..connections {
            let (addr, counters, histogram) = (addr.clone(), counters.clone(), histogram.clone());
            let devices = args.devices;
            let per_conn = rate.map(|r| r / connections as f64);
            producers.push(tokio::spawn(async move {
                let client = Client::connect(&addr).await?;
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (c as u64 + 1));
                let mut next_id = (c as u64) << 40;
                let batch = 500usize;
                let window = Arc::new(tokio::sync::Semaphore::new(8));
                let mut k = 0u64;
                while started.elapsed() < duration {
                    if let Some(r) = per_conn {
                        let due = started + Duration::from_secs_f64((k * batch as u64) as f64 / r);
                        tokio::time::sleep_until(due.into()).await;
                    }
                    let bytes = Bytes::from(telemetry_batch(&mut rng, &mut next_id, devices, batch, &counters));
                    counters.sent.fetch_add(batch as u64, Ordering::Relaxed);
                    let permit = window.clone().acquire_owned().await?;
                    let (client, counters, histogram) = (client.clone(), counters.clone(), histogram.clone());
                    tokio::spawn(async move {
                        let sent = Instant::now();
                        if let Ok(acks) = client.produce("telemetry", bytes, ProducerStamp::default()).await {
                            let n: u64 = acks.iter().map(|a| u64::from(a.record_count)).sum();
                            counters.acked.fetch_add(n, Ordering::Relaxed);
                            let _ = histogram.lock().expect("not poisoned").record(sent.elapsed().as_micros().max(1) as u64);
                        }
                        drop(permit);
                    });
                    k += 1;
                }
                let _ = window.acquire_many(8).await?;
                anyhow::Ok(())
            }));
        }
        // Progress bar.
        let total = duration.as_secs_f64();
        while started.elapsed() < duration {
            tokio::time::sleep(Duration::from_millis(if tty { 250 } else { 2000 })).await;
            let done = (started.elapsed().as_secs_f64() / total).min(1.0);
            let acked = counters.acked.load(Ordering::Relaxed);
            let bar: String = (0..30).map(|i| if (i as f64) < done * 30.0 { '#' } else { '.' }).collect();
            let line = format!("[{bar}] {:>3.0}%  {acked:>10} events acked  {:>9.0} ev/s", done * 100.0, acked as f64 / started.elapsed().as_secs_f64());
            if tty { eprint!("\r{line}"); } else { eprintln!("{line}"); }
        }
        for p in producers {
            p.await??;
        }
        if tty { eprintln!(); }
        let load_secs = started.elapsed().as_secs_f64();
        // Let the pipeline drain, and the idle watermark close the last windows.
        eprintln!("load finished; waiting for the pipeline to drain and close its last windows…");
        let drain_started = Instant::now();
        let metrics = engine.metrics().clone();
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let text = metrics.render(engine.log());
            let lag = metric_sum(&text, "flowgate_pipeline_lag{pipeline=\"demo\"");
            let open_for = drain_started.elapsed();
            if (lag == 0.0 && open_for > Duration::from_millis(3500)) || open_for > Duration::from_secs(30) {
                break;
            }
        }
        let text = metrics.render(engine.log());
        let data_dir = engine.log().dir().to_path_buf();
        let dashboard = format!("http://{}/", engine.http_addr);

        // Read out of the histogram here: its lock is not held across the wait below.
        let (p50, p99, p999, max) = {
            let h = histogram.lock().expect("not poisoned");
            let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
            (ms(0.5), ms(0.99), ms(0.999), h.max() as f64 / 1000.0)
        };
        let sent = counters.sent.load(Ordering::Relaxed);
        let acked = counters.acked.load(Ordering::Relaxed);
        let read = metric_sum(&text, "flowgate_pipeline_events_read_total{pipeline=\"demo\"}");
        let dup_removed = metric_sum(&text, "flowgate_processor_events_dropped_total{pipeline=\"demo\",processor=\"dedup-1\"}");
        let windows = metric_sum(&text, "flowgate_processor_events_out_total{pipeline=\"demo\",processor=\"aggregate-1\"}");
        let late = metric_sum(&text, "flowgate_processor_late_events_total{pipeline=\"demo\"");
        let dlq = metric_sum(&text, "flowgate_dlq_events_total{pipeline=\"demo\"}");
        let file_events = metric_sum(&text, "flowgate_sink_events_total{pipeline=\"demo\",sink=\"files\"}");
        let e2e = "flowgate_pipeline_end_to_end_latency_seconds";
        let out_dir = data_dir.join("demo-output");
        let mut samples = Vec::new();
        if let Ok(entries) = std::fs::read_dir(&out_dir) {
            let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
            files.sort();
            if let Some(first) = files.iter().find(|f| f.extension().is_some_and(|e| e == "ndjson")) {
                let text = std::fs::read_to_string(first).unwrap_or_default();
                samples.extend(text.lines().take(3).map(String::from));
            }
        }
        let mut out = std::io::stdout().lock();
        writeln!(out, "\nflowgate demo report")?;
        if stay {
            writeln!(out, "  dashboard  {dashboard}  (live until Ctrl-C; metrics at /metrics, stats at /v1/stats)")?;
        } else {
            writeln!(out, "  dashboard  {dashboard} while the demo ran; `flowgate run` serves it at http://127.0.0.1:7071/")?;
        }
        writeln!(out, "  ingest     {acked} of {sent} events acknowledged in {load_secs:.1} s: {:.0} events/s", acked as f64 / load_secs)?;
        writeln!(out, "             ack latency p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms", p50, p99, p999, max)?;
        writeln!(out, "  pipeline   {read:.0} events read; dedup → numeric (SIMD level {:?}) → 1 s windows per device → files + topic", flowgate_kernels::level())?;
        writeln!(out, "             duplicates sent {}  removed {dup_removed:.0}", counters.duplicates.load(Ordering::Relaxed))?;
        writeln!(out, "             late events sent {}  counted late {late:.0} (to topic telemetry-late)", counters.late.load(Ordering::Relaxed))?;
        writeln!(out, "             windows emitted {windows:.0}  written to files {file_events:.0}  dead letters {dlq:.0}")?;
        if let (Some(p50), Some(p99)) = (quantile_from_buckets(&text, e2e, 0.5), quantile_from_buckets(&text, e2e, 0.99)) {
            writeln!(out, "             end-to-end latency (window end to sink; windows close 1 s after their end) p50 {:.0} ms  p99 {:.0} ms", p50 * 1000.0, p99 * 1000.0)?;
        }
        writeln!(out, "  output     {}", out_dir.display())?;
        for s in &samples {
            writeln!(out, "             {s}")?;
        }
        writeln!(out, "  data       {} (inspect with: flowgate log check --data-dir {})", data_dir.display(), data_dir.display())?;
        writeln!(out, "  log        {}", log_path.display())?;
        drop(out);
        if stay {
            eprintln!("\nthe engine stays up: open {dashboard} (or run `flowgate top --addr {}`); Ctrl-C stops it", engine.http_addr);
            let _ = tokio::signal::ctrl_c().await;
            eprintln!("stopping…");
        }
        let deadline = tokio::time::Instant::now() + engine.shutdown_bound();
        engine.shutdown().await?;
        if let Some(exporter) = exporter {
            exporter.shutdown(deadline).await;
        }
        Ok(ExitCode::SUCCESS)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn telemetry_is_json_with_duplicates_and_late_events() {
        let counters = Counters {
            sent: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            late: AtomicU64::new(0),
            acked: AtomicU64::new(0),
        };
        let mut rng = Rng(42);
        let mut id = 0;
        let bytes = telemetry_batch(&mut rng, &mut id, 100, 5000, &counters);
        let (view, _) = flowgate_core::BatchView::parse(&bytes).unwrap();
        let mut scratch = Vec::new();
        for r in view.records(&mut scratch).unwrap() {
            let v: serde_json::Value = serde_json::from_slice(r.unwrap().payload).unwrap();
            assert_eq!(v["readings"].as_array().unwrap().len(), 8);
        }
        let dups = counters.duplicates.load(Ordering::Relaxed);
        let late = counters.late.load(Ordering::Relaxed);
        assert!((50..200).contains(&dups), "about 2 % duplicates: {dups}");
        assert!((20..100).contains(&late), "about 1 % late: {late}");
    }

    #[test]
    fn quantiles_interpolate_prometheus_buckets() {
        let text = "m_bucket{le=\"0.1\"} 50\nm_bucket{le=\"0.2\"} 100\nm_bucket{le=\"+Inf\"} 100\n";
        assert!((quantile_from_buckets(text, "m", 0.5).unwrap() - 0.1).abs() < 1e-9);
        assert!((quantile_from_buckets(text, "m", 0.75).unwrap() - 0.15).abs() < 1e-9);
    }
}
