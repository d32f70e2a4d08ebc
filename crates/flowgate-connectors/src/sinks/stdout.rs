//! `stdout`: one JSON payload per line on standard output.

use std::io::Write;

use flowgate_engine::sink::BoxFuture;
use flowgate_engine::{Sink, SinkEvent, WriteOutcome};
use serde::{Deserialize, Serialize};

use super::registry::{BuildContext, SinkConnector};

/// `type = "stdout"`: no options.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdoutConfig {}

impl SinkConnector for StdoutSink {
    const TYPE: &'static str = "stdout";
    type Config = StdoutConfig;

    fn build(_: StdoutConfig, _: &BuildContext<'_>) -> anyhow::Result<Box<dyn Sink>> {
        Ok(Box::new(StdoutSink))
    }
}

/// Prints events.
#[derive(Debug)]
pub struct StdoutSink;

impl Sink for StdoutSink {
    fn write<'a>(&'a mut self, events: &'a [SinkEvent]) -> BoxFuture<'a, anyhow::Result<WriteOutcome>> {
        Box::pin(async move {
            let mut buf = Vec::with_capacity(events.iter().map(|e| e.payload.len() + 1).sum());
            for e in events {
                buf.extend_from_slice(&e.payload);
                buf.push(b'\n');
            }
            // One locked write per batch, so lines of concurrent partitions never interleave.
            std::io::stdout().lock().write_all(&buf)?;
            Ok(WriteOutcome::delivered())
        })
    }

    fn commit(&mut self) -> BoxFuture<'_, anyhow::Result<serde_json::Value>> {
        Box::pin(async {
            std::io::stdout().lock().flush()?;
            Ok(serde_json::Value::Null)
        })
    }
}
