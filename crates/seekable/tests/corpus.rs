//! The fuzz seed corpus (made by the xz/zstd command-line tools) must parse
//! and decode: this keeps the seeds meaningful and checks compatibility
//! with files we did not write ourselves.

mod common;

use std::path::Path;

use common::*;
use seekable_compressed::xz::XzIndex;
use seekable_compressed::zstd::SeekTable;
use seekable_compressed::{open, RandomAccess};

fn files(dir: &str) -> Vec<std::path::PathBuf> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(dir);
    let mut v: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    assert!(!v.is_empty());
    v
}

fn decode_all(r: &dyn RandomAccess) -> Vec<u8> {
    let mut buf = vec![0u8; r.size() as usize];
    r.read_at(&mut buf, 0).unwrap();
    buf
}

#[test]
fn xz_seeds_parse_and_decode() {
    for f in files("xz_index") {
        let bytes = std::fs::read(&f).unwrap();
        let idx = XzIndex::parse(&bytes).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let r = open(source(bytes.clone()), &opts()).unwrap();
        assert_eq!(r.size(), idx.uncompressed_size);
        let want = std::process::Command::new("xz")
            .args(["-dc"])
            .arg(&f)
            .output()
            .unwrap()
            .stdout;
        assert_eq!(decode_all(&*r), want, "{}", f.display());
    }
}

#[test]
fn zstd_seeds_parse_and_decode() {
    for f in files("zstd_seek_table") {
        let bytes = std::fs::read(&f).unwrap();
        let seekable = f
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("seekable");
        assert_eq!(
            SeekTable::parse_file(&bytes).is_ok(),
            seekable,
            "{}",
            f.display()
        );
        let r = open(source(bytes.clone()), &opts()).unwrap();
        let want = std::process::Command::new("zstd")
            .args(["-dc"])
            .arg(&f)
            .output()
            .unwrap()
            .stdout;
        assert_eq!(decode_all(&*r), want, "{}", f.display());
    }
}
