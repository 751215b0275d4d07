//! Saved index files: reuse, and rejection of stale or damaged ones.

mod common;
#[path = "gzip_util.rs"]
mod util;

use std::path::Path;
use std::sync::Arc;

use common::xorshift_bytes;
use seekable_compressed::gzip::{GzipIndex, GzipOptions, GzipReader};
use seekable_compressed::{RandomAccess, Source};
use util::*;

fn open_at(data: &[u8], gz: &GzipOptions) -> GzipReader {
    let src: Arc<dyn Source> = Arc::new(data.to_vec());
    GzipReader::open_with(src, &opts(2), gz).expect("open")
}

fn persist_to(path: &Path) -> GzipOptions {
    GzipOptions {
        span: 65536,
        index_path: Some(path.to_path_buf()),
        ..Default::default()
    }
}

/// Open, read everything, and return whether the saved index was used.
fn open_check(data: &[u8], orig: &[u8], gz: &GzipOptions) -> bool {
    let r = open_at(data, gz);
    let loaded = r.index_was_loaded();
    if loaded {
        assert_eq!(
            r.known_size(),
            Some(orig.len() as u64),
            "size known at once"
        );
    }
    check_all(&r, orig);
    if !loaded {
        assert!(matches!(r.wait_saved(), Some(Ok(_))), "rebuilt index saved");
    }
    loaded
}

#[test]
fn save_then_reopen_uses_index() {
    let dir = tempfile::tempdir().unwrap();
    let orig = mixed(1, 2_000_000);
    let data = gzip(&orig, 6);
    let gz = GzipOptions {
        span: 65536,
        index_dir: Some(dir.path().to_path_buf()),
        ..Default::default()
    };
    let r = open_at(&data, &gz);
    assert!(!r.index_was_loaded());
    let saved = r.wait_saved().expect("persisting").expect("saved");
    assert!(saved.starts_with(dir.path()) && saved.extension().is_some_and(|e| e == "gzi"));
    let n = r.checkpoint_count();
    drop(r);
    let r = open_at(&data, &gz);
    assert!(r.index_was_loaded());
    assert_eq!(
        r.known_size(),
        Some(orig.len() as u64),
        "size known without a walk"
    );
    assert_eq!(r.checkpoint_count(), n);
    assert_eq!(r.indexed_frontier(), orig.len() as u64);
    check_all(&r, &orig);
    // No temporary files left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn modified_source_invalidates_index() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.gzi");
    let orig = mixed(2, 1_500_000);
    // A small last member keeps the tail inside the hashed last 64 KiB.
    let mut data = gzip(&orig[..1_400_000], 6);
    let last = data.len();
    data.extend(gzip(&orig[1_400_000..], 6));
    let gz = persist_to(&path);
    assert!(!open_check(&data, &orig, &gz));
    assert!(open_check(&data, &orig, &gz));
    // Same size, still valid gzip, different bytes: the MTIME field of the
    // first member (head), then of the last member (tail).
    for at in [4usize, last + 4] {
        let mut changed = data.clone();
        changed[at] ^= 0x55;
        assert!(
            !open_check(&changed, &orig, &gz),
            "change at {at} not noticed"
        );
        assert!(open_check(&changed, &orig, &gz));
    }
    // A caller-supplied identity (e.g. mtime) is part of the match too.
    let with_id = GzipOptions {
        identity: Some(b"mtime=1".to_vec()),
        ..persist_to(&path)
    };
    assert!(!open_check(&data, &orig, &with_id));
    assert!(open_check(&data, &orig, &with_id));
    let other_id = GzipOptions {
        identity: Some(b"mtime=2".to_vec()),
        ..persist_to(&path)
    };
    assert!(!open_check(&data, &orig, &other_id));
    // A different span is rebuilt rather than used.
    let other_span = GzipOptions {
        span: 4096,
        ..persist_to(&path)
    };
    assert!(!open_check(&data, &orig, &other_span));
}

#[test]
fn damaged_index_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.gzi");
    let orig = mixed(3, 1_000_000);
    let data = gzip(&orig, 6);
    let gz = persist_to(&path);
    assert!(!open_check(&data, &orig, &gz));
    let good = std::fs::read(&path).unwrap();
    assert!(GzipIndex::from_bytes(&good).is_ok());
    let mut damaged: Vec<Vec<u8>> = Vec::new();
    for at in [0, 9, 100, good.len() / 2, good.len() - 1] {
        let mut b = good.clone();
        b[at] ^= 1;
        damaged.push(b);
    }
    damaged.push(good[..good.len() / 2].to_vec());
    damaged.push(Vec::new());
    let mut magic = good.clone();
    magic[..8].copy_from_slice(b"GZIPIDX!");
    damaged.push(magic);
    for bad in damaged {
        std::fs::write(&path, &bad).unwrap();
        assert!(!open_check(&data, &orig, &gz));
        assert_eq!(
            std::fs::read(&path).unwrap(),
            good,
            "rebuilt index is identical"
        );
        assert!(open_check(&data, &orig, &gz));
    }
}

#[test]
fn reads_before_the_walk_finishes() {
    // Big enough that the walk takes a while; the first read is served
    // from the first checkpoints long before the end is indexed.
    let orig = mixed(4, 24_000_000);
    let r = open(gzip(&orig, 6), 1 << 20, 2);
    let mut buf = vec![0u8; 4096];
    r.read_at(&mut buf, 100).unwrap();
    assert!(buf[..] == orig[100..4196]);
    let frontier = r.indexed_frontier();
    assert!(frontier < orig.len() as u64 || r.known_size().is_some());
    check_all(&r, &orig);
}

/// Issue #17 point 1: a saved index is checked against the bytes it is used
/// with.  One member (several spans long) of a multi-member file is
/// rewritten in place with different content of the same compressed size,
/// so the file's size, head and tail — its identity — are unchanged; the
/// next open loads the old index, and every byte must still read right.
#[test]
fn index_of_a_member_rewritten_in_place_is_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let index = dir.path().join("x.gzi");
    // Incompressible first and last members: the identity hashes 64 KiB
    // at each end, and these keep the middle member out of them.
    let (a, c) = (xorshift_bytes(150_000, 1), xorshift_bytes(150_000, 2));
    let text: Vec<u8> = (0..60_000u32)
        .flat_map(|i| format!("line {i}\n").into_bytes())
        .collect();
    let gz = |d: &[u8]| tool(&["gzip", "-n", "-6", "-c"], d);
    let b = gz(&text);
    // Search for an edit near the member's start that keeps its
    // compressed size.
    let mut edited = None;
    'search: for p in (1000..4000).step_by(7) {
        for d in b'0'..=b'9' {
            if text[p] == d || !text[p].is_ascii_digit() {
                continue;
            }
            let mut t = text.clone();
            t[p] = d;
            let z = gz(&t);
            if z.len() == b.len() {
                edited = Some((t, z));
                break 'search;
            }
        }
    }
    let (text2, b2) = edited.expect("an edit of the same compressed size");
    let mut file = gz(&a);
    let at = file.len();
    file.extend_from_slice(&b);
    file.extend(gz(&c));
    let mut file2 = file.clone();
    file2[at..at + b.len()].copy_from_slice(&b2);
    let orig = [a.as_slice(), &text, &c].concat();
    let orig2 = [a.as_slice(), &text2, &c].concat();

    assert!(!open_check(&file, &orig, &persist_to(&index)));
    // The same identity: the old index is loaded...
    let r = open_at(&file2, &persist_to(&index));
    assert!(r.index_was_loaded());
    // ...but no byte decoded through it is served unchecked.
    let mut buf = vec![0u8; orig2.len()];
    r.read_at(&mut buf, 0).expect("read all");
    assert!(buf == orig2, "wrong bytes served through a stale index");
    for off in (0..orig2.len()).step_by(40_000) {
        let n = 5000.min(orig2.len() - off);
        let mut b = vec![0u8; n];
        r.read_at(&mut b, off as u64).unwrap();
        assert!(b == orig2[off..off + n], "at {off}");
    }
    // Rebuilt and saved again: the next open uses it and reads right.
    assert!(matches!(r.wait_saved(), Some(Ok(_))));
    drop(r);
    assert!(open_check(&file2, &orig2, &persist_to(&index)));
}
