//! The listeners' way into the log: [`flowgate_log::append`] with what only producers
//! over the network get — the refusal of the engine's own topics, and metrics.

use std::sync::Arc;

use flowgate_core::{BatchBuilder, Codec, ProducerStamp};
use flowgate_log::append::Appender;
use flowgate_log::{Log, LogError, Topic};

pub use flowgate_log::append::{Ack, Route, Scratch, Written};

use crate::metrics::{IngestPath, Metrics};

/// The listeners' append path. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Ingest {
    log: Log,
    metrics: Arc<Metrics>,
    appender: Appender,
}

impl Ingest {
    /// An append path into `log`; batches the server builds use `codec`.
    pub fn new(log: Log, metrics: Arc<Metrics>, codec: Codec) -> Ingest {
        let timed = metrics.clone();
        let appender = Appender::new(codec).on_append(Arc::new(move |took, records| timed.append(took, records)));
        Ingest { log, metrics, appender }
    }

    /// The log.
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The appender the listeners use (their codec and append metrics), for the engine's
    /// sources to write through the same path.
    pub fn appender(&self) -> &Appender {
        &self.appender
    }

    /// The topic, created on first write if the config allows. The engine's own topics
    /// (the dead-letter topic `_dlq` and the replay topics `_replay.<pipeline>`) take no
    /// writes from producers: a forged entry there would be replayed into a sink.
    pub fn topic(&self, name: &str) -> Result<Arc<Topic>, LogError> {
        if flowgate_engine::runtime::replay::is_engine_topic(name) {
            return Err(LogError::InvalidTopicName {
                name: name.to_owned(),
                reason: "it is written by the engine only (dead letters and their replays)",
            });
        }
        self.log.topic_or_create(name)
    }

    /// Appends a batch a client encoded, split by partition (PRODUCE): keys pick
    /// partitions, keyless records go to one round-robin partition per batch
    /// ([`Route::ByKey`], see [`Appender::append_encoded`] for what is verified and how a
    /// split fails).
    ///
    /// Not idempotent: an idempotent batch must name its partition
    /// ([`Ingest::append_to_partition`]).
    pub fn append_client_batch(
        &self,
        topic: &Topic,
        batch: &mut [u8],
        scratch: &mut Scratch,
    ) -> Result<Written, LogError> {
        self.appender.append_encoded(topic, Route::ByKey, batch, scratch).inspect_err(|e| {
            if matches!(e, LogError::PartiallyStored { .. }) {
                self.metrics.rejected(IngestPath::Binary, "partially_stored", 1);
            }
        })
    }

    /// Appends a batch a client encoded to one partition it named (PRODUCE_PARTITION):
    /// verified like [`Ingest::append_client_batch`], every keyed record must belong to
    /// `partition`, and the batch is written as it came, in one write, so it is stored
    /// whole or not at all. An idempotent batch's sequence is checked in order for that
    /// partition ([`flowgate_log::producers`]).
    pub fn append_to_partition(
        &self,
        topic: &Topic,
        partition: u32,
        batch: &mut [u8],
        scratch: &mut Scratch,
    ) -> Result<Written, LogError> {
        self.appender.append_encoded(topic, Route::Partition(partition), batch, scratch)
    }

    /// Encodes the records in `builder` as one batch and appends it where `route` says
    /// (used by the NDJSON and HTTP listeners): [`Route::RoundRobin`] writes it to one
    /// partition (round robin across calls) in one write, so it is stored whole or not at
    /// all; [`Route::ByKey`], for batches with keyed records, splits it by partition (see
    /// [`Appender::append_built`] for how a split fails).
    pub fn append_built(
        &self,
        topic: &Topic,
        route: Route,
        builder: &mut BatchBuilder,
        scratch: &mut Scratch,
    ) -> Result<Written, LogError> {
        self.appender.append_built(topic, route, builder, ProducerStamp::default(), scratch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowgate_core::partition_for_key;
    use flowgate_log::LogConfig;

    fn key_in(partition: u32, partitions: u32) -> String {
        (0..).map(|i| format!("k{i}")).find(|k| partition_for_key(k.as_bytes(), partitions) == partition).unwrap()
    }

    #[test]
    fn producers_cannot_write_the_engines_topics() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), LogConfig::default()).unwrap();
        let ingest = Ingest::new(log.clone(), Metrics::new(), Codec::None);
        let err = ingest.topic("_dlq").unwrap_err();
        assert!(matches!(err, LogError::InvalidTopicName { .. }), "{err}");
        assert!(ingest.topic("events").is_ok());
    }

    #[test]
    fn each_partition_a_split_writes_is_timed_once() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), LogConfig::default()).unwrap();
        let topic = log.create_topic("t", 2).unwrap();
        let metrics = Metrics::new();
        let ingest = Ingest::new(log.clone(), metrics.clone(), Codec::None);
        let mut scratch = Scratch::default();
        let mut b = BatchBuilder::new();
        for p in [0, 1, 1] {
            b.push_payload(1, Some(key_in(p, 2).as_bytes()), b"{}");
        }
        let mut bytes = b.finish(Codec::None, ProducerStamp::default()).unwrap().bytes;
        let written = ingest.append_client_batch(&topic, &mut bytes, &mut scratch).unwrap();
        assert_eq!(written.events(), 3);
        let text = metrics.render(&log);
        assert!(text.contains("flowgate_append_batch_events_count 2"), "one observation per partition:\n{text}");
        assert_eq!(
            metrics.rejected_count(IngestPath::Binary, "partially_stored"),
            0,
            "a whole split is no partial one"
        );
    }
}
