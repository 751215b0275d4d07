//! `log`: write one line per request (connection, id, offset, count,
//! result, time taken) to a file, plus a line for each connect and
//! disconnect.  Useful to see what a client really does.

use std::fs::OpenOptions;
use std::io::{LineWriter, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use nbdkit_backend::{
    Backend, ConfigError, Extents, FilterSpec, Handle, Layer, Param, Result, ZeroFlags,
};

/// The open log file, shared by every connection.
struct LogFile {
    out: Mutex<LineWriter<std::fs::File>>,
    next_conn: AtomicU64,
}

impl LogFile {
    fn line(&self, conn: u64, text: std::fmt::Arguments<'_>) {
        let now = humantime::format_rfc3339_micros(SystemTime::now());
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        // A full disk must not fail the client's request: logging is best effort.
        let _ = writeln!(out, "{now} connection={conn} {text}");
    }
}

struct LogLayer {
    file: Arc<LogFile>,
}

impl Layer for LogLayer {
    fn layer(
        self: Box<Self>,
        next: Arc<dyn Backend>,
    ) -> std::result::Result<Arc<dyn Backend>, ConfigError> {
        Ok(Arc::new(LogBackend {
            next,
            file: self.file,
        }))
    }
}

struct LogBackend {
    next: Arc<dyn Backend>,
    file: Arc<LogFile>,
}

impl Backend for LogBackend {
    fn name(&self) -> &str {
        "log"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        let conn = self.file.next_conn.fetch_add(1, Ordering::Relaxed);
        let r = self.next.open(readonly, export);
        match &r {
            Ok(h) => {
                let size = h
                    .size()
                    .map(|s| s.to_string())
                    .unwrap_or_else(|e| format!("error: {e}"));
                self.file.line(
                    conn,
                    format_args!(
                        "Connect export=\"{export}\" readonly={} size={size}",
                        readonly as u8
                    ),
                );
            }
            Err(e) => self.file.line(
                conn,
                format_args!("Connect export=\"{export}\" return=error: {e}"),
            ),
        }
        let next = r?;
        Ok(Box::new(LogHandle {
            next,
            file: self.file.clone(),
            conn,
            next_id: AtomicU64::new(1),
        }))
    }
}

struct LogHandle {
    next: Box<dyn Handle>,
    file: Arc<LogFile>,
    conn: u64,
    next_id: AtomicU64,
}

impl LogHandle {
    /// Run `f` and log `what` with its result and duration.
    fn logged<T>(&self, what: std::fmt::Arguments<'_>, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let start = Instant::now();
        let r = f();
        let us = start.elapsed().as_micros();
        match &r {
            Ok(_) => self.file.line(
                self.conn,
                format_args!("{what} id={id} return=0 time={us}us"),
            ),
            Err(e) => self.file.line(
                self.conn,
                format_args!(
                    "{what} id={id} return=error({}) \"{e}\" time={us}us",
                    e.kind().nbd_error()
                ),
            ),
        }
        r
    }
}

impl Drop for LogHandle {
    fn drop(&mut self) {
        self.file.line(
            self.conn,
            format_args!(
                "Disconnect requests={}",
                self.next_id.load(Ordering::Relaxed) - 1
            ),
        );
    }
}

impl Handle for LogHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let n = buf.len();
        self.logged(
            format_args!("Read offset=0x{offset:x} count=0x{n:x}"),
            || self.next.pread(buf, offset),
        )
    }
    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.logged(
            format_args!(
                "Write offset=0x{offset:x} count=0x{:x} fua={}",
                buf.len(),
                fua as u8
            ),
            || self.next.pwrite(buf, offset, fua),
        )
    }
    fn flush(&self) -> Result<()> {
        self.logged(format_args!("Flush"), || self.next.flush())
    }
    fn trim(&self, offset: u64, count: u64, fua: bool) -> Result<()> {
        self.logged(
            format_args!(
                "Trim offset=0x{offset:x} count=0x{count:x} fua={}",
                fua as u8
            ),
            || self.next.trim(offset, count, fua),
        )
    }
    fn zero(&self, offset: u64, count: u64, flags: ZeroFlags) -> Result<()> {
        self.logged(
            format_args!(
                "Zero offset=0x{offset:x} count=0x{count:x} trim={} fua={} fast={}",
                flags.may_trim as u8, flags.fua as u8, flags.fast as u8
            ),
            || self.next.zero(offset, count, flags),
        )
    }
    fn extents(&self, offset: u64, count: u64, req_one: bool, extents: &mut Extents) -> Result<()> {
        self.logged(
            format_args!(
                "Extents offset=0x{offset:x} count=0x{count:x} req_one={}",
                req_one as u8
            ),
            || self.next.extents(offset, count, req_one, extents),
        )
    }
    fn cache(&self, offset: u64, count: u64) -> Result<()> {
        self.logged(
            format_args!("Cache offset=0x{offset:x} count=0x{count:x}"),
            || self.next.cache(offset, count),
        )
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "log",
    summary: "log every request (connection, id, offset, count, result) to a file",
    description: "Example:\n  nbdkit-rs --filter=log file disk.img logfile=access.log",
    params: &[
        Param {
            name: "logfile",
            help: "file to write the log to (required)",
        },
        Param {
            name: "logappend",
            help: "true to append to the file instead of truncating it",
        },
    ],
    configure: |cfg| {
        let path = cfg.require("logfile", "log filter")?;
        let append = cfg.take_bool("logappend")?.unwrap_or(false);
        let mut oo = OpenOptions::new();
        oo.create(true);
        if append {
            oo.append(true);
        } else {
            oo.write(true).truncate(true);
        }
        let f = oo
            .open(&path)
            .map_err(|e| ConfigError::new(format!("log filter: logfile={path}: {e}")))?;
        Ok(Box::new(LogLayer {
            file: Arc::new(LogFile {
                out: Mutex::new(LineWriter::new(f)),
                next_conn: AtomicU64::new(1),
            }),
        }))
    },
};

#[cfg(test)]
mod tests {
    use super::*;
    use nbdkit_backend::Config;

    #[test]
    fn logs_each_request_with_its_result() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let mut cfg = Config::new(vec![("logfile".into(), log.display().to_string())]);
        let layer = (SPEC.configure)(&mut cfg).unwrap();
        let mut pcfg = Config::new(vec![("size".into(), "1M".into())]);
        let plugin = (nbdkit_plugins::memory::SPEC.create)(&mut pcfg).unwrap();
        let b = layer.layer(plugin).unwrap();
        let h = b.open(false, "").unwrap();
        h.pwrite(b"abc", 512, true).unwrap();
        let mut buf = [0u8; 3];
        h.pread(&mut buf, 512).unwrap();
        assert_eq!(&buf, b"abc");
        assert!(h.can_write().unwrap(), "capabilities pass through");
        drop(h);
        let text = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].contains("connection=1 Connect"));
        assert!(lines[1].contains("Write offset=0x200 count=0x3 fua=1 id=1 return=0"));
        assert!(lines[2].contains("Read offset=0x200 count=0x3 id=2 return=0"));
        assert!(lines[3].contains("Disconnect requests=2"));
    }
}
