//! One liblzma decoder fed with exactly one unit's compressed bytes (an
//! xz block, an lzip member), read from the source on demand: the input
//! refill, the `lzma_code` call and the end-of-unit checks that the xz
//! and lzip readers share.  Each reader sets up its own decoder and
//! words its own errors.

use std::sync::Arc;

use liblzma_sys as lz;

use crate::progressive::Input;
use crate::{Error, Result, Source};

/// Input read from the source per refill.
const INPUT_STEP: u64 = 64 << 10;

pub(crate) struct LzmaUnit {
    name: String,
    format: &'static str,
    /// What the unit is called in messages ("block 3", "member 0").
    label: String,
    strm: lz::lzma_stream,
    input: Input,
    /// Tell liblzma when the last input byte has been given, so that the
    /// decoder (lzip's) can say whether the unit is complete.
    finish_at_end: bool,
    done: bool,
}

// SAFETY: `lzma_stream` holds raw pointers into liblzma's private state and
// into our own buffers only during `lzma_code`; it has no thread affinity,
// and an LzmaUnit is used by one thread at a time (`&mut self`).
unsafe impl Send for LzmaUnit {}

impl Drop for LzmaUnit {
    fn drop(&mut self) {
        // SAFETY: the stream was initialised by the caller's decoder setup
        // (or is still zeroed); lzma_end handles both.
        unsafe { lz::lzma_end(&mut self.strm) };
    }
}

impl LzmaUnit {
    /// Take over `strm` (a decoder already set up) for the compressed
    /// bytes `range` of `source`.
    pub(crate) fn new(
        source: Arc<dyn Source>,
        name: &str,
        format: &'static str,
        label: String,
        strm: lz::lzma_stream,
        range: std::ops::Range<u64>,
        finish_at_end: bool,
    ) -> Self {
        LzmaUnit {
            name: name.to_string(),
            format,
            label,
            strm,
            input: Input::new(source, name, range, INPUT_STEP),
            finish_at_end,
            done: false,
        }
    }

    fn corrupt(&self, offset: u64, reason: String) -> Error {
        Error::corrupt(&self.name, self.format, offset, reason)
    }

    /// Decode into `out`; `Ok(0)` once the unit has ended and liblzma's
    /// checks passed.  `failed` words a decoder error (`lzma_ret`).
    pub(crate) fn read(
        &mut self,
        out: &mut [u8],
        failed: impl Fn(lz::lzma_ret) -> String,
    ) -> Result<usize> {
        if self.done || out.is_empty() {
            return Ok(0);
        }
        loop {
            let input = self.input.fill()?;
            let avail_in = input.len();
            self.strm.next_in = input.as_ptr();
            self.strm.avail_in = avail_in;
            self.strm.next_out = out.as_mut_ptr();
            self.strm.avail_out = out.len();
            let action = if self.finish_at_end && self.input.all_read() {
                lz::LZMA_FINISH
            } else {
                lz::LZMA_RUN
            };
            // SAFETY: next_in/next_out point into live buffers of the sizes
            // given; the pointers are cleared right after the call.
            let ret = unsafe { lz::lzma_code(&mut self.strm, action) };
            let used = avail_in - self.strm.avail_in;
            let produced = out.len() - self.strm.avail_out;
            self.input.consume(used);
            self.strm.next_in = std::ptr::null();
            self.strm.next_out = std::ptr::null_mut();
            // Offset of the input being decoded, for messages.
            let at = self.input.offset();
            match ret {
                lz::LZMA_OK => {}
                lz::LZMA_STREAM_END => {
                    if !self.input.is_done() {
                        return Err(self
                            .corrupt(at, format!("{} ends before its recorded size", self.label)));
                    }
                    self.done = true;
                    return Ok(produced);
                }
                lz::LZMA_MEM_ERROR => return Err(Error::oom(&self.name, at)),
                r => return Err(self.corrupt(at, failed(r))),
            }
            if produced > 0 {
                return Ok(produced);
            }
            if used == 0 && self.input.is_done() {
                let end = self.input.end();
                return Err(self.corrupt(end, format!("{} is truncated", self.label)));
            }
        }
    }
}
