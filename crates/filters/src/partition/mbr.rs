//! MBR (DOS) partition tables: four primary entries in sector 0, and
//! logical partitions (5, 6, …) in a chain of extended boot records inside
//! one extended partition.  The LBAs in the entries count sectors of the
//! disk's sector size (512, or 4096 on 4K-native disks); each boot record
//! is the first 512 bytes of its sector.

use super::{DiskRead, Partition};

/// The size of a boot record, and the usual sector size.
pub const SECTOR: u64 = 512;

/// Partition types that mark an extended partition (CHS, LBA, Linux).
const EXTENDED: [u8; 3] = [0x05, 0x0f, 0x85];
/// More links than this in an EBR chain is a loop, not a disk.
const MAX_LOGICAL: u32 = 1024;

/// One 16-byte partition entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub kind: u8,
    /// Start, in sectors (relative to what depends on where the entry is).
    pub start: u32,
    pub sectors: u32,
}

impl Entry {
    pub fn is_empty(&self) -> bool {
        self.kind == 0 || self.sectors == 0
    }
    pub fn is_extended(&self) -> bool {
        EXTENDED.contains(&self.kind)
    }
}

/// True if a boot sector ends with the 0x55 0xAA signature.
pub fn has_signature(sector: &[u8; 512]) -> bool {
    sector[510] == 0x55 && sector[511] == 0xaa
}

/// The four entries of a boot sector (MBR or EBR).
pub fn entries(sector: &[u8; 512]) -> [Entry; 4] {
    std::array::from_fn(|i| {
        let e = &sector[446 + 16 * i..446 + 16 * (i + 1)];
        Entry {
            kind: e[4],
            start: u32::from_le_bytes([e[8], e[9], e[10], e[11]]),
            sectors: u32::from_le_bytes([e[12], e[13], e[14], e[15]]),
        }
    })
}

/// Absolute sector range `[first, end)` of an entry whose start is
/// relative to `base`.
fn range(base: u64, e: &Entry) -> (u64, u64) {
    let first = base + e.start as u64;
    (first, first + e.sectors as u64)
}

/// Check `[first, end)` (sectors of `ss` bytes) lies on a disk of `size`
/// bytes, after sector 0, and return it in bytes.
fn to_partition(n: u32, first: u64, end: u64, size: u64, ss: u64) -> Result<Partition, String> {
    if first == 0 {
        return Err(format!(
            "partition {n} starts at sector 0, on top of the partition table"
        ));
    }
    if end * ss > size {
        return Err(format!(
            "partition {n} (sectors {first}..{end} of {ss} bytes) extends beyond the end of the disk ({size} bytes)"
        ));
    }
    Ok(Partition {
        offset: first * ss,
        length: (end - first) * ss,
    })
}

/// Find partition `n` (1-based) given sector 0, on a disk of `ss`-byte
/// sectors.
pub fn find(disk: &dyn DiskRead, mbr: &[u8; 512], n: u32, ss: u64) -> Result<Partition, String> {
    if !has_signature(mbr) {
        return Err("sector 0 has no MBR signature (0x55 0xAA)".into());
    }
    let primary = entries(mbr);
    let size = disk.size();
    match n {
        0 => Err("partitions are numbered from 1".into()),
        1..=4 => {
            let e = primary[n as usize - 1];
            if e.is_empty() {
                return Err(format!("MBR partition {n} not found"));
            }
            if e.is_extended() {
                return Err(format!(
                    "MBR partition {n} not found: it is the extended partition, a container (serve a logical partition, 5 and up, instead)"
                ));
            }
            let (first, end) = range(0, &e);
            for (i, other) in primary.iter().enumerate() {
                if i + 1 == n as usize || other.is_empty() {
                    continue;
                }
                let (of, oe) = range(0, other);
                if first < oe && of < end {
                    return Err(format!("partition {n} overlaps partition {}", i + 1));
                }
            }
            to_partition(n, first, end, size, ss)
        }
        _ => find_logical(disk, &primary, n, ss),
    }
}

fn find_logical(
    disk: &dyn DiskRead,
    primary: &[Entry; 4],
    n: u32,
    ss: u64,
) -> Result<Partition, String> {
    let ext = primary
        .iter()
        .find(|e| !e.is_empty() && e.is_extended())
        .ok_or_else(|| {
            format!("MBR logical partition {n} selected, but there is no extended partition in the partition table")
        })?;
    let (ext_first, ext_end) = range(0, ext);
    let mut ebr = ext_first;
    let mut number = 5;
    let mut visited = Vec::new();
    while visited.len() < MAX_LOGICAL as usize {
        // A link back to an earlier EBR would number partitions forever.
        if visited.contains(&ebr) {
            return Err(format!(
                "the extended partition chain loops back to sector {ebr}"
            ));
        }
        visited.push(ebr);
        if ebr < ext_first || ebr >= ext_end {
            return Err(format!(
                "extended boot record at sector {ebr} is outside the extended partition"
            ));
        }
        if (ebr + 1) * ss > disk.size() {
            return Err(format!(
                "extended boot record at sector {ebr} is beyond the end of the disk"
            ));
        }
        let mut sector = [0u8; 512];
        disk.read_at(&mut sector, ebr * ss)?;
        if !has_signature(&sector) {
            return Err(format!(
                "extended boot record at sector {ebr} has no signature"
            ));
        }
        let [logical, link, ..] = entries(&sector);
        if !logical.is_empty() {
            if number == n {
                let (first, end) = range(ebr, &logical);
                if first <= ebr || end > ext_end {
                    return Err(format!(
                        "logical partition {n} (sectors {first}..{end}) is not inside its part of the extended partition (sectors {ebr}..{ext_end})"
                    ));
                }
                return to_partition(n, first, end, disk.size(), ss);
            }
            number += 1;
        }
        if link.is_empty() {
            return Err(format!(
                "MBR partition {n} not found: the disk has {} logical partitions",
                number - 5
            ));
        }
        ebr = ext_first + link.start as u64;
    }
    Err(format!(
        "the extended partition chain has more than {MAX_LOGICAL} links"
    ))
}
