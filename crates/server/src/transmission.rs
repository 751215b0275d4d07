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

use nbdkit_backend::{is_zero, Client, Error, ErrorKind, ZeroFlags};
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
            _ = shutdown.cancelled() => break Ok(()),
        };
        let read = tokio::select! {
            r = rd.read_exact(&mut hbuf[..hlen]) => r,
            _ = shutdown.cancelled() => break Ok(()),
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
        tasks.spawn(async move {
            let reply = server2
                .blocking(&client2, move || run(&export, op, payload, style, cookie))
                .await
                .unwrap_or_else(|e| {
                    error_reply(
                        style,
                        cookie,
                        op.offset,
                        e.kind().nbd_error(),
                        &e.to_string(),
                    )
                });
            if let Err(e) = write(&wr, &reply).await {
                debug!(conn, "writing reply failed: {e}");
            }
            drop(permit);
        });
        if client.disconnect_requested() {
            debug!(conn, "the backend asked to disconnect this client");
            break Ok(());
        }
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
                    .spawn_scoped(scope, || worker(&srv, &neg, &reader, &writer, &client))
                    .map(drop)
                    .unwrap_or_else(|e| warn!(conn, "cannot start a worker thread: {e}"));
            }
            worker(&srv, &neg, &reader, &writer, &client);
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
        let reply: Cow<[u8]> =
            match neg
                .export
                .validate(&h, neg.style.is_structured(), extended, neg.meta)
            {
                Ok(op) if op.command == CMD_READ => {
                    server.locked(|| read_into(&neg.export, op, neg.style, h.cookie, &mut scratch))
                }
                Ok(op) => {
                    match server.locked(|| run(&neg.export, op, payload, neg.style, h.cookie)) {
                        Ok(r) => Cow::Owned(r),
                        Err(e) => refuse(op.offset, e),
                    }
                }
                Err(e) => {
                    debug!(conn, cookie = h.cookie, "refused: {e}");
                    refuse(h.offset, e)
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

/// Run one validated request and build its whole reply.
fn run(
    export: &Export,
    op: Op,
    payload: Vec<u8>,
    style: ReplyStyle,
    cookie: u64,
) -> nbdkit_backend::Result<Vec<u8>> {
    let fua = op.flags & CMD_FLAG_FUA != 0;
    let result = match op.command {
        CMD_READ => return Ok(read_into(export, op, style, cookie, &mut Vec::new()).into_owned()),
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
                    Err(e) => failure(style, cookie, op, e),
                },
            );
        }
        other => Err(Error::invalid(format!("unknown command {other}"))),
    };
    Ok(match result {
        Ok(()) => ok_reply(style, cookie, op.offset),
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
/// and kept for the next read, up to [`KEEP_BUFFER`].
fn read_into<'a>(
    export: &Export,
    op: Op,
    style: ReplyStyle,
    cookie: u64,
    buf: &'a mut Vec<u8>,
) -> Cow<'a, [u8]> {
    let hl = read_data_header_len(style);
    let n = hl + op.length as usize;
    if buf.len() < n {
        buf.resize(n, 0);
    }
    if let Err(e) = export.read(&mut buf[hl..n], op.offset) {
        return Cow::Owned(failure(style, cookie, op, e));
    }
    if style.is_structured() && is_zero(&buf[hl..n]) {
        return Cow::Owned(hole_chunk(style, cookie, op.offset, op.length as u32, true));
    }
    buf[..hl].copy_from_slice(&read_data_header(style, cookie, op.offset, op.length, true));
    if buf.len() > KEEP_BUFFER {
        // A rare huge read: hand the buffer over rather than keep it.
        let mut owned = std::mem::take(buf);
        owned.truncate(n);
        return Cow::Owned(owned);
    }
    Cow::Borrowed(&buf[..n])
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
