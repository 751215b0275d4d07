//! The transmission phase: read requests, run them in parallel (up to `-t`
//! per connection), and write replies as they finish, in any order.
//!
//! Plain TCP and Unix sockets use the threaded path, [`serve_threaded`]:
//! the connection gets `-t` worker threads that take turns reading a
//! request, then each runs its request and writes the reply itself.  A
//! request therefore never changes threads, which keeps latency at one
//! system call each way (handing requests from an async reader to a thread
//! pool cost about 15 µs per request here).  Other streams (stdin/stdout,
//! TLS) use the async path, [`serve`]: one reader task per connection
//! hands requests to tokio's blocking pool, up to `-t` at once.
//!
//! Both paths frame requests with [`read_request`] (header, then the
//! payload, read or skipped, even for a request about to be refused, so
//! the stream stays in step), refuse with [`refusal`], run with [`run`] or
//! [`read_into`], and build replies with `nbdkit_proto`.

use std::sync::Arc;

use nbdkit_backend::{
    is_zero, Client, DirectPiece, DirectRead, Error, ErrorKind, LockExt, ZeroFlags,
};
use nbdkit_proto::request::RequestHeader;
use nbdkit_proto::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::export::{Export, Op, MAX_PAYLOAD};
use crate::handshake::{Negotiated, BASE_ALLOCATION_ID};
use crate::server::Server;
use crate::stream::{BlockingSocket, ConnectionError, Stream};

type Writer = Arc<Mutex<tokio::io::WriteHalf<Box<dyn Stream>>>>;

/// Serve requests until the client disconnects, sends DISC, breaks the
/// protocol, or the server shuts down.  In-flight requests always finish.
pub async fn serve(
    server: Arc<Server>,
    stream: Box<dyn Stream>,
    neg: Negotiated,
    client: &Arc<Client>,
    shutdown: CancellationToken,
) -> Result<(), ConnectionError> {
    let conn = client.id();
    // Cancelled on server shutdown, or when a backend drops this client
    // (Client::request_disconnect, or an Error::disconnect reply) while the
    // reader waits.
    let stop = shutdown.child_token();
    let extended = neg.style == ReplyStyle::Extended;
    let (mut rd, wr) = tokio::io::split(stream);
    let wr: Writer = Arc::new(Mutex::new(wr));
    let in_flight = Arc::new(Semaphore::new(server.request_slots()));
    let tasks = TaskTracker::new();

    let result = loop {
        // Take a slot before reading the next request, so a client that
        // floods requests (or never reads replies) is held to `-t` requests
        // in memory.
        let permit = tokio::select! {
            p = in_flight.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = stop.cancelled() => break Ok(()),
        };
        let read = tokio::select! {
            r = read_request(&mut rd, extended, conn) => r,
            _ = stop.cancelled() => break Ok(()),
        };
        let (h, payload) = match read {
            Ok(Some(req)) => req,
            Ok(None) => {
                debug!(conn, "client closed the connection");
                break Ok(());
            }
            Err(e) => break Err(e),
        };

        let op = match neg
            .export
            .validate(&h, neg.style.is_structured(), extended, neg.meta)
        {
            Ok(op) => op,
            Err(e) => {
                debug!(conn, cookie = h.cookie, "refused: {e}");
                let bytes = refusal(neg.style, h.cookie, h.offset, &e);
                if let Err(e) = write(&wr, &bytes).await {
                    break Err(e.into());
                }
                continue;
            }
        };
        if op.command == CMD_DISC {
            debug!(conn, "client sent NBD_CMD_DISC");
            break Ok(());
        }

        let export = neg.export.clone();
        let wr = wr.clone();
        let server2 = server.clone();
        let style = neg.style;
        let cookie = h.cookie;
        let client2 = client.clone();
        let stop2 = stop.clone();
        tasks.spawn(async move {
            let reply = match server2
                .blocking(&client2, move || run(&export, op, payload, style, cookie))
                .await
            {
                Ok(reply) => reply,
                Err(e) if e.disconnects() => {
                    warn!(conn, "closing the connection: {e}");
                    stop2.cancel();
                    let _ = wr.lock().await.shutdown().await;
                    return;
                }
                Err(e) => refusal(style, cookie, op.offset, &e),
            };
            if let Err(e) = write(&wr, &reply).await {
                debug!(conn, "writing reply failed: {e}");
            }
            drop(permit);
            if client2.disconnect_requested() {
                debug!(conn, "the backend asked to disconnect this client");
                stop2.cancel();
            }
        });
    };

    tasks.close();
    tasks.wait().await;
    let mut w = wr.lock().await;
    let _ = w.flush().await;
    let _ = w.shutdown().await;
    // The handle closes here: let the backend's close see its client.
    let _c = client.enter();
    drop(neg);
    result
}

/// How long in-flight requests get to finish when the server shuts down.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// The reading side, shared by the workers of one connection.
struct ReadSide {
    sock: BlockingSocket,
    /// Set once the client has left, sent DISC, or broken the protocol:
    /// workers stop taking requests.
    done: bool,
    error: Option<ConnectionError>,
}

/// Serve requests on a blocking socket with `-t` worker threads.
pub async fn serve_threaded(
    server: Arc<Server>,
    sock: BlockingSocket,
    neg: Negotiated,
    client: &Arc<Client>,
    shutdown: CancellationToken,
) -> Result<(), ConnectionError> {
    let conn = client.id();
    let client = client.clone();
    sock.set_blocking()?;
    let waker = sock.try_clone()?;
    let closer = sock.try_clone()?;
    let writer = std::sync::Mutex::new(sock.try_clone()?);
    let reader = std::sync::Mutex::new(ReadSide {
        sock,
        done: false,
        error: None,
    });
    let workers = server.request_slots();
    let srv = server.clone();
    let mut job = tokio::task::spawn_blocking(move || {
        let _c = client.enter();
        std::thread::scope(|scope| {
            for _ in 1..workers {
                std::thread::Builder::new()
                    .name(format!("nbd-conn-{conn}"))
                    .stack_size(256 * 1024)
                    .spawn_scoped(scope, || {
                        worker(&srv, &neg, &reader, &writer, &closer, &client)
                    })
                    .map(drop)
                    .unwrap_or_else(|e| warn!(conn, "cannot start a worker thread: {e}"));
            }
            worker(&srv, &neg, &reader, &writer, &closer, &client);
        });
        // The handle closes here, on a thread where `client` is current.
        drop(neg);
        writer.lock_unpoisoned().shutdown(std::net::Shutdown::Write);
        let mut r = reader.into_inner().unwrap_or_else(|e| e.into_inner());
        r.error.take().map_or(Ok(()), Err)
    });
    tokio::select! {
        r = &mut job => r.unwrap_or_else(|e| Err(ConnectionError::Protocol(format!("worker failed: {e}")))),
        _ = shutdown.cancelled() => {
            // Workers finish what they are running; blocked reads see EOF.
            waker.shutdown(std::net::Shutdown::Read);
            // A client that stopped reading its replies could block a
            // worker's write forever: after a grace period, cut it off.
            let finished = match tokio::time::timeout(SHUTDOWN_GRACE, &mut job).await {
                Ok(r) => r,
                Err(_) => {
                    warn!(conn, "client is not reading its replies; closing the connection");
                    waker.shutdown(std::net::Shutdown::Both);
                    job.await
                }
            };
            finished.unwrap_or_else(|e| Err(ConnectionError::Protocol(format!("worker failed: {e}"))))
        }
    }
}

/// One worker: take the read lock, read a request, let go, run it, write
/// its reply.
fn worker(
    server: &Server,
    neg: &Negotiated,
    reader: &std::sync::Mutex<ReadSide>,
    writer: &std::sync::Mutex<BlockingSocket>,
    closer: &BlockingSocket,
    client: &Arc<Client>,
) {
    use std::io::Write;
    let _c = client.enter();
    let conn = client.id();
    let extended = neg.style == ReplyStyle::Extended;
    // This worker's read buffer, reused so that reads do not allocate and
    // fault in fresh pages every time.
    let mut scratch = Vec::new();
    while let Some((h, payload)) = take_request(reader, extended, client) {
        let valid = neg
            .export
            .validate(&h, neg.style.is_structured(), extended, neg.meta);
        if let Ok(op) = &valid {
            if op.command == CMD_READ && op.length >= DIRECT_MIN {
                match read_direct(server, neg, h.cookie, op, writer) {
                    Direct::NotPossible => {}
                    Direct::Sent => {
                        if client.disconnect_requested() {
                            debug!(conn, "the backend asked to disconnect this client");
                            closer.shutdown(std::net::Shutdown::Read);
                            reader.lock_unpoisoned().done = true;
                            return;
                        }
                        continue;
                    }
                    Direct::Failed(e) => {
                        // Part of a reply may be out: the stream is lost.
                        warn!(
                            conn,
                            "sending read data failed: {e}; closing the connection"
                        );
                        closer.shutdown(std::net::Shutdown::Both);
                        reader.lock_unpoisoned().done = true;
                        return;
                    }
                }
            }
        }
        let reply = match valid {
            Ok(op) if op.command == CMD_READ => {
                server.locked(|| read_into(&neg.export, op, neg.style, h.cookie, &mut scratch))
            }
            Ok(op) => server
                .locked(|| run(&neg.export, op, payload, neg.style, h.cookie))
                .map(Reply::Owned),
            Err(e) => {
                debug!(conn, cookie = h.cookie, "refused: {e}");
                Ok(Reply::Owned(refusal(neg.style, h.cookie, h.offset, &e)))
            }
        };
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                // No reply: the other workers' reads see end-of-file and
                // their writes fail, so they stop too.
                warn!(conn, "closing the connection: {e}");
                closer.shutdown(std::net::Shutdown::Both);
                return;
            }
        };
        let bytes = match &reply {
            Reply::InBuffer(n) => &scratch[..*n],
            Reply::Owned(v) => &v[..],
        };
        let mut w = writer.lock_unpoisoned();
        if let Err(e) = w.write_all(bytes) {
            debug!(conn, "writing reply failed: {e}");
            drop(w);
            reader.lock_unpoisoned().done = true;
            return;
        }
        if client.disconnect_requested() {
            debug!(conn, "the backend asked to disconnect this client");
            // Workers blocked reading the next request see EOF.
            w.shutdown(std::net::Shutdown::Read);
            drop(w);
            reader.lock_unpoisoned().done = true;
            return;
        }
        drop(w);
        if scratch.len() > KEEP_BUFFER {
            // A rare huge read: let its buffer go rather than keep it.
            scratch = Vec::new();
        }
    }
}

/// Under the read lock, read the next request for a worker; None when the
/// worker should stop (the client left, sent DISC or broke the protocol,
/// or a backend asked to end the connection).
fn take_request(
    reader: &std::sync::Mutex<ReadSide>,
    extended: bool,
    client: &Client,
) -> Option<(RequestHeader, Vec<u8>)> {
    let conn = client.id();
    let mut r = reader.lock_unpoisoned();
    if r.done {
        return None;
    }
    match now(read_request(&mut r.sock, extended, conn)) {
        Ok(Some((h, _))) if h.command == CMD_DISC => {
            debug!(conn, "client sent NBD_CMD_DISC");
            r.done = true;
            None
        }
        // A backend asked to end this connection while the request
        // was on its way: it is not served (nor answered).
        Ok(Some(_)) if client.disconnect_requested() => {
            debug!(
                conn,
                "not serving a request read after a disconnect was asked for"
            );
            r.done = true;
            None
        }
        Ok(Some(req)) => Some(req),
        Ok(None) => {
            debug!(conn, "client closed the connection");
            r.done = true;
            None
        }
        Err(e) => {
            r.done = true;
            r.error = Some(e);
            None
        }
    }
}

/// What became of a read offered to [`read_direct`].
enum Direct {
    /// The backend cannot say where the bytes are: read them as usual.
    NotPossible,
    Sent,
    /// Writing failed part way: the connection is lost.
    Failed(std::io::Error),
}

/// Send a large read's reply straight from the backend's file, if its
/// handle can say where the bytes are.  The reply is written under the
/// thread model's lock, as the data is read from the file while it goes.
fn read_direct(
    server: &Server,
    neg: &Negotiated,
    cookie: u64,
    op: &Op,
    writer: &std::sync::Mutex<BlockingSocket>,
) -> Direct {
    let sent = server.locked(|| {
        let d = neg.export.read_direct(op.offset, op.length)?;
        let mut w = writer.lock_unpoisoned();
        Some(send_direct(&mut w, neg.style, cookie, op.offset, &d))
    });
    match sent {
        None => Direct::NotPossible,
        Some(Ok(())) => Direct::Sent,
        Some(Err(e)) => Direct::Failed(e),
    }
}

/// Run one validated request and build its whole reply.  An error comes
/// back only when the backend asked to drop the connection
/// ([`Error::disconnects`]); every other error becomes an error reply.
fn run(
    export: &Export,
    op: Op,
    payload: Vec<u8>,
    style: ReplyStyle,
    cookie: u64,
) -> nbdkit_backend::Result<Vec<u8>> {
    let fua = op.flags & CMD_FLAG_FUA != 0;
    let result = match op.command {
        CMD_READ => {
            // A buffer of the reply's size, handed over whole (no copy).
            let mut buf = Vec::new();
            return read_into(export, op, style, cookie, &mut buf).map(|r| match r {
                Reply::InBuffer(n) => {
                    buf.truncate(n);
                    buf
                }
                Reply::Owned(v) => v,
            });
        }
        CMD_WRITE => export.write(&payload, op.offset, fua),
        CMD_FLUSH => export.flush(),
        CMD_TRIM => export.trim(op.offset, op.length, fua),
        CMD_WRITE_ZEROES => export.zero(
            op.offset,
            op.length,
            ZeroFlags {
                may_trim: op.flags & CMD_FLAG_NO_HOLE == 0,
                fua,
                fast: op.flags & CMD_FLAG_FAST_ZERO != 0,
            },
        ),
        CMD_CACHE => export.cache(op.offset, op.length),
        CMD_BLOCK_STATUS => {
            let req_one = op.flags & CMD_FLAG_REQ_ONE != 0;
            let wide = style == ReplyStyle::Extended;
            return Ok(
                match export.block_status(op.offset, op.length, req_one, wide) {
                    Ok(list) => block_status_chunk(
                        style,
                        cookie,
                        op.offset,
                        BASE_ALLOCATION_ID,
                        &list,
                        true,
                    ),
                    Err(e) if e.disconnects() => return Err(e),
                    Err(e) => failure(style, cookie, op, e),
                },
            );
        }
        other => Err(Error::invalid(format!("unknown command {other}"))),
    };
    Ok(match result {
        Ok(()) => ok_reply(style, cookie, op.offset),
        Err(e) if e.disconnects() => return Err(e),
        Err(e) => failure(style, cookie, op, e),
    })
}

fn failure(style: ReplyStyle, cookie: u64, op: Op, e: Error) -> Vec<u8> {
    if e.kind() == ErrorKind::Io {
        warn!(
            "{} at offset {} length {}: {e}",
            command_name(op.command),
            op.offset,
            op.length
        );
    } else {
        debug!("{} failed: {e}", command_name(op.command));
    }
    refusal(style, cookie, op.offset, &e)
}

/// The error reply for a request that failed or was refused.
fn refusal(style: ReplyStyle, cookie: u64, offset: u64, e: &Error) -> Vec<u8> {
    error_reply(style, cookie, offset, e.kind().nbd_error(), &e.to_string())
}

/// A read's reply: in the caller's buffer (its first `n` bytes), or a
/// reply of its own (an error, or a hole chunk).
enum Reply {
    InBuffer(usize),
    Owned(Vec<u8>),
}

/// Read into `buf` after room for the reply header, so the data is never
/// copied, and return the whole reply.  A read of all zeroes goes out as a
/// hole chunk when structured replies allow it.  `buf` is grown as needed
/// (a worker keeps it for the next read, up to [`KEEP_BUFFER`]).  Errors
/// become error replies, except one that asks to drop the connection.
fn read_into(
    export: &Export,
    op: Op,
    style: ReplyStyle,
    cookie: u64,
    buf: &mut Vec<u8>,
) -> nbdkit_backend::Result<Reply> {
    let hl = read_data_header_len(style);
    let n = hl + op.length as usize;
    if buf.len() < n {
        buf.resize(n, 0);
    }
    match export.read(&mut buf[hl..n], op.offset) {
        Err(e) if e.disconnects() => return Err(e),
        Err(e) => return Ok(Reply::Owned(failure(style, cookie, op, e))),
        Ok(()) => {}
    }
    if style.is_structured() && is_zero(&buf[hl..n]) {
        return Ok(Reply::Owned(hole_chunk(
            style,
            cookie,
            op.offset,
            op.length as u32,
            true,
        )));
    }
    buf[..hl].copy_from_slice(&read_data_header(style, cookie, op.offset, op.length, true));
    Ok(Reply::InBuffer(n))
}

/// Reads at least this long are sent straight from the backend's file
/// with `sendfile` when it can say where their bytes are
/// ([`nbdkit_backend::direct`]).  Shorter ones are cheaper to copy, and
/// keep the zero check that turns a read of zeroes into a hole chunk.
const DIRECT_MIN: u64 = 64 * 1024;

/// Zeroes to send where a direct read has a hole and the reply cannot say
/// so (simple replies), or where the file turned out shorter.
static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

fn write_zeroes(w: &mut BlockingSocket, mut len: u64) -> std::io::Result<()> {
    use std::io::Write;
    while len > 0 {
        let n = len.min(ZEROES.len() as u64) as usize;
        w.write_all(&ZEROES[..n])?;
        len -= n as u64;
    }
    Ok(())
}

/// `len` bytes of `file` at `offset` to the socket, with sendfile.  If the
/// file ends first (it shrank), the rest goes out as zeroes, as a short
/// pread reads.
fn send_file(
    w: &mut BlockingSocket,
    file: std::os::fd::BorrowedFd<'_>,
    offset: u64,
    len: u64,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut off = offset as libc::off_t;
    let mut left = len;
    while left > 0 {
        let chunk = left.min(1 << 30) as usize;
        // SAFETY: both descriptors are open for the call; `off` is ours.
        let n = unsafe { libc::sendfile(w.fd().as_raw_fd(), file.as_raw_fd(), &mut off, chunk) };
        match n {
            0 => return write_zeroes(w, left),
            n if n > 0 => left -= n as u64,
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Send the whole reply of a read whose bytes are described by `d`: a
/// simple reply and the data, or one chunk per piece (data chunks sent
/// from the file, hole chunks for zeroes).
fn send_direct(
    w: &mut BlockingSocket,
    style: ReplyStyle,
    cookie: u64,
    offset: u64,
    d: &DirectRead<'_>,
) -> std::io::Result<()> {
    let structured = style.is_structured();
    if !structured {
        w.write_more(&simple_reply(0, cookie))?;
    }
    let mut pos = offset;
    for (i, piece) in d.pieces.iter().enumerate() {
        let done = i + 1 == d.pieces.len();
        match *piece {
            DirectPiece::Zero { len } if structured => {
                w.write_more(&hole_chunk(style, cookie, pos, len as u32, done))?
            }
            DirectPiece::Zero { len } => write_zeroes(w, len)?,
            DirectPiece::File { offset: at, len } => {
                if structured {
                    w.write_more(&read_data_header(style, cookie, pos, len, done))?;
                }
                send_file(w, d.fd, at, len)?;
            }
        }
        pos += piece.len();
    }
    Ok(())
}

/// Largest read buffer a worker keeps between requests.
const KEEP_BUFFER: usize = 4 << 20;

async fn write(wr: &Writer, bytes: &[u8]) -> std::io::Result<()> {
    let mut w = wr.lock().await;
    w.write_all(bytes).await?;
    w.flush().await
}

/// Where requests are read from: the async path's stream, or the
/// threaded path's blocking socket (whose reads never return `Pending`).
pub(crate) trait RequestSource {
    fn fill(
        &mut self,
        buf: &mut [u8],
    ) -> impl std::future::Future<Output = std::io::Result<()>> + Send;
}

impl<R: tokio::io::AsyncRead + Unpin + Send> RequestSource for R {
    async fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        AsyncReadExt::read_exact(self, buf).await.map(drop)
    }
}

impl RequestSource for BlockingSocket {
    /// Reads at once, blocking: the future is ready when returned.
    fn fill(
        &mut self,
        buf: &mut [u8],
    ) -> impl std::future::Future<Output = std::io::Result<()>> + Send {
        std::future::ready(std::io::Read::read_exact(self, buf))
    }
}

/// Read one request: its header, then its payload — read into a buffer
/// when it is one the server accepts ([`MAX_PAYLOAD`]), otherwise skipped,
/// so the stream stays in step and the request can be refused.  `None`:
/// the client closed the connection between requests.
pub(crate) async fn read_request<S: RequestSource + Send>(
    src: &mut S,
    extended: bool,
    conn: u64,
) -> Result<Option<(RequestHeader, Vec<u8>)>, ConnectionError> {
    let hlen = RequestHeader::wire_len(extended);
    let mut hbuf = [0u8; 32];
    match src.fill(&mut hbuf[..hlen]).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let h = RequestHeader::parse(&hbuf[..hlen], extended)
        .map_err(|e| ConnectionError::Protocol(format!("request header: {e}")))?;
    debug!(
        conn,
        cmd = command_name(h.command),
        h.offset,
        h.length,
        flags = h.flags,
        cookie = h.cookie,
        "request"
    );
    let plen = h.payload_len(extended);
    if plen > MAX_PAYLOAD {
        if plen > u32::MAX as u64 {
            return Err(ConnectionError::Protocol(format!(
                "payload of {plen} bytes"
            )));
        }
        let mut sink = vec![0u8; 256 * 1024];
        let mut left = plen;
        while left > 0 {
            let k = left.min(sink.len() as u64) as usize;
            src.fill(&mut sink[..k]).await?;
            left -= k as u64;
        }
        return Ok(Some((h, Vec::new())));
    }
    let mut payload = vec![0u8; plen as usize];
    if plen > 0 {
        src.fill(&mut payload).await?;
    }
    Ok(Some((h, payload)))
}

/// Run a future that never waits (one reading a [`BlockingSocket`]) to
/// its end on this thread.
fn now<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => unreachable!("blocking reads never return Pending"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nbdkit_backend::{Backend, Handle, Result};
    use tokio::io::AsyncReadExt;

    /// A disk whose reads ask the server to drop the client.
    struct Dropper;
    struct DropperHandle;
    impl Backend for Dropper {
        fn name(&self) -> &str {
            "dropper"
        }
        fn open(&self, _: bool, _: &str) -> Result<Box<dyn Handle>> {
            Ok(Box::new(DropperHandle))
        }
    }
    impl Handle for DropperHandle {
        fn size(&self) -> Result<u64> {
            Ok(1 << 20)
        }
        fn pread(&self, buf: &mut [u8], _: u64) -> Result<()> {
            buf.fill(7);
            Client::current()
                .expect("the server makes the client current")
                .request_disconnect();
            Ok(())
        }
    }

    /// On the async path (used for TLS and stdio), a backend's
    /// request_disconnect closes the connection after the reply, even
    /// while the reader waits for a next request that never comes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn request_disconnect_closes_an_async_connection() {
        let server = crate::Server::new(Arc::new(Dropper), crate::ServerOptions::default());
        let (mut c, s) = tokio::io::duplex(1 << 20);
        let task = tokio::spawn(server.serve_connection(
            Box::new(s),
            nbdkit_backend::Peer::Stdio,
            CancellationToken::new(),
        ));
        let mut greeting = [0u8; 18];
        c.read_exact(&mut greeting).await.unwrap();
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        // Fixed newstyle + no zeroes, then NBD_OPT_EXPORT_NAME "".
        c.write_all(&3u32.to_be_bytes()).await.unwrap();
        c.write_all(b"IHAVEOPT").await.unwrap();
        c.write_all(&1u32.to_be_bytes()).await.unwrap();
        c.write_all(&0u32.to_be_bytes()).await.unwrap();
        let mut info = [0u8; 10];
        c.read_exact(&mut info).await.unwrap();
        assert_eq!(u64::from_be_bytes(info[..8].try_into().unwrap()), 1 << 20);
        // One READ of 16 bytes.
        let mut req = Vec::new();
        req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&42u64.to_be_bytes());
        req.extend_from_slice(&0u64.to_be_bytes());
        req.extend_from_slice(&16u32.to_be_bytes());
        c.write_all(&req).await.unwrap();
        let mut reply = [0u8; 16 + 16];
        c.read_exact(&mut reply).await.unwrap();
        assert_eq!(
            u32::from_be_bytes(reply[..4].try_into().unwrap()),
            0x6744_6698
        );
        assert_eq!(u32::from_be_bytes(reply[4..8].try_into().unwrap()), 0);
        assert_eq!(reply[16..], [7u8; 16]);
        // The server closes without being sent anything more.
        // (A hang guard, not a timing assertion: the close comes at once.)
        let mut rest = Vec::new();
        tokio::time::timeout(std::time::Duration::from_secs(60), c.read_to_end(&mut rest))
            .await
            .expect("the server did not close the connection")
            .unwrap();
        assert!(rest.is_empty());
        task.await.unwrap();
    }
}
