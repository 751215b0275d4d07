//! `random` and `sparse-random`: deterministic pseudo-random disks.
//!
//! Why: testing copy tools needs disks whose every byte is checkable
//! without a copy of them.  Both disks are a pure function of `seed` and
//! the offset, so any range can be read at any time, and a write is
//! accepted only if it matches what is there (else EIO): serving the same
//! disk as source and destination (`nbdcopy "$uri" "$uri"`) checks that a
//! copy tool put every byte in the right place.  `random` is data
//! everywhere; `sparse-random` looks like a virtual machine disk: runs of
//! data (about `runlength` long, `percent` of the disk) between holes.

use std::sync::Arc;

use nbdkit_backend::{
    Backend, CacheMode, Config, ConfigError, Error, Extents, FuaMode, Handle, Param, PluginSpec,
    Result, ZeroFlags, ZeroMode, EXTENT_HOLE, EXTENT_ZERO,
};

/// The SplitMix64 output function: a good 64-bit mix of its input.
/// Hand-written because random access needs a stateless function of
/// (seed, position); the RNG crates generate sequences.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fill `buf` (disk bytes from `offset`) with the random stream of `seed`:
/// byte i of the disk is byte i%8 of mix(seed ^ mix(i/8)).
fn fill_random(seed: u64, buf: &mut [u8], offset: u64) {
    let mut pos = offset;
    let mut i = 0;
    while i < buf.len() {
        let word = mix(seed ^ mix(pos / 8)).to_le_bytes();
        let within = (pos % 8) as usize;
        let n = (8 - within).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&word[within..within + n]);
        i += n;
        pos += n as u64;
    }
}

/// A seed from the clock and the process, when none is given.
fn any_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    mix(t ^ ((std::process::id() as u64) << 32))
}

fn take_seed(cfg: &mut Config) -> std::result::Result<u64, ConfigError> {
    Ok(cfg.take_parse::<u64>("seed")?.unwrap_or_else(any_seed))
}

/// What a disk reads at a position.
trait Content: Send + Sync + 'static {
    /// Whether flush and FUA are offered (nothing to persist either way):
    /// nbdkit's sparse-random offers them and its random does not.
    const FLUSH: bool;
    fn read(&self, buf: &mut [u8], offset: u64);
    /// Allocation of `[offset, offset+count)`.
    fn extents(&self, offset: u64, count: u64, extents: &mut Extents) -> Result<()>;
}

struct Checked<C> {
    name: &'static str,
    size: u64,
    content: Arc<C>,
}

impl<C: Content> Backend for Checked<C> {
    fn name(&self) -> &str {
        self.name
    }
    fn open(&self, _readonly: bool, _export: &str) -> Result<Box<dyn Handle>> {
        Ok(Box::new(CheckedHandle {
            size: self.size,
            content: self.content.clone(),
        }))
    }
}

struct CheckedHandle<C> {
    size: u64,
    content: Arc<C>,
}

/// Compare in pieces so a large write does not need a second large buffer.
const CHECK_CHUNK: usize = 256 * 1024;

impl<C: Content> CheckedHandle<C> {
    fn verify(&self, data: &[u8], offset: u64) -> Result<()> {
        let mut expect = vec![0u8; data.len().min(CHECK_CHUNK)];
        for (i, chunk) in data.chunks(CHECK_CHUNK).enumerate() {
            let at = offset + (i * CHECK_CHUNK) as u64;
            let e = &mut expect[..chunk.len()];
            self.content.read(e, at);
            if let Some(p) = e.iter().zip(chunk).position(|(a, b)| a != b) {
                return Err(Error::io(format!(
                    "data written at offset {} differs from the disk's content",
                    at + p as u64
                )));
            }
        }
        Ok(())
    }
}

impl<C: Content> Handle for CheckedHandle<C> {
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }
    // As nbdkit's: zeroing checks the range, so it is not offered as fast.
    nbdkit_backend::capabilities! {
        can_write: true, can_zero: ZeroMode::Native, can_fast_zero: false, can_trim: true,
        can_extents: true, can_multi_conn: true, can_cache: CacheMode::Native,
        can_flush: C::FLUSH,
        can_fua: if C::FLUSH { FuaMode::Native } else { FuaMode::None },
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.content.read(buf, offset);
        Ok(())
    }
    fn pwrite(&self, buf: &[u8], offset: u64, _fua: bool) -> Result<()> {
        self.verify(buf, offset)
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    /// Trimming changes nothing a client may rely on: accepted.
    fn trim(&self, _offset: u64, _count: u64, _fua: bool) -> Result<()> {
        Ok(())
    }
    /// Zeroing is a write of zeroes: fine where the disk reads as zero.
    fn zero(&self, offset: u64, count: u64, _flags: ZeroFlags) -> Result<()> {
        let mut ex = Extents::new(offset, offset + count);
        self.content.extents(offset, count, &mut ex)?;
        for e in ex.list() {
            if e.flags & EXTENT_ZERO == 0 {
                return Err(Error::io(format!(
                    "zeroing at offset {} differs from the disk's content",
                    e.offset
                )));
            }
        }
        Ok(())
    }
    fn cache(&self, _offset: u64, _count: u64) -> Result<()> {
        Ok(())
    }
    fn extents(
        &self,
        offset: u64,
        count: u64,
        _req_one: bool,
        extents: &mut Extents,
    ) -> Result<()> {
        self.content.extents(offset, count, extents)
    }
}

struct Random {
    seed: u64,
}

impl Content for Random {
    const FLUSH: bool = false;
    fn read(&self, buf: &mut [u8], offset: u64) {
        fill_random(self.seed, buf, offset);
    }
    fn extents(&self, offset: u64, count: u64, extents: &mut Extents) -> Result<()> {
        extents.add(offset, count, 0)
    }
}

pub static RANDOM: PluginSpec = PluginSpec {
    name: "random",
    summary: "a disk of repeatable pseudo-random data; writes must match it",
    description: "The same seed gives the same data.  A write succeeds only if it matches \
                  what is there (else EIO), so a copy onto itself checks a copy tool.\n\n\
                  Example:\n  nbdkit-rs -U - random size=100M --run 'nbdcopy \"$uri\" \"$uri\"'",
    magic_config_key: Some("size"),
    params: &[
        Param {
            name: "size",
            help: "virtual size, e.g. 1G (required; the magic key)",
        },
        Param {
            name: "seed",
            help: "a number; the same seed gives the same data (default: random)",
        },
    ],
    create: |cfg| {
        let size = cfg
            .take_size("size")?
            .ok_or_else(|| ConfigError::new("random: the 'size' parameter is required"))?;
        let seed = take_seed(cfg)?;
        Ok(Arc::new(Checked {
            name: "random",
            size,
            content: Arc::new(Random { seed }),
        }))
    },
};

/// Granularity of sparse-random's layout.
const BLOCK: u64 = 4096;
/// Most runs the layout may hold (16 bytes each).
const MAX_RUNS: u64 = 32 << 20;

struct SparseRandom {
    seed: u64,
    /// Data runs (start, end) in bytes, sorted, block-aligned (the last
    /// may end at `size`).
    runs: Vec<(u64, u64)>,
    random_content: bool,
}

impl SparseRandom {
    fn new(seed: u64, size: u64, percent: u32, runlength: u64, random_content: bool) -> Self {
        let mut runs = Vec::new();
        let blocks = size.div_ceil(BLOCK);
        if percent >= 100 {
            if size > 0 {
                runs.push((0, size));
            }
        } else if percent > 0 {
            // Alternate holes and data with exponentially distributed
            // lengths: data about `runlength` on average, holes long
            // enough that data is `percent` of the disk.
            let data_mean = (runlength as f64 / BLOCK as f64).max(1.0);
            let hole_mean = data_mean * (100 - percent) as f64 / percent as f64;
            let mut state = seed;
            let mut draw = |mean: f64| -> u64 {
                state = state.wrapping_add(1);
                let u = (mix(seed ^ mix(state)) >> 11) as f64 / (1u64 << 53) as f64;
                ((-(1.0 - u).ln() * mean).ceil() as u64).max(1)
            };
            let mut b = 0u64;
            while b < blocks {
                b = b.saturating_add(draw(hole_mean));
                if b >= blocks {
                    break;
                }
                let end = b.saturating_add(draw(data_mean)).min(blocks);
                runs.push((b * BLOCK, (end * BLOCK).min(size)));
                b = end;
            }
        }
        SparseRandom {
            seed,
            runs,
            random_content,
        }
    }

    /// Index of the first run ending after `offset`.
    fn first_run(&self, offset: u64) -> usize {
        self.runs.partition_point(|&(_, e)| e <= offset)
    }
}

impl Content for SparseRandom {
    const FLUSH: bool = true;
    fn read(&self, buf: &mut [u8], offset: u64) {
        buf.fill(0);
        let end = offset + buf.len() as u64;
        for &(s, e) in &self.runs[self.first_run(offset)..] {
            if s >= end {
                break;
            }
            let (from, to) = (s.max(offset), e.min(end));
            let out = &mut buf[(from - offset) as usize..(to - offset) as usize];
            if self.random_content {
                fill_random(self.seed, out, from);
            } else {
                // One non-zero byte per block.
                let mut pos = from;
                let mut i = 0;
                while i < out.len() {
                    let block = pos / BLOCK;
                    let n = ((block + 1) * BLOCK - pos).min((out.len() - i) as u64) as usize;
                    let byte = (mix(self.seed ^ mix(block)) % 255) as u8 + 1;
                    out[i..i + n].fill(byte);
                    i += n;
                    pos += n as u64;
                }
            }
        }
    }

    fn extents(&self, offset: u64, count: u64, extents: &mut Extents) -> Result<()> {
        let end = offset + count;
        let mut pos = offset;
        for &(s, e) in &self.runs[self.first_run(offset)..] {
            if s >= end {
                break;
            }
            if s > pos {
                extents.add(pos, s - pos, EXTENT_HOLE | EXTENT_ZERO)?;
            }
            let from = s.max(pos);
            extents.add(from, e.min(end) - from, 0)?;
            pos = e.min(end);
        }
        if pos < end {
            extents.add(pos, end - pos, EXTENT_HOLE | EXTENT_ZERO)?;
        }
        Ok(())
    }
}

pub static SPARSE_RANDOM: PluginSpec = PluginSpec {
    name: "sparse-random",
    summary: "a sparse disk with runs of repeatable random data; writes must match it",
    description: "Runs of data (about runlength long, percent of the disk) between holes, \
                  like a virtual machine disk.  Each 4 KiB data block repeats one random \
                  non-zero byte (random-content=true: every byte random).  A write succeeds \
                  only if it matches (else EIO).\n\n\
                  Example:\n  nbdkit-rs -U - sparse-random size=1T --run 'nbdcopy \"$uri\" \"$uri\"'",
    magic_config_key: Some("size"),
    params: &[
        Param {
            name: "size",
            help: "virtual size, e.g. 1T (required; the magic key)",
        },
        Param {
            name: "seed",
            help: "a number; the same seed gives the same disk (default: random)",
        },
        Param {
            name: "percent",
            help: "percentage of the disk holding data, 0-100 (default 10)",
        },
        Param {
            name: "runlength",
            help: "average length of a data run (default 16M)",
        },
        Param {
            name: "random-content",
            help: "true: every byte random, not one byte per block (default false)",
        },
    ],
    create: |cfg| {
        let size = cfg
            .take_size("size")?
            .ok_or_else(|| ConfigError::new("sparse-random: the 'size' parameter is required"))?;
        let seed = take_seed(cfg)?;
        let percent = cfg.take_parse::<u32>("percent")?.unwrap_or(10);
        if percent > 100 {
            return Err(ConfigError::new(format!(
                "sparse-random: percent={percent}: must be 0 to 100"
            )));
        }
        let runlength = cfg.take_size("runlength")?.unwrap_or(16 << 20);
        if runlength == 0 {
            return Err(ConfigError::new("sparse-random: runlength=0: must be positive"));
        }
        let random_content = cfg.take_bool("random-content")?.unwrap_or(false);
        let expected_runs = (size / runlength.max(BLOCK)).saturating_mul(percent as u64) / 100;
        if percent < 100 && expected_runs > MAX_RUNS {
            return Err(ConfigError::new(format!(
                "sparse-random: runlength={runlength} is too small for size={size} (about {expected_runs} runs; at most {MAX_RUNS})"
            )));
        }
        Ok(Arc::new(Checked {
            name: "sparse-random",
            size,
            content: Arc::new(SparseRandom::new(
                seed,
                size,
                percent,
                runlength,
                random_content,
            )),
        }))
    },
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_is_a_function_of_seed_and_offset() {
        let mut a = vec![0u8; 1000];
        let mut b = vec![0u8; 990];
        fill_random(7, &mut a, 0);
        fill_random(7, &mut b, 10);
        assert_eq!(&a[10..], &b[..]);
        let mut c = vec![0u8; 1000];
        fill_random(8, &mut c, 0);
        assert_ne!(a, c);
        let h = CheckedHandle {
            size: 1000,
            content: Arc::new(Random { seed: 7 }),
        };
        assert!(h.pwrite(&a[3..500], 3, false).is_ok());
        let mut bad = a[3..500].to_vec();
        bad[100] ^= 1;
        let e = h.pwrite(&bad, 3, false).unwrap_err();
        assert!(e.message().contains("offset 103"), "{e}");
        assert!(h.zero(0, 10, ZeroFlags::default()).is_err());
    }

    #[test]
    fn sparse_layout_matches_percent_and_reads() {
        let d = SparseRandom::new(1, 1 << 30, 25, 1 << 20, false);
        let data: u64 = d.runs.iter().map(|(s, e)| e - s).sum();
        let pct = data as f64 * 100.0 / (1u64 << 30) as f64;
        assert!((15.0..35.0).contains(&pct), "{pct}%");
        let h = CheckedHandle {
            size: 1 << 30,
            content: Arc::new(d),
        };
        let mut ex = Extents::new(0, 1 << 30);
        h.extents(0, 1 << 30, false, &mut ex).unwrap();
        let list = ex.list();
        assert!(list.len() > 10);
        for e in list.iter().take(20) {
            let mut buf = vec![0u8; e.length.min(1 << 20) as usize];
            h.pread(&mut buf, e.offset).unwrap();
            if e.flags & EXTENT_ZERO != 0 {
                assert!(buf.iter().all(|&b| b == 0));
                assert!(h
                    .zero(e.offset, buf.len() as u64, ZeroFlags::default())
                    .is_ok());
            } else {
                assert!(buf.iter().all(|&b| b != 0));
                assert!(h.pwrite(&buf, e.offset, false).is_ok());
            }
        }
        let all = SparseRandom::new(1, 10_000, 100, 4096, true);
        assert_eq!(all.runs, vec![(0, 10_000)]);
        assert!(SparseRandom::new(1, 1 << 30, 0, 4096, false)
            .runs
            .is_empty());
    }
}
