//! Tiny synthetic disks for testing clients: `null`, `zero`, `full`,
//! `pattern`, `ones`.  They share one implementation, which differs only in
//! what reads return and what writes do.

use std::sync::Arc;

use nbdkit_backend::{
    Backend, CacheMode, Config, ConfigError, Error, ErrorKind, Extents, FuaMode, Handle, Param,
    PluginSpec, Result, ZeroFlags, ZeroMode, EXTENT_HOLE, EXTENT_ZERO,
};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Reads zeroes, discards writes.
    Null,
    /// Reads zeroes, every write fails with ENOSPC.
    Full,
    /// Read-only; each aligned 8-byte word holds its own offset.
    Pattern,
    /// Reads a constant byte, discards writes.
    Ones(u8),
    /// nbdkit's `zero`: no bytes at all, read-only.
    Empty,
}

struct Simple {
    name: &'static str,
    kind: Kind,
    size: u64,
}

impl Backend for Simple {
    fn name(&self) -> &str {
        self.name
    }
    fn open(&self, _readonly: bool, _export: &str) -> Result<Box<dyn Handle>> {
        Ok(Box::new(SimpleHandle {
            kind: self.kind,
            size: self.size,
        }))
    }
}

struct SimpleHandle {
    kind: Kind,
    size: u64,
}

impl Handle for SimpleHandle {
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn can_write(&self) -> Result<bool> {
        Ok(!matches!(self.kind, Kind::Pattern | Kind::Empty))
    }
    nbdkit_backend::capabilities! {
        can_fast_zero: true, can_multi_conn: true, can_cache: CacheMode::Native, can_extents: true,
    }
    /// As nbdkit's: null and ones take flush and FUA (nothing to persist);
    /// full and pattern offer neither.
    fn can_flush(&self) -> Result<bool> {
        Ok(matches!(self.kind, Kind::Null | Kind::Ones(_)))
    }
    fn can_fua(&self) -> Result<FuaMode> {
        Ok(if self.can_flush()? {
            FuaMode::Native
        } else {
            FuaMode::None
        })
    }
    fn can_trim(&self) -> Result<bool> {
        self.can_write()
    }
    fn can_zero(&self) -> Result<ZeroMode> {
        Ok(if !self.can_write()? {
            ZeroMode::None
        } else {
            ZeroMode::Native
        })
    }

    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match self.kind {
            Kind::Null | Kind::Full | Kind::Empty => buf.fill(0),
            Kind::Ones(b) => buf.fill(b),
            Kind::Pattern => fill_pattern(buf, offset),
        }
        Ok(())
    }
    fn pwrite(&self, _buf: &[u8], _offset: u64, _fua: bool) -> Result<()> {
        self.write_like()
    }
    fn trim(&self, _offset: u64, _count: u64, _fua: bool) -> Result<()> {
        self.write_like()
    }
    fn zero(&self, _offset: u64, _count: u64, _flags: ZeroFlags) -> Result<()> {
        self.write_like()
    }
    fn cache(&self, _offset: u64, _count: u64) -> Result<()> {
        Ok(())
    }
    fn extents(
        &self,
        offset: u64,
        count: u64,
        _req_one: bool,
        extents: &mut Extents,
    ) -> Result<()> {
        let flags = match self.kind {
            Kind::Null | Kind::Full => EXTENT_HOLE | EXTENT_ZERO,
            _ => 0,
        };
        extents.add(offset, count, flags)
    }
}

impl SimpleHandle {
    fn write_like(&self) -> Result<()> {
        match self.kind {
            Kind::Full => Err(Error::new(
                ErrorKind::NoSpace,
                "the full plugin is always full",
            )),
            Kind::Pattern => Err(Error::read_only("the pattern plugin is read-only")),
            _ => Ok(()),
        }
    }
}

/// Write the big-endian offset of every 8-byte word, for any alignment.
fn fill_pattern(buf: &mut [u8], offset: u64) {
    let mut pos = offset;
    let mut i = 0;
    while i < buf.len() {
        let word = pos & !7;
        let bytes = word.to_be_bytes();
        let from = (pos - word) as usize;
        let n = (8 - from).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&bytes[from..from + n]);
        i += n;
        pos += n as u64;
    }
}

const SIZE_PARAM: Param = Param {
    name: "size",
    help: "virtual size, e.g. 1G (default 0)",
};

fn create(
    cfg: &mut Config,
    name: &'static str,
    kind: Kind,
) -> std::result::Result<Arc<dyn Backend>, ConfigError> {
    let size = cfg.take_size("size")?.unwrap_or(0);
    Ok(Arc::new(Simple { name, kind, size }))
}

pub static NULL: PluginSpec = PluginSpec {
    name: "null",
    summary: "an empty disk: reads zeroes, discards writes",
    description: "Example:\n  nbdkit-rs null 1G",
    magic_config_key: Some("size"),
    params: &[SIZE_PARAM],
    create: |c| create(c, "null", Kind::Null),
};

pub static ZERO: PluginSpec = PluginSpec {
    name: "zero",
    summary: "a disk of zero bytes, read-only (for testing corner cases)",
    description: "Takes no parameters, as nbdkit's zero plugin.\n\nExample:\n  nbdkit-rs zero",
    magic_config_key: None,
    params: &[],
    create: |_| {
        Ok(Arc::new(Simple {
            name: "zero",
            kind: Kind::Empty,
            size: 0,
        }))
    },
};

pub static FULL: PluginSpec = PluginSpec {
    name: "full",
    summary: "a full disk: reads zeroes, every write fails with ENOSPC",
    description: "Useful to test how clients handle a full disk.\n\nExample:\n  nbdkit-rs full 1G",
    magic_config_key: Some("size"),
    params: &[SIZE_PARAM],
    create: |c| create(c, "full", Kind::Full),
};

pub static PATTERN: PluginSpec = PluginSpec {
    name: "pattern",
    summary: "a read-only disk where each 8-byte word holds its offset (big-endian)",
    description:
        "Useful to check that clients read the right offsets.\n\nExample:\n  nbdkit-rs pattern 1G",
    magic_config_key: Some("size"),
    params: &[SIZE_PARAM],
    create: |c| create(c, "pattern", Kind::Pattern),
};

pub static ONES: PluginSpec = PluginSpec {
    name: "ones",
    summary: "a disk of 0xff bytes (or byte=N); writes are discarded",
    description: "Example:\n  nbdkit-rs ones 1G byte=0x55",
    magic_config_key: Some("size"),
    params: &[
        SIZE_PARAM,
        Param {
            name: "byte",
            help: "the byte value, decimal or 0x hex (default 0xff)",
        },
    ],
    create: |c| {
        let byte = match c.take("byte") {
            None => 0xff,
            Some(v) => {
                let parsed = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
                    Some(h) => u8::from_str_radix(h, 16),
                    None => v.parse::<u8>(),
                };
                parsed.map_err(|_| {
                    ConfigError::new(format!("byte={v}: expected 0..255 or 0x00..0xff"))
                })?
            }
        };
        create(c, "ones", Kind::Ones(byte))
    },
};

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn pattern_at_any_alignment(offset in 0u64..1 << 40, len in 0usize..100) {
            let mut buf = vec![0u8; len];
            fill_pattern(&mut buf, offset);
            for (i, b) in buf.iter().enumerate() {
                let pos = offset + i as u64;
                prop_assert_eq!(*b, (pos & !7).to_be_bytes()[(pos & 7) as usize]);
            }
        }
    }
}
