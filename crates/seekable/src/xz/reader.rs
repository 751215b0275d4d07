//! Random access to an xz file, one block at a time.
//!
//! Blocks are decoded with liblzma's *block* decoder
//! (`lzma_block_header_decode` + `lzma_block_decoder`) fed with exactly the
//! bytes the index assigns to the block.  We prefer that to synthesising a
//! one-block stream for `lzma_stream_decoder`: there is no header/index/footer
//! to fake (and get subtly wrong), and liblzma then checks the block against
//! the index's compressed and uncompressed sizes as well as its integrity
//! check.

use std::collections::HashMap;
use std::sync::Arc;

use liblzma_sys as lz;

use super::index::{XzBlock, XzCheck, XzIndex};
use crate::engine::{record, Codec, Engine, Segment};
use crate::lzma_unit::LzmaUnit;
use crate::progressive::StreamDecoder;
use crate::{read_exact, Error, Options, Result, Source};

/// Dictionaries larger than this are refused: the decoder allocates the
/// whole dictionary up front, so a hostile header could otherwise ask for
/// gigabytes.  `xz -9` and `--extreme` use 64 MiB.
const MAX_DICT: u32 = 512 << 20;

/// A random-access reader over an xz file.
pub struct XzReader {
    engine: Engine<XzCodec>,
}

struct XzCodec {
    source: Arc<dyn Source>,
    name: String,
    index: XzIndex,
}

impl XzReader {
    /// Map the file (reading only its footers and indexes) and prepare to
    /// serve reads.
    pub fn open(source: Arc<dyn Source>, opts: &Options) -> Result<XzReader> {
        Self::open_with_threshold(source, opts, opts.default_progressive_threshold())
    }

    /// Like [`XzReader::open`], but blocks whose decompressed size exceeds
    /// `threshold` bytes are decoded progressively into a scratch file
    /// instead of being cached in memory.
    pub fn open_with_threshold(
        source: Arc<dyn Source>,
        opts: &Options,
        threshold: u64,
    ) -> Result<XzReader> {
        let file_size = source.size().map_err(Error::io(&opts.name, 0))?;
        let src = source.clone();
        let index = XzIndex::parse_with(&opts.name, file_size, &mut |off, buf| {
            src.read_exact_at(buf, off)
        })?;
        let segs = index
            .blocks
            .iter()
            .map(|b| Segment {
                uoffset: b.uncompressed_offset,
                usize: b.uncompressed_size,
                coffset: b.compressed_offset,
            })
            .collect();
        tracing::debug!(
            "{}: xz, {} streams, {} blocks, {} bytes decompressed",
            opts.name,
            index.streams.len(),
            index.blocks.len(),
            index.uncompressed_size
        );
        let codec = XzCodec {
            source,
            name: opts.name.clone(),
            index,
        };
        Ok(XzReader {
            engine: Engine::new(codec, segs, opts, threshold, HashMap::new()),
        })
    }

    /// The parsed index: streams, blocks and their boundaries.
    pub fn index(&self) -> &XzIndex {
        &self.engine.codec().index
    }
}

crate::engine::random_access_via_engine!(XzReader);

impl Codec for XzCodec {
    fn format(&self) -> &'static str {
        "xz"
    }

    fn open_segment(&self, index: usize, _seg: &Segment) -> Result<Box<dyn StreamDecoder>> {
        let block = record(&self.index.blocks, index, &self.name, "xz", "block")?;
        Ok(Box::new(BlockStream::new(
            self.source.clone(),
            &self.name,
            index,
            block,
        )?))
    }
}

/// Streaming decoder of one block, reading its compressed bytes on demand.
struct BlockStream {
    number: usize,
    block: XzBlock,
    /// Declared before `_lblock`, so the decoder ends before the struct it
    /// points to is freed.
    unit: LzmaUnit,
    /// liblzma's block decoder keeps a pointer to this struct and reads the
    /// check type from it (and writes the final sizes to it) while
    /// decoding, so it lives on the heap at a stable address for as long
    /// as the decoder.
    _lblock: Box<lz::lzma_block>,
}

// SAFETY: `lzma_block` holds raw pointers (its filter chain, cleared after
// setup) only for liblzma, which reads it during `lzma_code` on the thread
// that owns this BlockStream (`&mut self`); nothing else shares it.
unsafe impl Send for BlockStream {}

impl BlockStream {
    fn new(source: Arc<dyn Source>, name: &str, number: usize, block: XzBlock) -> Result<Self> {
        let start = block.compressed_offset;
        let corrupt =
            |reason: String| Error::corrupt(name, "xz", start, format!("block {number}: {reason}"));
        if let XzCheck::Reserved(id) = block.check {
            return Err(Error::unsupported(
                name,
                "xz",
                format!("integrity check type {id}"),
            ));
        }
        let mut first = [0u8; 1];
        read_exact(&source, name, &mut first, start)?;
        if first[0] == 0 {
            return Err(corrupt(
                "index indicator where a block header should be".into(),
            ));
        }
        let header_size = (u32::from(first[0]) + 1) * 4;
        if u64::from(header_size) >= block.unpadded_size {
            return Err(corrupt("block header larger than the block".into()));
        }
        let mut header = vec![0u8; header_size as usize];
        read_exact(&source, name, &mut header, start)?;

        // SAFETY: all-zero is the documented initial state of both structs
        // (LZMA_STREAM_INIT, and lzma_block's reserved fields must be 0).
        let mut strm: lz::lzma_stream = unsafe { std::mem::zeroed() };
        // SAFETY: as above, for lzma_block.
        let mut lblock: Box<lz::lzma_block> = Box::new(unsafe { std::mem::zeroed() });
        let mut filters = [lz::lzma_filter {
            id: lz::LZMA_VLI_UNKNOWN,
            options: std::ptr::null_mut(),
        }; lz::LZMA_FILTERS_MAX as usize + 1];
        lblock.version = 1;
        lblock.header_size = header_size;
        lblock.check = lz::lzma_check::from(block.check.id());
        lblock.filters = filters.as_mut_ptr();

        // SAFETY: `header` holds exactly header_size bytes as the function
        // requires; `filters` has LZMA_FILTERS_MAX + 1 entries.  Filter
        // options it allocates are freed below on every path.
        let ret = unsafe {
            lz::lzma_block_header_decode(&mut *lblock, std::ptr::null(), header.as_ptr())
        };
        let result = (|| {
            match ret {
                lz::LZMA_OK => {}
                lz::LZMA_OPTIONS_ERROR => {
                    return Err(Error::unsupported(
                        name,
                        "xz",
                        format!("block {number} at offset {start}: filter chain"),
                    ))
                }
                _ => return Err(corrupt("invalid block header (CRC32 or fields)".into())),
            }
            for f in filters.iter().take_while(|f| f.id != lz::LZMA_VLI_UNKNOWN) {
                if (f.id == lz::LZMA_FILTER_LZMA2 || f.id == lz::LZMA_FILTER_LZMA1)
                    && !f.options.is_null()
                {
                    // SAFETY: for LZMA1/2 liblzma allocates lzma_options_lzma.
                    let dict = unsafe { (*(f.options as *const lz::lzma_options_lzma)).dict_size };
                    if dict > MAX_DICT {
                        return Err(Error::unsupported(
                            name,
                            "xz",
                            format!(
                                "block {number} at offset {start}: dictionary of {} MiB",
                                dict >> 20
                            ),
                        ));
                    }
                }
            }
            // SAFETY: lblock was filled by lzma_block_header_decode.
            if unsafe { lz::lzma_block_compressed_size(&mut *lblock, block.unpadded_size) }
                != lz::LZMA_OK
            {
                return Err(corrupt("block header sizes disagree with the index".into()));
            }
            if lblock.uncompressed_size != lz::LZMA_VLI_UNKNOWN
                && lblock.uncompressed_size != block.uncompressed_size
            {
                return Err(corrupt("block header sizes disagree with the index".into()));
            }
            // Giving the decoder the index's size makes liblzma verify it.
            lblock.uncompressed_size = block.uncompressed_size;
            // SAFETY: lblock and its filter chain are valid; strm is fresh.
            match unsafe { lz::lzma_block_decoder(&mut strm, &mut *lblock) } {
                lz::LZMA_OK => Ok(()),
                lz::LZMA_MEM_ERROR => Err(Error::oom(name, start)),
                lz::LZMA_OPTIONS_ERROR => Err(Error::unsupported(
                    name,
                    "xz",
                    format!("block {number} at offset {start}: filter options"),
                )),
                r => Err(corrupt(format!("cannot start block decoder ({r})"))),
            }
        })();
        // The decoder keeps its own copy of what it needs from the filter
        // options, so they are freed whether or not it started.
        // SAFETY: options were allocated by liblzma with the default
        // allocator, or are null.
        unsafe { lz::lzma_filters_free(filters.as_mut_ptr(), std::ptr::null()) };
        // The filter array is a local; make sure nothing can follow the
        // pointer to it later.
        lblock.filters = std::ptr::null_mut();
        if let Err(e) = result {
            // SAFETY: strm is zeroed or initialised; lzma_end handles both.
            unsafe { lz::lzma_end(&mut strm) };
            return Err(e);
        }
        Ok(BlockStream {
            number,
            block,
            unit: LzmaUnit::new(
                source,
                name,
                "xz",
                format!("block {number}"),
                strm,
                start + u64::from(header_size)..start + block.total_size(),
                false,
            ),
            _lblock: lblock,
        })
    }
}

impl StreamDecoder for BlockStream {
    fn read(&mut self, out: &mut [u8]) -> Result<usize> {
        let (number, block) = (self.number, self.block);
        self.unit.read(out, |r| {
            if r == lz::LZMA_DATA_ERROR {
                format!(
                    "block {number} (starting at {}): corrupt data, wrong size or {:?} check mismatch",
                    block.compressed_offset, block.check
                )
            } else {
                format!("block {number}: decoder error {r}")
            }
        })
    }
}
