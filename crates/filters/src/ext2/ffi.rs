//! The Rust side of shim.c: its functions, and the callbacks through which
//! libext2fs reaches the filter's next layer.  Every raw pointer stays in
//! here; mod.rs sees a safe [`Ext2File`].

use std::ffi::{c_char, c_int, c_long, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use nbdkit_backend::{Error, ErrorKind, Handle, LockExt};

/// `struct ext2shim_io` in shim.c.
#[repr(C)]
struct ShimIo {
    // A `*const Next`, opaque to C.
    ctx: *const c_void,
    pread: extern "C" fn(*const c_void, *mut c_void, usize, u64) -> c_int,
    pwrite: extern "C" fn(*const c_void, *const c_void, usize, u64) -> c_int,
    flush: extern "C" fn(*const c_void) -> c_int,
}

/// Opaque `struct ext2shim`.
#[repr(C)]
struct Shim {
    _private: [u8; 0],
}

extern "C" {
    fn ext2shim_open(
        io: *const ShimIo,
        writable: c_int,
        path: *const c_char,
        out: *mut *mut Shim,
        why: *mut c_char,
        whylen: usize,
    ) -> c_long;
    fn ext2shim_size(shim: *mut Shim, size: *mut u64) -> c_long;
    fn ext2shim_pread(shim: *mut Shim, buf: *mut c_void, count: usize, offset: u64) -> c_long;
    fn ext2shim_pwrite(shim: *mut Shim, buf: *const c_void, count: usize, offset: u64) -> c_long;
    fn ext2shim_flush(shim: *mut Shim) -> c_long;
    fn ext2shim_close(shim: *mut Shim) -> c_long;
    fn ext2shim_strerror(code: c_long) -> *const c_char;
    fn ext2shim_errno(code: c_long) -> c_int;
}

/// The layer below, as libext2fs's callbacks see it.  The error a callback
/// met is kept so the request that caused it reports the real cause
/// rather than libext2fs's rewording of an errno.
struct Next {
    handle: Arc<dyn Handle>,
    writable: bool,
    last_error: Mutex<Option<Error>>,
}

impl Next {
    fn call(&self, f: impl FnOnce(&dyn Handle) -> nbdkit_backend::Result<()>) -> c_int {
        let r = catch_unwind(AssertUnwindSafe(|| f(&*self.handle)))
            .unwrap_or_else(|_| Err(Error::io("the layer below panicked")));
        match r {
            Ok(()) => 0,
            Err(e) => {
                let errno = errno_of(e.kind());
                *self.last_error.lock_unpoisoned() = Some(e);
                errno
            }
        }
    }
}

fn errno_of(kind: ErrorKind) -> c_int {
    match kind {
        ErrorKind::PermissionDenied => libc::EPERM,
        ErrorKind::ReadOnly => libc::EROFS,
        ErrorKind::Io => libc::EIO,
        ErrorKind::OutOfMemory => libc::ENOMEM,
        ErrorKind::InvalidInput => libc::EINVAL,
        ErrorKind::NoSpace => libc::ENOSPC,
        ErrorKind::Overflow => libc::EOVERFLOW,
        ErrorKind::NotSupported => libc::ENOTSUP,
        ErrorKind::Shutdown => libc::ESHUTDOWN,
    }
}

extern "C" fn cb_pread(ctx: *const c_void, buf: *mut c_void, len: usize, offset: u64) -> c_int {
    // SAFETY: ctx is the `Next` boxed in the `Ext2File` that owns this
    // filesystem, alive until ext2shim_close returns; libext2fs passes a
    // buffer of `len` bytes it owns for the duration of the call.
    let (next, buf) = unsafe {
        (
            &*ctx.cast::<Next>(),
            std::slice::from_raw_parts_mut(buf.cast::<u8>(), len),
        )
    };
    next.call(|h| h.pread(buf, offset))
}

extern "C" fn cb_pwrite(ctx: *const c_void, buf: *const c_void, len: usize, offset: u64) -> c_int {
    // SAFETY: as in cb_pread, for a buffer libext2fs only reads.
    let (next, buf) = unsafe {
        (
            &*ctx.cast::<Next>(),
            std::slice::from_raw_parts(buf.cast::<u8>(), len),
        )
    };
    if !next.writable {
        return libc::EROFS;
    }
    next.call(|h| h.pwrite(buf, offset, false))
}

extern "C" fn cb_flush(ctx: *const c_void) -> c_int {
    // SAFETY: as in cb_pread.
    let next = unsafe { &*ctx.cast::<Next>() };
    if !next.writable {
        return 0;
    }
    next.call(|h| if h.can_flush()? { h.flush() } else { Ok(()) })
}

/// One file inside an ext2/3/4 filesystem, opened through libext2fs.  Not
/// `Sync`: libext2fs keeps per-filesystem state without locks, so the
/// owner serialises calls.
pub(super) struct Ext2File {
    shim: *mut Shim,
    // Both are pointed to from inside libext2fs's io_channel; boxed so
    // they do not move, and dropped only after ext2shim_close.
    _io: Box<ShimIo>,
    next: Box<Next>,
    path: String,
}

// SAFETY: the shim's state belongs to this value alone (no thread-local or
// shared state besides com_err's error table, which is loaded once under
// pthread_once), so it may move between threads; `&self` methods are not
// offered, so it is never used from two threads at once.
unsafe impl Send for Ext2File {}

impl Ext2File {
    /// Open `path` in the filesystem that `next` holds.  Writable when
    /// `writable` (and then `next` must accept writes).
    pub(super) fn open(next: Arc<dyn Handle>, writable: bool, path: &str) -> Result<Self, Error> {
        let cpath = CString::new(path)
            .map_err(|_| Error::invalid(format!("ext2: {path:?}: a path cannot hold a NUL")))?;
        let next = Box::new(Next {
            handle: next,
            writable,
            last_error: Mutex::new(None),
        });
        let io = Box::new(ShimIo {
            ctx: (&*next as *const Next).cast(),
            pread: cb_pread,
            pwrite: cb_pwrite,
            flush: cb_flush,
        });
        let mut shim = std::ptr::null_mut();
        let mut why = [0 as c_char; 512];
        // SAFETY: io and next are boxed and outlive the filesystem (see
        // Ext2File's fields); cpath and why are valid for the call, and
        // shim.c NUL-terminates `why` within its length.
        let code = unsafe {
            ext2shim_open(
                &*io,
                writable as c_int,
                cpath.as_ptr(),
                &mut shim,
                why.as_mut_ptr(),
                why.len(),
            )
        };
        if code != 0 {
            // SAFETY: see above: `why` holds a NUL-terminated string.
            let why = unsafe { CStr::from_ptr(why.as_ptr()) }.to_string_lossy();
            let cause = next.last_error.lock_unpoisoned().take();
            return Err(error(code, cause, &why));
        }
        Ok(Ext2File {
            shim,
            _io: io,
            next,
            path: path.to_string(),
        })
    }

    fn check(&mut self, code: c_long, what: &str) -> Result<(), Error> {
        let cause = self.next.last_error.lock_unpoisoned().take();
        if code == 0 {
            return Ok(());
        }
        Err(error(code, cause, &format!("{}: {what}", self.path)))
    }

    pub(super) fn size(&mut self) -> Result<u64, Error> {
        let mut size = 0;
        // SAFETY: self.shim is open until drop.
        let code = unsafe { ext2shim_size(self.shim, &mut size) };
        self.check(code, "size").map(|()| size)
    }

    pub(super) fn pread(&mut self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        // SAFETY: self.shim is open; buf is valid for buf.len() bytes.
        let code = unsafe { ext2shim_pread(self.shim, buf.as_mut_ptr().cast(), buf.len(), offset) };
        self.check(code, &format!("reading {} bytes at {offset}", buf.len()))
    }

    pub(super) fn pwrite(&mut self, buf: &[u8], offset: u64) -> Result<(), Error> {
        // SAFETY: self.shim is open; buf is valid for buf.len() bytes.
        let code = unsafe { ext2shim_pwrite(self.shim, buf.as_ptr().cast(), buf.len(), offset) };
        self.check(code, &format!("writing {} bytes at {offset}", buf.len()))
    }

    pub(super) fn flush(&mut self) -> Result<(), Error> {
        // SAFETY: self.shim is open until drop.
        let code = unsafe { ext2shim_flush(self.shim) };
        self.check(code, "flush")
    }
}

impl Drop for Ext2File {
    fn drop(&mut self) {
        // SAFETY: the shim was opened and is closed once, here; the
        // callbacks' boxes are dropped after this returns.
        let code = unsafe { ext2shim_close(self.shim) };
        if let Err(e) = self.check(code, "closing the filesystem") {
            tracing::error!("{e}");
        }
    }
}

/// An [`Error`] for libext2fs's `code`: the layer below's own error when a
/// callback failed, otherwise the code's errno and message.
fn error(code: c_long, cause: Option<Error>, what: &str) -> Error {
    if let Some(e) = cause {
        return Error::new(e.kind(), format!("ext2: {what}: {}", e.message()));
    }
    // SAFETY: com_err returns a static (or thread-local) NUL-terminated
    // message for any code; ext2shim_errno is a pure mapping.
    let (text, errno) = unsafe {
        (
            CStr::from_ptr(ext2shim_strerror(code))
                .to_string_lossy()
                .into_owned(),
            ext2shim_errno(code),
        )
    };
    let kind = ErrorKind::from_errno(errno);
    if what.contains(&*text) {
        Error::new(kind, format!("ext2: {what}"))
    } else {
        Error::new(kind, format!("ext2: {what}: {text}"))
    }
}
