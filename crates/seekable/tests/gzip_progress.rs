//! Progress of the gzip index walk: `GzipReader::walk_progress` reaches
//! the whole compressed file, and `seekable-index build` reports it as
//! plain lines when its stderr is not a terminal.

mod common;

use std::io::Write;
use std::process::Command;

use common::*;
use seekable_compressed::gzip::{GzipOptions, GzipReader};

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

#[test]
fn walk_progress_ends_at_the_whole_file() {
    let data = image_like(8 << 20, 7);
    let gz = gzip(&data);
    let comp = gz.len() as u64;
    let r = GzipReader::open_with(
        source(gz),
        &opts(),
        &GzipOptions {
            persist: false,
            ..GzipOptions::default()
        },
    )
    .unwrap();
    let first = r.walk_progress();
    assert_eq!(first.compressed_total, comp);
    assert!(first.compressed_done <= comp);
    assert_eq!(r.wait_size().unwrap(), data.len() as u64);
    let p = r.walk_progress();
    assert!(p.done);
    assert_eq!(p.compressed_done, comp);
    assert_eq!(p.output_done, data.len() as u64);
}

#[test]
fn seekable_index_build_prints_plain_progress_lines_when_not_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img.gz");
    std::fs::write(&file, gzip(&image_like(8 << 20, 3))).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_seekable-index"))
        .arg("build")
        .arg(&file)
        .arg("--index")
        .arg(dir.path().join("disk.gzi"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    // No bar drawing (escape sequences, carriage returns) into a pipe.
    assert!(
        !stderr.contains('\x1b') && !stderr.contains('\r'),
        "{stderr:?}"
    );
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("indexed ") && last.contains(" compressed (100%)"),
        "{stderr}"
    );
    assert!(String::from_utf8(out.stdout)
        .unwrap()
        .contains("saved index to"));
}
