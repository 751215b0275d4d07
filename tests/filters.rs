//! The built-in filters driven by real clients (nbdcopy, nbdinfo, nbdsh,
//! qemu-io, the libnbd Python bindings) through the real binary, with the
//! bytes compared against what the filter should have produced.
mod common;
use common::*;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

const K: u64 = 1024;
const M: u64 = 1024 * 1024;

/// Feed `script` to a partitioning tool on stdin.
fn partition_with(cmd: &mut Command, script: &str) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("partitioning tool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {out:?}");
}

/// An 8 MiB image of random bytes with a table written by `sfdisk`.
fn sfdisk_image(path: &Path, script: &str) -> Vec<u8> {
    make_file(path, 8 * M as usize, 7);
    partition_with(Command::new("sfdisk").arg("-q").arg(path), script);
    std::fs::read(path).unwrap()
}

/// Serve partition `n` of `img` read-only and check it is `want`.
fn check_partition(img: &Path, n: u32, want: &[u8]) {
    let arg = format!("partition={n}");
    let s = Server::start(&[
        "-r",
        "--filter=partition",
        "file",
        img.to_str().unwrap(),
        &arg,
    ]);
    let got = read_all(&s.uri);
    assert_eq!(got.len(), want.len(), "partition {n} size");
    assert!(got == want, "partition {n} contents differ");
}

fn slice(v: &[u8], offset: u64, len: u64) -> &[u8] {
    &v[offset as usize..(offset + len) as usize]
}

#[test]
fn partition_mbr_primary_and_logical() {
    if !have("sfdisk") || !have("nbdcopy") || !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("mbr.img");
    let disk = sfdisk_image(
        &img,
        "label: dos\n\
         start=2048, size=2048, type=83\n\
         start=4096, size=8192, type=5\n\
         start=6144, size=2048, type=83\n\
         start=10240, size=1024, type=83\n",
    );
    check_partition(&img, 1, slice(&disk, 2048 * 512, 2048 * 512));
    check_partition(&img, 5, slice(&disk, 6144 * 512, 2048 * 512));
    check_partition(&img, 6, slice(&disk, 10240 * 512, 1024 * 512));
    let p = img.to_str().unwrap();
    open_fails(
        &["-r", "--filter=partition", "file", p, "partition=3"],
        "MBR partition 3 not found",
    );
    open_fails(
        &["-r", "--filter=partition", "file", p, "partition=7"],
        "the disk has 2 logical partitions",
    );
    start_fails_one_line(
        &["--filter=partition", "file", p, "partition=0"],
        "partition=0: expected a partition number from 1",
    );
    start_fails_one_line(
        &["--filter=partition", "file", p],
        "'partition' parameter is required",
    );
}

#[test]
fn partition_gpt_512_and_4096_byte_sectors() {
    if !have("sfdisk") || !have("fdisk") || !have("nbdcopy") || !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("gpt.img");
    let disk = sfdisk_image(
        &img,
        "label: gpt\nstart=2048, size=2048\nstart=4096, size=6144\n",
    );
    check_partition(&img, 1, slice(&disk, 2048 * 512, 2048 * 512));
    check_partition(&img, 2, slice(&disk, 4096 * 512, 6144 * 512));
    let p = img.to_str().unwrap();
    open_fails(
        &["-r", "--filter=partition", "file", p, "partition=3"],
        "GPT partition 3 not found",
    );

    // fdisk can write a GPT for 4096-byte sectors (sfdisk 2.38 cannot).
    let img4k = dir.path().join("gpt4k.img");
    make_file(&img4k, 8 * M as usize, 8);
    partition_with(
        Command::new("fdisk").arg("-b").arg("4096").arg(&img4k),
        "g\nn\n1\n256\n767\nn\n2\n1024\n1535\nw\n",
    );
    let disk4k = std::fs::read(&img4k).unwrap();
    check_partition(&img4k, 1, slice(&disk4k, 256 * 4096, 512 * 4096));
    check_partition(&img4k, 2, slice(&disk4k, 1024 * 4096, 512 * 4096));

    // A corrupt header is refused, not guessed around.
    let mut bad = disk.clone();
    bad[512 + 40] ^= 0xff;
    let badp = dir.path().join("bad.img");
    std::fs::write(&badp, &bad).unwrap();
    open_fails(
        &[
            "-r",
            "--filter=partition",
            "file",
            badp.to_str().unwrap(),
            "partition=1",
        ],
        "GPT header CRC mismatch",
    );
}

#[test]
fn partition_writes_stay_inside_the_partition() {
    if !have_python_nbd() || !have("sfdisk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("mbr.img");
    let before = sfdisk_image(&img, "label: dos\nstart=2048, size=2048, type=83\n");
    let s = Server::start(&[
        "--filter=partition",
        "file",
        img.to_str().unwrap(),
        "partition=1",
    ]);
    nbd_script(
        r#"
assert h.get_size() == 1024 * 1024
h.pwrite(b"\xaa" * 4096, 0)
h.pwrite(b"\xbb" * 4096, 1024 * 1024 - 4096)
h.set_strict_mode(0)
try:
    h.pwrite(b"x", 1024 * 1024)
    raise SystemExit("write past the partition succeeded")
except nbd.Error as e:
    assert e.errnum == errno.ENOSPC, e
"#,
        &[&s.uri],
    );
    assert!(s.stop().success());
    let after = std::fs::read(&img).unwrap();
    let (p, end) = (2048 * 512usize, 4096 * 512usize);
    assert_eq!(&after[..p], &before[..p], "bytes before the partition");
    assert_eq!(&after[end..], &before[end..], "bytes after the partition");
    assert!(after[p..p + 4096].iter().all(|&b| b == 0xaa));
    assert!(after[end - 4096..end].iter().all(|&b| b == 0xbb));
}

#[test]
fn offset_shifts_reads_writes_and_block_status() {
    if !have("nbdcopy") || !have("nbdinfo") || !have_python_nbd() {
        return;
    }
    let (dir, img, orig) = temp_file("f.img", 2 * M as usize, 3);
    let p = img.to_str().unwrap();
    let s = Server::start(&["--filter=offset", "file", p, "offset=64K", "range=1M"]);
    assert_eq!(read_all(&s.uri), slice(&orig, 64 * K, M));
    nbd_script(
        r#"
assert h.get_size() == 1024 * 1024
h.pwrite(b"\x5a" * 512, 0)
h.set_strict_mode(0)
try:
    h.pread(1, 1024 * 1024)
    raise SystemExit("read past the range succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EINVAL, e
"#,
        &[&s.uri],
    );
    drop(s);
    let after = std::fs::read(&img).unwrap();
    assert!(after[64 * 1024..64 * 1024 + 512].iter().all(|&b| b == 0x5a));
    assert_eq!(&after[..64 * 1024], &orig[..64 * 1024]);
    assert_eq!(&after[64 * 1024 + 512..], &orig[64 * 1024 + 512..]);

    // Block status is shifted too: a sparse file with data at 1M..1M+64K.
    let sparse = dir.path().join("sparse.img");
    sparse_file_with(&sparse, 4 * M, M, &pseudo_random(64 * K as usize, 4));
    let sp = sparse.to_str().unwrap();
    let s = Server::start(&[
        "-r",
        "--filter=offset",
        "file",
        sp,
        "offset=512K",
        "range=2M",
    ]);
    assert_eq!(
        map_of(&s.uri),
        vec![
            (0, 512 * K, true),
            (512 * K, 64 * K, false),
            (576 * K, 2 * M - 576 * K, true)
        ]
    );
    drop(s);
    open_fails(
        &["-r", "--filter=offset", "file", sp, "offset=3M", "range=2M"],
        "is beyond the end of the plugin",
    );
    start_fails_one_line(
        &["--filter=offset", "file", sp, "offset=lots"],
        "offset filter: offset=lots",
    );
}

#[test]
fn truncate_grows_with_zeroes_and_rounds() {
    if !have("nbdinfo") || !have_python_nbd() {
        return;
    }
    let (_dir, img, orig) = temp_file("odd.img", M as usize + 100, 5);
    let p = img.to_str().unwrap();
    let s = Server::start(&["--filter=truncate", "file", p, "truncate=2M"]);
    nbd_script(
        r#"
real = 1024 * 1024 + 100
assert h.get_size() == 2 * 1024 * 1024
assert h.pread(real + 1000, 0)[real:] == bytes(1000)
h.pwrite(bytes(4096), real - 96)          # zeroes beyond the end: fine
try:
    h.pwrite(b"\x01" * 4096, 1536 * 1024)
    raise SystemExit("non-zero write beyond the plugin succeeded")
except nbd.Error as e:
    assert e.errnum == errno.ENOSPC, e
# libnbd takes (count, offset): both cross the plugin's end.
h.zero(real + 1000 - 65536, 65536)
h.trim(2 * 1024 * 1024 - 4096, 4096)
"#,
        &[&s.uri],
    );
    let map = map_of(&s.uri);
    let last = map.last().unwrap();
    assert!(last.2 && last.0 <= M + 100, "tail is a hole: {map:?}");
    drop(s);
    let after = std::fs::read(&img).unwrap();
    assert_eq!(after.len(), orig.len(), "the file keeps its size");
    assert!(after[4096..].iter().all(|&b| b == 0));

    for (arg, size) in [("round-up=4096", "1052672"), ("round-down=4096", "1048576")] {
        let s = Server::start(&["-r", "--filter=truncate", "file", p, arg]);
        assert_eq!(nbdinfo_json(&[], &s.uri)["export-size"], size, "{arg}");
    }
    start_fails_one_line(
        &["--filter=truncate", "file", p, "round-up=1000"],
        "round-up=1000: must be a power of two",
    );
    // truncate= with round-down= combine (nbdkit's order): see
    // tests/compat_filters.rs.
    start_fails_one_line(
        &["--filter=truncate", "file", p, "round-down=0"],
        "round-down=0",
    );
}

fn sha(path: &Path) -> String {
    stdout_of(Command::new("sha256sum").arg(path))
}

#[test]
fn cow_makes_a_read_only_file_writable_without_touching_it() {
    if !have("qemu-io") || !have("nbdinfo") {
        return;
    }
    let (_dir, img, _) = temp_file("base.img", 4 * M as usize, 11);
    let mut perms = std::fs::metadata(&img).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o444);
    std::fs::set_permissions(&img, perms).unwrap();
    let before = sha(&img);
    let orig = std::fs::read(&img).unwrap();

    let s = Server::start(&[
        "--filter=cow",
        "file",
        img.to_str().unwrap(),
        "cow-block-size=4K",
    ]);
    let j = nbdinfo_json(&[], &s.uri);
    assert_eq!(j["is_read_only"], "false", "{j:?}");
    assert_eq!(j["can_zero"], "true", "{j:?}");
    let out = qemu_io_ok(
        &s.uri,
        &[
            "write -P 0x11 1000 10000",
            "write -z 64k 128k",
            "discard 1M 64k",
            "read -P 0x11 1000 10000",
            "read -P 0 64k 128k",
            "read -P 0 1M 64k",
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(out.matches("read ").count(), 3, "{out}");

    // Everything not written still reads as the base.
    let now = read_all(&s.uri);
    assert_eq!(now[..1000], orig[..1000]);
    assert_eq!(now[11000..64 * 1024], orig[11000..64 * 1024]);
    assert_eq!(now[192 * 1024..M as usize], orig[192 * 1024..M as usize]);
    assert_eq!(now[(M + 64 * K) as usize..], orig[(M + 64 * K) as usize..]);
    // Zeroed blocks are holes; the rest is data.
    let map = map_of(&s.uri);
    assert!(map.contains(&(64 * K, 128 * K, true)), "{map:?}");
    assert!(map.contains(&(M, 64 * K, true)), "{map:?}");
    assert!(s.stop().success());
    assert_eq!(sha(&img), before, "the base file was modified");
}

#[test]
fn cow_over_a_read_only_plugin_shared_by_connections() {
    if !have_python_nbd() {
        return;
    }
    let s = Server::start(&["--filter=cow", "pattern", "size=1M"]);
    python(
        r#"
import nbd, sys, struct
a = nbd.NBD(); a.connect_uri(sys.argv[1])
b = nbd.NBD(); b.connect_uri(sys.argv[1])
assert not a.is_read_only() and a.can_multi_conn()
a.pwrite(b"hello", 8 * 100 + 3)
a.flush()
got = b.pread(16, 8 * 100)
want = struct.pack(">Q", 800)[:3] + b"hello" + struct.pack(">Q", 808)
assert got == want, (got, want)
# The pattern is intact elsewhere.
assert b.pread(8, 8 * 5000) == struct.pack(">Q", 40000)
print("OK")
"#,
        &[&s.uri],
    );
    start_fails_one_line(
        &["--filter=cow", "pattern", "size=1M", "cow-block-size=1000"],
        "cow-block-size=1000: must be a power of two",
    );
}

#[test]
fn cow_over_partition_stack() {
    if !have_python_nbd() || !have("sfdisk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("mbr.img");
    let disk = sfdisk_image(&img, "label: dos\nstart=2048, size=4096, type=83\n");
    let before = sha(&img);
    let s = Server::start(&[
        "--filter=cow",
        "--filter=partition",
        "file",
        img.to_str().unwrap(),
        "partition=1",
    ]);
    let part = slice(&disk, 2048 * 512, 4096 * 512);
    let out = nbd_script(
        r#"
import hashlib
assert h.get_size() == 4096 * 512
h.pwrite(b"\x77" * 70000, 5000)
h.zero(65536, 1024 * 1024)   # (count, offset)
data = h.pread(h.get_size(), 0)
print(hashlib.sha256(data).hexdigest())
"#,
        &[&s.uri],
    );
    let mut want = part.to_vec();
    want[5000..75000].fill(0x77);
    want[M as usize..(M + 64 * K) as usize].fill(0);
    let digest = stdout_of(
        Command::new(PYTHON)
            .arg("-c")
            .arg("import sys,hashlib; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())")
            .stdin(
                std::fs::File::open({
                    let p = dir.path().join("want");
                    std::fs::write(&p, &want).unwrap();
                    p
                })
                .unwrap(),
            ),
    );
    assert_eq!(out.lines().next().unwrap(), digest.trim());
    assert!(s.stop().success());
    assert_eq!(sha(&img), before, "the disk image was modified");
}

/// `nbdinfo --json` flags of a memory disk behind `filters` with `params`.
fn flags_through(filters: &[&str], params: &[&str]) -> HashMap<String, String> {
    let mut args: Vec<&str> = filters.to_vec();
    args.extend(["memory", "size=1M"]);
    args.extend(params);
    let s = Server::start(&args);
    nbdinfo_json(&[], &s.uri)
}

/// Run qemu-io commands against a memory disk behind `--filter=F
/// --filter=log` and return the log lines.
fn logged_qemu_io(filter: &str, params: &[&str], cmds: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let logarg = format!("logfile={}", log.display());
    let mut args = vec![filter, "--filter=log", "memory", "size=1M", &logarg];
    args.extend(params);
    let s = Server::start(&args);
    let mut q = Command::new("qemu-io");
    q.args(["-t", "writeback", "-f", "raw"]);
    for c in cmds {
        q.arg("-c").arg(c);
    }
    let out = stdout_of(q.arg(&s.uri));
    assert!(!out.contains("error"), "{out}");
    assert!(s.stop().success());
    without_ids(&std::fs::read_to_string(&log).unwrap())
}

#[test]
fn nozero_modes() {
    if !have("nbdinfo") || !have("qemu-io") {
        return;
    }
    let j = flags_through(&["--filter=nozero"], &[]);
    assert_eq!(
        (j["can_zero"].as_str(), j["can_fast_zero"].as_str()),
        ("false", "false")
    );
    let j = flags_through(&["--filter=nozero"], &["zeromode=plugin"]);
    assert_eq!(
        (j["can_zero"].as_str(), j["can_fast_zero"].as_str()),
        ("true", "true")
    );
    let j = flags_through(
        &["--filter=nozero"],
        &["zeromode=emulate", "fastzeromode=none"],
    );
    assert_eq!(
        (j["can_zero"].as_str(), j["can_fast_zero"].as_str()),
        ("true", "false")
    );

    // Emulated zeroes reach the plugin as writes; notrim drops may-trim.
    let log = logged_qemu_io(
        "--filter=nozero",
        &["zeromode=emulate"],
        &["write -z -u 0 64k"],
    );
    assert!(log.contains("Write offset=0x0 count=0x10000"), "{log}");
    assert!(!log.contains("Zero "), "{log}");
    let log = logged_qemu_io(
        "--filter=nozero",
        &["zeromode=notrim"],
        &["write -z -u 0 64k"],
    );
    assert!(
        log.contains("Zero offset=0x0 count=0x10000 trim=0"),
        "{log}"
    );
    start_fails_one_line(
        &["--filter=nozero", "memory", "1M", "zeromode=sometimes"],
        "zeromode=sometimes: expected one of none, emulate, notrim, plugin",
    );
}

#[test]
fn noextents_reports_all_data() {
    if !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sparse = dir.path().join("sparse.img");
    sparse_file(&sparse, 4 * M);
    let p = sparse.to_str().unwrap();
    let s = Server::start(&["-r", "file", p]);
    assert_eq!(map_of(&s.uri), vec![(0, 4 * M, true)]);
    drop(s);
    let s = Server::start(&["-r", "--filter=noextents", "file", p]);
    assert_eq!(map_of(&s.uri), vec![(0, 4 * M, false)]);
}

#[test]
fn nocache_modes() {
    if !have("nbdinfo") || !have("qemu-io") {
        return;
    }
    assert_eq!(
        flags_through(&["--filter=nocache"], &[])["can_cache"],
        "false"
    );
    for mode in ["cachemode=emulate", "cachemode=nop"] {
        assert_eq!(
            flags_through(&["--filter=nocache"], &[mode])["can_cache"],
            "true",
            "{mode}"
        );
    }
    // nop: the cache request never reaches the plugin.
    let log = logged_qemu_io("--filter=nocache", &["cachemode=nop"], &["read 0 4k"]);
    assert!(!log.contains("Cache "), "{log}");
}

#[test]
fn fua_modes() {
    if !have("nbdinfo") || !have("qemu-io") {
        return;
    }
    assert_eq!(
        flags_through(&["--filter=fua"], &["fuamode=none"])["can_fua"],
        "false"
    );
    // nbdkit's default is none.
    assert_eq!(flags_through(&["--filter=fua"], &[])["can_fua"], "false");
    assert_eq!(
        flags_through(&["--filter=fua"], &["fuamode=emulate"])["can_fua"],
        "true"
    );
    // force: even a plain write goes down with FUA (memory has native FUA).
    let log = logged_qemu_io("--filter=fua", &["fuamode=force"], &["write 0 4k"]);
    assert!(log.contains("Write offset=0x0 count=0x1000 fua=1"), "{log}");
    // emulate: a FUA write becomes a write and a flush.
    let log = logged_qemu_io("--filter=fua", &["fuamode=emulate"], &["write -f 0 4k"]);
    assert!(log.contains("Write offset=0x0 count=0x1000 fua=0"), "{log}");
    assert!(log.contains("Flush"), "{log}");
    // discard: neither reaches the plugin.
    let log = logged_qemu_io(
        "--filter=fua",
        &["fuamode=discard"],
        &["write -f 0 4k", "flush"],
    );
    assert!(log.contains("fua=0"), "{log}");
    assert!(!log.contains("Flush"), "{log}");
    start_fails_one_line(
        &["--filter=fua", "memory", "1M", "fuamode=always"],
        "fuamode=always: expected one of",
    );
}

#[test]
fn protect_refuses_changes_to_protected_bytes() {
    if !have_python_nbd() || !have("nbdinfo") {
        return;
    }
    let (_dir, img, orig) = temp_file("disk.img", M as usize, 9);
    let p = img.to_str().unwrap();
    let s = Server::start(&[
        "--filter=protect",
        "file",
        p,
        "protect=0-511",
        "protect=64K-",
    ]);
    assert_eq!(nbdinfo_json(&[], &s.uri)["can_trim"], "true");
    nbd_script(
        r#"
def refused(what, call):
    try:
        call()
        raise SystemExit(what + " succeeded")
    except nbd.Error as e:
        assert e.errnum == errno.EPERM, (what, e)
refused("write over the boot sector", lambda: h.pwrite(b"x" * 512, 0))
refused("write across the end", lambda: h.pwrite(b"x" * 1024, 65536 - 512))
refused("trim", lambda: h.trim(4096, 65536 - 2048))
refused("zero", lambda: h.zero(512, 100))
# Rewriting what is there is not a change.
h.pwrite(h.pread(1024, 0), 0)
h.pwrite(b"y" * 4096, 4096)
"#,
        &[&s.uri],
    );
    drop(s);
    let after = std::fs::read(&img).unwrap();
    assert_eq!(after[..4096], orig[..4096]);
    assert!(after[4096..8192].iter().all(|&b| b == b'y'));
    assert_eq!(after[8192..], orig[8192..]);
    start_fails_one_line(
        &["--filter=protect", "file", p, "protect=10-5"],
        "protect=10-5: start 10 is after end 5",
    );
}

#[test]
fn noparallel_sets_the_thread_model() {
    if !have("nbdinfo") {
        return;
    }
    for (mode, model) in [
        ("serialize=connections", "serialize_connections"),
        ("serialize=all-requests", "serialize_all_requests"),
        ("serialize=requests", "serialize_requests"),
    ] {
        let got = thread_model_of(&["--filter=noparallel", "memory", "1M", mode]);
        assert_eq!(got, model, "{mode}");
    }
}

/// `dir/stats.txt` and the `statsfile=` parameter naming it.
fn stats_file(dir: &Path) -> (std::path::PathBuf, String) {
    let stats = dir.join("stats.txt");
    let arg = format!("statsfile={}", stats.display());
    (stats, arg)
}

/// Parse a stats file into op -> (ops, errors, bytes).
fn stats_of(path: &Path) -> HashMap<String, (u64, u64, u64)> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = HashMap::new();
    for line in text.lines() {
        // "write: 3 ops, 0 errors, 12288 bytes, 0.000123 s"
        let Some((op, rest)) = line.split_once(": ") else {
            continue;
        };
        let nums: Vec<u64> = rest
            .split(", ")
            .filter_map(|f| f.split_whitespace().next()?.parse().ok())
            .collect();
        if nums.len() >= 3 && rest.contains(" ops") {
            out.insert(op.to_string(), (nums[0], nums[1], nums[2]));
        }
    }
    assert!(text.contains("elapsed time: "), "{text}");
    out
}

#[test]
fn stats_counts_requests_and_bytes() {
    if !have_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (stats, arg) = stats_file(dir.path());
    let s = Server::start(&["--filter=stats", "memory", "size=1M", &arg]);
    nbd_script(
        r#"
for i in range(3):
    h.pwrite(b"x" * 4096, i * 4096)
assert h.pread(512, 0) == b"x" * 512
assert h.pread(512, 4096) == b"x" * 512
h.flush()
h.zero(8192, 65536)
"#,
        &[&s.uri],
    );
    assert!(s.stop().success());
    let st = stats_of(&stats);
    assert_eq!(st["write"], (3, 0, 12288), "{st:?}");
    assert_eq!(st["read"], (2, 0, 1024), "{st:?}");
    assert_eq!(st["flush"], (1, 0, 0), "{st:?}");
    assert_eq!(st["zero"], (1, 0, 8192), "{st:?}");
}

#[test]
fn error_injection_follows_the_trigger_file() {
    if !have_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let trigger = dir.path().join("fail-now");
    let stats = dir.path().join("stats.txt");
    let farg = format!("error-file={}", trigger.display());
    let sarg = format!("statsfile={}", stats.display());
    let s = Server::start(&[
        "--filter=error",
        "--filter=stats",
        "memory",
        "size=1M",
        "error=ENOSPC",
        "error-pwrite-rate=100%",
        &farg,
        &sarg,
    ]);
    nbd_script(
        r#"
import os
trigger = sys.argv[2]
h.pwrite(b"a" * 512, 0)
open(trigger, "w").close()
try:
    h.pwrite(b"b" * 512, 0)
    raise SystemExit("write succeeded while the trigger file existed")
except nbd.Error as e:
    assert e.errnum == errno.ENOSPC, e
assert h.pread(512, 0) == b"a" * 512     # reads are not affected
os.unlink(trigger)
h.pwrite(b"c" * 512, 0)
assert h.pread(512, 0) == b"c" * 512
"#,
        &[&s.uri, trigger.to_str().unwrap()],
    );
    assert!(s.stop().success());
    // The failed write never reached the layer below.
    assert_eq!(stats_of(&stats)["write"], (2, 0, 1024));
    start_fails_one_line(
        &["--filter=error", "memory", "1M", "error-rate=200%"],
        "error-rate=200%: the rate must be between 0 and 1",
    );
}

#[test]
fn delay_keeps_data_correct() {
    if !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (stats, sarg) = stats_file(dir.path());
    let s = Server::start(&[
        "--filter=delay",
        "--filter=stats",
        "memory",
        "size=1M",
        "rdelay=1ms",
        "delay-write=0.001",
        "delay-open=1ms",
        "delay-close=1ms",
        &sarg,
    ]);
    let out = qemu_io_ok(&s.uri, &["write -P 0x42 0 64k", "read -P 0x42 0 64k"]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(s.stop().success());
    let st = stats_of(&stats);
    assert_eq!(st["write"].2, 64 * K, "{st:?}");
    assert!(st["read"].2 >= 64 * K, "{st:?}");
    start_fails_one_line(
        &["--filter=delay", "memory", "1M", "delay-read=soon"],
        "delay-read=soon: expected a delay",
    );
}

#[test]
fn blocksize_plugin_sees_only_aligned_bounded_requests() {
    if !have_python_nbd() || !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let logarg = format!("logfile={}", log.display());
    let args = [
        "--filter=blocksize",
        "--filter=log",
        "memory",
        "size=1M",
        "minblock=4K",
        "maxdata=8K",
        "maxlen=16K",
        &logarg,
    ];
    let s = Server::start(&args);
    let j = nbdinfo_json(&[], &s.uri);
    assert_eq!(j["block_size_minimum"], "1", "{j:?}");
    nbd_script(
        r#"
model = bytearray(1024 * 1024)
for i, (off, n) in enumerate([(1, 1), (4095, 2), (100, 30000), (65536 - 7, 65536 + 14)]):
    data = bytes([(i * 31 + j) % 251 + 1 for j in range(n)])
    h.pwrite(data, off)
    model[off:off + n] = data
h.zero(50000, 3)                 # (count, offset)
model[3:50003] = bytes(50000)
h.trim(10000, 5000)
for off, n in [(0, 70000), (3, 5), (65536 - 100, 200)]:
    assert h.pread(n, off) == bytes(model[off:off + n]), (off, n)
assert h.pread(1024 * 1024, 0) == bytes(model[:])
"#,
        &[&s.uri],
    );
    assert!(s.stop().success());
    let log = std::fs::read_to_string(&log).unwrap();
    let mut seen = 0;
    for line in log.lines() {
        if let (Some(off), Some(n)) = (log_field(line, "offset="), log_field(line, "count=")) {
            seen += 1;
            assert_eq!(off % 4096, 0, "unaligned offset: {line}");
            assert_eq!(n % 4096, 0, "unaligned count: {line}");
            let max = if line.contains(" Read ") || line.contains(" Write ") {
                8192
            } else {
                16384
            };
            assert!(n <= max, "too large: {line}");
        }
    }
    assert!(seen > 20, "{log}");
}

#[test]
fn rate_passes_data_unchanged() {
    if !have("nbdcopy") {
        return;
    }
    let (dir, img, _) = temp_file("src.img", 2 * M as usize, 21);
    let (stats, sarg) = stats_file(dir.path());
    // 1 Gbit/s with a small burst: the limiter really waits during the
    // copy, and the data must come through intact.
    let s = Server::start(&[
        "-r",
        "--filter=rate",
        "--filter=stats",
        "file",
        img.to_str().unwrap(),
        "rate=1G",
        "connection-rate=512M",
        "burstiness=0.001",
        &sarg,
    ]);
    assert!(read_all(&s.uri) == std::fs::read(&img).unwrap());
    assert!(s.stop().success());
    assert_eq!(stats_of(&stats)["read"].2, 2 * M);
    start_fails_one_line(
        &["--filter=rate", "memory", "1M", "rate=0"],
        "rate=0: a rate must be more than zero",
    );
}

#[test]
fn retry_reopens_and_retries_before_failing() {
    if !have_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (stats, sarg) = stats_file(dir.path());
    let s = Server::start(&[
        "--filter=retry",
        "--filter=stats",
        "--filter=error",
        "memory",
        "size=1M",
        "error-pread-rate=100%",
        "retries=3",
        "retry-delay=0",
        &sarg,
    ]);
    nbd_script(
        r#"
h.pwrite(b"w" * 512, 0)
try:
    h.pread(512, 0)
    raise SystemExit("read succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EIO, e
"#,
        &[&s.uri],
    );
    assert!(s.stop().success());
    let text = std::fs::read_to_string(&stats).unwrap();
    let st = stats_of(&stats);
    // One try and three retries, each on a freshly opened chain below.
    assert_eq!(st["read"], (4, 4, 0), "{text}");
    assert_eq!(st["write"], (1, 0, 512), "{text}");
    assert!(text.contains("connections: 4"), "{text}");
    start_fails_one_line(
        &["--filter=retry", "memory", "1M", "retries=many"],
        "retries=many",
    );
}

#[test]
fn multi_conn_modes_and_emulated_flush() {
    if !have_python_nbd() || !have("nbdinfo") {
        return;
    }
    let f = ["--filter=multi-conn"];
    assert_eq!(
        flags_through(&f, &["multi-conn-mode=off"])["can_multi_conn"],
        "false"
    );
    assert_eq!(
        flags_through(&f, &["multi-conn-mode=on"])["can_multi_conn"],
        "true"
    );
    assert_eq!(
        flags_through(&f, &["multi-conn-mode=emulate"])["can_multi_conn"],
        "true"
    );
    assert_eq!(
        flags_through(&f, &["multi-conn-mode=disable"])["can_multi_conn"],
        "false"
    );
    assert_eq!(
        flags_through(&f, &["multi-conn-mode=unsafe"])["can_multi_conn"],
        "true"
    );
    start_fails_one_line(
        &[
            "--filter=multi-conn",
            "memory",
            "1M",
            "multi-conn-track-dirty=always",
        ],
        "multi-conn-track-dirty=always",
    );

    // emulate: a flush on one connection flushes both.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let logarg = format!("logfile={}", log.display());
    let s = Server::start(&[
        "--filter=multi-conn",
        "--filter=log",
        "memory",
        "size=1M",
        "multi-conn-mode=emulate",
        "multi-conn-track-dirty=off",
        &logarg,
    ]);
    python(
        r#"
import nbd, sys
a = nbd.NBD(); a.connect_uri(sys.argv[1])
b = nbd.NBD(); b.connect_uri(sys.argv[1])
b.pwrite(b"b" * 512, 0)
a.flush()
print("OK")
"#,
        &[&s.uri],
    );
    assert!(s.stop().success());
    let log = std::fs::read_to_string(&log).unwrap();
    let flushes: Vec<&str> = log.lines().filter(|l| l.contains(" Flush ")).collect();
    assert_eq!(flushes.len(), 2, "{log}");
    assert!(flushes.iter().any(|l| l.contains("connection=1 ")), "{log}");
    assert!(flushes.iter().any(|l| l.contains("connection=2 ")), "{log}");
}

#[test]
fn limit_refuses_one_client_too_many() {
    if !have_python_nbd() {
        return;
    }
    let s = Server::start(&["--filter=limit", "memory", "size=1M", "limit=2"]);
    python(
        r#"
import nbd, sys
a = nbd.NBD(); a.connect_uri(sys.argv[1])
b = nbd.NBD(); b.connect_uri(sys.argv[1])
c = nbd.NBD()
try:
    c.connect_uri(sys.argv[1])
    raise SystemExit("a third client got in")
except nbd.Error:
    pass
# The two admitted clients are unaffected.
a.pwrite(b"a" * 512, 0)
assert b.pread(512, 0) == b"a" * 512
# A slot comes back when a client leaves (once the server has seen it go).
a.shutdown()
import time
for attempt in range(100):
    try:
        d = nbd.NBD(); d.connect_uri(sys.argv[1])
        break
    except nbd.Error:
        time.sleep(0.05)
else:
    raise SystemExit("the slot never came back")
assert d.pread(512, 0) == b"a" * 512
print("OK")
"#,
        &[&s.uri],
    );
    let log = s.log();
    assert!(log.contains("too many clients (the limit is 2)"), "{log}");
}

#[test]
fn every_filter_has_help_with_an_example() {
    let filters = [
        "blocksize",
        "blocksize-policy",
        "cache",
        "cow",
        "delay",
        "error",
        "exitlast",
        "exitwhen",
        "fua",
        "ip",
        "limit",
        "multi-conn",
        "nocache",
        "noextents",
        "noparallel",
        "nozero",
        "offset",
        "partition",
        "protect",
        "rate",
        "readahead",
        "retry",
        "stats",
        "swab",
        "tar",
        "truncate",
    ];
    let general = stdout_of(Command::new(binary()).arg("--help"));
    for f in filters {
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

/// True if `nbdinfo --size URI` succeeds.
fn nbdinfo_connects(uri: &str) -> bool {
    Command::new("nbdinfo")
        .arg("--size")
        .arg(uri)
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success()
}

#[test]
fn ip_filters_unix_peers_by_uid_and_gid() {
    if !have("nbdinfo") {
        return;
    }
    // SAFETY: getuid and getgid have no preconditions.
    let uid = unsafe { libc::getuid() };
    // SAFETY: getgid has no preconditions.
    let gid = unsafe { libc::getgid() };
    let me = format!("allow=uid:{uid}");
    let s = Server::start(&["--filter=ip", "memory", "1M", &me, "deny=all"]);
    assert!(nbdinfo_connects(&s.uri), "{}", s.log());
    let mygroup = format!("allow=gid:{gid}");
    let s = Server::start(&["--filter=ip", "memory", "1M", &mygroup, "deny=anyunix"]);
    assert!(nbdinfo_connects(&s.uri), "{}", s.log());

    let other = format!("allow=uid:{},gid:{}", uid + 1, gid + 1);
    let s = Server::start(&["--filter=ip", "memory", "1M", &other, "deny=all"]);
    assert!(!nbdinfo_connects(&s.uri));
    let log = s.log();
    assert!(
        log.contains("denied by the allow/deny rules") && log.contains(&format!("uid {uid}")),
        "{log}"
    );
    // The refusal closed one connection, not the server: it refuses again.
    assert!(!nbdinfo_connects(&s.uri));
}

#[test]
fn ip_filters_tcp_clients_by_address_and_network() {
    if !have("nbdinfo") {
        return;
    }
    let s = Server::start_tcp(&["--filter=ip", "memory", "1M", "allow=127.0.0.1", "deny=all"]);
    assert!(s.uri.starts_with("nbd://127.0.0.1:"), "{}", s.uri);
    assert!(nbdinfo_connects(&s.uri), "{}", s.log());

    let s = Server::start_tcp(&["--filter=ip", "memory", "1M", "deny=127.0.0.0/8"]);
    assert!(!nbdinfo_connects(&s.uri));
    assert!(s.log().contains("127.0.0.1"), "{}", s.log());

    // allow= is checked before deny=, whatever the order on the line.
    let s = Server::start_tcp(&[
        "--filter=ip",
        "memory",
        "1M",
        "deny=anyipv4",
        "allow=10.0.0.0/8,127.0.0.0/24",
    ]);
    assert!(nbdinfo_connects(&s.uri), "{}", s.log());
}

#[test]
fn ip_rejects_bad_rules_at_startup() {
    let err = fails_stderr(&["--filter=ip", "memory", "1M", "allow=127.0.0.256"]);
    assert!(
        err.contains("allow=") && err.contains("127.0.0.256"),
        "{err}"
    );
}

#[test]
fn exitlast_exits_when_the_last_client_leaves() {
    if !have_python_nbd() {
        return;
    }
    let mut s = Server::start(&["-v", "--filter=exitlast", "memory", "1M"]);
    // Nothing but a disconnect makes it exit: it is up once ready.
    assert!(s.running(), "exited before any client connected");
    // Two clients at once: the first leaving (seen in the server's log)
    // does not stop the server.
    python(
        r#"
import nbd, sys, time
a = nbd.NBD(); a.connect_uri(sys.argv[1])
b = nbd.NBD(); b.connect_uri(sys.argv[1])
a.pwrite(b"x" * 512, 0)
a.shutdown()
while "connection closed conn=1" not in open(sys.argv[2]).read():
    time.sleep(0.02)
assert b.pread(512, 0) == b"x" * 512
b.shutdown()
print("OK")
"#,
        &[&s.uri, s.log_path().to_str().unwrap()],
    );
    let st = s.wait_exit(std::time::Duration::from_secs(30));
    assert_eq!(st.code(), Some(0), "{}", s.log());
}

#[test]
fn exitwhen_refuses_new_clients_after_the_event_and_exits_after_the_last() {
    if !have_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let stop = dir.path().join("stop");
    let created = format!("exit-when-file-created={}", stop.display());
    let mut s = Server::start(&["--filter=exitwhen", "memory", "1M", &created]);
    python(
        r#"
import nbd, sys
a = nbd.NBD(); a.connect_uri(sys.argv[1])
open(sys.argv[2], "w").close()
b = nbd.NBD()
try:
    b.connect_uri(sys.argv[1])
    raise SystemExit("a client got in after the event")
except nbd.Error:
    pass
# The connected client carries on.
a.pwrite(b"y" * 512, 0)
assert a.pread(512, 0) == b"y" * 512
a.shutdown()
print("OK")
"#,
        &[&s.uri, stop.to_str().unwrap()],
    );
    let st = s.wait_exit(std::time::Duration::from_secs(30));
    assert_eq!(st.code(), Some(0), "{}", s.log());
    assert!(s.log().contains("no new connections"), "{}", s.log());
}

#[test]
fn exitwhen_polls_while_idle() {
    let dir = tempfile::tempdir().unwrap();
    let gone = dir.path().join("keep");
    std::fs::write(&gone, b"").unwrap();
    let deleted = format!("exit-when-file-deleted={}", gone.display());
    let mut s = Server::start(&[
        "-v",
        "--filter=exitwhen",
        "memory",
        "1M",
        &deleted,
        "exit-when-script=exit 0",
        "exit-when-poll=0.2",
    ]);
    // Two polls that found no event (logged at -v), and still running.
    while s.log().matches("exitwhen: polled, no event").count() < 2 {
        assert!(s.running(), "exited before the event: {}", s.log());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(s.running(), "exited before the event: {}", s.log());
    std::fs::remove_file(&gone).unwrap();
    let st = s.wait_exit(std::time::Duration::from_secs(30));
    assert_eq!(st.code(), Some(0), "{}", s.log());

    // A script that reports the event (status 88) before start-up: exit at once.
    let mut s = Server::start(&[
        "--filter=exitwhen",
        "memory",
        "1M",
        "exit-when-script=exit 88",
    ]);
    let st = s.wait_exit(std::time::Duration::from_secs(30));
    assert_eq!(st.code(), Some(0), "{}", s.log());
}

#[test]
fn log_script_runs_for_real_client_requests() {
    if !have_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("script.out");
    let script = format!(
        "logscript=echo \"$type $act $connection $offset $count $return\" >> {}",
        out.display()
    );
    let s = Server::start(&["--filter=log", "memory", "1M", &script]);
    nbd_script(
        r#"
h.pwrite(b"q" * 4096, 8192)
assert h.pread(4096, 8192) == b"q" * 4096
h.shutdown()
"#,
        &[&s.uri],
    );
    drop(s);
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.contains("ENTER Write 1 0x2000 0x1000 \n"), "{text}");
    // As in nbdkit, a LEAVE entry has the result, not the call's fields.
    assert!(text.contains("LEAVE Write 1   0\n"), "{text}");
    assert!(text.contains("LEAVE Read 1   0\n"), "{text}");
    assert!(text.contains("PRINT Connect 1"), "{text}");
}

/// A server whose stderr has `-v` output, for its thread model line.
fn thread_model_of(args: &[&str]) -> String {
    let out = Command::new(binary())
        .args(["-v", "-U", "-", "--run", "nbdinfo \"$uri\" >/dev/null"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    err.lines()
        .find_map(|l| l.split("thread model: ").nth(1))
        .unwrap_or_else(|| panic!("no thread model in {err}"))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn cache_reads_a_slow_source_once() {
    if !have("nbdcopy") {
        return;
    }
    let (dir, img, want) = temp_file("src.img", 4 * M as usize, 31);
    let (stats, sarg) = stats_file(dir.path());
    // cache → stats → delay → file: stats counts what gets past the cache.
    let s = Server::start(&[
        "--filter=cache",
        "--filter=stats",
        "--filter=delay",
        "file",
        img.to_str().unwrap(),
        "cache-on-read=true",
        "rdelay=2ms",
        &sarg,
    ]);
    assert!(read_all(&s.uri) == want);
    // A second full read, on new connections, is served from the cache.
    assert!(read_all(&s.uri) == want);
    assert!(read_all(&s.uri) == want);
    assert!(s.stop().success());
    let st = stats_of(&stats);
    assert_eq!(
        st["read"].2,
        4 * M,
        "read exactly once below the cache: {st:?}"
    );

    // Without cache-on-read, reads go through every time.
    let s = Server::start(&[
        "--filter=cache",
        "--filter=stats",
        "file",
        img.to_str().unwrap(),
        &sarg,
    ]);
    assert!(read_all(&s.uri) == want);
    assert!(read_all(&s.uri) == want);
    assert!(s.stop().success());
    assert_eq!(stats_of(&stats)["read"].2, 8 * M);
}

#[test]
fn cache_over_retry_over_a_flaky_source() {
    if !have("nbdcopy") {
        return;
    }
    let (dir, img, want) = temp_file("src.img", 8 * M as usize, 32);
    let (stats, sarg) = stats_file(dir.path());
    // Half the reads below fail; retry hides that from the cache, and the
    // cache reads each block below once.
    let s = Server::start(&[
        "-r",
        "--filter=cache",
        "--filter=retry",
        "--filter=stats",
        "--filter=error",
        "file",
        img.to_str().unwrap(),
        "cache-on-read=true",
        "error-pread-rate=50%",
        "retries=60",
        "retry-delay=0",
        &sarg,
    ]);
    assert!(read_all(&s.uri) == want);
    assert!(read_all(&s.uri) == want);
    assert!(s.stop().success());
    let st = stats_of(&stats);
    let (_ops, errors, bytes) = st["read"];
    assert!(errors > 0, "the source was not flaky: {st:?}");
    assert_eq!(bytes, 8 * M, "each byte read below once: {st:?}");
}

#[test]
fn cache_over_xz_decompresses_once() {
    if !have("nbdcopy") || !have("xz") {
        return;
    }
    let (dir, img, want) = temp_file("disk.img", 3 * M as usize, 33);
    let z = dir.path().join("disk.img.xz");
    let st = Command::new("xz")
        .args(["-k", "--block-size=1MiB", "-0"])
        .arg(&img)
        .status()
        .unwrap();
    assert!(st.success());
    let (stats, sarg) = stats_file(dir.path());
    let s = Server::start(&[
        "--filter=cache",
        "--filter=stats",
        "--filter=xz",
        "file",
        z.to_str().unwrap(),
        "cache-on-read=true",
        &sarg,
    ]);
    let j = nbdinfo_json(&[], &s.uri);
    assert_eq!(j["is_read_only"], "true", "{j:?}");
    assert_eq!(j["can_cache"], "true", "{j:?}");
    assert_eq!(j["can_zero"], "false", "{j:?}");
    assert!(read_all(&s.uri) == want);
    assert!(read_all(&s.uri) == want);
    assert!(s.stop().success());
    assert_eq!(stats_of(&stats)["read"].2, 3 * M);
}

#[test]
fn cache_capabilities_thread_model_and_block_status() {
    if !have("nbdinfo") || !have_python_nbd() {
        return;
    }
    let j = flags_through(&["--filter=cache"], &[]);
    for (k, v) in [
        ("is_read_only", "false"),
        ("can_flush", "true"),
        ("can_fua", "true"),
        ("can_zero", "true"),
        ("can_fast_zero", "true"),
        ("can_trim", "true"),
        ("can_cache", "true"),
        ("can_multi_conn", "true"),
    ] {
        assert_eq!(j[k], v, "{k}: {j:?}");
    }
    // writethrough takes fast zero from below: an emulated zero cannot
    // be fast.
    let s = Server::start(&[
        "--filter=cache",
        "--filter=nozero",
        "memory",
        "size=1M",
        "cache=writethrough",
        "zeromode=emulate",
    ]);
    let j = nbdinfo_json(&[], &s.uri);
    assert_eq!(j["can_fast_zero"], "false", "{j:?}");
    assert_eq!(j["can_cache"], "true", "{j:?}");
    drop(s);
    assert_eq!(
        thread_model_of(&[
            "--filter=cache",
            "--filter=noparallel",
            "memory",
            "1M",
            "serialize=requests"
        ]),
        "serialize_requests"
    );
    assert_eq!(
        thread_model_of(&["--filter=cache", "memory", "1M"]),
        "parallel"
    );

    // Block status comes from the plugin (a sparse file), except that
    // blocks written but not yet flushed are data.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("sparse.img");
    sparse_file(&img, 4 * M);
    let s = Server::start(&["--filter=cache", "file", img.to_str().unwrap()]);
    assert_eq!(map_of(&s.uri), vec![(0, 4 * M, true)]);
    nbd_script_allocation(
        r#"
def holes():
    out = []
    def cb(meta, off, ents, err):
        for i in range(0, len(ents), 2):
            out.append((ents[i], ents[i + 1] & 1))
    h.block_status(4 << 20, 0, cb)
    return out
h.pwrite(b"x" * 100, (1 << 20) + 10)
ex = holes()
# [0,1M) hole, the dirty 64K block data, the rest hole.
pos = 0; seen = []
for n, hole in ex:
    seen.append((pos, n, hole)); pos += n
assert (1 << 20, 65536, 0) in seen, seen
assert seen[0] == (0, 1 << 20, 1), seen
h.flush()
assert open(sys.argv[2], "rb").read()[(1 << 20) + 10:(1 << 20) + 110] == b"x" * 100
"#,
        &[&s.uri, img.to_str().unwrap()],
    );
}

#[test]
fn cache_modes_decide_when_the_file_changes() {
    if !have_python_nbd() {
        return;
    }
    let script = r#"
import nbd, sys
mode, path, uri = sys.argv[1], sys.argv[2], sys.argv[3]
def on_disk(off, n):
    with open(path, "rb") as f:
        f.seek(off); return f.read(n)
a = nbd.NBD(); a.connect_uri(uri)
b = nbd.NBD(); b.connect_uri(uri)
a.pwrite(b"A" * 5000, 70000)
# One cache for every connection: b sees a's write at once.
assert b.pread(5000, 70000) == b"A" * 5000
assert (on_disk(70000, 5000) == b"A" * 5000) == (mode == "writethrough"), mode
# A partial-block write keeps the rest of the block (read-modify-write).
a.pwrite(b"B" * 3, 4095)
assert a.pread(5, 4094)[1:4] == b"BBB"
a.flush()
assert (on_disk(70000, 5000) == b"A" * 5000) == (mode != "unsafe"), mode
a.pwrite(b"F" * 512, 300000, nbd.CMD_FLAG_FUA)
assert (on_disk(300000, 512) == b"F" * 512) == (mode != "unsafe"), mode
a.zero(65536, 131072)        # (count, offset)
assert a.pread(65536, 131072) == bytes(65536)
b.shutdown(); a.shutdown()
print("OK")
"#;
    let dir = tempfile::tempdir().unwrap();
    for mode in ["writeback", "writethrough", "unsafe"] {
        let img = dir.path().join(format!("{mode}.img"));
        let mut want = make_file(&img, M as usize, 34);
        let marg = format!("cache={mode}");
        let s = Server::start(&["--filter=cache", "file", img.to_str().unwrap(), &marg]);
        python(script, &[mode, img.to_str().unwrap(), &s.uri]);
        assert!(s.stop().success());
        // After the clients disconnect everything is in the file, in every
        // mode.
        want[70000..75000].fill(b'A');
        want[4095..4098].fill(b'B');
        want[300000..300512].fill(b'F');
        want[131072..196608].fill(0);
        assert!(std::fs::read(&img).unwrap() == want, "{mode}");
    }
    start_fails_one_line(
        &["--filter=cache", "memory", "1M", "cache=sometimes"],
        "cache=sometimes: expected one of writeback, writethrough, unsafe",
    );
    start_fails_one_line(
        &[
            "--filter=cache",
            "memory",
            "1M",
            "cache-min-block-size=1000",
        ],
        "cache-min-block-size=1000: must be a power of two",
    );
}

#[test]
fn cache_reclaim_writes_dirty_blocks_before_dropping_them() {
    if !have_python_nbd() || !have("nbdcopy") {
        return;
    }
    let (dir, img, mut want) = temp_file("disk.img", 4 * M as usize, 35);
    let (stats, sarg) = stats_file(dir.path());
    let s = Server::start(&[
        "--filter=cache",
        "--filter=stats",
        "file",
        img.to_str().unwrap(),
        "cache-max-size=1M",
        "cache-on-read=true",
        &sarg,
    ]);
    nbd_script(
        r#"
for i in range(48):
    h.pwrite(bytes([i + 1]) * 65536, i * 65536)
# No flush, but the cache holds at most 1M: the older blocks were written
# down to make room.
with open(sys.argv[2], "rb") as f:
    disk = f.read()
for i in range(32):
    assert disk[i * 65536:(i + 1) * 65536] == bytes([i + 1]) * 65536, i
for i in range(48):
    assert h.pread(65536, i * 65536) == bytes([i + 1]) * 65536, i
"#,
        &[&s.uri, img.to_str().unwrap()],
    );
    for i in 0..48 {
        want[i * 65536..(i + 1) * 65536].fill(i as u8 + 1);
    }
    assert!(read_all(&s.uri) == want);
    assert!(read_all(&s.uri) == want);
    assert!(s.stop().success());
    assert!(std::fs::read(&img).unwrap() == want);
    // The cache was too small to hold the disk, so the second copy read
    // from below again.
    let st = stats_of(&stats);
    assert!(st["read"].2 > 4 * M, "{st:?}");
}

#[test]
fn cache_command_populates_the_cache() {
    if !have_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let logarg = format!("logfile={}", log.display());
    let s = Server::start(&[
        "--filter=cache",
        "--filter=log",
        "pattern",
        "size=2M",
        &logarg,
    ]);
    nbd_script(
        r#"
import struct
assert h.can_cache()
h.cache(1 << 20, 0)
print("cached")
sys.stdout.flush()
data = h.pread(1 << 20, 0)
assert data[8 * 1000:8 * 1001] == struct.pack(">Q", 8000)
"#,
        &[&s.uri],
    );
    assert!(s.stop().success());
    let text = std::fs::read_to_string(&log).unwrap();
    let reads: Vec<&str> = text.lines().filter(|l| l.contains(" Read ")).collect();
    // The cache request was filled with reads below; the read after it
    // was served from the cache, and the cache request never went down.
    let total: u64 = reads
        .iter()
        .map(|l| {
            let c = l
                .split("count=0x")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap();
            u64::from_str_radix(c, 16).unwrap()
        })
        .sum();
    assert_eq!(total, M, "{text}");
    assert!(!text.contains(" Cache "), "{text}");
}

/// The (offset, count) of each `kind` line ("Read", "Cache") in a log.
fn logged(text: &str, kind: &str) -> Vec<(u64, u64)> {
    let hex = |l: &str, f: &str| {
        let v = l.split(f).nth(1).unwrap().split(' ').next().unwrap();
        u64::from_str_radix(v, 16).unwrap()
    };
    text.lines()
        .filter(|l| l.contains(&format!(" {kind} ")))
        .map(|l| (hex(l, "offset=0x"), hex(l, "count=0x")))
        .collect()
}

#[test]
fn readahead_prefetches_the_window_after_each_read() {
    if !have_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let logarg = format!("logfile={}", log.display());
    // memory has a native cache: the window goes down as cache requests,
    // one after each read (nbdkit's readahead).
    let args = [
        "--filter=readahead",
        "--filter=log",
        "memory",
        "size=8M",
        &logarg,
    ];
    let s = Server::start(&args);
    nbd_script(
        r#"
for i in range(32):
    h.pread(65536, i * 65536)
"#,
        &[&s.uri],
    );
    assert!(s.stop().success());
    let text = std::fs::read_to_string(&log).unwrap();
    let reads = logged(&text, "Read");
    assert_eq!(
        reads.len(),
        32,
        "the reads themselves are unchanged: {text}"
    );
    assert!(reads.iter().all(|&(_, n)| n == 65536), "{text}");
    // Reads moving forward never pass what was prefetched, so the window
    // stays at its 32 KiB minimum.
    let mut caches = logged(&text, "Cache");
    caches.sort();
    let want: Vec<(u64, u64)> = (1..=32).map(|i| (i * 65536, 32768)).collect();
    assert_eq!(caches, want, "{text}");

    // Reads that jump ahead of the prefetched area double the window;
    // going back drops it to the minimum.
    let s = Server::start(&args);
    nbd_script(
        r#"
for off in [0, 1, 2, 3, 0]:
    h.pread(4096, off << 20)
"#,
        &[&s.uri],
    );
    assert!(s.stop().success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(logged(&text, "Read").len(), 5, "{text}");
    let mut caches = logged(&text, "Cache");
    caches.sort();
    let want = vec![
        (4096, 32768),
        (4096, 262144),
        (M + 4096, 32768),
        (2 * M + 4096, 65536),
        (3 * M + 4096, 131072),
    ];
    assert_eq!(caches, want, "{text}");
}

#[test]
fn readahead_buffer_is_exact_with_writes_interleaved() {
    if !have_python_nbd() {
        return;
    }
    let (dir, img, _) = temp_file("disk.img", 2 * M as usize, 41);
    let log = dir.path().join("log");
    let logarg = format!("logfile={}", log.display());
    // nocache below hides the file plugin's cache: reads are stretched
    // into a buffer instead.
    let s = Server::start(&[
        "--filter=readahead",
        "--filter=nocache",
        "--filter=log",
        "file",
        img.to_str().unwrap(),
        &logarg,
    ]);
    nbd_script(
        r#"
other = nbd.NBD(); other.connect_uri(sys.argv[1])
model = bytearray(open(sys.argv[2], "rb").read())
size = len(model)
for i in range(size // 4096):
    off = i * 4096
    if i % 50 == 7:
        # Change bytes the buffer already holds, from this connection or
        # another one.
        w = bytes([i % 251 + 1]) * 3000
        (h if i % 100 == 7 else other).pwrite(w, off + 5000)
        model[off + 5000:off + 8000] = w
    if i % 50 == 30:
        h.zero(4096, off + 4096)   # (count, offset)
        model[off + 4096:off + 8192] = bytes(4096)
    assert h.pread(4096, off) == bytes(model[off:off + 4096]), off
assert h.pread(size, 0) == bytes(model)
open(sys.argv[3], "wb").write(model)
"#,
        &[
            &s.uri,
            img.to_str().unwrap(),
            dir.path().join("model").to_str().unwrap(),
        ],
    );
    // The file has every write, and the export still reads as the file.
    let model = std::fs::read(dir.path().join("model")).unwrap();
    assert!(read_all(&s.uri) == model);
    assert!(s.stop().success());
    assert!(std::fs::read(&img).unwrap() == model);
    let text = std::fs::read_to_string(&log).unwrap();
    let reads = logged(&text, "Read");
    assert!(
        reads.len() < 200,
        "512 sequential reads: {} below",
        reads.len()
    );
    assert!(reads.iter().any(|&(_, n)| n >= M), "{text}");
    assert!(logged(&text, "Cache").is_empty(), "{text}");
}

#[test]
fn readahead_keeps_capabilities_thread_model_and_block_status() {
    if !have("nbdinfo") {
        return;
    }
    let plain = flags_through(&[], &[]);
    let through = flags_through(&["--filter=readahead"], &[]);
    for (k, v) in &plain {
        if k.starts_with("can_") || k.starts_with("is_") || k.starts_with("block_size") {
            assert_eq!(through.get(k), Some(v), "{k}");
        }
    }
    assert_eq!(
        thread_model_of(&[
            "--filter=readahead",
            "--filter=noparallel",
            "memory",
            "1M",
            "serialize=requests"
        ]),
        "serialize_requests"
    );
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("sparse.img");
    let f = sparse_file(&img, 4 * M);
    std::os::unix::fs::FileExt::write_all_at(&f, &[1u8; 65536], M).unwrap();
    let s = Server::start(&["-r", "--filter=readahead", "file", img.to_str().unwrap()]);
    let j = nbdinfo_json(&[], &s.uri);
    assert_eq!(j["is_read_only"], "true", "{j:?}");
    assert_eq!(
        map_of(&s.uri),
        vec![
            (0, M, true),
            (M, 64 * K, false),
            (M + 64 * K, 3 * M - 64 * K, true)
        ]
    );
}

#[test]
fn readahead_over_cache_over_a_slow_source_reads_each_byte_once() {
    if !have("nbdcopy") || !have_python_nbd() {
        return;
    }
    let (dir, img, want) = temp_file("src.img", 6 * M as usize, 42);
    let (stats, sarg) = stats_file(dir.path());
    let s = Server::start(&[
        "-r",
        "--filter=readahead",
        "--filter=cache",
        "--filter=stats",
        "--filter=delay",
        "file",
        img.to_str().unwrap(),
        "cache-on-read=true",
        "rdelay=5ms",
        &sarg,
    ]);
    // Small sequential reads: readahead fills the cache ahead of them
    // (in the background), and the cache makes sure a block being
    // prefetched is not read again by the reader.
    nbd_script(
        r#"
want = open(sys.argv[2], "rb").read()
for off in range(0, 3 << 20, 16384):
    assert h.pread(16384, off) == want[off:off + 16384], off
"#,
        &[&s.uri, img.to_str().unwrap()],
    );
    assert!(read_all(&s.uri) == want);
    assert!(s.stop().success());
    let st = stats_of(&stats);
    assert_eq!(st["read"].2, 6 * M, "{st:?}");
    // 192 small reads (and nbdcopy's pass) became fewer, larger ones
    // below: the cache fills whole blocks ahead of the reader.
    assert!(st["read"].0 < 100, "{st:?}");
    assert!(
        !st.contains_key("cache"),
        "the cache filter fills itself: {st:?}"
    );
}

#[test]
fn cache_with_qemu_io_unaligned_writes_zeroes_and_discards() {
    if !have("qemu-io") {
        return;
    }
    let (_dir, img, mut want) = temp_file("disk.img", 4 * M as usize, 43);
    let s = Server::start(&[
        "--filter=cache",
        "file",
        img.to_str().unwrap(),
        "cache-min-block-size=4K",
        "cache-max-size=64K",
        "cache-on-read=true",
    ]);
    let out = stdout_of(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-t",
        "none",
        "-c",
        "write -P 0x55 1000 70000",
        "-c",
        "write -z 200k 300k",
        "-c",
        "write -P 0x66 -f 2m 5000",
        "-c",
        "discard 1m 64k",
        "-c",
        "read -P 0x55 1000 70000",
        "-c",
        "read -P 0 200k 300k",
        "-c",
        "read -P 0x66 2m 5000",
        &s.uri,
    ]));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(out.matches("read ").count(), 3, "{out}");
    want[1000..71000].fill(0x55);
    want[200 * K as usize..500 * K as usize].fill(0);
    want[2 * M as usize..2 * M as usize + 5000].fill(0x66);
    // The file plugin punches the discarded range: it reads as zeroes.
    want[M as usize..(M + 64 * K) as usize].fill(0);
    assert!(read_all(&s.uri) == want);
    assert!(s.stop().success());
    assert!(std::fs::read(&img).unwrap() == want);
}

/// Flags, block status and data seen by one client through `filters`
/// over a memory disk (one connection, so exitlast-style filters work).
fn view_through(filters: &[&str]) -> String {
    // --filter= arguments first, then the plugin, then every key=value.
    let (mut args, params): (Vec<&str>, Vec<&str>) =
        filters.iter().partition(|a| a.starts_with("--"));
    args.extend(["memory", "size=1M"]);
    args.extend(params);
    let s = Server::start(&args);
    nbd_script_allocation(
        r#"
h.pwrite(b"z" * 65536, 131072)
h.trim(65536, 262144)
flags = [h.is_read_only(), h.can_flush(), h.can_fua(), h.can_trim(), h.can_zero(),
         h.can_fast_zero(), h.can_cache(), h.can_multi_conn(), h.get_size()]
runs = []
h.block_status(1 << 20, 0, lambda ctx, off, ents, err: runs.extend(ents) or 0)
data = h.pread(65536, 131072) == b"z" * 65536
print(flags, runs, data)
h.shutdown()
"#,
        &[&s.uri],
    )
}

#[test]
fn connection_filters_change_no_capability_block_status_or_thread_model() {
    if !have_python_nbd() || !have("nbdinfo") {
        return;
    }
    let base = view_through(&[]);
    let dir = tempfile::tempdir().unwrap();
    let never = format!(
        "exit-when-file-created={}",
        dir.path().join("never").display()
    );
    let stacks: Vec<Vec<&str>> = vec![
        vec!["--filter=ip", "allow=anyunix", "deny=all"],
        vec!["--filter=limit", "limit=3"],
        vec!["--filter=exitlast"],
        vec!["--filter=exitwhen", &never],
        vec!["--filter=log", "logscript=true"],
    ];
    for stack in &stacks {
        assert_eq!(view_through(stack), base, "{stack:?}");
        let (mut args, params): (Vec<&str>, Vec<&str>) =
            stack.iter().partition(|a| a.starts_with("--"));
        args.extend(["memory", "1M"]);
        args.extend(params);
        assert_eq!(thread_model_of(&args), "parallel", "{stack:?}");
    }
    // Under a filter with a stricter thread model, they keep it.
    assert_eq!(
        thread_model_of(&["--filter=ip", "--filter=noparallel", "memory", "1M"]),
        "serialize_requests"
    );
}

#[test]
fn access_and_lifetime_filters_in_a_compressed_copy_on_write_stack() {
    if !have_python_nbd() || !have("xz") {
        return;
    }
    let (dir, raw, _) = temp_file("disk.img", 4 << 20, 77);
    run_ok(
        Command::new("xz")
            .args(["-k", "-T1", "--block-size=1MiB"])
            .arg(&raw),
    );
    let xz = dir.path().join("disk.img.xz");
    let before = std::fs::read(&xz).unwrap();
    let log = dir.path().join("log");
    let logarg = format!("logfile={}", log.display());
    // SAFETY: getuid has no preconditions.
    let uid = format!("allow=uid:{}", unsafe { libc::getuid() });
    let mut s = Server::start(&[
        "--filter=ip",
        "--filter=limit",
        "--filter=exitlast",
        "--filter=log",
        "--filter=cow",
        "--filter=xz",
        "file",
        xz.to_str().unwrap(),
        &uid,
        "deny=all",
        "limit=2",
        &logarg,
    ]);
    python(
        r#"
import nbd, sys
want = open(sys.argv[2], "rb").read()
a = nbd.NBD(); a.connect_uri(sys.argv[1])
b = nbd.NBD(); b.connect_uri(sys.argv[1])
c = nbd.NBD()
try:
    c.connect_uri(sys.argv[1])
    raise SystemExit("limit=2 let a third client in")
except nbd.Error:
    pass
assert a.pread(1 << 20, 1 << 20) == want[1 << 20: 2 << 20]
a.pwrite(b"w" * 4096, 12345)
assert b.pread(4096, 12345) == b"w" * 4096
a.shutdown(); b.shutdown()
print("OK")
"#,
        &[&s.uri, raw.to_str().unwrap()],
    );
    // exitlast: both clients gone, the server exits by itself.
    let st = s.wait_exit(std::time::Duration::from_secs(30));
    assert_eq!(st.code(), Some(0), "{}", s.log());
    assert_eq!(std::fs::read(&xz).unwrap(), before, "the xz file changed");
    let text = without_ids(&std::fs::read_to_string(&log).unwrap());
    assert!(text.contains("Write offset=0x3039 count=0x1000"), "{text}");
}
