//! `checkwrite`: turn every write-like request into a check that the
//! plugin already holds those bytes.  The plugin is opened read-only and
//! never written; a write whose data differs from it fails with EIO.  Trim
//! and zero check that the range reads as zeroes (sparseness is ignored),
//! so `nbdcopy "$uri" "$uri"` tests a copying tool.

use std::sync::Arc;

use nbdkit_backend::{
    layer_fn, Backend, Error, Extents, FilterSpec, FuaMode, Handle, Result, ZeroFlags, ZeroMode,
    EXTENT_ZERO,
};

/// Largest buffer read at once while checking.
const CHUNK: u64 = 1 << 20;

struct CheckWrite {
    next: Arc<dyn Backend>,
}

impl Backend for CheckWrite {
    fn name(&self) -> &str {
        "checkwrite"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, _readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        Ok(Box::new(CheckWriteHandle {
            next: self.next.open(true, export)?,
        }))
    }
}

struct CheckWriteHandle {
    next: Box<dyn Handle>,
}

fn mismatch(offset: u64) -> Error {
    Error::io(format!(
        "checkwrite: data written does not match expected data at offset {offset}"
    ))
}

impl CheckWriteHandle {
    /// Check that `[offset, offset+count)` reads as zeroes, skipping the
    /// ranges the plugin reports as zero.
    fn check_zero(&self, offset: u64, count: u64) -> Result<()> {
        let end = offset
            .checked_add(count)
            .ok_or_else(|| Error::overflow("checkwrite: range overflows"))?;
        if !self.next.can_extents()? {
            return self.read_zero(offset, end);
        }
        let mut pos = offset;
        while pos < end {
            let mut ex = Extents::new(pos, end);
            self.next.extents(pos, end - pos, false, &mut ex)?;
            if ex.list().is_empty() {
                return Err(Error::io("checkwrite: the plugin returned no extents"));
            }
            for e in ex.list() {
                if e.flags & EXTENT_ZERO == 0 {
                    self.read_zero(e.offset, e.offset + e.length)?;
                }
                pos = e.offset + e.length;
            }
        }
        Ok(())
    }

    fn read_zero(&self, mut pos: u64, end: u64) -> Result<()> {
        let mut buf = vec![0u8; (end - pos).min(CHUNK) as usize];
        while pos < end {
            let n = (end - pos).min(CHUNK) as usize;
            self.next.pread(&mut buf[..n], pos)?;
            if let Some(i) = buf[..n].iter().position(|&b| b != 0) {
                return Err(mismatch(pos + i as u64));
            }
            pos += n as u64;
        }
        Ok(())
    }
}

impl Handle for CheckWriteHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    nbdkit_backend::capabilities! {
        can_write: true, can_flush: true, can_fua: FuaMode::Native, can_trim: true,
        can_zero: ZeroMode::Native, can_fast_zero: true,
        // Nothing ever changes, so every connection sees the same data.
        can_multi_conn: true,
    }
    fn pwrite(&self, buf: &[u8], offset: u64, _fua: bool) -> Result<()> {
        let mut have = vec![0u8; buf.len()];
        self.next.pread(&mut have, offset)?;
        match have.iter().zip(buf).position(|(a, b)| a != b) {
            Some(i) => Err(mismatch(offset + i as u64)),
            None => Ok(()),
        }
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn trim(&self, offset: u64, count: u64, _fua: bool) -> Result<()> {
        self.check_zero(offset, count)
    }
    fn zero(&self, offset: u64, count: u64, _flags: ZeroFlags) -> Result<()> {
        self.check_zero(offset, count)
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "checkwrite",
    summary: "check that writes match the plugin's data instead of writing",
    description: "The plugin is opened read-only.  A write succeeds (doing nothing) when\n\
its data equals what the plugin holds there, else it fails with EIO; trim\n\
and zero check that the range reads as zeroes.  Use it to test copying\n\
tools by copying an export onto itself.\n\n\
Example:\n  nbdkit-rs -U - --filter=checkwrite data \"@32768 1\" --run 'nbdcopy \"$uri\" \"$uri\"'",
    params: &[],
    configure: |_| Ok(layer_fn(|next| Ok(Arc::new(CheckWrite { next })))),
};
