//! Resuming a batch whose write failed part way.
//!
//! The runtime retries a failed write with the same batch until it succeeds. A sink that
//! writes a batch in steps (the topic sink one destination partition at a time, the TCP
//! sink one request at a time, the file sink one buffered flush at a time) must not
//! repeat the steps that succeeded, or every retry duplicates them. [`Unfinished`] keeps
//! the batch a write stopped in and how far it got; the next write asks whether it is
//! handed the same batch and, if so, carries on from there.

use flowgate_engine::SinkEvent;

/// A batch whose write stopped part way, and the sink's progress through it.
#[derive(Debug)]
pub(crate) struct Unfinished<P> {
    events: Vec<SinkEvent>,
    progress: P,
}

impl<P> Unfinished<P> {
    /// Remembers `events` (their bytes are shared, not copied) with `progress`.
    pub(crate) fn new(events: &[SinkEvent], progress: P) -> Unfinished<P> {
        Unfinished { events: events.to_vec(), progress }
    }

    /// The progress, if `events` is the batch that stopped; `None` (and a log line)
    /// if the runtime moved on to another batch, which is then written whole.
    pub(crate) fn resume(self, events: &[SinkEvent], sink: &str) -> Option<P> {
        if same_events(&self.events, events) {
            Some(self.progress)
        } else {
            tracing::warn!(sink, "a write was given another batch than the one that failed; writing it whole");
            None
        }
    }
}

/// True when both hold the same events in the same order. Retries hand the very same
/// buffers back, so comparing addresses settles it almost always; contents decide when
/// addresses differ.
pub(crate) fn same_events(a: &[SinkEvent], b: &[SinkEvent]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.partition == y.partition
                && x.offset == y.offset
                && x.timestamp == y.timestamp
                && same_bytes(&x.payload, &y.payload)
                && match (&x.key, &y.key) {
                    (None, None) => true,
                    (Some(k), Some(l)) => same_bytes(k, l),
                    _ => false,
                }
        })
}

fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && (a.as_ptr() == b.as_ptr() || a == b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn event(offset: u64, payload: &str) -> SinkEvent {
        SinkEvent { partition: 0, offset, timestamp: 5, key: None, payload: Bytes::from(payload.to_owned()) }
    }

    #[test]
    fn the_same_batch_resumes_and_another_does_not() {
        let batch = vec![event(1, "a"), event(2, "b")];
        assert_eq!(Unfinished::new(&batch, 7).resume(&batch, "s"), Some(7));
        let copy: Vec<SinkEvent> =
            batch.iter().map(|e| event(e.offset, std::str::from_utf8(&e.payload).unwrap())).collect();
        assert_eq!(Unfinished::new(&batch, 7).resume(&copy, "s"), Some(7), "equal contents at other addresses");
        assert_eq!(Unfinished::new(&batch, 7).resume(&[event(1, "a"), event(2, "c")], "s"), None);
        assert_eq!(Unfinished::new(&batch, 7).resume(&batch[..1], "s"), None);
        let mut keyed = batch.clone();
        keyed[0].key = Some(Bytes::from_static(b"k"));
        assert_eq!(Unfinished::new(&batch, 7).resume(&keyed, "s"), None);
    }
}
