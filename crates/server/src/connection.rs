//! A connection's life: accept, `--max-connections`, preconnect, the
//! handshake, then the transmission path its stream allows (threaded for
//! plain sockets, async for TLS and stdin/stdout), and `disconnected`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use nbdkit_backend::{Client, Peer, ThreadModel};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::listen::{self, ListenerSet};
use crate::server::Server;
use crate::stream::{ConnectionError, Stream, Transport};
use crate::{handshake, transmission};

impl Server {
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
        client.set_socket(
            stream
                .socket_fd()
                .and_then(|fd| fd.try_clone_to_owned().ok()),
        );
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
        client.set_socket(None);
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
                r = l.accept(self.opts.keepalive) => r,
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
                                warn!(
                                    %peer,
                                    "too many connections (--max-connections={}): closing",
                                    self.opts.max_connections.unwrap_or_default()
                                );
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
