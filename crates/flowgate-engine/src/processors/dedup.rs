//! `dedup`: drops events whose id was already seen within a TTL (event time), with
//! memory bounded by a maximum number of ids. Its state is checkpointed with the
//! pipeline's offsets, so a replay after a crash restores exactly the ids seen up to
//! the committed offset.

use std::collections::{HashMap, VecDeque};

use super::{Outputs, Processor};
use crate::event::{get_path, key_string, PipelineEvent};

enum IdSource {
    Field(String),
    ClientId,
    Key,
}

/// Drops duplicates.
pub struct Dedup {
    source: IdSource,
    ttl_ms: i64,
    max_entries: usize,
    seen: HashMap<String, i64>,
    order: VecDeque<(i64, String)>,
    max_ts: i64,
    /// Duplicates dropped so far.
    pub dropped: u64,
}

impl Dedup {
    /// A dedup by `by` (field path, `@client_id` or `@key`).
    pub fn new(by: &str, ttl_ms: u64, max_entries: usize) -> Dedup {
        let source = match by {
            "@client_id" => IdSource::ClientId,
            "@key" => IdSource::Key,
            path => IdSource::Field(path.to_owned()),
        };
        Dedup {
            source,
            ttl_ms: ttl_ms as i64,
            max_entries: max_entries.max(1),
            seen: HashMap::new(),
            order: VecDeque::new(),
            max_ts: i64::MIN,
            dropped: 0,
        }
    }

    fn id_of(&self, event: &mut PipelineEvent) -> Option<String> {
        match &self.source {
            IdSource::ClientId => event.client_id.as_ref().map(|b| String::from_utf8_lossy(b).into_owned()),
            IdSource::Key => event.key.as_ref().map(|b| String::from_utf8_lossy(b).into_owned()),
            IdSource::Field(path) => event.doc().ok().and_then(|d| get_path(d, path)).map(key_string),
        }
    }

    fn expire(&mut self) {
        let horizon = self.max_ts.saturating_sub(self.ttl_ms);
        while let Some((ts, _)) = self.order.front() {
            if *ts >= horizon && self.order.len() <= self.max_entries {
                break;
            }
            let (ts, id) = self.order.pop_front().expect("front exists");
            if self.seen.get(&id) == Some(&ts) {
                self.seen.remove(&id);
            }
        }
    }

    /// Ids currently remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// True when no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

impl Processor for Dedup {
    fn kind(&self) -> &'static str {
        "dedup"
    }

    fn process(&mut self, events: Vec<PipelineEvent>, _out: &mut Outputs) -> Vec<PipelineEvent> {
        let mut kept = Vec::with_capacity(events.len());
        for mut event in events {
            let Some(id) = self.id_of(&mut event) else {
                // No id: nothing to compare; it goes on.
                kept.push(event);
                continue;
            };
            let ts = event.timestamp;
            self.max_ts = self.max_ts.max(ts);
            let horizon = self.max_ts.saturating_sub(self.ttl_ms);
            match self.seen.get(&id) {
                Some(&seen_at) if seen_at >= horizon => {
                    self.dropped += 1;
                    continue;
                }
                _ => {}
            }
            self.seen.insert(id.clone(), ts);
            self.order.push_back((ts, id));
            kept.push(event);
        }
        self.expire();
        kept
    }

    fn snapshot(&self) -> serde_json::Value {
        let entries: Vec<(&str, i64)> = self
            .order
            .iter()
            .filter(|(ts, id)| self.seen.get(id) == Some(ts))
            .map(|(ts, id)| (id.as_str(), *ts))
            .collect();
        serde_json::json!({"max_ts": self.max_ts, "dropped": self.dropped, "entries": entries})
    }

    fn restore(&mut self, state: &serde_json::Value) -> anyhow::Result<()> {
        if state.is_null() {
            return Ok(());
        }
        self.max_ts = state["max_ts"].as_i64().unwrap_or(i64::MIN);
        self.dropped = state["dropped"].as_u64().unwrap_or(0);
        self.seen.clear();
        self.order.clear();
        let entries: Vec<(String, i64)> = serde_json::from_value(state["entries"].clone())?;
        for (id, ts) in entries {
            self.seen.insert(id.clone(), ts);
            self.order.push_back((ts, id));
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use flowgate_core::{BatchBuilder, BatchView, Codec, ProducerStamp};

    pub(crate) fn events(items: &[(i64, &str)]) -> Vec<PipelineEvent> {
        let mut b = BatchBuilder::new();
        for (ts, json) in items {
            b.push_payload(*ts, None, json.as_bytes());
        }
        let batch = b.finish(Codec::None, ProducerStamp::default()).unwrap();
        let (view, _) = BatchView::parse(&batch.bytes).unwrap();
        let mut scratch = Vec::new();
        view.records(&mut scratch)
            .unwrap()
            .enumerate()
            .map(|(i, r)| PipelineEvent::from_record(0, i as u64, &r.unwrap()))
            .collect()
    }

    fn ids(events: &mut [PipelineEvent]) -> Vec<String> {
        events.iter_mut().map(|e| String::from_utf8(e.payload().to_vec()).unwrap()).collect()
    }

    #[test]
    fn drops_repeats_within_the_ttl_and_lets_them_through_after() {
        let mut d = Dedup::new("id", 1000, 100);
        let mut out = Outputs::default();
        let mut kept = d.process(
            events(&[(0, r#"{"id":1}"#), (10, r#"{"id":2}"#), (20, r#"{"id":1}"#), (900, r#"{"id":2}"#)]),
            &mut out,
        );
        assert_eq!(ids(&mut kept), vec![r#"{"id":1}"#, r#"{"id":2}"#]);
        // 1500: id 1 (seen at 0) expired; id 2 (seen at 10) too: horizon 500.
        let mut kept =
            d.process(events(&[(1500, r#"{"id":1}"#), (1510, r#"{"id":2}"#), (1520, r#"{"id":3}"#)]), &mut out);
        assert_eq!(kept.len(), 3, "{:?}", ids(&mut kept));
        assert_eq!(d.dropped, 2);
    }

    #[test]
    fn memory_is_bounded_and_state_survives_a_snapshot() {
        let mut d = Dedup::new("id", 1_000_000, 3);
        let mut out = Outputs::default();
        d.process(events(&[(1, r#"{"id":1}"#), (2, r#"{"id":2}"#), (3, r#"{"id":3}"#), (4, r#"{"id":4}"#)]), &mut out);
        assert_eq!(d.len(), 3);
        let mut restored = Dedup::new("id", 1_000_000, 3);
        restored.restore(&d.snapshot()).unwrap();
        let kept = restored.process(events(&[(5, r#"{"id":4}"#), (6, r#"{"id":1}"#)]), &mut out);
        assert_eq!(kept.len(), 1, "id 4 is remembered, id 1 was evicted");
    }
}
