//! The NBD wire protocol, as pure functions from bytes to typed messages
//! and back.
//!
//! Nothing here does I/O or decides policy: the server reads bytes, hands
//! them to these parsers, and writes what the encoders return.  Keeping the
//! codec pure makes it easy to property-test and to fuzz.  No crate
//! implements the server side of NBD, so this is written by hand from the
//! protocol specification (NetworkBlockDevice/nbd `doc/proto.md`).
#![forbid(unsafe_code)]

pub mod consts;
pub mod option;
pub mod reply;
pub mod request;

pub use consts::*;
pub use option::{OptionHeader, OptionRequest};
pub use reply::*;
pub use request::{Command, Request, RequestHeader};

/// A protocol violation found while parsing peer bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("bad magic 0x{0:x}")]
    BadMagic(u64),
    #[error("message too short: need {need} bytes, have {have}")]
    Short { need: usize, have: usize },
    #[error("option payload too large: {0} bytes")]
    PayloadTooLarge(u32),
    #[error("malformed option payload: {0}")]
    Malformed(&'static str),
    #[error("string is not valid UTF-8 or contains NUL")]
    BadString,
    #[error("string of {0} bytes is too long (the limit is 4096)")]
    StringTooLong(usize),
}

/// `Short` unless `b` holds at least `need` bytes.
fn at_least(b: &[u8], need: usize) -> Result<(), ProtoError> {
    match b.len() {
        have if have < need => Err(ProtoError::Short { need, have }),
        _ => Ok(()),
    }
}

/// `BadMagic` unless `b` starts with the 64-bit `magic`.
fn magic64(b: &[u8], magic: u64) -> Result<(), ProtoError> {
    match be64(b, 0) {
        m if m != magic => Err(ProtoError::BadMagic(m)),
        _ => Ok(()),
    }
}

/// Read a big-endian u16 at `at` (caller has checked the length).
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}
