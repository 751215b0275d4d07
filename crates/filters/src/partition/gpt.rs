//! GUID Partition Tables: a header at LBA 1 (for 512- or 4096-byte
//! sectors) protected by a CRC32, pointing at an array of entries with its
//! own CRC32.  Only the primary header is read: the filter serves a
//! partition, it does not repair tables.

use super::{DiskRead, Partition};

pub const SIGNATURE: &[u8; 8] = b"EFI PART";
/// The spec'd header is 92 bytes; larger headers must be zero-padded.
const MIN_HEADER: u32 = 92;
/// Refuse partition arrays larger than this (the usual one is 16 KiB).
const MAX_ARRAY: u64 = 1 << 20;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The fields of the header this filter uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub first_usable: u64,
    pub last_usable: u64,
    pub entries_lba: u64,
    pub entries: u32,
    pub entry_size: u32,
    pub entries_crc: u32,
}

/// Parse and check the header sector (at LBA 1) for sector size `ss`.
pub fn parse_header(sector: &[u8], ss: u64) -> Result<Header, String> {
    if sector.len() < MIN_HEADER as usize || &sector[..8] != SIGNATURE {
        return Err("no GPT header signature at LBA 1".into());
    }
    let header_size = u32_at(sector, 12);
    if header_size < MIN_HEADER || header_size as u64 > ss || header_size as usize > sector.len() {
        return Err(format!("GPT header size {header_size} is invalid"));
    }
    let stored = u32_at(sector, 16);
    let mut h = crc32fast::Hasher::new();
    h.update(&sector[..16]);
    h.update(&[0; 4]);
    h.update(&sector[20..header_size as usize]);
    let computed = h.finalize();
    if stored != computed {
        return Err(format!(
            "GPT header CRC mismatch (stored 0x{stored:08x}, computed 0x{computed:08x}): the table is corrupt"
        ));
    }
    if u64_at(sector, 24) != 1 {
        return Err("GPT header does not say it is at LBA 1".into());
    }
    let hdr = Header {
        first_usable: u64_at(sector, 40),
        last_usable: u64_at(sector, 48),
        entries_lba: u64_at(sector, 72),
        entries: u32_at(sector, 80),
        entry_size: u32_at(sector, 84),
        entries_crc: u32_at(sector, 88),
    };
    if hdr.entry_size < 128 || !hdr.entry_size.is_multiple_of(8) {
        return Err(format!(
            "GPT partition entry size {} is invalid",
            hdr.entry_size
        ));
    }
    if hdr.entries as u64 * hdr.entry_size as u64 > MAX_ARRAY {
        return Err(format!(
            "GPT partition array of {} entries of {} bytes is too large",
            hdr.entries, hdr.entry_size
        ));
    }
    Ok(hdr)
}

/// A used entry's inclusive LBA range; `None` for an unused entry.
fn entry_range(e: &[u8]) -> Option<(u64, u64)> {
    if e[..16].iter().all(|&b| b == 0) {
        None
    } else {
        Some((u64_at(e, 32), u64_at(e, 40)))
    }
}

/// Find partition `n` (1-based) on a disk whose GPT header is at LBA 1 with
/// `ss`-byte sectors.
pub fn find(disk: &dyn DiskRead, ss: u64, n: u32) -> Result<Partition, String> {
    let size = disk.size();
    let mut sector = vec![0u8; ss as usize];
    disk.read_at(&mut sector, ss)?;
    let hdr = parse_header(&sector, ss)?;
    if n == 0 {
        return Err("partitions are numbered from 1".into());
    }
    if n > hdr.entries {
        return Err(format!(
            "GPT partition {n} not found: the GPT has {} entries",
            hdr.entries
        ));
    }
    let array_len = hdr.entries as u64 * hdr.entry_size as u64;
    let array_at = hdr
        .entries_lba
        .checked_mul(ss)
        .filter(|&a| a >= 2 * ss && a.checked_add(array_len).is_some_and(|e| e <= size))
        .ok_or_else(|| {
            format!(
                "GPT partition array at LBA {} is outside the disk",
                hdr.entries_lba
            )
        })?;
    let mut array = vec![0u8; array_len as usize];
    disk.read_at(&mut array, array_at)?;
    let computed = crc32fast::hash(&array);
    if computed != hdr.entries_crc {
        return Err(format!(
            "GPT partition array CRC mismatch (stored 0x{:08x}, computed 0x{computed:08x}): the table is corrupt",
            hdr.entries_crc
        ));
    }
    let es = hdr.entry_size as usize;
    let entry = |i: usize| &array[i * es..(i + 1) * es];
    let (first, last) = entry_range(entry(n as usize - 1))
        .ok_or_else(|| format!("GPT partition {n} not found (unused entry)"))?;
    if first > last {
        return Err(format!(
            "partition {n} ends (LBA {last}) before it starts (LBA {first})"
        ));
    }
    if first < hdr.first_usable || last > hdr.last_usable {
        return Err(format!(
            "partition {n} (LBA {first}..={last}) is outside the usable area (LBA {}..={})",
            hdr.first_usable, hdr.last_usable
        ));
    }
    for i in 0..hdr.entries as usize {
        if i + 1 == n as usize {
            continue;
        }
        if let Some((of, ol)) = entry_range(entry(i)) {
            if first <= ol && of <= last {
                return Err(format!("partition {n} overlaps partition {}", i + 1));
            }
        }
    }
    let offset = first.checked_mul(ss);
    let length = (last - first)
        .checked_add(1)
        .and_then(|l| l.checked_mul(ss));
    match (offset, length) {
        (Some(offset), Some(length)) if offset.checked_add(length).is_some_and(|e| e <= size) => {
            Ok(Partition { offset, length })
        }
        _ => Err(format!(
            "partition {n} (LBA {first}..={last}) extends beyond the end of the disk ({size} bytes)"
        )),
    }
}
