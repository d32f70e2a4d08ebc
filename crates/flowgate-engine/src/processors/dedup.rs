//! `dedup`: drops events whose id was already seen within a TTL (event time), with
//! memory bounded by a maximum number of ids. Ids are kept as 128-bit XXH3 hashes (24
//! bytes an entry with its time, no allocation per event; a false match needs about
//! 2^64 ids). The state is checkpointed with the pipeline's offsets, so a replay after a
//! crash restores exactly the ids seen up to the committed offset.
//!
//! In a pipeline the ids live between checkpoints in a state journal beside the
//! partition's checkpoint ([`super::journal`]), in arrival order: a checkpoint appends
//! the ids that arrived since the last one and names the live range, so its cost
//! follows the arrival rate, not the table's size. The checkpoint holds `JOURNALED`,
//! `max_ts`, `dropped` and the [`JournalRef`]; a state with the ids inline (what
//! [`Processor::snapshot`] writes, and checkpoints before the journal) is still read.
//!
//! An event with no id (no such field, no key, no client id) goes on unchanged. With
//! `by` a field path, an event whose payload is not JSON goes to the dead letters: its
//! id cannot be read, and letting it through would break exactly-once silently. An
//! event whose time is outside the pipeline's `event_time` bounds goes to the dead
//! letters before it touches the state: it would otherwise move the TTL horizon.

use std::sync::Arc;

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::hash::Hasher;

use vrl::value::Value;
use xxhash_rust::xxh3::Xxh3;

use super::journal::{Journal, JournalRef};
use super::{duration_ms, DeadLetter, Outputs, Processor};
use crate::config::EventTimePolicy;
use crate::event::{get_path, to_json, PipelineEvent};
use crate::projection::{Projection, Reads};

/// The table's hash of an id: both words folded with a key drawn once per dedup. The
/// ids themselves are unkeyed (they are stored in checkpoints), so anyone who controls
/// the ids could search for ones that fall into the same buckets of a table hashed by
/// the id alone; with a secret key they cannot aim.
#[derive(Clone, Copy)]
struct IdHashing {
    key: [u64; 2],
}

impl IdHashing {
    fn random() -> IdHashing {
        IdHashing { key: [fastrand::u64(..), fastrand::u64(..)] }
    }
}

impl std::hash::BuildHasher for IdHashing {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher { key: self.key, words: [0; 2], written: 0 }
    }
}

/// Takes an id's two words and multiplies them, each keyed, into one (foldhash's
/// mix for 128 bits), then finalizes: every bit of either word reaches the bucket and
/// the tag.
struct IdHasher {
    key: [u64; 2],
    words: [u64; 2],
    written: usize,
}

/// The high and low words of the 128-bit product, folded (as foldhash mixes).
fn folded_multiply(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        // A fold alone leaves the low bits weak when one factor is even: murmur3's
        // finalizer spreads every bit over the bucket index and the tag.
        let mut x = folded_multiply(self.words[0] ^ self.key[0], self.words[1] ^ self.key[1]);
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        x ^ (x >> 33)
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }
    fn write_u64(&mut self, word: u64) {
        // Past two words (only an `Id` is hashed here) the words fold in turn.
        let slot = self.written % 2;
        self.words[slot] =
            if self.written < 2 { word } else { folded_multiply(self.words[slot] ^ word, self.key[slot]) };
        self.written += 1;
    }
}

/// A 128-bit id hash as two words: 8-byte aligned, so an id with its time takes 24
/// bytes in the table and the arrival queue (a `u128` would pad both to 32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Id {
    low: u64,
    high: u64,
}

impl Id {
    fn of(hash: u128) -> Id {
        Id { low: hash as u64, high: (hash >> 64) as u64 }
    }
}

impl std::hash::Hash for Id {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.low);
        state.write_u64(self.high);
    }
}

type IdMap = HashMap<Id, i64, IdHashing>;

enum IdSource {
    Field(String),
    ClientId,
    Key,
}

/// Drops duplicates.
pub struct Dedup {
    /// What to parse events into ([`Processor::project`]).
    projection: Option<Arc<Projection>>,
    source: IdSource,
    ttl_ms: i64,
    max_entries: usize,
    event_time: EventTimePolicy,
    seen: IdMap,
    order: VecDeque<(i64, Id)>,
    /// The journal index of `order`'s first entry.
    front: u64,
    journal: Option<Journal>,
    max_ts: i64,
    /// Duplicates dropped so far.
    pub dropped: u64,
}

/// Marks a checkpointed state whose ids are in the journal: never the start of an
/// inline state, whose first 8 bytes are an event time within the event-time bounds.
const JOURNALED: &[u8; 8] = b"FGDEDUPJ";
/// Bytes of a journaled state: the mark, `max_ts`, `dropped`, the reference.
const JOURNALED_LEN: usize = 8 + 8 + 8 + JournalRef::LEN;
/// Bytes of one id in a state: the id (u128) and its time (i64), little-endian.
const ENTRY_LEN: usize = 24;

fn encode_entry(out: &mut Vec<u8>, (ts, id): (i64, Id)) {
    out.extend_from_slice(&id.low.to_le_bytes());
    out.extend_from_slice(&id.high.to_le_bytes());
    out.extend_from_slice(&ts.to_le_bytes());
}

fn decode_entry(entry: &[u8]) -> (i64, Id) {
    let id = Id::of(u128::from_le_bytes(entry[..16].try_into().expect("16 bytes")));
    let ts = i64::from_le_bytes(entry[16..24].try_into().expect("8 bytes"));
    (ts, id)
}

fn hash_bytes(tag: u8, bytes: &[u8]) -> u128 {
    let mut h = Xxh3::new();
    h.update(&[tag]);
    h.update(bytes);
    h.digest128()
}

/// A hash of a document value that tells apart values of different types.
fn hash_value(v: &Value) -> u128 {
    match v {
        Value::Bytes(b) => hash_bytes(b's', b),
        Value::String(s) => hash_bytes(b's', AsRef::<[u8]>::as_ref(s)),
        Value::Integer(i) => hash_bytes(b'i', &i.to_le_bytes()),
        Value::Float(f) => hash_bytes(b'f', &f.into_inner().to_le_bytes()),
        Value::Boolean(b) => hash_bytes(b'b', &[u8::from(*b)]),
        other => hash_bytes(b'j', to_json(other).as_bytes()),
    }
}

impl Dedup {
    /// A dedup by `by` (field path, `@client_id` or `@key`); errors name the bad key.
    pub fn new(by: &str, ttl_ms: u64, max_entries: usize, event_time: &EventTimePolicy) -> anyhow::Result<Dedup> {
        let source = match by {
            "@client_id" => IdSource::ClientId,
            "@key" => IdSource::Key,
            "" => anyhow::bail!("by must name a field path, @client_id or @key"),
            path => IdSource::Field(path.to_owned()),
        };
        if max_entries == 0 {
            anyhow::bail!("max_entries must be at least 1");
        }
        Ok(Dedup {
            projection: None,
            source,
            ttl_ms: duration_ms("ttl_ms", ttl_ms)?,
            max_entries,
            event_time: event_time.clone(),
            seen: IdMap::with_hasher(IdHashing::random()),
            order: VecDeque::new(),
            front: 0,
            journal: None,
            max_ts: i64::MIN,
            dropped: 0,
        })
    }

    /// The event's id (`None`: it has none), or why it cannot be read.
    fn id_of(&self, event: &mut PipelineEvent) -> Result<Option<Id>, String> {
        let hash = match &self.source {
            IdSource::ClientId => event.client_id.as_ref().map(|b| hash_bytes(b's', b)),
            IdSource::Key => event.key.as_ref().map(|b| hash_bytes(b's', b)),
            IdSource::Field(path) => {
                let doc =
                    event.doc_in(self.projection.as_deref()).map_err(|e| format!("dedup by field '{path}': {e}"))?;
                get_path(doc, path).map(hash_value)
            }
        };
        Ok(hash.map(Id::of))
    }

    fn expire(&mut self) {
        let horizon = self.max_ts.saturating_sub(self.ttl_ms);
        while let Some(&(ts, id)) = self.order.front() {
            if ts >= horizon && self.order.len() <= self.max_entries {
                break;
            }
            self.order.pop_front();
            self.front += 1;
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

    fn project(&mut self, projection: &Arc<Projection>) {
        self.projection = Some(projection.clone());
    }

    fn reads(&self) -> Reads {
        match &self.source {
            IdSource::Field(path) => Reads::path(path),
            IdSource::ClientId | IdSource::Key => Reads::Nothing,
        }
    }

    fn process(&mut self, mut events: Vec<PipelineEvent>, out: &mut Outputs) -> Vec<PipelineEvent> {
        let now = flowgate_core::time::now_ms();
        // In place: the events before the first one dropped never move.
        events.retain_mut(|event| {
            let id = match self.id_of(event) {
                Ok(Some(id)) => id,
                // No id: nothing to compare; it goes on.
                Ok(None) => return true,
                Err(error) => {
                    out.dead_letters.push(DeadLetter { processor: "dedup".into(), error, event: event.take() });
                    return false;
                }
            };
            let ts = event.timestamp;
            if let Err(error) = self.event_time.check(ts, now) {
                out.bounds.event_time_out_of_bounds += 1;
                out.dead_letters.push(DeadLetter { processor: "dedup".into(), error, event: event.take() });
                return false;
            }
            self.max_ts = self.max_ts.max(ts);
            let horizon = self.max_ts.saturating_sub(self.ttl_ms);
            match self.seen.entry(id) {
                Entry::Occupied(seen) if *seen.get() >= horizon => {
                    self.dropped += 1;
                    return false;
                }
                Entry::Occupied(mut seen) => {
                    seen.insert(ts);
                }
                Entry::Vacant(slot) => {
                    slot.insert(ts);
                }
            }
            self.order.push_back((ts, id));
            true
        });
        self.expire();
        events
    }

    /// The id map (id, time and a control byte a slot) and the arrival queue.
    fn state_bytes(&self) -> usize {
        self.seen
            .capacity()
            .saturating_mul(std::mem::size_of::<(Id, i64)>() + 1)
            .saturating_add(self.order.capacity().saturating_mul(std::mem::size_of::<(i64, Id)>()))
    }

    /// Binary: max_ts i64, dropped u64, count u64, then count × (id u128, ts i64), LE:
    /// the arrival order as it is (an id seen again after expiry appears twice; restoring
    /// in order keeps the later time, as the live state does).
    fn snapshot(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24 + self.order.len() * ENTRY_LEN);
        out.extend_from_slice(&self.max_ts.to_le_bytes());
        out.extend_from_slice(&self.dropped.to_le_bytes());
        out.extend_from_slice(&(self.order.len() as u64).to_le_bytes());
        for &entry in &self.order {
            encode_entry(&mut out, entry);
        }
        out
    }

    fn attach_state_dir(&mut self, dir: std::path::PathBuf) {
        self.journal = Some(Journal::new(dir, ENTRY_LEN));
    }

    /// With a journal: the ids that arrived since the last checkpoint are appended to it
    /// (durably), and the state is the small reference to the live range.
    fn checkpoint(&mut self) -> anyhow::Result<Vec<u8>> {
        let Some(journal) = &mut self.journal else { return Ok(self.snapshot()) };
        let (order, front) = (&self.order, self.front);
        let end = front + order.len() as u64;
        let live = journal.commit(front, end, |from, out| {
            let skip = usize::try_from(from - front).expect("within the queue");
            out.reserve(order.len().saturating_sub(skip) * ENTRY_LEN);
            order.range(skip..).for_each(|&entry| encode_entry(out, entry));
        })?;
        let mut out = Vec::with_capacity(JOURNALED_LEN);
        out.extend_from_slice(JOURNALED);
        out.extend_from_slice(&self.max_ts.to_le_bytes());
        out.extend_from_slice(&self.dropped.to_le_bytes());
        live.encode(&mut out);
        Ok(out)
    }

    fn checkpoint_writes_files(&self) -> bool {
        self.journal.is_some()
    }

    fn checkpoint_stored(&mut self) {
        if let Some(journal) = &mut self.journal {
            journal.checkpoint_stored();
        }
    }

    fn restore(&mut self, state: &[u8]) -> anyhow::Result<()> {
        if state.is_empty() {
            return Ok(());
        }
        let bad = || anyhow::anyhow!("dedup state in the checkpoint is damaged (its length does not match its count)");
        let u64_at = |at: usize| -> anyhow::Result<u64> {
            Ok(u64::from_le_bytes(state.get(at..at + 8).ok_or_else(bad)?.try_into()?))
        };
        self.seen.clear();
        self.order.clear();
        if state.len() == JOURNALED_LEN && state.starts_with(JOURNALED) {
            self.max_ts = u64_at(8)? as i64;
            self.dropped = u64_at(16)?;
            let mut live = JournalRef::decode(&state[24..])?;
            let journal = self.journal.as_mut().ok_or_else(|| {
                anyhow::anyhow!("the dedup state is in a state journal, and this dedup has no state directory")
            })?;
            // Past `max_entries` the oldest would be evicted at once: never read them.
            live.first = live.first.max(live.end.saturating_sub(self.max_entries as u64));
            let (seen, order) = (&mut self.seen, &mut self.order);
            seen.reserve(usize::try_from(live.len()).unwrap_or(0).min(self.max_entries));
            journal.restore(&live, |entry| {
                let (ts, id) = decode_entry(entry);
                seen.insert(id, ts);
                order.push_back((ts, id));
            })?;
            self.front = live.first;
        } else {
            self.max_ts = u64_at(0)? as i64;
            self.dropped = u64_at(8)?;
            let n = u64_at(16)?;
            if u64::try_from(state.len() - 24).ok() != n.checked_mul(ENTRY_LEN as u64) {
                return Err(bad());
            }
            for entry in state[24..].chunks_exact(ENTRY_LEN) {
                let (ts, id) = decode_entry(entry);
                self.seen.insert(id, ts);
                self.order.push_back((ts, id));
            }
            self.front = 0;
        }
        // A lowered `max_entries` or `ttl_ms` applies at once, as it would live.
        self.expire();
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use flowgate_core::{BatchBuilder, BatchView, Codec, ProducerStamp};
    use proptest::prelude::*;

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
    fn the_state_estimate_covers_every_id_held() {
        let mut d = Dedup::new("id", 1_000_000, 1_000_000, &EventTimePolicy::default()).unwrap();
        let json: Vec<String> = (0..5000).map(|i| format!(r#"{{"id":{i}}}"#)).collect();
        let items: Vec<(i64, &str)> = json.iter().map(|j| (1, j.as_str())).collect();
        d.process(events(&items), &mut Outputs::default());
        assert_eq!(d.len(), 5000);
        assert!(d.state_bytes() >= 5000 * (24 + 1 + 24), "{}", d.state_bytes());
        assert_eq!((std::mem::size_of::<(Id, i64)>(), std::mem::size_of::<(i64, Id)>()), (24, 24), "no padding");
    }

    #[test]
    fn drops_repeats_within_the_ttl_and_lets_them_through_after() {
        let mut d = Dedup::new("id", 1000, 100, &EventTimePolicy::default()).unwrap();
        let mut out = Outputs::default();
        let mut kept = d.process(
            events(&[
                (0, r#"{"id":1}"#),
                (10, r#"{"id":2}"#),
                (20, r#"{"id":1}"#),
                (900, r#"{"id":2}"#),
                (901, r#"{"id":"1"}"#),
            ]),
            &mut out,
        );
        assert_eq!(
            ids(&mut kept),
            vec![r#"{"id":1}"#, r#"{"id":2}"#, r#"{"id":"1"}"#],
            "the string \"1\" is not the number 1"
        );
        // 1500: id 1 (seen at 0) expired; id 2 (seen at 10) too: horizon 500.
        let mut kept =
            d.process(events(&[(1500, r#"{"id":1}"#), (1510, r#"{"id":2}"#), (1520, r#"{"id":3}"#)]), &mut out);
        assert_eq!(kept.len(), 3, "{:?}", ids(&mut kept));
        assert_eq!(d.dropped, 2);
    }

    #[test]
    fn memory_is_bounded_and_state_survives_a_snapshot() {
        let mut d = Dedup::new("id", 1_000_000, 3, &EventTimePolicy::default()).unwrap();
        let mut out = Outputs::default();
        d.process(events(&[(1, r#"{"id":1}"#), (2, r#"{"id":2}"#), (3, r#"{"id":3}"#), (4, r#"{"id":4}"#)]), &mut out);
        assert_eq!(d.len(), 3);
        let mut restored = Dedup::new("id", 1_000_000, 3, &EventTimePolicy::default()).unwrap();
        restored.restore(&d.snapshot()).unwrap();
        let kept = restored.process(events(&[(5, r#"{"id":4}"#), (6, r#"{"id":1}"#)]), &mut out);
        assert_eq!(kept.len(), 1, "id 4 is remembered, id 1 was evicted");
        assert!(restored.restore(&[1, 2, 3]).is_err(), "a damaged state is refused, not misread");
    }

    #[test]
    fn an_event_stamped_in_microseconds_goes_to_the_dead_letters_and_keeps_the_ttl_horizon() {
        let mut d = Dedup::new("id", 60_000, 100, &EventTimePolicy::default()).unwrap();
        let now = flowgate_core::time::now_ms();
        let mut out = Outputs::default();
        let kept =
            d.process(events(&[(now, r#"{"id":1}"#), (now * 1000, r#"{"id":2}"#), (now + 1, r#"{"id":1}"#)]), &mut out);
        assert_eq!(kept.len(), 1, "the repeat of id 1 is still a duplicate");
        assert_eq!(out.dead_letters.len(), 1);
        assert_eq!(out.bounds.event_time_out_of_bounds, 1);
        assert!(out.dead_letters[0].error.contains("event_time.max_ahead_ms"), "{}", out.dead_letters[0].error);
    }

    #[test]
    fn events_that_are_not_json_go_to_the_dead_letters_when_the_id_is_a_field() {
        let mut d = Dedup::new("id", 60_000, 100, &EventTimePolicy::default()).unwrap();
        let mut out = Outputs::default();
        let kept = d.process(events(&[(1, "not json"), (2, r#"{"other":1}"#), (3, r#"{"id":1}"#)]), &mut out);
        assert_eq!(kept.len(), 2, "an event without the field goes on");
        assert_eq!(out.dead_letters.len(), 1);
        assert!(out.dead_letters[0].error.contains("not a JSON document"), "{}", out.dead_letters[0].error);
        assert!(Dedup::new("id", u64::MAX, 1, &EventTimePolicy::default())
            .err()
            .unwrap()
            .to_string()
            .contains("ttl_ms"));
        assert!(Dedup::new("id", 1, 0, &EventTimePolicy::default()).err().unwrap().to_string().contains("max_entries"));
    }

    #[test]
    fn the_table_hash_mixes_both_words_with_a_key_of_its_own() {
        use std::hash::BuildHasher;
        let (a, b) = (IdHashing::random(), IdHashing::random());
        let id = Id::of(0x1234_5678_9abc_def0_0fed_cba9_8765_4321);
        assert_eq!(a.hash_one(id), a.hash_one(id), "one table hashes an id alike every time");
        assert_ne!(a.hash_one(id), b.hash_one(id), "another table's key places it elsewhere");
        // Ids sharing their low word (what the table hashed before) spread over buckets.
        // Over many keys, as tables draw them: none may bunch them up.
        for _ in 0..200 {
            let table = IdHashing::random();
            let buckets: std::collections::HashSet<u64> =
                (0..1000u64).map(|high| table.hash_one(Id { low: 7, high }) & 1023).collect();
            assert!(buckets.len() > 550, "{} of 1024 buckets", buckets.len());
            let tags: std::collections::HashSet<u64> =
                (0..1000u64).map(|low| table.hash_one(Id { low, high: 7 }) >> 57).collect();
            assert!(tags.len() > 100, "{} of 128 tags", tags.len());
        }
    }

    fn numbered(ids: std::ops::Range<u64>) -> Vec<PipelineEvent> {
        let json: Vec<String> = ids.map(|i| format!(r#"{{"id":{i}}}"#)).collect();
        let items: Vec<(i64, &str)> = json.iter().map(|j| (1, j.as_str())).collect();
        events(&items)
    }

    #[test]
    fn a_journaled_checkpoint_restores_exactly_the_state_it_was_taken_of_through_compactions() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("dedup");
        let policy = EventTimePolicy { max_ahead_ms: u64::MAX, max_behind_ms: None };
        let new = || {
            let mut d = Dedup::new("id", 1_000_000, 100_000, &policy).unwrap();
            d.attach_state_dir(state_dir.clone());
            d
        };
        let mut live = new();
        let mut sizes = Vec::new();
        for step in 0..30u64 {
            live.process(numbered(step * 10_000..(step + 1) * 10_000), &mut Outputs::default());
            let state = live.checkpoint().unwrap();
            assert_eq!(state.len(), JOURNALED_LEN, "the checkpoint names the journal, it does not copy it");
            live.checkpoint_stored();
            let mut restored = new();
            restored.restore(&state).unwrap();
            assert_eq!(restored.snapshot(), live.snapshot(), "step {step}: the same ids, times and order");
            let files: Vec<_> = std::fs::read_dir(&state_dir).unwrap().collect();
            assert_eq!(files.len(), 1, "step {step}: older generations are gone once the checkpoint is stored");
            sizes.push(std::fs::metadata(files[0].as_ref().unwrap().path()).unwrap().len());
        }
        // 300,000 ids seen, 100,000 kept: compactions kept the file near the live size.
        assert!(sizes.iter().all(|&b| b <= 2 * 100_000 * 24 + 10_000 * 24), "{sizes:?}");
        assert!(sizes.windows(2).any(|w| w[1] < w[0]), "at least one compaction: {sizes:?}");
        // A restored dedup goes on where the live one is: the last 100,000 ids are
        // duplicates, an evicted one is not.
        let mut restored = new();
        restored.restore(&live.checkpoint().unwrap()).unwrap();
        assert_eq!(restored.process(numbered(250_000..250_100), &mut Outputs::default()).len(), 0);
        assert_eq!(restored.process(numbered(0..100), &mut Outputs::default()).len(), 100);
    }

    #[test]
    fn ids_journaled_after_the_last_stored_checkpoint_are_not_restored() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("dedup");
        let new = || {
            let mut d = Dedup::new("id", 1_000_000, 1_000_000, &EventTimePolicy::default()).unwrap();
            d.attach_state_dir(state_dir.clone());
            d
        };
        let mut live = new();
        live.process(numbered(0..100), &mut Outputs::default());
        let stored = live.checkpoint().unwrap();
        live.checkpoint_stored();
        let at_checkpoint = live.snapshot();
        // Written to the journal, but the process died before the checkpoint was stored.
        live.process(numbered(100..200), &mut Outputs::default());
        live.checkpoint().unwrap();
        drop(live);
        let mut restored = new();
        restored.restore(&stored).unwrap();
        assert_eq!(restored.snapshot(), at_checkpoint);
        assert_eq!(
            restored.process(numbered(150..160), &mut Outputs::default()).len(),
            10,
            "150.. were never committed"
        );
        // And the next checkpoint writes over what the dead process left.
        let next = restored.checkpoint().unwrap();
        let mut again = new();
        again.restore(&next).unwrap();
        assert_eq!(again.snapshot(), restored.snapshot());
        // An inline state (a checkpoint from before the journal) is still read.
        let mut from_inline = new();
        from_inline.restore(&at_checkpoint).unwrap();
        assert_eq!(from_inline.snapshot(), at_checkpoint);
        assert!(Dedup::new("id", 1, 1, &EventTimePolicy::default()).unwrap().restore(&next).is_err(), "no directory");
    }

    proptest! {
        #[test]
        fn any_dedup_state_round_trips_through_a_checkpoint(
            items in proptest::collection::vec((prop_oneof![any::<i64>(), Just(i64::MIN), Just(i64::MAX)], 0u8..20), 0..60),
            ttl in prop_oneof![Just(0u64), Just(10), Just(i64::MAX as u64)],
        ) {
            let anything = EventTimePolicy { max_ahead_ms: u64::MAX, max_behind_ms: None };
            let mut d = Dedup::new("id", ttl, 16, &anything).unwrap();
            let json: Vec<String> = items.iter().map(|(_, id)| format!(r#"{{"id":{id}}}"#)).collect();
            let input: Vec<(i64, &str)> = items.iter().zip(&json).map(|((t, _), j)| (*t, j.as_str())).collect();
            if !input.is_empty() {
                d.process(events(&input), &mut Outputs::default());
            }
            let bytes = d.snapshot();
            let mut restored = Dedup::new("id", ttl, 16, &anything).unwrap();
            restored.restore(&bytes).unwrap();
            prop_assert_eq!(restored.snapshot(), bytes);
            // What decides a duplicate: the ids seen within the TTL horizon (an id older
            // than it may linger in the map until its turn to expire, either way).
            let horizon = d.max_ts.saturating_sub(d.ttl_ms);
            let mut a: Vec<_> = d.seen.iter().filter(|(_, ts)| **ts >= horizon).collect();
            let mut b: Vec<_> = restored.seen.iter().filter(|(_, ts)| **ts >= horizon).collect();
            a.sort();
            b.sort();
            prop_assert_eq!(a, b);
            prop_assert_eq!((restored.max_ts, restored.dropped), (d.max_ts, d.dropped));
        }

        #[test]
        fn damaged_dedup_state_is_refused_never_misread(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let mut d = Dedup::new("id", 10, 16, &EventTimePolicy::default()).unwrap();
            if d.restore(&bytes).is_ok() {
                prop_assert!(bytes.is_empty() || (bytes.len() - 24) % 24 == 0);
            }
        }
    }
}
