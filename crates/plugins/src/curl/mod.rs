//! `curl`: serve a remote disk image over HTTP or HTTPS, read with ranged
//! GETs (`Range: bytes=A-B`), so nothing is downloaded that a client does
//! not read.
//!
//! Why it exists: images live on web servers and object stores more often
//! than on local disks.  Under the compressed filters
//! (`--filter=xz curl url=…/disk.img.xz`) a remote compressed image is
//! served uncompressed with random access, fetching only the compressed
//! blocks that reads touch.
//!
//! How: the size comes from a one-byte range probe at start-up (the total
//! in `Content-Range`), or from HEAD's `Content-Length` when the server
//! does not say; a server that answers the probe with the whole body (200)
//! does not support ranges and is refused at start-up.  Requests go through
//! a pool of `connections=` libcurl handles (each keeps its HTTP connection
//! alive) shared by every NBD connection, so up to that many reads are on
//! the wire at once.  Server errors (5xx, 429) and broken connections are
//! retried with exponential backoff ([`RETRY_DELAYS`]); timeouts and wrong
//! answers are not.  Every failure reaches the client as EIO and the log
//! with the URL and offset.  The export is read-only (no PUT).

use nbdkit_backend::CondvarExt;
use nbdkit_backend::LockExt;
use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use nbdkit_backend::{Backend, Config, ConfigError, Error, Handle, Param, PluginSpec, Result};
use tracing::{debug, warn};

pub mod easy;

use curl_sys as sys;
use easy::{CurlError, Easy};

/// Backoff before each retry of a request that failed transiently (a 5xx
/// or 429 answer, a refused or broken connection): four retries, 3.75 s of
/// waiting in all, then the error goes to the client.
pub const RETRY_DELAYS: [Duration; 4] = [
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_millis(1000),
    Duration::from_millis(2000),
];

/// Without `timeout=`, a transfer slower than 1 byte/s for this long is
/// abandoned, so a stalled server cannot hold a client forever.
const STALL_TIME: Duration = Duration::from_secs(60);

/// Connecting (TCP and TLS) may take this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// nbdkit 1.34's default pool size.
const DEFAULT_CONNECTIONS: usize = 4;
const MAX_CONNECTIONS: usize = 1024;

/// Everything needed to configure a libcurl handle, from the parameters.
#[derive(Clone, Default)]
pub(crate) struct Settings {
    /// "curl" or "s3", for messages.
    pub(crate) who: &'static str,
    pub(crate) url: String,
    /// The URL without credentials, for messages.
    pub(crate) shown: String,
    pub(crate) headers: Vec<String>,
    pub(crate) cookie: Option<String>,
    pub(crate) cookiefile: Option<String>,
    pub(crate) user: Option<String>,
    pub(crate) password: Option<String>,
    pub(crate) proxy: Option<String>,
    pub(crate) proxy_user: Option<String>,
    pub(crate) proxy_password: Option<String>,
    pub(crate) sslverify: bool,
    pub(crate) cainfo: Option<String>,
    pub(crate) capath: Option<String>,
    /// A `CURL_SSLVERSION_*` value.
    pub(crate) ssl_version: Option<i64>,
    pub(crate) ssl_cipher_list: Option<String>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) followlocation: bool,
    pub(crate) user_agent: Option<String>,
    pub(crate) tcp_keepalive: bool,
    pub(crate) tcp_nodelay: bool,
    pub(crate) unix_socket_path: Option<String>,
    pub(crate) protocols: Option<String>,
    /// CURLOPT_AWS_SIGV4 ("aws:amz:REGION:s3"), with user/password as the
    /// access key and secret: the `s3` plugin.
    pub(crate) aws_sigv4: Option<String>,
    /// `cookiejar=`: where libcurl writes the cookies it holds.
    pub(crate) cookiejar: Option<String>,
    /// A `file:` URL: no HTTP status or Content-Range to check; libcurl
    /// reads the range from the local file.
    pub(crate) local: bool,
    /// `header-script=`/`cookie-script=`: headers and cookies made by a
    /// command, rerun when their `-renew=` time has passed.
    pub(crate) scripts: Option<Arc<Scripts>>,
}

/// The header and cookie scripts and what they last printed.
pub(crate) struct Scripts {
    url: String,
    header: Option<(String, Option<Duration>)>,
    cookie: Option<(String, Option<Duration>)>,
    state: Mutex<ScriptState>,
}

#[derive(Default)]
struct ScriptState {
    headers: Option<(std::time::Instant, Vec<String>)>,
    cookie: Option<(std::time::Instant, String)>,
    header_runs: u64,
    cookie_runs: u64,
}

impl Scripts {
    /// Run `script` with `/bin/sh -c` (`$iteration`, `$url` set); its
    /// stdout, or "WHAT failed: first line of stderr".
    fn run(&self, what: &str, script: &str, iteration: u64) -> std::result::Result<String, String> {
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .env("iteration", iteration.to_string())
            .env("url", &self.url)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| format!("{what}: /bin/sh: {e}"))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(match err.lines().find(|l| !l.trim().is_empty()) {
                Some(line) => format!("{what} failed: {}", line.trim_end()),
                None => format!("{what} failed ({})", out.status),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The script headers and cookie to send now, running a script the
    /// first time and again once its renew time has passed.
    fn current(&self) -> std::result::Result<(Option<Vec<String>>, Option<String>), String> {
        let mut st = self.state.lock_unpoisoned();
        let now = std::time::Instant::now();
        let stale = |at: std::time::Instant, renew: Option<Duration>| {
            renew.is_some_and(|r| now.duration_since(at) >= r)
        };
        let mut headers = None;
        if let Some((script, renew)) = &self.header {
            if st.headers.as_ref().is_none_or(|(at, _)| stale(*at, *renew)) {
                let out = self.run("header-script", script, st.header_runs)?;
                st.header_runs += 1;
                let lines = out
                    .lines()
                    .map(|l| l.trim_end_matches('\r').to_string())
                    .filter(|l| !l.is_empty())
                    .collect::<Vec<_>>();
                debug!("curl: header-script printed {} header(s)", lines.len());
                st.headers = Some((now, lines));
            }
            headers = st.headers.as_ref().map(|(_, h)| h.clone());
        }
        let mut cookie = None;
        if let Some((script, renew)) = &self.cookie {
            if st.cookie.as_ref().is_none_or(|(at, _)| stale(*at, *renew)) {
                let out = self.run("cookie-script", script, st.cookie_runs)?;
                st.cookie_runs += 1;
                let line = out
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim_end_matches('\r')
                    .to_string();
                st.cookie = Some((now, line));
            }
            cookie = st.cookie.as_ref().map(|(_, c)| c.clone());
        }
        Ok((headers, cookie))
    }
}

impl Settings {
    /// Before a request: the header/cookie scripts' current output.
    fn apply_scripts(&self, easy: &mut Easy) -> std::result::Result<(), String> {
        let Some(scripts) = &self.scripts else {
            return Ok(());
        };
        let (headers, cookie) = scripts.current()?;
        if let Some(h) = headers {
            easy.set_headers(&h)
                .map_err(|e| format!("header-script: {e}"))?;
        }
        if let Some(c) = cookie {
            easy.set_str(sys::CURLOPT_COOKIE, &c)
                .map_err(|e| format!("cookie-script: {e}"))?;
        }
        Ok(())
    }

    /// "curl: URL", the start of every message.
    fn label(&self) -> String {
        format!("{}: {}", self.who, self.shown)
    }

    /// A new libcurl handle with every option applied.
    fn easy(&self) -> std::result::Result<Easy, String> {
        let mut e = Easy::new().map_err(|x| format!("libcurl: {x}"))?;
        let ctx = |what: &str, err: CurlError| format!("{what}: {err}");
        e.set_str(sys::CURLOPT_URL, &self.url)
            .map_err(|x| ctx("url", x))?;
        if let Some(p) = &self.protocols {
            for opt in [
                easy::CURLOPT_PROTOCOLS_STR,
                easy::CURLOPT_REDIR_PROTOCOLS_STR,
            ] {
                e.set_str(opt, p)
                    .map_err(|x| format!("protocols={p}: {x}"))?;
            }
        }
        if !self.headers.is_empty() {
            e.set_headers(&self.headers).map_err(|x| ctx("header", x))?;
        }
        let strings = [
            (sys::CURLOPT_COOKIE, &self.cookie, "cookie"),
            (sys::CURLOPT_COOKIEFILE, &self.cookiefile, "cookiefile"),
            (sys::CURLOPT_COOKIEJAR, &self.cookiejar, "cookiejar"),
            (sys::CURLOPT_USERNAME, &self.user, "user"),
            (sys::CURLOPT_PASSWORD, &self.password, "password"),
            (sys::CURLOPT_PROXY, &self.proxy, "proxy"),
            (sys::CURLOPT_PROXYUSERNAME, &self.proxy_user, "proxy-user"),
            (
                sys::CURLOPT_PROXYPASSWORD,
                &self.proxy_password,
                "proxy-password",
            ),
            (
                sys::CURLOPT_SSL_CIPHER_LIST,
                &self.ssl_cipher_list,
                "ssl-cipher-list",
            ),
            (sys::CURLOPT_USERAGENT, &self.user_agent, "user-agent"),
            (
                sys::CURLOPT_UNIX_SOCKET_PATH,
                &self.unix_socket_path,
                "unix-socket-path",
            ),
            (sys::CURLOPT_AWS_SIGV4, &self.aws_sigv4, "aws-sigv4"),
        ];
        for (opt, v, what) in strings {
            if let Some(v) = v {
                e.set_str(opt, v).map_err(|x| ctx(what, x))?;
            }
        }
        e.set_bool(sys::CURLOPT_SSL_VERIFYPEER, self.sslverify)
            .map_err(|x| ctx("sslverify", x))?;
        e.set_long(
            sys::CURLOPT_SSL_VERIFYHOST,
            if self.sslverify { 2 } else { 0 },
        )
        .map_err(|x| ctx("sslverify", x))?;
        // libcurl built from source does not know where this system keeps
        // its CA certificates: find them as OpenSSL would, unless given.
        let probed = ca_locations();
        if let Some(c) = self.cainfo.as_deref().or(probed.0.as_deref()) {
            e.set_str(sys::CURLOPT_CAINFO, c)
                .map_err(|x| ctx("cainfo", x))?;
        }
        if let Some(c) = self.capath.as_deref().or(probed.1.as_deref()) {
            e.set_str(sys::CURLOPT_CAPATH, c)
                .map_err(|x| ctx("capath", x))?;
        }
        if let Some(v) = self.ssl_version {
            e.set_long(sys::CURLOPT_SSLVERSION, v)
                .map_err(|x| ctx("ssl-version", x))?;
        }
        if let Some(t) = self.timeout {
            e.set_millis(sys::CURLOPT_TIMEOUT_MS, t)
                .map_err(|x| ctx("timeout", x))?;
        }
        e.set_long(sys::CURLOPT_LOW_SPEED_LIMIT, 1)
            .map_err(|x| ctx("timeout", x))?;
        e.set_long(sys::CURLOPT_LOW_SPEED_TIME, STALL_TIME.as_secs() as i64)
            .map_err(|x| ctx("timeout", x))?;
        e.set_millis(sys::CURLOPT_CONNECTTIMEOUT_MS, CONNECT_TIMEOUT)
            .map_err(|x| ctx("timeout", x))?;
        e.set_bool(sys::CURLOPT_FOLLOWLOCATION, self.followlocation)
            .map_err(|x| ctx("followlocation", x))?;
        e.set_bool(sys::CURLOPT_TCP_KEEPALIVE, self.tcp_keepalive)
            .map_err(|x| ctx("tcp-keepalive", x))?;
        e.set_bool(sys::CURLOPT_TCP_NODELAY, self.tcp_nodelay)
            .map_err(|x| ctx("tcp-nodelay", x))?;
        // Worker threads may be interrupted by signals; libcurl must not
        // use SIGALRM for its timeouts there.
        e.set_bool(sys::CURLOPT_NOSIGNAL, true)
            .map_err(|x| ctx("signal", x))?;
        Ok(e)
    }
}

/// The system's CA certificate file and directory, as OpenSSL's tools
/// find them (`SSL_CERT_FILE`/`SSL_CERT_DIR` first); probed once.
fn ca_locations() -> &'static (Option<String>, Option<String>) {
    static PROBED: std::sync::OnceLock<(Option<String>, Option<String>)> =
        std::sync::OnceLock::new();
    PROBED.get_or_init(|| {
        let p = openssl_probe::probe();
        let s = |v: Option<std::path::PathBuf>| v.map(|p| p.to_string_lossy().into_owned());
        (s(p.cert_file), s(p.cert_dir))
    })
}

/// A pool of libcurl handles shared by every NBD connection.  Handles are
/// made on demand, up to `max`; a request waits for a free one beyond that.
struct Pool {
    settings: Settings,
    max: usize,
    state: Mutex<PoolState>,
    freed: Condvar,
}

struct PoolState {
    idle: Vec<Easy>,
    total: usize,
}

struct Pooled<'a> {
    pool: &'a Pool,
    easy: Option<Easy>,
}

impl Pool {
    fn get(&self) -> Result<Pooled<'_>> {
        let mut st = self.state.lock_unpoisoned();
        loop {
            if let Some(e) = st.idle.pop() {
                return Ok(Pooled {
                    pool: self,
                    easy: Some(e),
                });
            }
            if st.total < self.max {
                st.total += 1;
                drop(st);
                return match self.settings.easy() {
                    Ok(e) => Ok(Pooled {
                        pool: self,
                        easy: Some(e),
                    }),
                    Err(msg) => {
                        let mut st = self.state.lock_unpoisoned();
                        st.total -= 1;
                        self.freed.notify_one();
                        Err(Error::io(format!("{}: {msg}", self.settings.label())))
                    }
                };
            }
            st = self.freed.wait_unpoisoned(st);
        }
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        if let Some(e) = self.easy.take() {
            let mut st = self.pool.state.lock_unpoisoned();
            st.idle.push(e);
            self.pool.freed.notify_one();
        }
    }
}

/// Why one attempt failed, and whether another may succeed.
#[derive(Debug)]
enum Failure {
    /// 5xx, 429, refused or broken connection: worth retrying.
    Transient(String),
    /// Anything else: a timeout, a 4xx, a wrong answer.
    Final(String),
}

/// What came back from one GET with a Range header.
struct RangeReply {
    status: u32,
    /// The `Content-Range` header of the final response, if any.
    content_range: Option<String>,
    /// The final response's ETag or Last-Modified (see [`Validators`]).
    version: Option<String>,
    /// Body bytes stored in the buffer.
    got: usize,
}

/// One ranged GET of `buf.len()` bytes at `offset` into `buf`.  The body
/// is stored only when the answer is 206; anything else aborts the
/// transfer after its headers.
fn ranged_get(
    easy: &mut Easy,
    buf: &mut [u8],
    offset: u64,
    local: bool,
) -> std::result::Result<RangeReply, (CurlError, RangeReply)> {
    let last = offset + buf.len() as u64 - 1;
    let status = Cell::new(0u32);
    let content_range: Cell<Option<String>> = Cell::new(None);
    let mut validators = Validators::default();
    let mut got = 0usize;
    let r = (|| {
        easy.set_bool(sys::CURLOPT_HTTPGET, true)?;
        easy.set_str(sys::CURLOPT_RANGE, &format!("{offset}-{last}"))?;
        easy.perform(
            &mut |raw| {
                header_line(&mut validators, raw);
                let line = String::from_utf8_lossy(raw);
                let line = line.trim_end();
                if let Some(rest) = line.strip_prefix("HTTP/") {
                    // A new response (after a redirect or a 100 Continue).
                    let code = rest
                        .split_whitespace()
                        .nth(1)
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(0);
                    status.set(code);
                    content_range.set(None);
                } else if let Some((k, v)) = line.split_once(':') {
                    if k.trim().eq_ignore_ascii_case("content-range") {
                        content_range.set(Some(v.trim().to_string()));
                    }
                }
            },
            &mut |data| {
                if (!local && status.get() != 206) || got + data.len() > buf.len() {
                    // Not the range (or more than it): stop the transfer.
                    return false;
                }
                buf[got..got + data.len()].copy_from_slice(data);
                got += data.len();
                true
            },
        )
    })();
    let reply = RangeReply {
        status: easy.response_code().max(status.get()),
        content_range: content_range.take(),
        version: validators.version(),
        got,
    };
    match r {
        Ok(()) => Ok(reply),
        Err(e) => Err((e, reply)),
    }
}

/// The headers that say which version of the resource answered: the
/// ETag, else Last-Modified (HTTP's validators).  Reported as the handle's
/// `source_version`, so an index saved for one version of a remote image
/// is not reused for another of the same size.
#[derive(Default)]
struct Validators {
    etag: Option<String>,
    last_modified: Option<String>,
}

impl Validators {
    fn header(&mut self, name: &str, value: &str) {
        let name = name.trim();
        let value = value.trim();
        if value.is_empty() {
            return;
        }
        if name.eq_ignore_ascii_case("etag") {
            self.etag = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("last-modified") {
            self.last_modified = Some(value.to_string());
        }
    }
    /// Prefixed by kind, so an ETag never equals a date by accident.
    fn version(&self) -> Option<String> {
        match (&self.etag, &self.last_modified) {
            (Some(e), _) => Some(format!("etag:{e}")),
            (None, Some(m)) => Some(format!("last-modified:{m}")),
            (None, None) => None,
        }
    }
}

/// Feed one raw header line to `v` (status lines and blank lines are not
/// `Name: value` and are skipped).
fn header_line(v: &mut Validators, line: &[u8]) {
    let line = String::from_utf8_lossy(line);
    if line.starts_with("HTTP/") {
        *v = Validators::default();
    } else if let Some((k, val)) = line.split_once(':') {
        v.header(k, val);
    }
}

/// A parsed `Content-Range`: the first and last byte (None for `*`) and the
/// total size (None for `*`).
type ContentRange = (Option<(u64, u64)>, Option<u64>);

/// Parse `bytes A-B/TOTAL` (TOTAL may be `*`) or `bytes */TOTAL`.
fn parse_content_range(v: &str) -> Option<ContentRange> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    let range = match range.trim() {
        "*" => None,
        r => {
            let (a, b) = r.split_once('-')?;
            let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
            if b < a {
                return None;
            }
            Some((a, b))
        }
    };
    Some((range, total))
}

fn is_transient_status(status: u32) -> bool {
    status == 429 || (500..600).contains(&status)
}

/// Describe a libcurl error, naming timeouts as such.
fn describe(e: &CurlError, timeout: Option<Duration>) -> String {
    if e.is_operation_timedout() {
        match timeout {
            Some(t) => format!("timed out (timeout={}s): {e}", t.as_secs_f64()),
            None => format!("stalled: {e}"),
        }
    } else {
        // Display includes libcurl's detailed message.
        e.to_string()
    }
}

/// Shared by the backend and every handle.
struct Remote {
    pool: Pool,
    size: u64,
    /// What the start-up probe said about the resource's version.
    version: Option<String>,
}

impl Remote {
    /// One attempt at reading `buf` at `offset`.
    fn read_once(&self, buf: &mut [u8], offset: u64) -> std::result::Result<(), Failure> {
        let mut pooled = self.pool.get().map_err(|e| Failure::Final(e.to_string()))?;
        let easy = pooled.easy.as_mut().expect("pooled handle");
        let timeout = self.pool.settings.timeout;
        let want = buf.len();
        self.pool
            .settings
            .apply_scripts(easy)
            .map_err(Failure::Final)?;
        if self.pool.settings.local {
            // file: URLs have no status or Content-Range: the bytes are
            // the answer.
            return match ranged_get(easy, buf, offset, true) {
                Ok(r) if r.got == want => Ok(()),
                Ok(r) => Err(Failure::Final(format!(
                    "short read: {} of {want} bytes",
                    r.got
                ))),
                Err((e, _)) if e.is_write_error() => Err(Failure::Final(format!(
                    "more than the {want} bytes asked for"
                ))),
                Err((e, _)) => Err(Failure::Final(describe(&e, timeout))),
            };
        }
        let reply = match ranged_get(easy, buf, offset, false) {
            Ok(r) => r,
            Err((e, r)) => {
                if r.status == 200 {
                    return Err(Failure::Final(
                        "the server answered a range request with the whole file (200): it does not support range requests".into(),
                    ));
                }
                if r.status == 206 && e.is_write_error() {
                    return Err(Failure::Final(format!(
                        "the server sent more than the {want} bytes asked for"
                    )));
                }
                if r.status != 0 && r.status != 206 && e.is_write_error() {
                    // We stopped reading an error response: judge its status.
                    r
                } else if e.is_transient() {
                    return Err(Failure::Transient(describe(&e, timeout)));
                } else {
                    return Err(Failure::Final(describe(&e, timeout)));
                }
            }
        };
        match reply.status {
            206 => {}
            s if is_transient_status(s) => {
                return Err(Failure::Transient(format!("HTTP status {s}")))
            }
            s => return Err(Failure::Final(format!("HTTP status {s}"))),
        }
        let first = offset;
        let last = offset + want as u64 - 1;
        match reply.content_range.as_deref().and_then(parse_content_range) {
            Some((Some((a, b)), _)) if a == first && b == last => {}
            _ => {
                return Err(Failure::Final(format!(
                    "the server sent the wrong range (Content-Range: {}) for bytes {first}-{last}",
                    reply.content_range.as_deref().unwrap_or("missing")
                )))
            }
        }
        if reply.got != want {
            return Err(Failure::Final(format!(
                "short body: {} of {want} bytes",
                reply.got
            )));
        }
        Ok(())
    }
}

/// Run `attempt` with retries for transient failures; the error names the
/// URL and what was being done.
fn with_retries<T>(
    label: &str,
    what: &str,
    mut attempt: impl FnMut() -> std::result::Result<T, Failure>,
) -> std::result::Result<T, String> {
    let mut tries = 0;
    loop {
        match attempt() {
            Ok(v) => return Ok(v),
            Err(Failure::Final(msg)) => return Err(format!("{label}: {what}: {msg}")),
            Err(Failure::Transient(msg)) => {
                let Some(delay) = RETRY_DELAYS.get(tries) else {
                    return Err(format!(
                        "{label}: {what}: {msg} (gave up after {} retries)",
                        RETRY_DELAYS.len()
                    ));
                };
                warn!("{label}: {what}: {msg}; retrying in {delay:?}");
                std::thread::sleep(*delay);
                tries += 1;
            }
        }
    }
}

/// Find the size, and check that the server honours ranges: GET the first
/// byte; fall back to HEAD when the answer gives no total.  Also returns
/// the resource's version (ETag or Last-Modified) when the answer had one.
fn probe(settings: &Settings) -> std::result::Result<(u64, Option<String>), String> {
    let mut easy = settings.easy()?;
    let label = settings.label();
    settings
        .apply_scripts(&mut easy)
        .map_err(|e| format!("{label}: {e}"))?;
    if settings.local {
        // libcurl's file: protocol reports the file's size for a body-less
        // transfer.
        easy.set_bool(sys::CURLOPT_NOBODY, true)
            .map_err(|e| e.to_string())?;
        // libcurl makes up a Last-Modified header from the file's mtime.
        let mut validators = Validators::default();
        easy.perform(&mut |line| header_line(&mut validators, line), &mut |_| {
            true
        })
        .map_err(|e| format!("{label}: {}", describe(&e, settings.timeout)))?;
        let size = easy
            .content_length()
            .ok_or_else(|| format!("{label}: libcurl did not report the file's size"))?;
        return Ok((size, validators.version()));
    }
    let total = with_retries(&settings.label(), "probing the size", || {
        let mut one = [0u8; 1];
        let reply = match ranged_get(&mut easy, &mut one, 0, false) {
            Ok(r) => r,
            Err((e, r)) if e.is_write_error() && r.status != 0 => r,
            Err((e, _)) if e.is_transient() => {
                return Err(Failure::Transient(describe(&e, settings.timeout)))
            }
            Err((e, _)) => return Err(Failure::Final(describe(&e, settings.timeout))),
        };
        let cr = reply.content_range.as_deref().and_then(parse_content_range);
        let version = reply.version;
        match reply.status {
            206 => Ok((cr.and_then(|(_, total)| total), version)),
            // Range not satisfiable: an empty file says "bytes */0".
            416 => match cr {
                Some((None, Some(t))) => Ok((Some(t), version)),
                _ => Err(Failure::Final(
                    "HTTP status 416 (range not satisfiable) without the size".into(),
                )),
            },
            200 => Err(Failure::Final(
                "the server does not support range requests (it answered a request for bytes 0-0 with the whole file, status 200)".into(),
            )),
            s if is_transient_status(s) => Err(Failure::Transient(format!("HTTP status {s}"))),
            s => Err(Failure::Final(format!("HTTP status {s}"))),
        }
    })?;
    let (total, version) = total;
    if let Some(t) = total {
        return Ok((t, version));
    }
    // The server did not give the total ("bytes 0-0/*"): ask HEAD.
    let mut head = settings.easy()?;
    settings
        .apply_scripts(&mut head)
        .map_err(|e| format!("{label}: {e}"))?;
    head.set_bool(sys::CURLOPT_NOBODY, true)
        .map_err(|e| e.to_string())?;
    with_retries(&settings.label(), "HEAD for the size", || {
        let mut validators = Validators::default();
        if let Err(e) = head.perform(&mut |line| header_line(&mut validators, line), &mut |_| {
            true
        }) {
            return Err(if e.is_transient() {
                Failure::Transient(describe(&e, settings.timeout))
            } else {
                Failure::Final(describe(&e, settings.timeout))
            });
        }
        match head.response_code() {
            200 => {}
            s if is_transient_status(s) => {
                return Err(Failure::Transient(format!("HTTP status {s}")))
            }
            s => return Err(Failure::Final(format!("HTTP status {s}"))),
        }
        match head.content_length() {
            Some(n) => Ok((n, version.clone().or_else(|| validators.version()))),
            None => Err(Failure::Final(
                "the server gave neither a Content-Range total nor a Content-Length: the size is unknown".into(),
            )),
        }
    })
}

struct CurlPlugin {
    name: &'static str,
    remote: Arc<Remote>,
}

impl Backend for CurlPlugin {
    fn name(&self) -> &str {
        self.name
    }
    fn open(&self, _readonly: bool, _export: &str) -> Result<Box<dyn Handle>> {
        Ok(Box::new(CurlHandle {
            remote: self.remote.clone(),
        }))
    }
}

struct CurlHandle {
    remote: Arc<Remote>,
}

impl Handle for CurlHandle {
    fn source_name(&self) -> Option<String> {
        Some(self.remote.pool.settings.shown.clone())
    }
    fn source_version(&self) -> Option<String> {
        self.remote.version.clone()
    }
    fn size(&self) -> Result<u64> {
        Ok(self.remote.size)
    }
    fn can_multi_conn(&self) -> Result<bool> {
        // Read-only: every connection sees the same bytes.
        Ok(true)
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let what = format!("read of {} bytes at offset {offset}", buf.len());
        debug!("curl: {what}");
        with_retries(&self.remote.pool.settings.label(), &what, || {
            self.remote.read_once(buf, offset)
        })
        .map_err(Error::io)
    }
}

/// The URL with any `user:password@` replaced, for messages and logs.
fn redact(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        if let Some(at) = rest[..auth_end].rfind('@') {
            return format!("{}://***@{}", &url[..scheme_end], &rest[at + 1..]);
        }
    }
    url.to_string()
}

fn parse_ssl_version(v: &str) -> std::result::Result<i64, ConfigError> {
    Ok(match v {
        "default" => sys::CURL_SSLVERSION_DEFAULT,
        "tlsv1" => sys::CURL_SSLVERSION_TLSv1,
        "sslv2" => sys::CURL_SSLVERSION_SSLv2,
        "sslv3" => sys::CURL_SSLVERSION_SSLv3,
        "tlsv1.0" => sys::CURL_SSLVERSION_TLSv1_0,
        "tlsv1.1" => sys::CURL_SSLVERSION_TLSv1_1,
        "tlsv1.2" => sys::CURL_SSLVERSION_TLSv1_2,
        "tlsv1.3" => sys::CURL_SSLVERSION_TLSv1_3,
        _ => {
            return Err(ConfigError::new(format!(
                "curl: ssl-version={v}: expected tlsv1, sslv2, sslv3, tlsv1.0, tlsv1.1, tlsv1.2 or tlsv1.3"
            )))
        }
    } as i64)
}

/// The parameters about getting there rather than what to get, shared with
/// the `s3` plugin: pool size, timeout, TLS, proxy, TCP.  Fills in
/// everything but the URL and the HTTP-specific fields.
pub(crate) fn transport(
    cfg: &mut Config,
    who: &str,
) -> std::result::Result<(Settings, usize), ConfigError> {
    let bool_or = |cfg: &mut Config, key: &str, default: bool| {
        cfg.take_bool(key)
            .map(|b| b.unwrap_or(default))
            .map_err(|e| ConfigError::new(format!("{who}: {e}")))
    };
    let timeout = match cfg.take("timeout") {
        None => None,
        Some(v) => {
            let secs: u64 = v.trim().parse().map_err(|_| {
                ConfigError::new(format!(
                    "{who}: timeout={v}: expected a whole number of seconds"
                ))
            })?;
            (secs > 0).then(|| Duration::from_secs(secs))
        }
    };
    let connections = match cfg.take("connections") {
        None => DEFAULT_CONNECTIONS,
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) if (1..=MAX_CONNECTIONS).contains(&n) => n,
            _ => {
                return Err(ConfigError::new(format!(
                    "{who}: connections={v}: expected a number from 1 to {MAX_CONNECTIONS}"
                )))
            }
        },
    };
    let proxy_password = cfg.take_secret("proxy-password", who)?;
    let ssl_version = cfg
        .take("ssl-version")
        .map(|v| parse_ssl_version(&v))
        .transpose()?;
    let s = Settings {
        proxy: cfg.take("proxy"),
        proxy_user: cfg.take("proxy-user"),
        proxy_password,
        sslverify: bool_or(cfg, "sslverify", true)?,
        cainfo: cfg.take("cainfo"),
        capath: cfg.take("capath"),
        ssl_version,
        ssl_cipher_list: cfg.take("ssl-cipher-list"),
        timeout,
        followlocation: true,
        user_agent: cfg.take("user-agent"),
        tcp_keepalive: bool_or(cfg, "tcp-keepalive", false)?,
        tcp_nodelay: bool_or(cfg, "tcp-nodelay", true)?,
        ..Settings::default()
    };
    Ok((s, connections))
}

/// Read the parameters into settings (no network yet).
fn settings(cfg: &mut Config) -> std::result::Result<(Settings, usize), ConfigError> {
    let url = cfg.require("url", "curl")?;
    if url.is_empty() {
        return Err(ConfigError::new("curl: url= is empty"));
    }
    // HTTP(S) range requests, and local files (file:PATH or
    // file:///PATH, which libcurl reads a range of); libcurl's other
    // protocols (FTP, SFTP, ...) are refused rather than half-served.
    let scheme = url
        .split_once(':')
        .map(|(s, _)| s.to_ascii_lowercase())
        .filter(|s| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        });
    let local = match scheme.as_deref() {
        Some("http" | "https") if url.contains("://") => false,
        Some("file") => true,
        _ => {
            return Err(ConfigError::new(format!(
                "curl: url={}: only http://, https:// and file: URLs are supported",
                redact(&url)
            )))
        }
    };
    let (mut s, connections) = transport(cfg, "curl")?;
    s.local = local;
    s.who = "curl";
    s.cookie = cfg.take_secret("cookie", "curl")?;
    s.password = cfg.take_secret("password", "curl")?;
    let headers = cfg.take_all("header");
    let script = |cfg: &mut Config,
                  key: &str|
     -> std::result::Result<Option<(String, Option<Duration>)>, ConfigError> {
        let renew_key = format!("{key}-renew");
        let renew = match cfg.take(&renew_key) {
            None => None,
            Some(v) => match v.trim().parse::<u64>() {
                Ok(n) => (n > 0).then(|| Duration::from_secs(n)),
                Err(_) => {
                    return Err(ConfigError::new(format!(
                        "curl: {renew_key}={v}: expected a whole number of seconds"
                    )))
                }
            },
        };
        match cfg.take(key) {
            Some(sc) => Ok(Some((sc, renew))),
            None if renew.is_some() => {
                Err(ConfigError::new(format!("curl: {renew_key}= needs {key}=")))
            }
            None => Ok(None),
        }
    };
    let header_script = script(cfg, "header-script")?;
    let cookie_script = script(cfg, "cookie-script")?;
    if header_script.is_some() && !headers.is_empty() {
        return Err(ConfigError::new(
            "curl: header-script= cannot be used with header=",
        ));
    }
    if cookie_script.is_some() && s.cookie.is_some() {
        return Err(ConfigError::new(
            "curl: cookie-script= cannot be used with cookie=",
        ));
    }
    if header_script.is_some() || cookie_script.is_some() {
        s.scripts = Some(Arc::new(Scripts {
            url: url.clone(),
            header: header_script,
            cookie: cookie_script,
            state: Mutex::new(ScriptState::default()),
        }));
    }
    for h in &headers {
        if !h.contains([':', ';']) || h.contains(['\r', '\n']) {
            return Err(ConfigError::new(format!(
                "curl: header={h}: expected 'Name: value' (or 'Name:' to remove a header, 'Name;' for an empty one)"
            )));
        }
    }
    s.headers = headers;
    s.shown = redact(&url);
    s.url = url;
    s.cookiefile = cfg.take("cookiefile");
    s.cookiejar = cfg.take("cookiejar");
    s.user = cfg.take("user");
    s.followlocation = cfg
        .take_bool("followlocation")
        .map_err(|e| ConfigError::new(format!("curl: {e}")))?
        .unwrap_or(true);
    // nbdkit accepts both spellings.
    s.unix_socket_path = cfg
        .take("unix-socket-path")
        .or(cfg.take("unix_socket_path"));
    s.protocols = cfg.take("protocols");
    Ok((s, connections))
}

fn create(cfg: &mut Config) -> std::result::Result<Arc<dyn Backend>, ConfigError> {
    let (settings, connections) = settings(cfg)?;
    serve(settings, connections, "curl")
}

/// Probe the size and make the backend (`name` is "curl" or "s3").
pub(crate) fn serve(
    settings: Settings,
    connections: usize,
    name: &'static str,
) -> std::result::Result<Arc<dyn Backend>, ConfigError> {
    // Options libcurl rejects (a bad protocol list, …) fail here, naming
    // the key, before any request.
    settings
        .easy()
        .map_err(|e| ConfigError::new(format!("{name}: {e}")))?;
    let (size, version) = probe(&settings).map_err(ConfigError::new)?;
    debug!(
        "{name}: {}: size {size}, {}",
        settings.shown,
        version.as_deref().unwrap_or("no ETag or Last-Modified")
    );
    Ok(Arc::new(CurlPlugin {
        name,
        remote: Arc::new(Remote {
            pool: Pool {
                settings,
                max: connections,
                state: Mutex::new(PoolState {
                    idle: Vec::new(),
                    total: 0,
                }),
                freed: Condvar::new(),
            },
            size,
            version,
        }),
    }))
}

pub static SPEC: PluginSpec = PluginSpec {
    name: "curl",
    summary: "a remote disk image over HTTP/HTTPS (or a file: URL), read with range requests (read-only)",
    description: "Each read is a ranged GET; the size comes from the server at start-up, and a\n\
                  server that does not support range requests is refused then.  Up to\n\
                  connections= requests are in flight at once, shared by all clients; 5xx\n\
                  answers and broken connections are retried 4 times with backoff (0.25 s\n\
                  doubling), and any other failure is EIO naming the URL and offset.\n\
                  Read-only.\n\n\
                  Examples:\n  nbdkit-rs curl https://example.com/disk.img\n  \
                  nbdkit-rs --filter=xz curl url=http://example.com/disk.img.xz timeout=30\n  \
                  nbdkit-rs curl url=https://example.com/disk.img user=me password=+pw.txt",
    magic_config_key: Some("url"),
    params: &[
        Param {
            name: "url",
            help: "the URL of the disk image (required; the magic key)",
        },
        Param {
            name: "connections",
            help: "HTTP connections shared by all clients (default 4)",
        },
        Param {
            name: "timeout",
            help:
                "seconds a request may take (default: none, but a transfer stalled for 60 s fails)",
        },
        Param {
            name: "header",
            help: "'Name: value' sent with every request (repeatable; 'Name:' removes one)",
        },
        Param {
            name: "cookie",
            help: "cookie string, or +FILE, - (stdin) or -FD",
        },
        Param {
            name: "cookiefile",
            help: "enable cookies, loading them from FILE (empty: start with none)",
        },
        Param {
            name: "user",
            help: "user name for authentication",
        },
        Param {
            name: "password",
            help: "password, or +FILE, - (ask on stdin) or -FD",
        },
        Param {
            name: "user-agent",
            help: "User-Agent header (default: none)",
        },
        Param {
            name: "followlocation",
            help: "follow redirects (default true)",
        },
        Param {
            name: "sslverify",
            help: "verify the server's certificate (default true)",
        },
        Param {
            name: "cainfo",
            help: "CA bundle file",
        },
        Param {
            name: "capath",
            help: "CA certificates directory",
        },
        Param {
            name: "ssl-version",
            help: "tlsv1, sslv2, sslv3, tlsv1.0, tlsv1.1, tlsv1.2 or tlsv1.3",
        },
        Param {
            name: "ssl-cipher-list",
            help: "allowed TLS ciphers (CIPHER[:CIPHER...])",
        },
        Param {
            name: "proxy",
            help: "proxy URL",
        },
        Param {
            name: "proxy-user",
            help: "proxy user name",
        },
        Param {
            name: "proxy-password",
            help: "proxy password, or +FILE, - or -FD",
        },
        Param {
            name: "protocols",
            help: "allowed protocols, e.g. http,https (also for redirects)",
        },
        Param {
            name: "tcp-keepalive",
            help: "enable TCP keepalives (default false)",
        },
        Param {
            name: "tcp-nodelay",
            help: "disable Nagle's algorithm (default true)",
        },
        Param {
            name: "unix-socket-path",
            help: "connect to the HTTP server over this Unix socket",
        },
        Param {
            name: "unix_socket_path",
            help: "the same as unix-socket-path=",
        },
        Param {
            name: "cookiejar",
            help: "write the cookies libcurl holds to FILE when done",
        },
        Param {
            name: "header-script",
            help: "a shell command whose output lines are the HTTP headers (not with header=); $iteration and $url are set",
        },
        Param {
            name: "header-script-renew",
            help: "rerun header-script when this many seconds have passed since it last ran",
        },
        Param {
            name: "cookie-script",
            help: "a shell command whose first output line is the cookie (not with cookie=)",
        },
        Param {
            name: "cookie-script-renew",
            help: "rerun cookie-script when this many seconds have passed since it last ran",
        },
    ],
    create,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_forms() {
        assert_eq!(
            parse_content_range("bytes 0-0/1234"),
            Some((Some((0, 0)), Some(1234)))
        );
        assert_eq!(
            parse_content_range("bytes 10-19/*"),
            Some((Some((10, 19)), None))
        );
        assert_eq!(parse_content_range("bytes */0"), Some((None, Some(0))));
        assert_eq!(parse_content_range("bytes 5-4/10"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
        assert_eq!(parse_content_range("bytes x-1/2"), None);
    }

    #[test]
    fn the_version_is_the_final_responses_etag_else_its_date() {
        let version = |lines: &[&str]| {
            let mut v = Validators::default();
            for l in lines {
                header_line(&mut v, format!("{l}\r\n").as_bytes());
            }
            v.version()
        };
        let date = "Last-Modified: Mon, 01 Jan 2024 00:00:00 GMT";
        assert_eq!(
            version(&["HTTP/1.1 206 Partial", date, "etag: \"abc\""]).as_deref(),
            Some("etag:\"abc\"")
        );
        assert_eq!(
            version(&["HTTP/1.1 206 Partial", date]).as_deref(),
            Some("last-modified:Mon, 01 Jan 2024 00:00:00 GMT")
        );
        // A redirect's validators are not the resource's.
        assert_eq!(
            version(&[
                "HTTP/1.1 302 Found",
                "ETag: \"r\"",
                "",
                "HTTP/1.1 206 Partial",
                ""
            ]),
            None
        );
        assert_eq!(version(&["HTTP/1.1 206 Partial", "ETag:  "]), None);
    }

    #[test]
    fn credentials_are_not_shown() {
        assert_eq!(redact("http://u:p@host:8/a@b"), "http://***@host:8/a@b");
        assert_eq!(redact("http://host/x"), "http://host/x");
        assert_eq!(redact("weird"), "weird");
    }

    #[test]
    fn bad_parameters_name_their_key() {
        let bad = [
            ("connections", "0"),
            ("connections", "x"),
            ("timeout", "-1"),
            ("timeout", "1.5"),
            ("sslverify", "maybe"),
            ("ssl-version", "tlsv9"),
            ("header", "no separator"),
        ];
        for (k, v) in bad {
            let mut cfg = Config::new(vec![
                ("url".into(), "http://127.0.0.1:1/x".into()),
                (k.into(), v.into()),
            ]);
            let e = settings(&mut cfg).err().expect("must fail");
            assert!(e.0.contains(&format!("{k}={v}")), "{k}={v}: {e}");
        }
        let mut cfg = Config::new(vec![]);
        assert!(settings(&mut cfg).err().unwrap().0.contains("'url'"));
        for url in ["ftp://host/x", "example.com/disk.img", "http:host"] {
            let mut cfg = Config::new(vec![("url".into(), url.into())]);
            let e = settings(&mut cfg).err().expect(url);
            assert!(e.0.contains("only http://, https:// and file: URLs"), "{e}");
        }
        for url in ["file:///etc/passwd", "file:/etc/passwd"] {
            let mut cfg = Config::new(vec![("url".into(), url.into())]);
            assert!(settings(&mut cfg).unwrap().0.local, "{url}");
        }
        for (pairs, what) in [
            (
                vec![("header-script", "true"), ("header", "A: b")],
                "cannot be used with header=",
            ),
            (
                vec![("cookie-script", "true"), ("cookie", "a=b")],
                "cannot be used with cookie=",
            ),
            (vec![("header-script-renew", "5")], "needs header-script="),
            (
                vec![("header-script", "true"), ("header-script-renew", "soon")],
                "header-script-renew=soon",
            ),
        ] {
            let mut params: Vec<(String, String)> =
                vec![("url".into(), "http://127.0.0.1:1/x".into())];
            params.extend(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            let e = settings(&mut Config::new(params)).err().expect(what);
            assert!(e.0.contains(what), "{what}: {e}");
        }
        let mut cfg = Config::new(vec![("url".into(), "HTTPS://host/x".into())]);
        assert!(settings(&mut cfg).is_ok());
    }
}
