//! The smallest useful plugin: a read-only disk where every byte has the
//! same value.  Build and run:
//!
//!     cargo run --example constant -- -f -U /tmp/c.sock constant size=1G byte=0x2a
//!     nbdinfo 'nbd+unix:///?socket=/tmp/c.sock'
//!
//! It gets the whole nbdkit-rs command line (and every built-in filter) by
//! calling `nbdkit_rs::main_with` with its own `PluginSpec`.

use std::sync::Arc;

use nbdkit_backend::{Backend, ConfigError, Handle, Param, PluginSpec, Result};

struct Constant {
    size: u64,
    byte: u8,
}

impl Backend for Constant {
    fn name(&self) -> &str {
        "constant"
    }
    fn open(&self, _readonly: bool, _export: &str) -> Result<Box<dyn Handle>> {
        Ok(Box::new(ConstantHandle {
            size: self.size,
            byte: self.byte,
        }))
    }
}

struct ConstantHandle {
    size: u64,
    byte: u8,
}

impl Handle for ConstantHandle {
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn pread(&self, buf: &mut [u8], _offset: u64) -> Result<()> {
        buf.fill(self.byte);
        Ok(())
    }
}

static CONSTANT: PluginSpec = PluginSpec {
    name: "constant",
    summary: "a read-only disk filled with one byte value",
    description: "Example:\n  constant size=1G byte=42",
    magic_config_key: Some("size"),
    params: &[
        Param {
            name: "size",
            help: "virtual size (required)",
        },
        Param {
            name: "byte",
            help: "the byte value 0..255 (default 0)",
        },
    ],
    create: |cfg| {
        let size = cfg
            .take_size("size")?
            .ok_or_else(|| ConfigError::new("constant: size= is required"))?;
        let byte = cfg.take_parse::<u8>("byte")?.unwrap_or(0);
        Ok(Arc::new(Constant { size, byte }))
    },
};

fn main() -> std::process::ExitCode {
    nbdkit_rs::main_with(&[&CONSTANT], &[])
}
