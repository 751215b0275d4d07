//! What the `gcs` and `azure` plugins share: serving one object of an
//! [`object_store`] store as a read-only disk.
//!
//! Why object_store: it carries maintained authentication for every
//! credential type of both clouds, which is not something to write by
//! hand.  The plugins only turn their parameters into a store builder; this
//! module does the rest:
//!
//! * the size comes from a HEAD at start-up, so a missing object or
//!   refused credentials stop the server with one line instead of serving
//!   an empty disk;
//! * every read is one ranged GET (`get_range`), checked to have returned
//!   exactly the bytes asked for;
//! * failures reach the client as EIO (and the server's log); transient
//!   ones (5xx, 429, broken connections, timeouts) are retried `retries=`
//!   times by object_store with backoff, every attempt is bounded by
//!   `timeout=`, and a guard around the whole request makes sure no client
//!   waits forever whatever happens below.
//!
//! The async bridge: object_store is async, the server calls `pread` from
//! plain threads, or — for TLS connections — from tokio's blocking pool,
//! where `Runtime::block_on` would panic (a runtime inside a runtime).  So
//! the plugin has a small runtime of its own and each request is
//! `spawn`ed on it and waited for on a std channel, which works from any
//! thread.  The runtime is started after the server has forked to the
//! background (threads do not survive `fork`): in `after_fork`, or by the
//! first request.  The start-up HEAD runs on a throwaway runtime in a
//! thread of its own, joined before `create` returns.

use std::ops::Range;
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Duration;

use nbdkit_backend::LockExt;
use nbdkit_backend::{Backend, Config, ConfigError, Error, Handle, Result};
use object_store::path::Path;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, RetryConfig};
use tracing::debug;

/// A request attempt may take this long by default (`timeout=`): a 32 MiB
/// read at 1 MB/s, or a stalled server noticed within a minute.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Retries of a transient failure by default (`retries=`), as the curl
/// plugin.
const DEFAULT_RETRIES: usize = 4;
const MAX_RETRIES: usize = 100;
/// Requests in flight at once, shared by all clients (`connections=`).
const DEFAULT_CONNECTIONS: usize = 16;
const MAX_CONNECTIONS: usize = 1024;
/// The backoff before each retry: 0.25 s doubling up to 2 s (with
/// object_store's jitter), about the curl plugin's.
const BACKOFF: BackoffConfig = BackoffConfig {
    init_backoff: Duration::from_millis(250),
    max_backoff: Duration::from_secs(2),
    base: 2.0,
};
/// Worker threads of the plugin's runtime: the work is waiting on sockets,
/// and the machine's cores belong to the server.
const WORKER_THREADS: usize = 2;

/// Builds a store (no network).  Called once to check the parameters and
/// probe the size, then again for the serving runtime.
pub(crate) type Build =
    Arc<dyn Fn() -> object_store::Result<Arc<dyn ObjectStore>> + Send + Sync + 'static>;

/// The parameters that are about getting there, common to both plugins.
#[derive(Clone, Debug)]
pub(crate) struct Transport {
    pub(crate) timeout: Duration,
    pub(crate) retries: usize,
    pub(crate) connections: usize,
    proxy: Option<String>,
    cainfo: Option<Vec<object_store::Certificate>>,
    sslverify: bool,
}

impl Transport {
    /// The HTTP client options, starting from the store's own defaults
    /// (`base`), so that settings its builder reads from the environment
    /// and our parameters both apply.
    pub(crate) fn client_options(&self, base: ClientOptions) -> ClientOptions {
        let mut o = base
            .with_timeout(self.timeout)
            .with_connect_timeout(self.timeout.min(Duration::from_secs(10)))
            .with_allow_invalid_certificates(!self.sslverify);
        if let Some(p) = &self.proxy {
            o = o.with_proxy_url(p);
        }
        for c in self.cainfo.iter().flatten() {
            o = o.with_root_certificate(c.clone());
        }
        o
    }

    pub(crate) fn retry_config(&self) -> RetryConfig {
        RetryConfig {
            backoff: BACKOFF,
            max_retries: self.retries,
            // The attempts and their backoff, with room to spare: the bound
            // is the retry count, not the clock.
            retry_timeout: self.guard(),
        }
    }

    /// The hang guard around one whole request: every attempt timing out,
    /// plus the backoff between them, plus a margin.
    fn guard(&self) -> Duration {
        let attempts = self.retries as u32 + 1;
        self.timeout * attempts + BACKOFF.max_backoff * attempts + Duration::from_secs(5)
    }
}

/// Read `timeout=`, `retries=`, `connections=`, `proxy=`, `cainfo=` and
/// `sslverify=`.
pub(crate) fn transport(
    cfg: &mut Config,
    who: &str,
) -> std::result::Result<Transport, ConfigError> {
    let timeout = match cfg.take("timeout") {
        None => DEFAULT_TIMEOUT,
        Some(v) => match v.trim().parse::<u64>() {
            Ok(s) if (1..=86400).contains(&s) => Duration::from_secs(s),
            _ => {
                return Err(ConfigError::new(format!(
                    "{who}: timeout={v}: expected a whole number of seconds from 1 to 86400"
                )))
            }
        },
    };
    let number =
        |cfg: &mut Config, key: &str, default: usize, min: usize, max: usize| match cfg.take(key) {
            None => Ok(default),
            Some(v) => match v.trim().parse::<usize>() {
                Ok(n) if (min..=max).contains(&n) => Ok(n),
                _ => Err(ConfigError::new(format!(
                    "{who}: {key}={v}: expected a number from {min} to {max}"
                ))),
            },
        };
    let retries = number(cfg, "retries", DEFAULT_RETRIES, 0, MAX_RETRIES)?;
    let connections = number(cfg, "connections", DEFAULT_CONNECTIONS, 1, MAX_CONNECTIONS)?;
    let proxy = cfg.take("proxy");
    if let Some(p) = &proxy {
        check_http_url(who, "proxy", p)?;
    }
    let cainfo = cfg
        .take("cainfo")
        .map(|path| {
            let pem = std::fs::read(&path)
                .map_err(|e| ConfigError::new(format!("{who}: cainfo={path}: {e}")))?;
            let certs = object_store::Certificate::from_pem_bundle(&pem)
                .map_err(|e| ConfigError::new(format!("{who}: cainfo={path}: {e}")))?;
            if certs.is_empty() {
                return Err(ConfigError::new(format!(
                    "{who}: cainfo={path}: no PEM certificates in the file"
                )));
            }
            Ok(certs)
        })
        .transpose()?;
    let sslverify = cfg
        .take_bool("sslverify")
        .map_err(|e| ConfigError::new(format!("{who}: {e}")))?
        .unwrap_or(true);
    Ok(Transport {
        timeout,
        retries,
        connections,
        proxy,
        cainfo,
        sslverify,
    })
}

/// Refuse anything but an `http://` or `https://` URL with a host.
pub(crate) fn check_http_url(
    who: &str,
    key: &str,
    v: &str,
) -> std::result::Result<(), ConfigError> {
    let ok = v.split_once("://").is_some_and(|(scheme, rest)| {
        matches!(scheme.to_ascii_lowercase().as_str(), "http" | "https")
            && !rest.is_empty()
            && !rest.starts_with('/')
    });
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(format!(
            "{who}: {key}={v}: expected an http:// or https:// URL"
        )))
    }
}

/// The object name as an object_store path, refusing names it would
/// silently change (it drops a leading or trailing `/` and cannot address
/// empty, `.` or `..` segments or control characters).
pub(crate) fn object_path(
    who: &str,
    what: &str,
    name: &str,
) -> std::result::Result<Path, ConfigError> {
    let bad = |why: String| ConfigError::new(format!("{who}: {what} {name:?}: {why}"));
    if name.is_empty() {
        return Err(bad("the name is empty".into()));
    }
    let path = Path::parse(name).map_err(|e| bad(e.to_string()))?;
    if path.as_ref() != name {
        return Err(bad(
            "names with a leading or trailing '/' cannot be served".into()
        ));
    }
    Ok(path)
}

/// The rustls that reqwest uses is built without a crypto provider of its
/// own (its default would be aws-lc-rs): use ring, as the server does.
fn install_crypto_provider() {
    // Err means one is installed already, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// An object_store error as one line, with the causes its message leaves
/// out (a timeout shows only as "error sending request" otherwise), and
/// error response bodies (Azure's XML) on that one line.
fn one_line(e: &object_store::Error) -> String {
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cause = c.source();
    }
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Describe a failed request: what the store said, in one line, with the
/// cause named first when it is a common one.
fn describe(e: &object_store::Error) -> String {
    let detail = one_line(e);
    match e {
        object_store::Error::NotFound { .. } => format!("no such object ({detail})"),
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => {
            format!("access denied ({detail})")
        }
        _ => detail,
    }
}

/// Run `f` on a fresh single-threaded runtime in a thread of its own, and
/// return its result: safe from any thread, runtime or not, and leaves no
/// thread behind (the server may fork next).
fn run_detached<T: Send + 'static>(
    f: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>> + Send + 'static,
) -> std::result::Result<T, String> {
    std::thread::Builder::new()
        .name("objstore-probe".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start a runtime: {e}"))?;
            Ok(rt.block_on(f()))
        })
        .map_err(|e| format!("cannot start a thread: {e}"))?
        .join()
        .map_err(|_| "the start-up request panicked".to_string())?
}

/// The serving runtime and the store whose connections live on it.
struct Engine {
    runtime: Option<tokio::runtime::Runtime>,
    store: Arc<dyn ObjectStore>,
    /// `connections=`: requests in flight at once.
    slots: Arc<tokio::sync::Semaphore>,
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside another runtime
        // (the server may drop its backend from async code): let it go in
        // the background instead.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Everything a handle needs, shared by all of them.
struct Shared {
    who: &'static str,
    /// gs://BUCKET/OBJECT, az://CONTAINER/BLOB: for messages.
    shown: String,
    path: Path,
    size: u64,
    /// The object's ETag (or version, or modification time) at start-up.
    version: String,
    build: Build,
    transport: Transport,
    engine: OnceLock<Engine>,
    starting: Mutex<()>,
}

impl Shared {
    fn label(&self) -> String {
        format!("{}: {}", self.who, self.shown)
    }

    /// The serving runtime, started on first use.
    fn engine(&self) -> Result<&Engine> {
        if let Some(e) = self.engine.get() {
            return Ok(e);
        }
        let _one = self.starting.lock_unpoisoned();
        if let Some(e) = self.engine.get() {
            return Ok(e);
        }
        // The store first: a runtime dropped on failure would block here.
        let store =
            (self.build)().map_err(|e| Error::io(format!("{}: {}", self.label(), one_line(&e))))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKER_THREADS)
            // For DNS lookups, which hyper makes on blocking threads.
            .max_blocking_threads(4)
            .thread_name(format!("nbdkit-{}", self.who))
            .enable_all()
            .build()
            .map_err(|e| Error::io(format!("{}: cannot start a runtime: {e}", self.label())))?;
        debug!("{}: runtime started", self.label());
        let _ = self.engine.set(Engine {
            runtime: Some(runtime),
            store,
            slots: Arc::new(tokio::sync::Semaphore::new(self.transport.connections)),
        });
        self.engine
            .get()
            .ok_or_else(|| Error::io(format!("{}: the runtime did not start", self.label())))
    }

    /// One ranged GET, on the plugin's runtime, waited for here.
    fn get_range(&self, range: Range<u64>) -> std::result::Result<bytes::Bytes, String> {
        let engine = self.engine().map_err(|e| e.to_string())?;
        let runtime = engine
            .runtime
            .as_ref()
            .ok_or_else(|| "the runtime has stopped".to_string())?;
        let (tx, rx) = mpsc::sync_channel(1);
        let store = engine.store.clone();
        let slots = engine.slots.clone();
        let path = self.path.clone();
        let guard = self.transport.guard();
        runtime.spawn(async move {
            let r = match slots.acquire_owned().await {
                Ok(_permit) => {
                    match tokio::time::timeout(guard, store.get_range(&path, range)).await {
                        Ok(Ok(b)) => Ok(b),
                        Ok(Err(e)) => Err(describe(&e)),
                        Err(_) => Err(format!("no answer within {guard:?}: gave up")),
                    }
                }
                Err(_) => Err("the plugin is shutting down".to_string()),
            };
            // The receiver is gone only if the caller is.
            let _ = tx.send(r);
        });
        rx.recv()
            .map_err(|_| "the request ended without an answer".to_string())?
    }
}

struct ObjectPlugin {
    shared: Arc<Shared>,
}

impl Backend for ObjectPlugin {
    fn name(&self) -> &str {
        self.shared.who
    }
    fn after_fork(&self) -> Result<()> {
        // Start the runtime now, in the final process, so the first client
        // does not wait for it (and a failure to start is reported here).
        self.shared.engine().map(|_| ())
    }
    fn open(&self, _readonly: bool, _export: &str) -> Result<Box<dyn Handle>> {
        Ok(Box::new(ObjectHandle {
            shared: self.shared.clone(),
        }))
    }
}

struct ObjectHandle {
    shared: Arc<Shared>,
}

impl Handle for ObjectHandle {
    fn source_name(&self) -> Option<String> {
        Some(self.shared.shown.clone())
    }
    fn source_version(&self) -> Option<String> {
        Some(self.shared.version.clone())
    }
    fn size(&self) -> Result<u64> {
        Ok(self.shared.size)
    }
    fn can_multi_conn(&self) -> Result<bool> {
        // Read-only: every connection sees the same bytes.
        Ok(true)
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let want = buf.len();
        let fail = |msg: String| {
            Error::io(format!(
                "{}: read of {want} bytes at offset {offset}: {msg}",
                self.shared.label()
            ))
        };
        let end = offset
            .checked_add(want as u64)
            .ok_or_else(|| fail("the range overflows".into()))?;
        let got = self.shared.get_range(offset..end).map_err(fail)?;
        if got.len() != want {
            return Err(fail(format!(
                "the store returned {} bytes instead of {want}",
                got.len()
            )));
        }
        buf.copy_from_slice(&got);
        Ok(())
    }
}

/// Check the parameters by building the store once, find the size with a
/// HEAD, and make the backend.
pub(crate) fn serve(
    who: &'static str,
    shown: String,
    path: Path,
    build: Build,
    transport: Transport,
) -> std::result::Result<Arc<dyn Backend>, ConfigError> {
    install_crypto_provider();
    let label = format!("{who}: {shown}");
    // Builder errors (a malformed key, a missing account) name no network.
    let store = build().map_err(|e| ConfigError::new(format!("{label}: {}", one_line(&e))))?;
    let guard = transport.guard();
    let probe_path = path.clone();
    let meta = run_detached(move || {
        Box::pin(async move {
            match tokio::time::timeout(guard, store.head(&probe_path)).await {
                Ok(Ok(meta)) => Ok(meta),
                Ok(Err(e)) => Err(describe(&e)),
                Err(_) => Err(format!("no answer within {guard:?}: gave up")),
            }
        })
    })
    .and_then(|r| r)
    .map_err(|e| ConfigError::new(format!("{label}: finding the size: {e}")))?;
    // The ETag is what both stores change on every write; the modification
    // time (always given) only when neither an ETag nor a version is.
    let version = match (&meta.e_tag, &meta.version) {
        (Some(e), _) => format!("etag:{e}"),
        (None, Some(v)) => format!("version:{v}"),
        (None, None) => format!("modified:{}", meta.last_modified.to_rfc3339()),
    };
    debug!("{label}: size {}, {version}", meta.size);
    Ok(Arc::new(ObjectPlugin {
        shared: Arc::new(Shared {
            who,
            shown,
            path,
            size: meta.size,
            version,
            build,
            transport,
            engine: OnceLock::new(),
            starting: Mutex::new(()),
        }),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_object_store_would_change_are_refused() {
        assert_eq!(
            object_path("gcs", "object", "a/b c.img").unwrap().as_ref(),
            "a/b c.img"
        );
        for bad in ["", "/a", "a/", "a//b", "a/./b", "a/../b", "a\nb"] {
            let e = object_path("gcs", "object", bad).unwrap_err();
            assert!(e.0.starts_with("gcs: object "), "{bad:?}: {e}");
        }
    }

    #[test]
    fn transport_parameters_are_checked() {
        for (k, v) in [
            ("timeout", "0"),
            ("timeout", "1.5"),
            ("retries", "-1"),
            ("retries", "101"),
            ("connections", "0"),
            ("proxy", "socks://x"),
            ("cainfo", "/nonexistent/ca.pem"),
            ("sslverify", "maybe"),
        ] {
            let mut cfg = Config::new(vec![(k.into(), v.into())]);
            let e = transport(&mut cfg, "azure").unwrap_err();
            assert!(
                e.0.starts_with("azure: ") && e.0.contains(&format!("{k}={v}")),
                "{k}={v}: {e}"
            );
        }
        let mut cfg = Config::new(vec![
            ("timeout".into(), "2".into()),
            ("retries".into(), "0".into()),
        ]);
        let t = transport(&mut cfg, "gcs").unwrap();
        assert_eq!(t.timeout, Duration::from_secs(2));
        assert_eq!(t.retry_config().max_retries, 0);
        // One attempt of 2 s, one backoff, the margin.
        assert_eq!(t.guard(), Duration::from_secs(9));
    }

    #[test]
    fn detached_runs_work_inside_a_runtime() {
        // What would panic with Runtime::block_on inside a runtime.
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let v = rt.block_on(async { run_detached(|| Box::pin(async { 42 })) });
        assert_eq!(v.unwrap(), 42);
    }
}
