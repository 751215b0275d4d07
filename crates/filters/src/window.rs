//! A handle that serves the byte range `[start, start+len)` of the next
//! handle as a whole disk.  Shared by `offset` and `partition`, which differ
//! only in how they find the range.

use nbdkit_backend::{DirectRead, Error, Extent, Extents, Handle, Result, StatusKind, ZeroFlags};

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

    /// Either block status answer: `next`'s, moved down by the window's start.
    fn status(
        &self,
        kind: StatusKind,
        offset: u64,
        count: u64,
        req_one: bool,
        out: &mut Extents,
    ) -> Result<()> {
        self.map(offset, count)?;
        shifted_status(kind, &*self.next, self.start, offset, count, req_one, out).map(drop)
    }
}

/// Ask `next` for either block status answer (`kind`) at `offset + shift`
/// and report it shifted back down by `shift` into `out` (whose range is
/// `[offset, offset+count)`): the allocation depth moves with the bytes
/// just as their allocation does.  Returns whether `next` answered for the
/// whole range: a backend may answer for less, and then the client asks
/// again for the rest, so a caller filling `out` piece by piece must stop
/// there.
pub(crate) fn shifted_status(
    kind: StatusKind,
    next: &dyn Handle,
    shift: u64,
    offset: u64,
    count: u64,
    req_one: bool,
    out: &mut Extents,
) -> Result<bool> {
    let mut inner = Extents::new(offset + shift, offset + shift + count);
    kind.query(next, offset + shift, count, req_one, &mut inner)?;
    // `inner` is clipped to the range asked for, so no extent starts
    // below `shift`.
    for e in inner.list() {
        out.add(e.offset - shift, e.length, e.flags)?;
    }
    Ok(inner.is_full())
}

/// [`shifted_status`] of the allocation without a shift: `next`'s extents
/// of `[from, to)` appended to `out`; true if `next` answered for all of it.
pub(crate) fn next_extents(
    next: &dyn Handle,
    from: u64,
    to: u64,
    req_one: bool,
    out: &mut Extents,
) -> Result<bool> {
    shifted_status(
        StatusKind::Allocation,
        next,
        0,
        from,
        to - from,
        req_one,
        out,
    )
}

/// The extents of `[offset, offset+count)` (both multiples of `align`)
/// with every extent a whole number of blocks, as nbdkit's
/// `nbdkit_extents_aligned` makes them: an extent that ends inside a block
/// after the first one is cut back to the block boundary (and the list
/// ends there); a first extent shorter than a block is merged with the
/// extents after it, asking `next` again if needed, into one block whose
/// flags are those all its pieces share (zero only if all read as zero,
/// a hole only if all are holes).
pub(crate) fn aligned_extents(
    next: &dyn Handle,
    offset: u64,
    count: u64,
    req_one: bool,
    align: u64,
) -> Result<Vec<Extent>> {
    let mut ex = Extents::new(offset, offset + count);
    next.extents(offset, count, req_one, &mut ex)?;
    let mut list = ex.into_vec();
    let Some(i) = list.iter().position(|e| !e.length.is_multiple_of(align)) else {
        return Ok(list);
    };
    let e = list[i];
    if e.offset + e.length > offset + align {
        let length = e.length - e.length % align;
        list.truncate(i);
        if length > 0 {
            list.push(Extent { length, ..e });
        }
        return Ok(list);
    }
    // Only the first extent can end inside the first block.
    let mut first = list.remove(0);
    let mut rest = list.into_iter();
    while first.length < align {
        if let Some(e) = rest.next() {
            first.length += e.length;
            first.flags &= e.flags;
            continue;
        }
        let at = first.offset + first.length;
        let mut more = Extents::new(at, offset + align);
        next.extents(at, offset + align - at, false, &mut more)?;
        let got = more.into_vec();
        if got.is_empty() {
            return Err(Error::io(format!("the plugin returned no extents at {at}")));
        }
        rest = got.into_iter();
    }
    first.length = align;
    Ok(vec![first])
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
    status_by_kind!();
}
