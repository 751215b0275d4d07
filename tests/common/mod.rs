//! Test harness: start the real `nbdkit-rs` binary and find the real
//! clients.  Each test file includes this with `mod common;`.
#![allow(dead_code)]

pub mod client;
pub mod disk;
pub mod http;
pub mod nbdinfo;
pub mod qemu;

#[allow(unused_imports)]
pub use nbdinfo::{map_of, nbdinfo_json};

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_nbdkit-rs"))
}

/// A running server on a private Unix socket.  Killed when dropped.
pub struct Server {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub uri: String,
}

impl Server {
    /// Start `nbdkit-rs -f -U SOCK ARGS...` and return once it accepts
    /// connections.  Readiness is signalled by `--print-uri`, which the
    /// server prints after its socket is listening, so no polling is needed.
    pub fn start(args: &[&str]) -> Server {
        Self::start_with(args, &[])
    }

    pub fn start_with(args: &[&str], env: &[(&str, &str)]) -> Server {
        Self::start_listening(None, args, env)
    }

    /// Like [`Server::start`] but listening on TCP `127.0.0.1`, port chosen
    /// by the kernel; `uri` is then an nbd:// URI.
    pub fn start_tcp(args: &[&str]) -> Server {
        Self::start_listening(Some(&["-i", "127.0.0.1", "-p", "0"]), args, &[])
    }

    fn start_listening(tcp: Option<&[&str]>, args: &[&str], env: &[(&str, &str)]) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("nbd.sock");
        let mut cmd = Command::new(binary());
        cmd.arg("-f").arg("--print-uri");
        match tcp {
            Some(listen) => cmd.args(listen),
            None => cmd.arg("-U").arg(&socket),
        };
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.path().join("server.log")).expect("server log"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start nbdkit-rs");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read uri");
        let uri = line.trim().to_string();
        if uri.is_empty() {
            let status = child.wait().expect("wait");
            panic!("nbdkit-rs {args:?} exited before it was ready: {status}");
        }
        Server {
            child,
            dir,
            socket,
            uri,
        }
    }

    /// The URI of a named export.
    pub fn uri_for(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// Send SIGTERM and return the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        // SAFETY: kill of our own child process by pid; no memory involved.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().expect("wait")
    }

    /// Wait for the server to exit on its own and return its status.
    /// Panics if it is still running after `patience` (a hang guard: the
    /// tests that use this expect an exit within moments).
    pub fn wait_exit(&mut self, patience: std::time::Duration) -> std::process::ExitStatus {
        let start = std::time::Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            if start.elapsed() > patience {
                panic!("the server did not exit within {patience:?}");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// True while the server process runs.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// The file the server's stderr goes to.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// What the server wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Show the server's messages with the test's output, and fail the
        // test if the server panicked anywhere (a panic in a worker thread
        // does not change the exit status).
        let log = self.log();
        if !log.is_empty() {
            eprintln!("--- server stderr ---\n{log}---");
        }
        if log.contains("panicked at") && !std::thread::panicking() {
            panic!("the server panicked");
        }
    }
}

/// True if `tool` is on PATH.  When it is not, the test is skipped with a
/// message — unless NBDKIT_RS_REQUIRE_TOOLS=1 (set by the project's test
/// script, which installs them), where a missing tool is a failure.
pub fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        if std::env::var("NBDKIT_RS_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!("{tool} is required but not installed (run scripts/test.sh to install it)");
        }
        eprintln!("SKIP: {tool} is not installed");
    }
    found
}

/// Run a command and panic with its output if it fails.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

pub fn stdout_of(cmd: &mut Command) -> String {
    String::from_utf8(run_ok(cmd).stdout).expect("utf-8")
}

/// A file of `size` bytes of deterministic, non-repeating data.
pub fn make_file(path: &Path, size: usize, seed: u64) {
    std::fs::write(path, pseudo_random(size, seed)).expect("write test file");
}

pub fn pseudo_random(size: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    let mut v = Vec::with_capacity(size + 8);
    while v.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(size);
    v
}

/// Python with the libnbd bindings (Debian's python3-libnbd).
pub const PYTHON: &str = "/usr/bin/python3";

pub fn have_python_nbd() -> bool {
    let ok = Command::new(PYTHON)
        .args(["-c", "import nbd"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var("NBDKIT_RS_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!("python3-libnbd is required but not installed");
        }
        eprintln!("SKIP: python3 nbd module is not installed");
    }
    ok
}

/// nbdsh is `python3 -m nbd`; run it with the Python that has the module
/// (the first python3 on PATH may be another one).
pub const NBDSH: &str = "/usr/bin/python3 -m nbd";

/// A process's resident memory in KiB (VmRSS in /proc/PID/status).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// How many file descriptors a process has open.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .count()
}

/// Wait (a bounded number of 50 ms polls, 400 at most) until `pid` has
/// `want` descriptors open or fewer; returns the last count.  Closing a
/// connection's socket follows the client's view of the close by a moment.
/// With `want` 0: until the count stops changing (for a baseline).
pub fn settle_fds(pid: u32, want: usize) -> usize {
    let mut n = fd_count(pid);
    for _ in 0..400 {
        if n <= want {
            break;
        }
        if want == 0 {
            std::thread::sleep(std::time::Duration::from_millis(50));
            let again = fd_count(pid);
            if again == n {
                break;
            }
            n = again;
            continue;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        n = fd_count(pid);
    }
    n
}

/// Run a Python script (with the `nbd` module) with `args` as
/// sys.argv[1:]; the script prints "OK" at the end, and everything it
/// printed is returned.
pub fn python(script: &str, args: &[&str]) -> String {
    let out = stdout_of(Command::new(PYTHON).arg("-c").arg(script).args(args));
    assert!(
        out.trim_end().ends_with("OK"),
        "script did not finish: {out}"
    );
    out
}

/// The whole export, read with nbdcopy.
pub fn read_all(uri: &str) -> Vec<u8> {
    run_ok(Command::new("nbdcopy").arg(uri).arg("-")).stdout
}

/// A hex field (`offset=0x1000`) of a log filter line, by its `name=`.
pub fn log_field(line: &str, name: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(name))
        .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
}

/// A log filter file without its ` id=N` fields, so a call's line can be
/// matched as `Write offset=0x0 count=0x1000 fua=0`.
pub fn without_ids(log: &str) -> String {
    log.lines()
        .map(|l| {
            l.split(' ')
                .filter(|w| !w.starts_with("id="))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}
