//! Transmission-phase replies: simple replies, structured reply chunks and
//! extended-header reply chunks.

use crate::consts::*;
use crate::{at_least, be16, be32, be64, ProtoError};

/// Which reply format the client negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyStyle {
    /// Only simple replies (no `NBD_OPT_STRUCTURED_REPLY`).
    Simple,
    /// Structured replies with 32-bit lengths.
    Structured,
    /// `NBD_OPT_EXTENDED_HEADERS`: every reply is a 32-byte chunk header.
    Extended,
}

pub const SIMPLE_REPLY_LEN: usize = 16;
pub const STRUCTURED_HEADER_LEN: usize = 20;
pub const EXTENDED_HEADER_LEN: usize = 32;

impl ReplyStyle {
    pub fn is_structured(self) -> bool {
        self != ReplyStyle::Simple
    }
    /// Length of a chunk header in this style (simple replies are 16 bytes).
    pub fn header_len(self) -> usize {
        match self {
            ReplyStyle::Simple => SIMPLE_REPLY_LEN,
            ReplyStyle::Structured => STRUCTURED_HEADER_LEN,
            ReplyStyle::Extended => EXTENDED_HEADER_LEN,
        }
    }
}

/// A simple reply: magic, error, cookie.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_LEN];
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// Append a chunk header.  `offset` is the request's offset (only the
/// extended header carries it).
pub fn push_chunk_header(
    out: &mut Vec<u8>,
    style: ReplyStyle,
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    payload_len: u64,
) {
    match style {
        ReplyStyle::Extended => {
            out.extend_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
            out.extend_from_slice(&kind.to_be_bytes());
            out.extend_from_slice(&cookie.to_be_bytes());
            out.extend_from_slice(&offset.to_be_bytes());
            out.extend_from_slice(&payload_len.to_be_bytes());
        }
        _ => {
            out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
            out.extend_from_slice(&kind.to_be_bytes());
            out.extend_from_slice(&cookie.to_be_bytes());
            out.extend_from_slice(&(payload_len as u32).to_be_bytes());
        }
    }
}

/// A reply with no payload: a simple reply, or a `NONE` chunk with DONE.
pub fn ok_reply(style: ReplyStyle, cookie: u64, offset: u64) -> Vec<u8> {
    if style == ReplyStyle::Simple {
        return simple_reply(0, cookie).to_vec();
    }
    let mut out = Vec::with_capacity(style.header_len());
    push_chunk_header(
        &mut out,
        style,
        REPLY_FLAG_DONE,
        REPLY_TYPE_NONE,
        cookie,
        offset,
        0,
    );
    out
}

/// An error reply: a simple reply, or an `ERROR` chunk with a message
/// (truncated to the protocol's string limit) and the DONE flag.
pub fn error_reply(style: ReplyStyle, cookie: u64, offset: u64, error: u32, msg: &str) -> Vec<u8> {
    if style == ReplyStyle::Simple {
        return simple_reply(error, cookie).to_vec();
    }
    let msg = truncate_utf8(msg, MAX_STRING.min(u16::MAX as usize));
    let mut out = Vec::with_capacity(style.header_len() + 6 + msg.len());
    push_chunk_header(
        &mut out,
        style,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        offset,
        6 + msg.len() as u64,
    );
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg.as_bytes());
    out
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Header for a successful READ carrying `data_len` bytes that the caller
/// appends: a simple reply, or an `OFFSET_DATA` chunk (header + offset).
pub fn read_data_header(
    style: ReplyStyle,
    cookie: u64,
    offset: u64,
    data_len: u64,
    done: bool,
) -> Vec<u8> {
    if style == ReplyStyle::Simple {
        return simple_reply(0, cookie).to_vec();
    }
    let mut out = Vec::with_capacity(style.header_len() + 8);
    push_chunk_header(
        &mut out,
        style,
        if done { REPLY_FLAG_DONE } else { 0 },
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        offset,
        8 + data_len,
    );
    out.extend_from_slice(&offset.to_be_bytes());
    out
}

/// Length of [`read_data_header`]'s output for a style.
pub fn read_data_header_len(style: ReplyStyle) -> usize {
    match style {
        ReplyStyle::Simple => SIMPLE_REPLY_LEN,
        s => s.header_len() + 8,
    }
}

/// An `OFFSET_HOLE` chunk: `len` bytes at `offset` read as zeroes.
pub fn hole_chunk(style: ReplyStyle, cookie: u64, offset: u64, len: u32, done: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(style.header_len() + 12);
    push_chunk_header(
        &mut out,
        style,
        if done { REPLY_FLAG_DONE } else { 0 },
        REPLY_TYPE_OFFSET_HOLE,
        cookie,
        offset,
        12,
    );
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out
}

/// A block status chunk (32-bit descriptors, or 64-bit with extended
/// headers) for one meta context, with DONE set when `done`.
pub fn block_status_chunk(
    style: ReplyStyle,
    cookie: u64,
    offset: u64,
    context_id: u32,
    extents: &[(u64, u32)],
    done: bool,
) -> Vec<u8> {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    let mut out = Vec::new();
    if style == ReplyStyle::Extended {
        let len = 8 + 16 * extents.len() as u64;
        push_chunk_header(
            &mut out,
            style,
            flags,
            REPLY_TYPE_BLOCK_STATUS_EXT,
            cookie,
            offset,
            len,
        );
        out.extend_from_slice(&context_id.to_be_bytes());
        out.extend_from_slice(&(extents.len() as u32).to_be_bytes());
        for &(length, status) in extents {
            out.extend_from_slice(&length.to_be_bytes());
            out.extend_from_slice(&(status as u64).to_be_bytes());
        }
    } else {
        let len = 4 + 8 * extents.len() as u64;
        push_chunk_header(
            &mut out,
            style,
            flags,
            REPLY_TYPE_BLOCK_STATUS,
            cookie,
            offset,
            len,
        );
        out.extend_from_slice(&context_id.to_be_bytes());
        for &(length, status) in extents {
            // Callers split extents so each fits in 32 bits here.
            out.extend_from_slice(&(length.min(u32::MAX as u64) as u32).to_be_bytes());
            out.extend_from_slice(&status.to_be_bytes());
        }
    }
    out
}

/// A reply header as a client parses it (used by tests and the test client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple {
        error: u32,
        cookie: u64,
    },
    Chunk {
        flags: u16,
        kind: u16,
        cookie: u64,
        offset: u64,
        length: u64,
    },
}

impl ReplyHeader {
    /// Parse from `b`, which holds at least 4 bytes; returns the header and
    /// its length, or `Short` if more bytes are needed.
    pub fn parse(b: &[u8]) -> Result<(Self, usize), ProtoError> {
        at_least(b, 4)?;
        let magic = be32(b, 0);
        let need = match magic {
            SIMPLE_REPLY_MAGIC => SIMPLE_REPLY_LEN,
            STRUCTURED_REPLY_MAGIC => STRUCTURED_HEADER_LEN,
            EXTENDED_REPLY_MAGIC => EXTENDED_HEADER_LEN,
            m => return Err(ProtoError::BadMagic(m as u64)),
        };
        at_least(b, need)?;
        let h = match magic {
            SIMPLE_REPLY_MAGIC => ReplyHeader::Simple {
                error: be32(b, 4),
                cookie: be64(b, 8),
            },
            STRUCTURED_REPLY_MAGIC => ReplyHeader::Chunk {
                flags: be16(b, 4),
                kind: be16(b, 6),
                cookie: be64(b, 8),
                offset: 0,
                length: be32(b, 16) as u64,
            },
            _ => ReplyHeader::Chunk {
                flags: be16(b, 4),
                kind: be16(b, 6),
                cookie: be64(b, 8),
                offset: be64(b, 16),
                length: be64(b, 24),
            },
        };
        Ok((h, need))
    }
}

/// A structured reply chunk's payload, as a client parses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyChunk<'a> {
    None,
    /// Read data at `offset`.
    OffsetData {
        offset: u64,
        data: &'a [u8],
    },
    /// `length` bytes at `offset` read as zeroes.
    OffsetHole {
        offset: u64,
        length: u32,
    },
    /// Block status for one context: (length, status) descriptors, from
    /// 32-bit (`BLOCK_STATUS`) or 64-bit (`BLOCK_STATUS_EXT`) ones.
    BlockStatus {
        context: u32,
        descriptors: Vec<(u64, u64)>,
    },
    /// `ERROR` or `ERROR_OFFSET`: the NBD error value and the message
    /// (raw bytes), with the offset the latter names.
    Error {
        error: u32,
        message: &'a [u8],
        offset: Option<u64>,
    },
    /// A type this codec does not know.  The protocol lets a client
    /// ignore an unknown informational chunk, not an unknown error one
    /// ([`ReplyChunk::is_error`]).
    Unknown(u16),
}

impl<'a> ReplyChunk<'a> {
    /// Parse the payload of a chunk of type `kind`.
    pub fn parse(kind: u16, b: &'a [u8]) -> Result<Self, ProtoError> {
        let bad = ProtoError::Malformed;
        let short = |need| ProtoError::Short {
            need,
            have: b.len(),
        };
        Ok(match kind {
            REPLY_TYPE_NONE if b.is_empty() => ReplyChunk::None,
            REPLY_TYPE_NONE => return Err(bad("NONE chunk with a payload")),
            REPLY_TYPE_OFFSET_DATA if b.len() < 8 => return Err(short(8)),
            REPLY_TYPE_OFFSET_DATA => ReplyChunk::OffsetData {
                offset: be64(b, 0),
                data: &b[8..],
            },
            REPLY_TYPE_OFFSET_HOLE if b.len() != 12 => {
                return Err(bad("OFFSET_HOLE chunk is not 12 bytes"))
            }
            REPLY_TYPE_OFFSET_HOLE => ReplyChunk::OffsetHole {
                offset: be64(b, 0),
                length: be32(b, 8),
            },
            REPLY_TYPE_BLOCK_STATUS => {
                if b.len() < 4 || !(b.len() - 4).is_multiple_of(8) {
                    return Err(bad("BLOCK_STATUS chunk is not 4 + 8n bytes"));
                }
                ReplyChunk::BlockStatus {
                    context: be32(b, 0),
                    descriptors: b[4..]
                        .chunks(8)
                        .map(|d| (be32(d, 0) as u64, be32(d, 4) as u64))
                        .collect(),
                }
            }
            REPLY_TYPE_BLOCK_STATUS_EXT => {
                if b.len() < 8 || !(b.len() - 8).is_multiple_of(16) {
                    return Err(bad("BLOCK_STATUS_EXT chunk is not 8 + 16n bytes"));
                }
                if be32(b, 4) as usize != (b.len() - 8) / 16 {
                    return Err(bad("BLOCK_STATUS_EXT count does not match its length"));
                }
                ReplyChunk::BlockStatus {
                    context: be32(b, 0),
                    descriptors: b[8..]
                        .chunks(16)
                        .map(|d| (be64(d, 0), be64(d, 8)))
                        .collect(),
                }
            }
            REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
                if b.len() < 6 {
                    return Err(short(6));
                }
                let end = 6 + be16(b, 4) as usize;
                let message = b.get(6..end).ok_or(short(end))?;
                let offset = if kind == REPLY_TYPE_ERROR_OFFSET {
                    if b.len() != end + 8 {
                        return Err(bad("ERROR_OFFSET chunk has no offset"));
                    }
                    Some(be64(b, end))
                } else {
                    None
                };
                ReplyChunk::Error {
                    error: be32(b, 0),
                    message,
                    offset,
                }
            }
            other => ReplyChunk::Unknown(other),
        })
    }

    /// Whether a chunk of type `kind` reports an error (the type's top
    /// bit), known or not.
    pub fn is_error(kind: u16) -> bool {
        kind & (1 << 15) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The chunk after the header of an encoded reply.
    fn chunk_of(bytes: &[u8]) -> (u16, &[u8]) {
        let (h, n) = ReplyHeader::parse(bytes).unwrap();
        let ReplyHeader::Chunk { kind, length, .. } = h else {
            panic!("not a chunk")
        };
        assert_eq!(length as usize, bytes.len() - n);
        (kind, &bytes[n..])
    }

    proptest! {
        #[test]
        fn chunks_parse_back(style in prop_oneof![Just(ReplyStyle::Structured), Just(ReplyStyle::Extended)],
                             cookie: u64, offset: u64, len: u32, err in 1u32..200, msg in ".{0,100}",
                             data in proptest::collection::vec(any::<u8>(), 0..64),
                             ext in proptest::collection::vec((1u64..1<<31, 0u32..4), 1..20)) {
            let b = error_reply(style, cookie, offset, err, &msg);
            let (k, p) = chunk_of(&b);
            prop_assert_eq!(ReplyChunk::parse(k, p).unwrap(),
                            ReplyChunk::Error { error: err, message: msg.as_bytes(), offset: None });
            let b = hole_chunk(style, cookie, offset, len, true);
            let (k, p) = chunk_of(&b);
            prop_assert_eq!(ReplyChunk::parse(k, p).unwrap(), ReplyChunk::OffsetHole { offset, length: len });
            let mut r = read_data_header(style, cookie, offset, data.len() as u64, true);
            r.extend_from_slice(&data);
            let (k, p) = chunk_of(&r);
            prop_assert_eq!(ReplyChunk::parse(k, p).unwrap(), ReplyChunk::OffsetData { offset, data: &data });
            let b = block_status_chunk(style, cookie, offset, 3, &ext, true);
            let (k, p) = chunk_of(&b);
            let want: Vec<(u64, u64)> = ext.iter().map(|&(l, s)| (l, s as u64)).collect();
            prop_assert_eq!(ReplyChunk::parse(k, p).unwrap(), ReplyChunk::BlockStatus { context: 3, descriptors: want });
            let b = ok_reply(style, cookie, offset);
            let (k, p) = chunk_of(&b);
            prop_assert_eq!(ReplyChunk::parse(k, p).unwrap(), ReplyChunk::None);
        }

        #[test]
        fn chunk_parse_never_panics(kind: u16, b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = ReplyChunk::parse(kind, &b);
        }
    }

    #[test]
    fn malformed_chunks_are_refused() {
        assert!(ReplyChunk::parse(REPLY_TYPE_OFFSET_HOLE, &[0; 11]).is_err());
        assert!(ReplyChunk::parse(REPLY_TYPE_BLOCK_STATUS, &[0; 7]).is_err());
        // A message length past the payload.
        assert!(ReplyChunk::parse(REPLY_TYPE_ERROR, &[0, 0, 0, 5, 0, 9, b'x']).is_err());
        let mut e = vec![0, 0, 0, 5, 0, 1, b'x'];
        assert!(ReplyChunk::parse(REPLY_TYPE_ERROR_OFFSET, &e).is_err());
        e.extend_from_slice(&7u64.to_be_bytes());
        assert_eq!(
            ReplyChunk::parse(REPLY_TYPE_ERROR_OFFSET, &e).unwrap(),
            ReplyChunk::Error {
                error: 5,
                message: b"x",
                offset: Some(7)
            }
        );
        assert_eq!(
            ReplyChunk::parse(1 << 15 | 9, &[]).unwrap(),
            ReplyChunk::Unknown(1 << 15 | 9)
        );
        assert!(ReplyChunk::is_error(1 << 15 | 9) && !ReplyChunk::is_error(REPLY_TYPE_NONE));
    }

    fn arb_style() -> impl Strategy<Value = ReplyStyle> {
        prop_oneof![
            Just(ReplyStyle::Simple),
            Just(ReplyStyle::Structured),
            Just(ReplyStyle::Extended)
        ]
    }

    proptest! {
        #[test]
        fn error_reply_parses(style in arb_style(), cookie: u64, offset: u64, err in 1u32..200, msg in ".{0,100}") {
            let bytes = error_reply(style, cookie, offset, err, &msg);
            let (h, n) = ReplyHeader::parse(&bytes).unwrap();
            match h {
                ReplyHeader::Simple { error, cookie: c } => {
                    prop_assert_eq!(style, ReplyStyle::Simple);
                    prop_assert_eq!(error, err);
                    prop_assert_eq!(c, cookie);
                }
                ReplyHeader::Chunk { flags, kind, cookie: c, length, .. } => {
                    prop_assert_eq!(flags, REPLY_FLAG_DONE);
                    prop_assert_eq!(kind, REPLY_TYPE_ERROR);
                    prop_assert_eq!(c, cookie);
                    prop_assert_eq!(length as usize, bytes.len() - n);
                    prop_assert_eq!(be32(&bytes, n), err);
                    let mlen = be16(&bytes, n + 4) as usize;
                    prop_assert_eq!(&bytes[n + 6..], &msg.as_bytes()[..mlen]);
                }
            }
        }

        #[test]
        fn block_status_lengths(style in prop_oneof![Just(ReplyStyle::Structured), Just(ReplyStyle::Extended)],
                                ext in proptest::collection::vec((1u64..1<<31, 0u32..4), 1..20)) {
            let bytes = block_status_chunk(style, 7, 0, 1, &ext, true);
            let (h, n) = ReplyHeader::parse(&bytes).unwrap();
            let ReplyHeader::Chunk { length, kind, .. } = h else { panic!("not a chunk") };
            prop_assert_eq!(length as usize, bytes.len() - n);
            let per = if style == ReplyStyle::Extended { 16 } else { 8 };
            let prefix = if style == ReplyStyle::Extended { 8 } else { 4 };
            prop_assert_eq!(length as usize, prefix + per * ext.len());
            prop_assert_eq!(kind == REPLY_TYPE_BLOCK_STATUS_EXT, style == ReplyStyle::Extended);
        }
    }

    #[test]
    fn read_header_len_matches() {
        for style in [
            ReplyStyle::Simple,
            ReplyStyle::Structured,
            ReplyStyle::Extended,
        ] {
            assert_eq!(
                read_data_header(style, 1, 2, 3, true).len(),
                read_data_header_len(style)
            );
        }
    }
}
