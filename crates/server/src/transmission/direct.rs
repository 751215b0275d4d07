//! Large reads sent without a buffer: when the backend's handle can say
//! where a read's bytes are in a file ([`nbdkit_backend::direct`]), the
//! reply goes from the page cache to the socket with `sendfile` (threaded
//! path only: it needs the blocking socket).

use nbdkit_backend::{DirectPiece, DirectRead, LockExt};
use nbdkit_proto::*;

use crate::export::Op;
use crate::handshake::Negotiated;
use crate::server::Server;
use crate::stream::BlockingSocket;

/// What became of a read offered to [`read_direct`].
pub(super) enum Direct {
    /// The backend cannot say where the bytes are: read them as usual.
    NotPossible,
    Sent,
    /// Writing failed part way: the connection is lost.
    Failed(std::io::Error),
}

/// Send a large read's reply straight from the backend's file, if its
/// handle can say where the bytes are.  The reply is written under the
/// thread model's lock (as the data is read from the file while it goes)
/// and under `writing`, the connection's write lock.
pub(super) fn read_direct(
    server: &Server,
    neg: &Negotiated,
    cookie: u64,
    op: &Op,
    sock: &BlockingSocket,
    writing: &std::sync::Mutex<()>,
) -> Direct {
    let sent = server.locked(|| {
        let d = neg.export.read_direct(op.offset, op.length)?;
        let _w = writing.lock_unpoisoned();
        Some(send_direct(sock, neg.style, cookie, op.offset, &d))
    });
    match sent {
        None => Direct::NotPossible,
        Some(Ok(())) => Direct::Sent,
        Some(Err(e)) => Direct::Failed(e),
    }
}

/// Reads at least this long are sent straight from the backend's file
/// with `sendfile` when it can say where their bytes are
/// ([`nbdkit_backend::direct`]).  Shorter ones are cheaper to copy, and
/// keep the zero check that turns a read of zeroes into a hole chunk.
pub(super) const DIRECT_MIN: u64 = 64 * 1024;

/// Zeroes to send where a direct read has a hole and the reply cannot say
/// so (simple replies), or where the file turned out shorter.
static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

fn write_zeroes(w: &BlockingSocket, mut len: u64) -> std::io::Result<()> {
    while len > 0 {
        let n = len.min(ZEROES.len() as u64) as usize;
        std::io::Write::write_all(&mut &*w, &ZEROES[..n])?;
        len -= n as u64;
    }
    Ok(())
}

/// `len` bytes of `file` at `offset` to the socket, with sendfile.  If the
/// file ends first (it shrank), the rest goes out as zeroes, as a short
/// pread reads.
fn send_file(
    w: &BlockingSocket,
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
    w: &BlockingSocket,
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
