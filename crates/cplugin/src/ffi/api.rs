//! The nbdkit_* functions plugins call back (the variadic ones are in
//! `shim.c`).

use super::*;

#[no_mangle]
pub unsafe extern "C" fn cplugin_shim_error(msg: *const c_char) {
    report_error(arg(msg).unwrap_or_default());
}

#[no_mangle]
pub unsafe extern "C" fn cplugin_shim_debug(msg: *const c_char) {
    let text = arg(msg).unwrap_or_default();
    tracing::debug!("{}: {}", plugin_name(), text.trim_end_matches('\n'));
}

#[no_mangle]
pub extern "C" fn nbdkit_set_error(err: c_int) {
    let _ = CALL.try_with(|c| {
        if let Ok(mut c) = c.try_borrow_mut() {
            c.errno = err;
        }
    });
}

#[no_mangle]
pub extern "C" fn nbdkit_export_name() -> *const c_char {
    if let Some(export) = current_conn().and_then(|c| c.export.as_ref().map(|e| e.as_ptr())) {
        return export;
    }
    match Client::current().and_then(|c| c.export_name()) {
        Some(name) => intern(CString::new(name.replace('\0', "")).unwrap_or_default()),
        None => {
            fail(
                libc::EINVAL,
                "nbdkit_export_name: no export has been chosen in this call".into(),
            );
            std::ptr::null()
        }
    }
}

#[no_mangle]
pub extern "C" fn nbdkit_is_tls() -> c_int {
    match current_client("nbdkit_is_tls") {
        Some(c) => c.is_tls() as c_int,
        None => -1,
    }
}

/// nbdkit_peer_tls_dn / nbdkit_peer_tls_issuer_dn (nbdkit >= 1.40): the
/// verified client certificate's DN, malloc'd for the plugin to free; ""
/// when there is none (not TLS, no certificate, no --tls-verify-peer),
/// which is not an error; NULL only outside a connection.
fn tls_name(what: &str, pick: fn(&Client) -> Option<&str>) -> *mut c_char {
    match current_client(what) {
        Some(c) => {
            let p = malloc_string(pick(&c).unwrap_or(""));
            if p.is_null() {
                fail(libc::ENOMEM, format!("{what}: out of memory"));
            }
            p
        }
        None => std::ptr::null_mut(),
    }
}

#[no_mangle]
pub extern "C" fn nbdkit_peer_tls_dn() -> *mut c_char {
    tls_name("nbdkit_peer_tls_dn", Client::tls_dn)
}

#[no_mangle]
pub extern "C" fn nbdkit_peer_tls_issuer_dn() -> *mut c_char {
    tls_name("nbdkit_peer_tls_issuer_dn", Client::tls_issuer_dn)
}

#[no_mangle]
pub unsafe extern "C" fn nbdkit_absolute_path(path: *const c_char) -> *mut c_char {
    let Some(p) = arg(path).filter(|p| !p.is_empty()) else {
        fail(
            libc::ENOENT,
            "cannot convert a null or empty path to an absolute path".into(),
        );
        return std::ptr::null_mut();
    };
    match std::path::absolute(&p) {
        Ok(a) => malloc_string(&a.to_string_lossy()),
        Err(e) => {
            fail(
                e.raw_os_error().unwrap_or(libc::EIO),
                format!("{p}: cannot make an absolute path: {e}"),
            );
            std::ptr::null_mut()
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn nbdkit_realpath(path: *const c_char) -> *mut c_char {
    let Some(p) = arg(path).filter(|p| !p.is_empty()) else {
        fail(libc::ENOENT, "cannot resolve a null or empty path".into());
        return std::ptr::null_mut();
    };
    match std::fs::canonicalize(&p) {
        Ok(a) => malloc_string(&a.to_string_lossy()),
        Err(e) => {
            fail(
                e.raw_os_error().unwrap_or(libc::EIO),
                format!("realpath: {p}: {e}"),
            );
            std::ptr::null_mut()
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn nbdkit_parse_size(s: *const c_char) -> i64 {
    let Some(text) = arg(s) else {
        fail(libc::EINVAL, "nbdkit_parse_size: no string".into());
        return -1;
    };
    match nbdkit_backend::parse_size(&text) {
        Ok(n) => n as i64,
        Err(e) => {
            fail(libc::EINVAL, format!("could not parse size '{text}': {e}"));
            -1
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn nbdkit_parse_bool(s: *const c_char) -> c_int {
    let text = arg(s).unwrap_or_default();
    match nbdkit_backend::parse_bool(&text) {
        Ok(b) => b as c_int,
        Err(e) => {
            fail(
                libc::EINVAL,
                format!("could not decipher boolean '{text}': {e}"),
            );
            -1
        }
    }
}

macro_rules! parse_int_fn {
    ($($name:ident: $t:ty),* $(,)?) => {$(
        #[no_mangle]
        pub unsafe extern "C" fn $name(what: *const c_char, s: *const c_char, r: *mut $t) -> c_int {
            let what = arg(what).unwrap_or_else(|| "value".into());
            let text = arg(s).unwrap_or_default();
            let signed = <$t>::MIN != 0;
            match crate::parse::c_integer(&text, signed)
                .and_then(|n| <$t>::try_from(n).map_err(|_| "the number is out of range".to_string()))
            {
                Ok(v) => {
                    if !r.is_null() {
                        // SAFETY: the caller passes a pointer to the result type (or NULL).
                        unsafe { *r = v };
                    }
                    0
                }
                Err(e) => {
                    let errno = if e.contains("range") { libc::ERANGE } else { libc::EINVAL };
                    fail(errno, format!("{what}: could not parse number '{text}': {e}"));
                    -1
                }
            }
        }
    )*};
}

parse_int_fn!(
    nbdkit_parse_int: c_int,
    nbdkit_parse_unsigned: c_uint,
    nbdkit_parse_int8_t: i8,
    nbdkit_parse_uint8_t: u8,
    nbdkit_parse_int16_t: i16,
    nbdkit_parse_uint16_t: u16,
    nbdkit_parse_int32_t: i32,
    nbdkit_parse_uint32_t: u32,
    nbdkit_parse_int64_t: i64,
    nbdkit_parse_uint64_t: u64,
);

#[no_mangle]
pub unsafe extern "C" fn nbdkit_parse_probability(
    what: *const c_char,
    s: *const c_char,
    r: *mut f64,
) -> c_int {
    let what = arg(what).unwrap_or_else(|| "probability".into());
    let text = arg(s).unwrap_or_default();
    match crate::parse::probability(&text) {
        Ok(v) => {
            if !r.is_null() {
                // SAFETY: pointer to a double (or NULL).
                unsafe { *r = v };
            }
            0
        }
        Err(e) => {
            fail(
                libc::EINVAL,
                format!("{what}: could not parse probability '{text}': {e}"),
            );
            -1
        }
    }
}

#[no_mangle]
pub extern "C" fn nbdkit_stdio_safe() -> c_int {
    nbdkit_backend::stdio_safe() as c_int
}

#[no_mangle]
pub unsafe extern "C" fn nbdkit_read_password(
    value: *const c_char,
    password: *mut *mut c_char,
) -> c_int {
    if password.is_null() {
        fail(
            libc::EINVAL,
            "nbdkit_read_password: no result pointer".into(),
        );
        return -1;
    }
    let v = arg(value).unwrap_or_default();
    match nbdkit_backend::read_secret("password", &v) {
        Ok(pw) => {
            let p = malloc_string(&pw);
            if p.is_null() {
                fail(libc::ENOMEM, "nbdkit_read_password: out of memory".into());
                return -1;
            }
            // SAFETY: the caller passes a `char **` for the result.
            unsafe { *password = p };
            0
        }
        Err(e) => {
            fail(e.errno, e.message);
            -1
        }
    }
}

/// Sleep, but wake early (-1, ESHUTDOWN) when the server is shutting down
/// or the current client is to be disconnected, as nbdkit does.
#[no_mangle]
pub extern "C" fn nbdkit_nanosleep(sec: c_uint, nsec: c_uint) -> c_int {
    let total =
        std::time::Duration::from_secs(sec as u64) + std::time::Duration::from_nanos(nsec as u64);
    let until = std::time::Instant::now() + total;
    let client = Client::current();
    loop {
        if nbdkit_backend::client::shutdown_requested()
            || client.as_ref().is_some_and(|c| c.disconnect_requested())
        {
            fail(
                libc::ESHUTDOWN,
                "nbdkit_nanosleep: interrupted by shutdown".into(),
            );
            return -1;
        }
        let now = std::time::Instant::now();
        if now >= until {
            return 0;
        }
        std::thread::sleep((until - now).min(std::time::Duration::from_millis(50)));
    }
}

pub(super) fn current_client(what: &str) -> Option<Arc<Client>> {
    let c = Client::current();
    if c.is_none() {
        fail(
            libc::EINVAL,
            format!("{what}: no client connection in this call"),
        );
    }
    c
}

#[no_mangle]
pub unsafe extern "C" fn nbdkit_peer_name(
    addr: *mut libc::sockaddr,
    addrlen: *mut libc::socklen_t,
) -> c_int {
    let Some(client) = current_client("nbdkit_peer_name") else {
        return -1;
    };
    if addr.is_null() || addrlen.is_null() {
        fail(
            libc::EINVAL,
            "nbdkit_peer_name: NULL address or length".into(),
        );
        return -1;
    }
    // SAFETY: all-zero bytes are a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match client.peer() {
        Peer::Tcp(std::net::SocketAddr::V4(a)) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is large and aligned enough for any
            // sockaddr type.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in, sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        Peer::Tcp(std::net::SocketAddr::V6(a)) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo().to_be(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in6, sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
        // A client's end of a Unix socket is unnamed: only the family, as
        // getpeername(2) reports it.
        Peer::Unix { .. } => {
            ss.ss_family = libc::AF_UNIX as libc::sa_family_t;
            std::mem::size_of::<libc::sa_family_t>()
        }
        Peer::Stdio => {
            fail(
                libc::ENOTSOCK,
                "nbdkit_peer_name: the client is on stdin/stdout, not a socket".into(),
            );
            return -1;
        }
    };
    // SAFETY: the caller passes a buffer of *addrlen bytes; we copy at most
    // that and report the full length, as getpeername does.
    unsafe {
        let room = *addrlen as usize;
        std::ptr::copy_nonoverlapping(&ss as *const _ as *const u8, addr as *mut u8, len.min(room));
        *addrlen = len as libc::socklen_t;
    }
    0
}

pub(super) fn peer_cred(what: &str, pick: impl Fn(&Peer) -> Option<i64>) -> i64 {
    let Some(client) = current_client(what) else {
        return -1;
    };
    match pick(client.peer()) {
        Some(v) => v,
        None => {
            fail(
                libc::ENOTSUP,
                format!("{what}: only known for clients on a Unix socket"),
            );
            -1
        }
    }
}

#[no_mangle]
pub extern "C" fn nbdkit_peer_pid() -> i64 {
    peer_cred("nbdkit_peer_pid", |p| match p {
        Peer::Unix { pid, .. } => pid.map(i64::from),
        _ => None,
    })
}

#[no_mangle]
pub extern "C" fn nbdkit_peer_uid() -> i64 {
    peer_cred("nbdkit_peer_uid", |p| match p {
        Peer::Unix { uid, .. } => uid.map(i64::from),
        _ => None,
    })
}

#[no_mangle]
pub extern "C" fn nbdkit_peer_gid() -> i64 {
    peer_cred("nbdkit_peer_gid", |p| match p {
        Peer::Unix { gid, .. } => gid.map(i64::from),
        _ => None,
    })
}

#[no_mangle]
pub extern "C" fn nbdkit_shutdown() {
    nbdkit_backend::request_shutdown();
}

/// nbdkit 1.34's `nbdkit_disconnect`: stop serving the current client once
/// its requests in flight have been answered; with `force`, drop the
/// connection as soon as the plugin's current call returns, without
/// replying to it.
#[no_mangle]
pub extern "C" fn nbdkit_disconnect(force: c_int) {
    if let Some(c) = current_client("nbdkit_disconnect") {
        c.request_disconnect();
        if force != 0 {
            CALL.with(|s| {
                let mut s = s.borrow_mut();
                if s.active {
                    s.force_disconnect = true;
                }
            });
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn nbdkit_strdup_intern(s: *const c_char) -> *const c_char {
    if s.is_null() {
        fail(libc::EINVAL, "nbdkit_strdup_intern: NULL string".into());
        return std::ptr::null();
    }
    // SAFETY: a NUL-terminated string (NULL excluded above).
    intern(unsafe { CStr::from_ptr(s) }.to_owned())
}

#[no_mangle]
pub unsafe extern "C" fn nbdkit_strndup_intern(s: *const c_char, n: usize) -> *const c_char {
    if s.is_null() {
        fail(libc::EINVAL, "nbdkit_strndup_intern: NULL string".into());
        return std::ptr::null();
    }
    // SAFETY: strnlen reads at most n bytes or up to the NUL, which the
    // caller guarantees are readable (strndup's contract).
    let len = unsafe { libc::strnlen(s, n) };
    // SAFETY: those `len` bytes were just measured as readable.
    let bytes = unsafe { std::slice::from_raw_parts(s as *const u8, len) };
    intern(CString::new(bytes).unwrap_or_default())
}
