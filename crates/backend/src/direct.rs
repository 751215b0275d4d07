//! Reads the server can send without copying the data through a buffer.
//!
//! Why: a plugin whose bytes already sit in a file (the `file` plugin) can
//! say *where* a read's bytes are instead of copying them into memory, and
//! the server then hands them from the page cache to the socket with
//! `sendfile`.  Large reads then cost no user-space buffer at all (a server
//! with four connections of 16 workers reading 256 KiB each otherwise holds
//! 16 MiB of read buffers) and one copy less.
//!
//! This is an optimisation the chain must opt into at every level: the
//! default answer is "no" ([`crate::Handle::pread_direct`] returns `None`),
//! and a filter does not forward it unless it says so, because a filter
//! that changes data (decompression, byte swapping, …) must never be
//! bypassed.

use std::os::fd::BorrowedFd;

/// One piece of a direct read, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectPiece {
    /// `len` bytes of the file at `offset`.  If the file turns out to be
    /// shorter, the rest reads as zeroes (as a short `pread` would).
    File { offset: u64, len: u64 },
    /// `len` bytes that read as zeroes (a hole, or beyond the file's end).
    Zero { len: u64 },
}

impl DirectPiece {
    pub fn len(&self) -> u64 {
        match *self {
            DirectPiece::File { len, .. } | DirectPiece::Zero { len } => len,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where the bytes of one read are: pieces of `fd`, or zeroes, covering
/// the request exactly.
#[derive(Debug)]
pub struct DirectRead<'a> {
    pub fd: BorrowedFd<'a>,
    pub pieces: Vec<DirectPiece>,
}

impl DirectRead<'_> {
    /// Total length of the pieces.
    pub fn len(&self) -> u64 {
        self.pieces.iter().map(DirectPiece::len).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
