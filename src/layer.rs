//! What the server does around every layer of the chain (each filter and
//! the plugin), as nbdkit's backend layer does:
//!
//! - a connection's capability callbacks (`can_write`, `can_zero`, ...)
//!   reach each layer once: the answer is kept for the life of the
//!   handle, so a filter that asks its `next` again, and the server after
//!   it, do not call a plugin (or its script) twice;
//! - the default export ("") is opened under the name `default_export`
//!   gives, asked once per connection;
//! - with `-v`, each call into a layer is logged as
//!   `NAME: CALL ARGS` (`memory: pread count=4096 offset=0`), control
//!   calls (open, capabilities, ...) unless `-D nbdkit.backend.controlpath=0`
//!   and data calls (pread, pwrite, ...) unless
//!   `-D nbdkit.backend.datapath=0`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use nbdkit_backend::{
    Backend, BlockSize, CacheMode, Client, DirectRead, ExportEntry, Extents, FuaMode, Handle,
    Result, ThreadModel, ZeroFlags, ZeroMode,
};
use tracing::debug;

/// Which calls are logged.
#[derive(Clone, Copy)]
struct Trace {
    control: bool,
    data: bool,
}

impl Trace {
    fn from_flags() -> Trace {
        let on = tracing::enabled!(tracing::Level::DEBUG);
        let flag = |f| nbdkit_backend::debug_flag("nbdkit", f).is_none_or(|v| v != 0);
        Trace {
            control: on && flag("backend.controlpath"),
            data: on && flag("backend.datapath"),
        }
    }
}

/// Wrap one layer (a filter over its already wrapped `next`, or the
/// plugin).
pub fn wrap(inner: Arc<dyn Backend>) -> Arc<dyn Backend> {
    Arc::new(Layer {
        inner,
        trace: Trace::from_flags(),
        default_exports: Mutex::default(),
    })
}

struct Layer {
    inner: Arc<dyn Backend>,
    trace: Trace,
    /// Each connection's answer to `default_export` (by client id), kept
    /// until it disconnects: nbdkit asks each layer once per connection.
    default_exports: Mutex<HashMap<u64, String>>,
}

impl Layer {
    fn control(&self, what: std::fmt::Arguments<'_>) {
        if self.trace.control {
            debug!("{}: {what}", self.inner.name());
        }
    }
}

impl Backend for Layer {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn next(&self) -> Option<&dyn Backend> {
        self.inner.next()
    }
    fn thread_model(&self) -> ThreadModel {
        self.inner.thread_model()
    }
    fn after_fork(&self) -> Result<()> {
        self.control(format_args!("after_fork"));
        self.inner.after_fork()
    }
    fn list_exports(&self, readonly: bool) -> Result<Vec<ExportEntry>> {
        self.control(format_args!("list_exports readonly={}", readonly as u8));
        self.inner.list_exports(readonly)
    }
    fn default_export(&self, readonly: bool) -> Result<String> {
        let client = Client::current().map(|c| c.id());
        let cached = |m: &Mutex<HashMap<u64, String>>| {
            let id = client?;
            m.lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&id)
                .cloned()
        };
        if let Some(name) = cached(&self.default_exports) {
            return Ok(name);
        }
        self.control(format_args!("default_export readonly={}", readonly as u8));
        let name = self.inner.default_export(readonly)?;
        if let Some(id) = client {
            self.default_exports
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, name.clone());
        }
        Ok(name)
    }
    fn preconnect(&self, client: &Client) -> Result<()> {
        self.control(format_args!("preconnect"));
        self.inner.preconnect(client)
    }
    fn disconnected(&self, client: &Client) {
        self.default_exports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&client.id());
        self.inner.disconnected(client)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        self.control(format_args!(
            "open readonly={} exportname={export:?}",
            readonly as u8
        ));
        // As nbdkit, each layer opens the default export ("") under the
        // name its default_export gives (asked once per connection).
        let resolved;
        let export = if export.is_empty() {
            resolved = self.default_export(readonly)?;
            resolved.as_str()
        } else {
            export
        };
        let inner = self.inner.open(readonly, export)?;
        Ok(Box::new(LayerHandle {
            inner,
            name: self.inner.name().to_string(),
            trace: self.trace,
            caps: Caps::default(),
        }))
    }
    fn dump_plugin(&self) -> Option<String> {
        self.inner.dump_plugin()
    }
    fn shutdown(&self) {
        self.inner.shutdown()
    }
}

/// Capability answers kept for the life of one handle.
#[derive(Default)]
struct Caps {
    can_write: OnceLock<bool>,
    can_flush: OnceLock<bool>,
    is_rotational: OnceLock<bool>,
    can_trim: OnceLock<bool>,
    can_zero: OnceLock<ZeroMode>,
    can_fast_zero: OnceLock<bool>,
    can_extents: OnceLock<bool>,
    can_fua: OnceLock<FuaMode>,
    can_multi_conn: OnceLock<bool>,
    can_cache: OnceLock<CacheMode>,
}

struct LayerHandle {
    inner: Box<dyn Handle>,
    name: String,
    trace: Trace,
    caps: Caps,
}

impl LayerHandle {
    fn control(&self, what: std::fmt::Arguments<'_>) {
        if self.trace.control {
            debug!("{}: {what}", self.name);
        }
    }
    fn data(&self, what: std::fmt::Arguments<'_>) {
        if self.trace.data {
            debug!("{}: {what}", self.name);
        }
    }
    /// Ask once; a failure is not kept, so the next caller asks again.
    fn once<T: Copy>(
        &self,
        cell: &OnceLock<T>,
        what: &str,
        ask: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        if let Some(v) = cell.get() {
            return Ok(*v);
        }
        self.control(format_args!("{what}"));
        let v = ask()?;
        Ok(*cell.get_or_init(|| v))
    }
}

impl Drop for LayerHandle {
    fn drop(&mut self) {
        self.control(format_args!("close"));
    }
}

impl Handle for LayerHandle {
    fn next(&self) -> Option<&dyn Handle> {
        self.inner.next()
    }
    fn size(&self) -> Result<u64> {
        self.control(format_args!("get_size"));
        self.inner.size()
    }
    fn block_size(&self) -> Result<Option<BlockSize>> {
        self.control(format_args!("block_size"));
        self.inner.block_size()
    }
    fn enforce_block_size(&self) -> Result<bool> {
        self.inner.enforce_block_size()
    }
    fn source_name(&self) -> Option<String> {
        self.inner.source_name()
    }
    fn source_version(&self) -> Option<String> {
        self.inner.source_version()
    }
    fn export_description(&self) -> Result<Option<String>> {
        self.control(format_args!("export_description"));
        self.inner.export_description()
    }
    fn can_write(&self) -> Result<bool> {
        self.once(&self.caps.can_write, "can_write", || self.inner.can_write())
    }
    fn can_flush(&self) -> Result<bool> {
        self.once(&self.caps.can_flush, "can_flush", || self.inner.can_flush())
    }
    fn is_rotational(&self) -> Result<bool> {
        self.once(&self.caps.is_rotational, "is_rotational", || {
            self.inner.is_rotational()
        })
    }
    fn can_trim(&self) -> Result<bool> {
        self.once(&self.caps.can_trim, "can_trim", || self.inner.can_trim())
    }
    fn can_zero(&self) -> Result<ZeroMode> {
        self.once(&self.caps.can_zero, "can_zero", || self.inner.can_zero())
    }
    fn can_fast_zero(&self) -> Result<bool> {
        self.once(&self.caps.can_fast_zero, "can_fast_zero", || {
            self.inner.can_fast_zero()
        })
    }
    fn can_extents(&self) -> Result<bool> {
        self.once(&self.caps.can_extents, "can_extents", || {
            self.inner.can_extents()
        })
    }
    fn can_fua(&self) -> Result<FuaMode> {
        self.once(&self.caps.can_fua, "can_fua", || self.inner.can_fua())
    }
    fn can_multi_conn(&self) -> Result<bool> {
        self.once(&self.caps.can_multi_conn, "can_multi_conn", || {
            self.inner.can_multi_conn()
        })
    }
    fn can_cache(&self) -> Result<CacheMode> {
        self.once(&self.caps.can_cache, "can_cache", || self.inner.can_cache())
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.data(format_args!("pread count={} offset={offset}", buf.len()));
        self.inner.pread(buf, offset)
    }
    fn pread_direct(&self, offset: u64, count: u64) -> Result<Option<DirectRead<'_>>> {
        // Logged only when it answers: otherwise the server falls back to
        // pread, which is logged then.
        let r = self.inner.pread_direct(offset, count);
        if let Ok(Some(_)) = &r {
            self.data(format_args!("pread count={count} offset={offset}"));
        }
        r
    }
    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.data(format_args!(
            "pwrite count={} offset={offset} fua={}",
            buf.len(),
            fua as u8
        ));
        self.inner.pwrite(buf, offset, fua)
    }
    fn flush(&self) -> Result<()> {
        self.data(format_args!("flush"));
        self.inner.flush()
    }
    fn trim(&self, offset: u64, count: u64, fua: bool) -> Result<()> {
        self.data(format_args!(
            "trim count={count} offset={offset} fua={}",
            fua as u8
        ));
        self.inner.trim(offset, count, fua)
    }
    fn zero(&self, offset: u64, count: u64, flags: ZeroFlags) -> Result<()> {
        self.data(format_args!("zero count={count} offset={offset} {flags:?}"));
        self.inner.zero(offset, count, flags)
    }
    fn extents(&self, offset: u64, count: u64, req_one: bool, extents: &mut Extents) -> Result<()> {
        self.data(format_args!(
            "extents count={count} offset={offset} req_one={}",
            req_one as u8
        ));
        self.inner.extents(offset, count, req_one, extents)
    }
    fn cache(&self, offset: u64, count: u64) -> Result<()> {
        self.data(format_args!("cache count={count} offset={offset}"));
        self.inner.cache(offset, count)
    }
}
