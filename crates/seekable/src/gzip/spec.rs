//! Speculative parallel inflate of one gzip member that was written in
//! independent pieces (`pigz -i`, or any writer that drops its history at
//! flush points).
//!
//! Such writers end each piece with an empty stored block, whose LEN/NLEN
//! bytes `00 00 ff ff` end byte-aligned, and start the next piece without
//! history.  The walk scans ahead for those markers, cuts the compressed
//! data into [`Segment`]s that start and end right after one, and workers
//! inflate segments from a fresh state ([`decode_segment`]) while the
//! walking thread commits them in file order.
//!
//! Nothing found this way is trusted.  A marker may be chance bytes, and a
//! piece may use history from before it (plain `pigz` also writes markers
//! but keeps the history).  The walk commits a segment only when (a) the
//! real decoding, which it tracks, is at a block boundary exactly at the
//! segment's start, and (b) the worker, starting there with an empty
//! window, reached a block boundary exactly at the segment's end, or the
//! end of the deflate stream.  A fresh inflater rejects a back-reference
//! into history it does not have ("invalid distance too far back"), so (b)
//! means the output did not depend on anything before the segment, and
//! (a) and (b) together give exactly the bytes a serial decode gives.
//! Otherwise the walk decodes serially from its committed state until it
//! lands on the next segment start.
//!
//! No crate does this (rapidgzip does something more general in C++), so it
//! is written here, on the same zlib-rs calls as the rest of the walk.

use std::sync::atomic::{AtomicBool, Ordering};

use memchr::memmem;

use super::index::{is_zero, ZERO_CHUNK};
use super::zstream::{Inflater, Status};
use super::{Fail, Shared};

/// A segment's compressed size, at least (it ends at the first marker past
/// this).
pub(super) const SEG_TARGET: usize = 512 * 1024;
/// Without a marker this far past where one was wanted, the member is not
/// written in pieces: stop speculating for the rest of it.  So a plain
/// gzip file costs a scan of a few MiB.
pub(super) const MAX_GAP: usize = 4 << 20;
/// Consecutive segments whose fresh decode failed before speculation stops
/// for the rest of the member (plain `pigz` keeps history across pieces).
pub(super) const MAX_FAILS: u32 = 4;
/// A segment whose checkpoints would hold more than this many bytes of
/// (non-zero) windows is left to the serial decoder (a gzip bomb of
/// incompressible history): what a worker holds for the walk stays a few
/// MiB.  All-zero windows (free space in a disk image) cost nothing.
const MAX_WINDOW_BYTES: usize = 8 << 20;
const READ_STEP: usize = 1 << 20;
/// Zero runs shorter than this, away from a segment's ends, may go unseen.
const ZERO_PIECE: u64 = 4096;
const MARKER: &[u8] = &[0, 0, 0xff, 0xff];

/// Compressed bytes from just after one marker to just after a later one.
pub(super) struct Segment {
    pub start: u64,
    pub data: Vec<u8>,
}

impl Segment {
    pub fn end(&self) -> u64 {
        self.start + self.data.len() as u64
    }
}

/// A block boundary inside a segment worth a checkpoint.
pub(super) struct Point {
    /// Output offset relative to the segment start.
    pub rel: u64,
    pub inp: u64,
    pub bits: u8,
    /// The history before the point; empty when it is `zero_window` zero
    /// bytes.
    pub window: Vec<u8>,
    pub zero_window: usize,
}

/// What a worker's fresh decode of a segment produced (the output itself
/// is not kept: only what the index needs).
pub(super) struct Decoded {
    pub len: u64,
    pub crc: crc32fast::Hasher,
    /// Where decoding stopped: the segment's end, or the end of the
    /// deflate stream inside it.
    pub end: u64,
    pub stream_end: bool,
    /// The last (up to 32 KiB) bytes of output, when it stopped at the
    /// segment's end.
    pub tail: Vec<u8>,
    /// Resumable points at least `span / 4` of output apart.
    pub points: Vec<Point>,
    /// Zero runs `[start, end)` relative to the segment start: those at
    /// least a [`ZERO_CHUNK`] long, and those touching either end.
    pub zeros: Vec<(u64, u64)>,
}

/// Why a segment was not decoded independently: the walk decodes it
/// serially.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refused {
    /// It depends on earlier history, its start is not a block boundary,
    /// it does not end at one, or the walk stopped.
    Dependent,
    /// Its checkpoints' windows would be too large to hold
    /// ([`MAX_WINDOW_BYTES`]): not a sign that the member lacks pieces.
    TooLarge,
}

/// Inflate `seg` from a fresh state.
pub(super) fn decode_segment(
    seg: &Segment,
    span: u64,
    stop: &AtomicBool,
) -> Result<Decoded, Refused> {
    use Refused::Dependent;
    let mut inf = Inflater::new_raw().map_err(|_| Dependent)?;
    let mut obuf = vec![0u8; 256 * 1024];
    let mut data = &seg.data[..];
    let mut crc = crc32fast::Hasher::new();
    let mut len = 0u64;
    let mut zeros = ZeroRuns::default();
    let mut points = Vec::new();
    let every = (span / 4).max(16 * 1024);
    let mut next_point = every;
    let mut window_bytes = 0usize;
    loop {
        if stop.load(Ordering::Relaxed) {
            return Err(Dependent);
        }
        let step = inf.inflate(data, &mut obuf, true).map_err(|_| Dependent)?;
        data = &data[step.consumed..];
        let out = &obuf[..step.produced];
        crc.update(out);
        zeros.feed(len, out);
        len += out.len() as u64;
        if window_bytes > MAX_WINDOW_BYTES {
            return Err(Refused::TooLarge);
        }
        let consumed = (seg.data.len() - data.len()) as u64;
        if step.status == Status::StreamEnd {
            return Ok(Decoded {
                len,
                crc,
                end: seg.start + consumed,
                stream_end: true,
                tail: Vec::new(),
                points,
                zeros: zeros.finish(len),
            });
        }
        if step.at_block_boundary() {
            let nbits = step.unused_bits();
            if data.is_empty() && nbits == 0 {
                let mut tail = Vec::new();
                inf.get_dictionary(&mut tail).map_err(|_| Dependent)?;
                return Ok(Decoded {
                    len,
                    crc,
                    end: seg.end(),
                    stream_end: false,
                    tail,
                    points,
                    zeros: zeros.finish(len),
                });
            }
            if len >= next_point {
                let mut window = Vec::new();
                inf.get_dictionary(&mut window).map_err(|_| Dependent)?;
                let mut zero_window = 0;
                if is_zero(&window) {
                    zero_window = window.len();
                    window = Vec::new();
                }
                window_bytes += window.len();
                points.push(Point {
                    rel: len,
                    inp: seg.start + consumed - (nbits / 8) as u64,
                    bits: (nbits % 8) as u8,
                    window,
                    zero_window,
                });
                next_point = len + every;
            }
        }
        if step.consumed == 0 && step.produced == 0 {
            // Out of input inside a block: the segment's end is not a
            // block boundary of this decode.
            return Err(Dependent);
        }
    }
}

/// Finds segments ahead of the walk.
pub(super) struct Scanner {
    /// Where to look for the next segment.
    pub pos: u64,
    /// `pos` is right after a marker (the previous segment's end).
    aligned: bool,
    pub active: bool,
}

impl Scanner {
    pub fn new(pos: u64) -> Scanner {
        Scanner {
            pos,
            aligned: false,
            active: true,
        }
    }

    /// Look again from `pos` (the walk went past everything scanned).
    pub fn restart(&mut self, pos: u64) {
        self.pos = pos;
        self.aligned = false;
    }

    /// The next segment, or `None` (and inactive) when markers are too
    /// sparse or the file ends before the next one.
    pub fn next(&mut self, sh: &Shared) -> Result<Option<Segment>, Fail> {
        if !self.active {
            return Ok(None);
        }
        if !self.aligned {
            match self.find(sh, self.pos, 0)? {
                Some((start, _)) => {
                    self.pos = start;
                    self.aligned = true;
                }
                None => {
                    self.active = false;
                    return Ok(None);
                }
            }
        }
        match self.find(sh, self.pos, SEG_TARGET)? {
            Some((end, mut data)) => {
                data.truncate((end - self.pos) as usize);
                let seg = Segment {
                    start: self.pos,
                    data,
                };
                self.pos = end;
                Ok(Some(seg))
            }
            None => {
                self.active = false;
                Ok(None)
            }
        }
    }

    /// The first offset right after a marker that is at least `min` bytes
    /// past `from` and at most `min + MAX_GAP`, with the bytes read from
    /// `from` (at least up to it).
    fn find(&self, sh: &Shared, from: u64, min: usize) -> Result<Option<(u64, Vec<u8>)>, Fail> {
        let limit = min + MAX_GAP;
        let mut buf: Vec<u8> = Vec::new();
        let mut searched = 0usize;
        let finder = memmem::Finder::new(MARKER);
        loop {
            let have = buf.len() as u64;
            let left = sh.comp_size.saturating_sub(from + have);
            let get = (READ_STEP as u64).min(left) as usize;
            if get == 0 {
                // The file ends first: a last segment up to it (a fresh
                // decode must then find the end of the deflate stream).
                if min > 0 && !buf.is_empty() {
                    return Ok(Some((from + have, buf)));
                }
                return Ok(None);
            }
            buf.resize(buf.len() + get, 0);
            sh.source
                .read_exact_at(&mut buf[have as usize..], from + have)
                .map_err(|e| sh.fail_io(from + have, e))?;
            // A marker ending at `min` or later starts at `min - 4` or later.
            let lo = searched.max(min.saturating_sub(MARKER.len()));
            if lo >= buf.len() {
                continue;
            }
            if let Some(i) = finder.find(&buf[lo..]) {
                let end = lo + i + MARKER.len();
                if end <= limit {
                    return Ok(Some((from + end as u64, buf)));
                }
                return Ok(None);
            }
            searched = buf.len().saturating_sub(MARKER.len() - 1);
            if searched > limit {
                return Ok(None);
            }
        }
    }
}

/// Zero runs of a segment's output, exact to the byte for every run of at
/// least a [`ZERO_PIECE`] (output is scanned in pieces; only runs inside
/// one piece, too short to matter, are not seen).  Runs touching either
/// end are kept whatever their length: they may join runs of the
/// neighbouring output.
struct ZeroRuns {
    runs: Vec<(u64, u64)>,
    /// Start of the zero run the output so far ends in.
    open: Option<u64>,
}

impl Default for ZeroRuns {
    fn default() -> Self {
        ZeroRuns {
            runs: Vec::new(),
            open: Some(0),
        }
    }
}

impl ZeroRuns {
    fn feed(&mut self, rel: u64, mut data: &[u8]) {
        let mut pos = rel;
        while !data.is_empty() {
            let piece_end = (pos / ZERO_PIECE + 1) * ZERO_PIECE;
            let n = ((piece_end - pos) as usize).min(data.len());
            let (piece, rest) = data.split_at(n);
            if !is_zero(piece) {
                let first = piece.iter().position(|&b| b != 0).unwrap_or(0);
                let last = piece.iter().rposition(|&b| b != 0).unwrap_or(0);
                if let Some(s) = self.open.take() {
                    self.push(s, pos + first as u64);
                }
                if last + 1 < piece.len() {
                    self.open = Some(pos + last as u64 + 1);
                }
            } else if self.open.is_none() {
                self.open = Some(pos);
            }
            pos += n as u64;
            data = rest;
        }
    }

    fn push(&mut self, s: u64, e: u64) {
        if e > s && (e - s >= ZERO_CHUNK || s == 0) {
            self.runs.push((s, e));
        }
    }

    fn finish(mut self, len: u64) -> Vec<(u64, u64)> {
        if let Some(s) = self.open.take() {
            if len > s {
                // Touches the end: kept whatever its length.
                self.runs.push((s, len));
            }
        }
        self.runs
    }
}

/// Turn a segment's zero runs into per-[`ZERO_CHUNK`] verdicts for output
/// `[abs, abs + len)`, in order.
pub(super) fn zero_verdicts(
    abs: u64,
    len: u64,
    runs: &[(u64, u64)],
    f: &mut impl FnMut(u64, bool),
) {
    if len == 0 {
        return;
    }
    let (first, last) = (abs / ZERO_CHUNK, (abs + len - 1) / ZERO_CHUNK);
    let mut r = 0;
    for chunk in first..=last {
        let s = (chunk * ZERO_CHUNK).max(abs) - abs;
        let e = ((chunk + 1) * ZERO_CHUNK).min(abs + len) - abs;
        while r < runs.len() && runs[r].1 <= s {
            r += 1;
        }
        f(chunk, r < runs.len() && runs[r].0 <= s && runs[r].1 >= e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs_of(data: &[u8], step: usize) -> Vec<(u64, u64)> {
        let mut z = ZeroRuns::default();
        let mut rel = 0u64;
        for piece in data.chunks(step) {
            z.feed(rel, piece);
            rel += piece.len() as u64;
        }
        z.finish(rel)
    }

    #[test]
    fn zero_runs_whole_pieces_and_edges() {
        let mut d = vec![0u8; 300_000];
        d[5000] = 1;
        d[200_000] = 7;
        d[250_000] = 7; // 49_999 zeroes between: short, interior, dropped
        for step in [1000, 4096, 65536, 300_000] {
            let runs = runs_of(&d, step);
            assert_eq!(
                runs,
                vec![(0, 5000), (5001, 200_000), (250_001, 300_000)],
                "step {step}"
            );
        }
        let all = runs_of(&[0u8; 10], 3);
        assert_eq!(all, vec![(0, 10)]);
        assert!(runs_of(&[1u8; 5000], 100).is_empty());
        // A run inside one piece is not seen; at the edges it is.
        let mut e = vec![1u8; 9000];
        e[100..200].fill(0);
        e[..10].fill(0);
        e[8990..].fill(0);
        assert_eq!(runs_of(&e, 777), vec![(0, 10), (8990, 9000)]);
    }

    #[test]
    fn verdicts_cover_only_whole_chunk_overlaps() {
        let k = ZERO_CHUNK;
        // Segment at abs k/2 of length 3k; zero everywhere but [k, k+1).
        let runs = vec![(0, k), (k + 4096, 3 * k)];
        let mut v = Vec::new();
        zero_verdicts(k / 2, 3 * k, &runs, &mut |c, z| v.push((c, z)));
        // chunk 0: [k/2, k) rel [0, k/2) zero; chunk 1: rel [k/2, 3k/2)
        // contains rel k: dirty; chunk 2: rel [3k/2, 5k/2) zero; chunk 3:
        // rel [5k/2, 3k) zero.
        assert_eq!(v, vec![(0, true), (1, false), (2, true), (3, true)]);
    }
}
