//! zstd reader tests: seekable, multi-frame and single-frame files, with and
//! without recorded content sizes, corruption and concurrency.

mod common;

use std::sync::Arc;

use common::*;
use proptest::prelude::*;
use seekable_compressed::zstd::{seekable_compress, SeekTable, ZstdLayout};
use seekable_compressed::{open, Error, RandomAccess, ZstdReader};

/// Frames of `frame` bytes each, with or without recorded sizes, with a
/// skippable frame between every two.
fn multi_frame(data: &[u8], frame: usize, sizes: bool, skippable: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chunks: Vec<&[u8]> = data.chunks(frame.max(1)).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    for (i, c) in chunks.iter().enumerate() {
        if skippable && i % 2 == 1 {
            out.extend_from_slice(&0x184D2A53u32.to_le_bytes());
            out.extend_from_slice(&5u32.to_le_bytes());
            out.extend_from_slice(b"hello");
        }
        if sizes {
            out.extend(zstd::bulk::compress(c, 3).unwrap());
        } else {
            out.extend(zstd::stream::encode_all(*c, 3).unwrap());
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn random_reads_match(
        len in prop_oneof![Just(0usize), Just(1), 2usize..2000, 2000usize..400_000],
        seed in any::<u64>(),
        kind in 0usize..4,
        frame in 1usize..100_000,
        threshold in prop_oneof![Just(u64::MAX), 1u64..50_000],
        threads in 0usize..3,
        reads in proptest::collection::vec((any::<u64>(), 1usize..70_000), 1..12),
    ) {
        let data = image_like(len, seed);
        let file = match kind {
            0 => seekable_compress(&data, frame, 3).unwrap(),
            1 => multi_frame(&data, frame, true, true),
            2 => multi_frame(&data, frame, false, false),
            _ => zstd::bulk::compress(&data, 3).unwrap(),
        };
        let mut o = opts();
        o.threads = threads;
        let r = ZstdReader::open_with_threshold(source(file), &o, threshold).unwrap();
        prop_assert_eq!(r.size(), data.len() as u64);
        prop_assert_eq!(r.layout(), if kind == 0 { ZstdLayout::Seekable } else { ZstdLayout::Frames });
        check_reads(&r, &data, &reads);
    }
}

#[test]
fn seek_table_round_trip() {
    let data = image_like(250_000, 1);
    let file = seekable_compress(&data, 64 << 10, 1).unwrap();
    let t = SeekTable::parse_file(&file).unwrap();
    assert_eq!(t.frames.len(), 4);
    assert_eq!(t.decompressed_size, 250_000);
    assert_eq!(t.frames[1].decompressed_offset, 65_536);
    // Any zstd decoder reads it.
    assert_eq!(zstd::stream::decode_all(&file[..]).unwrap(), data);
}

#[test]
fn command_line_zstd() {
    let data = image_like(2_000_000, 12);
    // Single frame with content size (file input).
    let single = run_tool("zstd", &["-q", "-3"], &data);
    let r = ZstdReader::open_with_threshold(source(single.clone()), &opts(), 64 << 10).unwrap();
    assert_eq!(r.frames().len(), 1);
    check_range(&r, &data, 1_500_000, 10_000);
    check_range(&r, &data, 0, data.len());
    assert!(r.extents(0, data.len() as u64).iter().any(|e| e.zero));
    assert_eq!(r.cached_bytes(), 0);
    // Concatenation of two CLI outputs: two frames.
    let mut two = single.clone();
    two.extend(run_tool("zstd", &["-q", "-1"], &data[..1000]));
    let mut both = data.clone();
    both.extend_from_slice(&data[..1000]);
    let r = open(source(two), &opts()).unwrap();
    assert_eq!(r.size(), both.len() as u64);
    check_range(&*r, &both, 1_999_500, 1000);
    // From a pipe the CLI records no content size: learnt at open.
    let piped = {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let mut child = Command::new("zstd")
            .args(["-q", "-c", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let d = data.clone();
        let w = std::thread::spawn(move || stdin.write_all(&d).unwrap());
        let out = child.wait_with_output().unwrap();
        w.join().unwrap();
        out.stdout
    };
    let r = ZstdReader::open_with_threshold(source(piped), &opts(), 64 << 10).unwrap();
    assert_eq!(r.size(), data.len() as u64);
    check_range(&r, &data, 1_000_000, 500_000);
}

#[test]
fn open_sniffs_zstd_and_skippable_first() {
    let data = image_like(100_000, 2);
    let mut file = Vec::new();
    file.extend_from_slice(&0x184D2A50u32.to_le_bytes());
    file.extend_from_slice(&3u32.to_le_bytes());
    file.extend_from_slice(b"abc");
    file.extend(zstd::bulk::compress(&data, 1).unwrap());
    let r = open(source(file), &opts()).unwrap();
    assert_eq!(r.format(), "zstd");
    check_range(&*r, &data, 0, data.len());
}

#[test]
fn corruption_is_reported_not_panicked() {
    let data = image_like(300_000, 3);
    let file = seekable_compress(&data, 50_000, 3).unwrap();
    let t = SeekTable::parse_file(&file).unwrap();
    // Flip a byte in frame 2: checksum or format error, naming an offset
    // inside that frame.
    let f = t.frames[2];
    let mut bad = file.clone();
    bad[(f.compressed_offset + f.compressed_size / 2) as usize] ^= 0x40;
    let r = ZstdReader::open(source(bad), &opts()).unwrap();
    let mut buf = vec![0u8; 100];
    r.read_at(&mut buf, 0).unwrap();
    match r.read_at(&mut buf, 120_000) {
        Err(Error::Corrupt { offset, .. }) => assert!(
            offset >= f.compressed_offset && offset <= f.compressed_offset + f.compressed_size,
            "{offset}"
        ),
        other => panic!("{other:?}"),
    }
    // Truncations and random mutations.
    for cut in [0usize, 3, 9, 20, file.len() / 2, file.len() - 1] {
        let t = file[..cut].to_vec();
        if let Ok(r) = ZstdReader::open(source(t), &opts()) {
            let mut buf = vec![0u8; r.size().min(1 << 20) as usize];
            let _ = r.read_at(&mut buf, 0);
        }
    }
    let plain = multi_frame(&data, 40_000, false, true);
    let mut x = 99u64;
    for i in 0..400 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        let mut m = if i % 2 == 0 {
            file.clone()
        } else {
            plain.clone()
        };
        let pos = if i % 4 == 0 {
            m.len() - 1 - (x >> 40) as usize % 60
        } else {
            (x >> 33) as usize % m.len()
        };
        m[pos] ^= (x >> 8) as u8 | 1;
        if let Ok(r) = ZstdReader::open_with_threshold(source(m), &opts(), 100_000) {
            let mut buf = vec![0u8; 4096.min(r.size() as usize)];
            if !buf.is_empty() {
                let off = (x >> 20) % (r.size() - buf.len() as u64 + 1);
                let _ = r.read_at(&mut buf, off);
            }
        }
    }
    // A seek table that does not add up.
    let mut bad = file.clone();
    let n = bad.len();
    let e0 = n - 9 - t.frames.len() * 12;
    bad[e0] ^= 1;
    assert!(matches!(
        ZstdReader::open(source(bad), &opts()),
        Err(Error::Corrupt { .. })
    ));
}

#[test]
fn concurrent_random_reads() {
    let data = Arc::new(image_like(2_000_000, 31));
    for (file, threshold) in [
        (seekable_compress(&data, 100_000, 3).unwrap(), u64::MAX),
        (zstd::bulk::compress(&data, 3).unwrap(), 1 << 20),
    ] {
        let mut o = opts();
        o.cache_bytes = 400 << 10;
        let r = ZstdReader::open_with_threshold(source(file), &o, threshold).unwrap();
        check_concurrent_reads(&r, &data, |t| t * 7 + 3);
    }
}

/// A seek table whose size for a frame disagrees with the size the frame
/// records is refused at open, naming that frame's offset: trusted, it
/// would move every later frame and change the exported size (found by
/// the image_zstd fuzz target: the last entry 3 bytes short).
#[test]
fn seek_table_size_that_disagrees_with_the_frame_is_refused() {
    let data = image_like(300_000, 9);
    let file = seekable_compress(&data, 100_000, 3).unwrap();
    let t = SeekTable::parse_file(&file).unwrap();
    let n = file.len();
    for frame in 0..3 {
        let mut bad = file.clone();
        // Entries are 12 bytes (csize, dsize, checksum); dsize at +4.
        let at = n - 9 - (3 - frame) * 12 + 4;
        let d = u32::from_le_bytes(bad[at..at + 4].try_into().unwrap()) - 3;
        bad[at..at + 4].copy_from_slice(&d.to_le_bytes());
        match ZstdReader::open(source(bad), &opts()) {
            Err(Error::Corrupt { offset, reason, .. }) => {
                assert_eq!(offset, t.frames[frame].compressed_offset);
                assert!(reason.contains("seek table says"), "{reason}");
            }
            Err(e) => panic!("frame {frame}: {e}"),
            Ok(r) => panic!("frame {frame}: opened with size {}", r.size()),
        }
    }
    // The untouched file opens, with every frame checked.
    assert_eq!(
        ZstdReader::open(source(file), &opts()).unwrap().size(),
        300_000
    );
}

#[test]
fn seek_table_checksum_is_verified() {
    let data = image_like(300_000, 6);
    let file = seekable_compress(&data, 100_000, 3).unwrap();
    let t = SeekTable::parse_file(&file).unwrap();
    assert!(t.frames.iter().all(|f| f.checksum.is_some()));
    let n = file.len();
    let mut bad = file.clone();
    // Checksum of frame 1 (entries are 12 bytes: csize, dsize, checksum).
    bad[n - 9 - 2 * 12 + 8] ^= 1;
    for threshold in [u64::MAX, 1] {
        let r = ZstdReader::open_with_threshold(source(bad.clone()), &opts(), threshold).unwrap();
        let mut buf = vec![0u8; 1000];
        r.read_at(&mut buf, 0).unwrap();
        match r.read_at(&mut buf, 150_000) {
            Err(Error::Corrupt { offset, reason, .. }) => {
                assert_eq!(offset, t.frames[1].compressed_offset);
                assert!(reason.contains("checksum"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn frame_content_size_larger_than_blocks_allow_is_corrupt() {
    // A frame header claiming 2^40 bytes over one tiny block.
    let mut f = zstd::bulk::compress(b"hello", 1).unwrap();
    // Rewrite the header: descriptor with an 8-byte content size field.
    let fh = f[4];
    assert_eq!(fh & 0xC0, 0, "expected a 1-byte single-segment size field");
    let mut g = f[..4].to_vec();
    g.push((fh & 0x3F) | 0xC0);
    g.extend_from_slice(&(1u64 << 40).to_le_bytes());
    g.extend_from_slice(&f[6..]);
    f = g;
    match ZstdReader::open(source(f), &opts()) {
        Err(Error::Corrupt {
            offset: 0, reason, ..
        }) => assert!(reason.contains("claims"), "{reason}"),
        other => panic!("{:?}", other.map(|r| r.size())),
    }
}

/// Frames of several 128 KiB blocks, so a read can stop inside a frame.
fn multi_block_frames(len: usize, seed: u64, frame: usize) -> (Vec<u8>, Vec<u8>) {
    let data = image_like(len, seed);
    let file = seekable_compress(&data, frame, 1).unwrap();
    (data, file)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Partial frames: reads stop inside frames and later reads resume
    /// them (threads 0: nothing finishes them in the background), reads
    /// interleave across frames, the partial set overflows, and with a
    /// tiny RAM cache finished frames are evicted to the scratch tier (or
    /// dropped, when it is off or full) and read back from there.
    #[test]
    fn partial_frames_and_scratch_tier_match(
        seed in any::<u64>(),
        frame in 130_000usize..700_000,
        threads in 0usize..3,
        cache in prop_oneof![Just(1u64), 1u64..3_000_000],
        scratch in prop_oneof![Just(0u64), Just(u64::MAX), 1u64..2_000_000],
        reads in proptest::collection::vec((any::<u64>(), 1usize..200_000), 1..40),
        lazy in any::<bool>(),
    ) {
        let (data, file) = multi_block_frames(3_000_000, seed, frame);
        let mut o = opts();
        o.lazy_verify = lazy;
        o.threads = threads;
        o.cache_bytes = cache;
        o.scratch_cache_bytes = scratch;
        let r = ZstdReader::open(source(file), &o).unwrap();
        for round in 0..2 {
            for &(off, n) in &reads {
                // Second round: the same reads, now from cache or scratch.
                let off = (off >> round) % data.len() as u64;
                let n = n.min(data.len() - off as usize);
                check_range(&r, &data, off, n);
            }
        }
        prop_assert!(r.scratch_cached_bytes() <= scratch);
        check_extents(&r, &data);
    }
}

#[test]
fn partial_frame_is_served_before_its_checksum_and_fails_after() {
    let (data, file) = multi_block_frames(2_000_000, 8, 1 << 20);
    let t = SeekTable::parse_file(&file).unwrap();
    let f = t.frames[0];
    // The frame's own content checksum: its last 4 bytes.
    let mut bad = file.clone();
    bad[(f.compressed_offset + f.compressed_size - 2) as usize] ^= 0x10;
    let mut o = opts();
    o.threads = 0;
    o.cache_bytes = 8 << 20;
    // Only with lazy verification (not the default).
    o.lazy_verify = true;
    let r = ZstdReader::open(source(bad), &o).unwrap();
    // The first block decodes fine: served before the checksum is known.
    check_range(&r, &data, 0, 4096);
    let mut buf = vec![0u8; 4096];
    match r.read_at(&mut buf, (1 << 20) - 4096) {
        Err(Error::Corrupt { offset, name, .. }) => {
            assert_eq!(name, "test-image");
            assert!(
                offset >= f.compressed_offset && offset <= f.compressed_offset + f.compressed_size,
                "{offset}"
            );
        }
        other => panic!("{other:?}"),
    }
    // Known bad now: its prefix is no longer served either.
    assert!(matches!(r.read_at(&mut buf, 0), Err(Error::Corrupt { .. })));
    // The other frame is unaffected.
    check_range(&r, &data, 1 << 20, 500_000);
    check_range(&r, &data, (1 << 20) + 700_000, 100_000);
}

#[test]
fn sequential_reads_do_not_fill_the_scratch_tier() {
    let (data, file) = multi_block_frames(3_000_000, 9, 200_000);
    let mut o = opts();
    o.cache_bytes = 1;
    let r = ZstdReader::open(source(file), &o).unwrap();
    let mut off = 0;
    while off < data.len() {
        let n = (64 << 10).min(data.len() - off);
        check_range(&r, &data, off as u64, n);
        off += n;
    }
    // Only the first frame (read before the stream was recognised) may
    // have been kept.
    assert!(
        r.scratch_cached_bytes() <= 200_000,
        "{}",
        r.scratch_cached_bytes()
    );
    // Random reads after eviction are kept.
    for k in 0..15u64 {
        check_range(&r, &data, k * 199_999 + 17, 3000);
    }
    for k in 0..15u64 {
        check_range(&r, &data, k * 199_999 + 17, 3000);
    }
    assert!(
        r.scratch_cached_bytes() > 200_000,
        "{}",
        r.scratch_cached_bytes()
    );
}

/// Issue #19: a frame is served only once its checksum has passed.  A byte
/// flipped near the end of a `zstd -c` file (one frame, raw blocks) used to
/// let the first read of the frame's start through.
#[test]
fn damaged_frame_is_never_served_by_default() {
    // Pseudo-random bytes: zstd stores them as raw blocks, so a flipped
    // byte decodes cleanly and only the frame's checksum catches it.
    let data = xorshift_bytes(3 << 20, 5);
    let file = run_tool("zstd", &["-q"], &data);
    let mut bad = file.clone();
    let at = file.len() - 1000;
    bad[at] ^= 0x40;
    for threads in [0, 2] {
        let mut o = opts();
        o.threads = threads;
        o.cache_bytes = 16 << 20;
        let r = ZstdReader::open(source(bad.clone()), &o).unwrap();
        let mut buf = vec![0u8; 4096];
        for _ in 0..3 {
            // Every read of the damaged frame fails, the first included.
            match r.read_at(&mut buf, 0) {
                Err(Error::Corrupt { name, .. }) => assert_eq!(name, "test-image"),
                other => panic!("{other:?}"),
            }
        }
    }
    // Several frames: the damaged one fails, the others read.
    let mut multi = run_tool("zstd", &["-q"], &data[..1 << 20]);
    let second = run_tool("zstd", &["-q"], &data[1 << 20..]);
    let mut second_bad = second.clone();
    let n = second_bad.len();
    second_bad[n - 500] ^= 1;
    multi.extend_from_slice(&second_bad);
    let r = ZstdReader::open(source(multi), &opts()).unwrap();
    check_range(&r, &data, 0, 4096);
    let mut buf = vec![0u8; 4096];
    assert!(r.read_at(&mut buf, 1 << 20).is_err());
    assert!(r.read_at(&mut buf, 1 << 20).is_err());
}

/// Issue #19 point 8: an empty file is not a zstd disk (of size 0).
#[test]
fn empty_file_is_not_a_zstd_image() {
    match ZstdReader::open(source(Vec::new()), &opts()) {
        Err(Error::Corrupt {
            offset: 0, name, ..
        }) => assert_eq!(name, "test-image"),
        Err(e) => panic!("{e}"),
        Ok(r) => panic!("served a disk of {} bytes", r.size()),
    }
}

/// `zstd -c` writing to a pipe from a pipe records no content size.
fn piped_zstd(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("zstd")
        .args(["-q", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    out.stdout
}

/// Issue #19 point 6: many tiny frames without content sizes cost their
/// decoding at open, nothing more per frame (300,000 took a minute: each
/// made a scratch file and zeroed a 1 MiB buffer), and opening is capped.
#[test]
fn many_unsized_frames_open_cheaply_and_opening_is_capped() {
    let frame = piped_zstd(b"x");
    // Frame header descriptor: no content size field.
    assert_eq!(frame[4] & 0xE0, 0, "{frame:02x?}");
    let n = 300_000;
    let file: Vec<u8> = frame
        .iter()
        .copied()
        .cycle()
        .take(frame.len() * n)
        .collect();
    let r = ZstdReader::open(source(file.clone()), &opts()).unwrap();
    assert_eq!(r.size(), n as u64);
    let data = vec![b'x'; n];
    check_range(&r, &data, 0, 1000);
    check_range(&r, &data, 123_456, 5000);
    check_range(&r, &data, n as u64 - 10, 10);
    // Bigger unsized frames with real data, some past the threshold.
    let big = image_like(1_500_000, 4);
    let mut f2 = piped_zstd(&big[..200_000]);
    f2.extend(piped_zstd(&big[200_000..]));
    let r = ZstdReader::open_with_threshold(source(f2), &opts(), 500_000).unwrap();
    assert_eq!(r.size(), big.len() as u64);
    check_range(&r, &big, 0, 300_000);
    check_range(&r, &big, 1_000_000, 500_000);
    // The cap: with no time at all, opening a file that needs decoding
    // fails with an error saying why.
    let mut o = opts();
    o.open_timeout = Some(std::time::Duration::ZERO);
    match ZstdReader::open(source(file), &o) {
        Err(Error::Unsupported { reason, .. }) => {
            assert!(reason.contains("zstd-open-timeout"), "{reason}")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("opened past the deadline"),
    }
}

/// Issue #17 point 2: when the scratch tier is full, its least recently
/// used frames are evicted (hole-punched) to make room, so recent random
/// reads keep being served from it; its size never exceeds the bound,
/// on disk too, and every byte reads back right.
#[test]
fn full_scratch_tier_evicts_least_recently_used() {
    let frame = 200_000usize;
    let data = xorshift_bytes(15 * frame, 23);
    let file = seekable_compress(&data, frame, 1).unwrap();
    let src = Arc::new(CountingSource {
        inner: file,
        reads: Default::default(),
    });
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts();
    o.cache_bytes = 1;
    o.threads = 0;
    o.scratch_dir = Some(dir.path().to_path_buf());
    let bound = 3 * frame as u64 + 1000;
    o.scratch_cache_bytes = bound;
    let r = ZstdReader::open(src.clone(), &o).unwrap();
    // Scattered (not a stream): frames 0, 7, 14, 6, 13, ...
    let order: Vec<u64> = (0..15u64).map(|k| k * 7 % 15).collect();
    for _ in 0..2 {
        for &k in &order {
            check_range(&r, &data, k * frame as u64 + 1000, 4096);
            assert!(r.scratch_cached_bytes() <= bound);
            assert!(disk_use_under(dir.path()) <= bound + (64 << 10));
        }
    }
    // The last frames read were kept (the oldest made room for them):
    // reading them again needs nothing from the compressed file.  (The
    // very last one may still be in RAM.)
    let before = src.reads.load(std::sync::atomic::Ordering::SeqCst);
    for &k in &order[12..] {
        check_range(&r, &data, k * frame as u64 + 1000, 4096);
    }
    assert_eq!(src.reads.load(std::sync::atomic::Ordering::SeqCst), before);
    check_range(&r, &data, 0, data.len());
}
