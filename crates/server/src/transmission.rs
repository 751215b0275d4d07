//! The transmission phase: read requests, run them on blocking threads in
//! parallel (up to `-t` per connection), and write replies as they finish,
//! in any order.

use std::sync::Arc;

use nbdkit_backend::{is_zero, Error, ErrorKind, ZeroFlags};
use nbdkit_proto::request::RequestHeader;
use nbdkit_proto::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
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
    conn: u64,
    shutdown: CancellationToken,
) -> Result<(), ConnectionError> {
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
        tasks.spawn(async move {
            let reply = server2
                .blocking(move || run(&export, op, payload, style, cookie))
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
    };

    tasks.close();
    tasks.wait().await;
    let mut w = wr.lock().await;
    let _ = w.flush().await;
    let _ = w.shutdown().await;
    result
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
        CMD_READ => return Ok(read_reply(export, op, style, cookie)),
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

/// Read into a buffer that already has room for the reply header, so the
/// data is never copied.  A read of all zeroes goes out as a hole chunk
/// when structured replies allow it.
fn read_reply(export: &Export, op: Op, style: ReplyStyle, cookie: u64) -> Vec<u8> {
    let hl = read_data_header_len(style);
    let len = op.length as usize;
    let mut buf = vec![0u8; hl + len];
    if let Err(e) = export.read(&mut buf[hl..], op.offset) {
        return failure(style, cookie, op, e);
    }
    if style.is_structured() && is_zero(&buf[hl..]) {
        return hole_chunk(style, cookie, op.offset, op.length as u32, true);
    }
    let header = read_data_header(style, cookie, op.offset, op.length, true);
    buf[..hl].copy_from_slice(&header);
    buf
}

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

/// Silence the unused-import lint for AsyncWrite on some paths.
#[allow(dead_code)]
fn _assert_stream<T: AsyncRead + AsyncWrite>() {}
