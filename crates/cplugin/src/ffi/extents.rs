//! `struct nbdkit_extents`: the list a plugin's extents callback fills.

use super::*;

pub struct NbdkitExtents(pub(super) Extents);

/// `struct nbdkit_extent` (nbdkit-filter.h).
#[repr(C)]
pub struct NbdkitExtent {
    pub offset: u64,
    pub length: u64,
    pub type_: u32,
}

#[no_mangle]
pub unsafe extern "C" fn nbdkit_add_extent(
    e: *mut NbdkitExtents,
    offset: u64,
    length: u64,
    type_: u32,
) -> c_int {
    // SAFETY: the plugin passes the list it was given (or made with
    // nbdkit_extents_new); NULL is refused.
    let Some(e) = (unsafe { e.as_mut() }) else {
        fail(libc::EINVAL, "nbdkit_add_extent: NULL extents list".into());
        return -1;
    };
    match e.0.add(offset, length, type_ & 3) {
        Ok(()) => 0,
        Err(err) => {
            fail(libc::EINVAL, format!("nbdkit_add_extent: {err}"));
            -1
        }
    }
}

#[no_mangle]
pub extern "C" fn nbdkit_extents_new(start: u64, end: u64) -> *mut NbdkitExtents {
    if start > end || end > i64::MAX as u64 {
        fail(
            libc::ERANGE,
            format!("nbdkit_extents_new: bad range {start}..{end}"),
        );
        return std::ptr::null_mut();
    }
    Box::into_raw(Box::new(NbdkitExtents(Extents::new(start, end))))
}

#[no_mangle]
pub unsafe extern "C" fn nbdkit_extents_free(e: *mut NbdkitExtents) {
    if !e.is_null() {
        // SAFETY: lists handed out by nbdkit_extents_new are Boxes; the
        // plugin frees each once (the API's contract).
        drop(unsafe { Box::from_raw(e) });
    }
}

#[no_mangle]
pub unsafe extern "C" fn nbdkit_extents_count(e: *const NbdkitExtents) -> usize {
    // SAFETY: a list from nbdkit (or NULL).
    unsafe { e.as_ref() }.map_or(0, |e| e.0.list().len())
}

#[no_mangle]
pub unsafe extern "C" fn nbdkit_get_extent(e: *const NbdkitExtents, i: usize) -> NbdkitExtent {
    // SAFETY: a list from nbdkit (or NULL).
    match unsafe { e.as_ref() }.and_then(|e| e.0.list().get(i)) {
        Some(x) => NbdkitExtent {
            offset: x.offset,
            length: x.length,
            type_: x.flags,
        },
        None => {
            fail(
                libc::ERANGE,
                format!("nbdkit_get_extent: no extent number {i}"),
            );
            NbdkitExtent {
                offset: 0,
                length: 0,
                type_: 0,
            }
        }
    }
}
