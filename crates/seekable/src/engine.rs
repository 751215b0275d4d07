//! The format-independent part of a reader: a sorted list of independently
//! decodable *segments* (xz blocks, zstd frames), a shared cache of decoded
//! segments, single-flight decoding, parallel decode and decode-ahead on a
//! small bounded thread pool, zero-chunk tracking, and progressive decoding
//! of segments too big to hold in memory.
//!
//! Two tiers hold decoded segments: the RAM cache (LRU, `cache_bytes`) and
//! behind it a sparse scratch file (`scratch_cache_bytes`) that segments
//! evicted from RAM are written to.  Formats whose decoder can be suspended
//! (zstd) also decode a segment only as far as a read needs (*partial*
//! segments): the decoded prefix and the suspended decoder are kept, a
//! later read further in resumes, and the rest is finished in the
//! background so the segment ends up cached and verified.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};

use lru::LruCache;

use crate::flight::Flights;
use crate::pool::Pool;
use crate::progressive::{
    get_bit, push_run, read_full, set_bit, Progressive, StreamDecoder, CHUNK,
};
use crate::spill::{default_scratch_bound, Budget, Permits, Spill};
use crate::sync::{CondvarExt, LockExt, RwLockExt};
use crate::{is_zero, BlockCache, Error, Extent, Options, Result};

/// One independently decodable piece of the compressed file.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Segment {
    pub uoffset: u64,
    pub usize: u64,
    pub coffset: u64,
}

/// What a format provides: a streaming decoder for one segment.  The
/// decoder must verify the segment's integrity check and its size against
/// the container's record before returning end-of-data.
pub(crate) trait Codec: Send + Sync + 'static {
    fn format(&self) -> &'static str;
    fn open_segment(&self, index: usize, seg: &Segment) -> Result<Box<dyn StreamDecoder>>;
    /// Decode a whole (cacheable) segment in one call into `out` (exactly
    /// its recorded size), when the format can do that faster than
    /// streaming; `None` means use `open_segment`.  The result must be
    /// verified like the streaming path's, including the exact size.
    fn decode_whole(&self, _index: usize, _seg: &Segment, _out: &mut [u8]) -> Option<Result<()>> {
        None
    }
    /// Whether segment `index` can be decoded partially with
    /// `open_resumable` (formats whose decoder state is small; not xz,
    /// whose decoder holds a whole dictionary).
    fn resumable(&self, _index: usize) -> bool {
        false
    }
    fn open_resumable(&self, index: usize, _seg: &Segment) -> Result<Box<dyn ResumableDecoder>> {
        Err(Error::unsupported(
            "",
            self.format(),
            format!("segment {index} cannot be decoded partially"),
        ))
    }
}

/// A decoder that writes one segment straight into the segment's final
/// buffer, front to back, and can stop between steps and resume later.
pub(crate) trait ResumableDecoder: Send {
    /// `buf` is the whole segment (its recorded size) and always the same
    /// buffer; `[0, pos)` is what this decoder has produced so far.  Decode
    /// on until at least `target` bytes (`pos < target <= buf.len()`) are
    /// done and return the new position.  Returning `buf.len()` means the
    /// segment is complete and every check (size, checksums) has passed.
    fn advance(&mut self, buf: &mut [u8], pos: usize, target: usize) -> Result<usize>;
}

/// A codec's own record of segment `index`: the engine asks only for
/// segments it was given, so a miss is reported as corrupt, not a panic.
pub(crate) fn record<T: Copy>(
    records: &[T],
    index: usize,
    name: &str,
    format: &'static str,
    what: &str,
) -> Result<T> {
    let miss = || Error::corrupt(name, format, 0, format!("no {what} {index}"));
    records.get(index).copied().ok_or_else(miss)
}

/// Largest step a partial decode takes with its lock released: readers of
/// the prefix wait at most this long (one zstd block is 128 KiB).
const PARTIAL_STEP: usize = 128 << 10;

/// Most partial segments (a prefix buffer plus a suspended decoder each)
/// kept at once; the least recently used beyond this is dropped.
const MAX_PARTIAL: usize = 16;

/// A segment decoded only as far as reads have needed so far.
struct Partial {
    st: Mutex<PartialState>,
    cv: Condvar,
}

struct PartialState {
    /// The segment's buffer; `None` while a thread decodes a step into it.
    /// It is not shared (so it can be written) until the segment is done.
    buf: Option<Arc<[u8]>>,
    /// `buf[..pos]` is decoded.
    pos: usize,
    dec: Option<Box<dyn ResumableDecoder>>,
    busy: bool,
    done: bool,
    failed: Option<Error>,
}

impl Partial {
    /// `buf` must be unshared; its old contents are never read (only the
    /// decoded prefix is), so a recycled buffer needs no clearing.
    fn new(buf: Arc<[u8]>) -> Partial {
        Partial {
            st: Mutex::new(PartialState {
                buf: Some(buf),
                pos: 0,
                dec: None,
                busy: false,
                done: false,
                failed: None,
            }),
            cv: Condvar::new(),
        }
    }
}

/// What `partial_for` found.
enum Found {
    Cached(Arc<[u8]>),
    Partial(Arc<Partial>),
}

/// How far ahead of a sequential reader a progressive segment is decoded.
const PROGRESSIVE_AHEAD: u64 = 16 << 20;

/// Number of independent sequential streams we recognise at once (several
/// NBD connections, or one client with a few outstanding streams).
const STREAM_SLOTS: usize = 4;

/// A read this close to the end of a recent one is taken as part of a
/// stream when deciding what to keep in the scratch tier: nbdcopy keeps
/// 64 requests of 256 KiB in flight, so a stream's reads arrive up to 16
/// MiB out of order.  (Random reads land this close to one of the last
/// few by chance only rarely on a large image, and then merely skip the
/// scratch tier.)  Smaller images get a window of 1/64 of their size.
const STREAM_WINDOW: u64 = 32 << 20;

pub(crate) struct Engine<C: Codec> {
    inner: Arc<Inner<C>>,
    pool: Option<Pool>,
}

struct Inner<C: Codec> {
    codec: C,
    name: String,
    segs: Vec<Segment>,
    size: u64,
    threshold: u64,
    cache: Arc<BlockCache>,
    scratch_dir: Option<PathBuf>,
    /// Bytes may be served before their segment's check has passed
    /// (`Options::lazy_verify`): partial segments, and progressive ones
    /// served up to the frontier.
    lazy: bool,
    /// The file has more than one non-empty segment: a progressive one is
    /// then decoded and verified whole before it is served (unless lazy).
    multi: bool,
    flights: Flights<usize, Result<Arc<[u8]>>>,
    /// Zero-chunk bitmaps of in-memory segments that were decoded; kept
    /// after the data is evicted (one bit per 64 KiB) so `extents()` stays
    /// accurate and all-zero ranges never need decoding again.
    zeros: RwLock<HashMap<usize, Arc<Vec<u64>>>>,
    progressive: Mutex<HashMap<usize, Arc<Progressive>>>,
    /// Ends of recent reads, to recognise sequential access.
    recent_ends: [AtomicU64; STREAM_SLOTS],
    next_slot: AtomicUsize,
    /// In-memory segments decoded ahead of a sequential reader.
    readahead: usize,
    /// Partially decoded segments (formats with resumable decoders).
    partials: Mutex<LruCache<usize, Arc<Partial>>>,
    /// Buffers of segments evicted from the cache, for the next decodes: a
    /// fresh 1 MiB buffer is fresh mmap'd pages (see the server's malloc
    /// tuning), and faulting them in and zeroing them was ~18% of the CPU of
    /// a sequential zstd copy.  At most 1/32 of the cache is held here.
    recycled: Mutex<Vec<Arc<[u8]>>>,
    recycle_bytes: u64,
    /// Segments found corrupt after part of them was served: the rest of
    /// the server's life they read as that error (I/O errors are not kept:
    /// they may be transient).
    bad: Mutex<HashMap<usize, Error>>,
    /// The scratch-file tier behind the cache (`None`: turned off).
    spill: Option<Spill>,
    /// The bound on all scratch disk use (progressive units + the tier).
    budget: Arc<Budget>,
    /// Clock for the least-recently-used order of progressive units.
    clock: AtomicU64,
    /// Bounds whole-segment decodes in memory at once: each holds a
    /// segment buffer (and, for xz, a dictionary) until it completes, and
    /// with many client requests missing at once they would add up.
    permits: Permits,
}

impl<C: Codec> Engine<C> {
    /// `segs` must be sorted, contiguous in decompressed space and start at
    /// 0 (so the last one's end is the decompressed size); `pre` holds
    /// segments already opened progressively (e.g. zstd frames whose size
    /// had to be learnt by decoding them).
    pub(crate) fn new(
        codec: C,
        segs: Vec<Segment>,
        opts: &Options,
        threshold: u64,
        pre: HashMap<usize, Arc<Progressive>>,
    ) -> Self {
        let size = segs.last().map_or(0, |s| s.uoffset + s.usize);
        let max_seg = segs
            .iter()
            .map(|s| s.usize)
            .filter(|&s| s <= threshold)
            .max()
            .unwrap_or(0)
            .max(1);
        // Keep decode-ahead well inside the cache so it cannot evict the
        // blocks being read.
        let readahead =
            (opts.threads.max(1) as u64).min((opts.cache_bytes / 2 / max_seg).max(1)) as usize;
        // More decode threads than this cannot help on any machine we know
        // of, and each may hold a block's worth of memory.
        let threads = opts.threads.min(64);
        let pool = (threads > 0).then(|| Pool::new(threads, threads * 2, "decode", &opts.name));
        let max_partial = (opts.cache_bytes / 4 / max_seg).clamp(2, MAX_PARTIAL as u64) as usize;
        let budget =
            Arc::new(Budget::new(opts.scratch_bytes.unwrap_or_else(|| {
                default_scratch_bound(opts.scratch_dir.as_deref())
            })));
        for p in pre.values() {
            p.adopt(&budget);
        }
        let spill = (opts.scratch_cache_bytes > 0).then(|| {
            Spill::new(
                &opts.name,
                opts.scratch_dir.clone(),
                size,
                segs.len(),
                opts.scratch_cache_bytes,
                budget.clone(),
            )
        });
        let multi = segs.iter().filter(|s| s.usize > 0).count() > 1;
        let inner = Inner {
            codec,
            name: opts.name.clone(),
            segs,
            size,
            threshold,
            cache: Arc::new(BlockCache::new(opts.cache_bytes)),
            scratch_dir: opts.scratch_dir.clone(),
            lazy: opts.lazy_verify,
            multi,
            flights: Flights::new(),
            zeros: RwLock::new(HashMap::new()),
            progressive: Mutex::new(pre),
            recent_ends: Default::default(),
            next_slot: AtomicUsize::new(0),
            readahead,
            partials: Mutex::new(LruCache::new(
                std::num::NonZeroUsize::new(max_partial).unwrap_or(std::num::NonZeroUsize::MIN),
            )),
            bad: Mutex::new(HashMap::new()),
            recycled: Mutex::new(Vec::new()),
            recycle_bytes: opts.cache_bytes / 32,
            spill,
            budget,
            clock: AtomicU64::new(0),
            // The pool's threads plus the caller's: all the parallelism
            // there is, without one buffer per waiting client request.
            permits: Permits::new(threads + 1),
        };
        Engine {
            inner: Arc::new(inner),
            pool,
        }
    }

    pub(crate) fn size(&self) -> u64 {
        self.inner.size
    }

    pub(crate) fn format(&self) -> &'static str {
        self.inner.codec.format()
    }

    pub(crate) fn codec(&self) -> &C {
        &self.inner.codec
    }

    /// Bytes of decoded data held in the cache now.
    pub(crate) fn cached_bytes(&self) -> u64 {
        self.inner.cache.bytes()
    }

    /// Bytes written to the scratch-file cache tier so far.
    pub(crate) fn scratch_cached_bytes(&self) -> u64 {
        self.inner.spill.as_ref().map_or(0, |s| s.used())
    }

    /// Non-zero bytes of all scratch files (progressive units and the
    /// tier) counted against the bound now.
    pub(crate) fn scratch_bytes(&self) -> u64 {
        self.inner.budget.used()
    }

    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let inner = &self.inner;
        let len = buf.len() as u64;
        let end =
            offset
                .checked_add(len)
                .filter(|&e| e <= inner.size)
                .ok_or(Error::OutOfRange {
                    offset,
                    len,
                    size: inner.size,
                })?;
        if len == 0 {
            return Ok(());
        }
        let first = inner.first_segment(offset);
        let mut last = first;
        let mut i = first;
        // Let the pool decode the later segments of a multi-segment read
        // while this thread works on the first; single-flight makes sure
        // nothing is decoded twice.
        if let Some(pool) = &self.pool {
            let mut j = first + 1;
            while j < inner.segs.len() && inner.segs[j].uoffset < end {
                self.schedule(pool, j, end - inner.segs[j].uoffset);
                j += 1;
            }
        }
        while i < inner.segs.len() && inner.segs[i].uoffset < end {
            let seg = inner.segs[i];
            let lo = offset.max(seg.uoffset);
            let hi = end.min(seg.uoffset + seg.usize);
            if hi > lo {
                let dst = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
                let partial = inner.read_segment(i, dst, lo - seg.uoffset)?;
                if partial {
                    // Finish the segment on the pool while the client
                    // gets its reply: it then ends up verified and cached
                    // (and later spilled) instead of being decoded again
                    // from the start once its suspended decoder is dropped.
                    if let Some(pool) = &self.pool {
                        self.schedule(pool, i, seg.usize);
                    }
                }
                last = i;
            }
            i += 1;
        }
        self.note_access(offset, end, first, last);
        Ok(())
    }

    /// Queue a decode (or a progressive advance to `rel_end`) of segment
    /// `i` unless it is already available.
    fn schedule(&self, pool: &Pool, i: usize, rel_end: u64) {
        let inner = &self.inner;
        if inner.is_progressive(i) {
            let weak: Weak<Inner<C>> = Arc::downgrade(&self.inner);
            pool.offer(Box::new(move || {
                if let Some(inner) = weak.upgrade() {
                    if let Ok(p) = inner.progressive(i) {
                        let _ = p.advance_to(rel_end);
                    }
                }
            }));
            return;
        }
        if inner.cache.contains(i as u64)
            || inner.known_all_zero(i)
            || inner.spill.as_ref().is_some_and(|s| s.contains(i))
        {
            return;
        }
        if inner.flights.contains(&i) {
            return;
        }
        if let Some(p) = inner.partials.lock_unpoisoned().peek(&i) {
            // Someone is decoding it now: the work will get done.
            if p.st.lock_unpoisoned().busy {
                return;
            }
        }
        let weak: Weak<Inner<C>> = Arc::downgrade(&self.inner);
        pool.offer(Box::new(move || {
            if let Some(inner) = weak.upgrade() {
                let _ = inner.get_block(i);
            }
        }));
    }

    /// Recognise sequential access and decode ahead of it.
    fn note_access(&self, offset: u64, end: u64, first: usize, last: usize) {
        let inner = &self.inner;
        let mut sequential = false;
        let mut near = false;
        let mut slot = None;
        for (k, s) in inner.recent_ends.iter().enumerate() {
            let e = s.load(Ordering::Relaxed);
            if e == offset {
                sequential = true;
                slot = Some(k);
                break;
            }
            near |= offset.abs_diff(e) <= STREAM_WINDOW.min(inner.size / 64);
        }
        let k =
            slot.unwrap_or_else(|| inner.next_slot.fetch_add(1, Ordering::Relaxed) % STREAM_SLOTS);
        inner.recent_ends[k].store(end, Ordering::Relaxed);
        if let Some(spill) = &inner.spill {
            // A client with many requests in flight (nbdcopy has 64) reads
            // a stream slightly out of order, so for this purpose a read
            // close to a recent one counts as part of a stream too.
            let streamed = sequential || near;
            for i in first..=last.min(inner.segs.len().saturating_sub(1)) {
                spill.mark_streamed(i, streamed);
            }
            if sequential {
                for j in (last + 1..inner.segs.len()).take(inner.readahead) {
                    spill.mark_streamed(j, true);
                }
            }
        }
        let Some(pool) = &self.pool else { return };
        if !sequential {
            return;
        }
        let seg = inner.segs[last];
        if inner.is_progressive(last) && end < seg.uoffset + seg.usize {
            self.schedule(pool, last, end - seg.uoffset + PROGRESSIVE_AHEAD);
        }
        for j in (last + 1..inner.segs.len()).take(inner.readahead) {
            self.schedule(pool, j, PROGRESSIVE_AHEAD);
        }
    }

    pub(crate) fn prefetch(&self, offset: u64, len: u64) {
        let Some(pool) = &self.pool else { return };
        let inner = &self.inner;
        let end = offset.saturating_add(len).min(inner.size);
        let mut i = inner.first_segment(offset);
        while i < inner.segs.len() && inner.segs[i].uoffset < end {
            self.schedule(pool, i, end - inner.segs[i].uoffset);
            i += 1;
        }
    }

    pub(crate) fn extents(&self, offset: u64, len: u64) -> Vec<Extent> {
        let inner = &self.inner;
        let end = offset.saturating_add(len).min(inner.size);
        let mut runs: Vec<(u64, bool)> = Vec::new();
        if offset >= end {
            return Vec::new();
        }
        let mut i = inner.first_segment(offset);
        while i < inner.segs.len() && inner.segs[i].uoffset < end {
            let seg = inner.segs[i];
            let lo = offset.max(seg.uoffset) - seg.uoffset;
            let hi = end.min(seg.uoffset + seg.usize) - seg.uoffset;
            if hi > lo {
                let known = inner.progressive.lock_unpoisoned().get(&i).cloned();
                if let Some(p) = known {
                    for (l, z) in p.extents(lo, hi - lo) {
                        push_run(&mut runs, l, z);
                    }
                } else if let Some(bits) = inner.zero_bits(i) {
                    let mut pos = lo;
                    while pos < hi {
                        let c = pos / CHUNK;
                        let next = ((c + 1) * CHUNK).min(hi);
                        push_run(&mut runs, next - pos, get_bit(&bits, c));
                        pos = next;
                    }
                } else {
                    push_run(&mut runs, hi - lo, false);
                }
            }
            i += 1;
        }
        runs.into_iter()
            .map(|(length, zero)| Extent { length, zero })
            .collect()
    }
}

impl<C: Codec> Inner<C> {
    /// Index of the first non-empty segment containing `offset` (or the
    /// end of the list).
    fn first_segment(&self, offset: u64) -> usize {
        self.segs.partition_point(|s| s.uoffset + s.usize <= offset)
    }

    fn is_progressive(&self, i: usize) -> bool {
        self.segs[i].usize > self.threshold || self.progressive.lock_unpoisoned().contains_key(&i)
    }

    fn zero_bits(&self, i: usize) -> Option<Arc<Vec<u64>>> {
        self.zeros.read_unpoisoned().get(&i).cloned()
    }

    fn known_all_zero(&self, i: usize) -> bool {
        let usize = self.segs[i].usize;
        self.zero_bits(i)
            .is_some_and(|b| (0..usize.div_ceil(CHUNK)).all(|c| get_bit(&b, c)))
    }

    /// The progressive decoder of segment `i`, created on first use.
    fn progressive(&self, i: usize) -> Result<Arc<Progressive>> {
        let mut map = self.progressive.lock_unpoisoned();
        if let Some(p) = map.get(&i) {
            return Ok(p.clone());
        }
        let seg = self.segs[i];
        tracing::info!(
            "{}: {} segment {} holds {} MiB with no seek points; decoding it progressively \
             into a scratch file (recompress with `xz --block-size=16MiB`/`xz -T0`, or \
             seekable zstd, for fast random access)",
            self.name,
            self.codec.format(),
            i,
            seg.usize >> 20
        );
        let dec = self.codec.open_segment(i, &seg)?;
        let p = Arc::new(Progressive::new(
            &self.name,
            self.codec.format(),
            seg.coffset,
            Some(seg.usize),
            dec,
            self.scratch_dir.as_deref(),
            self.multi && !self.lazy,
        )?);
        p.adopt(&self.budget);
        map.insert(i, p.clone());
        Ok(p)
    }

    /// Free scratch space for progressive segment `keep`: evict the least
    /// recently used segment of the scratch tier, or else the least
    /// recently used other progressive segment (its scratch file goes
    /// when the last reader of it is done; it is decoded again if read).
    /// False when there is nothing left to evict.
    fn evict_scratch(&self, keep: usize) -> bool {
        if self.spill.as_ref().is_some_and(|s| s.evict_one()) {
            return true;
        }
        let mut map = self.progressive.lock_unpoisoned();
        let victim = map
            .iter()
            .filter(|(&k, p)| k != keep && p.written() > 0)
            .min_by_key(|(_, p)| p.last_use.load(Ordering::Relaxed))
            .map(|(&k, _)| k);
        match victim {
            Some(k) => {
                tracing::info!(
                    "{}: scratch space bound ({} MiB) reached: dropping the scratch file of \
                     segment {k} (decoded again if read)",
                    self.name,
                    self.budget.max() >> 20
                );
                map.remove(&k);
                true
            }
            None => false,
        }
    }

    /// Read from progressive segment `i`, evicting other scratch data when
    /// the bound is reached.
    fn read_progressive(&self, i: usize, dst: &mut [u8], rel: u64) -> Result<()> {
        loop {
            let p = self.progressive(i)?;
            p.last_use.store(
                self.clock.fetch_add(1, Ordering::Relaxed),
                Ordering::Relaxed,
            );
            match p.read_at(dst, rel) {
                Err(e @ Error::ScratchFull { .. }) => {
                    drop(p);
                    if self.evict_scratch(i) {
                        continue;
                    }
                    // This segment alone needs more than the bound: drop
                    // it (freeing what it wrote) and say so.
                    self.progressive.lock_unpoisoned().remove(&i);
                    tracing::error!("{e}");
                    return Err(e);
                }
                r => return r,
            }
        }
    }

    /// Copy segment-relative `[rel, rel+dst.len())` of segment `i`.
    /// Returns true when it was served from a partially decoded segment.
    fn read_segment(&self, i: usize, dst: &mut [u8], rel: u64) -> Result<bool> {
        if self.is_progressive(i) {
            self.read_progressive(i, dst, rel)?;
            return Ok(false);
        }
        if let Some(bits) = self.zero_bits(i) {
            let end = rel + dst.len() as u64;
            if (rel / CHUNK..end.div_ceil(CHUNK)).all(|c| get_bit(&bits, c)) {
                dst.fill(0);
                return Ok(false);
            }
        }
        let block = match self.cache.get(i as u64) {
            Some(b) => b,
            None => {
                if let Some(spill) = &self.spill {
                    if let Some(r) = spill.try_read(i, dst, self.segs[i].uoffset + rel) {
                        r?;
                        return Ok(false);
                    }
                }
                if self.lazy && self.codec.resumable(i) {
                    return self.read_partial(i, dst, rel);
                }
                self.get_block(i)?
            }
        };
        let src = block
            .get(rel as usize..rel as usize + dst.len())
            .ok_or_else(|| self.short_block(i))?;
        dst.copy_from_slice(src);
        Ok(false)
    }

    /// The partial segment `i`, made if needed (or the cached data, if it
    /// completed meanwhile).
    fn partial_for(&self, i: usize) -> Found {
        let mut map = self.partials.lock_unpoisoned();
        if let Some(p) = map.get(&i) {
            return Found::Partial(p.clone());
        }
        // Re-check under the lock: a finished segment enters the cache
        // before it leaves this map.
        if let Some(b) = self.cache.get(i as u64) {
            return Found::Cached(b);
        }
        let p = Arc::new(Partial::new(self.segment_buffer(i)));
        // Pushing out the least recently used partial drops its prefix and
        // decoder (a thread decoding it keeps its own reference and
        // finishes its step).
        map.push(i, p.clone());
        Found::Partial(p)
    }

    /// Serve a read from segment `i`, decoding it only as far as needed.
    /// Returns whether the segment is still incomplete afterwards.
    fn read_partial(&self, i: usize, dst: &mut [u8], rel: u64) -> Result<bool> {
        if let Some(e) = self.bad.lock_unpoisoned().get(&i) {
            return Err(e.clone());
        }
        let p = match self.partial_for(i) {
            Found::Cached(b) => {
                let src = b
                    .get(rel as usize..rel as usize + dst.len())
                    .ok_or_else(|| self.short_block(i))?;
                dst.copy_from_slice(src);
                return Ok(false);
            }
            Found::Partial(p) => p,
        };
        let end = rel as usize + dst.len();
        let st = self.advance_partial(i, &p, end)?;
        let src = st
            .buf
            .as_ref()
            .and_then(|b| b.get(rel as usize..end))
            .ok_or_else(|| self.short_block(i))?;
        dst.copy_from_slice(src);
        Ok(!st.done)
    }

    fn short_block(&self, i: usize) -> Error {
        Error::corrupt(
            &self.name,
            self.codec.format(),
            self.segs[i].coffset,
            "decoded block is shorter than recorded",
        )
    }

    /// Decode partial segment `i` until `buf[..end]` is available and return
    /// the locked state (with `buf` present).  One thread decodes at a time,
    /// a step at a time with the lock released; the others wait and are
    /// woken after every step, so a reader of the prefix is served as soon
    /// as its bytes are there.
    fn advance_partial<'a>(
        &self,
        i: usize,
        p: &'a Partial,
        end: usize,
    ) -> Result<std::sync::MutexGuard<'a, PartialState>> {
        let seg = self.segs[i];
        let len = seg.usize as usize;
        let end = end.min(len);
        let mut st = p.st.lock_unpoisoned();
        loop {
            if let Some(e) = &st.failed {
                return Err(e.clone());
            }
            if !st.busy && st.pos >= end {
                return Ok(st);
            }
            if st.busy {
                st = p.cv.wait_unpoisoned(st);
                continue;
            }
            let dec = match st.dec.take() {
                Some(d) => Ok(d),
                None => self.codec.open_resumable(i, &seg),
            };
            let (mut dec, mut buf) = match (dec, st.buf.take()) {
                (Ok(d), Some(b)) => (d, b),
                (Err(e), b) => {
                    st.buf = b;
                    st.failed = Some(e.clone());
                    drop(st);
                    self.drop_partial_by_ref(i, p);
                    p.cv.notify_all();
                    return Err(e);
                }
                (Ok(_), None) => return Err(self.short_block(i)),
            };
            st.busy = true;
            let pos = st.pos;
            drop(st);

            let target = end
                .min(pos.saturating_add(PARTIAL_STEP))
                .max(pos + 1)
                .min(len);
            let res = match Arc::get_mut(&mut buf) {
                Some(out) => dec.advance(out, pos, target),
                None => Err(self.short_block(i)),
            };
            let res = res.and_then(|n| {
                if n <= pos || n > len {
                    Err(self.short_block(i))
                } else {
                    Ok(n)
                }
            });

            st = p.st.lock_unpoisoned();
            st.busy = false;
            match res {
                Ok(n) if n == len => {
                    st.pos = n;
                    st.done = true;
                    st.buf = Some(buf.clone());
                    drop(st);
                    p.cv.notify_all();
                    // Complete and verified: into the cache like a whole
                    // decode, then out of the partial map.
                    self.note_zeros(i, &buf);
                    self.cache_insert(i, buf);
                    self.drop_partial_by_ref(i, p);
                    st = p.st.lock_unpoisoned();
                }
                Ok(n) => {
                    st.pos = n;
                    st.dec = Some(dec);
                    st.buf = Some(buf);
                    p.cv.notify_all();
                }
                Err(e) => {
                    // The prefix already served cannot be recalled; from
                    // now on the whole segment reads as an error.
                    if matches!(e, Error::Corrupt { .. }) {
                        tracing::error!(
                            "{e}: segment {i} FAILED its check after {pos} bytes of it were \
                             decoded and may have been served (lazy verification); every \
                             read of it fails from now on"
                        );
                        self.bad.lock_unpoisoned().insert(i, e.clone());
                    }
                    st.failed = Some(e.clone());
                    st.buf = Some(buf);
                    drop(st);
                    self.drop_partial_by_ref(i, p);
                    p.cv.notify_all();
                    return Err(e);
                }
            }
        }
    }

    fn drop_partial_by_ref(&self, i: usize, p: &Partial) {
        let mut map = self.partials.lock_unpoisoned();
        if map.peek(&i).is_some_and(|q| std::ptr::eq(&**q, p)) {
            map.pop(&i);
        }
    }

    /// Record the zero chunks of decoded segment `i`.
    fn note_zeros(&self, i: usize, data: &[u8]) {
        let mut bits = Vec::new();
        for (c, chunk) in data.chunks(CHUNK as usize).enumerate() {
            if is_zero(chunk) {
                set_bit(&mut bits, c as u64);
            }
        }
        self.zeros.write_unpoisoned().insert(i, Arc::new(bits));
    }

    /// A buffer of segment `i`'s size to decode into: recycled if one is
    /// free (with stale contents: every decode path writes all of it or
    /// fails, and a partial segment exposes only its decoded prefix), else
    /// newly allocated.
    fn segment_buffer(&self, i: usize) -> Arc<[u8]> {
        let len = self.segs[i].usize as usize;
        let mut free = self.recycled.lock_unpoisoned();
        if let Some(k) = free.iter().position(|b| b.len() == len) {
            return free.swap_remove(k);
        }
        drop(free);
        std::iter::repeat_n(0u8, len).collect()
    }

    fn recycle(&self, buf: Arc<[u8]>) {
        // Only a buffer nobody else holds can be written again.
        if Arc::strong_count(&buf) != 1 || Arc::weak_count(&buf) != 0 {
            return;
        }
        let mut free = self.recycled.lock_unpoisoned();
        let held: u64 = free.iter().map(|b| b.len() as u64).sum();
        if held + buf.len() as u64 <= self.recycle_bytes {
            free.push(buf);
        }
    }

    /// Cache decoded segment `i` (unless it is all zero: its bitmap serves
    /// it), writing whatever that evicts to the scratch tier.
    fn cache_insert(&self, i: usize, data: Arc<[u8]>) {
        if self.known_all_zero(i) {
            return;
        }
        let evicted = self.cache.insert_evicting(i as u64, data);
        for (k, d) in evicted {
            let k = k as usize;
            if let (Some(spill), Some(seg)) = (&self.spill, self.segs.get(k)) {
                let bits = self.zero_bits(k);
                spill.put(k, seg.uoffset, &d, bits.as_deref().map(|v| v.as_slice()));
            }
            self.recycle(d);
        }
    }

    /// The decoded data of in-memory segment `i`: from the cache, from a
    /// decode already in flight, or decoded here.
    fn get_block(&self, i: usize) -> Result<Arc<[u8]>> {
        let key = i as u64;
        if let Some(b) = self.cache.get(key) {
            return Ok(b);
        }
        if self.lazy && self.codec.resumable(i) {
            let p = match self.partial_for(i) {
                Found::Cached(b) => return Ok(b),
                Found::Partial(p) => p,
            };
            let st = self.advance_partial(i, &p, self.segs[i].usize as usize)?;
            return st.buf.clone().ok_or_else(|| self.short_block(i));
        }
        self.flights.run(
            i,
            || self.cache.get(key).map(Ok),
            || {
                let res = {
                    let _permit = self.permits.acquire();
                    self.decode_block(i)
                };
                if let Ok(b) = &res {
                    // An all-zero block is served from its zero bitmap from
                    // now on; caching its bytes would only waste the cache.
                    self.cache_insert(i, b.clone());
                }
                res
            },
        )
    }

    fn decode_block(&self, i: usize) -> Result<Arc<[u8]>> {
        let seg = self.segs[i];
        let size_error = || {
            Error::corrupt(
                &self.name,
                self.codec.format(),
                seg.coffset,
                format!(
                    "segment {i} does not decode to the recorded size {}",
                    seg.usize
                ),
            )
        };
        // The size comes from the index but is bounded by the threshold, so
        // this allocation is bounded whatever the file says.  Collecting
        // straight into an `Arc<[u8]>` avoids copying the block afterwards.
        let mut data = self.segment_buffer(i);
        let out = Arc::get_mut(&mut data).ok_or_else(size_error)?;
        match self.codec.decode_whole(i, &seg, out) {
            Some(r) => r?,
            None => {
                let mut dec = self.codec.open_segment(i, &seg)?;
                let n = read_full(&mut *dec, out)?;
                let mut probe = [0u8; 1];
                // One more read must report the end: that is also where
                // the integrity check is verified.
                if n != out.len() || dec.read(&mut probe)? != 0 {
                    return Err(size_error());
                }
            }
        }
        self.note_zeros(i, &data);
        Ok(data)
    }
}

/// Each reader is an engine plus format-specific accessors (its index, its
/// frames): what it offers as a `RandomAccess`, and its cache statistics,
/// are exactly the engine's.
macro_rules! random_access_via_engine {
    ($reader:ty) => {
        impl $reader {
            /// Decoded bytes currently held in the block cache.
            pub fn cached_bytes(&self) -> u64 {
                self.engine.cached_bytes()
            }

            /// Decoded bytes written to the scratch-file cache tier so far.
            pub fn scratch_cached_bytes(&self) -> u64 {
                self.engine.scratch_cached_bytes()
            }

            /// Non-zero bytes of all this reader's scratch files (progressive
            /// blocks/frames and the scratch-cache tier), which the scratch bound
            /// ([`Options::scratch_bytes`](crate::Options::scratch_bytes)) caps.
            pub fn scratch_bytes(&self) -> u64 {
                self.engine.scratch_bytes()
            }
        }

        impl $crate::RandomAccess for $reader {
            fn size(&self) -> u64 {
                self.engine.size()
            }
            fn read_at(&self, buf: &mut [u8], offset: u64) -> $crate::Result<()> {
                self.engine.read_at(buf, offset)
            }
            fn extents(&self, offset: u64, len: u64) -> Vec<$crate::Extent> {
                self.engine.extents(offset, len)
            }
            fn prefetch(&self, offset: u64, len: u64) {
                self.engine.prefetch(offset, len)
            }
            fn format(&self) -> &'static str {
                self.engine.format()
            }
        }
    };
}
pub(crate) use random_access_via_engine;
