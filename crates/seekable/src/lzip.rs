//! Random access to lzip files (`.lz`), one member at a time.
//!
//! An lzip file is a sequence of members, each a 6-byte header, an LZMA
//! stream and a 20-byte trailer recording the member's CRC32, its
//! decompressed size and its own total size.  Read from the end, the
//! trailers give every member's place and size without decoding anything:
//! that is the index.  `lzip` makes one member per file (decoded
//! progressively, as single-block xz); `plzip`, `lzip -b SIZE` and
//! `tarlz` make many, each decoded on its own.  Members are decoded by
//! liblzma's lzip decoder, which checks the trailer's CRC32 and sizes.

use std::collections::HashMap;
use std::sync::Arc;

use liblzma_sys as lz;

use crate::engine::{record, Codec, Engine, Segment};
use crate::lzma_unit::LzmaUnit;
use crate::progressive::StreamDecoder;
use crate::{Error, Options, Result, Source};

pub const MAGIC: [u8; 4] = *b"LZIP";
const HEADER: u64 = 6;
const TRAILER: u64 = 20;
/// lzip's own largest dictionary.
const MAX_DICT: u64 = 512 << 20;

const FORMAT: &str = "lzip";

/// One member: where it is and what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LzipMember {
    pub compressed_offset: u64,
    pub compressed_size: u64,
    pub uncompressed_offset: u64,
    pub uncompressed_size: u64,
}

/// The dictionary size coded in a header's sixth byte.
fn dict_size(b: u8) -> Option<u64> {
    let log = u32::from(b & 0x1f);
    if !(12..=29).contains(&log) {
        return None;
    }
    let base = 1u64 << log;
    Some(base - (base / 16) * u64::from(b >> 5))
}

/// Walk the trailers from the end of the file: every member, in order.
/// `read(offset, buf)` reads the file.
pub fn index(
    name: &str,
    file_size: u64,
    read: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
) -> Result<Vec<LzipMember>> {
    let corrupt = |offset: u64, reason: String| Error::corrupt(name, FORMAT, offset, reason);
    if file_size < HEADER + TRAILER {
        return Err(corrupt(0, "too short for an lzip member".into()));
    }
    let mut members = Vec::new();
    let mut end = file_size;
    while end > 0 {
        if end < HEADER + TRAILER {
            return Err(corrupt(
                0,
                format!("{end} bytes before a member are not a member"),
            ));
        }
        let mut t = [0u8; TRAILER as usize];
        read(end - TRAILER, &mut t).map_err(Error::io(name, end - TRAILER))?;
        let data_size = u64::from_le_bytes(t[4..12].try_into().expect("8 bytes"));
        let member_size = u64::from_le_bytes(t[12..20].try_into().expect("8 bytes"));
        if member_size < HEADER + TRAILER || member_size > end {
            let what = if end == file_size {
                "the file does not end with an lzip member trailer (trailing data, or a truncated file)"
            } else {
                "a member trailer records an impossible member size"
            };
            return Err(corrupt(end - TRAILER, what.into()));
        }
        let start = end - member_size;
        let mut h = [0u8; HEADER as usize];
        read(start, &mut h).map_err(Error::io(name, start))?;
        if h[..4] != MAGIC {
            return Err(corrupt(
                start,
                format!(
                    "no member header where the trailer at {} says a member starts",
                    end - TRAILER
                ),
            ));
        }
        if h[4] != 1 {
            return Err(Error::unsupported(
                name,
                FORMAT,
                format!("member at {start}: version {}", h[4]),
            ));
        }
        match dict_size(h[5]) {
            Some(d) if d <= MAX_DICT => {}
            _ => {
                return Err(corrupt(
                    start + 5,
                    format!("invalid dictionary size byte {:#04x}", h[5]),
                ))
            }
        }
        members.push(LzipMember {
            compressed_offset: start,
            compressed_size: member_size,
            uncompressed_offset: 0,
            uncompressed_size: data_size,
        });
        end = start;
    }
    members.reverse();
    let mut at = 0u64;
    for m in &mut members {
        m.uncompressed_offset = at;
        at = at
            .checked_add(m.uncompressed_size)
            .ok_or_else(|| corrupt(m.compressed_offset, "decompressed sizes overflow".into()))?;
    }
    Ok(members)
}

/// A random-access reader over an lzip file.
pub struct LzipReader {
    engine: Engine<LzipCodec>,
}

struct LzipCodec {
    source: Arc<dyn Source>,
    name: String,
    members: Vec<LzipMember>,
}

impl LzipReader {
    /// Index the file from its trailers and prepare to serve reads.
    pub fn open(source: Arc<dyn Source>, opts: &Options) -> Result<LzipReader> {
        let file_size = source.size().map_err(Error::io(&opts.name, 0))?;
        let src = source.clone();
        let members = index(&opts.name, file_size, &mut |off, buf| {
            src.read_exact_at(buf, off)
        })?;
        let segs = members
            .iter()
            .map(|m| Segment {
                uoffset: m.uncompressed_offset,
                usize: m.uncompressed_size,
                coffset: m.compressed_offset,
            })
            .collect();
        let codec = LzipCodec {
            source,
            name: opts.name.clone(),
            members,
        };
        let threshold = opts.default_progressive_threshold();
        let engine = Engine::new(codec, segs, opts, threshold, HashMap::new());
        tracing::debug!(
            "{}: lzip, {} members, {} bytes decompressed",
            opts.name,
            engine.codec().members.len(),
            engine.size()
        );
        Ok(LzipReader { engine })
    }

    /// The members, in file order.
    pub fn members(&self) -> &[LzipMember] {
        &self.engine.codec().members
    }
}

crate::engine::random_access_via_engine!(LzipReader);

impl Codec for LzipCodec {
    fn format(&self) -> &'static str {
        FORMAT
    }
    fn open_segment(&self, index: usize, _seg: &Segment) -> Result<Box<dyn StreamDecoder>> {
        let m = record(&self.members, index, &self.name, FORMAT, "member")?;
        Ok(Box::new(MemberStream::new(
            self.source.clone(),
            &self.name,
            index,
            m,
        )?))
    }
}

/// Streaming decoder of one member, reading its bytes on demand.
struct MemberStream {
    number: usize,
    member: LzipMember,
    unit: LzmaUnit,
}

impl MemberStream {
    fn new(source: Arc<dyn Source>, name: &str, number: usize, member: LzipMember) -> Result<Self> {
        // SAFETY: all-zero is LZMA_STREAM_INIT.
        let mut strm: lz::lzma_stream = unsafe { std::mem::zeroed() };
        // One member (no LZMA_CONCATENATED): the decoder stops at its
        // trailer, after checking the CRC32 and both sizes in it.  The
        // memory limit admits lzip's largest dictionary.
        // SAFETY: strm is freshly zeroed.
        let ret = unsafe { lz::lzma_lzip_decoder(&mut strm, MAX_DICT + (64 << 20), 0) };
        let start = member.compressed_offset;
        // Owned from here, so lzma_end runs on every path.
        let unit = LzmaUnit::new(
            source,
            name,
            FORMAT,
            format!("member {number}"),
            strm,
            start..start + member.compressed_size,
            // At the member's last byte, LZMA_FINISH lets the decoder say
            // whether the member is complete.
            true,
        );
        if ret != lz::LZMA_OK {
            let e = std::io::Error::other(format!("cannot start the lzip decoder ({ret})"));
            return Err(Error::io(name, start)(e));
        }
        Ok(MemberStream {
            number,
            member,
            unit,
        })
    }
}

impl StreamDecoder for MemberStream {
    fn read(&mut self, out: &mut [u8]) -> Result<usize> {
        let (number, start) = (self.number, self.member.compressed_offset);
        self.unit.read(out, |r| {
            format!(
                "member {number} (starting at {start}): corrupt data, wrong size or CRC32 mismatch (liblzma {r})"
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dictionary_sizes_decode_as_lzip_defines_them() {
        assert_eq!(dict_size(0x0c), Some(4096));
        assert_eq!(dict_size(0x17), Some(8 << 20));
        // 2^23 minus 3/16 of it.
        assert_eq!(dict_size(0x77), Some((8 << 20) - 3 * ((8 << 20) / 16)));
        assert_eq!(dict_size(0x0b), None);
        assert_eq!(dict_size(0x1e), None);
    }

    proptest::proptest! {
        /// Hostile bytes never panic the index walk, and whatever it
        /// accepts tiles the file exactly.
        #[test]
        fn hostile_files_index_without_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let size = data.len() as u64;
            let mut read = |off: u64, buf: &mut [u8]| -> std::io::Result<()> {
                let s = off as usize;
                buf.copy_from_slice(&data[s..s + buf.len()]);
                Ok(())
            };
            if let Ok(members) = index("fuzz", size, &mut read) {
                let mut at = 0;
                for m in &members {
                    proptest::prop_assert_eq!(m.compressed_offset, at);
                    at += m.compressed_size;
                }
                proptest::prop_assert_eq!(at, size);
            }
        }
    }
}
