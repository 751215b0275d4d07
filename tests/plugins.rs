//! Data-source plugins (sh, eval, data, …) driven by real clients.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;

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

fn data_script(name: &str) -> String {
    format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"))
}

// ---------------------------------------------------------------- sh / eval

#[test]
fn sh_file_disk_reads_and_writes_through_the_script() {
    if !have("qemu-io") || !have("nbdcopy") || !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    make_file(&img, 1 << 20, 7);
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
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x5a -f 4096 8192",
        "-c",
        "write -z 65536 4096",
        "-c",
        "flush",
        "-c",
        "read -P 0x5a 4096 8192",
        &s.uri,
    ]));
    let now = std::fs::read(&img).unwrap();
    assert!(now[4096..12288].iter().all(|&b| b == 0x5a));
    assert!(now[65536..69632].iter().all(|&b| b == 0));
    assert_eq!(read_all(&s.uri), now);
    assert!(s.stop().success());
}

#[test]
fn sh_script_errors_are_reported_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(binary())
        .args([
            "-f",
            "-U",
            dir.path().join("s").to_str().unwrap(),
            "sh",
            &data_script("file-disk.sh"),
            "colour=blue",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown parameter colour=blue"), "{err}");
    // A script that does not exist is named in the error.
    let out = Command::new(binary())
        .args(["-f", "-U", "x.sock", "sh", "/nonexistent/script.sh"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/script.sh"));
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
    python(
        r#"
import nbd, sys, errno
h = nbd.NBD()
h.connect_uri(sys.argv[1])
assert h.pread(100, 1000) == b"A" * 100
assert h.is_read_only()
h.set_strict_mode(0)
try:
    h.pwrite(b"x" * 512, 0)
    raise SystemExit("write to a script without can_write succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EPERM, e
print("OK")
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
    python(
        r#"
import nbd, sys, errno
h = nbd.NBD()
h.connect_uri(sys.argv[1])
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
print("OK")
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
