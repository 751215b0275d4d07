//! Transmission-phase requests: the compact 28-byte header and the 32-byte
//! extended header (64-bit lengths).

use crate::consts::*;
use crate::{at_least, be16, be32, be64, ProtoError};

pub const REQUEST_LEN: usize = 28;
pub const EXTENDED_REQUEST_LEN: usize = 32;

/// A request header as read off the wire (before any WRITE payload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    /// 32-bit in compact headers, 64-bit with extended headers.
    pub length: u64,
}

/// The command of a request, for matching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    Unknown(u16),
}

impl Command {
    pub fn from_u16(c: u16) -> Self {
        match c {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disc,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_CACHE => Command::Cache,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_BLOCK_STATUS => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }
}

/// A whole request: header plus the WRITE payload, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub header: RequestHeader,
    pub payload: Vec<u8>,
}

impl RequestHeader {
    /// Length of the header on the wire for the negotiated style.
    pub fn wire_len(extended: bool) -> usize {
        if extended {
            EXTENDED_REQUEST_LEN
        } else {
            REQUEST_LEN
        }
    }

    /// Parse a header.  `b` must hold at least [`RequestHeader::wire_len`]
    /// bytes.  The magic must match the negotiated style.
    pub fn parse(b: &[u8], extended: bool) -> Result<Self, ProtoError> {
        let need = Self::wire_len(extended);
        at_least(b, need)?;
        let magic = be32(b, 0);
        let want = if extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };
        if magic != want {
            return Err(ProtoError::BadMagic(magic as u64));
        }
        Ok(RequestHeader {
            flags: be16(b, 4),
            command: be16(b, 6),
            cookie: be64(b, 8),
            offset: be64(b, 16),
            length: if extended {
                be64(b, 24)
            } else {
                be32(b, 24) as u64
            },
        })
    }

    pub fn command(&self) -> Command {
        Command::from_u16(self.command)
    }

    /// Bytes of payload that follow this header on the wire.  A WRITE always
    /// carries `length` bytes; with extended headers any command flagged
    /// `PAYLOAD_LEN` does too.  The server must consume these even when it
    /// refuses the request, or the stream loses framing.
    pub fn payload_len(&self, extended: bool) -> u64 {
        if self.command == CMD_WRITE || (extended && self.flags & CMD_FLAG_PAYLOAD_LEN != 0) {
            self.length
        } else {
            0
        }
    }

    /// Encode as a client would (tests and fuzz seeds).  With compact headers
    /// the length is truncated to 32 bits.
    pub fn encode(&self, extended: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::wire_len(extended));
        let magic = if extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };
        out.extend_from_slice(&magic.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.command.to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        if extended {
            out.extend_from_slice(&self.length.to_be_bytes());
        } else {
            out.extend_from_slice(&(self.length as u32).to_be_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn roundtrip(flags: u16, command: u16, cookie: u64, offset: u64, length: u64, extended: bool) {
            let length = if extended { length } else { length & 0xffff_ffff };
            let h = RequestHeader { flags, command, cookie, offset, length };
            let bytes = h.encode(extended);
            prop_assert_eq!(bytes.len(), RequestHeader::wire_len(extended));
            prop_assert_eq!(RequestHeader::parse(&bytes, extended).unwrap(), h);
        }

        #[test]
        fn wrong_style_magic_is_rejected(h in (any::<u16>(), any::<u64>()), extended: bool) {
            let req = RequestHeader { flags: 0, command: h.0, cookie: h.1, offset: 0, length: 0 };
            let bytes = req.encode(extended);
            let mut padded = bytes.clone();
            padded.resize(32, 0);
            prop_assert!(RequestHeader::parse(&padded, !extended).is_err());
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..40), extended: bool) {
            let _ = RequestHeader::parse(&bytes, extended);
        }
    }

    #[test]
    fn write_payload_is_counted_even_for_huge_lengths() {
        let h = RequestHeader {
            flags: 0,
            command: CMD_WRITE,
            cookie: 1,
            offset: 0,
            length: 1 << 40,
        };
        assert_eq!(h.payload_len(true), 1 << 40);
        let r = RequestHeader {
            command: CMD_READ,
            ..h
        };
        assert_eq!(r.payload_len(true), 0);
    }
}
