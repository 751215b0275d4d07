//! `spinning`: make a fast plugin (RAM, SSD) behave like a hard disk with
//! a moving arm: a request far from where the head last was waits for the
//! head to seek there.  For testing what clients do with a rotational
//! disk; the export is advertised as rotational.
//!
//! The model: the disk is cut into `heads` equal sections, one head per
//! section.  A head's position is a fraction of its section (0 = start,
//! 1 = end).  A seek over distance `d` of a section takes:
//!
//! * nothing when `d` is 0 (the head is already there: sequential access),
//! * `min-seek-time` .. `half-seek-time` linearly for `d` in (0, ½],
//! * `half-seek-time` .. `max-seek-time` linearly for `d` in (½, 1].
//!
//! With `separate-heads=false` (the default) all heads hang on one arm
//! and move together; with `true` each moves on its own.  An arm serves
//! one request at a time (the seek is slept holding it), as a real one
//! does; separate heads seek in parallel.  Reads, writes and zeroes move
//! the head, to the end of the range they touched; trim, flush, block
//! status and cache do not (a drive answers those from its tables).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use nbdkit_backend::{
    layer_fn, Backend, ConfigError, Error, ErrorKind, FilterSpec, Handle, LockExt, Param, Result,
    ZeroFlags,
};

#[derive(Debug, Clone, Copy)]
struct Model {
    heads: u64,
    separate: bool,
    min: Duration,
    half: Duration,
    max: Duration,
}

impl Model {
    /// Seek time over distance `d` (a fraction of a section, 0..=1).
    fn seek_time(&self, d: f64) -> Duration {
        if d <= 0.0 {
            return Duration::ZERO;
        }
        let lerp = |a: Duration, b: Duration, t: f64| a + (b.saturating_sub(a)).mul_f64(t);
        if d <= 0.5 {
            lerp(self.min, self.half, d / 0.5)
        } else {
            lerp(self.half, self.max, ((d - 0.5) / 0.5).min(1.0))
        }
    }

    /// Which head serves `offset` of a disk of `size` bytes, and where in
    /// its section (0..=1) that is.
    fn locate(&self, offset: u64, size: u64) -> (usize, f64) {
        let section = size.div_ceil(self.heads).max(1);
        let head = (offset / section).min(self.heads - 1);
        let within = (offset - head * section) as f64 / section as f64;
        (head as usize, within.min(1.0))
    }
}

struct Spinning {
    model: Model,
    /// One position per arm: one arm for all heads, or one per head.
    arms: Vec<Mutex<f64>>,
}

impl Spinning {
    fn new(model: Model) -> Spinning {
        let n = if model.separate { model.heads } else { 1 };
        Spinning {
            model,
            arms: (0..n).map(|_| Mutex::new(0.0)).collect(),
        }
    }

    /// Move the head serving `[offset, offset+count)` there, sleeping
    /// for the seek, then run `f` while still holding the arm.
    fn access<T>(
        &self,
        offset: u64,
        count: u64,
        size: u64,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let (head, start) = self.model.locate(offset, size);
        let arm = if self.model.separate { head } else { 0 };
        let mut pos = self.arms[arm].lock_unpoisoned();
        let wait = self.model.seek_time((start - *pos).abs());
        if !wait.is_zero() && !nbdkit_backend::nanosleep(wait) {
            return Err(Error::new(
                ErrorKind::Shutdown,
                "spinning filter: interrupted while seeking (the server is exiting or the client left)",
            ));
        }
        let r = f();
        // The head ends where the transfer ended; a transfer running into
        // the next section leaves it at the end of its own.
        let section = size.div_ceil(self.model.heads).max(1);
        let end = offset.saturating_add(count).min(size);
        let after = (end.saturating_sub(head as u64 * section)) as f64 / section as f64;
        *pos = after.min(1.0);
        r
    }
}

struct SpinningBackend {
    next: Arc<dyn Backend>,
    /// One disk for every connection: their requests share the arm.
    disk: Arc<Spinning>,
}

impl Backend for SpinningBackend {
    fn name(&self) -> &str {
        "spinning"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        let next = self.next.open(readonly, export)?;
        let size = next.size()?;
        Ok(Box::new(SpinningHandle {
            next,
            size,
            disk: self.disk.clone(),
        }))
    }
}

struct SpinningHandle {
    next: Box<dyn Handle>,
    size: u64,
    disk: Arc<Spinning>,
}

impl Handle for SpinningHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn is_rotational(&self) -> Result<bool> {
        Ok(true)
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let n = buf.len() as u64;
        self.disk
            .access(offset, n, self.size, || self.next.pread(buf, offset))
    }
    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.disk.access(offset, buf.len() as u64, self.size, || {
            self.next.pwrite(buf, offset, fua)
        })
    }
    fn zero(&self, offset: u64, count: u64, flags: ZeroFlags) -> Result<()> {
        self.disk.access(offset, count, self.size, || {
            self.next.zero(offset, count, flags)
        })
    }
}

fn configure(cfg: &mut nbdkit_backend::Config) -> std::result::Result<Model, ConfigError> {
    let bad =
        |k: &str, v: &str, e: &str| ConfigError::new(format!("spinning filter: {k}={v}: {e}"));
    let heads = match cfg.take("heads") {
        None => 1,
        Some(v) => match v.trim().parse::<u64>() {
            Ok(n) if (1..=1024).contains(&n) => n,
            _ => {
                return Err(bad(
                    "heads",
                    &v,
                    "expected a number of heads from 1 to 1024",
                ))
            }
        },
    };
    let separate = cfg
        .take_bool("separate-heads")
        .map_err(|e| ConfigError::new(format!("spinning filter: {e}")))?
        .unwrap_or(false);
    let mut time = |k: &str, default_ms: u64| match cfg.take(k) {
        None => Ok(Duration::from_millis(default_ms)),
        Some(v) => crate::delay::parse_delay(&v).map_err(|e| bad(k, &v, &e)),
    };
    let max = time("max-seek-time", 20)?;
    let half = time("half-seek-time", 8)?;
    let min = time("min-seek-time", 1)?;
    if min > half || half > max {
        return Err(ConfigError::new(format!(
            "spinning filter: min-seek-time ({min:?}) <= half-seek-time ({half:?}) <= max-seek-time ({max:?}) must hold"
        )));
    }
    Ok(Model {
        heads,
        separate,
        min,
        half,
        max,
    })
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "spinning",
    summary: "add seek delays to simulate a spinning hard disk",
    description: "Requests far from the head's last position wait for it to seek there; \
sequential access does not wait. The disk is split into one section per head. \
Times are seconds, or with an s or ms suffix. The export is advertised as rotational.\n\n\
Example:\n  nbdkit-rs --filter=spinning memory 1G heads=4 max-seek-time=15ms",
    params: &[
        Param {
            name: "heads",
            help: "number of heads, each serving an equal section of the disk (default 1)",
        },
        Param {
            name: "separate-heads",
            help: "true: each head seeks on its own; false (default): all on one arm",
        },
        Param {
            name: "max-seek-time",
            help: "seek across a whole section (default 20ms)",
        },
        Param {
            name: "half-seek-time",
            help: "seek across half a section (default 8ms)",
        },
        Param {
            name: "min-seek-time",
            help: "shortest seek to a nearby place (default 1ms)",
        },
    ],
    configure: |cfg| {
        let model = configure(cfg)?;
        Ok(layer_fn(move |next| {
            Ok(Arc::new(SpinningBackend {
                next,
                disk: Arc::new(Spinning::new(model)),
            }))
        }))
    },
};

#[cfg(test)]
mod tests {
    use super::*;
    use nbdkit_backend::Config;

    fn model(params: &[(&str, &str)]) -> Model {
        let mut cfg = Config::from_pairs(params);
        configure(&mut cfg).unwrap()
    }

    #[test]
    fn seek_times_follow_distance() {
        let m = model(&[
            ("min-seek-time", "1ms"),
            ("half-seek-time", "10ms"),
            ("max-seek-time", "30ms"),
        ]);
        assert_eq!(m.seek_time(0.0), Duration::ZERO);
        assert_eq!(m.seek_time(0.5), Duration::from_millis(10));
        assert_eq!(m.seek_time(1.0), Duration::from_millis(30));
        assert_eq!(m.seek_time(0.75), Duration::from_millis(20));
        assert!(m.seek_time(0.001) >= Duration::from_millis(1));
    }

    #[test]
    fn heads_split_the_disk() {
        let m = model(&[("heads", "4")]);
        assert_eq!(m.locate(0, 4000), (0, 0.0));
        assert_eq!(m.locate(1500, 4000), (1, 0.5));
        assert_eq!(m.locate(3999, 4000).0, 3);
    }

    /// Runs accesses with zero-length seek times replaced by counting:
    /// which accesses would have had to seek.
    fn seeks(params: &[(&str, &str)], accesses: &[(u64, u64)]) -> Vec<bool> {
        // Seek times of zero make the test instant; the arm positions are
        // what is checked.
        let mut p: Vec<(&str, &str)> = params.to_vec();
        p.extend([
            ("min-seek-time", "0"),
            ("half-seek-time", "0"),
            ("max-seek-time", "0"),
        ]);
        let s = Spinning::new(model(&p));
        accesses
            .iter()
            .map(|&(off, n)| {
                let (head, start) = s.model.locate(off, 1 << 20);
                let arm = if s.model.separate { head } else { 0 };
                let moved = (start - *s.arms[arm].lock_unpoisoned()).abs() > 0.0;
                s.access(off, n, 1 << 20, || Ok(())).unwrap();
                moved
            })
            .collect()
    }

    #[test]
    fn sequential_access_does_not_seek_and_heads_share_or_not() {
        let k = 1u64 << 10;
        // Sequential reads: only the first, away from 0, seeks.
        assert_eq!(
            seeks(&[], &[(64 * k, 4 * k), (68 * k, 4 * k), (72 * k, 4 * k)]),
            vec![true, false, false]
        );
        // Two heads on one arm: alternating between the start of section
        // 0 and the end of section 1 seeks every time.
        let alternate = [(0, k), (1023 * k, k), (k, k), (1023 * k, k)];
        assert_eq!(
            seeks(&[("heads", "2")], &alternate),
            vec![false, true, true, true]
        );
        // Separate heads: each stays where it was.
        assert_eq!(
            seeks(&[("heads", "2"), ("separate-heads", "true")], &alternate),
            vec![false, true, false, true]
        );
    }

    #[test]
    fn bad_parameters_are_named() {
        for (k, v) in [
            ("heads", "0"),
            ("separate-heads", "maybe"),
            ("max-seek-time", "x"),
            ("min-seek-time", "1"),
        ] {
            let mut cfg = Config::new(vec![(k.into(), v.into())]);
            let e = configure(&mut cfg).err().unwrap().to_string();
            assert!(e.contains(k), "{k}: {e}");
        }
    }
}
