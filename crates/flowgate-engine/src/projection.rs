//! Parsing only what a pipeline reads. Each processor says which top-level fields of an
//! event's document it reads ([`Reads`]); when every processor of a pipeline can say
//! (none rewrites the document or reads it whole), events are parsed into documents of
//! just those fields ([`Projection`]): the others are skipped by the parser, never
//! allocated. Sinks get the stored payload, untouched, so nothing is lost by it.

use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use vrl::path::OwnedSegment;
use vrl::value::{KeyString, ObjectMap, Value};

/// What a processor reads of an event's document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reads {
    /// Nothing (it works on keys, client ids or times only).
    Nothing,
    /// These top-level fields (and anything below them).
    Fields(Vec<String>),
    /// The whole document, or it changes it.
    Everything,
}

impl Reads {
    /// The top-level field of a flowgate field path (`a.b.c` reads `a`).
    pub fn path(path: &str) -> Reads {
        Reads::Fields(vec![path.split('.').next().unwrap_or(path).to_owned()])
    }

    /// What a VRL program reads: the first segment of each path it queries on the
    /// event; the event itself (`.`), or a path that starts with an index, is all of it.
    /// `unnest` reads the whole event besides the path it is given (it returns copies
    /// of the event), and the compiler records only the path: a program that names it
    /// reads everything.
    pub fn vrl(program: &crate::expr::Vrl) -> Reads {
        let info = program.info();
        if !info.target_assignments.is_empty() || program.source().contains("unnest") {
            return Reads::Everything;
        }
        let mut fields = Vec::new();
        for query in &info.target_queries {
            if query.prefix != vrl::path::PathPrefix::Event {
                continue;
            }
            match query.path.segments.first() {
                Some(OwnedSegment::Field(name)) => fields.push(name.as_str().to_owned()),
                Some(OwnedSegment::Index(_)) | None => return Reads::Everything,
            }
        }
        if fields.is_empty() {
            Reads::Nothing
        } else {
            Reads::Fields(fields)
        }
    }

    /// What two readers read together.
    pub fn and(self, other: Reads) -> Reads {
        match (self, other) {
            (Reads::Everything, _) | (_, Reads::Everything) => Reads::Everything,
            (Reads::Nothing, r) | (r, Reads::Nothing) => r,
            (Reads::Fields(mut a), Reads::Fields(b)) => {
                a.extend(b);
                Reads::Fields(a)
            }
        }
    }
}

/// The top-level fields a pipeline reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Projection {
    fields: Vec<String>,
}

impl Projection {
    /// The fields all of `reads` read; `None` when one reads the whole document (events
    /// are parsed whole, as before) or none reads any (nothing is parsed up front).
    pub fn of(reads: impl IntoIterator<Item = Reads>) -> Option<Projection> {
        match reads.into_iter().fold(Reads::Nothing, Reads::and) {
            Reads::Fields(mut fields) => {
                fields.sort_unstable();
                fields.dedup();
                Some(Projection { fields })
            }
            Reads::Nothing | Reads::Everything => None,
        }
    }

    /// The fields, sorted.
    pub fn fields(&self) -> &[String] {
        &self.fields
    }

    fn contains(&self, key: &str) -> bool {
        // A pipeline reads a handful of fields: a scan beats hashing each key.
        self.fields.iter().any(|f| f == key)
    }

    /// `payload` as a document of the projected fields, when it is a JSON object;
    /// `None` for anything else (the caller then parses it whole, which reports what is
    /// wrong with it).
    pub fn parse(&self, payload: &[u8]) -> Option<Value> {
        let first = payload.iter().find(|b| !b.is_ascii_whitespace())?;
        if *first != b'{' {
            return None;
        }
        let mut de = serde_json::Deserializer::from_slice(payload);
        let value = ObjectSeed(self).deserialize(&mut de).ok()?;
        de.end().ok()?;
        Some(value)
    }
}

struct ObjectSeed<'p>(&'p Projection);

impl<'de> DeserializeSeed<'de> for ObjectSeed<'_> {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ObjectSeed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = ObjectMap::new();
        while let Some(key) = map.next_key_seed(KeySeed(self.0))? {
            match key {
                Some(key) => {
                    // A repeated key keeps its last value, as a whole parse does.
                    object.insert(key, map.next_value::<Value>()?);
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Value::Object(object))
    }
}

/// A key, allocated only when it is projected.
struct KeySeed<'p>(&'p Projection);

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Option<KeyString>;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for KeySeed<'_> {
    type Value = Option<KeyString>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok(self.0.contains(key).then(|| KeyString::from(key)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::get_path;
    use proptest::prelude::*;

    fn projection(fields: &[&str]) -> Projection {
        Projection::of([Reads::Fields(fields.iter().map(|f| f.to_string()).collect())]).unwrap()
    }

    #[test]
    fn only_the_projected_fields_are_parsed_and_they_are_what_a_whole_parse_gives() {
        let p = projection(&["id", "temp", "a"]);
        let payload = br#"{"id":7,"device":"s-1","temp":21.5,"a":{"b":[1,"x"]},"pad":"xxxx\u00e9","id":8}"#;
        let whole: Value = serde_json::from_slice(payload).unwrap();
        let part = p.parse(payload).unwrap();
        let Value::Object(map) = &part else { panic!("{part:?}") };
        assert_eq!(map.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["a", "id", "temp"]);
        for key in ["a", "id", "temp"] {
            assert_eq!(get_path(&part, key), get_path(&whole, key), "{key}");
        }
        assert_eq!(get_path(&part, "id"), Some(&Value::Integer(8)), "the last of a repeated key, as a whole parse");
    }

    #[test]
    fn what_is_not_an_object_or_not_json_is_left_to_the_whole_parse() {
        let p = projection(&["a"]);
        for payload in [&b"[1,2]"[..], b"7", b"not json", br#"{"a":1"#, br#"{"a":1} x"#, br#"{"b":tru}"#, b"  "] {
            assert_eq!(p.parse(payload), None, "{}", String::from_utf8_lossy(payload));
        }
        assert_eq!(p.parse(b" {\"a\":1} \n"), Some(serde_json::from_str(r#"{"a":1}"#).unwrap()));
    }

    #[test]
    fn reads_combine_and_any_whole_reader_turns_projection_off() {
        assert_eq!(Projection::of([Reads::Nothing, Reads::path("x.y")]).unwrap().fields(), ["x"]);
        assert_eq!(
            Projection::of([Reads::path("b"), Reads::path("a"), Reads::path("b")]).unwrap().fields(),
            ["a", "b"]
        );
        assert_eq!(Projection::of([Reads::path("a"), Reads::Everything]), None);
        assert_eq!(Projection::of([Reads::Nothing]), None);
        let vrl = |src: &str| Reads::vrl(&crate::expr::Vrl::compile(src).unwrap());
        assert_eq!(vrl("(to_float(.temp) ?? 0.0) > 0.0 && .a.b == 1"), Reads::Fields(vec!["temp".into(), "a".into()]));
        assert_eq!(vrl(r#"exists(."x.y")"#), Reads::Fields(vec!["x.y".into()]));
        assert_eq!(vrl("length(keys(.)) > 2"), Reads::Everything);
        assert_eq!(vrl(".x = 1"), Reads::Everything);
        assert_eq!(vrl("true"), Reads::Nothing);
        // unnest returns copies of the whole event: the compiler records only `.items`.
        assert_eq!(vrl(r#"v = unnest(.items) ?? []; length(v) > 0 && v[0].level == "error""#), Reads::Everything);
    }

    proptest! {
        #[test]
        fn a_projected_parse_agrees_with_a_whole_parse_on_every_projected_field(
            doc in proptest::collection::btree_map("[a-d]{1,2}", any::<i32>(), 0..8),
            fields in proptest::collection::vec("[a-d]{1,2}", 1..4),
        ) {
            let payload = serde_json::to_vec(&doc).unwrap();
            let whole: Value = serde_json::from_slice(&payload).unwrap();
            let p = Projection::of([Reads::Fields(fields.clone())]).unwrap();
            let part = p.parse(&payload).unwrap();
            for f in &fields {
                prop_assert_eq!(get_path(&part, f.as_str()), get_path(&whole, f.as_str()));
            }
            let Value::Object(map) = part else { panic!() };
            prop_assert!(map.keys().all(|k| fields.iter().any(|f| f == k.as_str())));
        }

        #[test]
        fn any_bytes_parse_or_are_left_alone_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = projection(&["a"]).parse(&bytes);
        }
    }
}
