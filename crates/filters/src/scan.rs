//! `scan`: when a client opens the default export, prefetch the whole
//! disk in the background with cache (NBD_CMD_CACHE) requests to the
//! layers below, staying ahead of the client's reads.  Needs a parallel
//! plugin with native cache support (or `--filter=cache` after this one);
//! otherwise it warns and does nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use nbdkit_backend::{
    layer_fn, Backend, CacheMode, Client, Config, ConfigError, FilterSpec, Handle, Layer, Param,
    Result, ThreadModel,
};

#[derive(Debug, Clone, Copy)]
struct Settings {
    ahead: bool,
    clock: bool,
    forever: bool,
    size: u64,
}

fn configure(c: &mut Config) -> std::result::Result<Box<dyn Layer>, ConfigError> {
    let size = c.take_size("scan-size")?.unwrap_or(2 << 20);
    if size == 0 || !size.is_power_of_two() || size > u32::MAX as u64 {
        return Err(ConfigError::new(format!(
            "scan-size={size}: must be a power of 2 no larger than 2G"
        )));
    }
    let s = Settings {
        ahead: c.take_bool("scan-ahead")?.unwrap_or(true),
        clock: c.take_bool("scan-clock")?.unwrap_or(true),
        forever: c.take_bool("scan-forever")?.unwrap_or(false),
        size,
    };
    Ok(layer_fn(move |next| {
        Ok(Arc::new(Scan {
            next,
            s,
            clock: Arc::new(AtomicU64::new(0)),
        }))
    }))
}

struct Scan {
    next: Arc<dyn Backend>,
    s: Settings,
    /// Where scanning resumes for the next connection (scan-clock).
    clock: Arc<AtomicU64>,
}

impl Backend for Scan {
    fn name(&self) -> &str {
        "scan"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        let next: Arc<dyn Handle> = Arc::from(self.next.open(readonly, export)?);
        let mut h = ScanHandle {
            next,
            ahead: self.s.ahead,
            ctl: Arc::new(Control {
                stop: AtomicBool::new(false),
                read_end: AtomicU64::new(0),
            }),
            thread: None,
        };
        if !export.is_empty() {
            tracing::warn!("scan: warning: not the default export, not scanning");
        } else if self.next.thread_model() != ThreadModel::Parallel {
            tracing::warn!(
                "scan: warning: underlying plugin does not support the parallel thread model, not scanning"
            );
        } else if h.next.can_cache()? != CacheMode::Native {
            tracing::warn!(
                "scan: warning: underlying plugin does not support NBD_CMD_CACHE, not scanning; \
                 try adding --filter=cache after this filter"
            );
        } else {
            let (next, ctl, s, clock) = (h.next.clone(), h.ctl.clone(), self.s, self.clock.clone());
            let client = Client::current();
            let t = std::thread::Builder::new()
                .name("scan".into())
                .spawn(move || {
                    let _current = client.as_ref().map(|c| c.enter());
                    scan_thread(&*next, &ctl, s, &clock)
                })
                .map_err(|e| nbdkit_backend::Error::from_io("scan: starting a thread", e))?;
            h.thread = Some(t);
        }
        Ok(Box::new(h))
    }
}

/// What the connection tells its scanning thread.
struct Control {
    stop: AtomicBool,
    /// The furthest end of a client read (scan-ahead skips to it).
    read_end: AtomicU64,
}

fn scan_thread(next: &dyn Handle, ctl: &Control, s: Settings, clock: &AtomicU64) {
    let size = match next.size() {
        Ok(n) => n,
        Err(e) => {
            tracing::debug!("scan: cannot get the size ({e}), not scanning");
            return;
        }
    };
    loop {
        let mut offset = if s.clock {
            clock.load(Ordering::Relaxed)
        } else {
            0
        };
        while offset < size {
            if ctl.stop.load(Ordering::Relaxed) {
                tracing::debug!("scan: exiting background thread on connection close");
                return;
            }
            offset = offset.max(ctl.read_end.load(Ordering::Relaxed));
            clock.store(offset, Ordering::Relaxed);
            if offset >= size {
                break;
            }
            let n = s.size.min(size - offset);
            // Prefetch is advisory: a failure is not the client's error.
            if let Err(e) = next.cache(offset, n) {
                tracing::debug!("scan: prefetch at {offset} failed: {e}");
            }
            offset += n;
        }
        if !s.forever {
            break;
        }
        clock.store(0, Ordering::Relaxed);
        ctl.read_end.store(0, Ordering::Relaxed);
    }
    tracing::debug!("scan: finished scanning the plugin");
}

struct ScanHandle {
    next: Arc<dyn Handle>,
    ahead: bool,
    ctl: Arc<Control>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for ScanHandle {
    fn drop(&mut self) {
        self.ctl.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Handle for ScanHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if self.ahead && self.thread.is_some() {
            self.ctl
                .read_end
                .fetch_max(offset + buf.len() as u64, Ordering::Relaxed);
        }
        self.next.pread(buf, offset)
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "scan",
    summary: "prefetch the whole disk in the background while a client is connected",
    description: "Issues cache (prefetch) requests across the disk to the layers below.\n\
The plugin must be parallel and support cache natively; add\n\
--filter=cache after this filter for plugins that do not.\n\n\
Example:\n  nbdkit-rs --filter=scan --filter=cache curl https://example.com/disk.img",
    params: &[
        Param {
            name: "scan-ahead",
            help: "BOOL: skip forward past client reads (default true)",
        },
        Param {
            name: "scan-clock",
            help: "BOOL: resume where the last connection stopped (default true)",
        },
        Param {
            name: "scan-forever",
            help: "BOOL: start over after reaching the end (default false)",
        },
        Param {
            name: "scan-size",
            help: "SIZE: prefetch block size, a power of 2 (default 2M)",
        },
    ],
    configure,
};
