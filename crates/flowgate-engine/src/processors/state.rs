//! The binary encoding of processor state in checkpoints: little-endian integers, floats
//! as their IEEE-754 bits (so infinities, NaN and -0.0 come back exactly), and
//! length-prefixed bytes. JSON cannot carry a non-finite float, which is why state is
//! not JSON.
//!
//! A checkpoint is read back from disk, so [`StateReader`] trusts nothing: every read is
//! bounds-checked, a length is checked against the bytes that remain before anything is
//! allocated for it, and nesting is limited so that crafted input cannot exhaust the
//! stack.

use bytes::Bytes;
use vrl::value::{KeyString, ObjectMap, Value};

/// Why processor state could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StateError(
    /// What is wrong, and where.
    pub String,
);

/// Deepest nesting of arrays and objects a state value may have.
const MAX_DEPTH: usize = 128;

const VALUE_NULL: u8 = 0;
const VALUE_FALSE: u8 = 1;
const VALUE_TRUE: u8 = 2;
const VALUE_INTEGER: u8 = 3;
const VALUE_FLOAT: u8 = 4;
const VALUE_BYTES: u8 = 5;
const VALUE_ARRAY: u8 = 6;
const VALUE_OBJECT: u8 = 7;

/// Appends state to a buffer.
#[derive(Debug, Default)]
pub struct StateWriter {
    out: Vec<u8>,
}

impl StateWriter {
    /// An empty writer.
    pub fn new() -> StateWriter {
        StateWriter::default()
    }

    /// The encoded bytes.
    pub fn finish(self) -> Vec<u8> {
        self.out
    }

    /// Appends bytes as they are (magic numbers).
    pub fn raw(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    /// Appends a byte.
    pub fn u8(&mut self, v: u8) {
        self.out.push(v);
    }

    /// Appends a u32.
    pub fn u32(&mut self, v: u32) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    /// Appends a u64.
    pub fn u64(&mut self, v: u64) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    /// Appends an i32.
    pub fn i32(&mut self, v: i32) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    /// Appends an i64.
    pub fn i64(&mut self, v: i64) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    /// Appends a float by its bits: every value, NaN and infinities included, comes back.
    pub fn f64(&mut self, v: f64) {
        self.u64(v.to_bits());
    }

    /// Appends a length (as u64).
    pub fn len(&mut self, n: usize) {
        self.u64(n as u64);
    }

    /// Appends length-prefixed bytes.
    pub fn bytes(&mut self, b: &[u8]) {
        self.len(b.len());
        self.raw(b);
    }

    /// Appends a document value. Timestamps and regexes are kept as the text they are
    /// emitted as in JSON (the form every sink sees them in).
    pub fn value(&mut self, v: &Value) {
        match v {
            Value::Null => self.u8(VALUE_NULL),
            Value::Boolean(false) => self.u8(VALUE_FALSE),
            Value::Boolean(true) => self.u8(VALUE_TRUE),
            Value::Integer(i) => {
                self.u8(VALUE_INTEGER);
                self.i64(*i);
            }
            Value::Float(f) => {
                self.u8(VALUE_FLOAT);
                self.f64(f.into_inner());
            }
            Value::Bytes(b) => {
                self.u8(VALUE_BYTES);
                self.bytes(b);
            }
            Value::String(s) => {
                self.u8(VALUE_BYTES);
                self.bytes(AsRef::<[u8]>::as_ref(s));
            }
            Value::Timestamp(_) | Value::Regex(_) => {
                // Both serialize as a JSON string; its text is what sinks see.
                let text = match serde_json::to_value(v) {
                    Ok(serde_json::Value::String(text)) => text,
                    _ => crate::event::to_json(v),
                };
                self.u8(VALUE_BYTES);
                self.bytes(text.as_bytes());
            }
            Value::Array(items) => {
                self.u8(VALUE_ARRAY);
                self.len(items.len());
                for item in items {
                    self.value(item);
                }
            }
            Value::Object(map) => {
                self.u8(VALUE_OBJECT);
                self.len(map.len());
                for (k, item) in map {
                    self.bytes(k.as_str().as_bytes());
                    self.value(item);
                }
            }
        }
    }
}

/// Reads state back, checking every length against what is there.
#[derive(Debug)]
pub struct StateReader<'a> {
    rest: &'a [u8],
}

impl<'a> StateReader<'a> {
    /// A reader over `bytes`.
    pub fn new(bytes: &'a [u8]) -> StateReader<'a> {
        StateReader { rest: bytes }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], StateError> {
        if self.rest.len() < n {
            return Err(StateError(format!("truncated in {what}")));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], StateError> {
        Ok(self.take(N, what)?.try_into().expect("took N bytes"))
    }

    /// Expects exactly these bytes next.
    pub fn expect_raw(&mut self, bytes: &[u8], what: &str) -> Result<(), StateError> {
        if self.take(bytes.len(), what)? != bytes {
            return Err(StateError(format!("{what} is not what this version writes")));
        }
        Ok(())
    }

    /// Reads a byte.
    pub fn u8(&mut self, what: &str) -> Result<u8, StateError> {
        Ok(self.take(1, what)?[0])
    }

    /// Reads a u32.
    pub fn u32(&mut self, what: &str) -> Result<u32, StateError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    /// Reads a u64.
    pub fn u64(&mut self, what: &str) -> Result<u64, StateError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Reads an i32.
    pub fn i32(&mut self, what: &str) -> Result<i32, StateError> {
        Ok(i32::from_le_bytes(self.array(what)?))
    }

    /// Reads an i64.
    pub fn i64(&mut self, what: &str) -> Result<i64, StateError> {
        Ok(i64::from_le_bytes(self.array(what)?))
    }

    /// Reads a float from its bits.
    pub fn f64(&mut self, what: &str) -> Result<f64, StateError> {
        Ok(f64::from_bits(self.u64(what)?))
    }

    /// Reads a count of items each at least `min_item_bytes` long, refusing one that
    /// the remaining bytes cannot hold (so no allocation is sized by a damaged length).
    pub fn len(&mut self, min_item_bytes: usize, what: &str) -> Result<usize, StateError> {
        let n = self.u64(what)?;
        let fits = usize::try_from(n)
            .ok()
            .and_then(|n| n.checked_mul(min_item_bytes.max(1)))
            .is_some_and(|total| total <= self.rest.len());
        if !fits {
            return Err(StateError(format!("{what} claims {n} items, more than the {} bytes left", self.rest.len())));
        }
        Ok(n as usize)
    }

    /// Reads length-prefixed bytes.
    pub fn bytes(&mut self, what: &str) -> Result<&'a [u8], StateError> {
        let n = self.len(1, what)?;
        self.take(n, what)
    }

    /// Reads length-prefixed UTF-8 text.
    pub fn str(&mut self, what: &str) -> Result<&'a str, StateError> {
        std::str::from_utf8(self.bytes(what)?).map_err(|_| StateError(format!("{what} is not UTF-8")))
    }

    /// Reads a document value.
    pub fn value(&mut self, what: &str) -> Result<Value, StateError> {
        self.value_at(what, 0)
    }

    fn value_at(&mut self, what: &str, depth: usize) -> Result<Value, StateError> {
        if depth > MAX_DEPTH {
            return Err(StateError(format!("{what} nests deeper than {MAX_DEPTH}")));
        }
        Ok(match self.u8(what)? {
            VALUE_NULL => Value::Null,
            VALUE_FALSE => Value::Boolean(false),
            VALUE_TRUE => Value::Boolean(true),
            VALUE_INTEGER => Value::Integer(self.i64(what)?),
            VALUE_FLOAT => {
                let f = self.f64(what)?;
                if f.is_nan() {
                    return Err(StateError(format!("{what} holds a NaN document value")));
                }
                Value::from_f64_or_zero(f)
            }
            VALUE_BYTES => Value::Bytes(Bytes::copy_from_slice(self.bytes(what)?)),
            VALUE_ARRAY => {
                let n = self.len(1, what)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value_at(what, depth + 1)?);
                }
                Value::Array(items)
            }
            VALUE_OBJECT => {
                // A key is at least its 8-byte length, its value at least a tag.
                let n = self.len(9, what)?;
                let mut map = ObjectMap::new();
                for _ in 0..n {
                    let key = KeyString::from(self.str(what)?);
                    let item = self.value_at(what, depth + 1)?;
                    map.insert(key, item);
                }
                Value::Object(map)
            }
            tag => return Err(StateError(format!("{what} has an unknown value tag {tag}"))),
        })
    }

    /// Checks that nothing is left over.
    pub fn finish(self, what: &str) -> Result<(), StateError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(StateError(format!("{} bytes after the end of {what}", self.rest.len())))
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Any document value a processor can hold (no NaN: a document cannot hold one).
    pub(crate) fn any_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Boolean),
            any::<i64>().prop_map(Value::Integer),
            any::<f64>().prop_filter("documents hold no NaN", |f| !f.is_nan()).prop_map(Value::from_f64_or_zero),
            Just(Value::from_f64_or_zero(f64::INFINITY)),
            proptest::collection::vec(any::<u8>(), 0..20).prop_map(|b| Value::Bytes(b.into())),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map("[a-z]{0,4}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (KeyString::from(k), v)).collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn values_round_trip_exactly(v in any_value()) {
            let mut w = StateWriter::new();
            w.value(&v);
            let bytes = w.finish();
            let mut r = StateReader::new(&bytes);
            let back = r.value("value").unwrap();
            r.finish("value").unwrap();
            prop_assert_eq!(format!("{back:?}"), format!("{v:?}"));
        }

        #[test]
        fn damaged_values_are_refused_not_misread(v in any_value(), cut in any::<prop::sample::Index>()) {
            let mut w = StateWriter::new();
            w.value(&v);
            let bytes = w.finish();
            let cut = cut.index(bytes.len());
            let mut r = StateReader::new(&bytes[..cut]);
            prop_assert!(r.value("value").is_err(), "a truncated value must not decode");
        }
    }

    #[test]
    fn a_huge_length_is_refused_before_allocating() {
        let mut w = StateWriter::new();
        w.u8(VALUE_ARRAY);
        w.u64(u64::MAX);
        let bytes = w.finish();
        assert!(StateReader::new(&bytes).value("v").is_err());
        let deep = [VALUE_ARRAY, 1, 0, 0, 0, 0, 0, 0, 0].repeat(10_000);
        assert!(StateReader::new(&deep).value("v").unwrap_err().0.contains("deeper"));
    }
}
