//! Keeping the exports in the executable.

use super::*;

extern "C" {
    // Defined in shim.c.
    fn nbdkit_error(fs: *const c_char, ...);
    fn nbdkit_debug(fs: *const c_char, ...);
    fn nbdkit_printf_intern(fs: *const c_char, ...) -> *const c_char;
    // `va_list` arguments; only their addresses are taken here.
    fn nbdkit_verror(fs: *const c_char, args: *mut c_void);
    fn nbdkit_vdebug(fs: *const c_char, args: *mut c_void);
    fn nbdkit_vprintf_intern(fs: *const c_char, args: *mut c_void) -> *const c_char;
}

/// Every function of the plugin API, by address.  The linker drops object
/// code nothing refers to (and the C shim is a static library, pulled in
/// only when referenced); the loader refers to this list, so every
/// function is in the executable, where the binary's build script exports
/// `nbdkit_*` into the dynamic symbol table for plugins to resolve.
pub fn exported_functions() -> Vec<(&'static str, usize)> {
    macro_rules! f {
        ($($n:ident),* $(,)?) => { vec![$((stringify!($n), $n as *const () as usize)),*] };
    }
    f![
        nbdkit_error,
        nbdkit_verror,
        nbdkit_debug,
        nbdkit_vdebug,
        nbdkit_printf_intern,
        nbdkit_vprintf_intern,
        nbdkit_set_error,
        nbdkit_export_name,
        nbdkit_is_tls,
        nbdkit_peer_tls_dn,
        nbdkit_peer_tls_issuer_dn,
        nbdkit_absolute_path,
        nbdkit_realpath,
        nbdkit_parse_size,
        nbdkit_parse_bool,
        nbdkit_parse_int,
        nbdkit_parse_unsigned,
        nbdkit_parse_int8_t,
        nbdkit_parse_uint8_t,
        nbdkit_parse_int16_t,
        nbdkit_parse_uint16_t,
        nbdkit_parse_int32_t,
        nbdkit_parse_uint32_t,
        nbdkit_parse_int64_t,
        nbdkit_parse_uint64_t,
        nbdkit_parse_probability,
        nbdkit_stdio_safe,
        nbdkit_read_password,
        nbdkit_nanosleep,
        nbdkit_peer_name,
        nbdkit_peer_pid,
        nbdkit_peer_uid,
        nbdkit_peer_gid,
        nbdkit_shutdown,
        nbdkit_strdup_intern,
        nbdkit_strndup_intern,
        nbdkit_add_extent,
        nbdkit_extents_new,
        nbdkit_extents_free,
        nbdkit_extents_count,
        nbdkit_get_extent,
        nbdkit_add_export,
        nbdkit_use_default_export,
        nbdkit_exports_new,
        nbdkit_exports_free,
        nbdkit_exports_count,
        nbdkit_get_export,
    ]
}

pub(super) fn keep_exports() {
    std::hint::black_box(exported_functions());
}
