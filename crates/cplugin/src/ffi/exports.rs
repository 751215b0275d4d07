//! `struct nbdkit_exports`: the list a plugin's list_exports callback fills.

use super::*;

pub(super) const MAX_STRING: usize = 4096;
pub(super) const MAX_EXPORTS: usize = 10_000;

#[derive(Debug, Clone)]
pub(crate) enum ExportItem {
    Named {
        name: String,
        description: Option<String>,
    },
    Default,
}

/// `struct nbdkit_exports`: opaque to plugins.  `cstrings` keeps the C
/// copies nbdkit_get_export hands out.
#[derive(Default)]
pub struct NbdkitExports {
    pub(super) items: Vec<ExportItem>,
    cstrings: Vec<(CString, Option<CString>)>,
}

/// `struct nbdkit_export` (nbdkit-filter.h).
#[repr(C)]
pub struct NbdkitExport {
    pub name: *mut c_char,
    pub description: *mut c_char,
}

pub(super) fn push_export(e: &mut NbdkitExports, item: ExportItem) -> c_int {
    if e.items.len() >= MAX_EXPORTS {
        fail(
            libc::E2BIG,
            format!("nbdkit_add_export: too many exports (at most {MAX_EXPORTS})"),
        );
        return -1;
    }
    let (n, d) = match &item {
        ExportItem::Named { name, description } => (name.clone(), description.clone()),
        ExportItem::Default => (String::new(), None),
    };
    e.cstrings.push((
        CString::new(n).unwrap_or_default(),
        d.map(|d| CString::new(d).unwrap_or_default()),
    ));
    e.items.push(item);
    0
}

#[no_mangle]
pub unsafe extern "C" fn nbdkit_add_export(
    e: *mut NbdkitExports,
    name: *const c_char,
    description: *const c_char,
) -> c_int {
    // SAFETY: the plugin passes the list it was given (or NULL).
    let Some(e) = (unsafe { e.as_mut() }) else {
        fail(libc::EINVAL, "nbdkit_add_export: NULL exports list".into());
        return -1;
    };
    let utf8 = |p: *const c_char| -> Result<Option<String>, ()> {
        if p.is_null() {
            return Ok(None);
        }
        // SAFETY: NUL-terminated string from the plugin.
        let b = unsafe { CStr::from_ptr(p) }.to_bytes();
        if b.len() > MAX_STRING {
            return Err(());
        }
        String::from_utf8(b.to_vec()).map(Some).map_err(|_| ())
    };
    let (Ok(Some(name)), Ok(description)) = (utf8(name), utf8(description)) else {
        fail(libc::EINVAL, format!("nbdkit_add_export: the name and description must be UTF-8 of at most {MAX_STRING} bytes"));
        return -1;
    };
    push_export(e, ExportItem::Named { name, description })
}

#[no_mangle]
pub unsafe extern "C" fn nbdkit_use_default_export(e: *mut NbdkitExports) -> c_int {
    // SAFETY: the plugin passes the list it was given (or NULL).
    let Some(e) = (unsafe { e.as_mut() }) else {
        fail(
            libc::EINVAL,
            "nbdkit_use_default_export: NULL exports list".into(),
        );
        return -1;
    };
    push_export(e, ExportItem::Default)
}

#[no_mangle]
pub extern "C" fn nbdkit_exports_new() -> *mut NbdkitExports {
    Box::into_raw(Box::default())
}

#[no_mangle]
pub unsafe extern "C" fn nbdkit_exports_free(e: *mut NbdkitExports) {
    if !e.is_null() {
        // SAFETY: lists from nbdkit_exports_new are Boxes, freed once.
        drop(unsafe { Box::from_raw(e) });
    }
}

#[no_mangle]
pub unsafe extern "C" fn nbdkit_exports_count(e: *const NbdkitExports) -> usize {
    // SAFETY: a list from nbdkit (or NULL).
    unsafe { e.as_ref() }.map_or(0, |e| e.items.len())
}

#[no_mangle]
pub unsafe extern "C" fn nbdkit_get_export(e: *const NbdkitExports, i: usize) -> NbdkitExport {
    // SAFETY: a list from nbdkit (or NULL).
    match unsafe { e.as_ref() }.and_then(|e| e.cstrings.get(i)) {
        Some((n, d)) => NbdkitExport {
            name: n.as_ptr() as *mut c_char,
            description: d
                .as_ref()
                .map_or(std::ptr::null_mut(), |d| d.as_ptr() as *mut c_char),
        },
        None => {
            fail(
                libc::ERANGE,
                format!("nbdkit_get_export: no export number {i}"),
            );
            NbdkitExport {
                name: std::ptr::null_mut(),
                description: std::ptr::null_mut(),
            }
        }
    }
}
