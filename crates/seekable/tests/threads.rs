//! Dropping a reader leaves no thread of it behind: the decode pools of the
//! engine formats (xz here), gzip's read-ahead pool and the index walk's
//! pool are all joined.  Threads are counted in /proc/self/task, so this
//! file holds a single test (another test's threads would be counted).

mod common;
#[path = "gzip_util.rs"]
mod util;

use common::{check_range, image_like, source, xz_encode};
use seekable_compressed::{RandomAccess, XzReader};

/// Threads of this process, except gzip's index walk: that one ends on
/// its own once the walk is over, which may be a moment after a reader
/// learns the walk's result.  (A thread names itself once it runs, so a
/// pool's threads cannot be told by their names right after they start.)
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim_end() != "gzip-index")
        .count()
}

#[test]
fn dropping_a_reader_joins_its_threads() {
    let before = threads();
    let data = image_like(2_000_000, 5);
    let file = xz_encode(&data, liblzma_sys::LZMA_CHECK_CRC32, Some(100_000));
    let mut o = common::opts();
    o.threads = 3;
    let r = XzReader::open(source(file), &o).unwrap();
    assert_eq!(threads(), before + 3);
    // Sequential reads queue decode-ahead; a multi-block read and a
    // prefetch queue more: the pool is busy when the reader is dropped.
    for off in (0..1_000_000).step_by(50_000) {
        check_range(&r, &data, off, 50_000);
    }
    check_range(&r, &data, 1_000_000, 600_000);
    r.prefetch(0, data.len() as u64);
    drop(r);
    assert_eq!(threads(), before, "decode pool outlived its reader");

    // gzip: BGZF members are verified on the walk's pool; sequential reads
    // then decode ahead on the reader's pool.
    let data = util::mixed(9, 3_000_000);
    let r = util::open(util::bgzf(&data, 60_000), 64 << 10, 3);
    assert_eq!(r.wait_size().unwrap(), data.len() as u64);
    // The walk ends (joining its pool) before it reports on saving.
    assert_eq!(r.wait_saved(), None);
    assert_eq!(threads(), before + 3, "only the read-ahead pool is left");
    for off in (0..1_000_000).step_by(100_000) {
        check_range(&r, &data, off, 100_000);
    }
    check_range(&r, &data, 1_000_000, 1_000_000);
    assert!(r.stats().spans_decoded > 0);
    drop(r);
    assert_eq!(threads(), before, "read-ahead pool outlived its reader");
}
