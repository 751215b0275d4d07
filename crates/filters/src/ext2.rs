//! `ext2`: serve one file from inside an ext2/ext3/ext4 filesystem image,
//! **read-only**.  The path is fixed (`ext2file=/PATH`) or is the export
//! name the client asks for (`ext2file=exportname`; a name without a
//! leading `/` is taken from the root).
//!
//! nbdkit's filter is read-write through libext2fs.  Here the filesystem
//! is read with the `ext4-view` crate (pure Rust, no unsafe FFI, checks
//! metadata checksums, reads ext2/3 block maps and ext4 extents, follows
//! the journal), which cannot write; so the export is read-only and
//! writes fail with EROFS rather than risk a half-implemented allocator
//! corrupting the image.  Binding libext2fs by hand (its io_manager and
//! io_channel structures are needed to route its I/O to the plugin) is
//! the way to writes, and is not done.
//!
//! `ext4-view`'s filesystem object is single-threaded (`Rc`), so each
//! connection runs it on a thread of its own and sends it reads.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use ext4_view::{Ext4, Ext4Read};
use nbdkit_backend::{
    Backend, CacheMode, Client, Config, ConfigError, Error, ExportEntry, FilterSpec, Handle, Layer,
    Param, Result,
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
    Ok(Box::new(Ext2Layer(target)))
}

struct Ext2Layer(Target);

impl Layer for Ext2Layer {
    fn layer(
        self: Box<Self>,
        next: Arc<dyn Backend>,
    ) -> std::result::Result<Arc<dyn Backend>, ConfigError> {
        Ok(Arc::new(Ext2 {
            next,
            target: self.0,
        }))
    }
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
    fn open(&self, _readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        let (path, plugin_export) = match &self.target {
            Target::Path(p) => (p.clone(), export),
            // A relative name is taken from the root; "" names the root
            // directory, which is not a file and fails to open.
            Target::ExportName => match export.starts_with('/') {
                true => (export.to_string(), ""),
                false => (format!("/{export}"), ""),
            },
        };
        let next: Arc<dyn Handle> = Arc::from(self.next.open(true, plugin_export)?);
        Ext2Handle::start(next, path).map(|h| Box::new(h) as Box<dyn Handle>)
    }
}

/// Reads the filesystem image through the layers below.
struct Reader(Arc<dyn Handle>);

impl Ext4Read for Reader {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        self.0.pread(dst, start_byte).map_err(|e| Box::new(e) as _)
    }
}

struct ReadReq {
    offset: u64,
    len: usize,
    reply: mpsc::Sender<Result<Vec<u8>>>,
}

/// A connection's view of the file: a worker thread owns the filesystem.
/// No `next()`: the handle answers as a read-only plugin would, so no
/// write, trim or zero can reach the image below.
struct Ext2Handle {
    tx: Option<mpsc::Sender<ReadReq>>,
    size: u64,
    thread: Option<JoinHandle<()>>,
}

impl Ext2Handle {
    fn start(next: Arc<dyn Handle>, path: String) -> Result<Ext2Handle> {
        let (tx, rx) = mpsc::channel::<ReadReq>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<u64>>();
        let client = Client::current();
        let thread = std::thread::Builder::new()
            .name("ext2".into())
            .spawn(move || {
                let _current = client.as_ref().map(|c| c.enter());
                let fail =
                    |what: &str, e: ext4_view::Ext4Error| Error::io(format!("ext2: {what}: {e}"));
                let opened = Ext4::load(Box::new(Reader(next)))
                    .map_err(|e| fail("cannot read the filesystem", e))
                    .and_then(|fs| {
                        let file = fs.open(path.as_str()).map_err(|e| fail(&path, e))?;
                        Ok((fs, file))
                    });
                let (_fs, mut file) = match opened {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(file.metadata().len()));
                for req in rx {
                    let r = (|| {
                        file.seek_to(req.offset).map_err(|e| fail(&path, e))?;
                        let mut buf = vec![0u8; req.len];
                        let mut got = 0;
                        while got < buf.len() {
                            let n = file
                                .read_bytes(&mut buf[got..])
                                .map_err(|e| fail(&path, e))?;
                            if n == 0 {
                                return Err(Error::io(format!(
                                    "ext2: {path}: unexpected end of file at {}",
                                    req.offset + got as u64
                                )));
                            }
                            got += n;
                        }
                        Ok(buf)
                    })();
                    let _ = req.reply.send(r);
                }
            })
            .map_err(|e| Error::from_io("ext2: starting a thread", e))?;
        let size = match ready_rx.recv() {
            Ok(Ok(size)) => size,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(Error::io("ext2: the filesystem reader stopped"));
            }
        };
        Ok(Ext2Handle {
            tx: Some(tx),
            size,
            thread: Some(thread),
        })
    }
}

impl Drop for Ext2Handle {
    fn drop(&mut self) {
        // Closing the channel ends the worker's loop.
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Handle for Ext2Handle {
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn can_cache(&self) -> Result<CacheMode> {
        Ok(CacheMode::Emulate)
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| Error::io("ext2: the handle is closed"))?;
        let (reply, answer) = mpsc::channel();
        tx.send(ReadReq {
            offset,
            len: buf.len(),
            reply,
        })
        .map_err(|_| Error::io("ext2: the filesystem reader stopped"))?;
        let data = answer
            .recv()
            .map_err(|_| Error::io("ext2: the filesystem reader stopped"))??;
        buf.copy_from_slice(&data);
        Ok(())
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "ext2",
    summary: "serve one file from inside an ext2/3/4 filesystem image (read-only)",
    description: "Read-only: writes fail with EROFS (nbdkit's filter can write; this one\n\
reads the filesystem with the ext4-view crate, which cannot).\n\n\
Examples:\n  nbdkit-rs --filter=ext2 file fs.img ext2file=/disks/disk.img\n  \
nbdkit-rs --filter=ext2 file fs.img ext2file=exportname   # the client names the file",
    params: &[Param {
        name: "ext2file",
        help: "/PATH|exportname: the file to serve, or take it from the export name (required)",
    }],
    configure,
};
