//! Secret parameters (passwords, keys, tokens) the nbdkit way, for every
//! plugin that takes one, native or C (`nbdkit_read_password`):
//!
//! * `-` reads one line from standard input, prompting without echo on a
//!   terminal — refused when the server speaks NBD on stdin/stdout (`-s`),
//!   where it would read the client's bytes;
//! * `-FD` reads file descriptor FD (not 0, 1 or 2);
//! * `+FILE` reads a file;
//! * anything else is the secret itself.
//!
//! One trailing newline is dropped from what is read.

use std::io::{BufRead, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};

static STDIO_SAFE: AtomicBool = AtomicBool::new(true);

/// Tell the secret reader (and C plugins' `nbdkit_stdio_safe`) whether
/// stdin/stdout are free, i.e. the server is not serving on them (`-s`).
/// Call it before plugins are configured.
pub fn set_stdio_safe(safe: bool) {
    STDIO_SAFE.store(safe, Ordering::Relaxed);
}

/// Whether stdin/stdout are free for plugins (see [`set_stdio_safe`]).
pub fn stdio_safe() -> bool {
    STDIO_SAFE.load(Ordering::Relaxed)
}

/// Why a secret could not be read: an errno (for C plugins) and a message
/// that starts with `KEY=VALUE` (never the secret itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretError {
    pub errno: i32,
    pub message: String,
}

impl std::fmt::Display for SecretError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for SecretError {}

/// Read the secret that the parameter `key=value` names (see the module
/// documentation for the syntax).
pub fn read_secret(key: &str, value: &str) -> Result<String, SecretError> {
    let fail = |errno: i32, why: &dyn std::fmt::Display| SecretError {
        errno,
        message: format!("{key}={value}: {why}"),
    };
    let io_fail = |e: std::io::Error| fail(e.raw_os_error().unwrap_or(libc::EIO), &e);
    let read = if value == "-" {
        if !stdio_safe() {
            return Err(fail(
                libc::EINVAL,
                &format!(
                    "standard input is the NBD connection (-s); \
                     use {key}=+FILE or {key}=-FD instead"
                ),
            ));
        }
        from_stdin(key).map_err(io_fail)?
    } else if let Some(fd) = value.strip_prefix('-') {
        let fd: i32 = fd
            .parse()
            .ok()
            .filter(|&fd| fd >= 0)
            .ok_or_else(|| fail(libc::EINVAL, &"expected -FD with a file descriptor number"))?;
        if fd <= 2 {
            return Err(fail(
                libc::EINVAL,
                &"-FD cannot read stdin, stdout or stderr (use - for stdin)",
            ));
        }
        from_fd(fd).map_err(io_fail)?
    } else if let Some(path) = value.strip_prefix('+') {
        let bytes = std::fs::read(path).map_err(io_fail)?;
        String::from_utf8_lossy(&bytes).into_owned()
    } else {
        return Ok(value.to_string());
    };
    Ok(chomp(read))
}

/// Strip one trailing newline (files and pipes usually end with one).
fn chomp(mut s: String) -> String {
    if s.ends_with('\n') {
        s.pop();
        if s.ends_with('\r') {
            s.pop();
        }
    }
    s
}

/// Everything on descriptor `fd`, read in place: the descriptor stays open
/// and (as with a duplicate) its offset moves past what was read.
fn from_fd(fd: i32) -> std::io::Result<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match nix::unistd::read(fd, &mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// One line from standard input; on a terminal, prompt and do not echo.
/// Empty standard input is an error rather than an empty secret.
fn from_stdin(key: &str) -> std::io::Result<String> {
    use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
    let stdin = std::io::stdin();
    let saved = if stdin.is_terminal() {
        print!("{key}: ");
        let _ = std::io::stdout().flush();
        tcgetattr(&stdin).ok()
    } else {
        None
    };
    if let Some(saved) = &saved {
        let mut quiet = saved.clone();
        quiet.local_flags.remove(LocalFlags::ECHO);
        let _ = tcsetattr(&stdin, SetArg::TCSAFLUSH, &quiet);
    }
    let mut line = String::new();
    let r = stdin.lock().read_line(&mut line);
    if let Some(saved) = &saved {
        let _ = tcsetattr(&stdin, SetArg::TCSAFLUSH, saved);
        println!();
    }
    match r? {
        0 => Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "standard input is empty",
        )),
        _ => Ok(line),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        assert_eq!(read_secret("k", "plain").unwrap(), "plain");
        let dir = std::env::temp_dir().join(format!("secret-test-{}", std::process::id()));
        std::fs::write(&dir, "from-file\n").unwrap();
        let v = format!("+{}", dir.display());
        assert_eq!(read_secret("k", &v).unwrap(), "from-file");
        let f = std::fs::File::open(&dir).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
        assert_eq!(read_secret("k", &format!("-{fd}")).unwrap(), "from-file");
        std::fs::remove_file(&dir).unwrap();
        let e = read_secret("k", "+/nonexistent/secret").unwrap_err();
        assert_eq!(e.errno, libc::ENOENT);
        assert!(e.message.starts_with("k=+/nonexistent/secret: "), "{e}");
        assert_eq!(read_secret("k", "-nope").unwrap_err().errno, libc::EINVAL);
        assert_eq!(read_secret("k", "-0").unwrap_err().errno, libc::EINVAL);
        assert_eq!(read_secret("k", "-2").unwrap_err().errno, libc::EINVAL);
    }
}
