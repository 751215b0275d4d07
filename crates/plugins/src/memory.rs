//! `memory`: a sparse RAM disk.  Only pages that were written hold memory;
//! trimming or zeroing whole pages frees them again, and block status
//! reports unallocated pages as holes.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use nbdkit_backend::RwLockExt;
use nbdkit_backend::{
    is_zero, Backend, CacheMode, ConfigError, Error, Extents, FuaMode, Handle, Param, PluginSpec,
    Result, ZeroFlags, ZeroMode, EXTENT_HOLE, EXTENT_ZERO,
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
    /// Grows with `extend` (sparse and zstd allocators only).
    size: AtomicU64,
    shards: Vec<RwLock<HashMap<u64, Box<[u8]>>>>,
    /// Which pages exist, in order, so block status can skip over holes
    /// of any size.  Only touched when a page is created or freed.
    allocated: RwLock<BTreeSet<u64>>,
    /// `allocator=zstd`: each stored page is zstd-compressed.
    compressed: bool,
    /// `allocator=malloc`: one flat mapping of the whole disk instead of
    /// pages (never sparse; block status says everything is data).
    flat: Option<RwLock<memmap2::MmapMut>>,
}

/// How the memory and data plugins hold the disk (`allocator=`, as
/// nbdkit: `sparse` (the default), `malloc[,mlock=true]` or `zstd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocator {
    Sparse,
    Malloc { mlock: bool },
    Zstd,
}

impl Allocator {
    /// Parse an `allocator=` value: the type, then `,key=value`
    /// parameters (only malloc has one: `mlock`).
    pub fn parse(who: &str, value: &str) -> std::result::Result<Allocator, ConfigError> {
        let mut parts = value.split(',');
        let kind = parts.next().unwrap_or_default();
        let mut mlock = None;
        for p in parts.filter(|p| !p.is_empty()) {
            let (k, v) = p.split_once('=').unwrap_or((p, "1"));
            match (kind, k) {
                ("malloc", "mlock") => {
                    mlock = Some(nbdkit_backend::config::parse_bool(v).map_err(|e| {
                        ConfigError::new(format!("{who}: allocator={value}: mlock={v}: {e}"))
                    })?)
                }
                _ if k.is_empty() => {
                    return Err(ConfigError::new(format!(
                        "{who}: allocator={value}: invalid allocator parameter '{p}' (expected key=value)"
                    )))
                }
                _ => {
                    return Err(ConfigError::new(format!(
                        "{who}: allocator={value}: allocator={kind} has no parameter '{k}' (only malloc takes mlock=true|false)"
                    )))
                }
            }
        }
        match kind {
            "sparse" => Ok(Allocator::Sparse),
            "malloc" => Ok(Allocator::Malloc { mlock: mlock.unwrap_or(false) }),
            "zstd" => Ok(Allocator::Zstd),
            _ => Err(ConfigError::new(format!(
                "{who}: allocator={value}: unknown allocator '{kind}' (expected sparse, malloc[,mlock=true] or zstd)"
            ))),
        }
    }
}

/// zstd level for compressed pages: fast, as nbdkit's (pages are
/// recompressed on every write).
const ZSTD_LEVEL: i32 = 1;

impl SparseMemory {
    pub fn new(size: u64) -> Self {
        SparseMemory {
            size: AtomicU64::new(size),
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            allocated: RwLock::new(BTreeSet::new()),
            compressed: false,
            flat: None,
        }
    }

    /// A disk of `size` bytes held the way `allocator` says.  malloc
    /// reserves the whole size now (zero pages are only touched when
    /// written), and with mlock locks it into RAM.
    pub fn with_allocator(
        who: &str,
        size: u64,
        allocator: Allocator,
    ) -> std::result::Result<Self, ConfigError> {
        let mut m = SparseMemory::new(size);
        match allocator {
            Allocator::Sparse => {}
            Allocator::Zstd => m.compressed = true,
            Allocator::Malloc { mlock } => {
                let len = usize::try_from(size).map_err(|_| {
                    ConfigError::new(format!(
                        "{who}: allocator=malloc: size {size} does not fit in memory"
                    ))
                })?;
                // An empty mapping is refused by mmap: one byte stands for it.
                let map = memmap2::MmapMut::map_anon(len.max(1)).map_err(|e| {
                    ConfigError::new(format!(
                        "{who}: allocator=malloc: cannot allocate {size} bytes: {e}"
                    ))
                })?;
                if mlock {
                    map.lock().map_err(|e| {
                        ConfigError::new(format!(
                            "{who}: allocator=malloc,mlock=true: mlock of {size} bytes: {e} (raise ulimit -l)"
                        ))
                    })?;
                }
                m.flat = Some(RwLock::new(map));
            }
        }
        Ok(m)
    }

    /// A stored page's bytes, decompressed if need be.
    fn load<'a>(&self, stored: &'a [u8]) -> Result<std::borrow::Cow<'a, [u8]>> {
        if !self.compressed {
            return Ok(std::borrow::Cow::Borrowed(stored));
        }
        let page = zstd::bulk::decompress(stored, PAGE as usize)
            .map_err(|e| Error::io(format!("memory: decompressing a page: {e}")))?;
        if page.len() != PAGE as usize {
            return Err(Error::io("memory: a compressed page has the wrong size"));
        }
        Ok(std::borrow::Cow::Owned(page))
    }

    /// A page as it is stored (compressed for allocator=zstd).
    fn keep(&self, page: Vec<u8>) -> Result<Box<[u8]>> {
        if !self.compressed {
            return Ok(page.into_boxed_slice());
        }
        zstd::bulk::compress(&page, ZSTD_LEVEL)
            .map(Vec::into_boxed_slice)
            .map_err(|e| Error::io(format!("memory: compressing a page: {e}")))
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

    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if let Some(flat) = &self.flat {
            let map = flat.read_unpoisoned();
            buf.copy_from_slice(&map[offset as usize..offset as usize + buf.len()]);
            return Ok(());
        }
        let mut done = 0;
        for (page, within, n) in Self::pages(offset, buf.len() as u64) {
            let out = &mut buf[done..done + n];
            let shard = self.shard(page).read_unpoisoned();
            match shard.get(&page) {
                Some(p) => out.copy_from_slice(&self.load(p)?[within..within + n]),
                None => out.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    pub fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        if let Some(flat) = &self.flat {
            let mut map = flat.write_unpoisoned();
            map[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            return Ok(());
        }
        let mut done = 0;
        for (page, within, n) in Self::pages(offset, buf.len() as u64) {
            let data = &buf[done..done + n];
            done += n;
            let mut shard = self.shard(page).write_unpoisoned();
            match shard.get_mut(&page) {
                Some(p) if !self.compressed => p[within..within + n].copy_from_slice(data),
                Some(p) => {
                    let mut bytes = self.load(p)?.into_owned();
                    bytes[within..within + n].copy_from_slice(data);
                    *p = self.keep(bytes)?;
                }
                // As nbdkit's sparse array, a write allocates its page
                // even when it writes zeroes (block status then says
                // "zero" but not "hole" there); only zero/trim free pages.
                None => {
                    let mut p = vec![0u8; PAGE as usize];
                    p[within..within + n].copy_from_slice(data);
                    shard.insert(page, self.keep(p)?);
                    self.index().insert(page);
                }
            }
        }
        Ok(())
    }

    /// Zero a range, freeing pages that end up all zero.
    pub fn zero(&self, offset: u64, len: u64) -> Result<()> {
        if let Some(flat) = &self.flat {
            let mut map = flat.write_unpoisoned();
            map[offset as usize..(offset + len) as usize].fill(0);
            return Ok(());
        }
        for (page, within, n) in Self::pages(offset, len) {
            let mut shard = self.shard(page).write_unpoisoned();
            let free = match shard.get_mut(&page) {
                None => false,
                Some(_) if n as u64 == PAGE => true,
                Some(p) => {
                    let mut bytes = self.load(p)?.into_owned();
                    bytes[within..within + n].fill(0);
                    let zero = is_zero(&bytes);
                    if !zero {
                        *p = self.keep(bytes)?;
                    }
                    zero
                }
            };
            if free {
                shard.remove(&page);
                self.index().remove(&page);
            }
        }
        Ok(())
    }

    fn index(&self) -> std::sync::RwLockWriteGuard<'_, BTreeSet<u64>> {
        self.allocated.write_unpoisoned()
    }

    /// Fill `extents` for `[offset, end)`: allocated pages are data, the
    /// gaps between them holes.
    fn extents(&self, offset: u64, end: u64, req_one: bool, extents: &mut Extents) -> Result<()> {
        if self.flat.is_some() {
            // A flat allocation has no holes to report.
            return extents.add(offset, end - offset, 0);
        }
        // The page list is copied out so no shard lock is taken under the
        // index lock (writers take them the other way round).
        let pages: Vec<u64> = {
            let index = self.allocated.read_unpoisoned();
            index
                .range(offset / PAGE..end.div_ceil(PAGE))
                .copied()
                .collect()
        };
        let mut pos = offset;
        for page in pages {
            let start = (page * PAGE).max(offset);
            if start > pos {
                extents.add(pos, start - pos, EXTENT_HOLE | EXTENT_ZERO)?;
            }
            let stop = ((page + 1) * PAGE).min(end);
            let zero = {
                let shard = self.shard(page).read_unpoisoned();
                match shard.get(&page) {
                    Some(p) => is_zero(&self.load(p)?),
                    None => true,
                }
            };
            extents.add(start, stop - start, if zero { EXTENT_ZERO } else { 0 })?;
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
        if self.flat.is_some() {
            return self.size.load(Ordering::Relaxed);
        }
        self.shards
            .iter()
            .map(|s| s.read_unpoisoned().len() as u64 * PAGE)
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
        Ok(self.mem.size.load(Ordering::Relaxed))
    }
    /// Pages are allocated on demand, so growing is only a new size;
    /// malloc's flat mapping has a fixed length.
    fn can_extend(&self) -> Result<bool> {
        Ok(self.mem.flat.is_none())
    }
    fn extend(&self, new_size: u64) -> Result<()> {
        if self.mem.flat.is_some() {
            return Err(nbdkit_backend::Error::not_supported(
                "memory: allocator=malloc cannot grow",
            ));
        }
        self.mem.size.fetch_max(new_size, Ordering::Relaxed);
        Ok(())
    }
    nbdkit_backend::capabilities! {
        can_write: true, can_flush: true, can_trim: true, can_zero: ZeroMode::Native,
        can_fast_zero: true,
        // RAM has nothing to persist.
        can_fua: FuaMode::Native,
        can_multi_conn: true, can_extents: true, can_cache: CacheMode::Native,
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.mem.read(buf, offset)
    }
    fn pwrite(&self, buf: &[u8], offset: u64, _fua: bool) -> Result<()> {
        self.mem.write(buf, offset)
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn trim(&self, offset: u64, count: u64, _fua: bool) -> Result<()> {
        self.mem.zero(offset, count)
    }
    fn zero(&self, offset: u64, count: u64, _flags: ZeroFlags) -> Result<()> {
        self.mem.zero(offset, count)
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
    params: &[
        Param {
            name: "size",
            help: "virtual size, e.g. 1G (required)",
        },
        Param {
            name: "allocator",
            help: "sparse (default), malloc[,mlock=true] (one flat allocation, locked in RAM with mlock) or zstd (compressed pages)",
        },
    ],
    create: |cfg| {
        let size = cfg.take_size("size")?.ok_or_else(|| {
            ConfigError::new("memory: the 'size' parameter is required, e.g. size=1G")
        })?;
        let allocator = match cfg.take("allocator") {
            Some(a) => Allocator::parse("memory", &a)?,
            None => Allocator::Sparse,
        };
        Ok(Arc::new(Memory {
            mem: Arc::new(SparseMemory::with_allocator("memory", size, allocator)?),
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
        fn matches_a_flat_model(
            ops in proptest::collection::vec(arb_op(300_000), 1..30),
            alloc in prop_oneof![Just(Allocator::Sparse), Just(Allocator::Malloc { mlock: false }), Just(Allocator::Zstd)],
        ) {
            let size = 300_000u64;
            let mem = SparseMemory::with_allocator("test", size, alloc).unwrap();
            let mut model = vec![0u8; size as usize];
            for op in &ops {
                match op {
                    Op::Write(o, d) => { mem.write(d, *o).unwrap(); model[*o as usize..*o as usize + d.len()].copy_from_slice(d); }
                    Op::Zero(o, l) => { mem.zero(*o, *l).unwrap(); model[*o as usize..(*o + *l) as usize].fill(0); }
                }
            }
            let mut all = vec![0u8; size as usize];
            mem.read(&mut all, 0).unwrap();
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
    fn allocator_values() {
        assert_eq!(Allocator::parse("m", "sparse").unwrap(), Allocator::Sparse);
        assert_eq!(Allocator::parse("m", "zstd").unwrap(), Allocator::Zstd);
        assert_eq!(
            Allocator::parse("m", "malloc").unwrap(),
            Allocator::Malloc { mlock: false }
        );
        assert_eq!(
            Allocator::parse("m", "malloc,mlock=true").unwrap(),
            Allocator::Malloc { mlock: true }
        );
        assert_eq!(
            Allocator::parse("m", "malloc,mlock").unwrap(),
            Allocator::Malloc { mlock: true }
        );
        for bad in [
            "",
            "foo",
            "sparse,mlock=true",
            "malloc,mlock=maybe",
            "malloc,=1",
            "zstd,level=3",
        ] {
            let e = Allocator::parse("memory", bad).unwrap_err().to_string();
            assert!(e.contains("allocator="), "{bad}: {e}");
        }
    }

    #[test]
    fn zstd_pages_are_compressed() {
        let m = SparseMemory::with_allocator("t", 1 << 20, Allocator::Zstd).unwrap();
        m.write(&[7u8; 100_000], 5).unwrap();
        let stored: usize = m
            .shards
            .iter()
            .map(|s| s.read().unwrap().values().map(|p| p.len()).sum::<usize>())
            .sum();
        assert!(
            stored < 10_000,
            "{stored} bytes stored for 100000 equal bytes"
        );
        let mut back = vec![0u8; 100_010];
        m.read(&mut back, 0).unwrap();
        assert!(back[..5].iter().all(|&b| b == 0) && back[5..100_005].iter().all(|&b| b == 7));
    }

    #[test]
    fn sparse_memory_grows_and_malloc_does_not() {
        let h = handle(Arc::new(SparseMemory::new(4096)));
        assert!(h.can_extend().unwrap());
        h.extend(1 << 20).unwrap();
        assert_eq!(h.size().unwrap(), 1 << 20);
        h.pwrite(&[7; 512], (1 << 20) - 512, false).unwrap();
        h.extend(100).unwrap();
        assert_eq!(h.size().unwrap(), 1 << 20);
        let flat = SparseMemory::with_allocator("t", 4096, Allocator::Malloc { mlock: false });
        let h = handle(Arc::new(flat.unwrap()));
        assert!(!h.can_extend().unwrap());
        assert!(h.extend(8192).is_err());
    }

    #[test]
    fn trimming_frees_memory() {
        let m = SparseMemory::new(1 << 30);
        m.write(&[1u8; 100_000], 12345).unwrap();
        assert!(m.allocated_bytes() >= 100_000);
        m.zero(0, 1 << 20).unwrap();
        assert_eq!(m.allocated_bytes(), 0);
    }
}
