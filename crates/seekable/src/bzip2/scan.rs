//! Finding bzip2 blocks: a pure, bit-level scanner and the synthesis of a
//! one-block stream for decoding a block on its own.
//!
//! bzip2 has no index and its blocks are not byte aligned; each starts with
//! the 48-bit magic `0x314159265359` (BCD pi) and a stream ends with
//! `0x177245385090` (BCD sqrt(pi)) followed by the stream's combined CRC.
//! The magics can also occur by chance inside compressed data, so callers
//! must treat what this finds as candidates (see the reader).

/// Start of every block.
pub const BLOCK_MAGIC: u64 = 0x3141_5926_5359;
/// End of every stream.
pub const EOS_MAGIC: u64 = 0x1772_4538_5090;
const MASK48: u64 = (1 << 48) - 1;

/// A magic found at a bit offset (the offset of its first bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    Block(u64),
    End(u64),
}

/// Streaming scanner: feed the file's bytes in order.
#[derive(Default)]
pub struct Scanner {
    window: u64,
    bits: u64,
}

impl Scanner {
    /// Scan `data`, the next bytes of the file, pushing the magics that end
    /// inside it.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<Mark>) {
        for &byte in data {
            for k in (0..8).rev() {
                self.window = ((self.window << 1) | u64::from((byte >> k) & 1)) & MASK48;
                self.bits += 1;
                if self.bits >= 48 {
                    if self.window == BLOCK_MAGIC {
                        out.push(Mark::Block(self.bits - 48));
                    } else if self.window == EOS_MAGIC {
                        out.push(Mark::End(self.bits - 48));
                    }
                }
            }
        }
    }
}

/// Big-endian bit writer.
struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl BitWriter {
    fn put(&mut self, value: u64, bits: u32) {
        for k in (0..bits).rev() {
            self.acc = (self.acc << 1) | ((value >> k) & 1);
            self.n += 1;
            if self.n == 8 {
                self.out.push(self.acc as u8);
                self.acc = 0;
                self.n = 0;
            }
        }
    }

    fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            let pad = 8 - self.n;
            self.put(0, pad);
        }
        self.out
    }
}

/// Build a complete one-block bzip2 stream from the bits
/// `[start_bit, end_bit)` of `bytes` (which holds the file from byte
/// `base_byte` on): stream header with `level`, the block as found, the
/// end-of-stream magic and a combined CRC equal to the block's own CRC
/// (for one block the combined CRC is just the block CRC).  Returns `None`
/// if the range is too short to hold a block header or not inside `bytes`.
pub fn one_block_stream(
    bytes: &[u8],
    base_byte: u64,
    start_bit: u64,
    end_bit: u64,
    level: u8,
) -> Option<Vec<u8>> {
    if end_bit < start_bit + 80 || start_bit < base_byte * 8 {
        return None;
    }
    let rel = start_bit - base_byte * 8;
    let nbits = end_bit - start_bit;
    let last_byte = (rel + nbits).div_ceil(8);
    if last_byte > bytes.len() as u64 {
        return None;
    }
    let bit = |i: u64| -> u64 {
        let p = rel + i;
        u64::from((bytes[(p / 8) as usize] >> (7 - p % 8)) & 1)
    };
    let mut crc = 0u64;
    for i in 48..80 {
        crc = (crc << 1) | bit(i);
    }
    let mut w = BitWriter {
        out: Vec::with_capacity(nbits as usize / 8 + 16),
        acc: 0,
        n: 0,
    };
    for b in [b'B', b'Z', b'h', level] {
        w.put(u64::from(b), 8);
    }
    // The writer is byte aligned after the 4-byte header, so whole bytes
    // are copied with a shift (the block's bits start `k` bits into a
    // byte); the last partial byte goes bit by bit.
    let k = (rel % 8) as u32;
    let p0 = (rel / 8) as usize;
    let full = (nbits / 8) as usize;
    for j in 0..full {
        let hi = bytes[p0 + j];
        let v = if k == 0 {
            hi
        } else {
            (hi << k) | (bytes[p0 + j + 1] >> (8 - k))
        };
        w.out.push(v);
    }
    for i in (full as u64 * 8)..nbits {
        w.put(bit(i), 1);
    }
    w.put(EOS_MAGIC, 48);
    w.put(crc, 32);
    Some(w.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_magics_at_any_bit_offset() {
        for shift in 0..8u32 {
            let mut w = BitWriter {
                out: Vec::new(),
                acc: 0,
                n: 0,
            };
            w.put(0, shift);
            w.put(BLOCK_MAGIC, 48);
            w.put(0x55, 8);
            w.put(EOS_MAGIC, 48);
            let bytes = w.finish();
            let mut s = Scanner::default();
            let mut marks = Vec::new();
            for piece in bytes.chunks(3) {
                s.feed(piece, &mut marks);
            }
            assert_eq!(
                marks,
                vec![
                    Mark::Block(u64::from(shift)),
                    Mark::End(u64::from(shift) + 56)
                ]
            );
        }
    }
}
