//! `flowgate bench`: a load generator against a running engine.
//!
//! Each connection keeps a window of produce requests in flight. With `--rate`, batches
//! are sent on a schedule and latency is measured from each batch's scheduled time, so
//! a stalled engine shows up in the percentiles instead of silently slowing the load
//! (no coordinated omission). Batches are encoded once before the run, so the load
//! generator spends its CPU on sending, not on encoding.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flowgate_client::Client;
use flowgate_core::{BatchBuilder, Codec, ProducerStamp};
use hdrhistogram::Histogram;
use std::sync::Mutex;

/// Load shapes.
#[derive(Clone, Copy, Debug, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// The same rate throughout.
    Constant,
    /// From zero up to the rate, linearly over the duration.
    Ramp,
    /// Bursts of 4× the rate for 250 ms, then 750 ms of silence (the same average).
    Burst,
}

/// Arguments of `flowgate bench`.
#[derive(clap::Args)]
pub struct Args {
    /// Events per second in total, or `max`.
    #[arg(long, default_value = "max")]
    rate: String,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Stop after this many events instead (still bounded by --duration).
    #[arg(long)]
    events: Option<u64>,
    /// Payload bytes per event.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Connections.
    #[arg(long, default_value_t = 2)]
    connections: usize,
    /// Events per produce request.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 8)]
    in_flight: usize,
    /// Load shape (with --rate).
    #[arg(long, value_enum, default_value = "constant")]
    pattern: Pattern,
    /// Topic to write to.
    #[arg(long, default_value = "bench")]
    topic: String,
    /// Compression of the batches: none, lz4, zstd.
    #[arg(long, default_value = "none")]
    compression: String,
    /// Engine address (binary protocol).
    #[arg(long, default_value = super::DEFAULT_ADDR)]
    addr: String,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
    /// Which ingest path to load: the binary protocol (acknowledged batches) or NDJSON
    /// over TCP (lines at full speed; counted once the engine closes the connection,
    /// which it does when every line is durable).
    #[arg(long, value_enum, default_value = "binary")]
    protocol: Protocol,
    /// The engine's NDJSON address (with --protocol ndjson).
    #[arg(long, default_value = "127.0.0.1:7072")]
    ndjson_addr: String,
}

/// The ingest path `flowgate bench` loads.
#[derive(Clone, Copy, Debug, clap::ValueEnum, PartialEq, Eq)]
pub enum Protocol {
    /// Binary protocol.
    Binary,
    /// NDJSON over TCP.
    Ndjson,
}

/// A chunk of whole NDJSON lines of `size` bytes each (newline included).
fn ndjson_chunk(size: usize, lines: usize) -> (Vec<u8>, usize) {
    let mut out = Vec::with_capacity(size * lines);
    for i in 0..lines {
        let mut line = format!("{{\"device\":\"sensor-{:05}\",\"seq\":{i},\"temp\":21.5,\"pad\":\"", i % 10_000);
        while line.len() + 3 < size {
            line.push('x');
        }
        line.push_str("\"}\n");
        out.extend_from_slice(line.as_bytes());
    }
    (out, lines)
}

/// NDJSON load: every connection writes whole lines as fast as the engine reads them.
fn run_ndjson(args: &Args) -> anyhow::Result<ExitCode> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (chunk, lines_per_chunk) = ndjson_chunk(args.size, (1 << 20) / args.size.max(1));
    let chunk = Arc::new(chunk);
    let duration = Duration::from_secs_f64(args.duration.max(0.1));
    let total = Arc::new(AtomicU64::new(0));
    let runtime = super::runtime()?;
    let elapsed = runtime.block_on(async {
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..args.connections {
            let (addr, chunk, total) = (args.ndjson_addr.clone(), chunk.clone(), total.clone());
            let limit = args.events;
            tasks.push(tokio::spawn(async move {
                let mut stream = tokio::net::TcpStream::connect(&addr)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot connect to {addr}: {e}"))?;
                let mut sent = 0u64;
                while start.elapsed() < duration && limit.is_none_or(|l| total.load(Ordering::Relaxed) < l) {
                    stream.write_all(&chunk).await?;
                    sent += lines_per_chunk as u64;
                    total.fetch_add(lines_per_chunk as u64, Ordering::Relaxed);
                }
                // The engine closes its side once every line is durable.
                stream.shutdown().await?;
                let mut sink = [0u8; 64];
                while stream.read(&mut sink).await? > 0 {}
                anyhow::Ok(sent)
            }));
        }
        let mut lines = 0;
        for t in tasks {
            lines += t.await??;
        }
        anyhow::Ok((start.elapsed(), lines))
    })?;
    let (elapsed, lines) = elapsed;
    let secs = elapsed.as_secs_f64();
    let eps = lines as f64 / secs;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"protocol": "ndjson", "events": lines, "duration_secs": secs, "events_per_sec": eps,
                               "mb_per_sec": eps * args.size as f64 / 1e6, "config": {"size": args.size, "connections": args.connections}})
        );
    } else {
        println!("{lines} NDJSON lines of {} bytes durable in {secs:.2} s", args.size);
        println!("throughput: {eps:.0} lines/s, {:.1} MB/s", eps * args.size as f64 / 1e6);
    }
    Ok(ExitCode::SUCCESS)
}

/// Seconds after the start at which the batch holding event number `events_before`
/// is due, for a per-connection rate `rate` (events/s).
fn due_at(pattern: Pattern, events_before: f64, rate: f64, duration: f64) -> f64 {
    match pattern {
        Pattern::Constant => events_before / rate,
        // events(t) = rate * t² / (2 * duration)
        Pattern::Ramp => (2.0 * duration * events_before / rate).sqrt(),
        Pattern::Burst => {
            let per_cycle = rate; // one second's worth, sent in the first quarter
            let cycle = (events_before / per_cycle).floor();
            let within = events_before - cycle * per_cycle;
            cycle + within / (4.0 * rate)
        }
    }
}

fn build_batches(size: usize, batch: usize, codec: Codec) -> Vec<Bytes> {
    (0..16)
        .map(|b| {
            let mut builder = BatchBuilder::with_capacity(batch * (size + 8));
            let now = flowgate_core::time::now_ms();
            for i in 0..batch {
                let mut payload = format!("{{\"batch\":{b},\"seq\":{i},\"pad\":\"");
                while payload.len() + 2 < size {
                    payload.push('x');
                }
                payload.push_str("\"}");
                builder.push_payload(now, None, payload.as_bytes());
            }
            Bytes::from(builder.finish(codec, ProducerStamp::default()).expect("non-empty batch").bytes)
        })
        .collect()
}

struct Totals {
    acked: AtomicU64,
    errors: AtomicU64,
    histogram: Mutex<Histogram<u64>>,
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Runs the benchmark and prints the result.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.protocol == Protocol::Ndjson {
        return run_ndjson(&args);
    }
    let rate: Option<f64> = match args.rate.as_str() {
        "max" => None,
        r => Some(
            r.parse::<f64>()
                .ok()
                .filter(|r| *r > 0.0)
                .ok_or_else(|| anyhow::anyhow!("--rate must be a positive number or max"))?,
        ),
    };
    let codec =
        Codec::parse(&args.compression).ok_or_else(|| anyhow::anyhow!("--compression must be none, lz4 or zstd"))?;
    anyhow::ensure!(
        args.connections > 0 && args.batch > 0 && args.in_flight > 0,
        "--connections, --batch and --in-flight must be positive"
    );
    let batches = Arc::new(build_batches(args.size, args.batch, codec));
    let totals = Arc::new(Totals {
        acked: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        histogram: Mutex::new(new_histogram()),
    });
    let duration = Duration::from_secs_f64(args.duration.max(0.1));
    let runtime = super::runtime()?;
    let result = runtime.block_on(async {
        let mut clients = Vec::new();
        for _ in 0..args.connections {
            clients.push(
                Client::connect(&args.addr)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot connect to {}: {e}", args.addr))?,
            );
        }
        // Create the topic up front so auto-creation is not part of the measurement.
        let _ = clients[0].create_topic(&args.topic, 1).await;
        let start = Instant::now();
        let deadline = start + duration;
        let budget = Arc::new(AtomicU64::new(args.events.unwrap_or(u64::MAX)));
        let per_conn_rate = rate.map(|r| r / args.connections as f64);
        let mut tasks = Vec::new();
        for (c, client) in clients.into_iter().enumerate() {
            let batches = batches.clone();
            let totals = totals.clone();
            let budget = budget.clone();
            let topic = args.topic.clone();
            let (batch, window, pattern) = (args.batch as u64, args.in_flight, args.pattern);
            let secs = duration.as_secs_f64();
            tasks.push(tokio::spawn(async move {
                let slots = Arc::new(tokio::sync::Semaphore::new(window));
                let mut k: u64 = 0;
                loop {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    let scheduled = match per_conn_rate {
                        Some(r) => {
                            let at = start + Duration::from_secs_f64(due_at(pattern, (k * batch) as f64, r, secs));
                            if at >= deadline {
                                break;
                            }
                            tokio::time::sleep_until(at.into()).await;
                            at
                        }
                        None => now,
                    };
                    if budget.fetch_sub(batch.min(budget.load(Ordering::Relaxed)), Ordering::Relaxed) == 0 {
                        break;
                    }
                    // Latency counts from when the batch could be sent: the schedule's
                    // time if the window was full (the engine held it up: no
                    // coordinated omission), else now (timer wake-up jitter is the load
                    // generator's, not the engine's).
                    let woke = Instant::now();
                    let (permit, waited) = match slots.clone().try_acquire_owned() {
                        Ok(p) => (p, false),
                        Err(_) => match slots.clone().acquire_owned().await {
                            Ok(p) => (p, true),
                            Err(_) => break,
                        },
                    };
                    let sent_at = if per_conn_rate.is_some() && waited { scheduled.min(woke) } else { Instant::now() };
                    // Prebuilt batches get current event times (a header patch and a CRC).
                    let mut fresh = batches[(k as usize + c) % batches.len()].to_vec();
                    flowgate_core::batch::restamp(&mut fresh, flowgate_core::time::now_ms())
                        .expect("prebuilt batch is valid");
                    let body = Bytes::from(fresh);
                    let (client, totals, topic) = (client.clone(), totals.clone(), topic.clone());
                    tokio::spawn(async move {
                        let _permit = permit;
                        match client.produce(&topic, body, ProducerStamp::default()).await {
                            Ok(acks) => {
                                let n: u64 = acks.iter().map(|a| u64::from(a.record_count)).sum();
                                let micros = sent_at.elapsed().as_micros() as u64;
                                totals.acked.fetch_add(n, Ordering::Relaxed);
                                let _ = totals.histogram.lock().expect("not poisoned").record(micros.max(1));
                            }
                            Err(e) => {
                                if totals.errors.fetch_add(1, Ordering::Relaxed) == 0 {
                                    eprintln!("produce failed: {e}");
                                }
                            }
                        }
                    });
                    k += 1;
                }
                // Wait for the window to drain.
                let _ = slots.acquire_many(window as u32).await;
            }));
        }
        let progress = {
            let totals = totals.clone();
            let tty = std::io::stderr().is_terminal();
            let quiet = args.json && !tty;
            tokio::spawn(async move {
                let mut last = 0u64;
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let acked = totals.acked.load(Ordering::Relaxed);
                    let p99 = totals.histogram.lock().expect("not poisoned").value_at_quantile(0.99);
                    if !quiet {
                        let line = format!(
                            "[{:>5.1}s] {:>12} acked  {:>10.0} ev/s  p99 {:.2} ms",
                            start.elapsed().as_secs_f64(),
                            acked,
                            (acked - last) as f64,
                            p99 as f64 / 1000.0
                        );
                        if tty {
                            eprint!("\r{line}");
                        } else {
                            eprintln!("{line}");
                        }
                    }
                    last = acked;
                }
            })
        };
        for t in tasks {
            t.await?;
        }
        progress.abort();
        if std::io::stderr().is_terminal() {
            eprintln!();
        }
        anyhow::Ok(start.elapsed())
    })?;
    let elapsed = result.as_secs_f64();
    let acked = totals.acked.load(Ordering::Relaxed);
    let errors = totals.errors.load(Ordering::Relaxed);
    let h = totals.histogram.lock().expect("not poisoned");
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let eps = acked as f64 / elapsed;
    let mbps = eps * args.size as f64 / 1e6;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "events": acked,
                "errors": errors,
                "duration_secs": elapsed,
                "events_per_sec": eps,
                "mb_per_sec": mbps,
                "latency_ms": {"p50": ms(0.5), "p95": ms(0.95), "p99": ms(0.99), "p999": ms(0.999), "max": h.max() as f64 / 1000.0},
                "config": {"rate": args.rate, "pattern": args.pattern, "size": args.size, "connections": args.connections,
                           "batch": args.batch, "in_flight": args.in_flight, "compression": args.compression},
            })
        );
    } else {
        println!("{acked} events acknowledged in {elapsed:.2} s ({errors} failed requests)");
        println!("throughput: {eps:.0} events/s, {mbps:.1} MB/s");
        println!(
            "ack latency: p50 {:.3} ms  p95 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms",
            ms(0.5),
            ms(0.95),
            ms(0.99),
            ms(0.999),
            h.max() as f64 / 1000.0
        );
    }
    Ok(if errors == 0 && acked > 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_send_the_same_events_at_the_right_times() {
        // Constant: 1000 ev/s → event 500 is due at 0.5 s.
        assert!((due_at(Pattern::Constant, 500.0, 1000.0, 10.0) - 0.5).abs() < 1e-9);
        // Ramp over 10 s to 1000 ev/s: events(10) = 1000*100/20 = 5000 → due at 10 s.
        assert!((due_at(Pattern::Ramp, 5000.0, 1000.0, 10.0) - 10.0).abs() < 1e-9);
        // Burst: a second's worth within the first 250 ms, the next at 1 s.
        assert!((due_at(Pattern::Burst, 999.0, 1000.0, 10.0) - 0.24975).abs() < 1e-9);
        assert!((due_at(Pattern::Burst, 1000.0, 1000.0, 10.0) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn payloads_have_the_requested_size() {
        let batches = build_batches(100, 10, Codec::None);
        let (view, _) = flowgate_core::BatchView::parse(&batches[0]).unwrap();
        let mut scratch = Vec::new();
        for r in view.records(&mut scratch).unwrap() {
            let r = r.unwrap();
            assert_eq!(r.payload.len(), 100);
            serde_json::from_slice::<serde_json::Value>(r.payload).unwrap();
        }
    }
}
