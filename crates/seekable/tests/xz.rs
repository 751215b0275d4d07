//! xz reader tests: random reads against the original for awkward inputs,
//! corruption, concurrency and the progressive (single-block) path.

mod common;

use std::sync::Arc;

use common::*;
use liblzma_sys as lz;
use proptest::prelude::*;
use seekable_compressed::xz::{XzCheck, XzIndex};
use seekable_compressed::{open, Error, RandomAccess, XzReader};

const CHECKS: [u32; 4] = [
    lz::LZMA_CHECK_NONE,
    lz::LZMA_CHECK_CRC32,
    lz::LZMA_CHECK_CRC64,
    lz::LZMA_CHECK_SHA256,
];

/// Build a file of several streams, each followed by `padding` zero bytes.
fn multi_stream(
    data: &[u8],
    streams: usize,
    check: u32,
    block: Option<usize>,
    padding: usize,
) -> Vec<u8> {
    let mut out = Vec::new();
    for p in stream_pieces(data, streams) {
        out.extend(xz_encode(p, check, block));
        out.extend(std::iter::repeat_n(0u8, padding));
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn random_reads_match(
        len in prop_oneof![Just(0usize), Just(1), 2usize..2000, 2000usize..400_000],
        seed in any::<u64>(),
        check in 0usize..4,
        block in prop_oneof![Just(None), (1usize..100_000).prop_map(Some)],
        streams in 1usize..4,
        padding in prop_oneof![Just(0usize), Just(4), Just(12)],
        threshold in prop_oneof![Just(u64::MAX), 1u64..50_000],
        threads in 0usize..3,
        reads in proptest::collection::vec((any::<u64>(), 1usize..70_000), 1..12),
    ) {
        let data = image_like(len, seed);
        let file = multi_stream(&data, streams, CHECKS[check], block, padding);
        let mut o = opts();
        o.threads = threads;
        let r = XzReader::open_with_threshold(source(file), &o, threshold).unwrap();
        prop_assert_eq!(r.size(), data.len() as u64);
        prop_assert_eq!(r.format(), "xz");
        check_reads(&r, &data, &reads);
    }
}

#[test]
fn every_check_type_is_parsed() {
    let data = image_like(100_000, 7);
    for (c, want) in CHECKS.iter().zip([
        XzCheck::None,
        XzCheck::Crc32,
        XzCheck::Crc64,
        XzCheck::Sha256,
    ]) {
        let file = xz_encode(&data, *c, Some(30_000));
        let idx = XzIndex::parse(&file).unwrap();
        assert_eq!(idx.streams.len(), 1);
        assert_eq!(idx.streams[0].check, want);
        assert_eq!(idx.block_count(), 4);
        assert_eq!(
            idx.block_boundaries().collect::<Vec<_>>(),
            vec![0, 30_000, 60_000, 90_000]
        );
        let r = XzReader::open(source(file), &opts()).unwrap();
        check_range(&r, &data, 0, data.len());
    }
}

#[test]
fn multi_stream_with_padding_index() {
    let data = image_like(50_000, 3);
    let file = multi_stream(&data, 3, lz::LZMA_CHECK_CRC32, Some(10_000), 8);
    let idx = XzIndex::parse(&file).unwrap();
    assert_eq!(idx.streams.len(), 3);
    assert!(idx.streams.iter().all(|s| s.padding == 8));
    assert_eq!(idx.uncompressed_size, 50_000);
    // Padding that is not a multiple of four is refused.
    let mut bad = file.clone();
    bad.extend_from_slice(&[0, 0]);
    assert!(matches!(XzIndex::parse(&bad), Err(Error::Corrupt { .. })));
}

#[test]
fn command_line_xz_multi_block_and_single_block() {
    let data = image_like(3_000_000, 11);
    let multi = run_tool(
        "xz",
        &["-1", "-T2", "--block-size=256KiB", "--check=sha256"],
        &data,
    );
    let r = XzReader::open(source(multi), &opts()).unwrap();
    assert!(r.index().block_count() >= 11);
    for off in [0u64, 262_143, 1_000_000, 2_999_000] {
        check_range(&r, &data, off, 1000);
    }
    check_range(&r, &data, 0, data.len());
    check_extents(&r, &data);

    // Plain `xz -T1` makes one block: progressive path with a tiny threshold.
    let single = run_tool("xz", &["-1", "-T1"], &data);
    let r = XzReader::open_with_threshold(source(single), &opts(), 64 << 10).unwrap();
    assert_eq!(r.index().block_count(), 1);
    check_range(&r, &data, 2_500_000, 100_000);
    check_range(&r, &data, 10, 100);
    check_range(&r, &data, 0, data.len());
    let ext = r.extents(0, data.len() as u64);
    assert!(
        ext.iter().any(|e| e.zero),
        "zero runs found in progressive data"
    );
    check_extents(&r, &data);
    // Nothing was kept in the block cache.
    assert_eq!(r.cached_bytes(), 0);
}

#[test]
fn open_sniffs_xz() {
    let data = image_like(10_000, 1);
    let r = open(
        source(xz_encode(&data, lz::LZMA_CHECK_CRC64, None)),
        &opts(),
    )
    .unwrap();
    assert_eq!(r.format(), "xz");
    check_range(&*r, &data, 0, data.len());
    assert!(matches!(
        open(source(vec![1, 2, 3]), &opts()),
        Err(Error::UnknownFormat { .. })
    ));
    assert!(matches!(
        open(source(vec![]), &opts()),
        Err(Error::UnknownFormat { .. })
    ));
}

#[test]
fn flipped_byte_in_block_is_corrupt_with_offset() {
    let data = image_like(200_000, 5);
    for check in CHECKS {
        let file = xz_encode(&data, check, Some(50_000));
        let idx = XzIndex::parse(&file).unwrap();
        let b = idx.blocks[2];
        // Flip a byte in the middle of block 2's compressed data.
        let at = (b.compressed_offset + b.unpadded_size / 2) as usize;
        let mut bad = file.clone();
        bad[at] ^= 0x55;
        let r = XzReader::open(source(bad), &opts()).unwrap();
        let mut buf = vec![0u8; 1000];
        // Other blocks still read fine.
        r.read_at(&mut buf, 0).unwrap();
        r.read_at(&mut buf, 160_000).unwrap();
        let err = r.read_at(&mut buf, 110_000);
        match err {
            Err(Error::Corrupt {
                offset, ref reason, ..
            }) => {
                assert!(
                    offset >= b.compressed_offset && offset <= b.compressed_offset + b.total_size(),
                    "offset {offset} outside block at {} ({reason})",
                    b.compressed_offset
                );
                let msg = err.unwrap_err().to_string();
                assert!(msg.contains("test-image"), "{msg}");
            }
            // With no check, a flipped byte may still decode (to wrong data)
            // or fail some other LZMA consistency rule.
            Ok(()) if check == lz::LZMA_CHECK_NONE => {}
            other => panic!("check {check}: unexpected {other:?}"),
        }
    }
}

#[test]
fn flipped_check_byte_is_check_mismatch() {
    let data = image_like(100_000, 9);
    let file = xz_encode(&data, lz::LZMA_CHECK_CRC64, Some(50_000));
    let idx = XzIndex::parse(&file).unwrap();
    let b = idx.blocks[1];
    let mut bad = file.clone();
    // Last byte of the check field.
    bad[(b.compressed_offset + b.unpadded_size - 1) as usize] ^= 1;
    let r = XzReader::open_with_threshold(source(bad.clone()), &opts(), u64::MAX).unwrap();
    let mut buf = vec![0u8; 10];
    let e = r.read_at(&mut buf, 60_000).unwrap_err();
    assert!(matches!(e, Error::Corrupt { .. }), "{e}");
    // Same through the progressive path.
    let r = XzReader::open_with_threshold(source(bad), &opts(), 1).unwrap();
    let e = r.read_at(&mut buf, 99_990).unwrap_err();
    assert!(matches!(e, Error::Corrupt { .. }), "{e}");
    // A waiter sees the same error again, not a hang.
    assert!(r.read_at(&mut buf, 99_990).is_err());
}

#[test]
fn truncated_and_garbage_files_do_not_panic() {
    let data = image_like(100_000, 2);
    let file = xz_encode(&data, lz::LZMA_CHECK_CRC32, Some(20_000));
    for cut in [
        0,
        1,
        4,
        12,
        13,
        24,
        file.len() / 2,
        file.len() - 4,
        file.len() - 1,
    ] {
        let t = file[..cut].to_vec();
        assert!(XzReader::open(source(t), &opts()).is_err(), "cut {cut}");
    }
    // Truncated in the middle but with the tail intact (a hole punched in
    // the middle of the data): index parses, the damaged block does not.
    let mut holed = file.clone();
    for b in &mut holed[100..200] {
        *b = 0;
    }
    if let Ok(r) = XzReader::open(source(holed), &opts()) {
        let mut buf = vec![0u8; data.len()];
        assert!(r.read_at(&mut buf, 0).is_err());
    }
    // Random garbage and random mutations of a valid file.
    let mut x = 12345u64;
    for i in 0..500 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        let mut m = file.clone();
        let pos = (x >> 33) as usize % m.len();
        m[pos] = (x >> 8) as u8;
        if i % 3 == 0 {
            // Mutations near the end hit the index and footer.
            let p2 = m.len() - 1 - (x >> 40) as usize % 40;
            m[p2] ^= (x >> 16) as u8 | 1;
        }
        if let Ok(r) = XzReader::open(source(m), &opts()) {
            let mut buf = vec![0u8; 4096];
            let _ = r.read_at(&mut buf, (x >> 20) % r.size().max(1));
        }
    }
}

/// Rewrite the footer's backward size (and its CRC) to `backward_field`.
fn set_backward(file: &mut [u8], backward_field: u32) {
    let f = file.len() - 12;
    file[f + 4..f + 8].copy_from_slice(&backward_field.to_le_bytes());
    let crc = crc32(&file[f + 4..f + 10]);
    file[f..f + 4].copy_from_slice(&crc.to_le_bytes());
}

fn crc32(b: &[u8]) -> u32 {
    // SAFETY: the pointer and length describe `b`, which outlives the call.
    unsafe { lz::lzma_crc32(b.as_ptr(), b.len(), 0) }
}

#[test]
fn absurd_index_sizes_are_corrupt() {
    let data = image_like(10_000, 4);
    let file = xz_encode(&data, lz::LZMA_CHECK_CRC32, Some(1000));
    for field in [u32::MAX, u32::MAX / 2, 1 << 20, 0, 1] {
        let mut bad = file.clone();
        set_backward(&mut bad, field);
        match XzIndex::parse(&bad) {
            Err(Error::Corrupt { .. }) => {}
            other => panic!("backward {field}: {other:?}"),
        }
    }
    // An index claiming an enormous number of records (valid CRCs).
    let mut idx = vec![0u8];
    idx.extend_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F]);
    while idx.len() % 4 != 0 {
        idx.push(0);
    }
    let c = crc32(&idx);
    idx.extend_from_slice(&c.to_le_bytes());
    let mut f = vec![0xFD, b'7', b'z', b'X', b'Z', 0, 0, 1];
    let hc = crc32(&[0, 1]);
    f.extend_from_slice(&hc.to_le_bytes());
    f.extend_from_slice(&idx);
    let mut footer = vec![0u8; 4];
    footer.extend_from_slice(&((idx.len() / 4 - 1) as u32).to_le_bytes());
    footer.extend_from_slice(&[0, 1, b'Y', b'Z']);
    let fc = crc32(&footer[4..10]);
    footer[..4].copy_from_slice(&fc.to_le_bytes());
    f.extend_from_slice(&footer);
    match XzIndex::parse(&f) {
        Err(Error::Corrupt { reason, .. }) => assert!(reason.contains("records"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn concurrent_random_reads() {
    let data = Arc::new(image_like(2_000_000, 21));
    for threshold in [u64::MAX, 300_000] {
        let file = xz_encode(&data, lz::LZMA_CHECK_CRC64, Some(128 << 10));
        // Two big blocks go through the progressive path when threshold is
        // small.
        let mut o = opts();
        o.cache_bytes = 512 << 10;
        let r = XzReader::open_with_threshold(source(file), &o, threshold).unwrap();
        check_concurrent_reads(&r, &data, |t| t + 1);
    }
}

#[test]
fn sequential_reads_stay_within_cache_bound() {
    let data = image_like(4_000_000, 8);
    let file = xz_encode(&data, lz::LZMA_CHECK_CRC32, Some(64 << 10));
    let mut o = opts();
    o.cache_bytes = 512 << 10;
    let r = XzReader::open(source(file), &o).unwrap();
    let mut off = 0;
    while off < data.len() {
        let n = (32 << 10).min(data.len() - off);
        check_range(&r, &data, off as u64, n);
        assert!(r.cached_bytes() <= 512 << 10);
        off += n;
    }
    // Decoded blocks report their zero chunks.
    assert!(r.extents(0, data.len() as u64).iter().any(|e| e.zero));
    check_extents(&r, &data);
}

#[test]
fn sequential_access_decodes_ahead_in_background() {
    // No zeroes: all-zero blocks would (rightly) not be cached.
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8 + 1).collect();
    let file = xz_encode(&data, lz::LZMA_CHECK_CRC32, Some(100_000));
    let r = XzReader::open(source(file), &opts()).unwrap();
    check_range(&r, &data, 0, 50_000);
    check_range(&r, &data, 50_000, 50_000);
    // Only block 0 was read, but the access was sequential: blocks 1 and 2
    // are decoded by the pool without anyone reading them.
    let t = std::time::Instant::now();
    while r.cached_bytes() < 300_000 && t.elapsed() < std::time::Duration::from_secs(20) {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(r.cached_bytes() >= 300_000, "no decode-ahead happened");
}

/// Counts reads of one byte at a given offset (a block decoder starts by
/// reading the first byte of the block header).
struct Counting {
    inner: Vec<u8>,
    watch: u64,
    hits: std::sync::atomic::AtomicUsize,
}

impl seekable_compressed::Source for Counting {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.inner.len() as u64)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if offset == self.watch && buf.len() == 1 {
            self.hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            // Widen the window in which other readers arrive mid-decode.
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        self.inner.read_exact_at(buf, offset)
    }
}

#[test]
fn concurrent_readers_of_one_block_decode_it_once() {
    let data = image_like(500_000, 13);
    let file = xz_encode(&data, lz::LZMA_CHECK_CRC32, Some(250_000));
    let idx = XzIndex::parse(&file).unwrap();
    let src = Arc::new(Counting {
        inner: file,
        watch: idx.blocks[1].compressed_offset,
        hits: Default::default(),
    });
    let mut o = opts();
    o.threads = 0;
    let r = Arc::new(XzReader::open(src.clone(), &o).unwrap());
    let barrier = Arc::new(std::sync::Barrier::new(8));
    let data = Arc::new(data);
    let hs: Vec<_> = (0..8u64)
        .map(|t| {
            let (r, b, d) = (r.clone(), barrier.clone(), data.clone());
            std::thread::spawn(move || {
                b.wait();
                check_range(&*r, &d, 260_000 + t * 1000, 5000);
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    assert_eq!(src.hits.load(std::sync::atomic::Ordering::SeqCst), 1);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// With a RAM cache of one block, blocks evicted from it go to the
    /// scratch tier (up to its bound) and later reads come from there.
    #[test]
    fn scratch_tier_serves_evicted_blocks(
        seed in any::<u64>(),
        block in 20_000usize..200_000,
        threads in 0usize..3,
        scratch in prop_oneof![Just(u64::MAX), 1u64..1_000_000],
        reads in proptest::collection::vec((any::<u64>(), 1usize..100_000), 2..30),
    ) {
        let data = image_like(1_500_000, seed);
        let file = xz_encode(&data, 4, Some(block));
        let mut o = opts();
        o.threads = threads;
        o.cache_bytes = 1;
        o.scratch_cache_bytes = scratch;
        let r = XzReader::open(source(file), &o).unwrap();
        for _ in 0..2 {
            for &(off, n) in &reads {
                let off = off % data.len() as u64;
                let n = n.min(data.len() - off as usize);
                check_range(&r, &data, off, n);
            }
        }
        prop_assert!(r.scratch_cached_bytes() <= scratch);
        check_extents(&r, &data);
    }
}

#[test]
fn scratch_tier_keeps_random_reads_and_is_bounded() {
    let data = image_like(2_000_000, 77);
    let file = xz_encode(&data, 4, Some(100_000));
    let mut o = opts();
    o.cache_bytes = 1;
    o.threads = 0;
    let r = XzReader::open(source(file.clone()), &o).unwrap();
    // Reverse order, so no read looks sequential.
    for k in (0..20u64).rev() {
        check_range(&r, &data, k * 100_000 + 5, 1000);
    }
    let nonzero: u64 = data
        .chunks(100_000)
        .take(19)
        .map(|b| if b.iter().any(|&x| x != 0) { 1 } else { 0 })
        .sum();
    assert!(r.scratch_cached_bytes() > 0 || nonzero == 0);
    for k in (0..20u64).rev() {
        check_range(&r, &data, k * 100_000 + 5, 1000);
    }
    // A bound smaller than one block keeps nothing.
    o.scratch_cache_bytes = 1000;
    let r = XzReader::open(source(file), &o).unwrap();
    for k in (0..20u64).rev() {
        check_range(&r, &data, k * 100_000 + 5, 1000);
    }
    assert_eq!(r.scratch_cached_bytes(), 0);
}

/// Issue #19: a block decoded progressively (too big for the cache) is not
/// served before its check has passed, unless it is the file's only block.
#[test]
fn progressive_block_is_verified_before_it_is_served() {
    // Blocks bigger than one progressive step (1 MiB).
    let data = image_like(4_000_000, 11);
    let file = run_tool("xz", &["--block-size=1500000", "-C", "crc64"], &data);
    let idx = XzIndex::parse(&file).unwrap();
    assert!(idx.blocks.len() >= 3);
    let b = idx.blocks[1];
    let mut bad = file.clone();
    // Last byte of block 1's check field: everything decodes, the check fails.
    bad[(b.compressed_offset + b.unpadded_size - 1) as usize] ^= 1;
    let r = XzReader::open_with_threshold(source(bad), &opts(), 1000).unwrap();
    let mut buf = vec![0u8; 4096];
    for _ in 0..2 {
        let e = r.read_at(&mut buf, b.uncompressed_offset).unwrap_err();
        assert!(matches!(e, Error::Corrupt { .. }), "{e}");
    }
    check_range(&r, &data, 0, 4096);
    check_range(&r, &data, 3_500_000, 4096);
}

/// Issue #19 point 5: scratch disk use has one bound, for progressive
/// blocks and the scratch tier together.  Several streams of one big block
/// each (as `xz` writes them): reading them all keeps the scratch files
/// within the bound by evicting the least recently used block, every byte
/// is right, and a block that alone needs more than the bound is a clear
/// error, not a full disk.
#[test]
fn scratch_disk_use_is_bounded_across_progressive_blocks() {
    let piece = 2 << 20;
    let data = noise(6 * piece, 17);
    let mut file = Vec::new();
    for p in data.chunks(piece) {
        file.extend(run_tool("xz", &["-T1", "-0"], p));
    }
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts();
    o.scratch_dir = Some(dir.path().to_path_buf());
    o.scratch_bytes = Some(5 << 20);
    let r = XzReader::open_with_threshold(source(file.clone()), &o, 1 << 20).unwrap();
    for round in 0..2 {
        for k in 0..6u64 {
            let k = if round == 0 { k } else { 5 - k };
            check_range(&r, &data, k * piece as u64 + 1000, 100_000);
            assert!(r.scratch_bytes() <= 5 << 20, "{}", r.scratch_bytes());
            let disk = disk_use_under(dir.path());
            assert!(disk <= 5 << 20, "{disk} bytes of scratch on disk");
        }
    }
    check_range(&r, &data, 0, data.len());
    drop(r);

    // One block needs 2 MiB; the bound is 1 MiB.
    o.scratch_bytes = Some(1 << 20);
    let r = XzReader::open_with_threshold(source(file), &o, 1 << 20).unwrap();
    let mut buf = vec![0u8; 4096];
    for _ in 0..2 {
        match r.read_at(&mut buf, 0) {
            Err(e @ Error::ScratchFull { .. }) => {
                assert!(e.to_string().contains("scratch-size"), "{e}")
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(disk_use_under(dir.path()) <= 1 << 20);
}
