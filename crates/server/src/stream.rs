//! The byte streams a connection runs over: [`Stream`] (any async
//! stream: TCP, Unix, stdin/stdout, TLS) for the handshake, and what the
//! transmission phase gets from it ([`Transport`]): a [`BlockingSocket`]
//! for the threaded path, or the stream itself for the async path.

use tokio::io::{AsyncRead, AsyncWrite};

/// A bidirectional byte stream (TCP, Unix socket, stdin/stdout, TLS).
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {
    /// Plain sockets become blocking sockets for the threaded transmission
    /// path (see [`transmission`]); other streams stay asynchronous.
    fn into_blocking(self: Box<Self>) -> Transport;

    /// The socket underneath, when there is one (for
    /// [`nbdkit_backend::nanosleep`] to notice a client hanging up).
    fn socket_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
}

/// What the transmission phase runs over.
pub enum Transport {
    Blocking(BlockingSocket),
    Async(Box<dyn Stream>),
}

impl Stream for tokio::net::TcpStream {
    fn socket_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        Some(std::os::fd::AsFd::as_fd(self))
    }
    fn into_blocking(self: Box<Self>) -> Transport {
        match (*self).into_std() {
            Ok(s) => Transport::Blocking(BlockingSocket::Tcp(s)),
            Err(e) => Transport::Async(Box::new(Broken(Some(e)))),
        }
    }
}

impl Stream for tokio::net::UnixStream {
    fn socket_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        Some(std::os::fd::AsFd::as_fd(self))
    }
    fn into_blocking(self: Box<Self>) -> Transport {
        match (*self).into_std() {
            Ok(s) => Transport::Blocking(BlockingSocket::Unix(s)),
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

/// Send buffer asked for on Unix sockets (the kernel caps it at
/// net.core.wmem_max).
const REPLY_BUFFER: usize = 4 << 20;

/// A connected plain socket, switched to blocking mode.  Reads and writes
/// go through `&BlockingSocket`, so one descriptor serves every worker of
/// a connection (the workers' locks say who may read and who may write).
pub enum BlockingSocket {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl BlockingSocket {
    pub(crate) fn set_blocking(&self) -> std::io::Result<()> {
        match self {
            BlockingSocket::Tcp(s) => s.set_nonblocking(false),
            BlockingSocket::Unix(s) => {
                // A Unix socket's default send buffer (~200 KiB) is smaller
                // than one typical read reply (256 KiB from nbdcopy, 2 MiB
                // from qemu), so every reply would block mid-write, holding
                // the write lock.  TCP sizes its buffers by itself.
                let _ = socket2::SockRef::from(s).set_send_buffer_size(REPLY_BUFFER);
                s.set_nonblocking(false)
            }
        }
    }
    pub(crate) fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        match self {
            BlockingSocket::Tcp(s) => s.as_fd(),
            BlockingSocket::Unix(s) => s.as_fd(),
        }
    }
    /// Write all of `buf`, telling TCP more is coming (MSG_MORE), so a
    /// reply header and the data sent after it leave in full segments.
    pub(crate) fn write_more(&self, mut buf: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        let BlockingSocket::Tcp(s) = self else {
            return (&mut &*self).write_all(buf);
        };
        while !buf.is_empty() {
            match socket2::SockRef::from(s).send_with_flags(buf, libc::MSG_MORE) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
    /// Wake up a worker blocked reading (`Read`): new reads return
    /// end-of-file; or tell the client no more replies come (`Write`).
    pub(crate) fn shutdown(&self, how: std::net::Shutdown) {
        let _ = match self {
            BlockingSocket::Tcp(s) => s.shutdown(how),
            BlockingSocket::Unix(s) => s.shutdown(how),
        };
    }
}

impl std::io::Read for &BlockingSocket {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match *self {
            BlockingSocket::Tcp(s) => (&mut &*s).read(buf),
            BlockingSocket::Unix(s) => (&mut &*s).read(buf),
        }
    }
}

impl std::io::Write for &BlockingSocket {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match *self {
            BlockingSocket::Tcp(s) => (&mut &*s).write(buf),
            BlockingSocket::Unix(s) => (&mut &*s).write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
