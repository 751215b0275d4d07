//! `partitioning`: files served as the partitions of one disk, behind a
//! partition table made up on the fly.
//!
//! Why: a filesystem image made on its own (`mkfs` on a file) is not a
//! disk; tools and VMs that want a partitioned disk can be given one
//! without copying, as nbdkit's partitioning plugin does.  The table (MBR,
//! with an extended partition and EBRs past four files, or GPT with its
//! protective MBR and backup table at the end) and the alignment padding
//! are virtual: reads see them, writes may not change them (EIO); writes
//! to partitions go to the files.
//!
//! The partition filter parses such tables; the writers here are separate
//! because plugins do not depend on filters (the tests read the tables back
//! with that filter and with sfdisk).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nbdkit_backend::{
    parse_size, Backend, CacheMode, Config, ConfigError, Error, Extents, Handle, Param, PluginSpec,
    Result, EXTENT_HOLE, EXTENT_ZERO,
};

const SECTOR: u64 = 512;
const DEFAULT_ALIGNMENT: u64 = 1 << 20;
const DEFAULT_MBR_ID: u8 = 0x83;
const DEFAULT_TYPE_GUID: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
/// GPT partition entries: at least 128 of 128 bytes (32 sectors).
const GPT_MIN_ENTRIES: u64 = 128;
const GPT_ENTRY_SIZE: u64 = 128;

struct Part {
    path: PathBuf,
    file: File,
    /// File size; the partition is this rounded up to whole sectors.
    len: u64,
    start: u64,
    mbr_id: u8,
    type_guid: [u8; 16],
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Zero,
    /// Index into `tables`.
    Table(usize),
    /// Index into `parts`.
    File(usize),
}

/// The disk: every byte belongs to exactly one region.
struct Layout {
    size: u64,
    parts: Vec<Part>,
    tables: Vec<(u64, Vec<u8>)>,
    /// (start, length, kind), sorted and contiguous from 0 to `size`.
    regions: Vec<(u64, u64, Kind)>,
    writable: bool,
}

/// Parse "0FC63DAF-8483-4772-8E79-3D69D8477DE4" into GPT's on-disk byte
/// order (the first three fields little-endian).
fn parse_guid(s: &str) -> std::result::Result<[u8; 16], String> {
    let parts: Vec<&str> = s.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    if parts.len() != 5
        || parts.iter().zip(lens).any(|(p, l)| p.len() != l)
        || !parts
            .iter()
            .all(|p| p.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(format!("'{s}' is not a GUID like {DEFAULT_TYPE_GUID}"));
    }
    let hex: String = parts.concat();
    let mut b = [0u8; 16];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[i * 2..i * 2 + 2], 16).map_err(|e| e.to_string())?;
    }
    b[0..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    Ok(b)
}

/// A version-4-shaped GUID derived from `seed`, so the same files give
/// the same disk every time.
fn make_guid(seed: u64) -> [u8; 16] {
    let mix = |mut z: u64| {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut g = [0u8; 16];
    g[..8].copy_from_slice(&mix(seed).to_le_bytes());
    g[8..].copy_from_slice(&mix(seed ^ 0x5555).to_le_bytes());
    g[7] = (g[7] & 0x0f) | 0x40;
    g[8] = (g[8] & 0x3f) | 0x80;
    g
}

/// One 16-byte MBR partition entry, LBA only (CHS fields say "use LBA").
fn mbr_entry(kind: u8, start: u64, sectors: u64) -> [u8; 16] {
    let mut e = [0u8; 16];
    e[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]);
    e[4] = kind;
    e[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
    e[8..12].copy_from_slice(&(start as u32).to_le_bytes());
    e[12..16].copy_from_slice(&(sectors as u32).to_le_bytes());
    e
}

fn boot_sector(entries: &[[u8; 16]], disk_id: u32) -> Vec<u8> {
    let mut s = vec![0u8; SECTOR as usize];
    s[0x1b8..0x1bc].copy_from_slice(&disk_id.to_le_bytes());
    for (i, e) in entries.iter().enumerate() {
        s[0x1be + 16 * i..0x1be + 16 * (i + 1)].copy_from_slice(e);
    }
    s[510] = 0x55;
    s[511] = 0xaa;
    s
}

struct FileSpec {
    path: String,
    alignment: u64,
    mbr_id: u8,
    type_guid: [u8; 16],
}

fn build(specs: Vec<FileSpec>, kind: Option<&str>) -> std::result::Result<Layout, ConfigError> {
    let cerr = |m: String| ConfigError::new(format!("partitioning: {m}"));
    let mut parts = Vec::new();
    let mut writable = true;
    for s in &specs {
        let path =
            std::fs::canonicalize(&s.path).map_err(|e| cerr(format!("file={}: {e}", s.path)))?;
        let file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(_) => {
                writable = false;
                File::open(&path).map_err(|e| cerr(format!("file={}: {e}", s.path)))?
            }
        };
        let meta = file
            .metadata()
            .map_err(|e| cerr(format!("file={}: {e}", s.path)))?;
        if !meta.is_file() {
            return Err(cerr(format!("file={}: not a regular file", s.path)));
        }
        if meta.len() == 0 {
            return Err(cerr(format!(
                "file={}: zero-length partitions are not allowed",
                s.path
            )));
        }
        parts.push(Part {
            path,
            file,
            len: meta.len(),
            start: 0,
            mbr_id: s.mbr_id,
            type_guid: s.type_guid,
        });
    }
    // An upper bound of the MBR layout's size: files, alignment, EBRs.
    let bound: u64 = parts
        .iter()
        .zip(&specs)
        .map(|(p, s)| p.len.div_ceil(SECTOR) * SECTOR + s.alignment + SECTOR)
        .fold(SECTOR, u64::saturating_add);
    let gpt = match kind {
        Some("gpt") => true,
        Some("mbr") => false,
        Some(k) => return Err(cerr(format!("partition-type={k}: expected mbr or gpt"))),
        None => parts.len() > 4 || bound / SECTOR > u32::MAX as u64,
    };
    let n = parts.len() as u64;
    let entries = n.max(GPT_MIN_ENTRIES).div_ceil(4) * 4;
    let entry_sectors = entries * GPT_ENTRY_SIZE / SECTOR;
    // Lay out the partitions (and, for MBR logical partitions, the EBR
    // before each).
    let mut offset = if gpt {
        (2 + entry_sectors) * SECTOR
    } else {
        SECTOR
    };
    let mut ebrs = Vec::new();
    let logical = !gpt && parts.len() > 4;
    let too_big = || cerr("the disk would be too large".into());
    for (i, (p, s)) in parts.iter_mut().zip(&specs).enumerate() {
        if logical && i >= 3 {
            ebrs.push(offset);
            offset += SECTOR;
        }
        p.start = offset
            .checked_next_multiple_of(s.alignment)
            .ok_or_else(too_big)?;
        offset = p
            .start
            .checked_add(p.len.div_ceil(SECTOR) * SECTOR)
            .ok_or_else(too_big)?;
    }
    let size = if gpt {
        offset + (entry_sectors + 1) * SECTOR
    } else {
        offset
    };
    if size > i64::MAX as u64 {
        return Err(too_big());
    }
    let sectors = |p: &Part| p.len.div_ceil(SECTOR);
    let disk_seed = parts
        .iter()
        .fold(size, |a, p| a.rotate_left(7) ^ p.len ^ p.start);
    let mut tables: Vec<(u64, Vec<u8>)> = Vec::new();
    if gpt {
        let last = size / SECTOR - 1;
        let pmbr = boot_sector(&[mbr_entry(0xee, 1, last.min(u32::MAX as u64))], 0);
        tables.push((0, pmbr));
        let mut array = vec![0u8; (entries * GPT_ENTRY_SIZE) as usize];
        for (i, p) in parts.iter().enumerate() {
            let e = &mut array[i * GPT_ENTRY_SIZE as usize..(i + 1) * GPT_ENTRY_SIZE as usize];
            e[0..16].copy_from_slice(&p.type_guid);
            e[16..32].copy_from_slice(&make_guid(disk_seed ^ (i as u64 + 1)));
            let first = p.start / SECTOR;
            e[32..40].copy_from_slice(&first.to_le_bytes());
            e[40..48].copy_from_slice(&(first + sectors(p) - 1).to_le_bytes());
            let name: Vec<u16> = format!("p{}", i + 1).encode_utf16().collect();
            for (j, c) in name.iter().enumerate() {
                e[56 + 2 * j..58 + 2 * j].copy_from_slice(&c.to_le_bytes());
            }
        }
        let array_crc = crc32fast::hash(&array);
        let header = |me: u64, other: u64, entries_lba: u64| {
            let mut h = vec![0u8; SECTOR as usize];
            h[0..8].copy_from_slice(b"EFI PART");
            h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
            h[12..16].copy_from_slice(&92u32.to_le_bytes());
            h[24..32].copy_from_slice(&me.to_le_bytes());
            h[32..40].copy_from_slice(&other.to_le_bytes());
            h[40..48].copy_from_slice(&(2 + entry_sectors).to_le_bytes());
            h[48..56].copy_from_slice(&(last - entry_sectors - 1).to_le_bytes());
            h[56..72].copy_from_slice(&make_guid(disk_seed));
            h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
            h[80..84].copy_from_slice(&(entries as u32).to_le_bytes());
            h[84..88].copy_from_slice(&(GPT_ENTRY_SIZE as u32).to_le_bytes());
            h[88..92].copy_from_slice(&array_crc.to_le_bytes());
            let crc = crc32fast::hash(&h[..92]);
            h[16..20].copy_from_slice(&crc.to_le_bytes());
            h
        };
        tables.push((SECTOR, header(1, last, 2)));
        tables.push((2 * SECTOR, array.clone()));
        let backup_entries = last - entry_sectors;
        tables.push((backup_entries * SECTOR, array));
        tables.push((last * SECTOR, header(last, 1, backup_entries)));
    } else {
        if size / SECTOR > u32::MAX as u64 {
            return Err(cerr(
                "the disk is too large for an MBR partition table; use partition-type=gpt".into(),
            ));
        }
        let mut primary: Vec<[u8; 16]> = parts
            .iter()
            .take(if logical { 3 } else { 4 })
            .map(|p| mbr_entry(p.mbr_id, p.start / SECTOR, sectors(p)))
            .collect();
        if logical {
            let ext_start = ebrs[0] / SECTOR;
            let ext_end = size / SECTOR;
            primary.push(mbr_entry(0x05, ext_start, ext_end - ext_start));
            for (k, p) in parts.iter().enumerate().skip(3) {
                let ebr = ebrs[k - 3] / SECTOR;
                let mut entries = vec![mbr_entry(p.mbr_id, p.start / SECTOR - ebr, sectors(p))];
                if let Some(&next) = ebrs.get(k - 2) {
                    let next = next / SECTOR;
                    let np = &parts[k + 1];
                    let next_end = np.start / SECTOR + sectors(np);
                    entries.push(mbr_entry(0x05, next - ext_start, next_end - next));
                }
                tables.push((ebr * SECTOR, boot_sector(&entries, 0)));
            }
        }
        tables.insert(0, (0, boot_sector(&primary, disk_seed as u32)));
    }
    tables.sort_by_key(|t| t.0);
    // Regions: tables, files and zeroes in between.
    let mut marks: Vec<(u64, u64, Kind)> = tables
        .iter()
        .enumerate()
        .map(|(i, (o, d))| (*o, d.len() as u64, Kind::Table(i)))
        .chain(
            parts
                .iter()
                .enumerate()
                .map(|(i, p)| (p.start, p.len, Kind::File(i))),
        )
        .collect();
    marks.sort_by_key(|m| m.0);
    let mut regions = Vec::new();
    let mut pos = 0;
    for (o, l, k) in marks {
        if o > pos {
            regions.push((pos, o - pos, Kind::Zero));
        }
        regions.push((o, l, k));
        pos = o + l;
    }
    if size > pos {
        regions.push((pos, size - pos, Kind::Zero));
    }
    Ok(Layout {
        size,
        parts,
        tables,
        regions,
        writable,
    })
}

impl Layout {
    /// The regions under `[offset, offset+len)` as (kind, offset within
    /// the region, offset within the request, length).
    fn spans(&self, offset: u64, len: u64) -> impl Iterator<Item = (Kind, u64, usize, usize)> + '_ {
        let end = offset + len;
        let first = self.regions.partition_point(|r| r.0 + r.1 <= offset);
        self.regions[first..]
            .iter()
            .take_while(move |r| r.0 < end)
            .map(move |&(s, l, k)| {
                let from = offset.max(s);
                let to = end.min(s + l);
                (k, from - s, (from - offset) as usize, (to - from) as usize)
            })
    }

    fn file_err(&self, what: &str, i: usize, e: std::io::Error) -> Error {
        Error::from_io(format_args!("{what} {}", self.parts[i].path.display()), e)
    }
}

struct Partitioning {
    layout: Arc<Layout>,
}

impl Backend for Partitioning {
    fn name(&self) -> &str {
        "partitioning"
    }
    fn open(&self, _readonly: bool, _export: &str) -> Result<Box<dyn Handle>> {
        Ok(Box::new(PartHandle {
            l: self.layout.clone(),
        }))
    }
}

struct PartHandle {
    l: Arc<Layout>,
}

impl Handle for PartHandle {
    fn size(&self) -> Result<u64> {
        Ok(self.l.size)
    }
    fn can_write(&self) -> Result<bool> {
        Ok(self.l.writable)
    }
    fn can_flush(&self) -> Result<bool> {
        Ok(self.l.writable)
    }
    nbdkit_backend::capabilities! {
        can_extents: true, can_multi_conn: true, can_cache: CacheMode::Emulate,
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        for (k, at, i, n) in self.l.spans(offset, buf.len() as u64) {
            let out = &mut buf[i..i + n];
            match k {
                Kind::Zero => out.fill(0),
                Kind::Table(t) => {
                    out.copy_from_slice(&self.l.tables[t].1[at as usize..at as usize + n])
                }
                Kind::File(f) => self.l.parts[f]
                    .file
                    .read_exact_at(out, at)
                    .map_err(|e| self.l.file_err("pread", f, e))?,
            }
        }
        Ok(())
    }
    fn pwrite(&self, buf: &[u8], offset: u64, _fua: bool) -> Result<()> {
        if !self.l.writable {
            return Err(Error::read_only(
                "partitioning: the files are open read-only",
            ));
        }
        // Check first, so a refused write changes nothing.
        for (k, at, i, n) in self.l.spans(offset, buf.len() as u64) {
            let data = &buf[i..i + n];
            let same = match k {
                Kind::Zero => data.iter().all(|&b| b == 0),
                Kind::Table(t) => data == &self.l.tables[t].1[at as usize..at as usize + n],
                Kind::File(_) => true,
            };
            if !same {
                return Err(Error::io(format!(
                    "partitioning: the write at offset {} would change the partition table or padding",
                    offset + i as u64
                )));
            }
        }
        for (k, at, i, n) in self.l.spans(offset, buf.len() as u64) {
            if let Kind::File(f) = k {
                self.l.parts[f]
                    .file
                    .write_all_at(&buf[i..i + n], at)
                    .map_err(|e| self.l.file_err("pwrite", f, e))?;
            }
        }
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        for (i, p) in self.l.parts.iter().enumerate() {
            p.file
                .sync_data()
                .map_err(|e| self.l.file_err("fdatasync", i, e))?;
        }
        Ok(())
    }
    fn extents(&self, offset: u64, count: u64, req_one: bool, extents: &mut Extents) -> Result<()> {
        for (k, at, i, n) in self.l.spans(offset, count) {
            let disk = offset + i as u64;
            match k {
                Kind::Zero => extents.add(disk, n as u64, EXTENT_HOLE | EXTENT_ZERO)?,
                Kind::Table(_) => extents.add(disk, n as u64, 0)?,
                Kind::File(f) => crate::file::seek_extents(
                    self.l.parts[f].file.as_raw_fd(),
                    at,
                    n as u64,
                    disk - at,
                    req_one,
                    extents,
                )
                .map_err(|(what, e)| self.l.file_err(what, f, e))?,
            }
            if req_one {
                break;
            }
        }
        Ok(())
    }
}

fn create(cfg: &mut Config) -> std::result::Result<Arc<dyn Backend>, ConfigError> {
    let cerr = |m: String| ConfigError::new(format!("partitioning: {m}"));
    let mut kind = None;
    let mut alignment = DEFAULT_ALIGNMENT;
    let mut mbr_id = DEFAULT_MBR_ID;
    let mut type_guid = parse_guid(DEFAULT_TYPE_GUID).map_err(cerr)?;
    let mut specs = Vec::new();
    // alignment=, mbr-id= and type-guid= apply to the files after them, so
    // the parameters are read in command-line order.
    for (k, v) in cfg.take_rest() {
        match k.as_str() {
            "file" => specs.push(FileSpec {
                path: v,
                alignment,
                mbr_id,
                type_guid,
            }),
            "partition-type" => kind = Some(v),
            "alignment" => {
                let a = parse_size(&v).map_err(|e| cerr(format!("alignment={v}: {e}")))?;
                if a == 0 || a % SECTOR != 0 {
                    return Err(cerr(format!(
                        "alignment={v}: must be a positive multiple of 512"
                    )));
                }
                alignment = a;
            }
            "mbr-id" => {
                mbr_id = if v == "default" {
                    DEFAULT_MBR_ID
                } else {
                    let h = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X"));
                    let r = match h {
                        Some(h) => u8::from_str_radix(h, 16),
                        None => v.parse::<u8>(),
                    };
                    r.map_err(|_| cerr(format!("mbr-id={v}: expected a byte such as 0x83")))?
                }
            }
            "type-guid" => {
                type_guid = if v == "default" {
                    parse_guid(DEFAULT_TYPE_GUID).map_err(cerr)?
                } else {
                    parse_guid(&v).map_err(|e| cerr(format!("type-guid={v}: {e}")))?
                }
            }
            _ => return Err(cerr(format!("unknown parameter '{k}'"))),
        }
    }
    if specs.is_empty() {
        return Err(cerr("at least one file= is required".into()));
    }
    let layout = build(specs, kind.as_deref())?;
    Ok(Arc::new(Partitioning {
        layout: Arc::new(layout),
    }))
}

pub static SPEC: PluginSpec = PluginSpec {
    name: "partitioning",
    summary: "files as the partitions of a disk with a virtual MBR or GPT table",
    description: "Each file= becomes a partition, in order.  alignment=, mbr-id= and \
                  type-guid= apply to the files after them.  The table and padding are \
                  virtual and cannot be changed; writes to partitions reach the files.\n\n\
                  Example:\n  nbdkit-rs partitioning boot.img mbr-id=0x82 swap.img \
                  mbr-id=default root.img",
    magic_config_key: Some("file"),
    params: &[
        Param {
            name: "file",
            help: "a file holding one partition; repeat in order (the magic key)",
        },
        Param {
            name: "partition-type",
            help: "mbr or gpt (default: mbr for up to 4 files under 2 TB, else gpt)",
        },
        Param {
            name: "alignment",
            help: "alignment of the following partitions (default 1M)",
        },
        Param {
            name: "mbr-id",
            help: "MBR type byte of the following partitions, e.g. 0x82 (or default: 0x83)",
        },
        Param {
            name: "type-guid",
            help: "GPT type GUID of the following partitions (or default: Linux filesystem)",
        },
    ],
    create,
};

/// A read-only disk with one partition (1 MiB aligned) holding the file
/// at `path`: in a GPT (Linux filesystem type) for linuxdisk, or an MBR
/// with partition type `mbr_id` for floppy.  The file may be unlinked once
/// this returns (it is held open).
pub(crate) fn single_partition_disk(
    path: &Path,
    mbr_id: Option<u8>,
) -> std::result::Result<Arc<dyn Backend>, ConfigError> {
    let spec = FileSpec {
        path: path.to_string_lossy().into_owned(),
        alignment: DEFAULT_ALIGNMENT,
        mbr_id: mbr_id.unwrap_or(DEFAULT_MBR_ID),
        type_guid: parse_guid(DEFAULT_TYPE_GUID).map_err(ConfigError::new)?,
    };
    let kind = if mbr_id.is_some() { "mbr" } else { "gpt" };
    let mut layout = build(vec![spec], Some(kind))?;
    layout.writable = false;
    Ok(Arc::new(Partitioning {
        layout: Arc::new(layout),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guids() {
        let g = parse_guid(DEFAULT_TYPE_GUID).unwrap();
        assert_eq!(&g[..4], &[0xaf, 0x3d, 0xc6, 0x0f]);
        assert_eq!(&g[8..], &[0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47, 0x7d, 0xe4]);
        assert!(parse_guid("xyz").is_err());
        assert!(parse_guid("0FC63DAF-8483-4772-8E79-3D69D8477DEZ").is_err());
    }

    #[test]
    fn regions_cover_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut params = Vec::new();
        for i in 0..6 {
            let p = dir.path().join(format!("f{i}"));
            std::fs::write(&p, vec![i as u8 + 1; 1000 + i * 700]).unwrap();
            params.push(("file".to_string(), p.display().to_string()));
        }
        for kind in ["mbr", "gpt"] {
            let mut ps = params.clone();
            ps.insert(0, ("partition-type".into(), kind.into()));
            ps.insert(1, ("alignment".into(), "4096".into()));
            let b = create(&mut Config::new(ps)).unwrap();
            let h = b.open(false, "").unwrap();
            let size = h.size().unwrap();
            let mut all = vec![0u8; size as usize];
            h.pread(&mut all, 0).unwrap();
            assert_eq!(&all[510..512], &[0x55, 0xaa]);
            // Writing back what was read is allowed; changing the table is not.
            h.pwrite(&all, 0, false).unwrap();
            assert!(h.pwrite(&[1], 0x1be, false).is_err());
            let mut ex = Extents::new(0, size);
            h.extents(0, size, false, &mut ex).unwrap();
            assert_eq!(ex.list().iter().map(|e| e.length).sum::<u64>(), size);
        }
    }
}
