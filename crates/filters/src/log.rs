//! `log`: record every request a client makes, in nbdkit's log format, to
//! a file (`logfile=`), to a shell script run for each entry
//! (`logscript=`), or both.  With neither the filter passes everything
//! through untouched.
//!
//! The file format is nbdkit's, field for field, so existing log parsers
//! keep working:
//!
//! ```text
//! 2020-08-06 02:07:23.080415 ListExports id=1 readonly=0 tls=0 ...
//! 2020-08-06 02:07:23.080502 ...ListExports id=1 exports=("") return=0
//! 2020-08-06 02:07:23.080712 connection=1 Connect export="" tls=0 size=0x400 minsize=0x0 ...
//! 2020-08-06 02:07:23.080907 connection=1 Read id=1 offset=0x0 count=0x200 ...
//! 2020-08-06 02:07:23.080927 connection=1 ...Read id=1 return=0
//! 2020-08-06 02:07:23.081255 connection=1 Disconnect transactions=1
//! ```
//!
//! A script gets the same fields as shell variables (`$act`, `$type`
//! ENTER/LEAVE/PRINT, `$connection`, `$id`, `$offset`, …; `$extents` is a
//! bash array), assigned before the script's text and run, as nbdkit does,
//! by bash invoked as `sh` (`/bin/sh` where there is no bash).

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use nbdkit_backend::LockExt;
use nbdkit_backend::{
    layer_fn, Backend, CacheMode, Client, ConfigError, Error, ErrorKind, ExportEntry, Extents,
    FilterSpec, FuaMode, Handle, Param, Result, ThreadModel, ZeroFlags, ZeroMode, EXTENT_HOLE,
    EXTENT_ZERO,
};

/// The three kinds of log message.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Type {
    /// A call starts (file lines end in ` ...`).
    Enter,
    /// It returned (file lines start the action with `...`).
    Leave,
    /// A single event (Ready, Connect, Disconnect).
    Print,
}

/// Where log entries go: a file, a script, both or neither.  Shared by
/// every connection.
struct Sink {
    file: Option<Mutex<std::fs::File>>,
    script: Option<String>,
    /// Connections opened through this filter (nbdkit numbers them itself,
    /// from 1, in the order they open).
    connections: AtomicU64,
    list_id: AtomicU64,
    preconnect_id: AtomicU64,
    /// The process that read the configuration: a different one after
    /// `after_fork` means the server forked to the background.
    pid: u32,
}

/// `YYYY-MM-DD HH:MM:SS.uuuuuu`, in UTC.
fn timestamp() -> String {
    let s = humantime::format_rfc3339_micros(SystemTime::now()).to_string();
    s.trim_end_matches('Z').replacen('T', " ", 1)
}

/// A string as nbdkit's log writes it: bare when every character is safe
/// for the shell, otherwise in double quotes with `$`, `` ` ``, `\` and `"`
/// escaped.
fn shell_quote(s: &str) -> String {
    const SAFE: &str = ".-_=,:/";
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || SAFE.contains(c))
    {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if matches!(c, '$' | '`' | '\\' | '"') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

impl Sink {
    fn emit(&self, conn: Option<u64>, id: u64, act: &str, ty: Type, fields: &str) {
        if let Some(file) = &self.file {
            let mut line = timestamp();
            if let Some(c) = conn {
                line.push_str(&format!(" connection={c}"));
            }
            line.push(' ');
            if ty == Type::Leave {
                line.push_str("...");
            }
            line.push_str(act);
            if id != 0 {
                line.push_str(&format!(" id={id}"));
            }
            if !fields.is_empty() {
                line.push(' ');
                line.push_str(fields);
            }
            if ty == Type::Enter {
                line.push_str(" ...");
            }
            line.push('\n');
            let mut out = file.lock_unpoisoned();
            // Logging is best effort: a full disk must not fail the
            // client's request.
            let _ = out.write_all(line.as_bytes());
        }
        if let Some(script) = &self.script {
            let mut text = format!("act={act}\n");
            if let Some(c) = conn {
                text.push_str(&format!("connection={c}\n"));
            }
            text.push_str(match ty {
                Type::Enter => "type=ENTER\n",
                Type::Leave => "type=LEAVE\n",
                Type::Print => "type=PRINT\n",
            });
            if id != 0 {
                text.push_str(&format!("id={id}\n"));
            }
            text.push_str(fields);
            text.push('\n');
            text.push_str(script);
            // nbdkit runs log scripts with bash (as "sh"), so scripts may
            // use bash arrays ($extents); plain sh where there is no bash.
            let mut cmd = if std::path::Path::new("/bin/bash").exists() {
                let mut c = Command::new("/bin/bash");
                c.arg0("sh");
                c
            } else {
                Command::new("/bin/sh")
            };
            // The script's exit status is reported but ignored: a log
            // script cannot change a request.
            match cmd.arg("-c").arg(&text).stdin(Stdio::null()).status() {
                Ok(st) if !st.success() => {
                    tracing::warn!("log filter: logscript failed: {st}")
                }
                Ok(_) => {}
                Err(err) => tracing::warn!("log filter: cannot run logscript: {err}"),
            }
        }
    }

    fn active(&self) -> bool {
        self.file.is_some() || self.script.is_some()
    }
}

/// `return=0`, or `return=-1 error=EIO` with the errno the client gets.
fn result_fields<T>(r: &Result<T>) -> String {
    match r {
        Ok(_) => "return=0".into(),
        Err(e) => format!("return=-1 error={}", errno_name(e)),
    }
}

/// The errno name nbdkit's log writes for an error: the value the NBD
/// protocol sends (EROFS goes out as EPERM).
fn errno_name(e: &Error) -> &'static str {
    match e.kind() {
        ErrorKind::PermissionDenied | ErrorKind::ReadOnly => "EPERM",
        ErrorKind::Io => "EIO",
        ErrorKind::OutOfMemory => "ENOMEM",
        ErrorKind::NoSpace => "ENOSPC",
        ErrorKind::Shutdown => "ESHUTDOWN",
        ErrorKind::NotSupported => "ENOTSUP",
        ErrorKind::Overflow => "EOVERFLOW",
        ErrorKind::InvalidInput => "EINVAL",
    }
}

fn thread_model_number(m: ThreadModel) -> u8 {
    match m {
        ThreadModel::SerializeConnections => 0,
        ThreadModel::SerializeAllRequests => 1,
        ThreadModel::SerializeRequests => 2,
        ThreadModel::Parallel => 3,
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
    fn after_fork(&self) -> Result<()> {
        self.next.after_fork()?;
        let model = thread_model_number(self.thread_model());
        self.sink.emit(
            None,
            0,
            "Ready",
            Type::Print,
            &format!("thread_model={model}"),
        );
        if std::process::id() != self.sink.pid {
            self.sink.emit(None, 0, "Fork", Type::Print, "");
        }
        Ok(())
    }
    fn list_exports(&self, readonly: bool) -> Result<Vec<ExportEntry>> {
        if !self.sink.active() {
            return self.next.list_exports(readonly);
        }
        let id = self.sink.list_id.fetch_add(1, Ordering::Relaxed) + 1;
        let tls = Client::current().is_some_and(|c| c.is_tls());
        self.sink.emit(
            None,
            id,
            "ListExports",
            Type::Enter,
            &format!("readonly={} tls={}", readonly as u8, tls as u8),
        );
        let r = self.next.list_exports(readonly);
        let fields = match &r {
            Ok(list) => {
                let names: Vec<String> = list.iter().map(|e| shell_quote(&e.name)).collect();
                format!("exports=({}) return=0", names.join(" "))
            }
            Err(_) => result_fields(&r),
        };
        self.sink
            .emit(None, id, "ListExports", Type::Leave, &fields);
        r
    }
    fn preconnect(&self, client: &Client) -> Result<()> {
        if !self.sink.active() {
            return self.next.preconnect(client);
        }
        let id = self.sink.preconnect_id.fetch_add(1, Ordering::Relaxed) + 1;
        self.sink.emit(
            None,
            id,
            "Preconnect",
            Type::Enter,
            &format!("readonly={}", client.readonly() as u8),
        );
        let r = self.next.preconnect(client);
        self.sink
            .emit(None, id, "Preconnect", Type::Leave, &result_fields(&r));
        r
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        let next = self.next.open(readonly, export)?;
        if !self.sink.active() {
            return Ok(next);
        }
        // What nbdkit prints when the connection is ready: the export and
        // every capability the layers below report.
        let tls = Client::current().is_some_and(|c| c.is_tls());
        let size = next.size()?;
        let (minsize, prefsize, maxsize) = match next.block_size()? {
            Some(b) => (b.minimum, b.preferred, b.maximum),
            None => (0, 0, 0),
        };
        let mode3 = |none: bool, native: bool| {
            if none {
                0
            } else if native {
                2
            } else {
                1
            }
        };
        let zero = next.can_zero()?;
        let fua = next.can_fua()?;
        let cache = next.can_cache()?;
        let fields = format!(
            "export={} tls={} size=0x{size:x} minsize=0x{minsize:x} prefsize=0x{prefsize:x} \
             maxsize=0x{maxsize:x} write={} flush={} rotational={} trim={} zero={} fua={} \
             extents={} cache={} fast_zero={}",
            shell_quote(export),
            tls as u8,
            next.can_write()? as u8,
            next.can_flush()? as u8,
            next.is_rotational()? as u8,
            next.can_trim()? as u8,
            mode3(zero == ZeroMode::None, zero == ZeroMode::Native),
            mode3(fua == FuaMode::None, fua == FuaMode::Native),
            next.can_extents()? as u8,
            mode3(cache == CacheMode::None, cache == CacheMode::Native),
            next.can_fast_zero()? as u8,
        );
        let conn = self.sink.connections.fetch_add(1, Ordering::Relaxed) + 1;
        self.sink
            .emit(Some(conn), 0, "Connect", Type::Print, &fields);
        Ok(Box::new(LogHandle {
            next,
            sink: self.sink.clone(),
            conn,
            ids: AtomicU64::new(0),
        }))
    }
}

struct LogHandle {
    next: Box<dyn Handle>,
    sink: Arc<Sink>,
    conn: u64,
    /// The last transaction id given out on this connection.
    ids: AtomicU64,
}

impl LogHandle {
    /// Log the call (`act` with `fields`), run `f`, log its result.
    fn logged<T>(&self, act: &str, fields: String, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let id = self.ids.fetch_add(1, Ordering::Relaxed) + 1;
        self.sink
            .emit(Some(self.conn), id, act, Type::Enter, &fields);
        let r = f();
        self.sink
            .emit(Some(self.conn), id, act, Type::Leave, &result_fields(&r));
        r
    }
}

impl Drop for LogHandle {
    fn drop(&mut self) {
        let n = self.ids.load(Ordering::Relaxed);
        self.sink.emit(
            Some(self.conn),
            0,
            "Disconnect",
            Type::Print,
            &format!("transactions={n}"),
        );
    }
}

impl Handle for LogHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let fields = format!("offset=0x{offset:x} count=0x{:x}", buf.len());
        self.logged("Read", fields, || self.next.pread(buf, offset))
    }
    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        let fields = format!(
            "offset=0x{offset:x} count=0x{:x} fua={}",
            buf.len(),
            fua as u8
        );
        self.logged("Write", fields, || self.next.pwrite(buf, offset, fua))
    }
    fn flush(&self) -> Result<()> {
        self.logged("Flush", String::new(), || self.next.flush())
    }
    fn trim(&self, offset: u64, count: u64, fua: bool) -> Result<()> {
        let fields = format!("offset=0x{offset:x} count=0x{count:x} fua={}", fua as u8);
        self.logged("Trim", fields, || self.next.trim(offset, count, fua))
    }
    fn zero(&self, offset: u64, count: u64, flags: ZeroFlags) -> Result<()> {
        let fields = format!(
            "offset=0x{offset:x} count=0x{count:x} trim={} fua={} fast={}",
            flags.may_trim as u8, flags.fua as u8, flags.fast as u8
        );
        self.logged("Zero", fields, || self.next.zero(offset, count, flags))
    }
    fn extents(&self, offset: u64, count: u64, req_one: bool, extents: &mut Extents) -> Result<()> {
        let id = self.ids.fetch_add(1, Ordering::Relaxed) + 1;
        let fields = format!(
            "offset=0x{offset:x} count=0x{count:x} req_one={}",
            req_one as u8
        );
        self.sink
            .emit(Some(self.conn), id, "Extents", Type::Enter, &fields);
        let r = self.next.extents(offset, count, req_one, extents);
        let fields = match &r {
            Ok(()) => {
                let list: Vec<String> = extents
                    .list()
                    .iter()
                    .map(|e| {
                        let mut kind = Vec::new();
                        if e.flags & EXTENT_HOLE != 0 {
                            kind.push("hole");
                        }
                        if e.flags & EXTENT_ZERO != 0 {
                            kind.push("zero");
                        }
                        format!("0x{:x} 0x{:x} \"{}\"", e.offset, e.length, kind.join(","))
                    })
                    .collect();
                format!("extents=({}) return=0", list.join(" "))
            }
            Err(_) => result_fields(&r),
        };
        self.sink
            .emit(Some(self.conn), id, "Extents", Type::Leave, &fields);
        r
    }
    fn cache(&self, offset: u64, count: u64) -> Result<()> {
        let fields = format!("offset=0x{offset:x} count=0x{count:x}");
        self.logged("Cache", fields, || self.next.cache(offset, count))
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "log",
    summary: "log every request (connection, id, offset, count, result) to a file or a script",
    description: "logfile=, logscript=, both, or neither (then the filter does nothing).\n\
The file has nbdkit's log format: a UTC timestamp, connection=N for\n\
connected calls, the action, id=N, its fields; a call is two lines, the\n\
second starting \"...\" with return=0 or return=-1 error=ERRNO.  The script\n\
runs with bash (as sh) for every entry, with $act, $type (ENTER, LEAVE, PRINT),\n\
$connection, $id, $return, $error and the entry's fields ($offset, $count,\n\
$fua, …) set as shell variables.\n\n\
Examples:\n  nbdkit-rs --filter=log file disk.img logfile=access.log\n  \
nbdkit-rs --filter=log memory 1G logscript='[ $act = Write ] && echo write at $offset >&2'",
    params: &[
        Param {
            name: "logfile",
            help: "file to write the log to",
        },
        Param {
            name: "logappend",
            help: "true to append to the file instead of truncating it (default false)",
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
                Some(Mutex::new(f))
            }
        };
        let sink = Arc::new(Sink {
            file,
            script,
            connections: AtomicU64::new(0),
            list_id: AtomicU64::new(0),
            preconnect_id: AtomicU64::new(0),
            pid: std::process::id(),
        });
        Ok(layer_fn(move |next| {
            Ok(Arc::new(LogBackend { next, sink }))
        }))
    },
};

#[cfg(test)]
mod tests {
    use super::*;
    use nbdkit_backend::Config;

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

    /// The lines without their timestamps.
    fn lines(text: &str) -> Vec<String> {
        text.lines()
            .map(|l| {
                let (date, rest) = l.split_once(' ').unwrap();
                assert_eq!(date.len(), 10, "{l}");
                let (time, rest) = rest.split_once(' ').unwrap();
                assert_eq!(time.len(), 15, "{l}");
                rest.to_string()
            })
            .collect()
    }

    #[test]
    fn logs_each_request_in_nbdkits_format() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let b = layered_over(
            &nbdkit_plugins::memory::SPEC,
            vec![("logfile".into(), log.display().to_string())],
        );
        let h = b.open(false, "").unwrap();
        h.pwrite(b"abc", 512, true).unwrap();
        let mut buf = [0u8; 3];
        h.pread(&mut buf, 512).unwrap();
        assert_eq!(&buf, b"abc");
        h.flush().unwrap();
        drop(h);
        let got = lines(&std::fs::read_to_string(&log).unwrap());
        assert!(
            got[0].starts_with("connection=1 Connect export=\"\" tls=0 size=0x100000 "),
            "{got:?}"
        );
        assert_eq!(
            &got[1..],
            [
                "connection=1 Write id=1 offset=0x200 count=0x3 fua=1 ...",
                "connection=1 ...Write id=1 return=0",
                "connection=1 Read id=2 offset=0x200 count=0x3 ...",
                "connection=1 ...Read id=2 return=0",
                "connection=1 Flush id=3 ...",
                "connection=1 ...Flush id=3 return=0",
                "connection=1 Disconnect transactions=3",
            ]
        );
    }

    #[test]
    fn logscript_gets_the_fields_as_shell_variables() {
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
        h.pwrite(b"abcd", 0, false).unwrap_err();
        drop(h);
        let text = std::fs::read_to_string(&out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "PRINT Connect conn=1 id= off= count= ret= err=",
                "ENTER Read conn=1 id=1 off=0x1000 count=0x4 ret= err=",
                "LEAVE Read conn=1 id=1 off= count= ret=0 err=",
                "ENTER Write conn=1 id=2 off=0x0 count=0x4 ret= err=",
                "LEAVE Write conn=1 id=2 off= count= ret=-1 err=ENOSPC",
                "PRINT Disconnect conn=1 id= off= count= ret= err=",
            ],
            "{text}"
        );
    }

    #[test]
    fn strings_are_shell_quoted_only_when_needed() {
        assert_eq!(shell_quote("disk-1.img"), "disk-1.img");
        assert_eq!(shell_quote(""), "\"\"");
        assert_eq!(shell_quote("a b$\"c"), "\"a b\\$\\\"c\"");
    }

    #[test]
    fn neither_file_nor_script_is_a_pass_through() {
        let b = layered_over(&nbdkit_plugins::memory::SPEC, vec![]);
        let h = b.open(false, "").unwrap();
        h.pwrite(b"x", 0, false).unwrap();
    }
}
