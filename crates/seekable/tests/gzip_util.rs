//! Helpers shared by the gzip tests (included with `#[path]`; as a test
//! target of its own it has no tests).
#![allow(dead_code)]

use std::io::Write;
use std::sync::Arc;

use flate2::write::{DeflateEncoder, GzEncoder};
use flate2::Compression;
use seekable_compressed::gzip::{GzipOptions, GzipReader};
use seekable_compressed::{Options, RandomAccess, Source};

pub fn gzip(data: &[u8], level: u32) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::new(level));
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Concatenated members, split at the given points.
pub fn multi_member(data: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut cuts: Vec<usize> = cuts.iter().map(|&c| c.min(data.len())).collect();
    cuts.sort_unstable();
    let mut out = Vec::new();
    let mut prev = 0;
    for c in cuts.into_iter().chain([data.len()]) {
        out.extend(gzip(&data[prev..c], 6));
        prev = c;
    }
    out
}

/// BGZF as bgzip writes it: members of at most `block` input bytes (and,
/// as bgzip, at most 0xff00, so incompressible data still fits BSIZE's 16
/// bits) with the `BC` extra subfield, then the empty EOF member.
pub fn bgzf(data: &[u8], block: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in data.chunks(block.clamp(1, 0xff00)).chain([&[][..]]) {
        let mut e = DeflateEncoder::new(Vec::new(), Compression::new(6));
        e.write_all(chunk).unwrap();
        let cdata = e.finish().unwrap();
        let bsize = (18 + cdata.len() + 8 - 1) as u16;
        out.extend_from_slice(&[
            0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff, 6, 0, b'B', b'C', 2, 0,
        ]);
        out.extend_from_slice(&bsize.to_le_bytes());
        out.extend_from_slice(&cdata);
        out.extend_from_slice(&crc32fast::hash(chunk).to_le_bytes());
        out.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
    }
    out
}

/// Run an external compressor (gzip, pigz, bgzip) over `data`.
pub fn tool(args: &[&str], data: &[u8]) -> Vec<u8> {
    use std::process::{Command, Stdio};
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("compressor installed");
    let mut stdin = child.stdin.take().unwrap();
    let input = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "{args:?} failed");
    out.stdout
}

/// Mixed test data: random, zero and text-like runs.
pub fn mixed(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let words: [&[u8]; 6] = [b"the ", b"quick ", b"brown ", b"fox ", b"jumps\n", b"over "];
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        let run = (next() % 200_000) as usize + 1;
        let run = run.min(len - v.len());
        match next() % 3 {
            0 => v.extend((0..run).map(|_| next() as u8)),
            1 => v.resize(v.len() + run, 0),
            _ => {
                let start = v.len();
                while v.len() < start + run {
                    v.extend_from_slice(words[(next() % 6) as usize]);
                }
                v.truncate(start + run);
            }
        }
    }
    v
}

pub fn opts(threads: usize) -> Options {
    Options {
        name: "test.gz".into(),
        cache_bytes: 8 << 20,
        threads,
        scratch_dir: None,
        ..Options::default()
    }
}

pub fn no_persist(span: u64) -> GzipOptions {
    GzipOptions {
        span,
        persist: false,
        ..Default::default()
    }
}

pub fn open(data: Vec<u8>, span: u64, threads: usize) -> GzipReader {
    let src: Arc<dyn Source> = Arc::new(data);
    GzipReader::open_with(src, &opts(threads), &no_persist(span)).expect("open")
}

/// Check reads over the whole image and a few slices against `orig`.
pub fn check_all(r: &GzipReader, orig: &[u8]) {
    assert_eq!(r.wait_size().expect("index"), orig.len() as u64);
    assert_eq!(r.size(), orig.len() as u64);
    if !orig.is_empty() {
        let mut buf = vec![0u8; orig.len()];
        r.read_at(&mut buf, 0).expect("read all");
        assert!(buf == orig, "whole-image read differs");
    }
    let mut one = [0u8; 1];
    assert!(
        r.read_at(&mut one, orig.len() as u64).is_err(),
        "read past end must fail"
    );
}
