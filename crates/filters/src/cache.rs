//! `cache`: a local cache of the next backend, so a slow source (a
//! compressed or remote image) is read once and writes can be gathered
//! until the client flushes.
//!
//! Blocks of `cache-min-block-size` bytes live in a sparse, unlinked
//! temporary file in `$TMPDIR` (or `/var/tmp`), shared by every connection
//! (one cache per server).  Each cached block is *clean* (the same as the
//! next backend) or *dirty* (newer than it).  The modes:
//!
//! * `writeback` (default): writes and zeroes go to the cache as dirty
//!   blocks (except zeroes of whole blocks not in the cache, which go
//!   straight down when the next backend zeroes natively).  They reach the next backend on flush, on a FUA request (for
//!   the blocks it touched), when reclaim needs their space, and when a
//!   client disconnects (so a client that never flushes still loses
//!   nothing when it closes cleanly).
//! * `writethrough`: every write goes to the next backend before the
//!   request returns; the cache only speeds up reads.
//! * `unsafe`: as writeback, but flush and FUA do nothing.  Dirty blocks
//!   still go down on reclaim and on disconnect.
//!
//! Reads of blocks not in the cache go to the next backend; with
//! `cache-on-read` the whole blocks read are kept.  NBD_CMD_CACHE always
//! fills the cache.  Trim drops the whole blocks it covers from the cache
//! (dirty ones too: trimmed data is the client's to lose) and passes them
//! down; the partial blocks at its ends are left alone, as trim is only
//! advisory.  Block status comes from the next backend, except that dirty
//! blocks are reported as data (the next backend does not have them yet).
//!
//! With `cache-max-size`, once the cached blocks pass the high threshold
//! the least recently used ones are dropped until they are below the low
//! threshold; a dirty block is written to the next backend before it is
//! dropped, never lost.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};

use nbdkit_backend::{
    is_zero, layer_fn, write_zeroes, Backend, CacheMode, Config, ConfigError, Error, ErrorKind,
    Extents, FilterSpec, FuaMode, Handle, Param, Result, ZeroFlags, ZeroMode,
};
use nbdkit_backend::{CondvarExt, LockExt};

use crate::modes::take_mode;
use crate::window::next_extents;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Writeback,
    Writethrough,
    Unsafe,
}

/// When reads are kept in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
enum OnRead {
    Never,
    Always,
    /// Only while this path exists.
    WhilePathExists(PathBuf),
}

impl OnRead {
    fn active(&self) -> bool {
        match self {
            OnRead::Never => false,
            OnRead::Always => true,
            OnRead::WhilePathExists(p) => p.exists(),
        }
    }
}

/// The reclaim limits, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Limits {
    /// Start reclaiming when the cached blocks pass this.
    high: u64,
    /// ... and stop once they are at or below this.
    low: u64,
}

#[derive(Debug, Clone)]
struct Settings {
    mode: Mode,
    on_read: OnRead,
    block: u64,
    limits: Option<Limits>,
}

/// Which blocks are cached, which are dirty, and their order of use.  Pure
/// bookkeeping: the data is in the cache file.
#[derive(Debug, Default)]
struct Map {
    /// Cached block -> its last use (a tick).
    blocks: HashMap<u64, u64>,
    /// Tick -> block, oldest first: the reclaim order.
    lru: BTreeMap<u64, u64>,
    dirty: BTreeSet<u64>,
    /// Blocks some request is reading from the next backend to cache
    /// them: others wait for those instead of reading them again.
    fetching: HashSet<u64>,
    tick: u64,
    /// Bytes of cached blocks (the last block of the disk may be short).
    used: u64,
    /// Blocks being fetched that a write, zero or trim changed meanwhile:
    /// what the fetch read may be stale, so it is not cached.
    stale: HashSet<u64>,
}

impl Map {
    /// A request is about to change block `b`.
    fn changing(&mut self, b: u64) {
        if self.fetching.contains(&b) {
            self.stale.insert(b);
        }
    }
    fn cached(&self, b: u64) -> bool {
        self.blocks.contains_key(&b)
    }
    fn is_dirty(&self, b: u64) -> bool {
        self.dirty.contains(&b)
    }
    /// Mark `b` as just used; it must be cached.
    fn touch(&mut self, b: u64) {
        self.tick += 1;
        let t = self.tick;
        if let Some(old) = self.blocks.insert(b, t) {
            self.lru.remove(&old);
        }
        self.lru.insert(t, b);
    }
    /// Add `b` (of `len` bytes) to the cache, or mark it used if it is.
    fn insert(&mut self, b: u64, len: u64, dirty: bool) {
        if !self.cached(b) {
            self.used += len;
        }
        self.touch(b);
        if dirty {
            self.dirty.insert(b);
        } else {
            self.dirty.remove(&b);
        }
    }
    fn remove(&mut self, b: u64, len: u64) {
        if let Some(t) = self.blocks.remove(&b) {
            self.lru.remove(&t);
            self.used -= len;
        }
        self.dirty.remove(&b);
    }
    fn oldest(&self) -> Option<u64> {
        self.lru.values().next().copied()
    }
}

/// The cache shared by every connection.
struct Shared {
    file: File,
    s: Settings,
    /// Which export and size the cache belongs to (set by the first
    /// connection; the blocks only make sense for that disk).
    owner: Mutex<Option<(String, u64)>>,
    map: Mutex<Map>,
    /// Signalled when blocks leave `Map::fetching`.
    fetched: Condvar,
}

/// `$TMPDIR`, or `/var/tmp` (big disk images do not belong in a tmpfs).
fn cache_dir() -> PathBuf {
    std::env::var_os("TMPDIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"))
}

struct CacheBackend {
    next: Arc<dyn Backend>,
    shared: Arc<Shared>,
}

impl CacheBackend {
    fn new(s: Settings, next: Arc<dyn Backend>) -> std::result::Result<Self, ConfigError> {
        let dir = cache_dir();
        // Unlinked at once: nothing to clean up, whatever happens.
        let file = tempfile::tempfile_in(&dir).map_err(|e| {
            ConfigError::new(format!(
                "cache filter: creating the cache file in {}: {e}",
                dir.display()
            ))
        })?;
        Ok(CacheBackend {
            next,
            shared: Arc::new(Shared {
                file,
                s,
                owner: Mutex::new(None),
                map: Mutex::new(Map::default()),
                fetched: Condvar::new(),
            }),
        })
    }
}

impl Backend for CacheBackend {
    fn name(&self) -> &str {
        "cache"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        let next = self.next.open(readonly, export)?;
        let size = next.size()?;
        let sh = &self.shared;
        {
            let mut owner = sh.owner.lock_unpoisoned();
            match &*owner {
                None => {
                    sh.file
                        .set_len(size)
                        .map_err(|e| Error::from_io("cache filter: sizing the cache file", e))?;
                    *owner = Some((export.to_string(), size));
                }
                Some((name, s)) if name == export && *s == size => {}
                Some((name, s)) => {
                    return Err(Error::invalid(format!(
                        "cache filter: the cache holds export \"{name}\" ({s} bytes); it cannot also serve \"{export}\" ({size} bytes)"
                    )))
                }
            }
        }
        let writable = !readonly && next.can_write()?;
        let (next_fua, next_zero) = if writable {
            (next.can_fua()?, next.can_zero()?)
        } else {
            (FuaMode::None, ZeroMode::None)
        };
        let block = sh.s.block;
        let run = match next.block_size()? {
            Some(bs) => MAX_RUN.min(bs.maximum as u64 / block * block).max(block),
            None => MAX_RUN,
        };
        Ok(Box::new(CacheHandle {
            run,
            next_flush: next.can_flush()?,
            next_fast_zero: writable && next_zero == ZeroMode::Native && next.can_fast_zero()?,
            next,
            sh: self.shared.clone(),
            size,
            writable,
            next_fua,
            next_zero,
        }))
    }
}

struct CacheHandle {
    next: Box<dyn Handle>,
    sh: Arc<Shared>,
    size: u64,
    /// Largest request made below: MAX_RUN, or less if the next backend
    /// says so, but at least one block.
    run: u64,
    writable: bool,
    next_flush: bool,
    next_fua: FuaMode,
    next_zero: ZeroMode,
    next_fast_zero: bool,
}

/// One block's part in a request: block `b` spans `[start, end)` and the
/// request covers `[from, to)` of it.
#[derive(Debug, Clone, Copy)]
struct Piece {
    b: u64,
    start: u64,
    end: u64,
    from: u64,
    to: u64,
}

impl Piece {
    fn whole(&self) -> bool {
        self.from == self.start && self.to == self.end
    }
    fn len(&self) -> u64 {
        self.end - self.start
    }
}

/// Largest run of blocks fetched or written back in one request below.
const MAX_RUN: u64 = 4 << 20;

impl CacheHandle {
    fn block(&self) -> u64 {
        self.sh.s.block
    }
    fn mode(&self) -> Mode {
        self.sh.s.mode
    }

    fn block_range(&self, b: u64) -> (u64, u64) {
        let start = b * self.block();
        (start, (start + self.block()).min(self.size))
    }

    /// The blocks `[offset, offset+count)` touches (`count` > 0).
    fn pieces(&self, offset: u64, count: u64) -> impl Iterator<Item = Piece> + '_ {
        let end = offset + count;
        let first = offset / self.block();
        let last = (end - 1) / self.block();
        (first..=last).map(move |b| {
            let (start, bend) = self.block_range(b);
            Piece {
                b,
                start,
                end: bend,
                from: start.max(offset),
                to: bend.min(end),
            }
        })
    }

    fn file_read(&self, buf: &mut [u8], at: u64) -> Result<()> {
        self.sh
            .file
            .read_exact_at(buf, at)
            .map_err(|e| Error::from_io("cache filter: reading the cache file", e))
    }
    fn file_write(&self, buf: &[u8], at: u64) -> Result<()> {
        self.sh
            .file
            .write_all_at(buf, at)
            .map_err(|e| Error::from_io("cache filter: writing the cache file", e))
    }
    /// Zero `[start, end)` of the cache file by giving the space back.
    fn file_punch(&self, start: u64, end: u64) -> Result<()> {
        // SAFETY: fallocate on a file descriptor we own, with plain integers.
        let r = unsafe {
            libc::fallocate(
                self.sh.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                start as libc::off_t,
                (end - start) as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        // A file system without hole punching: write the zeroes.
        let zeroes = vec![0u8; (end - start).min(MAX_RUN) as usize];
        let mut at = start;
        while at < end {
            let n = (end - at).min(MAX_RUN);
            self.file_write(&zeroes[..n as usize], at)?;
            at += n;
        }
        Ok(())
    }

    /// Bring block `p.b` into the cache (clean) if it is not there: the
    /// first step of changing part of it.
    fn load(&self, map: &mut Map, p: &Piece) -> Result<()> {
        if map.cached(p.b) {
            return Ok(());
        }
        let mut buf = vec![0u8; p.len() as usize];
        self.next.pread(&mut buf, p.start)?;
        self.file_write(&buf, p.start)?;
        map.insert(p.b, p.len(), false);
        Ok(())
    }

    /// Write the dirty blocks among `blocks` (sorted) to the next backend
    /// and mark them clean.  With `fua`, they are persistent on return.
    fn write_back(&self, map: &mut Map, blocks: &[u64], fua: bool) -> Result<()> {
        let mut i = 0;
        let mut wrote = false;
        while i < blocks.len() {
            if !map.is_dirty(blocks[i]) {
                i += 1;
                continue;
            }
            // A run of consecutive dirty blocks, written in one request.
            let mut j = i + 1;
            while j < blocks.len()
                && blocks[j] == blocks[j - 1] + 1
                && map.is_dirty(blocks[j])
                && (blocks[j] - blocks[i] + 1) * self.block() <= self.run
            {
                j += 1;
            }
            let (start, _) = self.block_range(blocks[i]);
            let (_, end) = self.block_range(blocks[j - 1]);
            let mut buf = vec![0u8; (end - start) as usize];
            self.file_read(&mut buf, start)?;
            let native_fua = fua && self.next_fua == FuaMode::Native;
            self.next_write(&buf, start, native_fua)?;
            wrote = true;
            for &b in &blocks[i..j] {
                map.dirty.remove(&b);
            }
            i = j;
        }
        if wrote && fua && self.next_fua == FuaMode::Emulate {
            self.next.flush()?;
        }
        Ok(())
    }

    /// Write to the next backend; a buffer of zeroes goes down as a zero
    /// request where that is native (a file plugin then punches a hole).
    fn next_write(&self, buf: &[u8], at: u64, fua: bool) -> Result<()> {
        if self.next_zero == ZeroMode::Native && is_zero(buf) {
            let flags = ZeroFlags {
                may_trim: true,
                fua,
                fast: false,
            };
            match self.next.zero(at, buf.len() as u64, flags) {
                Err(e) if e.kind() == ErrorKind::NotSupported => {}
                r => return r,
            }
        }
        self.next.pwrite(buf, at, fua)
    }

    /// Zero a range of the next backend, however it can.
    fn next_zero(&self, offset: u64, count: u64, flags: ZeroFlags) -> Result<()> {
        if self.next_zero == ZeroMode::Native {
            match self.next.zero(offset, count, flags) {
                Err(e) if e.kind() == ErrorKind::NotSupported && !flags.fast => {}
                r => return r,
            }
        } else if flags.fast {
            return Err(Error::not_supported(
                "cache filter: zeroing is not fast here",
            ));
        }
        write_zeroes(&*self.next, offset, count, flags)
    }

    /// Drop least recently used blocks once the cache is over its high
    /// threshold, writing dirty ones down first.  Best effort: the request
    /// that grew the cache has succeeded whatever happens here.
    fn reclaim(&self, map: &mut Map) {
        let Some(lim) = self.sh.s.limits else {
            return;
        };
        if map.used <= lim.high {
            return;
        }
        while map.used > lim.low {
            let Some(b) = map.oldest() else { break };
            if map.is_dirty(b) {
                if let Err(e) = self.write_back(map, &[b], false) {
                    tracing::warn!("cache filter: reclaim could not write block {b} back: {e}");
                    return;
                }
            }
            let (start, end) = self.block_range(b);
            map.remove(b, end - start);
            if let Err(e) = self.file_punch(start, end) {
                tracing::warn!("cache filter: reclaim: {e}");
            }
        }
    }

    /// Read whole blocks `[start, end)` (claimed by the caller) from the
    /// next backend and keep those that nothing changed meanwhile.
    fn fetch(&self, start: u64, end: u64) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; (end - start) as usize];
        self.next.pread(&mut buf, start)?;
        let mut map = self.sh.map.lock_unpoisoned();
        for p in self.pieces(start, end - start) {
            if !map.cached(p.b) && !map.stale.contains(&p.b) {
                let part = &buf[(p.start - start) as usize..(p.end - start) as usize];
                self.file_write(part, p.start)?;
                map.insert(p.b, p.len(), false);
            }
        }
        self.reclaim(&mut map);
        Ok(buf)
    }

    /// Like `scan`, but first wait until no block of the range is being
    /// fetched by another request, then claim the missing ones: the
    /// returned claims release them (on success or error) when dropped.
    fn scan_and_claim(
        &self,
        offset: u64,
        count: u64,
        out: Option<&mut [u8]>,
    ) -> Result<Vec<ClaimedRun<'_>>> {
        let mut map = self.sh.map.lock_unpoisoned();
        while self
            .pieces(offset, count)
            .any(|p| map.fetching.contains(&p.b))
        {
            map = self.sh.fetched.wait_unpoisoned(map);
        }
        let missing = self.scan(&mut map, offset, count, out)?;
        let claimed = missing
            .into_iter()
            .map(|(first, last)| {
                let blocks = first.b..last.b + 1;
                map.fetching.extend(blocks.clone());
                (first, last, Claim { h: self, blocks })
            })
            .collect();
        Ok(claimed)
    }

    /// Runs of the blocks in `[offset, offset+count)` not in the cache, as
    /// (first piece, last piece), each at most `self.run` long; the cached
    /// blocks are copied into `out` (if given) and marked used.
    fn scan(
        &self,
        map: &mut Map,
        offset: u64,
        count: u64,
        mut out: Option<&mut [u8]>,
    ) -> Result<Vec<(Piece, Piece)>> {
        let mut missing: Vec<(Piece, Piece)> = Vec::new();
        for p in self.pieces(offset, count) {
            if map.cached(p.b) {
                if let Some(out) = out.as_deref_mut() {
                    let dst = &mut out[(p.from - offset) as usize..(p.to - offset) as usize];
                    self.file_read(dst, p.from)?;
                }
                map.touch(p.b);
                continue;
            }
            match missing.last_mut() {
                Some((first, last)) if last.b + 1 == p.b && p.end - first.start <= self.run => {
                    *last = p
                }
                _ => missing.push((p, p)),
            }
        }
        Ok(missing)
    }

    fn with_fua(&self, map: &mut Map, offset: u64, count: u64, fua: bool) -> Result<()> {
        if fua && self.mode() == Mode::Writeback {
            let blocks: Vec<u64> = self.pieces(offset, count).map(|p| p.b).collect();
            self.write_back(map, &blocks, true)?;
        }
        Ok(())
    }

    /// Write back every dirty block (flush, disconnect).
    fn write_back_all(&self, map: &mut Map) -> Result<()> {
        let dirty: Vec<u64> = map.dirty.iter().copied().collect();
        self.write_back(map, &dirty, false)
    }
}

/// A run of missing blocks (first and last piece) claimed for fetching.
type ClaimedRun<'a> = (Piece, Piece, Claim<'a>);

/// Blocks this request is fetching; released when dropped.
struct Claim<'a> {
    h: &'a CacheHandle,
    blocks: Range<u64>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut map = self.h.sh.map.lock_unpoisoned();
        for b in self.blocks.clone() {
            map.fetching.remove(&b);
            map.stale.remove(&b);
        }
        drop(map);
        self.h.sh.fetched.notify_all();
    }
}

impl Drop for CacheHandle {
    fn drop(&mut self) {
        if !self.writable || self.mode() == Mode::Writethrough {
            return;
        }
        let mut map = self.sh.map.lock_unpoisoned();
        if map.dirty.is_empty() {
            return;
        }
        let r = self.write_back_all(&mut map).and_then(|()| {
            if self.mode() == Mode::Writeback && self.next_flush {
                self.next.flush()
            } else {
                Ok(())
            }
        });
        if let Err(e) = r {
            tracing::error!("cache filter: writing dirty blocks back at disconnect: {e}");
        }
    }
}

impl Handle for CacheHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn can_flush(&self) -> Result<bool> {
        if self.writable && self.mode() != Mode::Writethrough {
            // Our flush writes the dirty blocks down, whether or not the
            // next backend has a flush of its own.
            return Ok(true);
        }
        Ok(self.next_flush)
    }
    fn can_fua(&self) -> Result<FuaMode> {
        if self.writable && self.mode() != Mode::Writethrough {
            return Ok(FuaMode::Native);
        }
        self.next.can_fua()
    }
    fn can_zero(&self) -> Result<ZeroMode> {
        Ok(if self.writable {
            ZeroMode::Native
        } else {
            ZeroMode::None
        })
    }
    fn can_fast_zero(&self) -> Result<bool> {
        Ok(match self.mode() {
            // Zeroing is done in the cache file: always fast.
            Mode::Writeback | Mode::Unsafe => self.writable,
            Mode::Writethrough => self.next_fast_zero,
        })
    }
    nbdkit_backend::capabilities! {
        can_cache: CacheMode::Native,
    }
    /// As nbdkit: the cache is one for all connections and a flush on any
    /// of them writes back every dirty block, so writeback and unsafe
    /// modes are multi-conn consistent; writethrough is the plugin's.
    fn can_multi_conn(&self) -> Result<bool> {
        if self.mode() != Mode::Writethrough {
            return Ok(true);
        }
        self.next.can_multi_conn()
    }

    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let count = buf.len() as u64;
        if !self.sh.s.on_read.active() {
            let missing = {
                let mut map = self.sh.map.lock_unpoisoned();
                self.scan(&mut map, offset, count, Some(buf))?
            };
            for (first, last) in missing {
                let dst = &mut buf[(first.from - offset) as usize..(last.to - offset) as usize];
                self.next.pread(dst, first.from)?;
            }
            return Ok(());
        }
        let missing = self.scan_and_claim(offset, count, Some(buf))?;
        // The slow part runs without the lock, so connections can fetch
        // different blocks at once (and wait for each other's, not read
        // them again).
        for (first, last, claim) in missing {
            let dst = &mut buf[(first.from - offset) as usize..(last.to - offset) as usize];
            let data = self.fetch(first.start, last.end)?;
            drop(claim);
            let skip = (first.from - first.start) as usize;
            dst.copy_from_slice(&data[skip..skip + dst.len()]);
        }
        Ok(())
    }

    fn cache(&self, offset: u64, count: u64) -> Result<()> {
        let end = offset + count;
        let mut at = offset;
        // A piece at a time, so a request for the whole disk does not hold
        // the lock or a buffer for all of it.
        while at < end {
            let n = (end - at).min(MAX_RUN);
            let missing = self.scan_and_claim(at, n, None)?;
            for (first, last, _claim) in missing {
                self.fetch(first.start, last.end)?;
            }
            at += n;
        }
        Ok(())
    }

    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let count = buf.len() as u64;
        let mut map = self.sh.map.lock_unpoisoned();
        for p in self.pieces(offset, count) {
            map.changing(p.b);
        }
        let src = |from: u64, to: u64| &buf[(from - offset) as usize..(to - offset) as usize];
        match self.mode() {
            Mode::Writethrough => {
                self.next.pwrite(buf, offset, fua)?;
                for p in self.pieces(offset, count) {
                    if map.cached(p.b) || p.whole() {
                        self.file_write(src(p.from, p.to), p.from)?;
                        map.insert(p.b, p.len(), false);
                    }
                }
            }
            Mode::Writeback | Mode::Unsafe => {
                for p in self.pieces(offset, count) {
                    if !p.whole() {
                        self.load(&mut map, &p)?;
                    }
                    self.file_write(src(p.from, p.to), p.from)?;
                    map.insert(p.b, p.len(), true);
                }
                self.with_fua(&mut map, offset, count, fua)?;
            }
        }
        self.reclaim(&mut map);
        Ok(())
    }

    fn zero(&self, offset: u64, count: u64, flags: ZeroFlags) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        let mut map = self.sh.map.lock_unpoisoned();
        for p in self.pieces(offset, count) {
            map.changing(p.b);
        }
        let writethrough = self.mode() == Mode::Writethrough;
        if writethrough {
            self.next_zero(offset, count, flags)?;
        }
        // Writeback: whole blocks not in the cache are zeroed below at once
        // where the next backend zeroes natively — as cheap as caching
        // them, and zeroing a whole disk then leaves nothing dirty to
        // write back later.
        let mut down_done = writethrough;
        let down = !writethrough
            && self.next_zero == ZeroMode::Native
            && (!flags.fast || self.next_fast_zero);
        if down {
            let fua = flags.fua && self.mode() == Mode::Writeback;
            let mut runs: Vec<(u64, u64)> = Vec::new();
            for p in self.pieces(offset, count) {
                if p.whole() && !map.cached(p.b) {
                    match runs.last_mut() {
                        Some(r) if r.1 == p.start => r.1 = p.end,
                        _ => runs.push((p.start, p.end)),
                    }
                }
            }
            let r = runs.iter().try_for_each(|&(s, e)| {
                let f = ZeroFlags {
                    fua: fua && self.next_fua == FuaMode::Native,
                    ..flags
                };
                self.next_zero(s, e - s, f)
            });
            match r {
                Ok(()) => {
                    down_done = true;
                    if fua && !runs.is_empty() && self.next_fua == FuaMode::Emulate {
                        self.next.flush()?;
                    }
                }
                // Not fast below after all: zero in the cache instead.
                Err(e) if e.kind() == ErrorKind::NotSupported && flags.fast => {}
                Err(e) => return Err(e),
            }
        }
        for p in self.pieces(offset, count) {
            if !map.cached(p.b) && ((writethrough) || (down_done && p.whole())) {
                continue;
            }
            if p.whole() {
                self.file_punch(p.start, p.end)?;
            } else {
                self.load(&mut map, &p)?;
                self.file_write(&vec![0u8; (p.to - p.from) as usize], p.from)?;
            }
            map.insert(p.b, p.len(), !writethrough);
        }
        self.with_fua(&mut map, offset, count, flags.fua)?;
        self.reclaim(&mut map);
        Ok(())
    }

    fn trim(&self, offset: u64, count: u64, fua: bool) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        let mut map = self.sh.map.lock_unpoisoned();
        for p in self.pieces(offset, count) {
            map.changing(p.b);
        }
        let whole: Vec<Piece> = self.pieces(offset, count).filter(|p| p.whole()).collect();
        let (Some(first), Some(last)) = (whole.first(), whole.last()) else {
            // Only parts of blocks: trim is advisory, so nothing to do.
            return Ok(());
        };
        let (start, end) = (first.start, last.end);
        for p in &whole {
            map.remove(p.b, p.len());
        }
        self.file_punch(start, end)?;
        let fua = fua && self.mode() != Mode::Unsafe;
        self.next
            .trim(start, end - start, fua && self.next_fua == FuaMode::Native)?;
        if fua && self.next_fua == FuaMode::Emulate {
            self.next.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        match self.mode() {
            Mode::Unsafe => Ok(()),
            Mode::Writethrough => self.next.flush(),
            Mode::Writeback => {
                let mut map = self.sh.map.lock_unpoisoned();
                self.write_back_all(&mut map)?;
                if self.next_flush {
                    self.next.flush()?;
                }
                Ok(())
            }
        }
    }

    fn extents(&self, offset: u64, count: u64, req_one: bool, extents: &mut Extents) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        // Runs of (dirty?, from, to): dirty blocks are data whatever the
        // next backend says; the rest is asked of it.
        let end = offset + count;
        let mut runs: Vec<(bool, u64, u64)> = Vec::new();
        {
            let map = self.sh.map.lock_unpoisoned();
            let (first, last) = (offset / self.block(), (end - 1) / self.block());
            let mut at = offset;
            for &b in map.dirty.range(first..=last) {
                let (s, e) = self.block_range(b);
                let (s, e) = (s.max(offset), e.min(end));
                if at < s {
                    runs.push((false, at, s));
                }
                match runs.last_mut() {
                    Some(last) if last.0 && last.2 == s => last.2 = e,
                    _ => runs.push((true, s, e)),
                }
                at = e;
            }
            if at < end {
                runs.push((false, at, end));
            }
        }
        if let [(false, _, _)] = runs[..] {
            return self.next.extents(offset, count, req_one, extents);
        }
        for (dirty, from, to) in runs {
            if dirty {
                extents.add(from, to - from, 0)?;
            } else {
                // A partial answer ends ours; the client asks again.
                if !next_extents(&*self.next, from, to, req_one, extents)? {
                    return Ok(());
                }
            }
            if req_one {
                break;
            }
        }
        Ok(())
    }
}

fn take_percent(
    cfg: &mut Config,
    key: &str,
    default: u64,
) -> std::result::Result<u64, ConfigError> {
    let Some(v) = cfg.take(key) else {
        return Ok(default);
    };
    match v.trim().trim_end_matches('%').parse::<u64>() {
        Ok(n) if (1..=100).contains(&n) => Ok(n),
        _ => Err(ConfigError::new(format!(
            "cache filter: {key}={v}: expected a percentage from 1 to 100"
        ))),
    }
}

fn configure(cfg: &mut Config) -> std::result::Result<Settings, ConfigError> {
    let err = |e: ConfigError| ConfigError::new(format!("cache filter: {e}"));
    let mode = take_mode(
        cfg,
        "cache",
        "cache",
        &[
            ("writeback", Mode::Writeback),
            ("writethrough", Mode::Writethrough),
            ("unsafe", Mode::Unsafe),
        ],
        Mode::Writeback,
    )?;
    let on_read = match cfg.take("cache-on-read") {
        None => OnRead::Never,
        Some(v) if v.starts_with('/') => OnRead::WhilePathExists(PathBuf::from(v)),
        Some(v) => match nbdkit_backend::parse_bool(&v) {
            Ok(true) => OnRead::Always,
            Ok(false) => OnRead::Never,
            Err(e) => {
                return Err(ConfigError::new(format!(
                    "cache filter: cache-on-read={v}: {e}, or an absolute /PATH"
                )))
            }
        },
    };
    let block = cfg
        .take_size("cache-min-block-size")
        .map_err(err)?
        .unwrap_or(64 << 10);
    if !block.is_power_of_two() || !(4096..=(32 << 20)).contains(&block) {
        return Err(ConfigError::new(format!(
            "cache filter: cache-min-block-size={block}: must be a power of two from 4096 to 32M"
        )));
    }
    let max = cfg.take_size("cache-max-size").map_err(err)?;
    let high = take_percent(cfg, "cache-high-threshold", 95)?;
    let low = take_percent(cfg, "cache-low-threshold", 80)?;
    if low >= high {
        return Err(ConfigError::new(format!(
            "cache filter: cache-low-threshold={low} must be below cache-high-threshold={high}"
        )));
    }
    let limits = match max {
        None => None,
        Some(m) if m < block => {
            return Err(ConfigError::new(format!(
                "cache filter: cache-max-size={m}: must be at least the block size ({block})"
            )))
        }
        Some(m) => Some(Limits {
            high: m / 100 * high + m % 100 * high / 100,
            low: m / 100 * low + m % 100 * low / 100,
        }),
    };
    Ok(Settings {
        mode,
        on_read,
        block,
        limits,
    })
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "cache",
    summary: "cache the plugin's blocks in a local temporary file (writeback, writethrough, unsafe)",
    description: "Blocks live in a sparse temporary file in $TMPDIR (or /var/tmp) shared by all\n\
connections.  writeback (default) keeps written blocks until flush, FUA, reclaim\n\
or disconnect; writethrough writes through at once; unsafe ignores flush and FUA.\n\
Use cache-on-read=true to read a slow plugin only once.\n\n\
Example:\n  nbdkit-rs --filter=cache --filter=xz file disk.img.xz cache-on-read=true cache-max-size=1G",
    params: &[
        Param {
            name: "cache",
            help: "writeback (default), writethrough or unsafe",
        },
        Param {
            name: "cache-on-read",
            help: "true: keep blocks that are read; /PATH: only while PATH exists (default false)",
        },
        Param {
            name: "cache-min-block-size",
            help: "cache granularity, a power of two from 4K to 32M (default 64K)",
        },
        Param {
            name: "cache-max-size",
            help: "reclaim least recently used blocks to stay under this size",
        },
        Param {
            name: "cache-high-threshold",
            help: "percent of cache-max-size that starts reclaim (default 95)",
        },
        Param {
            name: "cache-low-threshold",
            help: "percent of cache-max-size that reclaim goes down to (default 80)",
        },
    ],
    configure: |cfg| {
        let settings = configure(cfg)?;
        Ok(layer_fn(move |next| Ok(Arc::new(CacheBackend::new(settings, next)?))))
    },
};

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A RAM disk shared by every handle, counting what reaches it.  Trim
    /// zeroes; flush copies the contents to `persisted`.
    #[derive(Default)]
    struct Disk {
        data: Mutex<Vec<u8>>,
        persisted: Mutex<Vec<u8>>,
        reads: AtomicU64,
        read_bytes: AtomicU64,
        writes: AtomicU64,
        caches: AtomicU64,
        /// Milliseconds each read takes.
        slow_ms: AtomicU64,
        /// Offer a native zero (else the plugin default: emulated).
        native_zero: std::sync::atomic::AtomicBool,
        zeroes: AtomicU64,
    }
    struct Ram(Arc<Disk>);
    struct RamHandle(Arc<Disk>);
    impl Backend for Ram {
        fn name(&self) -> &str {
            "ram"
        }
        fn open(&self, _readonly: bool, _export: &str) -> Result<Box<dyn Handle>> {
            Ok(Box::new(RamHandle(self.0.clone())))
        }
    }
    impl Handle for RamHandle {
        fn size(&self) -> Result<u64> {
            Ok(self.0.data.lock().unwrap().len() as u64)
        }
        nbdkit_backend::capabilities! {
            can_write: true, can_flush: true, can_trim: true, can_extents: true,
        }
        fn can_zero(&self) -> Result<ZeroMode> {
            Ok(if self.0.native_zero.load(Ordering::SeqCst) {
                ZeroMode::Native
            } else {
                ZeroMode::Emulate
            })
        }
        fn zero(&self, offset: u64, count: u64, flags: ZeroFlags) -> Result<()> {
            if !self.0.native_zero.load(Ordering::SeqCst) {
                return write_zeroes(self, offset, count, flags);
            }
            self.0.zeroes.fetch_add(1, Ordering::SeqCst);
            let mut d = self.0.data.lock().unwrap();
            d[offset as usize..(offset + count) as usize].fill(0);
            Ok(())
        }
        fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            self.0.reads.fetch_add(1, Ordering::SeqCst);
            self.0
                .read_bytes
                .fetch_add(buf.len() as u64, Ordering::SeqCst);
            let d = self.0.data.lock().unwrap();
            buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
            drop(d);
            // Slow to answer, after the data was read: a write can come in
            // between.
            let ms = self.0.slow_ms.load(Ordering::SeqCst);
            if ms > 0 {
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
            Ok(())
        }
        fn pwrite(&self, buf: &[u8], offset: u64, _fua: bool) -> Result<()> {
            self.0.writes.fetch_add(1, Ordering::SeqCst);
            let mut d = self.0.data.lock().unwrap();
            d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn trim(&self, offset: u64, count: u64, _fua: bool) -> Result<()> {
            let mut d = self.0.data.lock().unwrap();
            d[offset as usize..(offset + count) as usize].fill(0);
            Ok(())
        }
        fn flush(&self) -> Result<()> {
            let d = self.0.data.lock().unwrap().clone();
            *self.0.persisted.lock().unwrap() = d;
            Ok(())
        }
        fn cache(&self, _offset: u64, _count: u64) -> Result<()> {
            self.0.caches.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        /// 4K granules of zeroes are holes.
        fn extents(&self, offset: u64, count: u64, _: bool, ex: &mut Extents) -> Result<()> {
            let d = self.0.data.lock().unwrap();
            let mut at = offset;
            while at < offset + count {
                let to = ((at / 4096 + 1) * 4096).min(offset + count);
                let zero = is_zero(&d[at as usize..to as usize]);
                let flags = if zero {
                    nbdkit_backend::EXTENT_HOLE | nbdkit_backend::EXTENT_ZERO
                } else {
                    0
                };
                ex.add(at, to - at, flags)?;
                at = to;
            }
            Ok(())
        }
    }

    fn disk(data: Vec<u8>) -> Arc<Disk> {
        Arc::new(Disk {
            persisted: Mutex::new(data.clone()),
            data: Mutex::new(data),
            ..Default::default()
        })
    }

    fn backend(d: &Arc<Disk>, params: &[(&str, &str)]) -> CacheBackend {
        let mut cfg = Config::from_pairs(params);
        let s = configure(&mut cfg).unwrap();
        assert!(cfg.untaken().is_empty());
        CacheBackend::new(s, Arc::new(Ram(d.clone()))).unwrap()
    }

    /// Bytes in the cache.
    fn used(b: &CacheBackend) -> u64 {
        b.shared.map.lock().unwrap().used
    }

    /// Write as the server does: FUA goes down only where it is native,
    /// and is emulated with a flush otherwise.
    fn write(h: &dyn Handle, data: &[u8], offset: u64, fua: bool) {
        let native = h.can_fua().unwrap() == FuaMode::Native;
        h.pwrite(data, offset, fua && native).unwrap();
        if fua && !native {
            h.flush().unwrap();
        }
    }

    fn zero(h: &dyn Handle, offset: u64, count: u64, fua: bool) {
        let native = h.can_fua().unwrap() == FuaMode::Native;
        let flags = ZeroFlags {
            fua: fua && native,
            ..Default::default()
        };
        h.zero(offset, count, flags).unwrap();
        if fua && !native {
            h.flush().unwrap();
        }
    }

    fn read(h: &dyn Handle, offset: u64, n: u64) -> Vec<u8> {
        let mut buf = vec![0u8; n as usize];
        h.pread(&mut buf, offset).unwrap();
        buf
    }

    fn pattern(n: u64) -> Vec<u8> {
        (0..n).map(|i| (i % 251) as u8 ^ (i >> 12) as u8).collect()
    }

    #[test]
    fn second_read_does_not_reach_the_plugin() {
        let d = disk(pattern(1 << 20));
        let b = backend(&d, &[("cache-on-read", "true")]);
        let h = b.open(false, "").unwrap();
        assert_eq!(read(&*h, 1000, 300_000), pattern(1 << 20)[1000..301_000]);
        let n = d.reads.load(Ordering::SeqCst);
        let bytes = d.read_bytes.load(Ordering::SeqCst);
        // Whole 64K blocks were fetched: [0, 320K).
        assert_eq!(bytes, 320 << 10);
        // Another connection, another range inside: no read below.
        let h2 = b.open(false, "").unwrap();
        assert_eq!(read(&*h2, 5000, 200_000), pattern(1 << 20)[5000..205_000]);
        assert_eq!(d.reads.load(Ordering::SeqCst), n);
        // Without cache-on-read, reads pass through every time.
        let d2 = disk(pattern(1 << 20));
        let h = backend(&d2, &[]).open(false, "").unwrap();
        read(&*h, 0, 4096);
        read(&*h, 0, 4096);
        assert_eq!(d2.reads.load(Ordering::SeqCst), 2);
        assert_eq!(d2.read_bytes.load(Ordering::SeqCst), 8192);
    }

    #[test]
    fn concurrent_readers_wait_for_one_fetch() {
        let d = disk(pattern(1 << 20));
        d.slow_ms.store(50, Ordering::SeqCst);
        let b = backend(&d, &[("cache-on-read", "true")]);
        let handles: Vec<_> = (0..4).map(|_| b.open(false, "").unwrap()).collect();
        std::thread::scope(|s| {
            for (i, h) in handles.iter().enumerate() {
                s.spawn(move || {
                    // Overlapping ranges, all inside [0, 256K).
                    let off = i as u64 * 10_000;
                    assert_eq!(
                        read(&**h, off, 200_000),
                        pattern(1 << 20)[off as usize..off as usize + 200_000]
                    );
                });
            }
        });
        assert_eq!(d.read_bytes.load(Ordering::SeqCst), 256 << 10);
        // The same through NBD_CMD_CACHE racing a read.
        let d = disk(pattern(1 << 20));
        d.slow_ms.store(50, Ordering::SeqCst);
        let b = backend(&d, &[("cache-on-read", "true")]);
        let (h1, h2) = (b.open(false, "").unwrap(), b.open(false, "").unwrap());
        std::thread::scope(|s| {
            s.spawn(|| h1.cache(0, 1 << 20).unwrap());
            s.spawn(|| read(&*h2, 500_000, 100_000));
        });
        assert_eq!(d.read_bytes.load(Ordering::SeqCst), 1 << 20);
    }

    #[test]
    fn a_write_during_a_fetch_is_not_hidden_by_it() {
        for mode in ["writeback", "writethrough"] {
            let d = disk(pattern(1 << 20));
            d.slow_ms.store(100, Ordering::SeqCst);
            let b = backend(&d, &[("cache-on-read", "true"), ("cache", mode)]);
            let (h1, h2) = (b.open(false, "").unwrap(), b.open(false, "").unwrap());
            std::thread::scope(|s| {
                s.spawn(|| read(&*h1, 0, 4096));
                s.spawn(|| {
                    std::thread::sleep(std::time::Duration::from_millis(30));
                    // The fetch has read the old bytes and not yet cached
                    // them.
                    h2.pwrite(b"new", 10, false).unwrap();
                });
            });
            d.slow_ms.store(0, Ordering::SeqCst);
            assert_eq!(&read(&*h1, 10, 3), b"new", "{mode}");
        }
    }

    #[test]
    fn zeroing_a_whole_disk_leaves_nothing_dirty() {
        let d = disk(pattern(4 << 20));
        d.native_zero.store(true, Ordering::SeqCst);
        let b = backend(&d, &[]);
        let h = b.open(false, "").unwrap();
        h.pwrite(&[9; 100], 70_000, false).unwrap();
        h.zero(0, 4 << 20, ZeroFlags::default()).unwrap();
        assert_eq!(
            d.zeroes.load(Ordering::SeqCst),
            2,
            "around the one cached block"
        );
        {
            let below = d.data.lock().unwrap();
            assert!(is_zero(&below[..65536]) && is_zero(&below[131072..]));
        }
        // The cached block (written, then zeroed) is the only dirty one.
        assert_eq!(b.shared.map.lock().unwrap().dirty.len(), 1);
        assert!(is_zero(&read(&*h, 0, 4 << 20)));
        h.flush().unwrap();
        assert!(is_zero(&d.data.lock().unwrap()));
    }

    #[test]
    fn cache_command_fills_the_cache() {
        let d = disk(pattern(1 << 20));
        let h = backend(&d, &[]).open(false, "").unwrap();
        assert_eq!(h.can_cache().unwrap(), CacheMode::Native);
        h.cache(0, 1 << 20).unwrap();
        let n = d.reads.load(Ordering::SeqCst);
        assert_eq!(read(&*h, 0, 1 << 20), pattern(1 << 20));
        assert_eq!(d.reads.load(Ordering::SeqCst), n);
        assert_eq!(d.caches.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn on_read_path_switch() {
        let dir = tempfile::tempdir().unwrap();
        let flag = dir.path().join("on");
        let d = disk(pattern(1 << 20));
        let b = backend(&d, &[("cache-on-read", flag.to_str().unwrap())]);
        let h = b.open(false, "").unwrap();
        read(&*h, 0, 4096);
        read(&*h, 0, 4096);
        assert_eq!(d.reads.load(Ordering::SeqCst), 2);
        std::fs::write(&flag, "").unwrap();
        read(&*h, 0, 4096);
        read(&*h, 0, 4096);
        assert_eq!(d.reads.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn modes_decide_when_writes_reach_the_plugin() {
        let orig = pattern(256 << 10);
        for (mode, at_write, at_flush) in [
            ("writeback", false, true),
            ("writethrough", true, true),
            ("unsafe", false, false),
        ] {
            let d = disk(orig.clone());
            let h = backend(&d, &[("cache", mode)]).open(false, "").unwrap();
            write(&*h, b"hello", 70_000, false);
            let below = |d: &Disk| d.data.lock().unwrap()[70_000..70_005] == *b"hello";
            assert_eq!(below(&d), at_write, "{mode}: after the write");
            assert_eq!(
                read(&*h, 69_999, 7),
                [orig[69_999], b'h', b'e', b'l', b'l', b'o', orig[70_005]]
            );
            h.flush().unwrap();
            assert_eq!(below(&d), at_flush, "{mode}: after flush");
            assert_eq!(
                d.persisted.lock().unwrap()[70_000..70_005] == *b"hello",
                at_flush,
                "{mode}: persisted after flush"
            );
            // FUA: written and persisted at once except in unsafe mode.
            write(&*h, b"fua!", 200_000, true);
            assert_eq!(
                d.persisted.lock().unwrap()[200_000..200_004] == *b"fua!",
                mode != "unsafe",
                "{mode}: FUA"
            );
            // Disconnecting writes everything back in every mode.
            drop(h);
            assert_eq!(&d.data.lock().unwrap()[70_000..70_005], b"hello", "{mode}");
            assert_eq!(&d.data.lock().unwrap()[200_000..200_004], b"fua!", "{mode}");
        }
    }

    #[test]
    fn dirty_blocks_are_data_in_block_status() {
        let d = disk(vec![0u8; 256 << 10]);
        let h = backend(&d, &[]).open(false, "").unwrap();
        h.pwrite(&[1; 10], 65536 + 5, false).unwrap();
        // (offset, length, is data) of the whole disk.
        let status = |h: &dyn Handle| {
            let mut ex = Extents::new(0, 256 << 10);
            h.extents(0, 256 << 10, false, &mut ex).unwrap();
            ex.list()
                .iter()
                .map(|e| (e.offset, e.length, e.flags == 0))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            status(&*h),
            [
                (0, 65536, false),
                (65536, 65536, true),
                (131072, 131072, false)
            ]
        );
        // Once written back, the plugin's own (finer) answer is used.
        h.flush().unwrap();
        assert_eq!(
            status(&*h),
            [
                (0, 65536, false),
                (65536, 4096, true),
                (69632, 192512, false)
            ]
        );
    }

    #[test]
    fn reclaim_keeps_the_cache_small_and_writes_dirty_blocks_first() {
        let d = disk(pattern(1 << 20));
        let b = backend(
            &d,
            &[
                ("cache-min-block-size", "4K"),
                ("cache-max-size", "64K"),
                ("cache-on-read", "true"),
            ],
        );
        let h = b.open(false, "").unwrap();
        h.pwrite(&[7; 4096], 0, false).unwrap();
        assert_eq!(read(&*h, 0, 1 << 20), {
            let mut v = pattern(1 << 20);
            v[..4096].fill(7);
            v
        });
        // The dirty block was written down before it was dropped.
        assert_eq!(&d.data.lock().unwrap()[..4096], &[7; 4096][..]);
        let used = used(&b);
        assert!(used <= 64 << 10, "{used}");
    }

    #[test]
    fn bad_parameters() {
        for (k, v, why) in [
            (
                "cache",
                "sometimes",
                "expected one of writeback, writethrough, unsafe",
            ),
            ("cache-min-block-size", "1000", "must be a power of two"),
            ("cache-min-block-size", "2K", "must be a power of two"),
            ("cache-high-threshold", "0", "percentage from 1 to 100"),
            (
                "cache-low-threshold",
                "99",
                "must be below cache-high-threshold",
            ),
            ("cache-max-size", "4K", "at least the block size"),
            ("cache-on-read", "maybe", "cache-on-read=maybe"),
        ] {
            let mut cfg = Config::new(vec![(k.into(), v.into())]);
            let e = (SPEC.configure)(&mut cfg).err().unwrap().to_string();
            assert!(e.contains(why), "{k}={v}: {e}");
            assert!(e.starts_with("cache filter: "), "{e}");
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write(u64, Vec<u8>, bool),
        Zero(u64, u64, bool),
        Trim(u64, u64),
        Read(u64, u64),
        Cache(u64, u64),
        Flush,
        /// Close the handle and open another.
        Reopen,
    }

    const SIZE: u64 = 9 * 4096 + 1000; // a partial last block

    fn op() -> impl Strategy<Value = Op> {
        let range = (0..SIZE).prop_flat_map(|o| (Just(o), 1..=(SIZE - o).min(5 * 4096)));
        prop_oneof![
            3 => (range.clone(), any::<bool>(), any::<u8>()).prop_map(|((o, n), fua, s)| {
                Op::Write(o, (0..n).map(|i| (i as u8).wrapping_mul(7) ^ s | 1).collect(), fua)
            }),
            1 => (range.clone(), any::<bool>()).prop_map(|((o, n), fua)| Op::Zero(o, n, fua)),
            1 => range.clone().prop_map(|(o, n)| Op::Trim(o, n)),
            3 => range.clone().prop_map(|(o, n)| Op::Read(o, n)),
            1 => range.prop_map(|(o, n)| Op::Cache(o, n)),
            1 => Just(Op::Flush),
            1 => Just(Op::Reopen),
        ]
    }

    proptest! {
        /// Whatever the mode and however small the cache, reads always
        /// return what a flat disk would hold, and no write is lost: after
        /// a flush (writeback, writethrough) or a disconnect (every mode),
        /// the plugin holds exactly that disk.
        #[test]
        fn matches_a_flat_model(ops in proptest::collection::vec(op(), 1..50),
                                mode in prop_oneof![Just("writeback"), Just("writethrough"), Just("unsafe")],
                                on_read in any::<bool>(),
                                native_zero in any::<bool>(),
                                max in prop_oneof![Just("8K"), Just("16K"), Just("1M")]) {
            let base = pattern(SIZE);
            let d = disk(base.clone());
            d.native_zero.store(native_zero, Ordering::SeqCst);
            let params = [("cache", mode), ("cache-min-block-size", "4K"),
                          ("cache-max-size", max),
                          ("cache-on-read", if on_read { "true" } else { "false" })];
            let b = backend(&d, &params);
            let mut h = b.open(false, "").unwrap();
            let mut model = base;
            for op in &ops {
                match op {
                    Op::Write(o, data, fua) => {
                        write(&*h, data, *o, *fua);
                        model[*o as usize..*o as usize + data.len()].copy_from_slice(data);
                    }
                    Op::Zero(o, n, fua) => {
                        zero(&*h, *o, *n, *fua);
                        model[*o as usize..(*o + *n) as usize].fill(0);
                    }
                    Op::Trim(o, n) => {
                        h.trim(*o, *n, false).unwrap();
                        // Whole blocks are trimmed below (which zeroes);
                        // the partial ends are left alone.
                        let start = o.div_ceil(4096) * 4096;
                        let end = if o + n == SIZE { SIZE } else { (o + n) / 4096 * 4096 };
                        if start < end {
                            model[start as usize..end as usize].fill(0);
                        }
                    }
                    Op::Read(o, n) => {
                        prop_assert_eq!(read(&*h, *o, *n), &model[*o as usize..(*o + *n) as usize]);
                    }
                    Op::Cache(o, n) => h.cache(*o, *n).unwrap(),
                    Op::Flush => {
                        h.flush().unwrap();
                        if mode != "unsafe" {
                            prop_assert!(*d.persisted.lock().unwrap() == model);
                        }
                    }
                    Op::Reopen => {
                        drop(h);
                        prop_assert!(*d.data.lock().unwrap() == model);
                        h = b.open(false, "").unwrap();
                    }
                }
                if mode == "writethrough" {
                    prop_assert!(*d.data.lock().unwrap() == model);
                }
                let used = used(&b);
                if max == "8K" {
                    // high threshold 95% of 8K: at most one 4K block
                    // stays after any request.
                    prop_assert!(used <= 8192, "{}", used);
                }
            }
            prop_assert!(read(&*h, 0, SIZE) == model);
            // Block status never calls data a hole (dirty blocks are data
            // even where the plugin still has zeroes).
            let mut ex = Extents::new(0, SIZE);
            h.extents(0, SIZE, false, &mut ex).unwrap();
            prop_assert_eq!(ex.next_offset(), SIZE);
            for e in ex.list() {
                if e.flags & nbdkit_backend::EXTENT_ZERO != 0 {
                    prop_assert!(is_zero(&model[e.offset as usize..(e.offset + e.length) as usize]));
                }
            }
            drop(h);
            prop_assert!(*d.data.lock().unwrap() == model);
        }
    }
}
