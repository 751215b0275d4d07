//! Gzip member header parsing (RFC 1952) and buffered positional input.

use super::{Fail, Shared};
use crate::Source;

/// Refuse headers larger than this (FEXTRA is at most 64 KiB, but FNAME and
/// FCOMMENT are unbounded NUL-terminated strings; a hostile file must not
/// make us buffer gigabytes looking for the NUL).
pub const MAX_HEADER: usize = 1 << 20;

const FTEXT_MASK_RESERVED: u8 = 0xe0;
const FHCRC: u8 = 0x02;
const FEXTRA: u8 = 0x04;
const FNAME: u8 = 0x08;
const FCOMMENT: u8 = 0x10;

/// What we keep from a member header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Bytes in the header (the deflate data starts this far in).
    pub len: usize,
    /// BGZF `BC` subfield: total member size minus one.
    pub bgzf_bsize: Option<u16>,
}

/// Why a header could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// More bytes are needed (the slice ended inside the header).
    Short,
    /// Not a valid header; the `usize` is the offset within the slice.
    Bad(usize, String),
}

/// True if `b` starts with the gzip magic.
pub fn is_gzip_magic(b: &[u8]) -> bool {
    b.len() >= 2 && b[0] == 0x1f && b[1] == 0x8b
}

/// Parse one member header at the start of `b`.
pub fn parse_header(b: &[u8]) -> Result<Header, HeaderError> {
    let need = |n: usize| {
        if b.len() < n {
            Err(HeaderError::Short)
        } else {
            Ok(())
        }
    };
    // Check the fixed fields as far as they are present, so that damage is
    // reported as such even in a short tail.
    if b.first().is_some_and(|&c| c != 0x1f) || b.get(1).is_some_and(|&c| c != 0x8b) {
        return Err(HeaderError::Bad(0, "not a gzip member (bad magic)".into()));
    }
    if let Some(&cm) = b.get(2).filter(|&&cm| cm != 8) {
        return Err(HeaderError::Bad(
            2,
            format!("unknown compression method {cm}"),
        ));
    }
    if let Some(&flags) = b.get(3).filter(|&&f| f & FTEXT_MASK_RESERVED != 0) {
        return Err(HeaderError::Bad(
            3,
            format!("reserved header flags set ({flags:#x})"),
        ));
    }
    need(10)?;
    let flags = b[3];
    let mut pos = 10;
    let mut bgzf_bsize = None;
    if flags & FEXTRA != 0 {
        need(pos + 2)?;
        let xlen = u16::from_le_bytes([b[pos], b[pos + 1]]) as usize;
        pos += 2;
        need(pos + xlen)?;
        bgzf_bsize = find_bc(&b[pos..pos + xlen]);
        pos += xlen;
    }
    for flag in [FNAME, FCOMMENT] {
        if flags & flag != 0 {
            match b[pos.min(b.len())..].iter().position(|&c| c == 0) {
                Some(n) => pos += n + 1,
                None if b.len() >= MAX_HEADER => {
                    return Err(HeaderError::Bad(
                        pos,
                        "file name or comment too long".into(),
                    ))
                }
                None => return Err(HeaderError::Short),
            }
        }
    }
    if flags & FHCRC != 0 {
        need(pos + 2)?;
        let want = u16::from_le_bytes([b[pos], b[pos + 1]]);
        let got = (crc32fast::hash(&b[..pos]) & 0xffff) as u16;
        if want != got {
            return Err(HeaderError::Bad(pos, "header CRC mismatch".into()));
        }
        pos += 2;
    }
    if pos > MAX_HEADER {
        return Err(HeaderError::Bad(0, "header too long".into()));
    }
    Ok(Header {
        len: pos,
        bgzf_bsize,
    })
}

/// Find the BGZF `BC` subfield (SLEN 2) in FEXTRA data.
fn find_bc(mut extra: &[u8]) -> Option<u16> {
    while extra.len() >= 4 {
        let (si1, si2) = (extra[0], extra[1]);
        let slen = u16::from_le_bytes([extra[2], extra[3]]) as usize;
        let body = extra.get(4..4 + slen)?;
        if si1 == b'B' && si2 == b'C' && slen == 2 {
            return Some(u16::from_le_bytes([body[0], body[1]]));
        }
        extra = &extra[4 + slen..];
    }
    None
}

/// Sequential reading over a positional [`Source`] with a refillable buffer.
pub struct Input<'a> {
    src: &'a dyn Source,
    size: u64,
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    start: u64,
    /// Consumed bytes of `buf`.
    pos: usize,
    chunk: usize,
}

impl<'a> Input<'a> {
    pub fn new(src: &'a dyn Source, size: u64, offset: u64, chunk: usize) -> Self {
        Input {
            src,
            size,
            buf: Vec::new(),
            start: offset,
            pos: 0,
            chunk,
        }
    }

    /// File offset of the next unconsumed byte.
    pub fn offset(&self) -> u64 {
        self.start + self.pos as u64
    }

    /// Unconsumed buffered bytes, reading more if none are buffered.
    /// Empty only at end of file.
    pub fn available(&mut self) -> std::io::Result<&[u8]> {
        if self.pos >= self.buf.len() {
            self.fill(1)?;
        }
        Ok(&self.buf[self.pos..])
    }

    /// Make at least `n` bytes available; `Ok(false)` if the file ends first
    /// (then everything up to the end is buffered).
    pub fn ensure(&mut self, n: usize) -> std::io::Result<bool> {
        if self.buf.len() - self.pos >= n {
            return Ok(true);
        }
        self.fill(n)
    }

    /// Buffered unconsumed bytes without reading.
    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    pub fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.buf.len());
    }

    /// Continue from `offset`, keeping what is buffered when it is there.
    pub fn seek(&mut self, offset: u64) {
        match offset.checked_sub(self.start) {
            Some(rel) if rel <= self.buf.len() as u64 => self.pos = rel as usize,
            _ => {
                self.buf.clear();
                self.start = offset;
                self.pos = 0;
            }
        }
    }

    fn fill(&mut self, n: usize) -> std::io::Result<bool> {
        // Drop consumed bytes, then read at least `chunk` more (or `n`).
        self.buf.drain(..self.pos);
        self.start += self.pos as u64;
        self.pos = 0;
        let have = self.buf.len();
        let end = self.start + have as u64;
        let want = n.saturating_sub(have).max(self.chunk) as u64;
        let get = want.min(self.size.saturating_sub(end)) as usize;
        if get > 0 {
            self.buf.resize(have + get, 0);
            self.src.read_exact_at(&mut self.buf[have..], end)?;
        }
        Ok(self.buf.len() >= n)
    }
}

/// Parse (and consume) the member header at the input position.
pub(super) fn read_header(sh: &Shared, input: &mut Input<'_>) -> Result<Header, Fail> {
    let off = input.offset();
    let mut want = 512;
    loop {
        let full = input.ensure(want).map_err(|e| sh.fail_io(off, e))?;
        match parse_header(input.buffered()) {
            Ok(h) => {
                input.consume(h.len);
                return Ok(h);
            }
            Err(HeaderError::Short) if full && want < MAX_HEADER => want *= 4,
            Err(HeaderError::Short) => {
                return Err(sh.fail_corrupt(off, "truncated gzip member header".into()))
            }
            Err(HeaderError::Bad(i, reason)) => return Err(sh.fail_corrupt(off + i as u64, reason)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_and_flags() {
        let mut h = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];
        assert_eq!(
            parse_header(&h),
            Ok(Header {
                len: 10,
                bgzf_bsize: None
            })
        );
        h[3] = FNAME | FCOMMENT | FEXTRA;
        h.extend_from_slice(&[6, 0, b'B', b'C', 2, 0, 0x34, 0x12]);
        assert_eq!(parse_header(&h), Err(HeaderError::Short));
        h.extend_from_slice(b"name\0comment\0");
        assert_eq!(
            parse_header(&h),
            Ok(Header {
                len: 31,
                bgzf_bsize: Some(0x1234)
            })
        );
        h[3] |= FHCRC;
        let crc = (crc32fast::hash(&h) & 0xffff) as u16;
        h.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(
            parse_header(&h),
            Ok(Header {
                len: 33,
                bgzf_bsize: Some(0x1234)
            })
        );
        let n = h.len();
        h[n - 1] ^= 1;
        assert!(matches!(parse_header(&h), Err(HeaderError::Bad(..))));
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(
            parse_header(b"hello world!"),
            Err(HeaderError::Bad(0, _))
        ));
        assert!(matches!(
            parse_header(&[0x1f, 0x8b, 7, 0, 0, 0, 0, 0, 0, 3]),
            Err(HeaderError::Bad(2, _))
        ));
        assert!(matches!(
            parse_header(&[0x1f, 0x8b, 8, 0x80, 0, 0, 0, 0, 0, 3]),
            Err(HeaderError::Bad(3, _))
        ));
    }
}
