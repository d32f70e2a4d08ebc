//! Untrusted `traceparent` values (HTTP produce requests, event headers): the W3C parser
//! must never panic, and whatever it accepts must be a well-formed context that encodes
//! back to the same ids and flags and parses again unchanged.
#![no_main]

use flowgate_core::traceparent::{TraceParent, LEN, MAX_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(tp) = TraceParent::parse(data) else { return };
    assert!(data.len() <= MAX_LEN);
    assert!(tp.trace_id != [0; 16] && tp.parent_id != [0; 8], "an all-zero id was accepted");
    let encoded = tp.encode();
    let trimmed = data.trim_ascii();
    assert_eq!(&encoded[2..], &trimmed[2..LEN], "what was read is what is written back");
    assert_eq!(TraceParent::parse(&encoded), Ok(tp));
});
