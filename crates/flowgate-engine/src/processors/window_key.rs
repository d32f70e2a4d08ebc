//! The key of an aggregate's open window: end, group, start. Windows are ordered by end
//! (so emission walks the front), then by a 64-bit hash of the group, then the group's
//! name, then start: finding an event's window compares integers, and names only once
//! the hashes agree. A [`WindowProbe`] looks a window up by a borrowed name, so an event
//! that lands in an open window allocates nothing for the lookup.

use std::borrow::Borrow;
use std::cmp::Ordering;

/// The hash that orders a group among the windows of one end.
pub(super) fn group_hash(name: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(name.as_bytes())
}

/// An open window's key.
#[derive(Clone, Debug)]
pub(super) struct WindowKey {
    /// The window's end (exclusive).
    pub(super) end: i64,
    hash: u64,
    /// The group.
    pub(super) group: String,
    /// The window's start.
    pub(super) start: i64,
}

impl WindowKey {
    /// The key of `group`'s window `start..end`.
    pub(super) fn new(end: i64, group: String, start: i64) -> WindowKey {
        WindowKey { end, hash: group_hash(&group), group, start }
    }
}

/// A key made of borrowed parts, to look a window up without building its key.
pub(super) struct WindowProbe<'a> {
    end: i64,
    hash: u64,
    group: &'a str,
    start: i64,
}

impl<'a> WindowProbe<'a> {
    /// The probe for `group`'s window `start..end`, given the group's [`group_hash`].
    pub(super) fn new(end: i64, hash: u64, group: &'a str, start: i64) -> WindowProbe<'a> {
        WindowProbe { end, hash, group, start }
    }

    /// As the map's lookups take it.
    pub(super) fn key(&self) -> &(dyn KeyParts + 'a) {
        self
    }
}

/// The parts keys are ordered by.
pub(super) trait KeyParts {
    /// `(end, hash, group, start)`.
    fn parts(&self) -> (i64, u64, &str, i64);
}

impl KeyParts for WindowKey {
    fn parts(&self) -> (i64, u64, &str, i64) {
        (self.end, self.hash, &self.group, self.start)
    }
}

impl KeyParts for WindowProbe<'_> {
    fn parts(&self) -> (i64, u64, &str, i64) {
        (self.end, self.hash, self.group, self.start)
    }
}

impl<'a> Borrow<dyn KeyParts + 'a> for WindowKey {
    fn borrow(&self) -> &(dyn KeyParts + 'a) {
        self
    }
}

impl PartialEq for dyn KeyParts + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn KeyParts + '_ {}

impl PartialOrd for dyn KeyParts + '_ {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for dyn KeyParts + '_ {
    fn cmp(&self, other: &Self) -> Ordering {
        self.parts().cmp(&other.parts())
    }
}

// The key's own order must be the one its borrowed form gives.
impl PartialEq for WindowKey {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for WindowKey {}

impl PartialOrd for WindowKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for WindowKey {
    fn cmp(&self, other: &Self) -> Ordering {
        self.parts().cmp(&other.parts())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn a_probe_finds_exactly_its_window_and_windows_run_in_end_order() {
        let mut open = BTreeMap::new();
        for (end, group, start) in
            [(2000, "b", 1000), (1000, "a", 0), (1000, "b", 0), (2000, "a", 1000), (1000, "a", 500)]
        {
            open.insert(WindowKey::new(end, group.to_owned(), start), (end, group, start));
        }
        for (end, group, start) in [(2000, "b", 1000), (1000, "a", 0), (1000, "a", 500)] {
            let probe = WindowProbe::new(end, group_hash(group), group, start);
            assert_eq!(open.get(probe.key()), Some(&(end, group, start)));
        }
        assert_eq!(open.get(WindowProbe::new(1000, group_hash("c"), "c", 0).key()), None);
        assert_eq!(open.get(WindowProbe::new(1000, group_hash("a"), "a", 1).key()), None);
        let ends: Vec<i64> = open.keys().map(|k| k.end).collect();
        assert_eq!(ends, [1000, 1000, 1000, 2000, 2000], "emission walks the front by end");
        assert_eq!(open.remove(WindowProbe::new(1000, group_hash("b"), "b", 0).key()), Some((1000, "b", 0)));
        assert_eq!(open.len(), 4);
    }
}
