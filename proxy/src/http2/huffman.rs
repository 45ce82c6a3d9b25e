//! HPACK's Huffman code (RFC 7541 §5.2, Appendix B): strings encoded
//! through a 64-bit accumulator, decoded one or two symbols a table lookup
//! for codes of up to 12 bits (the characters of most header fields) and a
//! walk of the canonical code for longer ones.

use bytes::BytesMut;

/// A Huffman-coded string that cannot be decoded: it holds the EOS symbol,
/// or ends in more than 7 bits of padding, or padding that is not the
/// EOS code's leading ones (RFC 7541 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid Huffman-coded string")]
pub struct HuffmanError;

/// The longest code, in bits.
const MAX_LEN: usize = 30;
/// Bits looked up at once by [`FAST`].
const FAST_BITS: u32 = 12;
/// The symbol that ends a code stream, never valid inside a string.
const EOS: u16 = 256;

/// How many bytes `src` takes Huffman-coded.
pub fn encoded_len(src: &[u8]) -> usize {
    let bits: usize = src
        .iter()
        .map(|&b| usize::from(LENGTHS[usize::from(b)]))
        .sum();
    bits.div_ceil(8)
}

/// Appends `src` Huffman-coded to `dst`, its last byte padded with ones;
/// `len` is its [`encoded_len`].
pub fn encode(src: &[u8], len: usize, dst: &mut BytesMut) {
    let start = dst.len();
    dst.resize(start + len, 0);
    let out = &mut dst[start..];
    // The low `bits` bits of `acc` are pending; at most 31 stay between
    // symbols, and a symbol adds at most 30.
    let mut acc: u64 = 0;
    let mut bits: u32 = 0;
    let mut at = 0;
    for &b in src {
        let sym = usize::from(b);
        acc = (acc << LENGTHS[sym]) | u64::from(CODES[sym]);
        bits += u32::from(LENGTHS[sym]);
        if bits >= 32 {
            bits -= 32;
            // The 32 bits above the ones still pending (truncation keeps
            // exactly those).
            let word = ((acc >> bits) as u32).to_be_bytes();
            match out.get_mut(at..at + 4) {
                Some(four) => four.copy_from_slice(&word),
                None => return,
            }
            at += 4;
        }
    }
    while bits >= 8 {
        bits -= 8;
        if let Some(byte) = out.get_mut(at) {
            *byte = (acc >> bits) as u8;
        }
        at += 1;
    }
    if let (true, Some(byte)) = (bits > 0, out.get_mut(at)) {
        *byte = ((acc << (8 - bits)) as u8) | (0xff >> bits);
    }
}

/// Appends the decoding of the Huffman-coded `src` to `dst`.
pub fn decode(src: &[u8], dst: &mut BytesMut) -> Result<(), HuffmanError> {
    let start = dst.len();
    // A symbol is at least 5 bits: the decoding is at most 8/5 as long
    // (and one more byte: two symbols are written at a time).
    dst.resize(start + src.len() * 8 / 5 + 2, 0);
    let out = &mut dst[start..];
    let mut written = 0;
    // The next `bits` bits of input, left-aligned in `acc`.
    let mut acc: u64 = 0;
    let mut bits: u32 = 0;
    let mut next = 0;
    let result = loop {
        // Refill: eight bytes at once while they last (the bytes that do
        // not fit under the bits held are read again next time).
        if let Some(word) = src.get(next..next + 8) {
            let mut eight = [0u8; 8];
            eight.copy_from_slice(word);
            acc |= u64::from_be_bytes(eight) >> bits;
            next += ((63 - bits) >> 3) as usize;
            bits |= 56;
        } else {
            while bits <= 56 && next < src.len() {
                acc |= u64::from(src[next]) << (56 - bits);
                bits += 8;
                next += 1;
            }
        }
        // One or two symbols a lookup, while their bits are all input.
        while bits >= FAST_BITS {
            let entry = FAST[(acc >> (64 - FAST_BITS)) as usize];
            if entry == 0 {
                break;
            }
            if let Some(two) = out.get_mut(written..written + 2) {
                two[0] = entry as u8;
                two[1] = (entry >> 8) as u8;
            }
            written += ((entry >> 16) & 0xff) as usize;
            let used = entry >> 24;
            acc <<= used;
            bits -= used;
        }
        if bits == 0 && next == src.len() {
            break Ok(());
        }
        if bits >= FAST_BITS || next < src.len() {
            // A long code (or a refill due first).
            if bits < MAX_LEN as u32 && next < src.len() {
                continue;
            }
        } else {
            // The tail: under `FAST_BITS` of input left.
            let entry = FAST[(acc >> (64 - FAST_BITS)) as usize];
            let used = entry >> 24;
            if entry != 0 && used <= bits {
                if let Some(two) = out.get_mut(written..written + 2) {
                    two[0] = entry as u8;
                    two[1] = (entry >> 8) as u8;
                }
                written += ((entry >> 16) & 0xff) as usize;
                acc <<= used;
                bits -= used;
                continue;
            }
        }
        match slow(acc, bits) {
            Some((EOS, _)) => break Err(HuffmanError),
            Some((sym, len)) => {
                if let Some(byte) = out.get_mut(written) {
                    *byte = sym as u8;
                }
                written += 1;
                acc <<= len;
                bits -= len;
            }
            // No whole code in what is left: it is padding, to be under a
            // byte and all ones (a prefix of EOS).
            None if next == src.len() && bits <= 7 && acc >> (64 - bits) == (1 << bits) - 1 => {
                break Ok(());
            }
            None => break Err(HuffmanError),
        }
    };
    dst.truncate(start + written);
    result
}

/// The code at the front of `acc` (`bits` of it input), walking the
/// canonical code length by length: codes longer than [`FAST_BITS`], and
/// the last bits of a string.
#[cold]
fn slow(acc: u64, bits: u32) -> Option<(u16, u32)> {
    let longest = MAX_LEN.min(bits as usize);
    for (len, &(first, count, offset)) in CANONICAL.iter().enumerate().take(longest + 1).skip(1) {
        let code = (acc >> (64 - len)) as u32;
        if code.wrapping_sub(first) < count {
            return Some((
                BY_CODE[offset as usize + (code - first) as usize],
                len as u32,
            ));
        }
    }
    None
}

/// Symbols in canonical order: by code length, then by symbol.
const BY_CODE: [u16; 257] = {
    let mut out = [0u16; 257];
    let mut n = 0;
    let mut len = 1;
    while len <= MAX_LEN {
        let mut sym = 0;
        while sym < 257 {
            if LENGTHS[sym] as usize == len {
                out[n] = sym as u16;
                n += 1;
            }
            sym += 1;
        }
        len += 1;
    }
    out
};

/// For each code length: its first code, how many codes have it, and where
/// its symbols start in [`BY_CODE`].
const CANONICAL: [(u32, u32, u32); MAX_LEN + 1] = {
    let mut out = [(0u32, 0u32, 0u32); MAX_LEN + 1];
    let mut offset = 0u32;
    let mut len = 1;
    while len <= MAX_LEN {
        let mut count = 0u32;
        let mut first = u32::MAX;
        let mut sym = 0;
        while sym < 257 {
            if LENGTHS[sym] as usize == len {
                count += 1;
                if CODES[sym] < first {
                    first = CODES[sym];
                }
            }
            sym += 1;
        }
        out[len] = (if count == 0 { u32::MAX } else { first }, count, offset);
        offset += count;
        len += 1;
    }
    out
};

/// By the next [`FAST_BITS`] bits: the one or two symbols whose codes
/// they start with (bits 0-7 and 8-15), how many (bits 16-23; 0 for a code
/// longer than `FAST_BITS`, or EOS) and how many bits they take (24-31).
const FAST: [u32; 1 << FAST_BITS] = {
    let mut out = [0u32; 1 << FAST_BITS];
    let mut a = 0;
    while a < 256 {
        let len = LENGTHS[a] as u32;
        if len <= FAST_BITS {
            let spare = FAST_BITS - len;
            let base = (CODES[a] << spare) as usize;
            let mut i = 0;
            while i < (1 << spare) {
                out[base + i] = (len << 24) | (1 << 16) | a as u32;
                i += 1;
            }
            // A second whole code in the bits left.
            let mut b = 0;
            while b < 256 {
                let len2 = LENGTHS[b] as u32;
                if len2 <= spare {
                    let rest = spare - len2;
                    let base = ((CODES[a] << spare) | (CODES[b] << rest)) as usize;
                    let mut i = 0;
                    while i < (1 << rest) {
                        out[base + i] =
                            ((len + len2) << 24) | (2 << 16) | ((b as u32) << 8) | a as u32;
                        i += 1;
                    }
                }
                b += 1;
            }
        }
        a += 1;
    }
    out
};

/// Each symbol's code, right-aligned, by symbol (256 is EOS): RFC 7541
/// Appendix B.
pub(super) const CODES: [u32; 257] = [
    0x1ff8, 0x7fffd8, 0xfffffe2, 0xfffffe3, 0xfffffe4, 0xfffffe5, 0xfffffe6, 0xfffffe7, 0xfffffe8,
    0xffffea, 0x3ffffffc, 0xfffffe9, 0xfffffea, 0x3ffffffd, 0xfffffeb, 0xfffffec, 0xfffffed,
    0xfffffee, 0xfffffef, 0xffffff0, 0xffffff1, 0xffffff2, 0x3ffffffe, 0xffffff3, 0xffffff4,
    0xffffff5, 0xffffff6, 0xffffff7, 0xffffff8, 0xffffff9, 0xffffffa, 0xffffffb, 0x14, 0x3f8,
    0x3f9, 0xffa, 0x1ff9, 0x15, 0xf8, 0x7fa, 0x3fa, 0x3fb, 0xf9, 0x7fb, 0xfa, 0x16, 0x17, 0x18,
    0x0, 0x1, 0x2, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f, 0x5c, 0xfb, 0x7ffc, 0x20, 0xffb,
    0x3fc, 0x1ffa, 0x21, 0x5d, 0x5e, 0x5f, 0x60, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68,
    0x69, 0x6a, 0x6b, 0x6c, 0x6d, 0x6e, 0x6f, 0x70, 0x71, 0x72, 0xfc, 0x73, 0xfd, 0x1ffb, 0x7fff0,
    0x1ffc, 0x3ffc, 0x22, 0x7ffd, 0x3, 0x23, 0x4, 0x24, 0x5, 0x25, 0x26, 0x27, 0x6, 0x74, 0x75,
    0x28, 0x29, 0x2a, 0x7, 0x2b, 0x76, 0x2c, 0x8, 0x9, 0x2d, 0x77, 0x78, 0x79, 0x7a, 0x7b, 0x7ffe,
    0x7fc, 0x3ffd, 0x1ffd, 0xffffffc, 0xfffe6, 0x3fffd2, 0xfffe7, 0xfffe8, 0x3fffd3, 0x3fffd4,
    0x3fffd5, 0x7fffd9, 0x3fffd6, 0x7fffda, 0x7fffdb, 0x7fffdc, 0x7fffdd, 0x7fffde, 0xffffeb,
    0x7fffdf, 0xffffec, 0xffffed, 0x3fffd7, 0x7fffe0, 0xffffee, 0x7fffe1, 0x7fffe2, 0x7fffe3,
    0x7fffe4, 0x1fffdc, 0x3fffd8, 0x7fffe5, 0x3fffd9, 0x7fffe6, 0x7fffe7, 0xffffef, 0x3fffda,
    0x1fffdd, 0xfffe9, 0x3fffdb, 0x3fffdc, 0x7fffe8, 0x7fffe9, 0x1fffde, 0x7fffea, 0x3fffdd,
    0x3fffde, 0xfffff0, 0x1fffdf, 0x3fffdf, 0x7fffeb, 0x7fffec, 0x1fffe0, 0x1fffe1, 0x3fffe0,
    0x1fffe2, 0x7fffed, 0x3fffe1, 0x7fffee, 0x7fffef, 0xfffea, 0x3fffe2, 0x3fffe3, 0x3fffe4,
    0x7ffff0, 0x3fffe5, 0x3fffe6, 0x7ffff1, 0x3ffffe0, 0x3ffffe1, 0xfffeb, 0x7fff1, 0x3fffe7,
    0x7ffff2, 0x3fffe8, 0x1ffffec, 0x3ffffe2, 0x3ffffe3, 0x3ffffe4, 0x7ffffde, 0x7ffffdf,
    0x3ffffe5, 0xfffff1, 0x1ffffed, 0x7fff2, 0x1fffe3, 0x3ffffe6, 0x7ffffe0, 0x7ffffe1, 0x3ffffe7,
    0x7ffffe2, 0xfffff2, 0x1fffe4, 0x1fffe5, 0x3ffffe8, 0x3ffffe9, 0xffffffd, 0x7ffffe3, 0x7ffffe4,
    0x7ffffe5, 0xfffec, 0xfffff3, 0xfffed, 0x1fffe6, 0x3fffe9, 0x1fffe7, 0x1fffe8, 0x7ffff3,
    0x3fffea, 0x3fffeb, 0x1ffffee, 0x1ffffef, 0xfffff4, 0xfffff5, 0x3ffffea, 0x7ffff4, 0x3ffffeb,
    0x7ffffe6, 0x3ffffec, 0x3ffffed, 0x7ffffe7, 0x7ffffe8, 0x7ffffe9, 0x7ffffea, 0x7ffffeb,
    0xffffffe, 0x7ffffec, 0x7ffffed, 0x7ffffee, 0x7ffffef, 0x7fffff0, 0x3ffffee, 0x3fffffff,
];

/// Each symbol's code length in bits, by symbol.
pub(super) const LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, 30,
];

#[cfg(test)]
mod tests {
    use super::*;

    fn decoded(src: &[u8]) -> Result<Vec<u8>, HuffmanError> {
        let mut out = BytesMut::new();
        decode(src, &mut out).map(|()| out.to_vec())
    }

    /// RFC 7541 Appendix C.4.1-C.4.3 and C.6.1's coded strings.
    #[test]
    fn the_rfc_examples_code_both_ways() {
        let cases: [(&str, &[u8]); 5] = [
            (
                "www.example.com",
                &[
                    0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
                ],
            ),
            ("no-cache", &[0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf]),
            (
                "custom-key",
                &[0x25, 0xa8, 0x49, 0xe9, 0x5b, 0xa9, 0x7d, 0x7f],
            ),
            (
                "custom-value",
                &[0x25, 0xa8, 0x49, 0xe9, 0x5b, 0xb8, 0xe8, 0xb4, 0xbf],
            ),
            ("302", &[0x64, 0x02]),
        ];
        for (text, coded) in cases {
            let mut out = BytesMut::new();
            assert_eq!(encoded_len(text.as_bytes()), coded.len());
            encode(text.as_bytes(), coded.len(), &mut out);
            assert_eq!(&out[..], coded, "{text}");
            assert_eq!(decoded(coded).as_deref(), Ok(text.as_bytes()));
        }
    }

    /// Every symbol, alone and after every other, comes back: the fast
    /// table and the canonical walk agree with the code.
    #[test]
    fn every_byte_comes_back() {
        for a in 0..=255u8 {
            for b in [0u8, b'a', 0x7f, 0xfe, 0xff] {
                let src = [a, b, a];
                let mut out = BytesMut::new();
                encode(&src, encoded_len(&src), &mut out);
                assert_eq!(decoded(&out).as_deref(), Ok(&src[..]), "{a} {b}");
            }
        }
    }

    proptest::proptest! {
        /// Any string comes back whole; any bytes decode or are refused
        /// (no panic, nothing past the 8/5 bound).
        #[test]
        fn any_string_round_trips(src in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let mut out = BytesMut::new();
            encode(&src, encoded_len(&src), &mut out);
            proptest::prop_assert_eq!(decoded(&out), Ok(src.clone()));
            if let Ok(text) = decoded(&src) {
                proptest::prop_assert!(text.len() <= src.len() * 8 / 5);
            }
        }
    }

    /// EOS inside a string, padding of a byte or more, and padding that is
    /// not all ones are refused (RFC 7541 §5.2).
    #[test]
    fn bad_padding_and_eos_are_refused() {
        // EOS (30 ones) then ones: an EOS symbol.
        assert_eq!(decoded(&[0xff, 0xff, 0xff, 0xff]), Err(HuffmanError));
        // 'a' (00011), then EOS (30 ones), then padding: EOS after symbols.
        assert_eq!(
            decoded(&[0b0001_1111, 0xff, 0xff, 0xff, 0xff]),
            Err(HuffmanError)
        );
        // 'a' (00011) then 3 bits of padding "111": fine.
        assert_eq!(decoded(&[0b0001_1111]).as_deref(), Ok(&b"a"[..]));
        // ...then padding "110": not all ones.
        assert_eq!(decoded(&[0b0001_1110]), Err(HuffmanError));
        // A whole byte of padding after 'a' '0' (5 + 5 bits, 6 of padding
        // plus a byte of ones).
        let mut out = BytesMut::new();
        encode(b"a0", 2, &mut out);
        out.extend_from_slice(&[0xff]);
        assert_eq!(decoded(&out), Err(HuffmanError));
        assert_eq!(decoded(&[]).as_deref(), Ok(&b""[..]));
    }
}
