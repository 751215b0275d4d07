//! `xz`, `gzip`, `zstd`, `bzip2`: serve a compressed image uncompressed,
//! read-only, with random access, over any plugin.
//!
//! The random-access machinery (indexes, block cache, parallel decoding,
//! progressive decoding of single-block files) is the `seekable-compressed`
//! crate; this filter adapts it to the backend interface.  One reader per
//! export is shared by every connection, so its cache and index are too.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use nbdkit_backend::LockExt;
use nbdkit_backend::{
    concat_params, layer_fn, Backend, CacheMode, Config, ConfigError, Error, ErrorKind, Extents,
    FilterSpec, FuaMode, Handle, Layer, Param, Result, ZeroMode, EXTENT_HOLE, EXTENT_ZERO,
};
use seekable_compressed::gzip::{GzipOptions, GzipReader};
use seekable_compressed::{
    Bzip2Reader, LzipReader, Options, RandomAccess, Source, XzReader, ZstdReader,
};
use tracing::{debug, info, warn};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Format {
    Xz,
    Gzip,
    Zstd,
    Bzip2,
    Lzip,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Xz => "xz",
            Format::Gzip => "gzip",
            Format::Zstd => "zstd",
            Format::Bzip2 => "bzip2",
            Format::Lzip => "lzip",
        }
    }
}

#[derive(Clone)]
struct Settings {
    format: Format,
    opts: Options,
    gzip: GzipOptions,
}

/// The layer every format's `configure` returns.
fn layer(settings: Settings) -> Box<dyn Layer> {
    layer_fn(move |next| {
        Ok(Arc::new(Compressed {
            next,
            settings,
            readers: Mutex::new(HashMap::new()),
            gzip_readers: Mutex::new(Vec::new()),
        }))
    })
}

struct Compressed {
    next: Arc<dyn Backend>,
    settings: Settings,
    /// One reader per export name, made on first use.
    readers: Mutex<HashMap<String, Arc<dyn RandomAccess>>>,
    /// The gzip ones again, to let their index saves finish at shutdown.
    gzip_readers: Mutex<Vec<Arc<GzipReader>>>,
}

/// The next backend as the compressed file: a handle opened once and kept
/// for the reader's lifetime, with its size read once (a compressed image
/// does not change size under a reader; a qcow2 image grows only through
/// its own writer, which moves `size` on when it extends the file).
pub(crate) struct HandleSource {
    pub(crate) handle: Box<dyn Handle>,
    pub(crate) size: std::sync::atomic::AtomicU64,
}

impl HandleSource {
    pub(crate) fn new(handle: Box<dyn Handle>, size: u64) -> Self {
        HandleSource {
            handle,
            size: size.into(),
        }
    }
}

impl Source for HandleSource {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.size.load(std::sync::atomic::Ordering::Acquire))
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let size = self.size.load(std::sync::atomic::Ordering::Acquire);
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > size)
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "read past the end of the compressed file",
            ));
        }
        self.handle.pread(buf, offset).map_err(to_io)
    }
}

/// A backend error as an `io::Error` for the seekable crate, keeping
/// "no space" recognisable (a qcow2 writer's ENOSPC goes back out as one).
pub(crate) fn to_io(e: Error) -> std::io::Error {
    let kind = match e.kind() {
        ErrorKind::NoSpace => std::io::ErrorKind::StorageFull,
        _ => std::io::ErrorKind::Other,
    };
    std::io::Error::new(kind, e.to_string())
}

impl Compressed {
    fn reader(&self, export: &str) -> Result<Arc<dyn RandomAccess>> {
        // Held while opening, so two first connections do not build two
        // indexes of the same image.
        let mut readers = self.readers.lock_unpoisoned();
        if let Some(r) = readers.get(export) {
            return Ok(r.clone());
        }
        let handle = self.next.open(true, export)?;
        let mut opts = self.settings.opts.clone();
        opts.name = handle.source_name().unwrap_or_else(|| {
            if export.is_empty() {
                self.next.name().to_string()
            } else {
                export.to_string()
            }
        });
        let size = handle.size()?;
        // A saved gzip index is trusted for a file with the same size and
        // the same first and last 64 KiB; a remote object rewritten in the
        // middle can keep those, but not its ETag: the source's version is
        // part of the identity the index must match.
        let mut gzip = self.settings.gzip.clone();
        if let Some(v) = handle.source_version() {
            debug!("{}: source version {v}", opts.name);
            gzip.identity = Some(v.into_bytes());
        }
        let source: Arc<dyn Source> = Arc::new(HandleSource::new(handle, size));
        let format = self.settings.format;
        let opened: seekable_compressed::Result<Arc<dyn RandomAccess>> = match format {
            Format::Xz => XzReader::open(source, &opts).map(|r| Arc::new(r) as _),
            // The export is offered only with a size that is known to be
            // right: BGZF's (from the member trailers), or the walk's total.
            // A failed walk refuses the export with its error instead of
            // offering the size reached before it (as nbdkit does).
            Format::Gzip => GzipReader::open_with(source, &opts, &gzip)
                .and_then(|r| r.export_size().map(|_| r))
                .map(|r| {
                    let r = Arc::new(r);
                    self.gzip_readers.lock_unpoisoned().push(r.clone());
                    r as _
                }),
            Format::Zstd => ZstdReader::open(source, &opts).map(|r| Arc::new(r) as _),
            Format::Bzip2 => Bzip2Reader::open(source, &opts).map(|r| Arc::new(r) as _),
            Format::Lzip => LzipReader::open(source, &opts).map(|r| Arc::new(r) as _),
        };
        let reader = opened.map_err(|e| Error::io(format!("{} filter: {e}", format.name())))?;
        info!("{}: {} image opened", opts.name, format.name());
        readers.insert(export.to_string(), reader.clone());
        Ok(reader)
    }
}

impl Backend for Compressed {
    fn name(&self) -> &str {
        self.settings.format.name()
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn shutdown(&self) {
        // An index whose walk has finished is being saved in the background:
        // let that finish so the next start is instant.  A walk still in
        // progress is abandoned (nothing partial is ever saved).
        for r in self.gzip_readers.lock_unpoisoned().iter() {
            if r.known_size().is_some() {
                if let Some(Err(e)) = r.wait_saved() {
                    warn!("gzip index not saved: {e}");
                }
            }
        }
        self.next.shutdown();
    }

    fn open(&self, _readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        let reader = self.reader(export)?;
        // The per-connection handle below is opened read-only: nothing is
        // ever written to the compressed file.
        let next = self.next.open(true, export)?;
        Ok(Box::new(CompressedHandle { next, reader }))
    }
}

struct CompressedHandle {
    next: Box<dyn Handle>,
    reader: Arc<dyn RandomAccess>,
}

fn read_error(e: seekable_compressed::Error) -> Error {
    let kind = match e {
        seekable_compressed::Error::OutOfRange { .. } => ErrorKind::InvalidInput,
        _ => ErrorKind::Io,
    };
    let e = Error::new(kind, e.to_string());
    if kind == ErrorKind::Io {
        warn!("{e}");
    }
    e
}

impl Handle for CompressedHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn size(&self) -> Result<u64> {
        Ok(self.reader.size())
    }
    nbdkit_backend::capabilities! {
        can_write: false, can_flush: false, can_trim: false, can_zero: ZeroMode::None,
        can_fua: FuaMode::None, can_extents: true,
        // Read-only, and every connection shares one reader.
        can_multi_conn: true,
        can_cache: CacheMode::Native,
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.reader.read_at(buf, offset).map_err(read_error)
    }
    fn pwrite(&self, _buf: &[u8], _offset: u64, _fua: bool) -> Result<()> {
        Err(Error::read_only(
            "compressed images are read-only (add --filter=cow to write)",
        ))
    }
    fn extents(
        &self,
        offset: u64,
        count: u64,
        _req_one: bool,
        extents: &mut Extents,
    ) -> Result<()> {
        let mut pos = offset;
        for e in self.reader.extents(offset, count) {
            let flags = if e.zero { EXTENT_HOLE | EXTENT_ZERO } else { 0 };
            extents.add(pos, e.length, flags)?;
            pos += e.length;
        }
        if pos == offset {
            extents.add(offset, count, 0)?;
        }
        Ok(())
    }
    /// The bytes are made here, from a file that is not an image of the
    /// disk: one image of depth 1, as qemu-nbd -A says of a raw file.
    fn allocation_depth(
        &self,
        offset: u64,
        count: u64,
        _req_one: bool,
        extents: &mut Extents,
    ) -> Result<()> {
        extents.add(offset, count, 1)
    }
    fn cache(&self, offset: u64, count: u64) -> Result<()> {
        self.reader.prefetch(offset, count);
        Ok(())
    }
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Read the parameters every format shares, prefixed with its name.
fn settings(cfg: &mut Config, format: Format) -> std::result::Result<Settings, ConfigError> {
    let p = format.name();
    let mut opts = Options::default();
    if let Some(c) = cfg.take_size(&format!("{p}-cache-size"))? {
        opts.cache_bytes = c;
    }
    opts.threads = cfg
        .take_parse::<usize>(&format!("{p}-threads"))?
        .unwrap_or_else(default_threads);
    opts.scratch_dir = cfg.take(&format!("{p}-scratch-dir")).map(PathBuf::from);
    if format != Format::Gzip {
        opts.scratch_bytes = cfg.take_size(&format!("{p}-scratch-size"))?;
    }
    // gzip spans are decoded from checkpoints in the index, not through
    // the segment engine that has this tier, so gzip has no such option.
    if format != Format::Gzip {
        if let Some(c) = cfg.take_size(&format!("{p}-scratch-cache-size"))? {
            opts.scratch_cache_bytes = c;
        }
    }
    if matches!(format, Format::Xz | Format::Zstd | Format::Lzip) {
        match cfg.take(&format!("{p}-verify")).as_deref() {
            None | Some("full") => {}
            Some("lazy") => opts.lazy_verify = true,
            Some(v) => {
                return Err(ConfigError::new(format!(
                    "{p}-verify: expected full or lazy, got {v:?}"
                )))
            }
        }
    }
    if format == Format::Zstd {
        if let Some(secs) = cfg.take_parse::<u64>("zstd-open-timeout")? {
            opts.open_timeout = (secs > 0).then(|| std::time::Duration::from_secs(secs));
        }
    }
    let mut gzip = GzipOptions::default();
    if format == Format::Xz {
        // nbdkit's names.  Its block-size limit existed because it held
        // whole blocks in memory; here large blocks are decoded
        // progressively, so the limit is accepted and needs no action.
        cfg.take_size("xz-max-block")?;
        if let Some(depth) = cfg.take_parse::<u64>("xz-max-depth")? {
            // nbdkit caches `depth` blocks per connection; give the shared
            // cache at least as many 16 MiB blocks.
            opts.cache_bytes = opts.cache_bytes.max(depth.saturating_mul(16 << 20));
        }
    }
    if format == Format::Gzip {
        // -D gzip.progress_ms=N: log a running index walk's progress (at
        // -v) every N ms instead of every 5 s.
        if let Some(ms) = nbdkit_backend::debug_flag("gzip", "progress_ms").filter(|&ms| ms > 0) {
            gzip.progress_every = std::time::Duration::from_millis(ms as u64);
        }
        gzip.index_path = cfg.take("gzip-index").map(PathBuf::from);
        gzip.index_dir = cfg.take("gzip-index-dir").map(PathBuf::from);
        if let Some(span) = cfg.take_size("gzip-span")? {
            gzip.span = span;
        }
        if let Some(save) = cfg.take_bool("gzip-save-index")? {
            gzip.persist = save;
        }
    }
    Ok(Settings { format, opts, gzip })
}

macro_rules! common_params {
    ($p:literal) => {
        [
            Param { name: concat!($p, "-cache-size"), help: "memory for decompressed blocks, shared by all clients (default 256M)" },
            Param { name: concat!($p, "-threads"), help: "threads decoding blocks in parallel and ahead (default: number of CPUs)" },
            Param { name: concat!($p, "-scratch-dir"), help: "directory for scratch files: single-block images, and the scratch cache (default $TMPDIR)" },
            Param { name: concat!($p, "-scratch-cache-size"), help: "non-zero decoded bytes kept in a sparse scratch file once evicted from memory, so they are not decoded again (default 1G; 0: off)" },
            Param { name: concat!($p, "-scratch-size"), help: "bound on all scratch disk use: single-block images plus the scratch cache; least recently used data is evicted past it (default: half the free space of the scratch dir)" },
        ]
    };
}

const VERIFY_HELP: &str = "full (default): a block/frame is served only once all of it has decoded and \
     passed its check; lazy: serve its start before (a failed check later makes every read of it EIO)";

pub const XZ_PARAMS: [Param; 8] = concat_params(
    &common_params!("xz"),
    &[
        Param {
            name: "xz-verify",
            help: VERIFY_HELP,
        },
        Param {
            name: "xz-max-block",
            help: "accepted for nbdkit compatibility: no block is too large here",
        },
        Param {
            name: "xz-max-depth",
            help: "nbdkit compatibility: cache at least this many 16 MiB blocks",
        },
    ],
);

pub const GZIP_PARAMS: [Param; 7] = concat_params(
    // Not the scratch cache or its size: gzip has no such tier (`settings`).
    common_params!("gzip").split_at(3).0,
    &[
        Param {
            name: "gzip-index",
            help: "index file to load/save (default: $XDG_CACHE_HOME/nbdkit-rs/gzip-index/ID.gzi)",
        },
        Param {
            name: "gzip-index-dir",
            help: "directory for default-named index files",
        },
        Param {
            name: "gzip-span",
            help: "decompressed bytes between index checkpoints (default 1M)",
        },
        Param {
            name: "gzip-save-index",
            help: "false to never read or write index files",
        },
    ],
);

pub const ZSTD_PARAMS: [Param; 7] = concat_params(
    &common_params!("zstd"),
    &[
        Param {
            name: "zstd-verify",
            help: VERIFY_HELP,
        },
        Param {
            name: "zstd-open-timeout",
            help: "seconds opening may spend decoding frames that do not record their size (default 120; 0: no limit)",
        },
    ],
);
pub const BZIP2_PARAMS: [Param; 5] = common_params!("bzip2");

pub const LZIP_PARAMS: [Param; 6] = concat_params(
    &common_params!("lzip"),
    &[Param {
        name: "lzip-verify",
        help: VERIFY_HELP,
    }],
);

pub static XZ: FilterSpec = FilterSpec {
    name: "xz",
    summary: "serve an xz-compressed image uncompressed (read-only, random access)",
    description: "Reads decode only the xz blocks they touch, in parallel, into a cache shared by\n\
                  all clients; sequential reads decode ahead.  Single-block files (plain `xz`)\n\
                  are decoded progressively into a sparse scratch file, each byte once.\n\
                  Recompress with `xz --block-size=16MiB` (or -T0) for fast random access.\n\n\
                  Examples:\n  nbdkit-rs --filter=xz file disk.img.xz\n  nbdkit-rs xz file=disk.img.xz        (nbdkit's old plugin form)",
    params: &XZ_PARAMS,
    configure: |cfg| Ok(layer(settings(cfg, Format::Xz)?)),
};

pub static GZIP: FilterSpec = FilterSpec {
    name: "gzip",
    summary: "serve a gzip-compressed image uncompressed (read-only, random access)",
    description: "Builds a checkpoint index in the background on first use (reads behind the\n\
                  indexing frontier are served at once) and saves it, so the next start is\n\
                  instant.  Multi-member files (concatenated gzip, BGZF) are supported; BGZF\n\
                  members are decoded in parallel.  Build an index ahead of time with\n\
                  `seekable-index build FILE`.\n\n\
                  Example:\n  nbdkit-rs --filter=gzip file disk.img.gz",
    params: &GZIP_PARAMS,
    configure: |cfg| Ok(layer(settings(cfg, Format::Gzip)?)),
};

pub const INDEXED_GZIP_PARAMS: [Param; 9] = concat_params(
    &[
        Param {
            name: "gzip-index-path",
            help:
                "(required) index file: built and saved if missing or not usable, reused if it fits",
        },
        Param {
            name: "gzip-index-span",
            help: "decompressed bytes between index points (default 1M)",
        },
    ],
    &GZIP_PARAMS,
);

/// nbdkit 1.46's `indexed-gzip` filter is the same idea as our gzip
/// filter (a checkpoint index built once, kept in a file): its names are
/// mapped onto it so that the same command line works.  The index file's
/// format is ours, not nbdkit's: an index nbdkit wrote is not understood,
/// so it is rebuilt and replaced.
pub static INDEXED_GZIP: FilterSpec = FilterSpec {
    name: "indexed-gzip",
    summary: "serve a gzip-compressed image with a persisted index (nbdkit 1.46's name for the gzip filter)",
    description: "The gzip filter under nbdkit's indexed-gzip parameter names: \n\
                  gzip-index-path=PATH is gzip-index=PATH, gzip-index-span=SIZE is gzip-span=SIZE.\n\
                  The index is built on first use (reads are served meanwhile) and saved to PATH;\n\
                  the next start reuses it.  PATH holds nbdkit-rs's own index format: an index\n\
                  written by nbdkit is rebuilt and replaced.\n\n\
                  Example:\n  nbdkit-rs --filter=indexed-gzip file disk.img.gz gzip-index-path=disk.gzi",
    params: &INDEXED_GZIP_PARAMS,
    configure: |cfg| {
        let path = cfg.require("gzip-index-path", "indexed-gzip filter")?;
        if path.is_empty() {
            return Err(ConfigError::new(
                "indexed-gzip filter: gzip-index-path= needs a file name",
            ));
        }
        let span = cfg
            .take_size("gzip-index-span")
            .map_err(|e| ConfigError::new(format!("indexed-gzip filter: {e}")))?;
        use seekable_compressed::gzip::{MAX_SPAN, MIN_SPAN};
        if let Some(span) = span.filter(|s| !(MIN_SPAN..=MAX_SPAN).contains(s)) {
            return Err(ConfigError::new(format!(
                "indexed-gzip filter: gzip-index-span={span}: the span must be from {MIN_SPAN} to {MAX_SPAN} bytes"
            )));
        }
        let mut s = settings(cfg, Format::Gzip)?;
        s.gzip.index_path = Some(PathBuf::from(path));
        s.gzip.persist = true;
        if let Some(span) = span {
            s.gzip.span = span;
        }
        Ok(layer(s))
    },
};

pub static ZSTD: FilterSpec = FilterSpec {
    name: "zstd",
    summary: "serve a zstd-compressed image uncompressed (read-only, random access)",
    description:
        "Uses the seek table of seekable zstd files, or walks the frame headers of other\n\
                  multi-frame files; a single-frame file is decoded progressively.\n\n\
                  Example:\n  nbdkit-rs --filter=zstd file disk.img.zst",
    params: &ZSTD_PARAMS,
    configure: |cfg| Ok(layer(settings(cfg, Format::Zstd)?)),
};

pub static BZIP2: FilterSpec = FilterSpec {
    name: "bzip2",
    summary: "serve a bzip2-compressed image uncompressed (read-only, random access)",
    description: "bzip2 blocks are found by their bit-aligned magic and decoded independently.\n\n\
                  Example:\n  nbdkit-rs --filter=bzip2 file disk.img.bz2",
    params: &BZIP2_PARAMS,
    configure: |cfg| Ok(layer(settings(cfg, Format::Bzip2)?)),
};

pub static LZIP: FilterSpec = FilterSpec {
    name: "lzip",
    summary: "serve an lzip-compressed image uncompressed (read-only, random access)",
    description: "The member trailers, read from the end of the file, index the members; reads\n\
                  decode only the members they touch, in parallel.  A single-member file (plain\n\
                  `lzip`) is decoded progressively into a sparse scratch file.  Compress with\n\
                  `plzip` or `lzip -b 16MiB` for fast random access.\n\n\
                  Example:\n  nbdkit-rs --filter=lzip file disk.img.lz",
    params: &LZIP_PARAMS,
    configure: |cfg| Ok(layer(settings(cfg, Format::Lzip)?)),
};
