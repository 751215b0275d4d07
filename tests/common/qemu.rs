//! qemu's tools as the reference for qcow2 tests: images made and changed
//! with `qemu-img` and `qemu-io`, read back with `qemu-img convert`,
//! checked and compared by `qemu-img`, served by `qemu-nbd`; and the
//! qcow2dec filter serving an image file.  Shared by tests/qcow2.rs,
//! tests/qcow2_write.rs and tests/allocation_depth.rs, so that all three
//! make and judge images the same way.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{pseudo_random, run_ok, Server};

/// A path as the `&str` argument lists want.
pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

pub fn qemu_img(args: &[&str]) {
    run_ok(Command::new("qemu-img").args(args));
}

/// `qemu-img create -f qcow2 [-b BACKING -F FMT] [OPTS] PATH [SIZE]`.
pub fn create_qcow2(path: &Path, backing: Option<(&str, &str)>, opts: &[&str], size: Option<&str>) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if let Some((b, f)) = backing {
        args.extend(["-b", b, "-F", f]);
    }
    args.extend_from_slice(opts);
    args.push(p(path));
    args.extend(size);
    qemu_img(&args);
}

/// `qemu-img convert -O qcow2 [OPTS] RAW IMG`.
pub fn convert_to_qcow2(raw: &Path, img: &Path, opts: &[&str]) {
    let mut args = vec!["convert", "-O", "qcow2"];
    args.extend_from_slice(opts);
    args.extend([p(raw), p(img)]);
    qemu_img(&args);
}

/// Run `qemu-io` commands on the qcow2 file `img` directly (discards
/// honoured); none of them may fail.
pub fn qemu_io(img: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "qcow2", "--discard=unmap"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run_ok(c.arg(img));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("failed"),
        "qemu-io {}: {text}",
        img.display()
    );
}

/// What qemu reads from `img` (through its whole backing chain).
pub fn qemu_raw(img: &Path) -> Vec<u8> {
    let out = img.with_extension("raw-view");
    qemu_img(&["convert", "-O", "raw", p(img), p(&out)]);
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(out).unwrap();
    data
}

/// `qemu-img check`'s exit status (0 clean, 2 corrupt, 3 leaks only) and
/// what it said.
pub fn check_status(img: &Path) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(["check", p(img)])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

pub fn assert_clean(img: &Path) {
    let (code, text) = check_status(img);
    assert_eq!(code, 0, "{}: qemu-img check: {text}", img.display());
}

/// `qemu-img compare` finds the two images' contents identical.
pub fn assert_identical(a: &Path, b: &Path) {
    let out = Command::new("qemu-img")
        .args(["compare", p(a), p(b)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img compare {} {}: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Set `bits` in the big-endian u64 at byte `at` of `img` (to mark a
/// header or a table entry).
pub fn or_u64(img: &Path, at: usize, bits: u64) {
    let mut f = std::fs::read(img).unwrap();
    let v = u64::from_be_bytes(f[at..at + 8].try_into().unwrap()) | bits;
    f[at..at + 8].copy_from_slice(&v.to_be_bytes());
    std::fs::write(img, f).unwrap();
}

/// `dir/guest.raw`, a 16 MiB guest disk: random data, a zero run, text,
/// then unwritten space.
pub fn guest_disk(dir: &Path) -> PathBuf {
    let path = dir.join("guest.raw");
    let mut data = pseudo_random(5_000_000, 3);
    data.extend(vec![0u8; 3 << 20]);
    data.extend(include_bytes!("../../README.md"));
    data.resize(16 << 20, 0);
    std::fs::write(&path, data).unwrap();
    path
}

/// nbdkit-rs serving `img` with the file plugin under the qcow2dec
/// filter: `filters` go above qcow2dec, `params` after the file name.
pub fn serve_qcow2(filters: &[&str], img: &Path, params: &[&str]) -> Server {
    let mut args: Vec<&str> = filters.to_vec();
    args.extend(["--filter=qcow2dec", "file", p(img)]);
    args.extend_from_slice(params);
    Server::start(&args)
}

/// `qemu-nbd -A` (the qemu:allocation-depth context on) serving `img`
/// read-only on a Unix socket; stopped when dropped.  `--fork` returns
/// once the socket listens, so nothing polls.
pub struct QemuNbd {
    pid: i32,
    _dir: tempfile::TempDir,
    pub uri: String,
    pub socket: PathBuf,
}

impl QemuNbd {
    pub fn start(format: &str, img: &Path) -> QemuNbd {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("q.sock");
        let pid_file = dir.path().join("q.pid");
        run_ok(
            Command::new("qemu-nbd")
                .args(["-A", "-r", "-t", "--fork", "-f", format, "-k"])
                .arg(&socket)
                .arg("--pid-file")
                .arg(&pid_file)
                .arg(img),
        );
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        QemuNbd {
            pid: pid.trim().parse().unwrap(),
            uri: format!("nbd+unix:///?socket={}", socket.display()),
            socket,
            _dir: dir,
        }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        // SAFETY: a signal to the qemu-nbd this test started; no memory
        // is involved.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
    }
}
