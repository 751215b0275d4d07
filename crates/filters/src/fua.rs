//! `fua`: change how Forced Unit Access is advertised and handled, to test
//! clients and plugins (or, with `discard`, to trade safety for speed);
//! and, with `flush-on-close=true`, flush when a client disconnects, so a
//! client that never flushes still leaves its writes durable.

use std::sync::Arc;

use nbdkit_backend::{
    layer_fn, Backend, Config, ConfigError, Error, FilterSpec, FuaMode, Handle, Param, Result,
    ZeroFlags,
};

use crate::modes::take_mode;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Not advertised.
    None,
    /// Advertised; the server flushes after each FUA request.
    Emulate,
    /// Advertised as native; the flag goes down unchanged.
    Native,
    /// Every write, trim and zero is made durable, FUA or not.
    Force,
    /// Whatever the plugin does.
    Pass,
    /// Advertised; the flag is dropped and flush does nothing (unsafe).
    Discard,
}

struct Fua {
    next: Arc<dyn Backend>,
    mode: Mode,
    flush_on_close: bool,
}

impl Backend for Fua {
    fn name(&self) -> &str {
        "fua"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        let next = self.next.open(readonly, export)?;
        let next_fua = next.can_fua()?;
        let flush = next.can_flush()?;
        if matches!(self.mode, Mode::Force | Mode::Emulate)
            && !flush
            && next_fua != FuaMode::Native
            && next.can_write()?
        {
            // Pretending would tell clients data is durable when it is not.
            return Err(Error::not_supported(format!(
                "fua filter: fuamode={} needs a plugin that can flush or has native FUA",
                if self.mode == Mode::Force {
                    "force"
                } else {
                    "emulate"
                }
            )));
        }
        // Only a connection that can write has anything to flush.
        let flush_on_close = self.flush_on_close && flush && next.can_write()?;
        Ok(Box::new(FuaHandle {
            next,
            mode: self.mode,
            next_fua,
            flush_on_close,
        }))
    }
}

struct FuaHandle {
    next: Box<dyn Handle>,
    mode: Mode,
    next_fua: FuaMode,
    flush_on_close: bool,
}

impl Drop for FuaHandle {
    fn drop(&mut self) {
        // Straight to the plugin: even fua-mode=discard, which drops the
        // client's flushes, flushes here.  The client is gone, so a
        // failure can only be logged.
        if self.flush_on_close {
            if let Err(e) = self.next.flush() {
                tracing::warn!("fua filter: flush-on-close: {e}");
            }
        }
    }
}

impl FuaHandle {
    /// The flag to send down, and whether to flush afterwards.
    fn plan(&self, fua: bool) -> (bool, bool) {
        match self.mode {
            Mode::None | Mode::Emulate | Mode::Discard => (false, false),
            Mode::Native | Mode::Pass => (fua, false),
            Mode::Force if self.next_fua == FuaMode::Native => (true, false),
            Mode::Force => (false, true),
        }
    }
    fn run(&self, fua: bool, f: impl FnOnce(bool) -> Result<()>) -> Result<()> {
        let (down, flush) = self.plan(fua);
        f(down)?;
        if flush {
            self.next.flush()?;
        }
        Ok(())
    }
}

impl Handle for FuaHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn can_fua(&self) -> Result<FuaMode> {
        Ok(match self.mode {
            Mode::None => FuaMode::None,
            Mode::Emulate => FuaMode::Emulate,
            Mode::Native | Mode::Force | Mode::Discard => FuaMode::Native,
            Mode::Pass => self.next_fua,
        })
    }
    fn can_flush(&self) -> Result<bool> {
        match self.mode {
            Mode::Discard | Mode::Force => Ok(true),
            _ => self.next.can_flush(),
        }
    }
    fn flush(&self) -> Result<()> {
        match self.mode {
            // force: every write was already made durable, so a flush has
            // nothing to do (nbdkit elides it too).
            Mode::Discard | Mode::Force => Ok(()),
            _ => self.next.flush(),
        }
    }
    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.run(fua, |f| self.next.pwrite(buf, offset, f))
    }
    fn trim(&self, offset: u64, count: u64, fua: bool) -> Result<()> {
        self.run(fua, |f| self.next.trim(offset, count, f))
    }
    fn zero(&self, offset: u64, count: u64, flags: ZeroFlags) -> Result<()> {
        self.run(flags.fua, |f| {
            self.next.zero(offset, count, ZeroFlags { fua: f, ..flags })
        })
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "fua",
    summary: "change Forced Unit Access support (fua-mode=none|emulate|native|force|pass|discard)",
    description: "Example:\n  nbdkit-rs --filter=fua file disk.img fua-mode=force\n  \
                  nbdkit-rs --filter=fua file disk.img fua-mode=discard flush-on-close=true",
    params: &[
        Param {
            name: "fua-mode",
            help: "none (default): FUA not advertised; emulate: flush after FUA writes; native: flag passed down; force: every write durable; pass: as the plugin; discard: flag and flushes dropped (unsafe)",
        },
        Param {
            name: "fuamode",
            help: "the older name of fua-mode",
        },
        Param {
            name: "flush-on-close",
            help: "true: flush the plugin when a client that could write disconnects (default false)",
        },
    ],
    configure: |cfg| {
        // nbdkit 1.46 names it fua-mode; fuamode stays for old command
        // lines.  Giving both is ambiguous, so refused.
        let (key, value) = match (cfg.take("fua-mode"), cfg.take("fuamode")) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "fua filter: fua-mode= and fuamode= are the same parameter: give one",
                ))
            }
            (None, Some(v)) => ("fuamode", Some(v)),
            (v, None) => ("fua-mode", v),
        };
        let mut given = Config::new(value.map(|v| vec![(key.to_string(), v)]).unwrap_or_default());
        let flush_on_close = cfg
            .take_bool("flush-on-close")
            .map_err(|e| ConfigError::new(format!("fua filter: {e}")))?
            .unwrap_or(false);
        let mode = take_mode(
            &mut given,
            "fua",
            key,
            &[
                ("none", Mode::None),
                ("emulate", Mode::Emulate),
                ("native", Mode::Native),
                ("force", Mode::Force),
                ("pass", Mode::Pass),
                ("discard", Mode::Discard),
            ],
            // nbdkit's default: FUA is not advertised.
            Mode::None,
        )?;
        Ok(layer_fn(move |next| {
            Ok(Arc::new(Fua {
                next,
                mode,
                flush_on_close,
            }))
        }))
    },
};

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// Records the FUA flag of each write and counts flushes.
    #[derive(Default)]
    struct Probe {
        fua: Mutex<Vec<bool>>,
        flushes: AtomicUsize,
    }
    struct ProbeBackend(Arc<Probe>, FuaMode);
    struct ProbeHandle(Arc<Probe>, FuaMode);
    impl Backend for ProbeBackend {
        fn name(&self) -> &str {
            "probe"
        }
        fn open(&self, _: bool, _: &str) -> Result<Box<dyn Handle>> {
            Ok(Box::new(ProbeHandle(self.0.clone(), self.1)))
        }
    }
    impl Handle for ProbeHandle {
        fn size(&self) -> Result<u64> {
            Ok(4096)
        }
        fn can_write(&self) -> Result<bool> {
            Ok(true)
        }
        fn can_flush(&self) -> Result<bool> {
            Ok(self.1 != FuaMode::None)
        }
        fn can_fua(&self) -> Result<FuaMode> {
            Ok(self.1)
        }
        fn pwrite(&self, _: &[u8], _: u64, fua: bool) -> Result<()> {
            self.0.fua.lock().unwrap().push(fua);
            Ok(())
        }
        fn flush(&self) -> Result<()> {
            self.0.flushes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn run(mode: &str, below: FuaMode) -> (FuaMode, Vec<bool>, usize) {
        let probe = Arc::new(Probe::default());
        let mut cfg = Config::new(vec![("fuamode".into(), mode.into())]);
        let layer = (SPEC.configure)(&mut cfg).unwrap();
        let b = layer
            .layer(Arc::new(ProbeBackend(probe.clone(), below)))
            .unwrap();
        let h = b.open(false, "").unwrap();
        h.pwrite(b"x", 0, true).unwrap();
        h.pwrite(b"x", 0, false).unwrap();
        h.flush().unwrap();
        let fua = probe.fua.lock().unwrap().clone();
        (
            h.can_fua().unwrap(),
            fua,
            probe.flushes.load(Ordering::SeqCst),
        )
    }

    #[test]
    fn modes() {
        use FuaMode::*;
        assert_eq!(run("none", Native), (None, vec![false, false], 1));
        assert_eq!(run("emulate", Native), (Emulate, vec![false, false], 1));
        assert_eq!(run("native", Emulate), (Native, vec![true, false], 1));
        assert_eq!(run("pass", Emulate), (Emulate, vec![true, false], 1));
        // force: every write durable, by flag or by flush; the client's
        // own flush then has nothing to do.
        assert_eq!(run("force", Native), (Native, vec![true, true], 0));
        assert_eq!(run("force", Emulate), (Native, vec![false, false], 2));
        assert_eq!(run("discard", Native), (Native, vec![false, false], 0));
    }

    #[test]
    fn flush_on_close_and_the_new_name() {
        let open = |params: &[(&str, &str)]| {
            let probe = Arc::new(Probe::default());
            let mut cfg = Config::from_pairs(params);
            let layer = (SPEC.configure)(&mut cfg)?;
            let b = layer
                .layer(Arc::new(ProbeBackend(probe.clone(), FuaMode::Native)))
                .unwrap();
            let h = b.open(false, "").unwrap();
            h.pwrite(b"x", 0, true).unwrap();
            h.flush().unwrap();
            let before = probe.flushes.load(Ordering::SeqCst);
            drop(h);
            let fua = probe.fua.lock().unwrap().clone();
            Ok::<_, ConfigError>((before, probe.flushes.load(Ordering::SeqCst), fua))
        };
        // discard drops the client's flush, flush-on-close flushes anyway.
        let r = open(&[("fua-mode", "discard"), ("flush-on-close", "true")]).unwrap();
        assert_eq!(r, (0, 1, vec![false]));
        let r = open(&[("fua-mode", "discard")]).unwrap();
        assert_eq!(r, (0, 0, vec![false]));
        let r = open(&[("fuamode", "native"), ("flush-on-close", "yes")]).unwrap();
        assert_eq!(r, (1, 2, vec![true]));
        let e = open(&[("fua-mode", "native"), ("fuamode", "none")]).unwrap_err();
        assert!(e.to_string().contains("fua-mode= and fuamode="), "{e}");
        let e = open(&[("flush-on-close", "maybe")]).unwrap_err();
        assert!(e.to_string().contains("flush-on-close"), "{e}");
        let e = open(&[("fua-mode", "sometimes")]).unwrap_err();
        assert!(e.to_string().contains("fua-mode=sometimes"), "{e}");
    }

    #[test]
    fn force_refused_without_flush() {
        let probe = Arc::new(Probe::default());
        let mut cfg = Config::new(vec![("fuamode".into(), "force".into())]);
        let layer = (SPEC.configure)(&mut cfg).unwrap();
        let b = layer
            .layer(Arc::new(ProbeBackend(probe, FuaMode::None)))
            .unwrap();
        let e = b.open(false, "").err().unwrap();
        assert!(
            e.to_string().contains("needs a plugin that can flush"),
            "{e}"
        );
    }
}
