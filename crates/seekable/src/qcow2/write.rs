//! Writing a qcow2 image in place: what qemu-nbd does and nbdkit refuses.
//!
//! Overwrites of clusters the image alone owns (a standard L2 entry with
//! the COPIED flag) go straight to their host clusters, one write for
//! clusters that follow each other in the file.  Anything else
//! (unallocated, a zero cluster, a compressed one, one whose bytes come
//! from the backing file) gets new clusters appended past the end of the
//! file, a write's whole run of such clusters together: a partial cluster
//! at either end of the run has its old content copied in (compressed
//! clusters come back uncompressed), and the run is written at once,
//! without the metadata lock (`write_new` says how the clusters are
//! reserved before and published after).  Refcounts are kept exact (no
//! lazy refcounts, the header's dirty bit is never set).
//!
//! Allocating and writing one cluster at a time under the lock made
//! concurrent writers take turns for every cluster; by runs, a 2 GiB
//! sequential fill into memory is 1.07x-1.28x faster for 7-13% less CPU
//! (docs/benchmarks.md, session 8).
//!
//! Crash safety is the order metadata reaches the file, qemu's own: the
//! L2/L1 changes and refcount increments are kept in memory (reads see
//! them: `Qcow2Reader::pinned_l2` and its L1) until a flush, FUA, the
//! close, or too much of it piles up; then [`Qcow2Writer::flush`] writes
//!
//! 1. the refcount blocks (new ones too), then flushes;
//! 2. new refcount table entries, then flushes;
//! 3. the L2 tables, and (after a flush, so no L1 entry names an unwritten
//!    table) the L1 entries, then flushes;
//! 4. refcount decrements of the clusters those L2 changes let go of,
//!    then flushes.
//!
//! So the file never holds an L2 entry naming a cluster whose refcount is
//! not on disk (a crash leaves leaks, which `qemu-img check` reports and
//! `-r leaks` repairs, never a refcount below its references), and every
//! write followed by a completed flush is in the file.  Each metadata
//! entry is 8 bytes within one sector, so a torn table write leaves each
//! entry old or new, both of which are consistent.
//!
//! Freed clusters are not reused: allocation only moves forward from the
//! end of the file, so a cluster that a concurrent reader (or an
//! in-place writer that looked it up before a trim) still names never
//! holds someone else's data.  The space comes back with
//! `qemu-img convert`.
//!
//! Refused (the writer is not created, with the reason): a corrupt or
//! dirty (lazy refcounts) header, internal snapshots (shared clusters
//! would need copy-on-write of L2 tables as well), extended L2 entries
//! (subcluster bitmaps).  Encryption and external data files are refused
//! already by the reader.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use super::{Qcow2Reader, FORMAT, L2_COMPRESSED, L2_ZERO, OFFSET_MASK};
use crate::sync::{CondvarExt, LockExt, RwLockExt};
use crate::{read_exact, Error, Result};

/// Where a writer's bytes go: the image file, which can grow.
pub trait Sink: Send + Sync {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Make everything written so far durable.
    fn flush(&self) -> io::Result<()>;
    /// Grow the file to `new_size` bytes (the new bytes read as zeroes).
    fn extend(&self, new_size: u64) -> io::Result<()>;
}

/// L1 and standard L2 entries: the refcount is exactly 1.
const COPIED: u64 = 1 << 63;
/// Offset bits of a refcount table entry.
const REFTABLE_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// qemu refuses refcount tables larger than this; so do we (it maps
/// petabytes of file).
const MAX_REFTABLE_BYTES: u64 = 32 << 20;
/// Header offset of the autoclear feature bits.
const AUTOCLEAR_AT: u64 = 88;

/// One refcount block, as in the file.
struct RefBlock {
    data: Vec<u8>,
    dirty: bool,
}

/// What has changed in memory and not yet reached the file.  Held under
/// one lock: allocation, L2 updates and the write-back are serialised,
/// in-place overwrites are not.
struct Meta {
    table: Vec<u64>,
    table_dirty: BTreeSet<usize>,
    /// Where the refcount table is, and its length in clusters: the
    /// header's, until the table fills and moves to a larger one.
    table_offset: u64,
    table_clusters: u64,
    /// The whole table is new (moved) and the header must name it.
    table_moved: bool,
    /// Refcount blocks by file offset: dirty ones, and clean ones read
    /// since the last write-back (dropped then).
    blocks: HashMap<u64, RefBlock>,
    l1_dirty: BTreeSet<usize>,
    /// Offsets of the L2 tables pinned in the reader.
    l2_dirty: BTreeSet<u64>,
    /// Host clusters to decrement once the L2 entries that named them
    /// are on disk.
    frees: Vec<u64>,
    /// The next cluster to try to allocate: allocation only moves on.
    next_free: u64,
    /// The file's size as last grown.
    file_size: u64,
    /// Guest clusters whose new clusters are reserved and being written
    /// (`write_new`): their L2 entries are set once the data is in.
    in_flight: HashSet<u64>,
}

/// A run of guest clusters marked in flight; unmarked (and waiters woken)
/// when the run is published, or when the write fails before that.
struct InFlight<'a> {
    writer: &'a Qcow2Writer,
    clusters: &'a [u64],
    ended: bool,
}

impl InFlight<'_> {
    fn end(mut self, m: &mut Meta) {
        self.unmark(m);
    }
    fn unmark(&mut self, m: &mut Meta) {
        for gc in self.clusters {
            m.in_flight.remove(gc);
        }
        self.ended = true;
        self.writer.published.notify_all();
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.ended {
            let mut m = self.writer.meta.lock_unpoisoned();
            self.unmark(&mut m);
        }
    }
}

/// A writer over an opened image.  Reads go through the same
/// [`Qcow2Reader`], which sees the writer's changes.
pub struct Qcow2Writer {
    image: Arc<Qcow2Reader>,
    sink: Arc<dyn Sink>,
    meta: Mutex<Meta>,
    /// Signalled when clusters leave `Meta::in_flight`.
    published: Condvar,
    /// Set once the autoclear bits are cleared (before the first change).
    touched: AtomicBool,
    /// Bytes of pinned metadata after which a write writes it back.
    budget: u64,
}

impl std::fmt::Debug for Qcow2Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Writer")
            .field("image", &self.image)
            .finish_non_exhaustive()
    }
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().expect("8 bytes"))
}

/// Refcount `i` of a block of `1 << order`-bit entries: big-endian from
/// 8 bits up, packed least significant bits first below.
fn rc_get(block: &[u8], i: u64, order: u32) -> u64 {
    let bits = 1u64 << order;
    if bits >= 8 {
        let n = (bits / 8) as usize;
        let at = i as usize * n;
        block[at..at + n]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    } else {
        let per = 8 / bits;
        let shift = (i % per) * bits;
        (u64::from(block[(i / per) as usize]) >> shift) & ((1 << bits) - 1)
    }
}

fn rc_set(block: &mut [u8], i: u64, order: u32, value: u64) {
    let bits = 1u64 << order;
    if bits >= 8 {
        let n = (bits / 8) as usize;
        let at = i as usize * n;
        for (k, b) in block[at..at + n].iter_mut().enumerate() {
            *b = (value >> (8 * (n - 1 - k))) as u8;
        }
    } else {
        let per = 8 / bits;
        let shift = (i % per) * bits;
        let mask = ((1u64 << bits) - 1) as u8;
        let byte = &mut block[(i / per) as usize];
        *byte = (*byte & !(mask << shift)) | (((value as u8) & mask) << shift);
    }
}

impl Qcow2Writer {
    /// Make `image` writable through `sink` (the same file its source
    /// reads).  An image this writer cannot keep consistent is refused
    /// with [`Error::Unsupported`] saying why.
    pub fn new(image: Arc<Qcow2Reader>, sink: Arc<dyn Sink>, cache_bytes: u64) -> Result<Self> {
        let h = &image.header;
        let refuse =
            |reason: &str| Error::unsupported(&image.name, FORMAT, format!("writing {reason}"));
        if h.corrupt {
            return Err(refuse(
                "an image marked corrupt: repair it first with qemu-img check -r all",
            ));
        }
        if h.dirty {
            return Err(refuse(
                "a dirty image (lazy refcounts not written back): run qemu-img check -r all first",
            ));
        }
        if h.nb_snapshots > 0 {
            return Err(refuse(&format!(
                "an image with {} internal snapshot(s) (their clusters are shared)",
                h.nb_snapshots
            )));
        }
        if h.extended_l2 {
            return Err(refuse(
                "an image with extended L2 entries (subclusters); convert it with extended_l2=off",
            ));
        }
        let cs = h.cluster_size();
        let table_bytes = u64::from(h.refcount_table_clusters) * cs;
        let file_size = image.source_size();
        if h.refcount_table_offset % cs != 0
            || table_bytes == 0
            || table_bytes > MAX_REFTABLE_BYTES
            || h.refcount_table_offset
                .checked_add(table_bytes)
                .is_none_or(|end| end > file_size)
        {
            return Err(Qcow2Reader::corrupt(
                &image.name,
                48,
                format!(
                    "refcount table of {} clusters at {:#x}",
                    h.refcount_table_clusters, h.refcount_table_offset
                ),
            ));
        }
        let mut raw = vec![0u8; table_bytes as usize];
        read_exact(
            &image.source,
            &image.name,
            &mut raw,
            h.refcount_table_offset,
        )?;
        let table = raw.chunks_exact(8).map(be64).collect();
        let budget = cache_bytes.max(16 * cs);
        Ok(Qcow2Writer {
            meta: Mutex::new(Meta {
                table,
                table_dirty: BTreeSet::new(),
                table_offset: h.refcount_table_offset,
                table_clusters: u64::from(h.refcount_table_clusters),
                table_moved: false,
                blocks: HashMap::new(),
                l1_dirty: BTreeSet::new(),
                l2_dirty: BTreeSet::new(),
                frees: Vec::new(),
                next_free: file_size.next_multiple_of(cs),
                file_size,
                in_flight: HashSet::new(),
            }),
            published: Condvar::new(),
            touched: AtomicBool::new(false),
            budget,
            image,
            sink,
        })
    }

    pub fn reader(&self) -> &Arc<Qcow2Reader> {
        &self.image
    }

    fn put(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.sink
            .write_all_at(buf, offset)
            .map_err(Error::io(&self.image.name, offset))
    }

    fn sync_file(&self) -> Result<()> {
        self.sink.flush().map_err(Error::io(&self.image.name, 0))
    }

    fn out_of_range(&self, offset: u64, len: u64) -> Result<()> {
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.image.size)
        {
            return Err(Error::OutOfRange {
                offset,
                len,
                size: self.image.size,
            });
        }
        Ok(())
    }

    /// Before the first change: clear the autoclear bits, which stand
    /// for things this writer does not keep up to date (persistent
    /// bitmaps); qemu then ignores those instead of trusting them.
    fn touch(&self) -> Result<()> {
        if self.touched.load(Ordering::Acquire) {
            return Ok(());
        }
        let _m = self.meta.lock_unpoisoned();
        if self.touched.load(Ordering::Acquire) {
            return Ok(());
        }
        if self.image.header.version >= 3 && self.image.header.autoclear_features != 0 {
            self.put(&[0u8; 8], AUTOCLEAR_AT)?;
            self.sync_file()?;
        }
        self.touched.store(true, Ordering::Release);
        Ok(())
    }

    /// Write `buf` at guest `offset`: runs of clusters that can be
    /// overwritten in place, and runs that need new clusters, each with
    /// one write to the file where the run lies together there.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.out_of_range(offset, buf.len() as u64)?;
        self.touch()?;
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            done += match self.write_in_place(&buf[done..], at)? {
                // 0 again from `write_new` means the cluster became
                // ours meanwhile (another write allocated it): retry.
                0 => self.write_new(&buf[done..], at)?,
                n => n,
            };
        }
        Ok(())
    }

    /// The host offset of guest cluster `gc` if it can be overwritten in
    /// place: a standard cluster (not compressed, not zero) with the
    /// COPIED flag in a table with it.
    fn in_place(&self, gc: u64) -> Result<Option<u64>> {
        let l2e = self.image.header.l2_entries();
        if self.image.l1_entry(gc / l2e) & COPIED == 0 {
            return Ok(None);
        }
        let Some(table) = self.image.l2_table(gc)? else {
            return Ok(None);
        };
        let e = table[(gc % l2e) as usize];
        let host = e & OFFSET_MASK;
        Ok((e & (L2_COMPRESSED | L2_ZERO) == 0 && e & COPIED != 0 && host != 0).then_some(host))
    }

    /// Write the start of `data` (at guest `at`) over clusters the image
    /// owns, as far as they follow each other in the file; returns the
    /// bytes written, 0 when the first cluster is not such a one.
    fn write_in_place(&self, data: &[u8], at: u64) -> Result<usize> {
        let cs = self.image.header.cluster_size();
        // No lock: these clusters are ours and stay where they are (freed
        // clusters are never handed out again, so a trim racing with this
        // write cannot make it land in someone else's data).
        let Some(host) = self.in_place(at / cs)? else {
            return Ok(0);
        };
        let start = host + at % cs;
        let mut n = ((cs - at % cs) as usize).min(data.len());
        while n < data.len() {
            match self.in_place((at + n as u64) / cs)? {
                Some(h) if h == start + n as u64 => n += (cs as usize).min(data.len() - n),
                _ => break,
            }
        }
        self.put(&data[..n], start)?;
        Ok(n)
    }

    /// Write the start of `data` (at guest `at`) into new clusters: the
    /// run of clusters from `at` that the image does not own and no other
    /// write is allocating.  Returns the bytes written (0 when the first
    /// cluster turned out to be owned after all).
    ///
    /// Under the metadata lock the run's clusters are reserved (L2 tables
    /// first, then data clusters together at the end of the file, their
    /// refcounts set in memory) and marked in flight; the data is written
    /// without the lock, in one write where the clusters lie together;
    /// then, under the lock again, the L2 entries are set.  So a reader
    /// never finds an entry whose data is not in the file, and a
    /// write-back meanwhile puts the reserved refcounts on disk but no
    /// entry naming them (a crash then leaks them, nothing worse).  A
    /// cluster in flight is waited for by any other write or zeroing of
    /// it: a second write that copied the old content would otherwise
    /// undo the first when it set its own entry.
    fn write_new(&self, data: &[u8], at: u64) -> Result<usize> {
        let cs = self.image.header.cluster_size();
        let size = self.image.size;
        let first = at / cs;
        let end = at + data.len() as u64;
        let mut m = self.meta.lock_unpoisoned();
        while m.in_flight.contains(&first) {
            m = self.published.wait_unpoisoned(m);
        }
        if self.in_place(first)?.is_some() {
            return Ok(0);
        }
        let mut clusters = vec![first];
        for gc in first + 1..end.div_ceil(cs) {
            if m.in_flight.contains(&gc) || self.in_place(gc)?.is_some() {
                break;
            }
            clusters.push(gc);
        }
        let l2e = self.image.header.l2_entries();
        for &gc in &clusters {
            if gc == first || gc % l2e == 0 {
                self.l2_table_for(&mut m, gc)?;
            }
        }
        let mut hosts = Vec::with_capacity(clusters.len());
        for _ in &clusters {
            hosts.push(self.alloc(&mut m)?);
        }
        m.in_flight.extend(&clusters);
        let flight = InFlight {
            writer: self,
            clusters: &clusters,
            ended: false,
        };
        drop(m);

        let k = clusters.len() as u64;
        let run_start = first * cs;
        let run_end = run_start + k * cs;
        let n = (end.min(run_end) - at) as usize;
        // Whole clusters go from the caller's buffer; a partial one at
        // either end is completed with what the guest sees there now
        // (zeroes, the backing file's bytes, a compressed cluster's):
        // copy on write, the whole run in one buffer.
        let owned;
        let bytes: &[u8] = if at == run_start && n as u64 == k * cs {
            &data[..n]
        } else {
            let mut run = vec![0u8; (k * cs) as usize];
            let head = (at - run_start) as usize;
            if head > 0 {
                self.image.read_at(&mut run[..head], run_start)?;
            }
            let tail_to = run_end.min(size);
            if tail_to > at + n as u64 {
                let from = head + n;
                let to = (tail_to - run_start) as usize;
                self.image.read_at(&mut run[from..to], at + n as u64)?;
            }
            run[head..head + n].copy_from_slice(&data[..n]);
            owned = run;
            &owned
        };
        let mut i = 0;
        while i < hosts.len() {
            let mut j = i + 1;
            while j < hosts.len() && hosts[j] == hosts[i] + (j - i) as u64 * cs {
                j += 1;
            }
            self.put(&bytes[i * cs as usize..j * cs as usize], hosts[i])?;
            i = j;
        }

        let mut m = self.meta.lock_unpoisoned();
        let published = clusters
            .iter()
            .zip(&hosts)
            .try_for_each(|(&gc, &host)| self.replace(&mut m, gc, host | COPIED));
        flight.end(&mut m);
        published?;
        self.maybe_write_back(&mut m)?;
        Ok(n)
    }

    /// The file offset of the L2 table for guest cluster `gc`, creating
    /// an empty one if its L1 entry has none.
    fn l2_table_for(&self, m: &mut Meta, gc: u64) -> Result<u64> {
        let l2e = self.image.header.l2_entries();
        let l1_index = gc / l2e;
        let l1 = self.image.l1_entry(l1_index);
        if l1 & OFFSET_MASK == 0 {
            let at = self.alloc(m)?;
            let empty: Arc<[u64]> = vec![0u64; l2e as usize].into();
            // Pinned before the L1 entry names it, so a reader that sees
            // the entry finds the table.
            self.image.pinned_l2.write_unpoisoned().insert(at, empty);
            m.l2_dirty.insert(at);
            self.image.l1.write_unpoisoned()[l1_index as usize] = at | COPIED;
            m.l1_dirty.insert(l1_index as usize);
            Ok(at)
        } else if l1 & COPIED == 0 {
            Err(Error::unsupported(
                &self.image.name,
                FORMAT,
                format!("writing: the L2 table of L1 entry {l1_index} is shared (no COPIED flag)"),
            ))
        } else {
            Ok(l1 & OFFSET_MASK)
        }
    }

    /// Set guest cluster `gc`'s L2 entry to `new`, creating its L2 table
    /// if need be, and queue the old entry's clusters for release.
    fn replace(&self, m: &mut Meta, gc: u64, new: u64) -> Result<()> {
        let l2e = self.image.header.l2_entries();
        let l1_index = gc / l2e;
        let index = (gc % l2e) as usize;
        let table_at = self.l2_table_for(m, gc)?;
        let old = self.image.l2_at(table_at, l1_index)?[index];
        self.set_l2(m, table_at, l1_index, index, new)?;
        self.release(m, old);
        Ok(())
    }

    fn set_l2(
        &self,
        m: &mut Meta,
        table_at: u64,
        l1_index: u64,
        index: usize,
        entry: u64,
    ) -> Result<()> {
        let mut pinned = self.image.pinned_l2.write_unpoisoned();
        if !pinned.contains_key(&table_at) {
            // Read (and so validate) it first, without the pin lock, which
            // `l2_at` takes for reading.  Only this writer pins, under the
            // metadata lock, so nothing is pinned meanwhile.
            drop(pinned);
            let current = self.image.l2_at(table_at, l1_index)?;
            pinned = self.image.pinned_l2.write_unpoisoned();
            pinned.insert(table_at, current);
        }
        let t = pinned.get_mut(&table_at).expect("pinned above");
        if Arc::get_mut(t).is_none() {
            // A reader holds the old version: it keeps it, we change a copy.
            *t = Arc::from(&t[..]);
        }
        Arc::get_mut(t).expect("unique")[index] = entry;
        m.l2_dirty.insert(table_at);
        Ok(())
    }

    /// Queue the host clusters an L2 entry held for a refcount decrement.
    fn release(&self, m: &mut Meta, old: u64) {
        let h = &self.image.header;
        let cs = h.cluster_size();
        if old & L2_COMPRESSED != 0 {
            // Every host cluster the compressed bytes touch holds one
            // reference: from the sector of the offset, `sectors + 1`
            // sectors on.
            let x = 62 - (h.cluster_bits - 8);
            let host = old & ((1u64 << x) - 1);
            let sectors = (old >> x) & ((1u64 << (h.cluster_bits - 8)) - 1);
            let start = host & !511;
            let end = start + (sectors + 1) * 512;
            let mut c = start - start % cs;
            while c < end {
                m.frees.push(c);
                c += cs;
            }
        } else if old & OFFSET_MASK != 0 {
            m.frees.push(old & OFFSET_MASK);
        }
    }

    /// A refcount block for table index `ti`, read in if need be; None
    /// when the table has none there (every refcount in it is 0).
    fn block<'m>(&self, m: &'m mut Meta, ti: usize) -> Result<Option<&'m mut RefBlock>> {
        let at = m.table.get(ti).copied().unwrap_or(0) & REFTABLE_MASK;
        if at == 0 {
            return Ok(None);
        }
        if !m.blocks.contains_key(&at) {
            let cs = self.image.header.cluster_size();
            if at % cs != 0 || at.checked_add(cs).is_none_or(|end| end > m.file_size) {
                return Err(Qcow2Reader::corrupt(
                    &self.image.name,
                    self.image.header.refcount_table_offset + ti as u64 * 8,
                    format!("refcount block at {at:#x} lies outside the file"),
                ));
            }
            let mut data = vec![0u8; cs as usize];
            self.image
                .source
                .read_exact_at(&mut data, at)
                .map_err(Error::io(&self.image.name, at))?;
            m.blocks.insert(at, RefBlock { data, dirty: false });
        }
        Ok(m.blocks.get_mut(&at))
    }

    fn per_block(&self) -> u64 {
        let h = &self.image.header;
        (h.cluster_size() * 8) >> h.refcount_order
    }

    /// A cluster for new data or a new L2 table, past everything in use,
    /// its refcount set to 1 (in memory).  Grows the file.
    fn alloc(&self, m: &mut Meta) -> Result<u64> {
        let h = &self.image.header;
        let cs = h.cluster_size();
        let per = self.per_block();
        loop {
            let c = m.next_free;
            let idx = c / cs;
            let ti = (idx / per) as usize;
            if ti >= m.table.len() {
                self.grow_table(m, ti)?;
                continue;
            }
            self.grow(m, c + cs)?;
            m.next_free = c + cs;
            if m.table[ti] & REFTABLE_MASK == 0 {
                // No refcount block covers this part of the file yet: this
                // cluster becomes one, covering itself among others.
                let mut data = vec![0u8; cs as usize];
                rc_set(&mut data, idx % per, h.refcount_order, 1);
                m.blocks.insert(c, RefBlock { data, dirty: true });
                m.table[ti] = c;
                m.table_dirty.insert(ti);
                continue;
            }
            let order = h.refcount_order;
            let block = self.block(m, ti)?.expect("the table names a block");
            if rc_get(&block.data, idx % per, order) != 0 {
                // In use past the end of the file (or where the end was
                // when we opened it): leave it.
                continue;
            }
            rc_set(&mut block.data, idx % per, order, 1);
            block.dirty = true;
            return Ok(c);
        }
    }

    /// The refcount table maps no more of the file: move it to a larger
    /// one past the end (qemu does the same).  The new table and the
    /// refcount blocks for its own clusters are written before the header
    /// names it, and the old table is released after (`write_back`).
    fn grow_table(&self, m: &mut Meta, need: usize) -> Result<()> {
        let cs = self.image.header.cluster_size();
        let want = need.max(m.table.len() * 2) + 2;
        let k = (want as u64 * 8).div_ceil(cs);
        if k * cs > MAX_REFTABLE_BYTES {
            return Err(Error::io(&self.image.name, m.next_free)(io::Error::new(
                io::ErrorKind::StorageFull,
                format!(
                    "the refcount table would need more than {} MiB",
                    MAX_REFTABLE_BYTES >> 20
                ),
            )));
        }
        let old = (m.table_offset, m.table_clusters);
        m.table.resize((k * cs / 8) as usize, 0);
        let start = m.next_free;
        self.grow(m, start + k * cs)?;
        m.next_free = start + k * cs;
        let per = self.per_block();
        let order = self.image.header.refcount_order;
        for c in (start..start + k * cs).step_by(cs as usize) {
            let ti = (c / cs / per) as usize;
            if m.table[ti] & REFTABLE_MASK == 0 {
                // A block for this range: any free cluster will do (a
                // block need not lie in the range it counts).
                let b = self.alloc(m)?;
                if m.table[ti] & REFTABLE_MASK == 0 {
                    m.blocks.insert(
                        b,
                        RefBlock {
                            data: vec![0u8; cs as usize],
                            dirty: true,
                        },
                    );
                    m.table[ti] = b;
                } else {
                    // Allocating it made a block for this very range (one
                    // that counts itself): `b` is not needed after all.
                    let bi = b / cs;
                    let block = self.block(m, (bi / per) as usize)?.expect("b is counted");
                    rc_set(&mut block.data, bi % per, order, 0);
                }
            }
            let block = self.block(m, ti)?.expect("the table names a block");
            rc_set(&mut block.data, (c / cs) % per, order, 1);
            block.dirty = true;
        }
        m.table_offset = start;
        m.table_clusters = k;
        m.table_moved = true;
        m.frees.extend((0..old.1).map(|i| old.0 + i * cs));
        Ok(())
    }

    /// Make the file at least `end` bytes long, a megabyte (or a
    /// cluster) at a time.
    fn grow(&self, m: &mut Meta, end: u64) -> Result<()> {
        if end <= m.file_size {
            return Ok(());
        }
        let step = self.image.header.cluster_size().max(1 << 20);
        let new = end.next_multiple_of(step);
        self.sink
            .extend(new)
            .map_err(Error::io(&self.image.name, new))?;
        m.file_size = new;
        self.image.source_size.fetch_max(new, Ordering::AcqRel);
        Ok(())
    }

    /// Write zeroes: whole clusters become zero clusters (their old
    /// clusters released), the rest is written.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.out_of_range(offset, len)?;
        self.touch()?;
        self.whole_clusters(offset, len, true)
    }

    /// Discard: whole clusters are released as by [`Self::write_zeroes`];
    /// partial ones are left as they are (a discard is advisory), and so
    /// is everything in a version 2 image with a backing file (which has
    /// no zero clusters to mark, and must not let the backing show).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.out_of_range(offset, len)?;
        self.touch()?;
        self.whole_clusters(offset, len, false)
    }

    fn whole_clusters(&self, offset: u64, len: u64, zero: bool) -> Result<()> {
        let h = &self.image.header;
        let cs = h.cluster_size();
        let size = self.image.size;
        let end = offset + len;
        // A cluster counts as whole when the range covers it up to the
        // end of the virtual disk.
        let first = offset.div_ceil(cs);
        let last = if end == size {
            size.div_ceil(cs)
        } else {
            end / cs
        };
        // Whether anything lies under unallocated clusters, for qemu too:
        // the header's backing file counts even when backing=none hides
        // it from us.
        let backed = h.backing_file.is_some() || self.image.backing.is_some();
        let v2_backed = h.version < 3 && backed;
        if first >= last || v2_backed {
            if zero {
                return self.write_zero_bytes(offset, len);
            }
            return Ok(());
        }
        if zero {
            self.write_zero_bytes(offset, first * cs - offset)?;
            let tail = (last * cs).min(size);
            self.write_zero_bytes(tail, end.saturating_sub(tail))?;
        }
        let target = if h.version >= 3 { L2_ZERO } else { 0 };
        let l2e = h.l2_entries();
        let mut m = self.meta.lock_unpoisoned();
        for gc in first..last {
            // A write allocating this cluster sets its entry when its data
            // is in: let it, then zero (or discard) over it.
            while m.in_flight.contains(&gc) {
                m = self.published.wait_unpoisoned(m);
            }
            let l1 = self.image.l1_entry(gc / l2e);
            if l1 & OFFSET_MASK == 0 && !backed {
                // No table: already reads as zeroes.
                continue;
            }
            if l1 & OFFSET_MASK != 0 {
                let table = self.image.l2_at(l1 & OFFSET_MASK, gc / l2e)?;
                let e = table[(gc % l2e) as usize];
                if e == target || (e == 0 && !backed) {
                    continue;
                }
            }
            self.replace(&mut m, gc, target)?;
            self.maybe_write_back(&mut m)?;
        }
        Ok(())
    }

    fn write_zero_bytes(&self, offset: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeroes = vec![0u8; len.min(CHUNK) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            self.write_at(&zeroes[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }

    fn maybe_write_back(&self, m: &mut Meta) -> Result<()> {
        let cs = self.image.header.cluster_size();
        let dirty_blocks = m.blocks.values().filter(|b| b.dirty).count() as u64;
        if (m.l2_dirty.len() as u64 + dirty_blocks) * cs > self.budget {
            self.write_back(m)?;
        }
        Ok(())
    }

    /// Write everything back in the crash-safe order (see the file
    /// comment) and flush the file: after this, every write made before
    /// it survives a crash.
    pub fn flush(&self) -> Result<()> {
        let mut m = self.meta.lock_unpoisoned();
        self.write_back(&mut m)
    }

    fn write_dirty_blocks(&self, m: &mut Meta) -> Result<bool> {
        let mut any = false;
        for (&at, b) in m.blocks.iter_mut().filter(|(_, b)| b.dirty) {
            self.put(&b.data, at)?;
            b.dirty = false;
            any = true;
        }
        Ok(any)
    }

    fn write_back(&self, m: &mut Meta) -> Result<()> {
        let h = &self.image.header;
        // 1, 2: refcounts, new blocks before the table entries naming them.
        if self.write_dirty_blocks(m)? {
            self.sync_file()?;
        }
        if m.table_moved {
            // The whole new table, then the header's pointer to it: one
            // 12-byte write within a sector, so old or new, never half.
            let bytes: Vec<u8> = m.table.iter().flat_map(|e| e.to_be_bytes()).collect();
            self.put(&bytes, m.table_offset)?;
            self.sync_file()?;
            let mut pointer = [0u8; 12];
            pointer[..8].copy_from_slice(&m.table_offset.to_be_bytes());
            pointer[8..].copy_from_slice(&(m.table_clusters as u32).to_be_bytes());
            self.put(&pointer, 48)?;
            self.sync_file()?;
            m.table_moved = false;
            m.table_dirty.clear();
        } else if !m.table_dirty.is_empty() {
            for &ti in &m.table_dirty {
                self.put(&m.table[ti].to_be_bytes(), m.table_offset + ti as u64 * 8)?;
            }
            m.table_dirty.clear();
            self.sync_file()?;
        }
        // 3: L2 tables, then the L1 entries of new ones.
        let pinned: Vec<(u64, Arc<[u64]>)> = {
            let p = self.image.pinned_l2.read_unpoisoned();
            m.l2_dirty
                .iter()
                .filter_map(|at| p.get(at).map(|t| (*at, t.clone())))
                .collect()
        };
        for (at, table) in &pinned {
            let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
            self.put(&bytes, *at)?;
        }
        if !m.l1_dirty.is_empty() {
            self.sync_file()?;
            let entries: Vec<(usize, u64)> = {
                let l1 = self.image.l1.read_unpoisoned();
                m.l1_dirty.iter().map(|&i| (i, l1[i])).collect()
            };
            for (i, e) in entries {
                self.put(&e.to_be_bytes(), h.l1_table_offset + i as u64 * 8)?;
            }
            m.l1_dirty.clear();
        }
        self.sync_file()?;
        {
            // The tables are in the file: unpin them into the cache (under
            // the pin lock, so no reader caches an older version after).
            let mut p = self.image.pinned_l2.write_unpoisoned();
            let mut cache = self.image.l2_cache.lock_unpoisoned();
            for (at, _) in &pinned {
                if let Some(t) = p.remove(at) {
                    cache.put(*at, t);
                }
            }
        }
        m.l2_dirty.clear();
        // 4: nothing on disk names the released clusters any more.
        if !m.frees.is_empty() {
            let cs = h.cluster_size();
            let per = self.per_block();
            let order = h.refcount_order;
            for c in std::mem::take(&mut m.frees) {
                let idx = c / cs;
                if let Some(b) = self.block(m, (idx / per) as usize)? {
                    let rc = rc_get(&b.data, idx % per, order);
                    // An image whose refcount was already too low stays as
                    // it was rather than wrapping around.
                    if rc > 0 {
                        rc_set(&mut b.data, idx % per, order, rc - 1);
                        b.dirty = true;
                    }
                }
            }
            if self.write_dirty_blocks(m)? {
                self.sync_file()?;
            }
        }
        m.blocks.retain(|_, b| b.dirty);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::Qcow2Options;
    use crate::Source;

    /// A file in memory, growable: both the reader's source and the
    /// writer's sink.  Counts flushes, and can keep a copy of what was
    /// flushed (to play a crash).
    #[derive(Default)]
    struct MemFile {
        data: Mutex<Vec<u8>>,
        durable: Mutex<Vec<u8>>,
        /// Every write as (offset, length), in order.
        writes: Mutex<Vec<(u64, usize)>>,
        /// Each write takes this long, outside the file's lock: widens
        /// the window in which other writes run alongside it.
        write_time: Option<std::time::Duration>,
    }
    impl Source for MemFile {
        fn size(&self) -> io::Result<u64> {
            Ok(self.data.lock_unpoisoned().len() as u64)
        }
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            let d = self.data.lock_unpoisoned();
            let end = offset as usize + buf.len();
            if end > d.len() {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            buf.copy_from_slice(&d[offset as usize..end]);
            Ok(())
        }
    }
    impl Sink for MemFile {
        fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            if let Some(t) = self.write_time {
                std::thread::sleep(t);
            }
            let mut d = self.data.lock_unpoisoned();
            let end = offset as usize + buf.len();
            assert!(end <= d.len(), "write past the end of the file");
            d[offset as usize..end].copy_from_slice(buf);
            self.writes.lock_unpoisoned().push((offset, buf.len()));
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            *self.durable.lock_unpoisoned() = self.data.lock_unpoisoned().clone();
            Ok(())
        }
        fn extend(&self, new_size: u64) -> io::Result<()> {
            let mut d = self.data.lock_unpoisoned();
            if new_size as usize > d.len() {
                d.resize(new_size as usize, 0);
            }
            Ok(())
        }
    }

    /// An empty version 3 image: header, refcount table, one refcount
    /// block, then the L1 table (clusters 0, 1, 2, 3..), 16-bit refcounts.
    fn blank(cluster_bits: u32, size: u64) -> Vec<u8> {
        let cs = 1usize << cluster_bits;
        let l2_entries = (cs / 8) as u64;
        let l1_size = size.div_ceil(l2_entries << cluster_bits);
        let l1_clusters = (l1_size as usize * 8).div_ceil(cs).max(1);
        let clusters = 3 + l1_clusters;
        assert!(clusters <= cs / 2, "one refcount block counts them");
        let mut f = vec![0u8; clusters * cs];
        let put32 =
            |f: &mut [u8], at: usize, v: u32| f[at..at + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |f: &mut [u8], at: usize, v: u64| f[at..at + 8].copy_from_slice(&v.to_be_bytes());
        put32(&mut f, 0, super::super::header::MAGIC);
        put32(&mut f, 4, 3);
        put32(&mut f, 20, cluster_bits);
        put64(&mut f, 24, size);
        put32(&mut f, 36, l1_size as u32);
        put64(&mut f, 40, 3 * cs as u64);
        put64(&mut f, 48, cs as u64);
        put32(&mut f, 56, 1);
        put32(&mut f, 96, 4);
        put32(&mut f, 100, 104);
        put64(&mut f, cs, 2 * cs as u64);
        for c in 0..clusters {
            f[2 * cs + 2 * c + 1] = 1;
        }
        f
    }

    /// A file holding `blank(cluster_bits, size)`, flushed.
    fn mem(cluster_bits: u32, size: u64) -> Arc<MemFile> {
        let file = Arc::new(MemFile::default());
        *file.data.lock_unpoisoned() = blank(cluster_bits, size);
        file.flush().unwrap();
        file
    }

    fn open(file: Arc<MemFile>) -> Qcow2Writer {
        let reader = Qcow2Reader::open(file.clone(), &Qcow2Options::default()).unwrap();
        Qcow2Writer::new(Arc::new(reader), file, 1 << 20).unwrap()
    }

    /// Refcounts recomputed from the tables, compared with the file's:
    /// what `qemu-img check` does, for images of standard clusters.
    /// Returns (references, leaks).
    fn check(file: &[u8]) -> (u64, u64) {
        let h = super::super::header::parse(file).unwrap();
        let cs = h.cluster_size() as usize;
        let clusters = file.len().div_ceil(cs);
        let mut refs = vec![0u64; clusters];
        // The header, the L1 table (one cluster here), the refcount table
        // and each refcount block.
        refs[0] += 1;
        for c in 0..(h.l1_size as usize * 8).div_ceil(cs) {
            refs[h.l1_table_offset as usize / cs + c] += 1;
        }
        let table_bytes = h.refcount_table_clusters as usize * cs;
        for c in 0..h.refcount_table_clusters as usize {
            refs[h.refcount_table_offset as usize / cs + c] += 1;
        }
        let table: Vec<u64> = file[h.refcount_table_offset as usize..][..table_bytes]
            .chunks_exact(8)
            .map(be64)
            .collect();
        for &b in table.iter().filter(|&&b| b != 0) {
            refs[b as usize / cs] += 1;
        }
        for i in 0..h.l1_size as usize {
            let l1 = be64(&file[h.l1_table_offset as usize + 8 * i..][..8]);
            let l2 = (l1 & OFFSET_MASK) as usize;
            if l2 == 0 {
                continue;
            }
            assert!(l1 & COPIED != 0);
            refs[l2 / cs] += 1;
            for e in file[l2..l2 + cs].chunks_exact(8).map(be64) {
                let host = (e & OFFSET_MASK) as usize;
                if host != 0 {
                    assert!(e & COPIED != 0);
                    refs[host / cs] += 1;
                }
            }
        }
        let per = (cs * 8 / 16) as u64;
        let mut leaks = 0;
        for (c, &want) in refs.iter().enumerate() {
            let c = c as u64;
            let b = table[(c / per) as usize] as usize;
            let have = if b == 0 {
                0
            } else {
                rc_get(&file[b..b + cs], c % per, 4)
            };
            assert!(
                have >= want,
                "cluster {c}: refcount {have} < {want} references"
            );
            leaks += have - want;
        }
        (refs.iter().sum(), leaks)
    }

    #[test]
    fn refcount_widths_round_trip() {
        for order in 0..=6u32 {
            let mut b = vec![0u8; 64];
            let max = if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1 << order)) - 1
            };
            let entries = (64 * 8) >> order;
            for i in 0..entries {
                rc_set(&mut b, i, order, (i * 7) & max);
            }
            for i in 0..entries {
                assert_eq!(
                    rc_get(&b, i, order),
                    (i * 7) & max,
                    "order {order} entry {i}"
                );
            }
        }
        // 16-bit refcounts are big-endian.
        let mut b = vec![0u8; 4];
        rc_set(&mut b, 1, 4, 0x0102);
        assert_eq!(b, [0, 0, 1, 2]);
    }

    #[test]
    fn a_crash_between_flushes_leaves_only_leaks_and_keeps_flushed_data() {
        let file = mem(12, 8 << 20);
        let w = open(file.clone());
        w.write_at(&[0xaa; 10000], 5000).unwrap();
        w.flush().unwrap();
        w.write_at(&[0xbb; 3000], 3 << 20).unwrap();
        w.write_zeroes(4096, 8192).unwrap();
        // Crash: only what was flushed is in the file, consistent.
        let crashed = file.durable.lock_unpoisoned().clone();
        check(&crashed);
        let r = Qcow2Reader::open(Arc::new(crashed), &Qcow2Options::default()).unwrap();
        let mut got = vec![0u8; 10000];
        r.read_at(&mut got, 5000).unwrap();
        assert_eq!(got, vec![0xaa; 10000]);
        r.read_at(&mut got[..3000], 3 << 20).unwrap();
        assert_eq!(&got[..3000], &[0u8; 3000][..]);
        // What the writer serves has it all.
        w.reader().read_at(&mut got[..3000], 3 << 20).unwrap();
        assert_eq!(&got[..3000], &[0xbb; 3000][..]);
        w.reader().read_at(&mut got[..8192], 4096).unwrap();
        assert_eq!(&got[..8192], &[0u8; 8192][..]);
        // And a clean close writes everything, with no leak.
        w.flush().unwrap();
        let (_, leaks) = check(&file.data.lock_unpoisoned());
        assert_eq!(leaks, 0);
    }

    #[test]
    fn a_full_refcount_table_moves_to_a_larger_one() {
        // 512-byte clusters: one table cluster maps 8 MiB of file.
        let file = mem(9, 24 << 20);
        let w = open(file.clone());
        let data = pseudo(20 << 20);
        for (i, chunk) in data.chunks(1 << 20).enumerate() {
            w.write_at(chunk, (i as u64) << 20).unwrap();
            // Consistent at every flush point on the way.
            check(&file.durable.lock_unpoisoned());
        }
        w.flush().unwrap();
        let f = file.data.lock_unpoisoned().clone();
        let h = super::super::header::parse(&f).unwrap();
        assert!(h.refcount_table_clusters > 1, "the table moved");
        assert_eq!(check(&f).1, 0, "no leaks: the old table was released");
        let r = Qcow2Reader::open(Arc::new(f), &Qcow2Options::default()).unwrap();
        let mut got = vec![0u8; data.len()];
        r.read_at(&mut got, 0).unwrap();
        assert!(got == data);
    }

    #[test]
    fn a_run_of_new_clusters_is_one_write_and_keeps_the_old_bytes_around_it() {
        // 4 KiB clusters: 1000 bytes into cluster 2, five whole clusters,
        // 300 bytes into cluster 8; cluster 8 already holds data from an
        // earlier write (it goes in place after the run), cluster 2 not.
        let cs = 4096usize;
        let file = mem(12, 1 << 20);
        let w = open(file.clone());
        let mut model = vec![0u8; 1 << 20];
        let old = pseudo(3 * cs);
        w.write_at(&old, 8 * cs as u64).unwrap();
        model[8 * cs..11 * cs].copy_from_slice(&old);
        file.writes.lock_unpoisoned().clear();
        let at = 2 * cs + 3096;
        let data = vec![0x5a; (cs - 3096) + 5 * cs + 300];
        w.write_at(&data, at as u64).unwrap();
        model[at..at + data.len()].copy_from_slice(&data);
        let writes = file.writes.lock_unpoisoned().clone();
        // Clusters 2..=7 are new: one write of six whole clusters, the
        // partial head's old bytes (zeroes) included; cluster 8 in place.
        assert_eq!(writes.len(), 2, "{writes:?}");
        assert_eq!(writes[0].1, 6 * cs, "{writes:?}");
        assert_eq!(writes[1].1, 300, "{writes:?}");
        let mut got = vec![0u8; 1 << 20];
        w.reader().read_at(&mut got, 0).unwrap();
        assert!(got == model);
        // Overwriting the lot again: the six new clusters lie together in
        // the file, so in place that is one write for them, and the
        // three old ones one more.
        file.writes.lock_unpoisoned().clear();
        let all = pseudo(9 * cs);
        w.write_at(&all, 2 * cs as u64).unwrap();
        model[2 * cs..11 * cs].copy_from_slice(&all);
        let writes = file.writes.lock_unpoisoned().clone();
        assert_eq!(writes.len(), 2, "{writes:?}");
        assert_eq!(writes[0].1, 6 * cs);
        w.flush().unwrap();
        assert_eq!(check(&file.data.lock_unpoisoned()).1, 0);
        let r = Qcow2Reader::open(file.clone(), &Qcow2Options::default()).unwrap();
        r.read_at(&mut got, 0).unwrap();
        assert!(got == model);
    }

    #[test]
    fn concurrent_writes_into_the_same_new_clusters_all_land() {
        // Four threads each write their own sectors of the same clusters
        // (the first 512 KiB, every sector once, in a shuffled order),
        // with runs of several clusters in their own 128 KiB among them.
        // Each new cluster is allocated by one write while the others
        // wait for it; one that copied the old content instead would
        // wipe the other's sector when it set its entry.  Sectors are
        // written once, so no later write can hide a lost one.
        let file = Arc::new(MemFile {
            write_time: Some(std::time::Duration::from_micros(300)),
            ..MemFile::default()
        });
        *file.data.lock_unpoisoned() = blank(12, 1 << 20);
        let w = Arc::new(open(file.clone()));
        let threads = 4u64;
        let shared = 512u64 << 10;
        let model = Arc::new(Mutex::new(vec![0u8; 1 << 20]));
        std::thread::scope(|scope| {
            for t in 0..threads {
                let w = w.clone();
                let model = model.clone();
                scope.spawn(move || {
                    let mut x = t + 1;
                    let mut next = || {
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                        x >> 33
                    };
                    let mut order: Vec<u64> = (0..shared / 512 / threads).collect();
                    for i in (1..order.len()).rev() {
                        order.swap(i, next() as usize % (i + 1));
                    }
                    for (i, k) in order.into_iter().enumerate() {
                        let v = (t * 60 + i as u64 % 60 + 1) as u8;
                        let s = k * threads + t;
                        w.write_at(&[v; 512], s * 512).unwrap();
                        model.lock_unpoisoned()[s as usize * 512..][..512].fill(v);
                        if i % 8 == 0 {
                            let at = shared + t * (128 << 10) + next() % (100 << 10);
                            let run = vec![v; 20000];
                            w.write_at(&run, at).unwrap();
                            model.lock_unpoisoned()[at as usize..][..run.len()]
                                .copy_from_slice(&run);
                        }
                    }
                });
            }
        });
        let model = model.lock_unpoisoned().clone();
        let mut got = vec![0u8; 1 << 20];
        w.reader().read_at(&mut got, 0).unwrap();
        let lost = (0..got.len() / 512)
            .filter(|&s| got[s * 512..][..512] != model[s * 512..][..512])
            .count();
        assert_eq!(lost, 0, "sectors lost");
        w.flush().unwrap();
        assert_eq!(check(&file.data.lock_unpoisoned()).1, 0);
    }

    fn pseudo(n: usize) -> Vec<u8> {
        let mut x = 0x1234_5678_u64;
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                (x >> 56) as u8
            })
            .collect()
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write(u64, usize, u8),
        Zero(u64, u64),
        Discard(u64, u64),
        Flush,
        Reopen,
    }

    fn op(size: u64) -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0..size, 1usize..20000, 1u8..255)
                .prop_map(move |(o, l, b)| Op::Write(o, l.min((size - o) as usize), b)),
            1 => (0..size, 1u64..40000).prop_map(move |(o, l)| Op::Zero(o, l.min(size - o))),
            1 => (0..size, 1u64..40000).prop_map(move |(o, l)| Op::Discard(o, l.min(size - o))),
            1 => Just(Op::Flush),
            1 => Just(Op::Reopen),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// Random writes, zeroes and discards against a flat model: every
        /// read matches, the image reopened from the file matches, and
        /// refcounts never fall below references (no leaks after a flush).
        #[test]
        fn matches_a_flat_model(
            cluster_bits in 9u32..14,
            ops in proptest::collection::vec(op(300_000), 1..40),
        ) {
            let size = 300_000u64;
            let file = mem(cluster_bits, size);
            let mut w = open(file.clone());
            let mut model = vec![0u8; size as usize];
            for op in ops {
                match op {
                    Op::Write(o, l, b) => {
                        w.write_at(&vec![b; l], o).unwrap();
                        model[o as usize..o as usize + l].fill(b);
                    }
                    Op::Zero(o, l) => {
                        w.write_zeroes(o, l).unwrap();
                        model[o as usize..(o + l) as usize].fill(0);
                    }
                    Op::Discard(o, l) => {
                        w.discard(o, l).unwrap();
                        // Whole clusters read as zeroes after; the rest
                        // is unchanged: keep the model in step by reading.
                        let mut got = vec![0u8; l as usize];
                        w.reader().read_at(&mut got, o).unwrap();
                        for (i, (g, m)) in got.iter().zip(&model[o as usize..]).enumerate() {
                            proptest::prop_assert!(*g == 0 || g == m, "discard at {}", o + i as u64);
                        }
                        model[o as usize..(o + l) as usize].copy_from_slice(&got);
                    }
                    Op::Flush => {
                        w.flush().unwrap();
                        let (_, leaks) = check(&file.data.lock_unpoisoned());
                        proptest::prop_assert_eq!(leaks, 0);
                    }
                    Op::Reopen => {
                        w.flush().unwrap();
                        w = open(file.clone());
                    }
                }
                let mut got = vec![0u8; size as usize];
                w.reader().read_at(&mut got, 0).unwrap();
                proptest::prop_assert!(got == model);
                check(&file.durable.lock_unpoisoned());
            }
            w.flush().unwrap();
            let r = Qcow2Reader::open(file.clone(), &Qcow2Options::default()).unwrap();
            let mut got = vec![0u8; size as usize];
            r.read_at(&mut got, 0).unwrap();
            proptest::prop_assert!(got == model);
        }
    }
}
