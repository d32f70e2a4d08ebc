//! `blackhole`: accepts and discards, for benchmarks of everything before the sink.

use flowgate_engine::sink::BoxFuture;
use flowgate_engine::{Sink, SinkEvent, WriteOutcome};
use serde::{Deserialize, Serialize};

use super::registry::{BuildContext, SinkConnector};

/// `type = "blackhole"`: no options.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlackholeConfig {}

impl SinkConnector for BlackholeSink {
    const TYPE: &'static str = "blackhole";
    type Config = BlackholeConfig;

    fn build(_: BlackholeConfig, _: &BuildContext<'_>) -> anyhow::Result<Box<dyn Sink>> {
        Ok(Box::new(BlackholeSink))
    }
}

/// Discards events.
#[derive(Debug)]
pub struct BlackholeSink;

impl Sink for BlackholeSink {
    fn write<'a>(&'a mut self, events: &'a [SinkEvent]) -> BoxFuture<'a, anyhow::Result<WriteOutcome>> {
        std::hint::black_box(events);
        Box::pin(async { Ok(WriteOutcome::delivered()) })
    }
}
