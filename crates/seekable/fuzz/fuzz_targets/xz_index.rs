//! Parse arbitrary bytes as an xz file (the parser only reads footers,
//! indexes and stream headers, walking back from the end): it must never
//! panic, and whatever it accepts must be self-consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use seekable_compressed::xz::XzIndex;

fuzz_target!(|data: &[u8]| {
    if let Ok(idx) = XzIndex::parse(data) {
        let mut uoff = 0u64;
        let mut prev_end = 0u64;
        for b in &idx.blocks {
            assert_eq!(b.uncompressed_offset, uoff);
            uoff += b.uncompressed_size;
            assert!(b.compressed_offset >= prev_end);
            prev_end = b.compressed_offset + b.total_size();
            assert!(prev_end <= idx.file_size);
        }
        assert_eq!(uoff, idx.uncompressed_size);
        let blocks: usize = idx.streams.iter().map(|s| s.block_count).sum();
        assert_eq!(blocks, idx.blocks.len());
        for s in &idx.streams {
            assert!(s.offset + s.size + s.padding <= idx.file_size);
        }
    }
});
