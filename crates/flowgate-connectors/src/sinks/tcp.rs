//! `tcp`: to another flowgate over the binary protocol. A batch counts as written once
//! the remote engine acknowledged it; at-least-once across crashes.

use bytes::Bytes;
use flowgate_client::Client;
use flowgate_core::{BatchBuilder, Codec, ProducerStamp};
use flowgate_engine::sink::BoxFuture;
use flowgate_engine::{Sink, SinkEvent};

/// Sends to a remote engine.
pub struct TcpSink {
    addr: String,
    topic: String,
    client: Option<Client>,
    builder: BatchBuilder,
}

impl TcpSink {
    /// A sink to `topic` on the engine at `addr` (connects on first write).
    pub fn new(addr: &str, topic: &str) -> TcpSink {
        TcpSink { addr: addr.to_owned(), topic: topic.to_owned(), client: None, builder: BatchBuilder::new() }
    }
}

impl Sink for TcpSink {
    fn write<'a>(&'a mut self, events: &'a [SinkEvent]) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            if self.client.as_ref().is_none_or(|c| c.is_closed()) {
                self.client = Some(Client::connect(&self.addr).await?);
            }
            let client = self.client.as_ref().expect("connected above");
            // Stay under the remote frame limit: one request per ~1 MiB.
            for chunk in events.chunks(4096) {
                self.builder.clear();
                for e in chunk {
                    self.builder.push(e.timestamp, e.key.as_deref(), None, std::iter::empty(), &e.payload);
                }
                let batch = self.builder.finish(Codec::Lz4, ProducerStamp::default())?;
                client.produce(&self.topic, Bytes::from(batch.bytes), ProducerStamp::default()).await?;
            }
            Ok(())
        })
    }

    fn commit(&mut self) -> BoxFuture<'_, anyhow::Result<serde_json::Value>> {
        Box::pin(async { Ok(serde_json::Value::Null) })
    }

    fn recover<'a>(&'a mut self, _state: &'a serde_json::Value) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}
