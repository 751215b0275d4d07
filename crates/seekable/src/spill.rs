//! Helpers of the engine: the bound on scratch disk use, the scratch-file
//! tier behind the block cache, and a counting semaphore bounding decodes
//! held in memory at once.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, OnceLock, RwLock};

use lru::LruCache;

use crate::progressive::{get_bit, CHUNK};
use crate::sync::{CondvarExt, LockExt, RwLockExt};
use crate::Result;

/// The one bound on the scratch disk a reader uses: the progressive scratch
/// files of blocks/frames too big for memory and the scratch-cache tier
/// together.  Bytes are reserved before they are written; only written
/// (non-zero) bytes count, as zero chunks stay holes.
pub(crate) struct Budget {
    max: u64,
    used: AtomicU64,
}

impl Budget {
    pub(crate) fn new(max: u64) -> Budget {
        Budget {
            max,
            used: AtomicU64::new(0),
        }
    }

    pub(crate) fn max(&self) -> u64 {
        self.max
    }

    pub(crate) fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Reserve `n` bytes; false (and nothing reserved) if that would
    /// exceed the bound.
    pub(crate) fn try_reserve(&self, n: u64) -> bool {
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            let Some(next) = cur.checked_add(n).filter(|&x| x <= self.max) else {
                return false;
            };
            match self
                .used
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(c) => cur = c,
            }
        }
    }

    /// Count `n` bytes already on disk, even past the bound.
    pub(crate) fn force_reserve(&self, n: u64) {
        self.used.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn release(&self, n: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(n))
            });
    }
}

/// Bound used when the free space of the scratch directory cannot be
/// found out.
pub(crate) const FALLBACK_SCRATCH_BOUND: u64 = 16 << 30;

/// The default bound on scratch disk use: half the space free (to
/// unprivileged users) in `dir` (or the temporary directory) now, or
/// [`FALLBACK_SCRATCH_BOUND`] if that cannot be found out.
pub(crate) fn default_scratch_bound(dir: Option<&Path>) -> u64 {
    let dir = dir.map_or_else(std::env::temp_dir, Path::to_path_buf);
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return FALLBACK_SCRATCH_BOUND;
    };
    // SAFETY: statvfs is a plain C struct of integers, for which all-zero
    // is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a struct of the
    // type statvfs fills in, alive for the call.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        tracing::warn!(
            "cannot find the free space of {} ({}); scratch disk bound {} GiB",
            dir.display(),
            std::io::Error::last_os_error(),
            FALLBACK_SCRATCH_BOUND >> 30
        );
        return FALLBACK_SCRATCH_BOUND;
    }
    (st.f_bavail as u64).saturating_mul(st.f_frsize as u64) / 2
}

/// Free the blocks of `[offset, offset+len)` of `f`, keeping its size.
fn punch_hole(f: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on an open descriptor.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Per-segment states of the scratch tier.
const NONE: u8 = 0;
const WRITING: u8 = 1;
const SPILLED: u8 = 2;
/// Read by a sequential stream: not worth writing out when evicted (a
/// whole-image copy would otherwise write the whole image to scratch).
const STREAMED: u8 = 3;

/// Decoded segments evicted from the RAM cache, kept in one sparse scratch
/// file at their decompressed offsets: the file is a partial, sparse copy
/// of the decompressed image.  All-zero chunks are never written (they
/// stay holes and read back as zeroes), and only written bytes count
/// against the bound.  When the tier is full (its own bound, or the
/// reader's scratch [`Budget`] shared with progressive scratch files), the
/// least recently used segments are evicted: their ranges are hole-punched
/// and read again by decoding.
pub(crate) struct Spill {
    name: String,
    dir: Option<PathBuf>,
    size: u64,
    max_bytes: u64,
    used: AtomicU64,
    state: Vec<AtomicU8>,
    budget: std::sync::Arc<Budget>,
    /// Spilled segments, least recently used first, with (uoffset, length,
    /// bytes counted).
    lru: Mutex<LruCache<usize, (u64, u64, u64)>>,
    /// Readers hold it shared across "is it spilled?" and the pread;
    /// eviction holds it exclusively while it punches, so no read can see
    /// a range turning into zeroes.
    punch: RwLock<()>,
    /// Created on the first spill, so a reader that never evicts anything
    /// never makes a file.  `None` inside: creating it failed (logged once).
    file: OnceLock<Option<File>>,
    full_logged: AtomicBool,
}

impl Spill {
    pub(crate) fn new(
        name: &str,
        dir: Option<PathBuf>,
        size: u64,
        segments: usize,
        max_bytes: u64,
        budget: std::sync::Arc<Budget>,
    ) -> Spill {
        Spill {
            name: name.to_string(),
            dir,
            size,
            max_bytes,
            used: AtomicU64::new(0),
            state: (0..segments).map(|_| AtomicU8::new(NONE)).collect(),
            budget,
            lru: Mutex::new(LruCache::unbounded()),
            punch: RwLock::new(()),
            file: OnceLock::new(),
            full_logged: AtomicBool::new(false),
        }
    }

    fn file(&self) -> Option<&File> {
        self.file
            .get_or_init(|| {
                let made = match &self.dir {
                    Some(d) => tempfile::tempfile_in(d),
                    None => tempfile::tempfile(),
                }
                // Its full logical size up front, so reads of trailing
                // holes are reads of zeroes, not short reads.
                .and_then(|f| f.set_len(self.size).map(|()| f));
                match made {
                    Ok(f) => Some(f),
                    Err(e) => {
                        tracing::warn!(
                            "{}: cannot create the scratch cache file ({e}); evicted blocks \
                             will be decoded again when read",
                            self.name
                        );
                        None
                    }
                }
            })
            .as_ref()
    }

    /// Bytes written to the scratch file so far.
    pub(crate) fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub(crate) fn contains(&self, i: usize) -> bool {
        self.state
            .get(i)
            .is_some_and(|s| s.load(Ordering::Acquire) == SPILLED)
    }

    /// Note that segment `i` is being read by a sequential stream (or not).
    pub(crate) fn mark_streamed(&self, i: usize, streamed: bool) {
        if let Some(s) = self.state.get(i) {
            let (from, to) = if streamed {
                (NONE, STREAMED)
            } else {
                (STREAMED, NONE)
            };
            let _ = s.compare_exchange(from, to, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// Read decompressed `[offset, offset+buf.len())` of segment `i` if it
    /// is spilled (`None` if not).
    pub(crate) fn try_read(&self, i: usize, buf: &mut [u8], offset: u64) -> Option<Result<()>> {
        let _shared = self.punch.read_unpoisoned();
        if !self.contains(i) {
            return None;
        }
        self.lru.lock_unpoisoned().promote(&i);
        Some(match self.file() {
            Some(f) => f.read_exact_at(buf, offset).map_err(crate::Error::Scratch),
            None => Err(crate::Error::Scratch(std::io::Error::other(
                "scratch cache file missing",
            ))),
        })
    }

    /// Evict the least recently used spilled segment: punch its range
    /// and release its bytes.  False when nothing is spilled.
    pub(crate) fn evict_one(&self) -> bool {
        let _excl = self.punch.write_unpoisoned();
        let Some((i, (uoffset, len, bytes))) = self.lru.lock_unpoisoned().pop_lru() else {
            return false;
        };
        if let Some(f) = self.file.get().and_then(|f| f.as_ref()) {
            if let Err(e) = punch_hole(f, uoffset, len) {
                // The bytes stay on disk; still unused, so overwritten
                // by the next spill of the range. Counted as freed: the
                // file never holds more than the image's size anyway.
                tracing::warn!("{}: cannot punch the scratch cache ({e})", self.name);
            }
        }
        if let Some(s) = self.state.get(i) {
            s.store(NONE, Ordering::Release);
        }
        self.used.fetch_sub(bytes, Ordering::Relaxed);
        self.budget.release(bytes);
        true
    }

    /// Keep segment `i` (decompressed offset `uoffset`, data `data`, zero
    /// chunk bitmap `zeros`) if it is not kept already and fits.  Errors
    /// only cost a later re-decode, so they are logged, not returned.
    pub(crate) fn put(&self, i: usize, uoffset: u64, data: &[u8], zeros: Option<&[u64]>) {
        let Some(state) = self.state.get(i) else {
            return;
        };
        if state.load(Ordering::Relaxed) != NONE {
            return;
        }
        let chunks = data.len().div_ceil(CHUNK as usize);
        let is_zero = |c: usize| zeros.is_some_and(|z| get_bit(z, c as u64));
        let need: u64 = (0..chunks)
            .filter(|&c| !is_zero(c))
            .map(|c| (data.len() - c * CHUNK as usize).min(CHUNK as usize) as u64)
            .sum();
        if need > self.max_bytes || need > self.budget.max() {
            return;
        }
        // Reserve the space first (evicting the least recently used
        // segments to make room), so concurrent spills cannot overshoot.
        loop {
            let prev = self.used.fetch_add(need, Ordering::Relaxed);
            if prev + need <= self.max_bytes && self.budget.try_reserve(need) {
                break;
            }
            self.used.fetch_sub(need, Ordering::Relaxed);
            if !self.evict_one() {
                // Nothing of ours left to evict: the rest of the budget is
                // held by progressive scratch files.
                if !self.full_logged.swap(true, Ordering::Relaxed) {
                    tracing::info!(
                        "{}: scratch space is full ({} MiB); blocks evicted from memory are \
                         decoded again when read (raise FMT-scratch-size to keep more)",
                        self.name,
                        self.budget.max() >> 20
                    );
                }
                return;
            }
        }
        let unreserve = || {
            self.used.fetch_sub(need, Ordering::Relaxed);
            self.budget.release(need);
        };
        if state
            .compare_exchange(NONE, WRITING, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            unreserve();
            return;
        }
        let Some(f) = self.file() else {
            unreserve();
            state.store(NONE, Ordering::Relaxed);
            return;
        };
        for (c, chunk) in data.chunks(CHUNK as usize).enumerate() {
            if is_zero(c) {
                continue;
            }
            if let Err(e) = f.write_all_at(chunk, uoffset + (c as u64) * CHUNK) {
                tracing::warn!(
                    "{}: writing the scratch cache failed ({e}); the block will be decoded \
                     again when read",
                    self.name
                );
                unreserve();
                state.store(NONE, Ordering::Relaxed);
                return;
            }
        }
        // Readable first, then evictable (evicting it before it is
        // marked spilled would let the mark stand over a punched range).
        state.store(SPILLED, Ordering::Release);
        self.lru
            .lock_unpoisoned()
            .push(i, (uoffset, data.len() as u64, need));
    }
}

/// A counting semaphore: at most `n` holders at once.
pub(crate) struct Permits {
    free: Mutex<usize>,
    cv: Condvar,
}

pub(crate) struct Permit<'a>(&'a Permits);

impl Permits {
    pub(crate) fn new(n: usize) -> Permits {
        Permits {
            free: Mutex::new(n.max(1)),
            cv: Condvar::new(),
        }
    }

    pub(crate) fn acquire(&self) -> Permit<'_> {
        let mut free = self.free.lock_unpoisoned();
        while *free == 0 {
            free = self.cv.wait_unpoisoned(free);
        }
        *free -= 1;
        Permit(self)
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut free = self.0.free.lock_unpoisoned();
        *free += 1;
        self.0.cv.notify_one();
    }
}
