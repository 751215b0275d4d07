//! `qcow2dec` (alias `qcow2`): serve the virtual disk inside a qcow2 image,
//! read-only, over any plugin or filter (a local file, a URL, an xz
//! file).  The format is read by `seekable_compressed::qcow2`: versions 2
//! and 3, zlib/zstd compressed clusters, zero clusters, subclusters,
//! backing chains and internal snapshots.
//!
//! Backing files named by the image are opened from the local filesystem,
//! relative to the image's own file when the layer below names one (the
//! `file` plugin does): a backing file is another data source, which the
//! user can also override (`backing=`) or turn off (`backing=none`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use nbdkit_backend::{
    Backend, CacheMode, Config, ConfigError, Error, ErrorKind, Extents, FilterSpec, Handle, Layer,
    LockExt, Param, Result, EXTENT_HOLE, EXTENT_ZERO,
};
use seekable_compressed::qcow2::{Backing, MapKind, Qcow2Options, Qcow2Reader};
use seekable_compressed::Source;
use tracing::{info, warn};

use crate::compressed::HandleSource;

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
    Ok(Box::new(Qcow2Layer(opts)))
}

struct Qcow2Layer(Qcow2Options);

impl Layer for Qcow2Layer {
    fn layer(
        self: Box<Self>,
        next: Arc<dyn Backend>,
    ) -> std::result::Result<Arc<dyn Backend>, ConfigError> {
        Ok(Arc::new(Qcow2Dec {
            next,
            opts: self.0,
            readers: Mutex::new(HashMap::new()),
        }))
    }
}

struct Qcow2Dec {
    next: Arc<dyn Backend>,
    opts: Qcow2Options,
    /// One reader per export name, shared by its connections (and with it
    /// the L2 and cluster caches).
    readers: Mutex<HashMap<String, Arc<Qcow2Reader>>>,
}

fn error(e: seekable_compressed::Error) -> Error {
    let kind = match &e {
        seekable_compressed::Error::OutOfRange { .. } => ErrorKind::InvalidInput,
        seekable_compressed::Error::Unsupported { .. } => ErrorKind::NotSupported,
        _ => ErrorKind::Io,
    };
    Error::new(kind, format!("qcow2dec: {e}"))
}

impl Qcow2Dec {
    fn reader(&self, export: &str) -> Result<Arc<Qcow2Reader>> {
        // Held while opening, so two first connections open one reader.
        let mut readers = self.readers.lock_unpoisoned();
        if let Some(r) = readers.get(export) {
            return Ok(r.clone());
        }
        let handle = self.next.open(true, export)?;
        let mut opts = self.opts.clone();
        opts.name = handle.source_name().unwrap_or_else(|| {
            if export.is_empty() {
                self.next.name().to_string()
            } else {
                export.to_string()
            }
        });
        let size = handle.size()?;
        let source: Arc<dyn Source> = Arc::new(HandleSource { handle, size });
        let reader = Qcow2Reader::open(source, &opts).map_err(error)?;
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
        if h.corrupt {
            warn!(
                "{}: the image is marked corrupt; serving it read-only",
                opts.name
            );
        }
        let reader = Arc::new(reader);
        readers.insert(export.to_string(), reader.clone());
        Ok(reader)
    }
}

impl Backend for Qcow2Dec {
    fn name(&self) -> &str {
        "qcow2dec"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, _readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        let reader = self.reader(export)?;
        // Nothing is written to the image: the connection's own handle
        // below is opened read-only.
        let next = self.next.open(true, export)?;
        Ok(Box::new(Qcow2Handle {
            _next: next,
            reader,
        }))
    }
}

/// A connection's view.  No `next()`: it answers as a read-only plugin
/// would, so no write can reach the image below.
struct Qcow2Handle {
    _next: Box<dyn Handle>,
    reader: Arc<Qcow2Reader>,
}

impl Handle for Qcow2Handle {
    fn size(&self) -> Result<u64> {
        Ok(self.reader.size())
    }
    fn can_extents(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_multi_conn(&self) -> Result<bool> {
        // Read-only, one shared reader.
        Ok(true)
    }
    fn can_cache(&self) -> Result<CacheMode> {
        Ok(CacheMode::Emulate)
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.reader.read_at(buf, offset).map_err(|e| {
            let e = error(e);
            warn!("{}", e.message());
            e
        })
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
    "Read-only.  Versions 2 and 3, any cluster size, zlib and zstd compressed\n\
clusters, zero clusters, subclusters (extended L2), backing chains (raw or\n\
qcow2, found relative to the image's file) and internal snapshots.\n\
Encrypted images and external data files are refused.\n\n\
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
    summary: "serve the virtual disk of a qcow2 image, read-only",
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
