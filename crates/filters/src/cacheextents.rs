//! `cacheextents`: remember the extents of the last block status answer
//! and serve later requests that start inside it from memory, for
//! plugins where one call can return many extents for the cost of one
//! (vddk) and clients that ask one extent at a time (`qemu-img convert`).
//! Any write, trim or zero forgets the cache.  The cache is shared by all
//! connections, as the data is.

use std::sync::{Arc, Mutex};

use nbdkit_backend::LockExt;
use nbdkit_backend::{layer_fn, Backend, Extent, Extents, FilterSpec, Handle, Result, ZeroFlags};

/// The last answer, contiguous and ascending; empty when there is none.
type Cache = Arc<Mutex<Vec<Extent>>>;

struct CacheExtents {
    next: Arc<dyn Backend>,
    cache: Cache,
}

impl Backend for CacheExtents {
    fn name(&self) -> &str {
        "cacheextents"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        Ok(Box::new(CacheExtentsHandle {
            next: self.next.open(readonly, export)?,
            cache: self.cache.clone(),
        }))
    }
}

struct CacheExtentsHandle {
    next: Box<dyn Handle>,
    cache: Cache,
}

impl CacheExtentsHandle {
    fn forget(&self) {
        self.cache.lock_unpoisoned().clear();
    }
}

impl Handle for CacheExtentsHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn extents(&self, offset: u64, count: u64, _req_one: bool, out: &mut Extents) -> Result<()> {
        let mut cache = self.cache.lock_unpoisoned();
        let hit = match (cache.first(), cache.last()) {
            (Some(f), Some(l)) => offset >= f.offset && offset < l.offset + l.length,
            _ => false,
        };
        if hit {
            tracing::debug!("cacheextents: returning from cache");
            // Start at the cached extent holding `offset`.
            let i = cache.partition_point(|e| e.offset + e.length <= offset);
            for e in &cache[i..] {
                out.add(e.offset, e.length, e.flags)?;
            }
            return Ok(());
        }
        tracing::debug!("cacheextents: cache miss");
        // Ask for everything the plugin will give, not just one extent.
        let mut got = Extents::new(out.start(), out.end());
        self.next.extents(offset, count, false, &mut got)?;
        for e in got.list() {
            out.add(e.offset, e.length, e.flags)?;
        }
        *cache = got.into_vec();
        Ok(())
    }
    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.forget();
        self.next.pwrite(buf, offset, fua)
    }
    fn trim(&self, offset: u64, count: u64, fua: bool) -> Result<()> {
        self.forget();
        self.next.trim(offset, count, fua)
    }
    fn zero(&self, offset: u64, count: u64, flags: ZeroFlags) -> Result<()> {
        self.forget();
        self.next.zero(offset, count, flags)
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "cacheextents",
    summary: "cache the last block status answer",
    description: "Serves block status requests that start inside the last answer from\n\
memory; writes, trims and zeroes forget it.\n\n\
Example:\n  nbdkit-rs -U - --filter=cacheextents --run 'qemu-img map $nbd' vddk ...",
    params: &[],
    configure: |_| {
        Ok(layer_fn(|next| {
            Ok(Arc::new(CacheExtents {
                next,
                cache: Arc::new(Mutex::new(Vec::new())),
            }))
        }))
    },
};
