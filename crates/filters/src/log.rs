//! `log`: write one line per request (connection, id, offset, count,
//! result, time taken) to a file, plus a line for each connect and
//! disconnect, and/or run a script for each of them (`logscript=`).
//! Useful to see what a client really does, or to react to it.

use std::fs::OpenOptions;
use std::io::{LineWriter, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use nbdkit_backend::{
    Backend, Client, ConfigError, Error, Extents, FilterSpec, Handle, Layer, Param, Result,
    ZeroFlags,
};

/// One logged action: its name and its parameters, in order.
struct Entry {
    act: &'static str,
    fields: Vec<(&'static str, String)>,
}

impl Entry {
    fn new(act: &'static str) -> Entry {
        Entry {
            act,
            fields: Vec::new(),
        }
    }
    fn hex(mut self, key: &'static str, v: u64) -> Entry {
        self.fields.push((key, format!("0x{v:x}")));
        self
    }
    fn flag(mut self, key: &'static str, v: bool) -> Entry {
        self.fields.push((key, (v as u8).to_string()));
        self
    }
    fn text(mut self, key: &'static str, v: String) -> Entry {
        self.fields.push((key, v));
        self
    }
}

impl std::fmt::Display for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.act)?;
        for (k, v) in &self.fields {
            write!(f, " {k}={v}")?;
        }
        Ok(())
    }
}

/// Where log entries go: a file, a script, or both.  Shared by every
/// connection.
struct Sink {
    file: Option<Mutex<LineWriter<std::fs::File>>>,
    script: Option<String>,
    /// One script at a time, so their output does not interleave and
    /// they see entries in order, as nbdkit runs them.
    script_lock: Mutex<()>,
    next_conn: AtomicU64,
}

/// The message kinds a log script sees in `$type`.
#[derive(Clone, Copy)]
enum Kind {
    Enter,
    Leave,
    Print,
}

impl Sink {
    fn line(&self, conn: u64, text: std::fmt::Arguments<'_>) {
        if let Some(file) = &self.file {
            let now = humantime::format_rfc3339_micros(SystemTime::now());
            let mut out = file.lock().unwrap_or_else(|e| e.into_inner());
            // A full disk must not fail the client's request: logging is
            // best effort.
            let _ = writeln!(out, "{now} connection={conn} {text}");
        }
    }

    /// Run the log script for one message, with the entry's parameters as
    /// shell variables ($act, $type, $connection, $id, $offset, …).  Its
    /// exit status is ignored: a log script cannot change a request.
    fn script(&self, kind: Kind, conn: u64, id: Option<u64>, e: &Entry, extra: &[(&str, String)]) {
        let Some(script) = &self.script else { return };
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .env("act", e.act)
            .env(
                "type",
                match kind {
                    Kind::Enter => "ENTER",
                    Kind::Leave => "LEAVE",
                    Kind::Print => "PRINT",
                },
            )
            .env("connection", conn.to_string());
        if let Some(id) = id {
            cmd.env("id", id.to_string());
        }
        for (k, v) in e
            .fields
            .iter()
            .map(|(k, v)| (*k, v))
            .chain(extra.iter().map(|(k, v)| (*k, v)))
        {
            cmd.env(k, v);
        }
        let _g = self.script_lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(err) = cmd.status() {
            tracing::warn!("log filter: cannot run logscript: {err}");
        }
    }

    fn print(&self, conn: u64, e: Entry) {
        self.line(conn, format_args!("{e}"));
        self.script(Kind::Print, conn, None, &e, &[]);
    }
}

struct LogLayer {
    sink: Arc<Sink>,
}

impl Layer for LogLayer {
    fn layer(
        self: Box<Self>,
        next: Arc<dyn Backend>,
    ) -> std::result::Result<Arc<dyn Backend>, ConfigError> {
        Ok(Arc::new(LogBackend {
            next,
            sink: self.sink,
        }))
    }
}

struct LogBackend {
    next: Arc<dyn Backend>,
    sink: Arc<Sink>,
}

impl Backend for LogBackend {
    fn name(&self) -> &str {
        "log"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        // The server's connection number, so log lines match its own.
        let conn = Client::current()
            .map(|c| c.id())
            .unwrap_or_else(|| self.sink.next_conn.fetch_add(1, Ordering::Relaxed));
        let r = self.next.open(readonly, export);
        let entry = Entry::new("Connect").text("export", format!("\"{export}\""));
        match &r {
            Ok(h) => {
                let size = h
                    .size()
                    .map(|s| s.to_string())
                    .unwrap_or_else(|e| format!("error: {e}"));
                self.sink
                    .print(conn, entry.flag("readonly", readonly).text("size", size));
            }
            Err(e) => self
                .sink
                .print(conn, entry.text("return", format!("error: {e}"))),
        }
        let next = r?;
        Ok(Box::new(LogHandle {
            next,
            sink: self.sink.clone(),
            conn,
            next_id: AtomicU64::new(1),
        }))
    }
}

struct LogHandle {
    next: Box<dyn Handle>,
    sink: Arc<Sink>,
    conn: u64,
    next_id: AtomicU64,
}

impl LogHandle {
    /// Run `f` and log `entry` with its result and duration.
    fn logged<T>(&self, entry: Entry, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.sink
            .script(Kind::Enter, self.conn, Some(id), &entry, &[]);
        let start = Instant::now();
        let r = f();
        let us = start.elapsed().as_micros();
        match &r {
            Ok(_) => {
                self.sink.line(
                    self.conn,
                    format_args!("{entry} id={id} return=0 time={us}us"),
                );
                self.sink.script(
                    Kind::Leave,
                    self.conn,
                    Some(id),
                    &entry,
                    &[("return", "0".into())],
                );
            }
            Err(e) => {
                self.sink.line(
                    self.conn,
                    format_args!(
                        "{entry} id={id} return=error({}) \"{e}\" time={us}us",
                        e.kind().nbd_error()
                    ),
                );
                self.sink.script(
                    Kind::Leave,
                    self.conn,
                    Some(id),
                    &entry,
                    &[("return", "-1".into()), ("error", errno_name(e).into())],
                );
            }
        }
        r
    }
}

/// The errno name of an error, as log scripts see it in `$error`.
fn errno_name(e: &Error) -> &'static str {
    use nbdkit_backend::ErrorKind::*;
    match e.kind() {
        PermissionDenied => "EPERM",
        ReadOnly => "EROFS",
        Io => "EIO",
        OutOfMemory => "ENOMEM",
        InvalidInput => "EINVAL",
        NoSpace => "ENOSPC",
        Overflow => "EOVERFLOW",
        NotSupported => "ENOTSUP",
        Shutdown => "ESHUTDOWN",
        #[allow(unreachable_patterns)]
        _ => "EIO",
    }
}

impl Drop for LogHandle {
    fn drop(&mut self) {
        let requests = self.next_id.load(Ordering::Relaxed) - 1;
        self.sink.print(
            self.conn,
            Entry::new("Disconnect").text("requests", requests.to_string()),
        );
    }
}

impl Handle for LogHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let n = buf.len() as u64;
        self.logged(
            Entry::new("Read").hex("offset", offset).hex("count", n),
            || self.next.pread(buf, offset),
        )
    }
    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.logged(
            Entry::new("Write")
                .hex("offset", offset)
                .hex("count", buf.len() as u64)
                .flag("fua", fua),
            || self.next.pwrite(buf, offset, fua),
        )
    }
    fn flush(&self) -> Result<()> {
        self.logged(Entry::new("Flush"), || self.next.flush())
    }
    fn trim(&self, offset: u64, count: u64, fua: bool) -> Result<()> {
        self.logged(
            Entry::new("Trim")
                .hex("offset", offset)
                .hex("count", count)
                .flag("fua", fua),
            || self.next.trim(offset, count, fua),
        )
    }
    fn zero(&self, offset: u64, count: u64, flags: ZeroFlags) -> Result<()> {
        self.logged(
            Entry::new("Zero")
                .hex("offset", offset)
                .hex("count", count)
                .flag("trim", flags.may_trim)
                .flag("fua", flags.fua)
                .flag("fast", flags.fast),
            || self.next.zero(offset, count, flags),
        )
    }
    fn extents(&self, offset: u64, count: u64, req_one: bool, extents: &mut Extents) -> Result<()> {
        self.logged(
            Entry::new("Extents")
                .hex("offset", offset)
                .hex("count", count)
                .flag("req_one", req_one),
            || self.next.extents(offset, count, req_one, extents),
        )
    }
    fn cache(&self, offset: u64, count: u64) -> Result<()> {
        self.logged(
            Entry::new("Cache")
                .hex("offset", offset)
                .hex("count", count),
            || self.next.cache(offset, count),
        )
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "log",
    summary: "log every request (connection, id, offset, count, result) to a file or a script",
    description: "logfile=, logscript= or both.  The script runs with /bin/sh for every\n\
request (twice: $type=ENTER before, LEAVE after, with $return and $error) and\n\
for connects and disconnects ($type=PRINT); $act, $connection, $id and the\n\
request's parameters ($offset, $count, $fua, …) are set.\n\n\
Examples:\n  nbdkit-rs --filter=log file disk.img logfile=access.log\n  \
nbdkit-rs --filter=log memory 1G logscript='[ $act = Write ] && echo write at $offset >&2'",
    params: &[
        Param {
            name: "logfile",
            help: "file to write the log to",
        },
        Param {
            name: "logappend",
            help: "true to append to the file instead of truncating it",
        },
        Param {
            name: "logscript",
            help: "shell script run for every log entry",
        },
    ],
    configure: |cfg| {
        let path = cfg.take("logfile");
        let script = cfg.take("logscript");
        let append = cfg.take_bool("logappend")?.unwrap_or(false);
        if path.is_none() && script.is_none() {
            return Err(ConfigError::new(
                "log filter: give logfile=, logscript=, or both",
            ));
        }
        let file = match path {
            None => None,
            Some(path) => {
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
                Some(Mutex::new(LineWriter::new(f)))
            }
        };
        Ok(Box::new(LogLayer {
            sink: Arc::new(Sink {
                file,
                script,
                script_lock: Mutex::new(()),
                next_conn: AtomicU64::new(1),
            }),
        }))
    },
};

#[cfg(test)]
mod tests {
    use super::*;
    use nbdkit_backend::Config;

    fn layered(params: Vec<(String, String)>) -> Arc<dyn Backend> {
        layered_over(&nbdkit_plugins::memory::SPEC, params)
    }

    fn layered_over(
        plugin: &nbdkit_backend::PluginSpec,
        params: Vec<(String, String)>,
    ) -> Arc<dyn Backend> {
        let mut cfg = Config::new(params);
        let layer = (SPEC.configure)(&mut cfg).unwrap();
        let mut pcfg = Config::new(vec![("size".into(), "1M".into())]);
        let plugin = (plugin.create)(&mut pcfg).unwrap();
        layer.layer(plugin).unwrap()
    }

    #[test]
    fn logs_each_request_with_its_result() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let b = layered(vec![("logfile".into(), log.display().to_string())]);
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

    #[test]
    fn logscript_sees_enter_leave_and_print_with_variables() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = format!(
            "echo \"$type $act conn=$connection id=$id off=$offset count=$count ret=$return err=$error\" >> {}",
            out.display()
        );
        // The full plugin: every write fails with ENOSPC.
        let b = layered_over(
            &nbdkit_plugins::simple::FULL,
            vec![("logscript".into(), script)],
        );
        let h = b.open(false, "").unwrap();
        let mut buf = [0u8; 4];
        h.pread(&mut buf, 4096).unwrap();
        let e = h.pwrite(b"abcd", 0, false).unwrap_err();
        assert_eq!(errno_name(&e), "ENOSPC");
        drop(h);
        let text = std::fs::read_to_string(&out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 6, "{text}");
        assert!(lines[0].starts_with("PRINT Connect conn=1"), "{text}");
        assert_eq!(
            lines[1],
            "ENTER Read conn=1 id=1 off=0x1000 count=0x4 ret= err="
        );
        assert_eq!(
            lines[2],
            "LEAVE Read conn=1 id=1 off=0x1000 count=0x4 ret=0 err="
        );
        assert_eq!(
            lines[3],
            "ENTER Write conn=1 id=2 off=0x0 count=0x4 ret= err="
        );
        assert_eq!(
            lines[4],
            "LEAVE Write conn=1 id=2 off=0x0 count=0x4 ret=-1 err=ENOSPC"
        );
        assert!(lines[5].starts_with("PRINT Disconnect"), "{text}");
    }

    #[test]
    fn needs_a_file_or_a_script() {
        let mut cfg = Config::new(vec![]);
        let e = (SPEC.configure)(&mut cfg).err().unwrap();
        assert!(e.to_string().contains("logscript"), "{e}");
    }
}
