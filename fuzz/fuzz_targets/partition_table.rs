//! The partition filter's table parsers (MBR with its EBR chain, GPT) on
//! arbitrary bytes.  The input is the start of a disk of 1 TiB whose other
//! bytes are zero, so a seed made from the first sectors of a real image
//! still finds its partitions.  Each input is read with the sector size
//! probed and with 4096-byte sectors given (partition-sectorsize=4096).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbdkit_filters::partition::{find_partition, find_partition_sized, ImageBytes, SectorSize};

fuzz_target!(|data: &[u8]| {
    let disk = ImageBytes {
        data,
        size: 1 << 40,
    };
    for n in 1..=8 {
        if let Ok(p) = find_partition(&disk, n) {
            assert!(p.offset.checked_add(p.length).is_some_and(|e| e <= disk.size));
        }
        if let Ok(p) = find_partition_sized(&disk, n, SectorSize::Given(4096)) {
            assert!(p.offset.checked_add(p.length).is_some_and(|e| e <= disk.size));
        }
    }
});
