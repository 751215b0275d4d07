//! `rate`: limit the bandwidth of reads and writes with token buckets, one
//! for the whole server (`rate=`) and one per connection
//! (`connection-rate=`).  Rates are in bits per second, as nbdkit's.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nbdkit_backend::LockExt;
use nbdkit_backend::{
    layer_fn, parse_size, Backend, ConfigError, FilterSpec, Handle, Param, Result,
};

/// A token bucket holding up to `capacity` bits, refilled at `rate` bits
/// per second.  Pure arithmetic over a caller-given clock, so it can be
/// tested without waiting.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: f64,
}

impl Bucket {
    /// A full bucket at time `now` (seconds).
    pub fn new(rate: f64, burst_secs: f64, now: f64) -> Bucket {
        let capacity = rate * burst_secs;
        Bucket {
            rate,
            capacity,
            tokens: capacity,
            last: now,
        }
    }

    /// Take `bits` at time `now`; return how long to wait (seconds) before
    /// the transfer may go.  A request larger than the bucket goes into
    /// debt, which later requests pay off, so the long-run rate holds for
    /// any request size.
    pub fn take(&mut self, bits: f64, now: f64) -> f64 {
        let elapsed = (now - self.last).max(0.0);
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.tokens -= bits;
        if self.tokens >= 0.0 {
            0.0
        } else {
            -self.tokens / self.rate
        }
    }

    /// Change the rate; what is in the bucket stays, up to the new
    /// capacity.
    pub fn set_rate(&mut self, rate: f64, burst_secs: f64) {
        self.rate = rate;
        self.capacity = rate * burst_secs;
        self.tokens = self.tokens.min(self.capacity);
    }
}

/// How often a rate file is read again.
const RATE_FILE_POLL: Duration = Duration::from_secs(1);

/// One token bucket plus, optionally, a file that changes its rate while
/// the server runs (rate-file=, connection-rate-file=).
struct Limiter {
    start: Instant,
    burst: f64,
    /// `None`: no rate yet (none given, and no valid rate file so far).
    bucket: Mutex<Option<Bucket>>,
    file: Option<PathBuf>,
    poll: Duration,
    checked: Mutex<Option<Instant>>,
}

impl Limiter {
    fn new(rate: Option<f64>, burst: f64, file: Option<PathBuf>) -> Limiter {
        Limiter {
            start: Instant::now(),
            burst,
            bucket: Mutex::new(rate.map(|r| Bucket::new(r, burst, 0.0))),
            file,
            poll: RATE_FILE_POLL,
            checked: Mutex::new(None),
        }
    }

    /// Read the rate file if it is time to.  A missing file or a bad
    /// value keeps the rate in force (logged once per change of content).
    fn refresh(&self, now: f64) {
        let Some(file) = &self.file else { return };
        {
            let mut checked = self.checked.lock_unpoisoned();
            if checked.is_some_and(|t| t.elapsed() < self.poll) {
                return;
            }
            *checked = Some(Instant::now());
        }
        let Ok(text) = std::fs::read_to_string(file) else {
            return;
        };
        match parse_size(text.trim()) {
            Ok(r) if r > 0 => {
                let mut b = self.bucket.lock_unpoisoned();
                match b.as_mut() {
                    Some(b) => b.set_rate(r as f64, self.burst),
                    None => *b = Some(Bucket::new(r as f64, self.burst, now)),
                }
            }
            _ => tracing::warn!(
                "rate filter: {}: {:?} is not a rate in bits per second; keeping the current rate",
                file.display(),
                text.trim()
            ),
        }
    }

    fn wait_for(&self, bytes: usize) {
        let now = self.start.elapsed().as_secs_f64();
        self.refresh(now);
        let wait = self
            .bucket
            .lock_unpoisoned()
            .as_mut()
            .map_or(0.0, |b| b.take(bytes as f64 * 8.0, now));
        if wait > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(wait));
        }
    }
}

#[derive(Clone)]
struct Config {
    rate: Option<f64>,
    connection_rate: Option<f64>,
    rate_file: Option<PathBuf>,
    connection_rate_file: Option<PathBuf>,
    burst: f64,
}

struct RateBackend {
    next: Arc<dyn Backend>,
    cfg: Config,
    global: Option<Arc<Limiter>>,
}

impl Backend for RateBackend {
    fn name(&self) -> &str {
        "rate"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        let c = &self.cfg;
        Ok(Box::new(RateHandle {
            next: self.next.open(readonly, export)?,
            global: self.global.clone(),
            conn: (c.connection_rate.is_some() || c.connection_rate_file.is_some())
                .then(|| Limiter::new(c.connection_rate, c.burst, c.connection_rate_file.clone())),
        }))
    }
}

struct RateHandle {
    next: Box<dyn Handle>,
    global: Option<Arc<Limiter>>,
    conn: Option<Limiter>,
}

impl RateHandle {
    fn limit(&self, bytes: usize) {
        if let Some(c) = &self.conn {
            c.wait_for(bytes);
        }
        if let Some(g) = &self.global {
            g.wait_for(bytes);
        }
    }
}

impl Handle for RateHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.limit(buf.len());
        self.next.pread(buf, offset)
    }
    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.limit(buf.len());
        self.next.pwrite(buf, offset, fua)
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "rate",
    summary: "limit read/write bandwidth (bits per second), per server and per connection",
    description: "Example:\n  nbdkit-rs --filter=rate file disk.img rate=10M connection-rate=2M",
    params: &[
        Param {
            name: "rate",
            help: "limit for the whole server, bits per second (10M = 10 Mbit/s)",
        },
        Param {
            name: "connection-rate",
            help: "limit for each connection, bits per second",
        },
        Param {
            name: "rate-file",
            help: "a file holding the server-wide rate, read again every second while running",
        },
        Param {
            name: "connection-rate-file",
            help: "a file holding the per-connection rate, read again every second",
        },
        Param {
            name: "burstiness",
            help: "seconds of traffic that may go at once after a pause (default 2.0)",
        },
    ],
    configure: |cfg| {
        let err = |e: ConfigError| ConfigError::new(format!("rate filter: {e}"));
        let positive = |key: &str, v: Option<u64>| match v {
            Some(0) => Err(ConfigError::new(format!(
                "rate filter: {key}=0: a rate must be more than zero"
            ))),
            _ => Ok(v.map(|r| r as f64)),
        };
        let rate = positive("rate", cfg.take_size("rate").map_err(err)?)?;
        let connection_rate = positive(
            "connection-rate",
            cfg.take_size("connection-rate").map_err(err)?,
        )?;
        let burst: f64 = cfg.take_parse("burstiness").map_err(err)?.unwrap_or(2.0);
        if !(burst.is_finite() && burst > 0.0) {
            return Err(ConfigError::new(format!(
                "rate filter: burstiness={burst}: must be more than zero seconds"
            )));
        }
        let rate_file = cfg.take("rate-file").map(PathBuf::from);
        let connection_rate_file = cfg.take("connection-rate-file").map(PathBuf::from);
        // No limit at all is accepted, as nbdkit does: the filter then
        // passes everything through unchanged.
        let c = Config {
            rate,
            connection_rate,
            rate_file,
            connection_rate_file,
            burst,
        };
        Ok(layer_fn(move |next| {
            let global = (c.rate.is_some() || c.rate_file.is_some())
                .then(|| Arc::new(Limiter::new(c.rate, c.burst, c.rate_file.clone())));
            Ok(Arc::new(RateBackend {
                next,
                cfg: c,
                global,
            }))
        }))
    },
};

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Over any sequence of requests the waits keep the average at or
        /// below the rate, allowing for one full bucket.
        #[test]
        fn long_run_rate_holds(reqs in proptest::collection::vec((1u32..100_000, 0u32..1000), 1..100)) {
            let rate = 1e6;
            let mut b = Bucket::new(rate, 0.5, 0.0);
            let mut now = 0.0;
            let mut bits = 0.0;
            for (size, gap_ms) in reqs {
                now += gap_ms as f64 / 1000.0;
                let w = b.take(size as f64 * 8.0, now);
                prop_assert!(w >= 0.0);
                now += w;
                bits += size as f64 * 8.0;
                prop_assert!(bits <= rate * now + rate * 0.5 + 1e-6);
            }
        }
    }

    #[test]
    fn rate_file_changes_the_rate_and_a_bad_or_missing_file_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("rate");
        let mut l = Limiter::new(None, 1.0, Some(file.clone()));
        l.poll = Duration::ZERO;
        let rate = |l: &Limiter| l.bucket.lock().unwrap().as_ref().map(|b| b.rate);
        // No rate and no file: unlimited.
        l.refresh(0.0);
        assert_eq!(rate(&l), None);
        std::fs::write(&file, "1M\n").unwrap();
        l.refresh(0.0);
        assert_eq!(rate(&l), Some(1048576.0));
        std::fs::write(&file, "fast").unwrap();
        l.refresh(0.0);
        assert_eq!(rate(&l), Some(1048576.0));
        std::fs::write(&file, "2000").unwrap();
        l.refresh(0.0);
        assert_eq!(rate(&l), Some(2000.0));
        std::fs::remove_file(&file).unwrap();
        l.refresh(0.0);
        assert_eq!(rate(&l), Some(2000.0));
    }

    #[test]
    fn full_bucket_goes_at_once_then_waits() {
        let mut b = Bucket::new(1000.0, 1.0, 0.0);
        assert_eq!(b.take(1000.0, 0.0), 0.0);
        assert!((b.take(500.0, 0.0) - 0.5).abs() < 1e-9);
        // Paid off after the wait: half a second later nothing is owed.
        assert_eq!(b.take(0.0, 0.5), 0.0);
    }
}
