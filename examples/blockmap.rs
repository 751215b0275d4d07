//! A writable plugin: a sparse disk kept in a map of 4 KiB blocks, shared
//! by all connections.  It shows which defaults a writable plugin gets for
//! free: zero is emulated with pwrite, FUA with flush, cache with pread.
//!
//!     cargo run --example blockmap -- -f -U /tmp/b.sock blockmap size=64M
//!     qemu-io -f raw -c 'write -P 1 0 1M' 'nbd+unix:///?socket=/tmp/b.sock'

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use nbdkit_backend::{Backend, ConfigError, Handle, Param, PluginSpec, Result};

const BLOCK: u64 = 4096;

type Blocks = Arc<Mutex<HashMap<u64, Box<[u8; BLOCK as usize]>>>>;

struct BlockMap {
    size: u64,
    blocks: Blocks,
}

impl Backend for BlockMap {
    fn name(&self) -> &str {
        "blockmap"
    }
    fn open(&self, _readonly: bool, _export: &str) -> Result<Box<dyn Handle>> {
        Ok(Box::new(BlockMapHandle {
            size: self.size,
            blocks: self.blocks.clone(),
        }))
    }
}

struct BlockMapHandle {
    size: u64,
    blocks: Blocks,
}

impl Handle for BlockMapHandle {
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }
    nbdkit_backend::capabilities! {
        can_write: true,
        // Nothing to persist, but this lets clients use FUA.
        can_flush: true,
        // One map for every connection.
        can_multi_conn: true,
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let blocks = self.blocks.lock().unwrap();
        for (i, b) in buf.iter_mut().enumerate() {
            let pos = offset + i as u64;
            *b = blocks
                .get(&(pos / BLOCK))
                .map_or(0, |blk| blk[(pos % BLOCK) as usize]);
        }
        Ok(())
    }
    fn pwrite(&self, buf: &[u8], offset: u64, _fua: bool) -> Result<()> {
        let mut blocks = self.blocks.lock().unwrap();
        for (i, b) in buf.iter().enumerate() {
            let pos = offset + i as u64;
            let blk = blocks
                .entry(pos / BLOCK)
                .or_insert_with(|| Box::new([0; BLOCK as usize]));
            blk[(pos % BLOCK) as usize] = *b;
        }
        Ok(())
    }
}

static BLOCKMAP: PluginSpec = PluginSpec {
    name: "blockmap",
    summary: "a writable sparse disk in a map of 4 KiB blocks",
    description: "Example:\n  blockmap size=64M",
    magic_config_key: Some("size"),
    params: &[Param {
        name: "size",
        help: "virtual size (required)",
    }],
    create: |cfg| {
        let size = cfg
            .take_size("size")?
            .ok_or_else(|| ConfigError::new("blockmap: size= is required"))?;
        Ok(Arc::new(BlockMap {
            size,
            blocks: Default::default(),
        }))
    },
};

fn main() -> std::process::ExitCode {
    nbdkit_rs::main_with(&[&BLOCKMAP], &[])
}
