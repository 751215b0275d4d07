//! Test harness: start the real `nbdkit-rs` binary and find the real
//! clients.  Each test file includes this with `mod common;`.
#![allow(dead_code)]

pub mod client;
pub mod disk;
pub mod http;
pub mod nbdinfo;
pub mod qemu;

#[allow(unused_imports)]
pub use nbdinfo::{assert_same_offer, map_of, nbdinfo_json, nbdinfo_ok};

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

    /// The nbds+unix URI of the default export, trusting the CA in `certs`.
    pub fn tls_uri(&self, certs: &Path) -> String {
        format!(
            "nbds+unix:///?socket={}&tls-certificates={}",
            self.socket.display(),
            certs.display()
        )
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

/// `found`; when it is false, the test is skipped with a message naming
/// `what` — unless NBDKIT_RS_REQUIRE_TOOLS=1 (set by the project's test
/// script, which installs everything), where something missing is a
/// failure.  Every "skip unless installed" check goes through here.
pub fn available(found: bool, what: &str) -> bool {
    if !found {
        if std::env::var("NBDKIT_RS_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!("{what} is required but not installed (run scripts/test.sh to install it)");
        }
        eprintln!("SKIP: {what} is not installed");
    }
    found
}

/// True if `tool` is on PATH (else [`available`] skips the test).
pub fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    available(found, tool)
}

/// Where scripts/test.sh installs a tool that no package provides: `$env`
/// if set, else ~/.cache/nbdkit-rs/NAME.
pub fn tool_dir(env: &str, name: &str) -> PathBuf {
    std::env::var(env).map(PathBuf::from).unwrap_or_else(|_| {
        Path::new(&std::env::var("HOME").unwrap_or_default())
            .join(".cache/nbdkit-rs")
            .join(name)
    })
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

/// Run `nbdkit-rs ARGS` to completion; (exit code, stdout, stderr).
pub fn run_binary(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(binary())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run nbdkit-rs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Run `nbdkit-rs ARGS`, which must fail (without a panic), and return
/// its stderr.
pub fn fails_stderr(args: &[&str]) -> String {
    fails_stderr_env(args, &[])
}

/// [`fails_stderr`] with `env` set.
pub fn fails_stderr_env(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(binary())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run nbdkit-rs");
    assert!(!out.status.success(), "{args:?} succeeded");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    err
}

/// `nbdkit-rs -f -U SOCKET ARGS` (a socket of its own, so that it would
/// really serve) must fail at start-up; returns its stderr.
pub fn start_refused(args: &[&str], env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("s.sock");
    let sock = sock.to_str().expect("socket path");
    fails_stderr_env(&[&["-f", "-U", sock], args].concat(), env)
}

/// `nbdkit-rs -U - --run true ARGS` fails, and its message names `what`.
pub fn refused(args: &[&str], what: &str) {
    let err = fails_stderr(&[&["-U", "-", "--run", "true"], args].concat());
    assert!(
        err.contains(what),
        "{args:?}: message does not name {what}: {err}"
    );
}

/// Starting fails with exactly one line on stderr containing `why`.
pub fn start_fails_one_line(args: &[&str], why: &str) {
    let err = fails_stderr(&[&["-f"], args].concat());
    assert!(err.contains(why), "{args:?}: expected {why:?} in {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
}

/// Connecting fails, and the server's log or the client's debug output
/// (which shows the error the server sent) mentions `why`.
pub fn open_fails(args: &[&str], why: &str) {
    let run = ["-U", "-", "--run", "LIBNBD_DEBUG=1 nbdinfo \"$uri\""];
    let err = fails_stderr(&[&run, args].concat());
    assert!(err.contains(why), "{args:?}: expected {why:?} in {err}");
}

/// `-newkey` choices for [`self_signed`].
pub const RSA_2048: &[&str] = &["rsa:2048"];
pub const EC_P256: &[&str] = &["ec", "-pkeyopt", "ec_paramgen_curve:P-256"];

/// `openssl req -x509` in `dir`: a new key `keyout` and a certificate
/// `out` for `subj`, valid 2 days, with each of `exts` as an `-addext`.
pub fn self_signed(
    dir: &Path,
    newkey: &[&str],
    keyout: &str,
    out: &str,
    subj: &str,
    exts: &[&str],
) {
    let mut args = vec!["req", "-x509", "-newkey"];
    args.extend_from_slice(newkey);
    args.extend([
        "-nodes", "-keyout", keyout, "-out", out, "-days", "2", "-subj", subj,
    ]);
    for e in exts {
        args.extend(["-addext", e]);
    }
    run_ok(Command::new("openssl").current_dir(dir).args(&args));
}

/// A file of `size` bytes of deterministic, non-repeating data; returns
/// what it wrote.
pub fn make_file(path: &Path, size: usize, seed: u64) -> Vec<u8> {
    let data = pseudo_random(size, seed);
    std::fs::write(path, &data).expect("write test file");
    data
}

/// A file of `len` bytes that are all a hole.
pub fn sparse_file(path: &Path, len: u64) -> std::fs::File {
    let f = std::fs::File::create(path).expect("create sparse file");
    f.set_len(len).expect("set_len");
    f
}

/// A [`sparse_file`] with `data` written at `offset`.
pub fn sparse_file_with(path: &Path, len: u64, offset: u64, data: &[u8]) {
    let f = sparse_file(path, len);
    std::os::unix::fs::FileExt::write_all_at(&f, data, offset).expect("write");
}

/// A new temporary directory holding `name`, a [`make_file`]: the
/// directory (deleted when dropped), the file's path and its bytes.
pub fn temp_file(name: &str, size: usize, seed: u64) -> (tempfile::TempDir, PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(name);
    let data = make_file(&path, size, seed);
    (dir, path, data)
}

/// Tiny deterministic generator (xorshift64) for data, lengths and
/// choices; the state must not be 0.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

pub fn pseudo_random(size: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1);
    let mut v = Vec::with_capacity(size + 8);
    while v.len() < size {
        v.extend_from_slice(&rng.next().to_le_bytes());
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
    available(ok, "python3-libnbd (the python3 nbd module)")
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

/// [`python`] with `h`, a libnbd handle already connected to `args[0]`
/// (and `nbd`, `sys`, `errno` imported): the set-up every client script
/// repeats.  The script's closing `print("OK")` is added after `body`.
pub fn nbd_script(body: &str, args: &[&str]) -> String {
    connected_script("", body, args)
}

/// [`nbd_script`] with `base:allocation` asked for before connecting, for
/// scripts that read extents.
pub fn nbd_script_allocation(body: &str, args: &[&str]) -> String {
    connected_script("h.add_meta_context(\"base:allocation\")\n", body, args)
}

fn connected_script(setup: &str, body: &str, args: &[&str]) -> String {
    let script = format!(
        "import errno, nbd, sys\nh = nbd.NBD()\n{setup}h.connect_uri(sys.argv[1])\n{body}\nprint(\"OK\")\n"
    );
    python(&script, args)
}

/// `qemu-img compare` finds raw `file` and the raw export at `uri` the same.
pub fn assert_same_raw(file: &Path, uri: &str) {
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(file)
            .arg(uri),
    );
}

/// `qemu-io -f raw -c CMD... URI`, run to completion.
pub fn qemu_io_raw(uri: &str, cmds: &[&str]) -> Output {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.arg("-c").arg(x);
    }
    c.arg(uri).output().expect("qemu-io")
}

/// qemu-io commands for a proxy to pass through (an nbd plugin in front
/// of a 16 MiB or larger memory disk): writes with and without FUA, a
/// zero, a trim, a flush, and reads checking what was written.
pub const PROXY_IO: &[&str] = &[
    "write -P 0x3c 1M 2M",
    "write -f -P 0x4d 8M 64k",
    "write -z 1536k 512k",
    "discard 8M 32k",
    "flush",
    "read -P 0x3c 1M 512k",
    "read -P 0 1536k 512k",
];

/// [`qemu_io_raw`], where every command must succeed (qemu-io exits 0
/// even when a read's pattern does not match); returns its output.
pub fn qemu_io_ok(uri: &str, cmds: &[&str]) -> String {
    let out = qemu_io_raw(uri, cmds);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && !text.contains("failed") && !text.contains("Pattern verification"),
        "qemu-io {cmds:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
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
