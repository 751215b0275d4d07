//! A plugin computed from the offset: every 512-byte sector holds the text
//! "sector N" and is otherwise zero, so any read is easy to check by eye
//! (`nbdcopy "$uri" - | strings | head`).  It reports the zero tail of each
//! sector through block status, showing how a plugin describes extents.
//!
//!     cargo run --example sectors -- -f -U /tmp/s.sock sectors size=1M
//!     nbdinfo --map 'nbd+unix:///?socket=/tmp/s.sock'

use std::sync::Arc;

use nbdkit_backend::{
    Backend, ConfigError, Extents, Handle, Param, PluginSpec, Result, EXTENT_ZERO,
};

const SECTOR: u64 = 512;
/// Every label fits in the first 32 bytes of its sector.
const LABEL: u64 = 32;

struct Sectors {
    size: u64,
}

impl Backend for Sectors {
    fn name(&self) -> &str {
        "sectors"
    }
    fn open(&self, _readonly: bool, _export: &str) -> Result<Box<dyn Handle>> {
        Ok(Box::new(SectorsHandle { size: self.size }))
    }
}

struct SectorsHandle {
    size: u64,
}

fn sector_bytes(n: u64) -> [u8; SECTOR as usize] {
    let mut s = [0u8; SECTOR as usize];
    let label = format!("sector {n}\n");
    s[..label.len()].copy_from_slice(label.as_bytes());
    s
}

impl Handle for SectorsHandle {
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        for (i, b) in buf.iter_mut().enumerate() {
            let pos = offset + i as u64;
            *b = sector_bytes(pos / SECTOR)[(pos % SECTOR) as usize];
        }
        Ok(())
    }
    fn can_extents(&self) -> Result<bool> {
        Ok(true)
    }
    fn extents(
        &self,
        offset: u64,
        count: u64,
        _req_one: bool,
        extents: &mut Extents,
    ) -> Result<()> {
        // Data for each label, zero (but allocated) for the rest.
        let mut sector = offset / SECTOR;
        while sector * SECTOR < offset + count {
            extents.add(sector * SECTOR, LABEL, 0)?;
            extents.add(sector * SECTOR + LABEL, SECTOR - LABEL, EXTENT_ZERO)?;
            sector += 1;
            if extents.list().len() >= 1024 {
                break; // Enough for one reply; the client asks again.
            }
        }
        Ok(())
    }
}

static SECTORS: PluginSpec = PluginSpec {
    name: "sectors",
    summary: "a read-only disk whose sectors say their own number",
    description: "Example:\n  sectors size=1M",
    magic_config_key: Some("size"),
    params: &[Param {
        name: "size",
        help: "virtual size, a multiple of 512 (required)",
    }],
    create: |cfg| {
        let size = cfg
            .take_size("size")?
            .ok_or_else(|| ConfigError::new("sectors: size= is required"))?;
        if size % SECTOR != 0 {
            return Err(ConfigError::new(format!(
                "sectors: size={size} is not a multiple of 512"
            )));
        }
        Ok(Arc::new(Sectors { size }))
    },
};

fn main() -> std::process::ExitCode {
    nbdkit_rs::main_with(&[&SECTORS], &[])
}
