//! `time-limit`: a connection may last `time-limit` seconds (default 60)
//! from the moment it opened its export.  After that every request fails
//! with ESHUTDOWN and the server closes the connection once that reply is
//! out.  As in nbdkit, the limit is enforced when a request arrives: an
//! idle client is not cut off until it sends something.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nbdkit_backend::{
    layer_fn, Backend, Client, ConfigError, Error, ErrorKind, Extents, FilterSpec, Handle, Param,
    Result, ZeroFlags,
};

struct TimeLimitBackend {
    next: Arc<dyn Backend>,
    limit: Duration,
}

impl Backend for TimeLimitBackend {
    fn name(&self) -> &str {
        "time-limit"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        let next = self.next.open(readonly, export)?;
        Ok(Box::new(TimeLimitHandle {
            next,
            deadline: Instant::now() + self.limit,
            limit: self.limit,
        }))
    }
}

struct TimeLimitHandle {
    next: Box<dyn Handle>,
    deadline: Instant,
    limit: Duration,
}

impl TimeLimitHandle {
    /// Fail the request, and end the connection after its reply, once the
    /// connection has run out of time.
    fn check(&self) -> Result<()> {
        if Instant::now() < self.deadline {
            return Ok(());
        }
        if let Some(c) = Client::current() {
            c.request_disconnect();
        }
        Err(Error::new(
            ErrorKind::Shutdown,
            format!(
                "time-limit filter: the connection's time limit ({:?}) is over",
                self.limit
            ),
        ))
    }
}

impl Handle for TimeLimitHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check()?;
        self.next.pread(buf, offset)
    }
    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.check()?;
        self.next.pwrite(buf, offset, fua)
    }
    fn zero(&self, offset: u64, count: u64, flags: ZeroFlags) -> Result<()> {
        self.check()?;
        self.next.zero(offset, count, flags)
    }
    fn trim(&self, offset: u64, count: u64, fua: bool) -> Result<()> {
        self.check()?;
        self.next.trim(offset, count, fua)
    }
    fn flush(&self) -> Result<()> {
        self.check()?;
        self.next.flush()
    }
    fn extents(&self, offset: u64, count: u64, req_one: bool, extents: &mut Extents) -> Result<()> {
        self.check()?;
        self.next.extents(offset, count, req_one, extents)
    }
    fn cache(&self, offset: u64, count: u64) -> Result<()> {
        self.check()?;
        self.next.cache(offset, count)
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "time-limit",
    summary: "limit how long each connection may last",
    description: "Once a connection has been open for the limit, its requests fail with \
ESHUTDOWN and the server disconnects it. The limit is checked when a request \
arrives, so an idle client can stay connected longer.\n\n\
Example:\n  nbdkit-rs --filter=time-limit file disk.img time-limit=5m",
    params: &[Param {
        name: "time-limit",
        help: "seconds (default 60); also with an s, ms or m suffix",
    }],
    configure: |cfg| {
        let limit = match cfg.take("time-limit") {
            None => Duration::from_secs(60),
            Some(v) => parse_limit(&v)
                .map_err(|e| ConfigError::new(format!("time-limit filter: time-limit={v}: {e}")))?,
        };
        Ok(layer_fn(move |next| {
            Ok(Arc::new(TimeLimitBackend { next, limit }))
        }))
    },
};

/// The delay filter's forms (`2`, `0.5`, `2s`, `100ms`) plus minutes
/// (`5m`), which a connection limit is often counted in.
fn parse_limit(v: &str) -> std::result::Result<Duration, String> {
    if let Some(m) = v.trim().strip_suffix('m') {
        let x: f64 = m
            .trim()
            .parse()
            .map_err(|_| "expected a time such as 60, 30s, 500ms or 5m".to_string())?;
        return Duration::try_from_secs_f64(x * 60.0)
            .map_err(|_| "expected a time of zero or more".to_string());
    }
    crate::delay::parse_delay(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse() {
        assert_eq!(parse_limit("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_limit("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_limit("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_limit("soon").is_err());
        assert!(parse_limit("-1").is_err());
    }
}
