//! `cow`: copy-on-write.  The plugin is opened read-only and never
//! written; writes go to an overlay in a sparse temporary file, one per
//! export (as nbdkit >= 1.44), shared by all connections to that export
//! and deleted on exit.  A bitmap says, for each block of
//! `cow-block-size` bytes, whether it is still the plugin's, held in the
//! overlay, or zeroed (trimmed or zeroed whole: reads as zeroes, nothing
//! stored).  A write that covers part of a block first copies the rest of
//! the block from wherever it currently lives.
//!
//! Flush and FUA succeed without doing anything: the overlay is temporary,
//! so there is nothing to make durable.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex, RwLock};

use crate::window::next_extents;
use nbdkit_backend::{
    layer_fn, Backend, CacheMode, ConfigError, Error, Extents, FilterSpec, FuaMode, Handle, Param,
    Result, ZeroFlags, ZeroMode, EXTENT_HOLE, EXTENT_ZERO,
};
use nbdkit_backend::{LockExt, RwLockExt};

/// Where a block's current contents are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum State {
    /// Still the plugin's.
    Base = 0,
    /// Written: the overlay file has the whole block.
    Data = 1,
    /// Trimmed or zeroed whole: reads as zeroes.
    Zero = 2,
}

/// The overlay of one export, shared by every connection to it.
struct Overlay {
    file: File,
    block: u64,
    /// The export's size when the overlay was made (the bitmap only makes
    /// sense for that disk: the plugin must not resize it).
    size: u64,
    /// One `State` per block.  Writers hold it exclusively for the whole
    /// request, so two partial writes to one block cannot both copy the
    /// old block and lose each other's bytes.
    map: RwLock<Vec<State>>,
}

struct CowBackend {
    next: Arc<dyn Backend>,
    block: u64,
    on_read: OnRead,
    on_cache: bool,
    /// By export name (the default export under the name it stands for),
    /// made by the first connection to each and kept until exit.
    overlays: Mutex<HashMap<String, Arc<Overlay>>>,
}

impl CowBackend {
    /// The overlay of `export`, made for a disk of `size` bytes if it has
    /// none yet.
    fn overlay(&self, export: &str, size: u64) -> Result<Arc<Overlay>> {
        let mut overlays = self.overlays.lock_unpoisoned();
        if let Some(ov) = overlays.get(export) {
            if ov.size != size {
                return Err(Error::invalid(format!(
                    "cow filter: export \"{export}\" changed size ({} bytes, now {size}): the overlay cannot follow",
                    ov.size
                )));
            }
            return Ok(ov.clone());
        }
        // An unnamed temporary file: nothing to clean up, whatever happens.
        let file = tempfile::tempfile()
            .map_err(|e| Error::from_io("cow filter: creating the overlay", e))?;
        file.set_len(size)
            .map_err(|e| Error::from_io("cow filter: sizing the overlay", e))?;
        let ov = Arc::new(Overlay {
            file,
            block: self.block,
            size,
            map: RwLock::new(vec![State::Base; size.div_ceil(self.block) as usize]),
        });
        overlays.insert(export.to_string(), ov.clone());
        Ok(ov)
    }
}

impl Backend for CowBackend {
    fn name(&self) -> &str {
        "cow"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, _readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        // The plugin is only ever read, whatever the client may do.
        let next = self.next.open(true, export)?;
        let size = next.size()?;
        let ov = self.overlay(export, size)?;
        Ok(Box::new(CowHandle {
            next,
            size,
            on_read: self.on_read.clone(),
            on_cache: self.on_cache,
            ov,
        }))
    }
}

struct CowHandle {
    next: Box<dyn Handle>,
    size: u64,
    on_read: OnRead,
    on_cache: bool,
    ov: Arc<Overlay>,
}

/// What a write does to the blocks it touches.
enum Change<'a> {
    Write(&'a [u8]),
    Zero,
}

impl CowHandle {
    /// Byte range `[start, end)` of block `b`.
    fn block_range(&self, b: u64) -> (u64, u64) {
        let start = b * self.ov.block;
        (start, (start + self.ov.block).min(self.size))
    }

    /// Runs of blocks in the same state covering `[offset, offset+count)`:
    /// (state, run start, run end) in bytes, clipped to the range.
    fn runs(&self, map: &[State], offset: u64, count: u64) -> Vec<(State, u64, u64)> {
        let end = offset + count;
        let mut out: Vec<(State, u64, u64)> = Vec::new();
        let mut at = offset;
        while at < end {
            let b = at / self.ov.block;
            let (_, bend) = self.block_range(b);
            let st = map.get(b as usize).copied().unwrap_or(State::Base);
            let to = bend.min(end);
            match out.last_mut() {
                Some(last) if last.0 == st => last.2 = to,
                _ => out.push((st, at, to)),
            }
            at = to;
        }
        out
    }

    fn ov_read(&self, buf: &mut [u8], at: u64) -> Result<()> {
        self.ov
            .file
            .read_exact_at(buf, at)
            .map_err(|e| Error::from_io("cow filter: reading the overlay", e))
    }
    fn ov_write(&self, buf: &[u8], at: u64) -> Result<()> {
        self.ov
            .file
            .write_all_at(buf, at)
            .map_err(|e| Error::from_io("cow filter: writing the overlay", e))
    }

    /// Give back the overlay's space for a whole zeroed block (best
    /// effort: the bitmap already says it reads as zeroes).
    fn punch(&self, start: u64, end: u64) {
        // SAFETY: fallocate on a file descriptor we own, with plain integers.
        unsafe {
            libc::fallocate(
                self.ov.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                start as libc::off_t,
                (end - start) as libc::off_t,
            );
        }
    }

    /// Read `[at, at+buf.len())` given the bitmap.
    fn read_with(&self, map: &[State], buf: &mut [u8], offset: u64) -> Result<()> {
        for (st, from, to) in self.runs(map, offset, buf.len() as u64) {
            let part = &mut buf[(from - offset) as usize..(to - offset) as usize];
            match st {
                State::Base => self.next.pread(part, from)?,
                State::Data => self.ov_read(part, from)?,
                State::Zero => part.fill(0),
            }
        }
        Ok(())
    }

    /// Copy every block of `[offset, offset+count)` still in the plugin
    /// into the overlay (cow-on-read, cow-on-cache).
    fn copy_up(&self, offset: u64, count: u64) -> Result<()> {
        let mut map = self.ov.map.write_unpoisoned();
        let first = offset / self.ov.block;
        let last = (offset + count - 1) / self.ov.block;
        let mut buf = vec![0u8; self.ov.block as usize];
        for b in first..=last {
            if map[b as usize] == State::Base {
                let (s, e) = self.block_range(b);
                let blk = &mut buf[..(e - s) as usize];
                self.next.pread(blk, s)?;
                self.ov_write(blk, s)?;
                map[b as usize] = State::Data;
            }
        }
        Ok(())
    }

    /// Apply a write or a zero to `[offset, offset+count)`.
    fn change(&self, offset: u64, count: u64, what: Change<'_>) -> Result<()> {
        let mut map = self.ov.map.write_unpoisoned();
        let end = offset + count;
        let first = offset / self.ov.block;
        let last = (end - 1) / self.ov.block;
        let mut blk = vec![0u8; self.ov.block as usize];
        for b in first..=last {
            let (s, e) = self.block_range(b);
            let (from, to) = (s.max(offset), e.min(end));
            let whole = from == s && to == e;
            match (&what, whole) {
                (Change::Zero, true) => {
                    map[b as usize] = State::Zero;
                    self.punch(s, e);
                }
                (Change::Write(data), true) => {
                    self.ov_write(&data[(s - offset) as usize..(e - offset) as usize], s)?;
                    map[b as usize] = State::Data;
                }
                (_, false) => {
                    // Part of a block: the rest must come from where the
                    // block lives now.
                    let blk = &mut blk[..(e - s) as usize];
                    self.read_with(&map, blk, s)?;
                    let dst = &mut blk[(from - s) as usize..(to - s) as usize];
                    match &what {
                        Change::Write(data) => dst.copy_from_slice(
                            &data[(from - offset) as usize..(to - offset) as usize],
                        ),
                        Change::Zero => dst.fill(0),
                    }
                    self.ov_write(blk, s)?;
                    map[b as usize] = State::Data;
                }
            }
        }
        Ok(())
    }
}

impl Handle for CowHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn source_version(&self) -> Option<String> {
        // Writes land in the overlay: the bytes change while the source
        // below keeps its version.
        None
    }
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }
    nbdkit_backend::capabilities! {
        can_write: true, can_flush: true, can_trim: true, can_zero: ZeroMode::Native,
        can_fast_zero: true,
        // Nothing to persist: FUA is honoured by doing nothing.
        can_fua: FuaMode::Native,
        can_extents: true,
        // One overlay for all connections to an export, read and written
        // through the same file, and flush has nothing to do.
        can_multi_conn: true,
        can_cache: CacheMode::Native,
    }

    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        if self.on_read.active() {
            self.copy_up(offset, buf.len() as u64)?;
        }
        let map = self.ov.map.read_unpoisoned();
        self.read_with(&map, buf, offset)
    }
    fn pwrite(&self, buf: &[u8], offset: u64, _fua: bool) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.change(offset, buf.len() as u64, Change::Write(buf))
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn trim(&self, offset: u64, count: u64, _fua: bool) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        self.change(offset, count, Change::Zero)
    }
    fn zero(&self, offset: u64, count: u64, _flags: ZeroFlags) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        self.change(offset, count, Change::Zero)
    }
    fn cache(&self, offset: u64, count: u64) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        if self.on_cache {
            return self.copy_up(offset, count);
        }
        let map = self.ov.map.read_unpoisoned();
        for (st, from, to) in self.runs(&map, offset, count) {
            if st == State::Base {
                self.next.cache(from, to - from)?;
            }
        }
        Ok(())
    }
    fn extents(&self, offset: u64, count: u64, req_one: bool, extents: &mut Extents) -> Result<()> {
        let base_extents = self.next.can_extents()?;
        let map = self.ov.map.read_unpoisoned();
        for (st, from, to) in self.runs(&map, offset, count) {
            match st {
                State::Data => extents.add(from, to - from, 0)?,
                State::Zero => extents.add(from, to - from, EXTENT_HOLE | EXTENT_ZERO)?,
                State::Base if !base_extents => extents.add(from, to - from, 0)?,
                State::Base => {
                    // A partial answer ends ours; the client asks again.
                    if !next_extents(&*self.next, from, to, req_one, extents)? {
                        return Ok(());
                    }
                }
            }
            if req_one {
                break;
            }
        }
        Ok(())
    }
    /// The overlay is an image of its own over the plugin, as qemu-nbd -s
    /// puts a temporary qcow2 over its image (and reports through -A):
    /// blocks written or zeroed here are depth 1, and the plugin's are one
    /// deeper than it says, except that allocated nowhere stays 0.
    fn allocation_depth(
        &self,
        offset: u64,
        count: u64,
        req_one: bool,
        extents: &mut Extents,
    ) -> Result<()> {
        let map = self.ov.map.read_unpoisoned();
        for (st, from, to) in self.runs(&map, offset, count) {
            if st != State::Base {
                extents.add(from, to - from, 1)?;
            } else {
                let mut below = Extents::new(from, to);
                self.next
                    .allocation_depth(from, to - from, req_one, &mut below)?;
                for e in below.list() {
                    let depth = if e.flags == 0 {
                        0
                    } else {
                        e.flags.saturating_add(1)
                    };
                    extents.add(e.offset, e.length, depth)?;
                }
                // A partial answer ends ours; the client asks again.
                if !below.is_full() {
                    return Ok(());
                }
            }
            if req_one {
                break;
            }
        }
        Ok(())
    }
}

/// cow-on-read: whether reads copy the data they read into the overlay.
#[derive(Debug, Clone)]
enum OnRead {
    Never,
    Always,
    /// While this file exists (checked on every read), so it can be
    /// switched while the server runs.
    WhileExists(std::path::PathBuf),
}

impl OnRead {
    fn active(&self) -> bool {
        match self {
            OnRead::Never => false,
            OnRead::Always => true,
            OnRead::WhileExists(p) => p.exists(),
        }
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "cow",
    summary:
        "copy-on-write: make a read-only plugin writable, keeping writes in a temporary overlay",
    description: "The plugin is opened read-only and never changed; writes, trims and zeroes\n\
go to a sparse temporary overlay, one per export, shared by all connections\n\
to that export.  Flush does nothing: the overlays are lost when the server\n\
exits.\n\n\
Example:\n  nbdkit-rs --filter=cow file base.img cow-block-size=4K",
    params: &[
        Param {
            name: "cow-block-size",
            help: "overlay granularity, a power of two from 4K to 4M (default 64K)",
        },
        Param {
            name: "cow-on-read",
            help: "true: copy blocks into the overlay when they are read; /PATH: only while that file exists",
        },
        Param {
            name: "cow-on-cache",
            help: "true: copy blocks into the overlay on NBD_CMD_CACHE",
        },
    ],
    configure: |cfg| {
        let err = |e: ConfigError| ConfigError::new(format!("cow filter: {e}"));
        let block = cfg
            .take_size("cow-block-size")
            .map_err(err)?
            .unwrap_or(64 << 10);
        if !block.is_power_of_two() || !(4096..=(4 << 20)).contains(&block) {
            return Err(ConfigError::new(format!(
                "cow filter: cow-block-size={block}: must be a power of two from 4096 to 4M"
            )));
        }
        let on_read = match cfg.take("cow-on-read") {
            None => OnRead::Never,
            Some(v) if v.starts_with('/') => OnRead::WhileExists(v.into()),
            Some(v) => match nbdkit_backend::parse_bool(&v) {
                Ok(true) => OnRead::Always,
                Ok(false) => OnRead::Never,
                Err(_) => {
                    return Err(ConfigError::new(format!(
                        "cow filter: cow-on-read={v}: expected true, false or an absolute path"
                    )))
                }
            },
        };
        let on_cache = cfg.take_bool("cow-on-cache").map_err(err)?.unwrap_or(false);
        Ok(layer_fn(move |next| {
            // Fail at start-up, not at the first client, where temporary
            // files cannot be made.
            tempfile::tempfile()
                .map_err(|e| ConfigError::new(format!("cow filter: creating the overlay: {e}")))?;
            Ok(Arc::new(CowBackend {
                next,
                block,
                on_read,
                on_cache,
                overlays: Mutex::new(HashMap::new()),
            }))
        }))
    },
};

#[cfg(test)]
mod tests {
    use super::*;
    use nbdkit_backend::{is_zero, Config};
    use proptest::prelude::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A read-only base with fixed contents that notices any write.
    struct Base {
        data: Vec<u8>,
        written: Arc<AtomicBool>,
    }
    struct BaseHandle {
        data: Vec<u8>,
        written: Arc<AtomicBool>,
    }
    impl Backend for Base {
        fn name(&self) -> &str {
            "base"
        }
        fn open(&self, readonly: bool, _export: &str) -> Result<Box<dyn Handle>> {
            assert!(readonly, "cow must open the plugin read-only");
            Ok(Box::new(BaseHandle {
                data: self.data.clone(),
                written: self.written.clone(),
            }))
        }
    }
    impl Handle for BaseHandle {
        fn size(&self) -> Result<u64> {
            Ok(self.data.len() as u64)
        }
        fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            let o = offset as usize;
            buf.copy_from_slice(&self.data[o..o + buf.len()]);
            Ok(())
        }
        fn pwrite(&self, _buf: &[u8], _offset: u64, _fua: bool) -> Result<()> {
            self.written.store(true, Ordering::SeqCst);
            Err(Error::read_only("base"))
        }
    }

    fn cow(data: Vec<u8>, params: &[(&str, &str)]) -> (Box<dyn Handle>, Arc<AtomicBool>) {
        let written = Arc::new(AtomicBool::new(false));
        let mut cfg = Config::from_pairs(params);
        let layer = (SPEC.configure)(&mut cfg).unwrap();
        let b = layer
            .layer(Arc::new(Base {
                data,
                written: written.clone(),
            }))
            .unwrap();
        (b.open(false, "").unwrap(), written)
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write(u64, Vec<u8>),
        Zero(u64, u64),
        Trim(u64, u64),
        Read(u64, u64),
        Cache(u64, u64),
    }

    const SIZE: u64 = 5 * 4096 + 1000; // a partial last block

    fn op() -> impl Strategy<Value = Op> {
        let range = (0..SIZE).prop_flat_map(|o| (Just(o), 1..=(SIZE - o).min(3 * 4096)));
        prop_oneof![
            range
                .clone()
                .prop_map(|(o, n)| Op::Write(o, (0..n).map(|i| (i * 7 + o) as u8 | 1).collect())),
            range.clone().prop_map(|(o, n)| Op::Zero(o, n)),
            range.clone().prop_map(|(o, n)| Op::Trim(o, n)),
            range.clone().prop_map(|(o, n)| Op::Read(o, n)),
            range.prop_map(|(o, n)| Op::Cache(o, n)),
        ]
    }

    proptest! {
        /// The overlay behaves like a flat disk initialised from the base,
        /// the base is never written, and block status agrees with the data.
        #[test]
        fn matches_a_flat_model(ops in proptest::collection::vec(op(), 1..40),
                                on_read in any::<bool>(), on_cache in any::<bool>()) {
            let base: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
            let params = [("cow-block-size", "4096"),
                          ("cow-on-read", if on_read { "true" } else { "false" }),
                          ("cow-on-cache", if on_cache { "true" } else { "false" })];
            let (h, written) = cow(base.clone(), &params);
            let mut model = base.clone();
            for op in &ops {
                match op {
                    Op::Write(o, d) => {
                        h.pwrite(d, *o, false).unwrap();
                        model[*o as usize..*o as usize + d.len()].copy_from_slice(d);
                    }
                    Op::Zero(o, n) | Op::Trim(o, n) => {
                        if matches!(op, Op::Zero(..)) {
                            h.zero(*o, *n, ZeroFlags::default()).unwrap();
                        } else {
                            h.trim(*o, *n, false).unwrap();
                        }
                        model[*o as usize..(*o + *n) as usize].fill(0);
                    }
                    Op::Read(o, n) => {
                        let mut buf = vec![0u8; *n as usize];
                        h.pread(&mut buf, *o).unwrap();
                        prop_assert_eq!(&buf[..], &model[*o as usize..(*o + *n) as usize]);
                    }
                    Op::Cache(o, n) => h.cache(*o, *n).unwrap(),
                }
            }
            let mut all = vec![0u8; SIZE as usize];
            h.pread(&mut all, 0).unwrap();
            prop_assert!(all == model);
            prop_assert!(!written.load(Ordering::SeqCst));
            let mut ex = Extents::new(0, SIZE);
            h.extents(0, SIZE, false, &mut ex).unwrap();
            prop_assert_eq!(ex.next_offset(), SIZE);
            for e in ex.list() {
                if e.flags & EXTENT_ZERO != 0 {
                    prop_assert!(is_zero(&model[e.offset as usize..(e.offset + e.length) as usize]));
                }
            }
        }
    }

    /// A base whose contents are the export name, repeated.
    struct Named;
    struct NamedHandle(Vec<u8>);
    impl Backend for Named {
        fn name(&self) -> &str {
            "named"
        }
        fn open(&self, _readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
            let size = if export == "big" { 3 * 4096 } else { 2 * 4096 };
            let pattern = export.as_bytes();
            Ok(Box::new(NamedHandle(
                (0..size).map(|i| pattern[i % pattern.len()]).collect(),
            )))
        }
    }
    impl Handle for NamedHandle {
        fn size(&self) -> Result<u64> {
            Ok(self.0.len() as u64)
        }
        fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            buf.copy_from_slice(&self.0[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
    }

    #[test]
    fn each_export_has_its_own_overlay() {
        let mut cfg = Config::new(vec![("cow-block-size".into(), "4K".into())]);
        let b = (SPEC.configure)(&mut cfg)
            .unwrap()
            .layer(Arc::new(Named))
            .unwrap();
        let a1 = b.open(false, "a").unwrap();
        let big = b.open(false, "big").unwrap();
        a1.pwrite(b"XYZ", 10, false).unwrap();
        big.pwrite(b"QQ", 4096, false).unwrap();
        // A second connection to "a" sees the first one's write...
        let a2 = b.open(false, "a").unwrap();
        let mut buf = [0u8; 5];
        a2.pread(&mut buf, 9).unwrap();
        assert_eq!(&buf, b"aXYZa");
        // ... and "big", a different size, has its own overlay.
        assert_eq!(big.size().unwrap(), 3 * 4096);
        big.pread(&mut buf, 9).unwrap();
        assert_eq!(&buf, b"bigbi");
        big.pread(&mut buf[..3], 4095).unwrap();
        assert_eq!(&buf[..3], b"bQQ");
        a2.pread(&mut buf[..3], 4095).unwrap();
        assert_eq!(&buf[..3], b"aaa");
    }

    #[test]
    fn partial_writes_keep_the_rest_of_the_block() {
        let base: Vec<u8> = vec![9; 3 * 4096];
        let (h, written) = cow(base, &[("cow-block-size", "4K")]);
        h.pwrite(&[1, 2, 3], 4095, false).unwrap();
        let mut buf = vec![0u8; 3 * 4096];
        h.pread(&mut buf, 0).unwrap();
        assert_eq!(buf[4094..4099], [9, 1, 2, 3, 9]);
        assert!(buf[..4094].iter().all(|&b| b == 9));
        assert!(buf[4099..].iter().all(|&b| b == 9));
        h.zero(0, 4096, ZeroFlags::default()).unwrap();
        let mut ex = Extents::new(0, 3 * 4096);
        h.extents(0, 3 * 4096, false, &mut ex).unwrap();
        assert_eq!(ex.list()[0].flags, EXTENT_HOLE | EXTENT_ZERO);
        assert_eq!(ex.list()[0].length, 4096);
        assert!(!written.load(Ordering::SeqCst));
        assert!(h.can_write().unwrap());
    }

    /// As qemu-nbd -s -A: what the overlay holds is depth 1, the rest is
    /// the plugin's depth (1 for a plugin) plus one.
    #[test]
    fn the_overlay_is_a_layer_of_its_own_for_allocation_depth() {
        let (h, _) = cow(vec![9; 4 * 4096], &[("cow-block-size", "4K")]);
        h.pwrite(&[1], 4096 + 10, false).unwrap();
        h.zero(2 * 4096, 4096, ZeroFlags::default()).unwrap();
        let mut ex = Extents::new(0, 4 * 4096);
        h.allocation_depth(0, 4 * 4096, false, &mut ex).unwrap();
        let got: Vec<_> = ex.list().iter().map(|e| (e.length, e.flags)).collect();
        assert_eq!(got, [(4096, 2), (2 * 4096, 1), (4096, 2)]);
        let mut one = Extents::new(100, 4 * 4096);
        h.allocation_depth(100, 4 * 4096 - 100, true, &mut one)
            .unwrap();
        assert_eq!(one.list()[0].flags, 2);
        assert_eq!(one.list()[0].offset + one.list()[0].length, 4096);
    }

    #[test]
    fn cow_on_read_path_follows_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let flag = dir.path().join("on");
        let on_read = OnRead::WhileExists(flag.clone());
        assert!(!on_read.active());
        std::fs::write(&flag, b"").unwrap();
        assert!(on_read.active());
        // Parsing: an absolute path, a boolean, or an error naming the key.
        let path = flag.to_str().unwrap();
        let (h, _) = cow(
            vec![5; 8192],
            &[("cow-on-read", path), ("cow-block-size", "4K")],
        );
        let mut buf = [0u8; 16];
        h.pread(&mut buf, 100).unwrap();
        assert_eq!(buf, [5; 16]);
        let mut cfg = Config::new(vec![("cow-on-read".into(), "relative/path".into())]);
        let e = (SPEC.configure)(&mut cfg).err().unwrap().to_string();
        assert!(e.contains("cow-on-read=relative/path"), "{e}");
    }

    #[test]
    fn bad_block_size() {
        for v in ["1000", "2K", "8M"] {
            let mut cfg = Config::new(vec![("cow-block-size".into(), v.into())]);
            let e = (SPEC.configure)(&mut cfg).err().unwrap().to_string();
            assert!(e.contains("power of two from 4096"), "{e}");
        }
    }
}
