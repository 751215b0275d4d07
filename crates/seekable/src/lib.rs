//! Random-access readers for compressed disk images.
//!
//! A compressed image is normally a stream: to read byte N you decode bytes
//! 0..N.  This crate builds (or reads) an index of independently decodable
//! points in the compressed file, so that `read_at(offset, buf)` decodes only
//! the piece that holds `offset`.  It works over any positional [`Source`]
//! (a local file, an NBD backend, an HTTP object), and needs no server.
//!
//! No existing crate offers random access for these formats with a shared,
//! bounded cache, so the index logic is written here; the codecs themselves
//! come from well-kept bindings.
//!
//! # Example
//!
//! ```
//! use std::io::Write;
//! use std::sync::Arc;
//! use seekable_compressed::{open, Options, RandomAccess, Source};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Make a small seekable zstd file to read back.
//! let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
//! let mut tmp = tempfile::NamedTempFile::new()?;
//! tmp.write_all(&seekable_compressed::zstd::seekable_compress(&data, 64 << 10, 3)?)?;
//!
//! let file = std::fs::File::open(tmp.path())?;
//! let source: Arc<dyn Source> = Arc::new(file);
//! let opts = Options { name: "disk.img.zst".into(), ..Options::default() };
//! let image: Arc<dyn RandomAccess> = open(source, &opts)?;
//! assert_eq!(image.format(), "zstd");
//! assert_eq!(image.size(), data.len() as u64);
//!
//! // Only the 64 KiB frame holding these bytes is decoded.
//! let mut buf = vec![0u8; 4096];
//! image.read_at(&mut buf, 200_000)?;
//! assert_eq!(&buf[..], &data[200_000..204_096]);
//! # Ok(())
//! # }
//! ```
//!
//! # Formats
//!
//! * **xz**: the index at the end of every stream lists the blocks; files
//!   made with `xz -T0` or `--block-size` have many, plain `xz` makes one.
//! * **bzip2**: blocks found by scanning for their 48-bit magic; opening
//!   decodes every block once to learn the sizes (bzip2 records none).
//! * **zstd**: the seekable format's seek table, or else the frames found by
//!   walking the headers.
//! * **lzip**: the member trailers, read from the end, list the members;
//!   `plzip` and `lzip -b` make many, plain `lzip` one.
//!
//! A block or frame too big to cache (e.g. the only block of a plain `xz`
//! file) is decoded progressively once into a sparse scratch file; reads
//! then come from there.

use std::io;
use std::sync::Arc;

pub mod bzip2;
pub mod cache;
mod engine;
mod flight;
pub mod gzip;
pub mod lzip;
mod lzma_unit;
mod pool;
mod progressive;
pub mod qcow2;
mod spill;
mod sync;
pub mod xz;
pub mod zstd;

pub use bzip2::Bzip2Reader;
pub use cache::BlockCache;
pub use gzip::GzipReader;
pub use lzip::LzipReader;
pub use xz::XzReader;
pub use zstd::ZstdReader;

/// A positional byte source: the compressed file.
///
/// Implementations must be safe to call from several threads at once.
pub trait Source: Send + Sync {
    /// Total size of the compressed data in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Fill all of `buf` from `offset`; reading past the end is an error
    /// (`io::ErrorKind::UnexpectedEof`).
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl Source for std::fs::File {
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

impl Source for Vec<u8> {
    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        read_slice(self, buf, offset)
    }
}

impl Source for &'static [u8] {
    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        read_slice(self, buf, offset)
    }
}

fn read_slice(data: &[u8], buf: &mut [u8], offset: u64) -> io::Result<()> {
    let start = usize::try_from(offset).map_err(|_| eof())?;
    let end = start.checked_add(buf.len()).ok_or_else(eof)?;
    let src = data.get(start..end).ok_or_else(eof)?;
    buf.copy_from_slice(src);
    Ok(())
}

impl<T: Source + ?Sized> Source for Arc<T> {
    fn size(&self) -> io::Result<u64> {
        (**self).size()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }
}

fn eof() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "read past end of source")
}

/// Everything that can go wrong reading a compressed image.
///
/// Messages name the file (the `name` given in [`Options`]) and, for bad
/// data, the compressed offset where it was found.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the compressed source failed.
    #[error("{name}: read error at offset {offset}: {source}")]
    Io {
        name: String,
        offset: u64,
        #[source]
        source: io::Error,
    },
    /// The compressed data (or a saved index) is malformed or fails a check.
    #[error("{name}: corrupt {format} data at offset {offset}: {reason}")]
    Corrupt {
        name: String,
        format: &'static str,
        offset: u64,
        reason: String,
    },
    /// Well-formed, but uses something this crate does not handle.
    #[error("{name}: unsupported {format} feature: {reason}")]
    Unsupported {
        name: String,
        format: &'static str,
        reason: String,
    },
    /// The file is not in any format this crate knows.
    #[error("{name}: not an xz, gzip, zstd, bzip2 or lzip file")]
    UnknownFormat { name: String },
    /// A read beyond the decompressed size.
    #[error("read of {len} bytes at offset {offset} is beyond the decompressed size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// A scratch file (spill of a progressively decoded stream) failed.
    #[error("scratch file: {0}")]
    Scratch(#[source] io::Error),
    /// Decoding a block or frame needs more scratch disk than the bound
    /// allows, with nothing else left to evict.
    #[error(
        "{name}: the block or frame at offset {offset} needs more scratch space than the \
         bound of {} MiB allows (raise FMT-scratch-size, or recompress with smaller blocks)",
        max >> 20
    )]
    ScratchFull { name: String, offset: u64, max: u64 },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// For `map_err`: a failed read of `name` at `offset`.
    pub(crate) fn io(name: &str, offset: u64) -> impl FnOnce(io::Error) -> Error + '_ {
        move |source| Error::Io {
            name: name.to_string(),
            offset,
            source,
        }
    }

    /// Out of memory setting up a decoder for `name` at `offset`.
    pub(crate) fn oom(name: &str, offset: u64) -> Error {
        Error::io(name, offset)(io::ErrorKind::OutOfMemory.into())
    }

    /// Something in `name` this crate does not handle.
    pub(crate) fn unsupported(
        name: &str,
        format: &'static str,
        reason: impl Into<String>,
    ) -> Error {
        Error::Unsupported {
            name: name.to_string(),
            format,
            reason: reason.into(),
        }
    }

    /// Malformed `format` data in `name` at compressed `offset`.
    pub(crate) fn corrupt(
        name: &str,
        format: &'static str,
        offset: u64,
        reason: impl Into<String>,
    ) -> Error {
        Error::Corrupt {
            name: name.to_string(),
            format,
            offset,
            reason: reason.into(),
        }
    }
}

/// Fill `buf` from `source` at `offset`; a failure names the file and offset.
pub(crate) fn read_exact(
    source: &dyn Source,
    name: &str,
    buf: &mut [u8],
    offset: u64,
) -> Result<()> {
    source
        .read_exact_at(buf, offset)
        .map_err(Error::io(name, offset))
}

/// One run of the decompressed data for block status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// True when the range is known to decode to all zero bytes.
    pub zero: bool,
}

/// A decompressed view of a compressed file with random access.
pub trait RandomAccess: Send + Sync {
    /// The exact decompressed size in bytes.
    fn size(&self) -> u64;
    /// Fill `buf` with decompressed bytes starting at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Describe `[offset, offset+len)` as runs that are known to be zero or
    /// not; ranges never decoded yet are reported as data (`zero: false`).
    /// The lengths add up to `len` (clipped to the size).
    fn extents(&self, offset: u64, len: u64) -> Vec<Extent> {
        let len = len.min(self.size().saturating_sub(offset));
        vec![Extent {
            length: len,
            zero: false,
        }]
    }
    /// Hint that `[offset, offset+len)` will be read soon.
    fn prefetch(&self, _offset: u64, _len: u64) {}
    /// Short name of the format ("xz", "gzip", "zstd").
    fn format(&self) -> &'static str;
}

/// Tuning shared by all formats.
#[derive(Debug, Clone)]
pub struct Options {
    /// Name used in error messages (usually the file name).
    pub name: String,
    /// Upper bound on decompressed bytes kept in memory by the block cache.
    pub cache_bytes: u64,
    /// Threads used to decode blocks ahead and in parallel (0 = none).
    pub threads: usize,
    /// Directory for scratch files (progressive decoding spill); `None` means
    /// the system temporary directory.
    pub scratch_dir: Option<std::path::PathBuf>,
    /// Upper bound on decoded bytes kept in the scratch-file tier behind
    /// the block cache: segments evicted from memory are written there
    /// (all-zero chunks stay holes), so a segment is decoded at most once
    /// per reader until this much is used.  Only the non-zero bytes
    /// count; 0 turns the tier off.
    pub scratch_cache_bytes: u64,
    /// Serve bytes of an xz block or zstd frame before its integrity check
    /// has been verified (`FMT-verify=lazy`).  Off by default: a block or
    /// frame is served only once all of it has decoded and its check has
    /// passed.  The only block or frame of a file is always decoded
    /// progressively (verifying it first would mean decoding the whole
    /// image before the first read); a check failing later makes every
    /// later read of it fail.
    pub lazy_verify: bool,
    /// Longest time opening may spend learning sizes by decoding (zstd
    /// frames that do not record their size), so a hostile file of many
    /// such frames cannot hold a client's handshake indefinitely: past it,
    /// opening fails with an error saying so.  `None`: no limit.
    pub open_timeout: Option<std::time::Duration>,
    /// The one bound on scratch disk use (non-zero bytes): progressive
    /// scratch files of blocks/frames too big for memory plus the
    /// scratch-cache tier.  Past it, the least recently used scratch data
    /// is evicted (and decoded again when read); a block that alone needs
    /// more reads as [`Error::ScratchFull`].  `None`: half the space free
    /// in the scratch directory when the image is opened.
    pub scratch_bytes: Option<u64>,
}

/// Default [`Options::open_timeout`].
pub const DEFAULT_OPEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

impl Options {
    /// Segments (xz blocks, zstd frames) whose decompressed size exceeds
    /// this are decoded progressively into a sparse scratch file instead of
    /// being held in memory: 64 MiB, or half the cache bound if that is
    /// smaller, so that one such block can never crowd out the whole cache.
    pub fn default_progressive_threshold(&self) -> u64 {
        (64u64 << 20).min((self.cache_bytes / 2).max(1 << 20))
    }
}

/// Default bound of the scratch-file cache tier (see
/// [`Options::scratch_cache_bytes`]).
pub const DEFAULT_SCRATCH_CACHE: u64 = 1 << 30;

impl Default for Options {
    fn default() -> Self {
        Options {
            name: "<input>".into(),
            cache_bytes: 256 << 20,
            threads: 2,
            scratch_dir: None,
            scratch_cache_bytes: DEFAULT_SCRATCH_CACHE,
            lazy_verify: false,
            open_timeout: Some(DEFAULT_OPEN_TIMEOUT),
            scratch_bytes: None,
        }
    }
}

/// Open a compressed image, choosing the reader by its magic bytes.
///
/// xz (`FD 37 7A 58 5A 00`), zstd (`28 B5 2F FD`, or a skippable frame
/// `5? 2A 4D 18` first), bzip2 (`BZh1`..`BZh9`), gzip (`1F 8B`) and lzip
/// (`LZIP`) are recognised.  See the crate
/// documentation for an example.
pub fn open(source: Arc<dyn Source>, opts: &Options) -> Result<Arc<dyn RandomAccess>> {
    let size = source.size().map_err(Error::io(&opts.name, 0))?;
    let mut magic = [0u8; 6];
    let n = size.min(6) as usize;
    read_exact(&source, &opts.name, &mut magic[..n], 0)?;
    let magic = &magic[..n];
    if magic.starts_with(&xz::index::HEADER_MAGIC) {
        Ok(Arc::new(XzReader::open(source, opts)?))
    } else if magic.starts_with(&[0x28, 0xB5, 0x2F, 0xFD])
        || (n >= 4 && magic[0] & 0xF0 == 0x50 && magic[1..4] == [0x2A, 0x4D, 0x18])
    {
        Ok(Arc::new(ZstdReader::open(source, opts)?))
    } else if n >= 4 && magic.starts_with(b"BZh") && (b'1'..=b'9').contains(&magic[3]) {
        Ok(Arc::new(Bzip2Reader::open(source, opts)?))
    } else if magic.starts_with(&[0x1F, 0x8B]) {
        Ok(Arc::new(gzip::GzipReader::open(source, opts)?))
    } else if magic.starts_with(&lzip::MAGIC) {
        Ok(Arc::new(LzipReader::open(source, opts)?))
    } else {
        Err(Error::UnknownFormat {
            name: opts.name.clone(),
        })
    }
}

/// A failed decode is reported to every reader that waited for it (see
/// `flight.rs`), so errors are cloned; an `io::Error` inside is not
/// `Clone` and is remade from its kind and message.
impl Clone for Error {
    fn clone(&self) -> Error {
        match self {
            Error::Io {
                name,
                offset,
                source,
            } => Error::Io {
                name: name.clone(),
                offset: *offset,
                source: io::Error::new(source.kind(), source.to_string()),
            },
            Error::Corrupt {
                name,
                format,
                offset,
                reason,
            } => Error::Corrupt {
                name: name.clone(),
                format,
                offset: *offset,
                reason: reason.clone(),
            },
            Error::Unsupported {
                name,
                format,
                reason,
            } => Error::Unsupported {
                name: name.clone(),
                format,
                reason: reason.clone(),
            },
            Error::UnknownFormat { name } => Error::UnknownFormat { name: name.clone() },
            Error::OutOfRange { offset, len, size } => Error::OutOfRange {
                offset: *offset,
                len: *len,
                size: *size,
            },
            Error::Scratch(e) => Error::Scratch(io::Error::new(e.kind(), e.to_string())),
            Error::ScratchFull { name, offset, max } => Error::ScratchFull {
                name: name.clone(),
                offset: *offset,
                max: *max,
            },
        }
    }
}

/// True when every byte is zero.  Folding 64-byte pieces lets the compiler
/// vectorise this; it runs over every decoded byte, so it matters.
pub(crate) fn is_zero(b: &[u8]) -> bool {
    let mut it = b.chunks_exact(64);
    for c in &mut it {
        if c.iter().fold(0u8, |a, &x| a | x) != 0 {
            return false;
        }
    }
    it.remainder().iter().all(|&x| x == 0)
}
