//! Unsigned LEB128 varints and zig-zag signed varints, as used inside records.
//!
//! Decoders take untrusted bytes: they never read past the slice and reject encodings
//! longer than the type allows.

/// Appends `value` as an unsigned LEB128 varint.
#[inline]
pub fn put_u64(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Appends `value` zig-zag encoded, so small negative numbers stay short.
#[inline]
pub fn put_i64(out: &mut Vec<u8>, value: i64) {
    put_u64(out, ((value << 1) ^ (value >> 63)) as u64);
}

/// The number of bytes `put_u64` writes for `value`.
#[inline]
pub fn len_u64(value: u64) -> usize {
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
}

/// Reads an unsigned varint at `*pos`, advancing it. `None` if the slice ends first or
/// the encoding is longer than ten bytes.
#[inline]
pub fn get_u64(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut result: u64 = 0;
    let mut shift = 0u32;
    loop {
        let byte = *buf.get(*pos)?;
        *pos += 1;
        if shift == 63 && byte > 1 {
            return None;
        }
        result |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(result);
        }
        shift += 7;
        if shift > 63 {
            return None;
        }
    }
}

/// Reads a zig-zag signed varint at `*pos`, advancing it.
#[inline]
pub fn get_i64(buf: &[u8], pos: &mut usize) -> Option<i64> {
    let raw = get_u64(buf, pos)?;
    Some(((raw >> 1) as i64) ^ -((raw & 1) as i64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn unsigned_round_trip(v in any::<u64>()) {
            let mut buf = Vec::new();
            put_u64(&mut buf, v);
            prop_assert_eq!(buf.len(), len_u64(v));
            let mut pos = 0;
            prop_assert_eq!(get_u64(&buf, &mut pos), Some(v));
            prop_assert_eq!(pos, buf.len());
        }

        #[test]
        fn signed_round_trip(v in any::<i64>()) {
            let mut buf = Vec::new();
            put_i64(&mut buf, v);
            let mut pos = 0;
            prop_assert_eq!(get_i64(&buf, &mut pos), Some(v));
        }

        #[test]
        fn decoder_never_reads_past_the_end(bytes in proptest::collection::vec(any::<u8>(), 0..16)) {
            let mut pos = 0;
            if get_u64(&bytes, &mut pos).is_some() {
                prop_assert!(pos <= bytes.len());
            }
        }
    }

    #[test]
    fn rejects_overlong_encodings() {
        let mut pos = 0;
        assert_eq!(get_u64(&[0xff; 11], &mut pos), None);
        let mut pos = 0;
        assert_eq!(get_u64(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02], &mut pos), None);
    }
}
