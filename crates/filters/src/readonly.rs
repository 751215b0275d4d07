//! `readonly`: make the plugin read-only, always (like `-r`), or — with
//! `readonly-file=FILE` — whenever FILE exists, so that a running export
//! can be write-protected and unprotected from outside (`touch FILE`,
//! `rm FILE`), e.g. around a backup.
//!
//! In the switched mode the export stays advertised as writable, since
//! flags cannot change under a connected client: writes, zeroes and
//! trims that arrive while FILE exists fail with EPERM before reaching
//! the plugin; ones that were already acknowledged are untouched, and
//! flush still works, so data written before the switch can be persisted.

use std::path::PathBuf;
use std::sync::Arc;

use nbdkit_backend::{
    layer_fn, Backend, ConfigError, Error, FilterSpec, Handle, Param, Result, ZeroFlags,
};

struct ReadonlyBackend {
    next: Arc<dyn Backend>,
    /// None: read-only for good.
    file: Option<Arc<PathBuf>>,
}

impl Backend for ReadonlyBackend {
    fn name(&self) -> &str {
        "readonly"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn list_exports(&self, readonly: bool) -> Result<Vec<nbdkit_backend::ExportEntry>> {
        self.next.list_exports(readonly || self.file.is_none())
    }
    fn default_export(&self, readonly: bool) -> Result<String> {
        self.next.default_export(readonly || self.file.is_none())
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        match &self.file {
            None => Ok(Box::new(AlwaysReadonly {
                next: self.next.open(true, export)?,
            })),
            Some(file) => Ok(Box::new(SwitchedHandle {
                next: self.next.open(readonly, export)?,
                file: file.clone(),
            })),
        }
    }
}

/// No readonly-file: the plugin was opened read-only and the export says
/// so; the server then refuses every write itself.
struct AlwaysReadonly {
    next: Box<dyn Handle>,
}

impl Handle for AlwaysReadonly {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    nbdkit_backend::capabilities! {
        can_write: false, can_trim: false, can_fast_zero: false,
    }
    fn can_zero(&self) -> Result<nbdkit_backend::ZeroMode> {
        Ok(nbdkit_backend::ZeroMode::None)
    }
    fn can_fua(&self) -> Result<nbdkit_backend::FuaMode> {
        Ok(nbdkit_backend::FuaMode::None)
    }
    fn pwrite(&self, _buf: &[u8], _offset: u64, _fua: bool) -> Result<()> {
        Err(refused())
    }
    fn zero(&self, _offset: u64, _count: u64, _flags: ZeroFlags) -> Result<()> {
        Err(refused())
    }
    fn trim(&self, _offset: u64, _count: u64, _fua: bool) -> Result<()> {
        Err(refused())
    }
}

fn refused() -> Error {
    Error::read_only("readonly filter: the export is read-only")
}

struct SwitchedHandle {
    next: Box<dyn Handle>,
    file: Arc<PathBuf>,
}

impl SwitchedHandle {
    fn check(&self) -> Result<()> {
        // Looked at on every write: the switch takes effect for the very
        // next request after the file appears or goes.
        if self.file.exists() {
            Err(Error::read_only(format!(
                "readonly filter: {} exists, the export is read-only",
                self.file.display()
            )))
        } else {
            Ok(())
        }
    }
}

impl Handle for SwitchedHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.check()?;
        self.next.pwrite(buf, offset, fua)
    }
    fn zero(&self, offset: u64, count: u64, flags: ZeroFlags) -> Result<()> {
        self.check()?;
        self.next.zero(offset, count, flags)
    }
    fn trim(&self, offset: u64, count: u64, fua: bool) -> Result<()> {
        self.check()?;
        self.next.trim(offset, count, fua)
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "readonly",
    summary: "make the plugin read-only, always or while a file exists",
    description: "Without readonly-file the export is read-only (as with -r). With it, \
writes, zeroes and trims fail with EPERM while the file exists and work again \
once it is removed; the check is made on every request.\n\n\
Example (write-protect a running export):\n  \
nbdkit-rs --filter=readonly file disk.img readonly-file=/tmp/ro\n  touch /tmp/ro",
    params: &[Param {
        name: "readonly-file",
        help: "read-only while this file exists, writable while it does not",
    }],
    configure: |cfg| {
        let file = cfg.take("readonly-file");
        if file.as_deref() == Some("") {
            return Err(ConfigError::new(
                "readonly filter: readonly-file= needs a file name",
            ));
        }
        // Relative to where the server was started, also once it has
        // moved to / in the background.
        let file = file.map(|f| std::path::absolute(&f).unwrap_or_else(|_| PathBuf::from(f)));
        Ok(layer_fn(move |next| {
            Ok(Arc::new(ReadonlyBackend {
                next,
                file: file.map(Arc::new),
            }))
        }))
    },
};
