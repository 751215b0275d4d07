//! `readahead`: when a client reads sequentially, fetch ahead of it, so a
//! slow source sees a few large requests instead of many small ones.
//!
//! Each connection watches its own reads.  How the window ahead is
//! fetched depends on the next backend:
//!
//! * if it has a native NBD_CMD_CACHE (the `cache` filter, the file plugin,
//!   an `sh` script's `cache`) every read is followed by a `cache` of the
//!   window after it, as nbdkit does: the window starts at 32 KiB, doubles
//!   up to 4 MiB when a read starts beyond what was last prefetched, stays
//!   while reads move forward, and falls back to 32 KiB when they do not.
//!   The cache runs in a background thread when the layers below run
//!   requests in parallel (so the client does not wait for it), in line
//!   otherwise;
//! * if not (where nbdkit's filter does nothing), a read that starts where
//!   the previous one ended (give or take one request, as a client with
//!   several requests in flight can reorder them) is sequential, each
//!   sequential read doubles a window from 64 KiB up to 4 MiB, any other
//!   read resets it, and the read itself is stretched to the window; the
//!   extra bytes are kept in a buffer that the next reads are served from.
//!   Any write, trim or zero, on any connection, invalidates every buffer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use nbdkit_backend::LockExt;
use nbdkit_backend::{
    layer_fn, Backend, CacheMode, FilterSpec, Handle, Result, ThreadModel, ZeroFlags,
};

/// The first window after a sequential read.
const MIN_WINDOW: u64 = 64 << 10;
/// The first window with a native cache below (nbdkit's minimum).
const CACHE_MIN_WINDOW: u64 = 32 << 10;
/// The window doubles up to this.
const MAX_WINDOW: u64 = 4 << 20;

struct ReadaheadBackend {
    next: Arc<dyn Backend>,
    /// Bumped after every write, trim or zero on any connection: a buffer
    /// filled under an older generation may be stale.
    generation: Arc<AtomicU64>,
}

impl Backend for ReadaheadBackend {
    fn name(&self) -> &str {
        "readahead"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        let next: Arc<dyn Handle> = Arc::from(self.next.open(readonly, export)?);
        let size = next.size()?;
        let how = if next.can_cache()? != CacheMode::Native {
            Fetch::Buffer
        } else if self.next.thread_model() == ThreadModel::Parallel {
            Fetch::Background(Worker::start(next.clone()))
        } else {
            Fetch::InLine
        };
        // Stretched reads stay within what the next backend accepts.
        let max_read = next
            .block_size()?
            .map_or(MAX_WINDOW, |bs| MAX_WINDOW.min(bs.maximum as u64));
        Ok(Box::new(ReadaheadHandle {
            next,
            size,
            max_read,
            generation: self.generation.clone(),
            how,
            st: Mutex::new(State::default()),
        }))
    }
}

/// A thread that passes prefetch ranges to the next handle's `cache`.
struct Worker {
    tx: Option<Sender<(u64, u64)>>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    fn start(next: Arc<dyn Handle>) -> Worker {
        let (tx, rx) = channel::<(u64, u64)>();
        let thread = std::thread::Builder::new()
            .name("readahead".into())
            .spawn(move || {
                for (offset, count) in rx {
                    // Prefetching is advisory: a failure only costs time.
                    if let Err(e) = next.cache(offset, count) {
                        tracing::debug!("readahead filter: prefetch at {offset}: {e}");
                    }
                }
            });
        match thread {
            Ok(t) => Worker {
                tx: Some(tx),
                thread: Some(t),
            },
            Err(e) => {
                tracing::warn!("readahead filter: no prefetch thread ({e}); prefetching in line");
                Worker {
                    tx: None,
                    thread: None,
                }
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing the channel ends the thread once the queue is done; the
        // next handle must not be used after this connection closes.
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

enum Fetch {
    /// Stretch reads into a buffer.
    Buffer,
    /// `next.cache` in the request's own thread.
    InLine,
    /// `next.cache` in a background thread.
    Background(Worker),
}

/// Bytes read ahead, and the generation they were read under.
struct Buffer {
    offset: u64,
    data: Vec<u8>,
    generation: u64,
}

#[derive(Default)]
struct State {
    /// End of the reads so far, if there were any.
    last_end: Option<u64>,
    /// Current window; 0 when the reads are not sequential.
    window: u64,
    buffer: Option<Buffer>,
    /// The prefetch window with a native cache below: nbdkit's rules, see
    /// [`State::cache_window`].
    ra_window: u64,
    last_offset: u64,
    last_readahead: u64,
}

impl State {
    /// With a native cache below, every read asks it for the window after
    /// the read, as nbdkit does: the window starts at 32 KiB, doubles (up
    /// to 4 MiB) when the read starts beyond what was last prefetched,
    /// stays while reads move forward, and drops back to 32 KiB when they
    /// do not.  Returns the range to cache.
    fn cache_window(&mut self, offset: u64, end: u64, size: u64) -> Option<(u64, u64)> {
        if self.ra_window == 0 {
            self.ra_window = CACHE_MIN_WINDOW;
        }
        let count = if end < size {
            self.ra_window.min(size - end)
        } else {
            0
        };
        if self.last_readahead < offset {
            self.ra_window = (self.ra_window * 2).min(MAX_WINDOW);
        } else if self.last_offset >= offset {
            self.ra_window = CACHE_MIN_WINDOW;
        }
        self.last_offset = offset;
        self.last_readahead = end + count;
        (count > 0).then_some((end, count))
    }

    /// Note a read of `[offset, end)` and return the window to fetch ahead.
    fn observe(&mut self, offset: u64, end: u64) -> u64 {
        let slack = (end - offset).max(MIN_WINDOW);
        let sequential = self
            .last_end
            .is_some_and(|last| offset <= last + slack && end + slack >= last);
        if sequential {
            self.window = if self.window == 0 {
                MIN_WINDOW.max(end - offset)
            } else {
                (self.window * 2).min(MAX_WINDOW)
            };
            self.last_end = self.last_end.max(Some(end));
        } else {
            self.window = 0;
            self.last_end = Some(end);
        }
        self.window
    }
}

struct ReadaheadHandle {
    next: Arc<dyn Handle>,
    size: u64,
    max_read: u64,
    generation: Arc<AtomicU64>,
    how: Fetch,
    st: Mutex<State>,
}

impl ReadaheadHandle {
    /// Run a request that changes the disk, then invalidate every buffer.
    fn changing<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let r = f();
        // After the change is done: a buffer read before now is stale.
        self.generation.fetch_add(1, Ordering::SeqCst);
        r
    }

    fn read_buffered(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset + buf.len() as u64;
        let generation = self.generation.load(Ordering::SeqCst);
        let window = {
            let mut st = self.st.lock_unpoisoned();
            let window = st.observe(offset, end);
            if let Some(b) = &st.buffer {
                let b_end = b.offset + b.data.len() as u64;
                if b.generation == generation && b.offset <= offset && end <= b_end {
                    let at = (offset - b.offset) as usize;
                    buf.copy_from_slice(&b.data[at..at + buf.len()]);
                    return Ok(());
                }
            }
            window
        };
        let want = (buf.len() as u64)
            .max(window.min(self.max_read))
            .min(self.size - offset);
        if want <= buf.len() as u64 {
            return self.next.pread(buf, offset);
        }
        let mut data = vec![0u8; want as usize];
        self.next.pread(&mut data, offset)?;
        buf.copy_from_slice(&data[..buf.len()]);
        self.st.lock_unpoisoned().buffer = Some(Buffer {
            offset,
            data,
            generation,
        });
        Ok(())
    }
}

impl Handle for ReadaheadHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }

    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        if matches!(self.how, Fetch::Buffer) {
            return self.read_buffered(buf, offset);
        }
        let end = offset + buf.len() as u64;
        let range = self
            .st
            .lock_unpoisoned()
            .cache_window(offset, end, self.size);
        // The prefetch is queued before the read, so the two overlap.
        if let Some((from, count)) = range {
            let queued = match &self.how {
                Fetch::Background(Worker { tx: Some(tx), .. }) => tx.send((from, count)).is_ok(),
                _ => false,
            };
            if !queued {
                if let Err(e) = self.next.cache(from, count) {
                    tracing::debug!("readahead filter: prefetch at {from}: {e}");
                }
            }
        }
        self.next.pread(buf, offset)
    }

    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.changing(|| self.next.pwrite(buf, offset, fua))
    }
    fn trim(&self, offset: u64, count: u64, fua: bool) -> Result<()> {
        self.changing(|| self.next.trim(offset, count, fua))
    }
    fn zero(&self, offset: u64, count: u64, flags: ZeroFlags) -> Result<()> {
        self.changing(|| self.next.zero(offset, count, flags))
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "readahead",
    summary: "detect sequential reads and fetch ahead of them (a window growing to 4 MiB)",
    description: "With a native cache below (the cache filter, the file plugin) the window is\n\
prefetched with NBD_CMD_CACHE; otherwise reads are stretched into a buffer that\n\
the next reads come from.  No parameters.\n\n\
Example:\n  nbdkit-rs --filter=readahead --filter=cache --filter=xz file disk.img.xz cache-on-read=true",
    params: &[],
    configure: |_cfg| {
        Ok(layer_fn(|next| {
            Ok(Arc::new(ReadaheadBackend {
                next,
                generation: Arc::new(AtomicU64::new(0)),
            }))
        }))
    },
};

#[cfg(test)]
mod tests {
    use super::*;
    use nbdkit_backend::Config;

    /// A RAM disk shared by its handles, recording what reaches it.
    struct Ram {
        data: Arc<Mutex<Vec<u8>>>,
        native_cache: bool,
        model: ThreadModel,
        log: Arc<Mutex<Vec<(char, u64, u64)>>>,
    }
    struct RamHandle {
        data: Arc<Mutex<Vec<u8>>>,
        native_cache: bool,
        log: Arc<Mutex<Vec<(char, u64, u64)>>>,
    }
    impl Backend for Ram {
        fn name(&self) -> &str {
            "ram"
        }
        fn thread_model(&self) -> ThreadModel {
            self.model
        }
        fn open(&self, _: bool, _: &str) -> Result<Box<dyn Handle>> {
            Ok(Box::new(RamHandle {
                data: self.data.clone(),
                native_cache: self.native_cache,
                log: self.log.clone(),
            }))
        }
    }
    impl Handle for RamHandle {
        fn size(&self) -> Result<u64> {
            Ok(self.data.lock().unwrap().len() as u64)
        }
        fn can_write(&self) -> Result<bool> {
            Ok(true)
        }
        fn can_cache(&self) -> Result<CacheMode> {
            Ok(if self.native_cache {
                CacheMode::Native
            } else {
                CacheMode::None
            })
        }
        fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            self.log
                .lock()
                .unwrap()
                .push(('r', offset, buf.len() as u64));
            let d = self.data.lock().unwrap();
            buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn pwrite(&self, buf: &[u8], offset: u64, _: bool) -> Result<()> {
            let mut d = self.data.lock().unwrap();
            d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn cache(&self, offset: u64, count: u64) -> Result<()> {
            self.log.lock().unwrap().push(('c', offset, count));
            Ok(())
        }
    }

    type Log = Arc<Mutex<Vec<(char, u64, u64)>>>;

    fn setup(
        native_cache: bool,
        model: ThreadModel,
    ) -> (Arc<dyn Backend>, Arc<Mutex<Vec<u8>>>, Log) {
        let data = Arc::new(Mutex::new(
            (0..(16u64 << 20)).map(|i| (i % 253) as u8).collect(),
        ));
        let log: Log = Arc::default();
        let layer = (SPEC.configure)(&mut Config::default()).unwrap();
        let b = layer
            .layer(Arc::new(Ram {
                data: data.clone(),
                native_cache,
                model,
                log: log.clone(),
            }))
            .unwrap();
        (b, data, log)
    }

    fn read(h: &dyn Handle, offset: u64, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        h.pread(&mut buf, offset).unwrap();
        buf
    }

    #[test]
    fn window_grows_on_sequential_reads_and_resets() {
        let mut st = State::default();
        assert_eq!(st.observe(0, 4096), 0, "the first read is not a run yet");
        assert_eq!(st.observe(4096, 8192), MIN_WINDOW);
        assert_eq!(st.observe(8192, 12288), 2 * MIN_WINDOW);
        for i in 3..20 {
            st.observe(i * 4096, (i + 1) * 4096);
        }
        assert_eq!(st.window, MAX_WINDOW);
        assert_eq!(st.observe(10 << 20, (10 << 20) + 4096), 0);
        // A request overtaken by the one after it is still sequential.
        assert_eq!(
            st.observe((10 << 20) + 8192, (10 << 20) + 12288),
            MIN_WINDOW
        );
        assert_eq!(
            st.observe((10 << 20) + 4096, (10 << 20) + 8192),
            2 * MIN_WINDOW
        );
    }

    #[test]
    fn buffered_reads_are_exact_and_writes_invalidate() {
        let (b, data, log) = setup(false, ThreadModel::Parallel);
        let h = b.open(false, "").unwrap();
        let h2 = b.open(false, "").unwrap();
        for i in 0..256u64 {
            let got = read(&*h, i * 4096, 4096);
            assert_eq!(got, data.lock().unwrap()[(i * 4096) as usize..][..4096]);
            if i == 100 {
                // Another connection writes just ahead of the reader.
                h2.pwrite(&[0xee; 8192], 101 * 4096 + 5, false).unwrap();
            }
        }
        let reads = log.lock().unwrap().len();
        assert!(reads < 40, "256 sequential reads became {reads} below");
        assert!(log.lock().unwrap().iter().any(|&(_, _, n)| n >= 1 << 20));
        // The written bytes were read fresh.
        assert_eq!(read(&*h, 101 * 4096 + 5, 8192), vec![0xee; 8192]);
        drop(h);
        // Random reads are passed through unchanged.
        log.lock().unwrap().clear();
        let h = b.open(false, "").unwrap();
        for off in [9u64 << 20, 1 << 20, 5 << 20, 3 << 20, 7 << 20] {
            read(&*h, off, 4096);
        }
        assert!(log
            .lock()
            .unwrap()
            .iter()
            .all(|&(k, _, n)| k == 'r' && n == 4096));
    }

    #[test]
    fn native_cache_is_used_ahead_of_the_reader() {
        for model in [ThreadModel::Parallel, ThreadModel::SerializeRequests] {
            let (b, _data, log) = setup(true, model);
            let h = b.open(true, "").unwrap();
            for i in 0..64u64 {
                read(&*h, i * 65536, 65536);
            }
            drop(h); // waits for the prefetch thread
            let log = log.lock().unwrap();
            let cached: Vec<_> = log.iter().filter(|e| e.0 == 'c').collect();
            // Every read is followed by a cache of the 32 KiB after it:
            // the reads never get past what was prefetched, so the window
            // stays at its minimum (nbdkit's rule).
            let want: Vec<_> = (1..=64u64).map(|i| ('c', i * 65536, 32768)).collect();
            assert_eq!(
                cached.into_iter().copied().collect::<Vec<_>>(),
                want,
                "{model:?}"
            );
            let reads: Vec<_> = log.iter().filter(|e| e.0 == 'r').collect();
            assert_eq!(reads.len(), 64, "every read goes down: {model:?}");
            assert!(reads.iter().all(|e| e.2 == 65536));
        }
    }

    #[test]
    fn cache_window_follows_nbdkits_rules() {
        let mut st = State::default();
        let size = 64 << 20;
        // Sequential small reads: the 32 KiB after each.
        assert_eq!(st.cache_window(0, 512, size), Some((512, 32768)));
        assert_eq!(st.cache_window(512, 1024, size), Some((1024, 32768)));
        // A read beyond the prefetched area doubles the window (for the
        // next prefetch).
        assert_eq!(
            st.cache_window(1 << 20, (1 << 20) + 512, size),
            Some(((1 << 20) + 512, 32768))
        );
        assert_eq!(
            st.cache_window(2 << 20, (2 << 20) + 512, size),
            Some(((2 << 20) + 512, 65536))
        );
        // Going backwards falls back to the minimum.
        assert_eq!(st.cache_window(0, 512, size), Some((512, 131072)));
        assert_eq!(st.cache_window(512, 1024, size), Some((1024, 32768)));
        // Never past the end.
        assert_eq!(
            st.cache_window(size - 1024, size - 512, size),
            Some((size - 512, 512))
        );
        assert_eq!(st.cache_window(size - 512, size, size), None);
    }
}
