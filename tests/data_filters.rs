//! The `swab`, `tar` and `blocksize-policy` filters driven by real clients
//! (nbdcopy, nbdinfo, the libnbd Python bindings, qemu-io) through the real
//! binary, with bytes compared against a reference computation or the
//! system tools' output.
mod common;
use common::*;
use std::path::Path;
use std::process::Command;

const K: u64 = 1024;
const M: u64 = 1024 * 1024;

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
    let orig = make_file(&img, (M + 13) as usize, 21);
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
    start_fails_one_line(
        &["--filter=swab", "file", p, "swab-bits=24"],
        "swab-bits=24",
    );
}

#[test]
fn swab_writes_swap_on_the_way_down_and_refuses_unaligned_requests() {
    if !have_python_nbd() || !have("nbdinfo") {
        return;
    }
    let (_dir, img, orig) = temp_file("disk.img", M as usize, 5);
    let p = img.to_str().unwrap();
    let s = Server::start(&["--filter=swab", "file", p, "swab-bits=32"]);
    nbd_script(
        r#"
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
    sparse_file_with(&sparse, 4 * M, M, &pseudo_random(64 * K as usize, 9));
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
    nbd_script(
        r#"
h.pwrite(b"ABC", 7)
assert h.pread(5, 6) == b"\0ABC\0"
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
    for f in ["swab", "tar", "blocksize-policy"] {
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

/// A directory of files to archive: `disk.img` (odd size, random, with a
/// 1 MiB run of zeroes in the middle), a long-named file, a text file and
/// a subdirectory.  Returns the bytes of disk.img and of the long one.
fn tar_tree(root: &Path) -> (Vec<u8>, Vec<u8>, String) {
    let mut disk = pseudo_random((3 * M + 123) as usize, 31);
    disk[M as usize..2 * M as usize].fill(0);
    std::fs::write(root.join("disk.img"), &disk).unwrap();
    std::fs::write(root.join("a.txt"), b"hello\n").unwrap();
    let long_dir = format!("{}/{}", "d".repeat(90), "e".repeat(60));
    std::fs::create_dir_all(root.join(&long_dir)).unwrap();
    let long = format!("{long_dir}/nested-disk.img");
    let nested = pseudo_random(70_000, 32);
    std::fs::write(root.join(&long), &nested).unwrap();
    (disk, nested, long)
}

/// `tar ARGS` in `dir`.
fn gnu_tar(dir: &Path, args: &[&str]) {
    run_ok(Command::new("tar").current_dir(dir).args(args));
}

#[test]
fn tar_serves_entries_from_gnu_pax_and_ustar_archives() {
    if !have("tar") || !have("nbdcopy") || !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tree");
    std::fs::create_dir(&root).unwrap();
    let (disk, nested, long) = tar_tree(&root);
    let ar = dir.path().to_str().unwrap().to_string();
    for format in ["gnu", "pax", "ustar"] {
        let t = format!("{ar}/{format}.tar");
        let fmt = format!("--format={format}");
        gnu_tar(&root, &["-cf", &t, &fmt, "a.txt", &long, "disk.img"]);
        let s = Server::start(&["-r", "--filter=tar", "file", &t, "tar-entry=disk.img"]);
        assert!(read_all(&s.uri) == disk, "{format}: disk.img differs");
        let j = nbdinfo_json(&[], &s.uri);
        assert_eq!(j["export-size"], disk.len().to_string(), "{format}: {j:?}");
        assert_eq!(j["is_read_only"], "true");
        assert_eq!(j["block_size_minimum"], "1");
        drop(s);
        let e = format!("tar-entry={long}");
        let s = Server::start(&["-r", "--filter=tar", "file", &t, &e]);
        assert!(
            read_all(&s.uri) == nested,
            "{format}: long-named entry differs"
        );
    }
}

#[test]
fn tar_serves_from_compressed_tarballs() {
    if !have("tar") || !have("nbdcopy") || !have("xz") || !have("gzip") || !have("zstd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tree");
    std::fs::create_dir(&root).unwrap();
    let (disk, _, long) = tar_tree(&root);
    let t = dir.path().join("x.tar");
    let tp = t.to_str().unwrap();
    gnu_tar(&root, &["-cf", tp, "a.txt", &long, "disk.img"]);
    // xz in 256K blocks for random access; plain gzip and zstd.
    run_ok(Command::new("xz").args(["-k", "-T1", "--block-size=256KiB", tp]));
    run_ok(Command::new("gzip").args(["-k", tp]));
    run_ok(Command::new("zstd").args(["-q", "-k", tp]));
    for (filter, ext) in [("xz", "xz"), ("gzip", "gz"), ("zstd", "zst")] {
        let f = format!("--filter={filter}");
        let path = format!("{tp}.{ext}");
        let s = Server::start(&["--filter=tar", &f, "file", &path, "tar-entry=disk.img"]);
        assert!(read_all(&s.uri) == disk, "{filter}: disk.img differs");
        let j = nbdinfo_json(&[], &s.uri);
        assert_eq!(j["is_read_only"], "true", "{filter}: {j:?}");
        assert_eq!(j["export-size"], disk.len().to_string());
        if filter == "xz" {
            // The xz filter knows which decoded blocks are zero: the 1 MiB
            // run of zeroes in disk.img shows through as a hole.
            let map = map_of(&s.uri);
            assert!(
                map.iter()
                    .any(|&(o, l, hole)| hole && o >= M - 256 * K && o + l <= 2 * M + 256 * K),
                "{map:?}"
            );
            assert!(!map[0].2, "{map:?}");
        }
    }
}

#[test]
fn tar_reports_missing_entries_corrupt_headers_and_limits() {
    if !have("tar") || !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tree");
    std::fs::create_dir(&root).unwrap();
    let (_, _, long) = tar_tree(&root);
    std::fs::create_dir(root.join("sub")).unwrap();
    let t = dir.path().join("x.tar");
    let tp = t.to_str().unwrap();
    gnu_tar(&root, &["-cf", tp, "a.txt", &long, "disk.img", "sub"]);
    // Serving `archive` read-only with `params` fails, naming `why`.
    let tar_fails = |archive: &str, params: &[&str], why: &str| {
        open_fails(
            &[&["-r", "--filter=tar", "file", archive], params].concat(),
            why,
        )
    };
    tar_fails(
        tp,
        &["tar-entry=nope.img"],
        &format!("no entry 'nope.img' in archive {tp} (entries: a.txt, "),
    );
    tar_fails(tp, &["tar-entry=sub/"], "'sub/' is a directory");
    // disk.img's header comes after a.txt (1 K) and the long name's
    // entries: with a 2 K limit the search stops first.
    tar_fails(
        tp,
        &["tar-entry=disk.img", "tar-limit=2K"],
        "entry 'disk.img' was not found in the first 2048 bytes",
    );
    let s = Server::start(&[
        "-r",
        "--filter=tar",
        "file",
        tp,
        "tar-entry=disk.img",
        "tar-limit=1M",
    ]);
    assert_eq!(
        nbdinfo_json(&[], &s.uri)["export-size"],
        (3 * M + 123).to_string()
    );
    drop(s);

    // A corrupt header: the second entry's name changes, its checksum no
    // longer matches.
    let mut bytes = std::fs::read(&t).unwrap();
    bytes[1024] ^= 0x20;
    let bad = dir.path().join("bad.tar");
    std::fs::write(&bad, &bytes).unwrap();
    tar_fails(
        bad.to_str().unwrap(),
        &["tar-entry=disk.img"],
        "is not a valid tar archive (looking for 'disk.img', at offset 1024)",
    );
    // A truncated archive: the entry's data runs past the end.
    let cut = dir.path().join("cut.tar");
    std::fs::write(&cut, &std::fs::read(&t).unwrap()[..2 * M as usize]).unwrap();
    tar_fails(
        cut.to_str().unwrap(),
        &["tar-entry=disk.img"],
        "the archive is truncated",
    );
    // Random bytes are no archive; nothing panics.
    let junk = dir.path().join("junk.tar");
    make_file(&junk, 100_000, 77);
    tar_fails(
        junk.to_str().unwrap(),
        &["tar-entry=disk.img"],
        "is not a valid tar archive",
    );

    // GNU sparse entries, old GNU and pax formats.
    let sparse = root.join("sparse.img");
    sparse_file_with(&sparse, 4 * M, 2 * M, b"data");
    for format in ["gnu", "pax"] {
        let st = dir.path().join(format!("sparse-{format}.tar"));
        let fmt = format!("--format={format}");
        gnu_tar(
            &root,
            &["--sparse", &fmt, "-cf", st.to_str().unwrap(), "sparse.img"],
        );
        open_fails(
            &[
                "-r",
                "--filter=tar",
                "file",
                st.to_str().unwrap(),
                "tar-entry=sparse.img",
            ],
            "sparse file",
        );
    }
    start_fails_one_line(
        &["--filter=tar", "file", tp],
        "'tar-entry' parameter is required",
    );
    start_fails_one_line(
        &["--filter=tar", "file", tp, "tar-entry=a", "tar-limit=lots"],
        "tar filter: tar-limit=lots",
    );
}

#[test]
fn tar_writes_change_only_the_entry_and_block_status_shows_holes() {
    if !have("tar") || !have_python_nbd() || !have("nbdinfo") || !have("fallocate") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tree");
    std::fs::create_dir(&root).unwrap();
    let (disk, _, long) = tar_tree(&root);
    let t = dir.path().join("x.tar");
    let tp = t.to_str().unwrap();
    gnu_tar(&root, &["-cf", tp, "a.txt", "disk.img", &long]);
    // Make the archive file itself sparse where disk.img is zero.
    run_ok(Command::new("fallocate").args(["--dig-holes", tp]));
    let before = std::fs::read(&t).unwrap();
    let start = before
        .windows(disk.len().min(4096))
        .position(|w| w == &disk[..4096])
        .unwrap();

    let s = Server::start(&["--filter=tar", "file", tp, "tar-entry=disk.img"]);
    let map = map_of(&s.uri);
    assert!(!map[0].2, "{map:?}");
    assert!(
        map.iter()
            .any(|&(o, l, hole)| hole && o >= M && o + l <= 2 * M && l >= 512 * K),
        "the zero run is a hole: {map:?}"
    );
    let last = disk.len() - 1;
    nbd_script(
        r#"
size = h.get_size()
h.pwrite(b"\xee" * 1000, 0)
h.pwrite(b"\x77", size - 1)
h.zero(4096, 8192)
assert h.pread(1000, 0) == b"\xee" * 1000
"#,
        &[&s.uri],
    );
    assert!(s.stop().success());
    let after = std::fs::read(&t).unwrap();
    assert_eq!(after.len(), before.len());
    let mut want = before.clone();
    want[start..start + 1000].fill(0xee);
    want[start + 8192..start + 12288].fill(0); // zero(count, offset)
    want[start + last] = 0x77;
    assert!(after == want, "only the entry's bytes changed");
    // GNU tar agrees: the entry holds the new bytes, the others are intact.
    let out = run_ok(Command::new("tar").args(["-xOf", tp, "disk.img"])).stdout;
    assert_eq!(out.len(), disk.len());
    assert_eq!(&out[..1000], &[0xee; 1000][..]);
    assert!(out[8192..12288].iter().all(|&b| b == 0));
    assert_eq!(out[last], 0x77);
    assert_eq!(&out[16384..last], &disk[16384..last]);
    let a = run_ok(Command::new("tar").args(["-xOf", tp, "a.txt"])).stdout;
    assert_eq!(a, b"hello\n");
}

#[test]
fn blocksize_policy_advertises_sizes_and_applies_the_error_policy() {
    if !have_python_nbd() || !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let logarg = format!("logfile={}", log.display());
    let sizes = [
        "blocksize-minimum=512",
        "blocksize-preferred=64K",
        "blocksize-maximum=1M",
    ];
    let script = r#"
import nbd, sys, errno
h = nbd.NBD()
h.connect_uri(sys.argv[1])
policy = sys.argv[2]
h.pwrite(bytes(range(256)) * 8, 0)
h.set_strict_mode(0)
def attempt(f, *args):
    try:
        f(*args)
        return 0
    except nbd.Error as e:
        return e.errnum
for what, f, args in [("short read", h.pread, (1, 1)),
                      ("unaligned read", h.pread, (512, 3)),
                      ("oversized read", h.pread, (2 * 1024 * 1024, 0)),
                      ("unaligned write", h.pwrite, (b"x" * 512, 7)),
                      ("unaligned zero", h.zero, (100, 0))]:
    r = attempt(f, *args)
    want = errno.EINVAL if policy == "error" else 0
    assert r == want, (what, r)
# The connection lives on either way.
assert h.pread(512, 1024) == (bytes(range(256)) * 2)
print("OK")
"#;
    for policy in ["error", "allow"] {
        let p = format!("blocksize-error-policy={policy}");
        let s = Server::start(&[
            "--filter=blocksize-policy",
            "--filter=log",
            "memory",
            "4M",
            sizes[0],
            sizes[1],
            sizes[2],
            &p,
            &logarg,
        ]);
        let j = nbdinfo_json(&[], &s.uri);
        assert_eq!(j["block_size_minimum"], "512", "{j:?}");
        assert_eq!(j["block_size_preferred"], "65536");
        assert_eq!(j["block_size_maximum"], "1048576");
        python(script, &[&s.uri, policy]);
        assert!(s.stop().success());
        // Only with allow does the plugin see the bad requests.
        let log = without_ids(&std::fs::read_to_string(&log).unwrap());
        let unaligned = log.lines().any(|l| l.contains("Read offset=0x3 "));
        assert_eq!(unaligned, policy == "allow", "{log}");
    }

    // Block status is answered through it.
    let sparse = dir.path().join("sparse.img");
    sparse_file_with(&sparse, 2 * M, M, &pseudo_random(64 * K as usize, 2));
    let s = Server::start(&[
        "-r",
        "--filter=blocksize-policy",
        "file",
        sparse.to_str().unwrap(),
        "blocksize-minimum=4K",
        "blocksize-error-policy=error",
    ]);
    assert_eq!(
        map_of(&s.uri),
        vec![
            (0, M, true),
            (M, 64 * K, false),
            (M + 64 * K, M - 64 * K, true)
        ]
    );
    drop(s);

    start_fails_one_line(
        &[
            "--filter=blocksize-policy",
            "memory",
            "1M",
            "blocksize-minimum=3",
        ],
        "blocksize-minimum=3",
    );
    start_fails_one_line(
        &[
            "--filter=blocksize-policy",
            "memory",
            "1M",
            "blocksize-minimum=4K",
            "blocksize-maximum=6K",
        ],
        "blocksize-maximum=6144 is not a multiple of blocksize-minimum=4096",
    );
    start_fails_one_line(
        &[
            "--filter=blocksize-policy",
            "memory",
            "1M",
            "blocksize-error-policy=strict",
        ],
        "blocksize-error-policy=strict",
    );
}

/// nbdkit >= 1.44: `strict-error` is `error` without the exception for a
/// short request that ends at an unaligned end of the export.
#[test]
fn blocksize_policy_strict_error_refuses_the_unaligned_tail() {
    if !have_python_nbd() {
        return;
    }
    // 1M + 100 bytes: the last 100 are a partial 512-byte block.
    let size = (M + 100).to_string();
    let script = r#"
import nbd, sys, errno
h = nbd.NBD()
h.connect_uri(sys.argv[1])
policy = sys.argv[2]
tail = 1024 * 1024
assert h.get_size() == tail + 100
assert h.get_block_size(nbd.SIZE_MINIMUM) == 512
h.pwrite(b"w" * 512, tail - 512)
# libnbd would refuse the short requests itself.
h.set_strict_mode(0)
def attempt(f, *args):
    try:
        f(*args)
        return 0
    except nbd.Error as e:
        return e.errnum
want = errno.EINVAL if policy == "strict-error" else 0
for what, f, args in [("tail read", h.pread, (100, tail)),
                      ("tail write", h.pwrite, (b"t" * 100, tail)),
                      ("tail zero", h.zero, (100, tail)),
                      ("tail trim", h.trim, (100, tail))]:
    r = attempt(f, *args)
    assert r == want, (what, r)
# Under both: a short request that stops before the end, or an unaligned
# offset, is refused; whole blocks before the tail are served.
assert attempt(h.pread, 50, tail) == errno.EINVAL
assert attempt(h.pread, 99, tail + 1) == errno.EINVAL
assert h.pread(512, tail - 512) == b"w" * 512
print("OK")
"#;
    for policy in ["error", "strict-error"] {
        let p = format!("blocksize-error-policy={policy}");
        let s = Server::start(&[
            "--filter=blocksize-policy",
            "memory",
            &size,
            "blocksize-minimum=512",
            &p,
        ]);
        python(script, &[&s.uri, policy]);
    }
}

#[test]
fn blocksize_policy_write_disconnect_drops_the_connection() {
    if !have_python_nbd() {
        return;
    }
    let script = r#"
import nbd, sys, errno
h = nbd.NBD()
if sys.argv[1] == "stdio":
    # -s: the server talks over stdin/stdout (the async transmission path).
    h.connect_command(sys.argv[2:])
else:
    h.connect_uri(sys.argv[1])
h.pwrite(b"a" * 65536, 0)
try:
    h.pwrite(b"b" * (65536 + 512), 0)
    raise SystemExit("oversized write succeeded")
except nbd.Error as e:
    # The server closed the connection instead of replying.
    assert e.errnum == errno.ENOTCONN, e
try:
    h.pread(512, 0)
    raise SystemExit("connection still open")
except nbd.Error as e:
    print("read failed:", e)
print("OK")
"#;
    let args = [
        "--filter=blocksize-policy",
        "memory",
        "1M",
        "blocksize-write-disconnect=64K",
    ];
    let s = Server::start(&args);
    python(script, &[&s.uri]);
    assert!(s.log().contains("closing the connection"), "{}", s.log());
    // The server goes on serving other clients.
    nbd_script(
        r#"
assert h.pread(4, 0) == b"aaaa"
"#,
        &[&s.uri],
    );
    drop(s);
    let bin = binary();
    let mut stdio = vec!["stdio", bin.to_str().unwrap(), "-s"];
    stdio.extend(args);
    python(script, &stdio);
}

#[test]
fn blocksize_policy_over_blocksize_gives_rmw_to_bad_clients() {
    if !have_python_nbd() || !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let logarg = format!("logfile={}", log.display());
    let s = Server::start(&[
        "--filter=blocksize-policy",
        "--filter=blocksize",
        "--filter=log",
        "memory",
        "1M",
        "blocksize-error-policy=allow",
        "blocksize-minimum=64K",
        "minblock=64K",
        &logarg,
    ]);
    let j = nbdinfo_json(&[], &s.uri);
    assert_eq!(j["block_size_minimum"], "65536", "{j:?}");
    nbd_script(
        r#"
h.set_strict_mode(0)
h.pwrite(b"xyz", 70000)
assert h.pread(5, 69999) == b"\0xyz\0"
h.pwrite(b"q" * 65536, 65536)
assert h.pread(65536, 65536) == b"q" * 65536
"#,
        &[&s.uri],
    );
    assert!(s.stop().success());
    let log = std::fs::read_to_string(&log).unwrap();
    let mut seen = 0;
    for line in log.lines() {
        if let (Some(off), Some(n)) = (log_field(line, "offset="), log_field(line, "count=")) {
            seen += 1;
            assert_eq!(off % 65536, 0, "unaligned offset: {line}");
            assert_eq!(n % 65536, 0, "unaligned count: {line}");
        }
    }
    assert!(seen >= 4, "{log}");
}

#[test]
fn blocksize_policy_emulates_zero_below_its_maximum_check() {
    if !have_python_nbd() {
        return;
    }
    // nozero makes the plugin's zero emulated: the 1 MiB writes that
    // emulate it must not be judged against the 64K maximum.
    let s = Server::start(&[
        "--filter=blocksize-policy",
        "--filter=nozero",
        "memory",
        "4M",
        "zeromode=emulate",
        "blocksize-maximum=64K",
        "blocksize-error-policy=error",
    ]);
    nbd_script(
        r#"
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 65536
h.pwrite(b"z" * 65536, 0)
h.pwrite(b"z" * 65536, 3 * 1024 * 1024)
h.zero(3 * 1024 * 1024, 0)
assert h.pread(65536, 0) == bytes(65536)
assert h.pread(65536, 3 * 1024 * 1024) == b"z" * 65536
h.set_strict_mode(0)
try:
    h.pwrite(b"z" * 131072, 0)
    raise SystemExit("oversized write succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EINVAL, e
"#,
        &[&s.uri],
    );
}
