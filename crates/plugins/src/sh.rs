//! `sh` and `eval`: plugins written as scripts, in any language.
//!
//! Why: nbdkit users have plugins written as shell scripts (or any
//! executable) against nbdkit's sh-plugin calling convention, and quick
//! one-off disks written as `eval` snippets on the command line.  These
//! two plugins run them unchanged: for each plugin method the script is
//! run as `SCRIPT METHOD ARGS...`, with data on stdin (pwrite) or stdout
//! (pread), and its exit status says what happened: 0 done, 1 (and 9–255)
//! error with an optional errno name first on stderr, 2 method missing
//! (use the default), 3 false (for `can_*` methods), and since nbdkit
//! 1.34: 4/5 shut the server down (then as 0/1), 6 drop the client at
//! once, 7/8 drop it after this reply (then as 0/1).
//!
//! `sh` runs one executable (a shell script or any program; `-` reads a
//! script from stdin); `eval` takes one `/bin/sh` snippet per method as
//! `METHOD=SCRIPT` parameters.  Both give each call `$tmpdir`, a directory
//! that lives as long as the server.  The two differ where nbdkit's do:
//! a `sh` script must answer the `can_*` methods itself (a missing
//! `can_write` means read-only), while `eval` infers them from which
//! methods were given (a `pwrite=` snippet means writable).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use nbdkit_backend::registry::ANY_KEY;
use nbdkit_backend::LockExt;
use nbdkit_backend::{
    parse_size, Backend, BlockSize, CacheMode, Config, ConfigError, Error, ErrorKind, ExportEntry,
    Extents, FuaMode, Handle, Param, PluginSpec, Result, ThreadModel, ZeroFlags, ZeroMode,
    EXTENT_HOLE, EXTENT_ZERO,
};

/// What runs for a method call.
enum Program {
    /// An executable run as `PATH METHOD ARGS...`, or (for a script read
    /// from stdin without a `#!` line) `/bin/sh PATH METHOD ARGS...`.
    Exec { path: PathBuf, via_sh: bool },
    /// One `/bin/sh` snippet per method; `missing` runs for the others.
    Eval {
        scripts: HashMap<String, String>,
        missing: Option<String>,
    },
}

/// The outcome of one call that did not fail.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Exit 0, with what the script printed.
    Done(Vec<u8>),
    /// Exit 2: the script does not implement the method.
    Missing,
    /// Exit 3: false, for the boolean methods.
    False,
}

struct Script {
    program: Program,
    tmpdir: PathBuf,
}

impl Script {
    /// Run `method` with `args`, feeding `input` on stdin.
    fn call(&self, method: &str, args: &[&str], input: Option<&[u8]>) -> Result<Outcome> {
        let mut cmd = match &self.program {
            Program::Exec { path, via_sh } => {
                let mut c = if *via_sh {
                    let mut c = Command::new("/bin/sh");
                    c.arg(path);
                    c
                } else {
                    Command::new(path)
                };
                c.arg(method);
                c
            }
            Program::Eval { scripts, missing } => {
                let Some(body) = scripts.get(method).or(missing.as_ref()) else {
                    return Ok(Outcome::Missing);
                };
                let mut c = Command::new("/bin/sh");
                // $0 is the method's name, $1 the method as for sh scripts.
                c.arg("-c").arg(body).arg(method).arg(method);
                c
            }
        };
        cmd.args(args)
            .env("tmpdir", &self.tmpdir)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::from_io(format!("{method}: cannot run the script"), e))?;
        // Feed stdin from another thread while this one collects stdout and
        // stderr, so a script that writes before it has read everything
        // cannot deadlock with us.
        let writer = match (input, child.stdin.take()) {
            (Some(data), Some(mut stdin)) => {
                let data = data.to_vec();
                Some(std::thread::spawn(move || {
                    // A script may exit without reading its input (EPIPE);
                    // its exit status tells whether that was an error.
                    let _ = stdin.write_all(&data);
                }))
            }
            _ => None,
        };
        let out = child
            .wait_with_output()
            .map_err(|e| Error::from_io(format!("{method}: waiting for the script"), e))?;
        if let Some(w) = writer {
            let _ = w.join();
        }
        match out.status.code() {
            Some(0) => Ok(Outcome::Done(out.stdout)),
            Some(2) => Ok(Outcome::Missing),
            Some(3) => Ok(Outcome::False),
            Some(code @ 4..=8) => Self::request(method, code, out.stdout, &out.stderr),
            Some(code) => Err(script_error(method, code, &out.stderr, ErrorKind::Io)),
            None => Err(Error::io(format!(
                "{method}: the script was killed ({})",
                out.status
            ))),
        }
    }

    /// Exit statuses 4 to 8 (nbdkit 1.34): the script asks the server to
    /// shut down (4 success, 5 error) or to drop this client, at once (6)
    /// or after this reply (7 success, 8 error).  The errors default to
    /// ESHUTDOWN instead of EIO.
    fn request(method: &str, code: i32, stdout: Vec<u8>, stderr: &[u8]) -> Result<Outcome> {
        let client = nbdkit_backend::Client::current();
        match code {
            4 | 5 => {
                tracing::debug!("{method}: the script asked the server to shut down");
                nbdkit_backend::request_shutdown();
            }
            6 => {
                return Err(Error::disconnect(format!(
                    "{method}: the script asked to drop this client"
                )))
            }
            _ => match &client {
                Some(c) => c.request_disconnect(),
                // Outside a connection (load, config, get_ready...) there
                // is no client to drop: as nbdkit, nothing happens.
                None => tracing::debug!("{method}: disconnect asked for outside a connection"),
            },
        }
        if code == 4 || code == 7 {
            Ok(Outcome::Done(stdout))
        } else {
            Err(script_error(method, code, stderr, ErrorKind::Shutdown))
        }
    }

    /// A method whose "false" answer (exit 3) makes no sense: `None` when
    /// it is missing.
    fn run(&self, method: &str, args: &[&str], input: Option<&[u8]>) -> Result<Option<Vec<u8>>> {
        match self.call(method, args, input)? {
            Outcome::Done(out) => Ok(Some(out)),
            Outcome::Missing => Ok(None),
            Outcome::False => Err(Error::io(format!(
                "{method}: the script exited with status 3 (false), which only can_* methods may return"
            ))),
        }
    }

    /// A boolean method: exit 0 true, 3 false, `None` when missing.
    fn boolean(&self, method: &str, args: &[&str]) -> Result<Option<bool>> {
        Ok(match self.call(method, args, None)? {
            Outcome::Done(_) => Some(true),
            Outcome::False => Some(false),
            Outcome::Missing => None,
        })
    }

    /// For `eval`: whether a snippet was given for `method`.  `sh` cannot
    /// know without running the script, so it says no (as nbdkit's does).
    fn defines(&self, method: &str) -> bool {
        match &self.program {
            Program::Exec { .. } => false,
            Program::Eval { scripts, .. } => scripts.contains_key(method),
        }
    }
}

/// Errno names a script may print first on stderr.  Hand-written because
/// libc has no name-to-number table.
const ERRNO_NAMES: &[(&str, i32)] = &[
    ("EPERM", libc::EPERM),
    ("ENOENT", libc::ENOENT),
    ("EIO", libc::EIO),
    ("EBADF", libc::EBADF),
    ("ENOMEM", libc::ENOMEM),
    ("EACCES", libc::EACCES),
    ("EBUSY", libc::EBUSY),
    ("EEXIST", libc::EEXIST),
    ("EINVAL", libc::EINVAL),
    ("EFBIG", libc::EFBIG),
    ("ENOSPC", libc::ENOSPC),
    ("EROFS", libc::EROFS),
    ("ERANGE", libc::ERANGE),
    ("ENOSYS", libc::ENOSYS),
    ("EOVERFLOW", libc::EOVERFLOW),
    ("ENOTSUP", libc::ENOTSUP),
    ("EOPNOTSUPP", libc::EOPNOTSUPP),
    ("ESHUTDOWN", libc::ESHUTDOWN),
    ("EDQUOT", libc::EDQUOT),
    ("ETIMEDOUT", libc::ETIMEDOUT),
    ("EAGAIN", libc::EAGAIN),
    ("EINTR", libc::EINTR),
];

/// The error a failed call reports: a leading errno name on stderr sets
/// the kind (else `default`), the rest is the message.
fn script_error(method: &str, code: i32, stderr: &[u8], default: ErrorKind) -> Error {
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim();
    let first = text.split_whitespace().next().unwrap_or("");
    if let Some(&(name, errno)) = ERRNO_NAMES
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(first))
    {
        let rest = text[first.len()..].trim();
        let msg = if rest.is_empty() { name } else { rest };
        return Error::new(ErrorKind::from_errno(errno), format!("{method}: {msg}"));
    }
    if text.is_empty() {
        Error::new(
            default,
            format!("{method}: the script failed (exit status {code})"),
        )
    } else {
        Error::new(default, format!("{method}: {text}"))
    }
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// Drop one trailing newline, as nbdkit does for handles and descriptions.
fn chomp(mut s: String) -> String {
    if s.ends_with('\n') {
        s.pop();
    }
    s
}

/// "true" when the connection being served runs over TLS.
fn tls_arg() -> &'static str {
    bool_arg(nbdkit_backend::Client::current().is_some_and(|c| c.is_tls()))
}

fn bool_arg(b: bool) -> &'static str {
    if b {
        "true"
    } else {
        "false"
    }
}

/// Parse the output of `list_exports`: an optional first line naming the
/// format (NAMES, INTERLEAVED, NAMES+DESCRIPTIONS), then the entries.
fn parse_export_list(out: &str) -> Vec<ExportEntry> {
    let mut lines: Vec<&str> = out.lines().collect();
    let mode = match lines.first() {
        Some(&m @ ("NAMES" | "INTERLEAVED" | "NAMES+DESCRIPTIONS")) => {
            lines.remove(0);
            m
        }
        _ => "NAMES",
    };
    let entry = |name: &str, description: Option<&str>| ExportEntry {
        name: name.to_string(),
        description: description.map(str::to_string),
    };
    match mode {
        "INTERLEAVED" => lines
            .chunks(2)
            .map(|c| entry(c[0], c.get(1).copied()))
            .collect(),
        "NAMES+DESCRIPTIONS" => {
            let half = lines.len().div_ceil(2);
            (0..half)
                .map(|i| entry(lines[i], lines.get(half + i).copied()))
                .collect()
        }
        _ => lines.iter().map(|n| entry(n, None)).collect(),
    }
}

/// Parse `offset length [type]` lines from `extents`.
fn parse_extents(out: &str) -> Result<Vec<(u64, u64, u32)>> {
    let bad = |line: &str, why: String| Error::io(format!("extents: bad line '{line}': {why}"));
    let mut v = Vec::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let mut f = line.split_whitespace();
        let (Some(o), Some(l)) = (f.next(), f.next()) else {
            return Err(bad(line, "expected 'offset length [type]'".into()));
        };
        let offset = parse_size(o).map_err(|e| bad(line, e))?;
        let length = parse_size(l).map_err(|e| bad(line, e))?;
        let flags = match f.next() {
            None => 0,
            Some(t) if t.bytes().all(|b| b.is_ascii_digit()) => {
                t.parse::<u32>().map_err(|e| bad(line, e.to_string()))? & 3
            }
            Some(t) => {
                let mut flags = 0;
                for w in t.split(',').filter(|w| !w.is_empty()) {
                    flags |= match w {
                        "hole" => EXTENT_HOLE,
                        "zero" => EXTENT_ZERO,
                        _ => return Err(bad(line, format!("unknown type '{w}'"))),
                    };
                }
                flags
            }
        };
        v.push((offset, length, flags));
    }
    Ok(v)
}

fn parse_thread_model(s: &str) -> Option<ThreadModel> {
    Some(match s.trim() {
        "serialize_connections" => ThreadModel::SerializeConnections,
        "serialize_all_requests" => ThreadModel::SerializeAllRequests,
        "serialize_requests" => ThreadModel::SerializeRequests,
        "parallel" => ThreadModel::Parallel,
        _ => return None,
    })
}

fn parse_mode(method: &str, out: &[u8]) -> Result<u8> {
    match text(out).trim() {
        "none" => Ok(0),
        "emulate" => Ok(1),
        "native" => Ok(2),
        o => Err(Error::io(format!(
            "{method}: expected none, emulate or native, got '{o}'"
        ))),
    }
}

struct ScriptBackend {
    name: &'static str,
    script: Arc<Script>,
    model: ThreadModel,
    /// Removed (with everything the script put there) at shutdown.
    tmpdir: Mutex<Option<tempfile::TempDir>>,
}

impl Backend for ScriptBackend {
    fn name(&self) -> &str {
        self.name
    }
    fn thread_model(&self) -> ThreadModel {
        self.model
    }
    fn after_fork(&self) -> Result<()> {
        self.script.run("after_fork", &[], None).map(|_| ())
    }
    fn dump_plugin(&self) -> Option<String> {
        // How scripts probe for the exit statuses above (nbdkit >= 1.34):
        // 8 is the highest with a meaning.
        let mut lines = String::from("max_known_status=8\n");
        match self.script.run("dump_plugin", &[], None) {
            Ok(out) => lines.extend(out.map(|o| String::from_utf8_lossy(&o).into_owned())),
            Err(e) => tracing::warn!("{}: {e}", self.name),
        }
        Some(lines)
    }
    fn preconnect(&self, client: &nbdkit_backend::Client) -> Result<()> {
        // An error (exit 1) refuses the client before the handshake.
        self.script
            .run("preconnect", &[bool_arg(client.readonly())], None)
            .map(|_| ())
    }
    fn list_exports(&self, readonly: bool) -> Result<Vec<ExportEntry>> {
        match self
            .script
            .run("list_exports", &[bool_arg(readonly), tls_arg()], None)?
        {
            Some(out) => Ok(parse_export_list(&text(&out))),
            // "" is the default export: the server asks default_export
            // (once per connection, as nbdkit) to name it.
            None => Ok(vec![ExportEntry {
                name: String::new(),
                description: None,
            }]),
        }
    }
    fn default_export(&self, readonly: bool) -> Result<String> {
        match self
            .script
            .run("default_export", &[bool_arg(readonly), tls_arg()], None)?
        {
            Some(out) => Ok(parse_export_list(&text(&out))
                .into_iter()
                .next()
                .map(|e| e.name)
                .unwrap_or_default()),
            None => Ok(String::new()),
        }
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        let handle =
            match self
                .script
                .run("open", &[bool_arg(readonly), export, tls_arg()], None)?
            {
                Some(out) => chomp(text(&out)),
                None => String::new(),
            };
        Ok(Box::new(ScriptHandle {
            script: self.script.clone(),
            h: handle,
            answers: Default::default(),
        }))
    }
    fn shutdown(&self) {
        if let Err(e) = self.script.run("unload", &[], None) {
            tracing::debug!("{}: unload: {e}", self.name);
        }
        drop(self.tmpdir.lock_unpoisoned().take());
    }
}

struct ScriptHandle {
    script: Arc<Script>,
    h: String,
    /// `can_*` answers: the script is asked each once per connection, as
    /// nbdkit does, also when one answer implies another (`can_zero`
    /// falls back on `can_write`).
    answers: std::sync::Mutex<std::collections::HashMap<String, bool>>,
}

impl ScriptHandle {
    /// A `can_*` method; when the script lacks it, `eval` answers whether
    /// `implied` was given and `sh` answers false.
    fn can(&self, method: &str, implied: &str) -> Result<bool> {
        let answers = || self.answers.lock_unpoisoned();
        if let Some(&b) = answers().get(method) {
            return Ok(b);
        }
        let b = self
            .script
            .boolean(method, &[&self.h])?
            .unwrap_or_else(|| self.script.defines(implied));
        answers().insert(method.to_string(), b);
        Ok(b)
    }

    fn data_call(
        &self,
        method: &str,
        count: u64,
        offset: u64,
        flags: Option<&str>,
        input: Option<&[u8]>,
    ) -> Result<Option<Vec<u8>>> {
        let (c, o) = (count.to_string(), offset.to_string());
        let mut args = vec![self.h.as_str(), &c, &o];
        if let Some(f) = flags {
            args.push(f);
        }
        self.script.run(method, &args, input)
    }
}

impl Drop for ScriptHandle {
    fn drop(&mut self) {
        if let Err(e) = self.script.run("close", &[&self.h], None) {
            tracing::warn!("close: {e}");
        }
    }
}

impl Handle for ScriptHandle {
    fn size(&self) -> Result<u64> {
        let out = self
            .script
            .run("get_size", &[&self.h], None)?
            .ok_or_else(|| Error::io("get_size: the script must implement get_size"))?;
        let t = text(&out);
        parse_size(t.trim()).map_err(|e| Error::io(format!("get_size: '{}': {e}", t.trim())))
    }

    fn block_size(&self) -> Result<Option<BlockSize>> {
        let Some(out) = self.script.run("block_size", &[&self.h], None)? else {
            return Ok(None);
        };
        let t = text(&out);
        let sizes: Vec<u64> = t
            .split_whitespace()
            .map(parse_size)
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error::io(format!("block_size: '{}': {e}", t.trim())))?;
        let [minimum, preferred, maximum] = sizes[..] else {
            return Err(Error::io(format!(
                "block_size: expected three sizes (minimum preferred maximum), got '{}'",
                t.trim()
            )));
        };
        let fits = |v: u64| u32::try_from(v).map_err(|_| Error::io("block_size: too large"));
        Ok(Some(BlockSize {
            minimum: fits(minimum)?,
            preferred: fits(preferred)?,
            maximum: fits(maximum)?,
        }))
    }

    fn export_description(&self) -> Result<Option<String>> {
        Ok(self
            .script
            .run("export_description", &[&self.h], None)?
            .map(|o| chomp(text(&o))))
    }

    fn can_write(&self) -> Result<bool> {
        self.can("can_write", "pwrite")
    }
    fn can_flush(&self) -> Result<bool> {
        self.can("can_flush", "flush")
    }
    fn is_rotational(&self) -> Result<bool> {
        self.can("is_rotational", "")
    }
    fn can_trim(&self) -> Result<bool> {
        self.can("can_trim", "trim")
    }
    fn can_zero(&self) -> Result<ZeroMode> {
        Ok(if self.can("can_zero", "zero")? {
            ZeroMode::Native
        } else if self.can_write()? {
            ZeroMode::Emulate
        } else {
            ZeroMode::None
        })
    }
    fn can_fast_zero(&self) -> Result<bool> {
        match self.script.boolean("can_fast_zero", &[&self.h])? {
            Some(b) => Ok(b),
            None => Ok(self.can_zero()? != ZeroMode::Native),
        }
    }
    fn can_extents(&self) -> Result<bool> {
        self.can("can_extents", "extents")
    }
    fn can_fua(&self) -> Result<FuaMode> {
        match self.script.run("can_fua", &[&self.h], None)? {
            Some(out) => Ok(match parse_mode("can_fua", &out)? {
                0 => FuaMode::None,
                1 => FuaMode::Emulate,
                _ => FuaMode::Native,
            }),
            None if self.can_flush()? => Ok(FuaMode::Emulate),
            None => Ok(FuaMode::None),
        }
    }
    fn can_multi_conn(&self) -> Result<bool> {
        self.can("can_multi_conn", "")
    }
    fn can_cache(&self) -> Result<CacheMode> {
        match self.script.run("can_cache", &[&self.h], None)? {
            Some(out) => Ok(match parse_mode("can_cache", &out)? {
                0 => CacheMode::None,
                1 => CacheMode::Emulate,
                _ => CacheMode::Native,
            }),
            None if self.script.defines("cache") => Ok(CacheMode::Native),
            None => Ok(CacheMode::None),
        }
    }

    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let out = self
            .data_call("pread", buf.len() as u64, offset, None, None)?
            .ok_or_else(|| Error::io("pread: the script must implement pread"))?;
        if out.len() < buf.len() {
            return Err(Error::io(format!(
                "pread: the script printed {} bytes, {} were asked for",
                out.len(),
                buf.len()
            )));
        }
        buf.copy_from_slice(&out[..buf.len()]);
        Ok(())
    }

    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        let flags = if fua { "fua" } else { "" };
        self.data_call("pwrite", buf.len() as u64, offset, Some(flags), Some(buf))?
            .map(|_| ())
            .ok_or_else(|| Error::read_only("pwrite: the script has no pwrite method"))
    }

    fn flush(&self) -> Result<()> {
        self.script
            .run("flush", &[&self.h], None)?
            .map(|_| ())
            .ok_or_else(|| Error::not_supported("flush: the script has no flush method"))
    }

    fn trim(&self, offset: u64, count: u64, fua: bool) -> Result<()> {
        let flags = if fua { "fua" } else { "" };
        self.data_call("trim", count, offset, Some(flags), None)?
            .map(|_| ())
            .ok_or_else(|| Error::not_supported("trim: the script has no trim method"))
    }

    fn zero(&self, offset: u64, count: u64, flags: ZeroFlags) -> Result<()> {
        let words: Vec<&str> = [
            (flags.fua, "fua"),
            (flags.may_trim, "may_trim"),
            (flags.fast, "fast"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, w)| *w)
        .collect();
        // A missing zero method is ENOTSUP: the server then writes zeroes
        // (unless the client asked for a fast zero).
        self.data_call("zero", count, offset, Some(&words.join(",")), None)?
            .map(|_| ())
            .ok_or_else(|| Error::not_supported("zero: the script has no zero method"))
    }

    fn extents(&self, offset: u64, count: u64, req_one: bool, extents: &mut Extents) -> Result<()> {
        let flags = if req_one { "req_one" } else { "" };
        let Some(out) = self.data_call("extents", count, offset, Some(flags), None)? else {
            return extents.add(offset, count, 0);
        };
        let list = parse_extents(&text(&out))?;
        if list.is_empty() {
            return Err(Error::io("extents: the script printed no extents"));
        }
        for (o, l, f) in list {
            extents.add(o, l, f)?;
        }
        Ok(())
    }

    fn cache(&self, offset: u64, count: u64) -> Result<()> {
        self.data_call("cache", count, offset, None, None)
            .map(|_| ())
    }
}

fn config_err(e: Error) -> ConfigError {
    ConfigError::new(e.to_string())
}

/// What both plugins do after the program is known: `config` for each
/// parameter, `config_complete`, `thread_model`, `get_ready`.
fn configure(
    name: &'static str,
    script: Script,
    tmpdir: tempfile::TempDir,
    params: Vec<(String, String)>,
) -> Result<Arc<dyn Backend>, ConfigError> {
    for (k, v) in &params {
        match script.run("config", &[k, v], None) {
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(ConfigError::new(format!(
                    "{name}: parameter '{k}={v}' was given but the script has no config method"
                )))
            }
            Err(e) => return Err(ConfigError::new(format!("{name}: {k}={v}: {e}"))),
        }
    }
    script
        .run("config_complete", &[], None)
        .map_err(config_err)?;
    let model = match script.run("thread_model", &[], None).map_err(config_err)? {
        Some(out) => {
            let t = text(&out);
            parse_thread_model(&t).unwrap_or_else(|| {
                tracing::warn!("{name}: thread_model printed '{}'; ignored", t.trim());
                ThreadModel::SerializeAllRequests
            })
        }
        None => ThreadModel::SerializeAllRequests,
    };
    script.run("get_ready", &[], None).map_err(config_err)?;
    Ok(Arc::new(ScriptBackend {
        name,
        script: Arc::new(script),
        model,
        tmpdir: Mutex::new(Some(tmpdir)),
    }))
}

fn make_tmpdir(name: &str) -> Result<tempfile::TempDir, ConfigError> {
    tempfile::Builder::new()
        .prefix(&format!("nbdkit-rs-{name}-"))
        .tempdir()
        .map_err(|e| ConfigError::new(format!("{name}: cannot create $tmpdir: {e}")))
}

fn create_sh(cfg: &mut Config) -> Result<Arc<dyn Backend>, ConfigError> {
    // `script=` is the magic key, so every bare value arrives as `script`:
    // the first is the script, later ones go to the script's own magic key.
    let rest = cfg.take_rest();
    let Some(pos) = rest.iter().position(|(k, _)| k == "script") else {
        return Err(ConfigError::new(
            "sh: the script is required: nbdkit-rs sh /path/to/script [key=value]...",
        ));
    };
    let script_arg = rest[pos].1.clone();
    if script_arg == "-" && !nbdkit_backend::stdio_safe() {
        return Err(ConfigError::new(
            "sh: inline script is incompatible with -s (stdin carries NBD): save the script to a file",
        ));
    }
    let tmpdir = make_tmpdir("sh")?;
    let program = if script_arg == "-" {
        let mut body = Vec::new();
        std::io::stdin()
            .read_to_end(&mut body)
            .map_err(|e| ConfigError::new(format!("sh: reading the script from stdin: {e}")))?;
        let path = tmpdir.path().join("inline-script");
        std::fs::write(&path, &body)
            .map_err(|e| ConfigError::new(format!("sh: saving the inline script: {e}")))?;
        let shebang = body.starts_with(b"#!");
        if shebang {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| ConfigError::new(format!("sh: inline script: {e}")))?;
        }
        Program::Exec {
            path,
            via_sh: !shebang,
        }
    } else {
        let path = executable(&script_arg)?;
        // As execvp (which nbdkit uses): an executable text file without
        // a #! line is run by /bin/sh.
        let mut head = [0u8; 4];
        let n = std::fs::File::open(&path)
            .and_then(|mut f| f.read(&mut head))
            .unwrap_or(0);
        let via_sh = !(head[..n].starts_with(b"#!") || head[..n].starts_with(b"\x7fELF"));
        Program::Exec { path, via_sh }
    };
    let script = Script {
        program,
        tmpdir: tmpdir.path().to_path_buf(),
    };
    script.run("load", &[], None).map_err(config_err)?;
    let magic = script
        .run("magic_config_key", &[], None)
        .map_err(config_err)?
        .map(|o| text(&o).trim().to_string())
        .filter(|k| !k.is_empty());
    let mut params = Vec::new();
    for (i, (k, v)) in rest.into_iter().enumerate() {
        if i == pos {
            continue;
        }
        if k == "script" {
            match &magic {
                Some(m) => params.push((m.clone(), v)),
                None => {
                    return Err(ConfigError::new(format!(
                        "sh: parameter '{v}' must be written key=value (the script has no magic_config_key)"
                    )))
                }
            }
        } else {
            params.push((k, v));
        }
    }
    configure("sh", script, tmpdir, params)
}

/// The script as an absolute path (the server may change directory when
/// it goes to the background), checked to be an executable file.
fn executable(arg: &str) -> Result<PathBuf, ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::fs::canonicalize(Path::new(arg))
        .map_err(|e| ConfigError::new(format!("sh: script={arg}: {e}")))?;
    let meta =
        std::fs::metadata(&path).map_err(|e| ConfigError::new(format!("sh: script={arg}: {e}")))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(ConfigError::new(format!(
            "sh: script={arg}: not an executable file (chmod +x?)"
        )));
    }
    Ok(path)
}

/// The methods `eval` takes as `METHOD=SCRIPT` parameters.
const EVAL_METHODS: &[&str] = &[
    "after_fork",
    "block_size",
    "cache",
    "can_cache",
    "can_extents",
    "can_fast_zero",
    "can_flush",
    "can_fua",
    "can_multi_conn",
    "can_trim",
    "can_write",
    "can_zero",
    "close",
    "config",
    "config_complete",
    "default_export",
    "dump_plugin",
    "export_description",
    "extents",
    "flush",
    "get_ready",
    "get_size",
    "is_rotational",
    "list_exports",
    "open",
    "pread",
    "preconnect",
    "pwrite",
    "thread_model",
    "trim",
    "unload",
    "zero",
];

fn create_eval(cfg: &mut Config) -> Result<Arc<dyn Backend>, ConfigError> {
    let mut scripts = HashMap::new();
    for m in EVAL_METHODS {
        if let Some(body) = cfg.take(m) {
            scripts.insert(m.to_string(), body);
        }
    }
    let missing = cfg.take("missing");
    // As nbdkit, get_size= is not checked here (`--dump-plugin eval
    // dump_plugin=...` needs no disk): a client is told at open that the
    // script lacks it.
    let tmpdir = make_tmpdir("eval")?;
    let script = Script {
        program: Program::Eval { scripts, missing },
        tmpdir: tmpdir.path().to_path_buf(),
    };
    configure("eval", script, tmpdir, cfg.take_rest())
}

pub static SH: PluginSpec = PluginSpec {
    name: "sh",
    summary: "a plugin written as a script or any executable (nbdkit's sh convention)",
    description: "Runs SCRIPT METHOD ARGS... for each plugin method, as nbdkit's sh plugin \
                  does, so nbdkit shell plugins run unchanged.  Any executable works, not only \
                  shell scripts; '-' reads a /bin/sh script from stdin.  Parameters other than \
                  script= go to the script's config method.\n\n\
                  Example:\n  nbdkit-rs sh ./disk.sh file=disk.img",
    magic_config_key: Some("script"),
    params: &[
        Param {
            name: "script",
            help: "the script or executable, or - for stdin (the magic key)",
        },
        Param {
            name: ANY_KEY,
            help: "passed to the script as: SCRIPT config KEY VALUE",
        },
    ],
    create: create_sh,
};

pub static EVAL: PluginSpec = PluginSpec {
    name: "eval",
    summary: "a plugin written as /bin/sh snippets on the command line",
    description: "Each METHOD=SCRIPT parameter is a /bin/sh snippet run for that method with \
                  the arguments of nbdkit's sh plugin ($1 is the method).  can_* methods that \
                  are not given follow from the methods that are (pwrite= means writable).  \
                  Other keys go to the config snippet.\n\n\
                  Example:\n  nbdkit-rs eval get_size='echo 64M' \\\n      \
                  pread='dd if=/dev/zero count=$3 iflag=count_bytes'",
    magic_config_key: None,
    params: &[
        Param {
            name: "get_size",
            help: "prints the size, e.g. 1M (required)",
        },
        Param {
            name: "pread",
            help: "$2 handle, $3 count, $4 offset: print exactly count bytes",
        },
        Param {
            name: "pwrite",
            help: "$3 count, $4 offset, $5 flags (fua): data on stdin",
        },
        Param {
            name: "missing",
            help: "runs for every method not given (default: exit 2)",
        },
        Param {
            name: "after_fork",
            help: "the after_fork method, as in the sh plugin",
        },
        Param {
            name: "block_size",
            help: "the block_size method, as in the sh plugin",
        },
        Param {
            name: "cache",
            help: "the cache method, as in the sh plugin",
        },
        Param {
            name: "can_cache",
            help: "the can_cache method, as in the sh plugin",
        },
        Param {
            name: "can_extents",
            help: "the can_extents method, as in the sh plugin",
        },
        Param {
            name: "can_fast_zero",
            help: "the can_fast_zero method, as in the sh plugin",
        },
        Param {
            name: "can_flush",
            help: "the can_flush method, as in the sh plugin",
        },
        Param {
            name: "can_fua",
            help: "the can_fua method, as in the sh plugin",
        },
        Param {
            name: "can_multi_conn",
            help: "the can_multi_conn method, as in the sh plugin",
        },
        Param {
            name: "can_trim",
            help: "the can_trim method, as in the sh plugin",
        },
        Param {
            name: "can_write",
            help: "the can_write method, as in the sh plugin",
        },
        Param {
            name: "can_zero",
            help: "the can_zero method, as in the sh plugin",
        },
        Param {
            name: "close",
            help: "the close method, as in the sh plugin",
        },
        Param {
            name: "config",
            help: "the config method, as in the sh plugin",
        },
        Param {
            name: "config_complete",
            help: "the config_complete method, as in the sh plugin",
        },
        Param {
            name: "default_export",
            help: "the default_export method, as in the sh plugin",
        },
        Param {
            name: "dump_plugin",
            help: "the dump_plugin method, as in the sh plugin",
        },
        Param {
            name: "export_description",
            help: "the export_description method, as in the sh plugin",
        },
        Param {
            name: "extents",
            help: "the extents method, as in the sh plugin",
        },
        Param {
            name: "flush",
            help: "the flush method, as in the sh plugin",
        },
        Param {
            name: "get_ready",
            help: "the get_ready method, as in the sh plugin",
        },
        Param {
            name: "is_rotational",
            help: "the is_rotational method, as in the sh plugin",
        },
        Param {
            name: "list_exports",
            help: "the list_exports method, as in the sh plugin",
        },
        Param {
            name: "open",
            help: "the open method, as in the sh plugin",
        },
        Param {
            name: "preconnect",
            help: "the preconnect method, as in the sh plugin",
        },
        Param {
            name: "thread_model",
            help: "the thread_model method, as in the sh plugin",
        },
        Param {
            name: "trim",
            help: "the trim method, as in the sh plugin",
        },
        Param {
            name: "unload",
            help: "the unload method, as in the sh plugin",
        },
        Param {
            name: "zero",
            help: "the zero method, as in the sh plugin",
        },
        Param {
            name: ANY_KEY,
            help: "any other key goes to the config snippet: config KEY VALUE",
        },
    ],
    create: create_eval,
};

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(pairs: &[(&str, &str)]) -> Script {
        Script {
            program: Program::Eval {
                scripts: pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                missing: None,
            },
            tmpdir: std::env::temp_dir(),
        }
    }

    #[test]
    fn exit_codes() {
        let s = eval(&[
            ("a", "echo hi"),
            ("b", "exit 2"),
            ("c", "exit 3"),
            ("d", "echo 'ENOSPC out of room' >&2; exit 1"),
            ("e", "echo oops >&2; exit 9"),
            ("f", "exit 1"),
        ]);
        assert_eq!(
            s.call("a", &[], None).unwrap(),
            Outcome::Done(b"hi\n".to_vec())
        );
        assert_eq!(s.call("b", &[], None).unwrap(), Outcome::Missing);
        assert_eq!(s.call("c", &[], None).unwrap(), Outcome::False);
        assert_eq!(s.call("zz", &[], None).unwrap(), Outcome::Missing);
        let e = s.call("d", &[], None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        assert_eq!(e.message(), "d: out of room");
        let e = s.call("e", &[], None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(e.message().contains("oops"));
        assert!(s.call("f", &[], None).is_err());
        assert!(s.run("c", &[], None).is_err());
    }

    #[test]
    fn disconnect_exit_codes() {
        let s = eval(&[
            ("hard", "exit 6"),
            ("soft", "echo out; exit 7"),
            ("softerr", "exit 8"),
            ("softerrno", "echo ENOSPC full >&2; exit 8"),
            ("reserved", "exit 12"),
        ]);
        let client = nbdkit_backend::Client::new(1, nbdkit_backend::Peer::Stdio);
        let _current = client.enter();
        let e = s.call("hard", &[], None).unwrap_err();
        assert!(e.disconnects());
        assert!(!client.disconnect_requested());
        assert_eq!(
            s.call("soft", &[], None).unwrap(),
            Outcome::Done(b"out\n".to_vec())
        );
        assert!(client.disconnect_requested());
        let e = s.call("softerr", &[], None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Shutdown);
        assert!(!e.disconnects());
        let e = s.call("softerrno", &[], None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        // 9-15 are reserved and behave as 1.
        let e = s.call("reserved", &[], None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
    }

    #[test]
    fn arguments_and_stdin() {
        let s = eval(&[("m", r#"printf '%s|' "$1" "$2" "$3"; cat"#)]);
        let out = s.call("m", &["x", ""], Some(b"data")).unwrap();
        assert_eq!(out, Outcome::Done(b"m|x||data".to_vec()));
        // A large input that the script does not read must not hang.
        let s = eval(&[("m", "exit 0")]);
        assert!(s.call("m", &[], Some(&vec![0u8; 4 << 20])).is_ok());
    }

    #[test]
    fn export_lists() {
        let l = parse_export_list("a\nb\n");
        assert_eq!(l.len(), 2);
        assert_eq!(l[1].name, "b");
        let l = parse_export_list("INTERLEAVED\na\nda\nb\ndb\n");
        assert_eq!(l[1].description.as_deref(), Some("db"));
        let l = parse_export_list("NAMES+DESCRIPTIONS\na\nb\nda\ndb\n");
        assert_eq!(l[0].name, "a");
        assert_eq!(l[0].description.as_deref(), Some("da"));
        assert!(parse_export_list("").is_empty());
    }

    #[test]
    fn extent_lines() {
        let v = parse_extents("0 1M\n1M 9M hole,zero\n10M 512 3\n").unwrap();
        assert_eq!(
            v,
            vec![(0, 1 << 20, 0), (1 << 20, 9 << 20, 3), (10 << 20, 512, 3)]
        );
        assert!(parse_extents("0\n").is_err());
        assert!(parse_extents("0 1 bogus\n").is_err());
    }

    #[test]
    fn eval_infers_capabilities() {
        let s = Arc::new(eval(&[
            ("pwrite", "cat >/dev/null"),
            ("can_trim", "exit 3"),
        ]));
        let h = ScriptHandle {
            script: s.clone(),
            h: String::new(),
            answers: Default::default(),
        };
        assert!(h.can_write().unwrap());
        assert!(!h.can_trim().unwrap());
        assert!(!h.can_flush().unwrap());
        assert_eq!(h.can_zero().unwrap(), ZeroMode::Emulate);
    }
}
