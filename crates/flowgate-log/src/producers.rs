//! Idempotent-producer state of a partition: for each producer id, the last sequence it
//! stored here and the offsets its last few batches got, so a retried request is answered
//! with its first offsets instead of being stored again.
//!
//! Sequences are numbered per producer **and partition** and must arrive in order: a
//! producer's first batch in a partition has sequence 0 and each next batch the last
//! stored sequence + 1. Because there are no gaps, a sequence at or below the last stored
//! one was stored, and a sequence above `last + 1` means an earlier batch is missing (it
//! was never stored: lost on a dropped connection, refused, or still in flight on another
//! connection), so it is refused as out of order and the client resends in order. Nothing
//! that was not stored is ever reported as stored.
//!
//! A producer inside the engine may instead ask for [`SequenceRule::Monotonic`] per
//! append: its sequences need only grow, gaps allowed, and any sequence from a producer
//! not known here is new. The topic sink uses it with source offsets as sequences
//! (a filter leaves gaps); what a sequence at or below the last one means is then the
//! producer's to say (for the topic sink: that source offset was delivered). The rule is
//! the appender's choice, not stored: batches, recovery and snapshots are the same for
//! both rules.
//!
//! The state is rebuilt on start from the batches themselves (each batch carries its
//! producer id and sequence) and from a snapshot taken when a segment rolls
//! (`<base>.producers`: the state as of that segment's start), so producers whose last
//! batch is in an older segment are still remembered.
//!
//! Snapshot format (little-endian): entry count u32, then per producer: producer id u64,
//! last offset u64, n u8, then n × (sequence u64, first offset u64, record count u32);
//! then a CRC32C u32 of everything before it. The last stored sequence is the largest of
//! the n.

use std::collections::{BTreeSet, HashMap, VecDeque};

/// Sequences whose offsets are remembered per producer, for answering retries.
pub const REMEMBERED_SEQUENCES: usize = 5;

/// How a producer's sequences must follow each other in a partition.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SequenceRule {
    /// From 0, each next batch the last stored sequence + 1 (clients of the binary
    /// protocol): a gap means a batch is missing and is refused.
    #[default]
    Contiguous,
    /// Each next batch above the last stored sequence, gaps allowed; a producer not known
    /// here may start anywhere. Nothing is ever refused as out of order or unknown.
    Monotonic,
}

/// What the state says about an incoming (producer, sequence).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SequenceCheck {
    /// The next sequence of this producer (or 0 from a producer not seen here): store it.
    New,
    /// Stored before at these offsets: answer with them, store nothing.
    Duplicate {
        /// First offset it got.
        first_offset: u64,
        /// Records it held.
        record_count: u32,
    },
    /// Stored before (it is at or below the last stored sequence), too long ago for its
    /// offsets to be remembered.
    StoredLongAgo {
        /// The last sequence stored.
        last_sequence: u64,
    },
    /// A gap: the batches between the last stored sequence and this one were never
    /// stored here. Nothing is stored; the client resends from `expected`.
    OutOfOrder {
        /// The sequence this partition expects next.
        expected: u64,
    },
    /// The producer is not known here and the sequence is not 0: its state was forgotten
    /// (more idle producers than `max_producers_per_partition`) or its batches were lost
    /// with a power failure. Nothing is stored.
    UnknownProducer,
}

#[derive(Clone, Debug, Default)]
struct ProducerEntry {
    /// (sequence, first offset, record count) of the last batches, by sequence.
    recent: VecDeque<(u64, u64, u32)>,
    last_offset: u64,
}

impl ProducerEntry {
    fn last_sequence(&self) -> Option<u64> {
        self.recent.back().map(|&(s, _, _)| s)
    }
}

/// The producers of one partition.
#[derive(Clone, Debug)]
pub struct ProducerState {
    producers: HashMap<u64, ProducerEntry>,
    /// `(last_offset, producer_id)` of every producer, so the idlest one is found in
    /// O(log n) when a new one must make room (under the partition's write lock).
    idle_order: BTreeSet<(u64, u64)>,
    max_producers: usize,
}

impl ProducerState {
    /// Empty state remembering at most `max_producers` producers.
    pub fn new(max_producers: usize) -> ProducerState {
        ProducerState { producers: HashMap::new(), idle_order: BTreeSet::new(), max_producers: max_producers.max(1) }
    }

    /// Number of producers remembered.
    pub fn len(&self) -> usize {
        self.producers.len()
    }

    /// True when no producer is remembered.
    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    /// Classifies an incoming sequence under [`SequenceRule::Contiguous`].
    pub fn check(&self, producer_id: u64, sequence: u64) -> SequenceCheck {
        self.check_with(producer_id, sequence, SequenceRule::Contiguous)
    }

    /// The last sequence stored from `producer_id`, if the producer is remembered.
    pub fn last_sequence(&self, producer_id: u64) -> Option<u64> {
        self.producers.get(&producer_id).and_then(ProducerEntry::last_sequence)
    }

    /// Classifies an incoming sequence under `rule`.
    pub fn check_with(&self, producer_id: u64, sequence: u64, rule: SequenceRule) -> SequenceCheck {
        let Some(last) = self.producers.get(&producer_id).and_then(|e| e.last_sequence().map(|l| (e, l))) else {
            return if sequence == 0 || rule == SequenceRule::Monotonic {
                SequenceCheck::New
            } else {
                SequenceCheck::UnknownProducer
            };
        };
        let (entry, last_sequence) = last;
        if let Some(&(_, first_offset, record_count)) = entry.recent.iter().find(|(s, _, _)| *s == sequence) {
            return SequenceCheck::Duplicate { first_offset, record_count };
        }
        if sequence <= last_sequence {
            return SequenceCheck::StoredLongAgo { last_sequence };
        }
        if rule == SequenceRule::Monotonic {
            return SequenceCheck::New;
        }
        match last_sequence.checked_add(1) {
            Some(expected) if expected == sequence => SequenceCheck::New,
            Some(expected) => SequenceCheck::OutOfOrder { expected },
            // u64::MAX was stored: no sequence can follow it.
            None => SequenceCheck::StoredLongAgo { last_sequence },
        }
    }

    /// Records a stored batch. Called for every batch appended (after [`Self::check`]
    /// said `New`) and for every batch found by recovery, which may predate the in-order
    /// rule: the largest sequence seen is the last one.
    pub fn record(&mut self, producer_id: u64, sequence: u64, first_offset: u64, record_count: u32) {
        if producer_id == 0 {
            return;
        }
        if !self.producers.contains_key(&producer_id) && self.producers.len() >= self.max_producers {
            // Forget the producer idle the longest (smallest last offset).
            if let Some((_, victim)) = self.idle_order.pop_first() {
                self.producers.remove(&victim);
            }
        }
        let entry = self.producers.entry(producer_id).or_default();
        // Keep the window sorted by sequence so the back is the last stored sequence.
        let at = entry.recent.partition_point(|(s, _, _)| *s < sequence);
        if entry.recent.get(at).is_some_and(|(s, _, _)| *s == sequence) {
            return;
        }
        entry.recent.insert(at, (sequence, first_offset, record_count));
        while entry.recent.len() > REMEMBERED_SEQUENCES {
            entry.recent.pop_front();
        }
        let last = first_offset.saturating_add(u64::from(record_count).saturating_sub(1));
        let before = entry.last_offset;
        entry.last_offset = before.max(last);
        self.idle_order.remove(&(before, producer_id));
        self.idle_order.insert((entry.last_offset, producer_id));
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
            if let Some(old) = state.producers.insert(pid, entry) {
                state.idle_order.remove(&(old.last_offset, pid));
            }
            state.idle_order.insert((last_offset, pid));
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
        let s = self.buf.get(self.pos..self.pos.checked_add(N)?)?;
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
    use proptest::prelude::*;

    #[test]
    fn sequences_must_follow_each_other_and_only_stored_ones_are_duplicates() {
        let mut s = ProducerState::new(100);
        assert_eq!(s.check(7, 1), SequenceCheck::UnknownProducer, "a producer starts at 0");
        assert_eq!(s.check(7, 0), SequenceCheck::New);
        for seq in 0..10u64 {
            assert_eq!(s.check(7, seq), SequenceCheck::New);
            s.record(7, seq, seq * 10, 10);
        }
        assert_eq!(s.check(7, 9), SequenceCheck::Duplicate { first_offset: 90, record_count: 10 });
        assert_eq!(s.check(7, 5), SequenceCheck::Duplicate { first_offset: 50, record_count: 10 });
        assert_eq!(s.check(7, 4), SequenceCheck::StoredLongAgo { last_sequence: 9 });
        assert_eq!(s.check(7, 10), SequenceCheck::New);
        assert_eq!(s.check(7, 11), SequenceCheck::OutOfOrder { expected: 10 }, "10 was never stored");
        assert_eq!(s.check(7, u64::MAX), SequenceCheck::OutOfOrder { expected: 10 });
        assert_eq!(s.check(8, 0), SequenceCheck::New);
        let back = ProducerState::from_snapshot(&s.to_snapshot(), 100).unwrap();
        assert_eq!(back.check(7, 9), SequenceCheck::Duplicate { first_offset: 90, record_count: 10 });
        assert_eq!(back.check(7, 11), SequenceCheck::OutOfOrder { expected: 10 });
        let mut damaged = s.to_snapshot();
        damaged[5] ^= 1;
        assert!(ProducerState::from_snapshot(&damaged, 100).is_none());
    }

    #[test]
    fn monotonic_sequences_may_skip_but_never_go_back() {
        let mut s = ProducerState::new(100);
        let m = SequenceRule::Monotonic;
        assert_eq!(s.check_with(7, 41, m), SequenceCheck::New, "an unknown producer starts anywhere");
        assert_eq!(s.last_sequence(7), None);
        s.record(7, 41, 0, 3);
        assert_eq!(s.check_with(7, 100, m), SequenceCheck::New, "a gap is allowed");
        s.record(7, 100, 3, 2);
        assert_eq!(s.last_sequence(7), Some(100));
        assert_eq!(s.check_with(7, 41, m), SequenceCheck::Duplicate { first_offset: 0, record_count: 3 });
        assert_eq!(s.check_with(7, 60, m), SequenceCheck::StoredLongAgo { last_sequence: 100 });
        assert_eq!(s.check_with(7, 101, SequenceRule::Contiguous), SequenceCheck::New);
        assert_eq!(s.check_with(7, 102, SequenceRule::Contiguous), SequenceCheck::OutOfOrder { expected: 101 });
        let back = ProducerState::from_snapshot(&s.to_snapshot(), 100).unwrap();
        assert_eq!(back.last_sequence(7), Some(100), "the snapshot format holds monotonic producers as is");
        assert_eq!(back.check_with(7, 99, m), SequenceCheck::StoredLongAgo { last_sequence: 100 });
    }

    #[test]
    fn memory_is_bounded_by_forgetting_the_idlest_producer() {
        let mut s = ProducerState::new(3);
        for pid in 1..=4u64 {
            s.record(pid, 0, pid * 100, 1);
        }
        assert_eq!(s.len(), 3);
        assert_eq!(s.check(1, 1), SequenceCheck::UnknownProducer, "producer 1 was idlest and forgotten");
        assert!(matches!(s.check(4, 0), SequenceCheck::Duplicate { .. }));
    }

    #[test]
    fn the_largest_sequence_is_safe() {
        let mut s = ProducerState::new(3);
        s.record(1, u64::MAX, u64::MAX, u32::MAX);
        assert_eq!(s.check(1, u64::MAX), SequenceCheck::Duplicate { first_offset: u64::MAX, record_count: u32::MAX });
        assert_eq!(s.check(1, 0), SequenceCheck::StoredLongAgo { last_sequence: u64::MAX });
    }

    /// What happens next in the model.
    #[derive(Clone, Debug)]
    enum Step {
        /// A request with this sequence reaches the server: a first send, a retry after a
        /// lost reply, a resend after a reconnect, a late request from an old connection,
        /// or one that overtook an earlier request that was lost.
        Arrive(u64),
        /// The server restarts; its state is read back from a snapshot.
        Restart,
    }

    fn steps() -> impl Strategy<Value = Vec<Step>> {
        proptest::collection::vec(prop_oneof![8 => (0u64..12).prop_map(Step::Arrive), 1 => Just(Step::Restart)], 1..150)
    }

    proptest! {
        /// Any order of arrivals (retries, resends, lost and overtaken requests) and restarts:
        /// the server stores each batch at most once, in sequence order, and every
        /// answer that says "stored" (New, Duplicate, StoredLongAgo) is about a batch
        /// that really is stored.
        #[test]
        fn nothing_unstored_is_ever_reported_stored(steps in steps()) {
            let mut state = ProducerState::new(4);
            let mut stored: Vec<u64> = Vec::new(); // sequences in log order
            let mut offset = 0u64;
            for step in steps {
                match step {
                    Step::Arrive(seq) => {
                        match state.check(9, seq) {
                            SequenceCheck::New => {
                                state.record(9, seq, offset, 1);
                                stored.push(seq);
                                offset += 1;
                            }
                            SequenceCheck::Duplicate { first_offset, .. } => {
                                let at = stored.iter().position(|&s| s == seq);
                                prop_assert_eq!(at.map(|i| i as u64), Some(first_offset), "duplicate of {} not where reported", seq);
                            }
                            SequenceCheck::StoredLongAgo { .. } => {
                                prop_assert!(stored.contains(&seq), "{} reported stored but never was", seq);
                            }
                            SequenceCheck::OutOfOrder { expected } => {
                                prop_assert!(!stored.contains(&seq));
                                prop_assert_eq!(expected, stored.len() as u64);
                            }
                            SequenceCheck::UnknownProducer => prop_assert!(stored.is_empty()),
                        }
                    }
                    Step::Restart => {
                        state = ProducerState::from_snapshot(&state.to_snapshot(), 4).expect("snapshot reads back");
                    }
                }
                // Stored in order, each once.
                prop_assert!(stored.iter().enumerate().all(|(i, &s)| s == i as u64), "stored out of order: {:?}", stored);
            }
        }
    }
}
