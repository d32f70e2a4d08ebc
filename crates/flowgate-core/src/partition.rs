//! Partition choice. The key's hash picks the partition, so every event of one key lands
//! in one partition and keeps its order. The hash is XXH3-64, fixed forever: changing it
//! would move keys between partitions of existing topics.

/// The partition (of `partitions`) that events with this key belong to.
///
/// `partitions` must be at least 1.
#[inline]
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    debug_assert!(partitions > 0);
    (xxhash_rust::xxh3::xxh3_64(key) % u64::from(partitions.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_key_same_partition_and_keys_spread() {
        let mut seen = [0u32; 8];
        for i in 0..8000u32 {
            let key = format!("device-{i}");
            let p = partition_for_key(key.as_bytes(), 8);
            assert_eq!(p, partition_for_key(key.as_bytes(), 8));
            seen[p as usize] += 1;
        }
        for count in seen {
            assert!(count > 800, "partition spread too uneven: {seen:?}");
        }
        assert_eq!(partition_for_key(b"anything", 1), 0);
    }
}
