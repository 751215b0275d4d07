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

use std::io;
use std::sync::Arc;

pub mod cache;
pub mod gzip;

pub use cache::BlockCache;

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
    #[error("{name}: not an xz, gzip or zstd file")]
    UnknownFormat { name: String },
    /// A read beyond the decompressed size.
    #[error("read of {len} bytes at offset {offset} is beyond the decompressed size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// A scratch file (spill of a progressively decoded stream) failed.
    #[error("scratch file: {0}")]
    Scratch(#[source] io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

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
        vec![Extent { length: len, zero: false }]
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
}

impl Default for Options {
    fn default() -> Self {
        Options {
            name: "<input>".into(),
            cache_bytes: 256 << 20,
            threads: 2,
            scratch_dir: None,
        }
    }
}
