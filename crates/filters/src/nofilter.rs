//! `nofilter`: passes every request through unchanged (for testing the
//! filter machinery itself).

use std::sync::Arc;

use nbdkit_backend::{layer_fn, Backend, FilterSpec};

/// Overrides nothing: every method (including `open`, which must be
/// written, and which returns the handle below untouched) goes to `next`.
struct NoFilter {
    next: Arc<dyn Backend>,
}

impl Backend for NoFilter {
    fn name(&self) -> &str {
        "nofilter"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(
        &self,
        readonly: bool,
        export: &str,
    ) -> nbdkit_backend::Result<Box<dyn nbdkit_backend::Handle>> {
        self.next.open(readonly, export)
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "nofilter",
    summary: "pass every request through unchanged (for testing)",
    description: "Example:\n  nbdkit-rs --filter=nofilter memory 1M",
    params: &[],
    configure: |_| Ok(layer_fn(|next| Ok(Arc::new(NoFilter { next })))),
};
