//! The `swab`, `tar` and `blocksize-policy` filters driven by real clients
//! (nbdcopy, nbdinfo, the libnbd Python bindings, qemu-io) through the real
//! binary, with bytes compared against a reference computation or the
//! system tools' output.
mod common;
use common::*;
use std::process::Command;

const K: u64 = 1024;
const M: u64 = 1024 * 1024;

/// Run a Python script (with the `nbd` module) with `args` as sys.argv[1:];
/// the script prints "OK" at the end, and everything it prints is returned.
fn python(script: &str, args: &[&str]) -> String {
    let out = stdout_of(Command::new(PYTHON).arg("-c").arg(script).args(args));
    assert!(
        out.trim_end().ends_with("OK"),
        "script did not finish: {out}"
    );
    out
}

/// The whole export, read with nbdcopy.
fn read_all(uri: &str) -> Vec<u8> {
    run_ok(Command::new("nbdcopy").arg(uri).arg("-")).stdout
}

/// Starting fails with exactly one line on stderr containing `why`.
fn start_fails(args: &[&str], why: &str) {
    let out = Command::new(binary())
        .arg("-f")
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} started");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(why), "{args:?}: expected {why:?} in {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
}

/// `data` with the bytes of every `w`-byte word reversed.
fn swapped(data: &[u8], w: usize) -> Vec<u8> {
    data.chunks(w)
        .flat_map(|c| c.iter().rev().copied().collect::<Vec<u8>>())
        .collect()
}

#[test]
fn swab_matches_a_reference_swap_for_each_width() {
    if !have("nbdcopy") || !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    // Not a multiple of 8: the export is rounded down to a whole word.
    make_file(&img, (M + 13) as usize, 21);
    let orig = std::fs::read(&img).unwrap();
    let p = img.to_str().unwrap();
    for (bits, w) in [("8", 1usize), ("16", 2), ("32", 4), ("64", 8)] {
        let arg = format!("swab-bits={bits}");
        let s = Server::start(&["-r", "--filter=swab", "file", p, &arg]);
        let whole = orig.len() / w * w;
        let got = read_all(&s.uri);
        assert_eq!(got.len(), whole, "bits {bits}: size");
        assert!(
            got == swapped(&orig[..whole], w),
            "bits {bits}: bytes differ"
        );
        let j = nbdinfo_json(&[], &s.uri);
        let want_min = if w == 1 { "1" } else { &w.to_string() };
        assert_eq!(j["block_size_minimum"], want_min, "bits {bits}: {j:?}");
    }
    // The default is 16 bits.
    let s = Server::start(&["-r", "--filter=swab", "file", p]);
    assert!(read_all(&s.uri) == swapped(&orig[..orig.len() - 1], 2));
    drop(s);
    start_fails(
        &["--filter=swab", "file", p, "swab-bits=24"],
        "swab-bits=24",
    );
}

#[test]
fn swab_writes_swap_on_the_way_down_and_refuses_unaligned_requests() {
    if !have_python_nbd() || !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    make_file(&img, M as usize, 5);
    let orig = std::fs::read(&img).unwrap();
    let p = img.to_str().unwrap();
    let s = Server::start(&["--filter=swab", "file", p, "swab-bits=32"]);
    python(
        r#"
import nbd, sys, errno
h = nbd.NBD()
h.connect_uri(sys.argv[1])
data = bytes(range(256)) * 16
h.pwrite(data, 8192)
assert h.pread(4096, 8192) == data
h.zero(4096, 65536)
assert h.pread(4096, 65536) == bytes(4096)
h.set_strict_mode(0)
for off, n in [(1, 4), (4, 2), (4098, 8)]:
    try:
        h.pread(n, off)
        raise SystemExit("unaligned read %d+%d succeeded" % (off, n))
    except nbd.Error as e:
        assert e.errnum == errno.EINVAL, e
try:
    h.pwrite(b"abc", 16)
    raise SystemExit("unaligned write succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EINVAL, e
# The connection is still usable.
assert h.pread(4096, 8192) == data
print("OK")
"#,
        &[&s.uri],
    );
    assert!(s.stop().success());
    let after = std::fs::read(&img).unwrap();
    let data: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    assert_eq!(&after[8192..12288], &swapped(&data, 4)[..]);
    assert!(after[65536..69632].iter().all(|&b| b == 0));
    assert_eq!(&after[..8192], &orig[..8192]);
    assert_eq!(&after[12288..65536], &orig[12288..65536]);
    assert_eq!(&after[69632..], &orig[69632..]);
}

#[test]
fn swab_passes_block_status_and_stacks_under_blocksize_for_byte_access() {
    if !have_python_nbd() || !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sparse = dir.path().join("sparse.img");
    let f = std::fs::File::create(&sparse).unwrap();
    f.set_len(4 * M).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &pseudo_random(64 * K as usize, 9), M).unwrap();
    drop(f);
    let p = sparse.to_str().unwrap();
    let s = Server::start(&["-r", "--filter=swab", "file", p, "swab-bits=64"]);
    assert_eq!(
        map_of(&s.uri),
        vec![
            (0, M, true),
            (M, 64 * K, false),
            (M + 64 * K, 3 * M - 64 * K, true)
        ]
    );
    drop(s);

    // blocksize above swab: a client writes single bytes, blocksize turns
    // them into read-modify-writes of whole 16-bit words for swab.
    let s = Server::start(&[
        "--filter=blocksize",
        "--filter=swab",
        "file",
        p,
        "minblock=2",
    ]);
    let j = nbdinfo_json(&[], &s.uri);
    assert_eq!(j["block_size_minimum"], "1", "{j:?}");
    python(
        r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(b"ABC", 7)
assert h.pread(5, 6) == b"\0ABC\0"
print("OK")
"#,
        &[&s.uri],
    );
    assert!(s.stop().success());
    let after = std::fs::read(&sparse).unwrap();
    // Client bytes 6..10 = 00 'A' 'B' 'C' 00 ... are stored pairwise swapped.
    assert_eq!(&after[6..10], b"A\0CB");
}

#[test]
fn data_filters_have_help_with_an_example() {
    for f in ["swab"] {
        let general = stdout_of(Command::new(binary()).arg("--help"));
        assert!(
            general.lines().any(|l| l.trim_start().starts_with(f)),
            "--help lists {f}"
        );
        let arg = format!("--filter={f}");
        let out = stdout_of(Command::new(binary()).args([&arg, "null", "--help"]));
        assert!(out.contains(&format!("{f} filter: ")), "{out}");
        assert!(out.contains("Example:"), "{f}: {out}");
        assert!(out.contains(&format!("--filter={f} ")), "{f}: {out}");
    }
}
