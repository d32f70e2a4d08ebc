//! Poison events: an event on which a processor panics goes to the dead-letter topic
//! instead of stopping its partition.
//!
//! A panic may leave a processor's state half-changed, so nothing is retried in the
//! worker that panicked: it dies, and its supervisor restarts it from the last
//! checkpoint (state from before the batch). The worker records which source events it
//! was processing ([`InFlight`]). After a panic, the restarted worker processes those
//! offsets one event at a time; an event that panics again on its own is poison: the
//! next restart sends it to the dead-letter topic unprocessed, once, with the panic's
//! message, and goes on; the worker checkpoints as soon as it is past the range, so no
//! restart reaches back before it.
//!
//! Only a panic that source events can be blamed for is handled this way: not one on
//! events a processor made (window results), in `tick`, or while side outputs are
//! written. After [`MAX_POISON_IN_A_ROW`] poison events with no event processed
//! successfully in between, the fault is taken to be the processor's state, not the
//! events: blaming stops, and the worker restarts with backoff and shows as failing, as
//! for any other error, rather than dead-lettering the whole stream.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;

/// Poison events in a row, with no success between, after which events are no longer
/// blamed.
pub(super) const MAX_POISON_IN_A_ROW: u32 = 5;

/// What a worker was doing with which source events, for its supervisor after a panic.
#[derive(Debug, Default)]
pub(super) struct InFlight {
    from: AtomicU64,
    /// One past the last offset; 0 while nothing is in flight.
    to: AtomicU64,
    processor: AtomicUsize,
    /// Whether the events were processed one at a time.
    alone: AtomicBool,
    /// Whether a panic now could be the events' doing (a processor is at work on source
    /// events, not writing side outputs or handling events a processor made).
    blameable: AtomicBool,
    /// Events processed one at a time without a panic.
    successes: AtomicU64,
    /// Poison events the worker sent to the dead-letter topic.
    dead_lettered: Mutex<Vec<u64>>,
}

/// A panic the events in flight can be blamed for.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Blame {
    /// The source offsets in flight.
    pub(super) range: Range<u64>,
    /// The processor at work.
    pub(super) processor: usize,
    /// Whether the events were processed one at a time.
    pub(super) alone: bool,
}

impl InFlight {
    /// The worker starts processing the source events of offsets `range`.
    pub(super) fn start(&self, range: Range<u64>, alone: bool) {
        self.from.store(range.start, Ordering::Relaxed);
        self.alone.store(alone, Ordering::Relaxed);
        self.to.store(range.end, Ordering::Release);
    }

    /// Processor `index` is at work; `blameable` when its input is the source events.
    pub(super) fn at_processor(&self, index: usize, blameable: bool) {
        self.processor.store(index, Ordering::Relaxed);
        self.blameable.store(blameable, Ordering::Relaxed);
    }

    /// Side outputs are being written: a panic now is not the events' doing.
    pub(super) fn writing_side_outputs(&self) {
        self.blameable.store(false, Ordering::Relaxed);
    }

    /// The events in flight went through every processor.
    pub(super) fn done(&self) {
        if self.alone.load(Ordering::Relaxed) {
            self.successes.fetch_add(1, Ordering::Relaxed);
        }
        self.to.store(0, Ordering::Release);
    }

    /// The worker sent poison event `offset` to the dead-letter topic.
    pub(super) fn dead_lettered(&self, offset: u64) {
        self.dead_lettered.lock().push(offset);
    }

    /// Events processed one at a time without a panic, so far.
    pub(super) fn successes(&self) -> u64 {
        self.successes.load(Ordering::Relaxed)
    }

    /// The poison events dead-lettered since the last call.
    pub(super) fn take_dead_lettered(&self) -> Vec<u64> {
        std::mem::take(&mut *self.dead_lettered.lock())
    }

    /// What the events in flight when the worker stopped can be blamed for, if anything;
    /// clears what was in flight for the next start.
    pub(super) fn take(&self) -> Option<Blame> {
        let to = self.to.swap(0, Ordering::AcqRel);
        let from = self.from.load(Ordering::Relaxed);
        (to > from && self.blameable.load(Ordering::Relaxed)).then(|| Blame {
            range: from..to,
            processor: self.processor.load(Ordering::Relaxed),
            alone: self.alone.load(Ordering::Relaxed),
        })
    }
}

/// A poison event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Poison {
    /// The processor that panicked on it.
    pub(super) processor: usize,
    /// The panic's message.
    pub(super) message: String,
    /// Whether a worker sent it to the dead-letter topic already.
    pub(super) dead_lettered: bool,
}

/// What a supervisor learned from its worker's panics, handed to each restart.
#[derive(Clone, Debug, Default)]
pub(super) struct Quarantine {
    /// Offsets to process one event at a time: a panic happened among them.
    suspect: Option<Range<u64>>,
    /// Events that panicked on their own.
    poison: BTreeMap<u64, Poison>,
    /// Poison events found with no event processed successfully since.
    in_a_row: u32,
    /// Successes seen when the last poison event was found.
    successes_then: u64,
}

/// What a supervisor learned from one panic.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Learned {
    /// Events to process one at a time next.
    Suspect,
    /// A poison event, to dead-letter next.
    Poison,
    /// Nothing new (the same batch panicked again).
    Nothing,
    /// Too many poison events in a row: the processor's state, not the events, is at
    /// fault; the event is not blamed.
    GaveUp,
}

impl Quarantine {
    /// Learns from a panic the events in flight are blamed for; `successes` is the
    /// worker's count of events processed alone without a panic.
    pub(super) fn learn(&mut self, blame: &Blame, message: &str, successes: u64) -> Learned {
        if !blame.alone {
            if self.suspect.as_ref() == Some(&blame.range) {
                return Learned::Nothing;
            }
            self.suspect = Some(blame.range.clone());
            return Learned::Suspect;
        }
        if successes > self.successes_then {
            self.in_a_row = 0;
        }
        if self.in_a_row >= MAX_POISON_IN_A_ROW {
            return Learned::GaveUp;
        }
        self.in_a_row += 1;
        self.successes_then = successes;
        let poison = Poison { processor: blame.processor, message: message.to_owned(), dead_lettered: false };
        self.poison.insert(blame.range.start, poison);
        Learned::Poison
    }

    /// Records that a worker sent poison event `offset` to the dead-letter topic.
    pub(super) fn dead_lettered(&mut self, offset: u64) {
        if let Some(p) = self.poison.get_mut(&offset) {
            p.dead_lettered = true;
        }
    }

    /// Forgets what lies before `committed`: a checkpoint counts it as done.
    pub(super) fn forget_before(&mut self, committed: u64) {
        self.poison = self.poison.split_off(&committed);
        if self.suspect.as_ref().is_some_and(|s| s.end <= committed) {
            self.suspect = None;
        }
    }

    /// Whether the events of offsets `range` must be processed one at a time.
    pub(super) fn covers(&self, range: &Range<u64>) -> bool {
        self.suspect.as_ref().is_some_and(|s| s.start < range.end && range.start < s.end)
            || self.poison.range(range.clone()).next().is_some()
    }

    /// The poison event at `offset`, if it is one.
    pub(super) fn poison(&self, offset: u64) -> Option<&Poison> {
        self.poison.get(&offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blame(range: Range<u64>, alone: bool) -> Blame {
        Blame { range, processor: 2, alone }
    }

    #[test]
    fn a_panicking_batch_is_narrowed_to_its_poison_event_and_forgotten_once_committed() {
        let in_flight = InFlight::default();
        assert_eq!(in_flight.take(), None, "nothing in flight: a plain restart");
        in_flight.start(10..20, false);
        in_flight.at_processor(2, true);
        let taken = in_flight.take().unwrap();
        assert_eq!(taken, blame(10..20, false));
        assert_eq!(in_flight.take(), None, "taken once");
        let mut q = Quarantine::default();
        assert_eq!(q.learn(&taken, "boom", 0), Learned::Suspect);
        assert_eq!(q.learn(&blame(10..20, false), "boom", 0), Learned::Nothing, "the same batch again");
        assert!(q.covers(&(15..30)) && !q.covers(&(20..30)) && !q.covers(&(0..10)));
        assert_eq!(q.learn(&blame(13..14, true), "boom", 3), Learned::Poison);
        assert_eq!(q.poison(13).map(|p| (p.processor, p.dead_lettered)), Some((2, false)));
        q.dead_lettered(13);
        assert!(q.poison(13).unwrap().dead_lettered);
        q.forget_before(14);
        assert_eq!(q.poison(13), None);
        assert!(q.covers(&(14..15)), "the rest of the batch is still processed alone");
        q.forget_before(20);
        assert!(!q.covers(&(0..100)));
    }

    #[test]
    fn a_single_event_batch_is_rerun_alone_before_it_is_called_poison() {
        let mut q = Quarantine::default();
        assert_eq!(q.learn(&blame(7..8, false), "flaky", 0), Learned::Suspect);
        assert_eq!(q.poison(7), None, "one panic in a batch of one is not proof");
        assert_eq!(q.learn(&blame(7..8, true), "flaky", 0), Learned::Poison);
    }

    #[test]
    fn panics_outside_processors_or_on_made_events_are_not_blamed_on_events() {
        let in_flight = InFlight::default();
        in_flight.start(0..5, false);
        in_flight.at_processor(1, false);
        assert_eq!(in_flight.take(), None, "a processor's input made by another processor");
        in_flight.start(0..5, false);
        in_flight.at_processor(0, true);
        in_flight.writing_side_outputs();
        assert_eq!(in_flight.take(), None, "while writing side outputs");
        in_flight.start(5..6, true);
        in_flight.at_processor(0, true);
        in_flight.done();
        assert_eq!(in_flight.successes(), 1);
        in_flight.dead_lettered(4);
        assert_eq!(in_flight.take_dead_lettered(), [4]);
        assert!(in_flight.take_dead_lettered().is_empty());
    }

    #[test]
    fn poison_at_every_event_is_the_processors_fault_not_the_events() {
        let mut q = Quarantine::default();
        for offset in 0..u64::from(MAX_POISON_IN_A_ROW) {
            assert_eq!(q.learn(&blame(offset..offset + 1, true), "corrupt", 0), Learned::Poison);
        }
        assert_eq!(q.learn(&blame(50..51, true), "corrupt", 0), Learned::GaveUp);
        assert_eq!(q.learn(&blame(60..61, true), "real poison", 1), Learned::Poison, "a success in between");
    }
}
