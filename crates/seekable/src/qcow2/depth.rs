//! How deep in its backing chain each range of a qcow2 image is
//! allocated: the answer qemu-nbd gives for the `qemu:allocation-depth`
//! metadata context (`qemu-nbd -A`), which the `qcow2dec` filter serves.
//!
//! 1 is a cluster (or subcluster) this image has, data or zero; n + 1 is
//! one that its n-th backing image has; 0 is one no image in the chain
//! has.  A raw backing file has every byte it covers.  And where a backing
//! image is shorter than the image above it, the zeroes read past its end
//! count as that backing image's own, as qemu counts them (checked with
//! `nbdinfo --map=qemu:allocation-depth` against `qemu-nbd -A`); that rule
//! is why this walk is not [`Qcow2Reader::map`], which calls them
//! unallocated.

use super::{BackingImage, Place, Qcow2Reader};
use crate::Result;

impl Qcow2Reader {
    /// `(length, depth)` runs covering `[offset, offset+len)`, clipped to
    /// the virtual size; neighbouring runs differ in depth.
    pub fn allocation_depth(&self, offset: u64, len: u64) -> Result<Vec<(u64, u32)>> {
        let mut out = Vec::new();
        self.depth_runs(offset, len, 1, &mut out)?;
        Ok(out)
    }

    /// [`Qcow2Reader::allocation_depth`] for an image at `depth` of the
    /// chain, appending to `out`.
    fn depth_runs(
        &self,
        offset: u64,
        len: u64,
        depth: u32,
        out: &mut Vec<(u64, u32)>,
    ) -> Result<()> {
        let end = offset.saturating_add(len).min(self.size);
        let mut at = offset;
        while at < end {
            let (place, run) = self.place(at)?;
            let n = run.min(end - at);
            match (place, &self.backing) {
                (Place::Unallocated, None) => push(out, n, 0),
                (Place::Unallocated, Some(BackingImage::Raw { .. })) => push(out, n, depth + 1),
                (Place::Unallocated, Some(BackingImage::Qcow2(q))) => {
                    let inside = q.size.saturating_sub(at).min(n);
                    if inside > 0 {
                        q.depth_runs(at, inside, depth + 1, out)?;
                    }
                    push(out, n - inside, depth + 1);
                }
                _ => push(out, n, depth),
            }
            at += n;
        }
        Ok(())
    }
}

/// Append a run, merged with the last when the depth is the same.
fn push(out: &mut Vec<(u64, u32)>, length: u64, depth: u32) {
    if length == 0 {
        return;
    }
    match out.last_mut() {
        Some(last) if last.1 == depth => last.0 += length,
        _ => out.push((length, depth)),
    }
}
