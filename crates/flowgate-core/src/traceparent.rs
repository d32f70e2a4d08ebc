//! The W3C Trace Context `traceparent` value (<https://www.w3.org/TR/trace-context/>):
//! `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`.
//!
//! flowgate reads it from HTTP requests (untrusted input) and from event headers, and
//! writes it into event headers so that a pipeline reading an event continues the trace
//! the event was produced in. The parser is strict: whatever it accepts is a context a
//! trace backend accepts too, and whatever it refuses is ignored by the caller, never an
//! error for the request that carried it.

use std::fmt;

/// The header name, in HTTP requests and in event headers.
pub const HEADER: &str = "traceparent";

/// Length of a version `00` value, and of the part every later version starts with.
pub const LEN: usize = 55;

/// Longest value looked at. W3C leaves room for fields a later version may append; past
/// this a value is refused without being read further (it is untrusted input).
pub const MAX_LEN: usize = 512;

/// The sampled bit of the trace flags.
pub const FLAG_SAMPLED: u8 = 0x01;

/// A parsed `traceparent`: the trace, the span it names as parent, and the flags.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    /// The trace id (never all zero).
    pub trace_id: [u8; 16],
    /// The parent span's id (never all zero).
    pub parent_id: [u8; 8],
    /// The trace flags; bit 0 is "sampled".
    pub flags: u8,
}

/// Why a `traceparent` value was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidTraceParent {
    /// Longer than [`MAX_LEN`].
    #[error("longer than {MAX_LEN} bytes")]
    TooLong,
    /// Not 55 bytes (version 00), or shorter than 55 (a later version).
    #[error("wrong length")]
    Length,
    /// The version is not two lowercase hex digits, or is `ff`.
    #[error("bad version")]
    Version,
    /// A `-` is missing where the format has one.
    #[error("missing delimiter")]
    Delimiter,
    /// The trace id is not 32 lowercase hex digits, or is all zero.
    #[error("bad trace id")]
    TraceId,
    /// The parent id is not 16 lowercase hex digits, or is all zero.
    #[error("bad parent id")]
    ParentId,
    /// The flags are not two lowercase hex digits.
    #[error("bad flags")]
    Flags,
}

/// The value of one lowercase hex digit.
fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

/// Decodes lowercase hex into `out` (`hex` is twice as long as `out`).
fn decode_hex(hex: &[u8], out: &mut [u8]) -> Option<()> {
    for (pair, byte) in hex.chunks_exact(2).zip(out.iter_mut()) {
        *byte = (hex_digit(pair[0])? << 4) | hex_digit(pair[1])?;
    }
    Some(())
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn encode_hex(bytes: &[u8], out: &mut [u8]) {
    for (byte, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = HEX[usize::from(byte >> 4)];
        pair[1] = HEX[usize::from(byte & 0x0f)];
    }
}

impl TraceParent {
    /// Parses a value as W3C Trace Context says a receiver must: version `00` is exactly
    /// 55 bytes; a later version (`01` to `fe`) is read as version `00` and may go on
    /// after a `-`; `ff` is invalid; hex digits are lowercase; neither id is all zero.
    /// Optional whitespace around the value (HTTP's OWS) is ignored.
    pub fn parse(value: &[u8]) -> Result<TraceParent, InvalidTraceParent> {
        if value.len() > MAX_LEN {
            return Err(InvalidTraceParent::TooLong);
        }
        let value = value.trim_ascii();
        if value.len() < LEN {
            return Err(InvalidTraceParent::Length);
        }
        let mut version = [0u8; 1];
        decode_hex(&value[0..2], &mut version).ok_or(InvalidTraceParent::Version)?;
        match version[0] {
            0xff => return Err(InvalidTraceParent::Version),
            0x00 if value.len() != LEN => return Err(InvalidTraceParent::Length),
            // A later version may append fields, each after a `-`.
            _ if value.len() > LEN && value[LEN] != b'-' => return Err(InvalidTraceParent::Length),
            _ => {}
        }
        if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
            return Err(InvalidTraceParent::Delimiter);
        }
        let mut trace_id = [0u8; 16];
        decode_hex(&value[3..35], &mut trace_id).ok_or(InvalidTraceParent::TraceId)?;
        if trace_id == [0; 16] {
            return Err(InvalidTraceParent::TraceId);
        }
        let mut parent_id = [0u8; 8];
        decode_hex(&value[36..52], &mut parent_id).ok_or(InvalidTraceParent::ParentId)?;
        if parent_id == [0; 8] {
            return Err(InvalidTraceParent::ParentId);
        }
        let mut flags = [0u8; 1];
        decode_hex(&value[53..55], &mut flags).ok_or(InvalidTraceParent::Flags)?;
        Ok(TraceParent { trace_id, parent_id, flags: flags[0] })
    }

    /// Whether the producer recorded this trace (the sampled flag).
    pub fn sampled(&self) -> bool {
        self.flags & FLAG_SAMPLED != 0
    }

    /// The value as version `00` writes it (55 ASCII bytes).
    pub fn encode(&self) -> [u8; LEN] {
        let mut out = [b'-'; LEN];
        out[0..2].copy_from_slice(b"00");
        encode_hex(&self.trace_id, &mut out[3..35]);
        encode_hex(&self.parent_id, &mut out[36..52]);
        encode_hex(&[self.flags], &mut out[53..55]);
        out
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `encode` writes ASCII only.
        f.write_str(std::str::from_utf8(&self.encode()).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceParent({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_w3c_example_parses_and_encodes_back() {
        let tp = TraceParent::parse(EXAMPLE.as_bytes()).unwrap();
        assert_eq!(tp.trace_id[0], 0x4b);
        assert_eq!(tp.parent_id[7], 0xb7);
        assert!(tp.sampled());
        assert_eq!(tp.to_string(), EXAMPLE);
        assert_eq!(TraceParent::parse(format!(" {EXAMPLE}\t").as_bytes()), Ok(tp), "OWS is ignored");
    }

    #[test]
    fn invalid_values_are_refused_with_their_reason() {
        let cases: &[(&str, InvalidTraceParent)] = &[
            ("", InvalidTraceParent::Length),
            ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0", InvalidTraceParent::Length),
            ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-", InvalidTraceParent::Length),
            ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", InvalidTraceParent::Version),
            ("0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", InvalidTraceParent::Version),
            ("00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", InvalidTraceParent::Delimiter),
            ("00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01", InvalidTraceParent::Delimiter),
            ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", InvalidTraceParent::TraceId),
            ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", InvalidTraceParent::TraceId),
            ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", InvalidTraceParent::ParentId),
            ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bz-01", InvalidTraceParent::ParentId),
            ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x", InvalidTraceParent::Flags),
            ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-+1", InvalidTraceParent::Flags),
            ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x", InvalidTraceParent::Length),
        ];
        for (value, why) in cases {
            assert_eq!(TraceParent::parse(value.as_bytes()), Err(*why), "{value:?}");
        }
        assert_eq!(TraceParent::parse(&[b'0'; MAX_LEN + 1]), Err(InvalidTraceParent::TooLong));
    }

    #[test]
    fn a_later_version_is_read_as_version_00_and_may_go_on() {
        let later = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-what-comes-next";
        let tp = TraceParent::parse(later.as_bytes()).unwrap();
        assert!(!tp.sampled());
        assert_eq!(tp.to_string(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00");
        assert!(TraceParent::parse(&later.as_bytes()[..LEN]).is_ok());
    }

    fn valid() -> impl Strategy<Value = TraceParent> {
        (any::<[u8; 16]>(), any::<[u8; 8]>(), any::<u8>())
            .prop_filter("ids are not all zero", |(t, p, _)| *t != [0; 16] && *p != [0; 8])
            .prop_map(|(trace_id, parent_id, flags)| TraceParent { trace_id, parent_id, flags })
    }

    proptest! {
        #[test]
        fn every_valid_context_round_trips(tp in valid()) {
            let encoded = tp.encode();
            prop_assert_eq!(TraceParent::parse(&encoded), Ok(tp));
            let shown = tp.to_string();
            prop_assert_eq!(shown.as_bytes(), &encoded[..]);
        }

        #[test]
        fn any_input_is_answered_without_panic_and_what_is_accepted_is_well_formed(
            input in prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..600),
                // Near misses: the right alphabet and about the right length.
                "[0-9a-fA-F -]{50,60}".prop_map(String::into_bytes),
                "[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-[a-z]{0,3})?".prop_map(String::into_bytes),
            ]
        ) {
            if let Ok(tp) = TraceParent::parse(&input) {
                prop_assert!(tp.trace_id != [0; 16] && tp.parent_id != [0; 8]);
                let trimmed = input.trim_ascii();
                // What was accepted reads back as the same ids and flags.
                prop_assert_eq!(&tp.encode()[2..], &trimmed[2..LEN]);
            }
        }

        #[test]
        fn changing_any_byte_of_a_valid_value_to_a_foreign_one_is_refused(
            tp in valid(), at in 0..LEN, byte in prop_oneof![Just(b'G'), Just(b'A'), Just(b' '), Just(b'x'), Just(0u8)]
        ) {
            let mut value = tp.encode();
            value[at] = byte;
            // A space at either end is whitespace around a shorter value: too short.
            prop_assert!(TraceParent::parse(&value).is_err(), "{:?}", String::from_utf8_lossy(&value));
        }
    }
}
