//! Process plumbing: forking to the background, the pid file, signals,
//! --exit-with-parent, and the --run command.

use std::io::{Read, Write};
use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

/// The background child's promise to tell its parent that it is ready.
/// The parent of [`daemonize`] waits for it, so that when `nbdkit-rs`
/// returns to the shell the pid file exists and clients can connect.
pub struct Ready(Option<std::os::fd::OwnedFd>);

impl Ready {
    /// Nothing waits (foreground).
    pub fn none() -> Self {
        Ready(None)
    }

    /// Let the parent exit successfully.  Only the first call does anything.
    pub fn signal(&mut self) {
        if let Some(fd) = self.0.take() {
            let _ = std::fs::File::from(fd).write_all(b"1");
        }
    }
}

/// Fork to the background.  Called before the async runtime or any other
/// thread exists, which is what makes fork safe here: the child is a full
/// copy of a single-threaded process.  The parent waits until the child
/// calls [`Ready::signal`] (after writing the pid file) and then exits 0;
/// if the child dies first, the parent exits with the child's status.
pub fn daemonize(keep_stderr: bool) -> Result<Ready> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 with a valid two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("pipe: {}", std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 just returned these descriptors to us.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: no threads exist yet (see above).
    match unsafe { libc::fork() } {
        -1 => bail!("fork: {}", std::io::Error::last_os_error()),
        0 => {}
        child => {
            drop(wr);
            let mut byte = [0u8; 1];
            let ready = matches!(std::fs::File::from(rd).read(&mut byte), Ok(1));
            let code = if ready {
                0
            } else {
                let mut status = 0;
                // SAFETY: waiting for our own child.
                unsafe { libc::waitpid(child, &mut status, 0) };
                // The child's own error message went to /dev/null.
                crate::logging::stderr_line(format_args!(
                    "{}: error: the server failed while starting in the background \
                     (run with -f or -v to see why)",
                    crate::logging::program()
                ));
                if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) != 0 {
                    libc::WEXITSTATUS(status)
                } else {
                    1
                }
            };
            // SAFETY: _exit skips destructors that the child still owns.
            unsafe { libc::_exit(code) }
        }
    }
    drop(rd);
    // SAFETY: plain syscalls in the single-threaded child.
    unsafe {
        libc::setsid();
        let _ = std::env::set_current_dir("/");
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::dup2(null, 1);
            if !keep_stderr {
                libc::dup2(null, 2);
            }
            if null > 2 {
                libc::close(null);
            }
        }
    }
    Ok(Ready(Some(wr)))
}

/// Ask the kernel to send us SIGTERM when our parent exits.
pub fn exit_with_parent() -> Result<()> {
    // SAFETY: prctl with integer arguments.
    let r = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) };
    if r != 0 {
        bail!(
            "prctl(PR_SET_PDEATHSIG): {}",
            std::io::Error::last_os_error()
        );
    }
    // The parent may already be gone.
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } == 1 {
        bail!("--exit-with-parent: the parent process has already exited");
    }
    Ok(())
}

pub fn write_pidfile(path: &Path) -> Result<()> {
    // Written atomically so a waiting test never reads a half-written file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{}\n", std::process::id()))
        .and_then(|_| std::fs::rename(&tmp, path))
        .with_context(|| format!("writing pid file {}", path.display()))
}

/// SIGTERM, SIGINT and SIGHUP start a graceful shutdown: stop accepting,
/// finish in-flight requests, close backends.
pub fn on_signals(shutdown: CancellationToken) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = int.recv() => info!("SIGINT: shutting down"),
            _ = hup.recv() => info!("SIGHUP: shutting down"),
        }
        shutdown.cancel();
        // Wakes backends sleeping in nbdkit_backend::nanosleep.
        nbdkit_backend::request_shutdown();
    });
    Ok(())
}

/// Run the --run command with the connection variables set (`None`:
/// removed from its environment), and return its exit status as ours.
pub async fn run_captive(cmd: &str, vars: &[(&str, Option<String>)]) -> Result<ExitCode> {
    let mut c = tokio::process::Command::new("/bin/sh");
    c.arg("-c").arg(cmd);
    for (name, value) in vars {
        match value {
            Some(v) => c.env(name, v),
            None => c.env_remove(name),
        };
    }
    debug!("running: {cmd}");
    let status = c
        .status()
        .await
        .with_context(|| format!("--run: cannot start /bin/sh -c {cmd:?}"))?;
    debug!("--run command exited: {status}");
    use std::os::unix::process::ExitStatusExt;
    let code = match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        _ => 1,
    };
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

/// `-u USER` / `-g GROUP`, resolved to ids at start-up.
pub struct Ids {
    uid: Option<nix::unistd::Uid>,
    gid: Option<nix::unistd::Gid>,
    /// For messages.
    name: String,
}

impl Ids {
    /// Look up the user and group (names, or numeric ids).  With `-u` but
    /// no `-g`, the group is the user's primary group: keeping root's
    /// group after giving up root's uid would keep its files writable.
    pub fn resolve(user: Option<&str>, group: Option<&str>) -> Result<Option<Ids>> {
        use nix::unistd::{Gid, Group, Uid, User};
        if user.is_none() && group.is_none() {
            return Ok(None);
        }
        let mut primary = None;
        let uid = match user {
            None => None,
            Some(u) => {
                let found =
                    User::from_name(u).with_context(|| format!("-u {u}: looking up the user"))?;
                match (found, u.parse::<u32>()) {
                    (Some(pw), _) => {
                        primary = Some(pw.gid);
                        Some(pw.uid)
                    }
                    (None, Ok(n)) => {
                        primary = User::from_uid(Uid::from_raw(n))
                            .ok()
                            .flatten()
                            .map(|pw| pw.gid);
                        Some(Uid::from_raw(n))
                    }
                    (None, Err(_)) => bail!("-u {u}: no such user"),
                }
            }
        };
        let gid = match group {
            None => primary,
            Some(g) => {
                let found =
                    Group::from_name(g).with_context(|| format!("-g {g}: looking up the group"))?;
                match (found, g.parse::<u32>()) {
                    (Some(gr), _) => Some(gr.gid),
                    (None, Ok(n)) => Some(Gid::from_raw(n)),
                    (None, Err(_)) => bail!("-g {g}: no such group"),
                }
            }
        };
        if uid.is_some() && gid.is_none() {
            bail!(
                "-u {}: the user has no passwd entry, so its group is unknown: add -g GROUP",
                user.unwrap_or_default()
            );
        }
        let name = match (user, group) {
            (Some(u), Some(g)) => format!("user {u}, group {g}"),
            (Some(u), None) => format!("user {u}"),
            (None, Some(g)) => format!("group {g}"),
            (None, None) => unreachable!("checked above"),
        };
        Ok(Some(Ids { uid, gid, name }))
    }
}

/// Give up root: supplementary groups, then the group, then the user (in
/// that order: once the uid is not root, the groups cannot change).
/// glibc applies each call to every thread of the process.  `socket_dir`
/// (the private directory of `-U -`) is handed over so that the socket
/// can still be removed at exit.
pub fn change_user(ids: &Ids, socket_dir: Option<&Path>) -> Result<()> {
    use nix::unistd::{setgid, setgroups, setuid};
    if let Some(dir) = socket_dir {
        std::os::unix::fs::chown(
            dir,
            ids.uid.map(|u| u.as_raw()),
            ids.gid.map(|g| g.as_raw()),
        )
        .with_context(|| format!("changing the owner of {}", dir.display()))?;
    }
    if let Some(gid) = ids.gid {
        setgroups(&[gid]).with_context(|| format!("setgroups for {} (are we root?)", ids.name))?;
        setgid(gid).with_context(|| format!("setgid for {}", ids.name))?;
    }
    if let Some(uid) = ids.uid {
        setuid(uid).with_context(|| format!("setuid for {}", ids.name))?;
        // A uid change that could be undone would not be a change.
        if !uid.is_root() && setuid(nix::unistd::Uid::from_raw(0)).is_ok() {
            bail!("setuid: could regain root after changing to {}", ids.name);
        }
    }
    info!("now running as {}", ids.name);
    Ok(())
}
