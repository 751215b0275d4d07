//! Shared by the whole-image targets: the input is a small read plan
//! followed by a compressed image.  The image is opened through the
//! seekable crate with a small cache and scratch bound, the planned reads
//! are made, and every read that succeeds must return what a reference
//! decoder (the codec's own streaming decoder, over the whole file) gives.
//! qcow2 has no reference decoder; its allocation depth over each planned
//! range is checked against its cluster map instead.
//!
//! Input layout: `n` (1 byte, reads = n % 8 + 1), then per read an offset
//! (u32 LE, taken modulo the size) and a length (u16 LE, at least 1), then
//! the image.

use std::io::Read;
use std::sync::Arc;

use seekable_compressed::gzip::{GzipOptions, GzipReader};
use seekable_compressed::qcow2::{Backing, MapKind, Qcow2Options, Qcow2Reader};
use seekable_compressed::{
    Bzip2Reader, LzipReader, Options, RandomAccess, Source, XzReader, ZstdReader,
};

/// Output the reference decoder may produce before comparison is skipped
/// (a bomb is still opened and read, just not compared).
const MAX_REF: usize = 32 << 20;

/// True when the image opened, the reference decoded it and every read
/// was compared (what the seeds must achieve).
pub fn run(data: &[u8]) -> bool {
    let Some((&n, rest)) = data.split_first() else {
        return false;
    };
    let reads = (n % 8 + 1) as usize;
    if rest.len() < reads * 6 {
        return false;
    }
    let (plan, image) = rest.split_at(reads * 6);
    let plan: Vec<(u64, usize)> = plan
        .chunks(6)
        .map(|c| {
            (
                u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                usize::from(u16::from_le_bytes([c[4], c[5]])).max(1),
            )
        })
        .collect();

    let dir = std::env::temp_dir();
    let opts = Options {
        name: "fuzz".into(),
        cache_bytes: 1 << 20,
        threads: 1,
        scratch_dir: Some(dir),
        scratch_cache_bytes: 4 << 20,
        scratch_bytes: Some(16 << 20),
        open_timeout: Some(std::time::Duration::from_secs(5)),
        ..Options::default()
    };
    let source: Arc<dyn Source> = Arc::new(image.to_vec());
    let reader: Arc<dyn RandomAccess> = match image {
        [0xFD, b'7', b'z', b'X', b'Z', 0, ..] => match XzReader::open(source, &opts) {
            Ok(r) => Arc::new(r),
            Err(_) => return false,
        },
        [0x1F, 0x8B, ..] => {
            let gz = GzipOptions {
                persist: false,
                ..GzipOptions::default()
            };
            match GzipReader::open_with(source, &opts, &gz) {
                // Like the filter: only a size known to be right is used.
                Ok(r) if r.export_size().is_ok() => Arc::new(r),
                _ => return false,
            }
        }
        [b'B', b'Z', b'h', ..] => match Bzip2Reader::open(source, &opts) {
            Ok(r) => Arc::new(r),
            Err(_) => return false,
        },
        [b'L', b'Z', b'I', b'P', ..] => match LzipReader::open(source, &opts) {
            Ok(r) => Arc::new(r),
            Err(_) => return false,
        },
        // qcow2: no reference decoder here; the reads must not panic, hang
        // or take memory from what the header claims, and stay in range.
        [b'Q', b'F', b'I', 0xfb, ..] => {
            let q = Qcow2Options {
                name: "fuzz".into(),
                backing: Backing::None,
                cache_bytes: 1 << 20,
                ..Qcow2Options::default()
            };
            match Qcow2Reader::open(source, &q) {
                Ok(r) => {
                    depth_agrees_with_map(&r, &plan);
                    Arc::new(r)
                }
                Err(_) => return false,
            }
        }
        _ => match ZstdReader::open(source, &opts) {
            Ok(r) => Arc::new(r),
            Err(_) => return false,
        },
    };
    let size = reader.size();
    let reference = reference(image);
    if let Some(want) = &reference {
        // A reader that opened must have the size the data decodes to
        // (the reference accepting the file too).
        assert_eq!(size, want.len() as u64, "size differs from the reference");
    }
    if size == 0 {
        return reference.is_some() || image.starts_with(b"QFI\xfb");
    }
    let mut all = true;
    for (off, len) in plan {
        let off = off % size;
        let len = len.min((size - off) as usize);
        let mut buf = vec![0u8; len];
        if reader.read_at(&mut buf, off).is_ok() {
            if let Some(want) = &reference {
                assert!(
                    buf[..] == want[off as usize..off as usize + len],
                    "read of {len} at {off} differs from the reference"
                );
            }
        } else {
            all = false;
        }
    }
    // qcow2 has no reference here: success is every read succeeding.
    all && (reference.is_some() || image.starts_with(b"QFI\xfb"))
}

/// With no backing file, a qcow2 image's allocation depth (1 where it has
/// the cluster, 0 where not) is its `map` seen another way: for each
/// planned range where both succeed, they must say the same.
fn depth_agrees_with_map(r: &Qcow2Reader, plan: &[(u64, usize)]) {
    let size = r.size();
    if size == 0 {
        return;
    }
    for &(off, len) in plan {
        let off = off % size;
        let (Ok(depth), Ok(map)) = (r.allocation_depth(off, len as u64), r.map(off, len as u64))
        else {
            continue;
        };
        let mut want: Vec<(u64, u32)> = Vec::new();
        for m in map {
            let d = match m.kind {
                MapKind::Data { depth: 0 } | MapKind::Zero { depth: 0 } => 1,
                MapKind::Unallocated => 0,
                other => panic!("{other:?} in an image without a backing file"),
            };
            match want.last_mut() {
                Some(last) if last.1 == d => last.0 += m.length,
                _ => want.push((m.length, d)),
            }
        }
        assert_eq!(depth, want, "allocation depth at {off} for {len}");
    }
}

/// The whole file decoded by the codec's own decoder; `None` when it
/// rejects the file or decodes to more than `MAX_REF`.
fn reference(image: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let ok = match image {
        [0xFD, b'7', b'z', b'X', b'Z', 0, ..] => lzma_decode(image, &mut out, false),
        [0x1F, 0x8B, ..] => bounded(flate2::read::MultiGzDecoder::new(image), &mut out),
        [b'B', b'Z', b'h', ..] => bounded(bzip2::read::MultiBzDecoder::new(image), &mut out),
        [b'L', b'Z', b'I', b'P', ..] => lzma_decode(image, &mut out, true),
        [b'Q', b'F', b'I', 0xfb, ..] => return None,
        _ => zstd::stream::read::Decoder::new(image)
            .map(|d| bounded(d, &mut out))
            .unwrap_or(false),
    };
    ok.then_some(out)
}

fn bounded(r: impl Read, out: &mut Vec<u8>) -> bool {
    let mut r = r.take(MAX_REF as u64 + 1);
    r.read_to_end(out).is_ok() && out.len() <= MAX_REF
}

/// liblzma's xz stream decoder (or, with `lzip`, its lzip decoder),
/// concatenated streams/members allowed (as `xz -d` and `lzip -d` do).
fn lzma_decode(image: &[u8], out: &mut Vec<u8>, lzip: bool) -> bool {
    use liblzma_sys as lz;
    // SAFETY: the usual liblzma stream protocol: an initialised stream,
    // buffers that outlive each lzma_code call, and lzma_end at the end.
    unsafe {
        let mut s: lz::lzma_stream = std::mem::zeroed();
        let init = if lzip {
            lz::lzma_lzip_decoder(&mut s, u64::MAX, lz::LZMA_CONCATENATED)
        } else {
            lz::lzma_stream_decoder(&mut s, u64::MAX, lz::LZMA_CONCATENATED)
        };
        if init != lz::LZMA_OK {
            return false;
        }
        s.next_in = image.as_ptr();
        s.avail_in = image.len();
        let mut buf = vec![0u8; 1 << 16];
        let ok = loop {
            s.next_out = buf.as_mut_ptr();
            s.avail_out = buf.len();
            let action = if s.avail_in == 0 {
                lz::LZMA_FINISH
            } else {
                lz::LZMA_RUN
            };
            let r = lz::lzma_code(&mut s, action);
            let n = buf.len() - s.avail_out;
            out.extend_from_slice(&buf[..n]);
            if out.len() > MAX_REF {
                break false;
            }
            match r {
                lz::LZMA_OK => {}
                lz::LZMA_STREAM_END => break true,
                _ => break false,
            }
        };
        lz::lzma_end(&mut s);
        ok
    }
}
