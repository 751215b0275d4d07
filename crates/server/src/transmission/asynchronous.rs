//! The async transmission path, for streams that are not plain sockets
//! (TLS, stdin/stdout): one reader task per connection frames requests and
//! hands each to tokio's blocking pool, up to `-t` at once; replies are
//! written under an async lock as they finish.

use std::sync::Arc;

use nbdkit_backend::Client;
use nbdkit_proto::*;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::{read_request, refusal, run};
use crate::handshake::Negotiated;
use crate::server::Server;
use crate::stream::{ConnectionError, Stream};

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

        let op = match neg.export.validate(
            &h,
            neg.style.is_structured(),
            extended,
            !neg.contexts.is_empty(),
        ) {
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
        let contexts = neg.contexts;
        let cookie = h.cookie;
        let client2 = client.clone();
        let stop2 = stop.clone();
        tasks.spawn(async move {
            let reply = match server2
                .blocking(&client2, move || {
                    run(&export, op, payload, style, cookie, contexts)
                })
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

async fn write(wr: &Writer, bytes: &[u8]) -> std::io::Result<()> {
    let mut w = wr.lock().await;
    w.write_all(bytes).await?;
    w.flush().await
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
