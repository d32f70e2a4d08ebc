//! What the initial snapshot has stored, per table and topic partition, and from which
//! snapshot: the state that makes the snapshot resumable and its hand-over to streaming
//! free of gaps and duplicates.
//!
//! A table is read in primary-key order. Each chunk of rows covers a key range: every
//! row of the table in that range is stored, and for a partition the chunk wrote no row
//! to, there was none. Coverage is kept per partition because a chunk's rows go to
//! several partitions whose appends are separate: after a crash some may hold the chunk
//! and others not, which [`Progress::resolve`] finds out from the log.
//!
//! Every covered range carries the *point* of the exported snapshot it was read from: a
//! transaction that committed before the point is in that snapshot, one that committed
//! at or after it is not. The slot streams from before every point, so a streamed change
//! is stored exactly when its transaction's commit LSN is at or after the point of the
//! range holding its key ([`Coverage::wants`]). Without a crash there is one snapshot
//! and one range per partition: the slot's changes after its point all pass.

use std::cmp::Ordering;
use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// How a key column's values are ordered, in SQL and here alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyOrder {
    /// `smallint`, `integer`, `bigint`, `oid`: by number (the column's own order).
    Integer,
    /// The column's own order is the byte order of its text form: `uuid`, and text types
    /// under the `C` collation (so the primary key's index serves the read).
    Native,
    /// `character(n)`: by the bytes of its text form without the trailing blanks
    /// (`(col)::text COLLATE "C"` in SQL, which drops them).
    Char,
    /// Anything else: by the bytes of its text form (`(col)::text COLLATE "C"` in SQL;
    /// PostgreSQL sorts the table for the read, as no index has this order).
    Text,
}

impl KeyOrder {
    /// The order of a column of type `type_oid`, `c_collated` when its collation is `C`
    /// or `POSIX`.
    pub fn of(type_oid: u32, c_collated: bool) -> KeyOrder {
        match type_oid {
            20 | 21 | 23 | 26 => KeyOrder::Integer,
            2950 => KeyOrder::Native,
            1042 => KeyOrder::Char,
            19 | 25 | 1043 if c_collated => KeyOrder::Native,
            _ => KeyOrder::Text,
        }
    }

    /// The SQL expression that sorts column `quoted` in this order.
    pub fn sql(self, quoted: &str) -> String {
        match self {
            KeyOrder::Integer | KeyOrder::Native => quoted.to_owned(),
            KeyOrder::Char | KeyOrder::Text => format!("({quoted})::text COLLATE \"C\""),
        }
    }

    /// A bound as the SQL expression of [`Self::sql`] compares it.
    pub fn literal(self, value: &str) -> &str {
        match self {
            KeyOrder::Char => value.trim_end_matches(' '),
            _ => value,
        }
    }

    fn cmp(self, a: &[u8], b: &[u8]) -> Ordering {
        match self {
            KeyOrder::Integer => {
                let parse = |x: &[u8]| std::str::from_utf8(x).ok().and_then(|s| s.parse::<i128>().ok());
                if let (Some(a), Some(b)) = (parse(a), parse(b)) {
                    return a.cmp(&b);
                }
                a.cmp(b)
            }
            KeyOrder::Char => {
                let trim = |x: &[u8]| x.len() - x.iter().rev().take_while(|&&c| c == b' ').count();
                a[..trim(a)].cmp(&b[..trim(b)])
            }
            KeyOrder::Native | KeyOrder::Text => a.cmp(b),
        }
    }
}

/// A primary key column.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyColumn {
    /// Its name.
    pub name: String,
    /// How it sorts.
    pub order: KeyOrder,
}

/// Compares a key (text forms of its columns) with a stored bound.
pub fn compare_key(columns: &[KeyColumn], key: &[&[u8]], bound: &[String]) -> Ordering {
    for ((c, k), b) in columns.iter().zip(key).zip(bound) {
        match c.order.cmp(k, b.as_bytes()) {
            Ordering::Equal => continue,
            other => return other,
        }
    }
    Ordering::Equal
}

/// Keys up to `upper` (inclusive; `None`: to the end of the table) read from the
/// snapshot at `point`, beyond the previous range.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    /// The last key covered, as the text forms of the key columns.
    pub upper: Option<Vec<String>>,
    /// The snapshot's consistent point (an LSN).
    pub point: u64,
}

/// One captured table's snapshot state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableProgress {
    /// Its schema.
    pub schema: String,
    /// Its name.
    pub table: String,
    /// The topic its rows go to.
    pub topic: String,
    /// The topic's partitions when the snapshot began (keys were routed by it).
    pub partitions: u32,
    /// The primary key; empty when the table has none (it is then read in one pass).
    pub key: Vec<KeyColumn>,
    /// Per partition, the ranges covered, in key order.
    pub covered: Vec<Vec<Range>>,
    /// Every row was read.
    pub finished: bool,
    /// Rows stored so far.
    pub rows: u64,
}

impl TableProgress {
    /// A table not read yet.
    pub fn new(schema: &str, table: &str, topic: &str, partitions: u32, key: Vec<KeyColumn>) -> TableProgress {
        TableProgress {
            schema: schema.to_owned(),
            table: table.to_owned(),
            topic: topic.to_owned(),
            partitions,
            key,
            covered: vec![Vec::new(); partitions as usize],
            finished: false,
            rows: 0,
        }
    }

    /// True when `key` (of a row routed to `partition`) was stored already.
    pub fn covers(&self, partition: u32, key: &[&[u8]]) -> bool {
        let Some(last) = self.covered.get(partition as usize).and_then(|r| r.last()) else {
            return false;
        };
        match &last.upper {
            None => true,
            Some(upper) => compare_key(&self.key, key, upper) != Ordering::Greater,
        }
    }

    /// Where reading resumes: the lowest bound every partition has reached (`None`: from
    /// the start). Rows up to a partition's own bound are skipped by [`Self::covers`].
    pub fn resume_after(&self) -> Option<Vec<String>> {
        if self.key.is_empty() {
            return None;
        }
        let mut lowest: Option<&Vec<String>> = None;
        for ranges in &self.covered {
            let upper = ranges.last()?.upper.as_ref()?;
            let lower = match lowest {
                Some(l) if compare_bounds(&self.key, l, upper) != Ordering::Greater => l,
                _ => upper,
            };
            lowest = Some(lower);
        }
        lowest.cloned()
    }

    /// Records that partition `partition` holds every row up to `upper`, read at `point`.
    pub fn extend(&mut self, partition: u32, upper: Option<&Vec<String>>, point: u64) {
        let key = self.key.clone();
        let Some(ranges) = self.covered.get_mut(partition as usize) else {
            return;
        };
        if let Some(last) = ranges.last_mut() {
            let beyond = match (&last.upper, upper) {
                (None, _) => false,
                (Some(_), None) => true,
                (Some(have), Some(new)) => compare_bounds(&key, new, have) == Ordering::Greater,
            };
            if !beyond {
                return;
            }
            if last.point == point {
                last.upper = upper.cloned();
                return;
            }
        }
        ranges.push(Range { upper: upper.cloned(), point });
    }

    /// Starts the table over (a table without a key cannot resume within itself).
    pub fn restart(&mut self) {
        self.covered = vec![Vec::new(); self.partitions as usize];
        self.finished = false;
    }

    /// The point of the range holding `key` in `partition`, if covered.
    fn point_of(&self, partition: u32, key: &[&[u8]]) -> Option<u64> {
        let ranges = self.covered.get(partition as usize)?;
        ranges
            .iter()
            .find(|r| match &r.upper {
                None => true,
                Some(upper) => compare_key(&self.key, key, upper) != Ordering::Greater,
            })
            .map(|r| r.point)
    }
}

fn compare_bounds(columns: &[KeyColumn], a: &[String], b: &[String]) -> Ordering {
    let a: Vec<&[u8]> = a.iter().map(|s| s.as_bytes()).collect();
    compare_key(columns, &a, b)
}

/// A chunk whose appends were started and may not all have landed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingChunk {
    /// The chunk's number: the producer sequence of its appends.
    pub chunk: u64,
    /// Index into [`Progress::tables`].
    pub table: usize,
    /// The last key it covers (`None`: the table's end).
    pub upper: Option<Vec<String>>,
    /// The snapshot's point.
    pub point: u64,
    /// The partitions it appended rows to.
    pub partitions: Vec<u32>,
}

/// The whole snapshot's state, stored with the source's marker.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Tells this snapshot's producers from an earlier one's (a new snapshot after a
    /// lost slot numbers its chunks from 0 again).
    pub epoch: u64,
    /// The tables, once listed (at the first snapshot connection).
    pub tables: Option<Vec<TableProgress>>,
    /// The next chunk's number.
    pub next_chunk: u64,
    /// A chunk started and not known to be stored.
    pub pending: Option<PendingChunk>,
    /// Every table was read.
    pub done: bool,
}

impl Progress {
    /// A snapshot not begun.
    pub fn new(epoch: u64) -> Progress {
        Progress { epoch, ..Progress::default() }
    }

    /// Settles the pending chunk from what the log holds: `landed(topic, partition,
    /// chunk)` says whether that partition stored the chunk.
    pub fn resolve(&mut self, landed: impl Fn(&str, u32, u64) -> bool) {
        let Some(p) = self.pending.take() else {
            return;
        };
        self.next_chunk = self.next_chunk.max(p.chunk.saturating_add(1));
        let Some(table) = self.tables.as_mut().and_then(|t| t.get_mut(p.table)) else {
            return;
        };
        if table.key.is_empty() && p.upper.is_some() {
            // Part of a table without a key: it starts over in a new snapshot.
            return;
        }
        for partition in 0..table.partitions {
            let wrote = p.partitions.contains(&partition);
            if !wrote || landed(&table.topic, partition, p.chunk) {
                table.extend(partition, p.upper.as_ref(), p.point);
            }
        }
        table.finished = p.upper.is_none() && table.covered.iter().all(|r| r.last().is_some_and(|l| l.upper.is_none()));
    }

    /// The filter streaming applies while some range's point is ahead of the slot.
    pub fn coverage(&self) -> Option<Coverage> {
        let tables = self.tables.as_ref()?;
        let highest = tables.iter().flat_map(|t| t.covered.iter().flatten()).map(|r| r.point).max()?;
        let by_name = tables.iter().map(|t| ((t.schema.clone(), t.table.clone()), t.clone())).collect();
        Some(Coverage { tables: by_name, highest })
    }
}

/// Which streamed changes the snapshot already holds.
#[derive(Clone, Debug)]
pub struct Coverage {
    tables: HashMap<(String, String), TableProgress>,
    highest: u64,
}

impl Coverage {
    /// Every change committed at or after this passes.
    pub fn highest_point(&self) -> u64 {
        self.highest
    }

    /// The key columns of `schema.table` if it was snapshotted with a key.
    pub fn key_of(&self, schema: &str, table: &str) -> Option<&[KeyColumn]> {
        let t = self.tables.get(&(schema.to_owned(), table.to_owned()))?;
        (!t.key.is_empty()).then_some(t.key.as_slice())
    }

    /// True when a change to `key` (routed by `key_bytes`) committed at `commit_lsn`
    /// is not in the snapshot and so must be stored. A table the snapshot did not read,
    /// or a key it does not cover, passes.
    pub fn wants(&self, schema: &str, table: &str, key_bytes: Option<&[u8]>, key: &[&[u8]], commit_lsn: u64) -> bool {
        if commit_lsn >= self.highest {
            return true;
        }
        let Some(t) = self.tables.get(&(schema.to_owned(), table.to_owned())) else {
            return true;
        };
        let partition = match key_bytes {
            Some(k) if !t.key.is_empty() => flowgate_core::partition_for_key(k, t.partitions),
            _ => flowgate_core::partition_for_key(format!("{schema}.{table}").as_bytes(), t.partitions),
        };
        match t.point_of(partition, key) {
            Some(point) => commit_lsn >= point,
            None => true,
        }
    }

    /// For a truncate committed at `commit_lsn`: true when some row the snapshot read
    /// from `partition` was read before it (and so must be truncated).
    pub fn truncate_reaches(&self, schema: &str, table: &str, partition: u32, commit_lsn: u64) -> bool {
        if commit_lsn >= self.highest {
            return true;
        }
        let Some(t) = self.tables.get(&(schema.to_owned(), table.to_owned())) else {
            return true;
        };
        t.covered.get(partition as usize).is_none_or(|r| r.iter().any(|r| commit_lsn >= r.point))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn int_key() -> Vec<KeyColumn> {
        vec![KeyColumn { name: "id".into(), order: KeyOrder::Integer }]
    }

    fn bound(k: i64) -> Option<Vec<String>> {
        Some(vec![k.to_string()])
    }

    #[test]
    fn integers_compare_as_numbers_and_text_as_bytes() {
        let k = int_key();
        assert_eq!(compare_key(&k, &[b"9"], &["10".into()]), Ordering::Less);
        assert_eq!(compare_key(&k, &[b"-3"], &["-20".into()]), Ordering::Greater);
        let t = vec![KeyColumn { name: "s".into(), order: KeyOrder::Text }];
        let c = vec![KeyColumn { name: "c".into(), order: KeyOrder::Char }];
        assert_eq!(compare_key(&c, &[b"ab  "], &["ab".into()]), Ordering::Equal);
        assert_eq!(compare_key(&c, &[b"ab\x01 "], &["ab   ".into()]), Ordering::Greater);
        assert_eq!(compare_key(&t, &[b"B"], &["a".into()]), Ordering::Less);
        let two = vec![int_key()[0].clone(), t[0].clone()];
        assert_eq!(compare_key(&two, &[b"1", b"z"], &["2".into(), "a".into()]), Ordering::Less);
        assert_eq!(compare_key(&two, &[b"2", b"b"], &["2".into(), "a".into()]), Ordering::Greater);
    }

    #[test]
    fn a_chunk_that_landed_in_some_partitions_covers_only_those_and_resumes_from_the_lowest() {
        let mut p = Progress::new(1);
        p.tables = Some(vec![TableProgress::new("public", "t", "topic", 3, int_key())]);
        p.pending = Some(PendingChunk { chunk: 0, table: 0, upper: bound(100), point: 10, partitions: vec![0, 1, 2] });
        p.resolve(|_, _, _| true);
        p.pending = Some(PendingChunk { chunk: 1, table: 0, upper: bound(200), point: 10, partitions: vec![0, 2] });
        // Partition 2 did not store chunk 1; partition 1 had no row in it.
        p.resolve(|_, partition, _| partition == 0);
        assert_eq!(p.next_chunk, 2);
        let t = &p.tables.as_ref().unwrap()[0];
        assert_eq!(t.covered[0], vec![Range { upper: bound(200), point: 10 }]);
        assert_eq!(t.covered[1], vec![Range { upper: bound(200), point: 10 }]);
        assert_eq!(t.covered[2], vec![Range { upper: bound(100), point: 10 }]);
        assert_eq!(t.resume_after(), bound(100));
        assert!(t.covers(0, &[b"150"]) && !t.covers(2, &[b"150"]) && t.covers(2, &[b"100"]));
        assert!(!t.finished);
    }

    #[test]
    fn streamed_changes_pass_exactly_when_their_range_was_read_before_they_committed() {
        let mut p = Progress::new(1);
        p.tables = Some(vec![TableProgress::new("public", "t", "topic", 1, int_key())]);
        // Keys to 100 read at point 10, the rest (after a crash) at point 50.
        p.pending = Some(PendingChunk { chunk: 0, table: 0, upper: bound(100), point: 10, partitions: vec![0] });
        p.resolve(|_, _, _| true);
        p.pending = Some(PendingChunk { chunk: 1, table: 0, upper: None, point: 50, partitions: vec![0] });
        p.resolve(|_, _, _| true);
        assert!(p.tables.as_ref().unwrap()[0].finished);
        let c = p.coverage().unwrap();
        assert_eq!(c.highest_point(), 50);
        let wants = |key: &[u8], lsn| c.wants("public", "t", Some(b"k"), &[key], lsn);
        assert!(!wants(b"5", 9) && wants(b"5", 10) && wants(b"5", 30));
        assert!(!wants(b"500", 30) && wants(b"500", 50));
        assert!(c.wants("public", "other", None, &[], 1));
        assert!(c.truncate_reaches("public", "t", 0, 30));
        assert!(!c.truncate_reaches("public", "t", 0, 5));
    }

    #[test]
    fn a_keyless_table_interrupted_starts_over() {
        let mut p = Progress::new(1);
        p.tables = Some(vec![TableProgress::new("public", "t", "topic", 2, Vec::new())]);
        p.pending = Some(PendingChunk { chunk: 4, table: 0, upper: Some(Vec::new()), point: 10, partitions: vec![1] });
        p.resolve(|_, _, _| true);
        assert_eq!(p.next_chunk, 5);
        assert!(p.tables.as_ref().unwrap()[0].covered.iter().all(Vec::is_empty));
        p.pending = Some(PendingChunk { chunk: 5, table: 0, upper: None, point: 20, partitions: vec![1] });
        p.resolve(|_, _, _| true);
        assert!(p.tables.as_ref().unwrap()[0].finished);
    }
}
