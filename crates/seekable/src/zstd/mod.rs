//! zstd: random access by frame, through the seekable format's seek table
//! or a walk over the frame headers.

mod reader;
pub mod seek_table;
mod xxh64;

pub use reader::{ZstdFrame, ZstdLayout, ZstdReader};
pub use seek_table::{SeekEntry, SeekTable};

use ::zstd::zstd_safe::CParameter;
use seek_table::{SEEKABLE_MAGIC, SEEK_TABLE_FRAME_MAGIC};

/// Compress `input` in the zstd seekable format: independent frames of
/// `frame_size` decompressed bytes (each with a content checksum), followed
/// by the seek table (with per-frame XXH64 checksums).  Any zstd decoder reads the result as ordinary zstd.
pub fn seekable_compress(input: &[u8], frame_size: usize, level: i32) -> std::io::Result<Vec<u8>> {
    // Seek table entries are u32, so frames must stay below 4 GiB.
    let frame_size = frame_size.clamp(1, 1 << 30);
    let mut c = ::zstd::bulk::Compressor::new(level)?;
    c.set_parameter(CParameter::ChecksumFlag(true))?;
    let mut out = Vec::new();
    let mut entries = Vec::new();
    for chunk in input.chunks(frame_size) {
        let frame = c.compress(chunk)?;
        entries.push((
            frame.len() as u32,
            chunk.len() as u32,
            xxh64::xxh64(chunk) as u32,
        ));
        out.extend_from_slice(&frame);
    }
    out.extend_from_slice(&SEEK_TABLE_FRAME_MAGIC.to_le_bytes());
    out.extend_from_slice(&((entries.len() * 12 + 9) as u32).to_le_bytes());
    for (c, d, x) in &entries {
        out.extend_from_slice(&c.to_le_bytes());
        out.extend_from_slice(&d.to_le_bytes());
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    // Descriptor: bit 7 says the entries carry checksums.
    out.push(0x80);
    out.extend_from_slice(&SEEKABLE_MAGIC.to_le_bytes());
    Ok(out)
}
