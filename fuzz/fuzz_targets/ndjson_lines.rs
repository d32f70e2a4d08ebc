//! Untrusted bytes on the NDJSON port, cut into reads anywhere: the line splitter must
//! never panic, never hold more than one line's limit of a partial line, and find the
//! same events and refusals however the bytes were cut.
#![no_main]

#[path = "../../crates/flowgate-server/src/parse.rs"]
#[allow(dead_code)]
mod parse;

use libfuzzer_sys::fuzz_target;
use parse::{Line, LineSplitter};

type Seen = (Vec<Vec<u8>>, Vec<(u64, &'static str)>, u64);

/// Collects what a split hands out.
fn collect<'a>(events: &'a mut Vec<Vec<u8>>, rejects: &'a mut Vec<(u64, &'static str)>) -> impl FnMut(u64, Line<'_>) + 'a {
    move |n, line| match line {
        Line::Event(e) => events.push(e.to_vec()),
        Line::Refused(r) => rejects.push((n, r)),
    }
}

fn whole(input: &[u8], max_line: usize) -> Seen {
    let mut s = LineSplitter::new(max_line);
    let (mut events, mut rejects) = (Vec::new(), Vec::new());
    let n = s.split(input, true, collect(&mut events, &mut rejects));
    assert_eq!(n, input.len(), "at end of input everything is consumed");
    (events, rejects, s.lines)
}

fuzz_target!(|data: &[u8]| {
    // First byte: the line limit; second: the read size; the rest: what the client sends.
    let (Some(&limit), Some(&chunk)) = (data.first(), data.get(1)) else { return };
    let max_line = usize::from(limit % 64) + 1;
    let chunk = usize::from(chunk % 32) + 1;
    let input = &data[2..];
    let expected = whole(input, max_line);
    let mut s = LineSplitter::new(max_line);
    let (mut events, mut rejects, mut pending) = (Vec::new(), Vec::new(), Vec::new());
    let mut at = 0;
    loop {
        let end = (at + chunk).min(input.len());
        pending.extend_from_slice(&input[at..end]);
        at = end;
        let eof = at == input.len();
        let n = s.split(&pending, eof, collect(&mut events, &mut rejects));
        pending.drain(..n);
        assert!(pending.len() <= max_line + 1, "held {} bytes of one line", pending.len());
        if eof {
            break;
        }
    }
    assert!(pending.is_empty());
    assert_eq!((events, rejects, s.lines), expected);
});
