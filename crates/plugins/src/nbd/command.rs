//! `command=`: run an NBD server (qemu-nbd, nbdkit, nbdkit-rs) as a child
//! with systemd socket activation, as libnbd's
//! nbd_connect_systemd_socket_activation does for nbdkit: a listening
//! Unix socket in a private directory is passed as descriptor 3 with
//! `LISTEN_FDS=1` and `LISTEN_PID=<the child's pid>`, and we connect to it.
//!
//! The child's pid is only known in the child, so `LISTEN_PID` is written
//! there, between fork and exec, into an environment prepared beforehand:
//! nothing is allocated after the fork (the parent has other threads, and
//! an allocator lock held by one of them would never be released in the
//! child).

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A server started by `command=`, stopped when dropped.
pub struct Spawned {
    child: Child,
    socket: PathBuf,
    /// The private directory of the socket, removed when dropped.
    _dir: tempfile::TempDir,
}

/// Room for "LISTEN_PID=" and any pid, NUL-terminated.
const PID_VAR_LEN: usize = 32;
const PID_VAR_PREFIX: &[u8] = b"LISTEN_PID=";

/// argv and envp as C arrays, built before the fork.
struct ExecArgs {
    _strings: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    /// The LISTEN_PID=... entry of `envp`, filled in by the child.
    pid_var: *mut u8,
    _pid_buf: Vec<u8>,
    /// The listening socket, moved to descriptor 3 in the child.
    fd: libc::c_int,
}

// SAFETY: the raw pointers point into the vectors owned by the same
// struct, which are never resized; the struct is only used by the closure
// that owns it (std requires Send + Sync of pre_exec closures).
unsafe impl Send for ExecArgs {}
// SAFETY: as for Send: nothing writes through the pointers after set-up.
unsafe impl Sync for ExecArgs {}

fn cstring(s: OsString) -> io::Result<CString> {
    CString::new(s.into_vec())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "an argument contains NUL"))
}

impl ExecArgs {
    fn new(argv: &[String], fd: libc::c_int) -> io::Result<ExecArgs> {
        let mut strings = Vec::new();
        for a in argv {
            strings.push(cstring(a.into())?);
        }
        let nargs = strings.len();
        for (k, v) in std::env::vars_os() {
            // Socket activation variables are ours to set.
            if matches!(
                k.to_str(),
                Some("LISTEN_PID" | "LISTEN_FDS" | "LISTEN_FDNAMES")
            ) {
                continue;
            }
            let mut kv = k;
            kv.push("=");
            kv.push(v);
            strings.push(cstring(kv)?);
        }
        strings.push(cstring("LISTEN_FDS=1".into())?);
        let mut pid_buf = vec![0u8; PID_VAR_LEN];
        pid_buf[..PID_VAR_PREFIX.len()].copy_from_slice(PID_VAR_PREFIX);
        let pid_var = pid_buf.as_mut_ptr();
        let mut argv: Vec<_> = strings[..nargs].iter().map(|s| s.as_ptr()).collect();
        argv.push(std::ptr::null());
        let mut envp: Vec<_> = strings[nargs..].iter().map(|s| s.as_ptr()).collect();
        envp.push(pid_var as *const libc::c_char);
        envp.push(std::ptr::null());
        Ok(ExecArgs {
            _strings: strings,
            argv,
            envp,
            pid_var,
            _pid_buf: pid_buf,
            fd,
        })
    }

    /// In the child: descriptor 3, LISTEN_PID, exec.  Returns only on
    /// failure.  Async-signal-safe calls only.
    fn exec(&mut self) -> io::Error {
        // SAFETY: fd is open (the parent keeps it until the child has
        // exec'd); pid_var has PID_VAR_LEN bytes; argv and envp are
        // NULL-terminated arrays of NUL-terminated strings.
        unsafe {
            if self.fd == 3 {
                // Keep it open across exec.
                if libc::fcntl(3, libc::F_SETFD, 0) == -1 {
                    return io::Error::last_os_error();
                }
            } else if libc::dup2(self.fd, 3) == -1 {
                return io::Error::last_os_error();
            }
            let mut digits = [0u8; 20];
            let mut n = 0;
            let mut pid = libc::getpid() as u64;
            loop {
                digits[n] = b'0' + (pid % 10) as u8;
                n += 1;
                pid /= 10;
                if pid == 0 {
                    break;
                }
            }
            let mut at = PID_VAR_PREFIX.len();
            for i in (0..n).rev() {
                *self.pid_var.add(at) = digits[i];
                at += 1;
            }
            *self.pid_var.add(at) = 0;
            libc::execvpe(self.argv[0], self.argv.as_ptr(), self.envp.as_ptr());
        }
        io::Error::last_os_error()
    }
}

impl Spawned {
    /// Start `argv` with a listening socket.  `die_with_us`: ask the
    /// kernel to send the child SIGTERM when the thread that started it
    /// ends (only right for the shared server, started by the main thread,
    /// which lives as long as the process).
    pub fn start(argv: &[String], die_with_us: bool) -> io::Result<Spawned> {
        // Private (0700 whatever the umask): only we and the child may
        // connect to the server's socket.
        let dir = tempfile::Builder::new()
            .prefix("nbdkit-rs-nbd")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir()?;
        let socket = dir.path().join("sock");
        let listener = UnixListener::bind(&socket)?;
        // Prefer descriptor 3 itself when it is free, so that no other
        // descriptor the child gets (such as std's exec-error pipe) can
        // be 3 and be overwritten there.
        // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor we own.
        let fd = unsafe { libc::fcntl(listener.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
        if fd == -1 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just created and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        drop(listener);
        let mut args = ExecArgs::new(argv, fd.as_raw_fd())?;
        let mut cmd = Command::new(&argv[0]);
        // stdout may be the NBD connection (-s): the child's output goes to
        // our stderr, with our log.
        let stderr = io::stderr().as_fd().try_clone_to_owned()?;
        cmd.stdin(Stdio::null()).stdout(Stdio::from(stderr));
        // SAFETY: the closure only makes async-signal-safe calls.
        unsafe {
            cmd.pre_exec(move || {
                if die_with_us {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                }
                Err(args.exec())
            });
        }
        let child = cmd.spawn()?;
        // Only the child listens now: if it dies, connecting fails instead
        // of waiting in the backlog of a socket nobody will accept on.
        drop(fd);
        Ok(Spawned {
            child,
            socket,
            _dir: dir,
        })
    }

    /// Connect to the child's socket.
    pub fn connect(&self) -> io::Result<UnixStream> {
        UnixStream::connect(&self.socket)
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Spawned {
    /// SIGTERM, a few seconds to exit, then SIGKILL; always reaped.
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: kill has no memory preconditions; the pid is our
        // unreaped child, so it cannot have been reused.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::warn!(
            pid = self.child.id(),
            "nbd: command= did not exit on SIGTERM; killing it"
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
