//! `rotational`: say whether the export behaves like a spinning disk
//! (NBD_FLAG_ROTATIONAL), whatever the plugin says.  A client may then
//! order its requests to shorten seeks (Linux's elevator).

use std::sync::Arc;

use nbdkit_backend::{layer_fn, Backend, ConfigError, FilterSpec, Handle, Param, Result};

struct RotationalBackend {
    next: Arc<dyn Backend>,
    rotational: bool,
}

impl Backend for RotationalBackend {
    fn name(&self) -> &str {
        "rotational"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        Ok(Box::new(RotationalHandle {
            next: self.next.open(readonly, export)?,
            rotational: self.rotational,
        }))
    }
}

struct RotationalHandle {
    next: Box<dyn Handle>,
    rotational: bool,
}

impl Handle for RotationalHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn is_rotational(&self) -> Result<bool> {
        Ok(self.rotational)
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "rotational",
    summary: "set or clear the rotational (spinning disk) flag",
    description: "Without a parameter the export is advertised as rotational.\n\n\
Example:\n  nbdkit-rs --filter=rotational file disk.img rotational=false",
    params: &[Param {
        name: "rotational",
        help: "true (the default): behaves like a spinning disk; false: like an SSD or RAM",
    }],
    configure: |cfg| {
        let rotational = cfg
            .take_bool("rotational")
            .map_err(|e| ConfigError::new(format!("rotational filter: {e}")))?
            .unwrap_or(true);
        Ok(layer_fn(move |next| {
            Ok(Arc::new(RotationalBackend { next, rotational }))
        }))
    },
};
