//! The fuzz seed corpus (made by the xz/zstd command-line tools) must parse
//! and decode: this keeps the seeds meaningful and checks compatibility
//! with files we did not write ourselves.

mod common;

use std::path::Path;

use common::*;
use seekable_compressed::xz::XzIndex;
use seekable_compressed::zstd::SeekTable;
use seekable_compressed::{open, RandomAccess};

/// Every file of a corpus folder.
fn corpus(dir: &str) -> Vec<std::path::PathBuf> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(dir);
    let mut v: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

/// The tool-made seeds: named like `empty.xz`.  Inputs the fuzzer added
/// are named by their hash and need not be valid files.
fn files(dir: &str) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = corpus(dir)
        .into_iter()
        .filter(|p| p.extension().is_some())
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

/// `r` reads as what `TOOL -dc FILE` writes.
fn decodes_like_the_tool(r: &dyn RandomAccess, tool: &str, f: &Path) {
    let want = std::process::Command::new(tool)
        .args(["-dc"])
        .arg(f)
        .output()
        .unwrap()
        .stdout;
    assert_eq!(decode_all(r), want, "{}", f.display());
}

#[test]
fn xz_seeds_parse_and_decode() {
    for f in files("xz_index") {
        let bytes = std::fs::read(&f).unwrap();
        let idx = XzIndex::parse(&bytes).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let r = open(source(bytes.clone()), &opts()).unwrap();
        assert_eq!(r.size(), idx.uncompressed_size);
        decodes_like_the_tool(&*r, "xz", &f);
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
        decodes_like_the_tool(&*r, "zstd", &f);
    }
}

/// Whatever the fuzzer kept must still be handled without a panic.
#[test]
fn fuzzer_inputs_are_refused_or_read_without_panic() {
    for f in corpus("xz_index")
        .into_iter()
        .chain(corpus("zstd_seek_table"))
    {
        let bytes = std::fs::read(&f).unwrap();
        let _ = XzIndex::parse(&bytes);
        let _ = SeekTable::parse_file(&bytes);
        if let Ok(r) = open(source(bytes), &opts()) {
            let mut buf = vec![0u8; r.size().min(1 << 20) as usize];
            let _ = r.read_at(&mut buf, 0);
        }
    }
}

#[path = "../fuzz/fuzz_targets/image_common.rs"]
mod image_common;

/// The whole-image fuzz targets' seeds (images made by each format's own
/// tools) open, and every planned read matches the reference decoder.
#[test]
fn whole_image_seeds_read_like_the_reference() {
    for t in [
        "image_xz",
        "image_gzip",
        "image_zstd",
        "image_bzip2",
        "image_lzip",
        "image_qcow2",
    ] {
        let seeds = corpus(t);
        assert!(seeds.len() >= 2, "{t}: no seeds");
        for f in seeds {
            let data = std::fs::read(&f).unwrap();
            assert!(image_common::run(&data), "{}", f.display());
        }
    }
}

/// Inputs that once crashed a whole-image fuzz target (kept in
/// fuzz/regressions/TARGET/, outside the seed corpus because they need not
/// open): replayed through the target's own checks, which panic on any
/// disagreement with the reference decoder.
#[test]
fn fuzz_regressions_pass_the_targets_checks() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let mut replayed = 0;
    for target in std::fs::read_dir(&root).unwrap() {
        for f in std::fs::read_dir(target.unwrap().path()).unwrap() {
            let data = std::fs::read(f.unwrap().path()).unwrap();
            image_common::run(&data);
            replayed += 1;
        }
    }
    assert!(replayed >= 1);
}
