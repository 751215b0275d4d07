//! The tar filter's entry lookup (the `tar` crate's header parsing plus
//! the filter's checks: sparse entries, entry types, truncation) on
//! arbitrary archive bytes.  Whatever is found must lie inside the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbdkit_filters::tar::find_entry;
use std::io::Cursor;

fuzz_target!(|data: &[u8]| {
    for name in [&b"disk.img"[..], b"a.txt", b"./disk.img"] {
        let size = data.len() as u64;
        if let Ok(e) = find_entry(&mut Cursor::new(data), size, name) {
            assert!(e.offset.checked_add(e.size).is_some_and(|end| end <= size));
        }
    }
});
