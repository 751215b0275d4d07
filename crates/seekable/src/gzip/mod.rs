//! Random access to gzip files (single member, concatenated, `pigz -i`,
//! BGZF) through a zran-style index.
//!
//! The index holds a checkpoint for every `span` bytes of output: the last
//! place at or before each multiple of `span` where decoding can resume (a
//! member start, or a deflate block boundary plus the 32 KiB history
//! window).  Reading span `k` decodes from its checkpoint, discarding at
//! most one deflate block of output, into a `span`-sized buffer cached in
//! the shared [`BlockCache`](crate::BlockCache).
//!
//! Building the index means decoding the whole file once.  [`GzipReader::open`]
//! does not wait for that: it checks the first member header and starts a
//! background walk; reads behind the walk's frontier are served at once,
//! reads beyond it wait until the frontier passes them.  The finished index
//! is saved (see [`GzipOptions`]) so the next open is instant.
//!
//! The exact decompressed size of a BGZF file is added up at open from its
//! member headers and trailers, without inflating (see [`bgzf_size_with`]),
//! so [`RandomAccess::size`] answers at once while the index is built.  For
//! other gzip files it is only known when the walk ends: gzip's ISIZE
//! trailer is the member length mod 2^32, and only per member, so it
//! cannot give the size of a multi-GiB or multi-member image.  There
//! [`RandomAccess::size`] blocks until the walk completes (immediately
//! when a saved index was loaded); [`GzipReader::indexed_frontier`] and
//! [`GzipReader::known_size`] let a caller avoid blocking.
//!
//! Trailing data: zero bytes after the last member are accepted as padding
//! (like `gzip -d`); any other trailing bytes make the walk fail with
//! [`Error::Corrupt`] naming their offset.  Once the walk has failed, every
//! read fails with that error and nothing is saved.

mod bgzf;
mod decode;
mod header;
mod index;
mod progress;
mod spec;
mod walk;
mod zstream;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

pub use bgzf::{bgzf_size, bgzf_size_with, BGZF_MAX_ISIZE};
pub use header::{is_gzip_magic, parse_header, Header, HeaderError};
pub use index::{
    fnv1a64, Checkpoint, GzipIndex, Identity, Kind, Window, MAX_CHECKPOINTS, MAX_SPAN, MIN_SPAN,
    ZERO_CHUNK,
};
pub use progress::WalkProgress;

use crate::flight::Flights;
use crate::pool::Pool;
use crate::sync::{CondvarExt, LockExt};
use crate::{read_exact, BlockCache, Error, Extent, Options, RandomAccess, Result, Source};
use index::checkpoint_for;

const FORMAT: &str = "gzip";
/// Bytes hashed at each end of the compressed file for its identity.
const ID_BYTES: u64 = 64 * 1024;

/// Gzip-specific options.
#[derive(Debug, Clone)]
pub struct GzipOptions {
    /// Output bytes between checkpoints (default 1 MiB): a read decodes at
    /// most this much plus one deflate block; the index holds one window
    /// (up to 32 KiB, compressed when possible) per span.
    pub span: u64,
    /// Explicit index file; default is
    /// `$XDG_CACHE_HOME/nbdkit-rs/gzip-index/<identity>.gzi`.
    pub index_path: Option<PathBuf>,
    /// Directory for default-named index files (overrides the XDG cache).
    pub index_dir: Option<PathBuf>,
    /// Extra identity of the source supplied by the caller (e.g. mtime,
    /// inode, ETag): mixed into the identity an index must match.  Without
    /// it a change in the middle of the file that keeps its size and its
    /// first and last 64 KiB goes unnoticed.
    pub identity: Option<Vec<u8>>,
    /// Load and save index files (default true).
    pub persist: bool,
    /// How often a running index walk logs its progress at debug level
    /// (default 5 s; a shorter walk logs nothing).
    pub progress_every: std::time::Duration,
}

impl Default for GzipOptions {
    fn default() -> Self {
        GzipOptions {
            span: 1 << 20,
            index_path: None,
            index_dir: None,
            identity: None,
            persist: true,
            progress_every: std::time::Duration::from_secs(5),
        }
    }
}

/// `$XDG_CACHE_HOME/nbdkit-rs/gzip-index`, falling back to `~/.cache`.
pub fn default_index_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("nbdkit-rs").join("gzip-index"))
}

/// Read-side statistics.
#[derive(Debug, Clone, Copy, Default)]
pub struct GzipStats {
    /// Spans decoded (cache misses).
    pub spans_decoded: u64,
    /// Spans decoded ahead of need by background threads.
    pub spans_ahead: u64,
    /// Independent pieces of single members (`pigz -i`) the index walk
    /// inflated in parallel.
    pub pieces_parallel: u64,
}

/// Random access to a gzip file.
pub struct GzipReader {
    sh: Arc<Shared>,
    /// Decodes spans ahead of a sequential reader, and the later spans of
    /// a read that covers several (`None` without threads).
    pool: Option<Pool>,
}

#[derive(Debug, Clone)]
pub(crate) enum FailKind {
    Corrupt,
    Io(io::ErrorKind),
    Unsupported,
}

/// A cloneable error (the walk's failure is reported to every reader).
#[derive(Debug, Clone)]
pub(crate) struct Fail {
    kind: FailKind,
    offset: u64,
    reason: String,
}

#[derive(Default)]
struct State {
    cps: Vec<Checkpoint>,
    zero_runs: Vec<(u64, u64)>,
    open_zero: Option<(u64, u64)>,
    frontier: u64,
    /// Output up to the end of the last member whose CRC-32 and length
    /// have passed: what may be served once the first member has ended.
    verified: u64,
    /// The first member has ended (and passed its checks).
    past_first: bool,
    done: bool,
    total: Option<u64>,
    /// The exact size known before the walk ends (BGZF).
    size: Option<u64>,
    failed: Option<Fail>,
    saved: Option<std::result::Result<PathBuf, String>>,
    save_done: bool,
    /// A loaded index's range checksums (see [`index::range_bounds`]), and
    /// which ranges have been checked against the file: nothing is decoded
    /// from a loaded index before the ranges it depends on are checked.
    range_crcs: Option<Arc<Vec<u32>>>,
    range_ok: Vec<bool>,
    /// The loaded index was found not to match the file.
    stale: bool,
    /// Bumped when the walk is restarted.
    gen: u64,
}

pub(crate) struct Shared {
    source: Arc<dyn Source>,
    comp_size: u64,
    name: String,
    threads: usize,
    span: u64,
    identity: Identity,
    index_path: Option<PathBuf>,
    loaded: bool,
    cache: BlockCache,
    state: Mutex<State>,
    cv: Condvar,
    stop: AtomicBool,
    flights: Flights<u64, std::result::Result<Arc<[u8]>, Fail>>,
    last_end: AtomicU64,
    decoded: AtomicU64,
    ahead: AtomicU64,
    pieces: AtomicU64,
    progress_every: std::time::Duration,
}

impl Shared {
    fn fail_corrupt(&self, offset: u64, reason: String) -> Fail {
        Fail {
            kind: FailKind::Corrupt,
            offset,
            reason,
        }
    }
    fn fail_io(&self, offset: u64, e: io::Error) -> Fail {
        Fail {
            kind: FailKind::Io(e.kind()),
            offset,
            reason: e.to_string(),
        }
    }
    fn fail_unsupported(&self, reason: String) -> Fail {
        Fail {
            kind: FailKind::Unsupported,
            offset: 0,
            reason,
        }
    }

    fn error(&self, f: &Fail) -> Error {
        let name = self.name.clone();
        match &f.kind {
            FailKind::Corrupt => Error::corrupt(&name, FORMAT, f.offset, f.reason.clone()),
            FailKind::Io(k) => Error::io(&name, f.offset)(io::Error::new(*k, f.reason.clone())),
            FailKind::Unsupported => Error::unsupported(&name, FORMAT, f.reason.clone()),
        }
    }

    /// Called by the walk: new checkpoints and zero runs, and how far the
    /// output is now indexed.
    fn publish(
        &self,
        cps: Vec<Checkpoint>,
        zeros: Vec<(u64, u64)>,
        open: Option<(u64, u64)>,
        frontier: u64,
        done: bool,
    ) {
        let mut st = self.state.lock_unpoisoned();
        st.cps.extend(cps);
        st.zero_runs.extend(zeros);
        st.open_zero = open;
        st.frontier = frontier;
        if done {
            st.done = true;
            st.total = Some(frontier);
        }
        drop(st);
        self.cv.notify_all();
    }

    /// Called by the walk after publishing a member's end (or a verified
    /// batch of BGZF members): output below `out` has passed its checks.
    fn member_verified(&self, out: u64) {
        let mut st = self.state.lock_unpoisoned();
        st.verified = st.verified.max(out);
        st.past_first = true;
        drop(st);
        self.cv.notify_all();
    }

    fn walk_failed(&self, f: Fail) {
        let mut st = self.state.lock_unpoisoned();
        st.failed = Some(f);
        st.done = true;
        st.save_done = true;
        drop(st);
        self.cv.notify_all();
    }

    /// Wait until `[.., end)` is indexed and may be served, or the walk is
    /// over.  Output is served once its member's CRC-32 and length have
    /// passed, except inside the first member while the walk is still in
    /// it: that may be the file's only member (like a single-block xz
    /// file), and waiting for its end would mean decoding the whole image
    /// before the first read.
    fn wait_frontier(&self, end: u64) -> std::result::Result<Option<u64>, Fail> {
        let mut st = self.state.lock_unpoisoned();
        loop {
            if let Some(f) = &st.failed {
                return Err(f.clone());
            }
            if st.done {
                return Ok(st.total);
            }
            let servable = if st.past_first {
                st.verified.min(st.frontier)
            } else {
                st.frontier
            };
            if servable >= end {
                return Ok(None);
            }
            st = self.cv.wait_unpoisoned(st);
        }
    }

    /// The checkpoint and output range of span `u`, waiting for the walk.
    fn unit_plan(&self, u: u64) -> std::result::Result<(Checkpoint, u64, u64), Fail> {
        let start = u.saturating_mul(self.span);
        let want = start.saturating_add(self.span);
        let total = self.wait_frontier(want)?;
        let end = match total {
            Some(t) if start >= t => {
                return Err(self.fail_corrupt(0, format!("span {u} beyond end of data")))
            }
            Some(t) => want.min(t),
            None => want,
        };
        let st = self.state.lock_unpoisoned();
        let cp = checkpoint_for(&st.cps, start)
            .and_then(|i| st.cps.get(i))
            .cloned()
            .ok_or_else(|| {
                self.fail_corrupt(0, format!("no checkpoint for output offset {start}"))
            })?;
        Ok((cp, start, end))
    }

    /// Span `u`, from the cache or decoded (once, however many ask).
    fn get_unit(&self, u: u64) -> std::result::Result<Arc<[u8]>, Fail> {
        if let Some(b) = self.cache.get(u) {
            return Ok(b);
        }
        self.flights.run(
            u,
            || self.cache.get(u).map(Ok),
            || {
                let (cp, start, end) = self.unit_plan(u)?;
                // A loaded index is used only on bytes it was built from.
                if !self.check_loaded(end)? {
                    return Err(self.fail_corrupt(
                        cp.inp,
                        "saved index does not match the file; rebuilding it".into(),
                    ));
                }
                self.decoded.fetch_add(1, Ordering::Relaxed);
                let data: Arc<[u8]> = decode::decode(self, &cp, start, end)?.into();
                self.cache.insert(u, data.clone());
                Ok(data)
            },
        )
    }

    fn is_ready(&self, u: u64) -> bool {
        let st = self.state.lock_unpoisoned();
        let start = u.saturating_mul(self.span);
        match st.total {
            Some(t) => start < t,
            None => st.failed.is_none() && st.frontier >= start.saturating_add(self.span),
        }
    }

    fn snapshot(&self) -> Option<GzipIndex> {
        let st = self.state.lock_unpoisoned();
        let total = st.total?;
        if st.failed.is_some() {
            return None;
        }
        let checkpoints = st.cps.clone();
        let zero_runs = st.zero_runs.clone();
        let loaded = st.range_crcs.clone();
        drop(st);
        let range_crcs = match loaded {
            Some(c) => c.to_vec(),
            None => match self.range_crcs(&checkpoints) {
                Ok(c) => c,
                Err(f) => {
                    tracing::warn!("{}", self.error(&f));
                    return None;
                }
            },
        };
        Some(GzipIndex {
            identity: self.identity,
            span: self.span,
            total,
            checkpoints,
            zero_runs,
            range_crcs,
        })
    }

    /// CRC-32 of each checkpoint's compressed range, reading the file once.
    fn range_crcs(&self, cps: &[Checkpoint]) -> std::result::Result<Vec<u32>, Fail> {
        let mut out = Vec::with_capacity(cps.len());
        let mut buf = vec![0u8; 1 << 20];
        for k in 0..cps.len() {
            let (a, b) = index::range_bounds(cps, self.comp_size, k);
            out.push(self.hash_range(a, b, &mut buf)?);
        }
        Ok(out)
    }

    fn hash_range(&self, a: u64, b: u64, buf: &mut [u8]) -> std::result::Result<u32, Fail> {
        let mut h = crc32fast::Hasher::new();
        let mut pos = a;
        while pos < b {
            let n = (b - pos).min(buf.len() as u64) as usize;
            self.source
                .read_exact_at(&mut buf[..n], pos)
                .map_err(|e| self.fail_io(pos, e))?;
            h.update(&buf[..n]);
            pos += n as u64;
        }
        Ok(h.finalize())
    }

    /// With a loaded index: check, once, that the compressed ranges that
    /// decoding output below `end` depends on (from the start of its member
    /// on) are the bytes the index was built from.  False: they are not
    /// (logged, index file removed); the caller restarts the walk.
    fn check_loaded(&self, end: u64) -> std::result::Result<bool, Fail> {
        let todo: Vec<(usize, u64, u64, u32)> = {
            let st = self.state.lock_unpoisoned();
            let Some(crcs) = st.range_crcs.clone() else {
                return Ok(true);
            };
            let n = st.cps.len().min(crcs.len());
            if n == 0 {
                return Ok(true);
            }
            // The first checkpoint at or past `end` bounds the input that
            // output below `end` needs.
            let j = st.cps.partition_point(|c| c.out < end).min(n - 1);
            let mut todo = Vec::new();
            let mut k = j;
            loop {
                if st.range_ok.get(k).copied().unwrap_or(false) {
                    break;
                }
                let (a, b) = index::range_bounds(&st.cps, self.comp_size, k);
                todo.push((k, a, b, crcs[k]));
                if k == 0 || matches!(st.cps[k].kind, index::Kind::Member) {
                    break;
                }
                k -= 1;
            }
            todo
        };
        if todo.is_empty() {
            return Ok(true);
        }
        let mut buf = vec![0u8; 1 << 20];
        for &(k, a, b, want) in todo.iter().rev() {
            let got = self.hash_range(a, b, &mut buf)?;
            if got != want {
                let path = self
                    .index_path
                    .as_ref()
                    .map_or_else(String::new, |p| p.display().to_string());
                tracing::warn!(
                    "{}: saved gzip index {path} does not match the file at compressed offset \
                     {a} (checkpoint {k}: CRC {got:08x}, index says {want:08x}); the file \
                     changed since it was indexed: discarding the index and rebuilding",
                    self.name
                );
                if let Some(p) = &self.index_path {
                    let _ = std::fs::remove_file(p);
                }
                self.state.lock_unpoisoned().stale = true;
                return Ok(false);
            }
            if let Some(ok) = self.state.lock_unpoisoned().range_ok.get_mut(k) {
                *ok = true;
            }
        }
        Ok(true)
    }

    fn save(&self) -> std::result::Result<PathBuf, String> {
        let path = self.index_path.clone().ok_or("no index location")?;
        let idx = self.snapshot().ok_or("index incomplete")?;
        let bytes = idx.to_bytes();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let mut tmp = path.clone().into_os_string();
        tmp.push(format!(
            ".tmp.{}.{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let tmp = PathBuf::from(tmp);
        let write = || -> io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("{}: {e}", path.display())
        })?;
        Ok(path)
    }
}

impl GzipReader {
    /// Open with default gzip options.
    pub fn open(source: Arc<dyn Source>, opts: &Options) -> Result<GzipReader> {
        Self::open_with(source, opts, &GzipOptions::default())
    }

    /// Open: checks the first member header, loads a saved index if a
    /// valid one exists, otherwise starts indexing in the background.
    pub fn open_with(
        source: Arc<dyn Source>,
        opts: &Options,
        gz: &GzipOptions,
    ) -> Result<GzipReader> {
        let name = opts.name.clone();
        if !(index::MIN_SPAN..=index::MAX_SPAN).contains(&gz.span) {
            return Err(Error::unsupported(
                &name,
                FORMAT,
                format!(
                    "span {} outside {}..={}",
                    gz.span,
                    index::MIN_SPAN,
                    index::MAX_SPAN
                ),
            ));
        }
        let comp_size = source.size().map_err(Error::io(&opts.name, 0))?;
        let mut magic = [0u8; 2];
        if comp_size < 2 || source.read_exact_at(&mut magic, 0).is_err() || !is_gzip_magic(&magic) {
            return Err(Error::UnknownFormat { name });
        }
        let hash_at = |off: u64| -> Result<u64> {
            let n = ID_BYTES.min(comp_size - off) as usize;
            let mut b = vec![0u8; n];
            read_exact(&source, &opts.name, &mut b, off)?;
            Ok(fnv1a64(&b))
        };
        let identity = Identity {
            comp_size,
            user: gz.identity.as_deref().map_or(0, fnv1a64),
            head: hash_at(0)?,
            tail: hash_at(comp_size.saturating_sub(ID_BYTES))?,
        };
        let index_path = if gz.persist {
            gz.index_path.clone().or_else(|| {
                let dir = gz.index_dir.clone().or_else(default_index_dir)?;
                Some(dir.join(format!("{:016x}.gzi", identity.digest())))
            })
        } else {
            None
        };
        let loaded = index_path
            .as_deref()
            .and_then(|p| load_index(p, &identity, gz.span, &name));
        let sh = Arc::new(Shared {
            source,
            comp_size,
            name,
            threads: opts.threads,
            span: gz.span,
            identity,
            index_path,
            loaded: loaded.is_some(),
            cache: BlockCache::new(opts.cache_bytes),
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
            flights: Flights::new(),
            last_end: AtomicU64::new(u64::MAX),
            decoded: AtomicU64::new(0),
            ahead: AtomicU64::new(0),
            pieces: AtomicU64::new(0),
            progress_every: gz.progress_every,
        });
        // Check the first header now so that a plainly broken file fails
        // at open rather than at the first read.
        let first = {
            let mut input = header::Input::new(&*sh.source, comp_size, 0, 4096);
            header::read_header(&sh, &mut input).map_err(|f| sh.error(&f))?
        };
        if loaded.is_none() && first.bgzf_bsize.is_some() {
            let src = sh.source.clone();
            let t0 = Instant::now();
            let size = bgzf_size_with(&sh.name, comp_size, &mut |off, buf| {
                src.read_exact_at(buf, off)
            })?;
            tracing::debug!(name = %sh.name, ?size, secs = t0.elapsed().as_secs_f64(), "BGZF size from member trailers");
            sh.state.lock_unpoisoned().size = size;
        }
        if let Some(idx) = loaded {
            {
                let mut st = sh.state.lock_unpoisoned();
                st.cps = idx.checkpoints;
                st.zero_runs = idx.zero_runs;
                st.frontier = idx.total;
                st.total = Some(idx.total);
                st.done = true;
                st.save_done = true;
                st.range_ok = vec![false; idx.range_crcs.len()];
                st.range_crcs = Some(Arc::new(idx.range_crcs));
            }
            return Ok(GzipReader::new(sh));
        }
        start_walk(sh.clone()).map_err(Error::io(&sh.name, 0))?;
        Ok(GzipReader::new(sh))
    }

    fn new(sh: Arc<Shared>) -> GzipReader {
        // As many as the engine's pools at most (see `Engine::new`).
        let threads = sh.threads.min(64);
        let pool = (threads > 0).then(|| Pool::new(threads, threads * 2, "gzip-ahead", &sh.name));
        GzipReader { sh, pool }
    }

    /// The decompressed size, waiting for the index walk if needed; the
    /// walk's error if it failed.
    pub fn wait_size(&self) -> Result<u64> {
        self.sh
            .wait_frontier(u64::MAX)
            .map_err(|f| self.sh.error(&f))
            .map(|t| t.unwrap_or(0))
    }

    /// The size to announce for an export: the BGZF trailers' sum when it
    /// is known (the handshake need not wait), else the walk's total,
    /// waiting for the walk.  If the walk failed, its error: never the
    /// size reached before the failure.
    pub fn export_size(&self) -> Result<u64> {
        {
            let st = self.sh.state.lock_unpoisoned();
            if let Some(f) = &st.failed {
                return Err(self.sh.error(f));
            }
            if let Some(s) = st.size {
                return Ok(s);
            }
        }
        self.wait_size()
    }

    /// The decompressed size if already known (saved index, or walk done).
    pub fn known_size(&self) -> Option<u64> {
        self.sh.state.lock_unpoisoned().total
    }

    /// Output bytes indexed so far: reads below this don't wait.
    pub fn indexed_frontier(&self) -> u64 {
        self.sh.state.lock_unpoisoned().frontier
    }

    /// True if a saved index was used (no walk was needed).
    pub fn index_was_loaded(&self) -> bool {
        self.sh.loaded
    }

    /// Checkpoints known so far.
    pub fn checkpoint_count(&self) -> usize {
        self.sh.state.lock_unpoisoned().cps.len()
    }

    pub fn span(&self) -> u64 {
        self.sh.span
    }

    /// Where the index is loaded from / saved to (None: not persisted).
    pub fn index_path(&self) -> Option<&Path> {
        self.sh.index_path.as_deref()
    }

    /// Wait for the walk and the save that follows it; the saved path,
    /// or why it wasn't saved (None when persistence is off or the index
    /// was loaded).
    pub fn wait_saved(&self) -> Option<std::result::Result<PathBuf, String>> {
        let mut st = self.sh.state.lock_unpoisoned();
        while !st.save_done {
            st = self.sh.cv.wait_unpoisoned(st);
        }
        if let Some(f) = &st.failed {
            return Some(Err(self.sh.error(f).to_string()));
        }
        st.saved.clone()
    }

    /// The complete index (None until the walk has finished successfully).
    pub fn index(&self) -> Option<GzipIndex> {
        self.sh.snapshot()
    }

    pub fn stats(&self) -> GzipStats {
        GzipStats {
            spans_decoded: self.sh.decoded.load(Ordering::Relaxed),
            spans_ahead: self.sh.ahead.load(Ordering::Relaxed),
            pieces_parallel: self.sh.pieces.load(Ordering::Relaxed),
        }
    }
}

/// Build the index on a background thread.
fn start_walk(bg: Arc<Shared>) -> io::Result<()> {
    let for_log = bg.clone();
    std::thread::Builder::new()
        .name("gzip-index".into())
        .spawn(move || {
            let t0 = Instant::now();
            // A bug in the walk must not leave readers waiting forever.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| walk::walk(&bg)))
                .unwrap_or_else(|_| Err(bg.fail_unsupported("index walk panicked".into())));
            // The walk inflated and checked every member; its total
            // must be the size the handshake already announced.
            let result = result.and_then(|total| match bg.state.lock_unpoisoned().size {
                Some(s) if s != total => Err(bg.fail_corrupt(
                    0,
                    format!(
                        "decompresses to {total} bytes, but the size found before (BGZF \
                         trailers, or the index it was served with) is {s}"
                    ),
                )),
                _ => Ok(total),
            });
            match result {
                Ok(total) => {
                    tracing::debug!(name = %bg.name, total, secs = t0.elapsed().as_secs_f64(), "gzip index built");
                    let saved = bg.index_path.as_ref().map(|_| bg.save());
                    if let Some(Err(e)) = &saved {
                        tracing::warn!(name = %bg.name, "could not save gzip index: {e}");
                    }
                    let mut st = bg.state.lock_unpoisoned();
                    st.saved = saved;
                    st.save_done = true;
                    drop(st);
                    bg.cv.notify_all();
                }
                Err(f) => {
                    if !bg.stop.load(Ordering::Relaxed) {
                        tracing::warn!("{}", bg.error(&f));
                    }
                    bg.walk_failed(f);
                }
            }
        })
        .map(|_| progress::log_while_walking(&for_log))
}

/// A loaded index turned out not to match the file: forget it and build
/// a new one (readers wait for the new walk like on a cold start).  The
/// size announced stays what the new walk must find.
fn restart_walk(sh: &Arc<Shared>) {
    let mut st = sh.state.lock_unpoisoned();
    if !st.stale {
        // Another reader restarted it already.
        return;
    }
    let size = st.size.or(st.total);
    let gen = st.gen + 1;
    *st = State::default();
    st.size = size;
    st.gen = gen;
    drop(st);
    sh.cv.notify_all();
    if let Err(e) = start_walk(sh.clone()) {
        sh.walk_failed(sh.fail_io(0, e));
    }
}

/// Load and check a saved index; any problem is logged and means "rebuild".
/// The index file's bytes, mapped rather than read: a big index (tens of
/// MB for a multi-GB image) is then neither copied nor zero-filled, which
/// is most of the start-up time with a saved index.
fn map_file(path: &Path) -> io::Result<bytes::Bytes> {
    let f = std::fs::File::open(path)?;
    // SAFETY: the mapping is private and read-only.  If another process
    // truncates the file while we use it, reads of the lost pages fault
    // (SIGBUS); index files are ours and written by rename, never in place.
    let map = unsafe { memmap2::MmapOptions::new().populate().map(&f)? };
    Ok(bytes::Bytes::from_owner(map))
}

fn load_index(path: &Path, identity: &Identity, span: u64, name: &str) -> Option<GzipIndex> {
    let bytes = match map_file(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(
                "{name}: cannot read gzip index {}: {e}; rebuilding",
                path.display()
            );
            return None;
        }
    };
    match GzipIndex::from_shared(bytes) {
        Err(e) => {
            tracing::warn!(
                "{name}: ignoring gzip index {}: {e}; rebuilding",
                path.display()
            );
            None
        }
        Ok(idx) if idx.identity != *identity => {
            tracing::warn!(
                "{name}: gzip index {} is for a different or modified file; rebuilding",
                path.display()
            );
            None
        }
        Ok(idx) if idx.span != span => {
            tracing::info!(
                "{name}: gzip index {} has span {}, want {span}; rebuilding",
                path.display(),
                idx.span
            );
            None
        }
        Ok(idx) => Some(idx),
    }
}

impl Drop for GzipReader {
    fn drop(&mut self) {
        // Stop the walk: nobody can read its result any more.
        self.sh.stop.store(true, Ordering::Relaxed);
    }
}

impl GzipReader {
    /// Have the pool decode span `u` if it is indexed and neither cached
    /// nor in flight.  `ahead`: a guess at what will be read next, counted
    /// in the statistics.
    fn offer(&self, u: u64, ahead: bool) {
        let Some(pool) = &self.pool else { return };
        let sh = &self.sh;
        if !sh.is_ready(u) || sh.cache.contains(u) || sh.flights.contains(&u) {
            return;
        }
        let weak = Arc::downgrade(sh);
        pool.offer(Box::new(move || {
            // Ready is checked again: a restarted walk may have reset the
            // index meanwhile, and a hint must never wait for the walk.
            let Some(sh) = weak.upgrade().filter(|sh| sh.is_ready(u)) else {
                return;
            };
            if sh.get_unit(u).is_ok() && ahead {
                sh.ahead.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    fn read_once(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let sh = &self.sh;
        if buf.is_empty() {
            return Ok(());
        }
        let len = buf.len() as u64;
        let oor = |size| Error::OutOfRange { offset, len, size };
        let end = offset
            .checked_add(len)
            .ok_or_else(|| oor(self.known_size().unwrap_or(0)))?;
        if let Some(size) = sh.state.lock_unpoisoned().size {
            // Known already: a read past the end fails without waiting.
            if end > size {
                return Err(oor(size));
            }
        }
        if let Some(total) = sh.wait_frontier(end).map_err(|f| sh.error(&f))? {
            if end > total {
                return Err(oor(total));
            }
        }
        let span = sh.span;
        let (u0, u1) = (offset / span, (end - 1) / span);
        let mut pos = offset;
        let mut filled = 0usize;
        for u in u0..=u1 {
            // Several spans: the pool decodes the next few while this
            // thread decodes this one (single-flight shares the work).
            for v in (u + 1..=u1).take(sh.threads) {
                self.offer(v, false);
            }
            let b = sh.get_unit(u).map_err(|f| sh.error(&f))?;
            let ustart = u * span;
            let from = (pos - ustart) as usize;
            let n = (b.len().saturating_sub(from)).min(buf.len() - filled);
            let piece = b
                .get(from..from + n)
                .ok_or_else(|| oor(ustart + b.len() as u64))?;
            buf[filled..filled + n].copy_from_slice(piece);
            filled += n;
            pos += n as u64;
        }
        if filled != buf.len() {
            return Err(oor(pos));
        }
        // Sequential reading: decode the next spans ahead.
        if sh.last_end.swap(end, Ordering::Relaxed) == offset {
            for k in 1..=sh.threads as u64 {
                self.offer(u1 + k, true);
            }
        }
        Ok(())
    }
}

impl RandomAccess for GzipReader {
    fn size(&self) -> u64 {
        if let Some(s) = self.sh.state.lock_unpoisoned().size {
            return s;
        }
        let _ = self.sh.wait_frontier(u64::MAX);
        let st = self.sh.state.lock_unpoisoned();
        st.total.unwrap_or(st.frontier)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        // A loaded index that does not match the file is rebuilt and the
        // read made again (the new walk's index needs no check, so this
        // happens at most once).
        loop {
            let gen = self.sh.state.lock_unpoisoned().gen;
            let r = self.read_once(buf, offset);
            if r.is_err() {
                let (stale, now) = {
                    let st = self.sh.state.lock_unpoisoned();
                    (st.stale, st.gen)
                };
                if stale {
                    restart_walk(&self.sh);
                    continue;
                }
                if now != gen {
                    continue;
                }
            }
            return r;
        }
    }

    fn extents(&self, offset: u64, len: u64) -> Vec<Extent> {
        // Zero runs of a loaded index are reported only where it has been
        // checked against the file (a client skips reading holes).
        let checked = {
            let known = {
                let st = self.sh.state.lock_unpoisoned();
                st.total.or(st.size)
            };
            let end = known.map_or(offset.saturating_add(len), |t| {
                offset.saturating_add(len).min(t)
            });
            matches!(self.sh.check_loaded(end), Ok(true))
        };
        let st = self.sh.state.lock_unpoisoned();
        if !checked {
            let len = st
                .total
                .or(st.size)
                .map_or(len, |t| len.min(t.saturating_sub(offset)));
            return vec![Extent {
                length: len,
                zero: false,
            }];
        }
        let len = match st.total.or(st.size) {
            Some(t) => len.min(t.saturating_sub(offset)),
            None => len,
        };
        let end = offset.saturating_add(len);
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |length: u64, zero: bool| {
            if length == 0 {
                return;
            }
            match out.last_mut() {
                Some(e) if e.zero == zero => e.length += length,
                _ => out.push(Extent { length, zero }),
            }
        };
        let runs = &st.zero_runs;
        let mut pos = offset;
        while pos < end {
            let chunk = pos / ZERO_CHUNK;
            let i = runs.partition_point(|&(s, _)| s <= chunk);
            let run = i
                .checked_sub(1)
                .and_then(|j| runs.get(j))
                .copied()
                .filter(|&(s, n)| chunk < s + n)
                .or(st.open_zero.filter(|&(s, n)| s <= chunk && chunk < s + n));
            if let Some((s, n)) = run {
                let stop = ((s + n) * ZERO_CHUNK).min(end);
                push(stop - pos, true);
                pos = stop;
                continue;
            }
            let next_run = runs
                .get(i)
                .map(|&(s, _)| s * ZERO_CHUNK)
                .unwrap_or(u64::MAX);
            let open = st
                .open_zero
                .map(|(s, _)| s * ZERO_CHUNK)
                .filter(|&s| s > pos)
                .unwrap_or(u64::MAX);
            let next = next_run.min(open).min(end);
            push(next - pos, false);
            pos = next;
        }
        out
    }

    fn prefetch(&self, offset: u64, len: u64) {
        let span = self.sh.span;
        if len == 0 {
            return;
        }
        let last = offset.saturating_add(len - 1) / span;
        for u in (offset / span..=last).take(self.sh.threads.max(1) * 2) {
            self.offer(u, true);
        }
    }

    fn format(&self) -> &'static str {
        FORMAT
    }
}
