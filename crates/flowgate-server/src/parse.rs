//! Parsers of untrusted NDJSON lines and HTTP produce bodies. Pure functions without I/O,
//! so the listeners, property tests and fuzz targets (`fuzz/`) share exactly this code.

use serde_json::value::RawValue;

/// True when `line` is one well-formed JSON object.
pub fn is_json_object(line: &[u8]) -> bool {
    let first = line.iter().position(|b| !b.is_ascii_whitespace());
    match first {
        Some(i) if line[i] == b'{' => serde_json::from_slice::<serde::de::IgnoredAny>(line).is_ok(),
        _ => false,
    }
}

/// What one line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineVerdict {
    /// An event to store.
    Event,
    /// Blank: not an event, not an error.
    Blank,
    /// Refused; the reason is a metric label.
    Rejected(&'static str),
}

/// Judges one line (without its newline; a trailing `\r` is ignored); with `validate`
/// false, a line of any content within the limit is an event (its reader checks it).
pub fn judge_line(line: &[u8], max_line: usize, validate: bool) -> LineVerdict {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.len() > max_line {
        LineVerdict::Rejected("line_too_long")
    } else if line.iter().all(|b| b.is_ascii_whitespace()) {
        LineVerdict::Blank
    } else if !validate || is_json_object(line) {
        LineVerdict::Event
    } else {
        LineVerdict::Rejected("invalid_json")
    }
}

/// What a refusal reason means, for people.
pub fn reason_text(reason: &str) -> &'static str {
    match reason {
        "line_too_long" => "line longer than ingest.max_line_bytes",
        _ => "line is not a JSON object",
    }
}

/// One line [`LineSplitter::split`] hands out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Line<'a> {
    /// An event to store: the line without its newline or trailing `\r`.
    Event(&'a [u8]),
    /// Refused; the reason is a metric label.
    Refused(&'static str),
}

/// Splits the complete lines of NDJSON input into events, line by line, with line
/// numbers that count every line a connection sent (blank ones included) from 1.
#[derive(Debug)]
pub struct LineSplitter {
    max_line: usize,
    /// Whether lines are checked to be JSON objects.
    validate: bool,
    /// Lines completed so far.
    pub lines: u64,
    /// Inside an overlong line whose start was dropped (and already reported).
    discarding: bool,
}

impl LineSplitter {
    /// A splitter for lines of at most `max_line` bytes that refuses lines that are not
    /// JSON objects (`invalid_json`).
    pub fn new(max_line: usize) -> LineSplitter {
        LineSplitter { max_line, validate: true, lines: 0, discarding: false }
    }

    /// A splitter that hands out every non-blank line within the limit as an event, for
    /// a caller that parses each line anyway and refuses the bad ones itself (one parse
    /// per line instead of two).
    pub fn unvalidated(max_line: usize) -> LineSplitter {
        LineSplitter { validate: false, ..LineSplitter::new(max_line) }
    }

    /// True while the rest of an overlong line is being skipped.
    pub fn discarding(&self) -> bool {
        self.discarding
    }

    /// Handles every complete line in `buf` (all of it when `eof`), calling `on_line`
    /// with the line's number for each event and each refused line, in order. Returns
    /// how many bytes were consumed. A partial line longer than the limit is reported and
    /// dropped at once, and its rest skipped as it arrives, so `buf` never has to hold
    /// more than `max_line` bytes of one line.
    pub fn split<'b>(&mut self, buf: &'b [u8], eof: bool, mut on_line: impl FnMut(u64, Line<'b>)) -> usize {
        let mut start = 0usize;
        let mut judge = |line: &'b [u8], this: &mut LineSplitter| {
            this.lines = this.lines.saturating_add(1);
            if std::mem::take(&mut this.discarding) {
                return; // the tail of an overlong line, already reported
            }
            // `judge_line` ignores the one trailing `\r` that the slack for a partial line
            // allows; stripping one here too would judge a complete line by other rules.
            match judge_line(line, this.max_line, this.validate) {
                LineVerdict::Event => on_line(this.lines, Line::Event(line.strip_suffix(b"\r").unwrap_or(line))),
                LineVerdict::Blank => {}
                LineVerdict::Rejected(reason) => on_line(this.lines, Line::Refused(reason)),
            }
        };
        for nl in memchr::memchr_iter(b'\n', buf) {
            judge(&buf[start..nl], self);
            start = nl + 1;
        }
        if eof && start < buf.len() {
            // A last line without a newline is still a line.
            judge(&buf[start..], self);
            start = buf.len();
        }
        // One byte of slack: a line of exactly `max_line` bytes may still end in `\r\n`.
        if buf.len() - start > self.max_line.saturating_add(1) || (self.discarding && start < buf.len()) {
            // A line that can only be too long: report it once, keep skipping to its end.
            if !self.discarding {
                on_line(self.lines.saturating_add(1), Line::Refused("line_too_long"));
                self.discarding = true;
            }
            start = buf.len();
        }
        start
    }
}

/// Most events `input` can hold: every event is a JSON object, so starts with `{`.
pub fn max_events(input: &[u8]) -> usize {
    memchr::memchr_iter(b'{', input).count()
}

/// Most bytes the records of `events` events with `payload_bytes` bytes of payloads in
/// all take in a batch: each record adds a length, attributes and a timestamp delta (at
/// most 5 + 1 + 1 bytes, the delta being 0 or tiny for events stamped with one clock).
pub fn max_records_len(payload_bytes: usize, events: usize) -> usize {
    payload_bytes.saturating_add(events.saturating_mul(7))
}

/// Most bytes the records take when each event's own fields may set its time and copy
/// up to `copied` values out of its payload (a key, a client id: each no longer than the
/// payload it is read from), and each record may carry `per_event` bytes more (a key
/// given per request, headers). A client's time makes the timestamp delta up to 10 bytes
/// long, and each copied value adds a length of up to 5.
pub fn max_field_records_len(payload_bytes: usize, events: usize, copied: usize, per_event: usize) -> usize {
    let per_record = 9usize.saturating_add(copied.saturating_mul(5)).saturating_add(per_event);
    max_records_len(payload_bytes, events)
        .saturating_add(payload_bytes.saturating_mul(copied))
        .saturating_add(events.saturating_mul(per_record))
}

/// Hands each element of a JSON array to a callback, without collecting them; stops at
/// the first element the callback refuses, keeping its index and error.
struct ObjectsOf<'f, F, E> {
    on_event: &'f mut F,
    refused: &'f mut Option<(usize, E)>,
}

impl<'de, F: FnMut(&'de [u8]) -> Result<(), E>, E> serde::de::Visitor<'de> for ObjectsOf<'_, F, E> {
    type Value = usize;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON array of objects")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
        let mut n = 0usize;
        while let Some(raw) = seq.next_element::<&'de RawValue>()? {
            let text = raw.get().as_bytes();
            if text.first() != Some(&b'{') {
                return Err(serde::de::Error::custom(format!("element {n} is not a JSON object")));
            }
            if let Err(e) = (self.on_event)(text) {
                *self.refused = Some((n, e));
                return Err(serde::de::Error::custom("refused"));
            }
            n += 1;
        }
        Ok(n)
    }
}

/// Why a produce body was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError<E> {
    /// Not a JSON array of objects nor NDJSON objects, or no event at all; the message
    /// says where.
    Invalid(String),
    /// The event handler refused an event: `at` is `element N` (counting from 0) of an
    /// array, or `line N` (counting from 1) of NDJSON.
    Event {
        /// Which event.
        at: String,
        /// The handler's error.
        error: E,
    },
}

/// Splits a body into event payloads, a JSON array of objects or NDJSON, handing each to
/// `on_event` in order; returns how many there were. The first problem, or the first
/// event `on_event` refuses, ends the parse, and then the caller must drop what it was
/// handed: nothing is accepted from a bad body. Allocates nothing per event.
pub fn parse_body<'b, E>(
    body: &'b [u8],
    mut on_event: impl FnMut(&'b [u8]) -> Result<(), E>,
) -> Result<usize, BodyError<E>> {
    let first = body.iter().position(|b| !b.is_ascii_whitespace());
    match first {
        None => Err(BodyError::Invalid("the body holds no events".into())),
        Some(i) if body[i] == b'[' => {
            use serde::Deserializer as _;
            let mut de = serde_json::Deserializer::from_slice(body);
            let mut refused = None;
            let parsed = (&mut de)
                .deserialize_seq(ObjectsOf { on_event: &mut on_event, refused: &mut refused })
                .and_then(|n| de.end().map(|()| n));
            if let Some((n, error)) = refused {
                return Err(BodyError::Event { at: format!("element {n}"), error });
            }
            let n = parsed
                .map_err(|e| BodyError::Invalid(format!("the body is not a valid JSON array of objects: {e}")))?;
            if n == 0 {
                return Err(BodyError::Invalid("the array holds no events".into()));
            }
            Ok(n)
        }
        Some(_) => {
            let mut n = 0usize;
            for (number, line) in body.split(|&b| b == b'\n').enumerate() {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if line.iter().all(|b| b.is_ascii_whitespace()) {
                    continue;
                }
                if !is_json_object(line) {
                    return Err(BodyError::Invalid(format!("line {} is not a JSON object", number + 1)));
                }
                // From its `{`, as the array form hands events out.
                on_event(line.trim_ascii_start())
                    .map_err(|error| BodyError::Event { at: format!("line {}", number + 1), error })?;
                n += 1;
            }
            if n == 0 {
                return Err(BodyError::Invalid("the body holds no events".into()));
            }
            Ok(n)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Lines consumed, the lines, and the (line number, reason) of refused ones.
    type Split = (usize, Vec<Vec<u8>>, Vec<(u64, &'static str)>);

    fn run(splitter: &mut LineSplitter, input: &[u8], eof: bool) -> Split {
        let mut events = Vec::new();
        let mut rejects = Vec::new();
        let n = splitter.split(input, eof, |n, line| match line {
            Line::Event(e) => events.push(e.to_vec()),
            Line::Refused(r) => rejects.push((n, r)),
        });
        (n, events, rejects)
    }

    #[test]
    fn lines_are_numbered_and_judged() {
        let mut s = LineSplitter::new(20);
        let (n, events, rejects) = run(&mut s, b"{\"a\":1}\n\nnot json\r\n{\"b\":2}\r\n{\"partial\":", false);
        assert_eq!(n, 28);
        assert_eq!(events, vec![b"{\"a\":1}".to_vec(), b"{\"b\":2}".to_vec()]);
        assert_eq!(rejects, vec![(3, "invalid_json")]);
        assert_eq!(s.lines, 4);
        let (n, events, _) = run(&mut s, b"{\"partial\":3}", true);
        assert_eq!((n, events.len(), s.lines), (13, 1, 5));
    }

    #[test]
    fn only_one_trailing_cr_is_ignored_so_a_cut_line_is_judged_as_the_whole_one() {
        // Found by the ndjson_lines fuzz target: a line ending in two `\r` was an event
        // when its newline arrived in the same read and too long when it did not.
        let input = b"{}\r\r\n";
        let mut whole = LineSplitter::new(2);
        let (n, events, rejects) = run(&mut whole, input, true);
        assert_eq!((n, events.len(), rejects), (5, 0, vec![(1, "line_too_long")]));
        let mut cut = LineSplitter::new(2);
        let (n, events, rejects) = run(&mut cut, &input[..4], false);
        assert_eq!((n, events.len(), rejects), (4, 0, vec![(1, "line_too_long")]));
        let (n, events, rejects) = run(&mut cut, &input[4..], true);
        assert_eq!((n, events.len(), rejects.len(), cut.lines), (1, 0, 0, 1));
    }

    #[test]
    fn an_overlong_line_is_reported_once_with_its_number_and_skipped_as_it_arrives() {
        let mut s = LineSplitter::new(10);
        let (n, events, rejects) = run(&mut s, b"{}\n0123456789abcdefgh", false);
        assert_eq!((n, events.len()), (21, 1));
        assert_eq!(rejects, vec![(2, "line_too_long")]);
        assert!(s.discarding());
        let (n, _, rejects) = run(&mut s, b"more of it", false);
        assert_eq!((n, rejects.len()), (10, 0));
        let (n, events, rejects) = run(&mut s, b"end\n{\"c\":1}\n", false);
        assert_eq!((n, events.len(), rejects.len(), s.lines), (12, 1, 0, 3));
    }

    proptest! {
        #[test]
        fn any_split_of_the_input_gives_the_same_lines(
            lines in proptest::collection::vec(prop_oneof![
                Just("{\"ok\":1}".to_owned()), Just(String::new()), Just("nope".to_owned()),
                "[ -~]{0,40}", Just("{\"long\":\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"}".to_owned()),
            ], 0..30),
            cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..8),
        ) {
            let input = lines.iter().map(|l| format!("{l}\n")).collect::<String>().into_bytes();
            let max = 30;
            let mut whole = LineSplitter::new(max);
            let expected = run(&mut whole, &input, true);
            // Feed the same bytes in pieces, keeping unconsumed bytes as the listener does.
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(input.len() + 1)).collect();
            cuts.sort_unstable();
            cuts.push(input.len());
            let mut pieces = LineSplitter::new(max);
            let (mut events, mut rejects, mut pending, mut at) = (Vec::new(), Vec::new(), Vec::new(), 0);
            for cut in cuts {
                pending.extend_from_slice(&input[at..cut]);
                at = cut;
                let eof = at == input.len();
                let n = pieces.split(&pending, eof, |n, line| match line {
                    Line::Event(e) => events.push(e.to_vec()),
                    Line::Refused(r) => rejects.push((n, r)),
                });
                pending.drain(..n);
                prop_assert!(pending.len() <= max + 1, "held {} bytes of one line", pending.len());
            }
            prop_assert_eq!(events, expected.1);
            prop_assert_eq!(rejects, expected.2);
            prop_assert_eq!(pieces.lines, whole.lines);
            prop_assert_eq!(whole.lines, lines.len() as u64);
        }
    }

    fn parse(body: &[u8]) -> Result<Vec<&[u8]>, String> {
        let mut out = Vec::new();
        let n = parse_body(body, |e| {
            out.push(e);
            Ok::<(), std::convert::Infallible>(())
        })
        .map_err(|e| match e {
            BodyError::Invalid(message) => message,
            BodyError::Event { error, .. } => match error {},
        })?;
        assert_eq!(n, out.len());
        Ok(out)
    }

    #[test]
    fn a_refused_event_is_named_by_its_place_and_ends_the_parse() {
        let handed = std::cell::Cell::new(0);
        let mut refuse_b = |e: &[u8]| {
            handed.set(handed.get() + 1);
            if e.windows(3).any(|w| w == b"\"b\"") {
                Err("has b")
            } else {
                Ok(())
            }
        };
        let refused = |at: &str| Err(BodyError::Event { at: at.to_owned(), error: "has b" });
        assert_eq!(parse_body(br#"[{"a":1},{"b":2},{"c":3}]"#, &mut refuse_b), refused("element 1"));
        assert_eq!(parse_body(b"{\"a\":1}\n\n{\"b\":2}\n{\"c\":3}", &mut refuse_b), refused("line 3"));
        assert_eq!(handed.get(), 4, "nothing after the refused event is handed out");
        // A broken body is reported as such even when an event before the break was fine.
        assert!(matches!(parse_body(br#"[{"a":1},"#, &mut refuse_b), Err(BodyError::Invalid(_))));
    }

    #[test]
    fn bodies_are_arrays_or_ndjson_and_errors_say_where() {
        assert_eq!(parse(br#"[{"a":1}, {"b":[2]}]"#).unwrap(), vec![&br#"{"a":1}"#[..], br#"{"b":[2]}"#]);
        assert_eq!(parse(b"{\"a\":1}\n\n{\"b\":2}\r\n").unwrap().len(), 2);
        assert!(parse(b"{\"a\":1}\n{oops\n").unwrap_err().contains("line 2"));
        assert!(parse(b"[{\"a\":1}, 3]").unwrap_err().contains("element 1"));
        assert!(parse(b"[{\"a\":1}").is_err());
        assert!(parse(b"  ").is_err());
        assert!(parse(b"[]").is_err());
    }

    #[test]
    fn an_ndjson_event_is_handed_out_from_its_opening_brace() {
        // Found by the http_body fuzz target: leading blanks were part of the event.
        assert_eq!(parse(b" \t{\"a\":1}\n  {}\r\n").unwrap(), vec![&br#"{"a":1}"#[..], b"{}"]);
    }

    proptest! {
        #[test]
        fn bodies_never_panic_and_every_event_is_an_object(body in proptest::collection::vec(any::<u8>(), 0..400)) {
            if let Ok(events) = parse(&body) {
                prop_assert!(!events.is_empty());
                prop_assert!(events.len() <= max_events(&body));
                for e in events {
                    prop_assert_eq!(e.first(), Some(&b'{'), "every event is an object");
                }
            }
        }

        #[test]
        fn ndjson_bodies_parse_to_their_object_lines(lines in proptest::collection::vec(prop_oneof![Just("{\"a\":1}"), Just("{\"b\":[1,{}]}"), Just(""), Just("  ")], 1..20)) {
            let body = lines.join("\n");
            let objects: Vec<&str> = lines.iter().copied().filter(|l| !l.trim().is_empty()).collect();
            match parse(body.as_bytes()) {
                Ok(events) => prop_assert_eq!(events, objects.iter().map(|l| l.as_bytes()).collect::<Vec<_>>()),
                Err(_) => prop_assert!(objects.is_empty()),
            }
        }
    }
}
