//! The systemd units in contrib/systemd: systemd accepts them as written,
//! and the server started the way they start it (socket activation, the
//! service's ExecStart options) serves real clients.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

const UNITS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/systemd");

/// The units as an instance `demo`, with ExecStart pointing at the binary
/// under test, in `dir`.
fn instance(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let service = std::fs::read_to_string(Path::new(UNITS).join("nbdkit-rs@.service"))
        .expect("service unit")
        .replace("/usr/bin/nbdkit-rs", &binary().display().to_string());
    let socket =
        std::fs::read_to_string(Path::new(UNITS).join("nbdkit-rs@.socket")).expect("socket unit");
    let (sv, so) = (
        dir.join("nbdkit-rs@demo.service"),
        dir.join("nbdkit-rs@demo.socket"),
    );
    std::fs::write(&sv, service).unwrap();
    std::fs::write(&so, socket).unwrap();
    (sv, so)
}

#[test]
fn units_pass_systemd_analyze_verify() {
    if !have("systemd-analyze") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (sv, so) = instance(dir.path());
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&so)
        .arg(&sv)
        .output()
        .expect("systemd-analyze");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // Unknown keys and bad values are only warnings: none is allowed.
    assert!(err.trim().is_empty(), "systemd-analyze verify: {err}");
}

/// The server's command line from the service's ExecStart (with
/// `$NBDKIT_RS_ARGS` replaced by `args`).
fn exec_start(args: &[&str]) -> Vec<String> {
    let unit = std::fs::read_to_string(Path::new(UNITS).join("nbdkit-rs@.service")).unwrap();
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let mut words: Vec<String> = line.split_whitespace().map(String::from).collect();
    assert_eq!(words[0], "/usr/bin/nbdkit-rs");
    assert_eq!(words.pop().as_deref(), Some("$NBDKIT_RS_ARGS"));
    words.remove(0);
    words.extend(args.iter().map(|s| s.to_string()));
    words
}

#[test]
fn socket_activated_as_the_units_do_serves_real_clients() {
    if !have("systemd-socket-activate") || !have("nbdcopy") || !have("nbdsh") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("demo.sock");
    // systemd-socket-activate listens, and on the first connection starts
    // the server with the socket in LISTEN_FDS, as systemd does for
    // nbdkit-rs@demo.socket (Accept=no).
    let mut act = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&sock)
        .arg(binary())
        .args(exec_start(&["memory", "size=8M"]))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("systemd-socket-activate");
    // It says where it listens once the socket exists.
    let mut err = BufReader::new(act.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("Listening on") {
        line.clear();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "systemd-socket-activate exited"
        );
    }
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    let uri = format!("nbd+unix:///?socket={}", sock.display());

    let src = dir.path().join("in.bin");
    make_file(&src, 8 << 20, 3);
    run_ok(Command::new("nbdcopy").arg(&src).arg(&uri));
    // A second connection to the same (activated) server sees the data.
    let back = read_all(&uri);
    let _ = act.kill();
    let _ = act.wait();
    assert!(back == std::fs::read(&src).unwrap(), "data differs");
}
