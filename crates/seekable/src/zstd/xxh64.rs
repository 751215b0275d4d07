//! XXH64, written from the published algorithm description, streaming.
//!
//! The seekable format stores the low 32 bits of each frame's XXH64 in the
//! seek table (the reference writer leaves the frames' own checksums off),
//! so this is what verifies the data of such files.  zstd's bindings do not
//! expose their internal copy.

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

fn round(acc: u64, lane: u64) -> u64 {
    acc.wrapping_add(lane.wrapping_mul(P2))
        .rotate_left(31)
        .wrapping_mul(P1)
}

fn merge(acc: u64, v: u64) -> u64 {
    (acc ^ round(0, v)).wrapping_mul(P1).wrapping_add(P4)
}

fn lane(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Streaming XXH64 with seed 0.
#[derive(Clone)]
pub struct Xxh64 {
    v: [u64; 4],
    total: u64,
    buf: [u8; 32],
    buffered: usize,
}

impl Default for Xxh64 {
    fn default() -> Self {
        Xxh64 {
            v: [P1.wrapping_add(P2), P2, 0, 0u64.wrapping_sub(P1)],
            total: 0,
            buf: [0; 32],
            buffered: 0,
        }
    }
}

impl Xxh64 {
    fn stripe(v: &mut [u64; 4], s: &[u8]) {
        for (i, acc) in v.iter_mut().enumerate() {
            *acc = round(*acc, lane(&s[i * 8..]));
        }
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        if self.buffered > 0 {
            let take = (32 - self.buffered).min(data.len());
            self.buf[self.buffered..self.buffered + take].copy_from_slice(&data[..take]);
            self.buffered += take;
            data = &data[take..];
            if self.buffered < 32 {
                return;
            }
            let b = self.buf;
            Self::stripe(&mut self.v, &b);
            self.buffered = 0;
        }
        let mut it = data.chunks_exact(32);
        for s in &mut it {
            Self::stripe(&mut self.v, s);
        }
        let rest = it.remainder();
        self.buf[..rest.len()].copy_from_slice(rest);
        self.buffered = rest.len();
    }

    pub fn digest(&self) -> u64 {
        let [v1, v2, v3, v4] = self.v;
        let mut acc = if self.total >= 32 {
            let a = v1
                .rotate_left(1)
                .wrapping_add(v2.rotate_left(7))
                .wrapping_add(v3.rotate_left(12))
                .wrapping_add(v4.rotate_left(18));
            merge(merge(merge(merge(a, v1), v2), v3), v4)
        } else {
            P5
        };
        acc = acc.wrapping_add(self.total);
        let mut rest = &self.buf[..self.buffered];
        while rest.len() >= 8 {
            acc ^= round(0, lane(rest));
            acc = acc.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
            rest = &rest[8..];
        }
        if rest.len() >= 4 {
            let w = u64::from(u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]));
            acc ^= w.wrapping_mul(P1);
            acc = acc.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
            rest = &rest[4..];
        }
        for &b in rest {
            acc ^= u64::from(b).wrapping_mul(P5);
            acc = acc.rotate_left(11).wrapping_mul(P1);
        }
        acc ^= acc >> 33;
        acc = acc.wrapping_mul(P2);
        acc ^= acc >> 29;
        acc = acc.wrapping_mul(P3);
        acc ^ (acc >> 32)
    }
}

/// XXH64 of a whole buffer.
pub fn xxh64(data: &[u8]) -> u64 {
    let mut h = Xxh64::default();
    h.update(data);
    h.digest()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_zstd_frame_checksums() {
        // A zstd frame's content checksum is the low 32 bits of XXH64.
        for len in [0usize, 1, 3, 4, 7, 8, 31, 32, 33, 100, 1000, 100_000] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 253) as u8).collect();
            let mut c = ::zstd::bulk::Compressor::new(1).unwrap();
            c.set_parameter(::zstd::zstd_safe::CParameter::ChecksumFlag(true))
                .unwrap();
            let frame = c.compress(&data).unwrap();
            let n = frame.len();
            let stored =
                u32::from_le_bytes([frame[n - 4], frame[n - 3], frame[n - 2], frame[n - 1]]);
            assert_eq!(xxh64(&data) as u32, stored, "len {len}");
            // Streaming in odd pieces gives the same answer.
            let mut h = Xxh64::default();
            for piece in data.chunks(13) {
                h.update(piece);
            }
            assert_eq!(h.digest(), xxh64(&data));
        }
    }
}
