//! `evil`: corrupt data read from the plugin, to test that checksums in
//! filesystems and applications catch it.  Writes are not changed, so the
//! plugin keeps the right data.  Three models:
//!
//! * `cosmic-rays`: every bit read flips with probability P, afresh on
//!   each read.
//! * `stuck-bits` (default): each bit *of the disk* is stuck (high or
//!   low) with probability P; the same bits at the same offsets, on every
//!   read and every connection.
//! * `stuck-wires`: each bit position *of a read's buffer* is stuck, as a
//!   broken wire on the data path would be: the same buffer positions
//!   whatever the offset read.
//!
//! With `evil-stuck-probability` below 1 a stuck bit shows its stuck value
//! only that often.  Everything is derived from `evil-seed`, so a run can
//! be repeated exactly.
//!
//! Stuck bits are not stored: the disk (or buffer) is cut into 64 KiB
//! blocks and each block's stuck bits are generated from (seed, block
//! number) when a read touches it, by skipping geometric gaps, so the cost
//! follows the number of stuck bits, not the number of bytes, and any
//! disk size works.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nbdkit_backend::{layer_fn, Backend, ConfigError, FilterSpec, Handle, Param, Result};

const BLOCK_BYTES: u64 = 64 * 1024;
const BLOCK_BITS: u64 = BLOCK_BYTES * 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    CosmicRays,
    StuckBits,
    StuckWires,
}

/// splitmix64: small, fast, and good enough to place corruptions.
struct Rng(u64);

impl Rng {
    fn new(a: u64, b: u64) -> Rng {
        let mut r = Rng(a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        r.next_u64();
        r
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }
    /// How many bits to pass before the next hit, each bit being hit with
    /// probability `p` (a geometric distribution).
    fn gap(&mut self, p: f64) -> u64 {
        if p <= 0.0 {
            return u64::MAX;
        }
        if p >= 1.0 {
            return 0;
        }
        let g = self.unit().ln() / (-p).ln_1p();
        if g >= u64::MAX as f64 {
            u64::MAX
        } else {
            g as u64
        }
    }
}

struct Evil {
    mode: Mode,
    p: f64,
    stuck_p: f64,
    seed: u64,
    /// Numbers the reads, so that each gets its own random stream.
    reads: AtomicU64,
}

impl Evil {
    /// Call `f(bit, high)` for each stuck bit of `block` (bit numbers
    /// within the block).  `salt` keeps disk blocks and wire blocks apart.
    fn stuck_bits(&self, salt: u64, block: u64, mut f: impl FnMut(u64, bool)) {
        let mut rng = Rng::new(self.seed ^ salt, block);
        let mut bit = rng.gap(self.p);
        while bit < BLOCK_BITS {
            f(bit, rng.next_u64() & 1 == 1);
            bit = bit.saturating_add(1).saturating_add(rng.gap(self.p));
        }
    }

    /// Apply the stuck bits of positions `[base, base + buf.len())` of
    /// the space `salt` names to `buf`.
    fn apply_stuck(&self, salt: u64, base: u64, buf: &mut [u8], read: &mut Rng) {
        let end = base + buf.len() as u64;
        let mut block = base / BLOCK_BYTES;
        while block * BLOCK_BYTES < end {
            let start_bit = block * BLOCK_BITS;
            self.stuck_bits(salt, block, |bit, high| {
                let byte = (start_bit + bit) / 8;
                if byte < base || byte >= end {
                    return;
                }
                if self.stuck_p < 1.0 && read.unit() > self.stuck_p {
                    return;
                }
                let mask = 1u8 << (bit % 8);
                let b = &mut buf[(byte - base) as usize];
                if high {
                    *b |= mask;
                } else {
                    *b &= !mask;
                }
            });
            block += 1;
        }
    }

    fn corrupt(&self, buf: &mut [u8], offset: u64) {
        let mut read = Rng::new(self.seed, self.reads.fetch_add(1, Ordering::Relaxed));
        match self.mode {
            Mode::CosmicRays => {
                let bits = buf.len() as u64 * 8;
                let mut bit = read.gap(self.p);
                while bit < bits {
                    buf[(bit / 8) as usize] ^= 1 << (bit % 8);
                    bit = bit.saturating_add(1).saturating_add(read.gap(self.p));
                }
            }
            Mode::StuckBits => self.apply_stuck(0, offset, buf, &mut read),
            Mode::StuckWires => self.apply_stuck(0x5717_C4ED_3172_E5A1, 0, buf, &mut read),
        }
    }
}

struct EvilBackend {
    next: Arc<dyn Backend>,
    evil: Arc<Evil>,
}

impl Backend for EvilBackend {
    fn name(&self) -> &str {
        "evil"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        Ok(Box::new(EvilHandle {
            next: self.next.open(readonly, export)?,
            evil: self.evil.clone(),
        }))
    }
}

struct EvilHandle {
    next: Box<dyn Handle>,
    evil: Arc<Evil>,
}

impl Handle for EvilHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.next.pread(buf, offset)?;
        self.evil.corrupt(buf, offset);
        Ok(())
    }
}

fn configure(cfg: &mut nbdkit_backend::Config) -> std::result::Result<Evil, ConfigError> {
    let bad = |k: &str, v: &str, e: &str| ConfigError::new(format!("evil filter: {k}={v}: {e}"));
    let mode = match cfg.take("evil").as_deref() {
        None | Some("stuck-bits") => Mode::StuckBits,
        Some("cosmic-rays") | Some("cosmic") => Mode::CosmicRays,
        Some("stuck-wires") => Mode::StuckWires,
        Some(v) => {
            return Err(bad(
                "evil",
                v,
                "expected cosmic-rays, stuck-bits or stuck-wires",
            ))
        }
    };
    let p = match cfg.take("evil-probability") {
        Some(v) => crate::error::parse_rate(&v).map_err(|e| bad("evil-probability", &v, &e))?,
        None if mode == Mode::StuckWires => 1e-6,
        None => 1e-8,
    };
    let stuck_p = match cfg.take("evil-stuck-probability") {
        Some(v) => {
            crate::error::parse_rate(&v).map_err(|e| bad("evil-stuck-probability", &v, &e))?
        }
        None => 1.0,
    };
    let seed = match cfg.take("evil-seed") {
        Some(v) => v
            .trim()
            .parse::<u64>()
            .map_err(|_| bad("evil-seed", &v, "expected an unsigned integer"))?,
        // Different corruption each run unless a seed is given.
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    };
    Ok(Evil {
        mode,
        p,
        stuck_p,
        seed,
        reads: AtomicU64::new(0),
    })
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "evil",
    summary: "corrupt data read from the plugin (cosmic rays, stuck bits, stuck wires)",
    description: "Writes are passed through unchanged; only what is read is corrupted. \
Probabilities are numbers (1e-8), percentages (5%) or ratios (1:1000).\n\n\
Example:\n  nbdkit-rs --filter=evil file disk.img evil=cosmic-rays evil-probability=1e-6",
    params: &[
        Param {
            name: "evil",
            help: "cosmic-rays | stuck-bits (default) | stuck-wires",
        },
        Param {
            name: "evil-probability",
            help: "chance of each bit being flipped or stuck (default 1e-8; 1e-6 for stuck-wires)",
        },
        Param {
            name: "evil-stuck-probability",
            help: "chance of a stuck bit reading as stuck on each read (default 100%)",
        },
        Param {
            name: "evil-seed",
            help: "seed for the corruption, to repeat a run (default: from the clock)",
        },
    ],
    configure: |cfg| {
        let evil = Arc::new(configure(cfg)?);
        Ok(layer_fn(move |next| {
            Ok(Arc::new(EvilBackend { next, evil }))
        }))
    },
};

#[cfg(test)]
mod tests {
    use super::*;
    use nbdkit_backend::Config;

    fn evil(params: &[(&str, &str)]) -> Evil {
        let mut cfg = Config::from_pairs(params);
        configure(&mut cfg).unwrap()
    }

    fn flipped(a: &[u8], b: &[u8]) -> u32 {
        a.iter().zip(b).map(|(x, y)| (x ^ y).count_ones()).sum()
    }

    #[test]
    fn cosmic_rays_flip_about_p_of_the_bits_differently_each_read() {
        let e = evil(&[
            ("evil", "cosmic-rays"),
            ("evil-probability", "1e-3"),
            ("evil-seed", "7"),
        ]);
        let clean = vec![0x5au8; 1 << 20];
        let mut a = clean.clone();
        e.corrupt(&mut a, 0);
        let mut b = clean.clone();
        e.corrupt(&mut b, 0);
        let n = flipped(&clean, &a);
        // 8 Mi bits at 1e-3: about 8389, far inside these bounds.
        assert!((7000..10000).contains(&n), "{n}");
        assert_ne!(a, b);
    }

    #[test]
    fn stuck_bits_follow_the_offset_and_stuck_wires_the_buffer() {
        let e = evil(&[("evil-probability", "1e-3"), ("evil-seed", "1")]);
        let read = |e: &Evil, off: u64| {
            let mut v = vec![0u8; 100_000];
            e.corrupt(&mut v, off);
            v
        };
        // The same offset reads the same way; another offset does not.
        assert_eq!(read(&e, 4096), read(&e, 4096));
        assert_ne!(read(&e, 4096), read(&e, 1 << 30));
        // A read overlapping another agrees where they overlap.
        assert_eq!(read(&e, 4096)[1000..], read(&e, 5096)[..99_000]);
        assert!(read(&e, 0).iter().any(|&b| b != 0));

        let w = evil(&[
            ("evil", "stuck-wires"),
            ("evil-probability", "1e-3"),
            ("evil-seed", "1"),
        ]);
        assert_eq!(read(&w, 4096), read(&w, 1 << 30));
        assert!(read(&w, 0).iter().any(|&b| b != 0));

        // A stuck bit shows only sometimes with a stuck probability.
        let s = evil(&[
            ("evil-probability", "1e-3"),
            ("evil-stuck-probability", "50%"),
            ("evil-seed", "1"),
        ]);
        assert_ne!(read(&s, 0), read(&s, 0));
    }

    #[test]
    fn bad_parameters_are_named() {
        for (k, v) in [
            ("evil", "gamma-rays"),
            ("evil-probability", "2"),
            ("evil-stuck-probability", "x"),
            ("evil-seed", "-1"),
        ] {
            let mut cfg = Config::new(vec![(k.into(), v.into())]);
            let e = configure(&mut cfg).err().unwrap().to_string();
            assert!(e.contains(k), "{e}");
        }
    }
}
