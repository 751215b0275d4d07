//! The backend interface of nbdkit-rs.
//!
//! A *plugin* is a data source; a *filter* wraps the next backend and
//! changes some requests.  Both implement the same two traits:
//!
//! * [`Backend`] — one per server: thread model, export list, and `open`,
//!   which is called once per client connection and returns a
//! * [`Handle`] — one per connection: size, capabilities and the data
//!   calls (`pread`, `pwrite`, `zero`, `extents`, `allocation_depth`, …).
//!
//! Filters return their `next` backend/handle from [`Backend::next`] and
//! [`Handle::next`]; every method they do not override is then forwarded
//! there, so a filter that changes only `pread` writes only `pread`.
//! Plugins leave `next` as `None` and get the defaults listed on each method
//! (can_zero emulated with pwrite, FUA emulated with flush, …), so a plugin
//! needs little more than `size` and `pread`.
//!
//! ```
//! use nbdkit_backend::{Backend, Handle, Result};
//!
//! /// A read-only disk whose every byte is 0xAB.
//! struct AbDisk { size: u64 }
//! struct AbHandle { size: u64 }
//!
//! impl Backend for AbDisk {
//!     fn name(&self) -> &str { "ab" }
//!     fn open(&self, _readonly: bool, _export: &str) -> Result<Box<dyn Handle>> {
//!         Ok(Box::new(AbHandle { size: self.size }))
//!     }
//! }
//! impl Handle for AbHandle {
//!     fn size(&self) -> Result<u64> { Ok(self.size) }
//!     fn pread(&self, buf: &mut [u8], _offset: u64) -> Result<()> {
//!         buf.fill(0xab);
//!         Ok(())
//!     }
//! }
//!
//! let h = AbDisk { size: 1 << 20 }.open(true, "").unwrap();
//! let mut buf = [0u8; 4];
//! h.pread(&mut buf, 100).unwrap();
//! assert_eq!(buf, [0xab; 4]);
//! assert!(!h.can_write().unwrap());
//! ```
#![forbid(unsafe_code)]

pub mod client;
pub mod config;
pub mod direct;
pub mod error;
pub mod extents;
pub mod registry;
pub mod secret;
pub mod sync;

/// The nbdkit release whose command line, plugin interface and protocol
/// behaviour nbdkit-rs implements: `--version` and `--dump-config` report
/// it, because tools parse them to decide what the server can do.
pub const NBDKIT_VERSION: &str = "1.32.5";

pub use client::{nanosleep, request_shutdown, Client, Peer};
pub use config::{parse_bool, parse_delay, parse_size, Config};
pub use direct::{DirectPiece, DirectRead};
pub use error::{ConfigError, Error, ErrorKind, Result};
pub use extents::{Extent, Extents, StatusKind, EXTENT_HOLE, EXTENT_ZERO};
pub use registry::{concat_params, layer_fn, FilterSpec, Layer, Param, PluginSpec};
pub use secret::{read_secret, set_stdio_safe, stdio_safe, SecretError};
pub use sync::{CondvarExt, LockExt, RwLockExt};

/// How much concurrency a backend tolerates.  Ordered from most to least
/// restrictive; the server uses the most restrictive model in the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ThreadModel {
    /// One client connection at a time.
    SerializeConnections,
    /// Several connections, but one request at a time across all of them.
    SerializeAllRequests,
    /// One request at a time per connection.
    SerializeRequests,
    /// Requests run in parallel, on any connection.
    Parallel,
}

impl ThreadModel {
    pub fn as_str(self) -> &'static str {
        match self {
            ThreadModel::SerializeConnections => "serialize_connections",
            ThreadModel::SerializeAllRequests => "serialize_all_requests",
            ThreadModel::SerializeRequests => "serialize_requests",
            ThreadModel::Parallel => "parallel",
        }
    }
}

/// Whether and how a handle supports writing zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroMode {
    /// WRITE_ZEROES is not advertised.
    None,
    /// The server writes buffers of zeroes with `pwrite`.
    Emulate,
    /// `zero` does it efficiently.
    Native,
}

/// Whether and how a handle supports Forced Unit Access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FuaMode {
    None,
    /// The server calls `flush` after the write.
    Emulate,
    /// The write call honours its `fua` argument itself.
    Native,
}

/// Whether and how a handle supports NBD_CMD_CACHE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    None,
    /// The server reads the range and discards it.
    Emulate,
    /// `cache` prefetches.
    Native,
}

/// Flags of a zero request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ZeroFlags {
    /// The range may be punched (deallocated) instead of written.
    pub may_trim: bool,
    /// Persist before returning.
    pub fua: bool,
    /// Fail with `NotSupported` at once unless zeroing is fast (faster than
    /// writing zeroes).
    pub fast: bool,
}

/// Block size constraints advertised to clients (NBD_INFO_BLOCK_SIZE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    /// Power of two, 1 ..= 64 KiB.
    pub minimum: u32,
    /// Power of two, >= max(minimum, 512).
    pub preferred: u32,
    /// Multiple of minimum.
    pub maximum: u32,
}

/// One entry of an export list (NBD_OPT_LIST).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExportEntry {
    pub name: String,
    pub description: Option<String>,
}

/// A configured data source or filter stack.  One per server.
pub trait Backend: Send + Sync {
    /// Short name ("file", "log"), for logs.
    fn name(&self) -> &str;

    /// Filters return the backend they wrap.  Plugins keep `None`.
    fn next(&self) -> Option<&dyn Backend> {
        None
    }

    /// Concurrency this backend tolerates.  Filters that restrict it must
    /// return the minimum of their own model and `next`'s.
    fn thread_model(&self) -> ThreadModel {
        self.next()
            .map_or(ThreadModel::Parallel, |n| n.thread_model())
    }

    /// Called once in the final server process, after any fork to the
    /// background and before the first connection: start threads here, not
    /// in the constructor.
    fn after_fork(&self) -> Result<()> {
        self.next().map_or(Ok(()), |n| n.after_fork())
    }

    /// Exports for NBD_OPT_LIST.  Default: one export, the default one.
    fn list_exports(&self, readonly: bool) -> Result<Vec<ExportEntry>> {
        match self.next() {
            Some(n) => n.list_exports(readonly),
            None => Ok(vec![ExportEntry {
                name: self.default_export(readonly)?,
                description: None,
            }]),
        }
    }

    /// The name the empty export name "" stands for.
    fn default_export(&self, readonly: bool) -> Result<String> {
        self.next()
            .map_or(Ok(String::new()), |n| n.default_export(readonly))
    }

    /// A client connected, before any negotiation.  An error closes the
    /// connection at once (access control); it is logged with the reason.
    /// Filters that override this call `next`'s first and act only if it
    /// succeeded, so that [`Backend::disconnected`] pairs with it.
    fn preconnect(&self, client: &Client) -> Result<()> {
        self.next().map_or(Ok(()), |n| n.preconnect(client))
    }

    /// A connection whose `preconnect` succeeded has ended, whether or not
    /// it opened an export (NBD_OPT_LIST-only clients count too).  Any
    /// handle it opened has been closed.
    fn disconnected(&self, client: &Client) {
        if let Some(n) = self.next() {
            n.disconnected(client)
        }
    }

    /// A client connected and chose `export`.  `readonly` is true when the
    /// server (or a filter above) will never write.
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>>;

    /// Lines a configured plugin adds to `--dump-plugin` (`key=value`,
    /// each ending in a newline), after the ones the server prints for
    /// every plugin: nbdkit's `.dump_plugin`, which the sh plugin passes to
    /// its script.
    fn dump_plugin(&self) -> Option<String> {
        None
    }

    /// The server is exiting: flush logs, remove temporary files.
    fn shutdown(&self) {
        if let Some(n) = self.next() {
            n.shutdown()
        }
    }
}

/// Forward to `next` for filters, or use the plugin default.
macro_rules! forward {
    ($self:ident . $m:ident ( $($a:expr),* ), $default:expr) => {
        match $self.next() {
            Some(n) => n.$m($($a),*),
            None => $default,
        }
    };
}

/// Capability methods of a [`Handle`] whose answer is fixed, written as
/// `name: value` pairs instead of one three-line method each:
///
/// ```
/// use nbdkit_backend::{capabilities, CacheMode, FuaMode, Handle, ZeroMode};
/// struct Ram;
/// impl Handle for Ram {
///     capabilities! {
///         can_write: true, can_flush: true, can_zero: ZeroMode::Native,
///         can_fua: FuaMode::Native, can_cache: CacheMode::Native,
///     }
/// }
/// assert!(Ram.can_write().unwrap());
/// assert_eq!(Ram.can_zero().unwrap(), ZeroMode::Native);
/// assert_eq!(Ram.can_cache().unwrap(), CacheMode::Native);
/// assert!(!Ram.can_trim().unwrap()); // not listed: the trait's default
/// ```
///
/// Each pair becomes the same trait method a hand-written one would be, so
/// callers see no difference.  An answer that depends on `self` stays a
/// method (macro hygiene keeps `self` out of the value).
#[macro_export]
macro_rules! capabilities {
    (@one can_zero $v:expr) => {
        fn can_zero(&self) -> $crate::Result<$crate::ZeroMode> {
            Ok($v)
        }
    };
    (@one can_fua $v:expr) => {
        fn can_fua(&self) -> $crate::Result<$crate::FuaMode> {
            Ok($v)
        }
    };
    (@one can_cache $v:expr) => {
        fn can_cache(&self) -> $crate::Result<$crate::CacheMode> {
            Ok($v)
        }
    };
    (@one $name:ident $v:expr) => {
        fn $name(&self) -> $crate::Result<bool> {
            Ok($v)
        }
    };
    ($($name:ident : $v:expr),* $(,)?) => {
        $($crate::capabilities!(@one $name $v);)*
    };
}

/// One client connection's view of a backend.  Dropping it closes it.
///
/// Every method may be called from several threads at once when the thread
/// model is `Parallel`.  Requests reaching a handle have been checked by the
/// server: in range, within block-size limits, and only for advertised
/// capabilities.  (A filter that returns false from
/// [`Handle::enforce_block_size`] takes the block-size check over: the
/// handles below it may then see unaligned requests.)
pub trait Handle: Send + Sync {
    /// Filters return the handle they wrap.  Plugins keep `None`.
    fn next(&self) -> Option<&dyn Handle> {
        None
    }

    /// Size in bytes.  Plugins must implement this.
    fn size(&self) -> Result<u64> {
        forward!(
            self.size(),
            Err(Error::not_supported("size not implemented"))
        )
    }

    /// Block size constraints; `None` means any size is fine.
    fn block_size(&self) -> Result<Option<BlockSize>> {
        forward!(self.block_size(), Ok(None))
    }

    /// Whether the server refuses requests that break `block_size` (not
    /// aligned to the minimum) before they reach the handle: true, the
    /// default.  The blocksize-policy filter's `allow` policy says false,
    /// to advertise constraints but pass such requests down.
    fn enforce_block_size(&self) -> Result<bool> {
        forward!(self.enforce_block_size(), Ok(true))
    }

    /// What the data comes from (a file name, a URL), for messages that
    /// filters show about it, e.g. "disk.img.xz: corrupt block at …".
    fn source_name(&self) -> Option<String> {
        forward!(self.source_name(), None)
    }

    /// An opaque version of the content behind `source_name`: an HTTP
    /// ETag (or Last-Modified), an object store's version.  Two equal
    /// values for the same source mean the same bytes, so something saved
    /// about those bytes (the gzip filter's index) may be reused only while
    /// the value is unchanged.  `None` (the default for plugins): no such
    /// promise, and whoever saves state must rely on the bytes alone.
    ///
    /// Filters pass it on: their bytes are a fixed function of the next
    /// handle's bytes and their own parameters.  A filter whose bytes can
    /// change without the source changing (`cow`, with its overlay of
    /// writes) returns `None`.
    fn source_version(&self) -> Option<String> {
        forward!(self.source_version(), None)
    }

    /// Text for NBD_INFO_DESCRIPTION.
    fn export_description(&self) -> Result<Option<String>> {
        forward!(self.export_description(), Ok(None))
    }

    fn can_write(&self) -> Result<bool> {
        forward!(self.can_write(), Ok(false))
    }
    fn can_flush(&self) -> Result<bool> {
        forward!(self.can_flush(), Ok(false))
    }
    fn is_rotational(&self) -> Result<bool> {
        forward!(self.is_rotational(), Ok(false))
    }
    fn can_trim(&self) -> Result<bool> {
        forward!(self.can_trim(), Ok(false))
    }
    /// Plugin default: emulated with `pwrite` when writable.
    fn can_zero(&self) -> Result<ZeroMode> {
        forward!(
            self.can_zero(),
            Ok(if self.can_write()? {
                ZeroMode::Emulate
            } else {
                ZeroMode::None
            })
        )
    }
    /// Plugin default: true unless zeroing is native (an emulated zero can
    /// always fail fast; a native one must say whether it is fast).
    fn can_fast_zero(&self) -> Result<bool> {
        forward!(
            self.can_fast_zero(),
            Ok(self.can_zero()? != ZeroMode::Native)
        )
    }
    /// Whether `extents` returns real allocation information.
    fn can_extents(&self) -> Result<bool> {
        forward!(self.can_extents(), Ok(false))
    }
    /// Plugin default: emulated with `flush` when flush is supported.
    fn can_fua(&self) -> Result<FuaMode> {
        forward!(
            self.can_fua(),
            Ok(if self.can_flush()? {
                FuaMode::Emulate
            } else {
                FuaMode::None
            })
        )
    }
    /// Whether several connections see each other's writes and a flush on
    /// one persists writes from all.
    fn can_multi_conn(&self) -> Result<bool> {
        forward!(self.can_multi_conn(), Ok(false))
    }
    fn can_cache(&self) -> Result<CacheMode> {
        forward!(self.can_cache(), Ok(CacheMode::None))
    }

    /// Whether [`Handle::extend`] can grow this handle.  False by default
    /// for plugins and filters alike, and deliberately *not* forwarded: a
    /// filter that changes offsets or sizes (partition, truncate, cow)
    /// would let its user grow the wrong thing.  A filter whose offsets
    /// map 1:1 onto `next`'s may opt in by forwarding both methods.
    fn can_extend(&self) -> Result<bool> {
        Ok(false)
    }

    /// Grow to `new_size` bytes (never shrinks; a size not above the
    /// current one does nothing), the new bytes reading as zeroes.  For
    /// formats that append to their file (qcow2 allocates clusters past
    /// the end).  Not forwarded, like [`Handle::can_extend`].
    fn extend(&self, new_size: u64) -> Result<()> {
        let _ = new_size;
        Err(Error::not_supported("this layer cannot grow"))
    }

    /// Read `buf.len()` bytes at `offset`.  Plugins must implement this.
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        forward!(
            self.pread(buf, offset),
            Err(Error::not_supported("pread not implemented"))
        )
    }

    /// Say where the bytes of `[offset, offset+count)` are, so the server
    /// can send them without copying (see [`direct`]); the pieces must
    /// cover exactly `count` bytes.  `None` (the default, for plugins and
    /// filters alike — this is deliberately *not* forwarded) means: read
    /// with `pread`.  A filter that passes reads through unchanged may
    /// forward it, adjusting offsets if it moves them.
    fn pread_direct(&self, offset: u64, count: u64) -> Result<Option<DirectRead<'_>>> {
        let _ = (offset, count);
        Ok(None)
    }

    /// Write; with `fua` and native FUA, persist before returning.
    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        forward!(
            self.pwrite(buf, offset, fua),
            Err(Error::read_only("this export is read-only"))
        )
    }

    fn flush(&self) -> Result<()> {
        forward!(self.flush(), Ok(()))
    }

    fn trim(&self, offset: u64, count: u64, fua: bool) -> Result<()> {
        forward!(
            self.trim(offset, count, fua),
            Err(Error::not_supported("trim not supported"))
        )
    }

    /// Write zeroes.  Plugin default: emulate with `pwrite`, failing at once
    /// when `flags.fast` is set.
    fn zero(&self, offset: u64, count: u64, flags: ZeroFlags) -> Result<()> {
        forward!(
            self.zero(offset, count, flags),
            write_zeroes(self, offset, count, flags)
        )
    }

    /// Describe allocation of `[offset, offset+count)` into `extents`, which
    /// was created for that range.  Add at least one extent; with `req_one`
    /// the first is enough.  Plugin default: all data.
    fn extents(&self, offset: u64, count: u64, req_one: bool, extents: &mut Extents) -> Result<()> {
        forward!(self.extents(offset, count, req_one, extents), {
            let _ = req_one;
            extents.add(offset, count, 0)
        })
    }

    /// Describe how deep in a chain of images `[offset, offset+count)` is
    /// allocated, the answer to the `qemu:allocation-depth` metadata
    /// context: each extent's `flags` is a depth, 0 for a range allocated
    /// nowhere (it reads as zeroes, or as whatever a client puts under the
    /// image), 1 for this image, 2 and up for its backing images.  Added
    /// as [`Handle::extents`] adds (contiguous, from the start of the
    /// range; `req_one` may stop at the first).
    ///
    /// Plugin default: 1 everywhere, holes included: a plugin is one image
    /// with nothing under it, and qemu-nbd says the same of a raw file.
    /// Filters forward it, which is right only where they keep offsets and
    /// allocation as they are: one that moves offsets shifts the answer
    /// (see [`StatusKind`]), one that makes its own bytes (a decompressor)
    /// answers 1 itself, and one that is a layer of its own (`cow`) adds
    /// one to what is below.
    fn allocation_depth(
        &self,
        offset: u64,
        count: u64,
        req_one: bool,
        extents: &mut Extents,
    ) -> Result<()> {
        forward!(self.allocation_depth(offset, count, req_one, extents), {
            let _ = req_one;
            extents.add(offset, count, 1)
        })
    }

    /// Prefetch.  Plugin default: read and discard.
    fn cache(&self, offset: u64, count: u64) -> Result<()> {
        forward!(
            self.cache(offset, count),
            read_and_discard(self, offset, count)
        )
    }
}

static DEBUG_FLAGS: std::sync::OnceLock<std::collections::HashMap<(String, String), i64>> =
    std::sync::OnceLock::new();

/// Install the `-D NAME.FLAG=N` flags from the command line (once).
pub fn set_debug_flags(flags: std::collections::HashMap<(String, String), i64>) {
    let _ = DEBUG_FLAGS.set(flags);
}

/// The value of debug flag `-D name.flag=N`, if given: plugins and filters
/// use these to turn on extra diagnostics.
pub fn debug_flag(name: &str, flag: &str) -> Option<i64> {
    DEBUG_FLAGS
        .get()?
        .get(&(name.to_string(), flag.to_string()))
        .copied()
}

/// Largest buffer used when emulating zero with plain writes.
const EMULATION_CHUNK: u64 = 1 << 20;

/// Largest read when emulating cache: 64 MiB, the largest request a
/// client may send, as nbdkit (a plugin sees the same reads as from a
/// client that reads the range itself, so a plugin keyed on whole
/// requests, like a cache of its own, gets hits afterwards).
const CACHE_CHUNK: u64 = 64 << 20;

/// Write zeroes with `pwrite`, for handles without a native zero.
pub fn write_zeroes<H: Handle + ?Sized>(
    h: &H,
    offset: u64,
    count: u64,
    flags: ZeroFlags,
) -> Result<()> {
    if flags.fast {
        return Err(Error::not_supported("fast zero is not possible here"));
    }
    let buf = vec![0u8; count.min(EMULATION_CHUNK) as usize];
    let mut done = 0;
    while done < count {
        let n = (count - done).min(EMULATION_CHUNK);
        let last = done + n == count;
        h.pwrite(&buf[..n as usize], offset + done, flags.fua && last)?;
        done += n;
    }
    Ok(())
}

/// Read a range and throw it away (emulated NBD_CMD_CACHE).
pub fn read_and_discard<H: Handle + ?Sized>(h: &H, offset: u64, count: u64) -> Result<()> {
    let mut buf = vec![0u8; count.min(CACHE_CHUNK) as usize];
    let mut done = 0;
    while done < count {
        let n = (count - done).min(CACHE_CHUNK) as usize;
        h.pread(&mut buf[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// True if every byte is zero.  Fast enough to run on every read: it
/// compares 16-byte words, which the compiler vectorises.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut words = buf.chunks_exact(16);
    words
        .by_ref()
        .all(|w| w.iter().fold(0u8, |acc, &b| acc | b) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Ram(Mutex<Vec<u8>>);
    impl Handle for Ram {
        fn size(&self) -> Result<u64> {
            Ok(self.0.lock().unwrap().len() as u64)
        }
        fn can_write(&self) -> Result<bool> {
            Ok(true)
        }
        fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            let d = self.0.lock().unwrap();
            buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn pwrite(&self, buf: &[u8], offset: u64, _fua: bool) -> Result<()> {
            let mut d = self.0.lock().unwrap();
            d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
    }

    /// A filter that overrides nothing but `pread` (it inverts bytes).
    struct Invert(Box<dyn Handle>);
    impl Handle for Invert {
        fn next(&self) -> Option<&dyn Handle> {
            Some(&*self.0)
        }
        fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            self.0.pread(buf, offset)?;
            buf.iter_mut().for_each(|b| *b = !*b);
            Ok(())
        }
    }

    #[test]
    fn plugin_defaults_emulate_zero_and_fua() {
        let r = Ram(Mutex::new(vec![7u8; 3 << 20]));
        assert_eq!(r.can_zero().unwrap(), ZeroMode::Emulate);
        assert!(r.can_fast_zero().unwrap());
        assert_eq!(r.can_fua().unwrap(), FuaMode::None);
        r.zero(5, (2 << 20) + 3, ZeroFlags::default()).unwrap();
        let d = r.0.lock().unwrap();
        assert_eq!(d[4], 7);
        assert!(is_zero(&d[5..5 + (2 << 20) + 3]));
        assert_eq!(d[5 + (2 << 20) + 3], 7);
        drop(d);
        let e = r
            .zero(
                0,
                1,
                ZeroFlags {
                    fast: true,
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotSupported);
    }

    #[test]
    fn filter_inherits_everything_it_does_not_override() {
        let f = Invert(Box::new(Ram(Mutex::new(vec![0u8; 16]))));
        assert_eq!(f.size().unwrap(), 16);
        assert!(f.can_write().unwrap());
        f.pwrite(&[1, 2], 0, false).unwrap();
        let mut b = [0u8; 3];
        f.pread(&mut b, 0).unwrap();
        assert_eq!(b, [!1, !2, !0]);
        let mut e = Extents::new(0, 16);
        f.extents(0, 16, false, &mut e).unwrap();
        assert_eq!(
            e.list(),
            &[Extent {
                offset: 0,
                length: 16,
                flags: 0
            }]
        );
    }

    #[test]
    fn a_plugin_is_depth_one_everywhere_and_filters_forward_it() {
        // A disk whose every byte is zero is still one local image, as
        // qemu-nbd -A reports a raw file with holes.
        let r = Ram(Mutex::new(vec![0u8; 64]));
        let mut e = Extents::new(8, 64);
        StatusKind::Depth.query(&r, 8, 56, false, &mut e).unwrap();
        assert_eq!(
            e.list(),
            &[Extent {
                offset: 8,
                length: 56,
                flags: 1
            }]
        );
        struct Deep;
        impl Handle for Deep {
            fn size(&self) -> Result<u64> {
                Ok(64)
            }
            fn allocation_depth(&self, o: u64, c: u64, _: bool, e: &mut Extents) -> Result<()> {
                e.add(o, c / 2, 0)?;
                e.add(o + c / 2, c - c / 2, 3)
            }
        }
        let f = Invert(Box::new(Deep));
        let mut e = Extents::new(0, 64);
        f.allocation_depth(0, 64, false, &mut e).unwrap();
        let depths: Vec<_> = e.list().iter().map(|x| (x.length, x.flags)).collect();
        assert_eq!(depths, [(32, 0), (32, 3)]);
    }

    #[test]
    fn direct_reads_are_not_forwarded_through_filters() {
        struct FileBacked(std::fs::File);
        impl Handle for FileBacked {
            fn size(&self) -> Result<u64> {
                Ok(16)
            }
            fn pread(&self, buf: &mut [u8], _offset: u64) -> Result<()> {
                buf.fill(0);
                Ok(())
            }
            fn pread_direct(&self, offset: u64, count: u64) -> Result<Option<DirectRead<'_>>> {
                use std::os::fd::AsFd;
                Ok(Some(DirectRead {
                    fd: self.0.as_fd(),
                    pieces: vec![DirectPiece::File { offset, len: count }],
                }))
            }
        }
        let file = std::fs::File::open("/dev/null").unwrap();
        let plugin = FileBacked(file);
        let direct = plugin
            .pread_direct(4, 8)
            .unwrap()
            .expect("the plugin answers");
        assert_eq!(direct.len(), 8);
        // The inverting filter changes data: a direct read would bypass it.
        let f = Invert(Box::new(plugin));
        assert!(f.pread_direct(4, 8).unwrap().is_none());
    }

    #[test]
    fn extend_is_not_forwarded_through_filters() {
        struct Growing(Mutex<Vec<u8>>);
        impl Handle for Growing {
            fn size(&self) -> Result<u64> {
                Ok(self.0.lock().unwrap().len() as u64)
            }
            fn can_extend(&self) -> Result<bool> {
                Ok(true)
            }
            fn extend(&self, new_size: u64) -> Result<()> {
                let mut v = self.0.lock().unwrap();
                if new_size as usize > v.len() {
                    v.resize(new_size as usize, 0);
                }
                Ok(())
            }
        }
        let plugin = Growing(Mutex::new(vec![1; 16]));
        plugin.extend(32).unwrap();
        assert_eq!(plugin.size().unwrap(), 32);
        // A filter that says nothing about growth cannot grow what is
        // below it: it might map offsets (a partition) and grow the wrong
        // thing.
        let f = Invert(Box::new(plugin));
        assert!(!f.can_extend().unwrap());
        assert_eq!(f.extend(64).unwrap_err().kind(), ErrorKind::NotSupported);
        assert_eq!(f.size().unwrap(), 32);
    }

    #[test]
    fn is_zero_checks_every_byte() {
        let mut v = vec![0u8; 1000];
        assert!(is_zero(&v));
        for i in [0, 1, 15, 16, 500, 999] {
            v[i] = 1;
            assert!(!is_zero(&v));
            assert!(!is_zero(&v[i..]));
            v[i] = 0;
        }
        assert!(is_zero(&[]));
    }
}
