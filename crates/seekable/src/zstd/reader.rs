//! Random access to zstd files, one frame at a time.
//!
//! zstd frames are independently decodable, so frames are the segments.
//! Where they are comes from the seek table of the seekable format when
//! the file has one (nothing but the table is read at open), and otherwise
//! from walking the frame and block headers from the start of the file.
//! That walk reads 3 bytes per block, never block data, except for frames
//! that do not record their content size: those must be decoded to learn
//! it.  A frame bigger than the progressive threshold (in particular the
//! single frame of a plain `zstd` file) is decoded progressively into a
//! scratch file.

use std::collections::HashMap;
use std::sync::Arc;

use ::zstd::zstd_safe::{self, DCtx, DParameter, InBuffer, OutBuffer};

use super::seek_table::{
    parse_frame_header, SeekTable, FRAME_MAGIC, MAX_FRAME_HEADER, SKIPPABLE_BASE, SKIPPABLE_MASK,
};
use super::xxh64::Xxh64;
use crate::engine::{record, Codec, Engine, ResumableDecoder, Segment};
use crate::progressive::{Input, Progressive, StreamDecoder};
use crate::sync::LockExt;
use crate::{read_exact, Error, Options, Result, Source};

/// The seek table has no checksum of its own, and a frame's place in the
/// disk is the sum of the sizes before it, so one wrong size would move
/// every later frame and change the exported size.  Frames that record
/// their size in their header (zstd records it whenever the writer knew
/// it) are checked against the table here, one header read each, and a
/// table that disagrees is refused before anything is exported.  A frame
/// without a recorded size is checked when it is decoded (its output must
/// fill its entry exactly).
fn check_recorded_sizes(source: &dyn Source, name: &str, table: &SeekTable) -> Result<()> {
    let mut head = [0u8; MAX_FRAME_HEADER];
    for f in &table.frames {
        let n = (MAX_FRAME_HEADER as u64).min(f.compressed_size) as usize;
        read_exact(source, name, &mut head[..n], f.compressed_offset)?;
        let fh =
            parse_frame_header(&head[..n], f.compressed_offset).map_err(|e| rename(e, name))?;
        if let Some(recorded) = fh.content_size {
            if recorded != f.decompressed_size {
                return Err(Error::corrupt(
                    name,
                    "zstd",
                    f.compressed_offset,
                    format!(
                        "the frame records {recorded} bytes but the seek table says {}",
                        f.decompressed_size
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Input read from the source per refill.
const INPUT_STEP: u64 = 128 << 10;

/// Largest zstd block (the format caps blocks at 128 KiB).
const MAX_BLOCK: u64 = 128 << 10;

/// How a zstd file was indexed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZstdLayout {
    /// Seekable format: frames listed in a trailing seek table.
    Seekable,
    /// Frames found by walking the headers from the start.
    Frames,
}

/// One zstd frame (a unit of random access).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZstdFrame {
    pub compressed_offset: u64,
    pub compressed_size: u64,
    pub decompressed_offset: u64,
    pub decompressed_size: u64,
}

/// A random-access reader over a zstd file.
pub struct ZstdReader {
    engine: Engine<ZstdCodec>,
    layout: ZstdLayout,
}

struct ZstdCodec {
    source: Arc<dyn Source>,
    name: String,
    frames: Vec<ZstdFrame>,
    /// Seek table checksums (low 32 bits of XXH64), per frame.
    checksums: Vec<Option<u32>>,
}

fn rename(e: Error, name: &str) -> Error {
    match e {
        Error::Corrupt {
            format,
            offset,
            reason,
            ..
        } => Error::corrupt(name, format, offset, reason),
        other => other,
    }
}

impl ZstdReader {
    pub fn open(source: Arc<dyn Source>, opts: &Options) -> Result<ZstdReader> {
        Self::open_with_threshold(source, opts, opts.default_progressive_threshold())
    }

    /// Like [`ZstdReader::open`], but frames whose decompressed size
    /// exceeds `threshold` bytes (or is not recorded) are decoded
    /// progressively into a scratch file instead of being cached.
    pub fn open_with_threshold(
        source: Arc<dyn Source>,
        opts: &Options,
        threshold: u64,
    ) -> Result<ZstdReader> {
        let name = opts.name.as_str();
        let file_size = source.size().map_err(Error::io(name, 0))?;
        if file_size == 0 {
            // `zstd -d` rejects it too: a zstd file has at least one frame.
            return Err(Error::corrupt(
                name,
                "zstd",
                0,
                "empty file (a zstd file holds at least one frame)",
            ));
        }

        // The seek table, if the file ends with one.
        let mut table = None;
        if file_size >= 9 {
            let mut footer = [0u8; 9];
            read_exact(&source, name, &mut footer, file_size - 9)?;
            if let Some(tsize) = SeekTable::table_size_from_footer(&footer) {
                let tsize = tsize.map_err(|e| rename(e, name))?;
                if tsize > file_size {
                    return Err(Error::corrupt(
                        name,
                        "zstd",
                        file_size - 9,
                        format!("seek table of {tsize} bytes is larger than the file"),
                    ));
                }
                let mut tail = vec![0u8; tsize as usize];
                read_exact(&source, name, &mut tail, file_size - tsize)?;
                let t = SeekTable::parse(&tail, file_size).map_err(|e| rename(e, name))?;
                check_recorded_sizes(&*source, name, &t)?;
                table = Some(t);
            }
        }

        let mut pre = HashMap::new();
        let checksums: Vec<Option<u32>> = table
            .as_ref()
            .map(|t| t.frames.iter().map(|f| f.checksum).collect())
            .unwrap_or_default();
        let (frames, layout) = match table {
            Some(t) => (
                t.frames
                    .iter()
                    .map(|f| ZstdFrame {
                        compressed_offset: f.compressed_offset,
                        compressed_size: f.compressed_size,
                        decompressed_offset: f.decompressed_offset,
                        decompressed_size: f.decompressed_size,
                    })
                    .collect(),
                ZstdLayout::Seekable,
            ),
            None => (
                walk_frames(&source, name, file_size, threshold, opts, &mut pre)?,
                ZstdLayout::Frames,
            ),
        };
        let segs = frames
            .iter()
            .map(|f| Segment {
                uoffset: f.decompressed_offset,
                usize: f.decompressed_size,
                coffset: f.compressed_offset,
            })
            .collect();
        let codec = ZstdCodec {
            source,
            name: name.to_string(),
            frames,
            checksums,
        };
        let engine = Engine::new(codec, segs, opts, threshold, pre);
        tracing::debug!(
            "{name}: zstd ({layout:?}), {} frames, {} bytes decompressed",
            engine.codec().frames.len(),
            engine.size()
        );
        Ok(ZstdReader { engine, layout })
    }

    /// The frames (random-access points) of the file.
    pub fn frames(&self) -> &[ZstdFrame] {
        &self.engine.codec().frames
    }

    /// Whether the frames came from a seek table or a header walk.
    pub fn layout(&self) -> ZstdLayout {
        self.layout
    }
}

crate::engine::random_access_via_engine!(ZstdReader);

/// Buffered forward reads for the header walk (many 3-byte reads).
struct Walker<'a> {
    source: &'a dyn Source,
    name: &'a str,
    file_size: u64,
    buf: Vec<u8>,
    buf_off: u64,
}

impl Walker<'_> {
    /// Up to `len` bytes at `off` (fewer only at the end of the file).
    fn get(&mut self, off: u64, len: usize) -> Result<&[u8]> {
        if off >= self.file_size {
            return Ok(&[]);
        }
        let end = (off + len as u64).min(self.file_size);
        if off < self.buf_off || end > self.buf_off + self.buf.len() as u64 {
            let n = (self.file_size - off).min(64 << 10).max(end - off) as usize;
            self.buf.resize(n, 0);
            read_exact(self.source, self.name, &mut self.buf, off)?;
            self.buf_off = off;
        }
        let s = (off - self.buf_off) as usize;
        Ok(&self.buf[s..s + (end - off) as usize])
    }

    fn corrupt(&self, offset: u64, reason: impl Into<String>) -> Error {
        Error::corrupt(self.name, "zstd", offset, reason)
    }
}

/// Find every frame by walking headers; frames without a recorded content
/// size are decoded to learn it (progressively, so the work is kept when
/// the frame is big).
fn walk_frames(
    source: &Arc<dyn Source>,
    name: &str,
    file_size: u64,
    threshold: u64,
    opts: &Options,
    pre: &mut HashMap<usize, Arc<Progressive>>,
) -> Result<Vec<ZstdFrame>> {
    let mut w = Walker {
        source: &**source,
        name,
        file_size,
        buf: Vec::new(),
        buf_off: 0,
    };
    let mut frames = Vec::new();
    let mut pos = 0u64;
    let mut doff = 0u64;
    let mut logged_unsized = false;
    let mut dctx: Option<DCtx<'static>> = None;
    let mut out = Vec::new();
    let started = std::time::Instant::now();
    let check_deadline = |pos: u64| match opts.open_timeout {
        Some(t) if started.elapsed() >= t => Err(Error::unsupported(
            name,
            "zstd",
            format!(
                "learning the size of frames that do not record it took over {} s \
                 (reached offset {pos} of {file_size}); recompress with content sizes \
                 (seekable zstd, or `zstd` on a file rather than a pipe), or raise \
                 zstd-open-timeout",
                t.as_secs()
            ),
        )),
        _ => Ok(()),
    };
    while pos < file_size {
        let head = w.get(pos, 8)?;
        if head.len() < 8 {
            return Err(w.corrupt(pos, "trailing garbage or truncated frame"));
        }
        let magic = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        if magic & SKIPPABLE_MASK == SKIPPABLE_BASE {
            let len = u64::from(u32::from_le_bytes([head[4], head[5], head[6], head[7]]));
            pos += 8 + len;
            if pos > file_size {
                return Err(w.corrupt(pos - 8 - len, "skippable frame runs past the end"));
            }
            continue;
        }
        if magic != FRAME_MAGIC {
            return Err(w.corrupt(pos, "neither a zstd frame nor a skippable frame"));
        }
        let hb = w.get(pos, MAX_FRAME_HEADER)?;
        let fh = parse_frame_header(hb, pos).map_err(|e| rename(e, name))?;
        let mut at = pos + fh.header_size as u64;
        let mut blocks: u64 = 0;
        loop {
            blocks += 1;
            let bh = w.get(at, 3)?;
            if bh.len() < 3 {
                return Err(w.corrupt(at, "truncated frame (block header missing)"));
            }
            let h = u32::from_le_bytes([bh[0], bh[1], bh[2], 0]);
            let last = h & 1 != 0;
            let size = u64::from(h >> 3);
            let payload = match (h >> 1) & 3 {
                0 => size,
                1 => 1,
                2 => size,
                _ => return Err(w.corrupt(at, "reserved block type")),
            };
            if size > MAX_BLOCK {
                return Err(w.corrupt(at, format!("block of {size} bytes exceeds 128 KiB")));
            }
            at += 3 + payload;
            if last {
                break;
            }
        }
        if fh.has_checksum {
            at += 4;
        }
        if at > file_size {
            return Err(w.corrupt(pos, "frame runs past the end of the file"));
        }
        let csize = at - pos;
        let index = frames.len();
        let dsize = match fh.content_size {
            // No block decodes to more than 128 KiB, so a larger claim is a
            // lie that would otherwise become the exported size.
            Some(s) if s > blocks * MAX_BLOCK => {
                return Err(w.corrupt(
                    pos,
                    format!(
                        "frame claims {s} bytes but its {blocks} blocks hold at most {}",
                        blocks * MAX_BLOCK
                    ),
                ))
            }
            Some(s) => s,
            None => {
                if !logged_unsized {
                    logged_unsized = true;
                    tracing::info!(
                        "{name}: zstd frame at offset {pos} does not record its size; decoding \
                         such frames to learn it (recompress as seekable zstd for instant open \
                         and fast random access)"
                    );
                }
                check_deadline(pos)?;
                // Counted in a small reused buffer with a reused context:
                // a file of many small unsized frames costs their decoding
                // and nothing per frame (a scratch file and a 1 MiB step
                // buffer each made 300,000 empty frames take a minute).
                match count_frame(&**source, name, pos, csize, threshold, &mut dctx, &mut out)? {
                    Some(s) => s,
                    None => {
                        // Too big for the cache: decoded progressively into
                        // a scratch file, so the work is kept.
                        let dec = FrameStream::new(source.clone(), name, pos, csize)?;
                        let p = Progressive::new(
                            name,
                            "zstd",
                            pos,
                            None,
                            Box::new(dec),
                            opts.scratch_dir.as_deref(),
                            false,
                        )?;
                        loop {
                            check_deadline(pos)?;
                            let f = p.frontier();
                            p.advance_to(f.saturating_add(64 << 20))?;
                            if p.frontier() == f {
                                break;
                            }
                        }
                        let s = p.frontier();
                        pre.insert(index, Arc::new(p));
                        s
                    }
                }
            }
        };
        frames.push(ZstdFrame {
            compressed_offset: pos,
            compressed_size: csize,
            decompressed_offset: doff,
            decompressed_size: dsize,
        });
        doff = doff
            .checked_add(dsize)
            .ok_or_else(|| w.corrupt(pos, "total decompressed size overflows"))?;
        pos = at;
    }
    Ok(frames)
}

/// Decode the frame at `pos` (`csize` bytes) only to count its bytes,
/// verifying it (zstd checks the content checksum); `None` once it exceeds
/// `threshold`.
fn count_frame(
    source: &dyn Source,
    name: &str,
    pos: u64,
    csize: u64,
    threshold: u64,
    dctx: &mut Option<DCtx<'static>>,
    out: &mut Vec<u8>,
) -> Result<Option<u64>> {
    let corrupt = |at: u64, reason: String| {
        Error::corrupt(name, "zstd", at, format!("frame at offset {pos}: {reason}"))
    };
    if dctx.is_none() {
        *dctx = DCtx::try_create();
    }
    let d = dctx.as_mut().ok_or_else(|| Error::oom(name, pos))?;
    d.reset(zstd_safe::ResetDirective::SessionOnly)
        .map_err(|c| corrupt(pos, zstd_safe::get_error_name(c).to_string()))?;
    out.resize(MAX_BLOCK as usize, 0);
    let mut input = vec![0u8; csize.min(INPUT_STEP) as usize];
    let mut next = pos;
    let end = pos + csize;
    let mut total = 0u64;
    let mut ret = 1;
    while next < end {
        let n = (end - next).min(INPUT_STEP) as usize;
        input.resize(n, 0);
        read_exact(source, name, &mut input, next)?;
        let mut inb = InBuffer::around(&input);
        while inb.pos() < n || ret != 0 {
            let before = inb.pos();
            let mut outb = OutBuffer::around(&mut out[..]);
            ret = d.decompress_stream(&mut outb, &mut inb).map_err(|c| {
                corrupt(
                    next + before as u64,
                    zstd_safe::get_error_name(c).to_string(),
                )
            })?;
            total += outb.pos() as u64;
            if total > threshold {
                return Ok(None);
            }
            if ret == 0 && inb.pos() < n {
                return Err(corrupt(next + inb.pos() as u64, "frame ends early".into()));
            }
            if outb.pos() == 0 && inb.pos() == before {
                // Needs more input (or is done).
                break;
            }
        }
        next += n as u64;
    }
    if ret != 0 {
        return Err(corrupt(end, "frame is truncated".into()));
    }
    Ok(Some(total))
}

thread_local! {
    /// One decompression context per thread, reused across frames: creating
    /// one per frame costs more than decoding a small frame.
    static DCTX: std::cell::RefCell<Option<DCtx<'static>>> = const { std::cell::RefCell::new(None) };
}

impl Codec for ZstdCodec {
    fn format(&self) -> &'static str {
        "zstd"
    }

    /// Frames that fit in the cache are decoded in one call straight into
    /// the cache buffer, skipping the streaming decoder's window copy.
    fn decode_whole(&self, index: usize, _seg: &Segment, out: &mut [u8]) -> Option<Result<()>> {
        let f = *self.frames.get(index)?;
        // A plausible frame is not much bigger than its content; anything
        // else takes the streaming path so the input buffer stays bounded.
        if f.compressed_size > 2 * f.decompressed_size + (1 << 20) {
            return None;
        }
        Some(self.decode_frame_into(index, f, out))
    }

    /// Any frame of plausible size is decoded partially: zstd's decoder
    /// state is small (its history is the output buffer itself).
    fn resumable(&self, index: usize) -> bool {
        self.frames
            .get(index)
            .is_some_and(|f| f.compressed_size <= 2 * f.decompressed_size + (1 << 20))
    }

    fn open_resumable(&self, index: usize, _seg: &Segment) -> Result<Box<dyn ResumableDecoder>> {
        let f = record(&self.frames, index, &self.name, "zstd", "frame")?;
        Ok(Box::new(ResumableFrame::new(
            self.source.clone(),
            &self.name,
            f,
            self.checksums.get(index).copied().flatten(),
        )?))
    }

    fn open_segment(&self, index: usize, _seg: &Segment) -> Result<Box<dyn StreamDecoder>> {
        let f = record(&self.frames, index, &self.name, "zstd", "frame")?;
        Ok(Box::new(
            FrameStream::new(
                self.source.clone(),
                &self.name,
                f.compressed_offset,
                f.compressed_size,
            )?
            .with_checksum(self.checksums.get(index).copied().flatten()),
        ))
    }
}

impl ZstdCodec {
    fn decode_frame_into(&self, index: usize, f: ZstdFrame, out: &mut [u8]) -> Result<()> {
        let corrupt = |reason: String| {
            Error::corrupt(
                &self.name,
                "zstd",
                f.compressed_offset,
                format!("frame at offset {}: {reason}", f.compressed_offset),
            )
        };
        let mut input = vec![0u8; f.compressed_size as usize];
        read_exact(&self.source, &self.name, &mut input, f.compressed_offset)?;
        // Exactly one frame: a second one hidden in the range would make
        // the table lie about the layout.
        match zstd_safe::find_frame_compressed_size(&input) {
            Ok(n) if n == input.len() => {}
            _ => return Err(corrupt("not exactly one zstd frame".into())),
        }
        let res = DCTX.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = DCtx::try_create();
            }
            match slot.as_mut() {
                Some(dctx) => dctx
                    .decompress(out, &input)
                    .map_err(|code| zstd_safe::get_error_name(code).to_string()),
                None => Err("out of memory".to_string()),
            }
        });
        match res {
            Ok(n) if n == out.len() => {}
            Ok(n) => {
                return Err(corrupt(format!(
                    "decodes to {n} bytes, recorded {}",
                    out.len()
                )))
            }
            Err(e) => return Err(corrupt(e)),
        }
        if let Some(want) = self.checksums.get(index).copied().flatten() {
            let got = super::xxh64::xxh64(out) as u32;
            if got != want {
                return Err(corrupt(format!(
                    "seek table checksum mismatch ({got:08x} != {want:08x})"
                )));
            }
        }
        Ok(())
    }
}

/// Streaming decoder of exactly one frame.
struct FrameStream {
    name: String,
    start: u64,
    dctx: DCtx<'static>,
    input: Input,
    done: bool,
    /// Checksum from the seek table, verified over the decoded bytes.
    expect_xxh: Option<u32>,
    xxh: Xxh64,
}

impl FrameStream {
    fn with_checksum(mut self, c: Option<u32>) -> Self {
        self.expect_xxh = c;
        self
    }

    fn new(source: Arc<dyn Source>, name: &str, start: u64, csize: u64) -> Result<Self> {
        let dctx = DCtx::try_create().ok_or_else(|| Error::oom(name, start))?;
        Ok(FrameStream {
            name: name.to_string(),
            start,
            dctx,
            input: Input::new(source, name, start..start + csize, INPUT_STEP),
            done: false,
            expect_xxh: None,
            xxh: Xxh64::default(),
        })
    }

    fn corrupt(&self, offset: u64, reason: String) -> Error {
        Error::corrupt(&self.name, "zstd", offset, reason)
    }
}

impl StreamDecoder for FrameStream {
    fn read(&mut self, out: &mut [u8]) -> Result<usize> {
        if self.done || out.is_empty() {
            return Ok(0);
        }
        loop {
            let mut inb = InBuffer::around(self.input.fill()?);
            let mut outb = OutBuffer::around(&mut *out);
            let res = self.dctx.decompress_stream(&mut outb, &mut inb);
            let used = inb.pos();
            let produced = outb.pos();
            self.input.consume(used);
            if self.expect_xxh.is_some() {
                self.xxh.update(&out[..produced]);
            }
            let at = self.input.offset();
            match res {
                Err(code) => {
                    return Err(self.corrupt(
                        at,
                        format!(
                            "frame at offset {}: {}",
                            self.start,
                            zstd_safe::get_error_name(code)
                        ),
                    ))
                }
                Ok(0) => {
                    // Frame complete, checksum (if any) verified.
                    if !self.input.is_done() {
                        return Err(self.corrupt(
                            at,
                            format!(
                                "frame at offset {} ends before its recorded size",
                                self.start
                            ),
                        ));
                    }
                    if let Some(want) = self.expect_xxh {
                        let got = self.xxh.digest() as u32;
                        if got != want {
                            return Err(self.corrupt(
                                self.start,
                                format!(
                                    "frame at offset {}: seek table checksum mismatch \
                                     ({got:08x} != {want:08x})",
                                    self.start
                                ),
                            ));
                        }
                    }
                    self.done = true;
                    return Ok(produced);
                }
                Ok(_) => {}
            }
            if produced > 0 {
                return Ok(produced);
            }
            if used == 0 && self.input.is_done() {
                return Err(self.corrupt(
                    self.input.end(),
                    format!("frame at offset {} is truncated", self.start),
                ));
            }
        }
    }
}

/// A frame decoded a block at a time straight into its final buffer.
///
/// With `ZSTD_d_stableOutBuffer` the decoder writes into our buffer and
/// uses what it wrote as its history, so suspending it between blocks
/// costs only its small context.  We hand it exactly one block of input
/// per call (found from the 3-byte block headers), which is what lets a
/// read stop after the block holding its last byte.  The frame's content
/// checksum (checked by zstd) and the seek table's checksum (checked here)
/// can only be verified once the last block is decoded.
struct ResumableFrame {
    source: Arc<dyn Source>,
    name: String,
    frame: ZstdFrame,
    /// Always `Some` until dropped (then it goes back to the pool).
    dctx: Option<DCtx<'static>>,
    /// Compressed bytes `[0, input.len())` of the frame, read on demand.
    input: Vec<u8>,
    /// Bytes of `input` given to the decoder so far.
    fed: usize,
    /// Where the first block header is (after the frame header).
    body: Option<(usize, bool)>,
    expect_xxh: Option<u32>,
}

impl ResumableFrame {
    fn new(
        source: Arc<dyn Source>,
        name: &str,
        frame: ZstdFrame,
        expect_xxh: Option<u32>,
    ) -> Result<Self> {
        let oom = || Error::oom(name, frame.compressed_offset);
        let pooled = DCTX_POOL.lock_unpoisoned().pop();
        let dctx = match pooled {
            Some(d) => d,
            None => {
                let mut d = DCtx::try_create().ok_or_else(oom)?;
                d.set_parameter(DParameter::StableOutBuffer(true))
                    .map_err(|_| oom())?;
                d
            }
        };
        Ok(ResumableFrame {
            source,
            name: name.to_string(),
            frame,
            dctx: Some(dctx),
            input: Vec::new(),
            fed: 0,
            body: None,
            expect_xxh,
        })
    }

    fn corrupt(&self, at: usize, reason: String) -> Error {
        Error::corrupt(
            &self.name,
            "zstd",
            self.frame.compressed_offset + at as u64,
            format!("frame at offset {}: {reason}", self.frame.compressed_offset),
        )
    }

    /// Have at least `upto` compressed bytes (within the frame) in `input`.
    fn fill(&mut self, upto: usize) -> Result<()> {
        let csize = self.frame.compressed_size as usize;
        if upto > csize {
            return Err(self.corrupt(self.input.len(), "frame runs past its recorded size".into()));
        }
        if upto <= self.input.len() {
            return Ok(());
        }
        let have = self.input.len();
        let want = upto.max(have + INPUT_STEP as usize).min(csize);
        self.input.resize(want, 0);
        let off = self.frame.compressed_offset + have as u64;
        read_exact(&self.source, &self.name, &mut self.input[have..], off)
            .inspect_err(|_| self.input.truncate(have))
    }

    /// The end (in `input`) of the next unit to feed: the frame header and
    /// first block, or the next block; the last block with the checksum.
    fn next_unit(&mut self) -> Result<(usize, bool)> {
        let (first_block, has_checksum) = match self.body {
            Some(b) => b,
            None => {
                self.fill(MAX_FRAME_HEADER.min(self.frame.compressed_size as usize))?;
                let fh = parse_frame_header(&self.input, self.frame.compressed_offset)
                    .map_err(|e| rename(e, &self.name))?;
                let b = (fh.header_size, fh.has_checksum);
                self.body = Some(b);
                b
            }
        };
        let at = self.fed.max(first_block);
        self.fill(at + 3)?;
        let h = u32::from_le_bytes([self.input[at], self.input[at + 1], self.input[at + 2], 0]);
        let last = h & 1 != 0;
        let size = (h >> 3) as usize;
        let payload = match (h >> 1) & 3 {
            0 | 2 => size,
            1 => 1,
            _ => return Err(self.corrupt(at, "reserved block type".into())),
        };
        if size as u64 > MAX_BLOCK {
            return Err(self.corrupt(at, format!("block of {size} bytes exceeds 128 KiB")));
        }
        let mut end = at + 3 + payload;
        if last && has_checksum {
            end += 4;
        }
        self.fill(end)?;
        Ok((end, last))
    }
}

/// Contexts of finished or dropped partial frames, for the next ones: a
/// fresh context allocates its block buffers on first use, which costs a
/// noticeable part of decoding a 1 MiB frame.
static DCTX_POOL: std::sync::Mutex<Vec<DCtx<'static>>> = std::sync::Mutex::new(Vec::new());

/// Contexts kept in the pool at most (each is ~200 KiB once used).
const DCTX_POOL_MAX: usize = 32;

impl Drop for ResumableFrame {
    fn drop(&mut self) {
        // A session reset drops the frame in progress and keeps the
        // parameters (the stable output buffer setting).
        let Some(mut d) = self.dctx.take() else {
            return;
        };
        if d.reset(zstd_safe::ResetDirective::SessionOnly).is_err() {
            return;
        }
        let mut pool = DCTX_POOL.lock_unpoisoned();
        if pool.len() < DCTX_POOL_MAX {
            pool.push(d);
        }
    }
}

impl ResumableDecoder for ResumableFrame {
    fn advance(&mut self, buf: &mut [u8], pos: usize, target: usize) -> Result<usize> {
        let mut pos = pos;
        // A full buffer is only done once the last block (and with it the
        // checksum) has been through the decoder: blocks that add nothing
        // may still follow, and data beyond the size makes zstd fail.
        while pos < target || pos == buf.len() {
            let (end, last) = self.next_unit()?;
            let mut ret = 1;
            while self.fed < end {
                let at_start = self.fed;
                let mut inb = InBuffer::around(&self.input[self.fed..end]);
                let mut outb = OutBuffer::around_pos(&mut *buf, pos);
                let Some(dctx) = self.dctx.as_mut() else {
                    return Err(self.corrupt(at_start, "decoder context lost".into()));
                };
                let res = dctx.decompress_stream(&mut outb, &mut inb);
                let (used, new_pos) = (inb.pos(), outb.pos());
                let at = self.fed;
                self.fed += used;
                match res {
                    Err(code) => {
                        return Err(self.corrupt(at, zstd_safe::get_error_name(code).to_string()))
                    }
                    Ok(r) => ret = r,
                }
                if used == 0 && new_pos == pos {
                    return Err(self.corrupt(at, "decoder made no progress".into()));
                }
                pos = new_pos;
            }
            if last {
                if ret != 0 {
                    return Err(self.corrupt(self.fed, "frame is truncated".into()));
                }
                if self.fed as u64 != self.frame.compressed_size {
                    return Err(
                        self.corrupt(self.fed, "frame ends before its recorded size".into())
                    );
                }
                if pos != buf.len() {
                    return Err(
                        self.corrupt(0, format!("decodes to {pos} bytes, recorded {}", buf.len()))
                    );
                }
                if let Some(want) = self.expect_xxh {
                    // A frame's content checksum is the low 32 bits of the
                    // XXH64 of its content, which is what the seek table
                    // stores too, and zstd has just verified it against the
                    // decoded bytes: comparing the two stored values checks
                    // the table without hashing the frame a second time
                    // (that was 6% of the CPU of a sequential copy).
                    let has_checksum = self.body.is_some_and(|(_, c)| c);
                    let got = if has_checksum && self.input.len() >= 4 {
                        let t = &self.input[self.input.len() - 4..];
                        u32::from_le_bytes([t[0], t[1], t[2], t[3]])
                    } else {
                        super::xxh64::xxh64(buf) as u32
                    };
                    if got != want {
                        return Err(self.corrupt(
                            0,
                            format!("seek table checksum mismatch ({got:08x} != {want:08x})"),
                        ));
                    }
                }
                return Ok(pos);
            }
        }
        Ok(pos)
    }
}
