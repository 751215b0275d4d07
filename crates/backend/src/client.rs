//! Who is on the other end of a connection, and the two ways a backend can
//! act on the server as a whole (ask it to exit, drop one client).
//!
//! Most backends never need this: a plugin sees its configuration and the
//! requests.  Access-control filters (`ip`), lifetime filters (`exitlast`,
//! `exitwhen`), the `info` plugin and hosted C plugins (`nbdkit_peer_name`,
//! `nbdkit_export_name`, `nbdkit_shutdown`) do.  The server describes each
//! connection with a [`Client`], hands it to [`crate::Backend::preconnect`]
//! and [`crate::Backend::disconnected`], and makes it the thread's
//! [`Client::current`] while it calls into the backend for that connection,
//! the way nbdkit's connection-scoped functions work.

use std::cell::RefCell;
use std::fmt;
use std::io::{PipeReader, PipeWriter, Write};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::sync::LockExt;

/// The peer's address, as the listening socket reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    Tcp(SocketAddr),
    /// A Unix socket peer, with its credentials (SO_PEERCRED) when the
    /// kernel gave them.
    Unix {
        pid: Option<i32>,
        uid: Option<u32>,
        gid: Option<u32>,
    },
    /// `-s` (stdin/stdout) or an in-process stream: no address.
    Stdio,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Tcp(a) => write!(f, "{a}"),
            Peer::Unix { pid: Some(p), .. } => write!(f, "unix:pid={p}"),
            Peer::Unix { .. } => f.write_str("unix"),
            Peer::Stdio => f.write_str("stdin"),
        }
    }
}

/// One client connection, from accept to close.
#[derive(Debug)]
pub struct Client {
    id: u64,
    peer: Peer,
    tls: AtomicBool,
    /// The verified client certificate's subject and issuer DNs.
    tls_names: OnceLock<(String, String)>,
    readonly: AtomicBool,
    export: Mutex<Option<String>>,
    disconnect: AtomicBool,
    /// A duplicate of the connection's socket, for [`nanosleep`] to notice
    /// a hang-up (None: none known).  An Arc, so that sleepers poll it
    /// without holding the lock.
    socket: Mutex<Option<Arc<OwnedFd>>>,
}

impl Client {
    pub fn new(id: u64, peer: Peer) -> Arc<Self> {
        Arc::new(Client {
            id,
            peer,
            tls: AtomicBool::new(false),
            tls_names: OnceLock::new(),
            readonly: AtomicBool::new(false),
            export: Mutex::new(None),
            disconnect: AtomicBool::new(false),
            socket: Mutex::new(None),
        })
    }

    /// The connection number used in log lines (1, 2, …).
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// True once the connection runs over TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.load(Ordering::Relaxed)
    }

    /// Set by the server when STARTTLS completes.
    pub fn set_tls(&self) {
        self.tls.store(true, Ordering::Relaxed)
    }

    /// The Distinguished Name of the client's certificate, in RFC 4514
    /// form (`CN=client.example.com,O=BigCo,C=US`): known only when the
    /// client connected over TLS with X.509 and presented a certificate
    /// that the server verified (`--tls-verify-peer`), as nbdkit's
    /// `nbdkit_peer_tls_dn`.
    pub fn tls_dn(&self) -> Option<&str> {
        self.tls_names.get().map(|n| n.0.as_str())
    }

    /// The Distinguished Name of the CA that issued the client's
    /// certificate, under the same conditions as [`Client::tls_dn`].
    pub fn tls_issuer_dn(&self) -> Option<&str> {
        self.tls_names.get().map(|n| n.1.as_str())
    }

    /// Set by the server when a TLS handshake verified a client
    /// certificate (once: a connection is encrypted at most once).
    pub fn set_tls_names(&self, dn: String, issuer_dn: String) {
        let _ = self.tls_names.set((dn, issuer_dn));
    }

    /// True when the server was started read-only (`-r`): nothing this
    /// client does will write (nbdkit's preconnect `readonly`).
    pub fn readonly(&self) -> bool {
        self.readonly.load(Ordering::Relaxed)
    }

    /// Set by the server before `preconnect`.
    pub fn set_readonly(&self, readonly: bool) {
        self.readonly.store(readonly, Ordering::Relaxed)
    }

    /// The export the client asked to open (NBD_OPT_INFO/GO or
    /// EXPORT_NAME), once it has; the default export is reported by the
    /// name it stands for.
    pub fn export_name(&self) -> Option<String> {
        self.export.lock_unpoisoned().clone()
    }

    /// Set by the server before it opens an export for this client.
    pub fn set_export_name(&self, name: &str) {
        *self.export.lock_unpoisoned() = Some(name.to_string());
    }

    /// Ask the server to close this connection after the request being
    /// served (nbdkit_disconnect).  In-flight requests still get replies.
    /// The server gives a duplicate of the socket that carries this
    /// connection (None: none any more), so that [`nanosleep`] wakes when
    /// the client hangs up.
    pub fn set_socket(&self, fd: Option<OwnedFd>) {
        *self.socket.lock_unpoisoned() = fd.map(Arc::new);
    }

    pub fn request_disconnect(&self) {
        self.disconnect.store(true, Ordering::Relaxed)
    }

    pub fn disconnect_requested(&self) -> bool {
        self.disconnect.load(Ordering::Relaxed)
    }

    /// The connection this thread is working for, while the server calls
    /// into the backend on its behalf (preconnect, list_exports,
    /// default_export, open, every handle call, close).  `None` elsewhere,
    /// e.g. in background threads a backend starts itself.
    pub fn current() -> Option<Arc<Client>> {
        CURRENT.with(|c| c.borrow().clone())
    }

    /// The number of this thread's [`Client::current`], for log lines.
    /// Safe to call anywhere a message may be logged, even while the
    /// thread's locals are being destroyed (then: None).
    pub fn current_id() -> Option<u64> {
        CURRENT
            .try_with(|c| c.try_borrow().ok().and_then(|c| c.as_ref().map(|c| c.id)))
            .ok()
            .flatten()
    }

    /// Make `self` this thread's [`Client::current`] until the guard drops
    /// (then the previous one is restored).  For servers, and for backends
    /// that hand work for a connection to threads of their own.
    pub fn enter(self: &Arc<Self>) -> CurrentClient {
        let previous = CURRENT.with(|c| c.replace(Some(self.clone())));
        CurrentClient { previous }
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Arc<Client>>> = const { RefCell::new(None) };
}

/// Restores the previous [`Client::current`] when dropped.
#[must_use = "the client is current only while the guard lives"]
pub struct CurrentClient {
    previous: Option<Arc<Client>>,
}

impl Drop for CurrentClient {
    fn drop(&mut self) {
        let previous = self.previous.take();
        CURRENT.with(|c| *c.borrow_mut() = previous);
    }
}

type ShutdownHook = Box<dyn Fn() + Send + Sync>;

static SHUTDOWN_HOOK: Mutex<Option<ShutdownHook>> = Mutex::new(None);
static SHUTDOWN_REQUESTED: AtomicBool = AtomicBool::new(false);

/// Ask the server to exit as on SIGTERM: stop accepting clients, let open
/// connections finish, then run every backend's `shutdown`.  Callable from
/// any thread, any number of times (nbdkit_shutdown).
pub fn request_shutdown() {
    let first = !SHUTDOWN_REQUESTED.swap(true, Ordering::SeqCst);
    if let (true, Some((_, w))) = (first, quit_pipe()) {
        // Written once and never read: the pipe stays readable, waking
        // every sleeper (once, so the write can never block).
        let _ = (&*w).write(&[0]);
    }
    if let Some(hook) = SHUTDOWN_HOOK.lock_unpoisoned().as_ref() {
        hook()
    }
}

/// A pipe made readable by [`request_shutdown`], polled by [`nanosleep`].
fn quit_pipe() -> Option<&'static (PipeReader, PipeWriter)> {
    static PIPE: std::sync::OnceLock<Option<(PipeReader, PipeWriter)>> = std::sync::OnceLock::new();
    PIPE.get_or_init(|| std::io::pipe().ok()).as_ref()
}

/// Sleep for `d`, as nbdkit's `nbdkit_nanosleep`: wake early, returning
/// false, when the server is asked to exit or when the current
/// connection's client hangs up, so that a slow request does not keep a
/// server from stopping nor a gone client's connection open.  True when
/// the whole time was slept.
pub fn nanosleep(d: Duration) -> bool {
    let sock = Client::current().and_then(|c| c.socket.lock_unpoisoned().clone());
    sleep_watching(d, sock.as_deref())
}

/// [`nanosleep`] that wakes only when the server is asked to exit, not
/// when the client hangs up (for delays while a connection closes, when
/// the client has normally gone already).
pub fn sleep_unless_shutdown(d: Duration) -> bool {
    sleep_watching(d, None)
}

fn sleep_watching(d: Duration, sock: Option<&OwnedFd>) -> bool {
    let deadline = Instant::now() + d;
    // The pipe is created before the first request_shutdown can need it.
    let Some((quit, _)) = quit_pipe() else {
        std::thread::sleep(d);
        return true;
    };
    // nix has no name for POLLRDHUP (the peer shut down its side).
    let rdhup = PollFlags::from_bits_retain(libc::POLLRDHUP);
    let hangup = rdhup | PollFlags::POLLHUP | PollFlags::POLLERR;
    loop {
        if shutdown_requested() {
            return false;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        let mut fds = vec![PollFd::new(quit.as_fd(), PollFlags::POLLIN)];
        if let Some(s) = sock {
            fds.push(PollFd::new(s.as_fd(), rdhup));
        }
        // At most ~65 s per poll; the loop sleeps the rest.
        let ms = left.as_millis().clamp(1, u16::MAX as u128) as u16;
        if let Ok(n) = poll(&mut fds, PollTimeout::from(ms)) {
            if n > 0 {
                if fds[0].revents().is_some_and(|r| !r.is_empty()) {
                    return false;
                }
                // nix reports revents it has no name for (POLLRDHUP, the
                // one this poll asks for) as None.
                if fds
                    .get(1)
                    .is_some_and(|f| f.revents().is_none_or(|r| r.intersects(hangup)))
                {
                    return false;
                }
            }
        }
    }
}

/// True once [`request_shutdown`] was called.
pub fn shutdown_requested() -> bool {
    SHUTDOWN_REQUESTED.load(Ordering::SeqCst)
}

/// The server's side of [`request_shutdown`]: `hook` runs on every request,
/// and at once if one came before the hook was set (a backend may ask in
/// `after_fork`, before the server listens).
pub fn set_shutdown_hook(hook: impl Fn() + Send + Sync + 'static) {
    let mut slot = SHUTDOWN_HOOK.lock_unpoisoned();
    if shutdown_requested() {
        hook();
    }
    *slot = Some(Box::new(hook));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_is_scoped_and_nests() {
        assert!(Client::current().is_none());
        let a = Client::new(1, Peer::Stdio);
        let b = Client::new(
            2,
            Peer::Unix {
                pid: Some(7),
                uid: Some(0),
                gid: Some(0),
            },
        );
        {
            let _ga = a.enter();
            assert_eq!(Client::current().unwrap().id(), 1);
            {
                let _gb = b.enter();
                assert_eq!(Client::current().unwrap().id(), 2);
            }
            assert_eq!(Client::current().unwrap().id(), 1);
            // Other threads do not see it.
            std::thread::spawn(|| assert!(Client::current().is_none()))
                .join()
                .unwrap();
        }
        assert!(Client::current().is_none());
    }

    #[test]
    fn peer_display_matches_log_format() {
        assert_eq!(
            Peer::Tcp("127.0.0.1:5".parse().unwrap()).to_string(),
            "127.0.0.1:5"
        );
        assert_eq!(
            Peer::Unix {
                pid: Some(9),
                uid: None,
                gid: None
            }
            .to_string(),
            "unix:pid=9"
        );
        assert_eq!(Peer::Stdio.to_string(), "stdin");
    }

    #[test]
    fn export_name_and_tls_are_recorded() {
        let c = Client::new(3, Peer::Stdio);
        assert_eq!(c.export_name(), None);
        assert!(!c.is_tls());
        assert_eq!((c.tls_dn(), c.tls_issuer_dn()), (None, None));
        c.set_export_name("disk");
        c.set_tls();
        c.set_tls_names("CN=a,O=B".into(), "CN=B".into());
        assert_eq!(c.export_name().as_deref(), Some("disk"));
        assert!(c.is_tls());
        assert_eq!(c.tls_dn(), Some("CN=a,O=B"));
        assert_eq!(c.tls_issuer_dn(), Some("CN=B"));
    }
}
