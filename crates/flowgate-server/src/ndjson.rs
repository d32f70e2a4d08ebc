//! The NDJSON listener: one JSON object per line into one topic.
//!
//! Lines are validated and batched per read, so a batch costs one append however many
//! lines it holds. A line over the limit or not a JSON object is counted by reason,
//! logged (rate-limited) and skipped; the connection goes on. When the client shuts its
//! write side, everything it sent is durable before the server closes the connection.

use std::sync::Arc;

use bytes::{Buf, BytesMut};
use flowgate_core::BatchBuilder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::ingest::Scratch;
use crate::metrics::IngestPath;
use crate::shared::{warn_bad_input, Shared};

const READ_CHUNK: usize = 256 * 1024;

/// True when `line` is one well-formed JSON object.
pub fn is_json_object(line: &[u8]) -> bool {
    let first = line.iter().position(|b| !b.is_ascii_whitespace());
    match first {
        Some(i) if line[i] == b'{' => serde_json::from_slice::<serde::de::IgnoredAny>(line).is_ok(),
        _ => false,
    }
}

/// Serves one NDJSON connection until it closes, idles out, or the engine shuts down.
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
    let counters = metrics.topic_counters(&topic_name, IngestPath::Ndjson);
    let max_line = shared.config.max_line_bytes;
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut builder = BatchBuilder::with_capacity(READ_CHUNK);
    let mut scratch = Scratch::default();
    let mut discarding = false;
    let idle = shared.idle_timeout();
    loop {
        buf.reserve(READ_CHUNK);
        let read = tokio::select! {
            r = tokio::time::timeout(idle, stream.read_buf(&mut buf)) => r,
            _ = shared.shutdown.cancelled() => break,
        };
        let eof = match read {
            Err(_) => {
                metrics.rejected(IngestPath::Ndjson, "idle_timeout", 1);
                break;
            }
            Ok(Err(_)) => break,
            Ok(Ok(0)) => true,
            Ok(Ok(_)) => false,
        };
        let now = flowgate_core::time::now_ms();
        let mut bytes = 0u64;
        let mut start = 0usize;
        let mut handle_line = |line: &[u8], discarding: &mut bool, builder: &mut BatchBuilder| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if std::mem::take(discarding) {
                return; // the tail of an overlong line, already counted
            }
            if line.len() > max_line {
                metrics.rejected(IngestPath::Ndjson, "line_too_long", 1);
                warn_bad_input(&shared, "ndjson", &peer, "line longer than ingest.max_line_bytes");
            } else if line.iter().all(|b| b.is_ascii_whitespace()) {
                // Blank lines are not events.
            } else if is_json_object(line) {
                builder.push_payload(now, None, line);
                bytes += line.len() as u64;
            } else {
                metrics.rejected(IngestPath::Ndjson, "invalid_json", 1);
                warn_bad_input(&shared, "ndjson", &peer, "line is not a JSON object");
            }
        };
        for nl in memchr::memchr_iter(b'\n', &buf) {
            handle_line(&buf[start..nl], &mut discarding, &mut builder);
            start = nl + 1;
        }
        buf.advance(start);
        if eof && !buf.is_empty() {
            // A last line without a newline is still a line.
            let rest = buf.split();
            handle_line(&rest, &mut discarding, &mut builder);
        }
        if buf.len() > max_line {
            // A never-ending line: drop what we have and skip up to the next newline.
            if !discarding {
                metrics.rejected(IngestPath::Ndjson, "line_too_long", 1);
                warn_bad_input(&shared, "ndjson", &peer, "line longer than ingest.max_line_bytes");
                discarding = true;
            }
            buf.clear();
        }
        if !builder.is_empty() {
            let events = u64::from(builder.len());
            match shared.ingest.append_built(&topic, &mut builder, &mut scratch) {
                Ok(written) => {
                    if let Err(e) = written.durable().await {
                        tracing::error!(error = %e, "NDJSON append not durable; closing connection");
                        return;
                    }
                    counters.accepted(events, bytes);
                }
                Err(e) => {
                    metrics.rejected(IngestPath::Ndjson, "storage_error", events);
                    tracing::error!(error = %e, "NDJSON append failed; closing connection");
                    return;
                }
            }
        }
        if eof {
            break;
        }
    }
    // Everything sent is durable now: tell the client by closing our side.
    let _ = stream.shutdown().await;
}
