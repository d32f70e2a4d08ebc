//! Compression codecs for the records section of a batch.

use std::fmt;

/// How the records section of a batch is compressed. The numeric value is stored in the
/// low three bits of a batch's attributes and must never change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// Stored as is.
    #[default]
    None = 0,
    /// LZ4 block format: fast, modest ratio.
    Lz4 = 1,
    /// Zstandard at level 1 (by default): slower, better ratio.
    Zstd = 2,
}

impl Codec {
    /// The codec with this numeric id, if any.
    pub fn from_id(id: u8) -> Option<Codec> {
        match id {
            0 => Some(Codec::None),
            1 => Some(Codec::Lz4),
            2 => Some(Codec::Zstd),
            _ => None,
        }
    }

    /// Parses `none`, `lz4` or `zstd`.
    pub fn parse(name: &str) -> Option<Codec> {
        match name {
            "none" => Some(Codec::None),
            "lz4" => Some(Codec::Lz4),
            "zstd" => Some(Codec::Zstd),
            _ => None,
        }
    }

    /// Compresses `input`, appending to `out`.
    pub fn compress(self, input: &[u8], out: &mut Vec<u8>) -> std::io::Result<()> {
        match self {
            Codec::None => out.extend_from_slice(input),
            Codec::Lz4 => {
                let start = out.len();
                out.resize(start + lz4_flex::block::get_maximum_output_size(input.len()), 0);
                let n = lz4_flex::block::compress_into(input, &mut out[start..])
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                out.truncate(start + n);
            }
            Codec::Zstd => {
                let compressed = zstd::bulk::compress(input, 1)?;
                out.extend_from_slice(&compressed);
            }
        }
        Ok(())
    }

    /// The most bytes `compressed_len` bytes of this codec can inflate to. A stated
    /// uncompressed length above it is a lie, refused before anything is allocated.
    ///
    /// An lz4 block spends at least one byte per 255 bytes of output (a length byte adds
    /// at most 255); a zstd block spends at least 4 bytes (3 of header, 1 of RLE byte)
    /// per block of at most 128 KiB.
    pub fn max_inflated_len(self, compressed_len: usize) -> usize {
        match self {
            Codec::None => compressed_len,
            Codec::Lz4 => compressed_len.saturating_mul(255),
            Codec::Zstd => compressed_len.saturating_mul(32 * 1024),
        }
    }

    /// Decompresses `input` whose uncompressed length is exactly `expected_len`, replacing
    /// the contents of `out`. Fails on any mismatch: the input is untrusted. `out` grows
    /// to `expected_len` at most (never to a size the input's own headers claim), and
    /// only when `expected_len` is within [`Codec::max_inflated_len`] of the input: the
    /// caller bounds `expected_len` (and charges it to whatever budget it keeps) first.
    pub fn decompress(self, input: &[u8], expected_len: usize, out: &mut Vec<u8>) -> std::io::Result<()> {
        out.clear();
        if expected_len > self.max_inflated_len(input.len()) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} bytes cannot inflate to the {expected_len} bytes the header says", input.len()),
            ));
        }
        match self {
            Codec::None => out.extend_from_slice(input),
            Codec::Lz4 => {
                out.resize(expected_len, 0);
                let n = lz4_flex::block::decompress_into(input, out)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
                out.truncate(n);
            }
            Codec::Zstd => {
                // A buffer of exactly `expected_len`: zstd fails rather than grow it,
                // whatever content size the frame header claims.
                let mut decoded = zstd::bulk::decompress(input, expected_len)?;
                std::mem::swap(out, &mut decoded);
            }
        }
        if out.len() != expected_len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("decompressed {} bytes, header says {expected_len}", out.len()),
            ));
        }
        Ok(())
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Codec::None => "none",
            Codec::Lz4 => "lz4",
            Codec::Zstd => "zstd",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn an_lz4_header_claiming_far_more_than_its_input_can_hold_is_refused_before_allocating() {
        let mut out = Vec::new();
        let err = Codec::Lz4.decompress(&[0x1f, 0], 256 << 20, &mut out).unwrap_err();
        assert!(err.to_string().contains("cannot inflate"), "{err}");
        assert_eq!(out.capacity(), 0, "nothing was allocated");
        let err = Codec::Zstd.decompress(&[0x28, 0xb5, 0x2f, 0xfd], 256 << 20, &mut out).unwrap_err();
        assert!(err.to_string().contains("cannot inflate"), "{err}");
        assert_eq!(out.capacity(), 0, "nothing was allocated");
    }

    #[test]
    fn a_zstd_frame_larger_than_stated_is_refused_without_growing_past_the_stated_size() {
        let data = vec![7u8; 100_000];
        let mut compressed = Vec::new();
        Codec::Zstd.compress(&data, &mut compressed).unwrap();
        let mut out = Vec::new();
        assert!(Codec::Zstd.decompress(&compressed, 1000, &mut out).is_err());
        assert!(out.capacity() < 100_000, "grew to {}", out.capacity());
        Codec::Zstd.decompress(&compressed, data.len(), &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn highly_compressible_input_stays_within_the_stated_bound() {
        // The densest real input: long runs. Every codec's real ratio is under its bound.
        for codec in [Codec::Lz4, Codec::Zstd] {
            let data = vec![0u8; 4 << 20];
            let mut compressed = Vec::new();
            codec.compress(&data, &mut compressed).unwrap();
            assert!(data.len() <= codec.max_inflated_len(compressed.len()), "{codec}: {}", compressed.len());
            let mut out = Vec::new();
            codec.decompress(&compressed, data.len(), &mut out).unwrap();
            assert_eq!(out.len(), data.len());
        }
    }

    proptest! {
        #[test]
        fn decompressing_arbitrary_bytes_never_panics_nor_exceeds_the_stated_length(
            codec in prop_oneof![Just(Codec::Lz4), Just(Codec::Zstd)],
            input in proptest::collection::vec(any::<u8>(), 0..300),
            expected in 0usize..100_000,
        ) {
            let mut out = Vec::new();
            if codec.decompress(&input, expected, &mut out).is_ok() {
                prop_assert_eq!(out.len(), expected);
            }
            prop_assert!(out.len() <= expected);
        }

        #[test]
        fn compression_round_trips(codec in prop_oneof![Just(Codec::None), Just(Codec::Lz4), Just(Codec::Zstd)], data in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let mut compressed = Vec::new();
            codec.compress(&data, &mut compressed).unwrap();
            let mut out = Vec::new();
            codec.decompress(&compressed, data.len(), &mut out).unwrap();
            prop_assert_eq!(out, data);
        }
    }
}
