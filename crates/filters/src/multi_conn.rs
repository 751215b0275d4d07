//! `multi-conn`: change whether NBD_FLAG_CAN_MULTI_CONN is advertised, or
//! emulate it: with `emulate`, a flush on any connection flushes every
//! open connection, so clients may rely on "a flush on one connection
//! makes all connections' completed writes durable".

use std::sync::{Arc, Mutex, Weak};

use nbdkit_backend::{Backend, ConfigError, FilterSpec, Handle, Layer, Param, Result, ThreadModel};

use crate::modes::take_mode;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// As the plugin says if it says yes; else emulate if it can flush.
    Auto,
    Emulate,
    /// Advertise it, trusting the plugin.
    On,
    Off,
    /// Whatever the plugin says.
    Plugin,
}

/// Every open connection's handle below us, for emulated flushes.
type Registry = Mutex<Vec<Weak<dyn Handle>>>;

struct MultiConnLayer(Mode);

impl Layer for MultiConnLayer {
    fn layer(
        self: Box<Self>,
        next: Arc<dyn Backend>,
    ) -> std::result::Result<Arc<dyn Backend>, ConfigError> {
        Ok(Arc::new(MultiConn {
            next,
            mode: self.0,
            open: Arc::new(Mutex::new(Vec::new())),
        }))
    }
}

struct MultiConn {
    next: Arc<dyn Backend>,
    mode: Mode,
    open: Arc<Registry>,
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
        let next: Arc<dyn Handle> = Arc::from(self.next.open(readonly, export)?);
        let emulate = match self.mode {
            Mode::Emulate => true,
            Mode::Auto => !next.can_multi_conn()? && next.can_flush()?,
            _ => false,
        };
        if emulate {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            open.retain(|w| w.strong_count() > 0);
            open.push(Arc::downgrade(&next));
        }
        Ok(Box::new(MultiConnHandle {
            next,
            mode: self.mode,
            emulate,
            open: self.open.clone(),
        }))
    }
}

struct MultiConnHandle {
    next: Arc<dyn Handle>,
    mode: Mode,
    emulate: bool,
    open: Arc<Registry>,
}

impl Handle for MultiConnHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn can_multi_conn(&self) -> Result<bool> {
        Ok(match self.mode {
            Mode::On => true,
            Mode::Off => false,
            Mode::Plugin => self.next.can_multi_conn()?,
            Mode::Emulate | Mode::Auto => self.emulate || self.next.can_multi_conn()?,
        })
    }
    fn flush(&self) -> Result<()> {
        if !self.emulate {
            return self.next.flush();
        }
        let handles: Vec<Arc<dyn Handle>> = self
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for h in handles {
            h.flush()?;
        }
        Ok(())
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "multi-conn",
    summary: "change or emulate multi-conn (multi-conn-mode=auto|emulate|on|off|plugin)",
    description: "Example:\n  nbdkit-rs --filter=multi-conn file disk.img multi-conn-mode=emulate",
    params: &[Param {
        name: "multi-conn-mode",
        help: "auto (default): the plugin's if yes, else emulate when it can flush; emulate: a flush flushes every connection; on; off; plugin",
    }],
    configure: |cfg| {
        // nbdkit's "disable" also changes how connections are accepted,
        // which a filter here cannot do: refuse it rather than pretend.
        if cfg
            .clone()
            .take("multi-conn-mode")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("disable"))
        {
            return Err(ConfigError::new(
                "multi-conn filter: multi-conn-mode=disable is not supported; use multi-conn-mode=off to stop advertising multi-conn",
            ));
        }
        let mode = take_mode(
            cfg,
            "multi-conn",
            "multi-conn-mode",
            &[
                ("auto", Mode::Auto),
                ("emulate", Mode::Emulate),
                ("on", Mode::On),
                ("off", Mode::Off),
                ("plugin", Mode::Plugin),
            ],
            Mode::Auto,
        )?;
        Ok(Box::new(MultiConnLayer(mode)))
    },
};
