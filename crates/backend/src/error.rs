//! Errors with an errno-like kind that maps onto NBD's error values.

use std::fmt;

/// What went wrong, in the terms the NBD protocol can express.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// EPERM: not allowed (also used for writes to read-only exports).
    PermissionDenied,
    /// EROFS: the backend is read-only.  Sent to clients as EPERM, which is
    /// what the protocol has for it.
    ReadOnly,
    /// EIO: the data could not be read or written.
    Io,
    /// ENOMEM.
    OutOfMemory,
    /// EINVAL: a bad request (misaligned, bad flags, bad parameter).
    InvalidInput,
    /// ENOSPC / EFBIG / EDQUOT: no room.
    NoSpace,
    /// EOVERFLOW: out of range, or too large for a single reply.
    Overflow,
    /// ENOTSUP / EOPNOTSUPP: not supported (callers may fall back).
    NotSupported,
    /// ESHUTDOWN: the server is shutting down.
    Shutdown,
}

impl ErrorKind {
    /// Classify a host errno.
    pub fn from_errno(errno: i32) -> Self {
        match errno {
            libc::EPERM | libc::EACCES => ErrorKind::PermissionDenied,
            libc::EROFS => ErrorKind::ReadOnly,
            libc::ENOMEM => ErrorKind::OutOfMemory,
            libc::EINVAL => ErrorKind::InvalidInput,
            libc::ENOSPC | libc::EFBIG | libc::EDQUOT => ErrorKind::NoSpace,
            libc::EOVERFLOW | libc::ERANGE => ErrorKind::Overflow,
            libc::ENOTSUP | libc::ENOSYS => ErrorKind::NotSupported,
            libc::ESHUTDOWN => ErrorKind::Shutdown,
            _ => ErrorKind::Io,
        }
    }

    fn name(self) -> &'static str {
        match self {
            ErrorKind::PermissionDenied => "permission denied",
            ErrorKind::ReadOnly => "read-only",
            ErrorKind::Io => "I/O error",
            ErrorKind::OutOfMemory => "out of memory",
            ErrorKind::InvalidInput => "invalid argument",
            ErrorKind::NoSpace => "no space",
            ErrorKind::Overflow => "out of range",
            ErrorKind::NotSupported => "not supported",
            ErrorKind::Shutdown => "shutting down",
        }
    }
}

/// A backend error: a kind for the client and a message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    /// The server should drop the connection instead of replying.
    disconnect: bool,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            disconnect: false,
        }
    }
    /// An error after which the server closes the connection at once,
    /// without replying to this request (nbdkit's hard
    /// `nbdkit_disconnect`): for clients that must not be answered, e.g.
    /// a write larger than the blocksize-policy filter's
    /// `blocksize-write-disconnect`.  The kind is ESHUTDOWN.
    pub fn disconnect(message: impl Into<String>) -> Self {
        Error {
            disconnect: true,
            ..Self::new(ErrorKind::Shutdown, message)
        }
    }
    /// Whether the server must close the connection (see
    /// [`Error::disconnect`]).
    pub fn disconnects(&self) -> bool {
        self.disconnect
    }
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
    pub fn message(&self) -> &str {
        &self.message
    }
    pub fn io(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Io, message)
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }
    pub fn not_supported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotSupported, message)
    }
    pub fn read_only(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::ReadOnly, message)
    }
    pub fn overflow(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Overflow, message)
    }
    /// Wrap an OS error with what was being done, e.g. `"pread disk.img"`.
    pub fn from_io(context: impl fmt::Display, e: std::io::Error) -> Self {
        let kind = e.raw_os_error().map_or_else(
            || match e.kind() {
                std::io::ErrorKind::Unsupported => ErrorKind::NotSupported,
                std::io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
                std::io::ErrorKind::InvalidInput => ErrorKind::InvalidInput,
                std::io::ErrorKind::OutOfMemory => ErrorKind::OutOfMemory,
                _ => ErrorKind::Io,
            },
            ErrorKind::from_errno,
        );
        Error::new(kind, format!("{context}: {e}"))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.message.is_empty() {
            f.write_str(self.kind.name())
        } else {
            f.write_str(&self.message)
        }
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::from_io("I/O", e)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A configuration or start-up error: shown to the user as one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl ConfigError {
    pub fn new(msg: impl Into<String>) -> Self {
        ConfigError(msg.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_errors_map_to_kinds() {
        let e = Error::from_io("x", std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        let e = Error::from_io("x", std::io::Error::from_raw_os_error(libc::EROFS));
        assert_eq!(e.kind(), ErrorKind::ReadOnly);
        let e = Error::from_io("x", std::io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        assert_eq!(e.kind(), ErrorKind::NotSupported);
        let e = Error::from_io("x", std::io::Error::from_raw_os_error(libc::EBADF));
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(e.to_string().starts_with("x: "));
    }
}
