//! `multi-conn`: change whether NBD_FLAG_CAN_MULTI_CONN is advertised, or
//! emulate it: with `emulate`, a flush on any connection (or a FUA write)
//! flushes every open connection, so clients may rely on "a flush on one
//! connection makes all connections' completed writes durable".  Dirty
//! tracking skips flushes that would have nothing to do.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use nbdkit_backend::{
    Backend, ConfigError, Error, ErrorKind, FilterSpec, Handle, Layer, Param, Result, ThreadModel,
    ZeroFlags,
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
    /// One flag for the whole export: a flush when nothing was written
    /// anywhere since the last one is skipped.
    Fast,
    /// Per connection: a connection is dirty after it wrote, trimmed or
    /// zeroed, or read after another connection flushed (it may hold
    /// stale cached data); flushing a clean connection is skipped.
    Connection,
    /// Every flush goes to the plugin.
    Off,
}

/// One client connection's handle below us, with its dirty state.
struct Conn {
    next: Box<dyn Handle>,
    export: String,
    dirty: AtomicBool,
    /// The flush generation this connection last saw.
    seen: AtomicU64,
}

/// State shared by every connection of the server.
#[derive(Default)]
struct Shared {
    /// Connections that emulated flushes reach.
    open: Mutex<Vec<Weak<Conn>>>,
    /// Anything written since the last flush (TrackDirty::Fast).
    any_dirty: AtomicBool,
    /// Bumped by every flush that reached the plugin.
    generation: AtomicU64,
}

struct MultiConnLayer {
    mode: Mode,
    track: TrackDirty,
    by_export: bool,
}

impl Layer for MultiConnLayer {
    fn layer(
        self: Box<Self>,
        next: Arc<dyn Backend>,
    ) -> std::result::Result<Arc<dyn Backend>, ConfigError> {
        Ok(Arc::new(MultiConn {
            next,
            mode: self.mode,
            track: self.track,
            by_export: self.by_export,
            shared: Arc::default(),
        }))
    }
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
        let emulate = match self.mode {
            Mode::Emulate => {
                if !next.can_flush()? {
                    return Err(Error::new(
                        ErrorKind::NotSupported,
                        "multi-conn filter: multi-conn-mode=emulate needs a plugin that can flush",
                    ));
                }
                true
            }
            Mode::Auto => {
                self.next.thread_model() > ThreadModel::SerializeConnections
                    && !next.can_multi_conn()?
                    && next.can_flush()?
            }
            _ => false,
        };
        let conn = Arc::new(Conn {
            next,
            export: export.to_string(),
            dirty: AtomicBool::new(false),
            seen: AtomicU64::new(self.shared.generation.load(Ordering::SeqCst)),
        });
        if emulate {
            let mut open = self.shared.open.lock().unwrap_or_else(|e| e.into_inner());
            open.retain(|w| w.strong_count() > 0);
            open.push(Arc::downgrade(&conn));
        }
        Ok(Box::new(MultiConnHandle {
            conn,
            mode: self.mode,
            track: self.track,
            by_export: self.by_export,
            emulate,
            single_client: self.next.thread_model() == ThreadModel::SerializeConnections,
            shared: self.shared.clone(),
        }))
    }
}

struct MultiConnHandle {
    conn: Arc<Conn>,
    mode: Mode,
    track: TrackDirty,
    by_export: bool,
    emulate: bool,
    single_client: bool,
    shared: Arc<Shared>,
}

impl MultiConnHandle {
    fn mark_dirty(&self) {
        self.conn.dirty.store(true, Ordering::SeqCst);
        self.shared.any_dirty.store(true, Ordering::SeqCst);
    }

    /// The connections a flush on this one must reach.
    fn targets(&self) -> Vec<Arc<Conn>> {
        if !self.emulate {
            return vec![self.conn.clone()];
        }
        self.shared
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|c| !self.by_export || c.export == self.conn.export)
            .collect()
    }

    fn flush_all(&self) -> Result<()> {
        if self.track == TrackDirty::Fast && !self.shared.any_dirty.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        let targets = self.targets();
        let result: Result<()> = targets.iter().try_for_each(|c| {
            let needed = match self.track {
                TrackDirty::Connection => c.dirty.swap(false, Ordering::SeqCst),
                TrackDirty::Fast => {
                    c.dirty.store(false, Ordering::SeqCst);
                    true
                }
                TrackDirty::Off => true,
            };
            if needed {
                c.next
                    .flush()
                    .inspect_err(|_| c.dirty.store(true, Ordering::SeqCst))?;
            }
            Ok(())
        });
        if result.is_err() {
            self.shared.any_dirty.store(true, Ordering::SeqCst);
        }
        result?;
        let generation = self.shared.generation.fetch_add(1, Ordering::SeqCst) + 1;
        for c in &targets {
            c.seen.store(generation, Ordering::SeqCst);
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
            Mode::Unsafe => true,
            Mode::Disable => false,
            Mode::Plugin => self.conn.next.can_multi_conn()?,
            Mode::Emulate => true,
            Mode::Auto => {
                !self.single_client && (self.emulate || self.conn.next.can_multi_conn()?)
            }
        })
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if self.track == TrackDirty::Connection
            && self.conn.seen.load(Ordering::SeqCst)
                != self.shared.generation.load(Ordering::SeqCst)
        {
            // Another connection flushed since we last did: what we read
            // now may be cached below us until our next flush.
            self.conn.dirty.store(true, Ordering::SeqCst);
        }
        self.conn.next.pread(buf, offset)
    }
    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.mark_dirty();
        if fua && self.emulate {
            // FUA is a flush of this write: under emulation every
            // connection must see it.
            self.conn.next.pwrite(buf, offset, false)?;
            return self.flush_all();
        }
        self.conn.next.pwrite(buf, offset, fua)
    }
    fn trim(&self, offset: u64, count: u64, fua: bool) -> Result<()> {
        self.mark_dirty();
        if fua && self.emulate {
            self.conn.next.trim(offset, count, false)?;
            return self.flush_all();
        }
        self.conn.next.trim(offset, count, fua)
    }
    fn zero(&self, offset: u64, count: u64, flags: ZeroFlags) -> Result<()> {
        self.mark_dirty();
        if flags.fua && self.emulate {
            self.conn.next.zero(
                offset,
                count,
                ZeroFlags {
                    fua: false,
                    ..flags
                },
            )?;
            return self.flush_all();
        }
        self.conn.next.zero(offset, count, flags)
    }
    fn flush(&self) -> Result<()> {
        self.flush_all()
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
        Ok(Box::new(MultiConnLayer {
            mode,
            track,
            by_export,
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
        fn can_write(&self) -> Result<bool> {
            Ok(true)
        }
        fn can_flush(&self) -> Result<bool> {
            Ok(true)
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
        let mut cfg = Config::new(
            params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
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
    fn a_read_after_another_connection_flushed_makes_a_connection_dirty() {
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
        // a may hold data cached before c's flush.
        a.pread(&mut buf, 0).unwrap();
        a.flush().unwrap();
        assert_eq!(counts(&f), [1, 1, 0, 0]);
        a.flush().unwrap();
        assert_eq!(counts(&f), [1, 1, 0, 0]);
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
