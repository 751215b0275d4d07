//! Every `unsafe` line of the crate: the `struct nbdkit_plugin` layout,
//! dlopen/dlsym, calls through the plugin's function pointers, and the
//! `nbdkit_*` functions plugins call back (the variadic ones are in
//! `shim.c`, which hands finished strings to `cplugin_shim_error` and
//! `cplugin_shim_debug` here).
//!
//! The functions exported to plugins never panic and never unwind: every
//! pointer they are given is checked for NULL, every string is read
//! lossily, and every failure is reported the nbdkit way (`nbdkit_error`
//! text, an errno, a -1 or NULL result).
//!
//! `plugin` is the struct and the calls into it, `call` the per-thread
//! state the callbacks see, `api` the nbdkit_* functions, `extents` and
//! `exports` the two lists plugins fill, `keep` what holds them all in the
//! executable.
#![allow(unsafe_code)]
// The exported functions are called by C with nbdkit-plugin(3)'s contract.
#![allow(clippy::missing_safety_doc)]

use nbdkit_backend::{LockExt, RwLockExt};
use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use nbdkit_backend::client::{Client, Peer};
use nbdkit_backend::Extents;

mod api;
mod call;
mod exports;
mod extents;
mod keep;
mod plugin;
pub(crate) use api::*;
pub(crate) use call::*;
pub(crate) use exports::*;
pub(crate) use extents::*;
pub(crate) use keep::*;
pub(crate) use plugin::*;

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> CString {
        CString::new(s).unwrap()
    }

    #[test]
    fn parsers_report_errors_instead_of_crashing() {
        let mut u8v = 0u8;
        let mut i32v = 0i32;
        // SAFETY: (whole test) valid C strings or NULL, valid out pointers.
        unsafe {
            assert_eq!(
                nbdkit_parse_uint8_t(c("x").as_ptr(), c("0x10").as_ptr(), &mut u8v),
                0
            );
            assert_eq!(u8v, 16);
            assert_eq!(
                nbdkit_parse_uint8_t(c("x").as_ptr(), c("300").as_ptr(), &mut u8v),
                -1
            );
            assert_eq!(
                nbdkit_parse_uint8_t(std::ptr::null(), std::ptr::null(), std::ptr::null_mut()),
                -1
            );
            assert_eq!(
                nbdkit_parse_int32_t(c("x").as_ptr(), c("-12").as_ptr(), &mut i32v),
                0
            );
            assert_eq!(i32v, -12);
            assert_eq!(
                nbdkit_parse_unsigned(c("x").as_ptr(), c("-1").as_ptr(), std::ptr::null_mut()),
                -1
            );
            assert_eq!(nbdkit_parse_size(c("4k").as_ptr()), 4096);
            assert_eq!(nbdkit_parse_size(std::ptr::null()), -1);
            assert_eq!(nbdkit_parse_bool(c("on").as_ptr()), 1);
            assert_eq!(nbdkit_parse_bool(c("maybe").as_ptr()), -1);
            let mut p = 0f64;
            assert_eq!(
                nbdkit_parse_probability(c("p").as_ptr(), c("25%").as_ptr(), &mut p),
                0
            );
            assert_eq!(p, 0.25);
        }
    }

    #[test]
    fn extents_and_exports_lists() {
        // SAFETY: (whole test) lists made here, freed once.
        unsafe {
            let e = nbdkit_extents_new(100, 200);
            assert!(!e.is_null());
            assert_eq!(nbdkit_add_extent(e, 0, 150, 0), 0);
            assert_eq!(nbdkit_add_extent(e, 160, 10, 3), -1, "a gap is refused");
            assert_eq!(nbdkit_add_extent(e, 150, 100, 3), 0);
            assert_eq!(nbdkit_extents_count(e), 2);
            let x = nbdkit_get_extent(e, 1);
            assert_eq!((x.offset, x.length, x.type_), (150, 50, 3));
            let bad = nbdkit_get_extent(e, 9);
            assert_eq!(bad.length, 0);
            nbdkit_extents_free(e);
            assert!(nbdkit_extents_new(5, 1).is_null());
            assert_eq!(nbdkit_add_extent(std::ptr::null_mut(), 0, 1, 0), -1);

            let x = nbdkit_exports_new();
            assert_eq!(
                nbdkit_add_export(x, c("a").as_ptr(), c("first").as_ptr()),
                0
            );
            assert_eq!(nbdkit_add_export(x, c("b").as_ptr(), std::ptr::null()), 0);
            assert_eq!(nbdkit_add_export(x, std::ptr::null(), std::ptr::null()), -1);
            assert_eq!(nbdkit_use_default_export(x), 0);
            assert_eq!(nbdkit_exports_count(x), 3);
            let b = nbdkit_get_export(x, 1);
            assert_eq!(CStr::from_ptr(b.name).to_str().unwrap(), "b");
            assert!(b.description.is_null());
            nbdkit_exports_free(x);
        }
    }

    #[test]
    fn interning_and_connection_functions_outside_a_connection() {
        // SAFETY: (whole test) valid C strings.
        unsafe {
            let s = nbdkit_strndup_intern(c("hello").as_ptr(), 3);
            assert_eq!(CStr::from_ptr(s).to_str().unwrap(), "hel");
            assert!(nbdkit_strdup_intern(std::ptr::null()).is_null());
        }
        assert!(nbdkit_export_name().is_null());
        assert_eq!(nbdkit_is_tls(), -1);
        assert!(nbdkit_peer_tls_dn().is_null());
        assert_eq!(nbdkit_peer_uid(), -1);
        assert_eq!(nbdkit_nanosleep(0, 1000), 0);
    }

    #[test]
    fn peer_tls_dn_inside_a_connection() {
        // SAFETY: (whole test) the results are malloc'd C strings, read
        // and then freed once.
        let read = |p: *mut c_char| unsafe {
            assert!(!p.is_null());
            let s = CStr::from_ptr(p).to_str().unwrap().to_string();
            libc::free(p as *mut c_void);
            s
        };
        let plain = Client::new(1, Peer::Stdio);
        {
            let _g = plain.enter();
            assert_eq!(read(nbdkit_peer_tls_dn()), "");
            assert_eq!(read(nbdkit_peer_tls_issuer_dn()), "");
        }
        let verified = Client::new(2, Peer::Stdio);
        verified.set_tls();
        verified.set_tls_names("CN=client.example.com,O=BigCo".into(), "CN=BigCo".into());
        let _g = verified.enter();
        assert_eq!(read(nbdkit_peer_tls_dn()), "CN=client.example.com,O=BigCo");
        assert_eq!(read(nbdkit_peer_tls_issuer_dn()), "CN=BigCo");
    }

    #[test]
    fn read_password_forms() {
        let dir = std::env::temp_dir().join(format!("cplugin-pw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("pw");
        std::fs::write(&f, "s3cret\n").unwrap();
        let mut out: *mut c_char = std::ptr::null_mut();
        // SAFETY: valid strings and out pointer; results are malloc'd and
        // freed with free().
        unsafe {
            let v = c(&format!("+{}", f.display()));
            assert_eq!(nbdkit_read_password(v.as_ptr(), &mut out), 0);
            assert_eq!(CStr::from_ptr(out).to_str().unwrap(), "s3cret");
            libc::free(out as *mut c_void);
            assert_eq!(nbdkit_read_password(c("plain").as_ptr(), &mut out), 0);
            assert_eq!(CStr::from_ptr(out).to_str().unwrap(), "plain");
            libc::free(out as *mut c_void);
            assert_eq!(
                nbdkit_read_password(c("+/nonexistent/pw").as_ptr(), &mut out),
                -1
            );
            assert_eq!(
                nbdkit_read_password(c("-notanumber").as_ptr(), &mut out),
                -1
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
