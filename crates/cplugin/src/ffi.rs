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

// ---------------------------------------------------------------------
// The plugin struct (nbdkit-plugin.h, API versions 1 and 2: the layout
// is the same, only the meaning of the data-call slots differs).
// ---------------------------------------------------------------------

type H = *mut c_void;

/// `struct nbdkit_plugin` as of nbdkit 1.32.  Fields past a plugin's
/// `_struct_size` are left zero (NULL callbacks) when it is copied.
#[repr(C)]
pub(crate) struct NbdkitPlugin {
    pub struct_size: u64,
    pub api_version: c_int,
    pub thread_model: c_int,
    pub name: *const c_char,
    pub longname: *const c_char,
    pub version: *const c_char,
    pub description: *const c_char,
    pub load: Option<unsafe extern "C" fn()>,
    pub unload: Option<unsafe extern "C" fn()>,
    pub config: Option<unsafe extern "C" fn(*const c_char, *const c_char) -> c_int>,
    pub config_complete: Option<unsafe extern "C" fn() -> c_int>,
    pub config_help: *const c_char,
    pub open: Option<unsafe extern "C" fn(c_int) -> H>,
    pub close: Option<unsafe extern "C" fn(H)>,
    pub get_size: Option<unsafe extern "C" fn(H) -> i64>,
    pub can_write: Option<unsafe extern "C" fn(H) -> c_int>,
    pub can_flush: Option<unsafe extern "C" fn(H) -> c_int>,
    pub is_rotational: Option<unsafe extern "C" fn(H) -> c_int>,
    pub can_trim: Option<unsafe extern "C" fn(H) -> c_int>,
    pub pread_v1: Option<unsafe extern "C" fn(H, *mut c_void, u32, u64) -> c_int>,
    pub pwrite_v1: Option<unsafe extern "C" fn(H, *const c_void, u32, u64) -> c_int>,
    pub flush_v1: Option<unsafe extern "C" fn(H) -> c_int>,
    pub trim_v1: Option<unsafe extern "C" fn(H, u32, u64) -> c_int>,
    pub zero_v1: Option<unsafe extern "C" fn(H, u32, u64, c_int) -> c_int>,
    pub errno_is_preserved: c_int,
    pub dump_plugin: Option<unsafe extern "C" fn()>,
    pub can_zero: Option<unsafe extern "C" fn(H) -> c_int>,
    pub can_fua: Option<unsafe extern "C" fn(H) -> c_int>,
    pub pread: Option<unsafe extern "C" fn(H, *mut c_void, u32, u64, u32) -> c_int>,
    pub pwrite: Option<unsafe extern "C" fn(H, *const c_void, u32, u64, u32) -> c_int>,
    pub flush: Option<unsafe extern "C" fn(H, u32) -> c_int>,
    pub trim: Option<unsafe extern "C" fn(H, u32, u64, u32) -> c_int>,
    pub zero: Option<unsafe extern "C" fn(H, u32, u64, u32) -> c_int>,
    pub magic_config_key: *const c_char,
    pub can_multi_conn: Option<unsafe extern "C" fn(H) -> c_int>,
    pub can_extents: Option<unsafe extern "C" fn(H) -> c_int>,
    pub extents: Option<unsafe extern "C" fn(H, u32, u64, u32, *mut NbdkitExtents) -> c_int>,
    pub can_cache: Option<unsafe extern "C" fn(H) -> c_int>,
    pub cache: Option<unsafe extern "C" fn(H, u32, u64, u32) -> c_int>,
    pub thread_model_fn: Option<unsafe extern "C" fn() -> c_int>,
    pub can_fast_zero: Option<unsafe extern "C" fn(H) -> c_int>,
    pub preconnect: Option<unsafe extern "C" fn(c_int) -> c_int>,
    pub get_ready: Option<unsafe extern "C" fn() -> c_int>,
    pub after_fork: Option<unsafe extern "C" fn() -> c_int>,
    pub list_exports: Option<unsafe extern "C" fn(c_int, c_int, *mut NbdkitExports) -> c_int>,
    pub default_export: Option<unsafe extern "C" fn(c_int, c_int) -> *const c_char>,
    pub export_description: Option<unsafe extern "C" fn(H) -> *const c_char>,
    pub cleanup: Option<unsafe extern "C" fn()>,
    pub block_size: Option<unsafe extern "C" fn(H, *mut u32, *mut u32, *mut u32) -> c_int>,
}

/// The smallest `_struct_size` accepted: everything up to the API v1 data
/// calls, which every nbdkit release since 1.0 has had.
pub(crate) const MIN_STRUCT_SIZE: u64 =
    std::mem::offset_of!(NbdkitPlugin, errno_is_preserved) as u64;

/// Size of the struct this server knows (nbdkit 1.32's).
pub(crate) const STRUCT_SIZE: u64 = std::mem::size_of::<NbdkitPlugin>() as u64;

/// Field offsets, for the layout test against the real header.
#[cfg(test)]
pub(crate) fn field_offsets() -> Vec<(&'static str, usize)> {
    use std::mem::offset_of;
    macro_rules! o {
        ($($c:literal => $f:ident),* $(,)?) => { vec![$(($c, offset_of!(NbdkitPlugin, $f))),*] };
    }
    o![
        "_struct_size" => struct_size, "_api_version" => api_version,
        "_thread_model" => thread_model, "name" => name, "longname" => longname,
        "version" => version, "description" => description, "load" => load,
        "unload" => unload, "config" => config, "config_complete" => config_complete,
        "config_help" => config_help, "open" => open, "close" => close,
        "get_size" => get_size, "can_write" => can_write, "can_flush" => can_flush,
        "is_rotational" => is_rotational, "can_trim" => can_trim,
        "_pread_v1" => pread_v1, "_pwrite_v1" => pwrite_v1, "_flush_v1" => flush_v1,
        "_trim_v1" => trim_v1, "_zero_v1" => zero_v1,
        "errno_is_preserved" => errno_is_preserved, "dump_plugin" => dump_plugin,
        "can_zero" => can_zero, "can_fua" => can_fua, "pread" => pread,
        "pwrite" => pwrite, "flush" => flush, "trim" => trim, "zero" => zero,
        "magic_config_key" => magic_config_key, "can_multi_conn" => can_multi_conn,
        "can_extents" => can_extents, "extents" => extents, "can_cache" => can_cache,
        "cache" => cache, "thread_model" => thread_model_fn,
        "can_fast_zero" => can_fast_zero, "preconnect" => preconnect,
        "get_ready" => get_ready, "after_fork" => after_fork,
        "list_exports" => list_exports, "default_export" => default_export,
        "export_description" => export_description, "cleanup" => cleanup,
        "block_size" => block_size,
    ]
}

/// A plugin's per-connection handle, as `open` returned it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RawHandle(H);

// SAFETY: the handle is an opaque token the plugin gave us; we never
// dereference it, only pass it back to the plugin's callbacks, which the
// plugin's thread model allows from any thread (lib.rs serializes the calls
// the model requires).
unsafe impl Send for RawHandle {}
// SAFETY: as for Send: shared references only copy the token.
unsafe impl Sync for RawHandle {}

/// Why a plugin call failed: the errno the server reports and the
/// messages the plugin gave with `nbdkit_error`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Failure {
    pub errno: c_int,
    pub messages: Vec<String>,
    /// The plugin called `nbdkit_disconnect(1)` during the call: drop the
    /// connection now, without a reply (whatever the call returned).
    pub disconnect: bool,
}

pub(crate) type CallResult<T> = Result<T, Failure>;

/// A loaded plugin: the shared object (never unloaded, so every pointer
/// into it stays valid) and a copy of its struct.
pub(crate) struct Library {
    p: NbdkitPlugin,
}

// SAFETY: the struct holds function pointers and pointers to static
// strings inside a shared object that is never dlclose'd; calling them from
// several threads is what the plugin's declared thread model governs, and
// lib.rs takes the locks that model requires around every call.
unsafe impl Send for Library {}
// SAFETY: as for Send: nothing in the struct is written after loading.
unsafe impl Sync for Library {}

/// Owned copies of the plugin's descriptive strings.
pub(crate) struct Strings {
    pub name: String,
    pub longname: Option<String>,
    pub version: Option<String>,
    pub description: Option<String>,
    pub config_help: Option<String>,
    pub magic_config_key: Option<String>,
}

fn dlerror_text() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated string valid until
    // the next dl* call on this thread; it is copied at once.
    unsafe {
        let e = libc::dlerror();
        if e.is_null() {
            "unknown dynamic loader error".into()
        } else {
            CStr::from_ptr(e).to_string_lossy().into_owned()
        }
    }
}

/// Copy a C string owned by the plugin (NULL = None).
fn opt_string(p: *const c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: non-NULL strings in the plugin struct are NUL-terminated
    // static data of the loaded (never unloaded) library.
    Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

impl Library {
    /// dlopen `path`, call its `plugin_init` and copy the struct.
    pub fn load_file(path: &Path) -> Result<Library, String> {
        keep_exports();
        let c = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| "the path contains a NUL byte".to_string())?;
        // SAFETY: dlopen with a valid C string.  RTLD_NOW resolves every
        // nbdkit_* reference now, so a missing function is a load error
        // rather than a crash later; RTLD_GLOBAL as nbdkit does, for plugins
        // that load language runtimes with their own modules.
        let dl = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if dl.is_null() {
            return Err(dlerror_text());
        }
        // SAFETY: dlsym on the handle just returned, with a C string.
        let sym = unsafe { libc::dlsym(dl, c"plugin_init".as_ptr()) };
        if sym.is_null() {
            return Err("not an nbdkit plugin (it has no plugin_init function)".into());
        }
        // SAFETY: plugin_init is `struct nbdkit_plugin *plugin_init (void)`
        // in every plugin built with NBDKIT_REGISTER_PLUGIN.
        let init: unsafe extern "C" fn() -> *const NbdkitPlugin =
            unsafe { std::mem::transmute(sym) };
        // SAFETY: calling the plugin's registration function, as nbdkit does.
        let p = unsafe { init() };
        if p.is_null() {
            return Err("plugin_init returned NULL".into());
        }
        // SAFETY: every version of the struct begins with the u64
        // _struct_size, so reading it is in bounds.
        let size = unsafe { std::ptr::read(std::ptr::addr_of!((*p).struct_size)) };
        if size < MIN_STRUCT_SIZE {
            return Err(format!(
                "the plugin struct is {size} bytes, smaller than any nbdkit release's ({MIN_STRUCT_SIZE})"
            ));
        }
        let n = size.min(STRUCT_SIZE) as usize;
        let mut copy = std::mem::MaybeUninit::<NbdkitPlugin>::zeroed();
        // SAFETY: the plugin's struct is `size` bytes (it says so), we copy
        // at most that and at most our struct's size; an all-zero
        // NbdkitPlugin is valid (NULL pointers, None callbacks, 0 ints), and
        // the copied prefix has the same layout (checked by the layout test).
        let plugin = unsafe {
            std::ptr::copy_nonoverlapping(p as *const u8, copy.as_mut_ptr() as *mut u8, n);
            copy.assume_init()
        };
        Ok(Library { p: plugin })
    }

    pub fn raw(&self) -> &NbdkitPlugin {
        &self.p
    }

    /// The names of the callbacks the plugin has (for --dump-plugin).
    pub fn callbacks(&self) -> Vec<&'static str> {
        let p = &self.p;
        macro_rules! has {
            ($($f:ident => $n:literal),* $(,)?) => {{
                let mut v = Vec::new();
                $(if p.$f.is_some() { v.push($n); })*
                v
            }};
        }
        has![
            load => "load", unload => "unload", config => "config",
            config_complete => "config_complete", open => "open", close => "close",
            get_size => "get_size", can_write => "can_write", can_flush => "can_flush",
            is_rotational => "is_rotational", can_trim => "can_trim",
            pread_v1 => "_pread_v1", pwrite_v1 => "_pwrite_v1", flush_v1 => "_flush_v1",
            trim_v1 => "_trim_v1", zero_v1 => "_zero_v1", dump_plugin => "dump_plugin",
            can_zero => "can_zero", can_fua => "can_fua", pread => "pread",
            pwrite => "pwrite", flush => "flush", trim => "trim", zero => "zero",
            can_multi_conn => "can_multi_conn", can_extents => "can_extents",
            extents => "extents", can_cache => "can_cache", cache => "cache",
            thread_model_fn => "thread_model", can_fast_zero => "can_fast_zero",
            preconnect => "preconnect", get_ready => "get_ready", after_fork => "after_fork",
            list_exports => "list_exports", default_export => "default_export",
            export_description => "export_description", cleanup => "cleanup",
            block_size => "block_size",
        ]
    }

    pub fn strings(&self) -> Strings {
        Strings {
            name: opt_string(self.p.name).unwrap_or_default(),
            longname: opt_string(self.p.longname),
            version: opt_string(self.p.version),
            description: opt_string(self.p.description),
            config_help: opt_string(self.p.config_help),
            magic_config_key: opt_string(self.p.magic_config_key),
        }
    }

    /// Set the plugin's debug flag variable `NAME_debug_FLAG` (what
    /// `-D NAME.FLAG=N` does in nbdkit).  Err if it has no such variable.
    pub fn set_debug_flag(&self, symbol: &str, value: i64) -> Result<(), String> {
        let c = CString::new(symbol).map_err(|_| "bad flag name".to_string())?;
        // SAFETY: RTLD_DEFAULT search for a data symbol by name.
        let sym = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c.as_ptr()) };
        if sym.is_null() {
            return Err(format!("the plugin has no debug flag variable {symbol}"));
        }
        // SAFETY: nbdkit-plugin(3): debug flags are `int` globals named
        // NAME_debug_FLAG; the symbol was found in the loaded plugin.
        unsafe { std::ptr::write(sym as *mut c_int, value as c_int) };
        Ok(())
    }

    // --- calls without a handle ---------------------------------------

    fn status(
        &self,
        conn: Option<&Arc<Conn>>,
        capture: bool,
        f: impl FnOnce() -> c_int,
    ) -> CallResult<c_int> {
        self.call(conn, capture, f, |&r| r == -1)
    }

    /// Run one plugin call with a fresh error state, and work out the
    /// errno of a failure the way nbdkit does: `nbdkit_set_error`'s value,
    /// else errno when the plugin says it preserves errno, else EIO.
    fn call<R>(
        &self,
        conn: Option<&Arc<Conn>>,
        capture: bool,
        f: impl FnOnce() -> R,
        failed: impl FnOnce(&R) -> bool,
    ) -> CallResult<R> {
        let saved = CALL.with(|c| {
            c.replace(CallState {
                active: true,
                capture,
                errors: Vec::new(),
                errno: 0,
                conn: conn.cloned(),
                force_disconnect: false,
            })
        });
        let r = f();
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        let state = CALL.with(|c| c.replace(saved));
        if state.force_disconnect {
            return Err(Failure {
                errno: libc::ESHUTDOWN,
                messages: state.errors,
                disconnect: true,
            });
        }
        if !failed(&r) {
            return Ok(r);
        }
        let errno = if state.errno != 0 {
            state.errno
        } else if self.p.errno_is_preserved != 0 && errno != 0 {
            errno
        } else {
            libc::EIO
        };
        Err(Failure {
            errno,
            messages: state.errors,
            disconnect: false,
        })
    }

    pub fn load(&self) {
        if let Some(f) = self.p.load {
            // SAFETY: `void load (void)`, called once before config.
            let _ = self.call(None, false, || unsafe { f() }, |_| false);
        }
    }

    pub fn unload(&self) {
        if let Some(f) = self.p.unload {
            // SAFETY: `void unload (void)`, called once at exit after
            // every handle was closed.
            let _ = self.call(None, false, || unsafe { f() }, |_| false);
        }
    }

    pub fn cleanup(&self) {
        if let Some(f) = self.p.cleanup {
            // SAFETY: `void cleanup (void)`, once, after the last connection.
            let _ = self.call(None, false, || unsafe { f() }, |_| false);
        }
    }

    pub fn dump_plugin(&self) {
        if let Some(f) = self.p.dump_plugin {
            // SAFETY: `void dump_plugin (void)`: prints key=value lines on
            // stdout; C stdio is flushed afterwards so the lines come out
            // in order with ours.
            let _ = self.call(None, false, || unsafe { f() }, |_| false);
            // SAFETY: fflush(NULL) flushes every C stdio stream.
            unsafe { libc::fflush(std::ptr::null_mut()) };
        }
    }

    pub fn config(&self, key: &str, value: &str) -> CallResult<()> {
        let (Ok(key_c), Ok(value_c)) = (CString::new(key), CString::new(value)) else {
            return Err(Failure {
                errno: libc::EINVAL,
                messages: vec![format!("{key}: the parameter contains a NUL byte")],
                ..Default::default()
            });
        };
        let Some(f) = self.p.config else {
            return Err(Failure {
                errno: libc::EINVAL,
                messages: vec![format!(
                    "this plugin takes no parameters (it was given '{key}')"
                )],
                ..Default::default()
            });
        };
        // Plugins keep these pointers (nbdkit passes argv, which lives
        // until exit): keep the strings until exit too.
        let (k, v) = (key_c.as_ptr(), value_c.as_ptr());
        {
            let mut pool = GLOBAL_POOL.lock_unpoisoned();
            pool.push(key_c);
            pool.push(value_c);
        }
        // SAFETY: `int config (const char *key, const char *value)` with
        // C strings that are never freed.
        self.status(None, true, || unsafe { f(k, v) }).map(drop)
    }

    /// A `int (*)(void)` callback: config_complete, get_ready, after_fork.
    pub fn void_status(&self, which: VoidCall, capture: bool) -> Option<CallResult<()>> {
        let f = match which {
            VoidCall::ConfigComplete => self.p.config_complete,
            VoidCall::GetReady => self.p.get_ready,
            VoidCall::AfterFork => self.p.after_fork,
        }?;
        // SAFETY: each is `int callback (void)`.
        Some(self.status(None, capture, || unsafe { f() }).map(drop))
    }

    pub fn thread_model_fn(&self) -> Option<CallResult<c_int>> {
        let f = self.p.thread_model_fn?;
        // SAFETY: `int thread_model (void)`.
        Some(self.status(None, true, || unsafe { f() }))
    }

    pub fn preconnect(&self, readonly: bool) -> Option<CallResult<()>> {
        let f = self.p.preconnect?;
        // SAFETY: `int preconnect (int readonly)`.
        Some(
            self.status(None, false, || unsafe { f(readonly as c_int) })
                .map(drop),
        )
    }

    pub fn list_exports(
        &self,
        conn: Option<&Arc<Conn>>,
        readonly: bool,
        tls: bool,
    ) -> Option<CallResult<Vec<ExportItem>>> {
        let f = self.p.list_exports?;
        let mut exports = NbdkitExports::default();
        let ptr: *mut NbdkitExports = &mut exports;
        // SAFETY: `int list_exports (int readonly, int is_tls, struct
        // nbdkit_exports *)`; the list outlives the call, and the plugin
        // only passes it to nbdkit_add_export/nbdkit_use_default_export.
        let r = self.status(conn, false, || unsafe {
            f(readonly as c_int, tls as c_int, ptr)
        });
        Some(r.map(|_| exports.items))
    }

    pub fn default_export(
        &self,
        conn: Option<&Arc<Conn>>,
        readonly: bool,
        tls: bool,
    ) -> Option<CallResult<String>> {
        let f = self.p.default_export?;
        // SAFETY: `const char *default_export (int readonly, int is_tls)`;
        // NULL means failure.  The string is copied at once.
        let r = self.call(
            conn,
            false,
            || unsafe { f(readonly as c_int, tls as c_int) },
            |p| p.is_null(),
        );
        Some(r.map(|p| opt_string(p).unwrap_or_default()))
    }

    // --- calls with a handle ------------------------------------------

    pub fn open(&self, conn: &Arc<Conn>, readonly: bool) -> CallResult<RawHandle> {
        let Some(f) = self.p.open else {
            return Err(Failure {
                errno: libc::EIO,
                messages: vec!["the plugin has no open callback".into()],
                ..Default::default()
            });
        };
        // SAFETY: `void *open (int readonly)`; NULL means failure.
        self.call(
            Some(conn),
            false,
            || unsafe { f(readonly as c_int) },
            |h| h.is_null(),
        )
        .map(RawHandle)
    }

    pub fn close(&self, conn: &Arc<Conn>, h: RawHandle) {
        if let Some(f) = self.p.close {
            // SAFETY: `void close (void *handle)` with a handle from open,
            // called once.
            let _ = self.call(Some(conn), false, || unsafe { f(h.0) }, |_| false);
        }
    }

    pub fn get_size(&self, conn: &Arc<Conn>, h: RawHandle) -> CallResult<i64> {
        let Some(f) = self.p.get_size else {
            return Err(Failure {
                errno: libc::EIO,
                messages: vec!["the plugin has no get_size callback".into()],
                ..Default::default()
            });
        };
        // SAFETY: `int64_t get_size (void *handle)`.
        self.call(Some(conn), false, || unsafe { f(h.0) }, |&r| r == -1)
    }

    /// An `int (*)(void *handle)` query; None if the plugin lacks it.
    pub fn query(&self, conn: &Arc<Conn>, h: RawHandle, q: Query) -> Option<CallResult<c_int>> {
        let f = match q {
            Query::CanWrite => self.p.can_write,
            Query::CanFlush => self.p.can_flush,
            Query::IsRotational => self.p.is_rotational,
            Query::CanTrim => self.p.can_trim,
            Query::CanZero => self.p.can_zero,
            Query::CanFastZero => self.p.can_fast_zero,
            Query::CanFua => self.p.can_fua,
            Query::CanMultiConn => self.p.can_multi_conn,
            Query::CanExtents => self.p.can_extents,
            Query::CanCache => self.p.can_cache,
        }?;
        // SAFETY: every query is `int can_x (void *handle)`.
        Some(self.status(Some(conn), false, || unsafe { f(h.0) }))
    }

    pub fn block_size(
        &self,
        conn: &Arc<Conn>,
        h: RawHandle,
    ) -> Option<CallResult<(u32, u32, u32)>> {
        let f = self.p.block_size?;
        let (mut a, mut b, mut c) = (0u32, 0u32, 0u32);
        let (pa, pb, pc): (*mut u32, *mut u32, *mut u32) = (&mut a, &mut b, &mut c);
        // SAFETY: `int block_size (void *, uint32_t *min, uint32_t *pref,
        // uint32_t *max)` with pointers to locals.
        let r = self.status(Some(conn), false, || unsafe { f(h.0, pa, pb, pc) });
        Some(r.map(|_| (a, b, c)))
    }

    pub fn export_description(
        &self,
        conn: &Arc<Conn>,
        h: RawHandle,
    ) -> Option<CallResult<Option<String>>> {
        let f = self.p.export_description?;
        // SAFETY: `const char *export_description (void *handle)`; NULL
        // means no description; the string is copied at once.
        let r = self.call(Some(conn), false, || unsafe { f(h.0) }, |_| false);
        Some(r.map(opt_string))
    }

    pub fn pread(
        &self,
        conn: &Arc<Conn>,
        h: RawHandle,
        buf: &mut [u8],
        offset: u64,
        v2: bool,
    ) -> Option<CallResult<()>> {
        let count = u32::try_from(buf.len()).ok()?;
        let ptr = buf.as_mut_ptr() as *mut c_void;
        if v2 {
            let f = self.p.pread?;
            // SAFETY: the plugin writes at most `count` bytes into `buf`.
            Some(
                self.status(Some(conn), false, || unsafe {
                    f(h.0, ptr, count, offset, 0)
                })
                .map(drop),
            )
        } else {
            let f = self.p.pread_v1?;
            // SAFETY: as above, API v1 signature.
            Some(
                self.status(Some(conn), false, || unsafe { f(h.0, ptr, count, offset) })
                    .map(drop),
            )
        }
    }

    pub fn pwrite(
        &self,
        conn: &Arc<Conn>,
        h: RawHandle,
        buf: &[u8],
        offset: u64,
        flags: u32,
        v2: bool,
    ) -> Option<CallResult<()>> {
        let count = u32::try_from(buf.len()).ok()?;
        let ptr = buf.as_ptr() as *const c_void;
        if v2 {
            let f = self.p.pwrite?;
            // SAFETY: the plugin reads `count` bytes from `buf`.
            Some(
                self.status(Some(conn), false, || unsafe {
                    f(h.0, ptr, count, offset, flags)
                })
                .map(drop),
            )
        } else {
            let f = self.p.pwrite_v1?;
            // SAFETY: as above, API v1 signature.
            Some(
                self.status(Some(conn), false, || unsafe { f(h.0, ptr, count, offset) })
                    .map(drop),
            )
        }
    }

    pub fn flush(&self, conn: &Arc<Conn>, h: RawHandle, v2: bool) -> Option<CallResult<()>> {
        if v2 {
            let f = self.p.flush?;
            // SAFETY: `int flush (void *handle, uint32_t flags)`.
            Some(
                self.status(Some(conn), false, || unsafe { f(h.0, 0) })
                    .map(drop),
            )
        } else {
            let f = self.p.flush_v1?;
            // SAFETY: `int flush (void *handle)` (API v1).
            Some(
                self.status(Some(conn), false, || unsafe { f(h.0) })
                    .map(drop),
            )
        }
    }

    pub fn trim(
        &self,
        conn: &Arc<Conn>,
        h: RawHandle,
        count: u32,
        offset: u64,
        flags: u32,
        v2: bool,
    ) -> Option<CallResult<()>> {
        if v2 {
            let f = self.p.trim?;
            // SAFETY: `int trim (void *, uint32_t count, uint64_t offset, uint32_t flags)`.
            Some(
                self.status(Some(conn), false, || unsafe {
                    f(h.0, count, offset, flags)
                })
                .map(drop),
            )
        } else {
            let f = self.p.trim_v1?;
            // SAFETY: `int trim (void *, uint32_t count, uint64_t offset)` (v1).
            Some(
                self.status(Some(conn), false, || unsafe { f(h.0, count, offset) })
                    .map(drop),
            )
        }
    }

    pub fn zero(
        &self,
        conn: &Arc<Conn>,
        h: RawHandle,
        count: u32,
        offset: u64,
        flags: u32,
        v2: bool,
    ) -> Option<CallResult<()>> {
        if v2 {
            let f = self.p.zero?;
            // SAFETY: `int zero (void *, uint32_t count, uint64_t offset, uint32_t flags)`.
            Some(
                self.status(Some(conn), false, || unsafe {
                    f(h.0, count, offset, flags)
                })
                .map(drop),
            )
        } else {
            let f = self.p.zero_v1?;
            let may_trim = (flags & crate::FLAG_MAY_TRIM != 0) as c_int;
            // SAFETY: `int zero (void *, uint32_t, uint64_t, int may_trim)` (v1).
            Some(
                self.status(Some(conn), false, || unsafe {
                    f(h.0, count, offset, may_trim)
                })
                .map(drop),
            )
        }
    }

    pub fn extents(
        &self,
        conn: &Arc<Conn>,
        h: RawHandle,
        count: u32,
        offset: u64,
        flags: u32,
        into: Extents,
    ) -> Option<CallResult<Extents>> {
        let f = self.p.extents?;
        let mut e = NbdkitExtents(into);
        let ptr: *mut NbdkitExtents = &mut e;
        // SAFETY: `int extents (void *, uint32_t, uint64_t, uint32_t,
        // struct nbdkit_extents *)`; the list outlives the call and the
        // plugin only passes it to nbdkit_add_extent.
        let r = self.status(Some(conn), false, || unsafe {
            f(h.0, count, offset, flags, ptr)
        });
        Some(r.map(|_| e.0))
    }

    pub fn cache(
        &self,
        conn: &Arc<Conn>,
        h: RawHandle,
        count: u32,
        offset: u64,
    ) -> Option<CallResult<()>> {
        let f = self.p.cache?;
        // SAFETY: `int cache (void *, uint32_t, uint64_t, uint32_t flags)`.
        Some(
            self.status(Some(conn), false, || unsafe { f(h.0, count, offset, 0) })
                .map(drop),
        )
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum VoidCall {
    ConfigComplete,
    GetReady,
    AfterFork,
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Query {
    CanWrite,
    CanFlush,
    IsRotational,
    CanTrim,
    CanZero,
    CanFastZero,
    CanFua,
    CanMultiConn,
    CanExtents,
    CanCache,
}

// ---------------------------------------------------------------------
// What the nbdkit_* functions see: the call in progress on this thread.
// ---------------------------------------------------------------------

/// One open export, as the nbdkit_* functions see it during calls made
/// for it (the rest of the connection's description is the server's
/// [`Client`]).  Strings interned while it is open live here and are freed
/// with it.
pub(crate) struct Conn {
    /// None for calls made before an export is open (preconnect,
    /// list_exports, default_export): their results are copied at once, so
    /// what they intern is freed right after.
    export: Option<CString>,
    pool: Mutex<Vec<CString>>,
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
struct CallState {
    /// A plugin call is in progress on this thread.
    active: bool,
    /// Keep nbdkit_error messages for the caller instead of logging them
    /// (configuration: they become the one-line start-up error).
    capture: bool,
    errors: Vec<String>,
    /// From nbdkit_set_error.
    errno: c_int,
    conn: Option<Arc<Conn>>,
    /// nbdkit_disconnect(1) was called.
    force_disconnect: bool,
}

thread_local! {
    static CALL: RefCell<CallState> = RefCell::new(CallState::default());
}

/// Strings interned outside any connection: kept until exit.
static GLOBAL_POOL: Mutex<Vec<CString>> = Mutex::new(Vec::new());

/// The loaded plugin's name, for log lines.
static PLUGIN_NAME: RwLock<String> = RwLock::new(String::new());

pub(crate) fn set_plugin_name(name: &str) {
    *PLUGIN_NAME.write_unpoisoned() = name.to_string();
}

fn plugin_name() -> String {
    PLUGIN_NAME.read_unpoisoned().clone()
}

fn current_conn() -> Option<Arc<Conn>> {
    CALL.try_with(|c| c.try_borrow().ok().and_then(|c| c.conn.clone()))
        .ok()
        .flatten()
}

/// Report an error the nbdkit way: keep it for the call in progress (its
/// message goes to the client), and log it unless it is being captured.
fn report_error(text: String) {
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

fn set_errno(e: c_int) {
    // SAFETY: __errno_location returns this thread's errno.
    unsafe { *libc::__errno_location() = e };
}

/// Error + errno, as most failing nbdkit_* functions do.
fn fail(errno: c_int, text: String) {
    report_error(text);
    set_errno(errno);
}

/// Read a C string argument lossily; None for NULL.
fn arg(p: *const c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: the API takes NUL-terminated strings; NULL was excluded.
    Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// A malloc'd copy the plugin frees with free(3).
fn malloc_string(s: &str) -> *mut c_char {
    let Ok(c) = CString::new(s) else {
        return std::ptr::null_mut();
    };
    // SAFETY: strdup of a valid C string; NULL (ENOMEM) is passed on.
    unsafe { libc::strdup(c.as_ptr()) }
}

fn intern(s: CString) -> *const c_char {
    let p = s.as_ptr();
    // The CString's heap buffer does not move when the CString is moved
    // into the pool, so `p` stays valid as long as the pool keeps it.
    match current_conn() {
        Some(conn) => conn.pool.lock_unpoisoned().push(s),
        None => GLOBAL_POOL.lock_unpoisoned().push(s),
    }
    p
}

// ---------------------------------------------------------------------
// The nbdkit_* functions.
// ---------------------------------------------------------------------

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

fn current_client(what: &str) -> Option<Arc<Client>> {
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

fn peer_cred(what: &str, pick: impl Fn(&Peer) -> Option<i64>) -> i64 {
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

// --- extents -----------------------------------------------------------

/// `struct nbdkit_extents`: opaque to plugins.
pub struct NbdkitExtents(Extents);

/// `struct nbdkit_extent` (nbdkit-filter.h).
#[repr(C)]
pub struct NbdkitExtent {
    pub offset: u64,
    pub length: u64,
    pub type_: u32,
}

#[no_mangle]
pub unsafe extern "C" fn nbdkit_add_extent(
    e: *mut NbdkitExtents,
    offset: u64,
    length: u64,
    type_: u32,
) -> c_int {
    // SAFETY: the plugin passes the list it was given (or made with
    // nbdkit_extents_new); NULL is refused.
    let Some(e) = (unsafe { e.as_mut() }) else {
        fail(libc::EINVAL, "nbdkit_add_extent: NULL extents list".into());
        return -1;
    };
    match e.0.add(offset, length, type_ & 3) {
        Ok(()) => 0,
        Err(err) => {
            fail(libc::EINVAL, format!("nbdkit_add_extent: {err}"));
            -1
        }
    }
}

#[no_mangle]
pub extern "C" fn nbdkit_extents_new(start: u64, end: u64) -> *mut NbdkitExtents {
    if start > end || end > i64::MAX as u64 {
        fail(
            libc::ERANGE,
            format!("nbdkit_extents_new: bad range {start}..{end}"),
        );
        return std::ptr::null_mut();
    }
    Box::into_raw(Box::new(NbdkitExtents(Extents::new(start, end))))
}

#[no_mangle]
pub unsafe extern "C" fn nbdkit_extents_free(e: *mut NbdkitExtents) {
    if !e.is_null() {
        // SAFETY: lists handed out by nbdkit_extents_new are Boxes; the
        // plugin frees each once (the API's contract).
        drop(unsafe { Box::from_raw(e) });
    }
}

#[no_mangle]
pub unsafe extern "C" fn nbdkit_extents_count(e: *const NbdkitExtents) -> usize {
    // SAFETY: a list from nbdkit (or NULL).
    unsafe { e.as_ref() }.map_or(0, |e| e.0.list().len())
}

#[no_mangle]
pub unsafe extern "C" fn nbdkit_get_extent(e: *const NbdkitExtents, i: usize) -> NbdkitExtent {
    // SAFETY: a list from nbdkit (or NULL).
    match unsafe { e.as_ref() }.and_then(|e| e.0.list().get(i)) {
        Some(x) => NbdkitExtent {
            offset: x.offset,
            length: x.length,
            type_: x.flags,
        },
        None => {
            fail(
                libc::ERANGE,
                format!("nbdkit_get_extent: no extent number {i}"),
            );
            NbdkitExtent {
                offset: 0,
                length: 0,
                type_: 0,
            }
        }
    }
}

// --- exports -----------------------------------------------------------

/// NBD's limit on names and descriptions, and nbdkit's on list length.
const MAX_STRING: usize = 4096;
const MAX_EXPORTS: usize = 10_000;

#[derive(Debug, Clone)]
pub(crate) enum ExportItem {
    Named {
        name: String,
        description: Option<String>,
    },
    Default,
}

/// `struct nbdkit_exports`: opaque to plugins.  `cstrings` keeps the C
/// copies nbdkit_get_export hands out.
#[derive(Default)]
pub struct NbdkitExports {
    items: Vec<ExportItem>,
    cstrings: Vec<(CString, Option<CString>)>,
}

/// `struct nbdkit_export` (nbdkit-filter.h).
#[repr(C)]
pub struct NbdkitExport {
    pub name: *mut c_char,
    pub description: *mut c_char,
}

fn push_export(e: &mut NbdkitExports, item: ExportItem) -> c_int {
    if e.items.len() >= MAX_EXPORTS {
        fail(
            libc::E2BIG,
            format!("nbdkit_add_export: too many exports (at most {MAX_EXPORTS})"),
        );
        return -1;
    }
    let (n, d) = match &item {
        ExportItem::Named { name, description } => (name.clone(), description.clone()),
        ExportItem::Default => (String::new(), None),
    };
    e.cstrings.push((
        CString::new(n).unwrap_or_default(),
        d.map(|d| CString::new(d).unwrap_or_default()),
    ));
    e.items.push(item);
    0
}

#[no_mangle]
pub unsafe extern "C" fn nbdkit_add_export(
    e: *mut NbdkitExports,
    name: *const c_char,
    description: *const c_char,
) -> c_int {
    // SAFETY: the plugin passes the list it was given (or NULL).
    let Some(e) = (unsafe { e.as_mut() }) else {
        fail(libc::EINVAL, "nbdkit_add_export: NULL exports list".into());
        return -1;
    };
    let utf8 = |p: *const c_char| -> Result<Option<String>, ()> {
        if p.is_null() {
            return Ok(None);
        }
        // SAFETY: NUL-terminated string from the plugin.
        let b = unsafe { CStr::from_ptr(p) }.to_bytes();
        if b.len() > MAX_STRING {
            return Err(());
        }
        String::from_utf8(b.to_vec()).map(Some).map_err(|_| ())
    };
    let (Ok(Some(name)), Ok(description)) = (utf8(name), utf8(description)) else {
        fail(libc::EINVAL, format!("nbdkit_add_export: the name and description must be UTF-8 of at most {MAX_STRING} bytes"));
        return -1;
    };
    push_export(e, ExportItem::Named { name, description })
}

#[no_mangle]
pub unsafe extern "C" fn nbdkit_use_default_export(e: *mut NbdkitExports) -> c_int {
    // SAFETY: the plugin passes the list it was given (or NULL).
    let Some(e) = (unsafe { e.as_mut() }) else {
        fail(
            libc::EINVAL,
            "nbdkit_use_default_export: NULL exports list".into(),
        );
        return -1;
    };
    push_export(e, ExportItem::Default)
}

#[no_mangle]
pub extern "C" fn nbdkit_exports_new() -> *mut NbdkitExports {
    Box::into_raw(Box::default())
}

#[no_mangle]
pub unsafe extern "C" fn nbdkit_exports_free(e: *mut NbdkitExports) {
    if !e.is_null() {
        // SAFETY: lists from nbdkit_exports_new are Boxes, freed once.
        drop(unsafe { Box::from_raw(e) });
    }
}

#[no_mangle]
pub unsafe extern "C" fn nbdkit_exports_count(e: *const NbdkitExports) -> usize {
    // SAFETY: a list from nbdkit (or NULL).
    unsafe { e.as_ref() }.map_or(0, |e| e.items.len())
}

#[no_mangle]
pub unsafe extern "C" fn nbdkit_get_export(e: *const NbdkitExports, i: usize) -> NbdkitExport {
    // SAFETY: a list from nbdkit (or NULL).
    match unsafe { e.as_ref() }.and_then(|e| e.cstrings.get(i)) {
        Some((n, d)) => NbdkitExport {
            name: n.as_ptr() as *mut c_char,
            description: d
                .as_ref()
                .map_or(std::ptr::null_mut(), |d| d.as_ptr() as *mut c_char),
        },
        None => {
            fail(
                libc::ERANGE,
                format!("nbdkit_get_export: no export number {i}"),
            );
            NbdkitExport {
                name: std::ptr::null_mut(),
                description: std::ptr::null_mut(),
            }
        }
    }
}

// ---------------------------------------------------------------------
// Keeping the exports in the executable.
// ---------------------------------------------------------------------

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

fn keep_exports() {
    std::hint::black_box(exported_functions());
}

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
        assert_eq!(nbdkit_peer_uid(), -1);
        assert_eq!(nbdkit_nanosleep(0, 1000), 0);
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
