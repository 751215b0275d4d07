//! `nbd`: a proxy to another NBD server.
//!
//! Why: to put filters in front of a server that cannot have them (qemu-nbd,
//! another nbdkit, a remote export), to change transport (Unix socket to
//! TCP, plaintext to TLS or back), or to re-export under another name —
//! nbdkit's nbd plugin does this, and these are its parameters.  Each
//! client connection opens its own connection to the upstream server
//! (unless `shared=true`: one connection for all) and passes through
//! everything it offers: writes, flush, trim, zero (with fast zero), FUA,
//! cache, block status, multi-conn and block sizes.  Requests travel in
//! parallel and replies come back in any order.
//!
//! The upstream server is named by `hostname=`/`port=`, `socket=`, `uri=`,
//! `socket-fd=` (an inherited, connected socket) or `command=` (a server
//! run as our child with socket activation, see [`command`]).  TLS to it
//! ([`tls`]) is X.509 with rustls or pre-shared keys with OpenSSL.

pub mod client;
pub mod command;
pub mod socket;
pub mod tls;

use nbdkit_backend::LockExt;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nbdkit_backend::{
    Backend, BlockSize, CacheMode, Config, ConfigError, Error, ErrorKind, ExportEntry, Extents,
    FuaMode, Handle, Param, PluginSpec, Result, ZeroFlags, ZeroMode,
};
use nbdkit_proto::consts::*;

use client::{Connection, NbdError, TlsUse};
use command::Spawned;
use socket::Stream;
use tls::{TlsClient, TlsMode, TlsSettings};

#[derive(Debug, Clone)]
enum Target {
    Tcp(String, u16),
    Unix(PathBuf),
    /// `command=` and its `arg=`s.
    Command(Vec<String>),
    /// `socket-fd=`: connected already, so usable once.
    Fd,
}

struct Nbd {
    target: Target,
    /// The upstream export (unless `dynamic_export`).
    export: String,
    /// Pass each client's export name through.
    dynamic_export: bool,
    tls_mode: TlsMode,
    tls: Option<TlsClient>,
    /// More attempts after a failed connection, one second apart.
    retry: u32,
    shared: bool,
    /// `socket-fd=`, until the shared connection takes it.
    fd: Mutex<Option<OwnedFd>>,
    /// With `shared`: the one connection, made in `after_fork`.
    upstream: Mutex<Option<Arc<Upstream>>>,
}

/// A connection to the server, and the server itself when we started it.
struct Upstream {
    conn: Connection,
    server: Mutex<Option<Spawned>>,
}

impl Upstream {
    /// Say goodbye, then stop a `command=` server.  Idempotent.
    fn close(&self) {
        self.conn.close();
        // Dropping it stops it (SIGTERM, then SIGKILL).
        drop(self.server.lock_unpoisoned().take());
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.close();
    }
}

/// The kind of an error the server answered with (an NBD error value).
fn kind_of(nbd_error: u32) -> ErrorKind {
    match nbd_error {
        EPERM => ErrorKind::PermissionDenied,
        ENOMEM => ErrorKind::OutOfMemory,
        EINVAL => ErrorKind::InvalidInput,
        ENOSPC => ErrorKind::NoSpace,
        EOVERFLOW => ErrorKind::Overflow,
        ENOTSUP => ErrorKind::NotSupported,
        ESHUTDOWN => ErrorKind::Shutdown,
        _ => ErrorKind::Io,
    }
}

fn to_error(what: &str, e: NbdError) -> Error {
    let kind = kind_of(e.errno);
    if e.message.is_empty() {
        Error::new(kind, format!("nbd: {what} failed upstream"))
    } else {
        Error::new(kind, format!("nbd: {what}: {}", e.message))
    }
}

impl Nbd {
    /// One attempt: connect (starting the server for `command=`) and
    /// negotiate `export`.
    fn connect_once(&self, export: &str, die_with_us: bool) -> Result<Upstream> {
        let mut server = None;
        let stream = match &self.target {
            Target::Tcp(h, p) => std::net::TcpStream::connect((h.as_str(), *p))
                .map(|s| {
                    let _ = s.set_nodelay(true);
                    Stream::Tcp(s)
                })
                .map_err(|e| Error::from_io(format_args!("nbd: connecting to {h}:{p}"), e))?,
            Target::Unix(path) => std::os::unix::net::UnixStream::connect(path)
                .map(Stream::Unix)
                .map_err(|e| {
                    Error::from_io(format_args!("nbd: connecting to {}", path.display()), e)
                })?,
            Target::Command(argv) => {
                let s = Spawned::start(argv, die_with_us)
                    .map_err(|e| Error::from_io(format_args!("nbd: running {}", argv[0]), e))?;
                tracing::debug!(pid = s.id(), "nbd: started {}", argv[0]);
                let c = s.connect().map_err(|e| {
                    Error::from_io(format_args!("nbd: connecting to {}", argv[0]), e)
                })?;
                server = Some(s);
                Stream::Unix(c)
            }
            Target::Fd => {
                let fd = self
                    .fd
                    .lock_unpoisoned()
                    .take()
                    .ok_or_else(|| Error::io("nbd: socket-fd= has been used already"))?;
                Stream::from_fd(fd).map_err(|e| Error::from_io("nbd: socket-fd=", e))?
            }
        };
        let tls = TlsUse {
            mode: self.tls_mode,
            client: self.tls.as_ref(),
        };
        let conn = Connection::open(stream, export, tls).map_err(|e| to_error("handshake", e))?;
        if self.tls_mode != TlsMode::Off {
            tracing::debug!(tls = conn.info.tls, "nbd: connected");
        }
        Ok(Upstream {
            conn,
            server: Mutex::new(server),
        })
    }

    /// A new connection to a server given by socket or address (not one
    /// started by `command=` or inherited: those cannot be dialled again).
    fn dial(&self, what: &str) -> Result<Stream> {
        match &self.target {
            Target::Tcp(h, p) => std::net::TcpStream::connect((h.as_str(), *p))
                .map(Stream::Tcp)
                .map_err(|e| Error::from_io(format_args!("nbd: connecting to {h}:{p}"), e)),
            Target::Unix(path) => std::os::unix::net::UnixStream::connect(path)
                .map(Stream::Unix)
                .map_err(|e| {
                    Error::from_io(format_args!("nbd: connecting to {}", path.display()), e)
                }),
            Target::Command(_) | Target::Fd => {
                Err(Error::io(format!("nbd: cannot {what} this server")))
            }
        }
    }

    fn tls_use(&self) -> TlsUse<'_> {
        TlsUse {
            mode: self.tls_mode,
            client: self.tls.as_ref(),
        }
    }

    /// [`Nbd::connect_once`], retried `retry=` times a second apart.
    fn connect(&self, export: &str, die_with_us: bool) -> Result<Upstream> {
        let mut attempt = 0;
        loop {
            match self.connect_once(export, die_with_us) {
                Ok(u) => return Ok(u),
                // A used socket-fd cannot be retried.
                Err(e) if attempt < self.retry && !matches!(self.target, Target::Fd) => {
                    attempt += 1;
                    tracing::warn!("{e}; retrying in 1 s ({attempt} of {})", self.retry);
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Backend for Nbd {
    fn name(&self) -> &str {
        "nbd"
    }

    /// `shared=true`: connect once, before the first client, in the process
    /// that serves (a reader thread and a child server would not survive
    /// the fork to the background).
    fn after_fork(&self) -> Result<()> {
        if self.shared {
            let mut up = self.upstream.lock_unpoisoned();
            if up.is_none() {
                // The server prefixes start-up errors with the plugin's
                // name already.
                let c = self.connect(&self.export, true).map_err(|e| {
                    let m = e.message();
                    Error::new(e.kind(), m.strip_prefix("nbd: ").unwrap_or(m))
                })?;
                *up = Some(Arc::new(c));
            }
        }
        Ok(())
    }

    fn list_exports(&self, _readonly: bool) -> Result<Vec<ExportEntry>> {
        if !self.dynamic_export {
            return Ok(vec![ExportEntry {
                name: String::new(),
                description: None,
            }]);
        }
        // What the server lists (dynamic-export is never shared, so the
        // target can be connected to again).
        let stream = self.dial("list the exports of")?;
        let list = client::list_exports(stream, self.tls_use())
            .map_err(|e| to_error("listing exports", e))?;
        Ok(list
            .into_iter()
            .map(|(name, d)| ExportEntry {
                name,
                description: (!d.is_empty()).then_some(d),
            })
            .collect())
    }

    /// With dynamic-export, "" stands for what the server calls its
    /// default export (asked with NBD_OPT_INFO), so clients see the
    /// server's canonical name; otherwise the export is fixed.
    fn default_export(&self, _readonly: bool) -> Result<String> {
        if !self.dynamic_export {
            return Ok(String::new());
        }
        let stream = self.dial("ask about the default export of")?;
        client::canonical_name(stream, self.tls_use(), "")
            .map_err(|e| to_error("asking for the default export", e))
    }

    fn open(&self, _readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        let up = if self.shared {
            let mut slot = self.upstream.lock_unpoisoned();
            let up = match &*slot {
                Some(u) => u.clone(),
                // after_fork was not called (an embedding program): connect now.
                None => slot
                    .insert(Arc::new(self.connect(&self.export, false)?))
                    .clone(),
            };
            if let Some(why) = up.conn.failed() {
                return Err(Error::io(format!(
                    "nbd: the shared connection to the server has failed: {why}"
                )));
            }
            up
        } else {
            let export = if self.dynamic_export {
                export
            } else {
                &self.export
            };
            Arc::new(self.connect(export, false)?)
        };
        Ok(Box::new(NbdHandle { up }))
    }

    fn shutdown(&self) {
        if let Some(up) = self.upstream.lock_unpoisoned().take() {
            up.close();
        }
    }
}

/// One client's view: its own upstream connection, or the shared one
/// (closed when the last user lets go of it, or at shutdown).
struct NbdHandle {
    up: Arc<Upstream>,
}

/// Largest length sent in one trim, zero, cache or block status request
/// (their lengths are 32-bit on the wire).
const MAX_RANGE: u64 = 1 << 30;

impl NbdHandle {
    fn has(&self, flag: u16) -> bool {
        self.up.conn.info.flags & flag != 0
    }

    fn simple(&self, what: &str, cmd: u16, flags: u16, offset: u64, count: u64) -> Result<()> {
        let mut done = 0;
        while done < count {
            let n = (count - done).min(MAX_RANGE);
            self.up
                .conn
                .request(cmd, flags, offset + done, n as u32, None)
                .map_err(|e| to_error(what, e))?;
            done += n;
        }
        Ok(())
    }
}

impl Handle for NbdHandle {
    fn size(&self) -> Result<u64> {
        Ok(self.up.conn.info.size)
    }
    fn block_size(&self) -> Result<Option<BlockSize>> {
        Ok(self
            .up
            .conn
            .info
            .block_size
            .map(|(minimum, preferred, maximum)| BlockSize {
                minimum,
                preferred,
                maximum,
            }))
    }
    fn can_write(&self) -> Result<bool> {
        Ok(!self.has(FLAG_READ_ONLY))
    }
    fn can_flush(&self) -> Result<bool> {
        Ok(self.has(FLAG_SEND_FLUSH))
    }
    fn is_rotational(&self) -> Result<bool> {
        Ok(self.has(FLAG_ROTATIONAL))
    }
    fn can_trim(&self) -> Result<bool> {
        Ok(self.has(FLAG_SEND_TRIM))
    }
    fn can_zero(&self) -> Result<ZeroMode> {
        Ok(if self.has(FLAG_SEND_WRITE_ZEROES) {
            ZeroMode::Native
        } else if self.can_write()? {
            ZeroMode::Emulate
        } else {
            ZeroMode::None
        })
    }
    fn can_fast_zero(&self) -> Result<bool> {
        Ok(self.has(FLAG_SEND_FAST_ZERO))
    }
    fn can_fua(&self) -> Result<FuaMode> {
        Ok(if self.has(FLAG_SEND_FUA) {
            FuaMode::Native
        } else {
            FuaMode::None
        })
    }
    fn can_multi_conn(&self) -> Result<bool> {
        Ok(self.has(FLAG_CAN_MULTI_CONN))
    }
    fn can_cache(&self) -> Result<CacheMode> {
        Ok(if self.has(FLAG_SEND_CACHE) {
            CacheMode::Native
        } else {
            CacheMode::None
        })
    }
    fn can_extents(&self) -> Result<bool> {
        Ok(self.up.conn.info.meta_context.is_some())
    }

    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let r = self
            .up
            .conn
            .request(CMD_READ, 0, offset, buf.len() as u32, None)
            .map_err(|e| to_error("read", e))?;
        buf.copy_from_slice(&r.data);
        Ok(())
    }
    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.up
            .conn
            .request(CMD_WRITE, flags, offset, buf.len() as u32, Some(buf))
            .map_err(|e| to_error("write", e))?;
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        self.up
            .conn
            .request(CMD_FLUSH, 0, 0, 0, None)
            .map_err(|e| to_error("flush", e))?;
        Ok(())
    }
    fn trim(&self, offset: u64, count: u64, fua: bool) -> Result<()> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.simple("trim", CMD_TRIM, flags, offset, count)
    }
    fn zero(&self, offset: u64, count: u64, f: ZeroFlags) -> Result<()> {
        let mut flags = 0;
        if f.fua {
            flags |= CMD_FLAG_FUA;
        }
        if !f.may_trim {
            flags |= CMD_FLAG_NO_HOLE;
        }
        if f.fast {
            flags |= CMD_FLAG_FAST_ZERO;
        }
        self.simple("zero", CMD_WRITE_ZEROES, flags, offset, count)
    }
    fn cache(&self, offset: u64, count: u64) -> Result<()> {
        self.simple("cache", CMD_CACHE, 0, offset, count)
    }
    fn extents(&self, offset: u64, count: u64, req_one: bool, extents: &mut Extents) -> Result<()> {
        let Some(id) = self.up.conn.info.meta_context else {
            return Err(Error::not_supported(
                "nbd: the server has no base:allocation",
            ));
        };
        self.block_status(id, offset, count, req_one, extents, STATE_HOLE | STATE_ZERO)
    }
    /// The server's own `qemu:allocation-depth` when it offers it (qemu-nbd
    /// -A, nbdkit-rs): a qcow2 chain behind it keeps its depths.  Without
    /// it, the plugin default (depth 1: one image, nothing under it).
    fn allocation_depth(
        &self,
        offset: u64,
        count: u64,
        req_one: bool,
        extents: &mut Extents,
    ) -> Result<()> {
        match self.up.conn.info.depth_context {
            Some(id) => self.block_status(id, offset, count, req_one, extents, u32::MAX),
            None => extents.add(offset, count, 1),
        }
    }
}

impl NbdHandle {
    /// One BLOCK_STATUS request; the descriptors of context `id` (the
    /// server sends every negotiated context's) go into `extents`, their
    /// flags masked with `mask`.
    fn block_status(
        &self,
        id: u32,
        offset: u64,
        count: u64,
        req_one: bool,
        extents: &mut Extents,
        mask: u32,
    ) -> Result<()> {
        let n = count.min(MAX_RANGE);
        let flags = if req_one { CMD_FLAG_REQ_ONE } else { 0 };
        let r = self
            .up
            .conn
            .request(CMD_BLOCK_STATUS, flags, offset, n as u32, None)
            .map_err(|e| to_error("block status", e))?;
        let mut pos = offset;
        for (_, len, fl) in r.extents.into_iter().filter(|e| e.0 == id) {
            extents.add(pos, len as u64, fl & mask)?;
            pos += len as u64;
        }
        if pos == offset {
            return Err(Error::io("nbd: the server's block status reply was empty"));
        }
        Ok(())
    }
}

/// What a URI says.
#[derive(Debug, Default)]
struct ParsedUri {
    target: Option<Target>,
    export: Option<String>,
    /// nbds:// or nbds+unix://
    tls: bool,
    /// The user part, for TLS-PSK.
    username: Option<String>,
    /// The host, for certificate verification.
    hostname: Option<String>,
    certificates: Option<PathBuf>,
    psk_file: Option<PathBuf>,
    tls_hostname: Option<String>,
    tls_verify: Option<bool>,
}

/// Parse `nbd[s]://[user@]host[:port][/export]` or
/// `nbd[s]+unix://[user@]/export?socket=PATH`, with the query parameters
/// libnbd and the NBD URI specification define: `socket`,
/// `tls-certificates`, `tls-psk-file`, `tls-hostname`, `tls-verify-peer`.
fn parse_uri(uri: &str) -> std::result::Result<ParsedUri, String> {
    let (scheme, rest) = uri
        .split_once("://")
        .ok_or("expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH")?;
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let mut p = ParsedUri {
        export: path.map(percent_decode).transpose()?,
        ..ParsedUri::default()
    };
    let (user, authority) = match authority.rsplit_once('@') {
        Some((u, a)) => (Some(percent_decode(u)?), a),
        None => (None, authority),
    };
    p.username = user;
    let mut socket = None;
    for kv in query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter(|kv| !kv.is_empty())
    {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let v = percent_decode(v)?;
        match k {
            "socket" => socket = Some(PathBuf::from(v)),
            "tls-certificates" => p.certificates = Some(PathBuf::from(v)),
            "tls-psk-file" => p.psk_file = Some(PathBuf::from(v)),
            "tls-hostname" => p.tls_hostname = Some(v),
            "tls-verify-peer" => {
                p.tls_verify = Some(
                    nbdkit_backend::config::parse_bool(&v)
                        .map_err(|e| format!("tls-verify-peer={v}: {e}"))?,
                )
            }
            _ => {
                return Err(format!(
                    "unknown query parameter '{k}' (known: socket, tls-certificates, \
                     tls-psk-file, tls-hostname, tls-verify-peer)"
                ))
            }
        }
    }
    let (tcp, tls) = match scheme {
        "nbd" => (true, false),
        "nbds" => (true, true),
        "nbd+unix" => (false, false),
        "nbds+unix" => (false, true),
        "nbd+vsock" | "nbds+vsock" => return Err("AF_VSOCK (nbd+vsock://) is not supported".into()),
        s => {
            return Err(format!(
                "scheme '{s}' is not supported (nbd, nbds, nbd+unix, nbds+unix)"
            ))
        }
    };
    p.tls = tls;
    if tcp {
        if authority.is_empty() {
            return Err(format!("{scheme}:// needs a host"));
        }
        if socket.is_some() {
            return Err(format!("socket= is only for {scheme}+unix://"));
        }
        let (host, port) = if let Some(h) = authority.strip_prefix('[') {
            let (h, p) = h.split_once(']').ok_or("bad IPv6 address")?;
            (h.to_string(), p.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (authority.to_string(), None),
            }
        };
        let port = port
            .map(|p| p.parse::<u16>().map_err(|_| format!("bad port '{p}'")))
            .transpose()?
            .unwrap_or(10809);
        p.hostname = Some(host.clone());
        p.target = Some(Target::Tcp(host, port));
    } else {
        if !authority.is_empty() {
            return Err(format!("{scheme}:// takes no host (only a user name)"));
        }
        let socket = socket.ok_or_else(|| format!("{scheme}:// needs ?socket=PATH"))?;
        p.target = Some(Target::Unix(socket));
    }
    Ok(p)
}

fn percent_decode(s: &str) -> std::result::Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = s.get(i + 1..i + 3).ok_or("bad %-escape")?;
            out.push(u8::from_str_radix(h, 16).map_err(|_| "bad %-escape")?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the URI is not UTF-8".into())
}

/// A port number, or a service name from the services database (as nbdkit).
fn parse_port(p: &str) -> std::result::Result<u16, String> {
    if let Ok(n) = p.parse::<u16>() {
        return Ok(n);
    }
    let name = std::ffi::CString::new(p).map_err(|_| format!("port={p}: bad service name"))?;
    // SAFETY: both arguments are NUL-terminated strings; the result (a
    // pointer to static storage) is read at once, while configuring, before
    // any other thread could call getservbyname.
    let port = unsafe {
        let e = libc::getservbyname(name.as_ptr(), c"tcp".as_ptr());
        if e.is_null() {
            None
        } else {
            Some(u16::from_be((*e).s_port as u16))
        }
    };
    port.ok_or_else(|| format!("port={p}: not a port number or a known TCP service"))
}

/// Take `key` from the command line or the URI, but not both.
fn one_of<T>(
    key: &str,
    cli: Option<T>,
    uri: Option<T>,
) -> std::result::Result<Option<T>, ConfigError> {
    match (cli, uri) {
        (Some(_), Some(_)) => Err(ConfigError::new(format!(
            "nbd: {key} is given both as a parameter and in uri="
        ))),
        (a, b) => Ok(a.or(b)),
    }
}

fn create(cfg: &mut Config) -> std::result::Result<Arc<dyn Backend>, ConfigError> {
    let cerr = |m: String| ConfigError::new(format!("nbd: {m}"));
    for key in ["vsock", "vhost-cid", "cid"] {
        if let Some(v) = cfg.take(key) {
            return Err(cerr(format!(
                "{key}={v}: AF_VSOCK is not supported; use hostname=, socket= or command="
            )));
        }
    }
    let hostname = cfg.take("hostname");
    let port = cfg.take("port");
    let socket = cfg.take("socket");
    let uri = cfg.take("uri");
    let export = cfg.take("export");
    let command = cfg.take("command");
    let args = cfg.take_all("arg");
    let socket_fd = cfg.take("socket-fd");
    let retry = cfg
        .take_parse::<u32>("retry")
        .map_err(|e| cerr(e.to_string()))?
        .unwrap_or(0);
    let shared = cfg.take_bool("shared").map_err(|e| cerr(e.to_string()))?;
    let dynamic_export = cfg
        .take_bool("dynamic-export")
        .map_err(|e| cerr(e.to_string()))?
        .unwrap_or(false);
    let tls = cfg.take("tls");
    let certificates = cfg.take("tls-certificates").map(PathBuf::from);
    let verify = cfg
        .take_bool("tls-verify")
        .map_err(|e| cerr(e.to_string()))?;
    let tls_hostname = cfg.take("tls-hostname");
    let username = cfg.take("tls-username");
    let psk = cfg.take("tls-psk").map(PathBuf::from);

    let given = [
        hostname.is_some(),
        socket.is_some(),
        uri.is_some(),
        command.is_some(),
        socket_fd.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if given != 1 {
        return Err(cerr(
            "exactly one of hostname=, socket=, uri=, command= or socket-fd= is required".into(),
        ));
    }
    if port.is_some() && hostname.is_none() {
        return Err(cerr("port= goes with hostname=".into()));
    }
    if !args.is_empty() && command.is_none() {
        return Err(cerr("arg= goes with command=".into()));
    }
    if socket_fd.is_some() && shared == Some(false) {
        return Err(cerr(
            "socket-fd= is one connection, so it needs shared=true".into(),
        ));
    }

    let mut fd = None;
    let mut parsed = ParsedUri::default();
    let target = if let Some(u) = &uri {
        parsed = parse_uri(u).map_err(|e| cerr(format!("uri={u}: {e}")))?;
        parsed
            .target
            .take()
            .ok_or_else(|| cerr(format!("uri={u}: no server")))?
    } else if let Some(s) = socket {
        Target::Unix(PathBuf::from(s))
    } else if let Some(c) = command {
        let mut argv = vec![c];
        argv.extend(args);
        Target::Command(argv)
    } else if let Some(f) = socket_fd {
        let n: RawFd = f
            .parse()
            .ok()
            .filter(|&n| n >= 0)
            .ok_or_else(|| cerr(format!("socket-fd={f}: expected a file descriptor number")))?;
        // SAFETY: fstat writes only into st.
        let is_socket = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            libc::fstat(n, &mut st) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFSOCK
        };
        if !is_socket {
            return Err(cerr(format!("socket-fd={f}: not an open socket")));
        }
        // SAFETY: the descriptor was handed to us to use and close; it is
        // open (fstat succeeded).
        let owned = unsafe { OwnedFd::from_raw_fd(n) };
        // Not for our children (command=, --run).
        // SAFETY: F_SETFD on a descriptor we own.
        unsafe { libc::fcntl(n, libc::F_SETFD, libc::FD_CLOEXEC) };
        fd = Some(owned);
        Target::Fd
    } else {
        let host = hostname.clone().unwrap_or_default();
        let port = match port {
            None => 10809,
            Some(p) => parse_port(&p).map_err(cerr)?,
        };
        Target::Tcp(host, port)
    };

    // command= and socket-fd= default to one shared connection; socket-fd
    // cannot be anything else (it connects once).
    let implied = matches!(target, Target::Command(_) | Target::Fd);
    let shared = shared.unwrap_or(implied);
    if dynamic_export {
        if shared {
            return Err(cerr(
                "dynamic-export=true needs a connection per client: it cannot be shared \
                 (nor used with command= or socket-fd=)"
                    .into(),
            ));
        }
        if export.is_some() {
            return Err(cerr("export= and dynamic-export=true conflict".into()));
        }
    }
    if export.is_some() && parsed.export.is_some() {
        return Err(cerr("export= and an export in uri= conflict".into()));
    }
    let export = export.or(parsed.export.take()).unwrap_or_default();
    if export.len() > MAX_STRING {
        return Err(cerr("export= is too long".into()));
    }

    let settings = TlsSettings {
        certificates: one_of("tls-certificates", certificates, parsed.certificates.take())?,
        verify: one_of("tls-verify", verify, parsed.tls_verify.take())?,
        hostname: one_of("tls-hostname", tls_hostname, parsed.tls_hostname.take())?
            .or(hostname)
            .or(parsed.hostname.take()),
        psk: one_of("tls-psk", psk, parsed.psk_file.take())?,
        username: one_of("tls-username", username, parsed.username.take())?,
    };
    // As nbdkit: without tls=, any other TLS parameter means tls=on, and a
    // TLS URI means require.
    let any_tls_param = settings.certificates.is_some()
        || settings.verify.is_some()
        || settings.psk.is_some()
        || settings.username.is_some();
    let mut tls_mode = match &tls {
        Some(t) => TlsMode::parse(t)
            .ok_or_else(|| cerr(format!("tls={t}: expected off, on or require")))?,
        None if any_tls_param => TlsMode::On,
        None => TlsMode::Off,
    };
    if parsed.tls {
        if tls_mode == TlsMode::Off && tls.is_some() {
            return Err(cerr(
                "tls=off conflicts with an nbds:// URI, which requires TLS".into(),
            ));
        }
        tls_mode = TlsMode::Require;
    }
    let tls = match tls_mode {
        TlsMode::Off => None,
        _ => Some(TlsClient::load(&settings).map_err(|e| cerr(format!("TLS: {e}")))?),
    };

    Ok(Arc::new(Nbd {
        target,
        export,
        dynamic_export,
        tls_mode,
        tls,
        retry,
        shared,
        fd: Mutex::new(fd),
        upstream: Mutex::new(None),
    }))
}

pub static SPEC: PluginSpec = PluginSpec {
    name: "nbd",
    summary: "a proxy to another NBD server (TCP, Unix, TLS, or a command), passing through its capabilities",
    description: "Each client connection opens its own connection to the server named by \
                  hostname=/port=, socket=, uri=, socket-fd= or command=, and forwards every \
                  request (shared=true: one connection for all clients).  TLS to the server: \
                  tls=on|require with tls-certificates=DIR (X.509: ca-cert.pem, and \
                  client-cert.pem/client-key.pem when present) or tls-psk=FILE with \
                  tls-username=.\n\n\
                  Examples:\n  \
                  nbdkit-rs --filter=log nbd socket=/tmp/qemu.sock logfile=nbd.log\n  \
                  nbdkit-rs nbd nbds://server.example.com/disk tls-certificates=/etc/pki/libnbd\n  \
                  nbdkit-rs --filter=partition nbd command=qemu-nbd arg=-f arg=qcow2 \
                  arg=$PWD/disk.qcow2 partition=1",
    magic_config_key: Some("uri"),
    params: &[
        Param {
            name: "hostname",
            help: "the server's host name or address (TCP)",
        },
        Param {
            name: "port",
            help: "its TCP port or service name (default 10809)",
        },
        Param {
            name: "socket",
            help: "the server's Unix socket",
        },
        Param {
            name: "uri",
            help: "nbd[s]://[USER@]HOST[:PORT]/EXPORT or nbd[s]+unix:///EXPORT?socket=PATH, \
                   with ?tls-certificates=, tls-psk-file=, tls-hostname=, tls-verify-peer= \
                   (the magic key; nbds implies tls=require)",
        },
        Param {
            name: "command",
            help: "run this NBD server (qemu-nbd, nbdkit) as a child with socket activation \
                   (LISTEN_FDS) in a private directory; implies shared=true",
        },
        Param {
            name: "arg",
            help: "an argument for command= (repeat for each, in order)",
        },
        Param {
            name: "socket-fd",
            help: "an inherited, connected socket; implies shared=true",
        },
        Param {
            name: "export",
            help: "the export name to open (default \"\")",
        },
        Param {
            name: "dynamic-export",
            help: "true: open the export each client asks for, and list the server's exports",
        },
        Param {
            name: "retry",
            help: "retry a failed connection N more times, one second apart (default 0)",
        },
        Param {
            name: "shared",
            help: "true: one connection to the server, made at start-up, for all clients",
        },
        Param {
            name: "tls",
            help: "off, on (STARTTLS, plaintext if the server refuses it) or require \
                   (default off; on when another tls- parameter is given)",
        },
        Param {
            name: "tls-certificates",
            help: "directory with ca-cert.pem, and client-cert.pem/client-key.pem for \
                   client authentication (default $HOME/.pki/libnbd, else the system CAs)",
        },
        Param {
            name: "tls-verify",
            help: "false: do not verify the server's certificate (default true)",
        },
        Param {
            name: "tls-hostname",
            help: "the name the server's certificate must be for (default: hostname=; \
                   over a Unix socket only the CA is checked)",
        },
        Param {
            name: "tls-psk",
            help: "a psktool keys file (username:hexkey lines): TLS with a pre-shared key",
        },
        Param {
            name: "tls-username",
            help: "the PSK user name (default: the local user)",
        },
        Param {
            name: "vsock",
            help: "not supported (AF_VSOCK): refused",
        },
    ],
    create,
};

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn uris() {
        let p = parse_uri("nbd://example.com:1234/disk%20a").unwrap();
        assert!(matches!(p.target, Some(Target::Tcp(ref h, 1234)) if h == "example.com"));
        assert_eq!(p.export.as_deref(), Some("disk a"));
        assert!(!p.tls);
        assert_eq!(p.hostname.as_deref(), Some("example.com"));
        let p = parse_uri("nbd://[::1]/").unwrap();
        assert!(matches!(p.target, Some(Target::Tcp(ref h, 10809)) if h == "::1"));
        assert_eq!(p.export.as_deref(), Some(""));
        let p = parse_uri("nbd+unix:///x?socket=/tmp/s.sock").unwrap();
        assert!(matches!(p.target, Some(Target::Unix(ref s)) if s.to_str() == Some("/tmp/s.sock")));
        assert_eq!(p.export.as_deref(), Some("x"));
        assert!(p.hostname.is_none());
        assert!(parse_uri("nbd+unix:///x").is_err());
        assert!(parse_uri("nbd://h:99999/").is_err());
        assert!(parse_uri("nbd://h/%zz").is_err());
        assert!(parse_uri("nbd+vsock:///").unwrap_err().contains("VSOCK"));
        assert!(parse_uri("http://h/").is_err());
        assert!(parse_uri("nbd://h/?socket=/x").is_err());
        assert!(parse_uri("nbd://h/?frobnicate=1")
            .unwrap_err()
            .contains("frobnicate"));
    }

    #[test]
    fn tls_uris() {
        let p =
            parse_uri("nbds+unix://alice@/disk?socket=/s&tls-psk-file=/k%20s.psk&tls-hostname=srv")
                .unwrap();
        assert!(p.tls);
        assert_eq!(p.username.as_deref(), Some("alice"));
        assert_eq!(p.psk_file, Some(PathBuf::from("/k s.psk")));
        assert_eq!(p.tls_hostname.as_deref(), Some("srv"));
        let p = parse_uri("nbds://bob@h:99/?tls-certificates=/c&tls-verify-peer=0").unwrap();
        assert!(p.tls);
        assert!(matches!(p.target, Some(Target::Tcp(ref h, 99)) if h == "h"));
        assert_eq!(p.username.as_deref(), Some("bob"));
        assert_eq!(p.certificates, Some(PathBuf::from("/c")));
        assert_eq!(p.tls_verify, Some(false));
        assert!(parse_uri("nbds+unix://host/?socket=/s").is_err());
    }

    #[test]
    fn ports() {
        assert_eq!(parse_port("10809"), Ok(10809));
        assert!(parse_port("no-such-service-here").is_err());
        assert!(parse_port("70000").is_err());
    }

    fn config(kv: &[(&str, &str)]) -> std::result::Result<Arc<dyn Backend>, String> {
        let mut c = Config::from_pairs(kv);
        create(&mut c).map_err(|e| e.to_string())
    }

    #[test]
    fn parameter_errors() {
        for (kv, what) in [
            (&[("vsock", "2")][..], "AF_VSOCK"),
            (&[("socket", "/s"), ("arg", "x")], "arg= goes with command="),
            (&[("socket", "/s"), ("command", "x")], "exactly one"),
            (&[("socket", "/s"), ("tls", "maybe")], "tls=maybe"),
            (
                &[("command", "x"), ("dynamic-export", "true")],
                "cannot be shared",
            ),
            (
                &[
                    ("socket", "/s"),
                    ("shared", "true"),
                    ("dynamic-export", "1"),
                ],
                "cannot be shared",
            ),
            (
                &[("socket", "/s"), ("export", "a"), ("dynamic-export", "1")],
                "conflict",
            ),
            (
                &[("uri", "nbds+unix:///?socket=/s"), ("tls", "off")],
                "tls=off",
            ),
            (
                &[
                    ("uri", "nbd+unix:///?socket=/s&tls-certificates=/a"),
                    ("tls-certificates", "/b"),
                ],
                "both",
            ),
            (&[("socket-fd", "not-a-number")], "socket-fd="),
            (&[("socket", "/s"), ("retry", "-1")], "retry="),
            (
                &[
                    ("socket", "/s"),
                    ("tls", "on"),
                    ("tls-certificates", "/nonexistent"),
                ],
                "/nonexistent/ca-cert.pem",
            ),
        ] {
            let e = config(kv)
                .err()
                .unwrap_or_else(|| panic!("{kv:?} accepted"));
            assert!(e.contains(what), "{kv:?}: {e}");
        }
        // An open descriptor that is not a socket.
        let f = tempfile::tempfile().unwrap();
        let n = f.as_raw_fd().to_string();
        let e = config(&[("socket-fd", &n)]).err().unwrap();
        assert!(e.contains("not an open socket"), "{e}");
    }
}
