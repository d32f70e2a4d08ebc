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

    /// Decompresses `input` whose uncompressed length is exactly `expected_len`, replacing
    /// the contents of `out`. Fails on any mismatch: the input is untrusted.
    pub fn decompress(self, input: &[u8], expected_len: usize, out: &mut Vec<u8>) -> std::io::Result<()> {
        out.clear();
        match self {
            Codec::None => out.extend_from_slice(input),
            Codec::Lz4 => {
                out.resize(expected_len, 0);
                let n = lz4_flex::block::decompress_into(input, out)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
                out.truncate(n);
            }
            Codec::Zstd => {
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
