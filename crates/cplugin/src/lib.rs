//! Host nbdkit's own C plugins: load an `nbdkit-NAME-plugin.so` built
//! against nbdkit's `nbdkit-plugin.h` (API version 1 or 2) and serve it as
//! an ordinary nbdkit-rs [`Backend`].
//!
//! * [`CPlugin::open`] dlopens the file, calls its `plugin_init` and checks
//!   the struct (`_struct_size`, `_api_version`, `_thread_model`, required
//!   callbacks); [`CPlugin::load`] sets `-D` debug flags and calls `load`;
//!   [`CPlugin::configure`] passes the `key=value` parameters to `config`,
//!   calls `config_complete`, `thread_model` and `get_ready`, and returns
//!   the backend.
//! * The backend maps every callback onto [`Backend`]/[`Handle`] with
//!   nbdkit's defaults for the missing ones (can_write is "has pwrite", zero
//!   falls back to writing zeroes, …), takes the locks the plugin's thread
//!   model asks for, and turns `nbdkit_error`/`nbdkit_set_error`/errno into
//!   an [`Error`] whose message reaches the client.
//! * The `nbdkit_*` functions plugins call live in `ffi/` (and the
//!   variadic ones in `shim.c`); the executable must export them in its
//!   dynamic symbol table (see the workspace's `build.rs`).
//!
//! All unsafe code is in `ffi/`.
#![deny(unsafe_code)]

mod ffi;
mod parse;

/// Whether the plugin has callback `$cb`, or `$cb_v1` when it was built
/// for API version 1 (`$v2` false).
macro_rules! has_callback {
    ($raw:expr, $v2:expr, $cb:ident / $cb_v1:ident) => {
        if $v2 {
            $raw.$cb.is_some()
        } else {
            $raw.$cb_v1.is_some()
        }
    };
}

use nbdkit_backend::LockExt;
use std::ffi::c_int;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use nbdkit_backend::{
    Backend, BlockSize, CacheMode, Client, ConfigError, Error, ErrorKind, ExportEntry, Extents,
    FuaMode, Handle, Result, ThreadModel, ZeroFlags, ZeroMode,
};

use ffi::{CallResult, Conn, ExportItem, Failure, Library, Query, RawHandle, VoidCall};

/// `NBDKIT_FLAG_*` (nbdkit-common.h).
pub const FLAG_MAY_TRIM: u32 = 1 << 0;
pub const FLAG_FUA: u32 = 1 << 1;
pub const FLAG_REQ_ONE: u32 = 1 << 2;
pub const FLAG_FAST_ZERO: u32 = 1 << 3;

/// The largest piece of a trim, zero or cache request passed in one call
/// (their counts are 32-bit in the C API; requests with extended headers
/// can be larger).
const CHUNK: u64 = 1 << 30;

/// Where `nbdkit-rs NAME` looks for `nbdkit-NAME-plugin.so` when NAME is not
/// a built-in plugin: `$NBDKIT_RS_PLUGINDIR` at run time, the directory
/// given by `NBDKIT_RS_PLUGINDIR` at build time, then the usual places
/// distributions install nbdkit's plugins.
pub fn plugin_dirs() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os("NBDKIT_RS_PLUGINDIR").filter(|d| !d.is_empty()) {
        v.push(d.into());
    }
    if let Some(d) = option_env!("NBDKIT_RS_PLUGINDIR").filter(|d| !d.is_empty()) {
        v.push(d.into());
    }
    let arch = std::env::consts::ARCH;
    v.push(format!("/usr/lib/{arch}-linux-gnu/nbdkit/plugins").into());
    for d in [
        "/usr/lib64/nbdkit/plugins",
        "/usr/lib/nbdkit/plugins",
        "/usr/local/lib64/nbdkit/plugins",
        "/usr/local/lib/nbdkit/plugins",
    ] {
        v.push(d.into());
    }
    v
}

/// The first plugin directory that exists (for `--dump-config`).
pub fn plugin_dir() -> Option<PathBuf> {
    plugin_dirs().into_iter().find(|d| d.is_dir())
}

/// `nbdkit-NAME-plugin.so` in the plugin directories.
pub fn find(name: &str) -> Option<PathBuf> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return None;
    }
    plugin_dirs()
        .into_iter()
        .map(|d| d.join(format!("nbdkit-{name}-plugin.so")))
        .find(|p| p.is_file())
}

/// As nbdkit: a plugin name with a `/` or a `.` is a file name.
pub fn is_path(name: &str) -> bool {
    name.contains('/') || name.contains('.')
}

/// The names of the `nbdkit_*` functions this crate provides to plugins.
pub fn exported_function_names() -> Vec<&'static str> {
    ffi::exported_functions()
        .into_iter()
        .map(|(n, _)| n)
        .collect()
}

/// Whether the server serves read-only (`-r`): what a plugin's
/// `preconnect` is told.
static SERVER_READONLY: AtomicBool = AtomicBool::new(false);

pub fn set_server_readonly(readonly: bool) {
    SERVER_READONLY.store(readonly, Ordering::Relaxed);
}

/// Whether the connection this thread works for runs over TLS.
fn current_tls() -> bool {
    Client::current().is_some_and(|c| c.is_tls())
}

fn model_from_c(m: c_int) -> Option<ThreadModel> {
    Some(match m {
        0 => ThreadModel::SerializeConnections,
        1 => ThreadModel::SerializeAllRequests,
        2 => ThreadModel::SerializeRequests,
        3 => ThreadModel::Parallel,
        _ => return None,
    })
}

fn strerror(errno: i32) -> String {
    std::io::Error::from_raw_os_error(errno).to_string()
}

/// A loaded C plugin, before configuration.
pub struct CPlugin {
    lib: Library,
    path: PathBuf,
    strings: ffi::Strings,
    declared_model: ThreadModel,
    loaded: AtomicBool,
}

impl CPlugin {
    /// Load the plugin file and check that it is a usable nbdkit plugin.
    /// Errors are one line naming the file.
    pub fn open(path: &Path) -> std::result::Result<Arc<CPlugin>, ConfigError> {
        let shown = path.display();
        let err = |m: String| ConfigError::new(format!("{shown}: {m}"));
        match std::fs::metadata(path) {
            Err(e) => return Err(err(format!("cannot load the plugin: {e}"))),
            Ok(m) if !m.is_file() => return Err(err("cannot load the plugin: not a file".into())),
            Ok(_) => {}
        }
        // dlopen without a '/' would search the library path, not the
        // current directory.
        let path = if path.is_absolute() || path.starts_with(".") || path.components().count() > 1 {
            path.to_path_buf()
        } else {
            Path::new(".").join(path)
        };
        let lib =
            Library::load_file(&path).map_err(|e| err(format!("cannot load the plugin: {e}")))?;
        let raw = lib.raw();
        let api = raw.api_version;
        if api != 1 && api != 2 {
            return Err(err(format!(
                "nbdkit plugin API version {api} is not supported (1 and 2 are)"
            )));
        }
        let declared_model = model_from_c(raw.thread_model).ok_or_else(|| {
            err(format!(
                "the plugin declares an unknown thread model {}",
                raw.thread_model
            ))
        })?;
        let strings = lib.strings();
        if strings.name.is_empty() {
            return Err(err("the plugin has no name".into()));
        }
        let has_pread = has_callback!(raw, api != 1, pread / pread_v1);
        for (has, cb) in [
            (raw.open.is_some(), "open"),
            (raw.get_size.is_some(), "get_size"),
            (has_pread, "pread"),
        ] {
            if !has {
                return Err(err(format!("the plugin has no {cb} callback")));
            }
        }
        if raw.struct_size > ffi::STRUCT_SIZE {
            tracing::debug!(
                "{shown}: the plugin's struct is {} bytes, newer than nbdkit 1.32's {}; its later fields are ignored",
                raw.struct_size,
                ffi::STRUCT_SIZE
            );
        }
        ffi::set_plugin_name(&strings.name);
        Ok(Arc::new(CPlugin {
            lib,
            path,
            strings,
            declared_model,
            loaded: AtomicBool::new(false),
        }))
    }

    pub fn name(&self) -> &str {
        &self.strings.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn magic_config_key(&self) -> Option<&str> {
        self.strings.magic_config_key.as_deref()
    }

    /// The plugin's own version string, if it sets one.
    pub fn version(&self) -> Option<&str> {
        self.strings.version.as_deref()
    }

    /// The thread model nbdkit reports for `--dump-plugin`: the declared
    /// one, restricted by the plugin's `thread_model` callback if it has
    /// one (called, as nbdkit does, without configuring the plugin).
    fn dump_thread_model(&self) -> ThreadModel {
        let asked = self
            .lib
            .thread_model_fn()
            .and_then(|r| r.ok())
            .and_then(model_from_c);
        match asked {
            Some(m) => self.declared_model.min(m),
            None => self.declared_model,
        }
    }

    pub fn api_version(&self) -> i32 {
        self.lib.raw().api_version
    }

    /// Set `-D NAME.FLAG=N` debug flags (the plugin's `NAME_debug_FLAG`
    /// variables), then call the plugin's `load`.  Once.
    pub fn load(&self, debug_flags: &[(String, i64)]) -> std::result::Result<(), ConfigError> {
        if self.loaded.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        for (flag, value) in debug_flags {
            let symbol = format!("{}_debug_{}", self.name(), flag.replace(['.', '-'], "_"));
            // As nbdkit: a flag the plugin does not have is a warning, and
            // the server carries on.
            if let Err(e) = self.lib.set_debug_flag(&symbol, *value) {
                tracing::warn!("-D {}.{flag}: {e}", self.name());
            }
        }
        self.lib.load();
        Ok(())
    }

    /// `PLUGIN --help`: what the plugin says about itself.
    pub fn help_text(&self) -> String {
        let s = &self.strings;
        let mut out = format!("{} plugin", s.name);
        if let Some(l) = &s.longname {
            out.push_str(&format!(": {l}"));
        }
        out.push_str(&format!(
            "\n\nnbdkit C plugin {} (API version {}{})\n",
            self.path.display(),
            self.api_version(),
            s.version
                .as_ref()
                .map(|v| format!(", version {v}"))
                .unwrap_or_default()
        ));
        if let Some(d) = &s.description {
            out.push_str(&format!("\n{}\n", d.trim_end()));
        }
        if let Some(k) = &s.magic_config_key {
            out.push_str(&format!(
                "\nA bare value on the command line means {k}=VALUE.\n"
            ));
        }
        match &s.config_help {
            Some(h) => out.push_str(&format!("\nParameters:\n{}\n", h.trim_end())),
            None => out.push_str("\nThe plugin documents no parameters.\n"),
        }
        out
    }

    /// `--dump-plugin`: print nbdkit's key=value lines, then whatever the
    /// plugin's own `dump_plugin` prints.
    pub fn print_dump(&self) {
        use std::io::Write;
        let s = &self.strings;
        let raw = self.lib.raw();
        let mut out = format!(
            "path={}\nname={}\nversion={}\napi_version={}\nstruct_size={}\nmax_thread_model={}\nthread_model={}\nerrno_is_preserved={}\n",
            self.path.display(),
            s.name,
            s.version.as_deref().unwrap_or(""),
            raw.api_version,
            raw.struct_size,
            self.declared_model.as_str(),
            self.dump_thread_model().as_str(),
            raw.errno_is_preserved,
        );
        if let Some(k) = &s.magic_config_key {
            out.push_str(&format!("magic_config_key={k}\n"));
        }
        for (has, n) in [
            (s.longname.is_some(), "longname"),
            (s.description.is_some(), "description"),
            (s.config_help.is_some(), "config_help"),
        ] {
            if has {
                out.push_str(&format!("has_{n}=1\n"));
            }
        }
        for cb in self.lib.callbacks() {
            out.push_str(&format!("has_{cb}=1\n"));
        }
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(out.as_bytes());
        let _ = stdout.flush();
        drop(stdout);
        self.lib.dump_plugin();
    }

    fn config_error(&self, what: &str, f: Failure) -> ConfigError {
        let msg = if f.messages.is_empty() {
            format!("{what}: {}", strerror(f.errno))
        } else {
            f.messages.join("; ")
        };
        ConfigError::new(format!("{}: {msg}", self.name()))
    }

    /// Pass the parameters to `config` in order, then `config_complete`,
    /// `thread_model` and `get_ready`: the plugin is ready to serve.
    pub fn configure(
        self: &Arc<Self>,
        params: &[(String, String)],
    ) -> std::result::Result<Arc<dyn Backend>, ConfigError> {
        self.load(&[])?;
        for (k, v) in params {
            self.lib
                .config(k, v)
                .map_err(|f| self.config_error(&format!("{k}={v}"), f))?;
        }
        if let Some(r) = self.lib.void_status(VoidCall::ConfigComplete, true) {
            r.map_err(|f| self.config_error("config_complete", f))?;
        }
        let mut model = self.declared_model;
        if let Some(r) = self.lib.thread_model_fn() {
            let m = r.map_err(|f| self.config_error("thread_model", f))?;
            let m = model_from_c(m).ok_or_else(|| {
                ConfigError::new(format!(
                    "{}: thread_model returned an unknown model {m}",
                    self.name()
                ))
            })?;
            model = model.min(m);
        }
        if let Some(r) = self.lib.void_status(VoidCall::GetReady, true) {
            r.map_err(|f| self.config_error("get_ready", f))?;
        }
        tracing::debug!("{}: thread model {}", self.name(), model.as_str());
        Ok(Arc::new(CBackend {
            inner: Arc::new(Inner {
                plugin: self.clone(),
                model,
                lock: Mutex::new(()),
                handles: AtomicUsize::new(0),
                shut: AtomicBool::new(false),
            }),
        }))
    }
}

struct Inner {
    plugin: Arc<CPlugin>,
    model: ThreadModel,
    /// Held around every call when the model serializes all requests (or
    /// connections).
    lock: Mutex<()>,
    handles: AtomicUsize,
    shut: AtomicBool,
}

/// Locks held for one plugin call.
struct Guards<'a> {
    _global: Option<MutexGuard<'a, ()>>,
    _handle: Option<MutexGuard<'a, ()>>,
}

impl Inner {
    fn lib(&self) -> &Library {
        &self.plugin.lib
    }

    fn v2(&self) -> bool {
        self.plugin.api_version() == 2
    }

    fn guard<'a>(&'a self, handle_lock: Option<&'a Mutex<()>>) -> Guards<'a> {
        let global =
            (self.model <= ThreadModel::SerializeAllRequests).then(|| self.lock.lock_unpoisoned());
        let handle = (self.model == ThreadModel::SerializeRequests)
            .then_some(handle_lock)
            .flatten()
            .map(|l| l.lock_unpoisoned());
        Guards {
            _global: global,
            _handle: handle,
        }
    }

    /// A plugin failure as a backend error: the plugin's message (which
    /// goes to the client) and its errno's kind.
    fn error(&self, what: &str, f: Failure) -> Error {
        if f.disconnect {
            return Error::disconnect(format!(
                "{}: {what}: the plugin called nbdkit_disconnect(1)",
                self.plugin.name()
            ));
        }
        let msg = match f.messages.last() {
            Some(m) => m.clone(),
            None => format!("{}: {what}: {}", self.plugin.name(), strerror(f.errno)),
        };
        Error::new(ErrorKind::from_errno(f.errno), msg)
    }

    fn check<T>(&self, what: &str, r: CallResult<T>) -> Result<T> {
        r.map_err(|f| self.error(what, f))
    }

    fn default_export_name(&self, readonly: bool, tls: bool) -> Result<String> {
        let _g = self.guard(None);
        let scratch = Conn::scratch();
        match self.lib().default_export(Some(&scratch), readonly, tls) {
            None => Ok(String::new()),
            Some(r) => self.check("default_export", r),
        }
    }
}

/// A configured C plugin.
pub struct CBackend {
    inner: Arc<Inner>,
}

impl Backend for CBackend {
    fn name(&self) -> &str {
        self.inner.plugin.name()
    }

    fn thread_model(&self) -> ThreadModel {
        self.inner.model
    }

    fn after_fork(&self) -> Result<()> {
        let i = &self.inner;
        let _g = i.guard(None);
        match i.lib().void_status(VoidCall::AfterFork, false) {
            None => Ok(()),
            Some(r) => i.check("after_fork", r),
        }
    }

    fn list_exports(&self, readonly: bool) -> Result<Vec<ExportEntry>> {
        let i = &self.inner;
        let items = {
            let _g = i.guard(None);
            let scratch = Conn::scratch();
            match i
                .lib()
                .list_exports(Some(&scratch), readonly, current_tls())
            {
                None => vec![ExportItem::Default],
                Some(r) => i.check("list_exports", r)?,
            }
        };
        items
            .into_iter()
            .map(|item| {
                Ok(match item {
                    ExportItem::Named { name, description } => ExportEntry { name, description },
                    ExportItem::Default => ExportEntry {
                        name: i.default_export_name(readonly, current_tls())?,
                        description: None,
                    },
                })
            })
            .collect()
    }

    fn default_export(&self, readonly: bool) -> Result<String> {
        self.inner.default_export_name(readonly, current_tls())
    }

    fn preconnect(&self, _client: &Client) -> Result<()> {
        let i = &self.inner;
        let _g = i.guard(None);
        match i.lib().preconnect(SERVER_READONLY.load(Ordering::Relaxed)) {
            None => Ok(()),
            Some(r) => i.check("preconnect", r),
        }
    }

    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        let i = &self.inner;
        if i.shut.load(Ordering::SeqCst) {
            return Err(Error::new(
                ErrorKind::Shutdown,
                "the server is shutting down",
            ));
        }
        // As nbdkit: the plugin sees the canonical name of the default
        // export, not "".
        let name = if export.is_empty() {
            i.default_export_name(readonly, current_tls())?
        } else {
            export.to_string()
        };
        let conn = Conn::new(&name);
        let raw = {
            let _g = i.guard(None);
            i.check("open", i.lib().open(&conn, readonly))?
        };
        i.handles.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(CHandle {
            inner: i.clone(),
            raw,
            conn,
            lock: Mutex::new(()),
            fast_zero: OnceLock::new(),
            fua: OnceLock::new(),
        }))
    }

    fn shutdown(&self) {
        let i = &self.inner;
        if i.shut.swap(true, Ordering::SeqCst) {
            return;
        }
        let _g = i.guard(None);
        i.lib().cleanup();
        if i.handles.load(Ordering::SeqCst) == 0 {
            i.lib().unload();
        } else {
            tracing::debug!(
                "{}: connections are still open; not calling unload",
                i.plugin.name()
            );
        }
    }
}

struct CHandle {
    inner: Arc<Inner>,
    raw: RawHandle,
    conn: Arc<Conn>,
    /// Held around every call under serialize_requests.
    lock: Mutex<()>,
    fast_zero: OnceLock<bool>,
    fua: OnceLock<FuaMode>,
}

impl Drop for CHandle {
    fn drop(&mut self) {
        let i = &self.inner;
        {
            let _g = i.guard(Some(&self.lock));
            i.lib().close(&self.conn, self.raw);
        }
        i.handles.fetch_sub(1, Ordering::SeqCst);
    }
}

impl CHandle {
    fn lib(&self) -> &Library {
        self.inner.lib()
    }

    fn guard(&self) -> Guards<'_> {
        self.inner.guard(Some(&self.lock))
    }

    /// A boolean query with a default for plugins without it.
    fn flag(&self, q: Query, what: &str, default: impl FnOnce() -> bool) -> Result<bool> {
        let r = {
            let _g = self.guard();
            self.lib().query(&self.conn, self.raw, q)
        };
        match r {
            None => Ok(default()),
            Some(r) => Ok(self.inner.check(what, r)? != 0),
        }
    }

    fn has_zero_v2(&self) -> bool {
        self.inner.v2() && self.lib().raw().zero.is_some()
    }

    fn has_flush(&self) -> bool {
        has_callback!(self.lib().raw(), self.inner.v2(), flush / flush_v1)
    }

    /// Run `f` over `[offset, offset+count)` in pieces the C API can take
    /// (`last` is true for the final piece).
    fn chunked(
        &self,
        offset: u64,
        count: u64,
        mut f: impl FnMut(u32, u64, bool) -> Result<()>,
    ) -> Result<()> {
        let mut done = 0;
        while done < count {
            let n = (count - done).min(CHUNK);
            f(n as u32, offset + done, done + n == count)?;
            done += n;
        }
        Ok(())
    }

    /// Whether a fast zero can be passed down to the plugin.
    fn native_fast_zero(&self) -> Result<bool> {
        if let Some(&v) = self.fast_zero.get() {
            return Ok(v);
        }
        let v = self.has_zero_v2()
            && self.can_zero()? == ZeroMode::Native
            && self.flag(Query::CanFastZero, "can_fast_zero", || false)?;
        Ok(*self.fast_zero.get_or_init(|| v))
    }

    fn fua_mode(&self) -> Result<FuaMode> {
        if let Some(&m) = self.fua.get() {
            return Ok(m);
        }
        let m = self.can_fua()?;
        Ok(*self.fua.get_or_init(|| m))
    }

    /// The FUA flag to pass, and whether to flush afterwards instead.
    fn fua_flags(&self, fua: bool) -> Result<(u32, bool)> {
        if !fua {
            return Ok((0, false));
        }
        Ok(match self.fua_mode()? {
            FuaMode::Native if self.inner.v2() => (FLAG_FUA, false),
            _ => (0, true),
        })
    }

    fn missing(what: &str) -> Error {
        Error::not_supported(format!("the plugin has no {what} callback"))
    }
}

impl Handle for CHandle {
    fn size(&self) -> Result<u64> {
        let r = {
            let _g = self.guard();
            self.lib().get_size(&self.conn, self.raw)
        };
        let n = self.inner.check("get_size", r)?;
        u64::try_from(n).map_err(|_| {
            Error::io(format!(
                "{}: get_size returned {n}",
                self.inner.plugin.name()
            ))
        })
    }

    fn block_size(&self) -> Result<Option<BlockSize>> {
        let r = {
            let _g = self.guard();
            self.lib().block_size(&self.conn, self.raw)
        };
        let Some(r) = r else { return Ok(None) };
        let (minimum, preferred, maximum) = self.inner.check("block_size", r)?;
        if minimum == 0 && preferred == 0 && maximum == 0 {
            return Ok(None);
        }
        // nbdkit's "no maximum" is 0xffffffff; as a multiple of the minimum
        // that is the largest one below it.
        let maximum = if maximum == u32::MAX && minimum.is_power_of_two() {
            maximum & !(minimum - 1)
        } else {
            maximum
        };
        Ok(Some(BlockSize {
            minimum,
            preferred,
            maximum,
        }))
    }

    fn source_name(&self) -> Option<String> {
        None
    }

    fn export_description(&self) -> Result<Option<String>> {
        let r = {
            let _g = self.guard();
            self.lib().export_description(&self.conn, self.raw)
        };
        match r {
            None => Ok(None),
            Some(r) => self.inner.check("export_description", r),
        }
    }

    fn can_write(&self) -> Result<bool> {
        let has = has_callback!(self.lib().raw(), self.inner.v2(), pwrite / pwrite_v1);
        self.flag(Query::CanWrite, "can_write", || has)
    }

    fn can_flush(&self) -> Result<bool> {
        let has = self.has_flush();
        self.flag(Query::CanFlush, "can_flush", || has)
    }

    fn is_rotational(&self) -> Result<bool> {
        self.flag(Query::IsRotational, "is_rotational", || false)
    }

    fn can_trim(&self) -> Result<bool> {
        let has = has_callback!(self.lib().raw(), self.inner.v2(), trim / trim_v1);
        self.flag(Query::CanTrim, "can_trim", || has)
    }

    fn can_zero(&self) -> Result<ZeroMode> {
        if !self.can_write()? {
            return Ok(ZeroMode::None);
        }
        let has = has_callback!(self.lib().raw(), self.inner.v2(), zero / zero_v1);
        // A plugin's can_zero only says whether to call its zero; without
        // one (or with false), zeroes are written with pwrite.
        let native = has && self.flag(Query::CanZero, "can_zero", || true)?;
        Ok(if native {
            ZeroMode::Native
        } else {
            ZeroMode::Emulate
        })
    }

    fn can_fast_zero(&self) -> Result<bool> {
        let r = {
            let _g = self.guard();
            self.lib().query(&self.conn, self.raw, Query::CanFastZero)
        };
        match r {
            Some(r) => Ok(self.inner.check("can_fast_zero", r)? != 0),
            // nbdkit's default: fast when zero would not call the plugin
            // (it fails at once instead of writing), slow otherwise.
            None => Ok(!self.has_zero_v2() || self.can_zero()? != ZeroMode::Native),
        }
    }

    fn can_extents(&self) -> Result<bool> {
        let has = self.lib().raw().extents.is_some();
        self.flag(Query::CanExtents, "can_extents", || has)
    }

    fn can_fua(&self) -> Result<FuaMode> {
        let r = {
            let _g = self.guard();
            self.lib().query(&self.conn, self.raw, Query::CanFua)
        };
        match r {
            None => Ok(if self.has_flush() {
                FuaMode::Emulate
            } else {
                FuaMode::None
            }),
            Some(r) => match self.inner.check("can_fua", r)? {
                0 => Ok(FuaMode::None),
                1 => Ok(FuaMode::Emulate),
                // API v1 calls cannot carry the flag.
                2 if !self.inner.v2() => Ok(FuaMode::Emulate),
                2 => Ok(FuaMode::Native),
                n => Err(Error::io(format!(
                    "{}: can_fua returned {n}",
                    self.inner.plugin.name()
                ))),
            },
        }
    }

    fn can_multi_conn(&self) -> Result<bool> {
        self.flag(Query::CanMultiConn, "can_multi_conn", || false)
    }

    fn can_cache(&self) -> Result<CacheMode> {
        let r = {
            let _g = self.guard();
            self.lib().query(&self.conn, self.raw, Query::CanCache)
        };
        match r {
            None => Ok(if self.lib().raw().cache.is_some() {
                CacheMode::Native
            } else {
                CacheMode::None
            }),
            Some(r) => match self.inner.check("can_cache", r)? {
                0 => Ok(CacheMode::None),
                1 => Ok(CacheMode::Emulate),
                2 => Ok(CacheMode::Native),
                n => Err(Error::io(format!(
                    "{}: can_cache returned {n}",
                    self.inner.plugin.name()
                ))),
            },
        }
    }

    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let v2 = self.inner.v2();
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(CHUNK as usize);
            let r = {
                let _g = self.guard();
                self.lib().pread(
                    &self.conn,
                    self.raw,
                    &mut buf[done..done + n],
                    offset + done as u64,
                    v2,
                )
            };
            self.inner
                .check("pread", r.ok_or_else(|| Self::missing("pread"))?)?;
            done += n;
        }
        Ok(())
    }

    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        let v2 = self.inner.v2();
        let (flags, flush_after) = self.fua_flags(fua)?;
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(CHUNK as usize);
            let last = done + n == buf.len();
            let r = {
                let _g = self.guard();
                self.lib().pwrite(
                    &self.conn,
                    self.raw,
                    &buf[done..done + n],
                    offset + done as u64,
                    if last { flags } else { 0 },
                    v2,
                )
            };
            match r {
                None => return Err(Error::read_only("the plugin has no pwrite callback")),
                Some(r) => self.inner.check("pwrite", r)?,
            }
            done += n;
        }
        if flush_after {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        let r = {
            let _g = self.guard();
            self.lib().flush(&self.conn, self.raw, self.inner.v2())
        };
        match r {
            None => Ok(()),
            Some(r) => self.inner.check("flush", r),
        }
    }

    fn trim(&self, offset: u64, count: u64, fua: bool) -> Result<()> {
        let v2 = self.inner.v2();
        let (flags, flush_after) = self.fua_flags(fua)?;
        self.chunked(offset, count, |n, off, last| {
            let r = {
                let _g = self.guard();
                self.lib().trim(
                    &self.conn,
                    self.raw,
                    n,
                    off,
                    if last { flags } else { 0 },
                    v2,
                )
            };
            self.inner
                .check("trim", r.ok_or_else(|| Self::missing("trim"))?)
        })?;
        if flush_after {
            self.flush()?;
        }
        Ok(())
    }

    fn zero(&self, offset: u64, count: u64, flags: ZeroFlags) -> Result<()> {
        let v2 = self.inner.v2();
        if flags.fast && !self.native_fast_zero()? {
            return Err(Error::not_supported(
                "fast zero is not supported by this plugin",
            ));
        }
        let (fua_flag, flush_after) = self.fua_flags(flags.fua)?;
        let mut base = 0;
        if flags.may_trim {
            base |= FLAG_MAY_TRIM;
        }
        if flags.fast {
            base |= FLAG_FAST_ZERO;
        }
        self.chunked(offset, count, |n, off, last| {
            let f = base | if last { fua_flag } else { 0 };
            let r = {
                let _g = self.guard();
                self.lib().zero(&self.conn, self.raw, n, off, f, v2)
            };
            self.inner
                .check("zero", r.ok_or_else(|| Self::missing("zero"))?)
        })?;
        if flush_after {
            self.flush()?;
        }
        Ok(())
    }

    fn extents(&self, offset: u64, count: u64, req_one: bool, extents: &mut Extents) -> Result<()> {
        if self.lib().raw().extents.is_none() {
            return extents.add(offset, count, 0);
        }
        let n = count.min(u32::MAX as u64) as u32;
        let mine = Extents::new(extents.start(), extents.end());
        let flags = if req_one { FLAG_REQ_ONE } else { 0 };
        let r = {
            let _g = self.guard();
            self.lib()
                .extents(&self.conn, self.raw, n, offset, flags, mine)
        };
        let got = self
            .inner
            .check("extents", r.ok_or_else(|| Self::missing("extents"))?)?;
        if got.list().is_empty() {
            return Err(Error::io(format!(
                "{}: extents returned no extents",
                self.inner.plugin.name()
            )));
        }
        for e in got.list() {
            extents.add(e.offset, e.length, e.flags)?;
        }
        Ok(())
    }

    fn cache(&self, offset: u64, count: u64) -> Result<()> {
        if self.lib().raw().cache.is_none() {
            return nbdkit_backend::read_and_discard(self, offset, count);
        }
        self.chunked(offset, count, |n, off, _| {
            let r = {
                let _g = self.guard();
                self.lib().cache(&self.conn, self.raw, n, off)
            };
            self.inner
                .check("cache", r.ok_or_else(|| Self::missing("cache"))?)
        })
    }
}

#[cfg(test)]
mod tests;
