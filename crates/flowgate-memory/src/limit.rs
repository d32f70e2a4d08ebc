//! The default budget: a fraction of the memory the process may use, read from its
//! cgroup (v2 `memory.max`, v1 `memory.limit_in_bytes`) or, without a cgroup limit,
//! from the machine (`MemTotal` in `/proc/meminfo`), whichever is smaller.
//!
//! The files are read whole but bounded, and parsed without trusting them: anything
//! that is not the expected number is an error, never a panic.

use std::path::Path;

/// The default budget is this fraction (numerator / denominator) of the memory found:
/// half, leaving the rest for what the budget does not count (code, thread stacks,
/// connection base buffers, log indexes, allocator slack) and for the page cache the
/// log reads through.
pub const DEFAULT_FRACTION: (u64, u64) = (1, 2);

/// Where the cgroup v2 limit is.
pub const CGROUP_V2_MAX: &str = "/sys/fs/cgroup/memory.max";
/// Where the cgroup v1 limit is.
pub const CGROUP_V1_LIMIT: &str = "/sys/fs/cgroup/memory/memory.limit_in_bytes";
/// Where the machine's memory is.
pub const MEMINFO: &str = "/proc/meminfo";

/// Files longer than this are not a limit file nor meminfo.
const MAX_FILE_BYTES: u64 = 64 * 1024;

/// cgroup v1 says "no limit" with a huge number (a page-rounded `i64::MAX`); anything
/// from 2^62 on is taken as none.
const V1_UNLIMITED_FROM: u64 = 1 << 62;

/// A file that does not say what it should.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

/// Parses a cgroup limit file: `max` (v2: no limit) or a byte count. `None` means no
/// limit.
pub fn parse_cgroup_limit(bytes: &[u8]) -> Result<Option<u64>, ParseError> {
    let text = std::str::from_utf8(bytes).map_err(|_| ParseError("the cgroup limit is not text".into()))?.trim();
    if text == "max" {
        return Ok(None);
    }
    let n: u64 = text.parse().map_err(|_| ParseError(format!("the cgroup limit {text:?} is not a number")))?;
    Ok(if n >= V1_UNLIMITED_FROM { None } else { Some(n) })
}

/// Parses `/proc/meminfo` for `MemTotal`, in bytes.
pub fn parse_meminfo_total(bytes: &[u8]) -> Result<u64, ParseError> {
    let text = std::str::from_utf8(bytes).map_err(|_| ParseError("/proc/meminfo is not text".into()))?;
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .ok_or_else(|| ParseError("/proc/meminfo has no MemTotal line".into()))?;
    let mut parts = line.split_whitespace();
    let n: u64 = parts
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| ParseError(format!("MemTotal {:?} is not a number", line.trim())))?;
    let unit = match parts.next() {
        Some("kB") => 1024,
        None => 1,
        Some(other) => return Err(ParseError(format!("MemTotal has an unknown unit {other:?}"))),
    };
    n.checked_mul(unit).ok_or_else(|| ParseError(format!("MemTotal {n} {unit} overflows")))
}

/// The memory the process may use, and where that was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Available {
    /// Bytes.
    pub bytes: u64,
    /// `cgroup v2`, `cgroup v1` or `/proc/meminfo`.
    pub source: &'static str,
}

fn read_bounded(path: &Path) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    std::fs::File::open(path).ok()?.take(MAX_FILE_BYTES).read_to_end(&mut out).ok()?;
    Some(out)
}

/// Reads the cgroup limit and the machine's memory from the given files (any may be
/// missing); `None` when none of them says anything.
pub fn available_from(cgroup_v2: &Path, cgroup_v1: &Path, meminfo: &Path) -> Option<Available> {
    let machine = read_bounded(meminfo)
        .and_then(|b| parse_meminfo_total(&b).ok())
        .map(|bytes| Available { bytes, source: "/proc/meminfo" });
    let cgroup = [(cgroup_v2, "cgroup v2"), (cgroup_v1, "cgroup v1")].into_iter().find_map(|(path, source)| {
        let limit = parse_cgroup_limit(&read_bounded(path)?).ok()??;
        Some(Available { bytes: limit, source })
    });
    match (cgroup, machine) {
        (Some(c), Some(m)) => Some(if c.bytes <= m.bytes { c } else { m }),
        (c, m) => c.or(m),
    }
}

/// The memory this process may use, from the standard places.
pub fn available() -> Option<Available> {
    available_from(Path::new(CGROUP_V2_MAX), Path::new(CGROUP_V1_LIMIT), Path::new(MEMINFO))
}

/// The default budget for `available` bytes: [`DEFAULT_FRACTION`] of it.
pub fn default_limit(available: u64) -> u64 {
    let (num, den) = DEFAULT_FRACTION;
    (available / den).saturating_mul(num)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cgroup_limits_parse() {
        assert_eq!(parse_cgroup_limit(b"max\n"), Ok(None));
        assert_eq!(parse_cgroup_limit(b"536870912\n"), Ok(Some(512 << 20)));
        assert_eq!(parse_cgroup_limit(b"9223372036854771712\n"), Ok(None), "v1's no limit");
        assert!(parse_cgroup_limit(b"-1").is_err());
        assert!(parse_cgroup_limit(b"").is_err());
        assert!(parse_cgroup_limit(b"99999999999999999999999").is_err());
        assert!(parse_cgroup_limit(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn meminfo_parses() {
        let text = b"MemTotal:       24683784 kB\nMemFree:        22422344 kB\n";
        assert_eq!(parse_meminfo_total(text), Ok(24_683_784 * 1024));
        assert!(parse_meminfo_total(b"MemFree: 1 kB\n").is_err());
        assert!(parse_meminfo_total(b"MemTotal: lots kB\n").is_err());
        assert!(parse_meminfo_total(b"MemTotal: 1 MB\n").is_err());
        assert!(parse_meminfo_total(b"MemTotal: 18446744073709551615 kB\n").is_err(), "overflow is an error");
    }

    #[test]
    fn the_smaller_of_cgroup_and_machine_wins() {
        let dir = std::env::temp_dir().join(format!("flowgate-memory-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (v2, v1, mem) = (dir.join("v2"), dir.join("v1"), dir.join("meminfo"));
        std::fs::write(&mem, "MemTotal: 1048576 kB\n").unwrap();
        assert_eq!(available_from(&v2, &v1, &mem), Some(Available { bytes: 1 << 30, source: "/proc/meminfo" }));
        std::fs::write(&v1, "268435456\n").unwrap();
        assert_eq!(available_from(&v2, &v1, &mem), Some(Available { bytes: 256 << 20, source: "cgroup v1" }));
        std::fs::write(&v2, "max\n").unwrap();
        assert_eq!(available_from(&v2, &v1, &mem).unwrap().source, "cgroup v1", "v2 says no limit");
        std::fs::write(&v2, "4294967296000\n").unwrap();
        assert_eq!(available_from(&v2, &v1, &mem).unwrap().source, "/proc/meminfo", "the machine is smaller");
        std::fs::write(&mem, "garbage").unwrap();
        assert_eq!(available_from(&v2, &v1, &mem).unwrap().source, "cgroup v2");
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(available_from(&v2, &v1, &mem), None);
        assert_eq!(default_limit(1 << 30), 512 << 20);
        assert_eq!(default_limit(u64::MAX), u64::MAX / 2);
    }

    proptest! {
        #[test]
        fn any_bytes_parse_or_fail_but_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_cgroup_limit(&bytes);
            let _ = parse_meminfo_total(&bytes);
        }

        #[test]
        fn any_meminfo_number_parses_or_fails(n in any::<u64>(), unit in prop_oneof![Just(" kB"), Just(""), Just(" GB")]) {
            let text = format!("MemTotal: {n}{unit}\n");
            match parse_meminfo_total(text.as_bytes()) {
                Ok(bytes) => prop_assert!(bytes >= n),
                Err(_) => prop_assert!(unit == " GB" || n.checked_mul(1024).is_none()),
            }
        }
    }
}
