//! The background walk that builds the index: decodes every member once,
//! verifies CRC32 and ISIZE, picks checkpoints, finds zero chunks, and
//! publishes progress (the "frontier") so readers can proceed behind it.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Mutex};

use super::header::{is_gzip_magic, parse_header, Header, HeaderError, Input, MAX_HEADER};
use super::index::{zero_parts, Emitter, ZeroTracker};
use super::zstream::{Inflater, Status};
use super::{Fail, Shared};

const READ_CHUNK: usize = 256 * 1024;
/// Publish progress at least this often (in output bytes) inside a member.
const PUBLISH_EVERY: u64 = 256 * 1024;
/// BGZF batches handed to one worker: bounded in compressed bytes and in
/// members (BGZF members hold at most 64 KiB each).
const BGZF_BATCH_BYTES: usize = 4 << 20;
const BGZF_BATCH_MEMBERS: usize = 1024;

/// Walk the whole file; returns the decompressed size.
pub(super) fn walk(sh: &Shared) -> Result<u64, Fail> {
    let mut w = Walker {
        sh,
        em: Emitter::new(sh.span),
        zt: ZeroTracker::default(),
        out: 0,
        last_pub: 0,
    };
    let mut input = Input::new(&*sh.source, sh.comp_size, 0, READ_CHUNK);
    let mut inf = Inflater::new_raw().map_err(|e| sh.fail_corrupt(0, e))?;
    let mut obuf = vec![0u8; READ_CHUNK];
    loop {
        let member_off = input.offset();
        let hdr = read_header(sh, &mut input)?;
        // BGZF members say their own size: find them without decoding and
        // verify them in parallel.  If not even the first one is a sound
        // BGZF member, decode it the ordinary way, which reports the damage.
        let bgzf_end = match hdr.bgzf_bsize {
            Some(_) => Some(w.bgzf(member_off)?).filter(|&(off, _)| off > member_off),
            None => None,
        };
        if let Some((off, out)) = bgzf_end {
            w.out = out;
            input = Input::new(&*sh.source, sh.comp_size, off, READ_CHUNK);
        } else {
            w.member(&mut input, &mut inf, &mut obuf, member_off)?;
        }
        // What follows a member: another member, the end, or padding.
        input.ensure(2).map_err(|e| sh.fail_io(input.offset(), e))?;
        let next = input.buffered();
        if next.is_empty() {
            break;
        }
        if is_gzip_magic(next) {
            continue;
        }
        check_trailing(sh, &mut input)?;
        break;
    }
    let total = w.out;
    w.em.finish(total).map_err(|e| sh.fail_unsupported(e))?;
    w.zt.finish();
    w.publish(total, true);
    Ok(total)
}

/// Like `gzip -d`, zero bytes after the last member are accepted as padding
/// (tape blocking, preallocated files).  Anything else there is rejected:
/// garbage after an image more likely means a damaged or truncated copy
/// than something to ignore silently.
fn check_trailing(sh: &Shared, input: &mut Input<'_>) -> Result<(), Fail> {
    loop {
        let off = input.offset();
        let avail = input.available().map_err(|e| sh.fail_io(off, e))?;
        if avail.is_empty() {
            return Ok(());
        }
        if let Some(i) = avail.iter().position(|&b| b != 0) {
            return Err(sh.fail_corrupt(
                off + i as u64,
                "trailing garbage after the last gzip member".into(),
            ));
        }
        let n = avail.len();
        input.consume(n);
    }
}

/// Parse (and consume) the member header at the input position.
pub(super) fn read_header(sh: &Shared, input: &mut Input<'_>) -> Result<Header, Fail> {
    let off = input.offset();
    let mut want = 512;
    loop {
        let full = input.ensure(want).map_err(|e| sh.fail_io(off, e))?;
        match parse_header(input.buffered()) {
            Ok(h) => {
                input.consume(h.len);
                return Ok(h);
            }
            Err(HeaderError::Short) if full && want < MAX_HEADER => want *= 4,
            Err(HeaderError::Short) => {
                return Err(sh.fail_corrupt(off, "truncated gzip member header".into()))
            }
            Err(HeaderError::Bad(i, reason)) => return Err(sh.fail_corrupt(off + i as u64, reason)),
        }
    }
}

struct Walker<'a> {
    sh: &'a Shared,
    em: Emitter,
    zt: ZeroTracker,
    out: u64,
    last_pub: u64,
}

impl Walker<'_> {
    fn publish(&mut self, frontier: u64, done: bool) {
        self.last_pub = frontier;
        let cps = std::mem::take(&mut self.em.fresh);
        let zeros = self.zt.take_fresh();
        let open = self.zt.open_run();
        self.sh.publish(cps, zeros, open, frontier, done);
    }

    fn point(&mut self, out: u64, inp: u64) -> Result<(), Fail> {
        if self
            .em
            .advance(out)
            .map_err(|e| self.sh.fail_unsupported(e))?
        {
            self.em
                .set_pending(out, inp, 0, false, |_| Ok(()))
                .map_err(|e| self.sh.fail_unsupported(e))?;
        }
        Ok(())
    }

    /// Decode one ordinary member (header already consumed).
    fn member(
        &mut self,
        input: &mut Input<'_>,
        inf: &mut Inflater,
        obuf: &mut [u8],
        member_off: u64,
    ) -> Result<(), Fail> {
        let sh = self.sh;
        self.point(self.out, member_off)?;
        inf.reset().map_err(|e| sh.fail_corrupt(member_off, e))?;
        let mut crc = crc32fast::Hasher::new();
        let mut len = 0u64;
        loop {
            if sh.stop.load(Ordering::Relaxed) {
                return Err(sh.fail_unsupported("reader closed".into()));
            }
            let off = input.offset();
            let avail = input.available().map_err(|e| sh.fail_io(off, e))?;
            if avail.is_empty() {
                return Err(
                    sh.fail_corrupt(off, "unexpected end of file inside deflate data".into())
                );
            }
            let step = inf
                .inflate(avail, obuf, true)
                .map_err(|e| sh.fail_corrupt(off, e))?;
            input.consume(step.consumed);
            let data = &obuf[..step.produced];
            crc.update(data);
            self.zt.feed(self.out, data);
            self.out += data.len() as u64;
            len += data.len() as u64;
            if step.status == Status::StreamEnd {
                break;
            }
            if step.at_block_boundary() {
                let nbits = step.unused_bits();
                let inp = input.offset() - (nbits / 8) as u64;
                let bits = (nbits % 8) as u8;
                let out = self.out;
                if self.em.advance(out).map_err(|e| sh.fail_unsupported(e))? {
                    self.em
                        .set_pending(out, inp, bits, true, |w| inf.get_dictionary(w))
                        .map_err(|e| sh.fail_corrupt(inp, e))?;
                }
                if out - self.last_pub >= PUBLISH_EVERY {
                    self.publish(out, false);
                }
            } else if step.consumed == 0 && step.produced == 0 {
                // Input and output space were both offered; no progress
                // means the stream cannot continue.
                return Err(sh.fail_corrupt(off, "deflate decoder made no progress".into()));
            }
        }
        let off = input.offset();
        if !input.ensure(8).map_err(|e| sh.fail_io(off, e))? {
            return Err(sh.fail_corrupt(off, "truncated gzip member trailer".into()));
        }
        let t = input.buffered();
        let want_crc = u32::from_le_bytes([t[0], t[1], t[2], t[3]]);
        let want_len = u32::from_le_bytes([t[4], t[5], t[6], t[7]]);
        let got_crc = crc.finalize();
        if got_crc != want_crc {
            return Err(sh.fail_corrupt(
                off,
                format!("CRC32 mismatch in member at {member_off}: stored {want_crc:08x}, data {got_crc:08x}"),
            ));
        }
        // ISIZE is the length mod 2^32 only, per member: it checks the
        // member but cannot give the size of a multi-GiB image.
        if len as u32 != want_len {
            return Err(sh.fail_corrupt(
                off + 4,
                format!("length mismatch in member at {member_off}: stored {want_len}, data {len} (mod 2^32)"),
            ));
        }
        input.consume(8);
        // The next resumable point is the next member's start, at `out`,
        // so marks below it can be settled now.
        let out = self.out;
        self.em.advance(out).map_err(|e| sh.fail_unsupported(e))?;
        self.publish(out, false);
        Ok(())
    }

    /// Index a run of BGZF members starting at `off`; returns the position
    /// and output offset after the run (at the first member that is not
    /// BGZF, or at what follows the last member).
    ///
    /// This thread scans member headers (cheap: BSIZE gives each member's
    /// length) and cuts batches; `threads` workers decode and verify them
    /// in parallel; results are committed (checkpoints, zero runs,
    /// frontier) strictly in file order.  At most two batches per worker
    /// are in flight, which bounds memory.
    fn bgzf(&mut self, off: u64) -> Result<(u64, u64), Fail> {
        let sh = self.sh;
        let (mut off, mut out) = (off, self.out);
        if sh.threads == 0 {
            loop {
                let b = scan_batch(sh, off, out)?;
                (off, out) = (b.end_off, b.end_out);
                if !b.members.is_empty() {
                    let parts = verify_batch(sh, &b)?;
                    self.commit(&b, parts)?;
                }
                if sh.stop.load(Ordering::Relaxed) {
                    return Err(sh.fail_unsupported("reader closed".into()));
                }
                if !b.full {
                    return Ok((off, out));
                }
            }
        }
        let workers = sh.threads;
        type Verdict = Result<Vec<(u64, bool)>, Fail>;
        type Done = (u64, Batch, Verdict);
        let (job_tx, job_rx) = mpsc::sync_channel::<(u64, Batch)>(workers);
        let job_rx = Mutex::new(job_rx);
        let (res_tx, res_rx) = mpsc::channel::<Done>();
        std::thread::scope(|s| {
            for _ in 0..workers {
                let (res_tx, job_rx) = (res_tx.clone(), &job_rx);
                s.spawn(move || loop {
                    let job = job_rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok((seq, b)) = job else { break };
                    // A panic must become an error: the committer waits
                    // for every sequence number.
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        verify_batch(sh, &b)
                    }))
                    .unwrap_or_else(|_| Err(sh.fail_unsupported("BGZF worker panicked".into())));
                    if res_tx.send((seq, b, r)).is_err() {
                        break;
                    }
                });
            }
            drop(res_tx);
            let (mut sent, mut next) = (0u64, 0u64);
            let mut ready: BTreeMap<u64, (Batch, Verdict)> = BTreeMap::new();
            let mut scanning = true;
            let result = loop {
                let mut scan_err = None;
                while scanning && sent - next < 2 * workers as u64 {
                    let b = match scan_batch(sh, off, out) {
                        Ok(b) => b,
                        Err(e) => {
                            scan_err = Some(e);
                            break;
                        }
                    };
                    (off, out) = (b.end_off, b.end_out);
                    scanning = b.full && !sh.stop.load(Ordering::Relaxed);
                    if !b.members.is_empty() {
                        if job_tx.send((sent, b)).is_err() {
                            scanning = false;
                            break;
                        }
                        sent += 1;
                    }
                }
                if let Some(e) = scan_err {
                    break Err(e);
                }
                if next == sent {
                    break if sh.stop.load(Ordering::Relaxed) {
                        Err(sh.fail_unsupported("reader closed".into()))
                    } else {
                        Ok((off, out))
                    };
                }
                let Ok((seq, b, r)) = res_rx.recv() else {
                    break Err(sh.fail_unsupported("BGZF workers stopped".into()));
                };
                ready.insert(seq, (b, r));
                let mut failed = None;
                while let Some((b, r)) = ready.remove(&next) {
                    next += 1;
                    if let Err(e) = r.and_then(|parts| self.commit(&b, parts)) {
                        failed = Some(e);
                        break;
                    }
                }
                if let Some(e) = failed {
                    break Err(e);
                }
            };
            // Let the workers run dry and exit so the scope can end.
            drop(job_tx);
            result
        })
    }

    /// Record a verified batch: its member starts as resumable points, its
    /// zero chunks, and the new frontier.
    fn commit(&mut self, b: &Batch, parts: Vec<(u64, bool)>) -> Result<(), Fail> {
        for m in &b.members {
            self.point(m.out, m.off)?;
        }
        for (chunk, zero) in parts {
            self.zt.part(chunk, zero);
        }
        self.out = b.end_out;
        let end = b.end_out;
        self.em
            .advance(end)
            .map_err(|e| self.sh.fail_unsupported(e))?;
        self.publish(end, false);
        Ok(())
    }
}

struct Member {
    off: u64,
    out: u64,
    /// Deflate data within the batch buffer.
    data: std::ops::Range<usize>,
    crc: u32,
    isize: u32,
}

struct Batch {
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    start: u64,
    members: Vec<Member>,
    end_off: u64,
    end_out: u64,
    /// False when the scan stopped at something that is not a complete
    /// BGZF member (end of file, padding, another kind of member, damage):
    /// the sequential walk takes over there and reports it properly.
    full: bool,
}

fn scan_batch(sh: &Shared, off: u64, mut out: u64) -> Result<Batch, Fail> {
    let len = (sh.comp_size.saturating_sub(off)).min(BGZF_BATCH_BYTES as u64) as usize;
    let mut buf = vec![0u8; len];
    sh.source
        .read_exact_at(&mut buf, off)
        .map_err(|e| sh.fail_io(off, e))?;
    let mut members = Vec::new();
    let mut pos = 0usize;
    // Whether the scan stopped only because the buffer ended before the
    // file did (so the next batch continues from here).
    let mut cut = false;
    while members.len() < BGZF_BATCH_MEMBERS {
        let rest = &buf[pos..];
        let fits_file = |n: usize| off + (pos + n) as u64 <= sh.comp_size;
        let h = match parse_header(rest) {
            Ok(h) => h,
            Err(HeaderError::Short) => {
                cut = fits_file(rest.len() + 1);
                break;
            }
            Err(HeaderError::Bad(..)) => break,
        };
        let Some(bsize) = h.bgzf_bsize else { break };
        let total = bsize as usize + 1;
        if total < h.len + 8 {
            break;
        }
        if total > rest.len() {
            cut = fits_file(total);
            break;
        }
        let t = &rest[total - 8..total];
        let crc = u32::from_le_bytes([t[0], t[1], t[2], t[3]]);
        let isize = u32::from_le_bytes([t[4], t[5], t[6], t[7]]);
        members.push(Member {
            off: off + pos as u64,
            out,
            data: pos + h.len..pos + total - 8,
            crc,
            isize,
        });
        out += isize as u64;
        pos += total;
    }
    if members.len() == BGZF_BATCH_MEMBERS {
        cut = true;
    }
    buf.truncate(pos);
    Ok(Batch {
        buf,
        start: off,
        members,
        end_off: off + pos as u64,
        end_out: out,
        full: cut && pos > 0,
    })
}

/// Decode and check every member of a batch; returns the zero verdicts.
fn verify_batch(sh: &Shared, b: &Batch) -> Result<Vec<(u64, bool)>, Fail> {
    let mut inf = Inflater::new_raw().map_err(|e| sh.fail_corrupt(0, e))?;
    let mut obuf = vec![0u8; 64 * 1024];
    let mut parts: Vec<(u64, bool)> = Vec::new();
    for m in &b.members {
        inf.reset().map_err(|e| sh.fail_corrupt(m.off, e))?;
        let mut data = &b.buf[m.data.clone()];
        let mut crc = crc32fast::Hasher::new();
        let mut len = 0u64;
        let data_off = b.start + m.data.start as u64;
        loop {
            let at = data_off + (m.data.len() - data.len()) as u64;
            let step = inf
                .inflate(data, &mut obuf, false)
                .map_err(|e| sh.fail_corrupt(at, e))?;
            data = &data[step.consumed..];
            let out = &obuf[..step.produced];
            crc.update(out);
            zero_parts(
                m.out + len,
                out,
                &mut |chunk, zero| match parts.last_mut() {
                    Some((c, z)) if *c == chunk => *z &= zero,
                    _ => parts.push((chunk, zero)),
                },
            );
            len += out.len() as u64;
            if step.status == Status::StreamEnd {
                break;
            }
            if step.consumed == 0 && step.produced == 0 {
                return Err(sh.fail_corrupt(at, "BGZF member's deflate data is truncated".into()));
            }
        }
        let trailer = b.start + m.data.end as u64;
        if !data.is_empty() {
            return Err(sh.fail_corrupt(
                trailer - data.len() as u64,
                "BGZF block size disagrees with deflate data".into(),
            ));
        }
        let got = crc.finalize();
        if got != m.crc {
            return Err(sh.fail_corrupt(
                trailer,
                format!(
                    "CRC32 mismatch in member at {}: stored {:08x}, data {got:08x}",
                    m.off, m.crc
                ),
            ));
        }
        // BGZF members are at most 64 KiB, so ISIZE must match exactly:
        // output offsets were computed from it before decoding.
        if len != m.isize as u64 {
            return Err(sh.fail_corrupt(
                trailer + 4,
                format!(
                    "length mismatch in member at {}: stored {}, data {len}",
                    m.off, m.isize
                ),
            ));
        }
    }
    Ok(parts)
}
