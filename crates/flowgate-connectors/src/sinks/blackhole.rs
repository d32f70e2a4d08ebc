//! `blackhole`: accepts and discards, for benchmarks of everything before the sink.

use flowgate_engine::sink::BoxFuture;
use flowgate_engine::{Sink, SinkEvent, WriteOutcome};

/// Discards events.
#[derive(Debug)]
pub struct BlackholeSink;

impl Sink for BlackholeSink {
    fn write<'a>(&'a mut self, events: &'a [SinkEvent]) -> BoxFuture<'a, anyhow::Result<WriteOutcome>> {
        std::hint::black_box(events);
        Box::pin(async { Ok(WriteOutcome::delivered()) })
    }
}
