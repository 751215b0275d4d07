//! qcow2 images (qemu's format), read with random access over any
//! [`Source`]: versions 2 and 3, any cluster size, zlib and zstd compressed
//! clusters, zero clusters, extended L2 entries (subclusters), backing
//! chains (raw or qcow2, recursively) and internal snapshots.
//!
//! Memory is bounded whatever the header claims: the L1 table is at most
//! 32 MiB (qemu's own limit), L2 tables and decompressed clusters are kept
//! in LRU caches of a fixed byte budget, and a backing chain is at most
//! [`MAX_CHAIN`] deep.  The reader writes nothing; [`write`] adds a
//! writer over the same reader (allocating clusters, keeping refcounts
//! exact, in an order that survives a crash).
//!
//! Written here because no crate reads qcow2 over an arbitrary positional
//! source (the format is a two-level table of cluster offsets; the codecs
//! come from flate2 and zstd).

mod depth;
pub mod header;
pub mod write;

use std::collections::HashMap;
use std::io::{self, Read};
use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use lru::LruCache;

pub use header::{Compression, Header, HeaderError, Snapshot};

use crate::sync::{LockExt, RwLockExt};
use crate::{read_exact, Error, Extent, RandomAccess, Result, Source};

const FORMAT: &str = "qcow2";

/// Backing chains deeper than this are refused (a loop would be infinite).
pub const MAX_CHAIN: usize = 64;

/// L2 entry bits.
const L2_COMPRESSED: u64 = 1 << 62;
const L2_ZERO: u64 = 1;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// How a backing file is found.
#[derive(Clone, Default)]
pub enum Backing {
    /// As the header names it: a relative name is taken from the directory
    /// of the image that names it, and opened with `open`.
    #[default]
    FromHeader,
    /// No backing file: unallocated clusters read as zeroes.
    None,
    /// This file instead of the one the header names (for the top image;
    /// the backing file's own backing is found from its header).
    Path(String),
}

/// Opens a backing file by path.
pub type Opener = Arc<dyn Fn(&str) -> io::Result<Arc<dyn Source>> + Send + Sync>;

#[derive(Clone)]
pub struct Qcow2Options {
    /// The image's name in messages, and the directory relative backing
    /// names are resolved against (when it is a path).
    pub name: String,
    pub backing: Backing,
    /// The backing file's format ("raw" or "qcow2"), overriding the header
    /// and probing.
    pub backing_format: Option<String>,
    /// Opens backing files; without it an image with a backing file is
    /// refused unless `backing` is `None`.
    pub open: Option<Opener>,
    /// Serve this internal snapshot (its ID or name) instead of the
    /// current state.
    pub snapshot: Option<String>,
    /// Bytes of L2 tables and of decompressed clusters kept in memory,
    /// each, per image in the chain.
    pub cache_bytes: u64,
}

impl Default for Qcow2Options {
    fn default() -> Self {
        Qcow2Options {
            name: "image".into(),
            backing: Backing::FromHeader,
            backing_format: None,
            open: None,
            snapshot: None,
            cache_bytes: 32 << 20,
        }
    }
}

/// Whether `first` (the file's first bytes) starts like a qcow2 image.
pub fn is_qcow2(first: &[u8]) -> bool {
    first.len() >= 4
        && u32::from_be_bytes([first[0], first[1], first[2], first[3]]) == header::MAGIC
}

/// What lies under an image's unallocated clusters.
enum BackingImage {
    Raw {
        source: Arc<dyn Source>,
        size: u64,
        name: String,
    },
    Qcow2(Box<Qcow2Reader>),
}

impl BackingImage {
    fn size(&self) -> u64 {
        match self {
            BackingImage::Raw { size, .. } => *size,
            BackingImage::Qcow2(q) => q.size,
        }
    }
    /// Read, with zeroes past the backing image's end.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let size = self.size();
        let have = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (inside, beyond) = buf.split_at_mut(have);
        beyond.fill(0);
        if inside.is_empty() {
            return Ok(());
        }
        match self {
            BackingImage::Raw { source, name, .. } => source
                .read_exact_at(inside, offset)
                .map_err(Error::io(name, offset)),
            BackingImage::Qcow2(q) => q.read_at(inside, offset),
        }
    }
}

/// Where a guest range's bytes are, within one cluster or subcluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// Not in this image: the backing file's, or zeroes.
    Unallocated,
    /// Reads as zeroes.
    Zero,
    /// At this host offset (for the first byte of the range).
    Data(u64),
    /// Inside the compressed cluster at `host` (`len` bytes), which
    /// decompresses to the guest cluster starting at `cluster`.
    Compressed { host: u64, len: u64, cluster: u64 },
}

/// One piece of [`Qcow2Reader::file_pieces`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilePiece {
    /// `len` bytes of the image file at `host`.
    Data { host: u64, len: u64 },
    /// `len` bytes that read as zeroes.
    Zero { len: u64 },
}

/// Where `[offset, offset+length)` of the virtual disk is, and how deep in
/// the backing chain (0 = this image).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    pub length: u64,
    pub kind: MapKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapKind {
    /// Data, allocated at this depth of the chain (0 = the top image).
    Data { depth: u32 },
    /// Reads as zeroes: a zero cluster at this depth.
    Zero { depth: u32 },
    /// Allocated nowhere in the chain (reads as zeroes).
    Unallocated,
}

/// A qcow2 image opened for reading.
pub struct Qcow2Reader {
    name: String,
    source: Arc<dyn Source>,
    /// The file's size: it grows when a writer appends clusters.
    source_size: AtomicU64,
    header: Header,
    /// The virtual size served (the snapshot's, when one is chosen).
    size: u64,
    /// Changed in place by a writer (new L2 tables).
    l1: RwLock<Vec<u64>>,
    backing: Option<BackingImage>,
    l2_cache: Mutex<LruCache<u64, Arc<[u64]>>>,
    /// L2 tables a writer changed and has not written yet, by offset:
    /// reads look here before the cache and the file, and nothing here is
    /// ever evicted.  A reader holds this lock (read) from its look here
    /// to its insert into `l2_cache`, so a table read from the file just
    /// before a writer pins a newer one cannot land in the cache after
    /// the writer has put the newer one there (see `write.rs`).
    pinned_l2: RwLock<HashMap<u64, Arc<[u64]>>>,
    cluster_cache: Mutex<LruCache<u64, Arc<[u8]>>>,
}

impl std::fmt::Debug for Qcow2Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Reader")
            .field("name", &self.name)
            .field("size", &self.size)
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

impl Qcow2Reader {
    pub fn open(source: Arc<dyn Source>, opts: &Qcow2Options) -> Result<Self> {
        Self::open_at_depth(source, opts, 0)
    }

    fn corrupt(name: &str, offset: u64, reason: impl Into<String>) -> Error {
        Error::corrupt(name, FORMAT, offset, reason)
    }

    fn open_at_depth(source: Arc<dyn Source>, opts: &Qcow2Options, depth: usize) -> Result<Self> {
        let name = opts.name.clone();
        let source_size = source.size().map_err(Error::io(&name, 0))?;
        // The header and its extensions fill (at most) the first cluster,
        // whose size the header says: read a sector to learn it, then the
        // rest of the cluster, rather than the largest cluster size (2 MiB
        // over HTTP for a 64 KiB-cluster image).
        let mut first = vec![0u8; source_size.min(512) as usize];
        read_exact(&source, &name, &mut first, 0)?;
        let cluster = match first.get(20..24) {
            Some(b) => match u32::from_be_bytes(b.try_into().expect("4 bytes")) {
                bits @ 9..=21 => 1u64 << bits,
                // Out of range: the header parser says so.
                _ => 512,
            },
            None => 512,
        };
        if cluster.min(source_size) > first.len() as u64 {
            let have = first.len();
            first.resize(cluster.min(source_size) as usize, 0);
            read_exact(&source, &name, &mut first[have..], have as u64)?;
        }
        let header = header::parse(&first).map_err(|e| match e {
            HeaderError::Corrupt { offset, reason } => Self::corrupt(&name, offset, reason),
            HeaderError::Unsupported(reason) => Error::unsupported(&name, FORMAT, reason),
        })?;
        drop(first);

        // The active L1 table, or a snapshot's.
        let (l1_offset, l1_size, size) = match &opts.snapshot {
            None => (header.l1_table_offset, header.l1_size, header.size),
            Some(want) => {
                let s = Self::find_snapshot(&source, source_size, &header, &name, want)?;
                let size = s.disk_size.unwrap_or(header.size);
                if u64::from(s.l1_size) * 8 > header::MAX_L1_BYTES
                    || s.l1_table_offset % header.cluster_size() != 0
                {
                    return Err(Self::corrupt(
                        &name,
                        header.snapshots_offset,
                        format!("snapshot {want}: bad L1 table"),
                    ));
                }
                header::check_l1_covers(&header, s.l1_size, size, header.snapshots_offset)
                    .map_err(|_| {
                        Self::corrupt(
                            &name,
                            header.snapshots_offset,
                            format!("snapshot {want}: its L1 table cannot map its size"),
                        )
                    })?;
                (s.l1_table_offset, s.l1_size, size)
            }
        };
        let l1_bytes = u64::from(l1_size) * 8;
        if l1_offset
            .checked_add(l1_bytes)
            .is_none_or(|end| end > source_size)
        {
            return Err(Self::corrupt(
                &name,
                40,
                format!("the L1 table at {l1_offset:#x} lies outside the file"),
            ));
        }
        let mut raw = vec![0u8; l1_bytes as usize];
        read_exact(&source, &name, &mut raw, l1_offset)?;
        let l1: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect();
        drop(raw);

        let backing = Self::open_backing(&header, opts, depth)?;
        let cluster = header.cluster_size().max(1);
        let slots =
            |budget: u64| NonZeroUsize::new((budget / cluster).max(4) as usize).expect("> 0");
        Ok(Qcow2Reader {
            name,
            source,
            source_size: AtomicU64::new(source_size),
            size,
            l1: RwLock::new(l1),
            backing,
            l2_cache: Mutex::new(LruCache::new(slots(opts.cache_bytes))),
            pinned_l2: RwLock::new(HashMap::new()),
            cluster_cache: Mutex::new(LruCache::new(slots(opts.cache_bytes))),
            header,
        })
    }

    fn find_snapshot(
        source: &Arc<dyn Source>,
        source_size: u64,
        header: &Header,
        name: &str,
        want: &str,
    ) -> Result<Snapshot> {
        if header.nb_snapshots == 0 {
            return Err(Error::unsupported(
                name,
                FORMAT,
                format!("snapshot {want}: the image has no snapshots"),
            ));
        }
        // Each entry is at most 40 + 64 KiB of extra data and names; read
        // the table a piece at a time would be kinder, but qemu itself
        // caps the whole table at 64 MiB, and so do we.
        let at = header.snapshots_offset;
        let len = (source_size.saturating_sub(at)).min(64 << 20);
        if at >= source_size {
            return Err(Self::corrupt(
                name,
                64,
                "the snapshot table lies outside the file",
            ));
        }
        let mut table = vec![0u8; len as usize];
        read_exact(source, name, &mut table, at)?;
        let snaps =
            header::parse_snapshots(&table, header.nb_snapshots, at).map_err(|e| match e {
                HeaderError::Corrupt { offset, reason } => Self::corrupt(name, offset, reason),
                HeaderError::Unsupported(reason) => Error::unsupported(name, FORMAT, reason),
            })?;
        // As qemu: an ID first, then a name.
        snaps
            .iter()
            .find(|s| s.id == want)
            .or_else(|| snaps.iter().find(|s| s.name == want))
            .cloned()
            .ok_or_else(|| {
                let have: Vec<String> = snaps
                    .iter()
                    .map(|s| format!("{} ({})", s.id, s.name))
                    .collect();
                Error::unsupported(
                    name,
                    FORMAT,
                    format!("no snapshot {want}; the image has {}", have.join(", ")),
                )
            })
    }

    fn open_backing(
        header: &Header,
        opts: &Qcow2Options,
        depth: usize,
    ) -> Result<Option<BackingImage>> {
        let path = match (&opts.backing, &header.backing_file) {
            (Backing::None, _) => return Ok(None),
            (Backing::Path(p), _) => p.clone(),
            (Backing::FromHeader, None) => return Ok(None),
            (Backing::FromHeader, Some(b)) => {
                if b.contains("://") || b.starts_with("json:") {
                    return Err(Error::unsupported(
                        &opts.name,
                        FORMAT,
                        format!(
                            "backing file {b:?} is not a local file: give backing=PATH or backing=none"
                        ),
                    ));
                }
                let dir = Path::new(&opts.name).parent().unwrap_or(Path::new(""));
                dir.join(b).to_string_lossy().into_owned()
            }
        };
        if depth + 1 >= MAX_CHAIN {
            return Err(Error::unsupported(
                &opts.name,
                FORMAT,
                format!("backing chain deeper than {MAX_CHAIN} (a loop?) at {path}"),
            ));
        }
        let open = opts.open.as_ref().ok_or_else(|| {
            Error::unsupported(
                &opts.name,
                FORMAT,
                format!(
                    "the image has a backing file ({path}) that cannot be opened from here: give backing=PATH or backing=none"
                ),
            )
        })?;
        let source = open(&path).map_err(|e| {
            let e = io::Error::new(
                e.kind(),
                format!("opening the backing file of {}: {e}", opts.name),
            );
            Error::io(&path, 0)(e)
        })?;
        let format = match opts
            .backing_format
            .as_deref()
            .or(header.backing_format.as_deref())
        {
            Some(f) => f.to_string(),
            None => {
                // No format recorded: probe, as qemu does.
                let mut magic = [0u8; 4];
                let probe = source.size().ok().filter(|&s| s >= 4).is_some()
                    && source.read_exact_at(&mut magic, 0).is_ok()
                    && is_qcow2(&magic);
                if probe { "qcow2" } else { "raw" }.to_string()
            }
        };
        match format.as_str() {
            "raw" => {
                let size = source.size().map_err(Error::io(&path, 0))?;
                Ok(Some(BackingImage::Raw {
                    source,
                    size,
                    name: path,
                }))
            }
            "qcow2" => {
                let sub = Qcow2Options {
                    name: path,
                    backing: Backing::FromHeader,
                    backing_format: None,
                    snapshot: None,
                    ..opts.clone()
                };
                Ok(Some(BackingImage::Qcow2(Box::new(Self::open_at_depth(
                    source,
                    &sub,
                    depth + 1,
                )?))))
            }
            other => Err(Error::unsupported(
                &opts.name,
                FORMAT,
                format!("backing file format {other:?} (raw and qcow2 are supported)"),
            )),
        }
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn source_size(&self) -> u64 {
        self.source_size.load(Ordering::Acquire)
    }

    /// L1 entry `index`, or 0 past the table's end.
    fn l1_entry(&self, index: u64) -> u64 {
        self.l1
            .read_unpoisoned()
            .get(index as usize)
            .copied()
            .unwrap_or(0)
    }

    /// The L2 table holding guest cluster `cluster`, or None when its L1
    /// entry is unallocated.
    fn l2_table(&self, cluster: u64) -> Result<Option<Arc<[u64]>>> {
        let l1_index = cluster / self.header.l2_entries();
        let offset = self.l1_entry(l1_index) & OFFSET_MASK;
        if offset == 0 {
            return Ok(None);
        }
        self.l2_at(offset, l1_index).map(Some)
    }

    /// The L2 table at file offset `offset` (named by L1 entry
    /// `l1_index`, for messages).
    fn l2_at(&self, offset: u64, l1_index: u64) -> Result<Arc<[u64]>> {
        let pinned = self.pinned_l2.read_unpoisoned();
        if let Some(t) = pinned.get(&offset) {
            return Ok(t.clone());
        }
        if let Some(t) = self.l2_cache.lock_unpoisoned().get(&offset) {
            return Ok(t.clone());
        }
        let cs = self.header.cluster_size();
        if offset % cs != 0
            || offset
                .checked_add(cs)
                .is_none_or(|end| end > self.source_size())
        {
            return Err(Self::corrupt(
                &self.name,
                self.header.l1_table_offset + l1_index * 8,
                format!("L1 entry {l1_index} points outside the file or off a cluster boundary ({offset:#x})"),
            ));
        }
        let mut raw = vec![0u8; cs as usize];
        read_exact(&self.source, &self.name, &mut raw, offset)?;
        let table: Arc<[u64]> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect();
        self.l2_cache.lock_unpoisoned().put(offset, table.clone());
        drop(pinned);
        Ok(table)
    }

    /// Where guest `offset` is, and for how many bytes from there the
    /// answer holds (to the end of its cluster or subcluster).
    fn place(&self, offset: u64) -> Result<(Place, u64)> {
        let cs = self.header.cluster_size();
        let cluster = offset / cs;
        let within = offset % cs;
        let to_cluster_end = cs - within;
        let Some(table) = self.l2_table(cluster)? else {
            return Ok((Place::Unallocated, to_cluster_end));
        };
        let index = (cluster % self.header.l2_entries()) as usize;
        let width = if self.header.extended_l2 { 2 } else { 1 };
        let entry = table[index * width];
        let where_ = || {
            let l2 = self.l1_entry(cluster / self.header.l2_entries()) & OFFSET_MASK;
            l2 + (index * width * 8) as u64
        };
        if entry & L2_COMPRESSED != 0 {
            let x = 62 - (self.header.cluster_bits - 8);
            let host = entry & ((1u64 << x) - 1);
            let sectors = (entry >> x) & ((1u64 << (self.header.cluster_bits - 8)) - 1);
            let len = (sectors + 1) * 512 - (host & 511);
            if host >= self.source_size() {
                return Err(Self::corrupt(
                    &self.name,
                    where_(),
                    format!("compressed cluster at {host:#x} lies outside the file"),
                ));
            }
            return Ok((
                Place::Compressed {
                    host,
                    len: len.min(self.source_size() - host),
                    cluster: cluster * cs,
                },
                to_cluster_end,
            ));
        }
        let host = entry & OFFSET_MASK;
        if host % cs != 0 {
            return Err(Self::corrupt(
                &self.name,
                where_(),
                format!("data cluster offset {host:#x} is not cluster-aligned"),
            ));
        }
        // A cluster that starts past the end of the file is corrupt; one
        // cut short by the end reads its missing tail as zeroes (as qemu's
        // file driver reads past the end).
        let source_size = self.source_size();
        let outside = |host: u64| host != 0 && host >= source_size;
        if !self.header.extended_l2 {
            if entry & L2_ZERO != 0 && self.header.version >= 3 {
                return Ok((Place::Zero, to_cluster_end));
            }
            if host == 0 {
                return Ok((Place::Unallocated, to_cluster_end));
            }
            if outside(host) {
                return Err(Self::corrupt(
                    &self.name,
                    where_(),
                    format!("data cluster at {host:#x} lies outside the file"),
                ));
            }
            return Ok((Place::Data(host + within), to_cluster_end));
        }
        // Extended L2: 32 subclusters, an allocated bit and a zero bit each.
        let bitmap = table[index * 2 + 1];
        let sc_size = cs / 32;
        let sc = (within / sc_size) as u32;
        let to_sc_end = sc_size - within % sc_size;
        let alloc = bitmap & (1 << sc) != 0;
        let zero = bitmap & (1 << (32 + sc)) != 0;
        match (alloc, zero) {
            (true, true) => Err(Self::corrupt(
                &self.name,
                where_() + 8,
                format!("subcluster {sc} is marked both allocated and zero"),
            )),
            (false, true) => Ok((Place::Zero, to_sc_end)),
            (false, false) => Ok((Place::Unallocated, to_sc_end)),
            (true, false) if host == 0 => Err(Self::corrupt(
                &self.name,
                where_(),
                format!("subcluster {sc} is allocated in a cluster with no offset"),
            )),
            (true, false) if outside(host) => Err(Self::corrupt(
                &self.name,
                where_(),
                format!("data cluster at {host:#x} lies outside the file"),
            )),
            (true, false) => Ok((Place::Data(host + within), to_sc_end)),
        }
    }

    fn decompressed(&self, host: u64, len: u64, cluster: u64) -> Result<Arc<[u8]>> {
        if let Some(c) = self.cluster_cache.lock_unpoisoned().get(&host) {
            return Ok(c.clone());
        }
        let mut input = vec![0u8; len as usize];
        read_exact(&self.source, &self.name, &mut input, host)?;
        let cs = self.header.cluster_size() as usize;
        let mut out = vec![0u8; cs];
        let bad = |why: String| {
            Self::corrupt(
                &self.name,
                host,
                format!("compressed cluster for guest offset {cluster}: {why}"),
            )
        };
        match self.header.compression {
            Compression::Zlib => {
                // Raw deflate; the cluster is complete when the output is
                // full (the input may end in sector padding).
                let mut z = flate2::Decompress::new(false);
                z.decompress(&input, &mut out, flate2::FlushDecompress::Finish)
                    .map_err(|e| bad(e.to_string()))?;
                if z.total_out() != cs as u64 {
                    return Err(bad(format!(
                        "decompresses to {} bytes, not {cs}",
                        z.total_out()
                    )));
                }
            }
            Compression::Zstd => {
                let mut d = zstd::stream::read::Decoder::with_buffer(&input[..])
                    .map_err(|e| bad(e.to_string()))?
                    .single_frame();
                d.read_exact(&mut out).map_err(|e| bad(e.to_string()))?;
            }
        }
        let out: Arc<[u8]> = out.into();
        self.cluster_cache.lock_unpoisoned().put(host, out.clone());
        Ok(out)
    }

    /// Where the bytes of `[offset, offset+len)` sit in the image file,
    /// if all of them can be sent from it unchanged: data clusters of this
    /// image, and zeroes (zero clusters, and unallocated ones when there is
    /// no backing image).  `None` when any part is compressed or comes
    /// from a backing image: those must be read through [`Self::read_at`].
    /// Adjacent pieces are merged (clusters that follow each other in the
    /// file become one piece).
    pub fn file_pieces(&self, offset: u64, len: u64) -> Result<Option<Vec<FilePiece>>> {
        let end = offset.saturating_add(len).min(self.size);
        let mut pieces: Vec<FilePiece> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let (place, n) = self.place(pos)?;
            let n = n.min(end - pos);
            let piece = match place {
                Place::Data(host) => FilePiece::Data { host, len: n },
                Place::Zero => FilePiece::Zero { len: n },
                Place::Unallocated if self.backing.is_none() => FilePiece::Zero { len: n },
                Place::Unallocated | Place::Compressed { .. } => return Ok(None),
            };
            match (pieces.last_mut(), piece) {
                (Some(FilePiece::Data { host: h, len: l }), FilePiece::Data { host, len })
                    if *h + *l == host =>
                {
                    *l += len
                }
                (Some(FilePiece::Zero { len: l }), FilePiece::Zero { len }) => *l += len,
                (_, p) => pieces.push(p),
            }
            pos += n;
        }
        Ok(Some(pieces))
    }

    /// Fill `buf` with the virtual disk's bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > self.size)
        {
            let e = io::Error::new(io::ErrorKind::UnexpectedEof, "read past the virtual size");
            return Err(Error::io(&self.name, offset)(e));
        }
        // Data clusters that lie one after another in the file (the usual
        // case for an image written sequentially) are read with one call:
        // `pending` is such a run not yet read, as (buffer start, host
        // offset, length).
        let mut pending: Option<(usize, u64, usize)> = None;
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let (place, run) = self.place(at)?;
            let n = run.min((buf.len() - done) as u64) as usize;
            if let Place::Data(host) = place {
                match &mut pending {
                    Some((from, start, len)) if *start + *len as u64 == host => {
                        debug_assert_eq!(*from + *len, done);
                        *len += n;
                    }
                    _ => {
                        if let Some(p) = pending.take() {
                            self.read_data(buf, p)?;
                        }
                        pending = Some((done, host, n));
                    }
                }
                done += n;
                continue;
            }
            if let Some(p) = pending.take() {
                self.read_data(buf, p)?;
            }
            let part = &mut buf[done..done + n];
            match place {
                Place::Zero => part.fill(0),
                Place::Unallocated => match &self.backing {
                    Some(b) => b.read_at(part, at)?,
                    None => part.fill(0),
                },
                Place::Compressed { host, len, cluster } => {
                    let data = self.decompressed(host, len, cluster)?;
                    let from = (at - cluster) as usize;
                    part.copy_from_slice(&data[from..from + n]);
                }
                Place::Data(_) => unreachable!("handled above"),
            }
            done += n;
        }
        if let Some(p) = pending {
            self.read_data(buf, p)?;
        }
        Ok(())
    }

    /// Read a run of data clusters, `(buffer start, host offset, length)`.
    /// Past the end of the file reads as zeroes, as qemu's file driver
    /// does for an image cut short.
    fn read_data(&self, buf: &mut [u8], (from, host, len): (usize, u64, usize)) -> Result<()> {
        let part = &mut buf[from..from + len];
        let have = self.source_size().saturating_sub(host).min(len as u64) as usize;
        let (inside, beyond) = part.split_at_mut(have);
        beyond.fill(0);
        if !inside.is_empty() {
            read_exact(&self.source, &self.name, inside, host)?;
        }
        Ok(())
    }

    /// Describe `[offset, offset+len)` (clipped to the size) as runs.
    pub fn map(&self, offset: u64, len: u64) -> Result<Vec<Mapping>> {
        self.map_at_depth(offset, len, 0)
    }

    fn map_at_depth(&self, offset: u64, len: u64, depth: u32) -> Result<Vec<Mapping>> {
        let end = offset.saturating_add(len).min(self.size);
        let mut out: Vec<Mapping> = Vec::new();
        let mut push = |m: Mapping| match out.last_mut() {
            Some(last) if last.kind == m.kind => last.length += m.length,
            _ => out.push(m),
        };
        let mut at = offset;
        while at < end {
            let (place, run) = self.place(at)?;
            let n = run.min(end - at);
            match place {
                Place::Data(_) | Place::Compressed { .. } => push(Mapping {
                    length: n,
                    kind: MapKind::Data { depth },
                }),
                Place::Zero => push(Mapping {
                    length: n,
                    kind: MapKind::Zero { depth },
                }),
                Place::Unallocated => match &self.backing {
                    None => push(Mapping {
                        length: n,
                        kind: MapKind::Unallocated,
                    }),
                    Some(BackingImage::Raw { size, .. }) => {
                        let inside = size.saturating_sub(at).min(n);
                        if inside > 0 {
                            push(Mapping {
                                length: inside,
                                kind: MapKind::Data { depth: depth + 1 },
                            });
                        }
                        if n > inside {
                            push(Mapping {
                                length: n - inside,
                                kind: MapKind::Unallocated,
                            });
                        }
                    }
                    Some(BackingImage::Qcow2(q)) => {
                        let inside = q.size.saturating_sub(at).min(n);
                        if inside > 0 {
                            for m in q.map_at_depth(at, inside, depth + 1)? {
                                push(m);
                            }
                        }
                        if n > inside {
                            push(Mapping {
                                length: n - inside,
                                kind: MapKind::Unallocated,
                            });
                        }
                    }
                },
            }
            at += n;
        }
        Ok(out)
    }
}

impl RandomAccess for Qcow2Reader {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        Qcow2Reader::read_at(self, buf, offset)
    }
    fn extents(&self, offset: u64, len: u64) -> Vec<Extent> {
        match self.map(offset, len) {
            Ok(m) => m
                .into_iter()
                .map(|m| Extent {
                    length: m.length,
                    zero: !matches!(m.kind, MapKind::Data { .. }),
                })
                .collect(),
            Err(_) => vec![Extent {
                length: len.min(self.size.saturating_sub(offset)),
                zero: false,
            }],
        }
    }
    fn format(&self) -> &'static str {
        FORMAT
    }
}
