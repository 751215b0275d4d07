//! The format-independent part of a reader: a sorted list of independently
//! decodable *segments* (xz blocks, zstd frames), a shared cache of decoded
//! segments, single-flight decoding, parallel decode and decode-ahead on a
//! small bounded thread pool, zero-chunk tracking, and progressive decoding
//! of segments too big to hold in memory.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};

use crate::progressive::{
    get_bit, push_run, read_full, set_bit, Progressive, StreamDecoder, CHUNK,
};
use crate::{clone_error, is_zero, BlockCache, Error, Extent, Options, Result};

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
}

/// How far ahead of a sequential reader a progressive segment is decoded.
const PROGRESSIVE_AHEAD: u64 = 16 << 20;

/// Number of independent sequential streams we recognise at once (several
/// NBD connections, or one client with a few outstanding streams).
const STREAM_SLOTS: usize = 4;

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
    inflight: Mutex<HashMap<usize, Arc<Flight>>>,
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
}

/// A decode in progress that other readers can wait for.
#[derive(Default)]
struct Flight {
    result: Mutex<Option<Result<Arc<[u8]>>>>,
    cv: Condvar,
}

impl Flight {
    fn wait(&self) -> Result<Arc<[u8]>> {
        let mut r = self.result.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match &*r {
                Some(Ok(b)) => return Ok(b.clone()),
                Some(Err(e)) => return Err(clone_error(e)),
                None => r = self.cv.wait(r).unwrap_or_else(|e| e.into_inner()),
            }
        }
    }
    fn complete(&self, res: &Result<Arc<[u8]>>) {
        let mut r = self.result.lock().unwrap_or_else(|e| e.into_inner());
        *r = Some(match res {
            Ok(b) => Ok(b.clone()),
            Err(e) => Err(clone_error(e)),
        });
        self.cv.notify_all();
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// A fixed set of worker threads fed through a bounded queue.  Jobs that do
/// not fit are dropped (they are only hints), so neither threads nor queued
/// work grow without bound.  Jobs hold a `Weak` to the reader, and dropping
/// the pool closes the queue, so workers exit when the reader goes away.
struct Pool {
    tx: SyncSender<Job>,
}

impl Pool {
    fn new(threads: usize, name: &str) -> Pool {
        let (tx, rx) = sync_channel::<Job>(threads * 2);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx: Arc<Mutex<Receiver<Job>>> = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("decode-{i}"))
                .spawn(move || loop {
                    let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => break,
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!("{name}: cannot start decode thread: {e}");
            }
        }
        Pool { tx }
    }

    fn submit(&self, job: Job) {
        let _ = self.tx.try_send(job);
    }
}

impl<C: Codec> Engine<C> {
    /// `segs` must be sorted, contiguous in decompressed space and start at
    /// 0; `pre` holds segments already opened progressively (e.g. zstd
    /// frames whose size had to be learnt by decoding them).
    pub(crate) fn new(
        codec: C,
        segs: Vec<Segment>,
        size: u64,
        opts: &Options,
        threshold: u64,
        pre: HashMap<usize, Arc<Progressive>>,
    ) -> Self {
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
        let pool = (threads > 0).then(|| Pool::new(threads, &opts.name));
        let inner = Inner {
            codec,
            name: opts.name.clone(),
            segs,
            size,
            threshold,
            cache: Arc::new(BlockCache::new(opts.cache_bytes)),
            scratch_dir: opts.scratch_dir.clone(),
            inflight: Mutex::new(HashMap::new()),
            zeros: RwLock::new(HashMap::new()),
            progressive: Mutex::new(pre),
            recent_ends: Default::default(),
            next_slot: AtomicUsize::new(0),
            readahead,
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
                inner.read_segment(i, dst, lo - seg.uoffset)?;
                last = i;
            }
            i += 1;
        }
        self.note_access(offset, end, last);
        Ok(())
    }

    /// Queue a decode (or a progressive advance to `rel_end`) of segment
    /// `i` unless it is already available.
    fn schedule(&self, pool: &Pool, i: usize, rel_end: u64) {
        let inner = &self.inner;
        if inner.is_progressive(i) {
            let weak: Weak<Inner<C>> = Arc::downgrade(&self.inner);
            pool.submit(Box::new(move || {
                if let Some(inner) = weak.upgrade() {
                    if let Ok(p) = inner.progressive(i) {
                        let _ = p.advance_to(rel_end);
                    }
                }
            }));
            return;
        }
        if inner.cache.contains(i as u64) || inner.known_all_zero(i) {
            return;
        }
        if inner
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&i)
        {
            return;
        }
        let weak: Weak<Inner<C>> = Arc::downgrade(&self.inner);
        pool.submit(Box::new(move || {
            if let Some(inner) = weak.upgrade() {
                let _ = inner.get_block(i);
            }
        }));
    }

    /// Recognise sequential access and decode ahead of it.
    fn note_access(&self, offset: u64, end: u64, last: usize) {
        let inner = &self.inner;
        let mut sequential = false;
        let mut slot = None;
        for (k, s) in inner.recent_ends.iter().enumerate() {
            if s.load(Ordering::Relaxed) == offset {
                sequential = true;
                slot = Some(k);
                break;
            }
        }
        let k =
            slot.unwrap_or_else(|| inner.next_slot.fetch_add(1, Ordering::Relaxed) % STREAM_SLOTS);
        inner.recent_ends[k].store(end, Ordering::Relaxed);
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
                let known = inner
                    .progressive
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&i)
                    .cloned();
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
        self.segs[i].usize > self.threshold
            || self
                .progressive
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(&i)
    }

    fn zero_bits(&self, i: usize) -> Option<Arc<Vec<u64>>> {
        self.zeros
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&i)
            .cloned()
    }

    fn known_all_zero(&self, i: usize) -> bool {
        let usize = self.segs[i].usize;
        self.zero_bits(i)
            .is_some_and(|b| (0..usize.div_ceil(CHUNK)).all(|c| get_bit(&b, c)))
    }

    /// The progressive decoder of segment `i`, created on first use.
    fn progressive(&self, i: usize) -> Result<Arc<Progressive>> {
        let mut map = self.progressive.lock().unwrap_or_else(|e| e.into_inner());
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
        )?);
        map.insert(i, p.clone());
        Ok(p)
    }

    /// Copy segment-relative `[rel, rel+dst.len())` of segment `i`.
    fn read_segment(&self, i: usize, dst: &mut [u8], rel: u64) -> Result<()> {
        if self.is_progressive(i) {
            return self.progressive(i)?.read_at(dst, rel);
        }
        if let Some(bits) = self.zero_bits(i) {
            let end = rel + dst.len() as u64;
            if (rel / CHUNK..end.div_ceil(CHUNK)).all(|c| get_bit(&bits, c)) {
                dst.fill(0);
                return Ok(());
            }
        }
        let block = self.get_block(i)?;
        let src = block
            .get(rel as usize..rel as usize + dst.len())
            .ok_or_else(|| Error::Corrupt {
                name: self.name.clone(),
                format: self.codec.format(),
                offset: self.segs[i].coffset,
                reason: "decoded block is shorter than recorded".into(),
            })?;
        dst.copy_from_slice(src);
        Ok(())
    }

    /// The decoded data of in-memory segment `i`: from the cache, from a
    /// decode already in flight, or decoded here.
    fn get_block(&self, i: usize) -> Result<Arc<[u8]>> {
        let key = i as u64;
        if let Some(b) = self.cache.get(key) {
            return Ok(b);
        }
        let (flight, leader) = {
            let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(f) = map.get(&i) {
                (f.clone(), false)
            } else {
                // Re-check under the lock: a leader inserts into the cache
                // before leaving the map, so this cannot miss both.
                if let Some(b) = self.cache.get(key) {
                    return Ok(b);
                }
                let f = Arc::new(Flight::default());
                map.insert(i, f.clone());
                (f, true)
            }
        };
        if !leader {
            return flight.wait();
        }
        let res = self.decode_block(i);
        if let Ok(b) = &res {
            // An all-zero block is served from its zero bitmap from now on;
            // caching its bytes would only waste the cache.
            if !self.known_all_zero(i) {
                self.cache.insert(key, b.clone());
            }
        }
        self.inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&i);
        flight.complete(&res);
        res
    }

    fn decode_block(&self, i: usize) -> Result<Arc<[u8]>> {
        let seg = self.segs[i];
        let size_error = || Error::Corrupt {
            name: self.name.clone(),
            format: self.codec.format(),
            offset: seg.coffset,
            reason: format!(
                "segment {i} does not decode to the recorded size {}",
                seg.usize
            ),
        };
        // The size comes from the index but is bounded by the threshold, so
        // this allocation is bounded whatever the file says.  Collecting
        // straight into an `Arc<[u8]>` avoids copying the block afterwards.
        let mut data: Arc<[u8]> = std::iter::repeat_n(0u8, seg.usize as usize).collect();
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
        let mut bits = Vec::new();
        for (c, chunk) in data.chunks(CHUNK as usize).enumerate() {
            if is_zero(chunk) {
                set_bit(&mut bits, c as u64);
            }
        }
        self.zeros
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(i, Arc::new(bits));
        Ok(data)
    }
}

/// Each reader is an engine plus format-specific accessors (its index, its
/// frames): what it offers as a `RandomAccess` is exactly the engine's.
macro_rules! random_access_via_engine {
    ($reader:ty) => {
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
