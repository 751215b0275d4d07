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
//!   `-D nbdkit.backend.datapath=0`;
//! - in debug builds (so in every test run), each call into a layer is
//!   checked against what that layer said about itself, as nbdkit's
//!   backend layer asserts: the range is within its size, write-like calls
//!   and their FUA/fast-zero flags only when it advertised them, extents
//!   answers cover the start of the range, its size does not change
//!   (except to grow by an `extend` the layer offered and performed).  The
//!   server checks what clients send (`Export::validate`); these catch a
//!   filter that sends its `next` what that layer never offered.  A broken
//!   check logs `layer check failed: ...` and aborts the process: a panic
//!   would be caught and turned into EIO, which a test might take for an
//!   expected error.  Release builds compile the checks away.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use nbdkit_backend::LockExt;
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
/// plugin).  `caller` names what calls into it (the filter above, or the
/// server), for the debug-build checks' messages.
pub fn wrap(inner: Arc<dyn Backend>, caller: &str) -> Arc<dyn Backend> {
    Arc::new(Layer {
        inner,
        caller: caller.to_string(),
        trace: Trace::from_flags(),
        default_exports: Mutex::default(),
    })
}

struct Layer {
    inner: Arc<dyn Backend>,
    caller: String,
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
            m.lock_unpoisoned().get(&id).cloned()
        };
        if let Some(name) = cached(&self.default_exports) {
            return Ok(name);
        }
        self.control(format_args!("default_export readonly={}", readonly as u8));
        let name = self.inner.default_export(readonly)?;
        if let Some(id) = client {
            self.default_exports
                .lock_unpoisoned()
                .insert(id, name.clone());
        }
        Ok(name)
    }
    fn preconnect(&self, client: &Client) -> Result<()> {
        self.control(format_args!("preconnect"));
        self.inner.preconnect(client)
    }
    fn disconnected(&self, client: &Client) {
        self.default_exports.lock_unpoisoned().remove(&client.id());
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
            caller: self.caller.clone(),
            trace: self.trace,
            caps: Caps::default(),
            size: Mutex::new(None),
        }))
    }
    fn dump_plugin(&self) -> Option<String> {
        self.inner.dump_plugin()
    }
    fn shutdown(&self) {
        self.inner.shutdown()
    }
}

/// `LayerHandle`'s capability methods: each asks `inner` once (see
/// `LayerHandle::once`) and keeps the answer in the `Caps` field of its name.
macro_rules! asked_once {
    ($($name:ident: $t:ty),* $(,)?) => {
        $(fn $name(&self) -> Result<$t> {
            self.once(&self.caps.$name, stringify!($name), || self.inner.$name())
        })*
    };
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
    can_extend: OnceLock<bool>,
}

struct LayerHandle {
    inner: Box<dyn Handle>,
    name: String,
    caller: String,
    trace: Trace,
    caps: Caps,
    /// The first size this layer gave, or the size it last grew to with
    /// `extend` (debug-build checks only).
    size: Mutex<Option<u64>>,
}

/// Which capability a call needs, for [`LayerHandle::check`].
#[derive(Clone, Copy)]
enum Needs {
    Nothing,
    Write,
    Flush,
    Trim,
    Zero,
    Cache,
    Extend,
}

impl LayerHandle {
    /// Fail loudly: the caller broke this layer's contract.  Unit tests
    /// get a panic they can expect; the server aborts (see the file
    /// comment for why not a panic).
    #[cold]
    fn broken(&self, what: std::fmt::Arguments<'_>) {
        let msg = format!(
            "layer check failed: {} called {}: {what}",
            self.caller, self.name
        );
        if cfg!(test) {
            panic!("{msg}");
        }
        tracing::error!("{msg}");
        std::process::abort();
    }

    /// Check a data call before it goes in: a range within the size this
    /// layer gave, and a capability (and FUA / fast zero) it advertised.
    /// Answers nobody asked for yet are not asked here (that would add
    /// calls a test or a log could see): a check needs the answer known.
    fn check(&self, call: &str, offset: u64, count: u64, needs: Needs, fua: bool, fast: bool) {
        if !cfg!(debug_assertions) {
            return;
        }
        let known = *self.size.lock_unpoisoned();
        if let Some(size) = known {
            if offset.checked_add(count).is_none_or(|end| end > size) {
                self.broken(format_args!(
                    "{call} count={count} offset={offset} is beyond the size {size}"
                ));
            }
        }
        let c = &self.caps;
        let offered = match needs {
            Needs::Nothing => None,
            Needs::Write => c.can_write.get().copied(),
            Needs::Flush => c.can_flush.get().copied(),
            Needs::Trim => c.can_trim.get().copied(),
            Needs::Zero => c.can_zero.get().map(|z| *z != ZeroMode::None),
            Needs::Cache => c.can_cache.get().map(|m| *m != CacheMode::None),
            Needs::Extend => c.can_extend.get().copied(),
        };
        if offered == Some(false) {
            self.broken(format_args!("{call}, which this layer did not advertise"));
        }
        if fua && c.can_fua.get() == Some(&FuaMode::None) {
            self.broken(format_args!(
                "{call} with FUA, which this layer did not advertise"
            ));
        }
        if fast && c.can_fast_zero.get() == Some(&false) {
            self.broken(format_args!(
                "{call} with fast zero, which this layer did not advertise"
            ));
        }
    }

    /// Check an `extents` or `allocation_depth` answer: what the list
    /// already held (up to `before`) is the caller's; this layer must add
    /// at least the extent that covers where the list goes on.
    fn check_answered(&self, call: &str, offset: u64, count: u64, before: u64, ex: &Extents) {
        if cfg!(debug_assertions) && count > 0 && before < ex.end() && ex.next_offset() <= before {
            self.broken(format_args!(
                "{call} count={count} offset={offset} answered no extent at {before}"
            ));
        }
    }

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
        let size = self.inner.size()?;
        if cfg!(debug_assertions) {
            let first = *self.size.lock_unpoisoned().get_or_insert(size);
            if first != size {
                self.broken(format_args!("its size changed from {first} to {size}"));
            }
        }
        Ok(size)
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
    asked_once! {
        can_write: bool, can_flush: bool, is_rotational: bool, can_trim: bool,
        can_zero: ZeroMode, can_fast_zero: bool, can_extents: bool, can_fua: FuaMode,
        can_multi_conn: bool, can_cache: CacheMode, can_extend: bool,
    }
    fn extend(&self, new_size: u64) -> Result<()> {
        self.check("extend", 0, 0, Needs::Extend, false, false);
        self.data(format_args!("extend size={new_size}"));
        self.inner.extend(new_size)?;
        // The size it grew to is the size from now on: calls up to it
        // are in range, and `size` must answer it.
        if cfg!(debug_assertions) {
            let mut size = self.size.lock_unpoisoned();
            if let Some(s) = size.as_mut() {
                *s = (*s).max(new_size);
            }
        }
        Ok(())
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(
            "pread",
            offset,
            buf.len() as u64,
            Needs::Nothing,
            false,
            false,
        );
        self.data(format_args!("pread count={} offset={offset}", buf.len()));
        self.inner.pread(buf, offset)
    }
    fn pread_direct(&self, offset: u64, count: u64) -> Result<Option<DirectRead<'_>>> {
        self.check("pread", offset, count, Needs::Nothing, false, false);
        // Logged only when it answers: otherwise the server falls back to
        // pread, which is logged then.
        let r = self.inner.pread_direct(offset, count);
        if let Ok(Some(_)) = &r {
            self.data(format_args!("pread count={count} offset={offset}"));
        }
        r
    }
    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.check("pwrite", offset, buf.len() as u64, Needs::Write, fua, false);
        self.data(format_args!(
            "pwrite count={} offset={offset} fua={}",
            buf.len(),
            fua as u8
        ));
        self.inner.pwrite(buf, offset, fua)
    }
    fn flush(&self) -> Result<()> {
        self.check("flush", 0, 0, Needs::Flush, false, false);
        self.data(format_args!("flush"));
        self.inner.flush()
    }
    fn trim(&self, offset: u64, count: u64, fua: bool) -> Result<()> {
        self.check("trim", offset, count, Needs::Trim, fua, false);
        self.data(format_args!(
            "trim count={count} offset={offset} fua={}",
            fua as u8
        ));
        self.inner.trim(offset, count, fua)
    }
    fn zero(&self, offset: u64, count: u64, flags: ZeroFlags) -> Result<()> {
        self.check("zero", offset, count, Needs::Zero, flags.fua, flags.fast);
        self.data(format_args!("zero count={count} offset={offset} {flags:?}"));
        self.inner.zero(offset, count, flags)
    }
    fn extents(&self, offset: u64, count: u64, req_one: bool, extents: &mut Extents) -> Result<()> {
        self.data(format_args!(
            "extents count={count} offset={offset} req_one={}",
            req_one as u8
        ));
        self.check("extents", offset, count, Needs::Nothing, false, false);
        let before = extents.next_offset();
        self.inner.extents(offset, count, req_one, extents)?;
        self.check_answered("extents", offset, count, before, extents);
        Ok(())
    }
    fn allocation_depth(
        &self,
        offset: u64,
        count: u64,
        req_one: bool,
        extents: &mut Extents,
    ) -> Result<()> {
        self.data(format_args!(
            "allocation_depth count={count} offset={offset} req_one={}",
            req_one as u8
        ));
        self.check(
            "allocation_depth",
            offset,
            count,
            Needs::Nothing,
            false,
            false,
        );
        let before = extents.next_offset();
        self.inner
            .allocation_depth(offset, count, req_one, extents)?;
        self.check_answered("allocation_depth", offset, count, before, extents);
        Ok(())
    }
    fn cache(&self, offset: u64, count: u64) -> Result<()> {
        self.check("cache", offset, count, Needs::Cache, false, false);
        self.data(format_args!("cache count={count} offset={offset}"));
        self.inner.cache(offset, count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1 MiB, read-only, FUA not offered; `extents` reports one extent
    /// that ends before the range asked for (a broken answer).
    struct Disk;
    struct DiskHandle;
    impl Backend for Disk {
        fn name(&self) -> &str {
            "disk"
        }
        fn open(&self, _: bool, _: &str) -> Result<Box<dyn Handle>> {
            Ok(Box::new(DiskHandle))
        }
    }
    impl Handle for DiskHandle {
        fn size(&self) -> Result<u64> {
            Ok(1 << 20)
        }
        fn can_fua(&self) -> Result<FuaMode> {
            Ok(FuaMode::None)
        }
        fn pread(&self, buf: &mut [u8], _: u64) -> Result<()> {
            buf.fill(0);
            Ok(())
        }
        fn extents(&self, offset: u64, count: u64, _: bool, e: &mut Extents) -> Result<()> {
            // Broken below 1 MiB / 2: the extent ends where the range starts.
            if offset < 1 << 19 {
                e.add(0, offset, 0)
            } else {
                e.add(offset, count, 0)
            }
        }
    }

    fn open() -> Box<dyn Handle> {
        let h = wrap(Arc::new(Disk), "the server").open(true, "x").unwrap();
        assert_eq!(h.size().unwrap(), 1 << 20);
        assert!(!h.can_write().unwrap());
        h
    }

    #[test]
    fn calls_the_layer_offered_pass() {
        let h = open();
        let mut buf = [1u8; 512];
        h.pread(&mut buf, (1 << 20) - 512).unwrap();
        assert_eq!(buf, [0; 512]);
        // The size is known, so this is checked too, and is in range.
        let mut e = Extents::new(1 << 19, 1 << 20);
        h.extents(1 << 19, 1 << 19, false, &mut e).unwrap();
        assert_eq!(e.list().len(), 1);
    }

    #[test]
    #[should_panic(
        expected = "layer check failed: the server called disk: pread count=512 offset=1048576 is beyond the size 1048576"
    )]
    fn a_read_past_the_end_fails_the_check() {
        open().pread(&mut [0; 512], 1 << 20).unwrap();
    }

    #[test]
    #[should_panic(expected = "pwrite, which this layer did not advertise")]
    fn a_write_to_a_read_only_layer_fails_the_check() {
        let _ = open().pwrite(&[0; 512], 0, false);
    }

    #[test]
    #[should_panic(expected = "zero with FUA, which this layer did not advertise")]
    fn fua_not_offered_fails_the_check() {
        let h = open();
        assert_eq!(h.can_fua().unwrap(), FuaMode::None);
        let flags = ZeroFlags {
            fua: true,
            ..ZeroFlags::default()
        };
        let _ = h.zero(0, 512, flags);
    }

    /// A disk that grows with `extend`.
    struct Growing(Arc<Mutex<u64>>);
    struct GrowingHandle(Arc<Mutex<u64>>);
    impl Backend for Growing {
        fn name(&self) -> &str {
            "growing"
        }
        fn open(&self, _: bool, _: &str) -> Result<Box<dyn Handle>> {
            Ok(Box::new(GrowingHandle(self.0.clone())))
        }
    }
    impl Handle for GrowingHandle {
        fn size(&self) -> Result<u64> {
            Ok(*self.0.lock().unwrap())
        }
        fn can_write(&self) -> Result<bool> {
            Ok(true)
        }
        fn can_extend(&self) -> Result<bool> {
            Ok(true)
        }
        fn extend(&self, new_size: u64) -> Result<()> {
            let mut s = self.0.lock().unwrap();
            *s = (*s).max(new_size);
            Ok(())
        }
        fn pread(&self, buf: &mut [u8], _: u64) -> Result<()> {
            buf.fill(0);
            Ok(())
        }
        fn pwrite(&self, _: &[u8], _: u64, _: bool) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn growth_by_extend_is_legal() {
        let disk = Growing(Arc::new(Mutex::new(4096)));
        let h = wrap(Arc::new(disk), "qcow2dec").open(false, "x").unwrap();
        assert_eq!(h.size().unwrap(), 4096);
        assert!(h.can_write().unwrap() && h.can_extend().unwrap());
        h.extend(8192).unwrap();
        assert_eq!(h.size().unwrap(), 8192);
        h.pwrite(&[1; 512], 8192 - 512, false).unwrap();
    }

    #[test]
    #[should_panic(expected = "extend, which this layer did not advertise")]
    fn extend_not_offered_fails_the_check() {
        let h = open();
        assert!(!h.can_extend().unwrap());
        let _ = h.extend(2 << 20);
    }

    #[test]
    #[should_panic(expected = "extents count=4096 offset=8192 answered no extent at 8192")]
    fn extents_that_miss_the_range_fail_the_check() {
        let h = open();
        let mut e = Extents::new(8192, 8192 + 4096);
        let _ = h.extents(8192, 4096, false, &mut e);
    }
}
