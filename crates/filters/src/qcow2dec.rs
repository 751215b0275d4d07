//! `qcow2dec` (alias `qcow2`): serve the virtual disk inside a qcow2 image
//! over any plugin or filter (a local file, a URL, an xz file).  The
//! format is read by `seekable_compressed::qcow2`: versions 2 and 3,
//! zlib/zstd compressed clusters, zero clusters, subclusters, backing
//! chains and internal snapshots.
//!
//! Writable when the layer below can write, flush and grow (the `file`
//! plugin on a regular file, `memory`) and `-r` is not given: the writer
//! (`qcow2::write`) appends clusters and keeps refcounts exact, writing
//! metadata back in a crash-safe order on flush, FUA and close.  Images it
//! cannot keep consistent (corrupt or dirty headers, internal snapshots,
//! extended L2) are served read-only with a log line saying why.
//!
//! Backing files named by the image are opened from the local filesystem,
//! relative to the image's own file when the layer below names one (the
//! `file` plugin does): a backing file is another data source, which the
//! user can also override (`backing=`) or turn off (`backing=none`).

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use nbdkit_backend::{
    layer_fn, Backend, CacheMode, Config, ConfigError, DirectPiece, DirectRead, Error, ErrorKind,
    Extents, FilterSpec, FuaMode, Handle, Layer, LockExt, Param, Result, ZeroFlags, ZeroMode,
    EXTENT_HOLE, EXTENT_ZERO,
};
use seekable_compressed::qcow2::write::{Qcow2Writer, Sink};
use seekable_compressed::qcow2::{Backing, FilePiece, MapKind, Qcow2Options, Qcow2Reader};
use seekable_compressed::Source;
use tracing::{debug, info, warn};

use crate::compressed::{to_io, HandleSource};

fn configure(c: &mut Config) -> std::result::Result<Box<dyn Layer>, ConfigError> {
    let backing = match c.take("backing") {
        None => Backing::FromHeader,
        Some(v) if v == "none" => Backing::None,
        Some(v) if v.is_empty() => {
            return Err(ConfigError::new(
                "backing=: expected a file name, or 'none'",
            ))
        }
        Some(v) => Backing::Path(v),
    };
    let backing_format = match c.take("backing-format") {
        None => None,
        Some(f) if f == "raw" || f == "qcow2" => Some(f),
        Some(f) => {
            return Err(ConfigError::new(format!(
                "backing-format={f}: expected raw or qcow2"
            )))
        }
    };
    let snapshot = c.take("snapshot");
    if snapshot.as_deref() == Some("") {
        return Err(ConfigError::new(
            "snapshot=: expected a snapshot ID or name",
        ));
    }
    let opts = Qcow2Options {
        backing,
        backing_format,
        snapshot,
        open: Some(Arc::new(|path: &str| {
            let f = std::fs::File::open(path)?;
            Ok(Arc::new(f) as Arc<dyn Source>)
        })),
        ..Qcow2Options::default()
    };
    Ok(layer_fn(move |next| {
        Ok(Arc::new(Qcow2Dec {
            next,
            opts,
            images: Mutex::new(HashMap::new()),
        }))
    }))
}

/// One export's image: the reader, and the writer when the image is
/// served writable.
#[derive(Clone)]
struct Image {
    reader: Arc<Qcow2Reader>,
    writer: Option<Arc<Qcow2Writer>>,
}

struct Qcow2Dec {
    next: Arc<dyn Backend>,
    opts: Qcow2Options,
    /// One image per export name, shared by its connections (and with it
    /// the caches and the writer's metadata: a write on one connection is
    /// seen by all, and a flush on any writes everything back).
    images: Mutex<HashMap<String, Image>>,
}

fn error(e: seekable_compressed::Error) -> Error {
    let kind = match &e {
        seekable_compressed::Error::OutOfRange { .. } => ErrorKind::InvalidInput,
        seekable_compressed::Error::Unsupported { .. } => ErrorKind::NotSupported,
        seekable_compressed::Error::Io { source, .. }
            if source.kind() == std::io::ErrorKind::StorageFull =>
        {
            ErrorKind::NoSpace
        }
        _ => ErrorKind::Io,
    };
    Error::new(kind, format!("qcow2dec: {e}"))
}

/// The file below as the writer's sink: writes, flushes and growth go to
/// the image's own handle.
impl Sink for HandleSource {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.handle.pwrite(buf, offset, false).map_err(to_io)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.handle.flush().map_err(to_io)
    }
    fn extend(&self, new_size: u64) -> std::io::Result<()> {
        self.handle.extend(new_size).map_err(to_io)?;
        self.size.fetch_max(new_size, Ordering::AcqRel);
        Ok(())
    }
}

/// Why the handle below cannot carry a writable image, if it cannot.
fn below_refuses(h: &dyn Handle) -> Result<Option<&'static str>> {
    Ok(if !h.can_write()? {
        Some("the layer below is read-only")
    } else if !h.can_flush()? {
        Some("the layer below cannot flush, so metadata could not be ordered for crash safety")
    } else if !h.can_extend()? {
        Some("the layer below cannot grow (a block device, or a filter that does not pass growth on)")
    } else {
        None
    })
}

impl Qcow2Dec {
    fn image(&self, readonly: bool, export: &str) -> Result<Image> {
        // Held while opening, so two first connections open one image.
        let mut images = self.images.lock_unpoisoned();
        if let Some(i) = images.get(export) {
            if !readonly && i.writer.is_none() {
                debug!("qcow2dec: export {export:?} was opened read-only first; it stays so");
            }
            return Ok(i.clone());
        }
        let handle = self.next.open(readonly, export)?;
        let mut opts = self.opts.clone();
        opts.name = handle.source_name().unwrap_or_else(|| {
            if export.is_empty() {
                self.next.name().to_string()
            } else {
                export.to_string()
            }
        });
        let refusal = if readonly {
            None
        } else {
            below_refuses(&*handle)?
        };
        let size = handle.size()?;
        let file = Arc::new(HandleSource::new(handle, size));
        let reader = Arc::new(Qcow2Reader::open(file.clone(), &opts).map_err(error)?);
        let h = reader.header();
        info!(
            "{}: qcow2 v{}, {} byte clusters, virtual size {}{}{}",
            opts.name,
            h.version,
            h.cluster_size(),
            reader.size(),
            h.backing_file
                .as_deref()
                .map_or(String::new(), |b| format!(", backing file {b}")),
            if h.dirty { ", dirty" } else { "" }
        );
        let writer = match (readonly, refusal) {
            (true, _) => None,
            (false, Some(why)) => {
                warn!("{}: served read-only: {why}", opts.name);
                None
            }
            (false, None) if opts.snapshot.is_some() => {
                info!(
                    "{}: served read-only: snapshot= serves a snapshot",
                    opts.name
                );
                None
            }
            (false, None) => match Qcow2Writer::new(reader.clone(), file, opts.cache_bytes) {
                Ok(w) => Some(Arc::new(w)),
                Err(e) => {
                    warn!("{e}; served read-only");
                    None
                }
            },
        };
        if h.corrupt && writer.is_none() {
            warn!(
                "{}: the image is marked corrupt; serving it read-only",
                opts.name
            );
        }
        let image = Image { reader, writer };
        images.insert(export.to_string(), image.clone());
        Ok(image)
    }
}

impl Backend for Qcow2Dec {
    fn name(&self) -> &str {
        "qcow2dec"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        let image = self.image(readonly, export)?;
        // Every write goes through the image's own handle; the
        // connection's handle below is only held open, read-only.
        let next = self.next.open(true, export)?;
        Ok(Box::new(Qcow2Handle {
            next,
            reader: image.reader,
            writer: if readonly { None } else { image.writer },
        }))
    }
    fn shutdown(&self) {
        for (name, image) in self.images.lock_unpoisoned().iter() {
            if let Some(w) = &image.writer {
                if let Err(e) = w.flush() {
                    warn!("qcow2dec: export {name:?}: writing back metadata at exit: {e}");
                }
            }
        }
        self.next.shutdown()
    }
}

/// A connection's view.  No `next()`: it answers as a plugin would, so
/// nothing reaches the image below except through the writer.
struct Qcow2Handle {
    /// The connection's own handle below, read-only: what direct reads
    /// are sent from (the image's shared handle does the writing).
    next: Box<dyn Handle>,
    reader: Arc<Qcow2Reader>,
    writer: Option<Arc<Qcow2Writer>>,
}

impl Qcow2Handle {
    fn writer(&self) -> Result<&Qcow2Writer> {
        self.writer
            .as_deref()
            .ok_or_else(|| Error::read_only("qcow2dec: this image is served read-only"))
    }
    fn fail(e: seekable_compressed::Error) -> Error {
        let e = error(e);
        warn!("{}", e.message());
        e
    }
}

impl Drop for Qcow2Handle {
    /// A closing connection writes the metadata back, so a client that
    /// disconnects leaves an image `qemu-img check` finds clean.
    fn drop(&mut self) {
        if let Some(w) = &self.writer {
            if let Err(e) = w.flush() {
                warn!("qcow2dec: writing back metadata at close: {e}");
            }
        }
    }
}

impl Handle for Qcow2Handle {
    fn size(&self) -> Result<u64> {
        Ok(self.reader.size())
    }
    fn can_write(&self) -> Result<bool> {
        Ok(self.writer.is_some())
    }
    fn can_flush(&self) -> Result<bool> {
        Ok(self.writer.is_some())
    }
    fn can_fua(&self) -> Result<FuaMode> {
        Ok(if self.writer.is_some() {
            FuaMode::Native
        } else {
            FuaMode::None
        })
    }
    fn can_trim(&self) -> Result<bool> {
        Ok(self.writer.is_some())
    }
    fn can_zero(&self) -> Result<ZeroMode> {
        Ok(if self.writer.is_some() {
            ZeroMode::Native
        } else {
            ZeroMode::None
        })
    }
    nbdkit_backend::capabilities! {
        can_extents: true,
        // One shared image per export: every connection sees every write,
        // and a flush on any writes back all metadata and flushes below.
        can_multi_conn: true,
        can_cache: CacheMode::Emulate,
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.reader.read_at(buf, offset).map_err(Self::fail)
    }
    /// Data clusters hold the guest's bytes unchanged, so a read that
    /// falls only on data clusters and zeroes is sent from the file below
    /// as it is (sendfile when the plugin is `file`), the pieces moved to
    /// where the clusters are.  Compressed clusters and backing-file data
    /// go through `pread`.  Writes change the file in place or put new
    /// clusters elsewhere (never reusing freed ones), so a read racing
    /// with a write sees the old or the new bytes, as with `pread`.
    fn pread_direct(&self, offset: u64, count: u64) -> Result<Option<DirectRead<'_>>> {
        let Some(pieces) = self.reader.file_pieces(offset, count).map_err(Self::fail)? else {
            return Ok(None);
        };
        let mut fd = None;
        let mut out = Vec::with_capacity(pieces.len());
        for p in pieces {
            match p {
                FilePiece::Zero { len } => out.push(DirectPiece::Zero { len }),
                FilePiece::Data { host, len } => {
                    let Some(d) = self.next.pread_direct(host, len)? else {
                        return Ok(None);
                    };
                    // One descriptor for the whole read (always so for
                    // one handle; anything else is not sent directly).
                    if fd.get_or_insert(d.fd).as_raw_fd() != d.fd.as_raw_fd() {
                        return Ok(None);
                    }
                    out.extend(d.pieces);
                }
            }
        }
        // All zeroes: no descriptor to send from, and `pread` is as quick.
        Ok(fd.map(|fd| DirectRead { fd, pieces: out }))
    }
    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        let w = self.writer()?;
        w.write_at(buf, offset).map_err(Self::fail)?;
        if fua {
            w.flush().map_err(Self::fail)?;
        }
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        self.writer()?.flush().map_err(Self::fail)
    }
    fn trim(&self, offset: u64, count: u64, fua: bool) -> Result<()> {
        let w = self.writer()?;
        w.discard(offset, count).map_err(Self::fail)?;
        if fua {
            w.flush().map_err(Self::fail)?;
        }
        Ok(())
    }
    fn zero(&self, offset: u64, count: u64, flags: ZeroFlags) -> Result<()> {
        if flags.fast {
            // Not advertised (a partial cluster is written), so not sent.
            return Err(Error::not_supported("qcow2dec: fast zero"));
        }
        let w = self.writer()?;
        w.write_zeroes(offset, count).map_err(Self::fail)?;
        if flags.fua {
            w.flush().map_err(Self::fail)?;
        }
        Ok(())
    }
    fn extents(
        &self,
        offset: u64,
        count: u64,
        _req_one: bool,
        extents: &mut Extents,
    ) -> Result<()> {
        let mut pos = offset;
        for m in self.reader.map(offset, count).map_err(error)? {
            let flags = match m.kind {
                MapKind::Data { .. } => 0,
                MapKind::Zero { .. } | MapKind::Unallocated => EXTENT_HOLE | EXTENT_ZERO,
            };
            extents.add(pos, m.length, flags)?;
            pos += m.length;
        }
        Ok(())
    }
    /// From the L1/L2 tables of the whole chain: 1 for this image's
    /// clusters (data or zero), 2 and up for a backing image's, 0 for
    /// clusters allocated nowhere, as `qemu-nbd -A` reports.
    fn allocation_depth(
        &self,
        offset: u64,
        count: u64,
        _req_one: bool,
        extents: &mut Extents,
    ) -> Result<()> {
        let mut pos = offset;
        for (length, depth) in self.reader.allocation_depth(offset, count).map_err(error)? {
            extents.add(pos, length, depth)?;
            pos += length;
        }
        Ok(())
    }
}

const DESCRIPTION: &str =
    "Versions 2 and 3, any cluster size, zlib and zstd compressed clusters, zero\n\
clusters, subclusters (extended L2), backing chains (raw or qcow2, found\n\
relative to the image's file) and internal snapshots.\n\n\
Writable when the layer below can write, flush and grow (the file plugin on a\n\
regular file, memory) and -r is not given: new clusters are appended, refcounts\n\
kept exact, and metadata written back in a crash-safe order on flush, FUA and\n\
disconnect.  Served read-only instead (with a log line saying why): corrupt or\n\
dirty images, internal snapshots, extended L2, snapshot=.  Encrypted images and\n\
external data files are refused.\n\n\
Examples:\n  nbdkit-rs --filter=qcow2dec file disk.qcow2\n  \
nbdkit-rs --filter=qcow2dec --filter=xz curl url=https://example.com/cloud.qcow2.xz\n  \
nbdkit-rs --filter=qcow2dec file disk.qcow2 snapshot=before-upgrade";

const PARAMS: &[Param] = &[
    Param {
        name: "backing",
        help: "PATH|none: the backing file to use instead of the header's, or none (unallocated reads as zeroes)",
    },
    Param {
        name: "backing-format",
        help: "raw|qcow2: the backing file's format (default: the header's, else probed)",
    },
    Param {
        name: "snapshot",
        help: "ID|NAME: serve this internal snapshot",
    },
];

pub static SPEC: FilterSpec = FilterSpec {
    name: "qcow2dec",
    summary: "serve the virtual disk of a qcow2 image, writable in place",
    description: DESCRIPTION,
    params: PARAMS,
    configure,
};

/// The same filter under the format's own name.
pub static ALIAS: FilterSpec = FilterSpec {
    name: "qcow2",
    summary: "the qcow2dec filter (an alias)",
    description: DESCRIPTION,
    params: PARAMS,
    configure,
};
