//! The transmission phase: read requests, run them in parallel (up to `-t`
//! per connection), and write replies as they finish, in any order.
//!
//! Plain TCP and Unix sockets use the threaded path, [`serve_threaded`]:
//! the connection gets `-t` worker threads that take turns reading a
//! request, then each runs its request and writes the reply itself.  A
//! request therefore never changes threads, which keeps latency at one
//! system call each way (handing requests from an async reader to a thread
//! pool cost about 15 µs per request here).  Other streams (stdin/stdout,
//! TLS) use the async path, [`serve`].

use std::borrow::Cow;
use std::sync::Arc;

use nbdkit_backend::{is_zero, Client, DirectPiece, DirectRead, Error, ErrorKind, ZeroFlags};
use nbdkit_proto::request::RequestHeader;
use nbdkit_proto::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::export::{Export, Op, MAX_PAYLOAD};
use crate::handshake::{Negotiated, BASE_ALLOCATION_ID};
use crate::{ConnectionError, Server, Stream};

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
    let hlen = RequestHeader::wire_len(extended);
    let mut hbuf = [0u8; 32];

    let result = loop {
        // Take a slot before reading the next request, so a client that
        // floods requests (or never reads replies) is held to `-t` requests
        // in memory.
        let permit = tokio::select! {
            p = in_flight.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = stop.cancelled() => break Ok(()),
        };
        let read = tokio::select! {
            r = rd.read_exact(&mut hbuf[..hlen]) => r,
            _ = stop.cancelled() => break Ok(()),
        };
        match read {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                debug!(conn, "client closed the connection");
                break Ok(());
            }
            Err(e) => break Err(e.into()),
        }
        let h = match RequestHeader::parse(&hbuf[..hlen], extended) {
            Ok(h) => h,
            Err(e) => break Err(ConnectionError::Protocol(format!("request header: {e}"))),
        };
        debug!(
            conn,
            cmd = command_name(h.command),
            h.offset,
            h.length,
            flags = h.flags,
            cookie = h.cookie,
            "request"
        );

        // Read any payload first, even for a request about to be refused,
        // so the stream stays in step.
        let plen = h.payload_len(extended);
        let mut payload = Vec::new();
        if plen > 0 {
            if plen > MAX_PAYLOAD {
                if plen > u32::MAX as u64 {
                    break Err(ConnectionError::Protocol(format!(
                        "payload of {plen} bytes"
                    )));
                }
                if let Err(e) = skip(&mut rd, plen).await {
                    break Err(e.into());
                }
            } else {
                payload = vec![0u8; plen as usize];
                if let Err(e) = rd.read_exact(&mut payload).await {
                    break Err(e.into());
                }
            }
        }

        let op = match neg
            .export
            .validate(&h, neg.style.is_structured(), extended, neg.meta)
        {
            Ok(op) => op,
            Err(e) => {
                debug!(conn, cookie = h.cookie, "refused: {e}");
                let bytes = error_reply(
                    neg.style,
                    h.cookie,
                    h.offset,
                    e.kind().nbd_error(),
                    &e.to_string(),
                );
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
                Err(e) => error_reply(
                    style,
                    cookie,
                    op.offset,
                    e.kind().nbd_error(),
                    &e.to_string(),
                ),
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

/// Send buffer asked for on Unix sockets (the kernel caps it at
/// net.core.wmem_max).
const REPLY_BUFFER: usize = 4 << 20;

/// How long in-flight requests get to finish when the server shuts down.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// A connected plain socket, switched to blocking mode.
pub enum BlockingSocket {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl BlockingSocket {
    fn try_clone(&self) -> std::io::Result<Self> {
        Ok(match self {
            BlockingSocket::Tcp(s) => BlockingSocket::Tcp(s.try_clone()?),
            BlockingSocket::Unix(s) => BlockingSocket::Unix(s.try_clone()?),
        })
    }
    fn set_blocking(&self) -> std::io::Result<()> {
        match self {
            BlockingSocket::Tcp(s) => s.set_nonblocking(false),
            BlockingSocket::Unix(s) => {
                // A Unix socket's default send buffer (~200 KiB) is smaller
                // than one typical read reply (256 KiB from nbdcopy, 2 MiB
                // from qemu), so every reply would block mid-write, holding
                // the write lock.  TCP sizes its buffers by itself.
                let _ = socket2::SockRef::from(s).set_send_buffer_size(REPLY_BUFFER);
                s.set_nonblocking(false)
            }
        }
    }
    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        match self {
            BlockingSocket::Tcp(s) => s.as_fd(),
            BlockingSocket::Unix(s) => s.as_fd(),
        }
    }
    /// Write all of `buf`, telling TCP more is coming (MSG_MORE), so a
    /// reply header and the data sent after it leave in full segments.
    fn write_more(&mut self, mut buf: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        let BlockingSocket::Tcp(s) = self else {
            return self.write_all(buf);
        };
        while !buf.is_empty() {
            match socket2::SockRef::from(&*s).send_with_flags(buf, libc::MSG_MORE) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
    /// Wake up a worker blocked reading: new reads return end-of-file.
    fn shutdown(&self, how: std::net::Shutdown) {
        let _ = match self {
            BlockingSocket::Tcp(s) => s.shutdown(how),
            BlockingSocket::Unix(s) => s.shutdown(how),
        };
    }
}

impl std::io::Read for BlockingSocket {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            BlockingSocket::Tcp(s) => s.read(buf),
            BlockingSocket::Unix(s) => s.read(buf),
        }
    }
}

impl std::io::Write for BlockingSocket {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            BlockingSocket::Tcp(s) => s.write(buf),
            BlockingSocket::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

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
        let w = writer.lock().unwrap_or_else(|e| e.into_inner());
        w.shutdown(std::net::Shutdown::Write);
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
    use std::io::{Read, Write};
    let _c = client.enter();
    let conn = client.id();
    let extended = neg.style == ReplyStyle::Extended;
    let hlen = RequestHeader::wire_len(extended);
    // This worker's read buffer, reused so that reads do not allocate and
    // fault in fresh pages every time.
    let mut scratch = Vec::new();
    loop {
        let (h, payload) = {
            let mut r = reader.lock().unwrap_or_else(|e| e.into_inner());
            if r.done {
                return;
            }
            let mut hbuf = [0u8; 32];
            let read = r
                .sock
                .read_exact(&mut hbuf[..hlen])
                .map_err(ConnectionError::from)
                .and_then(|_| {
                    let h = RequestHeader::parse(&hbuf[..hlen], extended)
                        .map_err(|e| ConnectionError::Protocol(format!("request header: {e}")))?;
                    let plen = h.payload_len(extended);
                    let mut payload = Vec::new();
                    if plen > MAX_PAYLOAD {
                        if plen > u32::MAX as u64 {
                            return Err(ConnectionError::Protocol(format!(
                                "payload of {plen} bytes"
                            )));
                        }
                        std::io::copy(&mut (&mut r.sock).take(plen), &mut std::io::sink())?;
                    } else if plen > 0 {
                        payload = vec![0u8; plen as usize];
                        r.sock.read_exact(&mut payload)?;
                    }
                    Ok((h, payload))
                });
            match read {
                Ok((h, _)) if h.command == CMD_DISC => {
                    debug!(conn, "client sent NBD_CMD_DISC");
                    r.done = true;
                    return;
                }
                // A backend asked to end this connection while the request
                // was on its way: it is not served (nor answered).
                Ok(_) if client.disconnect_requested() => {
                    debug!(
                        conn,
                        "not serving a request read after a disconnect was asked for"
                    );
                    r.done = true;
                    return;
                }
                Ok(req) => req,
                Err(ConnectionError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    debug!(conn, "client closed the connection");
                    r.done = true;
                    return;
                }
                Err(e) => {
                    r.done = true;
                    r.error = Some(e);
                    return;
                }
            }
        };
        debug!(
            conn,
            cmd = command_name(h.command),
            h.offset,
            h.length,
            flags = h.flags,
            cookie = h.cookie,
            "request"
        );
        let refuse = |offset: u64, e: Error| {
            Cow::Owned(error_reply(
                neg.style,
                h.cookie,
                offset,
                e.kind().nbd_error(),
                &e.to_string(),
            ))
        };
        let valid = neg
            .export
            .validate(&h, neg.style.is_structured(), extended, neg.meta);
        if let Ok(op) = &valid {
            if op.command == CMD_READ && op.length >= DIRECT_MIN {
                // The reply is written under the thread model's lock, as
                // the data is read from the backend's file while it goes.
                let sent = server.locked(|| {
                    let d = neg.export.read_direct(op.offset, op.length)?;
                    let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
                    Some(send_direct(&mut w, neg.style, h.cookie, op.offset, &d))
                });
                match sent {
                    None => {}
                    Some(Ok(())) => {
                        if client.disconnect_requested() {
                            debug!(conn, "the backend asked to disconnect this client");
                            closer.shutdown(std::net::Shutdown::Read);
                            reader.lock().unwrap_or_else(|e| e.into_inner()).done = true;
                            return;
                        }
                        continue;
                    }
                    Some(Err(e)) => {
                        // Part of a reply may be out: the stream is lost.
                        warn!(
                            conn,
                            "sending read data failed: {e}; closing the connection"
                        );
                        closer.shutdown(std::net::Shutdown::Both);
                        reader.lock().unwrap_or_else(|e| e.into_inner()).done = true;
                        return;
                    }
                }
            }
        }
        let reply: nbdkit_backend::Result<Cow<[u8]>> = match valid {
            Ok(op) if op.command == CMD_READ => {
                server.locked(|| read_into(&neg.export, op, neg.style, h.cookie, &mut scratch))
            }
            Ok(op) => match server.locked(|| run(&neg.export, op, payload, neg.style, h.cookie)) {
                Ok(r) => Ok(Cow::Owned(r)),
                Err(e) if e.disconnects() => Err(e),
                Err(e) => Ok(refuse(op.offset, e)),
            },
            Err(e) => {
                debug!(conn, cookie = h.cookie, "refused: {e}");
                Ok(refuse(h.offset, e))
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
        let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = w.write_all(&reply) {
            debug!(conn, "writing reply failed: {e}");
            drop(w);
            let mut r = reader.lock().unwrap_or_else(|e| e.into_inner());
            r.done = true;
            return;
        }
        if client.disconnect_requested() {
            debug!(conn, "the backend asked to disconnect this client");
            // Workers blocked reading the next request see EOF.
            w.shutdown(std::net::Shutdown::Read);
            drop(w);
            reader.lock().unwrap_or_else(|e| e.into_inner()).done = true;
            return;
        }
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
            return read_into(export, op, style, cookie, &mut Vec::new()).map(Cow::into_owned)
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
    error_reply(
        style,
        cookie,
        op.offset,
        e.kind().nbd_error(),
        &e.to_string(),
    )
}

/// Read into `buf` after room for the reply header, so the data is never
/// copied, and return the whole reply.  A read of all zeroes goes out as a
/// hole chunk when structured replies allow it.  `buf` is grown as needed
/// and kept for the next read, up to [`KEEP_BUFFER`].  Errors become error
/// replies, except one that asks to drop the connection.
fn read_into<'a>(
    export: &Export,
    op: Op,
    style: ReplyStyle,
    cookie: u64,
    buf: &'a mut Vec<u8>,
) -> nbdkit_backend::Result<Cow<'a, [u8]>> {
    let hl = read_data_header_len(style);
    let n = hl + op.length as usize;
    if buf.len() < n {
        buf.resize(n, 0);
    }
    match export.read(&mut buf[hl..n], op.offset) {
        Err(e) if e.disconnects() => return Err(e),
        Err(e) => return Ok(Cow::Owned(failure(style, cookie, op, e))),
        Ok(()) => {}
    }
    if style.is_structured() && is_zero(&buf[hl..n]) {
        return Ok(Cow::Owned(hole_chunk(
            style,
            cookie,
            op.offset,
            op.length as u32,
            true,
        )));
    }
    buf[..hl].copy_from_slice(&read_data_header(style, cookie, op.offset, op.length, true));
    if buf.len() > KEEP_BUFFER {
        // A rare huge read: hand the buffer over rather than keep it.
        let mut owned = std::mem::take(buf);
        owned.truncate(n);
        return Ok(Cow::Owned(owned));
    }
    Ok(Cow::Borrowed(&buf[..n]))
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

async fn skip<R: AsyncRead + Unpin>(r: &mut R, mut n: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    while n > 0 {
        let k = n.min(buf.len() as u64) as usize;
        r.read_exact(&mut buf[..k]).await?;
        n -= k as u64;
    }
    Ok(())
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
