//! `multi-conn`: change whether NBD_FLAG_CAN_MULTI_CONN is advertised, or
//! emulate it: with `emulate`, a flush on any connection (or a FUA write)
//! flushes every open connection, so clients may rely on "a flush on one
//! connection makes all connections' completed writes durable".  Dirty
//! tracking skips flushes that would have nothing to do.  The rules are
//! nbdkit's: connections form one group (or one per export name with
//! multi-conn-exportname=true); a write dirties its group; an emulated
//! flush reaches every connection of the group that wrote (and, after a
//! write, every one that read); without emulation a flush is skipped only
//! while nothing in the group was written since it was last made clean.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};

use nbdkit_backend::LockExt;
use nbdkit_backend::{
    layer_fn, Backend, ConfigError, Error, ErrorKind, FilterSpec, FuaMode, Handle, Param, Result,
    ThreadModel, ZeroFlags,
};

use crate::modes::take_mode;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The plugin's answer if yes; else emulate if it can flush; never
    /// under serialize_connections (one client at a time needs no
    /// multi-conn).
    Auto,
    Emulate,
    /// Advertise it, trusting the plugin (nbdkit: `unsafe`).
    Unsafe,
    /// Never advertise it, never replicate flushes.
    Disable,
    /// Whatever the plugin says.
    Plugin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TrackDirty {
    /// One flag for the group: a flush when nothing was written since
    /// the last one is skipped.
    Fast,
    /// Also per connection: whether it wrote, and whether it read (it may
    /// hold data cached from before another connection's flush).
    Connection,
    /// Every flush goes to the plugin.
    Off,
}

/// Dirty bits of a connection (multi-conn-track-dirty=connection).
const READ: u8 = 1;
const WRITE: u8 = 2;

/// One client connection's handle below us, with its dirty state.
struct Conn {
    next: Box<dyn Handle>,
    /// READ: it read since its last flush (it may hold data cached
    /// before another connection's flush); WRITE: it wrote.
    dirty: AtomicU8,
}

/// The connections a flush may have to reach: every connection, or with
/// multi-conn-exportname=true those to one export.  A group ends with its
/// last connection.
struct Group {
    name: String,
    /// Something was written in the group since the flush that cleared it.
    dirty: AtomicBool,
    conns: Mutex<Vec<Weak<Conn>>>,
}

/// State shared by every connection of the server.
#[derive(Default)]
struct Shared {
    groups: Mutex<Vec<Arc<Group>>>,
}

struct MultiConn {
    next: Arc<dyn Backend>,
    mode: Mode,
    track: TrackDirty,
    by_export: bool,
    shared: Arc<Shared>,
}

impl Backend for MultiConn {
    fn name(&self) -> &str {
        "multi-conn"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn thread_model(&self) -> ThreadModel {
        let below = self.next.thread_model();
        // An emulated flush calls other connections' handles; a plugin
        // that is not fully parallel must not see that overlap their own
        // requests, so all requests are then serialized.
        if matches!(self.mode, Mode::Emulate | Mode::Auto) && below < ThreadModel::Parallel {
            below.min(ThreadModel::SerializeAllRequests)
        } else {
            below
        }
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        let next = self.next.open(readonly, export)?;
        // nbdkit's rules: auto is disable when connections are serialized
        // (one client at a time needs no multi-conn), otherwise the
        // plugin's answer if it has multi-conn, else emulation.
        let mode = match self.mode {
            Mode::Auto if self.next.thread_model() == ThreadModel::SerializeConnections => {
                Mode::Disable
            }
            Mode::Auto if next.can_multi_conn()? => Mode::Plugin,
            // (nbdkit refuses the connection here; nothing to emulate
            // with, so nothing is advertised.)
            Mode::Auto if !next.can_flush()? => Mode::Disable,
            Mode::Auto => Mode::Emulate,
            m => m,
        };
        if mode == Mode::Emulate && !next.can_flush()? {
            return Err(Error::new(
                ErrorKind::NotSupported,
                "multi-conn filter: emulating multi-conn needs a plugin that can flush",
            ));
        }
        let conn = Arc::new(Conn {
            next,
            dirty: AtomicU8::new(0),
        });
        let name = if self.by_export { export } else { "" };
        let group = {
            let mut groups = self.shared.groups.lock_unpoisoned();
            match groups.iter().find(|g| g.name == name) {
                Some(g) => g.clone(),
                None => {
                    let g = Arc::new(Group {
                        name: name.to_string(),
                        dirty: AtomicBool::new(false),
                        conns: Mutex::new(Vec::new()),
                    });
                    groups.push(g.clone());
                    g
                }
            }
        };
        group.conns.lock_unpoisoned().push(Arc::downgrade(&conn));
        Ok(Box::new(MultiConnHandle {
            conn,
            group,
            mode,
            track: self.track,
            shared: self.shared.clone(),
        }))
    }
}

struct MultiConnHandle {
    conn: Arc<Conn>,
    group: Arc<Group>,
    /// The mode for this connection (auto resolved).
    mode: Mode,
    track: TrackDirty,
    shared: Arc<Shared>,
}

impl Drop for MultiConnHandle {
    fn drop(&mut self) {
        let mut groups = self.shared.groups.lock_unpoisoned();
        let mut conns = self.group.conns.lock_unpoisoned();
        conns.retain(|w| w.upgrade().is_some_and(|c| !Arc::ptr_eq(&c, &self.conn)));
        if conns.is_empty() {
            groups.retain(|g| !Arc::ptr_eq(g, &self.group));
        }
    }
}

impl MultiConnHandle {
    fn emulate(&self) -> bool {
        self.mode == Mode::Emulate
    }

    fn mark_dirty(&self, is_write: bool) {
        match self.track {
            TrackDirty::Connection => {
                self.conn
                    .dirty
                    .fetch_or(if is_write { WRITE } else { READ }, Ordering::SeqCst);
            }
            TrackDirty::Fast => {}
            TrackDirty::Off => return,
        }
        if is_write {
            self.group.dirty.store(true, Ordering::SeqCst);
        }
    }

    /// A write-like request: FUA under emulation is the plain request
    /// followed by a flush of the group; otherwise FUA goes down as is
    /// (and makes the write durable, so it does not dirty).
    fn write_like(&self, fua: bool, f: impl FnOnce(bool) -> Result<()>) -> Result<()> {
        if fua && self.emulate() {
            self.mark_dirty(true);
            f(false)?;
            return self.flush_group();
        }
        if !fua {
            self.mark_dirty(true);
        }
        f(fua)
    }

    fn flush_group(&self) -> Result<()> {
        if self.emulate() {
            // Every connection of the group that may need it: one that
            // wrote, or (after a write anywhere) one that read.
            let conns = self.group.conns.lock_unpoisoned();
            let group_dirty = self.group.dirty.load(Ordering::SeqCst);
            for c in conns.iter().filter_map(Weak::upgrade) {
                let d = c.dirty.load(Ordering::SeqCst);
                let needed = self.track == TrackDirty::Off
                    || (group_dirty && (self.track == TrackDirty::Fast || d & READ != 0))
                    || d & WRITE != 0;
                if needed {
                    c.next.flush()?;
                    c.dirty.store(0, Ordering::SeqCst);
                }
            }
            self.group.dirty.store(false, Ordering::SeqCst);
            return Ok(());
        }
        // Not emulating: skip the flush when nothing was written.
        if self.track != TrackDirty::Off && !self.group.dirty.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.conn.next.flush()?;
        match self.track {
            TrackDirty::Connection => {
                if self.conn.next.can_multi_conn()? {
                    // One flush covered every connection.
                    let conns = self.group.conns.lock_unpoisoned();
                    for c in conns.iter().filter_map(Weak::upgrade) {
                        c.dirty.store(0, Ordering::SeqCst);
                    }
                    self.group.dirty.store(false, Ordering::SeqCst);
                } else {
                    self.conn.dirty.store(0, Ordering::SeqCst);
                }
            }
            TrackDirty::Fast => self.group.dirty.store(false, Ordering::SeqCst),
            TrackDirty::Off => {}
        }
        Ok(())
    }
}

impl Handle for MultiConnHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.conn.next)
    }
    fn can_multi_conn(&self) -> Result<bool> {
        Ok(match self.mode {
            Mode::Unsafe | Mode::Emulate => true,
            Mode::Disable | Mode::Auto => false,
            Mode::Plugin => self.conn.next.can_multi_conn()?,
        })
    }
    fn can_fua(&self) -> Result<FuaMode> {
        // With a flush of every connection behind each FUA request, the
        // FUA is emulated whatever the plugin has.
        let fua = self.conn.next.can_fua()?;
        Ok(if fua == FuaMode::Native && self.emulate() {
            FuaMode::Emulate
        } else {
            fua
        })
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.mark_dirty(false);
        self.conn.next.pread(buf, offset)
    }
    fn cache(&self, offset: u64, count: u64) -> Result<()> {
        self.mark_dirty(false);
        self.conn.next.cache(offset, count)
    }
    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.write_like(fua, |fua| self.conn.next.pwrite(buf, offset, fua))
    }
    fn trim(&self, offset: u64, count: u64, fua: bool) -> Result<()> {
        self.write_like(fua, |fua| self.conn.next.trim(offset, count, fua))
    }
    fn zero(&self, offset: u64, count: u64, flags: ZeroFlags) -> Result<()> {
        self.write_like(flags.fua, |fua| {
            self.conn
                .next
                .zero(offset, count, ZeroFlags { fua, ..flags })
        })
    }
    fn flush(&self) -> Result<()> {
        self.flush_group()
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "multi-conn",
    summary: "change or emulate multi-conn (multi-conn-mode=auto|emulate|plugin|unsafe|disable)",
    description: "Example:\n  nbdkit-rs --filter=multi-conn file disk.img multi-conn-mode=emulate",
    params: &[
        Param {
            name: "multi-conn-mode",
            help: "auto (default): the plugin's if yes, else emulate when it can flush; emulate: a flush flushes every connection; plugin; unsafe: always advertise; disable: never advertise",
        },
        Param {
            name: "multi-conn-track-dirty",
            help: "connection (default): skip flushes of clean connections; fast: skip flushes when nothing was written anywhere; off",
        },
        Param {
            name: "multi-conn-exportname",
            help: "true: emulated flushes reach only connections to the same export (default false)",
        },
    ],
    configure: |cfg| {
        let mode = take_mode(
            cfg,
            "multi-conn",
            "multi-conn-mode",
            &[
                ("auto", Mode::Auto),
                ("emulate", Mode::Emulate),
                ("plugin", Mode::Plugin),
                ("unsafe", Mode::Unsafe),
                ("disable", Mode::Disable),
                // Earlier names of this filter's.
                ("on", Mode::Unsafe),
                ("off", Mode::Disable),
            ],
            Mode::Auto,
        )?;
        let track = take_mode(
            cfg,
            "multi-conn",
            "multi-conn-track-dirty",
            &[
                ("connection", TrackDirty::Connection),
                ("conn", TrackDirty::Connection),
                ("fast", TrackDirty::Fast),
                ("off", TrackDirty::Off),
            ],
            TrackDirty::Connection,
        )?;
        let by_export = cfg
            .take_bool("multi-conn-exportname")
            .map_err(|e| ConfigError::new(format!("multi-conn filter: {e}")))?
            .unwrap_or(false);
        Ok(layer_fn(move |next| {
            Ok(Arc::new(MultiConn {
                next,
                mode,
                track,
                by_export,
                shared: Arc::default(),
            }))
        }))
    },
};

#[cfg(test)]
mod tests {
    use super::*;
    use nbdkit_backend::Config;
    use std::sync::atomic::AtomicUsize;

    /// A memory-like plugin that counts flushes per connection.
    struct Counting {
        flushes: Arc<Vec<AtomicUsize>>,
        next_id: AtomicUsize,
    }
    struct CountingHandle {
        id: usize,
        flushes: Arc<Vec<AtomicUsize>>,
    }
    impl Backend for Counting {
        fn name(&self) -> &str {
            "counting"
        }
        fn open(&self, _: bool, _: &str) -> Result<Box<dyn Handle>> {
            Ok(Box::new(CountingHandle {
                id: self.next_id.fetch_add(1, Ordering::SeqCst),
                flushes: self.flushes.clone(),
            }))
        }
    }
    impl Handle for CountingHandle {
        fn size(&self) -> Result<u64> {
            Ok(1 << 20)
        }
        nbdkit_backend::capabilities! {
            can_write: true, can_flush: true,
        }
        fn pread(&self, buf: &mut [u8], _: u64) -> Result<()> {
            buf.fill(0);
            Ok(())
        }
        fn pwrite(&self, _: &[u8], _: u64, _: bool) -> Result<()> {
            Ok(())
        }
        fn flush(&self) -> Result<()> {
            self.flushes[self.id].fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn setup(params: &[(&str, &str)]) -> (Arc<dyn Backend>, Arc<Vec<AtomicUsize>>) {
        let flushes = Arc::new((0..4).map(|_| AtomicUsize::new(0)).collect::<Vec<_>>());
        let plugin: Arc<dyn Backend> = Arc::new(Counting {
            flushes: flushes.clone(),
            next_id: AtomicUsize::new(0),
        });
        let mut cfg = Config::from_pairs(params);
        let b = (SPEC.configure)(&mut cfg).unwrap().layer(plugin).unwrap();
        (b, flushes)
    }

    fn counts(f: &[AtomicUsize]) -> Vec<usize> {
        f.iter().map(|a| a.load(Ordering::SeqCst)).collect()
    }

    #[test]
    fn emulate_with_connection_tracking_flushes_only_dirty_connections() {
        let (b, f) = setup(&[("multi-conn-mode", "emulate")]);
        let a = b.open(false, "").unwrap();
        let c = b.open(false, "").unwrap();
        assert!(a.can_multi_conn().unwrap());
        // Nothing written: nothing to flush.
        a.flush().unwrap();
        assert_eq!(counts(&f), [0, 0, 0, 0]);
        // c wrote: a's flush reaches c only.
        c.pwrite(&[1], 0, false).unwrap();
        a.flush().unwrap();
        assert_eq!(counts(&f), [0, 1, 0, 0]);
        // A FUA write flushes every dirty connection.
        a.pwrite(&[1], 0, true).unwrap();
        assert_eq!(counts(&f), [1, 1, 0, 0]);
    }

    #[test]
    fn plugin_mode_skips_flushes_only_until_the_first_write() {
        let (b, f) = setup(&[("multi-conn-mode", "plugin")]);
        let a = b.open(false, "").unwrap();
        let c = b.open(false, "").unwrap();
        let mut buf = [0u8; 1];
        a.pread(&mut buf, 0).unwrap();
        a.flush().unwrap();
        assert_eq!(counts(&f), [0, 0, 0, 0]);
        c.pwrite(&[1], 0, false).unwrap();
        c.flush().unwrap();
        assert_eq!(counts(&f), [0, 1, 0, 0]);
        // The plugin has no multi-conn, so c's flush made nothing clean
        // for the others: after a write, every flush goes down (nbdkit).
        a.pread(&mut buf, 0).unwrap();
        a.flush().unwrap();
        assert_eq!(counts(&f), [1, 1, 0, 0]);
        a.flush().unwrap();
        assert_eq!(counts(&f), [2, 1, 0, 0]);
    }

    #[test]
    fn fast_and_off_tracking() {
        let (b, f) = setup(&[
            ("multi-conn-mode", "emulate"),
            ("multi-conn-track-dirty", "fast"),
        ]);
        let a = b.open(false, "").unwrap();
        let c = b.open(false, "").unwrap();
        a.flush().unwrap();
        assert_eq!(counts(&f), [0, 0, 0, 0]);
        a.pwrite(&[1], 0, false).unwrap();
        c.flush().unwrap();
        assert_eq!(counts(&f), [1, 1, 0, 0]);
        c.flush().unwrap();
        assert_eq!(counts(&f), [1, 1, 0, 0]);

        let (b, f) = setup(&[
            ("multi-conn-track-dirty", "off"),
            ("multi-conn-mode", "plugin"),
        ]);
        let a = b.open(false, "").unwrap();
        let _c = b.open(false, "").unwrap();
        a.flush().unwrap();
        a.flush().unwrap();
        assert_eq!(counts(&f), [2, 0, 0, 0]);
        assert!(!a.can_multi_conn().unwrap());
    }

    #[test]
    fn exportname_limits_emulated_flushes() {
        let (b, f) = setup(&[
            ("multi-conn-mode", "emulate"),
            ("multi-conn-exportname", "true"),
            ("multi-conn-track-dirty", "off"),
        ]);
        let a = b.open(false, "one").unwrap();
        let _c = b.open(false, "two").unwrap();
        let _d = b.open(false, "one").unwrap();
        a.flush().unwrap();
        assert_eq!(counts(&f), [1, 0, 1, 0]);
    }

    #[test]
    fn modes_advertise_as_documented() {
        for (mode, expect) in [
            ("unsafe", true),
            ("disable", false),
            ("on", true),
            ("off", false),
        ] {
            let (b, _) = setup(&[("multi-conn-mode", mode)]);
            assert_eq!(
                b.open(false, "").unwrap().can_multi_conn().unwrap(),
                expect,
                "{mode}"
            );
        }
        let mut cfg = Config::new(vec![("multi-conn-track-dirty".into(), "sometimes".into())]);
        let e = (SPEC.configure)(&mut cfg).err().unwrap();
        assert!(e.to_string().contains("multi-conn-track-dirty"), "{e}");
    }
}
