//! Fuzz the BGZF size walk (member headers and trailers, no inflating):
//! arbitrary bytes must give a size, "not BGZF" or an error, never a
//! panic, and a size no bigger than the members can hold.
#![no_main]

use libfuzzer_sys::fuzz_target;
use seekable_compressed::gzip::{bgzf_size, BGZF_MAX_ISIZE};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(size)) = bgzf_size("fuzz.gz", data) {
        // Each member is at least 18 + 8 bytes and holds at most 64 KiB.
        let members = data.len() as u64 / 26 + 1;
        assert!(size <= members * u64::from(BGZF_MAX_ISIZE));
    }
});
