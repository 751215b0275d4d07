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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use nbdkit_proto::consts::*;
use nbdkit_proto::option::{
    parse_export_name_reply, parse_rep_meta_context, parse_rep_server, Greeting, InfoReply,
    OptionReplyHeader, OptionRequest,
};
use nbdkit_proto::{ReplyChunk, ReplyHeader, RequestHeader, EXTENDED_HEADER_LEN};

use super::socket::Stream;
use super::tls::{Engine, TlsClient, TlsMode, TlsStream};

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
    /// The id of `qemu:allocation-depth` (qemu-nbd -A, nbdkit-rs), when
    /// the server agreed to it.
    pub depth_context: Option<u32>,
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
    /// Block status descriptors (context id, length, flags), in the
    /// order the chunks came.
    pub extents: Vec<(u32, u32, u32)>,
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

fn send_option(s: &mut impl Write, opt: &OptionRequest) -> R<()> {
    s.write_all(&opt.encode())
        .map_err(ioerr("sending an option"))
}

/// One option reply: (type, payload).  Payloads are bounded.
fn option_reply(s: &mut impl Read, opt: u32) -> R<(u32, Vec<u8>)> {
    let h = read_exact(s, OptionReplyHeader::LEN, "reading an option reply")?;
    let h = match OptionReplyHeader::parse(&h) {
        Ok(h) if h.option == opt => h,
        _ => return Err(NbdError::io("the server sent a malformed option reply")),
    };
    if h.length > 1 << 20 {
        return Err(NbdError::io("the server sent an oversized option reply"));
    }
    Ok((
        h.reply,
        read_exact(s, h.length as usize, "reading an option reply")?,
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

/// NBD_OPT_INFO (or GO) for `export`, asking for one kind of information.
fn info(go: bool, export: &str, request: u16) -> OptionRequest {
    OptionRequest::Info {
        go,
        name: export.to_string(),
        requests: vec![request],
    }
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
    let g = read_exact(&mut s, Greeting::LEN, "reading the greeting")?;
    let sflags = match Greeting::parse(&g) {
        Ok(Greeting::Newstyle(flags)) => flags,
        Ok(Greeting::Oldstyle) => {
            return Err(NbdError::io(
                "the server speaks only the old NBD handshake, which is not supported",
            ))
        }
        Err(_) => return Err(NbdError::io("not an NBD server")),
    };
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
    send_option(&mut s, &OptionRequest::StartTls)?;
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

/// Structured replies, `base:allocation` and `qemu:allocation-depth`,
/// then GO (or EXPORT_NAME).
fn negotiate(s: &mut Session, export: &str, no_zeroes: bool) -> R<ExportInfo> {
    if export.len() > MAX_STRING {
        return Err(NbdError::io("the export name is too long"));
    }
    let tls = matches!(s, Session::Tls(_));
    send_option(s, &OptionRequest::StructuredReply)?;
    let structured = option_reply(s, OPT_STRUCTURED_REPLY)?.0 == REP_ACK;

    let mut meta_context = None;
    let mut depth_context = None;
    if structured {
        // A server without the depth context just leaves it out of its
        // replies (the spec lets it skip what it does not know).
        let set = OptionRequest::MetaContext {
            set: true,
            export: export.to_string(),
            queries: vec![
                META_CONTEXT_BASE_ALLOCATION.to_string(),
                META_CONTEXT_ALLOCATION_DEPTH.to_string(),
            ],
        };
        send_option(s, &set)?;
        loop {
            let (kind, p) = option_reply(s, OPT_SET_META_CONTEXT)?;
            match kind {
                REP_META_CONTEXT if p.len() >= 4 => {
                    let (id, name) = parse_rep_meta_context(&p)
                        .map_err(|_| NbdError::io("unexpected reply to SET_META_CONTEXT"))?;
                    if name == META_CONTEXT_BASE_ALLOCATION.as_bytes() {
                        meta_context = Some(id);
                    } else if name == META_CONTEXT_ALLOCATION_DEPTH.as_bytes() {
                        depth_context = Some(id);
                    }
                }
                REP_ACK => break,
                // Not supported: no block status, but carry on.
                k if k & (1 << 31) != 0 => break,
                _ => return Err(NbdError::io("unexpected reply to SET_META_CONTEXT")),
            }
        }
    }

    send_option(s, &info(true, export, INFO_BLOCK_SIZE))?;
    let mut size_flags = None;
    let mut block_size = None;
    loop {
        let (kind, p) = option_reply(s, OPT_GO)?;
        match kind {
            // Information this client cannot read is skipped, as unknown
            // information is.
            REP_INFO => match InfoReply::parse(&p) {
                Ok(InfoReply::Export { size, flags }) => size_flags = Some((size, flags)),
                Ok(InfoReply::BlockSize {
                    minimum,
                    preferred,
                    maximum,
                }) => block_size = Some((minimum, preferred, maximum)),
                _ => {}
            },
            REP_ACK => break,
            REP_ERR_UNSUP => {
                // An older server: NBD_OPT_EXPORT_NAME ends the haggling.
                send_option(s, &OptionRequest::ExportName(export.to_string()))?;
                let n = if no_zeroes { 10 } else { 134 };
                let r = read_exact(s, n, "reading the export")?;
                let (size, flags) = parse_export_name_reply(&r)
                    .map_err(|e| NbdError::io(format!("reading the export: {e}")))?;
                return Ok(ExportInfo {
                    tls,
                    size,
                    flags,
                    block_size: None,
                    structured,
                    meta_context,
                    depth_context,
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
        depth_context,
    })
}

/// Most exports a listing may have: a server that never ends its list
/// must not make us use unbounded memory.
const MAX_LISTED: usize = 10_000;

/// NBD_OPT_LIST: the server's exports as (name, description), then ABORT.
pub fn list_exports(stream: Stream, tls: TlsUse<'_>) -> R<Vec<(String, String)>> {
    let (mut s, _) = begin(stream, tls)?;
    send_option(&mut s, &OptionRequest::List)?;
    let mut out = Vec::new();
    loop {
        let (kind, p) = option_reply(&mut s, OPT_LIST)?;
        match kind {
            REP_SERVER => {
                let (name, desc) = parse_rep_server(&p)
                    .map_err(|_| NbdError::io("the server sent a malformed export list"))?;
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
    let _ = send_option(&mut s, &OptionRequest::Abort);
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
    send_option(&mut s, &info(false, export, INFO_NAME))?;
    let mut name = export.to_string();
    loop {
        let (kind, p) = option_reply(&mut s, OPT_INFO)?;
        match kind {
            REP_INFO => {
                if let Ok(InfoReply::Name(n)) = InfoReply::parse(&p) {
                    name = String::from_utf8_lossy(n).into_owned();
                }
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
    let _ = send_option(&mut s, &OptionRequest::Abort);
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
        let h = RequestHeader {
            flags,
            command: cmd,
            cookie,
            offset,
            length: len as u64,
        }
        .encode(false);
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
        let h = RequestHeader {
            flags: 0,
            command: CMD_DISC,
            cookie: 0,
            offset: 0,
            length: 0,
        }
        .encode(false);
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

/// The next reply header: simple, or a structured chunk's (extended
/// headers are never asked for, so never accepted).
fn read_header(s: &mut Reader) -> R<ReplyHeader> {
    let mut h = read_exact(s, 4, "reading a reply")?;
    let bad_magic = |h: &[u8]| {
        NbdError::io(format!(
            "bad reply magic {:#x}",
            u32::from_be_bytes([h[0], h[1], h[2], h[3]])
        ))
    };
    let need = match ReplyHeader::parse(&h) {
        Err(nbdkit_proto::ProtoError::Short { need, .. }) if need != EXTENDED_HEADER_LEN => need,
        _ => return Err(bad_magic(&h)),
    };
    h.extend_from_slice(&read_exact(s, need - 4, "reading a reply")?);
    ReplyHeader::parse(&h)
        .map(|(h, _)| h)
        .map_err(|_| bad_magic(&h))
}

fn read_one(s: &mut Reader, pending: &Mutex<HashMap<u64, Pending>>) -> R<()> {
    match read_header(s)? {
        ReplyHeader::Simple { error, cookie } => {
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
        ReplyHeader::Chunk {
            flags,
            kind,
            cookie,
            length,
            ..
        } => {
            if length > (64 << 20) {
                return Err(NbdError::io("the server sent an oversized reply chunk"));
            }
            let payload = read_exact(s, length as usize, "reading a reply chunk")?;
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
    }
}

/// Apply one structured reply chunk to its request.
fn chunk(p: &mut Pending, kind: u16, b: &[u8]) -> R<()> {
    let bad = || NbdError::io("the server sent a malformed reply chunk");
    match ReplyChunk::parse(kind, b).map_err(|_| bad())? {
        ReplyChunk::None => {}
        ReplyChunk::OffsetData { offset, data } if p.cmd == CMD_READ => {
            place(p, offset, data.len() as u64, Some(data)).ok_or_else(bad)?
        }
        ReplyChunk::OffsetHole { offset, length } if p.cmd == CMD_READ => {
            place(p, offset, length as u64, None).ok_or_else(bad)?
        }
        ReplyChunk::OffsetData { .. } | ReplyChunk::OffsetHole { .. } => return Err(bad()),
        // 64-bit descriptors come only with extended headers, which this
        // client does not ask for.
        ReplyChunk::BlockStatus { .. } if kind == REPLY_TYPE_BLOCK_STATUS_EXT => {}
        ReplyChunk::BlockStatus {
            context,
            descriptors,
        } if p.cmd == CMD_BLOCK_STATUS => p.reply.extents.extend(
            descriptors
                .iter()
                .map(|&(len, flags)| (context, len as u32, flags as u32)),
        ),
        ReplyChunk::BlockStatus { .. } => return Err(bad()),
        ReplyChunk::Error { error, message, .. } => {
            if p.error.is_none() {
                p.error = Some(NbdError {
                    errno: if error == 0 { EIO } else { error },
                    message: String::from_utf8_lossy(message).into_owned(),
                });
            }
        }
        // Unknown informational chunks may be ignored; unknown errors not.
        ReplyChunk::Unknown(k) if ReplyChunk::is_error(k) => {
            p.error
                .get_or_insert(NbdError::io(format!("unknown error chunk type {k}")));
        }
        ReplyChunk::Unknown(_) => {}
    }
    Ok(())
}

/// Copy read data (or zeroes for a hole) for `[offset, offset+n)` into
/// the request's buffer; None when the range is not within the request.
fn place(p: &mut Pending, offset: u64, n: u64, data: Option<&[u8]>) -> Option<()> {
    let start = offset.checked_sub(p.offset)?;
    let end = start.checked_add(n)?;
    let out = p
        .reply
        .data
        .get_mut(start as usize..usize::try_from(end).ok()?)?;
    match data {
        Some(d) => out.copy_from_slice(d),
        None => out.fill(0),
    }
    Some(())
}
