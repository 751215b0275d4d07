//! `ext2`: serve one file from inside an ext2/ext3/ext4 filesystem image,
//! read-write.  The path is fixed (`ext2file=/PATH`) or is the export
//! name the client asks for (`ext2file=exportname`; a name without a
//! leading `/` is taken from the root).
//!
//! The filesystem is handled by libext2fs (e2fsprogs' own library, the
//! one `mke2fs`, `e2fsck` and `debugfs` use), because writing into ext4
//! means allocating blocks, extending extent trees and keeping bitmaps,
//! group descriptors and checksums consistent: no Rust crate does that.
//! Its I/O goes through an io_manager (shim.c) whose reads and writes are
//! the next layer's, so any plugin and filter stack can hold the image.
//!
//! libext2fs is not thread-safe and a filesystem must not be open twice
//! for writing, so one connection is served at a time
//! (`serialize_connections`) and its requests take turns on a lock.
//! A filesystem whose journal needs recovery is refused for writing
//! (libext2fs does not replay journals); read-only (`-r`) it is read as
//! it is on disk.

mod ffi;

use std::sync::{Arc, Mutex};

use ffi::Ext2File;
use nbdkit_backend::{
    layer_fn, Backend, CacheMode, Config, ConfigError, Error, ExportEntry, FilterSpec, Handle,
    Layer, LockExt, Param, Result, ThreadModel,
};

#[derive(Debug, Clone)]
enum Target {
    /// A fixed absolute path.
    Path(String),
    /// The client's export name is the path.
    ExportName,
}

fn configure(c: &mut Config) -> std::result::Result<Box<dyn Layer>, ConfigError> {
    let v = c.require("ext2file", "ext2 filter")?;
    let target = if v == "exportname" {
        Target::ExportName
    } else if v.starts_with('/') {
        Target::Path(v)
    } else {
        return Err(ConfigError::new(format!(
            "ext2file={v}: the path must be absolute (start with /), or 'exportname'"
        )));
    };
    Ok(layer_fn(move |next| Ok(Arc::new(Ext2 { next, target }))))
}

struct Ext2 {
    next: Arc<dyn Backend>,
    target: Target,
}

impl Backend for Ext2 {
    fn name(&self) -> &str {
        "ext2"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn list_exports(&self, readonly: bool) -> Result<Vec<ExportEntry>> {
        match self.target {
            // The files of the image are not advertised.
            Target::ExportName => Ok(Vec::new()),
            Target::Path(_) => self.next.list_exports(readonly),
        }
    }
    fn default_export(&self, readonly: bool) -> Result<String> {
        match self.target {
            Target::ExportName => Ok(String::new()),
            Target::Path(_) => self.next.default_export(readonly),
        }
    }
    fn thread_model(&self) -> ThreadModel {
        ThreadModel::SerializeConnections.min(self.next.thread_model())
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        let (path, plugin_export) = match &self.target {
            Target::Path(p) => (p.clone(), export),
            // A relative name is taken from the root; "" names the root
            // directory, which is not a file and fails to open.
            Target::ExportName => match export.starts_with('/') {
                true => (export.to_string(), ""),
                false => (format!("/{export}"), ""),
            },
        };
        let next: Arc<dyn Handle> = Arc::from(self.next.open(readonly, plugin_export)?);
        let writable = !readonly && next.can_write()?;
        let source = next.source_name();
        let mut file = Ext2File::open(next, writable, &path)?;
        let size = file.size()?;
        Ok(Box::new(Ext2Handle {
            file: Mutex::new(file),
            size,
            writable,
            source: source.map_or_else(|| path.clone(), |s| format!("{s}:{path}")),
        }))
    }
}

/// A connection's file.  No `next()`: the handle answers as a plugin
/// would, so every request goes through libext2fs and none reaches the
/// image below except as filesystem I/O.
struct Ext2Handle {
    file: Mutex<Ext2File>,
    size: u64,
    writable: bool,
    source: String,
}

impl Handle for Ext2Handle {
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn source_name(&self) -> Option<String> {
        Some(self.source.clone())
    }
    fn can_write(&self) -> Result<bool> {
        Ok(self.writable)
    }
    fn can_flush(&self) -> Result<bool> {
        Ok(self.writable)
    }
    fn can_cache(&self) -> Result<CacheMode> {
        Ok(CacheMode::Emulate)
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.lock_unpoisoned().pread(buf, offset)
    }
    fn pwrite(&self, buf: &[u8], offset: u64, _fua: bool) -> Result<()> {
        if !self.writable {
            return Err(Error::read_only("ext2: the file is open read-only"));
        }
        // FUA is emulated: the server flushes after the write.
        self.file.lock_unpoisoned().pwrite(buf, offset)
    }
    fn flush(&self) -> Result<()> {
        self.file.lock_unpoisoned().flush()
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "ext2",
    summary: "serve one file from inside an ext2/3/4 filesystem image, read-write",
    description: "The file is read and written through libext2fs; one connection at a time.\n\
A filesystem whose journal needs recovery is served read-only (-r) only.\n\n\
Examples:\n  nbdkit-rs --filter=ext2 file fs.img ext2file=/disks/disk.img\n  \
nbdkit-rs --filter=ext2 file fs.img ext2file=exportname   # the client names the file",
    params: &[Param {
        name: "ext2file",
        help: "/PATH|exportname: the file to serve, or take it from the export name (required)",
    }],
    configure,
};
