//! Parser for the xz container's stream footers and indexes.
//!
//! An xz file is one or more streams, each optionally followed by stream
//! padding (zero bytes, a multiple of four).  Every stream ends with an
//! index listing its blocks' unpadded and uncompressed sizes, and a
//! fixed-size footer giving the index size.  So the whole file can be
//! mapped by reading backwards from the end, touching only footers,
//! indexes and stream headers: no block data.
//!
//! The parser is pure: it sees the file only through a `read(offset, buf)`
//! callback, and [`XzIndex::parse`] runs it over a byte slice, which is what
//! the fuzz target feeds it.  Everything read is validated, sizes use
//! checked arithmetic, and memory grows only with records actually read.

use std::io;

use crate::{Error, Result};

/// First six bytes of every xz stream.
pub const HEADER_MAGIC: [u8; 6] = [0xFD, b'7', b'z', b'X', b'Z', 0x00];
const FOOTER_MAGIC: [u8; 2] = [b'Y', b'Z'];
const HEADER_SIZE: u64 = 12;
const FOOTER_SIZE: u64 = 12;
/// Largest value a variable-length integer may hold (2^63 - 1).
const VLI_MAX: u64 = u64::MAX / 2;
/// Smallest index: indicator, zero record count, two padding bytes, CRC32.
const INDEX_MIN: u64 = 8;
/// The largest unpadded size liblzma accepts (so that, padded, it is still
/// a valid VLI).
const UNPADDED_MAX: u64 = VLI_MAX & !3;
const UNPADDED_MIN: u64 = 5;

/// Integrity check type of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XzCheck {
    None,
    Crc32,
    Crc64,
    Sha256,
    /// A check ID the format reserves but liblzma does not implement.
    Reserved(u8),
}

impl XzCheck {
    fn from_id(id: u8) -> XzCheck {
        match id {
            0 => XzCheck::None,
            1 => XzCheck::Crc32,
            4 => XzCheck::Crc64,
            10 => XzCheck::Sha256,
            n => XzCheck::Reserved(n),
        }
    }

    /// The check's ID as stored in the stream flags.
    pub fn id(self) -> u8 {
        match self {
            XzCheck::None => 0,
            XzCheck::Crc32 => 1,
            XzCheck::Crc64 => 4,
            XzCheck::Sha256 => 10,
            XzCheck::Reserved(n) => n,
        }
    }

    /// Size of the check field after each block (fixed by the ID, even for
    /// reserved IDs).
    pub fn size(self) -> u64 {
        match self.id() {
            0 => 0,
            1..=3 => 4,
            4..=6 => 8,
            7..=9 => 16,
            10..=12 => 32,
            _ => 64,
        }
    }
}

/// One stream of an xz file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XzStream {
    /// Compressed offset of the stream header.
    pub offset: u64,
    /// Compressed size from header to end of footer (padding excluded).
    pub size: u64,
    /// Zero bytes of stream padding following the stream.
    pub padding: u64,
    pub check: XzCheck,
    /// Decompressed offset of the stream's first byte.
    pub uncompressed_offset: u64,
    /// Index of the stream's first block in [`XzIndex::blocks`].
    pub first_block: usize,
    pub block_count: usize,
}

/// One block: the unit of random access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XzBlock {
    /// Compressed offset of the block header.
    pub compressed_offset: u64,
    /// Header + compressed data + check, without block padding.
    pub unpadded_size: u64,
    pub uncompressed_offset: u64,
    pub uncompressed_size: u64,
    pub check: XzCheck,
    /// Index of the stream holding the block.
    pub stream: usize,
}

impl XzBlock {
    /// Bytes the block occupies in the file, block padding included.
    pub fn total_size(&self) -> u64 {
        // Cannot overflow: unpadded sizes are bounded by UNPADDED_MAX.
        (self.unpadded_size + 3) & !3
    }
}

/// The map of an xz file: all streams and blocks, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XzIndex {
    pub streams: Vec<XzStream>,
    pub blocks: Vec<XzBlock>,
    pub uncompressed_size: u64,
    pub file_size: u64,
}

impl XzIndex {
    /// Parse a whole xz file held in memory.
    pub fn parse(file: &[u8]) -> Result<XzIndex> {
        Self::parse_with("<buffer>", file.len() as u64, &mut |off, buf| {
            let start = usize::try_from(off).map_err(|_| io::ErrorKind::UnexpectedEof)?;
            let src = start
                .checked_add(buf.len())
                .and_then(|end| file.get(start..end))
                .ok_or(io::ErrorKind::UnexpectedEof)?;
            buf.copy_from_slice(src);
            Ok(())
        })
    }

    /// Parse a file of `file_size` bytes seen through `read`, which must
    /// fill the whole buffer from the offset.  Only footers, indexes and
    /// stream headers are read.
    pub fn parse_with(
        name: &str,
        file_size: u64,
        read: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
    ) -> Result<XzIndex> {
        let mut p = Parser { name, read };
        p.parse(file_size)
    }

    /// Number of blocks.
    pub fn block_count(&self) -> usize {
        self.blocks.len()
    }

    /// Decompressed offsets where blocks start (the random-access points).
    pub fn block_boundaries(&self) -> impl Iterator<Item = u64> + '_ {
        self.blocks.iter().map(|b| b.uncompressed_offset)
    }

    /// Largest decompressed block size (0 for an empty file).
    pub fn max_block_size(&self) -> u64 {
        self.blocks
            .iter()
            .map(|b| b.uncompressed_size)
            .max()
            .unwrap_or(0)
    }
}

struct Parser<'a> {
    name: &'a str,
    read: &'a mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
}

/// One stream as found walking backwards, before offsets are assigned.
struct RawStream {
    offset: u64,
    size: u64,
    padding: u64,
    check: XzCheck,
    /// (unpadded, uncompressed) per block.
    records: Vec<(u64, u64)>,
}

impl Parser<'_> {
    fn corrupt(&self, offset: u64, reason: impl Into<String>) -> Error {
        Error::corrupt(self.name, "xz", offset, reason)
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        (self.read)(offset, buf).map_err(Error::io(self.name, offset))
    }

    fn parse(&mut self, file_size: u64) -> Result<XzIndex> {
        if file_size % 4 != 0 {
            return Err(self.corrupt(
                file_size,
                "file size is not a multiple of four (truncated or trailing garbage)",
            ));
        }
        let mut raw = Vec::new();
        let mut pos = file_size;
        loop {
            let padding = self.skip_padding(pos)?;
            pos -= padding;
            if pos == 0 {
                return Err(self.corrupt(0, "no xz stream before the stream padding"));
            }
            let s = self.parse_stream(pos, padding)?;
            pos = s.offset;
            raw.push(s);
            if pos == 0 {
                break;
            }
        }
        raw.reverse();

        let mut streams = Vec::with_capacity(raw.len());
        let mut blocks = Vec::new();
        let mut uoff: u64 = 0;
        for (si, s) in raw.into_iter().enumerate() {
            let first_block = blocks.len();
            let suoff = uoff;
            let mut coff = s.offset + HEADER_SIZE;
            for (unpadded, usize) in &s.records {
                blocks.push(XzBlock {
                    compressed_offset: coff,
                    unpadded_size: *unpadded,
                    uncompressed_offset: uoff,
                    uncompressed_size: *usize,
                    check: s.check,
                    stream: si,
                });
                coff += (unpadded + 3) & !3;
                uoff = uoff
                    .checked_add(*usize)
                    .filter(|&u| u <= VLI_MAX)
                    .ok_or_else(|| self.corrupt(s.offset, "total uncompressed size overflows"))?;
            }
            streams.push(XzStream {
                offset: s.offset,
                size: s.size,
                padding: s.padding,
                check: s.check,
                uncompressed_offset: suoff,
                first_block,
                block_count: s.records.len(),
            });
        }
        Ok(XzIndex {
            streams,
            blocks,
            uncompressed_size: uoff,
            file_size,
        })
    }

    /// Count the zero bytes (in groups of four) just before `end`.
    fn skip_padding(&mut self, end: u64) -> Result<u64> {
        let mut pos = end;
        let mut buf = vec![0u8; 64 << 10];
        while pos > 0 {
            let n = pos.min(buf.len() as u64);
            let piece = &mut buf[..n as usize];
            self.read(pos - n, piece)?;
            // `end` and `pos` are multiples of four, and so is `n`
            // unless it is all of a (multiple of four) prefix.
            let zeros = piece
                .rchunks_exact(4)
                .take_while(|c| c.iter().all(|&b| b == 0))
                .count() as u64
                * 4;
            pos -= zeros;
            if zeros < n {
                break;
            }
        }
        Ok(end - pos)
    }

    fn stream_flags(&self, flags: [u8; 2], offset: u64) -> Result<XzCheck> {
        if flags[0] != 0 || flags[1] & 0xF0 != 0 {
            return Err(self.corrupt(offset, "unsupported or invalid stream flags"));
        }
        Ok(XzCheck::from_id(flags[1]))
    }

    /// Parse the stream whose footer ends at `end`.
    fn parse_stream(&mut self, end: u64, padding: u64) -> Result<RawStream> {
        if end < HEADER_SIZE + INDEX_MIN + FOOTER_SIZE {
            return Err(self.corrupt(0, "file too small for an xz stream"));
        }
        let foff = end - FOOTER_SIZE;
        let mut footer = [0u8; FOOTER_SIZE as usize];
        self.read(foff, &mut footer)?;
        if footer[10..12] != FOOTER_MAGIC {
            return Err(self.corrupt(foff, "stream footer magic not found"));
        }
        let stored_crc = u32::from_le_bytes([footer[0], footer[1], footer[2], footer[3]]);
        if crc32fast::hash(&footer[4..10]) != stored_crc {
            return Err(self.corrupt(foff, "stream footer CRC32 mismatch"));
        }
        let check = self.stream_flags([footer[8], footer[9]], foff)?;
        let backward = (u64::from(u32::from_le_bytes([
            footer[4], footer[5], footer[6], footer[7],
        ])) + 1)
            * 4;
        if backward > foff - HEADER_SIZE {
            return Err(self.corrupt(
                foff,
                format!("index size {backward} is larger than the data before the footer"),
            ));
        }
        let index_start = foff - backward;
        let (records, blocks_size) = self.parse_index(index_start, foff, check)?;
        let offset = index_start
            .checked_sub(blocks_size)
            .and_then(|o| o.checked_sub(HEADER_SIZE))
            .ok_or_else(|| {
                self.corrupt(
                    index_start,
                    format!("index lists {blocks_size} bytes of blocks, more than the file holds"),
                )
            })?;
        let mut header = [0u8; HEADER_SIZE as usize];
        self.read(offset, &mut header)?;
        if header[..6] != HEADER_MAGIC {
            return Err(self.corrupt(
                offset,
                "stream header magic not found where the index says the stream starts",
            ));
        }
        let stored_crc = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
        if crc32fast::hash(&header[6..8]) != stored_crc {
            return Err(self.corrupt(offset, "stream header CRC32 mismatch"));
        }
        if header[6..8] != footer[8..10] {
            return Err(self.corrupt(offset, "stream header and footer flags differ"));
        }
        Ok(RawStream {
            offset,
            size: end - offset,
            padding,
            check,
            records,
        })
    }

    /// Parse the index in `[start, end)`; returns the records and the total
    /// (padded) size of the blocks they describe.
    fn parse_index(
        &mut self,
        start: u64,
        end: u64,
        check: XzCheck,
    ) -> Result<(Vec<(u64, u64)>, u64)> {
        let mut cur = IndexCursor::new(start, end);
        if cur.byte(self)? != 0 {
            return Err(self.corrupt(start, "index indicator byte is not zero"));
        }
        let count = cur.vli(self)?;
        // Each record takes at least two bytes, and indicator + count +
        // CRC32 at least six: this caps the records a hostile count can
        // make us expect (we also only ever push records actually read).
        let room = (end - start).saturating_sub(6) / 2;
        if count > room {
            return Err(self.corrupt(
                start,
                format!("index claims {count} records but has room for at most {room}"),
            ));
        }
        let mut records = Vec::with_capacity(count.min(1 << 16) as usize);
        let mut blocks_size: u64 = 0;
        let mut usum: u64 = 0;
        for _ in 0..count {
            let rec_off = cur.pos();
            let unpadded = cur.vli(self)?;
            let usize = cur.vli(self)?;
            if !(UNPADDED_MIN..=UNPADDED_MAX).contains(&unpadded) || unpadded <= check.size() {
                return Err(self.corrupt(rec_off, format!("invalid unpadded size {unpadded}")));
            }
            blocks_size = blocks_size
                .checked_add((unpadded + 3) & !3)
                .filter(|&s| s <= VLI_MAX)
                .ok_or_else(|| self.corrupt(rec_off, "total block size overflows"))?;
            usum = usum
                .checked_add(usize)
                .filter(|&s| s <= VLI_MAX)
                .ok_or_else(|| self.corrupt(rec_off, "total uncompressed size overflows"))?;
            records.push((unpadded, usize));
        }
        while (cur.pos() - start) % 4 != 0 {
            let off = cur.pos();
            if cur.byte(self)? != 0 {
                return Err(self.corrupt(off, "index padding is not zero"));
            }
        }
        let computed = cur.crc.clone().finalize();
        let crc_off = cur.pos();
        let mut stored = [0u8; 4];
        for b in &mut stored {
            *b = cur.byte(self)?;
        }
        if cur.pos() != end {
            return Err(self.corrupt(
                crc_off,
                "index size in the stream footer does not match the index",
            ));
        }
        if u32::from_le_bytes(stored) != computed {
            return Err(self.corrupt(crc_off, "index CRC32 mismatch"));
        }
        Ok((records, blocks_size))
    }
}

/// Buffered forward reader over the index that keeps a running CRC32 of
/// the bytes handed out (the CRC covers everything before the CRC field,
/// which is read with the same cursor after `crc` is snapshotted).
struct IndexCursor {
    next: u64,
    end: u64,
    buf: Vec<u8>,
    at: usize,
    crc: crc32fast::Hasher,
}

impl IndexCursor {
    fn new(start: u64, end: u64) -> Self {
        IndexCursor {
            next: start,
            end,
            buf: Vec::new(),
            at: 0,
            crc: crc32fast::Hasher::new(),
        }
    }

    fn pos(&self) -> u64 {
        self.next - (self.buf.len() - self.at) as u64
    }

    fn byte(&mut self, p: &mut Parser<'_>) -> Result<u8> {
        if self.at == self.buf.len() {
            if self.next >= self.end {
                return Err(p.corrupt(self.end, "index ends in the middle of a field"));
            }
            let n = (self.end - self.next).min(64 << 10) as usize;
            self.buf.resize(n, 0);
            p.read(self.next, &mut self.buf)?;
            self.next += n as u64;
            self.at = 0;
        }
        let b = self.buf[self.at];
        self.at += 1;
        self.crc.update(&[b]);
        Ok(b)
    }

    /// A variable-length integer: 7 bits per byte, low bits first, at most
    /// nine bytes, and no redundant trailing zero byte.
    fn vli(&mut self, p: &mut Parser<'_>) -> Result<u64> {
        let start = self.pos();
        let mut v: u64 = 0;
        for i in 0..9 {
            let b = self.byte(p)?;
            v |= u64::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                if i > 0 && b == 0 {
                    return Err(p.corrupt(start, "non-minimal variable-length integer"));
                }
                return Ok(v);
            }
        }
        Err(p.corrupt(start, "variable-length integer longer than nine bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_garbage_without_panicking() {
        for data in [
            &b""[..],
            &b"abc"[..],
            &[0u8; 64][..],
            &[0xFFu8; 64][..],
            &b"\xFD7zXZ\x00\x00\x00\x00\x00\x00\x00YZ"[..],
        ] {
            assert!(XzIndex::parse(data).is_err());
        }
    }

    #[test]
    fn vli_limits() {
        // Index records with a ten-byte VLI must be refused.
        let mut idx = vec![0u8, 1];
        idx.extend_from_slice(&[0x80; 9]);
        idx.push(0);
        let mut p_read = |off: u64, buf: &mut [u8]| -> io::Result<()> {
            buf.copy_from_slice(&idx[off as usize..off as usize + buf.len()]);
            Ok(())
        };
        let mut p = Parser {
            name: "t",
            read: &mut p_read,
        };
        let mut cur = IndexCursor::new(2, 12);
        assert!(cur.vli(&mut p).is_err());
    }
}
