//! A small safe wrapper over zlib-rs' C API (`libz-rs-sys`).
//!
//! We need the low-level entry points that no safe Rust crate exposes
//! together: raw inflate (`windowBits = -15`, we parse gzip framing
//! ourselves), `Z_BLOCK` to stop at deflate block boundaries, and
//! `inflatePrime`/`inflateSetDictionary`/`inflateGetDictionary` to save and
//! restore the decoder at such a boundary.  All `unsafe` is confined here.

use std::os::raw::c_int;

use libz_rs_sys as z;

use super::header::Input;
use super::{Fail, Shared};

/// Size of the deflate history window.
pub const WINDOW: usize = 32 * 1024;

/// Outcome of one `inflate` call.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    pub consumed: usize,
    pub produced: usize,
    pub status: Status,
    /// `z_stream.data_type` after the call (see [`Step::at_block_boundary`]).
    pub data_type: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Progress was made (or no progress possible yet without more input).
    Ok,
    /// The end of the deflate stream was reached.
    StreamEnd,
}

impl Step {
    /// True when the decoder stopped right after the end of a deflate block
    /// that was not the last block of the stream: a place where decoding
    /// can later be resumed given the bit position and the window.
    pub fn at_block_boundary(&self) -> bool {
        self.data_type & 128 != 0 && self.data_type & 64 == 0
    }
    /// Bits the decoder holds that were read from the input but not used.
    /// zlib leaves fewer than 8 here; zlib-rs' bit reader may keep whole
    /// bytes too, so callers must step back `bits / 8` bytes and prime
    /// `bits % 8` bits.
    pub fn unused_bits(&self) -> u32 {
        (self.data_type & 63) as u32
    }
}

/// A raw-deflate decoder.
pub struct Inflater {
    // Boxed: zlib keeps a back-pointer to the stream and checks it on every
    // call, so the z_stream must never move.
    strm: Box<z::z_stream>,
}

// SAFETY: the stream is only reached through `&mut self`; zlib-rs state has
// no thread affinity.
unsafe impl Send for Inflater {}

fn stream_size() -> c_int {
    std::mem::size_of::<z::z_stream>() as c_int
}

impl Inflater {
    /// A raw inflater (no zlib/gzip wrapper).
    pub fn new_raw() -> Result<Self, String> {
        let mut strm = Box::new(z::z_stream::default());
        // SAFETY: strm is a valid default-initialised stream with the
        // library's allocator; version/size come from the library itself.
        let ret = unsafe { z::inflateInit2_(&mut *strm, -15, z::zlibVersion(), stream_size()) };
        if ret != z::Z_OK {
            return Err(format!("inflateInit2 failed ({ret})"));
        }
        Ok(Inflater { strm })
    }

    /// Forget all state, ready for a new raw deflate stream.
    pub fn reset(&mut self) -> Result<(), String> {
        // SAFETY: initialised stream owned by self.
        let ret = unsafe { z::inflateReset(&mut *self.strm) };
        check(ret, "inflateReset")
    }

    /// Feed `bits` (1..=7) low bits of `value` before the next input byte.
    pub fn prime(&mut self, bits: u32, value: u32) -> Result<(), String> {
        // SAFETY: initialised stream owned by self.
        let ret = unsafe { z::inflatePrime(&mut *self.strm, bits as c_int, value as c_int) };
        check(ret, "inflatePrime")
    }

    /// Install the history window (raw streams: right after reset/prime).
    pub fn set_dictionary(&mut self, dict: &[u8]) -> Result<(), String> {
        if dict.is_empty() {
            return Ok(());
        }
        let len = u32::try_from(dict.len()).map_err(|_| "dictionary too large".to_string())?;
        // SAFETY: dict is a valid slice of len bytes; zlib copies it.
        let ret = unsafe { z::inflateSetDictionary(&mut *self.strm, dict.as_ptr(), len) };
        check(ret, "inflateSetDictionary")
    }

    /// Copy the current history window (at most 32 KiB) into `out`.
    pub fn get_dictionary(&mut self, out: &mut Vec<u8>) -> Result<(), String> {
        out.clear();
        out.resize(WINDOW, 0);
        let mut len: u32 = 0;
        // SAFETY: out has WINDOW bytes, the most zlib ever writes here.
        let ret = unsafe { z::inflateGetDictionary(&*self.strm, out.as_mut_ptr(), &mut len) };
        check(ret, "inflateGetDictionary")?;
        out.truncate((len as usize).min(WINDOW));
        Ok(())
    }

    /// Run inflate over `input` into `output`; `block` stops at each
    /// deflate block boundary (`Z_BLOCK`).
    pub fn inflate(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        block: bool,
    ) -> Result<Step, String> {
        let in_len = input.len().min(u32::MAX as usize);
        let out_len = output.len().min(u32::MAX as usize);
        self.strm.next_in = input.as_ptr();
        self.strm.avail_in = in_len as u32;
        self.strm.next_out = output.as_mut_ptr();
        self.strm.avail_out = out_len as u32;
        let flush = if block { z::Z_BLOCK } else { z::Z_NO_FLUSH };
        // SAFETY: next_in/next_out point into live slices of the given
        // lengths for the duration of the call.
        let ret = unsafe { z::inflate(&mut *self.strm, flush) };
        let consumed = in_len - self.strm.avail_in as usize;
        let produced = out_len - self.strm.avail_out as usize;
        let data_type = self.strm.data_type;
        // Don't leave dangling pointers behind.
        self.strm.next_in = std::ptr::null();
        self.strm.avail_in = 0;
        self.strm.next_out = std::ptr::null_mut();
        self.strm.avail_out = 0;
        let status = match ret {
            z::Z_OK | z::Z_BUF_ERROR => Status::Ok,
            z::Z_STREAM_END => Status::StreamEnd,
            z::Z_NEED_DICT => return Err("deflate stream asks for a preset dictionary".into()),
            z::Z_DATA_ERROR => return Err(format!("invalid deflate data: {}", self.msg())),
            z::Z_MEM_ERROR => return Err("out of memory in inflate".into()),
            other => return Err(format!("inflate error {other}")),
        };
        Ok(Step {
            consumed,
            produced,
            status,
            data_type,
        })
    }

    fn msg(&self) -> String {
        if self.strm.msg.is_null() {
            return "unknown".into();
        }
        // SAFETY: zlib sets msg to a static NUL-terminated string.
        unsafe { std::ffi::CStr::from_ptr(self.strm.msg) }
            .to_string_lossy()
            .into_owned()
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        // SAFETY: initialised stream owned by self, ended exactly once.
        unsafe {
            z::inflateEnd(&mut *self.strm);
        }
    }
}

fn check(ret: c_int, what: &str) -> Result<(), String> {
    if ret == z::Z_OK {
        Ok(())
    } else {
        Err(format!("{what} failed ({ret})"))
    }
}

/// Compress a window for storage (zlib format, level 2: zlib-rs' level 1
/// uses static Huffman codes only, which gains nothing on text-like
/// windows).  Returns `None` when compression does not save space, so the
/// caller stores it raw.
pub fn compress_window(raw: &[u8]) -> Option<Vec<u8>> {
    let bound = z::compressBound(raw.len() as _) as usize;
    let mut out = vec![0u8; bound];
    let mut out_len = bound as _;
    // SAFETY: out has `bound` bytes as compressBound requires; raw is valid.
    let ret = unsafe {
        z::compress2(
            out.as_mut_ptr(),
            &mut out_len,
            raw.as_ptr(),
            raw.len() as _,
            2,
        )
    };
    let out_len = out_len as usize;
    if ret != z::Z_OK || out_len >= raw.len() {
        return None;
    }
    out.truncate(out_len);
    Some(out)
}

/// Undo [`compress_window`]; `raw_len` is the exact expected size.
pub fn decompress_window(stored: &[u8], raw_len: usize) -> Result<Vec<u8>, String> {
    if raw_len > WINDOW {
        return Err("window too large".into());
    }
    let mut out = vec![0u8; raw_len];
    let mut out_len = raw_len as _;
    // SAFETY: out has raw_len bytes and out_len says so; stored is valid.
    let ret = unsafe {
        z::uncompress(
            out.as_mut_ptr(),
            &mut out_len,
            stored.as_ptr(),
            stored.len() as _,
        )
    };
    if ret != z::Z_OK || out_len as usize != raw_len {
        return Err(format!("stored window does not decompress ({ret})"));
    }
    Ok(out)
}

/// Position `inf` and `input` at a deflate block boundary: `inp` is the
/// first whole byte after it, `bits` (0..=7) high bits of the byte before
/// are still unread, and `window` is the history before it.
pub(super) fn resume(
    sh: &Shared,
    inf: &mut Inflater,
    input: &mut Input<'_>,
    inp: u64,
    bits: u8,
    window: &[u8],
) -> Result<(), Fail> {
    inf.reset().map_err(|e| sh.fail_corrupt(inp, e))?;
    let bits = bits as u32;
    let at = inp - (bits > 0) as u64;
    input.seek(at);
    if bits > 0 {
        let ok = input.ensure(1).map_err(|e| sh.fail_io(at, e))?;
        let byte = match input.buffered().first() {
            Some(b) if ok => *b as u32,
            _ => return Err(sh.fail_corrupt(at, "checkpoint beyond end of file".into())),
        };
        input.consume(1);
        inf.prime(bits, byte >> (8 - bits))
            .map_err(|e| sh.fail_corrupt(at, e))?;
    }
    inf.set_dictionary(window)
        .map_err(|e| sh.fail_corrupt(inp, e))
}
