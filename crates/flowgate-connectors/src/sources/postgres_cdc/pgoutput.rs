//! A decoder of PostgreSQL's `pgoutput` logical replication messages (protocol version
//! 1): the bytes of each `XLogData` a replication stream carries.
//!
//! The bytes come from the network and are not trusted: every read is bounds checked,
//! every count is checked against the bytes left before anything is allocated for it,
//! and a malformed message is an [`Error`], never a panic. Values are borrowed from the
//! message; nothing is copied but the names of a relation.
//!
//! Self-contained (std only): the fuzz target in `fuzz/` includes this file as it is.

use std::fmt;

/// Why a message could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// The message ended before a field (`what`) it must hold.
    Truncated(&'static str),
    /// A message type byte this decoder does not know.
    UnknownMessage(u8),
    /// A column's kind byte is not `n`, `u`, `t` or `b`.
    BadColumnKind(u8),
    /// A tuple marker was not the one the message type allows.
    BadTupleMarker(u8),
    /// A count or length is negative or larger than the bytes that follow.
    BadLength(&'static str, i64),
    /// A name is not terminated by a NUL byte, or is not UTF-8.
    BadString(&'static str),
    /// Bytes are left after the message's last field.
    TrailingBytes(usize),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Truncated(what) => write!(f, "pgoutput message ends before its {what}"),
            Error::UnknownMessage(b) => write!(f, "unknown pgoutput message type {:?}", char::from(*b)),
            Error::BadColumnKind(b) => write!(f, "unknown pgoutput column kind {:?}", char::from(*b)),
            Error::BadTupleMarker(b) => write!(f, "unexpected pgoutput tuple marker {:?}", char::from(*b)),
            Error::BadLength(what, n) => write!(f, "pgoutput {what} {n} is negative or longer than the message"),
            Error::BadString(what) => write!(f, "pgoutput {what} is not a NUL-terminated UTF-8 string"),
            Error::TrailingBytes(n) => write!(f, "{n} bytes follow the end of a pgoutput message"),
        }
    }
}

impl std::error::Error for Error {}

/// One column value of a tuple.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Datum<'a> {
    /// SQL NULL (`n`).
    Null,
    /// A TOASTed value that did not change and was not sent (`u`).
    UnchangedToast,
    /// The value in the type's text output form (`t`).
    Text(&'a [u8]),
    /// The value in the type's binary form (`b`; only when binary mode is asked for).
    Binary(&'a [u8]),
}

/// A column of a relation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    /// Part of the replica identity (the key), by the column's flags.
    pub key: bool,
    /// The column's name.
    pub name: String,
    /// The OID of its type.
    pub type_oid: u32,
    /// Its type modifier.
    pub type_modifier: i32,
}

/// A relation (table) as the stream describes it before its first change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relation {
    /// The relation's OID, which change messages name.
    pub oid: u32,
    /// Its schema (`public`, …).
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// The replica identity setting: `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    /// The columns, in the order tuples list them.
    pub columns: Vec<Column>,
}

/// The old values an update or delete carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Old<'a> {
    /// Only the replica identity key columns (`K`; the others are null).
    Key(Vec<Datum<'a>>),
    /// The whole old row (`O`; with `REPLICA IDENTITY FULL`).
    Row(Vec<Datum<'a>>),
}

impl<'a> Old<'a> {
    /// The values, whichever kind.
    pub fn values(&self) -> &[Datum<'a>] {
        match self {
            Old::Key(v) | Old::Row(v) => v,
        }
    }
}

/// One decoded message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// `B`: a transaction starts.
    Begin {
        /// The LSN of its commit record.
        final_lsn: u64,
        /// Commit time, microseconds since 2000-01-01.
        commit_ts: i64,
        /// Transaction id.
        xid: u32,
    },
    /// `C`: the transaction committed.
    Commit {
        /// Flags (unused, 0).
        flags: u8,
        /// The LSN of the commit record.
        commit_lsn: u64,
        /// The LSN just past it: what a client confirms.
        end_lsn: u64,
        /// Commit time, microseconds since 2000-01-01.
        commit_ts: i64,
    },
    /// `O`: the changes come from another origin.
    Origin {
        /// The LSN of the commit on the origin.
        lsn: u64,
        /// The origin's name.
        name: &'a str,
    },
    /// `R`: a relation's description.
    Relation(Relation),
    /// `Y`: a type's name.
    Type {
        /// The type's OID.
        oid: u32,
        /// Its schema.
        namespace: &'a str,
        /// Its name.
        name: &'a str,
    },
    /// `I`: a row was inserted.
    Insert {
        /// The relation.
        relation: u32,
        /// The new row.
        new: Vec<Datum<'a>>,
    },
    /// `U`: a row was updated.
    Update {
        /// The relation.
        relation: u32,
        /// The old key or row, when the replica identity sends one.
        old: Option<Old<'a>>,
        /// The new row.
        new: Vec<Datum<'a>>,
    },
    /// `D`: a row was deleted.
    Delete {
        /// The relation.
        relation: u32,
        /// The old key or row.
        old: Old<'a>,
    },
    /// `T`: relations were truncated.
    Truncate {
        /// Option bits: 1 `CASCADE`, 2 `RESTART IDENTITY`.
        options: u8,
        /// The relations.
        relations: Vec<u32>,
    },
    /// `M`: a logical decoding message (`pg_logical_emit_message`).
    LogicalMessage {
        /// 1 when transactional.
        flags: u8,
        /// Its LSN.
        lsn: u64,
        /// Its prefix.
        prefix: &'a str,
        /// Its content.
        content: &'a [u8],
    },
}

/// A reader over one message's bytes.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Error> {
        if self.bytes.len() < n {
            return Err(Error::Truncated(what));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, Error> {
        Ok(self.take(1, what)?[0])
    }

    fn i16(&mut self, what: &'static str) -> Result<i16, Error> {
        let b = self.take(2, what)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, Error> {
        let b = self.take(4, what)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, Error> {
        Ok(self.i32(what)? as u32)
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, Error> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(i64::from_be_bytes(a))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, Error> {
        Ok(self.i64(what)? as u64)
    }

    fn string(&mut self, what: &'static str) -> Result<&'a str, Error> {
        let end = self.bytes.iter().position(|&b| b == 0).ok_or(Error::BadString(what))?;
        let s = std::str::from_utf8(&self.bytes[..end]).map_err(|_| Error::BadString(what))?;
        self.bytes = &self.bytes[end + 1..];
        Ok(s)
    }

    /// A count whose every item takes at least `min_item` bytes of what is left: refused
    /// before anything is allocated when the bytes cannot hold it.
    fn count(&mut self, n: i64, min_item: usize, what: &'static str) -> Result<usize, Error> {
        let fits = usize::try_from(n).ok().filter(|&n| n.checked_mul(min_item).is_some_and(|b| b <= self.bytes.len()));
        fits.ok_or(Error::BadLength(what, n))
    }

    fn tuple(&mut self) -> Result<Vec<Datum<'a>>, Error> {
        let n = i64::from(self.i16("column count")?);
        let n = self.count(n, 1, "column count")?;
        let mut values = Vec::with_capacity(n);
        for _ in 0..n {
            let value = match self.u8("column kind")? {
                b'n' => Datum::Null,
                b'u' => Datum::UnchangedToast,
                kind @ (b't' | b'b') => {
                    let len = i64::from(self.i32("value length")?);
                    let len = self.count(len, 1, "value length")?;
                    let bytes = self.take(len, "value")?;
                    if kind == b't' {
                        Datum::Text(bytes)
                    } else {
                        Datum::Binary(bytes)
                    }
                }
                other => return Err(Error::BadColumnKind(other)),
            };
            values.push(value);
        }
        Ok(values)
    }

    fn finish(&self) -> Result<(), Error> {
        match self.bytes.len() {
            0 => Ok(()),
            n => Err(Error::TrailingBytes(n)),
        }
    }
}

/// Decodes one message (the whole payload of one `XLogData`).
pub fn decode(bytes: &[u8]) -> Result<Message<'_>, Error> {
    let mut r = Reader { bytes };
    let message = match r.u8("message type")? {
        b'B' => Message::Begin {
            final_lsn: r.u64("final LSN")?,
            commit_ts: r.i64("commit time")?,
            xid: r.u32("transaction id")?,
        },
        b'C' => Message::Commit {
            flags: r.u8("flags")?,
            commit_lsn: r.u64("commit LSN")?,
            end_lsn: r.u64("end LSN")?,
            commit_ts: r.i64("commit time")?,
        },
        b'O' => Message::Origin { lsn: r.u64("origin LSN")?, name: r.string("origin name")? },
        b'R' => {
            let oid = r.u32("relation OID")?;
            let namespace = r.string("namespace")?.to_owned();
            let name = r.string("relation name")?.to_owned();
            let replica_identity = r.u8("replica identity")?;
            let n = i64::from(r.i16("column count")?);
            // flags, an empty name's NUL, type OID and modifier: 10 bytes at least.
            let n = r.count(n, 10, "column count")?;
            let mut columns = Vec::with_capacity(n);
            for _ in 0..n {
                let flags = r.u8("column flags")?;
                let name = r.string("column name")?.to_owned();
                let type_oid = r.u32("column type")?;
                let type_modifier = r.i32("column type modifier")?;
                columns.push(Column { key: flags & 1 == 1, name, type_oid, type_modifier });
            }
            Message::Relation(Relation { oid, namespace, name, replica_identity, columns })
        }
        b'Y' => {
            Message::Type { oid: r.u32("type OID")?, namespace: r.string("namespace")?, name: r.string("type name")? }
        }
        b'I' => {
            let relation = r.u32("relation OID")?;
            match r.u8("tuple marker")? {
                b'N' => Message::Insert { relation, new: r.tuple()? },
                other => return Err(Error::BadTupleMarker(other)),
            }
        }
        b'U' => {
            let relation = r.u32("relation OID")?;
            let (old, marker) = match r.u8("tuple marker")? {
                b'K' => (Some(Old::Key(r.tuple()?)), r.u8("tuple marker")?),
                b'O' => (Some(Old::Row(r.tuple()?)), r.u8("tuple marker")?),
                other => (None, other),
            };
            if marker != b'N' {
                return Err(Error::BadTupleMarker(marker));
            }
            Message::Update { relation, old, new: r.tuple()? }
        }
        b'D' => {
            let relation = r.u32("relation OID")?;
            let old = match r.u8("tuple marker")? {
                b'K' => Old::Key(r.tuple()?),
                b'O' => Old::Row(r.tuple()?),
                other => return Err(Error::BadTupleMarker(other)),
            };
            Message::Delete { relation, old }
        }
        b'T' => {
            let n = i64::from(r.i32("relation count")?);
            let options = r.u8("truncate options")?;
            let n = r.count(n, 4, "relation count")?;
            let mut relations = Vec::with_capacity(n);
            for _ in 0..n {
                relations.push(r.u32("relation OID")?);
            }
            Message::Truncate { options, relations }
        }
        b'M' => {
            let flags = r.u8("flags")?;
            let lsn = r.u64("message LSN")?;
            let prefix = r.string("message prefix")?;
            let len = i64::from(r.i32("content length")?);
            let len = r.count(len, 1, "content length")?;
            Message::LogicalMessage { flags, lsn, prefix, content: r.take(len, "content")? }
        }
        other => return Err(Error::UnknownMessage(other)),
    };
    r.finish()?;
    Ok(message)
}

/// Encodes a message as PostgreSQL does (for tests and the fuzz target's round trip).
pub fn encode(message: &Message<'_>, out: &mut Vec<u8>) {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }
    fn tuple(out: &mut Vec<u8>, values: &[Datum<'_>]) {
        out.extend_from_slice(&(values.len() as i16).to_be_bytes());
        for v in values {
            match v {
                Datum::Null => out.push(b'n'),
                Datum::UnchangedToast => out.push(b'u'),
                Datum::Text(b) | Datum::Binary(b) => {
                    out.push(if matches!(v, Datum::Text(_)) { b't' } else { b'b' });
                    out.extend_from_slice(&(b.len() as i32).to_be_bytes());
                    out.extend_from_slice(b);
                }
            }
        }
    }
    match message {
        Message::Begin { final_lsn, commit_ts, xid } => {
            out.push(b'B');
            out.extend_from_slice(&final_lsn.to_be_bytes());
            out.extend_from_slice(&commit_ts.to_be_bytes());
            out.extend_from_slice(&xid.to_be_bytes());
        }
        Message::Commit { flags, commit_lsn, end_lsn, commit_ts } => {
            out.push(b'C');
            out.push(*flags);
            out.extend_from_slice(&commit_lsn.to_be_bytes());
            out.extend_from_slice(&end_lsn.to_be_bytes());
            out.extend_from_slice(&commit_ts.to_be_bytes());
        }
        Message::Origin { lsn, name } => {
            out.push(b'O');
            out.extend_from_slice(&lsn.to_be_bytes());
            string(out, name);
        }
        Message::Relation(r) => {
            out.push(b'R');
            out.extend_from_slice(&r.oid.to_be_bytes());
            string(out, &r.namespace);
            string(out, &r.name);
            out.push(r.replica_identity);
            out.extend_from_slice(&(r.columns.len() as i16).to_be_bytes());
            for c in &r.columns {
                out.push(u8::from(c.key));
                string(out, &c.name);
                out.extend_from_slice(&c.type_oid.to_be_bytes());
                out.extend_from_slice(&c.type_modifier.to_be_bytes());
            }
        }
        Message::Type { oid, namespace, name } => {
            out.push(b'Y');
            out.extend_from_slice(&oid.to_be_bytes());
            string(out, namespace);
            string(out, name);
        }
        Message::Insert { relation, new } => {
            out.push(b'I');
            out.extend_from_slice(&relation.to_be_bytes());
            out.push(b'N');
            tuple(out, new);
        }
        Message::Update { relation, old, new } => {
            out.push(b'U');
            out.extend_from_slice(&relation.to_be_bytes());
            match old {
                Some(Old::Key(v)) => {
                    out.push(b'K');
                    tuple(out, v);
                }
                Some(Old::Row(v)) => {
                    out.push(b'O');
                    tuple(out, v);
                }
                None => {}
            }
            out.push(b'N');
            tuple(out, new);
        }
        Message::Delete { relation, old } => {
            out.push(b'D');
            out.extend_from_slice(&relation.to_be_bytes());
            out.push(if matches!(old, Old::Key(_)) { b'K' } else { b'O' });
            tuple(out, old.values());
        }
        Message::Truncate { options, relations } => {
            out.push(b'T');
            out.extend_from_slice(&(relations.len() as i32).to_be_bytes());
            out.push(*options);
            for r in relations {
                out.extend_from_slice(&r.to_be_bytes());
            }
        }
        Message::LogicalMessage { flags, lsn, prefix, content } => {
            out.push(b'M');
            out.push(*flags);
            out.extend_from_slice(&lsn.to_be_bytes());
            string(out, prefix);
            out.extend_from_slice(&(content.len() as i32).to_be_bytes());
            out.extend_from_slice(content);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn datum() -> impl Strategy<Value = (u8, Vec<u8>)> {
        (0u8..4, proptest::collection::vec(any::<u8>(), 0..16))
    }

    fn to_datum(d: &(u8, Vec<u8>)) -> Datum<'_> {
        match d.0 {
            0 => Datum::Null,
            1 => Datum::UnchangedToast,
            2 => Datum::Text(&d.1),
            _ => Datum::Binary(&d.1),
        }
    }

    #[test]
    fn a_relation_and_its_changes_decode() {
        let rel = Relation {
            oid: 16384,
            namespace: "public".into(),
            name: "orders".into(),
            replica_identity: b'd',
            columns: vec![
                Column { key: true, name: "id".into(), type_oid: 23, type_modifier: -1 },
                Column { key: false, name: "note".into(), type_oid: 25, type_modifier: -1 },
            ],
        };
        let messages = [
            Message::Relation(rel),
            Message::Insert { relation: 16384, new: vec![Datum::Text(b"1"), Datum::Null] },
            Message::Update {
                relation: 16384,
                old: Some(Old::Key(vec![Datum::Text(b"1"), Datum::Null])),
                new: vec![Datum::Text(b"2"), Datum::UnchangedToast],
            },
            Message::Update { relation: 16384, old: None, new: vec![Datum::Text(b"2"), Datum::Binary(b"\0")] },
            Message::Delete { relation: 16384, old: Old::Row(vec![Datum::Text(b"2"), Datum::Text(b"x")]) },
            Message::Truncate { options: 1, relations: vec![16384, 16385] },
            Message::Begin { final_lsn: 0x1_0000_0028, commit_ts: 7, xid: 755 },
            Message::Commit { flags: 0, commit_lsn: 40, end_lsn: 88, commit_ts: 7 },
            Message::Type { oid: 90000, namespace: "public", name: "mood" },
            Message::Origin { lsn: 3, name: "o" },
            Message::LogicalMessage { flags: 1, lsn: 9, prefix: "p", content: b"hello" },
        ];
        for m in &messages {
            let mut bytes = Vec::new();
            encode(m, &mut bytes);
            assert_eq!(&decode(&bytes).unwrap(), m);
            // Every proper prefix is refused, never decoded as something else.
            for cut in 0..bytes.len() {
                assert!(decode(&bytes[..cut]).is_err(), "{m:?} cut at {cut}");
            }
            bytes.push(0);
            assert_eq!(decode(&bytes), Err(Error::TrailingBytes(1)));
        }
    }

    #[test]
    fn announced_counts_beyond_the_message_are_refused_before_allocating() {
        // A truncate of 2^31-1 relations in a 6-byte message.
        let e = decode(&[b'T', 0x7f, 0xff, 0xff, 0xff, 0]).unwrap_err();
        assert!(matches!(e, Error::BadLength("relation count", _)), "{e}");
        // An insert whose value claims 2 GiB.
        let e = decode(&[b'I', 0, 0, 0, 1, b'N', 0, 1, b't', 0x7f, 0xff, 0xff, 0xff]).unwrap_err();
        assert!(matches!(e, Error::BadLength("value length", _)), "{e}");
        let e = decode(&[b'I', 0, 0, 0, 1, b'N', 0xff, 0xff]).unwrap_err();
        assert!(matches!(e, Error::BadLength("column count", -1)), "{e}");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn arbitrary_changes_round_trip(
            relation in any::<u32>(),
            new in proptest::collection::vec(datum(), 0..12),
            old in proptest::option::of((any::<bool>(), proptest::collection::vec(datum(), 0..12))),
            flip in any::<(usize, u8)>(),
        ) {
            let new: Vec<Datum<'_>> = new.iter().map(to_datum).collect();
            let old = old.as_ref().map(|(key, v)| {
                let v = v.iter().map(to_datum).collect();
                if *key { Old::Key(v) } else { Old::Row(v) }
            });
            let m = Message::Update { relation, old, new };
            let mut bytes = Vec::new();
            encode(&m, &mut bytes);
            prop_assert_eq!(decode(&bytes).unwrap(), m);
            // One corrupted byte decodes to something or to an error, never a panic.
            let i = flip.0 % bytes.len();
            bytes[i] ^= flip.1;
            let _ = decode(&bytes);
        }
    }
}
