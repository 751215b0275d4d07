//! What the nbdkit_* functions see: the call in progress on this thread,
//! the open export's interned strings, and error reporting.

use super::*;

pub(crate) struct Conn {
    /// None for calls made before an export is open (preconnect,
    /// list_exports, default_export): their results are copied at once, so
    /// what they intern is freed right after.
    pub(super) export: Option<CString>,
    pub(super) pool: Mutex<Vec<CString>>,
}

impl Conn {
    pub fn new(export: &str) -> Arc<Conn> {
        let export = CString::new(export.replace('\0', "")).unwrap_or_default();
        Arc::new(Conn {
            export: Some(export),
            pool: Mutex::new(Vec::new()),
        })
    }

    pub fn scratch() -> Arc<Conn> {
        Arc::new(Conn {
            export: None,
            pool: Mutex::new(Vec::new()),
        })
    }
}

#[derive(Default)]
pub(super) struct CallState {
    /// A plugin call is in progress on this thread.
    pub(super) active: bool,
    /// Keep nbdkit_error messages for the caller instead of logging them
    /// (configuration: they become the one-line start-up error).
    pub(super) capture: bool,
    pub(super) errors: Vec<String>,
    /// From nbdkit_set_error.
    pub(super) errno: c_int,
    pub(super) conn: Option<Arc<Conn>>,
    /// nbdkit_disconnect(1) was called.
    pub(super) force_disconnect: bool,
}

thread_local! {
    pub(super) static CALL: RefCell<CallState> = RefCell::new(CallState::default());
}

/// Strings interned outside any connection: kept until exit.
pub(super) static GLOBAL_POOL: Mutex<Vec<CString>> = Mutex::new(Vec::new());

/// The loaded plugin's name, for log lines.
pub(super) static PLUGIN_NAME: RwLock<String> = RwLock::new(String::new());

pub(crate) fn set_plugin_name(name: &str) {
    *PLUGIN_NAME.write_unpoisoned() = name.to_string();
}

pub(super) fn plugin_name() -> String {
    PLUGIN_NAME.read_unpoisoned().clone()
}

pub(super) fn current_conn() -> Option<Arc<Conn>> {
    CALL.try_with(|c| c.try_borrow().ok().and_then(|c| c.conn.clone()))
        .ok()
        .flatten()
}

/// Report an error the nbdkit way: keep it for the call in progress (its
/// message goes to the client), and log it unless it is being captured.
pub(super) fn report_error(text: String) {
    let captured = CALL
        .try_with(|c| match c.try_borrow_mut() {
            Ok(mut c) if c.active => {
                c.errors.push(text.clone());
                c.capture
            }
            _ => false,
        })
        .unwrap_or(false);
    if !captured {
        tracing::error!("{}: {text}", plugin_name());
    }
}

pub(super) fn set_errno(e: c_int) {
    // SAFETY: __errno_location returns this thread's errno.
    unsafe { *libc::__errno_location() = e };
}

/// Error + errno, as most failing nbdkit_* functions do.
pub(super) fn fail(errno: c_int, text: String) {
    report_error(text);
    set_errno(errno);
}

/// Read a C string argument lossily; None for NULL.
pub(super) fn arg(p: *const c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: the API takes NUL-terminated strings; NULL was excluded.
    Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// A malloc'd copy the plugin frees with free(3).
pub(super) fn malloc_string(s: &str) -> *mut c_char {
    let Ok(c) = CString::new(s) else {
        return std::ptr::null_mut();
    };
    // SAFETY: strdup of a valid C string; NULL (ENOMEM) is passed on.
    unsafe { libc::strdup(c.as_ptr()) }
}

pub(super) fn intern(s: CString) -> *const c_char {
    let p = s.as_ptr();
    // The CString's heap buffer does not move when the CString is moved
    // into the pool, so `p` stays valid as long as the pool keeps it.
    match current_conn() {
        Some(conn) => conn.pool.lock_unpoisoned().push(s),
        None => GLOBAL_POOL.lock_unpoisoned().push(s),
    }
    p
}
