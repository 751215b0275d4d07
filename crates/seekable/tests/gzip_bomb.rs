//! A gzip bomb (1 GiB of zeros, ~1 MiB compressed): memory stays bounded.
//! Its own test binary so the process's peak RSS is this test's alone.

#[path = "gzip_util.rs"]
mod util;

use std::io::Write;
use std::sync::Arc;

use flate2::write::GzEncoder;
use flate2::Compression;
use seekable_compressed::gzip::GzipReader;
use seekable_compressed::{Options, RandomAccess, Source};

fn peak_rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn one_gib_of_zeros() {
    const GIB: u64 = 1 << 30;
    let mut e = GzEncoder::new(Vec::new(), Compression::new(9));
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..1024 {
        e.write_all(&zeros).unwrap();
    }
    let data = e.finish().unwrap();
    drop(zeros);
    assert!(data.len() < 2 << 20, "bomb is {} bytes", data.len());
    let src: Arc<dyn Source> = Arc::new(data);
    let opts = Options {
        name: "bomb.gz".into(),
        cache_bytes: 16 << 20,
        threads: 2,
        scratch_dir: None,
        ..Options::default()
    };
    let r = GzipReader::open_with(src, &opts, &util::no_persist(1 << 20)).unwrap();
    assert_eq!(r.wait_size().unwrap(), GIB);
    let mut buf = vec![1u8; 3 << 20];
    for off in [0, GIB / 3, GIB - buf.len() as u64, 12345] {
        r.read_at(&mut buf, off).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }
    // All of it is reported as zero.
    let ext = r.extents(0, GIB);
    assert_eq!(ext.len(), 1);
    assert!(ext[0].zero && ext[0].length == GIB);
    // Index: one checkpoint per MiB at most, windows of zeros compress well.
    assert!(r.checkpoint_count() <= 1024);
    let peak = peak_rss_kib();
    assert!(peak < 200 * 1024, "peak RSS {peak} KiB");
}
