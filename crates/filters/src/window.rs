//! A handle that serves the byte range `[start, start+len)` of the next
//! handle as a whole disk.  Shared by `offset` and `partition`, which differ
//! only in how they find the range.

use nbdkit_backend::{DirectRead, Error, Extents, Handle, Result, ZeroFlags};

pub(crate) struct Window {
    pub next: Box<dyn Handle>,
    pub start: u64,
    pub len: u64,
}

impl Window {
    /// Translate a request in our coordinates to the next handle's.  The
    /// server has already checked it against our size, so this only fails
    /// on a bug; it is still checked because a wrong offset here would
    /// touch bytes outside the window.
    fn map(&self, offset: u64, count: u64) -> Result<u64> {
        match offset.checked_add(count) {
            Some(end) if end <= self.len => Ok(self.start + offset),
            _ => Err(Error::overflow(format!(
                "request at {offset} for {count} bytes is outside the {} byte window",
                self.len
            ))),
        }
    }
}

/// Ask `next` for extents at `offset + shift` and report them shifted back
/// down by `shift` into `out` (whose range is `[offset, offset+count)`).
/// Returns whether `next` answered for the whole range: a backend may
/// answer for less, and then the client asks again for the rest, so a
/// caller filling `out` piece by piece must stop there.
pub(crate) fn shifted_extents(
    next: &dyn Handle,
    shift: u64,
    offset: u64,
    count: u64,
    req_one: bool,
    out: &mut Extents,
) -> Result<bool> {
    let mut inner = Extents::new(offset + shift, offset + shift + count);
    next.extents(offset + shift, count, req_one, &mut inner)?;
    // `inner` is clipped to the range asked for, so no extent starts
    // below `shift`.
    for e in inner.list() {
        out.add(e.offset - shift, e.length, e.flags)?;
    }
    Ok(inner.is_full())
}

/// [`shifted_extents`] without a shift: `next`'s extents of `[from, to)`
/// appended to `out`; true if `next` answered for all of it.
pub(crate) fn next_extents(
    next: &dyn Handle,
    from: u64,
    to: u64,
    req_one: bool,
    out: &mut Extents,
) -> Result<bool> {
    shifted_extents(next, 0, from, to - from, req_one, out)
}

impl Handle for Window {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn size(&self) -> Result<u64> {
        Ok(self.len)
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let at = self.map(offset, buf.len() as u64)?;
        self.next.pread(buf, at)
    }
    /// The window moves reads but does not change their bytes, so a direct
    /// read of the next handle (whose pieces name file offsets) is ours.
    fn pread_direct(&self, offset: u64, count: u64) -> Result<Option<DirectRead<'_>>> {
        let at = self.map(offset, count)?;
        self.next.pread_direct(at, count)
    }
    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        let at = self.map(offset, buf.len() as u64)?;
        self.next.pwrite(buf, at, fua)
    }
    fn trim(&self, offset: u64, count: u64, fua: bool) -> Result<()> {
        let at = self.map(offset, count)?;
        self.next.trim(at, count, fua)
    }
    fn zero(&self, offset: u64, count: u64, flags: ZeroFlags) -> Result<()> {
        let at = self.map(offset, count)?;
        self.next.zero(at, count, flags)
    }
    fn cache(&self, offset: u64, count: u64) -> Result<()> {
        let at = self.map(offset, count)?;
        self.next.cache(at, count)
    }
    fn extents(&self, offset: u64, count: u64, req_one: bool, extents: &mut Extents) -> Result<()> {
        self.map(offset, count)?;
        shifted_extents(&*self.next, self.start, offset, count, req_one, extents).map(drop)
    }
}
