//! The threaded transmission path, for plain TCP and Unix sockets.
//!
//! A busy connection is served by worker threads that take turns reading
//! a request (the read turn is a lock), then each runs its request and
//! writes the reply itself (under the write lock), so a request never
//! changes threads.  Workers are started when requests arrive, one more
//! whenever a worker takes a request and nobody is left waiting to read
//! the next (up to `-t`, or one under `serialize_requests`), and retire
//! once the connection has been quiet for [`LINGER`].
//!
//! An idle connection holds no thread: when the last worker has retired,
//! the connection's task waits in the async reactor (epoll) for the socket
//! to become readable, and starts a worker then.  So 10,000 idle clients
//! cost 10,000 sockets and a few KiB each, not 160,000 threads.
//!
//! The socket stays in blocking mode throughout (workers read and write it
//! with plain system calls); the reactor only watches it for readability,
//! and a non-blocking peek tells a real request from a stale wake-up.

use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nbdkit_backend::{Client, LockExt};
use nbdkit_proto::request::RequestHeader;
use nbdkit_proto::*;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::direct::{read_direct, Direct, DIRECT_MIN};
use super::{read_into, read_request, refusal, run, Reply, KEEP_BUFFER};
use crate::handshake::Negotiated;
use crate::server::Server;
use crate::stream::{BlockingSocket, ConnectionError};

/// How long in-flight requests get to finish when the server shuts down.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How long a worker waits for a next request before it retires.  Long
/// enough that a client issuing requests back to back (qd1) keeps its
/// threads, so starting one (~30 µs) is paid once per burst, not per
/// request; short enough that a quiet connection gives its threads back
/// soon.
const LINGER: Duration = Duration::from_secs(1);

/// Stack of a worker thread: backend calls are plain code, and the
/// largest buffers live on the heap.
const WORKER_STACK: usize = 256 * 1024;

/// What every worker of one connection shares.
struct Connection {
    server: Arc<Server>,
    neg: Negotiated,
    client: Arc<Client>,
    sock: BlockingSocket,
    /// The read turn: its holder may read the socket.
    reader: Mutex<ReadSide>,
    /// The write turn: its holder may write the socket.
    writing: Mutex<()>,
    /// Workers at most.
    limit: usize,
}

struct ReadSide {
    /// Set once the client has left, sent DISC, or broken the protocol,
    /// or a backend dropped it: workers stop taking requests.
    done: bool,
    /// The last reader gave up waiting: the next one in line retires at
    /// once unless a request is already there (so idle workers all retire
    /// within one [`LINGER`], not one after the other).
    quiet: bool,
    error: Option<ConnectionError>,
}

/// The workers' head count, apart from [`Connection`] so that a retiring
/// worker can let go of the connection before it says it has gone (the
/// connection's last reference closes the backend handle, and that must
/// happen before `disconnected`, on a thread where the client is current).
#[derive(Default)]
struct Pool {
    state: Mutex<PoolState>,
    /// Told when the last worker retires.
    retired: Notify,
}

#[derive(Default)]
struct PoolState {
    /// Worker threads alive.
    workers: usize,
    /// Workers waiting for the read turn or holding it.
    waiting: usize,
}

/// Serve requests on a blocking socket until the client disconnects,
/// sends DISC, breaks the protocol, or the server shuts down.  In-flight
/// requests always finish.
pub async fn serve_threaded(
    server: Arc<Server>,
    sock: BlockingSocket,
    neg: Negotiated,
    client: &Arc<Client>,
    shutdown: CancellationToken,
) -> Result<(), ConnectionError> {
    sock.set_blocking()?;
    let conn = Arc::new(Connection {
        limit: server.request_slots(),
        server,
        neg,
        client: client.clone(),
        sock,
        reader: Mutex::new(ReadSide {
            done: false,
            quiet: false,
            error: None,
        }),
        writing: Mutex::new(()),
    });
    let pool = Arc::new(Pool::default());
    let id = client.id();
    loop {
        {
            let mut r = conn.reader.lock_unpoisoned();
            if r.done {
                break;
            }
            r.quiet = false;
        }
        // Idle: no worker; the socket waits in the reactor.  It is
        // registered only while idle: registered while workers read it,
        // every request would also wake the reactor's thread (an epoll
        // wake-up per request, a quarter of qd1 throughput on 2 cores).
        // Registering a socket that already has data reports it at once.
        // SAFETY: `Watched` holds the connection, and so its socket open,
        // for as long as the registration lasts, and always returns that
        // socket.
        let watch =
            unsafe { AsyncFd::register_with_interest(Watched(conn.clone()), Interest::READABLE) }
                .map_err(|e| e.into_parts().1)?;
        tokio::select! {
            r = request_waiting(&watch) => if let Err(e) = r {
                conn.reader.lock_unpoisoned().error = Some(e.into());
                break;
            },
            // Nothing is in flight: close at once.
            _ = shutdown.cancelled() => break,
        }
        // Deregister before the workers take over the socket.
        drop(watch);
        if let Err(e) = pool.start(&conn) {
            warn!(
                id,
                "cannot start a worker thread: {e}; closing the connection"
            );
            break;
        }
        // Busy: workers read and serve requests until the last retires.
        tokio::select! {
            _ = pool.all_retired() => {}
            _ = shutdown.cancelled() => {
                drain(&conn, &pool, id).await;
                break;
            }
        }
    }
    let client = client.clone();
    tokio::task::spawn_blocking(move || close(conn, &client))
        .await
        .unwrap_or_else(|e| Err(ConnectionError::Protocol(format!("closing failed: {e}"))))
}

/// On server shutdown: workers finish what they are running and stop
/// reading (blocked reads see end-of-file); a client that stopped reading
/// its replies could block a worker's write forever, so after a grace
/// period it is cut off.
async fn drain(conn: &Connection, pool: &Pool, id: u64) {
    conn.sock.shutdown(std::net::Shutdown::Read);
    if tokio::time::timeout(SHUTDOWN_GRACE, pool.all_retired())
        .await
        .is_err()
    {
        warn!(
            id,
            "client is not reading its replies; closing the connection"
        );
        conn.sock.shutdown(std::net::Shutdown::Both);
        pool.all_retired().await;
    }
}

/// The end of a connection, once every worker has gone: close the backend
/// handle (on a blocking thread, with the client current), then tell the
/// client no more replies come.
fn close(conn: Arc<Connection>, client: &Arc<Client>) -> Result<(), ConnectionError> {
    let _c = client.enter();
    let error = conn.reader.lock_unpoisoned().error.take();
    match Arc::try_unwrap(conn) {
        Ok(Connection { neg, sock, .. }) => {
            drop(neg);
            sock.shutdown(std::net::Shutdown::Write);
        }
        // Not reached (workers let go before they retire); the handle then
        // closes with the last reference.
        Err(conn) => conn.sock.shutdown(std::net::Shutdown::Write),
    }
    error.map_or(Ok(()), Err)
}

/// The connection's socket, as the reactor watches it.
struct Watched(Arc<Connection>);

impl AsRawFd for Watched {
    fn as_raw_fd(&self) -> RawFd {
        self.0.sock.fd().as_raw_fd()
    }
}

/// Wait until the socket has something to read (a request, end-of-file or
/// an error: a worker finds out which).  A wake-up left over from bytes
/// workers have since read is told apart by a non-blocking peek.
async fn request_waiting(watch: &AsyncFd<Watched>) -> std::io::Result<()> {
    let sock = &watch.get_ref().0.sock;
    loop {
        let mut ready = watch.readable().await?;
        let peeked = ready.try_io(|_| {
            let mut b = [std::mem::MaybeUninit::uninit(); 1];
            match socket2::SockRef::from(&sock.fd())
                .recv_with_flags(&mut b, libc::MSG_PEEK | libc::MSG_DONTWAIT)
            {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Err(e),
                _ => Ok(()),
            }
        });
        if peeked.is_ok() {
            return Ok(());
        }
    }
}

/// Wait up to `wait` for the socket to be readable (data, end-of-file or
/// an error); false if nothing came.
fn readable_within(sock: &BlockingSocket, wait: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: sock.fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = wait.as_millis().min(i32::MAX as u128) as i32;
    loop {
        // SAFETY: one valid pollfd, for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n >= 0 {
            return n > 0;
        }
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            // Let the read find out what is wrong.
            return true;
        }
    }
}

impl Pool {
    /// Start a worker for `conn` (a thread of its own).
    fn start(self: &Arc<Self>, conn: &Arc<Connection>) -> std::io::Result<()> {
        self.state.lock_unpoisoned().workers += 1;
        let (c, p) = (conn.clone(), self.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-conn-{}", conn.client.id()))
            .stack_size(WORKER_STACK)
            .spawn(move || worker(c, p));
        if let Err(e) = spawned {
            self.retire();
            return Err(e);
        }
        Ok(())
    }

    fn retire(&self) {
        let mut s = self.state.lock_unpoisoned();
        s.workers -= 1;
        if s.workers == 0 {
            self.retired.notify_one();
        }
    }

    /// Resolves once no worker is left.
    async fn all_retired(&self) {
        loop {
            if self.state.lock_unpoisoned().workers == 0 {
                return;
            }
            self.retired.notified().await;
        }
    }

    /// A worker has just taken a request: if nobody is left to read the
    /// next one, start a worker that will (up to the connection's limit).
    fn after_taking(self: &Arc<Self>, conn: &Arc<Connection>) {
        let more = {
            let s = self.state.lock_unpoisoned();
            s.waiting == 0 && s.workers < conn.limit
        };
        if more {
            if let Err(e) = self.start(conn) {
                // The connection carries on with the workers it has.
                debug!(id = conn.client.id(), "cannot start another worker: {e}");
            }
        }
    }
}

/// One worker thread: serve requests until the connection ends or goes
/// quiet, then retire.
fn worker(conn: Arc<Connection>, pool: Arc<Pool>) {
    let client = conn.client.clone();
    {
        let _c = client.enter();
        serve_requests(&conn, &pool);
        // Let go of the connection before saying so (see Pool).
        drop(conn);
    }
    pool.retire();
}

/// Take the read turn, read a request, let go, run it, write its reply;
/// again until there is nothing to read.
fn serve_requests(conn: &Arc<Connection>, pool: &Arc<Pool>) {
    let id = conn.client.id();
    // This worker's read buffer, reused so that reads do not allocate and
    // fault in fresh pages every time.
    let mut scratch = Vec::new();
    while let Some((h, payload)) = conn.next_request(pool) {
        pool.after_taking(conn);
        let reply = match conn.serve(h, payload, &mut scratch) {
            Served::Reply(r) => r,
            Served::Sent => {
                if conn.client.disconnect_requested() {
                    debug!(id, "the backend asked to disconnect this client");
                    conn.end(std::net::Shutdown::Read);
                    return;
                }
                continue;
            }
            Served::Lost => return,
        };
        let bytes = match &reply {
            Reply::InBuffer(n) => &scratch[..*n],
            Reply::Owned(v) => &v[..],
        };
        let w = conn.writing.lock_unpoisoned();
        if let Err(e) = (&conn.sock).write_all(bytes) {
            debug!(id, "writing reply failed: {e}");
            drop(w);
            conn.reader.lock_unpoisoned().done = true;
            return;
        }
        drop(w);
        if conn.client.disconnect_requested() {
            debug!(id, "the backend asked to disconnect this client");
            conn.end(std::net::Shutdown::Read);
            return;
        }
        if scratch.len() > KEEP_BUFFER {
            // A rare huge read: let its buffer go rather than keep it.
            scratch = Vec::new();
        }
    }
}

/// What became of a request.
enum Served {
    /// Its reply, to write.
    Reply(Reply),
    /// Its reply was sent already (a direct read).
    Sent,
    /// The connection is lost: stop.
    Lost,
}

impl Connection {
    /// Wait for the read turn and read the next request; None when this
    /// worker should stop: the connection has ended (the client left, sent
    /// DISC or broke the protocol, or a backend asked to end it), or it has
    /// been quiet long enough for the worker to retire.
    fn next_request(&self, pool: &Pool) -> Option<(RequestHeader, Vec<u8>)> {
        pool.state.lock_unpoisoned().waiting += 1;
        let req = self.take_request();
        pool.state.lock_unpoisoned().waiting -= 1;
        req
    }

    fn take_request(&self) -> Option<(RequestHeader, Vec<u8>)> {
        let id = self.client.id();
        let mut r = self.reader.lock_unpoisoned();
        if r.done {
            return None;
        }
        let wait = if r.quiet { Duration::ZERO } else { LINGER };
        if !readable_within(&self.sock, wait) {
            r.quiet = true;
            return None;
        }
        r.quiet = false;
        let extended = self.neg.style == ReplyStyle::Extended;
        match super::now(read_request(&mut &self.sock, extended, id)) {
            Ok(Some((h, _))) if h.command == CMD_DISC => {
                debug!(id, "client sent NBD_CMD_DISC");
                r.done = true;
                None
            }
            // A backend asked to end this connection while the request
            // was on its way: it is not served (nor answered).
            Ok(Some(_)) if self.client.disconnect_requested() => {
                debug!(
                    id,
                    "not serving a request read after a disconnect was asked for"
                );
                r.done = true;
                None
            }
            Ok(Some(req)) => Some(req),
            Ok(None) => {
                debug!(id, "client closed the connection");
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

    /// Validate and run one request.
    fn serve(&self, h: RequestHeader, payload: Vec<u8>, scratch: &mut Vec<u8>) -> Served {
        let (server, neg, id) = (&self.server, &self.neg, self.client.id());
        let extended = neg.style == ReplyStyle::Extended;
        let valid = neg.export.validate(
            &h,
            neg.style.is_structured(),
            extended,
            !neg.contexts.is_empty(),
        );
        if let Ok(op) = &valid {
            if op.command == CMD_READ && op.length >= DIRECT_MIN {
                match read_direct(server, neg, h.cookie, op, &self.sock, &self.writing) {
                    Direct::NotPossible => {}
                    Direct::Sent => return Served::Sent,
                    Direct::Failed(e) => {
                        // Part of a reply may be out: the stream is lost.
                        warn!(id, "sending read data failed: {e}; closing the connection");
                        self.end(std::net::Shutdown::Both);
                        return Served::Lost;
                    }
                }
            }
        }
        let reply = match valid {
            Ok(op) if op.command == CMD_READ => {
                server.locked(|| read_into(&neg.export, op, neg.style, h.cookie, scratch))
            }
            Ok(op) => server
                .locked(|| run(&neg.export, op, payload, neg.style, h.cookie, neg.contexts))
                .map(Reply::Owned),
            Err(e) => {
                debug!(id, cookie = h.cookie, "refused: {e}");
                Ok(Reply::Owned(refusal(neg.style, h.cookie, h.offset, &e)))
            }
        };
        match reply {
            Ok(r) => Served::Reply(r),
            Err(e) => {
                // No reply: the other workers' reads see end-of-file and
                // their writes fail, so they stop too.
                warn!(id, "closing the connection: {e}");
                self.end(std::net::Shutdown::Both);
                Served::Lost
            }
        }
    }

    /// End the connection: wake a worker blocked reading (and, with
    /// `Both`, any blocked writing), and let no worker take another
    /// request.
    fn end(&self, how: std::net::Shutdown) {
        self.sock.shutdown(how);
        self.reader.lock_unpoisoned().done = true;
    }
}
