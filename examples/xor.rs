//! A plugin and a filter in one program.  The `xor` filter flips bits of
//! every byte read or written through it with a key, over any plugin; it
//! overrides only pread and pwrite and inherits everything else (size,
//! capabilities, block status) from the next backend.
//!
//!     cargo run --example xor -- -f -U /tmp/x.sock --filter=xor pattern size=1M key=0xff

use std::sync::Arc;

use nbdkit_backend::{Backend, ConfigError, FilterSpec, Handle, Layer, Param, Result};

struct XorLayer {
    key: u8,
}

impl Layer for XorLayer {
    fn layer(
        self: Box<Self>,
        next: Arc<dyn Backend>,
    ) -> std::result::Result<Arc<dyn Backend>, ConfigError> {
        Ok(Arc::new(Xor {
            next,
            key: self.key,
        }))
    }
}

struct Xor {
    next: Arc<dyn Backend>,
    key: u8,
}

impl Backend for Xor {
    fn name(&self) -> &str {
        "xor"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        Ok(Box::new(XorHandle {
            next: self.next.open(readonly, export)?,
            key: self.key,
        }))
    }
}

struct XorHandle {
    next: Box<dyn Handle>,
    key: u8,
}

impl Handle for XorHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.next.pread(buf, offset)?;
        buf.iter_mut().for_each(|b| *b ^= self.key);
        Ok(())
    }
    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        let flipped: Vec<u8> = buf.iter().map(|b| b ^ self.key).collect();
        self.next.pwrite(&flipped, offset, fua)
    }
    // Zeroes written below would read back as `key` bytes through us, so
    // zero requests become ordinary writes of flipped zeroes.
    fn can_zero(&self) -> Result<nbdkit_backend::ZeroMode> {
        Ok(if self.can_write()? {
            nbdkit_backend::ZeroMode::Emulate
        } else {
            nbdkit_backend::ZeroMode::None
        })
    }
    fn zero(&self, offset: u64, count: u64, flags: nbdkit_backend::ZeroFlags) -> Result<()> {
        nbdkit_backend::write_zeroes(self, offset, count, flags)
    }
    fn can_trim(&self) -> Result<bool> {
        Ok(false)
    }
    fn can_extents(&self) -> Result<bool> {
        Ok(false) // A hole below is not zero above.
    }
}

static XOR: FilterSpec = FilterSpec {
    name: "xor",
    summary: "XOR every byte with a key",
    description: "Example:\n  --filter=xor pattern size=1M key=0xff",
    params: &[Param {
        name: "key",
        help: "the byte to XOR with, 0..255 (default 0xff)",
    }],
    configure: |cfg| {
        let key = match cfg.take("key") {
            None => 0xff,
            Some(v) => {
                let r = match v.strip_prefix("0x") {
                    Some(h) => u8::from_str_radix(h, 16),
                    None => v.parse(),
                };
                r.map_err(|_| ConfigError::new(format!("xor: key={v}: expected 0..255")))?
            }
        };
        Ok(Box::new(XorLayer { key }))
    },
};

fn main() -> std::process::ExitCode {
    nbdkit_rs::main_with(&[], &[&XOR])
}
