//! Decoding one span from a checkpoint.

use super::header::{read_header, Input};
use super::index::{Checkpoint, Kind};
use super::zstream::{resume, Inflater, Status};
use super::{Fail, Shared};

const READ_CHUNK: usize = 128 * 1024;
const DISCARD: usize = 64 * 1024;

/// Decode `[start, end)` of the output, starting at checkpoint `cp`
/// (`cp.out <= start`).  Output before `start` goes through a small
/// scratch buffer, so memory is bounded by `end - start` whatever the
/// distance from the checkpoint.  CRCs were checked by the index walk, so
/// they are not checked again here.
pub(super) fn decode(sh: &Shared, cp: &Checkpoint, start: u64, end: u64) -> Result<Vec<u8>, Fail> {
    let mut inf = Inflater::new_raw().map_err(|e| sh.fail_corrupt(cp.inp, e))?;
    let mut input = Input::new(&*sh.source, sh.comp_size, cp.inp, READ_CHUNK);
    match &cp.kind {
        Kind::Member => {
            read_header(sh, &mut input)?;
        }
        Kind::Deflate { bits, window } => {
            let w = window
                .raw()
                .map_err(|e| sh.fail_corrupt(cp.inp, format!("saved index: {e}")))?;
            resume(sh, &mut inf, &mut input, cp.inp, *bits, &w)?;
        }
    }
    let len =
        usize::try_from(end - start).map_err(|_| sh.fail_unsupported("span too large".into()))?;
    let mut buf = vec![0u8; len];
    let mut scratch = vec![0u8; DISCARD.min((start - cp.out) as usize)];
    let mut out = cp.out;
    while out < end {
        let off = input.offset();
        let avail = input.available().map_err(|e| sh.fail_io(off, e))?;
        if avail.is_empty() {
            return Err(sh.fail_corrupt(off, "unexpected end of file inside deflate data".into()));
        }
        let dst = if out < start {
            let n = (start - out).min(DISCARD as u64) as usize;
            &mut scratch[..n]
        } else {
            &mut buf[(out - start) as usize..]
        };
        let step = inf
            .inflate(avail, dst, false)
            .map_err(|e| sh.fail_corrupt(off, e))?;
        input.consume(step.consumed);
        out += step.produced as u64;
        if step.status == Status::StreamEnd {
            if out >= end {
                break;
            }
            // Next member: skip the trailer (checked by the walk).
            let t = input.offset();
            if !input.ensure(8).map_err(|e| sh.fail_io(t, e))? {
                return Err(sh.fail_corrupt(t, "truncated gzip member trailer".into()));
            }
            input.consume(8);
            read_header(sh, &mut input)?;
            inf.reset().map_err(|e| sh.fail_corrupt(t, e))?;
        } else if step.consumed == 0 && step.produced == 0 {
            return Err(sh.fail_corrupt(off, "deflate decoder made no progress".into()));
        }
    }
    Ok(buf)
}
