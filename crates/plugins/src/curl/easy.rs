//! The few libcurl calls the `curl` and `s3` plugins make, over `curl-sys`.
//!
//! Why not the `curl` crate: it registers a constructor that runs
//! `curl_global_init` — and so OpenSSL's whole initialisation — before
//! `main`, in every process that links it, whether or not a curl plugin is
//! ever used.  That alone is 1.7 MiB of resident memory in a server that
//! serves a local file.  Here libcurl is initialised by [`global_init`]
//! when a curl-based plugin is configured, and only then.  The wrapper is
//! small because the plugins need little: string and number options, one
//! ranged transfer with header and body callbacks, and two `getinfo`s.

use std::ffi::{c_char, c_long, c_void, CStr, CString};
use std::sync::OnceLock;
use std::time::Duration;

use curl_sys as sys;

/// `CURLOPT_PROTOCOLS_STR` and `CURLOPT_REDIR_PROTOCOLS_STR` (libcurl
/// 7.85), which curl-sys does not name.
pub const CURLOPT_PROTOCOLS_STR: sys::CURLoption = sys::CURLOPTTYPE_OBJECTPOINT + 318;
pub const CURLOPT_REDIR_PROTOCOLS_STR: sys::CURLoption = sys::CURLOPTTYPE_OBJECTPOINT + 319;
/// `CURLINFO_CONTENT_LENGTH_DOWNLOAD_T` (libcurl 7.55): an off_t (type
/// CURLINFO_OFF_T, 0x600000), which curl-sys does not name.
const CURLINFO_CONTENT_LENGTH_DOWNLOAD_T: sys::CURLINFO = 0x600000 + 15;

/// Initialise libcurl (and the TLS library under it) once.  Called while
/// a plugin is configured, on the main thread, before any worker thread
/// exists.
pub fn global_init() -> Result<(), CurlError> {
    static INIT: OnceLock<sys::CURLcode> = OnceLock::new();
    // SAFETY: curl_global_init runs once, here.
    let rc = *INIT.get_or_init(|| unsafe { sys::curl_global_init(sys::CURL_GLOBAL_ALL) });
    if rc == sys::CURLE_OK {
        Ok(())
    } else {
        Err(CurlError::new(rc, String::new()))
    }
}

/// A libcurl error code with libcurl's detailed message, when it gave one.
#[derive(Debug, Clone)]
pub struct CurlError {
    code: sys::CURLcode,
    detail: String,
}

impl CurlError {
    fn new(code: sys::CURLcode, detail: String) -> Self {
        CurlError { code, detail }
    }
    pub fn code(&self) -> sys::CURLcode {
        self.code
    }
    pub fn is_write_error(&self) -> bool {
        self.code == sys::CURLE_WRITE_ERROR
    }
    pub fn is_operation_timedout(&self) -> bool {
        self.code == sys::CURLE_OPERATION_TIMEDOUT
    }
    /// Errors another attempt may not hit: the connection was refused or
    /// broke, or the server sent nothing or too little.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.code,
            sys::CURLE_COULDNT_CONNECT
                | sys::CURLE_SEND_ERROR
                | sys::CURLE_RECV_ERROR
                | sys::CURLE_GOT_NOTHING
                | sys::CURLE_PARTIAL_FILE
                | sys::CURLE_READ_ERROR
        )
    }
}

impl std::fmt::Display for CurlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // SAFETY: curl_easy_strerror returns a static string for any code.
        let text = unsafe { CStr::from_ptr(sys::curl_easy_strerror(self.code)) };
        write!(f, "[{}] {}", self.code, text.to_string_lossy())?;
        if !self.detail.is_empty() && self.detail != text.to_string_lossy() {
            write!(f, " ({})", self.detail)?;
        }
        Ok(())
    }
}

impl std::error::Error for CurlError {}

/// One libcurl easy handle.  It keeps its connection alive between
/// transfers; the header list and error buffer live as long as it does,
/// because libcurl keeps pointers to them.
pub struct Easy {
    raw: *mut sys::CURL,
    headers: *mut sys::curl_slist,
    error_buf: Box<[u8; sys::CURL_ERROR_SIZE]>,
}

// SAFETY: a libcurl handle may be used from any thread, one at a time;
// `Easy` is only used through `&mut self`.
unsafe impl Send for Easy {}

impl Drop for Easy {
    fn drop(&mut self) {
        // SAFETY: both were made by libcurl and are freed once, here.
        unsafe {
            sys::curl_easy_cleanup(self.raw);
            if !self.headers.is_null() {
                sys::curl_slist_free_all(self.headers);
            }
        }
    }
}

fn cstring(v: &str) -> Result<CString, CurlError> {
    CString::new(v).map_err(|_| {
        CurlError::new(
            sys::CURLE_BAD_FUNCTION_ARGUMENT,
            "contains a NUL byte".into(),
        )
    })
}

/// What `perform` calls back with: header lines, then body data.  The
/// body callback returns false to stop the transfer (libcurl then reports
/// a write error).
struct Callbacks<'a> {
    header: &'a mut dyn FnMut(&[u8]),
    body: &'a mut dyn FnMut(&[u8]) -> bool,
}

extern "C" fn header_cb(ptr: *mut c_char, size: usize, n: usize, data: *mut c_void) -> usize {
    let len = size.saturating_mul(n);
    // SAFETY: `data` is the `Callbacks` that `perform` set for this very
    // transfer and `ptr` holds `len` bytes, per libcurl's contract.
    let (cbs, bytes) = unsafe {
        (
            &mut *(data as *mut Callbacks<'_>),
            std::slice::from_raw_parts(ptr as *const u8, len),
        )
    };
    (cbs.header)(bytes);
    len
}

extern "C" fn body_cb(ptr: *mut c_char, size: usize, n: usize, data: *mut c_void) -> usize {
    let len = size.saturating_mul(n);
    // SAFETY: as in `header_cb`.
    let (cbs, bytes) = unsafe {
        (
            &mut *(data as *mut Callbacks<'_>),
            std::slice::from_raw_parts(ptr as *const u8, len),
        )
    };
    if (cbs.body)(bytes) {
        len
    } else {
        0
    }
}

impl Easy {
    pub fn new() -> Result<Easy, CurlError> {
        global_init()?;
        // SAFETY: plain constructor; null means out of memory.
        let raw = unsafe { sys::curl_easy_init() };
        if raw.is_null() {
            return Err(CurlError::new(sys::CURLE_OUT_OF_MEMORY, String::new()));
        }
        let mut e = Easy {
            raw,
            headers: std::ptr::null_mut(),
            error_buf: Box::new([0; sys::CURL_ERROR_SIZE]),
        };
        let buf = e.error_buf.as_mut_ptr();
        // SAFETY: the buffer is CURL_ERROR_SIZE bytes and lives (boxed, so
        // it does not move) as long as the handle.
        e.check(unsafe { sys::curl_easy_setopt(raw, sys::CURLOPT_ERRORBUFFER, buf) })?;
        Ok(e)
    }

    fn check(&self, rc: sys::CURLcode) -> Result<(), CurlError> {
        if rc == sys::CURLE_OK {
            return Ok(());
        }
        let end = self
            .error_buf
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.error_buf.len());
        let detail = String::from_utf8_lossy(&self.error_buf[..end])
            .trim_end()
            .to_string();
        Err(CurlError::new(rc, detail))
    }

    /// A string option; libcurl copies the string.
    pub fn set_str(&mut self, opt: sys::CURLoption, v: &str) -> Result<(), CurlError> {
        let c = cstring(v)?;
        // SAFETY: a string option on a live handle (libcurl copies it).
        self.check(unsafe { sys::curl_easy_setopt(self.raw, opt, c.as_ptr()) })
    }

    /// A `long` option (numbers and booleans).
    pub fn set_long(&mut self, opt: sys::CURLoption, v: i64) -> Result<(), CurlError> {
        let v = v as c_long;
        // SAFETY: a long option on a live handle.
        self.check(unsafe { sys::curl_easy_setopt(self.raw, opt, v) })
    }

    pub fn set_bool(&mut self, opt: sys::CURLoption, v: bool) -> Result<(), CurlError> {
        self.set_long(opt, v as i64)
    }

    /// A time option in milliseconds.
    pub fn set_millis(&mut self, opt: sys::CURLoption, d: Duration) -> Result<(), CurlError> {
        self.set_long(opt, d.as_millis().min(c_long::MAX as u128) as i64)
    }

    /// `CURLOPT_HTTPHEADER`: replaces any list set before.
    pub fn set_headers(&mut self, headers: &[String]) -> Result<(), CurlError> {
        let mut list: *mut sys::curl_slist = std::ptr::null_mut();
        for h in headers {
            let c = cstring(h)?;
            // SAFETY: appends a copy of `c` to the list (or to a new one).
            let next = unsafe { sys::curl_slist_append(list, c.as_ptr()) };
            if next.is_null() {
                // SAFETY: frees what was built so far.
                unsafe { sys::curl_slist_free_all(list) };
                return Err(CurlError::new(sys::CURLE_OUT_OF_MEMORY, String::new()));
            }
            list = next;
        }
        // SAFETY: the list stays alive in `self.headers` until replaced or
        // the handle is dropped.
        let rc = unsafe { sys::curl_easy_setopt(self.raw, sys::CURLOPT_HTTPHEADER, list) };
        if !self.headers.is_null() {
            // SAFETY: the old list is no longer referenced by the handle.
            unsafe { sys::curl_slist_free_all(self.headers) };
        }
        self.headers = list;
        self.check(rc)
    }

    /// Run one transfer, calling `header` for each header line and `body`
    /// for each piece of the body (return false to stop the transfer).
    pub fn perform(
        &mut self,
        header: &mut dyn FnMut(&[u8]),
        body: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Result<(), CurlError> {
        let mut cbs = Callbacks { header, body };
        let data = &mut cbs as *mut Callbacks<'_> as *mut c_void;
        let hcb: sys::curl_write_callback = header_cb;
        let bcb: sys::curl_write_callback = body_cb;
        self.error_buf[0] = 0;
        // SAFETY: the callbacks and their data pointer are valid for the
        // whole of curl_easy_perform, and are unset again before `cbs`
        // goes out of scope, so no later transfer can call into it.
        unsafe {
            self.check(sys::curl_easy_setopt(
                self.raw,
                sys::CURLOPT_HEADERFUNCTION,
                hcb,
            ))?;
            self.check(sys::curl_easy_setopt(
                self.raw,
                sys::CURLOPT_HEADERDATA,
                data,
            ))?;
            self.check(sys::curl_easy_setopt(
                self.raw,
                sys::CURLOPT_WRITEFUNCTION,
                bcb,
            ))?;
            self.check(sys::curl_easy_setopt(
                self.raw,
                sys::CURLOPT_WRITEDATA,
                data,
            ))?;
            let rc = sys::curl_easy_perform(self.raw);
            let none: *mut c_void = std::ptr::null_mut();
            sys::curl_easy_setopt(self.raw, sys::CURLOPT_HEADERDATA, none);
            sys::curl_easy_setopt(self.raw, sys::CURLOPT_WRITEDATA, none);
            self.check(rc)
        }
    }

    /// The last response's HTTP status (0 if none).
    pub fn response_code(&self) -> u32 {
        let mut code: c_long = 0;
        // SAFETY: RESPONSE_CODE writes a long.
        let rc =
            unsafe { sys::curl_easy_getinfo(self.raw, sys::CURLINFO_RESPONSE_CODE, &mut code) };
        if rc == sys::CURLE_OK {
            code.clamp(0, u32::MAX as c_long) as u32
        } else {
            0
        }
    }

    /// The last response's Content-Length, if it had one.
    pub fn content_length(&self) -> Option<u64> {
        let mut len: sys::curl_off_t = -1;
        // SAFETY: CONTENT_LENGTH_DOWNLOAD_T writes a curl_off_t.
        let rc = unsafe {
            sys::curl_easy_getinfo(self.raw, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &mut len)
        };
        (rc == sys::CURLE_OK && len >= 0).then_some(len as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked_and_errors_described() {
        let mut e = Easy::new().expect("handle");
        e.set_str(sys::CURLOPT_URL, "http://127.0.0.1:1/")
            .expect("url");
        e.set_headers(&["X-A: 1".into(), "X-B: 2".into()])
            .expect("headers");
        e.set_headers(&["X-C: 3".into()]).expect("replaced");
        let err = e
            .set_str(CURLOPT_PROTOCOLS_STR, "nosuchprotocol")
            .expect_err("unknown protocol");
        assert!(err.to_string().starts_with('['), "{err}");
        assert!(e.set_str(sys::CURLOPT_URL, "a\0b").is_err());
        // Nothing listens on port 1: a connection error, worth retrying.
        let err = e
            .perform(&mut |_| {}, &mut |_| true)
            .expect_err("no server on port 1");
        assert!(err.is_transient(), "{err}");
        assert_eq!(e.response_code(), 0);
    }
}
