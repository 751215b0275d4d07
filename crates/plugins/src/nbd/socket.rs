//! The socket the `nbd` plugin talks to its server on: TCP or Unix, one
//! type for both, used alike by the plain client ([`super::client`]) and
//! under TLS ([`super::tls`]).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

/// A connected socket of either family.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    /// A connected socket from a descriptor: Unix or TCP, by its family.
    pub(crate) fn from_fd(fd: OwnedFd) -> std::io::Result<Stream> {
        // SAFETY: sockaddr_storage is plain data; getsockname writes at most
        // `len` bytes into it.
        let family = unsafe {
            let mut ss: libc::sockaddr_storage = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            if libc::getsockname(
                fd.as_raw_fd(),
                &mut ss as *mut _ as *mut libc::sockaddr,
                &mut len,
            ) == -1
            {
                return Err(std::io::Error::last_os_error());
            }
            ss.ss_family as libc::c_int
        };
        match family {
            libc::AF_UNIX => Ok(Stream::Unix(fd.into())),
            libc::AF_INET | libc::AF_INET6 => {
                let s = std::net::TcpStream::from(fd);
                let _ = s.set_nodelay(true);
                Ok(Stream::Tcp(s))
            }
            f => Err(std::io::Error::other(format!(
                "the socket's address family {f} is neither Unix nor TCP"
            ))),
        }
    }

    pub(crate) fn try_clone(&self) -> std::io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }
    pub(crate) fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
