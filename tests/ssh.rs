//! The ssh plugin against a real OpenSSH server (Debian's openssh-server)
//! that the test starts on 127.0.0.1 with a generated host key and user
//! key: reads, writes and flush through Python nbd, host key checking,
//! authentication failures, and create=true.

mod common;

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::*;

const SSHD: &str = "/usr/sbin/sshd";

struct Sshd {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Sshd {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn log(&self) -> String {
        std::fs::read_to_string(self.path("sshd.log")).unwrap_or_default()
    }
}

fn keygen(path: &Path) {
    run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", ""])
            .arg("-f")
            .arg(path),
    );
}

/// sshd on a free loopback port, accepting `id_user` for the current
/// user; None (with a note) where it cannot run here.
fn start_sshd() -> Option<Sshd> {
    let usable = Path::new(SSHD).exists() && have("ssh-keygen") && have_python_nbd();
    // Running as root, sshd wants its privilege separation directory.
    let root = is_root();
    if root {
        let _ = std::fs::create_dir_all("/run/sshd");
    }
    if !usable || (!root && !Path::new("/run/sshd").exists()) {
        assert!(
            std::env::var_os("NBDKIT_RS_REQUIRE_TOOLS").is_none(),
            "sshd (openssh-server), ssh-keygen and Python nbd are needed"
        );
        eprintln!("skipped: no usable sshd");
        return None;
    }
    // A port taken between choosing it and sshd binding it: try another.
    for _ in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        keygen(&d.join("host_ed25519"));
        keygen(&d.join("id_user"));
        keygen(&d.join("id_other"));
        std::fs::copy(d.join("id_user.pub"), d.join("authorized_keys")).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_ed25519\n\
             AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin yes\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
             StrictModes no\nPidFile none\nSubsystem sftp internal-sftp\n",
            d = d.display()
        );
        std::fs::write(d.join("sshd_config"), config).unwrap();
        let child = Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("sshd.log")).unwrap())
            .spawn()
            .unwrap();
        let mut sshd = Sshd { child, port, dir };
        // Listening once a TCP connect succeeds (or it exited: port taken).
        for _ in 0..500 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                let host_pub = std::fs::read_to_string(sshd.path("host_ed25519.pub")).unwrap();
                let key: Vec<&str> = host_pub.split_whitespace().take(2).collect();
                std::fs::write(
                    sshd.path("known_hosts"),
                    format!("[127.0.0.1]:{port} {}\n", key.join(" ")),
                )
                .unwrap();
                return Some(sshd);
            }
            if let Ok(Some(_)) = sshd.child.try_wait() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        eprintln!("sshd on port {port} did not start: {}", sshd.log());
    }
    panic!("sshd did not start");
}

fn is_root() -> bool {
    stdout_of(Command::new("id").arg("-u")).trim() == "0"
}

fn user() -> String {
    stdout_of(Command::new("id").arg("-un")).trim().to_string()
}

/// The plugin's arguments for `file` on `sshd`, with our key and its
/// known_hosts, and HOME pointing nowhere useful (no ~/.ssh is read).
fn args(sshd: &Sshd, file: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        "ssh".to_string(),
        "host=127.0.0.1".to_string(),
        format!("port={}", sshd.port),
        format!("user={}", user()),
        format!("identity={}", sshd.path("id_user").display()),
        format!("known-hosts={}", sshd.path("known_hosts").display()),
        file.display().to_string(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn serve(sshd: &Sshd, a: &[String]) -> Server {
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let home = sshd.path("home");
    std::fs::create_dir_all(&home).unwrap();
    Server::start_with(
        &a,
        &[("HOME", home.to_str().unwrap()), ("SSH_AUTH_SOCK", "")],
    )
}

/// A client that must fail to open the export, with `what` in the log.
fn refused(sshd: &Sshd, a: &[String], what: &str) {
    let s = serve(sshd, a);
    assert!(!nbdinfo_ok(&[&s.uri]), "{a:?} opened");
    assert!(
        s.log().contains(what),
        "{a:?}: log lacks {what:?}: {}",
        s.log()
    );
}

#[test]
fn ssh_reads_and_writes_a_remote_file_over_sftp() {
    let Some(sshd) = start_sshd() else { return };
    let file = sshd.path("disk.img");
    let data = make_file(&file, 1 << 20, 4);

    let s = serve(&sshd, &args(&sshd, &file, &[]));
    assert!(read_all(&s.uri) == data);
    python(
        "import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
         assert not h.is_read_only() and h.can_flush()\n\
         h.pwrite(b'hello'*1000, 70000)\nh.flush()\n\
         h.pwrite(b'fua', 5, nbd.CMD_FLAG_FUA)\nprint('OK')",
        &[&s.uri],
    );
    // Acknowledged after flush or FUA: on the remote file now.
    let got = std::fs::read(&file).unwrap();
    assert_eq!(&got[70000..75000], "hello".repeat(1000).as_bytes());
    assert_eq!(&got[5..8], b"fua");
    drop(s);

    // -r: read-only, whatever the remote permissions.
    let mut a = vec!["-r".to_string()];
    a.extend(args(&sshd, &file, &[]));
    let s = serve(&sshd, &a);
    python(
        "import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\nassert h.is_read_only()\nprint('OK')",
        &[&s.uri],
    );
}

#[test]
fn ssh_checks_the_host_key_and_the_user() {
    let Some(sshd) = start_sshd() else { return };
    let file = sshd.path("disk.img");
    std::fs::write(&file, vec![1u8; 65536]).unwrap();
    let mut a = args(&sshd, &file, &[]);
    // No known_hosts at all: refused, naming what to do.
    a.retain(|x| !x.starts_with("known-hosts="));
    refused(&sshd, &a, "the host key is not in");
    // verify-remote-host=false: accepted.
    a.push("verify-remote-host=false".into());
    let s = serve(&sshd, &a);
    assert_eq!(read_all(&s.uri), vec![1u8; 65536]);
    drop(s);
    // A different key for the host: a possible man in the middle.
    let other = std::fs::read_to_string(sshd.path("id_other.pub")).unwrap();
    let key: Vec<&str> = other.split_whitespace().take(2).collect();
    let wrong = sshd.path("wrong_known_hosts");
    std::fs::write(
        &wrong,
        format!("[127.0.0.1]:{} {}\n", sshd.port, key.join(" ")),
    )
    .unwrap();
    let mut a = args(&sshd, &file, &[]);
    for x in a.iter_mut() {
        if x.starts_with("known-hosts=") {
            *x = format!("known-hosts={}", wrong.display());
        }
    }
    refused(&sshd, &a, "does not match");
    // A key the server does not accept.
    let mut a = args(&sshd, &file, &[]);
    for x in a.iter_mut() {
        if x.starts_with("identity=") {
            *x = format!("identity={}", sshd.path("id_other").display());
        }
    }
    refused(&sshd, &a, "authentication failed");
}

#[test]
fn ssh_create_makes_the_remote_file() {
    let Some(sshd) = start_sshd() else { return };
    let file = sshd.path("new.img");
    std::fs::write(&file, b"old contents").unwrap();
    let s = serve(
        &sshd,
        &args(
            &sshd,
            &file,
            &["create=true", "create-size=2M", "create-mode=0640"],
        ),
    );
    assert!(read_all(&s.uri) == vec![0u8; 2 << 20]);
    drop(s);
    let m = std::fs::metadata(&file).unwrap();
    assert_eq!(m.len(), 2 << 20);
    assert_eq!(m.permissions().mode() & 0o777, 0o640);
    // Bad parameters are named.
    for (extra, what) in [
        (&["create=true"][..], "create-size"),
        (&["create-size=1M"][..], "create=true"),
        (&["config=/etc/ssh/ssh_config"][..], "config="),
        (&["port=0"][..], "port=0"),
    ] {
        let a = args(&sshd, &file, extra);
        let out = Command::new(binary())
            .args(["-U", "-", "--run", "true"])
            .args(&a)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{extra:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(what),
            "{extra:?}: {out:?}"
        );
    }
}
