//! Random access to bzip2 files, one block at a time.
//!
//! Opening scans the whole file for block and end-of-stream magics (bzip2
//! has no index), then decodes every candidate block once, in parallel, to
//! learn its decompressed size (bzip2 does not record it).  A magic that
//! occurs by chance inside compressed data splits a real block in two;
//! both halves then fail to decode, and are merged and retried.  Reads then
//! decode single blocks through a synthesised one-block stream, which also
//! verifies the block's CRC.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::scan::{one_block_stream, Mark, Scanner};
use crate::engine::{record, Codec, Engine, Segment};
use crate::progressive::StreamDecoder;
use crate::sync::LockExt;
use crate::{read_exact, Error, Options, Result, Source};

/// A compressed bzip2 block holds at most 900 kB of BWT input; with
/// Huffman tables and worst-case expansion it stays far below this.  Any
/// longer candidate is corrupt, and this bounds what one decode allocates.
const MAX_BLOCK_BITS: u64 = (2 << 20) * 8;

/// How many following candidates a failing one may be merged with.
const MAX_MERGE: usize = 4;

/// One bzip2 block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bzip2Block {
    /// Bit offset of the block magic in the file.
    pub start_bit: u64,
    /// Bit offset just past the block (next magic).
    pub end_bit: u64,
    /// Block size level (`'1'..='9'`) of the stream holding the block.
    pub level: u8,
    pub uncompressed_offset: u64,
    pub uncompressed_size: u64,
    /// Which stream of the file (concatenated `bzip2` outputs) holds it.
    pub stream: usize,
}

/// A random-access reader over a bzip2 file.
pub struct Bzip2Reader {
    engine: Engine<BzCodec>,
}

struct BzCodec {
    source: Arc<dyn Source>,
    name: String,
    blocks: Vec<Bzip2Block>,
}

#[derive(Debug, Clone, Copy)]
struct Candidate {
    start: u64,
    end: u64,
    level: u8,
    stream: usize,
}

fn corrupt(name: &str, offset: u64, reason: impl Into<String>) -> Error {
    Error::corrupt(name, "bzip2", offset, reason)
}

fn level_of(header: &[u8]) -> Option<u8> {
    match header {
        [b'B', b'Z', b'h', l @ b'1'..=b'9', ..] => Some(*l),
        _ => None,
    }
}

impl Bzip2Reader {
    pub fn open(source: Arc<dyn Source>, opts: &Options) -> Result<Bzip2Reader> {
        Self::open_with_threshold(source, opts, opts.default_progressive_threshold())
    }

    /// Like [`Bzip2Reader::open`]; blocks decompressing to more than
    /// `threshold` bytes (runs of one byte can make a block hold ~45 MB)
    /// are decoded progressively instead of cached.
    pub fn open_with_threshold(
        source: Arc<dyn Source>,
        opts: &Options,
        threshold: u64,
    ) -> Result<Bzip2Reader> {
        let name = opts.name.as_str();
        let size = source.size().map_err(Error::io(name, 0))?;
        let (cands, stream_crcs) = find_candidates(&*source, name, size)?;
        let blocks = size_blocks(&source, name, &cands, opts.threads)?;
        check_stream_crcs(&*source, name, &blocks, &stream_crcs)?;
        let segs = blocks
            .iter()
            .map(|b| Segment {
                uoffset: b.uncompressed_offset,
                usize: b.uncompressed_size,
                coffset: b.start_bit / 8,
            })
            .collect();
        let codec = BzCodec {
            source,
            name: name.to_string(),
            blocks,
        };
        let engine = Engine::new(codec, segs, opts, threshold, HashMap::new());
        tracing::debug!(
            "{name}: bzip2, {} blocks, {} bytes decompressed",
            engine.codec().blocks.len(),
            engine.size()
        );
        Ok(Bzip2Reader { engine })
    }

    /// The blocks (random-access points) found.
    pub fn blocks(&self) -> &[Bzip2Block] {
        &self.engine.codec().blocks
    }
}

crate::engine::random_access_via_engine!(Bzip2Reader);

/// A stream's stored combined CRC and the byte offset of its end magic.
type StreamCrc = (u32, u64);

/// The 32 bits at bit offset `bit` of the file.
fn read_u32_at_bit(source: &dyn Source, name: &str, bit: u64) -> Result<u32> {
    let byte = bit / 8;
    let k = bit % 8;
    let n = (k + 32).div_ceil(8) as usize;
    let mut b = [0u8; 5];
    read_exact(source, name, &mut b[..n], byte)?;
    let v = b.iter().fold(0u64, |a, &x| (a << 8) | u64::from(x));
    Ok((v >> (8 - k)) as u32)
}

/// Each stream ends with a CRC combined from its blocks' CRCs (each block
/// header holds its block's CRC right after the magic), so checking it
/// needs no decoding: a block lost (its magic damaged), deleted, duplicated
/// or moved changes it.
fn check_stream_crcs(
    source: &dyn Source,
    name: &str,
    blocks: &[Bzip2Block],
    stream_crcs: &[StreamCrc],
) -> Result<()> {
    let mut combined = vec![0u32; stream_crcs.len()];
    for b in blocks {
        let crc = read_u32_at_bit(source, name, b.start_bit + 48)?;
        if let Some(c) = combined.get_mut(b.stream) {
            *c = c.rotate_left(1) ^ crc;
        }
    }
    for (k, (&got, &(want, at))) in combined.iter().zip(stream_crcs).enumerate() {
        if got != want {
            return Err(corrupt(
                name,
                at,
                format!(
                    "stream {k}: combined CRC of its blocks {got:08x} does not match the \
                     stream's {want:08x} (a block is missing, duplicated or damaged)"
                ),
            ));
        }
    }
    Ok(())
}

/// Scan the file and pair up magics into candidate blocks, following the
/// stream structure (header, blocks, end magic + CRC, next stream header at
/// the next byte boundary).  Also returns each stream's stored combined
/// CRC and the byte offset of its end-of-stream magic.
fn find_candidates(
    source: &dyn Source,
    name: &str,
    size: u64,
) -> Result<(Vec<Candidate>, Vec<StreamCrc>)> {
    let mut header = [0u8; 4];
    if size < 4 {
        return Err(corrupt(name, 0, "too short for a bzip2 header"));
    }
    read_exact(source, name, &mut header, 0)?;
    let mut level = level_of(&header).ok_or_else(|| corrupt(name, 0, "bad bzip2 stream header"))?;

    let mut scanner = Scanner::default();
    let mut marks = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < size {
        let n = (size - pos).min(buf.len() as u64) as usize;
        read_exact(source, name, &mut buf[..n], pos)?;
        scanner.feed(&buf[..n], &mut marks);
        pos += n as u64;
    }

    let mut cands = Vec::new();
    let mut stream = 0usize;
    // Marks before this bit belong to a stream header and are ignored.
    let mut body_start = 32u64;
    let mut pending: Option<u64> = None;
    let mut ended_at = None;
    let mut crcs = Vec::new();
    // The first block (or the end) of a stream must start right after its
    // header: anything else means a block magic there was damaged.
    let misplaced = |b: u64, body_start: u64| {
        corrupt(
            name,
            body_start / 8,
            format!(
                "no bzip2 block or end-of-stream magic at byte {} (the next one is at bit {b})",
                body_start / 8
            ),
        )
    };
    let mut first = true;
    for m in marks {
        match m {
            Mark::Block(b) if b >= body_start => {
                if first && b != body_start {
                    return Err(misplaced(b, body_start));
                }
                first = false;
                if let Some(s) = pending {
                    cands.push(Candidate {
                        start: s,
                        end: b,
                        level,
                        stream,
                    });
                }
                pending = Some(b);
            }
            Mark::End(b) if b >= body_start => {
                // A real end is followed by the 32-bit CRC, padding to a
                // byte, and either the end of the file or another stream.
                let end_byte = (b + 80).div_ceil(8);
                let next_level = if end_byte + 4 <= size {
                    let mut h = [0u8; 4];
                    read_exact(source, name, &mut h, end_byte)?;
                    level_of(&h)
                } else {
                    None
                };
                if end_byte != size && next_level.is_none() {
                    // Chance occurrence inside block data.
                    continue;
                }
                if first && b != body_start {
                    return Err(misplaced(b, body_start));
                }
                if end_byte > size {
                    return Err(corrupt(name, b / 8, "stream CRC missing (truncated)"));
                }
                crcs.push((read_u32_at_bit(source, name, b + 48)?, b / 8));
                if let Some(s) = pending.take() {
                    cands.push(Candidate {
                        start: s,
                        end: b,
                        level,
                        stream,
                    });
                }
                ended_at = Some(end_byte);
                if let Some(l) = next_level {
                    level = l;
                    stream += 1;
                    body_start = (end_byte + 4) * 8;
                    ended_at = None;
                    first = true;
                } else {
                    break;
                }
            }
            _ => {}
        }
    }
    match ended_at {
        Some(e) if e == size => Ok((cands, crcs)),
        _ => Err(corrupt(
            name,
            size,
            "no end-of-stream marker at the end of the file (truncated?)",
        )),
    }
}

/// Decode every candidate (in parallel) to learn the block sizes, merging
/// candidates split by a chance magic.
fn size_blocks(
    source: &Arc<dyn Source>,
    name: &str,
    cands: &[Candidate],
    threads: usize,
) -> Result<Vec<Bzip2Block>> {
    let results: Vec<Mutex<Option<Result<u64>>>> = cands.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let workers = threads.clamp(1, 64).min(cands.len().max(1));
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(c) = cands.get(i) else { break };
                let r = count(source, name, c.start, c.end, c.level);
                *results[i].lock_unpoisoned() = Some(r);
            });
        }
    });
    let mut results: Vec<Result<u64>> = results
        .into_iter()
        .map(|m| {
            m.into_inner_unpoisoned()
                .unwrap_or_else(|| Err(corrupt(name, 0, "block not decoded")))
        })
        .collect();

    let mut blocks = Vec::new();
    let mut uoff = 0u64;
    let mut i = 0;
    while i < cands.len() {
        let c = cands[i];
        let (size, last) = match std::mem::replace(&mut results[i], Ok(0)) {
            Ok(n) => (n, i),
            Err(first_err) => {
                // Try joining with following candidates of the same stream.
                let mut found = None;
                for (j, cj) in cands.iter().enumerate().skip(i + 1).take(MAX_MERGE) {
                    if cj.stream != c.stream {
                        break;
                    }
                    if let Ok(n) = count(source, name, c.start, cj.end, c.level) {
                        found = Some((n, j));
                        break;
                    }
                }
                found.ok_or(first_err)?
            }
        };
        blocks.push(Bzip2Block {
            start_bit: c.start,
            end_bit: cands[last].end,
            level: c.level,
            uncompressed_offset: uoff,
            uncompressed_size: size,
            stream: c.stream,
        });
        uoff = uoff
            .checked_add(size)
            .ok_or_else(|| corrupt(name, c.start / 8, "size overflow"))?;
        i = last + 1;
    }
    Ok(blocks)
}

/// Decode bits `[start, end)` as one block, returning its size.
fn count(source: &Arc<dyn Source>, name: &str, start: u64, end: u64, level: u8) -> Result<u64> {
    let mut dec = BlockStream::new(source, name, start, end, level)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = dec.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

impl Codec for BzCodec {
    fn format(&self) -> &'static str {
        "bzip2"
    }

    fn open_segment(&self, index: usize, _seg: &Segment) -> Result<Box<dyn StreamDecoder>> {
        let b = record(&self.blocks, index, &self.name, "bzip2", "block")?;
        Ok(Box::new(BlockStream::new(
            &self.source,
            &self.name,
            b.start_bit,
            b.end_bit,
            b.level,
        )?))
    }
}

/// Decoder of one block via a synthesised one-block stream.
struct BlockStream {
    name: String,
    offset: u64,
    dec: ::bzip2::Decompress,
    input: Vec<u8>,
    at: usize,
    done: bool,
}

impl BlockStream {
    fn new(source: &Arc<dyn Source>, name: &str, start: u64, end: u64, level: u8) -> Result<Self> {
        let offset = start / 8;
        if end.saturating_sub(start) > MAX_BLOCK_BITS {
            return Err(corrupt(name, offset, "block larger than bzip2 allows"));
        }
        let last = end.div_ceil(8);
        let mut bytes = vec![0u8; (last - offset) as usize];
        read_exact(source, name, &mut bytes, offset)?;
        let input = one_block_stream(&bytes, offset, start, end, level)
            .ok_or_else(|| corrupt(name, offset, "block too short"))?;
        Ok(BlockStream {
            name: name.to_string(),
            offset,
            dec: ::bzip2::Decompress::new(false),
            input,
            at: 0,
            done: false,
        })
    }
}

impl StreamDecoder for BlockStream {
    fn read(&mut self, out: &mut [u8]) -> Result<usize> {
        if self.done || out.is_empty() {
            return Ok(0);
        }
        loop {
            let (in0, out0) = (self.dec.total_in(), self.dec.total_out());
            let status = self.dec.decompress(&self.input[self.at..], out);
            let used = (self.dec.total_in() - in0) as usize;
            let produced = (self.dec.total_out() - out0) as usize;
            self.at += used;
            match status {
                Err(e) => {
                    return Err(corrupt(
                        &self.name,
                        self.offset,
                        format!(
                            "block at byte {}: {e} (CRC mismatch or corrupt data)",
                            self.offset
                        ),
                    ))
                }
                Ok(::bzip2::Status::StreamEnd) => {
                    self.done = true;
                    return Ok(produced);
                }
                Ok(_) => {}
            }
            if produced > 0 {
                return Ok(produced);
            }
            if used == 0 {
                return Err(corrupt(
                    &self.name,
                    self.offset,
                    format!("block at byte {} is truncated", self.offset),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn candidates_split_by_a_chance_magic_are_merged() {
        let data: Vec<u8> = (0..300_000u64).map(|i| (i * i % 251) as u8).collect();
        let mut e = ::bzip2::write::BzEncoder::new(Vec::new(), ::bzip2::Compression::new(1));
        e.write_all(&data).unwrap();
        let file: Arc<dyn Source> = Arc::new(e.finish().unwrap());
        let size = file.size().unwrap();
        let (cands, _) = find_candidates(&*file, "t", size).unwrap();
        let good = size_blocks(&file, "t", &cands, 2).unwrap();
        // Pretend a magic occurred in the middle of the second block.
        let mut split = cands.clone();
        let c = split[1];
        let mid = (c.start + c.end) / 2;
        split[1].end = mid;
        split.insert(2, Candidate { start: mid, ..c });
        let merged = size_blocks(&file, "t", &split, 2).unwrap();
        assert_eq!(merged, good);
    }
}
