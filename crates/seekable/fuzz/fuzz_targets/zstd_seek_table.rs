//! Parse arbitrary bytes as the tail of a seekable zstd file, and as a zstd
//! frame header: never panic; accepted tables must add up.
#![no_main]

use libfuzzer_sys::fuzz_target;
use seekable_compressed::zstd::seek_table::parse_frame_header;
use seekable_compressed::zstd::SeekTable;

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = SeekTable::parse_file(data) {
        let mut coff = 0u64;
        let mut doff = 0u64;
        for f in &t.frames {
            assert_eq!(f.compressed_offset, coff);
            assert_eq!(f.decompressed_offset, doff);
            coff += f.compressed_size;
            doff += f.decompressed_size;
        }
        assert_eq!(coff + t.table_size, data.len() as u64);
        assert_eq!(doff, t.decompressed_size);
    }
    if let Ok(h) = parse_frame_header(data, 0) {
        assert!(h.header_size <= data.len());
    }
});
