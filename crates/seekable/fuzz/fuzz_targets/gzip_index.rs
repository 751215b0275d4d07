//! Fuzz the gzip index loader: arbitrary bytes must give an error or a
//! consistent index, never a panic or a huge allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use seekable_compressed::gzip::GzipIndex;

fuzz_target!(|data: &[u8]| {
    // With the checksum (as loaded from disk) ...
    if let Ok(idx) = GzipIndex::from_bytes(data) {
        // A valid index round-trips exactly.
        assert_eq!(idx.to_bytes(), data);
    }
    // ... and without, so the structural checks are reached too.
    if let Ok(idx) = GzipIndex::from_bytes_unchecked(data) {
        let again = GzipIndex::from_bytes(&idx.to_bytes()).expect("own output loads");
        assert_eq!(again, idx);
    }
});
