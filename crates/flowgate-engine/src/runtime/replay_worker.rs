//! The worker of a replay topic (`_replay.<pipeline>`): each record re-enters the
//! pipeline where its head says ([`super::replay_record`]) — at the sink that failed it
//! (that sink alone: the processors have seen the event already, and running them again
//! would count it twice in aggregates), at the processor that failed it, or at the first
//! processor. Offsets are the replay topic's own and checkpointed like any source's.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use parking_lot::Mutex;

use super::dead_letters::{Category, FailedAt};
use super::replay_record::{ReplayHead, Resume};
use super::worker::Worker;
use crate::event::PipelineEvent;

/// What each replayed event of one replay worker replays, by its place in the replay
/// topic, from when it is read until a checkpoint passes it (by then its sinks have
/// written any dead letter of it).
#[derive(Debug)]
pub(super) struct ReplayIndex {
    topic: String,
    heads: Mutex<BTreeMap<(u32, u64), Arc<ReplayHead>>>,
}

impl ReplayIndex {
    pub(super) fn new(topic: &str) -> ReplayIndex {
        ReplayIndex { topic: topic.to_owned(), heads: Mutex::new(BTreeMap::new()) }
    }

    /// What the event at `(partition, offset)` of `topic` replays, if it is a replayed one.
    pub(super) fn get(&self, topic: &str, partition: u32, offset: u64) -> Option<Arc<ReplayHead>> {
        if topic != self.topic {
            return None;
        }
        self.heads.lock().get(&(partition, offset)).cloned()
    }

    fn insert(&self, partition: u32, offset: u64, head: Arc<ReplayHead>) {
        self.heads.lock().insert((partition, offset), head);
    }

    /// Forgets the events below a checkpoint.
    pub(super) fn forget_before(&self, offset: u64) {
        self.heads.lock().retain(|&(_, o), _| o >= offset);
    }
}

impl Worker {
    /// Routes the replay records of offsets `range`: returns the events for the sinks.
    pub(super) fn process_replay(
        &mut self,
        events: Vec<PipelineEvent>,
        range: Range<u64>,
    ) -> anyhow::Result<Vec<PipelineEvent>> {
        let Some(index) = self.replay.clone() else { return self.process(events, range) };
        // Replayed events resume at different processors, in runs as short as one event:
        // no processor spans here, which could be one per event.
        let read_span = self.read_span.take();
        let out = self.process_replayed(events, range, &index);
        self.read_span = read_span;
        out
    }

    fn process_replayed(
        &mut self,
        events: Vec<PipelineEvent>,
        range: Range<u64>,
        index: &Arc<ReplayIndex>,
    ) -> anyhow::Result<Vec<PipelineEvent>> {
        let quarantined = self.quarantine.covers(&range);
        let mut out = Vec::new();
        // Consecutive events that resume at the same processor go through together (one
        // at a time only where a panic was seen: a quarantined range); a run ends where
        // the next event resumes elsewhere, so output keeps the topic's order.
        let mut run: Vec<PipelineEvent> = Vec::new();
        let mut run_first = 0;
        for event in events {
            let (head, at) = match ReplayHead::parse(event.raw_payload()) {
                Ok(parsed) => parsed,
                Err(e) => {
                    tracing::warn!(pipeline = %self.config.name, topic = %self.topic, offset = event.offset,
                        error = %e, "skipped a record of the replay topic that is not a replay record");
                    continue;
                }
            };
            let payload = event.raw_payload().slice(at..);
            let mut replayed =
                PipelineEvent::from_parts(event.partition, event.offset, event.timestamp, event.key.clone(), payload);
            let head = Arc::new(head);
            index.insert(event.partition, event.offset, head.clone());
            let first = match &head.resume {
                Resume::Sink(name) => {
                    let bit = self
                        .config
                        .sinks
                        .iter()
                        .position(|s| &s.name == name)
                        .and_then(|i| u32::try_from(i).ok())
                        .and_then(|i| 1u64.checked_shl(i));
                    self.run_replayed(run_first, &mut run, &mut out)?;
                    match bit {
                        Some(bit) => {
                            replayed.sinks = bit;
                            out.push(replayed);
                        }
                        None => self.dead_letter_unknown_sink(name, replayed)?,
                    }
                    continue;
                }
                // A processor no longer configured: from the start.
                Resume::Processor(id) => self.processor_ids.iter().position(|p| p == id).unwrap_or(0),
                Resume::Start => 0,
            };
            if quarantined {
                if let Some(poison) = self.quarantine.poison(event.offset).cloned() {
                    if !poison.dead_lettered {
                        self.dead_letter_poison(poison.processor, replayed, &poison.message)?;
                        self.quarantine.dead_lettered(event.offset);
                        self.in_flight.dead_lettered(event.offset);
                    } else {
                        self.cover_earlier_dead_letters();
                    }
                    continue;
                }
            }
            if !quarantined {
                if first != run_first {
                    self.run_replayed(run_first, &mut run, &mut out)?;
                    run_first = first;
                }
                run.push(replayed);
                continue;
            }
            self.in_flight.start(event.offset..event.offset.saturating_add(1), true);
            out.extend(self.run_from_blaming(first, vec![replayed], true)?);
            self.in_flight.done();
        }
        self.run_replayed(run_first, &mut run, &mut out)?;
        if quarantined {
            self.commit_soon = true;
        }
        Ok(out)
    }

    /// Runs `run` (replayed events of consecutive offsets that resume at processor
    /// `first`) through the processors as one batch, its output onto `out`.
    fn run_replayed(
        &mut self,
        first: usize,
        run: &mut Vec<PipelineEvent>,
        out: &mut Vec<PipelineEvent>,
    ) -> anyhow::Result<()> {
        let (Some(head), Some(last)) = (run.first(), run.last()) else { return Ok(()) };
        self.in_flight.start(head.offset..last.offset.saturating_add(1), false);
        out.extend(self.run_from_blaming(first, std::mem::take(run), true)?);
        self.in_flight.done();
        Ok(())
    }

    /// A replayed event for a sink the pipeline no longer has goes back to the
    /// dead-letter topic, naming the entry it replays.
    fn dead_letter_unknown_sink(&mut self, sink: &str, event: PipelineEvent) -> anyhow::Result<()> {
        self.count_dead_letters(1);
        let error = "the pipeline has no sink of this name any more";
        self.dead_letter_one(FailedAt::Sink(sink), Category::Rejected, error, 0, event)
    }
}
