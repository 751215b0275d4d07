//! nbdkit compatibility of the filters' semantics, with real clients: the
//! log filter's exact line format (compared with nbdkit's own when it is
//! installed), blocksize's defaults and aligned extents, retry after a
//! reopen, fua's default, truncate's and protect's parameters, the error
//! filter's trigger file.
mod common;
use common::*;
use std::path::Path;
use std::process::Command;

const NBDKIT: &str = "/usr/bin/nbdkit";

/// Run a Python script that connects with `connect_command` to `argv`
/// (a server on stdin/stdout, `-s`); returns its output.
fn python_s(script: &str, argv: &[&str]) -> String {
    let list = argv
        .iter()
        .map(|a| format!("{a:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let code = format!(
        "import nbd, sys\nh = nbd.NBD()\nh.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)\nh.connect_command([{list}])\n{script}\nh.shutdown()\nprint(\"OK\")\n"
    );
    python(&code, &[])
}

/// The log's lines with their timestamps checked and removed.
fn untimed(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| {
            // YYYY-MM-DD HH:MM:SS.uuuuuu
            let (stamp, rest) = l.split_at(26);
            let b = stamp.as_bytes();
            assert!(
                b[4] == b'-' && b[7] == b'-' && b[10] == b' ' && b[13] == b':' && b[19] == b'.',
                "timestamp of {l:?}"
            );
            assert!(
                stamp.chars().filter(|c| c.is_ascii_digit()).count() == 20,
                "{l:?}"
            );
            rest.trim_start().to_string()
        })
        .collect()
}

const REQUESTS: &str = r#"
mb = 1024 * 1024
h.pwrite(b"x" * (2 * mb), mb)
h.pread(mb, 2 * mb)
h.zero(4096, 0, nbd.CMD_FLAG_FUA)
h.flush()
h.trim(4096, 8192)
h.cache(512, 0)
"#;

#[test]
fn log_lines_are_nbdkits() {
    if !have_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours.log");
    let arg = format!("logfile={}", ours.display());
    let bin = binary();
    let bin = bin.to_str().unwrap();
    python_s(
        REQUESTS,
        &[bin, "-s", "--filter=log", "memory", "size=10M", &arg],
    );
    let got = untimed(&std::fs::read_to_string(&ours).unwrap());
    let want = [
        "Ready thread_model=3",
        "Preconnect id=1 readonly=0 ...",
        "...Preconnect id=1 return=0",
    ];
    assert_eq!(got[..3], want, "{got:#?}");
    assert!(
        got[3].starts_with(
            "connection=1 Connect export=\"\" tls=0 size=0xa00000 minsize=0x0 prefsize=0x0 maxsize=0x0 write=1 flush=1 rotational=0 trim=1 zero=2 fua=2 extents=1 cache="
        ),
        "{got:#?}"
    );
    let calls = [
        "connection=1 Write id=1 offset=0x100000 count=0x200000 fua=0 ...",
        "connection=1 ...Write id=1 return=0",
        "connection=1 Read id=2 offset=0x200000 count=0x100000 ...",
        "connection=1 ...Read id=2 return=0",
        "connection=1 Zero id=3 offset=0x0 count=0x1000 trim=1 fua=1 fast=0 ...",
        "connection=1 ...Zero id=3 return=0",
        "connection=1 Flush id=4 ...",
        "connection=1 ...Flush id=4 return=0",
        "connection=1 Trim id=5 offset=0x2000 count=0x1000 fua=0 ...",
        "connection=1 ...Trim id=5 return=0",
        "connection=1 Cache id=6 offset=0x0 count=0x200 ...",
        "connection=1 ...Cache id=6 return=0",
        "connection=1 Disconnect transactions=6",
    ];
    assert_eq!(got[4..], calls, "{got:#?}");

    // Line for line what nbdkit writes for the same requests.
    if Path::new(NBDKIT).exists() {
        let theirs = dir.path().join("theirs.log");
        let arg = format!("logfile={}", theirs.display());
        python_s(
            REQUESTS,
            &[NBDKIT, "-s", "--filter=log", "memory", "size=10M", &arg],
        );
        let want = untimed(&std::fs::read_to_string(&theirs).unwrap());
        let strip_connect = |v: &[String]| -> Vec<String> {
            v.iter()
                .map(|l| match l.split_once(" cache=") {
                    // Our memory plugin's cache is native, nbdkit's emulated.
                    Some((head, _)) if l.contains(" Connect ") => head.to_string(),
                    _ => l.clone(),
                })
                .collect()
        };
        assert_eq!(strip_connect(&got), strip_connect(&want));
    }
}

#[test]
fn log_errors_extents_and_appending() {
    if !have_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    std::fs::write(&log, "# My log\n").unwrap();
    let arg = format!("logfile={}", log.display());
    let bin = binary();
    let bin = bin.to_str().unwrap();
    python_s(
        r#"
try:
    h.pread(512, 0)
    assert False
except nbd.Error as e:
    assert e.errno == "EIO", e
"#,
        &[
            bin,
            "-s",
            "--filter=log",
            "--filter=error",
            "null",
            "size=10M",
            &arg,
            "error-rate=100%",
            "logappend=1",
        ],
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.starts_with("# My log\n"), "{text}");
    assert!(
        text.contains("connection=1 Read id=1 offset=0x0 count=0x200 ...\n"),
        "{text}"
    );
    assert!(
        text.contains("connection=1 ...Read id=1 return=-1 error=EIO\n"),
        "{text}"
    );

    let arg = format!("logfile={}", log.display());
    python_s(
        "h.block_status(65536, 0, lambda *a: 0)",
        &[
            bin,
            "-s",
            "--filter=log",
            "data",
            "@32768 1",
            "size=64K",
            &arg,
        ],
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("My log"), "truncated: {text}");
    assert!(
        text.contains(
            "...Extents id=1 extents=(0x0 0x8000 \"hole,zero\" 0x8000 0x8000 \"\") return=0\n"
        ),
        "{text}"
    );
}

#[test]
fn logscript_gets_nbdkits_variables_and_neither_is_a_no_op() {
    if !have_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let script = format!(
        "logscript=echo $act $type $connection $id $offset $return $error >> {}",
        out.display()
    );
    let bin = binary();
    let bin = bin.to_str().unwrap();
    python_s(
        "h.pread(512, 0)\nh.pwrite(bytearray(512), 512)",
        &[bin, "-s", "--filter=log", "memory", "size=1K", &script],
    );
    let text = std::fs::read_to_string(&out).unwrap();
    for want in [
        "Read ENTER 1 1 0x0\n",
        "Read LEAVE 1 1 0\n",
        "Write ENTER 1 2 0x200\n",
        "Write LEAVE 1 2 0\n",
    ] {
        assert!(text.contains(want), "{want:?} in {text}");
    }
    // Neither logfile= nor logscript=: accepted, and nothing happens.
    python_s(
        "h.pwrite(b\"a\" * 512, 0)",
        &[bin, "-s", "--filter=log", "memory", "size=1K"],
    );
}

/// `nbdinfo --json` of a server started with ARGS (values as strings).
fn info(args: &[&str]) -> std::collections::HashMap<String, String> {
    let s = Server::start(args);
    nbdinfo_json(&[], &s.uri)
}

#[test]
fn fua_default_is_none_as_in_nbdkit() {
    if !have("nbdinfo") {
        return;
    }
    let j = info(&["--filter=fua", "memory", "1M"]);
    assert_eq!(j["can_fua"], "false", "{j:?}");
    let j = info(&["--filter=fua", "memory", "1M", "fuamode=emulate"]);
    assert_eq!(j["can_fua"], "true", "{j:?}");
}

#[test]
fn truncate_parameters_combine_and_may_be_absent() {
    if !have("nbdinfo") {
        return;
    }
    let size = |extra: &[&str]| {
        let mut args = vec!["--filter=truncate", "memory", "5000"];
        args.extend(extra);
        info(&args)["export-size"].parse::<u64>().unwrap()
    };
    assert_eq!(size(&[]), 5000);
    assert_eq!(size(&["truncate=3000", "round-up=4096"]), 4096);
    assert_eq!(
        size(&["truncate=9000", "round-up=4096", "round-down=8192"]),
        8192
    );
    let e = fails_stderr(&[
        "--filter=truncate",
        "memory",
        "1M",
        "round-up=0",
        "--run",
        "true",
    ]);
    assert!(
        e.contains("round-up") && e.contains("greater than 0"),
        "{e}"
    );
}

#[test]
fn protect_accepts_no_range_and_complements() {
    if !have("qemu-io") {
        return;
    }
    let write = |args: &[&str], off: u64| -> bool {
        let s = Server::start(args);
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", &format!("write {off} 512"), &s.uri])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("wrote"))
            .unwrap()
    };
    let base = ["--filter=protect", "memory", "4K"];
    assert!(write(&base, 0), "no protect= protects nothing");
    let comp = [&base[..], &["protect=~1024-2047"]].concat();
    assert!(write(&comp, 1024));
    assert!(!write(&comp, 512));
    assert!(!write(&comp, 2048));
}

#[test]
fn error_file_is_found_after_the_server_changes_directory() {
    if !have_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("sock");
    let pid = dir.path().join("pid");
    let trigger = dir.path().join("trigger");
    // In the background (no -f) the server changes to "/": the relative
    // trigger file name must still mean the one in our directory.
    let st = Command::new(binary())
        .current_dir(dir.path())
        .args(["-P", "pid", "-U"])
        .arg(&sock)
        .args([
            "--filter=error",
            "pattern",
            "1M",
            "error-rate=100%",
            "error-file=trigger",
            "error=ENOSPC",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let uri = format!("nbd+unix://?socket={}", sock.display());
    let r = std::panic::catch_unwind(|| {
        nbd_script(
            r#"
import os
h.pread(512, 0)
open(sys.argv[2], "a").close()
try:
    h.pread(512, 0)
    assert False
except nbd.Error as e:
    assert e.errno == "ENOSPC", e
os.unlink(sys.argv[2])
h.pread(512, 0)
"#,
            &[&uri, trigger.to_str().unwrap()],
        )
    });
    let pid: i32 = std::fs::read_to_string(&pid)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _ = Command::new("kill").arg(pid.to_string()).status();
    r.unwrap();
}

/// An sh plugin script in `dir`.
fn script(dir: &Path, name: &str, text: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/bash\n{text}")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p.display().to_string()
}

fn read_count(p: &Path) -> u32 {
    std::fs::read_to_string(p)
        .unwrap()
        .trim()
        .parse()
        .unwrap_or(0)
}

#[test]
fn retry_readonly_fails_writes_after_the_first_reopen() {
    if !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let plugin = script(
        dir.path(),
        "p.sh",
        &format!(
            r#"case "$1" in
  open) read i < {d}/opens; echo $((i+1)) > {d}/opens ;;
  can_write) ;;
  pwrite) echo "EIO pwrite failed" >&2; exit 1 ;;
  get_size) echo 512 ;;
  *) exit 2 ;;
esac
"#
        ),
    );
    std::fs::write(dir.path().join("opens"), "0\n").unwrap();
    let s = Server::start(&[
        "sh",
        &plugin,
        "--filter=retry",
        "retry-delay=10ms",
        "retry-readonly=yes",
    ]);
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "w 0 512", "-c", "w 0 512", &s.uri])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    drop(s);
    assert!(!text.contains("wrote"), "{text}");
    // The first open, and one read-only reopen: the failed write is not
    // retried on a read-only connection, nor is the second one.
    assert_eq!(read_count(&dir.path().join("opens")), 2, "{text}");
}

#[test]
fn retry_checks_the_reopened_size_and_capabilities() {
    if !have_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    // Open 1: reads fail.  Open 2: the plugin shrinks to 512 bytes, so a
    // cache at 512 must not reach it.  Open 3: back to 1024.
    let plugin = script(
        dir.path(),
        "p.sh",
        &format!(
            r#"case "$1" in
  open) read i < {d}/opens; echo $((i+1)) > {d}/opens ;;
  get_size) read i < {d}/opens; if [ $i = 2 ]; then echo 512; else echo 1024; fi ;;
  can_cache) echo native ;;
  pread | cache)
    read i < {d}/opens
    case $i in
      1) echo "EIO too soon" >&2; exit 1 ;;
      2) if [ $(( $3 + $4 )) -gt 512 ]; then touch {d}/past-eof; fi ;;
    esac
    if [ $1 = pread ]; then dd if=/dev/zero count=$3 iflag=count_bytes 2>/dev/null; fi ;;
  *) exit 2 ;;
esac
"#
        ),
    );
    std::fs::write(dir.path().join("opens"), "0\n").unwrap();
    let s = Server::start(&["sh", &plugin, "--filter=retry", "retry-delay=10ms"]);
    nbd_script(
        r#"
assert h.pread(512, 0) == bytearray(512)
h.cache(512, 512)
"#,
        &[&s.uri],
    );
    drop(s);
    assert_eq!(read_count(&dir.path().join("opens")), 3);
    assert!(
        !dir.path().join("past-eof").exists(),
        "a request went past the reopened plugin's end"
    );
}

#[test]
fn retry_rechecks_fua_and_fast_zero_after_a_reopen() {
    if !have_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let plugin = script(
        dir.path(),
        "p.sh",
        &format!(
            r#"case "$1" in
  open) read i < {d}/opens; echo $((i+1)) > {d}/opens ;;
  can_write | can_zero) exit 0 ;;
  can_fua) read i < {d}/opens; case $i in 2 | 3) echo none ;; *) echo native ;; esac ;;
  can_fast_zero) read i < {d}/opens; case $i in 3 | 4) exit 3 ;; *) exit 0 ;; esac ;;
  zero)
    read i < {d}/zeroes; i=$((i+1)); echo $i > {d}/zeroes
    if [ $i -le 1 ]; then echo "EIO zero failed" >&2; exit 1; fi ;;
  get_size) echo 512 ;;
  *) exit 2 ;;
esac
"#
        ),
    );
    std::fs::write(dir.path().join("opens"), "0\n").unwrap();
    std::fs::write(dir.path().join("zeroes"), "0\n").unwrap();
    let s = Server::start(&["sh", &plugin, "--filter=retry", "retry-delay=10ms"]);
    nbd_script(
        r#"
h.zero(512, 0)
try:
    h.zero(512, 0, nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO)
    assert False
except nbd.Error as ex:
    assert ex.errno == "ENOTSUP", ex
h.zero(512, 0, nbd.CMD_FLAG_FUA)
"#,
        &[&s.uri],
    );
    drop(s);
    // 1: the first zero fails.  2: no FUA, so the FUA zero fails and is
    // retried.  3: no fast zero: ENOTSUP at once.  The last FUA zero
    // fails on 3 (no FUA) and succeeds on 4.
    assert_eq!(read_count(&dir.path().join("opens")), 4);
}

#[test]
fn blocksize_defaults_come_from_the_plugin() {
    if !have_python_nbd() || !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    // The plugin wants 1K blocks and at most 512K per read, and records
    // every read it gets.
    let plugin = script(
        dir.path(),
        "p.sh",
        &format!(
            r#"case "$1" in
  block_size) echo 1K 128K 512K ;;
  get_size) echo $((2 * 1024 * 1024 - 1)) ;;
  pread) echo $3 $4 >> {d}/reads; dd if=/dev/zero count=$3 iflag=count_bytes 2>/dev/null ;;
  *) exit 2 ;;
esac
"#
        ),
    );
    let s = Server::start(&["--filter=blocksize", "sh", &plugin]);
    let e = nbdinfo_json(&[], &s.uri);
    assert_eq!(
        e["export-size"],
        (2 * 1024 * 1024 - 1024).to_string(),
        "{e:?}"
    );
    assert_eq!(e["block_size_minimum"], "1", "{e:?}");
    assert_eq!(e["block_size_preferred"], (128 * 1024).to_string(), "{e:?}");
    assert_eq!(e["block_size_maximum"], "4294967295", "{e:?}");
    // Only the reads below count (nbdinfo may probe the first sector).
    let _ = std::fs::remove_file(dir.path().join("reads"));
    nbd_script(
        r#"
assert h.pread(1024 * 1024 + 1, 1) == b"\0" * (1024 * 1024 + 1)
"#,
        &[&s.uri],
    );
    drop(s);
    let mut reads: Vec<String> = std::fs::read_to_string(dir.path().join("reads"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    reads.sort();
    let k = 1024;
    let mut want = vec![
        format!("{} 0", k),
        format!("{} {}", 512 * k, k),
        format!("{} {}", 511 * k, 513 * k),
        format!("{} {}", k, 1024 * k),
    ];
    want.sort();
    assert_eq!(reads, want);
}

#[test]
fn blocksize_extents_are_whole_blocks() {
    if !have_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // One 512-byte extent per call: [512, 8K) holes, the rest data.
    let plugin = script(
        dir.path(),
        "p.sh",
        r#"case "$1" in
  get_size) echo 64K ;;
  can_extents) exit 0 ;;
  pread) exit 1 ;;
  extents)
    if test $3 -gt 32768; then echo "EINVAL request too large" >&2; exit 1; fi
    if test $(( ($3|$4) & 511 )) != 0; then echo "EINVAL unaligned" >&2; exit 1; fi
    type=
    if test $(( $4 >= 512 && $4 < 8192 )) = 1; then type=hole,zero; fi
    echo $4 512 $type ;;
  *) exit 2 ;;
esac
"#,
    );
    let s = Server::start(&[
        "--filter=blocksize",
        "sh",
        &plugin,
        "minblock=4k",
        "maxlen=32k",
    ]);
    nbd_script_allocation(
        r#"
size = h.get_size()
offs = 0
entries = []
def f(metacontext, offset, e, err):
    global entries, offs
    assert offs == offset
    for length, flags in zip(*[iter(e)] * 2):
        if entries and flags == entries[-1][1]:
            entries[-1] = (entries[-1][0] + length, flags)
        else:
            entries.append((length, flags))
        offs = offs + length
while offs < size:
    h.block_status(size - offs, offs, f)
assert entries == [(4096, 0), (4096, 3), (57344, 0)], entries
# The block [0, 4K) is data as a whole (its first 512 bytes are), even
# where the plugin says hole.  (nbdkit also lets the extent run past the
# request, to 4K; this server ends it at the request.)
offs = 512
entries = []
h.block_status(512, offs, f)
assert entries[0][1] == 0 and offs >= 1024, entries
offs = 4095
entries = []
while offs < 4097:
    h.block_status(4097 - offs, offs, f, nbd.CMD_FLAG_REQ_ONE)
assert entries == [(1, 0), (1, 3)], entries
"#,
        &[&s.uri],
    );
}

#[test]
fn cache_filter_is_multi_conn_unless_writethrough() {
    if !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A plugin without multi-conn.
    let plugin = script(
        dir.path(),
        "p.sh",
        r#"case "$1" in
  get_size) echo 1M ;;
  can_write | can_flush) exit 0 ;;
  pread) dd if=/dev/zero count=$3 iflag=count_bytes 2>/dev/null ;;
  pwrite | flush) cat >/dev/null ;;
  *) exit 2 ;;
esac
"#,
    );
    let mc = |extra: &[&str]| {
        let mut args = vec!["--filter=cache", "sh", &plugin];
        args.extend(extra);
        info(&args)["can_multi_conn"].clone()
    };
    assert_eq!(mc(&[]), "true");
    assert_eq!(mc(&["cache=unsafe"]), "true");
    assert_eq!(mc(&["cache=writethrough"]), "false");
}
