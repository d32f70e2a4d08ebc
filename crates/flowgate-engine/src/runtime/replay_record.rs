//! The records of a pipeline's replay topic (`_replay.<pipeline>`, see
//! [`super::replay`]): one per replayed dead-letter entry, the event's bytes as they were
//! behind one line of JSON that says where the event re-enters and which entry it
//! replays:
//!
//! ```text
//! {"dlq":{"partition":0,"offset":12,"fingerprint":99},"sink":"api","processor":null,"topic":"in","partition":0,"offset":3,"replays":1}
//! {"n":3}
//! ```
//!
//! Anyone who can write to a topic can write here, so [`ReplayHead::parse`] takes any
//! bytes: a head longer than [`MAX_HEAD_BYTES`] or malformed is refused.

use serde::{Deserialize, Serialize};

/// Longest head line accepted (names are short; this leaves room for long ones).
pub const MAX_HEAD_BYTES: usize = 4096;

/// Which dead-letter entry a replay record replays: its place in the `_dlq` topic and a
/// fingerprint of its bytes (an entry written at the same place after a purge is
/// another entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EntryRef {
    /// `_dlq` partition.
    pub partition: u32,
    /// `_dlq` offset.
    pub offset: u64,
    /// [`fingerprint`] of the stored entry.
    pub fingerprint: u64,
}

/// The fingerprint of a stored dead-letter entry's bytes.
pub fn fingerprint(entry: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(entry)
}

/// Where a replayed event re-enters its pipeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resume {
    /// Straight to this sink alone: the processors have seen it already.
    Sink(String),
    /// At this processor (the one that failed it), then every later one and the sinks.
    Processor(String),
    /// At the first processor: the entry names neither a processor nor a sink.
    Start,
}

/// The head of a replay record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplayHead {
    /// The entry replayed.
    pub entry: EntryRef,
    /// Where the event re-enters.
    pub resume: Resume,
    /// The event's source topic, partition and offset (as the entry names them).
    pub topic: String,
    /// Source partition.
    pub partition: u32,
    /// Source offset.
    pub offset: u64,
    /// How many times the original event has been replayed, this one included.
    pub replays: u32,
}

#[derive(Serialize, Deserialize)]
struct Wire {
    dlq: EntryRef,
    sink: Option<String>,
    processor: Option<String>,
    topic: String,
    partition: u32,
    offset: u64,
    replays: u32,
}

/// Why bytes are not a replay record.
#[derive(Debug, thiserror::Error)]
#[error("not a replay record: {0}")]
pub struct NotReplay(String);

impl ReplayHead {
    /// The record: head line, newline, the event's bytes.
    pub fn encode(&self, event: &[u8]) -> Vec<u8> {
        let (sink, processor) = match &self.resume {
            Resume::Sink(s) => (Some(s.clone()), None),
            Resume::Processor(p) => (None, Some(p.clone())),
            Resume::Start => (None, None),
        };
        let wire = Wire {
            dlq: self.entry,
            sink,
            processor,
            topic: self.topic.clone(),
            partition: self.partition,
            offset: self.offset,
            replays: self.replays,
        };
        let mut out = serde_json::to_vec(&wire).expect("a replay head serializes");
        out.push(b'\n');
        out.extend_from_slice(event);
        out
    }

    /// The head of `record` and where the event's bytes start in it.
    pub fn parse(record: &[u8]) -> Result<(ReplayHead, usize), NotReplay> {
        let window = &record[..record.len().min(MAX_HEAD_BYTES.saturating_add(1))];
        let end = window
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| NotReplay(format!("no head line within {MAX_HEAD_BYTES} bytes")))?;
        let wire: Wire = serde_json::from_slice(&record[..end]).map_err(|e| NotReplay(e.to_string()))?;
        let resume = match (wire.sink, wire.processor) {
            (Some(s), None) if !s.is_empty() => Resume::Sink(s),
            (None, Some(p)) if !p.is_empty() => Resume::Processor(p),
            (None, None) => Resume::Start,
            _ => return Err(NotReplay("at most one of `sink` and `processor` may be named, not empty".into())),
        };
        let head = ReplayHead {
            entry: wire.dlq,
            resume,
            topic: wire.topic,
            partition: wire.partition,
            offset: wire.offset,
            replays: wire.replays,
        };
        Ok((head, end + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn head(resume: Resume) -> ReplayHead {
        ReplayHead {
            entry: EntryRef { partition: 2, offset: u64::MAX, fingerprint: 7 },
            resume,
            topic: "in".into(),
            partition: 1,
            offset: 42,
            replays: 3,
        }
    }

    #[test]
    fn a_record_reads_back_with_the_event_bytes_as_they_were() {
        for resume in [Resume::Sink("api".into()), Resume::Processor("dedup-1".into()), Resume::Start] {
            let event = b"{\"n\":1}\nnot json \xff";
            let record = head(resume.clone()).encode(event);
            let (back, at) = ReplayHead::parse(&record).unwrap();
            assert_eq!(back, head(resume));
            assert_eq!(&record[at..], event);
        }
    }

    #[test]
    fn malformed_heads_are_refused() {
        assert!(ReplayHead::parse(b"{\"n\":1}").is_err(), "no head line");
        assert!(ReplayHead::parse(b"{}\n{}").is_err(), "fields missing");
        let both = br#"{"dlq":{"partition":0,"offset":1,"fingerprint":2},"sink":"a","processor":"b","topic":"t","partition":0,"offset":0,"replays":1}"#;
        assert!(ReplayHead::parse(&[&both[..], b"\n"].concat()).is_err(), "two places to resume at");
        let long = [vec![b' '; MAX_HEAD_BYTES + 1], head(Resume::Sink("a".into())).encode(b"")].concat();
        assert!(ReplayHead::parse(&long).is_err(), "the head line is bounded");
    }

    proptest! {
        #[test]
        fn any_bytes_parse_or_are_refused_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok((_, at)) = ReplayHead::parse(&bytes) {
                prop_assert!(at <= bytes.len());
            }
        }

        #[test]
        fn any_head_round_trips(partition: u32, offset: u64, fingerprint: u64, replays: u32,
                                name in "[a-z0-9_.-]{1,20}", sink: bool, event in proptest::collection::vec(any::<u8>(), 0..64)) {
            let resume = if sink { Resume::Sink(name.clone()) } else { Resume::Processor(name.clone()) };
            let h = ReplayHead { entry: EntryRef { partition, offset, fingerprint }, resume, topic: name, partition, offset, replays };
            let record = h.encode(&event);
            let (back, at) = ReplayHead::parse(&record).unwrap();
            prop_assert_eq!(back, h);
            prop_assert_eq!(&record[at..], &event[..]);
        }
    }
}
