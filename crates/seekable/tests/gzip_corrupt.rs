//! Damaged and hostile gzip input: clear errors naming offsets, no panics.

mod common;
#[path = "gzip_util.rs"]
mod util;

use std::sync::Arc;

use common::xorshift_bytes;
use proptest::prelude::*;
use seekable_compressed::gzip::GzipReader;
use seekable_compressed::{Error, RandomAccess, Source};
use util::*;

fn try_open(data: Vec<u8>, span: u64) -> Result<GzipReader, Error> {
    let src: Arc<dyn Source> = Arc::new(data);
    GzipReader::open_with(src, &opts(2), &no_persist(span))
}

/// Open and index `data`; returns the first error (at open or from the walk).
fn walk_error(data: Vec<u8>) -> Option<Error> {
    match try_open(data, 4096) {
        Err(e) => Some(e),
        Ok(r) => {
            let e = r.wait_size().err()?;
            // Sticky: reads fail too once the walk has failed.
            assert!(r.read_at(&mut [0u8; 1], 0).is_err());
            Some(e)
        }
    }
}

fn corrupt_offset(e: &Error) -> u64 {
    match e {
        Error::Corrupt { offset, format, .. } => {
            assert_eq!(*format, "gzip");
            *offset
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn truncated_everywhere() {
    let orig = mixed(10, 200_000);
    let data = gzip(&orig, 6);
    for cut in (0..data.len())
        .step_by(997)
        .chain([1, 2, 9, 10, data.len() - 8, data.len() - 1])
    {
        let e = walk_error(data[..cut].to_vec()).unwrap_or_else(|| panic!("cut at {cut} accepted"));
        if cut >= 10 {
            let off = corrupt_offset(&e);
            assert!(off <= cut as u64, "cut {cut}: error offset {off}");
        }
    }
}

#[test]
fn crc_and_length_mismatch() {
    let orig = mixed(11, 100_000);
    let data = gzip(&orig, 6);
    let n = data.len();
    let mut bad = data.clone();
    bad[n - 8] ^= 1;
    let e = walk_error(bad).expect("bad CRC accepted");
    assert_eq!(corrupt_offset(&e), n as u64 - 8);
    assert!(e.to_string().contains("CRC32 mismatch"), "{e}");
    assert!(e.to_string().contains("test.gz"), "{e}");
    let mut bad = data.clone();
    bad[n - 1] ^= 1;
    let e = walk_error(bad).expect("bad ISIZE accepted");
    assert_eq!(corrupt_offset(&e), n as u64 - 4);
}

#[test]
fn bgzf_bad_member_named() {
    let orig = mixed(12, 1_000_000);
    let data = bgzf(&orig, 65280);
    // Find the 5th member and break its CRC.
    let mut off = 0usize;
    for _ in 0..5 {
        off += u16::from_le_bytes([data[off + 16], data[off + 17]]) as usize + 1;
    }
    let end = off + u16::from_le_bytes([data[off + 16], data[off + 17]]) as usize + 1;
    let mut bad = data.clone();
    bad[end - 8] ^= 0x80;
    let e = walk_error(bad).expect("bad BGZF CRC accepted");
    assert_eq!(corrupt_offset(&e), end as u64 - 8);
    assert!(e.to_string().contains(&format!("member at {off}")), "{e}");
}

#[test]
fn garbage_and_padding() {
    assert!(matches!(
        try_open(b"not gzip at all".to_vec(), 4096),
        Err(Error::UnknownFormat { .. })
    ));
    assert!(matches!(
        try_open(Vec::new(), 4096),
        Err(Error::UnknownFormat { .. })
    ));
    let mut hdr_garbage = vec![0x1f, 0x8b, 8, 0xff];
    hdr_garbage.extend([0u8; 20]);
    assert!(matches!(
        try_open(hdr_garbage, 4096),
        Err(Error::Corrupt { offset: 3, .. })
    ));

    let orig = mixed(13, 50_000);
    let data = gzip(&orig, 6);
    // Zero padding is accepted, like gzip does.
    let mut padded = data.clone();
    padded.extend(vec![0u8; 10_000]);
    let r = try_open(padded, 4096).unwrap();
    check_all(&r, &orig);
    // Anything else after the last member is rejected, at its offset.
    let mut trailing = data.clone();
    trailing.extend([0, 0, 0, b'x', 1, 2]);
    let e = walk_error(trailing).expect("trailing garbage accepted");
    assert_eq!(corrupt_offset(&e), data.len() as u64 + 3);
    // A second "member" that is garbage after its magic.
    let mut bad_member = data.clone();
    bad_member.extend([0x1f, 0x8b, 9, 0, 0, 0]);
    let e = walk_error(bad_member).expect("bad member accepted");
    assert_eq!(corrupt_offset(&e), data.len() as u64 + 2);
    // An endless file name is refused without buffering it all.
    let mut long_name = vec![0x1f, 0x8b, 8, 0x08, 0, 0, 0, 0, 0, 3];
    long_name.extend(vec![b'a'; 3 << 20]);
    let e = walk_error(long_name).expect("endless name accepted");
    assert!(
        e.to_string().contains("too long") || e.to_string().contains("truncated"),
        "{e}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Flipped bytes anywhere: either an error or (rarely, e.g. a flipped
    /// header MTIME) correct data — never wrong data or a panic.
    #[test]
    fn flipped_bytes_never_give_wrong_data(
        seed in any::<u64>(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
        bgzf_layout in any::<bool>(),
    ) {
        let orig = mixed(seed, 150_000);
        let mut data = if bgzf_layout { bgzf(&orig, 30_000) } else { gzip(&orig, 6) };
        for (at, x) in &flips {
            let i = at.index(data.len());
            data[i] ^= x;
        }
        if let Ok(r) = try_open(data, 4096) {
            if let Ok(size) = r.wait_size() {
                // Only header fields outside the data (MTIME, XFL, OS, extra
                // subfields other than BC) can change without an error.
                prop_assert_eq!(size, orig.len() as u64);
                let mut buf = vec![0u8; orig.len()];
                r.read_at(&mut buf, 0).unwrap();
                prop_assert!(buf == orig);
            }
        }
    }

    #[test]
    fn random_bytes_after_magic(tail in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let mut data = vec![0x1f, 0x8b, 8, 0];
        data.extend(tail);
        if let Ok(r) = try_open(data, 1024) {
            let _ = r.wait_size();
            let _ = r.read_at(&mut [0u8; 100], 0);
        }
    }
}

/// The policy: bytes are served only once their member's CRC-32 and length
/// have passed, except inside the first member while the walk is still in
/// it (it may be the only one).  A second member of `gzip` output whose CRC
/// is damaged: a read of its start, made at once (long before the walk
/// reaches its trailer), used to be served; now it fails, every time.
#[test]
fn later_member_is_served_only_after_its_crc() {
    let first = mixed(21, 100_000);
    let second = xorshift_bytes(8_000_000, 0x9E37_79B9);
    let mut data = tool(&["gzip", "-c"], &first);
    let mut tail = tool(&["gzip", "-1", "-c"], &second);
    let n = tail.len();
    tail[n - 8] ^= 1;
    data.extend_from_slice(&tail);
    for threads in [0, 2] {
        let r = open(data.clone(), 64 << 10, threads);
        let mut buf = vec![0u8; 4096];
        for _ in 0..2 {
            match r.read_at(&mut buf, first.len() as u64 + 1000) {
                Err(e) => assert!(e.to_string().contains("CRC"), "{e}"),
                Ok(()) => panic!("threads {threads}: served a member that fails its CRC"),
            }
        }
    }
}
