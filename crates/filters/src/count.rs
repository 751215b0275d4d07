//! `count`: add up the bytes read, written, zeroed and trimmed through
//! the filter, and report the totals when the server exits, as one debug
//! line (shown with `-v`), the way nbdkit's count filter does.  Only
//! requests that succeeded are counted: the totals say what the plugin
//! actually did.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nbdkit_backend::{layer_fn, Backend, FilterSpec, Handle, Result, ZeroFlags};

#[derive(Default)]
struct Totals {
    read: AtomicU64,
    written: AtomicU64,
    zeroed: AtomicU64,
    trimmed: AtomicU64,
}

impl Totals {
    fn line(&self) -> String {
        format!(
            "count bytes: read {}, written {}, zeroed {}, trimmed {}",
            self.read.load(Ordering::Relaxed),
            self.written.load(Ordering::Relaxed),
            self.zeroed.load(Ordering::Relaxed),
            self.trimmed.load(Ordering::Relaxed)
        )
    }
}

struct CountBackend {
    next: Arc<dyn Backend>,
    totals: Arc<Totals>,
}

impl Backend for CountBackend {
    fn name(&self) -> &str {
        "count"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        Ok(Box::new(CountHandle {
            next: self.next.open(readonly, export)?,
            totals: self.totals.clone(),
        }))
    }
    fn shutdown(&self) {
        self.next.shutdown();
        tracing::debug!("{}", self.totals.line());
    }
}

struct CountHandle {
    next: Box<dyn Handle>,
    totals: Arc<Totals>,
}

/// Add `n` to `counter` when `r` succeeded, and pass `r` on.
fn add<T>(counter: &AtomicU64, n: u64, r: Result<T>) -> Result<T> {
    if r.is_ok() {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    r
}

impl Handle for CountHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let n = buf.len() as u64;
        add(&self.totals.read, n, self.next.pread(buf, offset))
    }
    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        let n = buf.len() as u64;
        add(&self.totals.written, n, self.next.pwrite(buf, offset, fua))
    }
    fn zero(&self, offset: u64, count: u64, flags: ZeroFlags) -> Result<()> {
        add(
            &self.totals.zeroed,
            count,
            self.next.zero(offset, count, flags),
        )
    }
    fn trim(&self, offset: u64, count: u64, fua: bool) -> Result<()> {
        add(
            &self.totals.trimmed,
            count,
            self.next.trim(offset, count, fua),
        )
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "count",
    summary: "count the bytes read, written, zeroed and trimmed",
    description: "When the server exits the totals are logged as a debug message \
(run with -v to see it):\n  count bytes: read N, written N, zeroed N, trimmed N\n\n\
Example:\n  nbdkit-rs -v -U - --filter=count memory 1G --run 'nbdcopy disk.img \"$uri\"'",
    params: &[],
    configure: |_| {
        Ok(layer_fn(|next| {
            Ok(Arc::new(CountBackend {
                next,
                totals: Arc::default(),
            }))
        }))
    },
};

#[cfg(test)]
mod tests {
    use super::*;
    use nbdkit_backend::Config;

    #[test]
    fn counts_only_what_succeeded() {
        let mut pcfg = Config::new(vec![("size".into(), "1M".into())]);
        let plugin = (nbdkit_plugins::memory::SPEC.create)(&mut pcfg).unwrap();
        let backend = CountBackend {
            next: plugin,
            totals: Arc::default(),
        };
        let h = backend.open(false, "").unwrap();
        h.pwrite(&[1; 4096], 0, false).unwrap();
        let mut buf = [0u8; 512];
        h.pread(&mut buf, 0).unwrap();
        h.zero(8192, 1000, ZeroFlags::default()).unwrap();
        h.trim(65536, 4096, false).unwrap();
        assert_eq!(
            backend.totals.line(),
            "count bytes: read 512, written 4096, zeroed 1000, trimmed 4096"
        );

        // A plugin without pwrite refuses writes: nothing is counted.
        struct ReadOnly;
        impl Handle for ReadOnly {
            fn size(&self) -> Result<u64> {
                Ok(4096)
            }
        }
        let h = CountHandle {
            next: Box::new(ReadOnly),
            totals: Arc::default(),
        };
        assert!(h.pwrite(&[1; 10], 0, false).is_err());
        assert!(h.trim(0, 10, false).is_err());
        assert_eq!(
            h.totals.line(),
            "count bytes: read 0, written 0, zeroed 0, trimmed 0"
        );
    }
}
