//! Parser for the zstd *seekable format* seek table, and a pure parser for
//! zstd frame headers.
//!
//! A seekable zstd file is ordinary zstd frames followed by one skippable
//! frame (magic `0x184D2A5E`) whose payload lists every frame's compressed
//! and decompressed size, and ends with a 9-byte footer: number of frames
//! (u32 LE), a descriptor byte (bit 7: entries carry a checksum; bits 2-6
//! reserved, zero) and the magic `0x8F92EAB1`.  Since the footer is at the
//! very end, the table is found by reading the last 9 bytes.
//!
//! Both parsers take bytes and return values or `Error::Corrupt`: no I/O,
//! no panics, allocations bounded by the input length.  The fuzz targets
//! call them directly.

use crate::{Error, Result};

/// Magic of the skippable frame holding the seek table.
pub const SEEK_TABLE_FRAME_MAGIC: u32 = 0x184D_2A5E;
/// Magic at the very end of a seekable file.
pub const SEEKABLE_MAGIC: u32 = 0x8F92_EAB1;
/// Magic of a zstd frame.
pub const FRAME_MAGIC: u32 = 0xFD2F_B528;
/// Skippable frames use magics `0x184D2A50..=0x184D2A5F`.
pub const SKIPPABLE_MASK: u32 = 0xFFFF_FFF0;
pub const SKIPPABLE_BASE: u32 = 0x184D_2A50;
/// Size of the seek table footer.
pub const FOOTER_SIZE: u64 = 9;
/// Most decompressed bytes per compressed byte any zstd frame can give.
const MAX_RATIO: u64 = 32 << 10;
/// Skippable frame header: magic + payload size.
const SKIPPABLE_HEADER: u64 = 8;

/// One frame listed in a seek table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeekEntry {
    pub compressed_offset: u64,
    pub compressed_size: u64,
    pub decompressed_offset: u64,
    pub decompressed_size: u64,
    /// Low 32 bits of the XXH64 of the frame's decompressed data, if stored.
    pub checksum: Option<u32>,
}

/// A parsed seek table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeekTable {
    pub frames: Vec<SeekEntry>,
    /// Bytes of the whole skippable frame holding the table (header
    /// included); it sits at the end of the file.
    pub table_size: u64,
    pub decompressed_size: u64,
}

fn corrupt(offset: u64, reason: impl Into<String>) -> Error {
    Error::corrupt("<buffer>", "zstd", offset, reason)
}

fn le32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

impl SeekTable {
    /// From the last 9 bytes of a file, the size of the seek table frame;
    /// `None` when the file does not end with the seekable magic.
    pub fn table_size_from_footer(footer: &[u8]) -> Option<Result<u64>> {
        if footer.len() < FOOTER_SIZE as usize {
            return None;
        }
        let f = &footer[footer.len() - FOOTER_SIZE as usize..];
        if le32(&f[5..9]) != SEEKABLE_MAGIC {
            return None;
        }
        let n = u64::from(le32(&f[0..4]));
        let descriptor = f[4];
        if descriptor & 0x7C != 0 {
            return Some(Err(corrupt(
                0,
                "seek table descriptor has reserved bits set",
            )));
        }
        let entry = if descriptor & 0x80 != 0 { 12 } else { 8 };
        Some(Ok(SKIPPABLE_HEADER + n * entry + FOOTER_SIZE))
    }

    /// Parse the seek table of a file of `file_size` bytes; `tail` is the
    /// last `table_size_from_footer()` bytes of that file.  Offsets in
    /// errors are file offsets.
    pub fn parse(tail: &[u8], file_size: u64) -> Result<SeekTable> {
        let tlen = tail.len() as u64;
        let base = file_size
            .checked_sub(tlen)
            .ok_or_else(|| corrupt(0, "seek table larger than the file"))?;
        let expect = match Self::table_size_from_footer(tail) {
            Some(r) => r?,
            None => {
                return Err(corrupt(
                    file_size.saturating_sub(4),
                    "seekable magic not found",
                ))
            }
        };
        if expect != tlen {
            return Err(corrupt(
                base,
                format!("seek table should be {expect} bytes, have {tlen}"),
            ));
        }
        if le32(&tail[0..4]) != SEEK_TABLE_FRAME_MAGIC {
            return Err(corrupt(base, "seek table skippable frame magic not found"));
        }
        if u64::from(le32(&tail[4..8])) != tlen - SKIPPABLE_HEADER {
            return Err(corrupt(
                base + 4,
                "seek table frame size does not match the number of frames",
            ));
        }
        let f = &tail[tail.len() - FOOTER_SIZE as usize..];
        let checksums = f[4] & 0x80 != 0;
        let entry = if checksums { 12 } else { 8 };
        let body = &tail[SKIPPABLE_HEADER as usize..tail.len() - FOOTER_SIZE as usize];
        let mut frames = Vec::with_capacity(body.len() / entry);
        let mut coff: u64 = 0;
        let mut doff: u64 = 0;
        for (i, e) in body.chunks_exact(entry).enumerate() {
            let csize = u64::from(le32(&e[0..4]));
            let dsize = u64::from(le32(&e[4..8]));
            let at = base + SKIPPABLE_HEADER + (i * entry) as u64;
            if csize == 0 {
                return Err(corrupt(at, format!("frame {i} has compressed size 0")));
            }
            // The densest zstd encoding is an RLE block: 4 bytes for 128
            // KiB.  A larger claim is a lie that would become the size.
            if dsize > csize * MAX_RATIO {
                return Err(corrupt(
                    at,
                    format!("frame {i} claims {dsize} bytes from {csize} compressed"),
                ));
            }
            frames.push(SeekEntry {
                compressed_offset: coff,
                compressed_size: csize,
                decompressed_offset: doff,
                decompressed_size: dsize,
                checksum: checksums.then(|| le32(&e[8..12])),
            });
            // Sums of u32s over at most 2^32 entries cannot overflow u64.
            coff += csize;
            doff += dsize;
        }
        if coff != base {
            return Err(corrupt(
                base,
                format!("seek table frames add up to {coff} bytes but {base} precede the table"),
            ));
        }
        Ok(SeekTable {
            frames,
            table_size: tlen,
            decompressed_size: doff,
        })
    }

    /// Parse the seek table at the end of a whole file held in memory.
    pub fn parse_file(file: &[u8]) -> Result<SeekTable> {
        let size = match Self::table_size_from_footer(file) {
            Some(r) => r?,
            None => return Err(corrupt(file.len() as u64, "seekable magic not found")),
        };
        let start = (file.len() as u64)
            .checked_sub(size)
            .ok_or_else(|| corrupt(0, "seek table larger than the file"))?;
        Self::parse(&file[start as usize..], file.len() as u64)
    }
}

/// What a zstd frame header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Bytes of magic + header; the first block header follows.
    pub header_size: usize,
    pub content_size: Option<u64>,
    pub has_checksum: bool,
    pub dictionary_id: u32,
}

/// Longest frame header: magic 4 + descriptor 1 + window 1 + dict id 4 +
/// content size 8.
pub const MAX_FRAME_HEADER: usize = 18;

/// Parse a frame header from the bytes at its start (at least
/// `MAX_FRAME_HEADER` bytes, or all that remain of the file).
pub fn parse_frame_header(b: &[u8], offset: u64) -> Result<FrameHeader> {
    if b.len() < 5 || le32(b) != FRAME_MAGIC {
        return Err(corrupt(offset, "zstd frame magic not found"));
    }
    let d = b[4];
    let fcs_flag = d >> 6;
    let single_segment = d & 0x20 != 0;
    if d & 0x08 != 0 {
        return Err(corrupt(offset + 4, "frame header reserved bit set"));
    }
    let has_checksum = d & 0x04 != 0;
    let did_len = [0usize, 1, 2, 4][(d & 3) as usize];
    let fcs_len = match fcs_flag {
        0 if single_segment => 1,
        0 => 0,
        1 => 2,
        2 => 4,
        _ => 8,
    };
    let mut at = 5 + usize::from(!single_segment);
    let need = at + did_len + fcs_len;
    if b.len() < need {
        return Err(corrupt(offset, "truncated zstd frame header"));
    }
    let mut did = [0u8; 4];
    did[..did_len].copy_from_slice(&b[at..at + did_len]);
    at += did_len;
    let mut fcs = [0u8; 8];
    fcs[..fcs_len].copy_from_slice(&b[at..at + fcs_len]);
    let mut content_size = (fcs_len > 0).then(|| u64::from_le_bytes(fcs));
    if fcs_len == 2 {
        content_size = content_size.map(|c| c + 256);
    }
    Ok(FrameHeader {
        header_size: need,
        content_size,
        has_checksum,
        dictionary_id: u32::from_le_bytes(did),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_refused() {
        for data in [&b""[..], &[0u8; 9][..], &[0xFFu8; 40][..]] {
            assert!(SeekTable::parse_file(data).is_err());
            assert!(parse_frame_header(data, 0).is_err());
        }
        // A footer claiming 2^32-1 frames in a tiny file.
        let mut f = vec![0u8; 20];
        f.extend_from_slice(&u32::MAX.to_le_bytes());
        f.push(0x80);
        f.extend_from_slice(&SEEKABLE_MAGIC.to_le_bytes());
        assert!(matches!(
            SeekTable::parse_file(&f),
            Err(Error::Corrupt { .. })
        ));
    }
}
