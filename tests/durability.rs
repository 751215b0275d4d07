//! Crash safety of the `file` plugin: what was acknowledged after FLUSH,
//! or written with FUA, survives `kill -9` of the server; and, since the
//! page cache would survive a process kill anyway, proof from strace that
//! the server calls fdatasync/fsync before it acknowledges a FUA write, a
//! FUA zero or a flush.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use common::client::RawClient;
use common::*;
use nbdkit_proto::*;

fn disk(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("disk.img");
    sparse_file(&p, 8 << 20);
    p
}

#[test]
fn acknowledged_data_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let img = disk(dir.path());
    let file_arg = format!("file={}", img.display());
    let fua_data = pseudo_random(65536, 1);
    let flushed = pseudo_random(65536, 2);
    {
        let mut s = Server::start(&["file", &file_arg]);
        let mut c = RawClient::start(&s.socket);
        c.go(true, false, false);
        c.request(CMD_WRITE, CMD_FLAG_FUA, 1, 4096, 65536, &fua_data);
        assert_eq!(c.reply(0).error, 0);
        c.request(CMD_WRITE, 0, 2, 1 << 20, 65536, &flushed);
        assert_eq!(c.reply(0).error, 0);
        c.request(CMD_FLUSH, 0, 3, 0, 0, &[]);
        assert_eq!(c.reply(0).error, 0);
        // SIGKILL: no shutdown code runs.
        s.child.kill().unwrap();
        s.child.wait().unwrap();
    }
    let s = Server::start(&["file", &file_arg]);
    let mut c = RawClient::start(&s.socket);
    c.go(false, false, false);
    c.request(CMD_READ, 0, 1, 4096, 65536, &[]);
    assert!(c.reply(65536).data == fua_data, "FUA write lost");
    c.request(CMD_READ, 0, 2, 1 << 20, 65536, &[]);
    assert!(c.reply(65536).data == flushed, "flushed write lost");
}

/// Sync calls (fdatasync, fsync, sync_file_range) strace has logged.
fn syncs(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            ["fdatasync(", "fsync(", "sync_file_range("]
                .iter()
                .any(|c| l.contains(c))
        })
        .count()
}

#[test]
fn fua_and_flush_sync_before_the_reply() {
    if !have("strace") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = disk(dir.path());
    let sock = dir.path().join("nbd.sock");
    let log = dir.path().join("strace.log");
    let mut strace = Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-e",
            "trace=fdatasync,fsync,sync_file_range",
            "-o",
        ])
        .arg(&log)
        .arg(binary())
        .args(["-f", "--print-uri", "-U"])
        .arg(&sock)
        .arg("file")
        .arg(format!("file={}", img.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("strace");
    let mut line = String::new();
    BufReader::new(strace.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("nbd+unix://"), "{line:?}");
    // strace logs a system call when it returns, before the traced thread
    // goes on, so a sync made before the reply is in the log by the time
    // the client has the reply.
    let mut c = RawClient::start(&sock);
    c.go(true, false, false);
    let base = syncs(&log);
    c.request(CMD_WRITE, 0, 1, 0, 4096, &[1; 4096]);
    assert_eq!(c.reply(0).error, 0);
    let plain = syncs(&log);
    assert_eq!(plain, base, "a write without FUA should not sync");
    c.request(CMD_WRITE, CMD_FLAG_FUA, 2, 4096, 4096, &[2; 4096]);
    assert_eq!(c.reply(0).error, 0);
    let fua = syncs(&log);
    assert!(fua > plain, "no sync before the FUA write's reply");
    c.request(CMD_FLUSH, 0, 3, 0, 0, &[]);
    assert_eq!(c.reply(0).error, 0);
    let flush = syncs(&log);
    assert!(flush > fua, "no sync before the flush's reply");
    c.request(CMD_WRITE_ZEROES, CMD_FLAG_FUA, 4, 0, 8192, &[]);
    assert_eq!(c.reply(0).error, 0);
    let zero = syncs(&log);
    assert!(zero > flush, "no sync before the FUA zero's reply");
    drop(c);
    // Stop the traced server (strace's child) with SIGTERM.
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", strace.id())).unwrap();
    let server: i32 = children
        .split_whitespace()
        .next()
        .expect("server pid")
        .parse()
        .unwrap();
    // SAFETY: kill of the server process the test started.
    unsafe { libc::kill(server, libc::SIGTERM) };
    assert!(strace.wait().unwrap().success());
    eprintln!("sync calls: base {base}, plain {plain}, fua {fua}, flush {flush}, zero {zero}");
}
