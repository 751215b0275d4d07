//! Two helpers of the engine: the scratch-file tier behind the block cache,
//! and a counting semaphore bounding decodes held in memory at once.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};

use crate::progressive::{get_bit, CHUNK};
use crate::Result;

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
/// against the bound.  Nothing is evicted from this tier: once it is full,
/// further evicted segments are simply dropped, so every segment spilled
/// is decoded at most once per reader.
pub(crate) struct Spill {
    name: String,
    dir: Option<PathBuf>,
    size: u64,
    max_bytes: u64,
    used: AtomicU64,
    state: Vec<AtomicU8>,
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
    ) -> Spill {
        Spill {
            name: name.to_string(),
            dir,
            size,
            max_bytes,
            used: AtomicU64::new(0),
            state: (0..segments).map(|_| AtomicU8::new(NONE)).collect(),
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

    /// Read decompressed `[offset, offset+buf.len())`, which must lie in a
    /// segment for which `contains` returned true.
    pub(crate) fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match self.file() {
            Some(f) => f.read_exact_at(buf, offset).map_err(crate::Error::Scratch),
            None => Err(crate::Error::Scratch(std::io::Error::other(
                "scratch cache file missing",
            ))),
        }
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
        // Reserve the space first, so concurrent spills cannot overshoot.
        let prev = self.used.fetch_add(need, Ordering::Relaxed);
        if prev + need > self.max_bytes {
            self.used.fetch_sub(need, Ordering::Relaxed);
            if !self.full_logged.swap(true, Ordering::Relaxed) {
                tracing::info!(
                    "{}: scratch cache is full ({} MiB); blocks evicted from memory from now \
                     on are decoded again when read (raise FMT-scratch-cache-size to keep more)",
                    self.name,
                    self.max_bytes >> 20
                );
            }
            return;
        }
        if state
            .compare_exchange(NONE, WRITING, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            self.used.fetch_sub(need, Ordering::Relaxed);
            return;
        }
        let Some(f) = self.file() else {
            self.used.fetch_sub(need, Ordering::Relaxed);
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
                self.used.fetch_sub(need, Ordering::Relaxed);
                state.store(NONE, Ordering::Relaxed);
                return;
            }
        }
        state.store(SPILLED, Ordering::Release);
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
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        while *free == 0 {
            free = self.cv.wait(free).unwrap_or_else(|e| e.into_inner());
        }
        *free -= 1;
        Permit(self)
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut free = self.0.free.lock().unwrap_or_else(|e| e.into_inner());
        *free += 1;
        self.0.cv.notify_one();
    }
}
