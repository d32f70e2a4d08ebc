//! Event times written by clients, as flowgate reads them: numbers in a unit
//! ([`TimestampUnit`]) or RFC 3339 text, turned into milliseconds since the epoch.
//!
//! These parse untrusted text (fields of ingested events, command-line values), so they
//! never panic and never wrap: numbers are converted exactly from their decimal text (no
//! floating point, so `1700000000.123` seconds is exactly `1700000000123` ms), any
//! number of digits or exponent is bounded by the range check, and a time outside
//! [`MIN_TIMESTAMP_MS`]..=[`MAX_TIMESTAMP_MS`] is an error. Fractions of a millisecond
//! are cut off (rounded down).

use std::fmt;
use std::str::FromStr;

/// The earliest time an event may carry: 1970-01-01T00:00:00Z.
pub const MIN_TIMESTAMP_MS: i64 = 0;

/// The latest time an event may carry: 9999-12-31T23:59:59.999Z, the last instant RFC
/// 3339 can write.
pub const MAX_TIMESTAMP_MS: i64 = 253_402_300_799_999;

/// How a client writes an event time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TimestampUnit {
    /// A JSON number of milliseconds since the epoch.
    #[default]
    Ms,
    /// A JSON number of seconds since the epoch (a fraction keeps its milliseconds).
    S,
    /// A JSON number of microseconds since the epoch.
    Us,
    /// An RFC 3339 string, such as `2026-11-24T10:00:00.250+02:00`.
    Rfc3339,
}

impl TimestampUnit {
    /// The name a config or command line uses: `ms`, `s`, `us` or `rfc3339`.
    pub fn as_str(self) -> &'static str {
        match self {
            TimestampUnit::Ms => "ms",
            TimestampUnit::S => "s",
            TimestampUnit::Us => "us",
            TimestampUnit::Rfc3339 => "rfc3339",
        }
    }

    /// The power of ten that turns a number in this unit into milliseconds.
    fn exponent_to_ms(self) -> i64 {
        match self {
            TimestampUnit::S => 3,
            TimestampUnit::Us => -3,
            TimestampUnit::Ms | TimestampUnit::Rfc3339 => 0,
        }
    }
}

impl fmt::Display for TimestampUnit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A unit name that is none of `ms`, `s`, `us` (or `µs`), `rfc3339`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown timestamp unit '{0}': use ms, s, us or rfc3339")]
pub struct UnknownUnit(String);

impl FromStr for TimestampUnit {
    type Err = UnknownUnit;

    fn from_str(s: &str) -> Result<TimestampUnit, UnknownUnit> {
        match s {
            "ms" => Ok(TimestampUnit::Ms),
            "s" => Ok(TimestampUnit::S),
            "us" | "µs" => Ok(TimestampUnit::Us),
            "rfc3339" => Ok(TimestampUnit::Rfc3339),
            // Echoed in errors: cut so that a huge value cannot make a huge message.
            other => Err(UnknownUnit(other.chars().take(32).collect())),
        }
    }
}

impl serde::Serialize for TimestampUnit {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for TimestampUnit {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<TimestampUnit, D::Error> {
        struct Name;
        impl serde::de::Visitor<'_> for Name {
            type Value = TimestampUnit;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a timestamp unit: ms, s, us or rfc3339")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<TimestampUnit, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Name)
    }
}

/// Why a time was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TimestampError {
    /// Not a JSON number (for `ms`, `s`, `us`).
    #[error("not a number")]
    NotANumber,
    /// Not RFC 3339 date-time text.
    #[error("not an RFC 3339 date-time such as 2026-11-24T10:00:00Z or 2026-11-24T12:00:00.5+02:00")]
    NotRfc3339,
    /// Before [`MIN_TIMESTAMP_MS`].
    #[error("before 1970-01-01T00:00:00Z, the earliest time an event may have")]
    TooEarly,
    /// After [`MAX_TIMESTAMP_MS`].
    #[error("after 9999-12-31T23:59:59.999Z, the latest time an event may have")]
    TooLate,
}

fn in_range(ms: i64) -> Result<i64, TimestampError> {
    if ms < MIN_TIMESTAMP_MS {
        Err(TimestampError::TooEarly)
    } else if ms > MAX_TIMESTAMP_MS {
        Err(TimestampError::TooLate)
    } else {
        Ok(ms)
    }
}

/// Digits of [`MAX_TIMESTAMP_MS`]: a value with more integer digits is too late.
const MAX_DIGITS: i64 = 15;

/// Milliseconds since the epoch from the text of a JSON number (`1700000000`, `-0`,
/// `1.7e9`) in `unit` (`ms`, `s` or `us`; [`TimestampUnit::Rfc3339`] reads the number as
/// milliseconds). Exact whatever the number of digits; a fraction of a millisecond is
/// cut off.
pub fn number_to_ms(text: &str, unit: TimestampUnit) -> Result<i64, TimestampError> {
    let number = JsonNumber::parse(text.as_bytes()).ok_or(TimestampError::NotANumber)?;
    // The value is `digits × 10^exponent` ms, `digits` being the significant digits
    // (integer and fraction, leading zeros dropped).
    let significant = number.digits().skip_while(|&d| d == 0);
    let count = significant.clone().count() as i64;
    if count == 0 {
        return Ok(0); // zero, `-0` and `0.000e5` included
    }
    if number.negative {
        return Err(TimestampError::TooEarly);
    }
    let exponent = number.exponent.saturating_sub(number.fraction_len).saturating_add(unit.exponent_to_ms());
    // Digits before the decimal point of the value in ms.
    let integer_digits = count.saturating_add(exponent);
    if integer_digits > MAX_DIGITS {
        return Err(TimestampError::TooLate);
    }
    if integer_digits <= 0 {
        return Ok(0); // under a millisecond
    }
    // At most 15 digits: no overflow.
    let mut ms = 0i64;
    let mut digits = significant;
    for _ in 0..integer_digits {
        ms = ms * 10 + i64::from(digits.next().unwrap_or(0));
    }
    in_range(ms)
}

/// A JSON number's parts, borrowed from its text.
struct JsonNumber<'t> {
    negative: bool,
    integer: &'t [u8],
    fraction: &'t [u8],
    fraction_len: i64,
    /// Saturated far beyond any exponent that can matter.
    exponent: i64,
}

impl<'t> JsonNumber<'t> {
    /// Parses exactly the JSON number grammar: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`.
    fn parse(text: &'t [u8]) -> Option<JsonNumber<'t>> {
        let (negative, rest) = match text.split_first() {
            Some((b'-', rest)) => (true, rest),
            _ => (false, text),
        };
        let int_len = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        let (integer, mut rest) = rest.split_at(int_len);
        if integer.is_empty() || (integer[0] == b'0' && integer.len() > 1) {
            return None;
        }
        let mut fraction: &[u8] = &[];
        if let Some((b'.', after)) = rest.split_first() {
            let len = after.iter().take_while(|b| b.is_ascii_digit()).count();
            if len == 0 {
                return None;
            }
            (fraction, rest) = after.split_at(len);
        }
        let mut exponent = 0i64;
        if let Some((b'e' | b'E', after)) = rest.split_first() {
            let (sign, after) = match after.split_first() {
                Some((b'-', a)) => (-1, a),
                Some((b'+', a)) => (1, a),
                _ => (1, after),
            };
            let len = after.iter().take_while(|b| b.is_ascii_digit()).count();
            if len == 0 {
                return None;
            }
            let (digits, after) = after.split_at(len);
            // Past 10^12 the result is 0 or too late whatever the digits: stop growing.
            exponent = digits.iter().fold(0i64, |e, d| (e * 10 + i64::from(d - b'0')).min(1_000_000_000_000)) * sign;
            rest = after;
        }
        if !rest.is_empty() {
            return None;
        }
        Some(JsonNumber { negative, integer, fraction, fraction_len: fraction.len() as i64, exponent })
    }

    /// Every digit, integer part then fraction, as numbers.
    fn digits(&self) -> impl Iterator<Item = u8> + Clone + 't {
        self.integer.iter().chain(self.fraction).map(|d| d - b'0')
    }
}

/// Milliseconds since the epoch from RFC 3339 date-time text:
/// `YYYY-MM-DDTHH:MM:SS[.fraction](Z|+HH:MM|-HH:MM)` (`t`, `z` and a space for `T` are
/// accepted too). The date must exist (leap years included); a second of 60 (a leap
/// second) counts as the start of the next minute.
pub fn parse_rfc3339(text: &str) -> Result<i64, TimestampError> {
    rfc3339_ms(text.as_bytes()).ok_or(TimestampError::NotRfc3339).and_then(in_range)
}

fn rfc3339_ms(s: &[u8]) -> Option<i64> {
    let number = |at: usize, len: usize| -> Option<i64> {
        let digits = s.get(at..at + len)?;
        digits.iter().try_fold(0i64, |n, &d| d.is_ascii_digit().then(|| n * 10 + i64::from(d - b'0')))
    };
    let at = |i: usize, allowed: &[u8]| s.get(i).is_some_and(|c| allowed.contains(c));
    if !(at(4, b"-") && at(7, b"-") && at(10, b"Tt ") && at(13, b":") && at(16, b":")) {
        return None;
    }
    let (year, month, day) = (number(0, 4)?, number(5, 2)?, number(8, 2)?);
    let (hour, minute, second) = (number(11, 2)?, number(14, 2)?, number(17, 2)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut millis = 0i64;
    if let Some((b'.', after)) = rest.split_first() {
        let len = after.iter().take_while(|b| b.is_ascii_digit()).count();
        if len == 0 {
            return None;
        }
        // The first three digits are the milliseconds; the rest is cut off.
        millis = after[..len].iter().chain(b"00").take(3).fold(0, |n, d| n * 10 + i64::from(d - b'0'));
        rest = &after[len..];
    }
    let offset_minutes = match rest {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let digits = [*h1, *h2, *m1, *m2];
            if !digits.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let [h1, h2, m1, m2] = digits.map(|d| i64::from(d - b'0'));
            let (hours, minutes) = (h1 * 10 + h2, m1 * 10 + m2);
            if hours > 23 || minutes > 59 {
                return None;
            }
            let minutes = hours * 60 + minutes;
            if *sign == b'-' {
                -minutes
            } else {
                minutes
            }
        }
        _ => return None,
    };
    // A year has 4 digits: every product below stays far inside i64.
    let days = days_from_civil(year, month, day);
    let local = (((days * 24 + hour) * 60 + minute) * 60 + second) * 1000 + millis;
    Some(local - offset_minutes * 60_000)
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn units_are_named_as_the_config_writes_them() {
        for (name, unit) in [
            ("ms", TimestampUnit::Ms),
            ("s", TimestampUnit::S),
            ("us", TimestampUnit::Us),
            ("µs", TimestampUnit::Us),
            ("rfc3339", TimestampUnit::Rfc3339),
        ] {
            assert_eq!(name.parse::<TimestampUnit>(), Ok(unit));
        }
        let err = "seconds".parse::<TimestampUnit>().unwrap_err().to_string();
        assert!(err.contains("'seconds'") && err.contains("ms, s, us or rfc3339"), "{err}");
        assert_eq!("x".repeat(10_000).parse::<TimestampUnit>().unwrap_err().0.len(), 32);
    }

    #[test]
    fn numbers_convert_exactly_in_each_unit() {
        use TimestampUnit::*;
        assert_eq!(number_to_ms("1764547200000", Ms), Ok(1_764_547_200_000));
        assert_eq!(number_to_ms("1764547200", S), Ok(1_764_547_200_000));
        assert_eq!(number_to_ms("1764547200.123", S), Ok(1_764_547_200_123));
        // Through f64 this is 1764547200122.9998: exact decimal arithmetic is not.
        assert_eq!(number_to_ms("1764547200.1239", S), Ok(1_764_547_200_123));
        assert_eq!(number_to_ms("1764547200123456", Us), Ok(1_764_547_200_123));
        assert_eq!(number_to_ms("1.7645472e12", Ms), Ok(1_764_547_200_000));
        assert_eq!(number_to_ms("17645472E-4", S), Ok(1_764_547));
        assert_eq!(number_to_ms("0.5", Ms), Ok(0));
        assert_eq!(number_to_ms("-0", Ms), Ok(0));
        assert_eq!(number_to_ms("-0.0e999999999999999999999", S), Ok(0));
        assert_eq!(number_to_ms("1e-99999999999999999999", S), Ok(0));
        assert_eq!(number_to_ms("00001", Ms), Err(TimestampError::NotANumber));
        assert_eq!(number_to_ms(&MAX_TIMESTAMP_MS.to_string(), Ms), Ok(MAX_TIMESTAMP_MS));
        assert_eq!(number_to_ms("253402300799999.9", Ms), Ok(MAX_TIMESTAMP_MS));
        assert_eq!(number_to_ms("253402300800000", Ms), Err(TimestampError::TooLate));
        assert_eq!(number_to_ms("253402300800", S), Err(TimestampError::TooLate));
        assert_eq!(number_to_ms("1e300", Ms), Err(TimestampError::TooLate));
        assert_eq!(number_to_ms("9999999999999999999", Ms), Err(TimestampError::TooLate));
        assert_eq!(number_to_ms(&"9".repeat(100_000), Ms), Err(TimestampError::TooLate));
        assert_eq!(number_to_ms("1e99999999999999999999999", S), Err(TimestampError::TooLate));
        assert_eq!(number_to_ms("-1e30", Ms), Err(TimestampError::TooEarly));
        assert_eq!(number_to_ms("-0.001", S), Err(TimestampError::TooEarly));
        for bad in ["", "-", "1.", ".5", "1e", "1e+", "+1", "0x10", "1 ", "NaN", "Infinity", "1.2.3", "\"1\""] {
            assert_eq!(number_to_ms(bad, Ms), Err(TimestampError::NotANumber), "{bad:?}");
        }
    }

    #[test]
    fn rfc3339_with_offsets_fractions_and_leap_days() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_rfc3339("2026-11-24T10:00:00.5Z"), Ok(1_795_514_400_500));
        assert_eq!(parse_rfc3339("2026-11-24T12:00:00.5+02:00"), Ok(1_795_514_400_500));
        assert_eq!(parse_rfc3339("2026-11-24T05:30:00.5-04:30"), Ok(1_795_514_400_500));
        assert_eq!(parse_rfc3339("2026-11-24t10:00:00.123999z"), Ok(1_795_514_400_123));
        assert_eq!(parse_rfc3339("2026-11-24 10:00:00Z"), Ok(1_795_514_400_000));
        assert_eq!(parse_rfc3339("2024-02-29T00:00:00Z"), Ok(1_709_164_800_000));
        assert_eq!(parse_rfc3339("2016-12-31T23:59:60Z"), parse_rfc3339("2017-01-01T00:00:00Z"));
        assert_eq!(parse_rfc3339("9999-12-31T23:59:59.999Z"), Ok(MAX_TIMESTAMP_MS));
        assert_eq!(parse_rfc3339("9999-12-31T23:59:59-00:01"), Err(TimestampError::TooLate));
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00+00:01"), Err(TimestampError::TooEarly));
        assert_eq!(parse_rfc3339("0000-01-01T00:00:00Z"), Err(TimestampError::TooEarly));
        for bad in [
            "not a date",
            "2023-02-29T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-00-01T00:00:00Z",
            "2026-04-31T00:00:00Z",
            "2026-01-01T24:00:00Z",
            "2026-01-01T00:60:00Z",
            "2026-01-01T00:00:61Z",
            "2026-01-01T00:00:00",
            "2026-01-01T00:00:00.Z",
            "2026-01-01T00:00:00+2:00",
            "2026-01-01T00:00:00+24:00",
            "2026-01-01T00:00:00+02:60",
            "2026-01-01T00:00:00Z ",
            "+2026-01-01T00:00:00Z",
            "2026-1-01T00:00:00Z",
            "2026-01-01T00:00:0éZ",
            "",
        ] {
            assert_eq!(parse_rfc3339(bad), Err(TimestampError::NotRfc3339), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn any_text_gives_a_time_in_range_or_an_error(text in "\\PC{0,40}", unit in 0..4u8) {
            let unit = [TimestampUnit::Ms, TimestampUnit::S, TimestampUnit::Us, TimestampUnit::Rfc3339][unit as usize];
            for ms in [number_to_ms(&text, unit), parse_rfc3339(&text)].into_iter().flatten() {
                prop_assert!((MIN_TIMESTAMP_MS..=MAX_TIMESTAMP_MS).contains(&ms));
            }
        }

        #[test]
        fn numbers_agree_with_integer_arithmetic(
            seconds in 0i64..300_000_000_000,
            millis in 0i64..1000,
            extra in "[0-9]{0,6}",
            shift in -3i64..4,
        ) {
            let ms = seconds * 1000 + millis;
            let expected = |v: i64| if v > MAX_TIMESTAMP_MS { Err(TimestampError::TooLate) } else { Ok(v) };
            prop_assert_eq!(number_to_ms(&format!("{seconds}.{millis:03}{extra}"), TimestampUnit::S), expected(ms));
            prop_assert_eq!(number_to_ms(&ms.to_string(), TimestampUnit::Ms), expected(ms));
            prop_assert_eq!(number_to_ms(&format!("{ms}{millis:03}"), TimestampUnit::Us), expected(ms));
            // The same value with an exponent.
            let text = format!("{ms}e{shift}");
            let scaled = if shift >= 0 {
                i128::from(ms) * 10i128.pow(shift as u32)
            } else {
                i128::from(ms) / 10i128.pow(shift.unsigned_abs() as u32)
            };
            let scaled = if scaled > i128::from(MAX_TIMESTAMP_MS) { Err(TimestampError::TooLate) } else { Ok(scaled as i64) };
            prop_assert_eq!(number_to_ms(&text, TimestampUnit::Ms), scaled, "{}", text);
            prop_assert_eq!(number_to_ms(&format!("{seconds}.{millis:03}e3"), TimestampUnit::Ms), expected(ms));
        }

        #[test]
        fn rfc3339_agrees_with_chrono(
            year in 1970i64..=9999, month in 1i64..=12, day in 1i64..=31,
            hour in 0i64..24, minute in 0i64..60, second in 0i64..61,
            fraction in proptest::option::of("[0-9]{1,12}"),
            offset in proptest::option::of((any::<bool>(), 0i64..24, 0i64..60)),
        ) {
            let zone = match offset {
                None => "Z".to_owned(),
                Some((east, h, m)) => format!("{}{h:02}:{m:02}", if east { '+' } else { '-' }),
            };
            let fraction = fraction.map(|f| format!(".{f}")).unwrap_or_default();
            let text = format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}{fraction}{zone}");
            let theirs = chrono::DateTime::parse_from_rfc3339(&text).map(|t| t.timestamp_millis());
            match (parse_rfc3339(&text), theirs) {
                (Ok(ours), Ok(theirs)) => prop_assert_eq!(ours, theirs, "{}", text),
                (Err(TimestampError::NotRfc3339), Err(_)) => {}
                (Err(TimestampError::TooEarly), Ok(t)) => prop_assert!(t < MIN_TIMESTAMP_MS, "{}", text),
                (Err(TimestampError::TooLate), Ok(t)) => prop_assert!(t > MAX_TIMESTAMP_MS, "{}", text),
                (ours, theirs) => prop_assert!(false, "{}: ours {:?}, chrono {:?}", text, ours, theirs),
            }
        }
    }
}
