//! `nozero`: change how write-zeroes requests are advertised and handled,
//! to test clients' fallbacks or compare naive and sparse-aware copying.

use std::sync::Arc;

use nbdkit_backend::{
    layer_fn, Backend, ConfigError, Error, FilterSpec, Handle, Param, Result, ZeroFlags, ZeroMode,
};

use crate::modes::take_mode;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Not advertised: clients write zeroes themselves.
    None,
    /// Advertised, done by the server with pwrite.
    Emulate,
    /// Passed on without the may-trim flag.
    NoTrim,
    /// Passed on unchanged.
    Plugin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fast {
    /// Fast zero not advertised.
    None,
    /// Advertised, but every fast request fails at once (ENOTSUP).
    Slow,
    /// Advertised; the fast flag is dropped and the zero done anyway.
    Ignore,
    /// Whatever the zero mode gives.
    Default,
}

struct NoZero {
    next: Arc<dyn Backend>,
    mode: Mode,
    fast: Fast,
}

impl Backend for NoZero {
    fn name(&self) -> &str {
        "nozero"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        Ok(Box::new(NoZeroHandle {
            next: self.next.open(readonly, export)?,
            mode: self.mode,
            fast: self.fast,
        }))
    }
}

struct NoZeroHandle {
    next: Box<dyn Handle>,
    mode: Mode,
    fast: Fast,
}

impl Handle for NoZeroHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn can_zero(&self) -> Result<ZeroMode> {
        Ok(match self.mode {
            Mode::None => ZeroMode::None,
            Mode::Emulate if self.next.can_write()? => ZeroMode::Emulate,
            Mode::Emulate => ZeroMode::None,
            Mode::NoTrim | Mode::Plugin => self.next.can_zero()?,
        })
    }
    fn can_fast_zero(&self) -> Result<bool> {
        Ok(match self.fast {
            Fast::None => false,
            Fast::Slow | Fast::Ignore => true,
            Fast::Default => match self.mode {
                Mode::None => false,
                // An emulated zero can always refuse fast requests.
                Mode::Emulate => true,
                Mode::NoTrim | Mode::Plugin => self.next.can_fast_zero()?,
            },
        })
    }
    fn zero(&self, offset: u64, count: u64, flags: ZeroFlags) -> Result<()> {
        let mut flags = flags;
        if flags.fast {
            match self.fast {
                Fast::Slow => return Err(Error::not_supported("nozero filter: fastzeromode=slow")),
                Fast::Ignore => flags.fast = false,
                _ => {}
            }
        }
        match self.mode {
            Mode::None => Err(Error::not_supported("nozero filter: zero is disabled")),
            Mode::Emulate => nbdkit_backend::write_zeroes(self, offset, count, flags),
            Mode::NoTrim => self.next.zero(
                offset,
                count,
                ZeroFlags {
                    may_trim: false,
                    ..flags
                },
            ),
            Mode::Plugin => self.next.zero(offset, count, flags),
        }
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "nozero",
    summary: "disable or change write-zeroes support (zeromode=, fastzeromode=)",
    description: "Example:\n  nbdkit-rs --filter=nozero file disk.img zeromode=emulate",
    params: &[
        Param {
            name: "zeromode",
            help: "none (default): not advertised; emulate: written with pwrite; notrim: passed on without may-trim; plugin: unchanged",
        },
        Param {
            name: "fastzeromode",
            help: "default: as the zero mode gives; none: not advertised; slow: fast requests fail; ignore: fast flag dropped",
        },
    ],
    configure: |cfg| {
        let mode = take_mode(
            cfg,
            "nozero",
            "zeromode",
            &[
                ("none", Mode::None),
                ("emulate", Mode::Emulate),
                ("notrim", Mode::NoTrim),
                ("plugin", Mode::Plugin),
            ],
            Mode::None,
        )?;
        let fast = take_mode(
            cfg,
            "nozero",
            "fastzeromode",
            &[
                ("default", Fast::Default),
                ("none", Fast::None),
                ("slow", Fast::Slow),
                ("ignore", Fast::Ignore),
            ],
            Fast::Default,
        )?;
        if mode == Mode::None && fast != Fast::Default && fast != Fast::None {
            return Err(ConfigError::new(
                "nozero filter: fastzeromode needs zero support: zeromode=none disables zeroing entirely",
            ));
        }
        Ok(layer_fn(move |next| {
            Ok(Arc::new(NoZero {
                next,
                mode,
                fast,
            }))
        }))
    },
};
