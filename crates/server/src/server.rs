//! One server: the backend chain, the command line's policy for serving
//! it, and the thread model's locks around backend calls.

use nbdkit_backend::LockExt;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use nbdkit_backend::{Backend, Client, Error, ThreadModel};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::tls;

/// Server-wide settings from the command line.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// `-r`: refuse every write whatever the backend says.
    pub readonly: bool,
    /// `-t`: requests run at once per connection.
    pub threads: usize,
    /// `-e`: the name the default export is listed under.
    pub export_name: Option<String>,
    /// `--no-sr`: refuse structured replies (and extended headers).
    pub no_structured_replies: bool,
    /// `--no-mc`: refuse metadata contexts.
    pub no_meta_contexts: bool,
    /// `--mask-handshake`: handshake flags offered (FIXED_NEWSTYLE=1, NO_ZEROES=2).
    pub handshake_mask: u16,
    /// `--tls` and the certificates it uses.
    pub tls: tls::Tls,
    /// `--timeout`: a client that has not finished negotiating (TLS
    /// handshake included) by then is disconnected.  None: no limit.
    pub handshake_timeout: Option<std::time::Duration>,
    /// `--max-connections`: connections open at once, counted from accept
    /// (so clients still negotiating count); later ones are closed at once.
    /// None: no limit.  The command line's default is
    /// [`default_connection_limit`].
    pub max_connections: Option<usize>,
    /// `--keepalive`: SO_KEEPALIVE on accepted TCP connections, so that a
    /// client whose machine vanished without closing (power loss, a
    /// dropped network) is noticed by the kernel and its connection,
    /// threads and backend handle freed, instead of being held forever.
    pub keepalive: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            readonly: false,
            threads: 16,
            export_name: None,
            no_structured_replies: false,
            no_meta_contexts: false,
            handshake_mask: 0xffff,
            tls: tls::Tls::off(),
            handshake_timeout: None,
            max_connections: None,
            keepalive: false,
        }
    }
}

/// Descriptors kept for the server itself and what its backends open once
/// (log, plugin files shared by every connection, pipes, libraries).
const RESERVED_FDS: u64 = 64;

/// Descriptors one connection may hold: its socket, the copy that
/// `nanosleep` watches for a hang-up, and one the plugin opens for it (the
/// `file` plugin opens its file per connection).
const FDS_PER_CONNECTION: u64 = 3;

/// The connection limit when `--max-connections` is not given: as many
/// connections as the process's descriptor limit (RLIMIT_NOFILE, soft)
/// can hold, [`FDS_PER_CONNECTION`] each after [`RESERVED_FDS`]: 320 at the
/// usual 1024.  An idle connection holds no thread, so descriptors are
/// what connections use up first; past this a client is closed before the
/// greeting (and told why in the log) instead of the server running out of
/// descriptors mid-request, or `accept` failing with EMFILE while clients
/// wait in the backlog.  None when the limit is infinite.
pub fn default_connection_limit() -> Option<usize> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `lim`, which is ours.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0
        || lim.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    let n = lim.rlim_cur.saturating_sub(RESERVED_FDS) / FDS_PER_CONNECTION;
    Some(usize::try_from(n.max(1)).unwrap_or(usize::MAX))
}

/// One server: a backend chain plus the policy for serving it.
pub struct Server {
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) opts: ServerOptions,
    pub(crate) model: ThreadModel,
    /// Held around every backend call under `serialize_all_requests`.
    pub(crate) all_requests: Arc<std::sync::Mutex<()>>,
    /// One permit: held for a whole connection under
    /// `serialize_connections`.
    pub(crate) connections: Arc<Semaphore>,
    /// `--max-connections` slots, one held per open connection.
    pub(crate) open_slots: Option<Arc<Semaphore>>,
    pub(crate) next_conn: AtomicU64,
    pub(crate) tracker: TaskTracker,
}

impl Server {
    pub fn new(backend: Arc<dyn Backend>, opts: ServerOptions) -> Arc<Self> {
        let model = backend.thread_model();
        debug!("thread model: {}", model.as_str());
        let open_slots = opts.max_connections.map(|n| Arc::new(Semaphore::new(n)));
        Arc::new(Server {
            backend,
            opts,
            open_slots,
            model,
            all_requests: Arc::new(std::sync::Mutex::new(())),
            connections: Arc::new(Semaphore::new(1)),
            next_conn: AtomicU64::new(1),
            tracker: TaskTracker::new(),
        })
    }

    pub fn thread_model(&self) -> ThreadModel {
        self.model
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Requests one connection may run at once.
    pub(crate) fn request_slots(&self) -> usize {
        if self.model <= ThreadModel::SerializeRequests {
            1
        } else {
            self.opts.threads.max(1)
        }
    }

    /// Run a backend call on a blocking thread, under the thread model's
    /// global lock if it has one.  A panicking backend becomes EIO for that
    /// request only.
    /// The call sees `client` as [`Client::current`].
    pub(crate) async fn blocking<T, F>(
        &self,
        client: &Arc<Client>,
        f: F,
    ) -> nbdkit_backend::Result<T>
    where
        F: FnOnce() -> nbdkit_backend::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let lock =
            (self.model == ThreadModel::SerializeAllRequests).then(|| self.all_requests.clone());
        let client = client.clone();
        tokio::task::spawn_blocking(move || {
            let _c = client.enter();
            let _g = lock.as_ref().map(|l| l.lock_unpoisoned());
            f()
        })
        .await
        .unwrap_or_else(|e| Err(Error::io(format!("backend failed: {e}"))))
    }

    /// Run a backend call on this thread under the thread model's global
    /// lock, if it has one.
    pub(crate) fn locked<T>(&self, f: impl FnOnce() -> T) -> T {
        let _g = (self.model == ThreadModel::SerializeAllRequests)
            .then(|| self.all_requests.lock_unpoisoned());
        f()
    }

    /// Like [`Server::blocking`], for calls on the backend itself.
    pub(crate) async fn blocking_backend<T, F>(
        &self,
        client: &Arc<Client>,
        f: F,
    ) -> nbdkit_backend::Result<T>
    where
        F: FnOnce(&dyn Backend, bool) -> nbdkit_backend::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let b = self.backend.clone();
        let ro = self.opts.readonly;
        self.blocking(client, move || f(&*b, ro)).await
    }

    /// The name "" stands for: `-e`, else what the backend says (`None`
    /// when the backend refuses a default export).
    pub(crate) async fn default_export(&self, client: &Arc<Client>) -> Option<String> {
        if let Some(n) = &self.opts.export_name {
            return Some(n.clone());
        }
        self.blocking_backend(client, |b, ro| b.default_export(ro))
            .await
            .ok()
    }
}
