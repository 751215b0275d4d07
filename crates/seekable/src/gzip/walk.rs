//! The background walk that builds the index: decodes every member once,
//! verifies CRC32 and ISIZE, picks checkpoints, finds zero chunks, and
//! publishes progress (the "frontier") so readers can proceed behind it.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

use super::header::{is_gzip_magic, parse_header, read_header, HeaderError, Input};
use super::index::{zero_parts, Emitter, ZeroTracker};
use super::spec::{self, Decoded, Refused, Segment};
use super::zstream::{resume, Inflater, Status, WINDOW};
use super::{Fail, Shared};
use crate::pool::Pool;

const READ_CHUNK: usize = 256 * 1024;
/// Publish progress at least this often (in output bytes) inside a member.
const PUBLISH_EVERY: u64 = 256 * 1024;
/// Compressed bytes of a member decoded serially before looking for
/// independent pieces: small members are not worth the threads.
const SPEC_AFTER: u64 = 1 << 20;
/// BGZF batches handed to one worker: bounded in compressed bytes and in
/// members (BGZF members hold at most 64 KiB each).
const BGZF_BATCH_BYTES: usize = 4 << 20;
const BGZF_BATCH_MEMBERS: usize = 1024;

/// Walk the whole file; returns the decompressed size.
pub(super) fn walk(sh: &Arc<Shared>) -> Result<u64, Fail> {
    let mut w = Walker {
        sh,
        pool: None,
        em: Emitter::new(sh.span),
        zt: ZeroTracker::default(),
        out: 0,
        last_pub: 0,
        obuf: vec![0u8; READ_CHUNK],
    };
    let mut input = Input::new(&*sh.source, sh.comp_size, 0, READ_CHUNK);
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
            input = w.member(input, member_off)?;
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

struct Walker<'a> {
    sh: &'a Arc<Shared>,
    /// Inflates independent pieces and BGZF batches in parallel; started
    /// when first needed, joined when the walk ends.
    pool: Option<Arc<Pool>>,
    em: Emitter,
    zt: ZeroTracker,
    out: u64,
    last_pub: u64,
    obuf: Vec<u8>,
}

/// A deflate block boundary: `inp` is the first whole byte after it,
/// `bits` (0..=7) high bits of the byte before are still unread, and
/// `window` is the history (up to 32 KiB) before it.
struct Resume {
    inp: u64,
    bits: u8,
    window: Vec<u8>,
}

/// Decoding state of the member being walked.
struct MemberState<'a> {
    /// Where the committed decoding is (always a resumable point already
    /// offered to the emitter).
    pos: Resume,
    /// The serial decoder and its input (the walk's, so what it buffered
    /// past the member serves what follows).
    inf: Inflater,
    input: Input<'a>,
    /// `inf` and `input` are at `pos` (after serial decoding); false after
    /// a committed segment, when they are set up again from `pos`.
    live: bool,
    crc: crc32fast::Hasher,
    len: u64,
}

#[derive(Clone, Copy)]
enum Until {
    /// The end of the deflate stream.
    End,
    /// The first block boundary at or past this compressed offset.
    Past(u64),
    /// A block boundary exactly at this byte-aligned offset, or the first
    /// one past it.
    Land(u64),
}

enum Stop {
    Landed,
    Passed,
    /// The deflate stream ended; the trailer starts here.
    StreamEnd(u64),
}

static ZERO_WINDOW: [u8; WINDOW] = [0; WINDOW];

/// `dst` = the last [`WINDOW`] bytes of `prior` followed by `tail`.
fn join_window(prior: &[u8], tail: &[u8], dst: &mut Vec<u8>) {
    dst.clear();
    if tail.len() < WINDOW {
        let keep = (WINDOW - tail.len()).min(prior.len());
        dst.extend_from_slice(&prior[prior.len() - keep..]);
        dst.extend_from_slice(tail);
    } else {
        dst.extend_from_slice(&tail[tail.len() - WINDOW..]);
    }
}

impl<'a> Walker<'a> {
    /// The walk's pool: this thread mostly waits for results and commits
    /// them, so one worker more than `threads` keeps every core busy.
    fn pool(&mut self) -> Arc<Pool> {
        let sh = self.sh;
        self.pool
            .get_or_insert_with(|| {
                let workers = sh.threads + 1;
                Arc::new(Pool::new(workers, 2 * workers, "gzip-walk", &sh.name))
            })
            .clone()
    }

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

    /// Decode one ordinary member whose header (at `member_off`) `input`
    /// has just consumed; returns the input positioned after its trailer.
    ///
    /// Serial decoding until `SPEC_AFTER` compressed bytes in; after that,
    /// if the member turns out to be written in independent pieces
    /// (`pigz -i`), the pieces are inflated in parallel (see [`spec`]).
    fn member(&mut self, input: Input<'a>, member_off: u64) -> Result<Input<'a>, Fail> {
        let sh = self.sh;
        self.point(self.out, member_off)?;
        let data_off = input.offset();
        let mut m = MemberState {
            pos: Resume {
                inp: data_off,
                bits: 0,
                window: Vec::new(),
            },
            inf: Inflater::new_raw().map_err(|e| sh.fail_corrupt(data_off, e))?,
            input,
            live: true,
            crc: crc32fast::Hasher::new(),
            len: 0,
        };
        let end = if sh.threads == 0 {
            self.serial(&mut m, Until::End)?
        } else {
            match self.serial(&mut m, Until::Past(data_off + SPEC_AFTER))? {
                Stop::StreamEnd(end) => Stop::StreamEnd(end),
                _ => self.speculate(&mut m)?,
            }
        };
        let Stop::StreamEnd(off) = end else {
            unreachable!("member decoding stops only at the end of its stream")
        };
        let mut input = m.input;
        input.seek(off);
        if !input.ensure(8).map_err(|e| sh.fail_io(off, e))? {
            return Err(sh.fail_corrupt(off, "truncated gzip member trailer".into()));
        }
        let t = input.buffered();
        let want_crc = u32::from_le_bytes([t[0], t[1], t[2], t[3]]);
        let want_len = u32::from_le_bytes([t[4], t[5], t[6], t[7]]);
        let got_crc = m.crc.finalize();
        if got_crc != want_crc {
            return Err(sh.fail_corrupt(
                off,
                format!("CRC32 mismatch in member at {member_off}: stored {want_crc:08x}, data {got_crc:08x}"),
            ));
        }
        // ISIZE is the length mod 2^32 only, per member: it checks the
        // member but cannot give the size of a multi-GiB image.
        if m.len as u32 != want_len {
            return Err(sh.fail_corrupt(
                off + 4,
                format!(
                    "length mismatch in member at {member_off}: stored {want_len}, data {} (mod 2^32)",
                    m.len
                ),
            ));
        }
        input.consume(8);
        // The next resumable point is the next member's start, at `out`,
        // so marks below it can be settled now.
        let out = self.out;
        self.em.advance(out).map_err(|e| sh.fail_unsupported(e))?;
        self.publish(out, false);
        sh.member_verified(out);
        Ok(input)
    }

    /// Decode serially from `m.pos` until `until` (checked at deflate
    /// block boundaries) or the end of the deflate stream.
    fn serial(&mut self, m: &mut MemberState<'a>, until: Until) -> Result<Stop, Fail> {
        let mut obuf = std::mem::take(&mut self.obuf);
        let r = self.serial_with(m, until, &mut obuf);
        self.obuf = obuf;
        r
    }

    fn serial_with(
        &mut self,
        m: &mut MemberState<'a>,
        until: Until,
        obuf: &mut [u8],
    ) -> Result<Stop, Fail> {
        let sh = self.sh;
        let (inf, input) = (&mut m.inf, &mut m.input);
        if !m.live {
            let p = &m.pos;
            resume(sh, inf, input, p.inp, p.bits, &p.window)?;
            m.live = true;
        }
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
            m.crc.update(data);
            self.zt.feed(self.out, data);
            self.out += data.len() as u64;
            m.len += data.len() as u64;
            if step.status == Status::StreamEnd {
                return Ok(Stop::StreamEnd(input.offset()));
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
                let at = inp * 8 - bits as u64;
                let stop = match until {
                    Until::End => None,
                    Until::Past(x) => (at >= x * 8).then_some(Stop::Passed),
                    Until::Land(x) if at == x * 8 => Some(Stop::Landed),
                    Until::Land(x) => (at > x * 8).then_some(Stop::Passed),
                };
                if let Some(stop) = stop {
                    inf.get_dictionary(&mut m.pos.window)
                        .map_err(|e| sh.fail_corrupt(inp, e))?;
                    (m.pos.inp, m.pos.bits) = (inp, bits);
                    return Ok(stop);
                }
            } else if step.consumed == 0 && step.produced == 0 {
                // Input and output space were both offered; no progress
                // means the stream cannot continue.
                return Err(sh.fail_corrupt(off, "deflate decoder made no progress".into()));
            }
        }
    }

    /// The rest of a member, from a block boundary at `m.pos`: segments
    /// between flush markers are inflated by workers from a fresh state
    /// and committed in order where they prove independent; the stretches
    /// in between are decoded serially.  Stops at the end of the stream.
    fn speculate(&mut self, m: &mut MemberState<'a>) -> Result<Stop, Fail> {
        let sh = self.sh;
        let pool = self.pool();
        let workers = sh.threads + 1;
        let quit = Arc::new(AtomicBool::new(false));
        let (res_tx, res_rx) = mpsc::channel::<Done<Segment, Result<Decoded, Refused>>>();
        let mut scan = spec::Scanner::new(m.pos.inp);
        let mut queue: VecDeque<(u64, u64, u64)> = VecDeque::new();
        let mut ready: BTreeMap<u64, (Segment, Result<Decoded, Refused>)> = BTreeMap::new();
        let mut seq = 0u64;
        let mut fails = 0u32;
        // For the debug log: segments committed, refused as dependent,
        // refused as too large, dropped as stale.
        let mut tally = [0u32; 4];
        let t0 = std::time::Instant::now();
        let result = loop {
            if sh.stop.load(Ordering::Relaxed) {
                break Err(sh.fail_unsupported("reader closed".into()));
            }
            let pos = m.pos.inp * 8 - m.pos.bits as u64;
            if scan.active && scan.pos * 8 < pos {
                // The walk went past everything scanned (serial
                // stretches): look again from where it is.
                scan.restart(m.pos.inp);
            }
            let mut scan_err = None;
            while scan.active && queue.len() < 2 * workers {
                match scan.next(sh) {
                    Ok(Some(seg)) => {
                        let (start, end) = (seg.start, seg.end());
                        let (quit, span) = (quit.clone(), sh.span);
                        let work = move |seg: &Segment| spec::decode_segment(seg, span, &quit);
                        if !submit(&pool, seq, seg, &res_tx, work) {
                            scan.active = false;
                            break;
                        }
                        queue.push_back((seq, start, end));
                        seq += 1;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        scan_err = Some(e);
                        break;
                    }
                }
            }
            if let Some(e) = scan_err {
                break Err(e);
            }
            let Some(&(q, start, end)) = queue.front() else {
                break self.serial(m, Until::End);
            };
            if start * 8 > pos {
                match self.serial(m, Until::Land(start)) {
                    Ok(Stop::Landed | Stop::Passed) => continue,
                    other => break other,
                }
            }
            queue.pop_front();
            if start * 8 < pos {
                // Stale: the walk is past its start.  Its result, when
                // it comes, is dropped (below the queue's front).
                ready.remove(&q);
                tally[3] += 1;
                continue;
            }
            let got = loop {
                if let Some(r) = ready.remove(&q) {
                    break Some(r);
                }
                match res_rx.recv() {
                    Ok((n, seg, d)) if n >= q => {
                        // Speculation is only ever an optimisation: a
                        // panic means "decode it serially".
                        ready.insert(n, (seg, d.unwrap_or(Err(Refused::Dependent))));
                    }
                    Ok(_) => {}
                    Err(_) => break None,
                }
            };
            let Some((seg, d)) = got else {
                break Err(sh.fail_unsupported("gzip workers stopped".into()));
            };
            match d {
                Ok(d) => {
                    fails = 0;
                    tally[0] += 1;
                    let stream_end = d.stream_end.then_some(d.end);
                    if let Err(e) = self.commit_segment(m, &seg, d) {
                        break Err(e);
                    }
                    if let Some(off) = stream_end {
                        break Ok(Stop::StreamEnd(off));
                    }
                }
                Err(why) => {
                    if why == Refused::Dependent {
                        fails += 1;
                        tally[1] += 1;
                    } else {
                        tally[2] += 1;
                    }
                    if fails >= spec::MAX_FAILS {
                        scan.active = false;
                    }
                    match self.serial(m, Until::Land(end)) {
                        Ok(Stop::Landed | Stop::Passed) => {}
                        other => break other,
                    }
                }
            }
        };
        tracing::debug!(
            name = %sh.name,
            committed = tally[0],
            dependent = tally[1],
            too_large = tally[2],
            stale = tally[3],
            secs = t0.elapsed().as_secs_f64(),
            "gzip member pieces inflated in parallel"
        );
        // Pieces still queued or being inflated are of no use now.
        quit.store(true, Ordering::Relaxed);
        result
    }

    /// Record a segment a worker decoded independently, starting at the
    /// walk's position: its checkpoints, zero chunks, CRC and length.
    fn commit_segment(
        &mut self,
        m: &mut MemberState<'a>,
        seg: &Segment,
        d: Decoded,
    ) -> Result<(), Fail> {
        let sh = self.sh;
        let base = self.out;
        let prior = &m.pos.window;
        // Windows are the true history: what came before the segment
        // followed by the segment's own output.  (The segment needs none
        // of it, but whatever is decoded after it from a checkpoint may.)
        for p in &d.points {
            let out = base + p.rel;
            if self.em.advance(out).map_err(|e| sh.fail_unsupported(e))? {
                self.em
                    .set_pending(out, p.inp, p.bits, true, |w| {
                        let own = match p.zero_window {
                            0 => &p.window[..],
                            n => &ZERO_WINDOW[..n],
                        };
                        join_window(prior, own, w);
                        Ok(())
                    })
                    .map_err(|e| sh.fail_unsupported(e))?;
            }
        }
        spec::zero_verdicts(base, d.len, &d.zeros, &mut |c, z| self.zt.part(c, z));
        self.out += d.len;
        m.len += d.len;
        m.crc.combine(&d.crc);
        m.live = false;
        sh.pieces.fetch_add(1, Ordering::Relaxed);
        if !d.stream_end {
            let mut window = Vec::with_capacity(WINDOW);
            join_window(prior, &d.tail, &mut window);
            let out = self.out;
            if self.em.advance(out).map_err(|e| sh.fail_unsupported(e))? {
                self.em
                    .set_pending(out, seg.end(), 0, true, |w| {
                        w.clear();
                        w.extend_from_slice(&window);
                        Ok(())
                    })
                    .map_err(|e| sh.fail_unsupported(e))?;
            }
            m.pos = Resume {
                inp: seg.end(),
                bits: 0,
                window,
            };
            self.publish(out, false);
        }
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
        // Without threads (or if none could be started), verify here.
        let pool = (sh.threads > 0).then(|| self.pool());
        let Some(pool) = pool.filter(|p| p.threads() > 0) else {
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
        };
        let workers = sh.threads + 1;
        type Verdict = Result<Vec<(u64, bool)>, Fail>;
        let (res_tx, res_rx) = mpsc::channel::<Done<Batch, Verdict>>();
        let (mut sent, mut next) = (0u64, 0u64);
        let mut ready: BTreeMap<u64, (Batch, Verdict)> = BTreeMap::new();
        let mut scanning = true;
        loop {
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
                    let sh = Arc::clone(sh);
                    if !submit(&pool, sent, b, &res_tx, move |b| verify_batch(&sh, b)) {
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
            let r = r.unwrap_or_else(|| Err(sh.fail_unsupported("BGZF worker panicked".into())));
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
        }
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
        // Every member of the batch was inflated and checked.
        self.sh.member_verified(end);
        Ok(())
    }
}

/// A job's number, the job, and its result (`None`: `work` panicked).
type Done<J, R> = (u64, J, Option<R>);

/// Queue `work(job)` on `pool`; `(seq, job, result)` is sent to `done`
/// whatever happens, since the walk waits for the answer to every number
/// it hands out.  False: the pool has no workers.
fn submit<J: Send + 'static, R: Send + 'static>(
    pool: &Pool,
    seq: u64,
    job: J,
    done: &mpsc::Sender<Done<J, R>>,
    work: impl FnOnce(&J) -> R + Send + 'static,
) -> bool {
    let done = done.clone();
    pool.submit(Box::new(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(&job))).ok();
        let _ = done.send((seq, job, r));
    }))
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
