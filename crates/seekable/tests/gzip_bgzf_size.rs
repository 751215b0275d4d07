//! BGZF: the exact size from member trailers, before the index walk ends.

#[path = "gzip_util.rs"]
mod util;

use std::sync::{Arc, Condvar, Mutex};

use proptest::prelude::*;
use seekable_compressed::gzip::{bgzf_size, GzipReader};
use seekable_compressed::{Error, RandomAccess, Source};
use util::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// The trailer sum is the size; any cut inside a member is an error
    /// naming an offset in the file, never a different size.
    #[test]
    fn size_matches_and_truncation_is_an_error(
        seed in any::<u64>(),
        len in 0usize..400_000,
        block in 1usize..65_536,
        cut in any::<u64>(),
        pad in 0usize..100,
    ) {
        let data = mixed(seed, len);
        let mut file = bgzf(&data, block);
        let boundaries: Vec<usize> = {
            let mut v = vec![0usize];
            let mut off = 0;
            while off < file.len() {
                let bsize = u16::from_le_bytes([file[off + 16], file[off + 17]]) as usize;
                off += bsize + 1;
                v.push(off);
            }
            v
        };
        prop_assert_eq!(bgzf_size("t.gz", &file).unwrap(), Some(data.len() as u64));
        let c = (cut % file.len() as u64) as usize;
        match bgzf_size("t.gz", &file[..c]) {
            Ok(Some(s)) => prop_assert!(boundaries.contains(&c), "cut {} gave size {}", c, s),
            Ok(None) => prop_assert!(false, "cut {} not recognised as BGZF", c),
            Err(Error::Corrupt { name, offset, .. }) => {
                prop_assert_eq!(name, "t.gz");
                prop_assert!(offset as usize <= c);
                prop_assert!(!boundaries.contains(&c) || c == 0);
            }
            Err(e) => prop_assert!(false, "{}", e),
        }
        // Zero padding after the last member is accepted.
        file.extend(vec![0u8; pad]);
        prop_assert_eq!(bgzf_size("t.gz", &file).unwrap(), Some(data.len() as u64));
    }

    /// Arbitrary damage never panics and never yields a size for a file
    /// whose trailers say otherwise.
    #[test]
    fn damage_never_panics(seed in any::<u64>(), flips in proptest::collection::vec((any::<u64>(), any::<u8>()), 1..8)) {
        let data = mixed(seed, 200_000);
        let mut file = bgzf(&data, 30_000);
        for (pos, x) in flips {
            let p = (pos % file.len() as u64) as usize;
            file[p] ^= x | 1;
        }
        let _ = bgzf_size("t.gz", &file);
    }
}

#[test]
fn corrupt_isize_is_an_error_naming_the_trailer() {
    let data = mixed(3, 300_000);
    let mut file = bgzf(&data, 65_536);
    let bsize = u16::from_le_bytes([file[16], file[17]]) as usize;
    let trailer = bsize + 1 - 4;
    file[trailer + 2] = 0x7f;
    match bgzf_size("t.gz", &file) {
        Err(Error::Corrupt { offset, reason, .. }) => {
            assert_eq!(offset, trailer as u64);
            assert!(reason.contains("trailer"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // The reader refuses to open it rather than announce a made-up size.
    let src: Arc<dyn Source> = Arc::new(file);
    assert!(matches!(
        GzipReader::open_with(src, &opts(1), &no_persist(1 << 20)),
        Err(Error::Corrupt { .. })
    ));
}

#[test]
fn plain_and_concatenated_gzip_give_no_size() {
    let data = mixed(4, 300_000);
    assert_eq!(bgzf_size("t.gz", &gzip(&data, 6)).unwrap(), None);
    // BGZF members followed by a plain one: not knowable either.
    let mut file = bgzf(&data, 60_000);
    file.extend(gzip(&data, 6));
    assert_eq!(bgzf_size("t.gz", &file).unwrap(), None);
}

/// A source whose large reads in the middle of the file (past `gate`, and
/// before the last 128 KiB, which open hashes for the file's identity)
/// block until it is opened: the index walk (which reads big batches)
/// stalls there, the size walk (small header/trailer reads) does not.
struct Gated {
    data: Vec<u8>,
    gate: u64,
    open: Mutex<bool>,
    cv: Condvar,
}

impl Source for Gated {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.data.len() as u64)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let middle =
            offset + buf.len() as u64 > self.gate && offset + (128 << 10) < self.data.len() as u64;
        if buf.len() > 1024 && middle {
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.cv.wait(open).unwrap();
            }
        }
        self.data.read_exact_at(buf, offset)
    }
}

#[test]
fn size_is_known_before_the_index_walk_finishes() {
    let data = mixed(5, 6 << 20);
    let file = bgzf(&data, 65_280);
    let gate = file.len() as u64 / 2;
    let src = Arc::new(Gated {
        data: file,
        gate,
        open: Mutex::new(false),
        cv: Condvar::new(),
    });
    for threads in [0, 2] {
        let s: Arc<dyn Source> = src.clone();
        let r = GzipReader::open_with(s, &opts(threads), &no_persist(1 << 20)).unwrap();
        // Answered while the walk is stuck at the gate.
        assert_eq!(r.size(), data.len() as u64);
        assert_eq!(r.known_size(), None, "walk cannot have finished");
        assert!(r.indexed_frontier() < data.len() as u64);
        // Reads behind the frontier are served now; a read past the end
        // fails at once.
        let mut one = [0u8; 1];
        assert!(matches!(
            r.read_at(&mut one, data.len() as u64),
            Err(Error::OutOfRange { .. })
        ));
        *src.open.lock().unwrap() = true;
        src.cv.notify_all();
        check_all(&r, &data);
        *src.open.lock().unwrap() = false;
    }
}

#[test]
fn bgzip_output_size_matches() {
    if std::process::Command::new("bgzip")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("bgzip not installed; skipped");
        return;
    }
    let data = mixed(6, 3 << 20);
    let file = tool(&["bgzip", "-c"], &data);
    assert_eq!(bgzf_size("t.gz", &file).unwrap(), Some(data.len() as u64));
}
