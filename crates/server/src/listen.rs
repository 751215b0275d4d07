//! Listening sockets.  They are bound with std (blocking) sockets before the
//! process forks to the background and before the async runtime exists, so
//! "port in use" is reported to the user in the foreground; they are turned
//! into tokio listeners afterwards.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};

use socket2::{Domain, Socket, Type};

use nbdkit_backend::Peer;

use crate::stream::Stream;

/// A bound, listening socket.
pub enum Listener {
    Tcp(std::net::TcpListener),
    Unix(StdUnixListener),
}

/// All the sockets a server accepts on.
#[derive(Default)]
pub struct ListenerSet {
    pub listeners: Vec<Listener>,
}

/// Which address families `-4`/`-6` allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Any,
    V4,
    V6,
}

impl ListenerSet {
    /// Listen on TCP `port` at `addr` (all addresses when `None`).
    pub fn bind_tcp(addr: Option<&str>, port: u16, family: Family) -> io::Result<Self> {
        let addrs: Vec<SocketAddr> = match addr {
            Some(a) => (a, port).to_socket_addrs()?.collect(),
            None => vec![
                SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
                SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
            ],
        };
        let mut listeners = Vec::new();
        let mut last_err = None;
        for a in addrs {
            let wanted = match family {
                Family::Any => true,
                Family::V4 => a.is_ipv4(),
                Family::V6 => a.is_ipv6(),
            };
            if !wanted {
                continue;
            }
            match bind_one(a) {
                Ok(l) => listeners.push(Listener::Tcp(l)),
                // No IPv6 on this host: fine if IPv4 works.
                Err(e) if a.is_ipv6() && addr.is_none() && e.kind() != io::ErrorKind::AddrInUse => {
                    last_err = Some(e)
                }
                Err(e) => return Err(io::Error::new(e.kind(), format!("{a}: {e}"))),
            }
        }
        if listeners.is_empty() {
            return Err(last_err.unwrap_or_else(|| {
                io::Error::new(io::ErrorKind::AddrNotAvailable, "no address to listen on")
            }));
        }
        Ok(ListenerSet { listeners })
    }

    /// Listen on a Unix domain socket at `path`.
    pub fn bind_unix(path: &Path) -> io::Result<Self> {
        let l = StdUnixListener::bind(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        Ok(ListenerSet {
            listeners: vec![Listener::Unix(l)],
        })
    }

    /// Sockets passed by systemd-style socket activation (LISTEN_PID,
    /// LISTEN_FDS), or `None` when not activated.
    pub fn from_activation() -> io::Result<Option<Self>> {
        let pid = match std::env::var("LISTEN_PID") {
            Ok(p) => p,
            Err(_) => return Ok(None),
        };
        if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
            return Ok(None);
        }
        let n: RawFd = std::env::var("LISTEN_FDS")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .filter(|&n| n > 0 && n < 1024)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "LISTEN_FDS is missing or invalid",
                )
            })?;
        // Not for our children (a --run command must not think it is activated).
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
        let mut listeners = Vec::new();
        for fd in 3..3 + n {
            // SAFETY: socket activation hands these descriptors to us.
            let sock = unsafe { Socket::from_raw_fd(fd) };
            let domain = sock.local_addr()?.domain();
            if domain == Domain::UNIX {
                listeners.push(Listener::Unix(sock.into()));
            } else {
                listeners.push(Listener::Tcp(sock.into()));
            }
        }
        Ok(Some(ListenerSet { listeners }))
    }

    /// The TCP port actually bound (useful with port 0).
    pub fn tcp_port(&self) -> Option<u16> {
        self.listeners.iter().find_map(|l| match l {
            Listener::Tcp(t) => t.local_addr().ok().map(|a| a.port()),
            _ => None,
        })
    }

    pub(crate) fn into_tokio(self) -> io::Result<Vec<TokioListener>> {
        self.listeners
            .into_iter()
            .map(|l| match l {
                Listener::Tcp(t) => {
                    t.set_nonblocking(true)?;
                    Ok(TokioListener::Tcp(tokio::net::TcpListener::from_std(t)?))
                }
                Listener::Unix(u) => {
                    u.set_nonblocking(true)?;
                    Ok(TokioListener::Unix(tokio::net::UnixListener::from_std(u)?))
                }
            })
            .collect()
    }
}

fn bind_one(a: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(a), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    if a.is_ipv6() {
        // Separate IPv4 and IPv6 sockets, as nbdkit does.
        s.set_only_v6(true)?;
    }
    s.bind(&a.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

pub(crate) enum TokioListener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

impl TokioListener {
    /// The next client.  `keepalive` (`--keepalive`) turns on TCP
    /// keepalive probes for it (Unix sockets have none: their peer cannot
    /// vanish without the kernel knowing).
    pub(crate) async fn accept(&self, keepalive: bool) -> io::Result<(Box<dyn Stream>, Peer)> {
        match self {
            TokioListener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                s.set_nodelay(true)?;
                if keepalive {
                    // The kernel's keepalive timings apply
                    // (net.ipv4.tcp_keepalive_time and friends).  A
                    // failure costs only the probes, so the client is
                    // still served.
                    if let Err(e) = socket2::SockRef::from(&s).set_keepalive(true) {
                        tracing::warn!("--keepalive: SO_KEEPALIVE: {e}");
                    }
                }
                // IPv4 clients of a dual-stack socket show up as
                // ::ffff:a.b.c.d; access rules are written in IPv4.
                let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
                Ok((Box::new(s), Peer::Tcp(peer)))
            }
            TokioListener::Unix(l) => {
                let (s, _) = l.accept().await?;
                let peer = match s.peer_cred() {
                    Ok(c) => Peer::Unix {
                        pid: c.pid(),
                        uid: Some(c.uid()),
                        gid: Some(c.gid()),
                    },
                    Err(_) => Peer::Unix {
                        pid: None,
                        uid: None,
                        gid: None,
                    },
                };
                Ok((Box::new(s), peer))
            }
        }
    }
}

/// The stream for `-s`: stdin and stdout.  When stdin is a socket (as when
/// libnbd runs us with `nbd_connect_command`), it is used directly in both
/// directions for speed; otherwise the two pipes are joined.
pub fn stdio_stream() -> io::Result<Box<dyn Stream>> {
    // SAFETY: a zeroed `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on fd 0 with a valid out pointer.
    let is_socket =
        unsafe { libc::fstat(0, &mut st) } == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFSOCK;
    if is_socket {
        // SAFETY: dup gives us our own descriptor for fd 0.
        let fd = unsafe { libc::dup(0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is the fresh descriptor dup returned, owned by nothing else.
        let std = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
        std.set_nonblocking(true)?;
        Ok(Box::new(tokio::net::UnixStream::from_std(std)?))
    } else {
        Ok(Box::new(tokio::io::join(
            tokio::io::stdin(),
            tokio::io::stdout(),
        )))
    }
}

/// A temporary directory holding a Unix socket for `-U -`.
pub struct TempSocket {
    pub dir: PathBuf,
    pub path: PathBuf,
}

impl TempSocket {
    pub fn new() -> io::Result<Self> {
        let base = std::env::var_os("TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| "/tmp".into());
        for i in 0..100u32 {
            let dir = base.join(format!("nbdkit-rs{}-{i}", std::process::id()));
            match std::fs::create_dir(&dir) {
                Ok(()) => {
                    let path = dir.join("socket");
                    return Ok(TempSocket { dir, path });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "cannot create a temporary socket directory",
        ))
    }

    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}
