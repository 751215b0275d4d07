//! Data-source plugins (sh, eval, data, …) driven by real clients.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;

fn data_script(name: &str) -> String {
    format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"))
}

// ---------------------------------------------------------------- sh / eval

#[test]
fn sh_file_disk_reads_and_writes_through_the_script() {
    if !have("qemu-io") || !have("nbdcopy") || !have("nbdinfo") {
        return;
    }
    let (_dir, img, _) = temp_file("disk.img", 1 << 20, 7);
    let s = Server::start(&[
        "sh",
        &data_script("file-disk.sh"),
        &format!("file={}", img.display()),
    ]);
    let info = nbdinfo_json(&[], &s.uri);
    assert_eq!(info["export-size"], "1048576");
    assert_eq!(info["is_read_only"], "false");
    assert_eq!(info["can_flush"], "true");
    assert_eq!(info["can_trim"], "true");
    assert_eq!(info["can_fua"], "true");
    assert_eq!(info["can_multi_conn"], "true");
    // Reads through `dd` match the file.
    assert_eq!(read_all(&s.uri), std::fs::read(&img).unwrap());
    // Writes (with FUA), zeroes and a flush reach the file.
    qemu_io_ok(
        &s.uri,
        &[
            "write -P 0x5a -f 4096 8192",
            "write -z 65536 4096",
            "flush",
            "read -P 0x5a 4096 8192",
        ],
    );
    let now = std::fs::read(&img).unwrap();
    assert!(now[4096..12288].iter().all(|&b| b == 0x5a));
    assert!(now[65536..69632].iter().all(|&b| b == 0));
    assert_eq!(read_all(&s.uri), now);
    assert!(s.stop().success());
}

#[test]
fn sh_script_errors_are_reported_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let err = fails_stderr(&[
        "-f",
        "-U",
        dir.path().join("s").to_str().unwrap(),
        "sh",
        &data_script("file-disk.sh"),
        "colour=blue",
    ]);
    assert!(err.contains("unknown parameter colour=blue"), "{err}");
    // A script that does not exist is named in the error.
    assert!(
        fails_stderr(&["-f", "-U", "x.sock", "sh", "/nonexistent/script.sh"])
            .contains("/nonexistent/script.sh")
    );
}

#[test]
fn sh_missing_methods_fall_back_to_the_defaults() {
    if !have("nbdinfo") || !have_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("tiny.sh");
    // Only get_size and pread: a pwrite method without can_write is never
    // used, as with nbdkit.
    std::fs::write(
        &script,
        "#!/bin/sh\ncase \"$1\" in\n  get_size) echo 64K ;;\n  \
         pread) head -c \"$3\" /dev/zero | tr '\\0' 'A' ;;\n  \
         pwrite) echo 'ENOSPC should not be called' >&2; exit 1 ;;\n  \
         *) exit 2 ;;\nesac\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let s = Server::start(&["sh", script.to_str().unwrap()]);
    let info = nbdinfo_json(&[], &s.uri);
    assert_eq!(info["export-size"], "65536");
    assert_eq!(info["is_read_only"], "true");
    assert_eq!(info["can_flush"], "false");
    assert_eq!(info["can_trim"], "false");
    assert_eq!(info["can_zero"], "false");
    assert_eq!(info["can_multi_conn"], "false");
    nbd_script(
        r#"
assert h.pread(100, 1000) == b"A" * 100
assert h.is_read_only()
h.set_strict_mode(0)
try:
    h.pwrite(b"x" * 512, 0)
    raise SystemExit("write to a script without can_write succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EPERM, e
"#,
        &[&s.uri],
    );
    assert!(s.stop().success());
}

#[test]
fn eval_errno_from_stderr_reaches_the_client() {
    if !have_python_nbd() {
        return;
    }
    let s = Server::start(&[
        "-v",
        "eval",
        "get_size=echo 1M",
        "pread=dd if=/dev/zero count=$3 iflag=count_bytes status=none",
        "pwrite=cat >/dev/null; echo 'ENOSPC the script is full' >&2; exit 1",
        "flush=echo EINVAL >&2; exit 1",
    ]);
    nbd_script(
        r#"
assert not h.is_read_only()
assert h.can_flush()
try:
    h.pwrite(b"x" * 4096, 0)
    raise SystemExit("pwrite succeeded")
except nbd.Error as e:
    assert e.errnum == errno.ENOSPC, e
try:
    h.flush()
    raise SystemExit("flush succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EINVAL, e
assert h.pread(512, 0) == bytes(512)
"#,
        &[&s.uri],
    );
    // The script's message (after the errno name) is what the server logs
    // (and sends in the structured error reply).
    assert!(s.log().contains("the script is full"), "{}", s.log());
    assert!(s.stop().success());
}

#[test]
fn eval_with_only_get_size_and_pread_is_a_read_only_disk() {
    if !have("nbdcopy") || !have("nbdinfo") || !have("qemu-io") {
        return;
    }
    let s = Server::start(&[
        "eval",
        "get_size=echo 128K",
        // Each byte is its offset modulo 251, computed by the script.
        r#"pread=exec python3 -c 'import sys; c,o=int(sys.argv[1]),int(sys.argv[2]); sys.stdout.buffer.write(bytes((o+i)%251 for i in range(c)))' $3 $4"#,
    ]);
    let info = nbdinfo_json(&[], &s.uri);
    assert_eq!(info["export-size"], "131072");
    assert_eq!(info["is_read_only"], "true");
    assert_eq!(info["can_trim"], "false");
    let data = read_all(&s.uri);
    let want: Vec<u8> = (0..131072u64).map(|i| (i % 251) as u8).collect();
    assert!(data == want, "data differs");
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 512", &s.uri])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() || text.contains("ermission") || text.contains("read-only"),
        "write to a read-only eval disk: {text}"
    );
    assert!(s.stop().success());
}

#[test]
fn eval_extents_exports_and_tmpdir() {
    if !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("tmpdir.txt");
    let s = Server::start(&[
        "eval",
        &format!("config_complete=echo \"$tmpdir\" > {}", record.display()),
        "get_size=echo 1M",
        "pread=dd if=/dev/zero count=$3 iflag=count_bytes status=none",
        "extents=echo 0 512K; echo 512K 512K hole,zero",
        "list_exports=echo INTERLEAVED; echo one; echo the first; echo two; echo the second",
        "open=echo \"h-$2-$3\"",
        "export_description=echo \"handle $2\"",
        "thread_model=echo parallel",
    ]);
    assert_eq!(
        map_of(&s.uri),
        vec![(0, 512 << 10, false), (512 << 10, 512 << 10, true)]
    );
    let list = stdout_of(Command::new("nbdinfo").args(["--list", "--json", &s.uri]));
    assert!(
        list.contains("\"one\"") && list.contains("the second"),
        "{list}"
    );
    let info = nbdinfo_json(&[], &s.uri_for("two"));
    // open printed "h-READONLY-EXPORT"; export_description got that handle.
    assert_eq!(info["description"], "handle h-false-two");
    let tmp = std::fs::read_to_string(&record).unwrap();
    let tmp = std::path::PathBuf::from(tmp.trim());
    assert!(tmp.is_dir());
    assert!(s.stop().success());
    assert!(!tmp.exists(), "$tmpdir was not removed at exit");
}

#[test]
fn eval_missing_snippet_and_unload() {
    if !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mark = dir.path().join("unloaded");
    let s = Server::start(&[
        "eval",
        // missing= answers every method not given: here get_size and pread.
        "missing=case $1 in get_size) echo 4K ;; pread) head -c $3 /dev/zero ;; *) exit 2 ;; esac",
        &format!("unload=touch {}", mark.display()),
    ]);
    let info = nbdinfo_json(&[], &s.uri);
    assert_eq!(info["export-size"], "4096");
    assert!(s.stop().success());
    assert!(mark.exists(), "unload did not run");
}

#[test]
fn sh_inline_script_from_stdin() {
    if !have("nbdinfo") {
        return;
    }
    let mut child = Command::new(binary())
        .args(["-U", "-", "sh", "-", "--run", "nbdinfo --size \"$uri\""])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            b"case \"$1\" in\n  get_size) echo 3M ;;\n  pread) head -c $3 /dev/zero ;;\n  *) exit 2 ;;\nesac\n",
        )
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3145728");
}

// ---------------------------------------------------------------- data

/// nbdkit-data-plugin's MBR example, served and read back by sfdisk.
#[test]
fn data_mbr_example_is_a_partition_table() {
    if !have("nbdcopy") || !have("sfdisk") || !have("nbdinfo") {
        return;
    }
    let s = Server::start(&[
        "data",
        "@0x1be    # MBR first partition entry
           0          # Partition status
           0 2 0      # CHS start
           0x83       # Partition type (Linux)
           0x20 0x20 0 # CHS last sector
           le32:1     # LBA first sector
           le32:0x7ff # LBA number of sectors
         @0x1fe    # Boot signature
           0x55 0xaa",
        "size=1M",
    ]);
    let info = nbdinfo_json(&[], &s.uri);
    assert_eq!(info["export-size"], "1048576");
    assert_eq!(info["is_read_only"], "false");
    // Only the first page holds data; the rest was never written.
    let map = map_of(&s.uri);
    assert!(!map[0].2, "{map:?}");
    assert!(map[0].1 < 1 << 20 && map[1].2, "{map:?}");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    run_ok(Command::new("nbdcopy").arg(&s.uri).arg(&img));
    let dump = stdout_of(Command::new("sfdisk").arg("-d").arg(&img));
    assert!(dump.contains("label: dos"), "{dump}");
    assert!(
        dump.contains("start=           1, size=        2047, type=83"),
        "{dump}"
    );
    assert!(s.stop().success());
}

#[test]
fn data_is_writable_and_read_only_with_r() {
    if !have("qemu-io") || !have("nbdinfo") {
        return;
    }
    let s = Server::start(&["data", "( 0x55 0xAA )*2048"]);
    qemu_io_ok(
        &s.uri,
        &[
            "read -P 0x55 0 1",
            "read -P 0xaa 4095 1",
            "write -P 0x11 1024 512",
            "read -P 0x11 1024 512",
            "read -P 0xaa 1537 1",
        ],
    );
    drop(s);
    let s = Server::start(&["-r", "data", "base64=MTIz", "size=1M"]);
    let info = nbdinfo_json(&[], &s.uri);
    assert_eq!(info["is_read_only"], "true");
    assert_eq!(info["export-size"], "1048576");
    run_ok(Command::new("qemu-io").args([
        "-r",
        "-f",
        "raw",
        "-c",
        "read -P 0x31 0 1",
        "-c",
        "read -P 0x33 2 1",
        "-c",
        "read -P 0 3 4096",
        &s.uri,
    ]));
}

/// The disk `nbdkit-rs data PARAMS` serves (with `env`), read by nbdcopy
/// under `--run`.
fn data_disk(params: &[&str], env: &[(&str, &str)]) -> Vec<u8> {
    let mut cmd = Command::new(binary());
    cmd.args(["-U", "-", "data"]).args(params);
    cmd.args(["--run", "nbdcopy \"$uri\" -"])
        .envs(env.iter().copied());
    run_ok(&mut cmd).stdout
}

#[test]
fn data_raw_hello_world_and_variables() {
    if !have("nbdcopy") {
        return;
    }
    assert_eq!(data_disk(&["raw=Hello, world!"], &[]), b"Hello, world!");
    let out = data_disk(
        &["$pattern*2 $sig", "pattern=0x55 0xAA \"hi\""],
        &[("sig", "le16:0xaa55")],
    );
    assert_eq!(out, b"\x55\xaahi\x55\xaahi\x55\xaa");
    // A bad expression is one clear error at start-up.
    let err = fails_stderr(&["-U", "-", "data", "1 2 300", "--run", "true"]);
    assert!(err.contains("data:") && err.contains("300"), "{err}");
}

/// nbdkit >= 1.46: `base64:` inside the language; and (newer nbdkit, the
/// page gives no version) a size suffix on a decimal `@OFFSET`.
#[test]
fn data_base64_expressions_and_offset_suffixes() {
    if !have("nbdcopy") {
        return;
    }
    let out = data_disk(
        &["base64:SGVsbG8s 0x20 ( base64:d29ybGQh )*2 @1K base64:AAEC[1:]"],
        &[],
    );
    let mut want = b"Hello, world!world!".to_vec();
    want.resize(1024, 0);
    want.extend_from_slice(&[1, 2]);
    assert_eq!(out, want);
    // @1M: the disk reaches exactly 1 MiB + 2, with the bytes at the end.
    let out = data_disk(&["@1M le16:0xaa55"], &[]);
    assert_eq!(out.len(), (1 << 20) + 2);
    assert_eq!(&out[1 << 20..], &[0x55, 0xaa]);
    assert!(out[..1 << 20].iter().all(|&b| b == 0));
    // Bad base64 is one clear error at start-up.
    let err = fails_stderr(&["-U", "-", "data", "base64:MTI", "--run", "true"]);
    assert!(err.contains("data:") && err.contains("base64"), "{err}");
}

// ---------------------------------------------------------------- random, sparse-random

#[test]
fn random_copies_onto_itself_and_rejects_other_data() {
    if !have("nbdcopy") || !have("qemu-img") || !have_python_nbd() {
        return;
    }
    // The documented self-check: a copy onto the same disk succeeds only if
    // every byte lands where it was read.
    run_ok(Command::new(binary()).args([
        "-U",
        "-",
        "random",
        "size=20M",
        "--run",
        "nbdcopy \"$uri\" \"$uri\" && qemu-img convert -n -f raw -O raw \"$uri\" \"$uri\"",
    ]));
    let s = Server::start(&["random", "size=1M", "seed=42"]);
    let t = Server::start(&["random", "size=1M", "seed=42"]);
    let u = Server::start(&["random", "1M", "seed=43"]);
    let a = read_all(&s.uri);
    assert_eq!(a.len(), 1 << 20);
    assert_eq!(a, read_all(&t.uri), "same seed, same data");
    assert_ne!(a, read_all(&u.uri), "another seed, other data");
    nbd_script(
        r#"
good = h.pread(4096, 8192)
h.pwrite(good, 8192)
bad = bytes([good[0] ^ 1]) + good[1:]
try:
    h.pwrite(bad, 8192)
    raise SystemExit("a write of other data succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EIO, e
"#,
        &[&s.uri],
    );
}

#[test]
fn sparse_random_has_holes_and_verifies_copies() {
    if !have("nbdcopy") || !have("nbdinfo") {
        return;
    }
    let s = Server::start(&[
        "sparse-random",
        "size=64M",
        "seed=5",
        "percent=30",
        "runlength=1M",
    ]);
    let map = map_of(&s.uri);
    let data: u64 = map.iter().filter(|r| !r.2).map(|r| r.1).sum();
    assert!(map.iter().any(|r| r.2), "no holes: {map:?}");
    assert!(
        data > (64 << 20) / 10 && data < (64 << 20) / 2,
        "about 30% data expected, got {data} bytes: {map:?}"
    );
    // Data blocks are non-zero, holes zero, exactly as the map says.
    let all = read_all(&s.uri);
    for &(off, len, hole) in &map {
        let r = &all[off as usize..(off + len) as usize];
        if hole {
            assert!(r.iter().all(|&b| b == 0), "hole at {off} has data");
        } else {
            assert!(r.iter().all(|&b| b != 0), "data at {off} has zeroes");
        }
    }
    // Copying onto itself (zeroes for holes included) succeeds.
    run_ok(Command::new("nbdcopy").arg(&s.uri).arg(&s.uri));
    assert!(s.stop().success());
    assert!(fails_stderr(&[
        "-U",
        "-",
        "sparse-random",
        "size=1M",
        "percent=101",
        "--run",
        "true",
    ])
    .contains("percent=101"));
}

// ---------------------------------------------------------------- split

#[test]
fn split_concatenates_files_with_their_holes() {
    if !have("nbdcopy") || !have("nbdinfo") || !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    make_file(&a, 1 << 20, 1);
    // b is a 2 MiB hole, c data again.
    sparse_file(&b, 2 << 20);
    make_file(&c, 512 << 10, 3);
    let s = Server::start(&[
        "split",
        a.to_str().unwrap(),
        &format!("file={}", b.display()),
        c.to_str().unwrap(),
    ]);
    let info = nbdinfo_json(&[], &s.uri);
    assert_eq!(info["export-size"], ((3 << 20) + (512 << 10)).to_string());
    assert_eq!(info["is_read_only"], "false");
    let mut want = std::fs::read(&a).unwrap();
    want.extend(std::fs::read(&b).unwrap());
    want.extend(std::fs::read(&c).unwrap());
    assert!(read_all(&s.uri) == want);
    let map = map_of(&s.uri);
    assert_eq!(map[0], (0, 1 << 20, false), "{map:?}");
    assert_eq!(map[1], (1 << 20, 2 << 20, true), "{map:?}");
    assert_eq!(map[2], (3 << 20, 512 << 10, false), "{map:?}");
    // A write across the a|b boundary lands in both files.
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        &format!("write -P 0x77 {} 8192", (1 << 20) - 4096),
        "-c",
        "flush",
        &s.uri,
    ]));
    assert!(std::fs::read(&a).unwrap()[(1 << 20) - 4096..]
        .iter()
        .all(|&x| x == 0x77));
    assert!(std::fs::read(&b).unwrap()[..4096]
        .iter()
        .all(|&x| x == 0x77));
    assert!(s.stop().success());
    let s = Server::start(&["-r", "split", a.to_str().unwrap()]);
    assert_eq!(nbdinfo_json(&[], &s.uri)["is_read_only"], "true");
}

// ---------------------------------------------------------------- partitioning

/// `sfdisk -d` of the whole export (copied to a file first).
fn sfdisk_dump(uri: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    run_ok(Command::new("nbdcopy").arg(uri).arg(&img));
    stdout_of(Command::new("sfdisk").arg("-d").arg(&img))
}

fn partition_files(dir: &std::path::Path, sizes: &[usize]) -> Vec<String> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            let p = dir.join(format!("part{}", i + 1));
            make_file(&p, s, 100 + i as u64);
            p.display().to_string()
        })
        .collect()
}

#[test]
fn partitioning_mbr_reads_back_with_sfdisk_and_the_partition_filter() {
    if !have("nbdcopy") || !have("sfdisk") || !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let files = partition_files(dir.path(), &[1 << 20, 300_000]);
    let s = Server::start(&["partitioning", &files[0], "mbr-id=0x82", &files[1]]);
    let dump = sfdisk_dump(&s.uri);
    assert!(dump.contains("label: dos"), "{dump}");
    assert!(
        dump.contains("start=        2048, size=        2048, type=83"),
        "{dump}"
    );
    // 300000 bytes round up to 586 sectors, aligned to the next 1 MiB.
    assert!(
        dump.contains("start=        4096, size=         586, type=82"),
        "{dump}"
    );
    drop(s);
    for (n, f) in files.iter().enumerate() {
        let p = Server::start(&[
            "--filter=partition",
            "partitioning",
            &files[0],
            &files[1],
            &format!("partition={}", n + 1),
        ]);
        let got = read_all(&p.uri);
        let want = std::fs::read(f).unwrap();
        assert_eq!(&got[..want.len()], &want[..], "partition {}", n + 1);
        assert!(got[want.len()..].iter().all(|&b| b == 0));
    }
    // Writes reach the file; the table cannot be changed.
    let s = Server::start(&["partitioning", &files[0], &files[1]]);
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x66 1049088 512", &s.uri]));
    assert!(std::fs::read(&files[0]).unwrap()[512..1024]
        .iter()
        .all(|&b| b == 0x66));
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x66 0 512", &s.uri])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("error") || !out.status.success(), "{text}");
}

#[test]
fn partitioning_gpt_and_mbr_logical_partitions() {
    if !have("nbdcopy") || !have("sfdisk") || !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let files = partition_files(dir.path(), &[4096, 8192, 512, 70_000, 1 << 20, 5000]);
    let mut args = vec!["partitioning", "alignment=64K"];
    args.extend(files.iter().map(|f| f.as_str()));
    // More than four files: GPT by default.
    let s = Server::start(&args);
    let dump = sfdisk_dump(&s.uri);
    assert!(dump.contains("label: gpt"), "{dump}");
    assert_eq!(
        dump.matches("type=0FC63DAF-8483-4772-8E79-3D69D8477DE4")
            .count(),
        6,
        "{dump}"
    );
    drop(s);
    // The same files in an MBR: three primaries, then logical partitions.
    let mut mbr = args.clone();
    mbr.insert(1, "partition-type=mbr");
    let s = Server::start(&mbr);
    let dump = sfdisk_dump(&s.uri);
    assert!(dump.contains("label: dos"), "{dump}");
    assert!(dump.contains("type=5"), "{dump}");
    assert_eq!(dump.matches("type=83").count(), 6, "{dump}");
    drop(s);
    for kind in ["gpt", "mbr"] {
        for n in [1usize, 4, 5, 6] {
            let mut a = vec!["--filter=partition".to_string()];
            a.extend(args.iter().map(|s| s.to_string()));
            a.insert(2, format!("partition-type={kind}"));
            // MBR numbers logical partitions from 5: files 4..6 are 5..7.
            let number = if kind == "mbr" && n >= 4 { n + 1 } else { n };
            a.push(format!("partition={number}"));
            let refs: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
            let p = Server::start(&refs);
            let got = read_all(&p.uri);
            let want = std::fs::read(&files[n - 1]).unwrap();
            assert_eq!(&got[..want.len()], &want[..], "{kind} file {n}");
        }
    }
}

// ---------------------------------------------------------------- tmpdisk

#[test]
fn tmpdisk_gives_each_client_a_fresh_filesystem() {
    if !have("nbdcopy") || !have("qemu-io") || !have("dumpe2fs") || !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let s = Server::start_with(
        &["tmpdisk", "16M", "label=scratch"],
        &[("TMPDIR", tmp.to_str().unwrap())],
    );
    let info = nbdinfo_json(&[], &s.uri);
    assert_eq!(info["export-size"], (16 << 20).to_string());
    assert_eq!(info["is_read_only"], "false");
    assert_eq!(info["can_multi_conn"], "false");
    let img = dir.path().join("copy.img");
    run_ok(Command::new("nbdcopy").arg(&s.uri).arg(&img));
    let fs = stdout_of(Command::new("dumpe2fs").arg("-h").arg(&img));
    assert!(fs.contains("Filesystem volume name:   scratch"), "{fs}");
    // A client's writes are its own: the next client sees a fresh disk.
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x99 0 4096", &s.uri]));
    let again = read_all(&s.uri);
    assert!(again[..4096].iter().any(|&b| b != 0x99));
    // Nothing is left in TMPDIR once the clients are gone.
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
    drop(s);
    // command= gets $disk, $size and other parameters as variables.
    let s = Server::start_with(
        &[
            "tmpdisk",
            "size=1M",
            "fill=AB",
            "command=truncate -s $size \"$disk\" && printf %s \"$fill\" | dd of=\"$disk\" conv=notrunc status=none",
        ],
        &[("TMPDIR", tmp.to_str().unwrap())],
    );
    let d = read_all(&s.uri);
    assert_eq!(d.len(), 1 << 20);
    assert_eq!(&d[..3], b"AB\0");
    drop(s);
    assert!(
        fails_stderr(&["-U", "-", "tmpdisk", "1M", "type=nosuchfs", "--run", "true"])
            .contains("mkfs.nosuchfs")
    );
}

// ---------------------------------------------------------------- info

#[test]
fn info_reflects_export_name_address_and_clocks() {
    if !have_python_nbd() {
        return;
    }
    let s = Server::start(&["info"]);
    nbd_script(
        r#"
assert h.get_size() == 5
assert h.pread(5, 0) == b"hello"
assert h.is_read_only()
"#,
        &[&s.uri_for("hello")],
    );
    drop(s);
    let s = Server::start(&["info", "mode=base64exportname"]);
    nbd_script(
        r#"
assert h.pread(h.get_size(), 0) == b"hello nbdkit user"
"#,
        &[&s.uri_for("aGVsbG8gbmJka2l0IHVzZXI=")],
    );
    drop(s);
    // Unix sockets say "unix"; TCP gives the client's address and port.
    let s = Server::start(&["info", "address"]);
    nbd_script(
        r#"
assert h.pread(h.get_size(), 0) == b"unix", h.pread(h.get_size(), 0)
"#,
        &[&s.uri],
    );
    drop(s);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = run_ok(Command::new(binary()).args([
        "-f",
        "-i",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "info",
        "mode=address",
        "--run",
        &format!("{NBDSH} -u \"$uri\" -c 'sys.stdout.write(h.pread(h.get_size(), 0).decode())'"),
    ]));
    let addr = String::from_utf8_lossy(&out.stdout);
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    assert!(addr[10..].parse::<u16>().is_ok(), "{addr}");
    for mode in ["time", "uptime", "conntime"] {
        let s = Server::start(&["info", mode]);
        let out = nbd_script(
            r#"
import time
assert h.get_size() == 12
b = h.pread(12, 0)
secs, usecs = int.from_bytes(b[:8], "big"), int.from_bytes(b[8:], "big")
assert usecs < 1000000
print(secs)
"#,
            &[&s.uri],
        );
        let secs: u64 = out.lines().next().unwrap().trim().parse().unwrap();
        if mode == "time" {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            assert!(secs.abs_diff(now) < 3600, "{mode}: {secs} vs {now}");
        } else {
            // The server started moments ago; an hour is a generous bound
            // that still tells seconds from garbage.
            assert!(secs < 3600, "{mode}: {secs}");
        }
    }
}

// ---------------------------------------------------------------- nbd

#[test]
fn nbd_proxies_nbdkit_rs_with_every_capability() {
    if !have("qemu-io") || !have("nbdinfo") || !have("nbdcopy") || !have_python_nbd() {
        return;
    }
    let up = Server::start(&["memory", "size=64M"]);
    let px = Server::start(&["nbd", &format!("socket={}", up.socket.display())]);
    // What the upstream advertises comes through unchanged.
    assert_same_offer(&up.uri, &px.uri);
    qemu_io_ok(&px.uri, PROXY_IO);
    // Block status passes through: what was written is data, the rest holes.
    assert_eq!(map_of(&px.uri), map_of(&up.uri));
    assert!(read_all(&px.uri) == read_all(&up.uri));
    // Many requests in flight at once, answered out of order, and errors
    // with their errno.
    nbd_script(
        r#"
bufs = []
for i in range(64):
    b = nbd.Buffer(65536)
    h.aio_pread(b, (i % 8) * 65536 + (1 << 20))
    bufs.append(b)
while h.aio_in_flight() > 0:
    h.poll(-1)
for b in bufs:
    assert b.to_bytearray() == b"\x3c" * 65536
h.set_strict_mode(0)
try:
    h.pread(512, 64 * 1024 * 1024)
    raise SystemExit("read past the end succeeded")
except nbd.Error as e:
    assert e.errnum in (errno.EINVAL, errno.EIO), e
h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO)
"#,
        &[&px.uri],
    );
    drop(px);
    // uri= and export= select the upstream export.
    let px = Server::start(&[
        "nbd",
        &format!("uri=nbd+unix:///?socket={}", up.socket.display()),
    ]);
    assert_eq!(
        nbdinfo_json(&[], &px.uri)["export-size"],
        (64 << 20).to_string()
    );
}

#[test]
fn nbd_proxies_qemu_nbd() {
    if !have("qemu-nbd") || !have("qemu-io") || !have("nbdinfo") || !have("nbdcopy") {
        return;
    }
    let (dir, img, _) = temp_file("disk.img", 4 << 20, 9);
    let sock = dir.path().join("qemu.sock");
    /// Stops qemu-nbd even when an assertion fails.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut qemu = Killed(
        Command::new("qemu-nbd")
            .args(["-f", "raw", "-t", "-x", "vm", "-k"])
            .arg(&sock)
            .arg(&img)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // qemu-nbd has no readiness signal: wait for its socket to accept.
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        if let Ok(Some(st)) = qemu.0.try_wait() {
            panic!("qemu-nbd exited: {st}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let px = Server::start(&["nbd", &format!("socket={}", sock.display()), "export=vm"]);
    let info = nbdinfo_json(&[], &px.uri);
    assert_eq!(info["export-size"], (4 << 20).to_string());
    assert_eq!(info["is_read_only"], "false");
    assert!(info["contexts"].contains("base:allocation"), "{info:?}");
    assert!(read_all(&px.uri) == std::fs::read(&img).unwrap());
    qemu_io_ok(&px.uri, &["write -P 0x21 512k 128k", "flush"]);
    assert!(std::fs::read(&img).unwrap()[512 << 10..640 << 10]
        .iter()
        .all(|&b| b == 0x21));
    // A wrong export name is an error at open, not a hang.
    let bad = Server::start(&["nbd", &format!("socket={}", sock.display()), "export=nope"]);
    assert!(!nbdinfo_ok(&[&bad.uri]));
    drop(px);
    drop(bad);
    drop(qemu);
}

#[test]
fn nbd_proxies_over_tcp_with_hostname_and_port() {
    if !have("nbdinfo") || !have("nbdcopy") {
        return;
    }
    use std::io::BufRead;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let mut up = Command::new(binary())
        .args([
            "-f",
            "--exit-with-parent",
            "--print-uri",
            "-i",
            "127.0.0.1",
            "-p",
            &port,
        ])
        .args(["data", "( \"upstream\" )*64"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // --print-uri comes once the socket listens.
    let mut line = String::new();
    std::io::BufReader::new(up.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("nbd://"), "{line}");
    let px = Server::start(&["nbd", "hostname=127.0.0.1", &format!("port={port}")]);
    let data = read_all(&px.uri);
    let _ = up.kill();
    let _ = up.wait();
    assert_eq!(data, b"upstream".repeat(64));
    // Bad parameters are one clear error at start-up.
    for bad in [
        &["nbd", "port=1"][..],
        &["nbd", "socket=/x", "uri=nbd://h/"],
        &["nbd", "socket=/x", "tls=maybe"],
        &["nbd", "vsock=2"],
        &["nbd", "socket=/x", "arg=-f"],
    ] {
        let mut args = vec!["-U", "-"];
        args.extend_from_slice(bad);
        args.extend(["--run", "true"]);
        assert!(fails_stderr(&args).contains("nbd:"), "{bad:?}");
    }
}

/// Processes with `arg` as one of their arguments (exactly: the proxy's own
/// `arg=ARG` does not count).
fn processes_with(arg: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            if c.split(|&b| b == 0).any(|a| a == arg.as_bytes()) {
                out.push(pid);
            }
        }
    }
    out
}

/// Wait (up to 5 s) until no process has the argument `needle`.
fn gone(needle: &str) -> bool {
    for _ in 0..250 {
        if processes_with(needle).is_empty() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    false
}

#[test]
fn nbd_command_runs_qemu_nbd_with_socket_activation() {
    if !have("qemu-nbd") || !have("qemu-io") || !have("nbdcopy") {
        return;
    }
    let (dir, img, _) = temp_file("disk.img", 4 << 20, 13);
    let img_arg = format!("arg={}", img.display());
    // The socket directories go in our own temporary directory (the proxy
    // killed below cannot remove its own).
    let tmp = [("TMPDIR", dir.path().to_str().unwrap())];
    let px = Server::start_with(
        &["nbd", "command=qemu-nbd", "arg=-f", "arg=raw", &img_arg],
        &tmp,
    );
    assert!(read_all(&px.uri) == std::fs::read(&img).unwrap());
    // One qemu-nbd (shared: one server, one connection).
    assert_eq!(processes_with(&img.display().to_string()).len(), 1);
    qemu_io_ok(&px.uri, &["write -P 0x5a 1M 64k", "flush"]);
    // A second client, the same connection to the same qemu-nbd (which,
    // without -t, would exit after its first client).
    assert!(read_all(&px.uri)[1 << 20..(1 << 20) + (64 << 10)]
        .iter()
        .all(|&b| b == 0x5a));
    assert!(std::fs::read(&img).unwrap()[1 << 20..(1 << 20) + 4096]
        .iter()
        .all(|&b| b == 0x5a));
    // The socket is in a private directory, removed with the server.
    let socket_dirs = || {
        std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("nbdkit-rs-nbd"))
            .map(|e| e.path())
            .collect::<Vec<_>>()
    };
    let dirs = socket_dirs();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&dirs[0]).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    // A graceful exit stops qemu-nbd.
    assert!(px.stop().success());
    assert!(gone(&img.display().to_string()), "qemu-nbd still runs");
    assert!(socket_dirs().is_empty());

    // Killed with SIGKILL, the proxy still takes qemu-nbd with it
    // (PR_SET_PDEATHSIG).
    let px = Server::start_with(
        &["nbd", "command=qemu-nbd", "arg=-f", "arg=raw", &img_arg],
        &tmp,
    );
    run_ok(Command::new("nbdinfo").arg(&px.uri));
    assert_eq!(processes_with(&img.display().to_string()).len(), 1);
    drop(px);
    assert!(
        gone(&img.display().to_string()),
        "qemu-nbd outlived a killed proxy"
    );

    // A command that cannot run is a start-up error.
    let err = fails_stderr(&[
        "-U",
        "-",
        "nbd",
        "command=/nonexistent/nbd-server",
        "--run",
        "true",
    ]);
    assert!(err.contains("/nonexistent/nbd-server"), "{err}");
}

#[test]
fn nbd_command_shared_false_starts_a_server_per_client() {
    if !have("qemu-io") || !have("nbdinfo") {
        return;
    }
    // Our own binary, socket-activated: memory disks, so a write is seen
    // again only by a client of the same server.
    let bin = format!("command={}", binary().display());
    // An argument no other test's server has.
    let marker = format!("size={}", (3 << 20) + 512);
    let write = |uri: &str| {
        run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x77 0 4k", uri]));
    };
    let first_byte = |uri: &str| read_all(uri)[0];
    let dir = tempfile::tempdir().unwrap();
    let tmp = [("TMPDIR", dir.path().to_str().unwrap())];

    let px = Server::start_with(&["nbd", &bin, "arg=memory", &format!("arg={marker}")], &tmp);
    write(&px.uri);
    assert_eq!(
        first_byte(&px.uri),
        0x77,
        "shared (the default): one server"
    );
    assert_eq!(processes_with(&marker).len(), 1);
    drop(px);
    assert!(gone(&marker));

    let px = Server::start_with(
        &[
            "nbd",
            &bin,
            "arg=memory",
            &format!("arg={marker}"),
            "shared=false",
        ],
        &tmp,
    );
    // No server until a client comes.
    assert!(processes_with(&marker).is_empty());
    write(&px.uri);
    assert_eq!(
        first_byte(&px.uri),
        0,
        "shared=false: a fresh server per client"
    );
    let info = nbdinfo_json(&[], &px.uri);
    assert_eq!(info["export-size"], ((3 << 20) + 512).to_string());
    // Each client's server stops when the client leaves.
    assert!(gone(&marker), "per-client servers left behind");
}

#[test]
fn nbd_retry_waits_for_a_late_server() {
    if !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let late = dir.path().join("late.sock");
    let sock = format!("socket={}", late.display());
    // No server yet, no retry: shared=true connects at start-up and fails.
    let e = fails_stderr(&["-U", "-", "nbd", &sock, "shared=true", "--run", "true"]);
    assert!(
        e.contains("connecting to") && e.contains("late.sock"),
        "{e}"
    );

    // With retry=, the proxy waits for it: the upstream appears (as a
    // symlink to its socket) a moment after the proxy started.
    let px = Server::start(&["nbd", &sock, "shared=true", "retry=10"]);
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let up = Server::start(&["memory", "size=5M"]);
    std::os::unix::fs::symlink(&up.socket, &late).unwrap();
    let out = stdout_of(Command::new("nbdinfo").args(["--size", &px.uri]));
    assert_eq!(out.trim(), "5242880");
    assert!(px.log().contains("retrying in 1 s"), "{}", px.log());

    // Per-client connections retry too.
    let later = dir.path().join("later.sock");
    let px = Server::start(&["nbd", &format!("socket={}", later.display()), "retry=10"]);
    let link = std::thread::spawn({
        let target = up.socket.clone();
        move || {
            std::thread::sleep(std::time::Duration::from_millis(1200));
            std::os::unix::fs::symlink(target, later).unwrap();
        }
    });
    let out = stdout_of(Command::new("nbdinfo").args(["--size", &px.uri]));
    link.join().unwrap();
    assert_eq!(out.trim(), "5242880");
}

#[test]
fn nbd_shared_true_uses_one_upstream_connection() {
    if !have_python_nbd() {
        return;
    }
    // An upstream that admits one client at a time.
    let up = Server::start(&["--filter=limit", "memory", "size=1M", "limit=1"]);
    let sock = format!("socket={}", up.socket.display());
    let two_clients = r#"
import nbd, sys
a = nbd.NBD(); a.connect_uri(sys.argv[1])
b = nbd.NBD(); b.connect_uri(sys.argv[1])
a.pwrite(b"A" * 512, 0)
b.flush()
assert b.pread(512, 0) == b"A" * 512
print("OK")
"#;
    let px = Server::start(&["nbd", &sock, "shared=true"]);
    python(two_clients, &[&px.uri]);
    drop(px);
    // One connection per client: the second is refused upstream.
    let px = Server::start(&["nbd", &sock]);
    let out = Command::new(PYTHON)
        .args(["-c", two_clients, &px.uri])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a second upstream connection was admitted"
    );
}

#[test]
fn nbd_socket_fd_uses_an_inherited_connection() {
    if !have("nbdinfo") || !have("nbdcopy") {
        return;
    }
    use std::io::BufRead;
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    // The upstream speaks NBD on its stdin/stdout (-s): our end of the pair.
    let theirs = OwnedFd::from(theirs);
    let mut up = Command::new(binary())
        .args(["-s", "data", "( \"socket-fd!\" )*100"])
        .stdin(Stdio::from(theirs.try_clone().unwrap()))
        .stdout(Stdio::from(theirs))
        .spawn()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("px.sock");
    let fd = ours.as_raw_fd();
    let mut cmd = Command::new(binary());
    cmd.args(["-f", "--print-uri", "-U"])
        .arg(&sock)
        .args(["nbd", "socket-fd=3"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("px.log")).unwrap());
    // SAFETY: dup2 and fcntl are async-signal-safe; fd is open in the
    // parent.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself would leave close-on-exec set.
            let r = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if r == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut px = cmd.spawn().unwrap();
    drop(ours);
    let mut line = String::new();
    std::io::BufReader::new(px.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let uri = line.trim().to_string();
    // Two clients in turn, over the one inherited connection.
    let a = read_all(&uri);
    let b = read_all(&uri);
    let _ = px.kill();
    let _ = px.wait();
    let log = std::fs::read_to_string(dir.path().join("px.log")).unwrap();
    assert_eq!(a, b"socket-fd!".repeat(100), "{log}");
    assert_eq!(b, a);
    // The proxy is gone, so the upstream's connection ends and it exits.
    assert!(up.wait().unwrap().success());

    // socket-fd= is one connection: it cannot be per client, and it must
    // be a socket.
    for (args, why) in [
        (&["socket-fd=0", "shared=false"][..], "shared=true"),
        (&["socket-fd=99"], "not an open socket"),
    ] {
        let e = fails_stderr(&[&["-U", "-", "nbd"], args, &["--run", "true"]].concat());
        assert!(e.contains(why), "{args:?}: {e}");
    }
}

#[test]
fn nbd_dynamic_export_passes_export_names_through() {
    if !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("small"), vec![1u8; 4096]).unwrap();
    std::fs::write(dir.path().join("large"), vec![2u8; 65536]).unwrap();
    let up = Server::start(&["file", &format!("dir={}", dir.path().display())]);
    let px = Server::start(&[
        "nbd",
        &format!("socket={}", up.socket.display()),
        "dynamic-export=true",
    ]);
    let size = |export: &str| {
        stdout_of(Command::new("nbdinfo").args(["--size", &px.uri_for(export)]))
            .trim()
            .to_string()
    };
    assert_eq!(size("small"), "4096");
    assert_eq!(size("large"), "65536");
    // The upstream's list, passed through.
    let list = stdout_of(Command::new("nbdinfo").args(["--list", &px.uri]));
    assert!(
        list.contains("export=\"small\"") && list.contains("export=\"large\""),
        "{list}"
    );
    assert!(!nbdinfo_ok(&["--size", &px.uri_for("missing")]));
}

#[test]
fn eval_preconnect_sees_readonly_and_can_refuse_clients() {
    if !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("seen");
    let gate = dir.path().join("closed");
    let pre = format!(
        "preconnect=echo \"$2\" >> {}; if [ -e {} ]; then echo 'EPERM closed for maintenance' >&2; exit 1; fi",
        seen.display(),
        gate.display()
    );
    let s = Server::start(&[
        "-r",
        "eval",
        "get_size=echo 64K",
        "pread=head -c $3 /dev/zero",
        &pre,
    ]);
    assert!(run_ok(Command::new("nbdinfo").arg("--size").arg(&s.uri))
        .status
        .success());
    std::fs::write(&gate, b"").unwrap();
    let refused = Command::new("nbdinfo")
        .arg("--size")
        .arg(&s.uri)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(s.log().contains("closed for maintenance"), "{}", s.log());
    let lines = std::fs::read_to_string(&seen).unwrap();
    assert_eq!(lines, "true\ntrue\n", "preconnect's readonly argument");
}

/// `--dump-plugin` with a script: after the server's lines, what the
/// script's dump_plugin method prints (nothing when it has none).
#[test]
fn sh_and_eval_dump_plugin_run_the_script() {
    let script = data_script("dump-plugin.sh");
    let run = |args: &[&str]| {
        let out = Command::new(binary()).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = run(&["sh", &script, "--dump-plugin"]);
    assert!(out.starts_with("path="), "{out}");
    assert!(out.contains("name=sh\n"), "{out}");
    assert!(out.ends_with("my_script_version=7\n"), "{out}");
    let out = run(&[
        "eval",
        "dump_plugin=echo from_eval=1",
        "get_size=echo 1M",
        "pread=exit 1",
        "--dump-plugin",
    ]);
    assert!(out.ends_with("from_eval=1\n"), "{out}");
    // Without dump_plugin, only the server's lines.
    let out = run(&["eval", "get_size=echo 1M", "pread=exit 1", "--dump-plugin"]);
    assert!(
        out.contains("name=eval\n") && !out.contains("from_eval"),
        "{out}"
    );
}
