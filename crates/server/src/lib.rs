//! The NBD server: listeners, the handshake, and request dispatch over any
//! [`nbdkit_backend::Backend`].
//!
//! Network I/O is asynchronous (tokio); backend calls are synchronous and
//! run on tokio's blocking thread pool, so plugins are plain code with
//! plain `pread`/`pwrite`.  The backend's thread model is enforced here with
//! locks, never by the backend itself.

pub mod export;
pub mod handshake;
pub mod listen;
pub mod tls;
pub mod transmission;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nbdkit_backend::{Backend, Client, Error, Peer, ThreadModel};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

pub use listen::{Listener, ListenerSet};

/// A bidirectional byte stream (TCP, Unix socket, stdin/stdout, TLS).
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {
    /// Plain sockets become blocking sockets for the threaded transmission
    /// path (see [`transmission`]); other streams stay asynchronous.
    fn into_blocking(self: Box<Self>) -> Transport;
}

/// What the transmission phase runs over.
pub enum Transport {
    Blocking(transmission::BlockingSocket),
    Async(Box<dyn Stream>),
}

impl Stream for tokio::net::TcpStream {
    fn into_blocking(self: Box<Self>) -> Transport {
        match (*self).into_std() {
            Ok(s) => Transport::Blocking(transmission::BlockingSocket::Tcp(s)),
            Err(e) => Transport::Async(Box::new(Broken(Some(e)))),
        }
    }
}

impl Stream for tokio::net::UnixStream {
    fn into_blocking(self: Box<Self>) -> Transport {
        match (*self).into_std() {
            Ok(s) => Transport::Blocking(transmission::BlockingSocket::Unix(s)),
            Err(e) => Transport::Async(Box::new(Broken(Some(e)))),
        }
    }
}

impl<R, W> Stream for tokio::io::Join<R, W>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    fn into_blocking(self: Box<Self>) -> Transport {
        Transport::Async(self)
    }
}

impl Stream for tokio::io::DuplexStream {
    fn into_blocking(self: Box<Self>) -> Transport {
        Transport::Async(self)
    }
}

/// A stream whose conversion failed: every use reports the error.
pub(crate) struct Broken(pub(crate) Option<std::io::Error>);

impl Broken {
    fn err(&mut self) -> std::io::Error {
        self.0
            .take()
            .unwrap_or_else(|| std::io::Error::other("socket conversion failed"))
    }
}

impl AsyncRead for Broken {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        _: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Err(self.get_mut().err()))
    }
}

impl AsyncWrite for Broken {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        _: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::Poll::Ready(Err(self.get_mut().err()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

impl Stream for Broken {
    fn into_blocking(self: Box<Self>) -> Transport {
        Transport::Async(self)
    }
}

/// Why a connection ended abnormally.  Never fatal to the server.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// Server-wide settings from the command line.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// `-r`: refuse every write whatever the backend says.
    pub readonly: bool,
    /// `-t`: requests run at once per connection.
    pub threads: usize,
    /// `-e`: the name the default export is listed under.
    pub export_name: Option<String>,
    /// `--no-sr`: refuse structured replies (and extended headers).
    pub no_structured_replies: bool,
    /// `--no-mc`: refuse metadata contexts.
    pub no_meta_contexts: bool,
    /// `--mask-handshake`: handshake flags offered (FIXED_NEWSTYLE=1, NO_ZEROES=2).
    pub handshake_mask: u16,
    /// `--tls` and the certificates it uses.
    pub tls: tls::Tls,
    /// `--timeout`: a client that has not finished negotiating (TLS
    /// handshake included) by then is disconnected.  None: no limit.
    pub handshake_timeout: Option<std::time::Duration>,
    /// `--max-connections`: connections open at once, counted from accept
    /// (so clients still negotiating count); later ones are closed at once.
    /// None: no limit.
    pub max_connections: Option<usize>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            readonly: false,
            threads: 16,
            export_name: None,
            no_structured_replies: false,
            no_meta_contexts: false,
            handshake_mask: 0xffff,
            tls: tls::Tls::off(),
            handshake_timeout: None,
            max_connections: None,
        }
    }
}

/// One server: a backend chain plus the policy for serving it.
pub struct Server {
    backend: Arc<dyn Backend>,
    opts: ServerOptions,
    model: ThreadModel,
    /// Held around every backend call under `serialize_all_requests`.
    all_requests: Arc<std::sync::Mutex<()>>,
    /// One permit: held for a whole connection under
    /// `serialize_connections`.
    connections: Arc<Semaphore>,
    /// `--max-connections` slots, one held per open connection.
    open_slots: Option<Arc<Semaphore>>,
    next_conn: AtomicU64,
    tracker: TaskTracker,
}

impl Server {
    pub fn new(backend: Arc<dyn Backend>, opts: ServerOptions) -> Arc<Self> {
        let model = backend.thread_model();
        debug!("thread model: {}", model.as_str());
        let open_slots = opts.max_connections.map(|n| Arc::new(Semaphore::new(n)));
        Arc::new(Server {
            backend,
            opts,
            open_slots,
            model,
            all_requests: Arc::new(std::sync::Mutex::new(())),
            connections: Arc::new(Semaphore::new(1)),
            next_conn: AtomicU64::new(1),
            tracker: TaskTracker::new(),
        })
    }

    pub fn thread_model(&self) -> ThreadModel {
        self.model
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Requests one connection may run at once.
    fn request_slots(&self) -> usize {
        if self.model <= ThreadModel::SerializeRequests {
            1
        } else {
            self.opts.threads.max(1)
        }
    }

    /// Run a backend call on a blocking thread, under the thread model's
    /// global lock if it has one.  A panicking backend becomes EIO for that
    /// request only.
    /// The call sees `client` as [`Client::current`].
    pub(crate) async fn blocking<T, F>(
        &self,
        client: &Arc<Client>,
        f: F,
    ) -> nbdkit_backend::Result<T>
    where
        F: FnOnce() -> nbdkit_backend::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let lock =
            (self.model == ThreadModel::SerializeAllRequests).then(|| self.all_requests.clone());
        let client = client.clone();
        tokio::task::spawn_blocking(move || {
            let _c = client.enter();
            let _g = lock
                .as_ref()
                .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()));
            f()
        })
        .await
        .unwrap_or_else(|e| Err(Error::io(format!("backend failed: {e}"))))
    }

    /// Run a backend call on this thread under the thread model's global
    /// lock, if it has one.
    pub(crate) fn locked<T>(&self, f: impl FnOnce() -> T) -> T {
        let _g = (self.model == ThreadModel::SerializeAllRequests)
            .then(|| self.all_requests.lock().unwrap_or_else(|e| e.into_inner()));
        f()
    }

    /// Like [`Server::blocking`], for calls on the backend itself.
    pub(crate) async fn blocking_backend<T, F>(
        &self,
        client: &Arc<Client>,
        f: F,
    ) -> nbdkit_backend::Result<T>
    where
        F: FnOnce(&dyn Backend, bool) -> nbdkit_backend::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let b = self.backend.clone();
        let ro = self.opts.readonly;
        self.blocking(client, move || f(&*b, ro)).await
    }

    /// The name "" stands for: `-e`, else what the backend says.
    pub(crate) async fn default_export(&self, client: &Arc<Client>) -> String {
        if let Some(n) = &self.opts.export_name {
            return n.clone();
        }
        self.blocking_backend(client, |b, ro| b.default_export(ro))
            .await
            .unwrap_or_default()
    }

    /// Serve one client on `stream` until it leaves or the server stops.
    pub async fn serve_connection(
        self: Arc<Self>,
        stream: Box<dyn Stream>,
        peer: Peer,
        shutdown: CancellationToken,
    ) {
        self.serve_counted(stream, peer, shutdown, None).await
    }

    /// [`Server::serve_connection`], holding a `--max-connections` slot.
    async fn serve_counted(
        self: Arc<Self>,
        mut stream: Box<dyn Stream>,
        peer: Peer,
        shutdown: CancellationToken,
        mut slot: Option<OwnedSemaphorePermit>,
    ) {
        let _serial = if self.model == ThreadModel::SerializeConnections {
            match self.connections.clone().acquire_owned().await {
                Ok(p) => Some(p),
                Err(_) => return,
            }
        } else {
            None
        };
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        debug!(conn, %peer, "new connection");
        let client = Client::new(conn, peer);
        client.set_readonly(self.opts.readonly);
        let peer = client.peer();
        if let Err(e) = self
            .blocking_backend(&client, {
                let c = client.clone();
                move |b, _| b.preconnect(&c)
            })
            .await
        {
            warn!(conn, %peer, "connection refused: {e}");
            return;
        }
        let limit = self.opts.handshake_timeout;
        let negotiation = async {
            match limit {
                Some(t) => {
                    tokio::time::timeout(t, handshake::negotiate(&self, &mut stream, &client))
                        .await
                        .unwrap_or_else(|_| {
                            Err(ConnectionError::Protocol(format!(
                                "negotiation not finished within {} s (--timeout)",
                                t.as_secs_f64()
                            )))
                        })
                }
                None => handshake::negotiate(&self, &mut stream, &client).await,
            }
        };
        let neg = tokio::select! {
            r = negotiation => r,
            _ = shutdown.cancelled() => Ok(None),
        };
        if !matches!(neg, Ok(Some(_))) {
            // Free the slot before the socket closes (at the end of this
            // function), so a client that sees the close can count on it.
            slot.take();
        }
        let result = match neg {
            Ok(Some(neg)) => {
                debug!(conn, export = %neg.export.name, size = neg.export.caps.size, "negotiated");
                match stream.into_blocking() {
                    Transport::Blocking(sock) => {
                        transmission::serve_threaded(self.clone(), sock, neg, &client, shutdown)
                            .await
                    }
                    Transport::Async(stream) => {
                        transmission::serve(self.clone(), stream, neg, &client, shutdown).await
                    }
                }
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => debug!(conn, "connection closed"),
            Err(ConnectionError::Io(e)) => debug!(conn, %peer, "connection ended: {e}"),
            Err(e) => warn!(conn, %peer, "closing connection: {e}"),
        }
        let c = client.clone();
        let _ = self
            .blocking_backend(&client, move |b, _| {
                b.disconnected(&c);
                Ok(())
            })
            .await;
    }

    /// Accept clients on every listener until `shutdown`, then wait for
    /// open connections to finish their in-flight requests.
    pub async fn serve(
        self: Arc<Self>,
        listeners: ListenerSet,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let mut accept_tasks = Vec::new();
        for l in listeners.into_tokio()? {
            let server = self.clone();
            let shutdown = shutdown.clone();
            accept_tasks.push(tokio::spawn(async move {
                server.accept_loop(l, shutdown).await
            }));
        }
        for t in accept_tasks {
            let _ = t.await;
        }
        self.tracker.close();
        self.tracker.wait().await;
        Ok(())
    }

    async fn accept_loop(self: Arc<Self>, l: listen::TokioListener, shutdown: CancellationToken) {
        loop {
            let accepted = tokio::select! {
                r = l.accept() => r,
                _ = shutdown.cancelled() => return,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let slot = match &self.open_slots {
                        None => None,
                        Some(sem) => match sem.clone().try_acquire_owned() {
                            Ok(p) => Some(p),
                            Err(_) => {
                                // Closed before the greeting, as nbdkit's
                                // limit filter rejects extra clients.
                                warn!(%peer, "too many connections (--max-connections): closing");
                                drop(stream);
                                continue;
                            }
                        },
                    };
                    let server = self.clone();
                    let sd = shutdown.clone();
                    self.tracker
                        .spawn(async move { server.serve_counted(stream, peer, sd, slot).await });
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    warn!("accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Serve exactly one connection (`-s`) and return when it ends.
    pub async fn serve_one(self: Arc<Self>, stream: Box<dyn Stream>, shutdown: CancellationToken) {
        info!("serving one connection on stdin/stdout");
        self.serve_connection(stream, stdin_peer(), shutdown).await
    }
}

/// The peer of `-s`: when stdin is a Unix socket (libnbd's
/// `connect_command` passes one end of a socketpair), its credentials, as
/// nbdkit reads them for the ip filter's `pid:`/`uid:`/`gid:` rules.
fn stdin_peer() -> Peer {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: fd 0 stays open for the whole process; getsockopt writes at
    // most `len` bytes into `cred`, which is that large.
    let r = unsafe {
        libc::getsockopt(
            0,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r == 0 && len as usize == std::mem::size_of::<libc::ucred>() {
        Peer::Unix {
            pid: Some(cred.pid),
            uid: Some(cred.uid),
            gid: Some(cred.gid),
        }
    } else {
        Peer::Stdio
    }
}
