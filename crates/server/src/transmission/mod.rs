//! The transmission phase: read requests, run them in parallel (up to `-t`
//! per connection), and write replies as they finish, in any order.
//!
//! Plain TCP and Unix sockets use the threaded path
//! ([`threaded::serve_threaded`]): worker threads, started when requests
//! arrive and retired when the connection goes quiet, take turns reading a
//! request, then each runs its request and writes the reply itself.  A
//! request therefore never changes threads while the connection is busy,
//! which keeps latency at one system call each way (handing requests from
//! an async reader to a thread pool cost about 15 µs per request here);
//! an idle connection holds no thread, only its socket in the reactor.
//! Other streams (stdin/stdout, TLS) use the async path
//! ([`asynchronous::serve`]): one reader task per connection hands
//! requests to tokio's blocking pool, up to `-t` at once.
//!
//! Both paths frame requests with [`read_request`] (header, then the
//! payload, read or skipped, even for a request about to be refused, so
//! the stream stays in step), refuse with [`refusal`], run with [`run`] or
//! [`read_into`], and build replies with `nbdkit_proto`.  Large reads from
//! a file go out with `sendfile` ([`direct`], threaded path only).

mod asynchronous;
mod direct;
mod threaded;

pub use asynchronous::serve;
pub use threaded::serve_threaded;

use nbdkit_backend::{is_zero, Error, ErrorKind, ZeroFlags};
use nbdkit_proto::request::RequestHeader;
use nbdkit_proto::*;
use tokio::io::AsyncReadExt;
use tracing::{debug, warn};

use crate::export::{Export, Op, MAX_PAYLOAD};
use crate::meta_context::Selected;
use crate::stream::{BlockingSocket, ConnectionError};

/// Run one validated request and build its whole reply.  An error comes
/// back only when the backend asked to drop the connection
/// ([`Error::disconnects`]); every other error becomes an error reply.
/// `contexts` are the metadata contexts a block status reports.
fn run(
    export: &Export,
    op: Op,
    payload: Vec<u8>,
    style: ReplyStyle,
    cookie: u64,
    contexts: Selected,
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
            return match block_status(export, op, style, cookie, contexts) {
                Ok(reply) => Ok(reply),
                Err(e) if e.disconnects() => Err(e),
                Err(e) => Ok(failure(style, cookie, op, e)),
            }
        }
        other => Err(Error::invalid(format!("unknown command {other}"))),
    };
    Ok(match result {
        Ok(()) => ok_reply(style, cookie, op.offset),
        Err(e) if e.disconnects() => return Err(e),
        Err(e) => failure(style, cookie, op, e),
    })
}

/// A block status reply: one chunk per selected context, the last with
/// DONE.  Every context is asked before anything is sent, so a failure of
/// any one becomes a plain error reply.
fn block_status(
    export: &Export,
    op: Op,
    style: ReplyStyle,
    cookie: u64,
    contexts: Selected,
) -> nbdkit_backend::Result<Vec<u8>> {
    let req_one = op.flags & CMD_FLAG_REQ_ONE != 0;
    let wide = style == ReplyStyle::Extended;
    let n = contexts.iter().count();
    let mut reply = Vec::new();
    for (i, c) in contexts.iter().enumerate() {
        let list = export.block_status(c.status(), op.offset, op.length, req_one, wide)?;
        let last = i + 1 == n;
        reply.extend(block_status_chunk(
            style,
            cookie,
            op.offset,
            c.id(),
            &list,
            last,
        ));
    }
    Ok(reply)
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
    error_reply(style, cookie, offset, nbd_error(e.kind()), &e.to_string())
}

/// A backend error kind as NBD's error number (the protocol's numbering,
/// from crates/proto; the backend knows only kinds).  NBD has no EROFS:
/// a read-only export's refusal is EPERM.
pub(crate) fn nbd_error(kind: ErrorKind) -> u32 {
    match kind {
        ErrorKind::PermissionDenied | ErrorKind::ReadOnly => EPERM,
        ErrorKind::Io => EIO,
        ErrorKind::OutOfMemory => ENOMEM,
        ErrorKind::InvalidInput => EINVAL,
        ErrorKind::NoSpace => ENOSPC,
        ErrorKind::Overflow => EOVERFLOW,
        ErrorKind::NotSupported => ENOTSUP,
        ErrorKind::Shutdown => ESHUTDOWN,
    }
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

/// Largest read buffer a worker keeps between requests.
const KEEP_BUFFER: usize = 4 << 20;

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

impl RequestSource for &BlockingSocket {
    /// Reads at once, blocking: the future is ready when returned.
    fn fill(
        &mut self,
        buf: &mut [u8],
    ) -> impl std::future::Future<Output = std::io::Result<()>> + Send {
        std::future::ready(std::io::Read::read_exact(&mut *self, buf))
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
mod error_tests {
    use super::*;

    #[test]
    fn kinds_map_to_nbd_error_numbers() {
        assert_eq!(nbd_error(ErrorKind::ReadOnly), EPERM);
        assert_eq!(nbd_error(ErrorKind::NoSpace), 28);
        assert_eq!(nbd_error(ErrorKind::Io), 5);
        assert_eq!(nbd_error(ErrorKind::NotSupported), 95);
        assert_eq!(nbd_error(ErrorKind::Shutdown), 108);
    }
}
