//! The partition filter's table parsers (MBR with its EBR chain, GPT) on
//! arbitrary bytes.  The input is the start of a disk of 1 TiB whose other
//! bytes are zero, so a seed made from the first sectors of a real image
//! still finds its partitions.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbdkit_filters::partition::{find_partition, ImageBytes};

fuzz_target!(|data: &[u8]| {
    let disk = ImageBytes {
        data,
        size: 1 << 40,
    };
    for n in 1..=8 {
        if let Ok(p) = find_partition(&disk, n) {
            assert!(p.offset.checked_add(p.length).is_some_and(|e| e <= disk.size));
        }
    }
});
