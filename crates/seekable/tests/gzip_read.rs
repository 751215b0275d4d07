//! Random reads through the gzip index compared with the original data.

#[path = "gzip_util.rs"]
mod util;

use proptest::prelude::*;
use seekable_compressed::RandomAccess;
use util::*;

#[derive(Debug, Clone, Copy)]
enum Layout {
    Single,
    Members,
    Bgzf,
}

fn layouts() -> impl Strategy<Value = Layout> {
    prop_oneof![
        Just(Layout::Single),
        Just(Layout::Members),
        Just(Layout::Bgzf)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_reads_match(
        seed in any::<u64>(),
        len in prop_oneof![Just(0usize), Just(1), 2usize..5000, 5000usize..400_000],
        layout in layouts(),
        span in prop_oneof![Just(1024u64), Just(4096), Just(65536), Just(1 << 20)],
        threads in 0usize..3,
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..5),
        reads in proptest::collection::vec((any::<prop::sample::Index>(), 1usize..200_000), 1..12),
    ) {
        let orig = mixed(seed, len);
        let gz = match layout {
            Layout::Single => gzip(&orig, 6),
            Layout::Members => {
                let cuts: Vec<usize> = cuts.iter().map(|i| i.index(orig.len() + 1)).collect();
                multi_member(&orig, &cuts)
            }
            Layout::Bgzf => bgzf(&orig, 65280),
        };
        let r = open(gz, span, threads);
        // Reads race with the background walk on purpose.
        for (at, n) in &reads {
            if orig.is_empty() {
                break;
            }
            let off = at.index(orig.len());
            let n = (*n).min(orig.len() - off);
            let mut buf = vec![0u8; n];
            r.read_at(&mut buf, off as u64).expect("read");
            prop_assert!(buf[..] == orig[off..off + n], "read {} at {} differs", n, off);
        }
        check_all(&r, &orig);
        // Extents add up, and what they call zero is zero.
        let ext = r.extents(0, orig.len() as u64 + 100);
        prop_assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), orig.len() as u64);
        let mut pos = 0usize;
        for e in ext {
            if e.zero {
                prop_assert!(orig[pos..pos + e.length as usize].iter().all(|&b| b == 0));
            }
            pos += e.length as usize;
        }
    }
}

#[test]
fn empty_gzip() {
    let r = open(gzip(b"", 6), 4096, 1);
    check_all(&r, b"");
    assert!(r.extents(0, 100).is_empty());
    r.read_at(&mut [], 0).expect("empty read");
}

#[test]
fn zero_extents_reported() {
    let mut orig = mixed(7, 300_000);
    orig.extend(vec![0u8; 1 << 20]);
    orig.extend(mixed(8, 100_000));
    let r = open(gzip(&orig, 6), 65536, 2);
    check_all(&r, &orig);
    let ext = r.extents(0, orig.len() as u64);
    let zero: u64 = ext.iter().filter(|e| e.zero).map(|e| e.length).sum();
    // At least the whole 64 KiB chunks inside the zero run.
    assert!(zero >= (1 << 20) - 2 * 65536, "zero bytes reported: {zero}");
}

#[test]
fn real_tools() {
    let orig = mixed(42, 3_000_000);
    for args in [
        &["gzip", "-c", "-6"][..],
        &["pigz", "-c", "-i", "-b", "128"],
        &["pigz", "-c", "-p", "2"],
        &["bgzip", "-c"],
    ] {
        let gz = tool(args, &orig);
        for span in [4096u64, 1 << 20] {
            let r = open(gz.clone(), span, 2);
            check_all(&r, &orig);
            let mut buf = vec![0u8; 10_000];
            for off in [0usize, 1, 65535, 65536, 1_000_000, orig.len() - 10_000] {
                r.read_at(&mut buf, off as u64).unwrap();
                assert!(
                    buf[..] == orig[off..off + 10_000],
                    "{args:?} span {span} at {off}"
                );
            }
            if span == 4096 {
                assert!(
                    r.checkpoint_count() > 20,
                    "{args:?}: {} checkpoints",
                    r.checkpoint_count()
                );
            }
        }
    }
}

#[test]
fn concurrent_reads_during_indexing() {
    let orig = std::sync::Arc::new(mixed(99, 6_000_000));
    let r = std::sync::Arc::new(open(gzip(&orig, 6), 65536, 2));
    let hs: Vec<_> = (0..4u64)
        .map(|t| {
            let (r, orig) = (r.clone(), orig.clone());
            std::thread::spawn(move || {
                let mut x = t + 1;
                for _ in 0..60 {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    let off = (x >> 20) as usize % (orig.len() - 70_000);
                    let mut buf = vec![0u8; 70_000];
                    r.read_at(&mut buf, off as u64).unwrap();
                    assert!(buf[..] == orig[off..off + 70_000], "thread {t} at {off}");
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    check_all(&r, &orig);
}

#[test]
fn sequential_reads_decode_ahead() {
    let orig = mixed(5, 4_000_000);
    let r = open(gzip(&orig, 6), 65536, 2);
    r.wait_size().unwrap();
    let mut buf = vec![0u8; 32768];
    for off in (0..orig.len()).step_by(32768) {
        let n = buf.len().min(orig.len() - off);
        r.read_at(&mut buf[..n], off as u64).unwrap();
        assert!(buf[..n] == orig[off..off + n]);
    }
    // Decode-ahead runs on other threads; it must have happened at least once.
    assert!(r.stats().spans_ahead > 0, "{:?}", r.stats());
}

#[test]
fn same_span_decoded_once() {
    let orig = std::sync::Arc::new(mixed(6, 3_000_000));
    let r = std::sync::Arc::new(open(gzip(&orig, 6), 1 << 20, 0));
    r.wait_size().unwrap();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
    let hs: Vec<_> = (0..8)
        .map(|t| {
            let (r, orig, barrier) = (r.clone(), orig.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let off = (1 << 20) + t * 1000;
                let mut buf = vec![0u8; 5000];
                r.read_at(&mut buf, off as u64).unwrap();
                assert!(buf[..] == orig[off..off + 5000]);
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    assert_eq!(r.stats().spans_decoded, 1);
}

/// Zero extents of a reader, as (start, length) pairs.
fn zero_extents(r: &seekable_compressed::gzip::GzipReader, len: u64) -> Vec<(u64, u64)> {
    r.extents(0, len)
        .iter()
        .scan(0u64, |pos, e| {
            let at = *pos;
            *pos += e.length;
            Some((at, e.length, e.zero))
        })
        .filter(|e| e.2)
        .map(|e| (e.0, e.1))
        .collect()
}

/// `pigz -i` writes one member in independent pieces: the walk inflates
/// them on worker threads, and the index it builds (checkpoints, zero
/// runs, size, CRC) gives the same bytes and the same extents as a serial
/// walk.
#[test]
fn pigz_independent_pieces_indexed_in_parallel() {
    let mut orig = mixed(11, 6_000_000);
    // Zero runs at odd offsets, some crossing piece boundaries.
    orig.extend(vec![0u8; 700_001]);
    orig.extend(mixed(12, 3_000_000));
    orig.extend(vec![0u8; 333_333]);
    let gz = tool(&["pigz", "-c", "-i", "-b", "128", "-p", "2"], &orig);
    let serial = open(gz.clone(), 65536, 0);
    check_all(&serial, &orig);
    assert_eq!(serial.stats().pieces_parallel, 0);
    for threads in [1, 2] {
        let par = open(gz.clone(), 65536, threads);
        check_all(&par, &orig);
        assert!(
            par.stats().pieces_parallel >= 4,
            "threads {threads}: {:?}",
            par.stats()
        );
        // Checkpoints may sit at other block boundaries than the serial
        // walk's, but never further from their span start than a piece.
        assert!(par.checkpoint_count() >= serial.checkpoint_count() * 9 / 10);
        let (pi, si) = (par.index().unwrap(), serial.index().unwrap());
        assert_eq!(pi.zero_runs, si.zero_runs);
        assert_eq!(pi.total, si.total);
        assert_eq!(
            zero_extents(&par, orig.len() as u64),
            zero_extents(&serial, orig.len() as u64),
            "threads {threads}"
        );
        // Every checkpoint resumes correctly: a fresh reader over the
        // saved index reads each span start without the walk.
        let idx = par.index().expect("index complete");
        for cp in idx.checkpoints.iter().step_by(7) {
            let mut buf = vec![0u8; 3000.min(orig.len() - cp.out as usize)];
            par.read_at(&mut buf, cp.out).unwrap();
            assert!(buf[..] == orig[cp.out as usize..cp.out as usize + buf.len()]);
        }
    }
}

/// Plain `pigz` (pieces that share history) and plain gzip (no pieces, a
/// few chance marker bytes) must fall back to serial decoding and still be
/// exact; a damaged piece is reported, not committed.
#[test]
fn dependent_pieces_fall_back_and_damage_is_caught() {
    let orig = mixed(21, 5_000_000);
    let gz = tool(&["pigz", "-c", "-b", "128", "-p", "2"], &orig);
    let r = open(gz, 65536, 2);
    check_all(&r, &orig);
    assert_eq!(r.stats().pieces_parallel, 0, "{:?}", r.stats());
    // Random data with chance `00 00 ff ff` markers planted in it.
    let mut noisy = mixed(22, 4_000_000);
    for at in (1000..noisy.len() - 4).step_by(150_001) {
        noisy[at..at + 4].copy_from_slice(&[0, 0, 0xff, 0xff]);
    }
    let gz = gzip(&noisy, 1);
    check_all(&open(gz, 65536, 2), &noisy);
    // Flip a byte in the middle of an independent piece: the walk fails
    // with an error instead of serving wrong data.
    let good = tool(&["pigz", "-c", "-i", "-b", "128"], &orig);
    let mut bad = good.clone();
    let mid = bad.len() * 2 / 3;
    bad[mid] ^= 0x55;
    let r = open(bad, 65536, 2);
    let e = r.wait_size().expect_err("damage must be reported");
    assert!(e.to_string().contains("test.gz"), "{e}");
    // Damage anywhere past the serial start, including in and around the
    // flush markers the walk cuts at: an error naming the file, or (bits
    // deflate never reads) exactly the original bytes; never a panic or
    // different data.
    let markers: Vec<usize> = good
        .windows(4)
        .enumerate()
        .filter(|(i, w)| *i > 1 << 20 && *w == [0, 0, 0xff, 0xff])
        .map(|(i, _)| i)
        .step_by(3)
        .take(6)
        .collect();
    assert!(!markers.is_empty());
    for (k, &at) in markers.iter().enumerate() {
        for (d, x) in [(0usize, 0xffu8), (2, 0x01), (5, 0x80), (40, 0x10)] {
            let mut bad = good.clone();
            bad[at + d] ^= x;
            let r = open(bad, 65536, 1 + k % 2);
            match r.wait_size() {
                Err(e) => assert!(e.to_string().contains("test.gz"), "{e}"),
                Ok(_) => check_all(&r, &orig),
            }
        }
    }
}
