//! Column values as JSON, from the text form PostgreSQL sends them in (the replication
//! session runs with `DateStyle = ISO`, `TimeZone = UTC`, `extra_float_digits = 3`, so
//! the text forms are fixed):
//!
//! | PostgreSQL | JSON |
//! |---|---|
//! | `smallint`, `integer`, `bigint`, `oid` | number |
//! | `real`, `double precision` | number (`NaN`, `Infinity` as strings) |
//! | `numeric` | string (exact: no float rounding) |
//! | `boolean` | `true` / `false` |
//! | `json`, `jsonb` | the JSON itself, embedded |
//! | `timestamptz` | ISO 8601 string in UTC, `2024-05-01T12:00:00.5Z` |
//! | `timestamp` | ISO 8601 string without zone, `2024-05-01T12:00:00.5` |
//! | `date`, `time`, `uuid`, text types, anything else | string (the text form) |
//! | `bytea` | base64 string |
//! | arrays of the types above (and `date`, `uuid`, text types) | JSON arrays (nested for more dimensions), elements converted as their type; `NULL` elements `null` |
//! | other arrays, arrays with bounds (`[0:2]={…}`), arrays over 1 MiB of text | the text form as a string |
//! | NULL | `null` |
//! | unchanged TOAST value | the string [`UNCHANGED_TOAST`] |

use serde_json::Value;

use super::pgoutput::Datum;

/// What a column holds in an update when its value is TOASTed, did not change, and so
/// was not sent (PostgreSQL does not send it): never `null`, which would be a value.
pub const UNCHANGED_TOAST: &str = "__unchanged_toast";

/// Type OIDs of the built-in types converted specially.
mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const JSONB: u32 = 3802;
}

/// The element type of the array types converted to JSON arrays.
fn element_of(array_oid: u32) -> Option<u32> {
    Some(match array_oid {
        1000 => oid::BOOL,
        1005 => oid::INT2,
        1007 => oid::INT4,
        1016 => oid::INT8,
        1021 => oid::FLOAT4,
        1022 => oid::FLOAT8,
        1231 => 1700, // numeric
        1009 => 25,   // text
        1015 => 1043, // varchar
        1014 => 1042, // bpchar
        2951 => 2950, // uuid
        1182 => 1082, // date
        1115 => oid::TIMESTAMP,
        1185 => oid::TIMESTAMPTZ,
        199 => oid::JSON,
        3807 => oid::JSONB,
        _ => return None,
    })
}

/// Arrays longer than this as text stay text: as JSON values they would take many times
/// their text's memory.
pub const MAX_ARRAY_TEXT: usize = 1 << 20;

/// PostgreSQL allows at most 6 dimensions.
const MAX_DIMENSIONS: usize = 6;

/// An array's text form (`{1,2,NULL}`, `{{"a b","c\\"d"},{e,f}}`) as JSON, its elements
/// converted as type `element`; `None` when the text is not of that form (bounds, a
/// delimiter other than `,`, too deep), so the caller keeps the text.
pub fn array_to_json(element: u32, text: &[u8]) -> Option<Value> {
    let mut at = 0;
    let value = parse_array(element, text, &mut at, 1)?;
    (at == text.len()).then_some(value)
}

fn parse_array(element: u32, text: &[u8], at: &mut usize, depth: usize) -> Option<Value> {
    if depth > MAX_DIMENSIONS || text.get(*at) != Some(&b'{') {
        return None;
    }
    *at += 1;
    let mut items = Vec::new();
    if text.get(*at) == Some(&b'}') {
        *at += 1;
        return Some(Value::Array(items));
    }
    loop {
        match text.get(*at)? {
            b'{' => items.push(parse_array(element, text, at, depth + 1)?),
            b'"' => {
                *at += 1;
                let mut item = Vec::new();
                loop {
                    match *text.get(*at)? {
                        b'"' => break,
                        b'\\' => {
                            *at += 1;
                            item.push(*text.get(*at)?);
                        }
                        b => item.push(b),
                    }
                    *at += 1;
                }
                *at += 1;
                items.push(to_json(element, &Datum::Text(&item)));
            }
            _ => {
                let start = *at;
                while !matches!(text.get(*at)?, b',' | b'}') {
                    *at += 1;
                }
                let item = &text[start..*at];
                items.push(if item == b"NULL" { Value::Null } else { to_json(element, &Datum::Text(item)) });
            }
        }
        match text.get(*at)? {
            b',' => *at += 1,
            b'}' => {
                *at += 1;
                return Some(Value::Array(items));
            }
            _ => return None,
        }
    }
}

/// The JSON of one value of type `type_oid`.
pub fn to_json(type_oid: u32, datum: &Datum<'_>) -> Value {
    let bytes = match datum {
        Datum::Null => return Value::Null,
        Datum::UnchangedToast => return Value::String(UNCHANGED_TOAST.to_owned()),
        // Binary mode is not asked for; should a server send it anyway, the bytes go
        // through as they are.
        Datum::Binary(b) => return Value::String(base64(b)),
        Datum::Text(b) => b,
    };
    let text = String::from_utf8_lossy(bytes);
    match type_oid {
        oid::BOOL => match &*text {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            _ => Value::String(text.into_owned()),
        },
        oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => {
            text.parse::<i64>().map(Value::from).unwrap_or_else(|_| Value::String(text.into_owned()))
        }
        oid::FLOAT4 | oid::FLOAT8 => text
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(text.into_owned())),
        oid::JSON | oid::JSONB => serde_json::from_slice(bytes).unwrap_or_else(|_| Value::String(text.into_owned())),
        oid::BYTEA => match text.strip_prefix("\\x").and_then(unhex) {
            Some(raw) => Value::String(base64(&raw)),
            None => Value::String(text.into_owned()),
        },
        oid::TIMESTAMPTZ => Value::String(iso_timestamp(&text, true)),
        oid::TIMESTAMP => Value::String(iso_timestamp(&text, false)),
        array => {
            match element_of(array).filter(|_| bytes.len() <= MAX_ARRAY_TEXT).and_then(|e| array_to_json(e, bytes)) {
                Some(v) => v,
                None => Value::String(text.into_owned()),
            }
        }
    }
}

/// `2024-05-01 12:00:00.5+00` as `2024-05-01T12:00:00.5Z` (the session's zone is UTC);
/// `infinity` and other forms unchanged.
fn iso_timestamp(text: &str, zoned: bool) -> String {
    let Some((date, time)) = text.split_once(' ') else {
        return text.to_owned();
    };
    if zoned {
        if let Some(t) = time.strip_suffix("+00") {
            return format!("{date}T{t}Z");
        }
    }
    format!("{date}T{time}")
}

fn unhex(hex: &str) -> Option<Vec<u8>> {
    let hex = hex.as_bytes();
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    hex.chunks_exact(2).map(|p| Some(digit(p[0])? << 4 | digit(p[1])?)).collect()
}

/// Standard base64 with padding.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn text_forms_become_json() {
        let t = |oid, s: &'static str| to_json(oid, &Datum::Text(s.as_bytes()));
        assert_eq!(t(23, "-42"), json!(-42));
        assert_eq!(t(20, "9007199254740993"), json!(9007199254740993i64));
        assert_eq!(t(1700, "12.50"), json!("12.50"));
        assert_eq!(t(16, "t"), json!(true));
        assert_eq!(t(3802, r#"{"a": [1, 2]}"#), json!({"a": [1, 2]}));
        assert_eq!(t(1184, "2024-05-01 12:00:00.5+00"), json!("2024-05-01T12:00:00.5Z"));
        assert_eq!(t(1114, "2024-05-01 12:00:00"), json!("2024-05-01T12:00:00"));
        assert_eq!(t(1184, "infinity"), json!("infinity"));
        assert_eq!(t(17, "\\x00ff10"), json!("AP8Q"));
        assert_eq!(t(701, "NaN"), json!("NaN"));
        assert_eq!(t(1007, "{1,2}"), json!([1, 2]));
        assert_eq!(t(1009, r#"{a,"b c","x\"y\\",NULL,"NULL"}"#), json!(["a", "b c", "x\"y\\", null, "NULL"]));
        assert_eq!(t(1007, "{{1,2},{3,NULL}}"), json!([[1, 2], [3, null]]));
        assert_eq!(t(1185, r#"{"2024-05-01 12:00:00+00"}"#), json!(["2024-05-01T12:00:00Z"]));
        assert_eq!(t(3807, r#"{"{\"a\": 1}"}"#), json!([{"a": 1}]));
        assert_eq!(t(1007, "{}"), json!([]));
        // Bounds, or anything not of the plain form, stay text.
        assert_eq!(t(1007, "[0:1]={1,2}"), json!("[0:1]={1,2}"));
        assert_eq!(t(1007, "{1,2"), json!("{1,2"));
        assert_eq!(t(1007, "{{{{{{{1}}}}}}}"), json!("{{{{{{{1}}}}}}}"));
        assert_eq!(to_json(23, &Datum::Null), Value::Null);
        assert_eq!(to_json(25, &Datum::UnchangedToast), json!(UNCHANGED_TOAST));
    }

    #[test]
    fn base64_pads() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    proptest::proptest! {
        #[test]
        fn any_array_text_converts_or_stays_text_without_panicking(text in proptest::collection::vec(
            proptest::sample::select(vec![b'{', b'}', b',', b'"', b'\\', b'1', b'a', b' ', b'N']), 0..64)) {
            let _ = array_to_json(23, &text);
            let _ = to_json(1009, &Datum::Text(&text));
        }

        #[test]
        fn integer_arrays_round_trip(items in proptest::collection::vec(proptest::option::of(proptest::prelude::any::<i32>()), 0..20)) {
            let text: Vec<String> = items.iter().map(|i| i.map_or("NULL".to_owned(), |n| n.to_string())).collect();
            let text = format!("{{{}}}", text.join(","));
            let want: Vec<Value> = items.iter().map(|i| i.map_or(Value::Null, Value::from)).collect();
            proptest::prop_assert_eq!(to_json(1007, &Datum::Text(text.as_bytes())), Value::Array(want));
        }
    }
}
