//! `retry-request`: retry a single failing request (and, by default, the
//! plugin's open) a few times with a fixed delay, without reopening the
//! plugin — the lightweight sibling of the `retry` filter.  "Not
//! supported" answers and disconnects are passed on at once: they are
//! answers, not failures.

use std::sync::Arc;
use std::time::Duration;

use nbdkit_backend::{
    layer_fn, Backend, Config, ConfigError, Error, ErrorKind, Extents, FilterSpec, Handle, Layer,
    Param, Result, ZeroFlags,
};

#[derive(Debug, Clone, Copy)]
struct Policy {
    retries: u32,
    delay: Duration,
    retry_open: bool,
}

impl Policy {
    fn run<T>(&self, what: &str, mut f: impl FnMut() -> Result<T>) -> Result<T> {
        let mut attempt = 0;
        loop {
            match f() {
                Ok(v) => return Ok(v),
                Err(e) if final_error(&e) || attempt >= self.retries => return Err(e),
                Err(e) => {
                    attempt += 1;
                    tracing::debug!(
                        "retry-request: {what} failed ({e}); retry {attempt} of {} in {:?}",
                        self.retries,
                        self.delay
                    );
                    std::thread::sleep(self.delay);
                }
            }
        }
    }
}

fn final_error(e: &Error) -> bool {
    e.disconnects() || matches!(e.kind(), ErrorKind::NotSupported | ErrorKind::Shutdown)
}

fn configure(c: &mut Config) -> std::result::Result<Box<dyn Layer>, ConfigError> {
    let retries = c.take_parse::<u32>("retry-request-retries")?.unwrap_or(2);
    if retries > 1000 {
        return Err(ConfigError::new(format!(
            "retry-request-retries={retries}: value too large (at most 1000)"
        )));
    }
    let delay = c.take_parse::<u64>("retry-request-delay")?.unwrap_or(2);
    if delay == 0 {
        return Err(ConfigError::new("retry-request-delay cannot be 0"));
    }
    let retry_open = c.take_bool("retry-request-open")?.unwrap_or(true);
    let p = Policy {
        retries,
        delay: Duration::from_secs(delay),
        retry_open,
    };
    Ok(layer_fn(move |next| Ok(Arc::new(RetryRequest { next, p }))))
}

struct RetryRequest {
    next: Arc<dyn Backend>,
    p: Policy,
}

impl Backend for RetryRequest {
    fn name(&self) -> &str {
        "retry-request"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        let next = if self.p.retry_open {
            self.p.run("open", || self.next.open(readonly, export))?
        } else {
            self.next.open(readonly, export)?
        };
        Ok(Box::new(RetryRequestHandle { next, p: self.p }))
    }
}

struct RetryRequestHandle {
    next: Box<dyn Handle>,
    p: Policy,
}

impl Handle for RetryRequestHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.p.run("pread", || self.next.pread(buf, offset))
    }
    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.p.run("pwrite", || self.next.pwrite(buf, offset, fua))
    }
    fn flush(&self) -> Result<()> {
        self.p.run("flush", || self.next.flush())
    }
    fn trim(&self, offset: u64, count: u64, fua: bool) -> Result<()> {
        self.p.run("trim", || self.next.trim(offset, count, fua))
    }
    fn zero(&self, offset: u64, count: u64, flags: ZeroFlags) -> Result<()> {
        self.p.run("zero", || self.next.zero(offset, count, flags))
    }
    fn extents(&self, offset: u64, count: u64, req_one: bool, out: &mut Extents) -> Result<()> {
        // Each attempt fills a fresh list, so a failed one leaves no trace.
        let got = self.p.run("extents", || {
            let mut e = Extents::new(out.start(), out.end());
            self.next.extents(offset, count, req_one, &mut e)?;
            Ok(e)
        })?;
        for e in got.list() {
            out.add(e.offset, e.length, e.flags)?;
        }
        Ok(())
    }
    fn cache(&self, offset: u64, count: u64) -> Result<()> {
        self.p.run("cache", || self.next.cache(offset, count))
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "retry-request",
    summary: "retry a failing request a few times, without reopening the plugin",
    description:
        "Example:\n  nbdkit-rs --filter=retry-request curl https://example.com/disk.img \\\n    \
retry-request-retries=5 retry-request-delay=1",
    params: &[
        Param {
            name: "retry-request-retries",
            help: "N: retries of one request before giving up (default 2, at most 1000)",
        },
        Param {
            name: "retry-request-delay",
            help: "N: seconds to wait before each retry (default 2)",
        },
        Param {
            name: "retry-request-open",
            help: "BOOL: also retry opening the plugin (default true)",
        },
    ],
    configure,
};
