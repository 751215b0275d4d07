//! `blocksize`: let clients send any request while the plugin sees only
//! requests aligned to `minblock` and no larger than `maxdata` (reads and
//! writes) or `maxlen` (trim, zero, cache, block status).  Unaligned heads
//! and tails of writes and zeroes are done by read-modify-write of whole
//! blocks; unaligned parts of a trim are dropped (trim is advisory).  The
//! size is rounded down to a multiple of `minblock`.

use std::sync::{Arc, RwLock};

use crate::window::aligned_extents;
use nbdkit_backend::RwLockExt;
use nbdkit_backend::{
    layer_fn, Backend, BlockSize, ConfigError, Error, Extents, FilterSpec, Handle, Param, Result,
    ZeroFlags,
};

#[derive(Debug, Clone, Copy)]
struct Limits {
    min: u64,
    maxdata: u64,
    maxlen: u64,
}

/// The parameters as given; 0 when not given.  Each connection works out
/// its own [`Limits`] from these and the plugin's block size constraints.
#[derive(Debug, Clone, Copy)]
struct Params {
    minblock: u64,
    maxdata: u64,
    maxlen: u64,
}

impl Params {
    /// nbdkit's rules: the block is the larger of minblock= and the
    /// plugin's minimum; maxdata= defaults to 64M (or maxlen=, if smaller)
    /// and is capped by the plugin's maximum; maxlen= defaults to 4G less
    /// one block; both are rounded down to whole blocks.
    fn limits(&self, plugin: Option<BlockSize>) -> Limits {
        let (pmin, pmax) = plugin.map_or((0, 0), |b| (b.minimum as u64, b.maximum as u64));
        let min = self.minblock.max(1).max(pmin);
        let mut maxdata = match (self.maxdata, self.maxlen) {
            (0, 0) => 64 << 20,
            (0, len) => len.min(64 << 20),
            (data, _) => data,
        };
        if pmax != 0 {
            maxdata = maxdata.min(pmax);
        }
        // Never below one block, or requests could not make progress.
        let maxdata = (maxdata & !(min - 1)).max(min);
        let maxlen = match self.maxlen {
            0 => (1u64 << 32) - min,
            len => (len & !(min - 1)).max(min),
        };
        Limits {
            min,
            maxdata,
            maxlen,
        }
    }
}

struct BlockSizeBackend {
    next: Arc<dyn Backend>,
    params: Params,
    /// Read-modify-write holds this exclusively and aligned writes share
    /// it, so an aligned write cannot land between an RMW's read and
    /// write (which would lose it).  Shared by all connections.
    rmw: Arc<RwLock<()>>,
}

impl Backend for BlockSizeBackend {
    fn name(&self) -> &str {
        "blocksize"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        let next = self.next.open(readonly, export)?;
        let plugin = next.block_size()?;
        let lim = self.params.limits(plugin);
        tracing::debug!(
            "blocksize filter: minblock={} maxdata={} maxlen={}",
            lim.min,
            lim.maxdata,
            lim.maxlen
        );
        let size = next.size()? & !(lim.min - 1);
        Ok(Box::new(BlockSizeHandle {
            next,
            lim,
            preferred: plugin.map_or(0, |b| b.preferred),
            size,
            rmw: self.rmw.clone(),
        }))
    }
}

struct BlockSizeHandle {
    next: Box<dyn Handle>,
    lim: Limits,
    /// The plugin's preferred block size (0 if it has none).
    preferred: u32,
    size: u64,
    rmw: Arc<RwLock<()>>,
}

/// How a range splits: an unaligned head `[offset, head_end)`, an aligned
/// middle `[head_end, mid_end)`, an unaligned tail `[mid_end, end)`.  A
/// range inside one block is all head.
fn split(offset: u64, count: u64, min: u64) -> (u64, u64, u64) {
    let end = offset + count;
    let head_end = offset.next_multiple_of(min).min(end);
    let mid_end = (end & !(min - 1)).max(head_end);
    (head_end, mid_end, end)
}

impl BlockSizeHandle {
    /// Run `f(offset, len)` over `[from, to)` in pieces of at most `max`.
    fn chunks(
        &self,
        from: u64,
        to: u64,
        max: u64,
        mut f: impl FnMut(u64, u64) -> Result<()>,
    ) -> Result<()> {
        let mut at = from;
        while at < to {
            let n = (to - at).min(max);
            f(at, n)?;
            at += n;
        }
        Ok(())
    }

    /// Read-modify-write the block holding `[from, to)` (inside one block),
    /// filling the range from `data` or with zeroes.
    fn rmw(&self, from: u64, to: u64, data: Option<&[u8]>, fua: bool) -> Result<()> {
        let start = from & !(self.lim.min - 1);
        let mut blk = vec![0u8; self.lim.min as usize];
        self.next.pread(&mut blk, start)?;
        let dst = &mut blk[(from - start) as usize..(to - start) as usize];
        match data {
            Some(d) => dst.copy_from_slice(d),
            None => dst.fill(0),
        }
        self.next.pwrite(&blk, start, fua)
    }
}

impl Handle for BlockSizeHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn block_size(&self) -> Result<Option<BlockSize>> {
        // Anything goes for the client; we do the aligning.
        Ok(Some(BlockSize {
            minimum: 1,
            preferred: self.preferred.max(4096).max(self.lim.min as u32),
            maximum: u32::MAX,
        }))
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let (head_end, mid_end, end) = split(offset, buf.len() as u64, self.lim.min);
        let mut blk = vec![0u8; self.lim.min as usize];
        for (from, to) in [(offset, head_end), (mid_end, end)] {
            if from < to {
                let start = from & !(self.lim.min - 1);
                self.next.pread(&mut blk, start)?;
                buf[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&blk[(from - start) as usize..(to - start) as usize]);
            }
        }
        self.chunks(head_end, mid_end, self.lim.maxdata, |at, n| {
            let i = (at - offset) as usize;
            self.next.pread(&mut buf[i..i + n as usize], at)
        })
    }
    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        let (head_end, mid_end, end) = split(offset, buf.len() as u64, self.lim.min);
        let part = |from: u64, to: u64| &buf[(from - offset) as usize..(to - offset) as usize];
        if head_end > offset || end > mid_end {
            let _g = self.rmw.write_unpoisoned();
            for (from, to) in [(offset, head_end), (mid_end, end)] {
                if from < to {
                    self.rmw(from, to, Some(part(from, to)), fua)?;
                }
            }
        }
        let _g = self.rmw.read_unpoisoned();
        self.chunks(head_end, mid_end, self.lim.maxdata, |at, n| {
            self.next.pwrite(part(at, at + n), at, fua)
        })
    }
    fn trim(&self, offset: u64, count: u64, fua: bool) -> Result<()> {
        let (head_end, mid_end, _) = split(offset, count, self.lim.min);
        let _g = self.rmw.read_unpoisoned();
        self.chunks(head_end, mid_end, self.lim.maxlen, |at, n| {
            self.next.trim(at, n, fua)
        })
    }
    fn zero(&self, offset: u64, count: u64, flags: ZeroFlags) -> Result<()> {
        let (head_end, mid_end, end) = split(offset, count, self.lim.min);
        if head_end > offset || end > mid_end {
            if flags.fast {
                return Err(Error::not_supported(
                    "blocksize filter: an unaligned zero needs read-modify-write, which is not fast",
                ));
            }
            let _g = self.rmw.write_unpoisoned();
            for (from, to) in [(offset, head_end), (mid_end, end)] {
                if from < to {
                    self.rmw(from, to, None, flags.fua)?;
                }
            }
        }
        let _g = self.rmw.read_unpoisoned();
        self.chunks(head_end, mid_end, self.lim.maxlen, |at, n| {
            self.next.zero(at, n, flags)
        })
    }
    fn cache(&self, offset: u64, count: u64) -> Result<()> {
        let from = offset & !(self.lim.min - 1);
        let to = (offset + count).next_multiple_of(self.lim.min);
        self.chunks(from, to, self.lim.maxlen, |at, n| self.next.cache(at, n))
    }
    fn extents(&self, offset: u64, count: u64, req_one: bool, extents: &mut Extents) -> Result<()> {
        // Ask for whole blocks (at most maxlen: less than the request is
        // fine, the client asks again for the rest); the caller's extents
        // clip the unaligned ends.
        let min = self.lim.min;
        let from = offset & !(min - 1);
        let len = count.next_multiple_of(min).min(self.lim.maxlen);
        for e in aligned_extents(&*self.next, from, len, req_one, min)? {
            extents.add(e.offset, e.length, e.flags)?;
        }
        Ok(())
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "blocksize",
    summary: "accept any request; pass the plugin only aligned, bounded ones",
    description: "Example:\n  nbdkit-rs --filter=blocksize file disk.img minblock=4K maxdata=1M",
    params: &[
        Param {
            name: "minblock",
            help: "alignment the plugin needs, a power of two up to 64K (default: the plugin's minimum block size, or 1)",
        },
        Param {
            name: "maxdata",
            help: "largest read or write the plugin sees, a multiple of minblock (default 64M, or maxlen if smaller, capped by the plugin's maximum block size)",
        },
        Param {
            name: "maxlen",
            help: "largest trim, zero, cache or block status the plugin sees (default 4G rounded down to minblock)",
        },
    ],
    configure: |cfg| {
        let err = |e: ConfigError| ConfigError::new(format!("blocksize filter: {e}"));
        // Unset (or 0) values come from the plugin's constraints when a
        // client connects.
        let mut take = |key: &str| -> std::result::Result<u64, ConfigError> {
            let v = cfg.take_size(key).map_err(err)?.unwrap_or(0);
            if v > u64::from(u32::MAX) {
                return Err(ConfigError::new(format!(
                    "blocksize filter: {key}={v}: must be less than 4G"
                )));
            }
            Ok(v)
        };
        let min = take("minblock")?;
        let maxdata = take("maxdata")?;
        let maxlen = take("maxlen")?;
        if min != 0 && (!min.is_power_of_two() || min > 65536) {
            return Err(ConfigError::new(format!(
                "blocksize filter: minblock={min}: must be a power of two from 1 to 64K"
            )));
        }
        for (key, v) in [("maxdata", maxdata), ("maxlen", maxlen)] {
            if min != 0 && v != 0 && !v.is_multiple_of(min) {
                return Err(ConfigError::new(format!(
                    "blocksize filter: {key}={v}: must be a multiple of minblock ({min})"
                )));
            }
        }
        let params = Params {
            minblock: min,
            maxdata,
            maxlen,
        };
        Ok(layer_fn(move |next| {
            Ok(Arc::new(BlockSizeBackend {
                next,
                params,
                rmw: Arc::new(RwLock::new(())),
            }))
        }))
    },
};

#[cfg(test)]
mod tests {
    use super::*;
    use nbdkit_backend::Config;
    use proptest::prelude::*;
    use std::sync::Mutex;

    /// A RAM disk that fails any request breaking the limits.
    struct Strict {
        data: Arc<Mutex<Vec<u8>>>,
        lim: Limits,
    }
    struct StrictHandle {
        data: Arc<Mutex<Vec<u8>>>,
        lim: Limits,
    }
    impl Backend for Strict {
        fn name(&self) -> &str {
            "strict"
        }
        fn open(&self, _: bool, _: &str) -> Result<Box<dyn Handle>> {
            Ok(Box::new(StrictHandle {
                data: self.data.clone(),
                lim: self.lim,
            }))
        }
    }
    impl StrictHandle {
        fn check(&self, offset: u64, n: u64, max: u64) -> Result<std::ops::Range<usize>> {
            if !offset.is_multiple_of(self.lim.min)
                || !n.is_multiple_of(self.lim.min)
                || n > max
                || n == 0
            {
                return Err(Error::invalid(format!("bad request {offset}+{n}")));
            }
            Ok(offset as usize..(offset + n) as usize)
        }
    }
    impl Handle for StrictHandle {
        fn size(&self) -> Result<u64> {
            Ok(self.data.lock().unwrap().len() as u64)
        }
        nbdkit_backend::capabilities! {
            can_write: true, can_trim: true,
        }
        fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            let r = self.check(offset, buf.len() as u64, self.lim.maxdata)?;
            buf.copy_from_slice(&self.data.lock().unwrap()[r]);
            Ok(())
        }
        fn pwrite(&self, buf: &[u8], offset: u64, _: bool) -> Result<()> {
            let r = self.check(offset, buf.len() as u64, self.lim.maxdata)?;
            self.data.lock().unwrap()[r].copy_from_slice(buf);
            Ok(())
        }
        fn zero(&self, offset: u64, n: u64, _: ZeroFlags) -> Result<()> {
            let r = self.check(offset, n, self.lim.maxlen)?;
            self.data.lock().unwrap()[r].fill(0);
            Ok(())
        }
        fn trim(&self, offset: u64, n: u64, _: bool) -> Result<()> {
            self.check(offset, n, self.lim.maxlen).map(|_| ())
        }
    }

    const SIZE: u64 = 16 * 512;

    proptest! {
        /// Unaligned requests of any size act on the data as a flat disk
        /// would, while the plugin sees only aligned, bounded requests.
        #[test]
        fn aligned_below_flat_above(ops in proptest::collection::vec(
            (0..4u8, 0..SIZE).prop_flat_map(|(k, o)| (Just(k), Just(o), 1..=(SIZE - o))), 1..30)) {
            let lim = Limits { min: 512, maxdata: 1024, maxlen: 2048 };
            let data = Arc::new(Mutex::new(vec![0u8; SIZE as usize]));
            let mut cfg = Config::new(vec![
                ("minblock".into(), "512".into()),
                ("maxdata".into(), "1024".into()),
                ("maxlen".into(), "2048".into()),
            ]);
            let layer = (SPEC.configure)(&mut cfg).unwrap();
            let b = layer.layer(Arc::new(Strict { data: data.clone(), lim })).unwrap();
            let h = b.open(false, "").unwrap();
            let mut model = vec![0u8; SIZE as usize];
            for (i, (k, o, n)) in ops.iter().enumerate() {
                let r = (*o as usize)..((*o + *n) as usize);
                match k {
                    0 => {
                        let buf: Vec<u8> = (0..*n).map(|j| (j as u8).wrapping_add(i as u8) | 1).collect();
                        h.pwrite(&buf, *o, false).unwrap();
                        model[r].copy_from_slice(&buf);
                    }
                    1 => {
                        h.zero(*o, *n, ZeroFlags::default()).unwrap();
                        model[r].fill(0);
                    }
                    2 => h.trim(*o, *n, false).unwrap(),
                    _ => {
                        let mut buf = vec![0u8; *n as usize];
                        h.pread(&mut buf, *o).unwrap();
                        prop_assert_eq!(&buf[..], &model[r]);
                    }
                }
            }
            prop_assert!(*data.lock().unwrap() == model);
        }
    }

    #[test]
    fn bad_parameters() {
        let conf = |p: &[(&str, &str)]| {
            let mut cfg = Config::from_pairs(p);
            (SPEC.configure)(&mut cfg).err().unwrap().to_string()
        };
        assert!(conf(&[("minblock", "1000")]).contains("power of two"));
        assert!(conf(&[("minblock", "4K"), ("maxdata", "6K")]).contains("multiple of minblock"));
    }
}
