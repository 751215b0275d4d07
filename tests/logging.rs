//! Logging can never hang or kill the server: with stderr on a full device
//! or a pipe nobody reads, requests that log a warning still get their
//! replies and the server keeps running.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{binary, have};

/// Start `nbdkit-rs -f --print-uri -U SOCK ARGS` with the given stderr and
/// return the child and its URI once it listens.
fn start(dir: &std::path::Path, stderr: Stdio, args: &[&str]) -> (Child, String) {
    let socket = dir.join("nbd.sock");
    let mut child = Command::new(binary())
        .arg("-f")
        .arg("--print-uri")
        .arg("-U")
        .arg(&socket)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("start nbdkit-rs");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read uri");
    assert!(
        !line.trim().is_empty(),
        "the server exited before listening"
    );
    (child, line.trim().to_string())
}

/// Read from an export whose every read fails with EIO (each failure logs
/// a warning), twice, from a helper thread; return what the client printed,
/// or None if no answer came within `patience` (a hang).
fn failing_reads(uri: &str, patience: Duration) -> Option<String> {
    let script = format!(
        "import nbd\n\
         for i in range(2):\n\
         \x20   h = nbd.NBD()\n\
         \x20   h.connect_uri({uri:?})\n\
         \x20   for j in range(20):\n\
         \x20       try:\n\
         \x20           h.pread(512, 0)\n\
         \x20           print('read ok')\n\
         \x20       except nbd.Error as e:\n\
         \x20           print('errno', e.errno)\n\
         \x20   h.shutdown()\n"
    );
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let out = Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(script)
            .output();
        let _ = tx.send(out);
    });
    // A hang guard, not a timing assertion: the reads take milliseconds.
    let out = rx.recv_timeout(patience).ok()?.expect("run python");
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

const ARGS: &[&str] = &[
    "--filter=error",
    "memory",
    "1M",
    "error=EIO",
    "error-rate=1",
];

fn check(stderr: Stdio, keep: impl FnOnce(&mut Child)) {
    if !have("nbdsh") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut child, uri) = start(dir.path(), stderr, ARGS);
    keep(&mut child);
    let got = failing_reads(&uri, Duration::from_secs(120));
    let alive = child.try_wait().expect("try_wait").is_none();
    let _ = child.kill();
    let _ = child.wait();
    let got = got.expect("a read that logs a warning got no reply (server hung)");
    assert_eq!(
        got.lines().filter(|l| *l == "errno EIO").count(),
        40,
        "every read should fail with EIO: {got}"
    );
    assert!(alive, "the server exited");
}

#[test]
fn stderr_on_a_full_device_neither_hangs_nor_kills() {
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    check(Stdio::from(full), |_| {});
}

#[test]
fn stderr_pipe_closed_by_its_reader_neither_hangs_nor_kills() {
    check(Stdio::piped(), |child| drop(child.stderr.take()));
}

#[test]
fn startup_error_with_stderr_on_a_full_device_exits_1() {
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let st = Command::new(binary())
        .args(["-f", "no-such-plugin-here"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(full)
        .status()
        .unwrap();
    // 101 would be a panic while reporting the error.
    assert_eq!(st.code(), Some(1));
}
