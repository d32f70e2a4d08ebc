//! Side outputs: dead letters (to [`DLQ_TOPIC`]) and late events (to their topic).

use flowgate_core::{BatchBuilder, Codec, ProducerStamp};

use super::worker::Worker;
use super::DLQ_TOPIC;
use crate::event::PipelineEvent;
use crate::metrics::PipelineLabels;
use crate::processors::Outputs;

impl Worker {
    pub(super) fn handle_outputs(&mut self, i: usize, outputs: Outputs) {
        if !outputs.late.is_empty() {
            self.shared.metrics.late_events.get_or_create(&self.processor_labels[i]).inc_by(outputs.late.len() as u64);
            let mut by_topic: std::collections::HashMap<String, Vec<PipelineEvent>> = Default::default();
            for (topic, event) in outputs.late {
                if let Some(t) = topic {
                    by_topic.entry(t).or_default().push(event);
                }
            }
            for (topic, mut events) in by_topic {
                let mut b = BatchBuilder::new();
                for e in &mut events {
                    b.push(e.timestamp, e.key.as_deref(), e.client_id.as_deref(), std::iter::empty(), e.raw_payload());
                }
                self.append(&topic, &mut b);
            }
        }
        if !outputs.dead_letters.is_empty() {
            let m = &self.shared.metrics;
            m.dead_letters
                .get_or_create(&PipelineLabels { pipeline: self.config.name.clone() })
                .inc_by(outputs.dead_letters.len() as u64);
            let mut b = BatchBuilder::new();
            for dl in outputs.dead_letters {
                let payload = dl.event.raw_payload();
                let original = serde_json::from_slice::<serde_json::Value>(payload)
                    .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(payload).into_owned()));
                let envelope = serde_json::json!({
                    "pipeline": self.config.name,
                    "processor": format!("{}:{}", i + 1, dl.processor),
                    "error": dl.error,
                    "topic": self.topic,
                    "partition": dl.event.partition,
                    "offset": dl.event.offset,
                    "timestamp": dl.event.timestamp,
                    "event": original,
                });
                b.push(
                    dl.event.timestamp,
                    dl.event.key.as_deref(),
                    None,
                    std::iter::empty(),
                    &serde_json::to_vec(&envelope).unwrap_or_default(),
                );
            }
            self.append(DLQ_TOPIC, &mut b);
        }
    }

    fn append(&self, topic: &str, builder: &mut BatchBuilder) {
        if builder.is_empty() {
            return;
        }
        let result =
            builder.finish(Codec::None, ProducerStamp::default()).map_err(anyhow::Error::from).and_then(|mut batch| {
                let t = self.shared.log.topic_or_create(topic)?;
                let p = t.partition(t.next_round_robin())?;
                p.append(&mut batch.bytes)?;
                Ok(())
            });
        if let Err(e) = result {
            tracing::error!(topic, error = %format!("{e:#}"), "could not write side output");
        }
    }
}
