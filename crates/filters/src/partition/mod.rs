//! `partition`: serve one partition of a disk image as the whole export.
//! The table (MBR with logical partitions, or GPT, with 512- or 4096-byte
//! sectors) is read when each client connects; requests are then shifted
//! into the partition and clipped to it.
//!
//! The parsers are pure functions over a [`DiskRead`], so they are
//! property-tested here and fuzzed (`fuzz/fuzz_targets/partition_table.rs`).

pub mod gpt;
pub mod mbr;

use std::sync::Arc;

use nbdkit_backend::{layer_fn, Backend, ConfigError, Error, FilterSpec, Handle, Param, Result};

use crate::window::Window;

/// Random access to a disk, for the table parsers.
pub trait DiskRead {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fill `buf` from `offset`; the caller keeps within `size()`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::result::Result<(), String>;
}

/// A disk of `size` bytes whose first bytes are `data` and the rest zeroes
/// (so a truncated image, as in the fuzz corpus, can stand for a big disk).
pub struct ImageBytes<'a> {
    pub data: &'a [u8],
    pub size: u64,
}

impl DiskRead for ImageBytes<'_> {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::result::Result<(), String> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| format!("read at {offset} is beyond the end of the disk"))?;
        buf.fill(0);
        let have = self.data.len() as u64;
        if offset < have {
            let n = (end.min(have) - offset) as usize;
            buf[..n].copy_from_slice(&self.data[offset as usize..offset as usize + n]);
        }
        Ok(())
    }
}

/// Where a partition is, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    pub offset: u64,
    pub length: u64,
}

/// The sector size the partition table's LBAs count in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectorSize {
    /// Not given: MBR LBAs count sectors of `mbr` bytes (512, or 4096
    /// when the plugin's minimum block size says the disk is 4K-native),
    /// and a GPT header is looked for at LBA 1 of both sizes (its CRC
    /// rules out a chance match).
    Probe { mbr: u64 },
    /// `partition-sectorsize=`: this size only, for GPT and MBR alike.
    Given(u64),
}

/// Find partition `n` (1-based) of the MBR or GPT table on `disk`, with
/// the sector size probed (see [`SectorSize::Probe`], 512 for MBR).
pub fn find_partition(disk: &dyn DiskRead, n: u32) -> std::result::Result<Partition, String> {
    find_partition_sized(disk, n, SectorSize::Probe { mbr: mbr::SECTOR })
}

/// Find partition `n` (1-based) of the MBR or GPT table on `disk`.
pub fn find_partition_sized(
    disk: &dyn DiskRead,
    n: u32,
    sector: SectorSize,
) -> std::result::Result<Partition, String> {
    let size = disk.size();
    if size < mbr::SECTOR {
        return Err(format!(
            "the disk ({size} bytes) is too small for a partition table"
        ));
    }
    let mut sector0 = [0u8; 512];
    disk.read_at(&mut sector0, 0)?;
    let (gpt_sizes, mbr_ss): (&[u64], u64) = match sector {
        SectorSize::Probe { mbr } => (&[512, 4096], mbr),
        SectorSize::Given(512) => (&[512], 512),
        SectorSize::Given(_) => (&[4096], 4096),
    };
    for &ss in gpt_sizes {
        if size >= 3 * ss {
            let mut sig = [0u8; 8];
            disk.read_at(&mut sig, ss)?;
            if &sig == gpt::SIGNATURE {
                return gpt::find(disk, ss, n);
            }
        }
    }
    if mbr::has_signature(&sector0) && mbr::entries(&sector0).iter().any(|e| e.kind == 0xee) {
        return Err("the MBR is a GPT protective MBR but there is no GPT header at LBA 1".into());
    }
    if !mbr::has_signature(&sector0) {
        return Err("no partition table found (no MBR signature, no GPT header)".into());
    }
    mbr::find(disk, &sector0, n, mbr_ss)
}

/// The next handle seen as a [`DiskRead`].
struct HandleDisk<'a> {
    h: &'a dyn Handle,
    size: u64,
}

impl DiskRead for HandleDisk<'_> {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::result::Result<(), String> {
        self.h
            .pread(buf, offset)
            .map_err(|e| format!("reading the partition table: {e}"))
    }
}

struct PartitionBackend {
    next: Arc<dyn Backend>,
    number: u32,
    /// `partition-sectorsize=`, if given.
    sector_size: Option<u64>,
}

impl Backend for PartitionBackend {
    fn name(&self) -> &str {
        "partition"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        let next = self.next.open(readonly, export)?;
        // Read per connection, as the table may differ between exports
        // (and a client may have rewritten it).
        let disk = HandleDisk {
            h: &*next,
            size: next.size()?,
        };
        let sector = match self.sector_size {
            Some(ss) => SectorSize::Given(ss),
            // As nbdkit: a plugin whose minimum block size is 4096 is a
            // 4K-native disk; anything else counts in 512-byte sectors.
            None => SectorSize::Probe {
                mbr: match next.block_size()? {
                    Some(b) if b.minimum == 4096 => 4096,
                    _ => mbr::SECTOR,
                },
            },
        };
        let p = find_partition_sized(&disk, self.number, sector)
            .map_err(|e| Error::invalid(format!("partition filter: {e}")))?;
        tracing::debug!(
            "partition {}: offset {} length {}",
            self.number,
            p.offset,
            p.length
        );
        Ok(Box::new(Window {
            next,
            start: p.offset,
            len: p.length,
        }))
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "partition",
    summary: "serve one partition (MBR primary/logical, or GPT) of a disk image",
    description: "Reads the partition table (MBR, including logical partitions 5 and up in the\n\
extended partition, or GPT with 512- or 4096-byte sectors) when a client\n\
connects and serves partition N as the whole export.  Corrupt tables (bad\n\
GPT CRC, overlapping or out-of-range entries) are refused.\n\n\
Example:\n  nbdkit-rs --filter=partition file disk.img partition=1",
    params: &[
        Param {
            name: "partition",
            help: "partition number, from 1 (required)",
        },
        Param {
            name: "partition-sectorsize",
            help: "512 or 4096: the sector size the table's LBAs count in (default: 4096 if \
                   the plugin's minimum block size is 4096, else 512; GPT is found at either)",
        },
    ],
    configure: |cfg| {
        let v = cfg.require("partition", "partition filter")?;
        let number = v.parse::<u32>().ok().filter(|&n| n >= 1).ok_or_else(|| {
            ConfigError::new(format!(
                "partition filter: partition={v}: expected a partition number from 1"
            ))
        })?;
        let sector_size = match cfg.take("partition-sectorsize") {
            None => None,
            Some(v) => match nbdkit_backend::parse_size(&v) {
                Ok(ss @ (512 | 4096)) => Some(ss),
                _ => {
                    return Err(ConfigError::new(format!(
                        "partition filter: partition-sectorsize={v}: expected 512 or 4096"
                    )))
                }
            },
        };
        Ok(layer_fn(move |next| {
            Ok(Arc::new(PartitionBackend {
                next,
                number,
                sector_size,
            }))
        }))
    },
};

/// Builders for partition tables, shared by the unit tests here.
#[cfg(test)]
pub(crate) mod build {
    /// Write an MBR-style entry into a boot sector.
    pub fn mbr_entry(sector: &mut [u8], i: usize, kind: u8, start: u32, sectors: u32) {
        let e = &mut sector[446 + 16 * i..446 + 16 * (i + 1)];
        e[4] = kind;
        e[8..12].copy_from_slice(&start.to_le_bytes());
        e[12..16].copy_from_slice(&sectors.to_le_bytes());
        sector[510] = 0x55;
        sector[511] = 0xaa;
    }

    /// A GPT disk image of `sectors` sectors of `ss` bytes with entries
    /// (first, last) LBA; 128 entries of 128 bytes at LBA 2.
    pub fn gpt(ss: u64, sectors: u64, parts: &[(u64, u64)]) -> Vec<u8> {
        let mut img = vec![0u8; (ss * sectors) as usize];
        mbr_entry(
            &mut img,
            0,
            0xee,
            1,
            sectors.min(u32::MAX as u64) as u32 - 1,
        );
        let mut array = vec![0u8; 128 * 128];
        for (i, (first, last)) in parts.iter().enumerate() {
            let e = &mut array[i * 128..(i + 1) * 128];
            e[0] = 0xaf; // any non-zero type GUID
            e[16] = i as u8 + 1;
            e[32..40].copy_from_slice(&first.to_le_bytes());
            e[40..48].copy_from_slice(&last.to_le_bytes());
        }
        let array_sectors = (array.len() as u64).div_ceil(ss);
        let at = (2 * ss) as usize;
        img[at..at + array.len()].copy_from_slice(&array);
        let h = &mut img[ss as usize..ss as usize + 92];
        h[..8].copy_from_slice(super::gpt::SIGNATURE);
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&1u64.to_le_bytes());
        h[32..40].copy_from_slice(&(sectors - 1).to_le_bytes());
        h[40..48].copy_from_slice(&(2 + array_sectors).to_le_bytes());
        h[48..56].copy_from_slice(&(sectors - 2 - array_sectors).to_le_bytes());
        h[72..80].copy_from_slice(&2u64.to_le_bytes());
        h[80..84].copy_from_slice(&128u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        h[88..92].copy_from_slice(&crc32fast::hash(&array).to_le_bytes());
        let crc = crc32fast::hash(h);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        img
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;
    use proptest::prelude::*;

    fn find(img: &[u8], n: u32) -> std::result::Result<Partition, String> {
        find_partition(
            &ImageBytes {
                data: img,
                size: img.len() as u64,
            },
            n,
        )
    }

    #[test]
    fn mbr_primary_and_logical() {
        // 4 MiB disk: p1 at 1 MiB (1 MiB), extended 2 MiB..4 MiB holding
        // two logical partitions, each behind its own EBR.
        let mut img = vec![0u8; 4 << 20];
        mbr_entry(&mut img, 0, 0x83, 2048, 2048);
        mbr_entry(&mut img, 1, 0x05, 4096, 4096);
        let ebr1 = 4096 * 512;
        mbr_entry(&mut img[ebr1..], 0, 0x83, 64, 1000);
        mbr_entry(&mut img[ebr1..], 1, 0x05, 2048, 2048);
        let ebr2 = (4096 + 2048) * 512;
        mbr_entry(&mut img[ebr2..], 0, 0x83, 64, 500);
        assert_eq!(
            find(&img, 1),
            Ok(Partition {
                offset: 1 << 20,
                length: 1 << 20
            })
        );
        assert_eq!(
            find(&img, 5),
            Ok(Partition {
                offset: (4096 + 64) * 512,
                length: 1000 * 512
            })
        );
        assert_eq!(
            find(&img, 6),
            Ok(Partition {
                offset: (4096 + 2048 + 64) * 512,
                length: 500 * 512
            })
        );
        assert!(find(&img, 3)
            .unwrap_err()
            .contains("MBR partition 3 not found"));
        assert!(find(&img, 2).unwrap_err().contains("extended"));
        assert!(find(&img, 7).unwrap_err().contains("2 logical partitions"));
        // Make p3 overlap p1.
        mbr_entry(&mut img, 2, 0x83, 3000, 10);
        assert!(find(&img, 1).unwrap_err().contains("overlaps partition 3"));
        // A partition past the end of the disk.
        mbr_entry(&mut img, 2, 0x83, 8192, 10);
        assert!(find(&img, 3).unwrap_err().contains("beyond the end"));
        // An EBR chain that loops back on itself.
        mbr_entry(&mut img[ebr2..], 1, 0x05, 0, 2048);
        assert!(find(&img, 99).unwrap_err().contains("loop"));
    }

    #[test]
    fn mbr_with_4096_byte_sectors() {
        // p1 at LBA 256 for 256 sectors: 1 MiB in, 1 MiB long with 4K
        // sectors (but 128 KiB in, 128 KiB long if read as 512).
        let mut img = vec![0u8; 4 << 20];
        mbr_entry(&mut img, 0, 0x83, 256, 256);
        let disk = ImageBytes {
            data: &img,
            size: img.len() as u64,
        };
        let want = |ss: u64| {
            Ok(Partition {
                offset: 256 * ss,
                length: 256 * ss,
            })
        };
        assert_eq!(
            find_partition_sized(&disk, 1, SectorSize::Given(4096)),
            want(4096)
        );
        assert_eq!(
            find_partition_sized(&disk, 1, SectorSize::Probe { mbr: 4096 }),
            want(4096)
        );
        assert_eq!(
            find_partition_sized(&disk, 1, SectorSize::Given(512)),
            want(512)
        );
        assert_eq!(find_partition(&disk, 1), want(512));
        // Beyond the end only when counted in 4K sectors.
        mbr_entry(&mut img, 0, 0x83, 256, 1000);
        let disk = ImageBytes {
            data: &img,
            size: img.len() as u64,
        };
        assert!(find_partition_sized(&disk, 1, SectorSize::Given(4096))
            .unwrap_err()
            .contains("beyond the end"));
    }

    #[test]
    fn given_sector_size_finds_only_that_gpt() {
        let img = gpt(4096, 2048, &[(256, 511)]);
        let disk = ImageBytes {
            data: &img,
            size: img.len() as u64,
        };
        assert!(find_partition_sized(&disk, 1, SectorSize::Given(4096)).is_ok());
        // With 512-byte sectors LBA 1 holds no GPT header: sector 0 is
        // then read as the protective MBR it is.
        assert!(find_partition_sized(&disk, 1, SectorSize::Given(512))
            .unwrap_err()
            .contains("protective"));
    }

    #[test]
    fn gpt_both_sector_sizes_and_crc() {
        for ss in [512u64, 4096] {
            let sectors = (8 << 20) / ss;
            let img = gpt(ss, sectors, &[(256, 511), (512, 1023)]);
            assert_eq!(
                find(&img, 2),
                Ok(Partition {
                    offset: 512 * ss,
                    length: 512 * ss
                })
            );
            assert!(find(&img, 3)
                .unwrap_err()
                .contains("GPT partition 3 not found"));
            assert!(find(&img, 200).unwrap_err().contains("128 entries"));
            let mut bad = img.clone();
            bad[ss as usize + 40] ^= 1;
            assert!(find(&bad, 1).unwrap_err().contains("header CRC"));
            let mut bad = img.clone();
            bad[2 * ss as usize + 33] ^= 1;
            assert!(find(&bad, 1).unwrap_err().contains("array CRC"));
            let over = gpt(ss, sectors, &[(256, 600), (512, 1023)]);
            assert!(find(&over, 1).unwrap_err().contains("overlaps partition 2"));
            let out = gpt(ss, sectors, &[(256, sectors)]);
            assert!(find(&out, 1).unwrap_err().contains("usable area"));
        }
    }

    /// The fuzz seeds are real tables (cut down): each has the partitions
    /// it was made with.
    #[test]
    fn fuzz_seeds_parse() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fuzz/corpus/partition_table/"
        );
        let seed = |name: &str, n: u32| {
            let data = std::fs::read(format!("{dir}{name}")).unwrap();
            find_partition(
                &ImageBytes {
                    data: &data,
                    size: 1 << 30,
                },
                n,
            )
        };
        let p = |offset: u64, length: u64| Ok(Partition { offset, length });
        assert_eq!(seed("mbr-primary", 1), p(2048 * 512, 2048 * 512));
        assert_eq!(seed("mbr-logical", 5), p(3 * 512, 10 * 512));
        assert_eq!(seed("mbr-logical", 6), p(15 * 512, 5 * 512));
        assert_eq!(seed("gpt-512", 2), p(4096 * 512, 4096 * 512));
        assert_eq!(seed("gpt-4096", 2), p(1024 * 4096, 512 * 4096));
    }

    #[test]
    fn no_table() {
        assert!(find(&[0u8; 4096], 1)
            .unwrap_err()
            .contains("no partition table"));
        assert!(find(&[0u8; 100], 1).unwrap_err().contains("too small"));
        let mut img = vec![0u8; 1 << 20];
        mbr_entry(&mut img, 0, 0xee, 1, 2047);
        assert!(find(&img, 1).unwrap_err().contains("protective"));
    }

    proptest! {
        /// Any set of disjoint primary partitions is found exactly where
        /// it was put.
        #[test]
        fn mbr_roundtrip(sizes in proptest::collection::vec((0u32..64, 1u32..64), 1..=4)) {
            let mut img = vec![0u8; 512];
            let mut at = 1u32;
            let mut want = Vec::new();
            for (i, (gap, len)) in sizes.iter().enumerate() {
                let start = at + gap;
                mbr_entry(&mut img, i, 0x83, start, *len);
                want.push(Partition { offset: start as u64 * 512, length: *len as u64 * 512 });
                at = start + len;
            }
            let disk = ImageBytes { data: &img, size: at as u64 * 512 };
            for (i, w) in want.iter().enumerate() {
                prop_assert_eq!(find_partition(&disk, i as u32 + 1), Ok(*w));
            }
            let small = ImageBytes { data: &img, size: (at as u64 - 1) * 512 };
            prop_assert!(find_partition(&small, want.len() as u32).is_err());
        }

        /// Any set of disjoint GPT partitions is found exactly where it
        /// was put, with either sector size.
        #[test]
        fn gpt_roundtrip(big in any::<bool>(), sizes in proptest::collection::vec((0u64..8, 1u64..8), 1..6)) {
            let ss = if big { 4096 } else { 512 };
            let mut at = 40u64;
            let mut parts = Vec::new();
            for (gap, len) in &sizes {
                parts.push((at + gap, at + gap + len - 1));
                at += gap + len;
            }
            let img = gpt(ss, at + 40, &parts);
            for (i, (first, last)) in parts.iter().enumerate() {
                prop_assert_eq!(find(&img, i as u32 + 1),
                    Ok(Partition { offset: first * ss, length: (last - first + 1) * ss }));
            }
        }

        /// Arbitrary bytes never panic and any partition found is on the disk.
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2048),
                                tail in 0u64..(1 << 40), n in 0u32..10) {
            let disk = ImageBytes { data: &data, size: data.len() as u64 + tail };
            if let Ok(p) = find_partition(&disk, n) {
                prop_assert!(p.offset + p.length <= disk.size);
            }
        }

        /// Flipping any byte of a GPT header is caught.
        #[test]
        fn gpt_header_corruption_detected(at in 0usize..92, bit in 0u8..8) {
            let mut img = gpt(512, 2048, &[(100, 199)]);
            img[512 + at] ^= 1 << bit;
            prop_assert!(find(&img, 1).is_err());
        }
    }
}
