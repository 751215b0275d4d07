//! The example programs in examples/ build and serve what they promise.
mod common;
use common::*;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Examples are built by `cargo test` next to the test binaries.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: plain `cargo test` builds the examples (`--test examples` alone does not)",
        path.display()
    );
    path
}

/// Run `EXAMPLE -U - ARGS --run 'nbdsh ...'` and return its stdout.
fn captive(name: &str, args: &[&str], script: &str) -> String {
    let out = Command::new(example(name))
        .args(["-U", "-"])
        .args(args)
        .arg("--run")
        .arg(format!(
            "{NBDSH} --base-allocation -u \"$uri\" -c '{script}'"
        ))
        .stderr(Stdio::inherit())
        .output()
        .expect("run example");
    assert!(out.status.success(), "{name}: {}", out.status);
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn constant_plugin_serves_its_byte() {
    if !have("nbdsh") {
        return;
    }
    let out = captive(
        "constant",
        &["constant", "size=1M", "byte=42"],
        "print(h.get_size(), list(h.pread(3, 1000)))",
    );
    assert_eq!(out.trim(), "1048576 [42, 42, 42]");
}

#[test]
fn blockmap_plugin_keeps_writes_and_emulates_zero() {
    if !have("nbdsh") {
        return;
    }
    let out = captive(
        "blockmap",
        &["blockmap", "64K"],
        "h.pwrite(b\"abcdef\", 4094); h.zero(2, 4095); print(bytes(h.pread(8, 4094)))",
    );
    // Bytes 4095 and 4096 were zeroed across the block boundary.
    assert_eq!(out.trim(), "b'a\\x00\\x00def\\x00\\x00'");
}

#[test]
fn xor_filter_over_a_builtin_plugin() {
    if !have("nbdsh") {
        return;
    }
    let out = captive(
        "xor",
        &["--filter=xor", "pattern", "size=1M", "key=0xff"],
        "print(list(h.pread(8, 8)))",
    );
    // The pattern plugin stores 8 as a big-endian u64 at offset 8.
    assert_eq!(out.trim(), "[255, 255, 255, 255, 255, 255, 255, 247]");
}

#[test]
fn sectors_plugin_labels_sectors_and_reports_extents() {
    if !have("nbdsh") {
        return;
    }
    let out = captive(
        "sectors",
        &["sectors", "size=4K"],
        "print(bytes(h.pread(9, 1024)).decode().strip()); \
         e = []; h.block_status(2048, 0, lambda m, o, entries, err: e.extend(entries)); print(e[:4])",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "sector 2");
    assert_eq!(lines[1], "[32, 0, 480, 2]");
}
