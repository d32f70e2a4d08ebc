//! Idempotent-producer state of a partition: for each producer id, the last few
//! sequences stored and the offsets they got, so a retried request is answered with its
//! first offsets instead of being stored again.
//!
//! The state is rebuilt on start from the batches themselves (each batch carries its
//! producer id and sequence) and from a snapshot taken when a segment rolls
//! (`<base>.producers`: the state as of that segment's start), so producers whose last
//! batch is in an older segment are still remembered.
//!
//! Snapshot format (little-endian): entry count u32, then per producer: producer id u64,
//! last offset u64, n u8, then n × (sequence u64, first offset u64, record count u32);
//! then a CRC32C u32 of everything before it.

use std::collections::{HashMap, VecDeque};

/// Sequences remembered per producer.
pub const REMEMBERED_SEQUENCES: usize = 5;

/// What the state says about an incoming (producer, sequence).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SequenceCheck {
    /// Not seen: store it.
    New,
    /// Stored before at these offsets: answer with them, store nothing.
    Duplicate {
        /// First offset it got.
        first_offset: u64,
        /// Records it held.
        record_count: u32,
    },
    /// Older than any remembered sequence of this producer.
    TooOld,
}

#[derive(Clone, Debug, Default)]
struct ProducerEntry {
    recent: VecDeque<(u64, u64, u32)>,
    last_offset: u64,
}

/// The producers of one partition.
#[derive(Clone, Debug)]
pub struct ProducerState {
    producers: HashMap<u64, ProducerEntry>,
    max_producers: usize,
}

impl ProducerState {
    /// Empty state remembering at most `max_producers` producers.
    pub fn new(max_producers: usize) -> ProducerState {
        ProducerState { producers: HashMap::new(), max_producers: max_producers.max(1) }
    }

    /// Number of producers remembered.
    pub fn len(&self) -> usize {
        self.producers.len()
    }

    /// True when no producer is remembered.
    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    /// Classifies an incoming sequence.
    pub fn check(&self, producer_id: u64, sequence: u64) -> SequenceCheck {
        let Some(entry) = self.producers.get(&producer_id) else {
            return SequenceCheck::New;
        };
        if let Some(&(_, first_offset, record_count)) = entry.recent.iter().find(|(s, _, _)| *s == sequence) {
            return SequenceCheck::Duplicate { first_offset, record_count };
        }
        match entry.recent.front() {
            Some(&(oldest, _, _)) if sequence < oldest => SequenceCheck::TooOld,
            _ => SequenceCheck::New,
        }
    }

    /// Records a stored batch.
    pub fn record(&mut self, producer_id: u64, sequence: u64, first_offset: u64, record_count: u32) {
        if producer_id == 0 {
            return;
        }
        if !self.producers.contains_key(&producer_id) && self.producers.len() >= self.max_producers {
            // Forget the producer idle the longest (smallest last offset).
            if let Some((&victim, _)) = self.producers.iter().min_by_key(|(_, e)| e.last_offset) {
                self.producers.remove(&victim);
            }
        }
        let entry = self.producers.entry(producer_id).or_default();
        // Keep the window sorted by sequence so `TooOld` compares against the oldest.
        let at = entry.recent.partition_point(|(s, _, _)| *s < sequence);
        entry.recent.insert(at, (sequence, first_offset, record_count));
        while entry.recent.len() > REMEMBERED_SEQUENCES {
            entry.recent.pop_front();
        }
        entry.last_offset = entry.last_offset.max(first_offset + u64::from(record_count).saturating_sub(1));
    }

    /// Serializes the state as a snapshot file.
    pub fn to_snapshot(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.producers.len() * 80);
        out.extend_from_slice(&(self.producers.len() as u32).to_le_bytes());
        for (pid, e) in &self.producers {
            out.extend_from_slice(&pid.to_le_bytes());
            out.extend_from_slice(&e.last_offset.to_le_bytes());
            out.push(e.recent.len() as u8);
            for (seq, first, count) in &e.recent {
                out.extend_from_slice(&seq.to_le_bytes());
                out.extend_from_slice(&first.to_le_bytes());
                out.extend_from_slice(&count.to_le_bytes());
            }
        }
        let crc = crc32c_of(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses a snapshot; `None` if it is damaged (the state is then rebuilt from less).
    pub fn from_snapshot(bytes: &[u8], max_producers: usize) -> Option<ProducerState> {
        if bytes.len() < 8 {
            return None;
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32c_of(body) != u32::from_le_bytes(crc.try_into().ok()?) {
            return None;
        }
        let mut r = Reader { buf: body, pos: 0 };
        let count = r.u32()?;
        let mut state = ProducerState::new(max_producers);
        for _ in 0..count {
            let pid = r.u64()?;
            let last_offset = r.u64()?;
            let n = r.u8()?;
            let mut entry = ProducerEntry { recent: VecDeque::new(), last_offset };
            for _ in 0..n {
                entry.recent.push_back((r.u64()?, r.u64()?, r.u32()?));
            }
            state.producers.insert(pid, entry);
        }
        (r.pos == body.len()).then_some(state)
    }
}

fn crc32c_of(bytes: &[u8]) -> u32 {
    flowgate_core::batch::crc32c_bytes(bytes)
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let s = self.buf.get(self.pos..self.pos + N)?;
        self.pos += N;
        s.try_into().ok()
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take::<1>()?[0])
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_recognised_and_old_ones_refused() {
        let mut s = ProducerState::new(100);
        assert_eq!(s.check(7, 0), SequenceCheck::New);
        for seq in 0..10u64 {
            s.record(7, seq, seq * 10, 10);
        }
        assert_eq!(s.check(7, 9), SequenceCheck::Duplicate { first_offset: 90, record_count: 10 });
        assert_eq!(s.check(7, 5), SequenceCheck::Duplicate { first_offset: 50, record_count: 10 });
        assert_eq!(s.check(7, 4), SequenceCheck::TooOld);
        assert_eq!(s.check(7, 10), SequenceCheck::New);
        assert_eq!(s.check(8, 0), SequenceCheck::New);
        let back = ProducerState::from_snapshot(&s.to_snapshot(), 100).unwrap();
        assert_eq!(back.check(7, 9), SequenceCheck::Duplicate { first_offset: 90, record_count: 10 });
        let mut damaged = s.to_snapshot();
        damaged[5] ^= 1;
        assert!(ProducerState::from_snapshot(&damaged, 100).is_none());
    }

    #[test]
    fn memory_is_bounded_by_forgetting_the_idlest_producer() {
        let mut s = ProducerState::new(3);
        for pid in 1..=4u64 {
            s.record(pid, 0, pid * 100, 1);
        }
        assert_eq!(s.len(), 3);
        assert_eq!(s.check(1, 0), SequenceCheck::New, "producer 1 was idlest and forgotten");
        assert!(matches!(s.check(4, 0), SequenceCheck::Duplicate { .. }));
    }
}
