//! `fua`: change how Forced Unit Access is advertised and handled, to test
//! clients and plugins (or, with `discard`, to trade safety for speed).

use std::sync::Arc;

use nbdkit_backend::{
    Backend, ConfigError, Error, FilterSpec, FuaMode, Handle, Layer, Param, Result, ZeroFlags,
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

struct FuaLayer(Mode);

impl Layer for FuaLayer {
    fn layer(
        self: Box<Self>,
        next: Arc<dyn Backend>,
    ) -> std::result::Result<Arc<dyn Backend>, ConfigError> {
        Ok(Arc::new(Fua { next, mode: self.0 }))
    }
}

struct Fua {
    next: Arc<dyn Backend>,
    mode: Mode,
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
        Ok(Box::new(FuaHandle {
            next,
            mode: self.mode,
            next_fua,
        }))
    }
}

struct FuaHandle {
    next: Box<dyn Handle>,
    mode: Mode,
    next_fua: FuaMode,
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
    summary: "change Forced Unit Access support (fuamode=none|emulate|native|force|pass|discard)",
    description: "Example:\n  nbdkit-rs --filter=fua file disk.img fuamode=force",
    params: &[Param {
        name: "fuamode",
        help: "none (default): FUA not advertised; emulate: flush after FUA writes; native: flag passed down; force: every write durable; pass: as the plugin; discard: flag and flushes dropped (unsafe)",
    }],
    configure: |cfg| {
        let mode = take_mode(
            cfg,
            "fua",
            "fuamode",
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
        Ok(Box::new(FuaLayer(mode)))
    },
};

#[cfg(test)]
mod tests {
    use super::*;
    use nbdkit_backend::Config;
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
