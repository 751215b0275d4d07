//! `noextents`: hide allocation information, so clients see the whole
//! disk as data (to test clients that must not depend on block status).

use std::sync::Arc;

use nbdkit_backend::{layer_fn, Backend, Extents, FilterSpec, Handle, Result};

struct NoExtents {
    next: Arc<dyn Backend>,
}

impl Backend for NoExtents {
    fn name(&self) -> &str {
        "noextents"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        Ok(Box::new(NoExtentsHandle {
            next: self.next.open(readonly, export)?,
        }))
    }
}

struct NoExtentsHandle {
    next: Box<dyn Handle>,
}

impl Handle for NoExtentsHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    // The server then answers block status with "all data" itself.
    fn can_extents(&self) -> Result<bool> {
        Ok(false)
    }
    /// Hidden too: one image of depth 1, what a plugin with no
    /// allocation information says.
    fn allocation_depth(
        &self,
        offset: u64,
        count: u64,
        _req_one: bool,
        extents: &mut Extents,
    ) -> Result<()> {
        extents.add(offset, count, 1)
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "noextents",
    summary: "hide block status: every range reports as allocated data",
    description: "Example:\n  nbdkit-rs --filter=noextents file sparse.img",
    params: &[],
    configure: |_| Ok(layer_fn(|next| Ok(Arc::new(NoExtents { next })))),
};
