//! A small, blocking NBD client for the `nbd` plugin: fixed-newstyle
//! handshake (structured replies, `base:allocation`, NBD_OPT_GO with block
//! sizes, falling back to NBD_OPT_EXPORT_NAME), then requests from any
//! number of threads at once over one connection.  Requests are written
//! under a lock; a reader thread matches replies to them by cookie, so
//! replies may come back in any order.
//!
//! With TLS (STARTTLS, see [`super::tls`]) the same threads share one TLS
//! session: writers encrypt under the session's lock and send under the
//! write lock; the reader blocks on the socket with no lock held, takes
//! the session's lock only to decrypt what arrived, and never writes.
//!
//! Written here because the server needs a client that is a library (the
//! one in `tests/` drives the protocol byte by byte for edge cases), and
//! libnbd's synchronous calls on one handle run one at a time.  Every
//! length and offset the server sends is checked before use.

use nbdkit_backend::LockExt;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use nbdkit_proto::consts::*;

use super::tls::{Engine, TlsClient, TlsMode, TlsStream};

/// A connected socket of either family.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub(crate) fn try_clone(&self) -> std::io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }
    pub(crate) fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Plaintext is encrypted and sent in pieces of this size, so a 32 MiB
/// write neither holds the TLS session's lock throughout (the reader needs
/// it to decrypt replies) nor makes a second 32 MiB copy.
const TLS_CHUNK: usize = 256 << 10;

/// The sending side of a connection (behind the connection's write lock).
enum Writer {
    Plain(Stream),
    Tls {
        sock: Stream,
        engine: Arc<Mutex<Box<dyn Engine>>>,
    },
}

impl Writer {
    /// Send `parts` back to back.
    fn send(&mut self, parts: &[&[u8]]) -> std::io::Result<()> {
        match self {
            Writer::Plain(s) => parts.iter().try_for_each(|p| s.write_all(p)),
            Writer::Tls { sock, engine } => {
                // Lock order everywhere: the write lock (held by our caller),
                // then the session.  Records leave in the order the session
                // made them because only the write-lock holder takes them.
                let mut out = Vec::new();
                for chunk in parts.iter().flat_map(|p| p.chunks(TLS_CHUNK)) {
                    {
                        let mut e = engine.lock_unpoisoned();
                        e.write_plain(chunk)?;
                        e.take_output(&mut out)?;
                    }
                    if out.len() >= TLS_CHUNK {
                        sock.write_all(&out)?;
                        out.clear();
                    }
                }
                if !out.is_empty() {
                    sock.write_all(&out)?;
                }
                Ok(())
            }
        }
    }

    /// Queue close_notify and send it, with any records the session made
    /// by itself since the last request.
    fn close_tls(&mut self) {
        if let Writer::Tls { engine, .. } = self {
            engine.lock_unpoisoned().close();
            let _ = self.send(&[]);
        }
    }
}

/// The receiving side, owned by the reply reader thread.
enum Reader {
    Plain(Stream),
    Tls {
        sock: Stream,
        engine: Arc<Mutex<Box<dyn Engine>>>,
        plain: Vec<u8>,
        pos: usize,
        buf: Vec<u8>,
    },
}

impl Read for Reader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Reader::Plain(s) => s.read(out),
            Reader::Tls {
                sock,
                engine,
                plain,
                pos,
                buf,
            } => {
                while *pos == plain.len() {
                    plain.clear();
                    *pos = 0;
                    // Blocks with no lock held: writers carry on meanwhile.
                    let n = sock.read(buf)?;
                    if n == 0 {
                        return Ok(0);
                    }
                    // Records the session makes by itself here (an answer to
                    // the server's key update) wait for the next request:
                    // sending them from this thread could block it on a
                    // full socket while the server waits for us to read.
                    let open = engine.lock_unpoisoned().feed(&buf[..n], plain)?;
                    if !open && plain.is_empty() {
                        return Ok(0);
                    }
                }
                let n = out.len().min(plain.len() - *pos);
                out[..n].copy_from_slice(&plain[*pos..*pos + n]);
                *pos += n;
                Ok(n)
            }
        }
    }
}

/// What the server said about the export.
#[derive(Debug, Clone, Copy)]
pub struct ExportInfo {
    /// Whether the connection is encrypted.
    pub tls: bool,
    pub size: u64,
    pub flags: u16,
    /// (minimum, preferred, maximum) from NBD_INFO_BLOCK_SIZE.
    pub block_size: Option<(u32, u32, u32)>,
    pub structured: bool,
    /// The id of `base:allocation`, when the server agreed to it.
    pub meta_context: Option<u32>,
}

/// A failed request or connection: the NBD error value and a message.
#[derive(Debug, Clone)]
pub struct NbdError {
    pub errno: u32,
    pub message: String,
}

impl NbdError {
    fn io(message: impl Into<String>) -> Self {
        NbdError {
            errno: EIO,
            message: message.into(),
        }
    }
}

type R<T> = std::result::Result<T, NbdError>;

fn ioerr(what: &str) -> impl Fn(std::io::Error) -> NbdError + '_ {
    move |e| NbdError::io(format!("{what}: {e}"))
}

/// The result of one request.
#[derive(Debug, Default)]
pub struct Reply {
    /// Read data (for reads), zero-filled where the server sent holes.
    pub data: Vec<u8>,
    /// Block status descriptors (length, flags).
    pub extents: Vec<(u32, u32)>,
}

struct Pending {
    cmd: u16,
    offset: u64,
    reply: Reply,
    error: Option<NbdError>,
    tx: mpsc::Sender<R<Reply>>,
}

pub struct Connection {
    writer: Mutex<Writer>,
    /// A handle on the socket for shutting it down from any thread.
    control: Stream,
    pending: Arc<Mutex<HashMap<u64, Pending>>>,
    /// Set when the connection failed; later requests fail at once.
    dead: Arc<Mutex<Option<String>>>,
    next_cookie: AtomicU64,
    pub info: ExportInfo,
    reader: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn read_exact(s: &mut impl Read, n: usize, what: &str) -> R<Vec<u8>> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).map_err(ioerr(what))?;
    Ok(b)
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

fn send_option(s: &mut impl Write, opt: u32, data: &[u8]) -> R<()> {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m).map_err(ioerr("sending an option"))
}

/// One option reply: (type, payload).  Payloads are bounded.
fn option_reply(s: &mut impl Read, opt: u32) -> R<(u32, Vec<u8>)> {
    let h = read_exact(s, 20, "reading an option reply")?;
    if be64(&h[0..8]) != OPTION_REPLY_MAGIC || be32(&h[8..12]) != opt {
        return Err(NbdError::io("the server sent a malformed option reply"));
    }
    let len = be32(&h[16..20]) as usize;
    if len > 1 << 20 {
        return Err(NbdError::io("the server sent an oversized option reply"));
    }
    Ok((
        be32(&h[12..16]),
        read_exact(s, len, "reading an option reply")?,
    ))
}

fn option_error(what: &str, kind: u32, payload: &[u8]) -> NbdError {
    let msg = String::from_utf8_lossy(payload);
    let why = match kind {
        REP_ERR_UNKNOWN => "unknown export",
        REP_ERR_POLICY => "refused by policy",
        REP_ERR_TLS_REQD => "the server requires TLS",
        REP_ERR_UNSUP => "not supported",
        REP_ERR_INVALID => "invalid",
        REP_ERR_SHUTDOWN => "the server is shutting down",
        _ => "error",
    };
    NbdError::io(format!(
        "{what}: {why}{}{msg}",
        if msg.is_empty() { "" } else { ": " }
    ))
}

fn name_bytes(export: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(&(export.len() as u32).to_be_bytes());
    out.extend_from_slice(export.as_bytes());
}

/// The stream the options travel on: the socket, or TLS over it after
/// STARTTLS.
enum Session {
    Plain(Stream),
    Tls(Box<TlsStream>),
}

/// Say that an error came after the TLS handshake: a server that rejects
/// the client's certificate (or its absence) under TLS 1.3 does so only
/// then, with an alert or by closing (so "connection reset" alone would
/// not tell the user that TLS is the problem).
fn after_tls(e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("the TLS session failed: {e}"))
}

impl Read for Session {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Session::Plain(s) => s.read(buf),
            Session::Tls(t) => t.read(buf).map_err(after_tls),
        }
    }
}

impl Write for Session {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Session::Plain(s) => s.write(buf),
            Session::Tls(t) => t.write(buf).map_err(after_tls),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Session::Plain(s) => s.flush(),
            Session::Tls(t) => t.flush().map_err(after_tls),
        }
    }
}

/// TLS to use for a connection: the mode and, unless it is off, the
/// credentials.
#[derive(Clone, Copy)]
pub struct TlsUse<'a> {
    pub mode: TlsMode,
    pub client: Option<&'a TlsClient>,
}

impl TlsUse<'_> {
    pub const OFF: TlsUse<'static> = TlsUse {
        mode: TlsMode::Off,
        client: None,
    };
}

/// Read the greeting, send our flags, and STARTTLS if asked for.
/// Returns the session and whether the server omits the 124 zero bytes
/// after EXPORT_NAME.
fn begin(mut s: Stream, tls: TlsUse<'_>) -> R<(Session, bool)> {
    let g = read_exact(&mut s, 18, "reading the greeting")?;
    if be64(&g[0..8]) != NBDMAGIC {
        return Err(NbdError::io("not an NBD server"));
    }
    if be64(&g[8..16]) != IHAVEOPT {
        return Err(NbdError::io(
            "the server speaks only the old NBD handshake, which is not supported",
        ));
    }
    let sflags = be16(&g[16..18]);
    if sflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::io("the server does not support fixed newstyle"));
    }
    let no_zeroes = sflags & FLAG_NO_ZEROES != 0;
    let mut cflags = FLAG_C_FIXED_NEWSTYLE;
    if no_zeroes {
        cflags |= FLAG_C_NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes())
        .map_err(ioerr("sending client flags"))?;

    let client = match (tls.mode, tls.client) {
        (TlsMode::Off, _) | (_, None) => return Ok((Session::Plain(s), no_zeroes)),
        (_, Some(c)) => c,
    };
    // NBD has no way to offer TLS: the client asks, and a server without
    // it refuses the option (ERR_UNSUP from most, ERR_POLICY from some).
    send_option(&mut s, OPT_STARTTLS, &[])?;
    let (kind, p) = option_reply(&mut s, OPT_STARTTLS)?;
    match kind {
        REP_ACK => {
            let t = client
                .handshake(s)
                .map_err(|e| NbdError::io(format!("TLS handshake with the server failed: {e}")))?;
            Ok((Session::Tls(Box::new(t)), no_zeroes))
        }
        k if k & (1 << 31) != 0 => {
            let e = option_error("STARTTLS", k, &p);
            if tls.mode == TlsMode::Require {
                return Err(NbdError::io(format!(
                    "{} (tls=require: not continuing without TLS)",
                    e.message
                )));
            }
            tracing::debug!("nbd: {}; tls=on: continuing without TLS", e.message);
            Ok((Session::Plain(s), no_zeroes))
        }
        k => Err(NbdError::io(format!("unexpected reply {k} to STARTTLS"))),
    }
}

/// Structured replies, `base:allocation`, then GO (or EXPORT_NAME).
fn negotiate(s: &mut Session, export: &str, no_zeroes: bool) -> R<ExportInfo> {
    if export.len() > MAX_STRING {
        return Err(NbdError::io("the export name is too long"));
    }
    let tls = matches!(s, Session::Tls(_));
    send_option(s, OPT_STRUCTURED_REPLY, &[])?;
    let structured = option_reply(s, OPT_STRUCTURED_REPLY)?.0 == REP_ACK;

    let mut meta_context = None;
    if structured {
        let mut d = Vec::new();
        name_bytes(export, &mut d);
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&(META_CONTEXT_BASE_ALLOCATION.len() as u32).to_be_bytes());
        d.extend_from_slice(META_CONTEXT_BASE_ALLOCATION.as_bytes());
        send_option(s, OPT_SET_META_CONTEXT, &d)?;
        loop {
            let (kind, p) = option_reply(s, OPT_SET_META_CONTEXT)?;
            match kind {
                REP_META_CONTEXT if p.len() >= 4 => {
                    if &p[4..] == META_CONTEXT_BASE_ALLOCATION.as_bytes() {
                        meta_context = Some(be32(&p[0..4]));
                    }
                }
                REP_ACK => break,
                // Not supported: no block status, but carry on.
                k if k & (1 << 31) != 0 => break,
                _ => return Err(NbdError::io("unexpected reply to SET_META_CONTEXT")),
            }
        }
    }

    let mut d = Vec::new();
    name_bytes(export, &mut d);
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, OPT_GO, &d)?;
    let mut size_flags = None;
    let mut block_size = None;
    loop {
        let (kind, p) = option_reply(s, OPT_GO)?;
        match kind {
            REP_INFO if p.len() >= 2 => match be16(&p[0..2]) {
                INFO_EXPORT if p.len() >= 12 => {
                    size_flags = Some((be64(&p[2..10]), be16(&p[10..12])))
                }
                INFO_BLOCK_SIZE if p.len() >= 14 => {
                    block_size = Some((be32(&p[2..6]), be32(&p[6..10]), be32(&p[10..14])))
                }
                _ => {}
            },
            REP_ACK => break,
            REP_ERR_UNSUP => {
                // An older server: NBD_OPT_EXPORT_NAME ends the haggling.
                send_option(s, OPT_EXPORT_NAME, export.as_bytes())?;
                let n = if no_zeroes { 10 } else { 134 };
                let r = read_exact(s, n, "reading the export")?;
                return Ok(ExportInfo {
                    tls,
                    size: be64(&r[0..8]),
                    flags: be16(&r[8..10]),
                    block_size: None,
                    structured,
                    meta_context,
                });
            }
            k if k & (1 << 31) != 0 => {
                return Err(option_error(&format!("opening export '{export}'"), k, &p))
            }
            _ => {}
        }
    }
    let (size, flags) =
        size_flags.ok_or_else(|| NbdError::io("the server did not describe the export"))?;
    Ok(ExportInfo {
        tls,
        size,
        flags,
        block_size,
        structured,
        meta_context,
    })
}

/// Most exports a listing may have: a server that never ends its list
/// must not make us use unbounded memory.
const MAX_LISTED: usize = 10_000;

/// NBD_OPT_LIST: the server's exports as (name, description), then ABORT.
pub fn list_exports(stream: Stream, tls: TlsUse<'_>) -> R<Vec<(String, String)>> {
    let (mut s, _) = begin(stream, tls)?;
    send_option(&mut s, OPT_LIST, &[])?;
    let mut out = Vec::new();
    loop {
        let (kind, p) = option_reply(&mut s, OPT_LIST)?;
        match kind {
            REP_SERVER => {
                let bad = || NbdError::io("the server sent a malformed export list");
                let n = p.get(0..4).map(be32).ok_or_else(bad)? as usize;
                let name = p
                    .get(4..4usize.checked_add(n).ok_or_else(bad)?)
                    .ok_or_else(bad)?;
                let desc = &p[4 + n..];
                if out.len() == MAX_LISTED {
                    return Err(NbdError::io("the server lists too many exports"));
                }
                out.push((
                    String::from_utf8_lossy(name).into_owned(),
                    String::from_utf8_lossy(desc).into_owned(),
                ));
            }
            REP_ACK => break,
            k if k & (1 << 31) != 0 => return Err(option_error("listing exports", k, &p)),
            _ => {}
        }
    }
    // The reply to ABORT is optional: do not wait for it.
    let _ = send_option(&mut s, OPT_ABORT, &[]);
    Ok(out)
}

/// NBD_OPT_INFO for `export`, asking for its name: the server's canonical
/// name for it (what "" stands for), then ABORT.  A server that does not
/// name exports gets `export` back.
pub fn canonical_name(stream: Stream, tls: TlsUse<'_>, export: &str) -> R<String> {
    if export.len() > MAX_STRING {
        return Err(NbdError::io("the export name is too long"));
    }
    let (mut s, _) = begin(stream, tls)?;
    let mut d = Vec::new();
    name_bytes(export, &mut d);
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&INFO_NAME.to_be_bytes());
    send_option(&mut s, OPT_INFO, &d)?;
    let mut name = export.to_string();
    loop {
        let (kind, p) = option_reply(&mut s, OPT_INFO)?;
        match kind {
            REP_INFO if p.len() >= 2 && be16(&p[0..2]) == INFO_NAME => {
                name = String::from_utf8_lossy(&p[2..]).into_owned();
            }
            REP_ACK => break,
            k if k & (1 << 31) != 0 => {
                return Err(option_error(
                    &format!("asking about export '{export}'"),
                    k,
                    &p,
                ))
            }
            _ => {}
        }
    }
    let _ = send_option(&mut s, OPT_ABORT, &[]);
    Ok(name)
}

impl Connection {
    /// Handshake on `stream` (with STARTTLS unless `tls` is off) and start
    /// the reply reader.
    pub fn open(stream: Stream, export: &str, tls: TlsUse<'_>) -> R<Connection> {
        let (mut session, no_zeroes) = begin(stream, tls)?;
        let info = negotiate(&mut session, export, no_zeroes)?;
        let sock_err = ioerr("socket");
        let (writer, reader, control) = match session {
            Session::Plain(stream) => {
                let reader = Reader::Plain(stream.try_clone().map_err(&sock_err)?);
                let control = stream.try_clone().map_err(&sock_err)?;
                (Mutex::new(Writer::Plain(stream)), reader, control)
            }
            Session::Tls(t) => {
                let (engine, sock, plain) = t.into_parts();
                let engine = Arc::new(Mutex::new(engine));
                let read_sock = sock.try_clone().map_err(&sock_err)?;
                let control = sock.try_clone().map_err(&sock_err)?;
                let writer = Mutex::new(Writer::Tls {
                    sock,
                    engine: engine.clone(),
                });
                let reader = Reader::Tls {
                    sock: read_sock,
                    engine,
                    plain,
                    pos: 0,
                    buf: vec![0u8; 64 << 10],
                };
                (writer, reader, control)
            }
        };
        let pending: Arc<Mutex<HashMap<u64, Pending>>> = Arc::new(Mutex::new(HashMap::new()));
        let dead = Arc::new(Mutex::new(None));
        let (p, d) = (pending.clone(), dead.clone());
        let t = std::thread::Builder::new()
            .name("nbd-reader".into())
            .spawn(move || read_replies(reader, p, d))
            .map_err(ioerr("starting the reply reader"))?;
        Ok(Connection {
            writer,
            control,
            pending,
            dead,
            next_cookie: AtomicU64::new(1),
            info,
            reader: Mutex::new(Some(t)),
        })
    }

    /// Why the connection is unusable, once it is.
    pub fn failed(&self) -> Option<String> {
        self.dead.lock_unpoisoned().clone()
    }

    /// Send one request and wait for its reply.
    pub fn request(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: Option<&[u8]>,
    ) -> R<Reply> {
        if let Some(why) = self.dead.lock_unpoisoned().clone() {
            return Err(NbdError::io(format!("the NBD connection is closed: {why}")));
        }
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        let data = if cmd == CMD_READ {
            vec![0u8; len as usize]
        } else {
            Vec::new()
        };
        self.pending.lock_unpoisoned().insert(
            cookie,
            Pending {
                cmd,
                offset,
                reply: Reply {
                    data,
                    extents: Vec::new(),
                },
                error: None,
                tx,
            },
        );
        let mut h = Vec::with_capacity(28 + payload.map_or(0, |p| p.len()));
        h.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h.extend_from_slice(&flags.to_be_bytes());
        h.extend_from_slice(&cmd.to_be_bytes());
        h.extend_from_slice(&cookie.to_be_bytes());
        h.extend_from_slice(&offset.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        let sent = self
            .writer
            .lock_unpoisoned()
            .send(&[&h, payload.unwrap_or_default()]);
        if let Err(e) = sent {
            self.pending.lock_unpoisoned().remove(&cookie);
            self.control.shutdown();
            return Err(NbdError::io(format!("sending a request: {e}")));
        }
        match rx.recv() {
            Ok(r) => r,
            Err(_) => Err(NbdError::io("the NBD connection closed")),
        }
    }

    /// Say goodbye and stop the reader.
    pub fn close(&self) {
        let mut h = Vec::with_capacity(28);
        h.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h.extend_from_slice(&0u16.to_be_bytes());
        h.extend_from_slice(&CMD_DISC.to_be_bytes());
        h.extend_from_slice(&[0u8; 20]);
        {
            let mut w = self.writer.lock_unpoisoned();
            let _ = w.send(&[&h]);
            w.close_tls();
        }
        self.control.shutdown();
        if let Some(t) = self.reader.lock_unpoisoned().take() {
            let _ = t.join();
        }
    }
}

/// The reader thread: replies until the connection ends, then fail
/// whatever is still waiting.
fn read_replies(
    mut s: Reader,
    pending: Arc<Mutex<HashMap<u64, Pending>>>,
    dead: Arc<Mutex<Option<String>>>,
) {
    let why = loop {
        if let Err(e) = read_one(&mut s, &pending) {
            break e.message;
        }
    };
    *dead.lock_unpoisoned() = Some(why.clone());
    for (_, p) in pending.lock_unpoisoned().drain() {
        let _ = p.tx.send(Err(NbdError::io(format!(
            "the NBD connection failed: {why}"
        ))));
    }
}

fn finish(pending: &Mutex<HashMap<u64, Pending>>, cookie: u64) {
    if let Some(p) = pending.lock_unpoisoned().remove(&cookie) {
        let r = match p.error {
            Some(e) => Err(e),
            None => Ok(p.reply),
        };
        let _ = p.tx.send(r);
    }
}

fn read_one(s: &mut Reader, pending: &Mutex<HashMap<u64, Pending>>) -> R<()> {
    let magic = be32(&read_exact(s, 4, "reading a reply")?);
    match magic {
        SIMPLE_REPLY_MAGIC => {
            let h = read_exact(s, 12, "reading a reply")?;
            let (error, cookie) = (be32(&h[0..4]), be64(&h[4..12]));
            let read_len = {
                let mut map = pending.lock_unpoisoned();
                let p = map
                    .get_mut(&cookie)
                    .ok_or_else(|| NbdError::io(format!("reply to unknown cookie {cookie}")))?;
                if error != 0 {
                    p.error = Some(NbdError {
                        errno: error,
                        message: String::new(),
                    });
                }
                (p.cmd == CMD_READ && error == 0).then_some(p.reply.data.len())
            };
            if let Some(n) = read_len {
                let data = read_exact(s, n, "reading data")?;
                if let Some(p) = pending.lock_unpoisoned().get_mut(&cookie) {
                    p.reply.data.copy_from_slice(&data);
                }
            }
            finish(pending, cookie);
            Ok(())
        }
        STRUCTURED_REPLY_MAGIC => {
            let h = read_exact(s, 16, "reading a reply")?;
            let (flags, kind, cookie, len) = (
                be16(&h[0..2]),
                be16(&h[2..4]),
                be64(&h[4..12]),
                be32(&h[12..16]),
            );
            if len > (64 << 20) {
                return Err(NbdError::io("the server sent an oversized reply chunk"));
            }
            let payload = read_exact(s, len as usize, "reading a reply chunk")?;
            {
                let mut map = pending.lock_unpoisoned();
                let p = map
                    .get_mut(&cookie)
                    .ok_or_else(|| NbdError::io(format!("reply to unknown cookie {cookie}")))?;
                chunk(p, kind, &payload)?;
            }
            if flags & REPLY_FLAG_DONE != 0 {
                finish(pending, cookie);
            }
            Ok(())
        }
        m => Err(NbdError::io(format!("bad reply magic {m:#x}"))),
    }
}

/// Apply one structured reply chunk to its request.
fn chunk(p: &mut Pending, kind: u16, b: &[u8]) -> R<()> {
    let bad = || NbdError::io("the server sent a malformed reply chunk");
    match kind {
        REPLY_TYPE_NONE => {}
        REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
            if p.cmd != CMD_READ || b.len() < 8 {
                return Err(bad());
            }
            let off = be64(&b[0..8]);
            let (n, data) = if kind == REPLY_TYPE_OFFSET_DATA {
                (b.len() as u64 - 8, Some(&b[8..]))
            } else {
                if b.len() != 12 {
                    return Err(bad());
                }
                (be32(&b[8..12]) as u64, None)
            };
            let start = off.checked_sub(p.offset).ok_or_else(bad)?;
            let end = start.checked_add(n).ok_or_else(bad)?;
            if end > p.reply.data.len() as u64 {
                return Err(bad());
            }
            let out = &mut p.reply.data[start as usize..end as usize];
            match data {
                Some(d) => out.copy_from_slice(d),
                None => out.fill(0),
            }
        }
        REPLY_TYPE_BLOCK_STATUS => {
            if p.cmd != CMD_BLOCK_STATUS || b.len() < 4 || !(b.len() - 4).is_multiple_of(8) {
                return Err(bad());
            }
            for d in b[4..].chunks(8) {
                p.reply.extents.push((be32(&d[0..4]), be32(&d[4..8])));
            }
        }
        REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
            if b.len() < 6 {
                return Err(bad());
            }
            let errno = be32(&b[0..4]);
            let mlen = be16(&b[4..6]) as usize;
            let msg = b.get(6..6 + mlen).ok_or_else(bad)?;
            if p.error.is_none() {
                p.error = Some(NbdError {
                    errno: if errno == 0 { EIO } else { errno },
                    message: String::from_utf8_lossy(msg).into_owned(),
                });
            }
        }
        // Unknown informational chunks may be ignored; unknown errors not.
        k if k & (1 << 15) != 0 => {
            p.error
                .get_or_insert(NbdError::io(format!("unknown error chunk type {k}")));
        }
        _ => {}
    }
    Ok(())
}
