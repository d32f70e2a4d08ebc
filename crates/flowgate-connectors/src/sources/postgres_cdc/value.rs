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
//! | arrays | the text form (`{1,2,3}`) as a string |
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
        _ => Value::String(text.into_owned()),
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
        assert_eq!(t(1007, "{1,2}"), json!("{1,2}"));
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
}
