//! `nocache`: change how NBD_CMD_CACHE (prefetch) is advertised and
//! handled.

use std::sync::Arc;

use nbdkit_backend::{layer_fn, Backend, CacheMode, FilterSpec, Handle, Param, Result};

use crate::modes::take_mode;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Not advertised.
    None,
    /// Advertised; the server reads the range and discards it.
    Emulate,
    /// Advertised; requests succeed and do nothing.
    Nop,
}

struct NoCache {
    next: Arc<dyn Backend>,
    mode: Mode,
}

impl Backend for NoCache {
    fn name(&self) -> &str {
        "nocache"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        Ok(Box::new(NoCacheHandle {
            next: self.next.open(readonly, export)?,
            mode: self.mode,
        }))
    }
}

struct NoCacheHandle {
    next: Box<dyn Handle>,
    mode: Mode,
}

impl Handle for NoCacheHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn can_cache(&self) -> Result<CacheMode> {
        Ok(match self.mode {
            Mode::None => CacheMode::None,
            Mode::Emulate => CacheMode::Emulate,
            // Native, so the server calls `cache` below, which does nothing.
            Mode::Nop => CacheMode::Native,
        })
    }
    fn cache(&self, _offset: u64, _count: u64) -> Result<()> {
        Ok(())
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "nocache",
    summary: "disable or change NBD_CMD_CACHE support (cachemode=none|emulate|nop)",
    description: "Example:\n  nbdkit-rs --filter=nocache file disk.img cachemode=nop",
    params: &[Param {
        name: "cachemode",
        help:
            "none (default): not advertised; emulate: read and discard; nop: succeed doing nothing",
    }],
    configure: |cfg| {
        let mode = take_mode(
            cfg,
            "nocache",
            "cachemode",
            &[
                ("none", Mode::None),
                ("emulate", Mode::Emulate),
                ("nop", Mode::Nop),
            ],
            Mode::None,
        )?;
        Ok(layer_fn(move |next| Ok(Arc::new(NoCache { next, mode }))))
    },
};
