//! `limit`: allow at most N clients at once.  A client counts from the
//! moment it opens an export (NBD_OPT_GO) until it disconnects; one more
//! is refused when it asks to open the export, with an error message
//! saying why (nbdkit instead drops it at accept: the backend interface
//! has no hook there).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nbdkit_backend::{
    Backend, ConfigError, Error, ErrorKind, FilterSpec, Handle, Layer, Param, Result,
};

struct LimitLayer(u64);

impl Layer for LimitLayer {
    fn layer(
        self: Box<Self>,
        next: Arc<dyn Backend>,
    ) -> std::result::Result<Arc<dyn Backend>, ConfigError> {
        Ok(Arc::new(Limit {
            next,
            limit: self.0,
            open: Arc::new(AtomicU64::new(0)),
        }))
    }
}

struct Limit {
    next: Arc<dyn Backend>,
    limit: u64,
    open: Arc<AtomicU64>,
}

impl Backend for Limit {
    fn name(&self) -> &str {
        "limit"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        // Claim a slot first, so two clients racing for the last one
        // cannot both get it.
        let claimed = self
            .open
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.limit).then_some(n + 1)
            });
        if claimed.is_err() {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!(
                    "limit filter: too many clients (the limit is {})",
                    self.limit
                ),
            ));
        }
        let slot = Slot(self.open.clone());
        let next = self.next.open(readonly, export)?;
        Ok(Box::new(LimitHandle { next, _slot: slot }))
    }
}

/// A claimed client slot, given back when dropped (also when opening the
/// layers below fails).
struct Slot(Arc<AtomicU64>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

struct LimitHandle {
    next: Box<dyn Handle>,
    _slot: Slot,
}

impl Handle for LimitHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "limit",
    summary: "allow at most N clients at once (limit=N, default 1)",
    description: "Example:\n  nbdkit-rs --filter=limit file disk.img limit=2",
    params: &[Param {
        name: "limit",
        help: "the most clients at once (default 1; 0 means no limit)",
    }],
    configure: |cfg| {
        let limit = cfg
            .take_parse::<u64>("limit")
            .map_err(|e| ConfigError::new(format!("limit filter: {e}")))?
            .unwrap_or(1);
        Ok(Box::new(LimitLayer(if limit == 0 {
            u64::MAX
        } else {
            limit
        })))
    },
};

#[cfg(test)]
mod tests {
    use super::*;
    use nbdkit_backend::Config;

    #[test]
    fn slots_are_counted_and_returned() {
        let mut cfg = Config::new(vec![("limit".into(), "2".into())]);
        let layer = (SPEC.configure)(&mut cfg).unwrap();
        let mut pcfg = Config::new(vec![("size".into(), "1M".into())]);
        let plugin = (nbdkit_plugins::memory::SPEC.create)(&mut pcfg).unwrap();
        let b = layer.layer(plugin).unwrap();
        let a = b.open(false, "").unwrap();
        let c = b.open(false, "").unwrap();
        let e = b.open(false, "").err().unwrap();
        assert!(e.to_string().contains("the limit is 2"), "{e}");
        drop(a);
        let _d = b.open(false, "").unwrap();
        drop(c);
    }
}
