//! The plugin struct (nbdkit-plugin.h, API versions 1 and 2: the layout
//! is the same, only the meaning of the data-call slots differs), loading
//! it with dlopen/dlsym, and calls through its function pointers.

use super::*;

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

pub(super) fn dlerror_text() -> String {
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
pub(super) fn opt_string(p: *const c_char) -> Option<String> {
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
            return Err(format!(
                "the plugin does not contain a global variable called {symbol}"
            ));
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

    /// A connection's data call whose status is all it returns (pread,
    /// pwrite, flush, trim, zero, cache in both API versions).
    fn handle_call(&self, conn: &Arc<Conn>, f: impl FnOnce() -> c_int) -> Option<CallResult<()>> {
        Some(self.status(Some(conn), false, f).map(drop))
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
            self.handle_call(conn, || unsafe { f(h.0, ptr, count, offset, 0) })
        } else {
            let f = self.p.pread_v1?;
            // SAFETY: as above, API v1 signature.
            self.handle_call(conn, || unsafe { f(h.0, ptr, count, offset) })
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
            self.handle_call(conn, || unsafe { f(h.0, ptr, count, offset, flags) })
        } else {
            let f = self.p.pwrite_v1?;
            // SAFETY: as above, API v1 signature.
            self.handle_call(conn, || unsafe { f(h.0, ptr, count, offset) })
        }
    }

    pub fn flush(&self, conn: &Arc<Conn>, h: RawHandle, v2: bool) -> Option<CallResult<()>> {
        if v2 {
            let f = self.p.flush?;
            // SAFETY: `int flush (void *handle, uint32_t flags)`.
            self.handle_call(conn, || unsafe { f(h.0, 0) })
        } else {
            let f = self.p.flush_v1?;
            // SAFETY: `int flush (void *handle)` (API v1).
            self.handle_call(conn, || unsafe { f(h.0) })
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
            self.handle_call(conn, || unsafe { f(h.0, count, offset, flags) })
        } else {
            let f = self.p.trim_v1?;
            // SAFETY: `int trim (void *, uint32_t count, uint64_t offset)` (v1).
            self.handle_call(conn, || unsafe { f(h.0, count, offset) })
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
            self.handle_call(conn, || unsafe { f(h.0, count, offset, flags) })
        } else {
            let f = self.p.zero_v1?;
            let may_trim = (flags & crate::FLAG_MAY_TRIM != 0) as c_int;
            // SAFETY: `int zero (void *, uint32_t, uint64_t, int may_trim)` (v1).
            self.handle_call(conn, || unsafe { f(h.0, count, offset, may_trim) })
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
        self.handle_call(conn, || unsafe { f(h.0, count, offset, 0) })
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
