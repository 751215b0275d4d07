//! The NBD server: listeners, the handshake, and request dispatch over any
//! [`nbdkit_backend::Backend`].
//!
//! Listening, TLS and the handshake are asynchronous (tokio).  The
//! transmission phase then takes one of two paths (see [`transmission`]):
//! plain TCP and Unix sockets are switched to blocking mode and served by
//! up to `-t` worker threads per connection, started as requests arrive
//! and retired when the connection goes quiet, each reading a request,
//! calling the backend and writing the reply itself; TLS and stdin/stdout stay on an
//! async reader that hands requests to tokio's blocking thread pool.  Both
//! frame requests with the same [`transmission::read_request`].  Backend
//! calls are synchronous either way, so plugins are plain code with plain
//! `pread`/`pwrite`.  The backend's thread model is enforced here with
//! locks, never by the backend itself.
//!
//! Files depend on each other in one direction: `stream` (the byte
//! streams) ← `listen`, `tls` ← `server` (the [`Server`] and its locks) ←
//! `export`, `meta_context`, `handshake` ← `transmission` ← `connection`
//! (a connection's whole life).  This file only declares them.

mod connection;
pub mod export;
pub mod handshake;
pub mod listen;
pub mod meta_context;
mod server;
pub mod stream;
pub mod tls;
pub mod tls_priority;
pub mod transmission;

pub use listen::{Listener, ListenerSet};
pub use server::{default_connection_limit, Server, ServerOptions};
pub use stream::{ConnectionError, Stream, Transport};
