//! `memory`: a sparse RAM disk.  Only pages that were written hold memory;
//! trimming or zeroing whole pages frees them again, and block status
//! reports unallocated pages as holes.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use nbdkit_backend::{
    is_zero, Backend, CacheMode, ConfigError, Extents, FuaMode, Handle, Param, PluginSpec, Result,
    ZeroFlags, ZeroMode, EXTENT_HOLE, EXTENT_ZERO,
};

/// Bytes per page: large enough to keep the map small, small enough that a
/// 4 KiB write does not allocate much.
const PAGE: u64 = 32 * 1024;
/// Pages are spread over this many locks so parallel requests on different
/// pages do not wait for each other.
const SHARDS: usize = 64;

/// The pages of one disk, shared by every connection (so multi-conn is
/// safe: all clients see one memory).
pub struct SparseMemory {
    size: u64,
    shards: Vec<RwLock<HashMap<u64, Box<[u8]>>>>,
    /// Which pages exist, in order, so block status can skip over holes
    /// of any size.  Only touched when a page is created or freed.
    allocated: RwLock<BTreeSet<u64>>,
}

impl SparseMemory {
    pub fn new(size: u64) -> Self {
        SparseMemory {
            size,
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            allocated: RwLock::new(BTreeSet::new()),
        }
    }

    fn shard(&self, page: u64) -> &RwLock<HashMap<u64, Box<[u8]>>> {
        &self.shards[(page % SHARDS as u64) as usize]
    }

    /// Split `[offset, offset+len)` into (page, offset in page, length) runs.
    fn pages(offset: u64, len: u64) -> impl Iterator<Item = (u64, usize, usize)> {
        let end = offset + len;
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let page = pos / PAGE;
            let within = (pos % PAGE) as usize;
            let n = ((PAGE - within as u64).min(end - pos)) as usize;
            pos += n as u64;
            Some((page, within, n))
        })
    }

    pub fn read(&self, buf: &mut [u8], offset: u64) {
        let mut done = 0;
        for (page, within, n) in Self::pages(offset, buf.len() as u64) {
            let out = &mut buf[done..done + n];
            let shard = self.shard(page).read().unwrap_or_else(|e| e.into_inner());
            match shard.get(&page) {
                Some(p) => out.copy_from_slice(&p[within..within + n]),
                None => out.fill(0),
            }
            done += n;
        }
    }

    pub fn write(&self, buf: &[u8], offset: u64) {
        let mut done = 0;
        for (page, within, n) in Self::pages(offset, buf.len() as u64) {
            let data = &buf[done..done + n];
            done += n;
            let mut shard = self.shard(page).write().unwrap_or_else(|e| e.into_inner());
            match shard.get_mut(&page) {
                Some(p) => p[within..within + n].copy_from_slice(data),
                // Writing zeroes to a page that does not exist changes nothing.
                None if is_zero(data) => {}
                None => {
                    let mut p = vec![0u8; PAGE as usize].into_boxed_slice();
                    p[within..within + n].copy_from_slice(data);
                    shard.insert(page, p);
                    self.index().insert(page);
                }
            }
        }
    }

    /// Zero a range, freeing pages that end up all zero.
    pub fn zero(&self, offset: u64, len: u64) {
        for (page, within, n) in Self::pages(offset, len) {
            let mut shard = self.shard(page).write().unwrap_or_else(|e| e.into_inner());
            let free = match shard.get_mut(&page) {
                None => false,
                Some(_) if n as u64 == PAGE => true,
                Some(p) => {
                    p[within..within + n].fill(0);
                    is_zero(p)
                }
            };
            if free {
                shard.remove(&page);
                self.index().remove(&page);
            }
        }
    }

    fn index(&self) -> std::sync::RwLockWriteGuard<'_, BTreeSet<u64>> {
        self.allocated.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Fill `extents` for `[offset, end)`: allocated pages are data, the
    /// gaps between them holes.
    fn extents(&self, offset: u64, end: u64, req_one: bool, extents: &mut Extents) -> Result<()> {
        let index = self.allocated.read().unwrap_or_else(|e| e.into_inner());
        let mut pos = offset;
        for &page in index.range(offset / PAGE..end.div_ceil(PAGE)) {
            let start = (page * PAGE).max(offset);
            if start > pos {
                extents.add(pos, start - pos, EXTENT_HOLE | EXTENT_ZERO)?;
            }
            let stop = ((page + 1) * PAGE).min(end);
            extents.add(start, stop - start, 0)?;
            pos = stop;
            if req_one && extents.list().len() > 1 {
                return Ok(());
            }
        }
        if pos < end {
            extents.add(pos, end - pos, EXTENT_HOLE | EXTENT_ZERO)?;
        }
        Ok(())
    }

    /// Bytes of page memory in use.
    pub fn allocated_bytes(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|e| e.into_inner()).len() as u64 * PAGE)
            .sum()
    }
}

struct Memory {
    mem: Arc<SparseMemory>,
}

impl Backend for Memory {
    fn name(&self) -> &str {
        "memory"
    }
    fn open(&self, _readonly: bool, _export: &str) -> Result<Box<dyn Handle>> {
        Ok(Box::new(MemoryHandle {
            mem: self.mem.clone(),
        }))
    }
}

struct MemoryHandle {
    mem: Arc<SparseMemory>,
}

/// A connection to `mem` with everything the memory plugin offers
/// (writes, trim, zero, extents, multi-conn), for other RAM-backed plugins.
pub(crate) fn handle(mem: Arc<SparseMemory>) -> Box<dyn Handle> {
    Box::new(MemoryHandle { mem })
}

impl Handle for MemoryHandle {
    fn size(&self) -> Result<u64> {
        Ok(self.mem.size)
    }
    fn can_write(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_flush(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_trim(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_zero(&self) -> Result<ZeroMode> {
        Ok(ZeroMode::Native)
    }
    fn can_fast_zero(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_fua(&self) -> Result<FuaMode> {
        // RAM has nothing to persist.
        Ok(FuaMode::Native)
    }
    fn can_multi_conn(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_extents(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_cache(&self) -> Result<CacheMode> {
        Ok(CacheMode::Native)
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.mem.read(buf, offset);
        Ok(())
    }
    fn pwrite(&self, buf: &[u8], offset: u64, _fua: bool) -> Result<()> {
        self.mem.write(buf, offset);
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn trim(&self, offset: u64, count: u64, _fua: bool) -> Result<()> {
        self.mem.zero(offset, count);
        Ok(())
    }
    fn zero(&self, offset: u64, count: u64, _flags: ZeroFlags) -> Result<()> {
        self.mem.zero(offset, count);
        Ok(())
    }
    fn cache(&self, _offset: u64, _count: u64) -> Result<()> {
        Ok(())
    }
    fn extents(&self, offset: u64, count: u64, req_one: bool, extents: &mut Extents) -> Result<()> {
        self.mem.extents(offset, offset + count, req_one, extents)
    }
}

pub static SPEC: PluginSpec = PluginSpec {
    name: "memory",
    summary: "a sparse RAM disk, shared by all clients, lost on exit",
    description: "Only written pages use memory; trim and zero free them.\n\n\
                  Example:\n  nbdkit-rs -U /tmp/s.sock memory size=1G",
    magic_config_key: Some("size"),
    params: &[Param {
        name: "size",
        help: "virtual size, e.g. 1G (required)",
    }],
    create: |cfg| {
        let size = cfg.take_size("size")?.ok_or_else(|| {
            ConfigError::new("memory: the 'size' parameter is required, e.g. size=1G")
        })?;
        Ok(Arc::new(Memory {
            mem: Arc::new(SparseMemory::new(size)),
        }))
    },
};

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Write(u64, Vec<u8>),
        Zero(u64, u64),
    }

    fn arb_op(size: u64) -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..size, proptest::collection::vec(any::<u8>(), 1..70000)).prop_map(move |(o, d)| {
                let o = o.min(size - d.len() as u64);
                Op::Write(o, d)
            }),
            (0..size, 1u64..100000).prop_map(move |(o, l)| Op::Zero(o, l.min(size - o))),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// The sparse memory behaves exactly like a flat buffer, and
        /// extents never call data a hole.
        #[test]
        fn matches_a_flat_model(ops in proptest::collection::vec(arb_op(300_000), 1..30)) {
            let size = 300_000u64;
            let mem = SparseMemory::new(size);
            let mut model = vec![0u8; size as usize];
            for op in &ops {
                match op {
                    Op::Write(o, d) => { mem.write(d, *o); model[*o as usize..*o as usize + d.len()].copy_from_slice(d); }
                    Op::Zero(o, l) => { mem.zero(*o, *l); model[*o as usize..(*o + *l) as usize].fill(0); }
                }
            }
            let mut all = vec![0u8; size as usize];
            mem.read(&mut all, 0);
            prop_assert!(all == model);
            let h = MemoryHandle { mem: Arc::new(mem) };
            let mut ex = Extents::new(0, size);
            h.extents(0, size, false, &mut ex).unwrap();
            for e in ex.list() {
                if e.flags & EXTENT_ZERO != 0 {
                    prop_assert!(is_zero(&model[e.offset as usize..(e.offset + e.length) as usize]));
                }
            }
        }
    }

    #[test]
    fn trimming_frees_memory() {
        let m = SparseMemory::new(1 << 30);
        m.write(&[1u8; 100_000], 12345);
        assert!(m.allocated_bytes() >= 100_000);
        m.zero(0, 1 << 20);
        assert_eq!(m.allocated_bytes(), 0);
    }
}
