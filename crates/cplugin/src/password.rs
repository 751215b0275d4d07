//! `nbdkit_read_password`'s value syntax: `-` (ask on the terminal),
//! `-FD` (read file descriptor FD), `+FILE` (read a file), or the password
//! itself.

use std::io::{BufRead, Read, Write};

type Failure = (i32, String);

fn io_fail(what: &str, e: std::io::Error) -> Failure {
    (
        e.raw_os_error().unwrap_or(libc::EIO),
        format!("{what}: {e}"),
    )
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

pub fn read(value: &str, stdio_safe: bool) -> Result<String, Failure> {
    if value == "-" {
        if !stdio_safe {
            return Err((
                libc::EINVAL,
                "password=-: stdin is in use by the server (-s); use password=+FILE or password=-FD".into(),
            ));
        }
        return from_terminal();
    }
    if let Some(fd) = value.strip_prefix('-') {
        let fd: i32 = fd.parse().map_err(|_| {
            (
                libc::EINVAL,
                format!("password={value}: expected -FD with a file descriptor number"),
            )
        })?;
        return from_fd(fd);
    }
    if let Some(file) = value.strip_prefix('+') {
        let s = std::fs::read(file).map_err(|e| io_fail(file, e))?;
        return Ok(chomp(String::from_utf8_lossy(&s).into_owned()));
    }
    Ok(value.to_string())
}

fn from_fd(fd: i32) -> Result<String, Failure> {
    // Read a duplicate, so the descriptor itself stays as the parent left it.
    let mut f = crate::ffi::dup_fd(fd).map_err(|e| io_fail(&format!("password=-{fd}"), e))?;
    let mut s = String::new();
    f.read_to_string(&mut s)
        .map_err(|e| io_fail(&format!("password=-{fd}"), e))?;
    Ok(chomp(s))
}

fn from_terminal() -> Result<String, Failure> {
    let _echo_off = crate::ffi::EchoOff::new();
    print!("password: ");
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| io_fail("reading the password", e))?;
    println!();
    Ok(chomp(line))
}
