//! The gzip access index: checkpoints, zero runs, and their file format.
//!
//! File format (all integers little-endian), version 2:
//!
//! ```text
//! magic     8  "NBDRSGZI"
//! version   u32 (1)
//! flags     u32 (must be 0)
//! identity  comp_size u64, user u64 (hash of caller identity, 0 = none),
//!           head u64, tail u64 (FNV-1a of first/last 64 KiB)
//! span      u64
//! total     u64   decompressed size
//! ncp       u64   checkpoints
//! nzero     u64   zero runs
//! ncp × { out u64, inp u64, kind u8, bits u8, compressed u8, 0 u8,
//!         raw_len u32, stored_len u32, stored_len bytes of window }
//! nzero × { first_chunk u64, chunks u64 }
//! ncp × crc32 u32  of the compressed bytes of each checkpoint's range
//!           (see [`range_bounds`]), checked before the index is used on them
//! crc32     u32 of everything above
//! ```
//!
//! The loader ([`GzipIndex::from_bytes`]) is a pure function that checks
//! every count against the bytes that remain before allocating.

use bytes::Bytes;

use super::zstream::{self, WINDOW};

pub const MAGIC: &[u8; 8] = b"NBDRSGZI";
pub const VERSION: u32 = 2;
/// Granularity of zero tracking for `extents()`.
pub const ZERO_CHUNK: u64 = 64 * 1024;
pub const MIN_SPAN: u64 = 1024;
pub const MAX_SPAN: u64 = 1 << 30;
/// Upper bound on checkpoints (with the default 1 MiB span: 4 TiB of
/// output).  Each may carry up to 32 KiB of window, so this bounds the
/// memory an index can take, whatever a gzip bomb decompresses to.
pub const MAX_CHECKPOINTS: usize = 1 << 22;
/// Upper bound on zero runs kept (each 16 bytes).
pub const MAX_ZERO_RUNS: usize = 1 << 24;

const HEADER_LEN: usize = 80;
const CP_LEN: usize = 28;

/// Where decoding can start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// At a member header: no history needed.
    Member,
    /// Inside a deflate stream, right after a block: `bits` (0..=7) high
    /// bits of the byte before `inp` are still unread, and `window` holds
    /// the preceding history.
    Deflate { bits: u8, window: Window },
}

/// A history window as stored: zlib-compressed when that saves space (text
/// and sparse disk images shrink several-fold; random data doesn't, so it
/// is then kept raw rather than paying to decompress it for nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub raw_len: u32,
    pub compressed: bool,
    /// Owned when built here; a slice of the mapped index file when
    /// loaded.
    pub data: Bytes,
}

impl Window {
    pub fn new(raw: &[u8]) -> Window {
        match zstream::compress_window(raw) {
            Some(c) => Window {
                raw_len: raw.len() as u32,
                compressed: true,
                data: Bytes::from(c),
            },
            None => Window {
                raw_len: raw.len() as u32,
                compressed: false,
                data: Bytes::copy_from_slice(raw),
            },
        }
    }
    pub fn raw(&self) -> Result<Vec<u8>, String> {
        if self.compressed {
            zstream::decompress_window(&self.data, self.raw_len as usize)
        } else {
            Ok(self.data.to_vec())
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Decompressed offset.
    pub out: u64,
    /// Compressed offset: the member header, or the first whole byte after
    /// the block boundary.
    pub inp: u64,
    pub kind: Kind,
}

/// What identifies the compressed file an index belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub comp_size: u64,
    pub user: u64,
    pub head: u64,
    pub tail: u64,
}

impl Identity {
    /// One 64-bit digest, used for the default index file name.
    pub fn digest(&self) -> u64 {
        let mut b = Vec::with_capacity(32);
        for v in [self.comp_size, self.user, self.head, self.tail] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        fnv1a64(&b)
    }
}

/// FNV-1a, 64-bit: tiny and good enough to notice a changed file (this is
/// not a defence against an adversary who can write the image anyway).
pub fn fnv1a64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A complete index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GzipIndex {
    pub identity: Identity,
    pub span: u64,
    pub total: u64,
    pub checkpoints: Vec<Checkpoint>,
    /// Sorted, disjoint runs `(first_chunk, chunks)` of all-zero
    /// [`ZERO_CHUNK`]-sized chunks.
    pub zero_runs: Vec<(u64, u64)>,
    /// CRC-32 of the compressed bytes of each checkpoint's range (one per
    /// checkpoint, see [`range_bounds`]), recorded when the index was built:
    /// before a loaded index decodes anything, the ranges from the member's
    /// start to the end of what is decoded are checked against the file,
    /// so a window or position from different bytes is never used.
    pub range_crcs: Vec<u32>,
}

/// The compressed byte range of checkpoint `k`: from the byte before its
/// position (which holds its unread bits; 0 for the first) to the same
/// point of the next checkpoint (the end of the file for the last).  The
/// ranges are disjoint and cover the whole file.
pub fn range_bounds(cps: &[Checkpoint], comp_size: u64, k: usize) -> (u64, u64) {
    let start = |k: usize| -> u64 {
        if k == 0 {
            0
        } else {
            cps.get(k)
                .map_or(comp_size, |c| c.inp.saturating_sub(1).min(comp_size))
        }
    };
    let a = start(k);
    let b = if k + 1 >= cps.len() {
        comp_size
    } else {
        start(k + 1)
    };
    (a, b.max(a))
}

impl GzipIndex {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        let id = &self.identity;
        for v in [
            id.comp_size,
            id.user,
            id.head,
            id.tail,
            self.span,
            self.total,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&(self.checkpoints.len() as u64).to_le_bytes());
        b.extend_from_slice(&(self.zero_runs.len() as u64).to_le_bytes());
        for cp in &self.checkpoints {
            b.extend_from_slice(&cp.out.to_le_bytes());
            b.extend_from_slice(&cp.inp.to_le_bytes());
            match &cp.kind {
                Kind::Member => {
                    b.extend_from_slice(&[0, 0, 0, 0]);
                    b.extend_from_slice(&[0; 8]);
                }
                Kind::Deflate { bits, window } => {
                    b.extend_from_slice(&[1, *bits, window.compressed as u8, 0]);
                    b.extend_from_slice(&window.raw_len.to_le_bytes());
                    b.extend_from_slice(&(window.data.len() as u32).to_le_bytes());
                    b.extend_from_slice(&window.data);
                }
            }
        }
        for (s, n) in &self.zero_runs {
            b.extend_from_slice(&s.to_le_bytes());
            b.extend_from_slice(&n.to_le_bytes());
        }
        for k in 0..self.checkpoints.len() {
            let c = self.range_crcs.get(k).copied().unwrap_or(0);
            b.extend_from_slice(&c.to_le_bytes());
        }
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parse and validate an index file.  Never panics, never allocates
    /// more than the input justifies.
    pub fn from_bytes(bytes: &[u8]) -> Result<GzipIndex, String> {
        Self::from_shared(Bytes::copy_from_slice(bytes))
    }

    /// [`GzipIndex::from_bytes`] over shared bytes (e.g. a mapped index
    /// file): the windows are slices of `bytes`, not copies.
    pub fn from_shared(bytes: Bytes) -> Result<GzipIndex, String> {
        if bytes.len() < HEADER_LEN + 4 {
            return Err("index file truncated".into());
        }
        if &bytes[..8] != MAGIC {
            return Err("not a gzip index file (bad magic)".into());
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        let want = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
        if crc32fast::hash(body) != want {
            return Err("index checksum mismatch (corrupt or truncated)".into());
        }
        Self::parse_body(&bytes.slice(..body.len()))
    }

    /// [`GzipIndex::from_bytes`] without the checksum: lets a fuzzer reach
    /// the structural checks.
    #[doc(hidden)]
    pub fn from_bytes_unchecked(bytes: &[u8]) -> Result<GzipIndex, String> {
        if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
            return Err("not a gzip index file".into());
        }
        Self::parse_body(&Bytes::copy_from_slice(bytes))
    }

    fn parse_body(whole: &Bytes) -> Result<GzipIndex, String> {
        let body: &[u8] = whole;
        let mut r = Reader { b: body, pos: 8 };
        let version = r.u32()?;
        if version != VERSION {
            return Err(format!("unsupported index version {version}"));
        }
        if r.u32()? != 0 {
            return Err("unknown index flags".into());
        }
        let identity = Identity {
            comp_size: r.u64()?,
            user: r.u64()?,
            head: r.u64()?,
            tail: r.u64()?,
        };
        let span = r.u64()?;
        let total = r.u64()?;
        let ncp = r.u64()?;
        let nzero = r.u64()?;
        if !(MIN_SPAN..=MAX_SPAN).contains(&span) {
            return Err(format!("bad span {span}"));
        }
        let remaining = (body.len() - r.pos) as u64;
        if ncp > MAX_CHECKPOINTS as u64 || ncp.saturating_mul(CP_LEN as u64) > remaining {
            return Err(format!("bad checkpoint count {ncp}"));
        }
        if nzero > MAX_ZERO_RUNS as u64 || nzero.saturating_mul(16) > remaining {
            return Err(format!("bad zero-run count {nzero}"));
        }
        if (total == 0) != (ncp == 0) {
            return Err("checkpoint count inconsistent with size".into());
        }
        let mut checkpoints = Vec::with_capacity(ncp as usize);
        for i in 0..ncp {
            let out = r.u64()?;
            let inp = r.u64()?;
            let head = r.take(4)?;
            let (kind, bits, compressed, pad) = (head[0], head[1], head[2], head[3]);
            if pad != 0 {
                return Err(format!("checkpoint {i}: bad padding"));
            }
            let raw_len = r.u32()?;
            let stored_len = r.u32()?;
            let kind = match kind {
                0 if bits == 0 && compressed == 0 && raw_len == 0 && stored_len == 0 => {
                    Kind::Member
                }
                1 if bits <= 7 && compressed <= 1 && raw_len as usize <= WINDOW => {
                    if compressed == 0 && stored_len != raw_len {
                        return Err(format!("checkpoint {i}: bad raw window length"));
                    }
                    let data = r.take(stored_len as usize)?;
                    Kind::Deflate {
                        bits,
                        window: Window {
                            raw_len,
                            compressed: compressed == 1,
                            data: whole.slice_ref(data),
                        },
                    }
                }
                _ => return Err(format!("checkpoint {i}: bad kind/fields")),
            };
            if inp >= identity.comp_size || out >= total {
                return Err(format!("checkpoint {i}: offset out of range"));
            }
            if let Some(prev) = checkpoints.last() {
                let prev: &Checkpoint = prev;
                if out <= prev.out || inp < prev.inp {
                    return Err(format!("checkpoint {i}: not in order"));
                }
            } else if out != 0 {
                return Err("first checkpoint is not at offset 0".into());
            }
            checkpoints.push(Checkpoint { out, inp, kind });
        }
        let chunks = total.div_ceil(ZERO_CHUNK);
        let mut zero_runs = Vec::with_capacity(nzero as usize);
        let mut next = 0u64;
        for _ in 0..nzero {
            let s = r.u64()?;
            let n = r.u64()?;
            let end = s.checked_add(n).ok_or("zero run overflows")?;
            if n == 0 || s < next || end > chunks {
                return Err("bad zero run".into());
            }
            next = end;
            zero_runs.push((s, n));
        }
        let mut range_crcs = Vec::with_capacity(checkpoints.len());
        for _ in 0..checkpoints.len() {
            range_crcs.push(r.u32()?);
        }
        if r.pos != body.len() {
            return Err("trailing bytes in index".into());
        }
        Ok(GzipIndex {
            identity,
            span,
            total,
            checkpoints,
            zero_runs,
            range_crcs,
        })
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).ok_or("overflow")?;
        let s = self.b.get(self.pos..end).ok_or("index truncated")?;
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, String> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
}

/// Index of the checkpoint to start from to decode offset `out`.
pub fn checkpoint_for(cps: &[Checkpoint], out: u64) -> Option<usize> {
    cps.partition_point(|c| c.out <= out).checked_sub(1)
}

/// Chooses checkpoints among the resumable points (member starts and block
/// boundaries) the walk passes: for each multiple of `span`, the last such
/// point at or before it.  Decoding span `k` then starts at most one deflate
/// block before `k * span` and never holds more than `span` bytes of output.
pub struct Emitter {
    span: u64,
    next_mark: u64,
    pending: Option<(u64, u64, u8, bool)>,
    pending_window: Vec<u8>,
    last_out: Option<u64>,
    total_emitted: usize,
    pub fresh: Vec<Checkpoint>,
}

impl Emitter {
    pub fn new(span: u64) -> Self {
        Emitter {
            span,
            next_mark: 0,
            pending: None,
            pending_window: Vec::with_capacity(WINDOW),
            last_out: None,
            total_emitted: 0,
            fresh: Vec::new(),
        }
    }

    /// Call with each resumable point's output offset before
    /// [`Emitter::set_pending`]: emits the checkpoints for all marks below
    /// `out`.  Returns whether the new point should become pending (it is
    /// further on than the current one).
    pub fn advance(&mut self, out: u64) -> Result<bool, String> {
        while self.next_mark < out {
            self.emit()?;
            self.next_mark += self.span;
        }
        Ok(self.pending.is_none_or(|p| out > p.0))
    }

    /// Record a resumable point; `fill` writes its window (Deflate only).
    pub fn set_pending(
        &mut self,
        out: u64,
        inp: u64,
        bits: u8,
        deflate: bool,
        fill: impl FnOnce(&mut Vec<u8>) -> Result<(), String>,
    ) -> Result<(), String> {
        if deflate {
            fill(&mut self.pending_window)?;
        } else {
            self.pending_window.clear();
        }
        self.pending = Some((out, inp, bits, deflate));
        Ok(())
    }

    /// End of data at `total`: emit what the remaining marks need.
    pub fn finish(&mut self, total: u64) -> Result<(), String> {
        while self.next_mark < total {
            self.emit()?;
            self.next_mark += self.span;
        }
        Ok(())
    }

    fn emit(&mut self) -> Result<(), String> {
        let Some((out, inp, bits, deflate)) = self.pending else {
            return Err("no resumable point before span mark".into());
        };
        if self.last_out == Some(out) {
            return Ok(());
        }
        if self.total_emitted >= MAX_CHECKPOINTS {
            return Err(format!(
                "more than {MAX_CHECKPOINTS} checkpoints needed: decompressed size too large for span {}",
                self.span
            ));
        }
        let kind = if deflate {
            Kind::Deflate {
                bits,
                window: Window::new(&self.pending_window),
            }
        } else {
            Kind::Member
        };
        self.fresh.push(Checkpoint { out, inp, kind });
        self.last_out = Some(out);
        self.total_emitted += 1;
        Ok(())
    }
}

/// Finds all-zero [`ZERO_CHUNK`]s in output fed in order.
#[derive(Default)]
pub struct ZeroTracker {
    cur: Option<(u64, bool)>,
    pub fresh: Vec<(u64, u64)>,
    last: Option<(u64, u64)>,
    count: usize,
}

impl ZeroTracker {
    /// Feed output bytes at decompressed offset `out`.
    pub fn feed(&mut self, out: u64, data: &[u8]) {
        zero_parts(out, data, &mut |chunk, zero| self.part(chunk, zero));
    }

    /// Feed the verdict for (part of) a chunk; parts arrive in order.
    pub fn part(&mut self, chunk: u64, zero: bool) {
        match &mut self.cur {
            Some((c, z)) if *c == chunk => *z &= zero,
            _ => {
                self.close();
                self.cur = Some((chunk, zero));
            }
        }
    }

    /// The data ended: settle the last chunk.
    pub fn finish(&mut self) {
        self.close();
        self.flush_last();
    }

    /// Completed runs found since the last call.
    pub fn take_fresh(&mut self) -> Vec<(u64, u64)> {
        // Keep `last` open: the next chunk may extend it.
        std::mem::take(&mut self.fresh)
    }

    fn close(&mut self) {
        if let Some((c, true)) = self.cur.take() {
            match &mut self.last {
                Some((s, n)) if *s + *n == c => *n += 1,
                _ => {
                    self.flush_last();
                    self.last = Some((c, 1));
                }
            }
        }
    }

    fn flush_last(&mut self) {
        if let Some(run) = self.last.take() {
            if self.count < MAX_ZERO_RUNS {
                self.fresh.push(run);
                self.count += 1;
            }
        }
    }

    /// Runs published so far plus the open one (for a snapshot).
    pub fn open_run(&self) -> Option<(u64, u64)> {
        self.last
    }
}

/// Split `data` (at decompressed offset `out`) by chunk and report for
/// each piece whether it is all zero.
pub fn zero_parts(mut out: u64, mut data: &[u8], f: &mut impl FnMut(u64, bool)) {
    while !data.is_empty() {
        let chunk = out / ZERO_CHUNK;
        let room = (ZERO_CHUNK - out % ZERO_CHUNK) as usize;
        let (piece, rest) = data.split_at(room.min(data.len()));
        f(chunk, is_zero(piece));
        out += piece.len() as u64;
        data = rest;
    }
}

/// The crate's one all-zero test (vectorised).
pub(crate) use crate::is_zero;

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> GzipIndex {
        GzipIndex {
            identity: Identity {
                comp_size: 1000,
                user: 0,
                head: 1,
                tail: 2,
            },
            span: 4096,
            total: 300_000,
            checkpoints: vec![
                Checkpoint {
                    out: 0,
                    inp: 0,
                    kind: Kind::Member,
                },
                Checkpoint {
                    out: 70_000,
                    inp: 500,
                    kind: Kind::Deflate {
                        bits: 3,
                        window: Window::new(&[7u8; 5000]),
                    },
                },
                Checkpoint {
                    out: 80_000,
                    inp: 600,
                    kind: Kind::Deflate {
                        bits: 0,
                        window: Window::new(&[1, 2, 3]),
                    },
                },
            ],
            zero_runs: vec![(1, 2), (4, 1)],
            range_crcs: (0..3).map(|k| 0x1234_5678 ^ k).collect(),
        }
    }

    #[test]
    fn roundtrip() {
        let idx = sample();
        let b = idx.to_bytes();
        assert_eq!(GzipIndex::from_bytes(&b), Ok(idx));
    }

    #[test]
    fn rejects_every_truncation_and_flip() {
        let b = sample().to_bytes();
        for n in 0..b.len() {
            assert!(GzipIndex::from_bytes(&b[..n]).is_err());
        }
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x40;
            assert!(GzipIndex::from_bytes(&c).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn zero_tracker_runs() {
        let mut z = ZeroTracker::default();
        let mut data = vec![0u8; 5 * ZERO_CHUNK as usize];
        data[2 * ZERO_CHUNK as usize + 5] = 1;
        for piece in data.chunks(10_000).enumerate() {
            z.feed(piece.0 as u64 * 10_000, piece.1);
        }
        z.finish();
        assert_eq!(z.take_fresh(), vec![(0, 2), (3, 2)]);
    }
}
