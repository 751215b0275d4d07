//! Progressive decoding of one huge compressed unit (an xz block or a zstd
//! frame) that has no internal seek points.
//!
//! Such a unit can only be decoded from its start.  Keeping it whole in
//! memory is not an option (it may be many GiB), and decoding it again from
//! the start for every read is quadratic.  Instead one thread at a time
//! advances a *frontier*: it decodes the next step into a small buffer and
//! writes it to a scratch file, leaving all-zero chunks as holes (disk images
//! are mostly zeroes, so the scratch file stays small).  Bytes behind the
//! frontier are immutable and are read back with `pread` by any number of
//! threads without a lock; reads beyond it wait until the frontier passes
//! them.  Every byte is therefore decoded at most once per reader, and
//! memory stays at one step buffer plus the codec's own window.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use crate::spill::Budget;
use crate::sync::{CondvarExt, LockExt};
use crate::{is_zero, read_exact, Error, Result};

/// A decoder producing the decompressed bytes of one unit in order.
pub(crate) trait StreamDecoder: Send {
    /// Write decompressed bytes into `out` (at least one unless `out` is
    /// empty or the unit has ended) and return how many.  `Ok(0)` means
    /// the unit is complete and its integrity check (if any) has passed.
    fn read(&mut self, out: &mut [u8]) -> Result<usize>;
}

/// The compressed bytes of one unit (xz block, lzip member, zstd frame) as
/// a streaming decoder consumes them: read from the source `step` bytes at
/// a time, when the previous read is used up.
pub(crate) struct Input {
    source: Arc<dyn crate::Source>,
    name: String,
    step: u64,
    buf: Vec<u8>,
    at: usize,
    /// Next compressed offset to read, and where the unit ends.
    next: u64,
    end: u64,
}

impl Input {
    pub(crate) fn new(
        source: Arc<dyn crate::Source>,
        name: &str,
        range: std::ops::Range<u64>,
        step: u64,
    ) -> Self {
        Input {
            source,
            name: name.to_string(),
            step,
            buf: Vec::new(),
            at: 0,
            next: range.start,
            end: range.end,
        }
    }

    /// The bytes read and not consumed yet; more are read when none are.
    pub(crate) fn fill(&mut self) -> Result<&[u8]> {
        if self.at == self.buf.len() && self.next < self.end {
            let n = (self.end - self.next).min(self.step) as usize;
            self.buf.resize(n, 0);
            read_exact(&*self.source, &self.name, &mut self.buf, self.next)?;
            self.next += n as u64;
            self.at = 0;
        }
        Ok(&self.buf[self.at..])
    }

    pub(crate) fn consume(&mut self, n: usize) {
        self.at += n;
    }

    /// Compressed offset of the next byte to consume, for messages.
    pub(crate) fn offset(&self) -> u64 {
        self.next - (self.buf.len() - self.at) as u64
    }

    /// Where the unit ends.
    pub(crate) fn end(&self) -> u64 {
        self.end
    }

    /// Whether the last of the unit's bytes has been read from the source.
    pub(crate) fn all_read(&self) -> bool {
        self.next == self.end
    }

    /// Whether every byte of the unit has been consumed.
    pub(crate) fn is_done(&self) -> bool {
        self.at == self.buf.len() && self.all_read()
    }
}

/// Granularity of zero tracking, both here and for in-memory blocks.  64
/// KiB matches typical NBD request sizes and filesystem cluster sizes, and
/// costs one bit per chunk.
pub(crate) const CHUNK: u64 = 64 << 10;

/// Bytes decoded per step: a multiple of `CHUNK` so that chunks never
/// straddle steps, and big enough to amortise the lock round trip.
const STEP: usize = 1 << 20;

/// Fill `buf` completely unless the unit ends first; returns bytes filled.
pub(crate) fn read_full(dec: &mut dyn StreamDecoder, buf: &mut [u8]) -> Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = dec.read(&mut buf[filled..])?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

/// Set bit `i` in a growable bitmap.
pub(crate) fn set_bit(bits: &mut Vec<u64>, i: u64) {
    let word = (i / 64) as usize;
    if bits.len() <= word {
        bits.resize(word + 1, 0);
    }
    bits[word] |= 1 << (i % 64);
}

pub(crate) fn get_bit(bits: &[u64], i: u64) -> bool {
    bits.get((i / 64) as usize)
        .is_some_and(|w| w & (1 << (i % 64)) != 0)
}

pub(crate) struct Progressive {
    name: String,
    format: &'static str,
    /// Compressed offset of the unit, for error messages.
    coffset: u64,
    /// Decompressed size when the container says it; checked at the end.
    expected: Option<u64>,
    /// Serve nothing before the whole unit has decoded and passed its
    /// check (every unit but the only one of a file, unless lazy).
    verify_first: bool,
    scratch: File,
    state: Mutex<State>,
    cv: Condvar,
    /// The reader's scratch bound, once the engine has adopted this unit;
    /// every step reserves from it before writing.
    budget: OnceLock<Arc<Budget>>,
    /// Non-zero bytes written to the scratch file (released on drop).
    written: AtomicU64,
    /// When this unit was last read (the engine's clock), for eviction.
    pub(crate) last_use: AtomicU64,
}

impl Drop for Progressive {
    fn drop(&mut self) {
        if let Some(b) = self.budget.get() {
            b.release(self.written.load(Ordering::Relaxed));
        }
    }
}

struct State {
    decoder: Option<Box<dyn StreamDecoder>>,
    /// Bytes `[0, frontier)` are in the scratch file (or known zero).
    frontier: u64,
    done: bool,
    /// A thread is decoding the next step (with the lock released).
    busy: bool,
    /// A decode error is permanent: the data cannot be decoded past it.
    failed: Option<Error>,
    /// One bit per `CHUNK` behind the frontier: set when all zero (and
    /// therefore never written to the scratch file).
    zero: Vec<u64>,
    buf: Vec<u8>,
}

impl Progressive {
    pub(crate) fn new(
        name: &str,
        format: &'static str,
        coffset: u64,
        expected: Option<u64>,
        decoder: Box<dyn StreamDecoder>,
        scratch_dir: Option<&std::path::Path>,
        verify_first: bool,
    ) -> Result<Self> {
        let scratch = match scratch_dir {
            Some(dir) => tempfile::tempfile_in(dir),
            None => tempfile::tempfile(),
        }
        .map_err(Error::Scratch)?;
        Ok(Progressive {
            name: name.to_string(),
            format,
            coffset,
            expected,
            verify_first,
            scratch,
            state: Mutex::new(State {
                decoder: Some(decoder),
                frontier: 0,
                done: false,
                busy: false,
                failed: None,
                zero: Vec::new(),
                buf: Vec::new(),
            }),
            cv: Condvar::new(),
            budget: OnceLock::new(),
            written: AtomicU64::new(0),
            last_use: AtomicU64::new(0),
        })
    }

    /// Count this unit's scratch bytes, now and from now on, against
    /// `budget` (what it wrote before, e.g. at open, is counted even if it
    /// goes over: it is on disk already).
    pub(crate) fn adopt(&self, budget: &Arc<Budget>) {
        if self.budget.set(budget.clone()).is_ok() {
            let w = self.written.load(Ordering::Relaxed);
            if !budget.try_reserve(w) {
                budget.force_reserve(w);
            }
        }
    }

    /// Non-zero bytes this unit holds in its scratch file.
    pub(crate) fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    fn corrupt(&self, offset: u64, reason: String) -> Error {
        Error::corrupt(&self.name, self.format, offset, reason)
    }

    /// Bytes decoded so far.
    pub(crate) fn frontier(&self) -> u64 {
        self.state.lock_unpoisoned().frontier
    }

    /// Decode until at least `target` bytes are behind the frontier or the
    /// unit ends.  Only one thread decodes; the others wait on the condvar
    /// and are woken after every step, so a reader whose range is already
    /// covered does not wait for the whole advance.
    pub(crate) fn advance_to(&self, target: u64) -> Result<()> {
        let mut st = self.state.lock_unpoisoned();
        loop {
            if let Some(e) = &st.failed {
                return Err(e.clone());
            }
            if st.frontier >= target || st.done {
                return Ok(());
            }
            if st.busy {
                st = self.cv.wait_unpoisoned(st);
                continue;
            }
            // Room for a whole step first: past the bound nothing is
            // written (the caller may evict something and retry; the
            // decoder is untouched).
            let budget = self.budget.get();
            if let Some(b) = budget {
                if !b.try_reserve(STEP as u64) {
                    return Err(Error::ScratchFull {
                        name: self.name.clone(),
                        offset: self.coffset,
                        max: b.max(),
                    });
                }
            }
            let Some(mut dec) = st.decoder.take() else {
                if let Some(b) = budget {
                    b.release(STEP as u64);
                }
                // Cannot happen (decoder is only absent while busy or done),
                // but must not hang or panic if it does.
                return Err(self.corrupt(self.coffset, "decoder lost".into()));
            };
            st.busy = true;
            let mut buf = std::mem::take(&mut st.buf);
            let start = st.frontier;
            drop(st);

            let mut wrote = 0u64;
            let res = self.step(&mut *dec, &mut buf, start, &mut wrote);
            self.written.fetch_add(wrote, Ordering::Relaxed);
            if let Some(b) = budget {
                b.release((STEP as u64).saturating_sub(wrote));
            }

            st = self.state.lock_unpoisoned();
            st.busy = false;
            st.decoder = Some(dec);
            match res {
                Ok((n, zeros, eof)) => {
                    for c in zeros {
                        set_bit(&mut st.zero, c);
                    }
                    st.frontier = start + n;
                    if eof {
                        st.done = true;
                        st.decoder = None;
                        st.buf = Vec::new();
                    } else {
                        st.buf = buf;
                    }
                }
                Err(e) => {
                    if start > 0 && !self.verify_first {
                        tracing::error!(
                            "{}: {} unit at compressed offset {} FAILED its check after \
                             {start} bytes of it were decoded and may have been served: {e}; \
                             every read of it fails from now on",
                            self.name,
                            self.format,
                            self.coffset
                        );
                    } else {
                        tracing::error!("{e}; every read of this unit fails from now on");
                    }
                    st.failed = Some(e);
                    st.decoder = None;
                }
            }
            self.cv.notify_all();
        }
    }

    /// Decode one step at `start`; returns (bytes, zero chunk numbers, end).
    fn step(
        &self,
        dec: &mut dyn StreamDecoder,
        buf: &mut Vec<u8>,
        start: u64,
        wrote: &mut u64,
    ) -> Result<(u64, Vec<u64>, bool)> {
        buf.resize(STEP, 0);
        let n = read_full(dec, buf)?;
        let eof = n < STEP;
        let end = start + n as u64;
        if let Some(exp) = self.expected {
            if end > exp || (eof && end != exp) {
                return Err(self.corrupt(
                    self.coffset,
                    format!("decompressed size {end} does not match the recorded size {exp}"),
                ));
            }
        }
        let mut zeros = Vec::new();
        for (i, chunk) in buf[..n].chunks(CHUNK as usize).enumerate() {
            let off = start + i as u64 * CHUNK;
            if is_zero(chunk) {
                zeros.push(off / CHUNK);
            } else {
                self.scratch
                    .write_all_at(chunk, off)
                    .map_err(Error::Scratch)?;
                *wrote += chunk.len() as u64;
            }
        }
        if eof {
            // Trailing zero chunks were never written: make the file its
            // full logical size so it is a faithful (sparse) copy.
            self.scratch.set_len(end).map_err(Error::Scratch)?;
        }
        Ok((n as u64, zeros, eof))
    }

    /// Decode the whole unit, returning its size.
    #[cfg(test)]
    pub(crate) fn run_to_end(&self) -> Result<u64> {
        self.advance_to(u64::MAX)?;
        Ok(self.frontier())
    }

    /// Fill `buf` from unit-relative `offset`, decoding forward if needed.
    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset + buf.len() as u64;
        self.advance_to(if self.verify_first { u64::MAX } else { end })?;
        let zero: Vec<bool> = {
            let st = self.state.lock_unpoisoned();
            if st.frontier < end {
                return Err(self.corrupt(
                    self.coffset,
                    format!("unit ends at {} before offset {end}", st.frontier),
                ));
            }
            (offset / CHUNK..end.div_ceil(CHUNK))
                .map(|c| get_bit(&st.zero, c))
                .collect()
        };
        // Serve each chunk from the bitmap or the scratch file, coalescing
        // neighbouring data chunks into one pread.
        let first = offset / CHUNK;
        let mut pos = offset;
        while pos < end {
            let c = pos / CHUNK;
            let is_z = zero[(c - first) as usize];
            let mut run_end = ((c + 1) * CHUNK).min(end);
            while run_end < end && zero[(run_end / CHUNK - first) as usize] == is_z {
                run_end = ((run_end / CHUNK + 1) * CHUNK).min(end);
            }
            let dst = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
            if is_z {
                dst.fill(0);
            } else {
                self.scratch
                    .read_exact_at(dst, pos)
                    .map_err(Error::Scratch)?;
            }
            pos = run_end;
        }
        Ok(())
    }

    /// Runs of (length, zero) for unit-relative `[offset, offset+len)`;
    /// anything not decoded yet is reported as data.
    pub(crate) fn extents(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        let st = self.state.lock_unpoisoned();
        let end = offset + len;
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let c = pos / CHUNK;
            let next = ((c + 1) * CHUNK).min(end);
            // Bits are only ever set for chunks already behind the frontier.
            let z = get_bit(&st.zero, c);
            push_run(&mut out, next - pos, z);
            pos = next;
        }
        out
    }
}

/// Append a run, merging it with the previous one of the same kind.
pub(crate) fn push_run(out: &mut Vec<(u64, bool)>, len: u64, zero: bool) {
    if len == 0 {
        return;
    }
    match out.last_mut() {
        Some(last) if last.1 == zero => last.0 += len,
        _ => out.push((len, zero)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A decoder handing out a fixed buffer in odd-sized pieces.
    struct Canned {
        data: Vec<u8>,
        pos: usize,
    }

    impl StreamDecoder for Canned {
        fn read(&mut self, out: &mut [u8]) -> Result<usize> {
            let n = out.len().min(self.data.len() - self.pos).min(7777);
            out[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    fn sample(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| {
                if (i / 100_000) % 3 == 0 {
                    0
                } else {
                    (i * 7 % 251) as u8
                }
            })
            .collect()
    }

    #[test]
    fn reads_match_and_zero_chunks_are_holes() {
        let data = sample(3_500_000);
        let p = Progressive::new(
            "t",
            "test",
            0,
            Some(data.len() as u64),
            Box::new(Canned {
                data: data.clone(),
                pos: 0,
            }),
            None,
            false,
        )
        .unwrap();
        let mut buf = vec![0u8; 300_000];
        p.read_at(&mut buf, 1_000_000).unwrap();
        assert_eq!(buf, &data[1_000_000..1_300_000]);
        assert!(p.frontier() < data.len() as u64);
        assert_eq!(p.run_to_end().unwrap(), data.len() as u64);
        p.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, &data[..300_000]);
        let ext = p.extents(0, CHUNK);
        assert_eq!(ext, vec![(CHUNK, true)]);
    }

    #[test]
    fn size_mismatch_is_corrupt() {
        let data = sample(100_000);
        let p = Progressive::new(
            "t",
            "test",
            42,
            Some(99_999),
            Box::new(Canned { data, pos: 0 }),
            None,
            false,
        )
        .unwrap();
        let mut buf = vec![0u8; 10];
        match p.read_at(&mut buf, 0) {
            Err(Error::Corrupt { offset: 42, .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
        // The failure is sticky.
        assert!(p.read_at(&mut buf, 0).is_err());
    }
}
