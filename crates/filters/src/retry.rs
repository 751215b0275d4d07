//! `retry`: when a request fails, close the layers below, open them again
//! and retry, a few times with growing delays — for plugins whose
//! connection to a remote source can drop (curl, ssh, nbd).  A failed
//! open is retried the same way.  The client
//! sees the error only when every attempt has failed.  "Not supported"
//! errors are answers, not failures, and are never retried.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use nbdkit_backend::RwLockExt;
use nbdkit_backend::{
    layer_fn, Backend, BlockSize, CacheMode, ConfigError, Error, ErrorKind, Extents, FilterSpec,
    FuaMode, Handle, Param, Result, StatusKind, ZeroFlags, ZeroMode,
};

#[derive(Debug, Clone, Copy)]
struct Policy {
    retries: u32,
    delay: Duration,
    exponential: bool,
    /// After the first failure, reopen the plugin read-only for the rest
    /// of the connection (nbdkit's retry-readonly).
    readonly_after_failure: bool,
}

impl Policy {
    /// Run `f` (given the number of the try, 0 first) until it succeeds,
    /// fails with ENOTSUP, or the retries are used up, waiting the delay
    /// (doubled each time with retry-exponential) between tries: the one
    /// loop for both opens and requests.  An outer `Err` from `f` is not
    /// retried (e.g. a write refused after a read-only reopen).
    fn run<T>(&self, what: &str, mut f: impl FnMut(u32) -> Result<Result<T>>) -> Result<T> {
        let mut delay = self.delay;
        let mut attempt = 0;
        loop {
            match f(attempt)? {
                Ok(v) => return Ok(v),
                Err(e) if e.kind() == ErrorKind::NotSupported || attempt >= self.retries => {
                    return Err(e)
                }
                Err(e) => {
                    attempt += 1;
                    tracing::debug!(
                        "retry filter: {what} failed ({e}); retry {attempt} of {} in {delay:?}",
                        self.retries
                    );
                    if !delay.is_zero() {
                        std::thread::sleep(delay);
                    }
                    if self.exponential {
                        delay = delay.saturating_mul(2);
                    }
                }
            }
        }
    }
}

struct RetryBackend {
    next: Arc<dyn Backend>,
    p: Policy,
}

impl Backend for RetryBackend {
    fn name(&self) -> &str {
        "retry"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        // A failed open is retried like a failed request (as nbdkit's
        // filter does): a remote source may be down for a moment just
        // when the client connects.
        let mut attempts = 0;
        let h = self.p.run("open", |attempt| {
            attempts = attempt;
            // After a failure, retry-readonly opens read-only.
            let ro = readonly || (attempt > 0 && self.p.readonly_after_failure);
            Ok(self.next.open(ro, export))
        })?;
        Ok(Box::new(RetryHandle {
            backend: self.next.clone(),
            readonly,
            reopens: AtomicU32::new(attempts),
            export: export.to_string(),
            p: self.p,
            cur: RwLock::new(Some(h)),
        }))
    }
}

/// The handle below can be replaced, so this filter cannot lend it out
/// through `next()`: every method is written out and goes through `with`.
struct RetryHandle {
    backend: Arc<dyn Backend>,
    /// The connection's own mode (reopens with retry-readonly are
    /// read-only whatever this says).
    readonly: bool,
    /// How many times the layers below were reopened.
    reopens: AtomicU32,
    export: String,
    p: Policy,
    /// `None` after a reopen failed; the next attempt reopens again.
    cur: RwLock<Option<Box<dyn Handle>>>,
}

/// A request against the handle now below: the layers below may have
/// been reopened with a different size or different capabilities since
/// the client connected, so each attempt checks the request against the
/// handle it is about to use.  A failed check is a failure like any
/// other, and is retried (the next reopen may bring the capability back).
fn in_range(h: &dyn Handle, offset: u64, count: u64, is_write: bool) -> Result<()> {
    let size = h.size()?;
    if offset.checked_add(count).is_none_or(|end| end > size) {
        let kind = if is_write {
            ErrorKind::NoSpace
        } else {
            ErrorKind::Io
        };
        return Err(Error::new(
            kind,
            format!("retry filter: request beyond the end of the reopened plugin ({size} bytes)"),
        ));
    }
    Ok(())
}

fn fua_ok(h: &dyn Handle, fua: bool) -> Result<()> {
    if fua && h.can_fua()? == FuaMode::None {
        return Err(Error::io(
            "retry filter: the reopened plugin does not support FUA",
        ));
    }
    Ok(())
}

fn lost(what: &str) -> Error {
    Error::new(
        ErrorKind::ReadOnly,
        format!("retry filter: the reopened plugin does not support {what}"),
    )
}

impl RetryHandle {
    /// Call `f` on the current handle once, without retrying (capability
    /// queries: the server reads them once at open).
    fn once<T>(&self, f: impl FnOnce(&dyn Handle) -> Result<T>) -> Result<T> {
        let g = self.cur.read_unpoisoned();
        match g.as_deref() {
            Some(h) => f(h),
            None => Err(Error::new(
                ErrorKind::Shutdown,
                "retry filter: the plugin could not be reopened",
            )),
        }
    }

    /// With retry-readonly, write-like requests fail at once (EROFS) once
    /// the connection has been reopened, without a retry.
    fn writable(&self) -> Result<()> {
        if self.p.readonly_after_failure && self.reopens.load(Ordering::SeqCst) > 0 {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                "retry filter: the connection was reopened read-only after a failure (retry-readonly)",
            ));
        }
        Ok(())
    }

    fn reopen(&self) {
        let mut g = self.cur.write_unpoisoned();
        // Close the old handle before opening a new one, as a plugin with
        // a connection limit would need.
        *g = None;
        self.reopens.fetch_add(1, Ordering::SeqCst);
        let readonly = self.readonly || self.p.readonly_after_failure;
        match self.backend.open(readonly, &self.export) {
            Ok(h) => *g = Some(h),
            Err(e) => tracing::warn!("retry filter: reopen failed: {e}"),
        }
    }

    fn with<T>(
        &self,
        what: &str,
        write: bool,
        mut f: impl FnMut(&dyn Handle) -> Result<T>,
    ) -> Result<T> {
        self.p.run(what, |attempt| {
            if attempt > 0 {
                self.reopen();
            }
            if write {
                self.writable()?;
            }
            Ok(self.once(&mut f))
        })
    }

    /// Either block status answer.  A failed attempt may have added some
    /// extents: collect each attempt separately and keep only a successful
    /// one.
    fn status(
        &self,
        kind: StatusKind,
        offset: u64,
        count: u64,
        req_one: bool,
        extents: &mut Extents,
    ) -> Result<()> {
        let what = match kind {
            StatusKind::Allocation => "extents",
            StatusKind::Depth => "allocation_depth",
        };
        let got = self.with(what, false, |h| {
            in_range(h, offset, count, false)?;
            if kind == StatusKind::Allocation && !h.can_extents()? {
                return Err(Error::io(
                    "retry filter: the reopened plugin does not support extents",
                ));
            }
            let mut e = Extents::new(extents.start(), extents.end());
            kind.query(h, offset, count, req_one, &mut e)?;
            Ok(e)
        })?;
        for e in got.list() {
            extents.add(e.offset, e.length, e.flags)?;
        }
        Ok(())
    }
}

impl Drop for RetryHandle {
    fn drop(&mut self) {
        tracing::debug!(
            "retry filter: reopens needed: {}",
            self.reopens.load(Ordering::SeqCst)
        );
    }
}

impl Handle for RetryHandle {
    fn size(&self) -> Result<u64> {
        self.once(|h| h.size())
    }
    fn block_size(&self) -> Result<Option<BlockSize>> {
        self.once(|h| h.block_size())
    }
    fn export_description(&self) -> Result<Option<String>> {
        self.once(|h| h.export_description())
    }
    fn can_write(&self) -> Result<bool> {
        self.once(|h| h.can_write())
    }
    fn can_flush(&self) -> Result<bool> {
        self.once(|h| h.can_flush())
    }
    fn is_rotational(&self) -> Result<bool> {
        self.once(|h| h.is_rotational())
    }
    fn can_trim(&self) -> Result<bool> {
        self.once(|h| h.can_trim())
    }
    fn can_zero(&self) -> Result<ZeroMode> {
        self.once(|h| h.can_zero())
    }
    fn can_fast_zero(&self) -> Result<bool> {
        self.once(|h| h.can_fast_zero())
    }
    fn can_extents(&self) -> Result<bool> {
        self.once(|h| h.can_extents())
    }
    fn can_fua(&self) -> Result<FuaMode> {
        self.once(|h| h.can_fua())
    }
    fn can_multi_conn(&self) -> Result<bool> {
        self.once(|h| h.can_multi_conn())
    }
    fn can_cache(&self) -> Result<CacheMode> {
        self.once(|h| h.can_cache())
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.with("read", false, |h| {
            in_range(h, offset, buf.len() as u64, false)?;
            h.pread(buf, offset)
        })
    }
    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.with("write", true, |h| {
            in_range(h, offset, buf.len() as u64, true)?;
            if !h.can_write()? {
                return Err(lost("writes"));
            }
            fua_ok(h, fua)?;
            h.pwrite(buf, offset, fua)
        })
    }
    fn flush(&self) -> Result<()> {
        self.with("flush", false, |h| {
            if !h.can_flush()? {
                return Err(Error::io(
                    "retry filter: the reopened plugin does not support flush",
                ));
            }
            h.flush()
        })
    }
    fn trim(&self, offset: u64, count: u64, fua: bool) -> Result<()> {
        self.with("trim", true, |h| {
            in_range(h, offset, count, true)?;
            if !h.can_trim()? {
                return Err(lost("trim"));
            }
            fua_ok(h, fua)?;
            h.trim(offset, count, fua)
        })
    }
    fn zero(&self, offset: u64, count: u64, flags: ZeroFlags) -> Result<()> {
        self.with("zero", true, |h| {
            // A fast zero the plugin below cannot do is an answer, not a
            // failure: ENOTSUP at once.
            if flags.fast && !h.can_fast_zero()? {
                return Err(Error::not_supported(
                    "retry filter: the reopened plugin cannot zero fast",
                ));
            }
            in_range(h, offset, count, true)?;
            if h.can_zero()? == ZeroMode::None {
                return Err(lost("zero"));
            }
            fua_ok(h, flags.fua)?;
            h.zero(offset, count, flags)
        })
    }
    status_by_kind!();
    fn cache(&self, offset: u64, count: u64) -> Result<()> {
        self.with("cache", false, |h| {
            in_range(h, offset, count, false)?;
            if h.can_cache()? == CacheMode::None {
                return Err(Error::io(
                    "retry filter: the reopened plugin does not support cache",
                ));
            }
            h.cache(offset, count)
        })
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "retry",
    summary: "reopen the plugin and retry failed requests",
    description: "Example:\n  nbdkit-rs --filter=retry file disk.img retries=5 retry-delay=1",
    params: &[
        Param {
            name: "retries",
            help: "how many times to retry a failed request (default 5)",
        },
        Param {
            name: "retry-delay",
            help: "wait before the first retry: seconds, or with s/ms (default 2)",
        },
        Param {
            name: "retry-exponential",
            help: "double the delay after each retry (default true)",
        },
        Param {
            name: "retry-readonly",
            help: "after a failure, reopen the plugin read-only for the rest of the connection (default false)",
        },
    ],
    configure: |cfg| {
        let err = |e: ConfigError| ConfigError::new(format!("retry filter: {e}"));
        let retries = cfg.take_parse::<u32>("retries").map_err(err)?.unwrap_or(5);
        let delay = match cfg.take("retry-delay") {
            None => Duration::from_secs(2),
            Some(v) => crate::delay::parse_delay(&v)
                .map_err(|e| ConfigError::new(format!("retry filter: retry-delay={v}: {e}")))?,
        };
        let exponential = cfg
            .take_bool("retry-exponential")
            .map_err(err)?
            .unwrap_or(true);
        let readonly_after_failure = cfg
            .take_bool("retry-readonly")
            .map_err(err)?
            .unwrap_or(false);
        let p = Policy {
            retries,
            delay,
            exponential,
            readonly_after_failure,
        };
        Ok(layer_fn(move |next| Ok(Arc::new(RetryBackend { next, p }))))
    },
};

#[cfg(test)]
mod tests {
    use super::*;
    use nbdkit_backend::Config;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Every handle fails its reads until `fail_opens` handles have been
    /// opened; counts opens and reads.
    struct Flaky {
        fail_opens: u32,
        opens: Arc<AtomicU32>,
        reads: Arc<AtomicU32>,
        modes: Arc<std::sync::Mutex<Vec<bool>>>,
    }
    struct FlakyHandle {
        broken: bool,
        reads: Arc<AtomicU32>,
    }
    impl Backend for Flaky {
        fn name(&self) -> &str {
            "flaky"
        }
        fn open(&self, readonly: bool, _: &str) -> Result<Box<dyn Handle>> {
            self.modes.lock().unwrap().push(readonly);
            let n = self.opens.fetch_add(1, Ordering::SeqCst) + 1;
            Ok(Box::new(FlakyHandle {
                broken: n <= self.fail_opens,
                reads: self.reads.clone(),
            }))
        }
    }
    impl Handle for FlakyHandle {
        fn size(&self) -> Result<u64> {
            Ok(512)
        }
        fn pread(&self, buf: &mut [u8], _: u64) -> Result<()> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            if self.broken {
                return Err(Error::io("connection lost"));
            }
            buf.fill(7);
            Ok(())
        }
        nbdkit_backend::capabilities! {
            can_write: true, can_zero: ZeroMode::Native, can_fast_zero: false,
        }
        fn zero(&self, _: u64, _: u64, _: ZeroFlags) -> Result<()> {
            Err(Error::not_supported("zeroing is not supported here"))
        }
    }

    fn run(fail_opens: u32, retries: &str) -> (Result<()>, u32, u32, Box<dyn Handle>) {
        let opens = Arc::new(AtomicU32::new(0));
        let reads = Arc::new(AtomicU32::new(0));
        let mut cfg = Config::new(vec![
            ("retries".into(), retries.into()),
            ("retry-delay".into(), "0".into()),
        ]);
        let layer = (SPEC.configure)(&mut cfg).unwrap();
        let b = layer
            .layer(Arc::new(Flaky {
                fail_opens,
                opens: opens.clone(),
                reads: reads.clone(),
                modes: Arc::default(),
            }))
            .unwrap();
        let h = b.open(false, "").unwrap();
        let mut buf = [0u8; 4];
        let r = h.pread(&mut buf, 0);
        if r.is_ok() {
            assert_eq!(buf, [7; 4]);
        }
        (
            r,
            opens.load(Ordering::SeqCst),
            reads.load(Ordering::SeqCst),
            h,
        )
    }

    #[test]
    fn recovers_after_reopening() {
        let (r, opens, reads, _) = run(2, "5");
        assert!(r.is_ok());
        assert_eq!((opens, reads), (3, 3));
    }

    #[test]
    fn gives_up_after_the_retries() {
        let (r, opens, reads, h) = run(100, "3");
        assert_eq!(r.unwrap_err().kind(), ErrorKind::Io);
        assert_eq!((opens, reads), (4, 4));
        // ENOTSUP is an answer: not retried (no reopen).
        let e = h.zero(0, 1, ZeroFlags::default()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotSupported);
        let fast = ZeroFlags {
            fast: true,
            ..ZeroFlags::default()
        };
        let e = h.zero(0, 1, fast).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotSupported);
    }

    /// Refuses the first `fails` opens, then opens working handles.
    struct SlowToOpen {
        fails: AtomicU32,
        modes: Arc<std::sync::Mutex<Vec<bool>>>,
    }
    impl Backend for SlowToOpen {
        fn name(&self) -> &str {
            "slow"
        }
        fn open(&self, readonly: bool, _: &str) -> Result<Box<dyn Handle>> {
            self.modes.lock().unwrap().push(readonly);
            if self.fails.load(Ordering::SeqCst) > 0 {
                self.fails.fetch_sub(1, Ordering::SeqCst);
                return Err(Error::io("server not up yet"));
            }
            Ok(Box::new(FlakyHandle {
                broken: false,
                reads: Arc::default(),
            }))
        }
    }

    #[test]
    fn a_failed_open_is_retried() {
        let open = |fails: u32, params: &[(&str, &str)]| {
            let modes = Arc::new(std::sync::Mutex::new(Vec::new()));
            let mut cfg = Config::from_pairs(params);
            let b = (SPEC.configure)(&mut cfg)
                .unwrap()
                .layer(Arc::new(SlowToOpen {
                    fails: AtomicU32::new(fails),
                    modes: modes.clone(),
                }))
                .unwrap();
            let r = b.open(false, "");
            let modes = modes.lock().unwrap().clone();
            (r, modes)
        };
        let quick = [("retry-delay", "0"), ("retries", "3")];
        let (h, modes) = open(3, &quick);
        let mut buf = [0u8; 4];
        h.unwrap().pread(&mut buf, 0).unwrap();
        assert_eq!(buf, [7; 4]);
        assert_eq!(modes, [false; 4]);
        let (h, modes) = open(4, &quick);
        assert_eq!(h.err().unwrap().message(), "server not up yet");
        assert_eq!(modes.len(), 4);
        // retry-readonly: the retries open read-only, and writes are then
        // refused.
        let (h, modes) = open(1, &[("retry-delay", "0"), ("retry-readonly", "yes")]);
        assert_eq!(modes, [false, true]);
        let e = h.unwrap().pwrite(&[1], 0, false).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ReadOnly);
    }

    #[test]
    fn retry_readonly_reopens_read_only_and_refuses_writes() {
        let modes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut cfg = Config::new(vec![
            ("retry-delay".into(), "0".into()),
            ("retry-readonly".into(), "yes".into()),
        ]);
        let b = (SPEC.configure)(&mut cfg)
            .unwrap()
            .layer(Arc::new(Flaky {
                fail_opens: 1,
                opens: Arc::default(),
                reads: Arc::default(),
                modes: modes.clone(),
            }))
            .unwrap();
        let h = b.open(false, "").unwrap();
        let mut buf = [0u8; 4];
        h.pread(&mut buf, 0).unwrap();
        assert_eq!(*modes.lock().unwrap(), [false, true]);
        let e = h.pwrite(&[1], 0, false).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ReadOnly);
        assert!(e.to_string().contains("retry-readonly"), "{e}");
        // A new connection opens in its own mode again.
        let _h2 = b.open(false, "").unwrap();
        assert_eq!(*modes.lock().unwrap(), [false, true, false]);
    }
}
