//! A whole client session as arbitrary bytes: the real server (handshake
//! and transmission) over a memory disk, in-process.  Whatever the bytes,
//! the server must not panic or hang, and must end the connection once the
//! input ends.
#![no_main]
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use nbdkit_backend::Config;
use nbdkit_server::{Server, ServerOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

fn server() -> &'static (tokio::runtime::Runtime, Arc<Server>) {
    static S: OnceLock<(tokio::runtime::Runtime, Arc<Server>)> = OnceLock::new();
    S.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mut cfg = Config::new(vec![("size".into(), "1M".into())]);
        let backend = (nbdkit_plugins::memory::SPEC.create)(&mut cfg).unwrap();
        (rt, Server::new(backend, ServerOptions::default()))
    })
}

fuzz_target!(|data: &[u8]| {
    let (rt, server) = server();
    rt.block_on(async {
        let (client, conn) = tokio::io::duplex(1 << 16);
        let task = tokio::spawn(server.clone().serve_connection(Box::new(conn), nbdkit_backend::Peer::Stdio, CancellationToken::new()));
        let (mut rd, mut wr) = tokio::io::split(client);
        let writer = async {
            let _ = wr.write_all(data).await;
            let _ = wr.shutdown().await;
        };
        // Drain replies concurrently, until the server closes its side.
        let reader = async {
            let mut sink = vec![0u8; 1 << 16];
            while let Ok(n) = rd.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        };
        tokio::join!(writer, reader);
        task.await.unwrap();
    });
});
