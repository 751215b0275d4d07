//! Plugin and filter parameters from nbdkit 1.34–1.46 (issue #14), each
//! driven by a real client: sh/eval exit statuses 4–8, file `fd=` and
//! `dirfd=`, partition `partition-sectorsize=`, one cow overlay per
//! export, retry of a failed open, info `mode=version`, fua
//! `flush-on-close=` and `fua-mode=`, ondemand `share=`.

mod common;

use std::process::Command;

use common::*;

// ------------------------------------------------------ sh/eval exit codes

/// 6 drops the client without a reply, 7 and 8 after the reply (8 with
/// ESHUTDOWN), 4 shuts the whole server down after a good reply.
#[test]
fn eval_exit_codes_disconnect_and_shut_down() {
    if !have_python_nbd() {
        return;
    }
    let zeroes = "dd if=/dev/zero count=$3 iflag=count_bytes status=none";
    let pread = format!(
        "pread=case $2 in
           hard) exit 6 ;;
           soft) {zeroes}; exit 7 ;;
           softerr) exit 8 ;;
           shutdown) {zeroes}; exit 4 ;;
           *) {zeroes} ;;
         esac"
    );
    let mut s = Server::start(&[
        "eval",
        "get_size=echo 1M",
        "open=echo $3",
        &pread,
        "thread_model=echo parallel",
    ]);
    python(
        r#"
import nbd, sys, errno
sock = sys.argv[1]
def conn(name):
    h = nbd.NBD()
    h.set_export_name(name)
    h.connect_unix(sock)
    return h
h = conn("hard")
try:
    h.pread(512, 0)
    raise SystemExit("exit 6: the read was answered")
except nbd.Error:
    pass
h = conn("soft")
assert h.pread(512, 0) == bytes(512)
try:
    h.pread(512, 0)
    raise SystemExit("exit 7: the connection stayed open")
except nbd.Error:
    pass
h = conn("softerr")
try:
    h.pread(512, 0)
    raise SystemExit("exit 8: the read succeeded")
except nbd.Error as e:
    assert e.errnum == errno.ESHUTDOWN, e
try:
    h.pread(512, 0)
    raise SystemExit("exit 8: the connection stayed open")
except nbd.Error:
    pass
# The server still serves others.
h = conn("other")
assert h.pread(512, 0) == bytes(512)
assert h.pread(512, 0) == bytes(512)
h.shutdown()
h = conn("shutdown")
assert h.pread(512, 0) == bytes(512)
print("OK")
"#,
        &[s.socket.to_str().unwrap()],
    );
    // Exit 4 asked the server to shut down: it exits by itself, cleanly.
    let status = s.child.wait().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn sh_dump_plugin_says_max_known_status() {
    let out = stdout_of(Command::new(binary()).args([
        "eval",
        "get_size=echo 1M",
        "pread=exit 1",
        "--dump-plugin",
    ]));
    assert!(out.contains("\nmax_known_status=8\n"), "{out}");
}

// ------------------------------------------------------- file fd= / dirfd=

/// The server is started by Python with descriptors it opened: a file
/// that no longer has a name (so only the descriptor can reach it), a
/// read-only one, and a directory.
#[test]
fn file_serves_inherited_descriptors() {
    if !have_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exports = dir.path().join("exports");
    std::fs::create_dir(&exports).unwrap();
    std::fs::write(exports.join("a.img"), vec![0xaa; 65536]).unwrap();
    std::fs::write(exports.join("b.img"), vec![0xbb; 4096]).unwrap();
    std::fs::create_dir(exports.join("subdir")).unwrap();
    python(
        r#"
import nbd, os, subprocess, sys
binary, tmp, exports = sys.argv[1:4]

def serve(fd, param):
    sock = os.path.join(tmp, "s%d.sock" % fd)
    p = subprocess.Popen([binary, "-f", "--print-uri", "-U", sock, "file",
                          "%s=%d" % (param, fd)],
                         pass_fds=[fd], stdout=subprocess.PIPE)
    assert p.stdout.readline().strip(), "the server did not start"
    return p, sock

def connect(sock, name=""):
    h = nbd.NBD()
    h.set_export_name(name)
    h.connect_unix(sock)
    return h

# fd=: read-write, on a file that has no name any more.
path = os.path.join(tmp, "gone.img")
with open(path, "wb") as f:
    f.write(b"\x11" * 1048576)
fd = os.open(path, os.O_RDWR)
os.unlink(path)
p, sock = serve(fd, "fd")
h = connect(sock)
assert h.get_size() == 1048576
assert not h.is_read_only()
assert h.pread(4, 0) == b"\x11" * 4
h.pwrite(b"hello", 4096)
h.flush()
h.shutdown()
# A second connection (its own duplicate) sees the write.
h = connect(sock)
assert h.pread(5, 4096) == b"hello"
h.shutdown()
p.terminate(); p.wait()
assert os.pread(fd, 5, 4096) == b"hello"
os.close(fd)

# fd= opened read-only: served read-only.
ro = os.open(os.path.join(exports, "a.img"), os.O_RDONLY)
p, sock = serve(ro, "fd")
h = connect(sock)
assert h.is_read_only()
assert h.pread(2, 0) == b"\xaa\xaa"
h.shutdown()
p.terminate(); p.wait()
os.close(ro)

# dirfd=: one export per regular file, opened relative to the descriptor.
d = os.open(exports, os.O_RDONLY | os.O_DIRECTORY)
p, sock = serve(d, "dirfd")
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_unix(sock)
names = []
def listed(name, description):
    names.append(name)
    return 0
h.opt_list(listed)
h.opt_abort()
assert sorted(names) == ["a.img", "b.img"], names
h = connect(sock, "b.img")
assert h.get_size() == 4096
assert h.pread(3, 0) == b"\xbb" * 3
h.pwrite(b"B", 0)
h.shutdown()
for bad in ["", "../x", "subdir", "missing"]:
    try:
        connect(sock, bad)
        raise SystemExit("export %r was served" % bad)
    except nbd.Error:
        pass
p.terminate(); p.wait()
os.close(d)
print("OK")
"#,
        &[
            binary().to_str().unwrap(),
            dir.path().to_str().unwrap(),
            exports.to_str().unwrap(),
        ],
    );
    assert_eq!(std::fs::read(exports.join("b.img")).unwrap()[0], b'B');
}

#[test]
fn file_fd_and_dirfd_are_checked() {
    let e = start_refused(&["file", "fd=1"], &[]);
    assert!(e.contains("fd=1") && e.contains("greater than 2"), "{e}");
    let e = start_refused(&["file", "fd=987"], &[]);
    assert!(
        e.contains("fd=987") && e.contains("not an open file descriptor"),
        "{e}"
    );
    let e = start_refused(&["file", "dirfd=x"], &[]);
    assert!(e.contains("dirfd=x"), "{e}");
    let e = start_refused(&["file", "fd=3", "dir=/tmp"], &[]);
    assert!(e.contains("only one of"), "{e}");
    // Descriptors of the wrong kind, inherited through the shell.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, b"x").unwrap();
    let sock = dir.path().join("s");
    let run = |args: &str, redirect: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(format!("exec \"$0\" -f -U \"$1\" file {args} {redirect}"))
            .arg(binary())
            .arg(&sock)
            .output()
            .unwrap()
    };
    let out = run("dirfd=3", &format!("3<{}", img.display()));
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("dirfd=3") && e.contains("not a directory"),
        "{e}"
    );
    let out = run("fd=3", &format!("3<{}", dir.path().display()));
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("fd=3") && e.contains("dirfd="), "{e}");
}

// ------------------------------------------------- partition-sectorsize=

/// An MBR made by fdisk for 4096-byte sectors (`fdisk -b 4096`; this
/// util-linux's sfdisk has no `--sector-size`): its LBAs mean 8 times
/// more bytes than the usual 512-byte reading.
#[test]
fn partition_sectorsize_reads_4k_mbr() {
    if !have("fdisk") || !have("nbdinfo") || !have("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("4k.img");
    let mut data = vec![0u8; 16 << 20];
    // Partition 2: LBA 1024, 512 sectors of 4K = 2 MiB at 4 MiB in.
    let p2 = 1024 * 4096;
    data[p2..p2 + 8].copy_from_slice(b"PART-TWO");
    std::fs::write(&img, &data).unwrap();
    let mut fdisk = Command::new("fdisk")
        .args(["-b", "4096"])
        .arg(&img)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    // New DOS label; p1 at LBA 256 (256 sectors), p2 at LBA 1024 (512).
    fdisk
        .stdin
        .take()
        .unwrap()
        .write_all(b"o\nn\np\n1\n256\n+255\nn\np\n2\n1024\n+511\nw\n")
        .unwrap();
    assert!(fdisk.wait().unwrap().success());
    let img = img.to_str().unwrap();
    let check = |args: &[&str]| {
        let s = Server::start(args);
        let info = nbdinfo_json(&[], &s.uri);
        assert_eq!(info["export-size"], (512 * 4096).to_string(), "{args:?}");
        assert_eq!(&read_all(&s.uri)[..8], b"PART-TWO", "{args:?}");
        assert!(s.stop().success());
    };
    check(&[
        "--filter=partition",
        "file",
        img,
        "partition=2",
        "partition-sectorsize=4096",
    ]);
    // By default the sector size follows the plugin's minimum block size.
    check(&[
        "--filter=partition",
        "--filter=blocksize-policy",
        "file",
        img,
        "partition=2",
        "blocksize-minimum=4096",
    ]);
    // Read as 512-byte sectors the same table says something else.
    let s = Server::start(&[
        "--filter=partition",
        "file",
        img,
        "partition=2",
        "partition-sectorsize=512",
    ]);
    let info = nbdinfo_json(&[], &s.uri);
    assert_eq!(info["export-size"], (512 * 512).to_string());
    assert!(s.stop().success());
    let e = start_refused(
        &[
            "--filter=partition",
            "file",
            img,
            "partition=1",
            "partition-sectorsize=1024",
        ],
        &[],
    );
    assert!(e.contains("partition-sectorsize=1024"), "{e}");
}

// ---------------------------------------------------- cow: one per export

#[test]
fn cow_keeps_one_overlay_per_export() {
    if !have_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a"), vec![0x11; 1 << 20]).unwrap();
    std::fs::write(dir.path().join("b"), vec![0x22; 2 << 20]).unwrap();
    let s = Server::start(&[
        "--filter=cow",
        "file",
        &format!("dir={}", dir.path().display()),
    ]);
    python(
        r#"
import nbd, sys
sock = sys.argv[1]
def conn(name):
    h = nbd.NBD()
    h.set_export_name(name)
    h.connect_unix(sock)
    return h
a = conn("a")
b = conn("b")
assert (a.get_size(), b.get_size()) == (1 << 20, 2 << 20)
a.pwrite(b"AAAA", 0)
b.pwrite(b"BBBB", 0)
a.shutdown(); b.shutdown()
a = conn("a")
b = conn("b")
assert a.pread(5, 0) == b"AAAA\x11", a.pread(5, 0)
assert b.pread(5, 0) == b"BBBB\x22", b.pread(5, 0)
print("OK")
"#,
        &[s.socket.to_str().unwrap()],
    );
    assert!(s.stop().success());
    // The files themselves were never written.
    assert!(std::fs::read(dir.path().join("a"))
        .unwrap()
        .iter()
        .all(|&x| x == 0x11));
    assert!(std::fs::read(dir.path().join("b"))
        .unwrap()
        .iter()
        .all(|&x| x == 0x22));
}

// ----------------------------------------------------- retry a failed open

#[test]
fn retry_filter_retries_a_failed_open() {
    if !have_python_nbd() {
        return;
    }
    // The plugin refuses its first two opens (a source not up yet).
    let open = r#"open=n=$(cat "$tmpdir/opens" 2>/dev/null || echo 0)
        echo $((n + 1)) > "$tmpdir/opens"
        if [ "$n" -lt 2 ]; then echo "EIO not up yet" >&2; exit 1; fi"#;
    let s = Server::start(&[
        "-v",
        "--filter=retry",
        "eval",
        "get_size=echo 64K",
        open,
        "pread=dd if=/dev/zero count=$3 iflag=count_bytes status=none",
        "retry-delay=10ms",
        "retries=3",
    ]);
    python(
        r#"
import nbd, sys
h = nbd.NBD()
h.connect_unix(sys.argv[1])
assert h.get_size() == 65536
assert h.pread(512, 0) == bytes(512)
print("OK")
"#,
        &[s.socket.to_str().unwrap()],
    );
    assert!(s.log().contains("open failed"), "{}", s.log());
    assert!(s.stop().success());
    // Out of retries, the client is refused with the plugin's error.
    let s = Server::start(&[
        "--filter=retry",
        "eval",
        "get_size=echo 64K",
        open,
        "pread=exit 1",
        "retry-delay=0",
        "retries=1",
    ]);
    python(
        r#"
import nbd, sys
h = nbd.NBD()
try:
    h.connect_unix(sys.argv[1])
    raise SystemExit("the open succeeded on its third try with retries=1")
except nbd.Error:
    pass
print("OK")
"#,
        &[s.socket.to_str().unwrap()],
    );
    assert!(s.log().contains("not up yet"), "{}", s.log());
    assert!(s.stop().success());
}

// ------------------------------------------------------ info mode=version

#[test]
fn info_mode_version_serves_the_version() {
    if !have("nbdcopy") {
        return;
    }
    let config = stdout_of(Command::new(binary()).arg("--dump-config"));
    let version = config
        .lines()
        .find_map(|l| l.strip_prefix("version="))
        .unwrap();
    let s = Server::start(&["info", "mode=version"]);
    assert_eq!(read_all(&s.uri), version.as_bytes());
    assert!(s.stop().success());
    let s = Server::start(&["info", "version"]);
    assert_eq!(read_all(&s.uri), version.as_bytes());
    assert!(s.stop().success());
    let e = start_refused(&["info", "mode=versions"], &[]);
    assert!(e.contains("mode=versions"), "{e}");
}

// ------------------------------------------------- fua flush-on-close=

/// fua-mode=discard drops the client's flush; flush-on-close still
/// flushes the plugin (seen by the log filter below) when it leaves.
#[test]
fn fua_flush_on_close() {
    if !have_python_nbd() {
        return;
    }
    let flushes = |extra: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("calls.log");
        let logarg = format!("logfile={}", log.display());
        let mut args = vec![
            "--filter=fua",
            "--filter=log",
            "memory",
            "1M",
            logarg.as_str(),
        ];
        args.extend_from_slice(extra);
        let s = Server::start(&args);
        python(
            r#"
import nbd, sys
h = nbd.NBD()
h.connect_unix(sys.argv[1])
h.pwrite(b"x" * 512, 0)
h.flush()
h.shutdown()
print("OK")
"#,
            &[s.socket.to_str().unwrap()],
        );
        // Stopping closes every handle first: the log is complete then.
        assert!(s.stop().success());
        let text = std::fs::read_to_string(&log).unwrap();
        // Each call is logged on entry as "Flush id=N ..." and on return
        // as "...Flush id=N return=0".
        text.lines().filter(|l| l.contains(" Flush id=")).count()
    };
    assert_eq!(flushes(&["fua-mode=discard"]), 0);
    assert_eq!(flushes(&["fua-mode=discard", "flush-on-close=true"]), 1);
    // fuamode= is still the same parameter.
    assert_eq!(flushes(&["fuamode=pass", "flush-on-close=true"]), 2);
    let e = start_refused(
        &["--filter=fua", "memory", "1M", "flush-on-close=often"],
        &[],
    );
    assert!(e.contains("flush-on-close=often"), "{e}");
    let e = start_refused(
        &["--filter=fua", "memory", "1M", "fua-mode=x", "fuamode=none"],
        &[],
    );
    assert!(e.contains("fua-mode") && e.contains("fuamode"), "{e}");
}

// ------------------------------------------------------ ondemand share=

#[test]
fn ondemand_share_lets_two_clients_in() {
    if !have_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exports = format!("dir={}", dir.path().display());
    let both = r#"
import nbd, sys
def conn():
    h = nbd.NBD()
    h.set_export_name("shared")
    h.connect_unix(sys.argv[1])
    return h
first = conn()
try:
    second = conn()
except nbd.Error:
    print("refused")
    raise SystemExit(0)
second.pwrite(b"seen", 0)
second.flush()
assert first.pread(4, 0) == b"seen"
assert first.can_multi_conn()
print("OK")
"#;
    let command = r#"command=truncate -s $size "$disk""#;
    let s = Server::start(&["ondemand", &exports, "1M", command]);
    let out = stdout_of(Command::new(PYTHON).arg("-c").arg(both).arg(&s.socket));
    assert_eq!(out.trim(), "refused", "locked by default");
    assert!(s.stop().success());
    let s = Server::start(&["ondemand", &exports, "1M", command, "share=true"]);
    python(both, &[s.socket.to_str().unwrap()]);
    assert!(s.stop().success());
    let e = start_refused(&["ondemand", &exports, "1M", command, "share=perhaps"], &[]);
    assert!(e.contains("share=perhaps"), "{e}");
}
