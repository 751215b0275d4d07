//! Helpers shared by the integration tests: in-process encoders and test
//! data generators.
#![allow(dead_code)]

use std::sync::Arc;

use liblzma_sys as lz;
use seekable_compressed::{Error, Options, RandomAccess, Source};

/// Test data with the features disk images have: long zero runs, random
/// (incompressible) stretches and repetitive text.
pub fn image_like(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    let mut next = || xorshift(&mut x);
    while out.len() < len {
        let run = (next() % 200_000) as usize + 1;
        let run = run.min(len - out.len());
        match next() % 3 {
            0 => out.resize(out.len() + run, 0),
            1 => {
                for _ in 0..run {
                    out.push(next() as u8);
                }
            }
            _ => {
                for i in 0..run {
                    out.push(b"the quick brown fox "[i % 20]);
                }
            }
        }
    }
    out
}

/// Encode `data` as one xz stream with `check`, starting a new block every
/// `block_size` bytes (`None`: one block, like plain `xz`).
pub fn xz_encode(data: &[u8], check: u32, block_size: Option<usize>) -> Vec<u8> {
    // SAFETY: all-zero is LZMA_STREAM_INIT; every pointer handed to
    // lzma_code points into `piece` or `buf` with the length given beside
    // it, both alive for the call; the stream is ended once, at the end.
    unsafe {
        let mut strm: lz::lzma_stream = std::mem::zeroed();
        assert_eq!(lz::lzma_easy_encoder(&mut strm, 1, check), lz::LZMA_OK);
        let mut out = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        let pieces: Vec<&[u8]> = match block_size {
            Some(bs) => data.chunks(bs.max(1)).collect(),
            None => vec![data],
        };
        let n = pieces.len();
        for (i, piece) in pieces.into_iter().enumerate() {
            let action = if i + 1 == n {
                lz::LZMA_FINISH
            } else {
                lz::LZMA_FULL_FLUSH
            };
            strm.next_in = piece.as_ptr();
            strm.avail_in = piece.len();
            loop {
                strm.next_out = buf.as_mut_ptr();
                strm.avail_out = buf.len();
                let ret = lz::lzma_code(&mut strm, action);
                out.extend_from_slice(&buf[..buf.len() - strm.avail_out]);
                if ret == lz::LZMA_STREAM_END {
                    break;
                }
                assert_eq!(ret, lz::LZMA_OK);
                if action == lz::LZMA_RUN && strm.avail_in == 0 {
                    break;
                }
            }
        }
        if n == 0 {
            strm.next_in = std::ptr::null();
            strm.avail_in = 0;
            loop {
                strm.next_out = buf.as_mut_ptr();
                strm.avail_out = buf.len();
                let ret = lz::lzma_code(&mut strm, lz::LZMA_FINISH);
                out.extend_from_slice(&buf[..buf.len() - strm.avail_out]);
                if ret == lz::LZMA_STREAM_END {
                    break;
                }
                assert_eq!(ret, lz::LZMA_OK);
            }
        }
        lz::lzma_end(&mut strm);
        out
    }
}

/// Run an external compressor over `data` (stdin to stdout).
pub fn run_tool(cmd: &str, args: &[&str], data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::File::create(&input)
        .unwrap()
        .write_all(data)
        .unwrap();
    let out = Command::new(cmd)
        .args(args)
        .arg("-c")
        .arg(&input)
        .stdout(Stdio::piped())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

pub fn opts() -> Options {
    Options {
        name: "test-image".into(),
        cache_bytes: 1 << 20,
        threads: 2,
        scratch_dir: None,
        ..Options::default()
    }
}

pub fn source(v: Vec<u8>) -> Arc<dyn Source> {
    Arc::new(v)
}

/// Read `[off, off+len)` and compare with the original.
pub fn check_range(r: &dyn RandomAccess, data: &[u8], off: u64, len: usize) {
    let mut buf = vec![0xAAu8; len];
    r.read_at(&mut buf, off).unwrap();
    assert!(
        buf == data[off as usize..off as usize + len],
        "mismatch at {off}+{len}"
    );
}

/// The extents must add up and never call data zero.
pub fn check_extents(r: &dyn RandomAccess, data: &[u8]) {
    let ext = r.extents(0, data.len() as u64);
    let mut pos = 0usize;
    for e in ext {
        if e.zero {
            assert!(data[pos..pos + e.length as usize].iter().all(|&b| b == 0));
        }
        pos += e.length as usize;
    }
    assert_eq!(pos, data.len());
}

/// Pseudo-random (incompressible, never zero) bytes.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len).map(|_| (xorshift(&mut x) as u8) | 1).collect()
}

/// One step of the xorshift64 generator all the test data comes from.
pub fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Pseudo-random bytes (zero included): the low byte of each xorshift
/// step from `seed | 1`.
pub fn xorshift_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len).map(|_| xorshift(&mut x) as u8).collect()
}

/// `data` cut into `streams` pieces, one per stream of a multi-stream
/// file; no data is one empty stream.
pub fn stream_pieces(data: &[u8], streams: usize) -> Vec<&[u8]> {
    let per = data.len().div_ceil(streams.max(1)).max(1);
    let mut pieces: Vec<&[u8]> = data.chunks(per).collect();
    if pieces.is_empty() {
        pieces.push(&[]);
    }
    pieces
}

/// A property test's reads, at offsets wrapped into `data`, each compared
/// with the original, then the extents; an empty image refuses any read.
pub fn check_reads(r: &dyn RandomAccess, data: &[u8], reads: &[(u64, usize)]) {
    if data.is_empty() {
        let mut b = [0u8; 1];
        let oor = matches!(r.read_at(&mut b, 0), Err(Error::OutOfRange { .. }));
        assert!(oor);
    } else {
        for &(off, n) in reads {
            let off = off % data.len() as u64;
            let n = n.min(data.len() - off as usize);
            check_range(r, data, off, n);
        }
    }
    check_extents(r, data);
}

/// Eight threads at once, each checking 200 reads of up to 100 000 bytes
/// at offsets drawn with xorshift from `seed(thread)`.
pub fn check_concurrent_reads(r: &dyn RandomAccess, data: &[u8], seed: fn(u64) -> u64) {
    std::thread::scope(|s| {
        for t in 0..8u64 {
            s.spawn(move || {
                let mut x = seed(t);
                for _ in 0..200 {
                    let x = xorshift(&mut x);
                    let off = x % data.len() as u64;
                    let len = ((x >> 32) as usize % 100_000).min(data.len() - off as usize);
                    check_range(r, data, off, len);
                }
            });
        }
    });
}

/// Bytes on disk (allocated blocks) of this process's open files under
/// `dir`: the unnamed scratch files live there.
pub fn disk_use_under(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        if target.starts_with(dir) {
            if let Ok(m) = std::fs::metadata(e.path()) {
                total += m.blocks() * 512;
            }
        }
    }
    total
}

/// A source that counts its reads.
pub struct CountingSource {
    pub inner: Vec<u8>,
    pub reads: std::sync::atomic::AtomicUsize,
}

impl Source for CountingSource {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.inner.len() as u64)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.read_exact_at(buf, offset)
    }
}
