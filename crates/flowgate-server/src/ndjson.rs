//! The NDJSON listener: one JSON object per line into one topic (`docs/ndjson.md`).
//!
//! Lines are validated and batched per read, so a batch costs one append however many
//! lines it holds (one per partition when `[ingest]` key_field gives lines keys). A line
//! over the limit, not a JSON object, or whose key, time or client id field cannot be
//! stored, is counted by reason, logged (rate-limited) and skipped; the connection goes
//! on. With `ingest.ndjson_ack = "batch"` the server writes back one line per durable
//! batch naming the last line it covers (and where its events went), and one line per
//! refused line, so a client knows exactly what was stored.
//! When the client shuts its write side, everything it sent is handled (valid lines
//! durable) before the server closes its own.
//!
//! Memory per connection is bounded whatever the client sends: the read buffer grows
//! past its base only while a long line arrives, borrowing from the ingest budget, and
//! never past `ingest.max_line_bytes` (the rest of an overlong line is skipped as it
//! comes); a line must arrive whole within `ingest.frame_timeout_secs` of its first byte.

use std::sync::Arc;
use std::time::Duration;

use flowgate_core::BatchBuilder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use flowgate_log::LogError;

use crate::config::NdjsonAck;
use crate::ingest::{Route, Scratch, Written};
use crate::metrics::IngestPath;
use crate::parse::{max_events, reason_text, Line, LineSplitter};
use crate::shared::{warn_bad_input, Shared};

/// Base read buffer per connection, and the most a batch holds from one read.
const READ_CHUNK: usize = 256 * 1024;

/// Appends one JSON object to `out` as a line.
fn reply_line(out: &mut Vec<u8>, value: serde_json::Value) {
    serde_json::to_writer(&mut *out, &value).expect("writing JSON to a Vec cannot fail");
    out.push(b'\n');
}

/// Serves one NDJSON connection until it closes, times out, or the engine shuts down.
pub async fn serve_connection(mut stream: TcpStream, shared: Arc<Shared>) {
    let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let metrics = shared.ingest.metrics().clone();
    let topic_name = shared.config.ndjson_topic.clone();
    let topic = match shared.ingest.topic(&topic_name) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(topic = %topic_name, error = %e, "NDJSON topic unavailable; closing connection");
            return;
        }
    };
    let ack = shared.config.ndjson_ack == NdjsonAck::Batch;
    let counters = metrics.topic_counters(&topic_name, IngestPath::Ndjson);
    let max_line = shared.config.max_line_bytes;
    let idle = shared.idle_timeout();
    let line_timeout = shared.frame_timeout();
    // Fields read from each line (`[ingest]` key_field...): the read validates the line,
    // so the splitter need not.
    let fields = &shared.fields.spec;
    let read_fields = !fields.is_empty();
    // Copies of a read's records an append needs: the builder and one encoded batch, or
    // with keys (a split) also the whole batch, its records decompressed and the
    // per-partition builders.
    let copies: usize = if fields.key.is_some() { 5 } else { 2 };
    let mut splitter = if read_fields { LineSplitter::unvalidated(max_line) } else { LineSplitter::new(max_line) };
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut charge = shared.charge();
    let mut builder = BatchBuilder::with_capacity(READ_CHUNK);
    let mut scratch = Scratch::default();
    let mut replies: Vec<u8> = Vec::new();
    let mut acked_through = 0u64;
    // When the line now at the start of `buf` must be complete; `None` between lines.
    let mut line_deadline: Option<Instant> = None;
    let mut clean = false;
    loop {
        // Room to read: the base, or (while one long line arrives) double, up to the
        // line limit plus one read, borrowed from the budget.
        if buf.len() == buf.capacity() {
            let target = buf.capacity().saturating_mul(2).min(max_line.saturating_add(READ_CHUNK)).max(READ_CHUNK);
            let deadline = line_deadline.unwrap_or_else(|| Instant::now() + line_timeout);
            match tokio::time::timeout_at(deadline, charge.grow_to(target - READ_CHUNK)).await {
                Ok(Ok(())) => buf.reserve_exact(target - buf.len()),
                // More than the whole budget cannot happen while max_buffered_bytes >=
                // max_line_bytes (checked at load); cut rather than wait forever.
                Ok(Err(_)) => {
                    metrics.rejected(IngestPath::Ndjson, "over_budget", 1);
                    break;
                }
                Err(_) => {
                    metrics.rejected(IngestPath::Ndjson, "line_timeout", 1);
                    break;
                }
            }
        }
        if crate::memory::may_pause(&shared, charge.held()) {
            // Memory pressure: stop reading (the client's sends back up in TCP), under
            // either policy: a line has no retryable refusal.
            let paused = crate::memory::pause_while_pressed_fully(&shared, IngestPath::Ndjson).await;
            if shared.shutdown.is_cancelled() {
                break;
            }
            // Time the server spent not reading is not the client's to make up.
            line_deadline = line_deadline.map(|d| d + paused);
        }
        // Idle for the idle timeout, or inside a line past its own deadline: closed.
        let idle_deadline = Instant::now() + idle;
        let line_expires = line_deadline.filter(|d| *d < idle_deadline);
        let read = tokio::select! {
            r = tokio::time::timeout_at(line_expires.unwrap_or(idle_deadline), stream.read_buf(&mut buf)) => r,
            _ = shared.shutdown.cancelled() => break,
        };
        let eof = match read {
            Err(_) => {
                let (reason, what) = if line_expires.is_some() {
                    ("line_timeout", "a line did not arrive whole within ingest.frame_timeout_secs")
                } else {
                    ("idle_timeout", "connection idle too long")
                };
                metrics.rejected(IngestPath::Ndjson, reason, 1);
                warn_bad_input(&shared, "ndjson", &peer, what);
                if ack {
                    reply_line(&mut replies, serde_json::json!({"error": what, "reason": reason, "fatal": true}));
                }
                break;
            }
            Ok(Err(_)) => break,
            Ok(Ok(0)) => true,
            Ok(Ok(_)) => false,
        };
        let read_at = Instant::now();
        // The batch's records and its encoded copy, beyond what the base buffers hold, are
        // charged before they are allocated, for as many events as the bytes could hold.
        let buffer_charge = buf.capacity().saturating_sub(READ_CHUNK);
        let records = crate::fields::records_len(fields, buf.len(), max_events(&buf), 0);
        // A compressed topic's codec needs its scratch and a reserved output on top.
        let compressing = shared.ingest.appender().codec_for(&topic) != flowgate_core::Codec::None;
        let copies = copies + if compressing { 3 } else { 0 };
        let working = records.saturating_mul(copies).saturating_sub(2 * READ_CHUNK);
        if working > 0 {
            let wait = charge.grow_to(buffer_charge.saturating_add(working));
            if !matches!(tokio::time::timeout(line_timeout, wait).await, Ok(Ok(()))) {
                metrics.rejected(IngestPath::Ndjson, "busy", 1);
                if ack {
                    reply_line(
                        &mut replies,
                        serde_json::json!({"error": "the server's ingest buffers are full; retry later", "reason": "busy", "fatal": true}),
                    );
                }
                break;
            }
        }
        let now = flowgate_core::time::now_ms();
        let mut bytes = 0u64;
        // Refusals of lines past this many reply bytes per read are counted, not
        // answered one by one: 2-byte lines must not make ~40 times their size in
        // replies a client may never read.
        let mut unanswered = 0u64;
        let mut refuse = |number: u64, reason: &'static str, why: &str| {
            metrics.rejected(IngestPath::Ndjson, reason, 1);
            warn_bad_input(&shared, "ndjson", &peer, why);
            if ack && replies.len() < MAX_REFUSAL_REPLY_BYTES {
                reply_line(&mut replies, serde_json::json!({"line": number, "error": why, "reason": reason}));
            } else if ack {
                unanswered += 1;
            }
        };
        let mut keyed = false;
        // Two loops rather than a check per line: without fields a line costs what it
        // always did.
        let consumed = if read_fields {
            splitter.split(&buf, eof, |number, line| match line {
                Line::Event(event) => match fields.extract(event) {
                    Ok(f) => {
                        keyed |= f.key.is_some();
                        let (key, client_id) = (f.key.as_deref(), f.client_id.as_deref());
                        builder.push(f.timestamp.unwrap_or(now), key, client_id, std::iter::empty(), event);
                        bytes += event.len() as u64;
                    }
                    Err(e) => refuse(number, e.reason(), &e.message),
                },
                Line::Refused(reason) => refuse(number, reason, reason_text(reason)),
            })
        } else {
            splitter.split(&buf, eof, |number, line| match line {
                Line::Event(event) => {
                    builder.push_payload(now, None, event);
                    bytes += event.len() as u64;
                }
                Line::Refused(reason) => refuse(number, reason, reason_text(reason)),
            })
        };
        if unanswered > 0 {
            reply_line(
                &mut replies,
                serde_json::json!({"error": "more lines were refused", "reason": "many_refused", "count": unanswered}),
            );
        }
        buf.drain(..consumed);
        // A line in progress keeps the deadline its first byte set; a new one starts now.
        line_deadline = if buf.is_empty() && !splitter.discarding() {
            None
        } else if consumed > 0 || line_deadline.is_none() {
            Some(read_at + line_timeout)
        } else {
            line_deadline
        };
        let mut stored: Option<Written> = None;
        let events = builder.len();
        if events > 0 {
            let route = if keyed { Route::ByKey } else { Route::RoundRobin };
            match shared.ingest.append_built(&topic, route, &mut builder, &mut scratch) {
                Ok(written) => {
                    if let Err(e) = written.durable().await {
                        tracing::error!(error = %e, "NDJSON append not durable; closing connection");
                        if ack {
                            reply_line(
                                &mut replies,
                                serde_json::json!({"error": format!("storage error: {e}"), "reason": "storage_error", "fatal": true}),
                            );
                        }
                        break;
                    }
                    counters.accepted(u64::from(events), bytes);
                    stored = Some(written);
                }
                Err(LogError::PartiallyStored { stored: part, failed_partition, source }) => {
                    // What is named as stored must be durable first, as for a whole append.
                    let durable = part.durable().await;
                    let kept = if durable.is_ok() { part.events() } else { 0 };
                    counters.accepted_part(kept, u64::from(events), bytes);
                    metrics.rejected(IngestPath::Ndjson, "partially_stored", u64::from(events).saturating_sub(kept));
                    tracing::error!(error = %source, failed_partition, "NDJSON append stored in part; closing connection");
                    if ack {
                        let mut line = serde_json::json!({
                            "error": format!(
                                "storage error: partition {failed_partition} failed ({source}); the lines through \
                                 {} were stored only in the partitions listed", splitter.lines),
                            "reason": "partially_stored",
                            "last_line": splitter.lines,
                            "fatal": true,
                        });
                        line["partitions"] =
                            if durable.is_ok() { partitions_json(&part) } else { serde_json::json!([]) };
                        reply_line(&mut replies, line);
                    }
                    break;
                }
                Err(e) => {
                    metrics.rejected(IngestPath::Ndjson, "storage_error", u64::from(events));
                    tracing::error!(error = %e, "NDJSON append failed; closing connection");
                    if ack {
                        reply_line(
                            &mut replies,
                            serde_json::json!({"error": format!("storage error: {e}"), "reason": "storage_error", "fatal": true}),
                        );
                    }
                    break;
                }
            }
        }
        if ack && splitter.lines > acked_through {
            acked_through = splitter.lines;
            let mut line = serde_json::json!({"through_line": acked_through, "stored": events});
            if let Some(written) = &stored {
                let acks = written.acks();
                // Keyed events may have gone to several partitions: each has its part.
                if let [one] = acks[..] {
                    line["partition"] = one.partition.into();
                    line["first_offset"] = one.first_offset.into();
                }
                line["partitions"] = partitions_json(written);
            }
            reply_line(&mut replies, line);
        }
        if !replies.is_empty() && !write_replies(&mut stream, &mut replies, idle).await {
            metrics.rejected(IngestPath::Ndjson, "write_timeout", 1);
            return;
        }
        // Give back what one long line or large read borrowed.
        builder.shrink_to(READ_CHUNK);
        scratch.shrink_to(READ_CHUNK);
        charge.shrink_to(buffer_charge);
        if buf.len() < READ_CHUNK && buf.capacity() > READ_CHUNK {
            buf.shrink_to(READ_CHUNK);
            charge.shrink_to(buf.capacity().saturating_sub(READ_CHUNK));
        }
        if eof {
            clean = true;
            break;
        }
    }
    if !replies.is_empty() {
        let _ = write_replies(&mut stream, &mut replies, idle).await;
    }
    if clean {
        // Everything sent is handled now: tell the client by closing our side.
        let _ = stream.shutdown().await;
    } else {
        // Stopped early (timeout, storage error, shutdown): reset rather than close, so a
        // client cannot take this for "everything I sent was handled".
        let _ = stream.set_zero_linger();
    }
}

/// Reply bytes of refused lines per read past which refusals are only counted.
const MAX_REFUSAL_REPLY_BYTES: usize = 64 << 10;

async fn write_replies(stream: &mut TcpStream, replies: &mut Vec<u8>, timeout: Duration) -> bool {
    let ok = matches!(tokio::time::timeout(timeout, stream.write_all(replies)).await, Ok(Ok(())));
    replies.clear();
    replies.shrink_to(READ_CHUNK);
    ok
}

/// Each partition's part of a stored read: `[{"partition", "first_offset", "stored"}]`.
fn partitions_json(written: &Written) -> serde_json::Value {
    written
        .acks()
        .iter()
        .map(
            |a| serde_json::json!({"partition": a.partition, "first_offset": a.first_offset, "stored": a.record_count}),
        )
        .collect()
}
