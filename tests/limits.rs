//! Access limits: `--timeout` for clients that never finish negotiating,
//! `--max-connections` for how many may be connected at once, and
//! `--keepalive` for clients that vanish without closing.

mod common;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::client::RawClient;
use common::*;
use nbdkit_proto::*;

#[test]
fn timeout_closes_clients_that_do_not_negotiate() {
    let s = Server::start(&["--timeout=1", "memory", "size=1M"]);
    // A finishes negotiating before B even connects...
    let mut a = RawClient::start(&s.socket);
    a.go(true, false, false);
    // ...B reads the greeting and says nothing: the server hangs up.
    let (mut b, _) = RawClient::connect(&s.socket);
    assert!(b.closed_by_server(), "not closed by the server");
    // A has now been idle for longer than the timeout and is still served:
    // the limit is on negotiation only.
    a.request(CMD_READ, 0, 1, 0, 512, &[]);
    assert_eq!(a.reply(512).error, 0);
    // Logged before the server closed B's socket.
    let log = s.log();
    assert!(log.contains("--timeout"), "{log}");
}

#[test]
fn max_connections_closes_extra_clients() {
    let s = Server::start(&["--max-connections=1", "memory", "size=1M"]);
    let mut a = RawClient::start(&s.socket);
    // A second client is closed without a greeting.
    let mut b = UnixStream::connect(&s.socket).expect("connect");
    b.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut buf = [0u8; 18];
    assert_eq!(b.read(&mut buf).expect("read"), 0, "got a greeting");
    // Once A has gone (the server frees the slot before closing), the
    // next client gets in.
    assert_eq!(a.simple_option(OptionRequest::Abort), REP_ACK);
    assert!(a.is_closed());
    let mut c = RawClient::start(&s.socket);
    let (size, _) = c.go(true, false, false);
    assert_eq!(size, 1 << 20);
}

/// Without `--max-connections`, the limit is what the descriptor limit
/// allows: (RLIMIT_NOFILE - 64) / 3, so 2 connections at 70 descriptors;
/// `--max-connections=0` lifts it.
#[test]
fn default_connection_limit_follows_the_descriptor_limit() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::CommandExt;
    for (extra, third_served) in [(None, false), (Some("--max-connections=0"), true)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("nbd.sock");
        let mut cmd = std::process::Command::new(binary());
        cmd.args(["-f", "--print-uri", "-U"]).arg(&sock);
        cmd.args(extra).args(["memory", "size=1M"]);
        cmd.stdout(std::process::Stdio::piped());
        // SAFETY: setrlimit is async-signal-safe and touches only the
        // child about to exec.
        unsafe {
            cmd.pre_exec(|| {
                let lim = libc::rlimit {
                    rlim_cur: 70,
                    rlim_max: 70,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("start nbdkit-rs");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("uri");
        assert!(!line.is_empty(), "the server did not start");
        let mut a = RawClient::start(&sock);
        a.go(false, false, false);
        let mut b = RawClient::start(&sock);
        b.go(false, false, false);
        let mut c = UnixStream::connect(&sock).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut buf = [0u8; 18];
        let n = c.read(&mut buf).expect("read");
        let _ = child.kill();
        let _ = child.wait();
        if third_served {
            assert_eq!(&buf[..n], b"NBDMAGICIHAVEOPT\0\x03", "{extra:?}");
        } else {
            assert_eq!(n, 0, "a third client got a greeting");
        }
    }
}

/// `--timeout` takes nbdkit's delay syntax (`30`, `1.5`, `500ms`, `250us`).
#[test]
fn timeout_takes_nbdkit_time_units() {
    let s = Server::start(&["--timeout=1500ms", "memory", "size=1M"]);
    // A client that negotiates is served...
    if have("nbdinfo") {
        let size = stdout_of(
            std::process::Command::new("nbdinfo")
                .arg("--size")
                .arg(&s.uri),
        );
        assert_eq!(size.trim(), (1 << 20).to_string());
    }
    // ...one that says nothing is dropped, after 1.5 s.
    let (mut b, _) = RawClient::connect(&s.socket);
    assert!(b.closed_by_server(), "not closed by the server");
    let log = s.log();
    assert!(log.contains("within 1.5 s"), "{log}");

    for (bad, says) in [
        ("2m", "expected a delay such as"),
        ("0", "greater than 0"),
        ("-1s", "zero or more"),
    ] {
        let timeout = format!("--timeout={bad}");
        let e = fails_stderr(&["-U", "-", &timeout, "null", "--run", "exit 0"]);
        assert!(
            e.contains(&format!("--timeout={bad}")) && e.contains(says),
            "{e}"
        );
    }
}

/// `--keepalive`: SO_KEEPALIVE on each accepted TCP connection, which
/// `ss -o` shows as a keepalive timer on the server's end of it.
#[test]
fn keepalive_turns_on_tcp_keepalive() {
    if !have("ss") || !have_python_nbd() {
        return;
    }
    // Connect, then wait (a bounded number of 50 ms polls) until nothing
    // is in flight on the server's socket, whose retransmission timer
    // would otherwise be the one shown.
    let script = r#"
import nbd, subprocess, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
line = ""
for _ in range(200):
    out = subprocess.run(["ss", "-tno", "state", "established",
                          "( sport = :%s )" % sys.argv[2]],
                         capture_output=True, text=True).stdout
    lines = [l for l in out.splitlines() if ":" + sys.argv[2] in l]
    line = " ".join(lines)
    if lines and "timer:(on" not in line:
        break
    time.sleep(0.05)
print(line)
print("OK")
"#;
    for (extra, want) in [(Some("--keepalive"), true), (None, false)] {
        let mut args: Vec<&str> = extra.into_iter().collect();
        args.extend(["memory", "size=1M"]);
        let s = Server::start_tcp(&args);
        let port = s.uri.rsplit(':').next().expect("port").to_string();
        let out = python(script, &[&s.uri, &port]);
        assert!(
            out.contains(&format!(":{port}")),
            "no connection seen: {out}"
        );
        assert_eq!(out.contains("timer:(keepalive"), want, "{extra:?}: {out}");
    }
}
