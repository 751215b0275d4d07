//! The list a backend fills in for a block status request, for either of
//! the two answers a handle gives: allocation (`base:allocation`) and
//! allocation depth (`qemu:allocation-depth`).

use crate::{Error, Handle, Result};

/// The range is not allocated (reads may still return data; see ZERO).
pub const EXTENT_HOLE: u32 = 1;
/// The range reads as zeroes.
pub const EXTENT_ZERO: u32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    /// `EXTENT_HOLE | EXTENT_ZERO` bits (the `base:allocation` flags), or
    /// for [`Handle::allocation_depth`] the depth.
    pub flags: u32,
}

/// Which block status answer is asked of a handle.  Filters that move
/// offsets (`offset`, `partition`, `map`, ...) move both answers alike, so
/// they take one of these instead of writing the same remapping twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusKind {
    /// [`Handle::extents`]: hole and zero flags.
    Allocation,
    /// [`Handle::allocation_depth`]: 0 (allocated nowhere), 1 (this
    /// image), 2 and up (a backing image).
    Depth,
}

impl StatusKind {
    /// Ask `h` for this answer about `[offset, offset+count)`.
    pub fn query<H: Handle + ?Sized>(
        self,
        h: &H,
        offset: u64,
        count: u64,
        req_one: bool,
        out: &mut Extents,
    ) -> Result<()> {
        match self {
            StatusKind::Allocation => h.extents(offset, count, req_one, out),
            StatusKind::Depth => h.allocation_depth(offset, count, req_one, out),
        }
    }
}

/// Extents collected for the range `[start, end)`.
///
/// Backends add extents in ascending, contiguous order.  Parts before
/// `start` or after `end` are clipped away, and neighbours with the same
/// flags are merged, so backends may report at whatever granularity is
/// natural to them.
#[derive(Debug, Clone)]
pub struct Extents {
    start: u64,
    end: u64,
    list: Vec<Extent>,
    /// End of the last extent the backend reported, before clipping.
    reported: Option<u64>,
}

impl Extents {
    pub fn new(start: u64, end: u64) -> Self {
        Extents {
            start,
            end: end.max(start),
            list: Vec::new(),
            reported: None,
        }
    }

    pub fn start(&self) -> u64 {
        self.start
    }
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Where the next extent must begin.
    pub fn next_offset(&self) -> u64 {
        self.list.last().map_or(self.start, |e| e.offset + e.length)
    }

    /// True once the whole range is covered.
    pub fn is_full(&self) -> bool {
        self.next_offset() >= self.end
    }

    /// Add `[offset, offset+length)` with `flags`.  The first extent may
    /// begin at or before `start`; later ones must follow on without a gap.
    pub fn add(&mut self, offset: u64, length: u64, flags: u32) -> Result<()> {
        if length == 0 {
            return Ok(());
        }
        let end = offset
            .checked_add(length)
            .ok_or_else(|| Error::invalid("extent overflows"))?;
        match self.reported {
            None if offset > self.start => {
                return Err(Error::invalid(format!(
                    "first extent starts at {offset}, after the requested offset {}",
                    self.start
                )))
            }
            Some(r) if offset != r => {
                return Err(Error::invalid(format!(
                    "extents are not contiguous: expected offset {r}, got {offset}"
                )))
            }
            _ => {}
        }
        self.reported = Some(end);
        let next = self.next_offset();
        // Clip to [next, self.end).
        let from = offset.max(next);
        let to = end.min(self.end);
        if to <= from {
            return Ok(());
        }
        match self.list.last_mut() {
            Some(last) if last.flags == flags => last.length += to - from,
            _ => self.list.push(Extent {
                offset: from,
                length: to - from,
                flags,
            }),
        }
        Ok(())
    }

    pub fn list(&self) -> &[Extent] {
        &self.list
    }

    pub fn into_vec(self) -> Vec<Extent> {
        self.list
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever contiguous runs a backend reports, the result covers
        /// exactly [start, min(end, reported end)) with no gaps, and
        /// neighbours differ in flags.
        #[test]
        fn contiguous_clipped_merged(start in 0u64..1000, len in 1u64..1000, before in 0u64..100,
                                     runs in proptest::collection::vec((1u64..300, 0u32..4), 1..20)) {
            let mut e = Extents::new(start, start + len);
            let mut at = start.saturating_sub(before);
            for (l, f) in &runs {
                e.add(at, *l, *f).unwrap();
                at += l;
            }
            let list = e.list();
            prop_assert!(!list.is_empty() || at <= start);
            let mut pos = start;
            for (i, x) in list.iter().enumerate() {
                prop_assert_eq!(x.offset, pos);
                prop_assert!(x.length > 0);
                if i > 0 { prop_assert_ne!(list[i - 1].flags, x.flags); }
                pos += x.length;
            }
            prop_assert_eq!(pos, (start + len).min(at.max(start)));
        }
    }

    #[test]
    fn gaps_are_errors() {
        let mut e = Extents::new(10, 100);
        assert!(e.add(11, 5, 0).is_err());
        e.add(0, 20, 0).unwrap();
        assert!(e.add(21, 5, 0).is_err());
        e.add(20, 200, 3).unwrap();
        assert!(e.is_full());
        assert_eq!(
            e.list(),
            &[
                Extent {
                    offset: 10,
                    length: 10,
                    flags: 0
                },
                Extent {
                    offset: 20,
                    length: 80,
                    flags: 3
                }
            ]
        );
    }
}
